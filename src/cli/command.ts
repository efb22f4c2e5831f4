/**
 * The `multifd` command: its subcommands, its help pages, and how a run ends. @effect/cli parses the
 * command line; the help pages (`--help`), `--version`, a missing command and the way errors are printed
 * (`multifd: error: ...` on stderr, and with `--json` one JSON object on stdout) are the command's own.
 *
 * @since 0.1.0
 */
import * as AutoCorrect from "@effect/cli/AutoCorrect"
import * as CliConfig from "@effect/cli/CliConfig"
import * as Command from "@effect/cli/Command"
import * as HelpDoc from "@effect/cli/HelpDoc"
import * as ValidationError from "@effect/cli/ValidationError"
import * as FileSystem from "@effect/platform/FileSystem"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import * as FsSync from "node:fs"
import { ExitCode, type Flags, oneLine, toExitCode, UsageError, wantsJson } from "./errors.js"
import * as Help from "./help.js"
import * as Log from "./log.js"
import * as Recv from "./recv.js"
import * as Send from "./send.js"
import * as Terminal from "./terminal.js"

/** The program name, as it appears in help and messages. */
export const NAME = "multifd"

/** The version printed by `--version`. */
export const VERSION = "0.1.0"

/** `multifd` with its `recv` and `send` subcommands. */
export const command = Command.make(NAME).pipe(Command.withSubcommands([Recv.command, Send.command]))

/** Parses `process.argv` (runtime and script first) and runs the chosen subcommand. */
export const run = Command.run(command, { name: NAME, version: VERSION })

/**
 * How @effect/cli parses: built-in options (--help, --version, ...) are left out of its help, and flags are
 * matched in their own case. Matched case-insensitively (@effect/cli's default), a flag in another case
 * (`--TLS-PSK keys.psk`, `--CHANNELS 4`) was taken and its value then dropped: recv listened without TLS, send
 * used the default channels. It is now an unknown flag (exit 2, "did you mean --tls-psk?").
 */
export const config = CliConfig.layer({ showBuiltIns: false, isCaseSensitive: true })

/** What the environment sets (`MigrationConfig`), on a help page's footer. */
const environment = (role: "send" | "recv"): string =>
  "Environment: each transfer flag falls back on its MULTIFD_* variable (a flag given wins" +
  (role === "recv" ? "; on recv they are expectations too" : "") + "); " +
  "without --timeout, MULTIFD_TIMEOUT, MULTIFD_CONNECT_TIMEOUT and MULTIFD_HANDSHAKE_TIMEOUT set the timeouts; " +
  (role === "send"
    ? "MULTIFD_DOWNTIME_LIMIT, MULTIFD_MAX_ROUNDS, MULTIFD_MAX_DURATION and MULTIFD_ON_NO_CONVERGENCE the live policy"
    : "MULTIFD_MAX_RAM the largest memory a source may ask for and MULTIFD_ACCEPT_TIMEOUT how long to wait for one") +
  ". A bad value exits 2 naming the variable."

const EXIT_STATUS = "Exit status: 0 success; 1 the migration failed (one line on stderr says why); 2 bad usage or " +
  "configuration; 130 / 143 / 129 / 131 / 142 interrupted by SIGINT / SIGTERM / SIGHUP / SIGQUIT / SIGALRM."

/** `multifd --help`, and (on stderr, exit 2) what `multifd` alone prints. */
export const overview = (width?: number): string =>
  Help.render({
    title: `${NAME} ${VERSION}: QEMU-compatible multifd migration of RAM images, verified end to end`,
    usage: [
      `${NAME} recv <uri> --out FILE [options]        wait for one migration, write the received image`,
      `${NAME} send <uri> --in FILE [options]         migrate an image file to a destination`,
      `${NAME} recv <uri> --from-qemu --channels N (--out FILE | --out-dir DIR | --vm FILE) [options]`,
      `                                               receive from an unmodified QEMU 10 (the RAM, or the whole VM)`,
      `${NAME} send <uri> --to-qemu --vm FILE --channels N [options]`,
      `                                               migrate a whole VM into an unmodified QEMU 10`,
      `${NAME} --help | --version`
    ],
    sections: [],
    footer: [
      `Run \`${NAME} send --help\` or \`${NAME} recv --help\` for their options.`,
      "uri: tcp:HOST:PORT (IPv6 as tcp:[::1]:PORT), unix:PATH, or file:PATH (a snapshot file).",
      EXIT_STATUS
    ],
    examples: [
      ["on the destination host: wait on port 4444", `${NAME} recv tcp:0.0.0.0:4444 --out received.img`],
      ["on the source host: migrate over 4 channels", `${NAME} send tcp:10.0.0.2:4444 --in guest.img --channels 4`]
    ]
  }, width)

/** `multifd send --help`. */
export const sendHelp = (width?: number): string => {
  const all = Help.entriesOf(Send.command)
  return Help.render({
    title: `${NAME} send: migrate the RAM image in --in to a destination listening at <uri>, or a whole VM into QEMU`,
    usage: [`${NAME} send <uri> --in FILE [options]`, `${NAME} send <uri> --to-qemu --vm FILE --channels N [options]`],
    sections: [
      { heading: "Arguments", entries: Help.pick(all, ["<uri>", "--in"]) },
      { heading: "To QEMU", entries: Help.pick(all, ["--to-qemu", "--vm", "--uuid"]) },
      { heading: "Transfer", entries: Help.pick(all, ["--channels", "--page-size", "--compression", "--compression-level", "--zero-page", "--max-bandwidth"]) },
      { heading: "TLS", entries: Help.pick(all, ["--tls-psk", "--tls-identity", "--tls-ca", "--tls-hostname", "--tls-cert", "--tls-key", "--tls-crl", "--tls-ciphers"]) },
      { heading: "Timing and output", entries: Help.pick(all, ["--timeout", "--reconnect", "--json", "--quiet", "--verbose"]) }
    ],
    footer: [environment("send"), EXIT_STATUS],
    examples: [
      ["4 channels over TCP", `${NAME} send tcp:10.0.0.2:4444 --in guest.img --channels 4`],
      ["zstd, over TLS with QEMU's keys.psk", `${NAME} send tcp:10.0.0.2:4444 --in guest.img --compression zstd --tls-psk keys.psk`],
      ["x509: check the destination's certificate, present a client certificate", `${NAME} send tcp:dst.example:4444 --in guest.img --tls-ca ca.pem --tls-cert alice.pem --tls-key alice-key.pem`],
      ["at most 100 MiB/s over the 4 channels together", `${NAME} send tcp:10.0.0.2:4444 --in guest.img --channels 4 --max-bandwidth 100M`],
      ["save a snapshot file (parallel writers, sparse)", `${NAME} send file:/var/tmp/guest.snap --in guest.img --channels 4`],
      ["resume a VM in QEMU (-incoming tcp:0:4444, multifd on, multifd-channels 4)", `${NAME} send tcp:10.0.0.3:4444 --to-qemu --vm guest.vm --channels 4`],
      ["statistics as JSON for a script", `${NAME} send unix:/run/multifd.sock --in guest.img --json --quiet`]
    ]
  }, width)
}

/** `multifd recv --help`. */
export const recvHelp = (width?: number): string => {
  const all = Help.entriesOf(Recv.command)
  return Help.render({
    title: `${NAME} recv: wait at <uri> for one migration and write the received RAM image`,
    usage: [
      `${NAME} recv <uri> --out FILE [options]`,
      `${NAME} recv <uri> --from-qemu --channels N (--out FILE | --out-dir DIR | --vm FILE) [options]`,
      `${NAME} recv file:PATH --from-qemu (--out FILE | --out-dir DIR | --vm FILE)`
    ],
    sections: [
      { heading: "Arguments", entries: Help.pick(all, ["<uri>", "--out", "--out-dir", "--vm", "--from-qemu", "--uuid", "--postcopy-ram"]) },
      { heading: "Transfer (the source decides; given here, the source must agree)", entries: Help.pick(all, ["--channels", "--page-size", "--compression"]) },
      { heading: "TLS", entries: Help.pick(all, ["--tls-psk", "--tls-ca", "--tls-cert", "--tls-key", "--tls-crl", "--tls-verify-peer", "--tls-authz", "--tls-ciphers"]) },
      { heading: "Timing and output", entries: Help.pick(all, ["--timeout", "--json", "--quiet", "--verbose"]) }
    ],
    footer: [
      "The image is written to a temporary file beside --out, flushed to disk and renamed only after its digests " +
      "verified; the source reports success only then. On failure nothing is left.",
      environment("recv"),
      EXIT_STATUS
    ],
    examples: [
      ["receive on any free port (the line `multifd: listening on tcp:...` says which)", `${NAME} recv tcp:127.0.0.1:0 --out received.img`],
      ["over TLS with client certificates: only CN alice may migrate here", `${NAME} recv tcp:0.0.0.0:4444 --out r.img --tls-cert server.pem --tls-key server-key.pem --tls-ca ca.pem --tls-authz alice`],
      [
        "the same, admitting the whole DN O=Example,CN=alice (as QEMU's tls-authz) and refusing revoked certificates",
        `${NAME} recv tcp:0.0.0.0:4444 --out r.img --tls-cert server.pem --tls-key server-key.pem --tls-ca ca.pem --tls-crl ca-crl.pem --tls-authz 'O=Example,CN=alice'`
      ],
      ["restore a snapshot file", `${NAME} recv file:/var/tmp/guest.snap --out restored.img`],
      ["from QEMU (migrate_set_capability multifd on; multifd-channels 4)", `${NAME} recv tcp:0.0.0.0:4444 --from-qemu --channels 4 --out-dir ram/`],
      ["keep a running VM from QEMU as a mapped-ram file", `${NAME} recv tcp:0.0.0.0:4444 --from-qemu --channels 4 --vm guest.vm`],
      ["the RAM of a file QEMU saved (migrate file: with mapped-ram)", `${NAME} recv file:/var/tmp/qemu.vm --from-qemu --out ram.img`]
    ]
  }, width)
}

const HELP_FLAGS = new Set(["--help", "-h"])
/**
 * @effect/cli's built-in flags the command refuses, as flags it does not know: its interactive mode (`--wizard`, a
 * prompt on stdout that waited on stdin for ever), `--completions SHELL` (which printed a completion script and exited
 * 0 in place of the migration asked for, `send ... --completions bash`, while `multifd --completions bash` was
 * refused) and `--log-level LEVEL` (taken in silence, to no visible end: `--verbose` is the command's). None is on a
 * help page.
 */
const BUILT_INS = ["--wizard", "--completions", "--log-level"]
const COMMANDS = new Set(["send", "recv"])

/** What the command line asks before any parsing: help, the version, or nothing at all. */
const early = (
  args: ReadonlyArray<string>
): { readonly stdout?: { readonly text: string; readonly what: string }; readonly stderr?: string; readonly code: number } | undefined => {
  const options = args.slice(0, args.includes("--") ? args.indexOf("--") : args.length)
  const subcommand = COMMANDS.has(args[0] ?? "") ? args[0] : undefined
  // wrapped for the terminal the page goes to, if it goes to one
  const width = (stream: NodeJS.WriteStream) => Help.widthFor(stream.isTTY ? stream.columns : undefined)
  if (options.some((a) => HELP_FLAGS.has(a))) {
    const w = width(process.stdout)
    // `multifd --help send` asks for send's page as `multifd send --help` does
    const page = subcommand ?? options.find((a) => COMMANDS.has(a))
    const text = page === "send" ? sendHelp(w) : page === "recv" ? recvHelp(w) : overview(w)
    return { stdout: { text, what: "the help" }, code: ExitCode.Ok }
  }
  // after a subcommand too: @effect/cli printed the bare number there
  if (options.includes("--version")) {
    // with --json, for a script as every other answer: {"name":"multifd","version":"0.1.0"}
    const text = wantsJson(options) ? JSON.stringify({ name: NAME, version: VERSION }) : `${NAME} ${VERSION}`
    return { stdout: { text: `${text}\n`, what: "the version" }, code: ExitCode.Ok }
  }
  if (args.length === 0) return { stderr: overview(width(process.stderr)), code: ExitCode.Usage }
  return undefined
}

/**
 * Why the command line (`args`) names no command first, if it does not: a flag before the command (`multifd --json
 * send ...`, as `git --no-pager log` takes one) says so and where it goes; a word that is no command is named, with
 * the command it is closest to. @effect/cli said "Invalid subcommand for multifd - use one of 'recv', 'send'" of
 * both, naming neither what was given nor, with `send` on the line, what was wrong with it.
 */
const notACommand = (args: ReadonlyArray<string>): string | undefined => {
  const first = args[0]
  if (first === undefined || COMMANDS.has(first)) return undefined
  const options = args.slice(0, args.includes("--") ? args.indexOf("--") : args.length)
  if (first.startsWith("-") && first !== "-") {
    const command = options.find((arg) => COMMANDS.has(arg))
    return command === undefined
      ? `${oneLine(first)} comes before any command: give a command first (multifd send ... or multifd recv ...), its flags after it`
      : `${oneLine(first)} comes before the command: give the flags after it (multifd ${command} <uri> ... ${oneLine(first)})`
  }
  const config = CliConfig.make({})
  const closest = [...COMMANDS].find((command) => AutoCorrect.levensteinDistance(first, command, config) <= 2)
  const named = first === "" ? `""` : oneLine(first)
  return `unknown command ${named}${closest === undefined ? "" : ` (did you mean ${closest}?)`}: the commands are send and recv`
}

/**
 * The arguments as the system gave them, byte for byte (`/proc/self/cmdline`, where there is one), for
 * `notUtf8`: Node decodes the command line as UTF-8, each byte that is not a character read as U+FFFD.
 */
const rawArguments = (): ReadonlySet<string> | undefined => {
  try {
    const bytes = FsSync.readFileSync("/proc/self/cmdline")
    const out = new Set<string>()
    let start = 0
    for (let i = 0; i < bytes.length; i++) {
      if (bytes[i] !== 0) continue
      out.add(bytes.subarray(start, i).toString("hex"))
      start = i + 1
    }
    return out
  } catch {
    return undefined
  }
}

/**
 * Why an argument cannot be used as given, if one cannot: a name that is not valid UTF-8 (a file made on a system
 * in Latin-1, a byte of a broken copy) reaches the command with U+FFFD in place of each bad byte, and so names
 * another file: `send file:$'\xfe.snap'` saved the snapshot as `\uFFFD.snap`, reported success naming that, and
 * left the file asked for absent; `--in` said "no such file" of a file that is there. A U+FFFD the command line
 * really holds (its UTF-8 bytes, `/proc/self/cmdline` says) is taken.
 */
const notUtf8 = (args: ReadonlyArray<string>): string | undefined => {
  const suspect = args.findIndex((arg) => arg.includes("\uFFFD"))
  if (suspect < 0) return undefined
  const raw = rawArguments()
  const at = args.findIndex((arg) => arg.includes("\uFFFD") && raw?.has(Buffer.from(arg, "utf8").toString("hex")) !== true)
  if (at < 0) return undefined
  const flag = at > 0 && /^--?[A-Za-z][\w-]*$/.test(args[at - 1]!) ? `${args[at - 1]} ` : ""
  return `${flag}${oneLine(args[at]!)}: not valid UTF-8 (each byte shown as \uFFFD is not a character): it would name ` +
    "another file than the one meant; give the name in UTF-8 (rename the file, or reach it through a link)"
}

/** The values @effect/cli reads as a switch's true or false (`--json=yes`, `--quiet=0`), as it spells them. */
const SWITCH_VALUES = ["true", "false", "yes", "no", "on", "off", "y", "n", "1", "0"]

/**
 * Why a switch of the command line (`args`, subcommand first) has a value it cannot have, if one has: @effect/cli
 * takes `--switch=VALUE` as the switch given whatever VALUE is, when VALUE is not one of `SWITCH_VALUES`, and drops
 * VALUE: `--from-qemu=False` received from QEMU, `--json=flase` printed JSON, `--quiet=never` printed nothing.
 */
const badSwitchValue = (args: ReadonlyArray<string>): string | undefined => {
  const switches = new Set(
    [...Help.entriesOf(Send.command), ...Help.entriesOf(Recv.command)]
      .filter((entry) => /^--[\w-]+(?:, -\w)?$/.test(entry.term))
      .map(Help.flagOf)
  )
  const options = args.slice(0, args.includes("--") ? args.indexOf("--") : args.length)
  for (const arg of options) {
    const m = /^(--[\w-]+)=(.*)$/s.exec(arg)
    if (m !== null && switches.has(m[1]!) && !SWITCH_VALUES.includes(m[2]!)) {
      return `${oneLine(arg)}: ${m[1]} is a switch: give it alone, or with =true or =false`
    }
  }
  return undefined
}

/** The flags of the subcommands and the command line `args` (subcommand first), to explain a bad flag. */
const flags = (args: ReadonlyArray<string>): Flags => {
  const subcommand = args[0]
  const flagsOf = (entries: ReadonlyArray<Help.Entry>) =>
    entries.map(Help.flagOf).filter((t) => t.startsWith("-"))
  const send = flagsOf(Help.entriesOf(Send.command))
  const recv = flagsOf(Help.entriesOf(Recv.command))
  const own = subcommand === "send" ? send : subcommand === "recv" ? recv : [...send, ...recv]
  // the flags that take a value (`--channels N`), by their long and short names: not a switch (`--quiet, -q`)
  const takesValue = new Set(
    [...Help.entriesOf(Send.command), ...Help.entriesOf(Recv.command)]
      .filter((entry) => !/^--[\w-]+(?:, -\w)?$/.test(entry.term))
      .flatMap((entry) => entry.term.split(/[ ,]+/).filter((t) => /^--?[A-Za-z][\w-]*$/.test(t)))
  )
  // the short names (-q of --quiet): known, never suggested for another (-x is not "did you mean -q?")
  const aliases = [...Help.entriesOf(Send.command), ...Help.entriesOf(Recv.command)]
    .flatMap((entry) => entry.term.split(/[ ,]+/).filter((t) => /^-[A-Za-z]$/.test(t)))
  return {
    ownerOf: (flag) =>
      own.includes(flag) ? undefined : send.includes(flag) ? "send" : recv.includes(flag) ? "recv" : undefined,
    closest: (flag) => {
      if (aliases.includes(flag)) return flag
      // short switches run together (-qv), which @effect/cli does not take apart: "did you mean --vm?" misled
      const letters = /^-([A-Za-z]{2,})$/.exec(flag)?.[1]
      if (letters !== undefined && [...letters].every((c) => aliases.includes(`-${c}`))) {
        return [...letters].map((c) => `-${c}`).join(" ")
      }
      const config = CliConfig.make({})
      const ranked = own.map((known) => [known, AutoCorrect.levensteinDistance(flag, known, config)] as const)
        .sort((a, b) => a[1] - b[1])
      return ranked[0] !== undefined && ranked[0][1] <= 2 ? ranked[0][0] : undefined
    },
    givenWith: (value) => {
      for (let i = 1; i < args.length; i++) {
        const arg = args[i]!
        if (arg.startsWith("--") && arg.endsWith(`=${value}`)) return arg.slice(0, arg.length - value.length - 1)
        if (arg === value && args[i - 1]!.startsWith("-")) return args[i - 1]
      }
      return undefined
    },
    misplaced: (flag) => {
      const dashes = args.indexOf("--")
      const before = dashes < 0 ? args : args.slice(0, dashes)
      const given = before.filter((a) => a === flag || a.startsWith(`${flag}=`)).length
      if (given >= 2) return "twice"
      // `--out=`: @effect/cli reads it as --out given with nothing, and reports it as an argument it does not know
      if (before.includes(`${flag}=`)) return "last"
      if (dashes >= 0 && args.slice(dashes + 1).includes(flag)) return "afterDashes"
      // `-q=1` ("-q given more than once", given once): a short flag takes nothing after `=`
      if (/^-[A-Za-z]$/.test(flag) && before.some((a) => a.startsWith(`${flag}=`))) return "withValue"
      if (args.at(-1) === flag) return "last"
      return undefined
    },
    dangling: () => {
      const dashes = args.indexOf("--")
      const last = (dashes < 0 ? args : args.slice(0, dashes)).at(-1)
      return last !== undefined && takesValue.has(last) ? last : undefined
    }
  }
}

/**
 * The file system @effect/cli checks path flags with, where a path that cannot exist (a component that is a
 * file, a link loop, a name too long, a directory not searchable) counts as absent: @effect/cli turns any
 * other answer of `exists` into a defect ("internal error", exit 1). The command then opens the path and says
 * why it cannot, in its own words (exit 2).
 */
const forgivingExists = Effect.updateService(FileSystem.FileSystem, (fs) => ({
  ...fs,
  exists: (path: string) => Effect.orElseSucceed(fs.exists(path), () => false)
}))

/**
 * The whole command for `argv` (runtime and script first, as `process.argv`): parses, runs, reports any
 * failure (one line on stderr; with `--json` also one JSON object on stdout) and succeeds with the exit
 * code. Only an interruption fails it. It prints through the `Terminal` in context (`Terminal.stdio` from
 * `main.ts`), else through `Console`.
 */
export const main = (argv: ReadonlyArray<string>) =>
  Effect.gen(function*() {
    const args = argv.slice(2)
    const terminal = yield* Effect.orElse(Effect.serviceOptional(Terminal.Terminal), () => Terminal.fromConsole)
    const answer = early(args)
    if (answer !== undefined) {
      if (answer.stdout !== undefined) {
        const written = yield* Effect.either(terminal.out(answer.stdout.text.replace(/\n$/, ""), answer.stdout.what))
        if (Either.isLeft(written)) {
          yield* terminal.err(`multifd: error: ${written.left.message}`)
          return ExitCode.Failed
        }
      }
      if (answer.stderr !== undefined) yield* terminal.err(answer.stderr.replace(/\n$/, ""))
      return answer.code
    }
    const console = yield* Effect.console
    const reporting = { json: wantsJson(args), terminal, flags: flags(args) }
    // @effect/cli's built-in flags, hidden from the help pages (`showBuiltIns: false`) but still taken, anywhere on
    // the line (after `--` too): its interactive mode prompted on stdout, --json or not, and waited on stdin for ever,
    // even at its end (the command is for scripts and terminals alike, and not interactive); see BUILT_INS
    const builtIn = args.map((arg) => BUILT_INS.find((flag) => arg === flag || arg.startsWith(`${flag}=`))).find((f) => f !== undefined)
    if (builtIn !== undefined) {
      return yield* toExitCode(reporting)(new UsageError({ detail: `unknown flag ${builtIn}` }))
    }
    const encoding = notUtf8(args)
    if (encoding !== undefined) return yield* toExitCode(reporting)(new UsageError({ detail: encoding }))
    const switchValue = badSwitchValue(args)
    if (switchValue !== undefined) return yield* toExitCode(reporting)(new UsageError({ detail: switchValue }))
    const noCommand = notACommand(args)
    if (noCommand !== undefined) {
      return yield* toExitCode(reporting)(Effect.fail(ValidationError.commandMismatch(HelpDoc.p(noCommand))))
    }
    return yield* Effect.suspend(() => run(argv)).pipe(
      forgivingExists,
      // @effect/cli's own error messages are reported by toExitCode
      Effect.withConsole(Terminal.withoutErrors(console)),
      Effect.provideService(Terminal.Terminal, terminal),
      toExitCode(reporting)
    )
  }).pipe(
    // Effect's runtime logs each fiber that fails (at Debug: with --verbose), and one failure of a migration ends
    // several (its races, its channels' fibers): it looked like a crash. The failure is the command's error line.
    Effect.withUnhandledErrorLogLevel(Option.none()),
    Effect.provide(Log.layer),
    Effect.provide(config)
  )
