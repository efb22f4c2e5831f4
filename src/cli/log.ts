/**
 * Log lines of the library as one line each on stderr, so that stdout carries nothing but `--json` output:
 * warnings (a rejected stray connection) as `multifd: warning: ...`, and with `--verbose` the channels' events
 * as `multifd: [+1.234s] ...`, the time since the command started (above the progress bar, while one is drawn).
 * `--quiet` leaves only errors.
 *
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import type * as Effect from "effect/Effect"
import * as FiberRef from "effect/FiberRef"
import * as FiberRefs from "effect/FiberRefs"
import * as Layer from "effect/Layer"
import * as Logger from "effect/Logger"
import * as LogLevel from "effect/LogLevel"
import { oneLine } from "./errors.js"
import * as Progress from "./progress.js"

const text = (message: unknown): string =>
  Array.isArray(message) ? message.map(text).join(" ") : typeof message === "string" ? message : String(message)

/**
 * Where the log's lines go: stderr, above the progress bar while one is drawn (`Progress.writeLines`), unless a
 * command run inside another program (the tests' in-process runs) gives its own.
 */
export class Lines extends Context.Reference<Lines>()("effect-multifd/cli/Log/Lines", {
  defaultValue: (): { readonly write: (text: string) => void } => ({ write: Progress.writeLines })
}) {}

/** One line a message, on stderr: `multifd: warning: ...`, or `multifd: [+1.234s] ...` below Info. */
export const logger = Logger.make(({ cause, context, logLevel, message }) => {
  const why = Cause.isEmpty(cause) ? "" : `: ${Cause.pretty(cause).split("\n")[0]}`
  const level = LogLevel.lessThan(logLevel, LogLevel.Info)
    ? `[+${(performance.now() / 1000).toFixed(3)}s]`
    : `${logLevel._tag === "Warning" ? "warning" : logLevel.label.toLowerCase()}:`
  Context.get(FiberRefs.getOrDefault(context, FiberRef.currentContext), Lines).write(
    `multifd: ${level} ${oneLine(text(message) + why)}\n`
  )
})

/** The log level a command's `--verbose` / `--quiet` ask for (Debug / Error; Info otherwise). */
export const levelOf = (reporting: { readonly quiet: boolean; readonly verbose: boolean }): LogLevel.LogLevel =>
  reporting.verbose ? LogLevel.Debug : reporting.quiet ? LogLevel.Error : LogLevel.Info

/** Runs a command's body at the log level its flags ask for. */
export const withReporting = (reporting: { readonly quiet: boolean; readonly verbose: boolean }) =>
<A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> => Logger.withMinimumLogLevel(self, levelOf(reporting))

/** Replaces the default logger with `logger`. */
export const layer: Layer.Layer<never> = Logger.replace(Logger.defaultLogger, logger)
