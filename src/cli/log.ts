/**
 * Log lines of the library (warnings such as a rejected stray connection) as `multifd: warning: ...` on
 * stderr, so that stdout carries nothing but `--json` output.
 *
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Layer from "effect/Layer"
import * as Logger from "effect/Logger"
import { oneLine } from "./errors.js"

const text = (message: unknown): string =>
  Array.isArray(message) ? message.map(text).join(" ") : typeof message === "string" ? message : String(message)

/** One line a message, on stderr. */
export const logger = Logger.make(({ cause, logLevel, message }) => {
  const why = Cause.isEmpty(cause) ? "" : `: ${Cause.pretty(cause).split("\n")[0]}`
  const level = logLevel._tag === "Warning" ? "warning" : logLevel.label.toLowerCase()
  process.stderr.write(`multifd: ${level}: ${oneLine(text(message) + why)}\n`)
})

/** Replaces the default logger with `logger`. */
export const layer: Layer.Layer<never> = Logger.replace(Logger.defaultLogger, logger)
