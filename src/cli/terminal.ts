/**
 * Where the command's own output goes: results on stdout, messages on stderr. A service rather than `Console`
 * because @effect/cli prints its parse errors through `Console.error`, and the command formats those itself
 * (`multifd: error: ...`, or JSON with `--json`): `main` silences `Console` while @effect/cli parses and
 * hands the real one to the command through this service.
 *
 * @since 0.1.0
 */
import * as Console from "effect/Console"
import * as Context from "effect/Context"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as FileIo from "../internal/native/fileIo.js"

/**
 * A line that stdout would not take (a full disk, the reader of a pipe gone): `cannot write <what> to stdout:
 * <why>`. What stdout carries is the command's result, which a script reads: losing it is a failure.
 */
export class OutputError extends Data.TaggedError("OutputError")<{
  /** What was to be written: `the --json result`, `the help`. */
  readonly what: string
  readonly cause: unknown
}> {
  override get message(): string {
    const why = FileIo.errorCode(this.cause) === "EPIPE" ? "broken pipe" : FileIo.describe(this.cause)
    return `cannot write ${this.what} to stdout: ${why}`
  }
}

/** The command's output streams. */
export class Terminal extends Context.Tag("effect-multifd/cli/Terminal")<Terminal, {
  /** A line on stdout (`--json` results, help pages), `what` naming it should it not be written. */
  readonly out: (line: string, what: string) => Effect.Effect<void, OutputError>
  /** A line on stderr (messages, summaries); one that cannot be written is lost. */
  readonly err: (line: string) => Effect.Effect<void>
}>() {}

/** The terminal behind the `Console` in context now (which cannot tell whether a line was written). */
export const fromConsole: Effect.Effect<Terminal["Type"]> = Effect.map(Effect.console, (console) => ({
  out: (line) => console.log(line),
  err: (line) => console.error(line)
}))

/**
 * The process's stdout and stderr, a line on stdout written once the system took it (its failure an
 * `OutputError`). The streams need an 'error' listener (`main.ts`): a failed write is also an 'error' event.
 */
export const stdio: Terminal["Type"] = {
  out: (line, what) =>
    Effect.async<void, OutputError>((resume) => {
      process.stdout.write(`${line}\n`, (error) => {
        resume(error === null || error === undefined ? Effect.void : Effect.fail(new OutputError({ what, cause: error })))
      })
    }),
  err: (line) => Effect.sync(() => void process.stderr.write(`${line}\n`))
}

/** `Terminal` from the current `Console`. */
export const layer: Layer.Layer<Terminal> = Layer.effect(Terminal, fromConsole)

/** A line on stdout; `what` names it should it not be written. */
export const out = (line: string, what: string): Effect.Effect<void, OutputError, Terminal> =>
  Effect.flatMap(Terminal, (t) => t.out(line, what))

/** A line on stderr. */
export const err = (line: string): Effect.Effect<void, never, Terminal> => Effect.flatMap(Terminal, (t) => t.err(line))

/**
 * `console` with a silent `error`: @effect/cli prints its parse errors there, and the command reports them
 * itself (one `multifd: error:` line, or JSON with `--json`).
 */
export const withoutErrors = (console: Console.Console): Console.Console =>
  Object.assign(Object.create(console) as Console.Console, { error: () => Effect.void })
