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
import * as Console from "effect/Console"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"

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
      return error.reason === "BadAddress"
    case "ImageError":
      return error.reason !== "Io"
    case "CodecError":
      return error.reason === "BadLevel"
    case "MigrationError":
      return error.reason === "BadOptions"
    case "TlsError":
      return error.reason === "Config"
    case "SnapshotError":
      return error.reason === "Unusable" || error.reason === "Unsupported"
    default:
      return false
  }
}

/** The exit code for a failure of the command. */
export const exitCodeOf = (error: unknown): number => isUsage(error) ? ExitCode.Usage : ExitCode.Failed

/** A message on one line: no stack, no line breaks. */
export const oneLine = (text: string): string => text.replace(/\s*\n\s*/g, " ").trim()

const messageOf = (u: unknown): string => {
  if (u instanceof Error) return u.message.length > 0 ? u.message : u.name
  if (typeof u === "object" && u !== null && "message" in u && typeof u.message === "string") return u.message
  return String(u)
}

/** Prints `multifd: error: <message>` on stderr. */
export const printError = (message: string): Effect.Effect<void> => Console.error(`multifd: error: ${oneLine(message)}`)

/**
 * Ends the command: success is exit 0; a failure is reported as one line and becomes exit 1 or 2; an
 * interruption (a signal) stays an interruption so that the runtime's teardown sees it.
 */
export const toExitCode = <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<number, never, R> =>
  Effect.matchCauseEffect(self, {
    onSuccess: () => Effect.succeed(ExitCode.Ok),
    onFailure: (cause) => {
      const failure = Cause.failureOption(cause)
      if (Option.isSome(failure)) {
        const error = failure.value
        // @effect/cli has already printed its own help or validation message
        if (ValidationError.isValidationError(error)) return Effect.succeed(ExitCode.Usage)
        return Effect.as(printError(messageOf(error)), exitCodeOf(error))
      }
      if (Cause.isInterruptedOnly(cause)) return Effect.failCause(cause as Cause.Cause<never>)
      const defect = Cause.dieOption(cause)
      const message = Option.isSome(defect) ? messageOf(defect.value) : "unexpected failure"
      return Effect.as(printError(`internal error: ${message}`), ExitCode.Failed)
    }
  })
