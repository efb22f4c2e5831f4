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
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"

/** The command's output streams. */
export class Terminal extends Context.Tag("effect-multifd/cli/Terminal")<Terminal, {
  /** A line on stdout (`--json` results). */
  readonly out: (line: string) => Effect.Effect<void>
  /** A line on stderr (messages, summaries). */
  readonly err: (line: string) => Effect.Effect<void>
}>() {}

/** The terminal behind the `Console` in context now. */
export const fromConsole: Effect.Effect<Terminal["Type"]> = Effect.map(Effect.console, (console) => ({
  out: (line) => console.log(line),
  err: (line) => console.error(line)
}))

/** `Terminal` from the current `Console`. */
export const layer: Layer.Layer<Terminal> = Layer.effect(Terminal, fromConsole)

/** A line on stdout. */
export const out = (line: string): Effect.Effect<void, never, Terminal> => Effect.flatMap(Terminal, (t) => t.out(line))

/** A line on stderr. */
export const err = (line: string): Effect.Effect<void, never, Terminal> => Effect.flatMap(Terminal, (t) => t.err(line))

/**
 * `console` with a silent `error`: @effect/cli prints its parse errors there, and the command reports them
 * itself (one `multifd: error:` line, or JSON with `--json`).
 */
export const withoutErrors = (console: Console.Console): Console.Console =>
  Object.assign(Object.create(console) as Console.Console, { error: () => Effect.void })
