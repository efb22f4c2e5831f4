/**
 * How the `multifd` command ends: exit codes, and every failure as exactly one line on stderr.
 *
 * 0 success; 1 the migration failed; 2 bad usage or configuration. Interruption by a signal exits with
 * 128 + the signal's number (decided in `main.ts`).
 *
 * @since 0.1.0
 */
import * as ValidationError from "@effect/cli/ValidationError"
import * as Cause from "effect/Cause"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"
import * as PeerText from "../internal/peerText.js"
import * as Help from "./help.js"
import type * as Terminal from "./terminal.js"

/** Exit codes of the command. */
export const ExitCode = {
  Ok: 0,
  Failed: 1,
  Usage: 2
} as const

/** A bad command line or configuration found after parsing (exit 2). */
export class UsageError extends Data.TaggedError("UsageError")<{
  readonly detail: string
}> {
  override get message(): string {
    return this.detail
  }
}

/**
 * Refuses the flags the command line gave (`given`, as `--page-size`) that do not apply to `what` the command
 * does: `reasons` says why, for each such flag, and the first one given fails as "FLAG does not apply to WHAT:
 * REASON". Their environment variables, defaults for every command, are not in `given`: ignored.
 */
export const refuseGiven = (
  given: ReadonlySet<string>,
  what: string,
  reasons: Readonly<Record<string, string>>
): Effect.Effect<void, UsageError> => {
  const flag = Object.keys(reasons).find((name) => given.has(name))
  return flag === undefined
    ? Effect.void
    : Effect.fail(new UsageError({ detail: `${flag} does not apply to ${what}: ${reasons[flag]}` }))
}

/** Anything with a tag and, maybe, a reason — the shape of the library's tagged errors. */
interface Tagged {
  readonly _tag: string
  readonly reason?: unknown
}

const isTagged = (u: unknown): u is Tagged =>
  typeof u === "object" && u !== null && "_tag" in u && typeof (u as Tagged)._tag === "string"

/** Whether a failure is the user's to fix on the command line (exit 2) rather than a failed migration (exit 1). */
export const isUsage = (error: unknown): boolean => {
  if (ValidationError.isValidationError(error)) return true
  if (!isTagged(error)) return false
  switch (error._tag) {
    case "UsageError":
      return true
    case "TransportError":
      // a listen that fails is the uri's to fix (the port taken, an address not this machine's, no such directory)
      return error.reason === "BadAddress" || error.reason === "Listen"
    case "ImageError":
      return error.reason !== "Io"
    case "CodecError":
      return error.reason === "BadLevel"
    case "MigrationError":
      return error.reason === "BadOptions"
    case "TlsError":
      return error.reason === "Config"
    case "SnapshotError":
      // a file that is no snapshot (or one of another format version) is the wrong file named, as a file that is no
      // QEMU stream is for --from-qemu (MappedRamError Unusable); a damaged one (Truncated, Corrupt, a digest) failed
      return error.reason === "Unusable" || error.reason === "Unsupported" || error.reason === "NotASnapshot" ||
        error.reason === "Version"
    case "MappedRamError":
      return error.reason === "Unusable"
    default:
      return false
  }
}

/** The exit code for a failure of the command. */
export const exitCodeOf = (error: unknown): number => isUsage(error) ? ExitCode.Usage : ExitCode.Failed

/** A message on one line: no stack, no line breaks. */
export const oneLine = (text: string): string => {
  // a peer's words can reach a message (its reason, a name in its certificate): a terminal shows them, never
  // acts on them (escapes, carriage returns), and a line stays a line a terminal can hold
  const line = PeerText.printable(text.replace(/\s*[\r\n]\s*/g, " ").replace(/\t/g, " ").trim())
  return line.length <= MAX_LINE ? line : `${line.slice(0, MAX_LINE)}… (${line.length - MAX_LINE} more characters)`
}

/** Characters of a message line, at most. */
const MAX_LINE = 2000

const messageOf = (u: unknown): string => {
  if (u instanceof Error) return u.message.length > 0 ? u.message : u.name
  if (typeof u === "object" && u !== null && "message" in u && typeof u.message === "string") return u.message
  return String(u)
}

/** What a failed run reports: the error's tag, its reason (when it has one) and its one-line message. */
export interface Report {
  readonly tag: string
  readonly reason: string
  readonly message: string
}

/** What @effect/cli reads as false for a boolean flag: `--json=false`, `--json no`. */
const FALSE_VALUES = new Set(["false", "0", "n", "no", "off"])

/**
 * Whether the command line (subcommand first) asks for `--json` as @effect/cli reads it: `--json`, `--json=true`
 * or `--json yes`, not `--json=false` or `--json no`, nor after `--`. A failure or an interruption is then
 * reported as JSON exactly when a success would be.
 */
export const wantsJson = (args: ReadonlyArray<string>): boolean => {
  const dashes = args.indexOf("--")
  const options = dashes < 0 ? args : args.slice(0, dashes)
  const at = options.findIndex((a) => a === "--json" || a.startsWith("--json="))
  if (at < 0) return false
  const value = options[at] === "--json" ? options[at + 1] : options[at]!.slice("--json=".length)
  return value === undefined || !FALSE_VALUES.has(value)
}

/** The `--json` form of a failure: `{"error":{"tag","reason","message"}}`. */
export const toJson = (report: Report): string => JSON.stringify({ error: report })

/** What the command knows of its flags, to explain an unknown one. */
export interface Flags {
  /** The subcommand a flag belongs to, if any (a flag given to the other one is misplaced). */
  readonly ownerOf: (flag: string) => string | undefined
  /** The known flag closest to a mistyped one, if one is close. */
  readonly closest: (flag: string) => string | undefined
  /** The flag given `value` on the command line (`--flag value` or `--flag=value`), if one was. */
  readonly givenWith: (value: string) => string | undefined
  /**
   * Where a known flag that @effect/cli reports as an unknown argument stands: given `twice` (or more) before any
   * `--`, `afterDashes` (where nothing is a flag), `last` on the line with no value after it, or a short switch
   * given once `withValue` (`-q=1`: @effect/cli reads no `=` after a short flag).
   */
  readonly misplaced: (flag: string) => "twice" | "afterDashes" | "last" | "withValue" | undefined
  /**
   * The flag that ends the line (before any `--`) when it takes a value and has none: @effect/cli then reports a
   * switch given before it (`--quiet --channels`) as an argument it does not know.
   */
  readonly dangling: () => string | undefined
}

/**
 * A parse error of @effect/cli as one line: a bad environment variable is named (`MULTIFD_CHANNELS: must be
 * between 1 and 255, not 0`), a flag that belongs to the other command says so ("--tls-authz is a recv
 * option"), a flag given twice says so, a path that is not the kind of file its flag needs names the flag
 * ("--in /tmp: not a regular file"), anything else keeps @effect/cli's words. @effect/cli gives each problem
 * as a paragraph (several at once: two bad values, two bad variables, a variable and a flag): each is described
 * so, the descriptions separated by "; ". Read as one text they ran together, and a variable's or a path's
 * pattern, matched across them, garbled the line (`MULTIFD_CHANNELS: must be ... not 0") (Invalid data at ...`).
 */
export const describeValidation = (error: ValidationError.ValidationError, flags: Flags | undefined): string => {
  const problems = Help.paragraphsOf(error.error).map((text) => text.trim()).filter((text) => text.length > 0)
  const described = problems.map((text) => describeProblem(text, flags))
  return oneLine(described.length === 0 ? Help.plainText(error.error) : [...new Set(described)].join("; "))
}

/** One problem of a parse error (`describeValidation`). */
const describeProblem = (text: string, flags: Flags | undefined): string => {
  // a flag's environment variable (`Options.withFallbackConfig`) was bad: @effect/cli gives the ConfigError's
  // text, `(Invalid data at MULTIFD.CHANNELS: "...")`; say it as the library does, naming the variable
  const config = /^\((?:Invalid|Missing) data at ([^:]+): "([\s\S]*)"\)$/.exec(text)
  if (config !== null) return `${config[1]!.replace(/\./g, "_")}: ${config[2]}`
  const path = /^Expected path '([\s\S]*)' to be a (regular file|directory)$/.exec(text)
  if (path !== null) {
    const flag = flags?.givenWith(path[1]!)
    const what = `${path[1]}: not a ${path[2]}`
    return flag === undefined ? what : `${flag} ${what}`
  }
  // @effect/cli's own words, capitalized as no other line is ("Missing argument <uri>", "Received unknown argument:
  // 'image.img'" of `--in my image.img`), said what without where to go from there
  if (/^Missing argument <uri>$/.test(text)) return "missing the <uri>: tcp:HOST:PORT, unix:PATH or file:PATH, after send or recv"
  const stray = /^Received unknown argument: '([^-][\s\S]*|)'$/.exec(text)
  if (stray !== null) {
    return `unexpected argument ${JSON.stringify(stray[1])}: the command takes one <uri>, and flags (quote a value that holds spaces)`
  }
  const unknown = /unknown argument: '(--?[^']+)'/i.exec(text) ?? /flag '(--?[^']+)' is not recognized/i.exec(text) ??
    // a flag @effect/cli does not take where the uri is still to come (before it) is given as the uri
    /^bad uri: (--?[A-Za-z][\w-]*(?:=[^:]*)?): expected an address/.exec(text)
  if (unknown === null || flags === undefined) return text
  // `--flag=value` comes back whole (given a second time, or unknown): the flag is what is named
  const flag = unknown[1]!.split("=")[0]!
  const owner = flags.ownerOf(flag)
  if (owner !== undefined) return `${flag} is a ${owner} option`
  const closest = flags.closest(flag)
  // @effect/cli reports a flag's second occurrence, one after `--` and one without its value all alike, as an
  // argument it does not know
  if (closest === flag) {
    switch (flags.misplaced(flag)) {
      case "afterDashes":
        return `${flag} comes after --, where nothing is a flag: put the flags before --`
      case "last":
        return `${flag} needs a value`
      case "withValue":
        return `${flag} takes no value: give it alone`
      case "twice":
        return `${flag} given more than once`
      default: {
        // given once: "--quiet given more than once" was said of `--quiet --channels`, whose --channels has no value
        const dangling = flags.dangling()
        return dangling === undefined ? `${flag} given more than once` : `${dangling} needs a value`
      }
    }
  }
  return `unknown flag ${flag}${closest === undefined ? "" : ` (did you mean ${closest}?)`}`
}

/** Reports a failure of the command as a `Report`. */
const reportOf = (error: unknown, flags: Flags | undefined): Report => {
  if (ValidationError.isValidationError(error)) {
    return { tag: "UsageError", reason: error._tag, message: describeValidation(error, flags) }
  }
  const tagged = isTagged(error) ? error : undefined
  return {
    tag: tagged?._tag ?? "Error",
    reason: reasonOf(tagged),
    message: oneLine(messageOf(error))
  }
}

/**
 * A failure's reason: its own, else (a `ChannelError`, which names the channel) its cause's — a TLS handshake
 * that failed is `Handshake`, not `ChannelError` again —, else its tag.
 */
const reasonOf = (tagged: Tagged | undefined): string => {
  if (typeof tagged?.reason === "string") return tagged.reason
  const cause = (tagged as { readonly cause?: unknown } | undefined)?.cause
  if (isTagged(cause)) return typeof cause.reason === "string" ? cause.reason : cause._tag
  return tagged?._tag ?? "Error"
}

/** Where a failure is reported. */
export interface Reporting {
  /** Also print the failure as one JSON object on stdout (`--json`). */
  readonly json: boolean
  readonly terminal: Terminal.Terminal["Type"]
  /** Explains unknown flags. */
  readonly flags?: Flags | undefined
}

/**
 * Prints `multifd: error: <message>` on stderr, and with `--json` the JSON object on stdout (if stdout takes
 * it: the exit status and the line say what failed).
 */
const printReport = (report: Report, reporting: Reporting): Effect.Effect<void> =>
  Effect.zipRight(
    reporting.terminal.err(`multifd: error: ${report.message}`),
    reporting.json ? Effect.ignore(reporting.terminal.out(toJson(report), "the --json error")) : Effect.void
  )

/**
 * Ends the command: success is exit 0; a failure is reported as one line (and a JSON object with `--json`) and
 * becomes exit 1 or 2; an interruption (a signal) stays an interruption so that the runtime's teardown sees it.
 */
export const toExitCode = (reporting: Reporting) => <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<number, never, R> =>
  Effect.matchCauseEffect(self, {
    onSuccess: () => Effect.succeed(ExitCode.Ok),
    onFailure: (cause) => {
      const failure = Cause.failureOption(cause)
      if (Option.isSome(failure)) {
        const error = failure.value
        return Effect.as(printReport(reportOf(error, reporting.flags), reporting), exitCodeOf(error))
      }
      if (Cause.isInterruptedOnly(cause)) return Effect.failCause(cause as Cause.Cause<never>)
      const defect = Cause.dieOption(cause)
      const message = Option.isSome(defect) ? messageOf(defect.value) : "unexpected failure"
      return Effect.as(
        printReport({ tag: "InternalError", reason: "Defect", message: oneLine(`internal error: ${message}`) }, reporting),
        ExitCode.Failed
      )
    }
  })
