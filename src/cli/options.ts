/**
 * The command line of `multifd`: the uri argument and the option groups. Each group is one
 * `Options.all({...})`, so a command is `{ uri, file, transfer, ..., output }` and a new concern (TLS) is one
 * more group added to both commands.
 *
 * Values are validated here, while parsing: @effect/cli prints the problem and the command exits 2.
 *
 * @since 0.1.0
 */
import * as Args from "@effect/cli/Args"
import * as HelpDoc from "@effect/cli/HelpDoc"
import * as Options from "@effect/cli/Options"
import * as ValidationError from "@effect/cli/ValidationError"
import * as Config from "effect/Config"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import * as Fs from "node:fs"
import * as Bandwidth from "../Bandwidth.js"
import * as GuestRam from "../GuestRam.js"
import * as Field from "../internal/configField.js"
import * as MigrationConfig from "../MigrationConfig.js"
import * as Tls from "../Tls.js"
import * as Protocol from "../Protocol.js"
import * as Transport from "../Transport.js"

// ---------------------------------------------------------------------------------------------------------
// Parsers (pure, exported for tests)

/** Channels a migration may use (`Protocol`'s limits). */
export const MIN_CHANNELS = Protocol.MIN_CHANNELS
export const MAX_CHANNELS = Protocol.MAX_CHANNELS

/** Smallest and largest page size the library accepts (a power of two in between; `Protocol`'s limits). */
export const MIN_PAGE_SIZE = Protocol.MIN_PAGE_SIZE
export const MAX_PAGE_SIZE = Protocol.MAX_PAGE_SIZE

/** Why a channel count is unusable, if it is (`Protocol.checkChannels`, naming the flag). */
export const checkChannels = (n: number): string | undefined => Protocol.checkChannels(n, "--channels")

/**
 * A channel count that may be 0 too, which only `recv --from-qemu` and `send --to-qemu` take (QEMU without multifd):
 * the command refuses it otherwise.
 */
export const checkZeroOrChannels = (n: number): string | undefined => n === 0 ? undefined : checkChannels(n)

/** A channel count on recv: 0 too, which only --from-qemu takes (QEMU without multifd). */
export const checkRecvChannels = checkZeroOrChannels

/** Why a page size is unusable, if it is (`Protocol.checkPageSize`, naming the flag). */
export const checkPageSize = (n: number): string | undefined => Protocol.checkPageSize(n, "--page-size")

/** Parses `30s`, `500ms`, `2m`, `1h` or a plain number of seconds; must be positive (`MigrationConfig.parseDuration`). */
export const parseDuration = (text: string): Either.Either<Duration.Duration, string> =>
  Either.mapLeft(MigrationConfig.parseDuration(text), (why) => `--timeout: ${why}`)

const invalid = (message: string) => ValidationError.invalidValue(HelpDoc.p(message))

const check = <A>(problem: (a: A) => string | undefined) => (a: A) => {
  const why = problem(a)
  return why === undefined ? Effect.succeed(a) : Effect.fail(invalid(why))
}

/**
 * Why `n` is a level of no compression method, if it is not one of any: a level given without compression is
 * ignored, but not one that no method has (as MULTIFD_COMPRESSION_LEVEL is checked).
 */
export const checkAnyLevel = (n: number): string | undefined => {
  const why = MigrationConfig.checkAnyCompressionLevel(n)
  return why === undefined ? undefined : `--compression-level ${why}`
}

/** A value that may not be empty (`--out ''` named no file and failed only at the end). */
const nonEmpty = (name: string) => (text: string) =>
  text.length === 0 ? Effect.fail(invalid(`--${name}: an empty value`)) : Effect.succeed(text)

/**
 * A path that names a file, not the convention for standard input or output (`--out -` made a file called "-";
 * an image or a snapshot must be a file the command can sync, rename and read at offsets).
 */
const notStdio = (name: string) => (path: string) =>
  path === "-"
    ? Effect.fail(invalid(`--${name} -: the command reads and writes files, not standard input or output; name a file (./- for one called -)`))
    : Effect.succeed(path)

/**
 * Why a path that starts with `~` names nothing, if it does: the shell expands `~` only at the start of a word, so
 * `--out=~/x.img`, `"~/x.img"` and `file:~/x.snap` reach the command as they are, a path under a directory named
 * `~` in the working directory. Where there is none, the path is refused naming the `~` ("~/x.img: cannot create
 * x.img.123.partial beside it: no such file or directory" sent the user looking for the directory).
 */
export const unexpandedTilde = (path: string): string | undefined =>
  (path === "~" || path.startsWith("~/")) && !Fs.existsSync("~")
    ? "the shell does not expand ~ after = or inside quotes or a uri: write the path out, as $HOME" + path.slice(1)
    : undefined

const expanded = (name: string) => (path: string) => {
  const why = unexpandedTilde(path)
  return why === undefined ? Effect.succeed(path) : Effect.fail(invalid(`--${name} ${path}: ${why}`))
}

/** A path flag (`Options.file` / `Options.directory`): an empty path, `-` or an unexpanded `~` is an error naming the flag. */
const pathOption = (name: string, kind: "file" | "directory" = "file") =>
  (kind === "file" ? Options.file(name) : Options.directory(name)).pipe(
    Options.mapEffect(nonEmpty(name)),
    Options.mapEffect(notStdio(name)),
    Options.mapEffect(expanded(name))
  )

/**
 * A flag naming a credentials file (a PEM or PSK file), which may also be a pipe: `--tls-psk <(vault read ...)` keeps a
 * key off the disk, and the shell passes it as `/dev/fd/63`, a pipe, which `Options.file` refused as "not a regular
 * file". A directory or a device is still refused so; a path that does not exist is left to the library, which names it.
 */
const credentialsPath = (name: string) =>
  Options.text(name).pipe(
    Options.mapEffect(nonEmpty(name)),
    Options.mapEffect(notStdio(name)),
    Options.mapEffect(expanded(name)),
    Options.mapEffect((path) =>
      Effect.flatMap(
        // a path that cannot be looked at (missing, a file as a directory, no permission): the library says why
        Effect.orElseSucceed(Effect.try(() => Fs.statSync(path, { throwIfNoEntry: false })), () => undefined),
        (stat) =>
          stat === undefined || stat.isFile() || stat.isFIFO()
            ? Effect.succeed(path)
            : Effect.fail(invalid(`--${name} ${path}: not a regular file`))
      )
    )
  )

/** An integer flag: a value that is not one is an error naming the flag. */
const integer = (name: string, pseudo: string) =>
  Options.text(name).pipe(
    Options.withPseudoName(pseudo),
    Options.mapEffect((text) =>
      Either.match(Field.integer(text), {
        onLeft: (why) => Effect.fail(invalid(`--${name}: ${why}`)),
        onRight: Effect.succeed
      })
    )
  )

/** A flag that takes one of `values`: another value is an error naming the flag and the choices. */
const choice = <const A extends string>(name: string, values: ReadonlyArray<A>) =>
  Options.text(name).pipe(
    Options.withPseudoName(values.join("|")),
    Options.mapEffect((text) =>
      (values as ReadonlyArray<string>).includes(text)
        ? Effect.succeed(text as A)
        : Effect.fail(invalid(`--${name} must be one of ${values.join(", ")}, not ${JSON.stringify(text)}`))
    )
  )

// ---------------------------------------------------------------------------------------------------------
// Argument

/** Where to connect (send) or listen (recv). */
export const uri: Args.Args<Transport.Address> = Args.text({ name: "uri" }).pipe(
  Args.withDescription(
    "tcp:HOST:PORT (IPv6 as tcp:[::1]:PORT; recv may use port 0), unix:PATH, or file:PATH (send saves a " +
      "snapshot file, recv restores one; no TLS or compression)"
  ),
  Args.mapEffect((text) =>
    Either.match(Transport.parseAddress(text), {
      onLeft: (error) => Effect.fail(HelpDoc.p(`bad uri: ${error.message}`)),
      onRight: (address) => {
        const why = address._tag === "File" ? unexpandedTilde(address.path) : undefined
        return why === undefined ? Effect.succeed(address) : Effect.fail(HelpDoc.p(`bad uri: ${text}: ${why}`))
      }
    })
  )
)

// ---------------------------------------------------------------------------------------------------------
// Files

/** The image to migrate (required, except with --to-qemu). */
export const input = pathOption("in").pipe(
  Options.withPseudoName("FILE"),
  Options.withDescription(
    "The RAM image to migrate: a file whose size is a positive multiple of --page-size. Required, except with " +
      "--to-qemu --vm."
  ),
  Options.optional
)

/** `--uuid UUID`: QEMU's `-uuid`, which its multifd channels carry. */
const qemuUuid = (description: string): Options.Options<Option.Option<Uint8Array>> =>
  Options.text("uuid").pipe(
    Options.withPseudoName("UUID"),
    Options.withDescription(description),
    Options.mapEffect((text) => {
      const uuid = Protocol.parseUuid(text)
      return uuid === undefined
        ? Effect.fail(invalid(`--uuid ${text}: not a uuid (as QEMU's -uuid: 8-4-4-4-12 hex digits)`))
        : Effect.succeed(uuid)
    }),
    Options.optional
  )

/** Where `send --to-qemu` migrates from. */
export interface SendQemu {
  readonly toQemu: boolean
  readonly vm: Option.Option<string>
  /** The destination QEMU's `-uuid`, which its multifd channels must carry. */
  readonly uuid: Option.Option<Uint8Array>
}

/** `--to-qemu` and `--vm` of `send`. */
export const sendQemu: Options.Options<SendQemu> = Options.all({
  toQemu: Options.boolean("to-qemu").pipe(
    Options.withDescription(
      "Migrate a whole VM into an unmodified QEMU 10 listening at <uri> (-incoming, capability multifd, " +
        "multifd-channels as --channels, multifd-compression as --compression, the same machine options as the " +
        "VM's source; --channels 0: a QEMU without capability multifd, every page on the main channel); succeeds " +
        "once QEMU says it loaded the VM. --page-size and --zero-page do not apply (the VM " +
        "file sets the page size; zero pages travel as offsets, as QEMU sends them): given, they are refused."
    )
  ),
  vm: pathOption("vm").pipe(
    Options.withPseudoName("FILE"),
    Options.withDescription(
      "With --to-qemu: the VM to migrate, a QEMU mapped-ram migration file (written by recv --vm, or by QEMU's own " +
        "migrate file: with capability mapped-ram; PATH,offset=N for one QEMU's migrate file:PATH,offset=N wrote at N)."
    ),
    Options.optional
  ),
  uuid: qemuUuid(
    "With --to-qemu: the -uuid QEMU was started with (libvirt starts it with the domain's), which QEMU requires " +
      "its multifd channels to carry (default: the VM file's, which QEMU's capability validate-uuid puts there, " +
      "else zeros, QEMU's without -uuid)."
  )
})

/** Where to write the received image. */
export const output = pathOption("out").pipe(
  Options.withPseudoName("FILE"),
  Options.withDescription(
    "Where to write the received RAM image (the blocks concatenated in order; an existing file is replaced). " +
      "It is written to a temporary file beside it and renamed only after the migration succeeded and its " +
      "digests verified; on failure nothing is left. Required, except with --from-qemu --out-dir or --vm."
  ),
  Options.optional
)

/** How `recv` writes what it received, and from whom. */
export interface RecvOutput {
  readonly out: Option.Option<string>
  readonly outDir: Option.Option<string>
  readonly vm: Option.Option<string>
  readonly fromQemu: boolean
  /** QEMU's `-uuid`, which its multifd channels must carry. */
  readonly uuid: Option.Option<Uint8Array>
  /** A QEMU source with capability postcopy-ram: refused (the default), or its precopy migration taken. */
  readonly postcopyRam: Option.Option<"refuse" | "precopy">
}

/** `--out`, `--out-dir` and `--from-qemu`. */
export const recvOutput: Options.Options<RecvOutput> = Options.all({
  out: output,
  outDir: pathOption("out-dir", "directory").pipe(
    Options.withPseudoName("DIR"),
    Options.withDescription(
      "With --from-qemu: write one file per RAM block into this directory instead of --out (created if missing, " +
        "and removed again, with the parents it created, if the migration fails)."
    ),
    Options.optional
  ),
  vm: pathOption("vm").pipe(
    Options.withPseudoName("FILE"),
    Options.withDescription(
      "With --from-qemu: write the whole VM (its RAM, configuration and device state) as a QEMU 10 mapped-ram " +
        "migration file, which QEMU resumes from (migrate-incoming file:FILE with capabilities mapped-ram and " +
        "multifd) and send --to-qemu migrates into QEMU; sparse, written beside FILE and renamed into place."
    ),
    Options.optional
  ),
  fromQemu: Options.boolean("from-qemu").pipe(
    Options.withDescription(
      "Receive from an unmodified QEMU 10 (capability multifd; tell it the same multifd-channels as --channels, " +
        "which is then required, 0 for QEMU without multifd, and multifd-compression as --compression), or read a " +
        "file QEMU's migrate file: wrote (<uri> file:PATH, or file:PATH,offset=N as QEMU wrote it at N; --channels and " +
        "--compression do not apply), and write " +
        "the guest's RAM or the whole VM."
    )
  ),
  uuid: qemuUuid(
    "With --from-qemu: the -uuid QEMU was started with (libvirt starts it with the domain's), which its multifd " +
      "channels carry: channels of another uuid (another QEMU migrating here) are turned away, and another uuid sent " +
      "by QEMU's capability validate-uuid refuses the migration, as QEMU does (default: the uuid validate-uuid sends, " +
      "else the first channel's, and channels of another fail the migration)."
  ),
  postcopyRam: choice("postcopy-ram", ["refuse", "precopy"] as const).pipe(
    Options.withDescription(
      "With --from-qemu: a QEMU source with capability postcopy-ram (virsh migrate --postcopy; QEMU 10.0 takes it " +
        "without multifd only, --channels 0). refuse (default): refused at its start, the guest running on; precopy: " +
        "its precopy migration is taken, and a switch to postcopy (migrate-start-postcopy, virsh " +
        "--postcopy-after-precopy) refused when it comes, by when QEMU may have handed its guest over: it then stays " +
        "postcopy-paused, stopped until recovered elsewhere or killed. Give precopy only where nothing switches."
    ),
    Options.optional
  )
})

// ---------------------------------------------------------------------------------------------------------
// Transfer

// Each transfer flag falls back on its environment variable (`MigrationConfig`): a flag given wins; a bad
// variable is a parse error naming it (exit 2). A value remembers whether the command line gave it (`given`):
// a flag that does not apply to what the command does is refused, while an environment default that does not
// apply is ignored (a MULTIFD_PAGE_SIZE set for images is no reason to refuse send --to-qemu).

/** A flag's value and whether the command line gave it (`false`: its environment variable or its default). */
interface Given<A> {
  readonly value: A
  readonly given: boolean
}

/** `option`, falling back on `config`, remembering which gave the value. */
const withFallback = <A>(option: Options.Options<A>, config: Config.Config<A>): Options.Options<Given<A>> =>
  option.pipe(
    Options.map((value): Given<A> => ({ value, given: true })),
    Options.withFallbackConfig(Config.map(config, (value): Given<A> => ({ value, given: false })))
  )

/** The value of an optional `Given`, and whether the command line gave it. */
const unwrap = <A>(o: Option.Option<Given<A>>): Given<Option.Option<A>> =>
  Option.match(o, {
    onNone: () => ({ value: Option.none(), given: false }),
    onSome: ({ given, value }) => ({ value: Option.some(value), given })
  })

/** A default that the command line did not give. */
const byDefault = <A>(value: A): Given<A> => ({ value, given: false })

const channelsOption = (description: string, problem: (n: number) => string | undefined = checkChannels) =>
  withFallback(
    integer("channels", "N").pipe(Options.withDescription(description), Options.mapEffect(check(problem))),
    MigrationConfig.channels
  )

const pageSizeOption = (description: string) =>
  withFallback(
    integer("page-size", "BYTES").pipe(Options.withDescription(description), Options.mapEffect(check(checkPageSize))),
    MigrationConfig.pageSize
  )

const compressionOption = (description: string) =>
  withFallback(
    choice("compression", ["none", "zlib", "zstd"]).pipe(Options.withDescription(description)),
    MigrationConfig.compression
  )

const CHANNELS = `Parallel multifd channels, ${MIN_CHANNELS}-${MAX_CHANNELS}`
const PAGE_SIZE = `Page size in bytes: a power of two, ${MIN_PAGE_SIZE}-${MAX_PAGE_SIZE}`
const COMPRESSION = "Compression of page data on the multifd channels"
/** The sentence that names a flag's variable, as the help pages show it. */
const env = (name: string) => ` Environment: ${name}.`

/** Transfer settings of the source. */
export interface SendTransfer {
  readonly channels: number
  readonly pageSize: number
  readonly compression: Protocol.Compression
  readonly compressionLevel: Option.Option<number>
  readonly zeroPage: "multifd" | "none"
  /** Bytes per second (0: no limit). */
  readonly maxBandwidth: Option.Option<number>
  /** The flags among these that the command line gave (not their environment variables), as `--page-size`. */
  readonly given: ReadonlySet<string>
}

/** The flags whose value the command line gave. */
const givenFlags = (values: Readonly<Record<string, Given<unknown>>>): ReadonlySet<string> =>
  new Set(Object.entries(values).filter(([, v]) => v.given).map(([name]) => `--${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`))

/** Transfer settings of the source, with their defaults. */
export const sendTransfer: Options.Options<SendTransfer> = Options.all({
  // (0 for --to-qemu only: said there)
  channels: channelsOption(`${CHANNELS} (default 2).${env("MULTIFD_CHANNELS")}`, checkZeroOrChannels).pipe(
    Options.withDefault(byDefault(2))
  ),
  pageSize: pageSizeOption(`${PAGE_SIZE} (default ${GuestRam.DEFAULT_PAGE_SIZE}).${env("MULTIFD_PAGE_SIZE")}`).pipe(
    Options.withDefault(byDefault(GuestRam.DEFAULT_PAGE_SIZE))
  ),
  compression: compressionOption(`${COMPRESSION} (default none).${env("MULTIFD_COMPRESSION")}`).pipe(
    Options.withDefault(byDefault<Protocol.Compression>("none"))
  ),
  compressionLevel: withFallback(
    integer("compression-level", "N").pipe(
      Options.withDescription(
        "Compression level: zlib 0-9 (default 1), zstd 0-20 (default 1); ignored without compression." +
          env("MULTIFD_COMPRESSION_LEVEL")
      )
    ),
    MigrationConfig.compressionLevel
  ).pipe(Options.optional, Options.map(unwrap)),
  zeroPage: withFallback(
    choice("zero-page", ["multifd", "none"]).pipe(
      Options.withDescription(`multifd: zero pages travel as offsets only; none: as data (default multifd).${env("MULTIFD_ZERO_PAGE")}`)
    ),
    MigrationConfig.zeroPage
  ).pipe(Options.withDefault(byDefault<"multifd" | "none">("multifd"))),
  maxBandwidth: withFallback(
    Options.text("max-bandwidth").pipe(
      Options.withPseudoName("RATE"),
      Options.withDescription(
        "Limit the channels together to this rate, counting every packet's bytes, as QEMU's max-bandwidth: MiB/s " +
          "(100 or 100M), or 512K, 1G; 0: no limit (the default)." + env("MULTIFD_MAX_BANDWIDTH")
      ),
      Options.mapEffect((text) =>
        Either.match(Bandwidth.parse(text), { onLeft: (why) => Effect.fail(invalid(`--max-bandwidth: ${why}`)), onRight: Effect.succeed })
      )
    ),
    MigrationConfig.maxBandwidth
  ).pipe(Options.optional, Options.map(unwrap))
}).pipe(Options.map((flags): SendTransfer => ({
  channels: flags.channels.value,
  pageSize: flags.pageSize.value,
  compression: flags.compression.value,
  compressionLevel: flags.compressionLevel.value,
  zeroPage: flags.zeroPage.value,
  maxBandwidth: flags.maxBandwidth.value,
  given: givenFlags(flags)
})))

/**
 * Transfer settings on the destination: the source decides them (its hello carries them). Values given here
 * are expectations, checked against what the source used.
 */
export interface RecvTransfer {
  readonly channels: Option.Option<number>
  readonly pageSize: Option.Option<number>
  readonly compression: Option.Option<Protocol.Compression>
  /** The flags among these that the command line gave (not their environment variables), as `--channels`. */
  readonly given: ReadonlySet<string>
}

const followsSource = " On recv the source decides; when given, the source must agree, else recv fails and writes nothing."


/** Transfer settings on the destination, all optional. */
export const recvTransfer: Options.Options<RecvTransfer> = Options.all({
  channels: channelsOption(
    `${CHANNELS} (with --from-qemu: QEMU's multifd-channels, 0 without multifd; not with a file: uri, whose pages ` +
      `are read whatever channels wrote them).${followsSource}${env("MULTIFD_CHANNELS")}`,
    checkRecvChannels
  ).pipe(Options.optional, Options.map(unwrap)),
  pageSize: pageSizeOption(`${PAGE_SIZE}.${followsSource}${env("MULTIFD_PAGE_SIZE")}`).pipe(Options.optional, Options.map(unwrap)),
  compression: compressionOption(`${COMPRESSION}.${followsSource}${env("MULTIFD_COMPRESSION")}`).pipe(
    Options.optional,
    Options.map(unwrap)
  )
}).pipe(Options.map((flags): RecvTransfer => ({
  channels: flags.channels.value,
  pageSize: flags.pageSize.value,
  compression: flags.compression.value,
  given: givenFlags(flags)
})))

// ---------------------------------------------------------------------------------------------------------
// Timing

/** How long to wait on the peer. */
export interface Timing {
  readonly timeout: Option.Option<Duration.Duration>
}

const timeoutFlag = (description: string): Options.Options<Timing> =>
  Options.all({
    timeout: Options.text("timeout").pipe(
      Options.withPseudoName("DURATION"),
      Options.withDescription(`${description} 30s, 500ms, 2m, 1h or plain seconds.`),
      Options.mapEffect((text) =>
        Either.match(parseDuration(text), { onLeft: (why) => Effect.fail(invalid(why)), onRight: Effect.succeed })
      ),
      Options.optional
    )
  })

/** The source's timing. */
export const sendTiming: Options.Options<Timing> = timeoutFlag(
  "Give up when the destination does not answer, or no data moves, for this long, or when connecting or a TLS " +
    "handshake takes longer (default 30s; connecting and handshakes 10s)."
)

/** The destination's timing. */
export const recvTiming: Options.Options<Timing> = timeoutFlag(
  "Give up when the source does not answer, or no data moves, for this long (default 30s); close a connection " +
    "that has not sent a complete hello or channel header in this time (default 10s). recv waits for a source " +
    "for ever."
)

/** What the source does when a multifd channel's connection breaks. */
export interface Resilience {
  readonly reconnect: number
  /** Whether the command line gave --reconnect (not MULTIFD_RECONNECT nor the default). */
  readonly given: boolean
}

/** `--reconnect N` (default 3; 0 turns it off). */
export const sendResilience: Options.Options<Resilience> = withFallback(
  integer("reconnect", "N").pipe(
    Options.mapEffect((n) =>
      n >= 0 && n <= 1000
        ? Effect.succeed(n)
        : Effect.fail(invalid(`--reconnect: ${n} is not a number of attempts from 0 to 1000`))
    ),
    Options.withDescription(
      "When a multifd channel's connection breaks (reset, closed, a failed write), connect it again up to N " +
        "times within 10 s and resend the pages the destination has not got (default 3; 0: the migration fails; " +
        "not with --to-qemu or a file: uri)." + env("MULTIFD_RECONNECT")
    )
  ),
  MigrationConfig.reconnect
).pipe(
  Options.withDefault(byDefault(3)),
  Options.map(({ given, value }): Resilience => ({ reconnect: value, given }))
)

// ---------------------------------------------------------------------------------------------------------
// Reporting

/** How the result is reported. */
export interface Reporting {
  readonly json: boolean
  readonly quiet: boolean
  readonly verbose: boolean
}

/** Reporting settings shared by both commands. */
export const reporting: Options.Options<Reporting> = Options.all({
  json: Options.boolean("json").pipe(
    Options.withDescription(
      "Print the result as one JSON object on stdout: the statistics, or {\"error\":{\"tag\",\"reason\",\"message\"}} " +
        "on failure (the exit status is the same)."
    )
  ),
  quiet: Options.boolean("quiet").pipe(
    Options.withAlias("q"),
    Options.withDescription("Print nothing but errors (and recv's listening line): no progress, summary or warnings.")
  ),
  verbose: Options.boolean("verbose").pipe(
    Options.withAlias("v"),
    Options.withDescription(
      "Log each channel's events on stderr with the time since the start: connect, TLS handshake, init packet, " +
        "sync, close."
    )
  )
}).pipe(
  // one asks for nothing but errors, the other for every event: which was meant cannot be told
  Options.mapEffect((r) =>
    r.quiet && r.verbose ? Effect.fail(invalid("--quiet and --verbose ask for opposite things: give one")) : Effect.succeed(r)
  )
)

// ---------------------------------------------------------------------------------------------------------
// TLS

/** The TLS flags as given; `Tls.TlsConfig` once checked (`tlsConfigOf`). */
export interface TlsFlags {
  readonly psk: Option.Option<string>
  readonly identity: Option.Option<string>
  readonly ca: Option.Option<string>
  readonly hostname: Option.Option<string>
  readonly cert: Option.Option<string>
  readonly key: Option.Option<string>
  readonly crl: Option.Option<string>
  readonly authz: Option.Option<string>
  readonly verifyPeer: boolean
  readonly ciphers: Option.Option<string>
}

const pem = (name: string, description: string) =>
  credentialsPath(name).pipe(Options.withPseudoName("PEM"), Options.withDescription(description), Options.optional)

const tlsPsk = credentialsPath("tls-psk").pipe(
  Options.withPseudoName("FILE"),
  Options.withDescription("TLS with pre-shared keys from FILE in QEMU's keys.psk format: one identity:hexkey a line, each key of 16 bytes (32 hex digits) or more (psktool makes 32 bytes)."),
  Options.optional
)
const tlsCa = (more: string) =>
  pem(
    "tls-ca",
    "TLS with x509: the CA certificate(s) that verify the peer's certificate (the only CAs trusted: needed to verify " +
      `one)${more}.`
  )
const tlsKey = pem("tls-key", "TLS with x509: the private key of --tls-cert.")
const tlsCrl = (peer: string) =>
  credentialsPath("tls-crl").pipe(
    Options.withPseudoName("FILE"),
    Options.withDescription(
      `TLS with x509: certificate revocation lists (PEM, one or more; QEMU's ca-crl.pem): ${peer} whose certificate, or ` +
        "a CA of its chain, is revoked is refused. Each CRL must be signed by a CA of --tls-ca and current, and every " +
        "CA of the chain needs one (an intermediate CA: its certificate in --tls-ca, its CRL here)."
    ),
    Options.optional
  )
const tlsCiphers = Options.text("tls-ciphers").pipe(
  Options.withPseudoName("LIST"),
  Options.withDescription(
    "TLS cipher suites in order of preference, in OpenSSL's syntax (TLS 1.3 suite names and TLS 1.2 ciphers, " +
      "colon-separated). Default: AES-GCM first (fast with AES-NI), then ChaCha20-Poly1305; recv's order wins."
  ),
  Options.mapEffect(nonEmpty("tls-ciphers")),
  Options.optional
)

/** The source's TLS flags (as QEMU's tls-creds-psk / tls-creds-x509 with endpoint=client, and tls-hostname). */
export const sendTls: Options.Options<TlsFlags> = Options.all({
  psk: tlsPsk,
  identity: Options.text("tls-identity").pipe(
    Options.withPseudoName("ID"),
    Options.withDescription("With --tls-psk: the PSK identity to present (default qemu, as QEMU)."),
    Options.mapEffect(nonEmpty("tls-identity")),
    Options.optional
  ),
  ca: tlsCa(""),
  hostname: Options.text("tls-hostname").pipe(
    Options.withPseudoName("NAME"),
    Options.withDescription("With x509: the name the destination's certificate must carry (default: the uri's host; required " +
        "with a unix: uri, which names no host)."),
    Options.mapEffect(nonEmpty("tls-hostname")),
    Options.optional
  ),
  cert: pem("tls-cert", "TLS with x509: a client certificate to present (when the destination verifies clients)."),
  key: tlsKey,
  crl: tlsCrl("a destination"),
  ciphers: tlsCiphers
}).pipe(Options.map((flags): TlsFlags => ({ ...flags, authz: Option.none(), verifyPeer: false })))

/** The destination's TLS flags (as QEMU's tls-creds-* with endpoint=server, verify-peer and tls-authz). */
export const recvTls: Options.Options<TlsFlags> = Options.all({
  psk: tlsPsk,
  ca: tlsCa(
    "; given, every client must present a certificate it issued, as with QEMU's verify-peer (on by default); without " +
      "it any client is taken"
  ),
  cert: pem("tls-cert", "TLS with x509: this destination's certificate (required with x509)."),
  key: tlsKey,
  crl: tlsCrl("a client"),
  authz: Options.text("tls-authz").pipe(
    Options.withPseudoName("ID,..."),
    Options.withDescription(
      "Admit only clients whose verified certificate CN, or PSK identity, is listed (comma-separated), or whose " +
        "certificate's whole distinguished name is, as QEMU's tls-authz matches it: GnuTLS's form, most general " +
        "first, values escaped (O=Example,CN=alice). A list holding a DN is separated by ';' (DN;CN;...)."
    ),
    Options.mapEffect(nonEmpty("tls-authz")),
    Options.optional
  ),
  verifyPeer: Options.boolean("tls-verify-peer").pipe(
    Options.withDescription(
      "With x509: require a client certificate that chains to --tls-ca, is within its validity period and is " +
        "for client authentication (implied by --tls-ca on recv, as QEMU's verify-peer, and by --tls-authz)."
    )
  ),
  ciphers: tlsCiphers
}).pipe(Options.map((flags): TlsFlags => ({ ...flags, identity: Option.none(), hostname: Option.none() })))

/**
 * The TLS configuration the flags ask for: `undefined` without TLS, a problem (one line) when the flags do
 * not make sense together. `handshake` is the handshake timeout (the `--timeout`, if any).
 */
export const tlsConfigOf = (
  flags: TlsFlags,
  role: "send" | "recv",
  handshake: Option.Option<Duration.Duration>
): Either.Either<Tls.TlsConfig | undefined, string> => {
  const given = <A>(o: Option.Option<A>) => Option.isSome(o)
  const psk = given(flags.psk)
  const x509 = given(flags.ca) || given(flags.cert) || given(flags.key)
  if (psk && x509) return Either.left("--tls-psk cannot be combined with --tls-ca, --tls-cert or --tls-key")
  const dependent: ReadonlyArray<readonly [string, boolean]> = [
    ["--tls-identity", given(flags.identity)],
    ["--tls-hostname", given(flags.hostname)],
    ["--tls-authz", given(flags.authz)],
    ["--tls-verify-peer", flags.verifyPeer],
    ["--tls-crl", given(flags.crl)]
  ]
  if (!psk && !x509) {
    const stray = dependent.find(([, set]) => set)
    return stray === undefined ? Either.right(undefined) : Either.left(`${stray[0]} needs --tls-psk or --tls-ca/--tls-cert`)
  }
  const wrongSide: ReadonlyArray<readonly [string, boolean, "send" | "recv"]> = [
    ["--tls-identity", given(flags.identity), "send"],
    ["--tls-hostname", given(flags.hostname), "send"],
    ["--tls-authz", given(flags.authz), "recv"],
    ["--tls-verify-peer", flags.verifyPeer, "recv"]
  ]
  const misplaced = wrongSide.find(([, set, side]) => set && side !== role)
  if (misplaced !== undefined) return Either.left(`${misplaced[0]} is a ${misplaced[2]} option`)
  if (psk && given(flags.hostname)) return Either.left("--tls-hostname applies to x509 certificates, not --tls-psk")
  if (x509 && given(flags.identity)) return Either.left("--tls-identity applies to --tls-psk, not x509")
  if (psk && given(flags.crl)) return Either.left("--tls-crl applies to x509 certificates, not --tls-psk")
  if (psk && flags.verifyPeer) {
    return Either.left(
      "--tls-verify-peer applies to x509 client certificates, not --tls-psk (a PSK destination verifies every source by its key)"
    )
  }
  if (role === "recv" && given(flags.crl) && !given(flags.ca)) {
    return Either.left("--tls-crl on recv checks client certificates: give --tls-ca too (the CA that issued them)")
  }
  if (given(flags.cert) !== given(flags.key)) return Either.left("--tls-cert and --tls-key go together")
  if (role === "recv" && x509 && !given(flags.cert)) return Either.left("recv with x509 needs --tls-cert and --tls-key")
  const authz = Option.map(flags.authz, Tls.parseAuthz)
  if (Option.isSome(authz) && authz.value.length === 0) return Either.left("--tls-authz needs at least one identity")
  // the public root CAs are never trusted: whatever verifies a peer needs its CA file
  if (role === "send" && x509 && !given(flags.ca)) {
    return Either.left("send with x509 needs --tls-ca to verify the destination: the public root CAs are never trusted")
  }
  if (role === "recv" && x509 && (flags.verifyPeer || given(authz)) && !given(flags.ca)) {
    return Either.left(
      `${flags.verifyPeer ? "--tls-verify-peer" : "--tls-authz"} with x509 needs --tls-ca to verify clients: ` +
        "the public root CAs are never trusted"
    )
  }
  const value = <A>(o: Option.Option<A>) => Option.getOrUndefined(o)
  const config: Record<string, unknown> = {
    psk: value(flags.psk),
    identity: value(flags.identity),
    ca: value(flags.ca),
    cert: value(flags.cert),
    key: value(flags.key),
    crl: value(flags.crl),
    // an IPv6 address as the uri writes it ([::1]) is the address: bracketed, it was checked as a DNS name
    hostname: value(Option.map(flags.hostname, (name) => {
      const inner = /^\[(.*)\]$/.exec(name)?.[1]
      return inner !== undefined && Transport.isIp(inner) ? inner : name
    })),
    // a CA given to a destination verifies its clients, as QEMU's tls-creds-x509 (verify-peer, on by default): it
    // has no other use there, and a destination that took any client while given one looked verified and was not
    verifyPeer: flags.verifyPeer || (role === "recv" && x509 && given(flags.ca)) ? true : undefined,
    authz: value(authz),
    ciphers: value(flags.ciphers),
    handshakeTimeoutMs: value(Option.map(handshake, Duration.toMillis))
  }
  for (const k of Object.keys(config)) if (config[k] === undefined) delete config[k]
  return Either.right(config as Tls.TlsConfig)
}
