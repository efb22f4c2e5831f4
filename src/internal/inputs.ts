/**
 * Checks of what a caller passed (from plain JavaScript, anything): options that must be objects, switches,
 * callbacks, and calling a callback that may return something other than an Effect. The public modules' functions
 * run them before anything opens, turning a wrong value into `BadOptions` (or their own error) in one line.
 */
import * as Cause from "effect/Cause"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as MigrationError from "../MigrationError.js"

/**
 * Why an option that holds an object (`timeouts`, `live`, `expect`, ...), given as `what`, is none, if it is not: from
 * plain JavaScript, `null` was a defect, a number was ignored in silence.
 */
export const checkObject = (what: string, value: unknown): string | undefined =>
  value === undefined || (typeof value === "object" && value !== null && !Array.isArray(value))
    ? undefined
    : `${what} must be an object, not ${describeInput(value)}`

/**
 * Why a switch option (`vm`, `flushAfterEachSection`), given as `what`, is no boolean, if it is not: from plain
 * JavaScript, `null` or `"no"` was read as false or true in silence.
 */
export const checkFlag = (what: string, value: unknown): string | undefined =>
  value === undefined || typeof value === "boolean" ? undefined : `${what} must be true or false, not ${describeInput(value)}`

/**
 * Why the options a function was given, as a whole, are none (`null`, a string), if they are not: from plain
 * JavaScript, each was a defect ("Cannot read properties of null"), `Snapshot.restore` and `MappedRam.read` threw
 * as they were called. Options that may be left out (`optional`) may be `undefined`: the defaults.
 */
export const checkOptions = (value: unknown, optional: boolean): string | undefined =>
  (value === undefined && optional) || (typeof value === "object" && value !== null && !Array.isArray(value))
    ? undefined
    : `the options must be an object${optional ? " (or left out)" : ""}, not ${describeInput(value)}`

/**
 * Why a callback option (`onProgress`, `store`, `admit`, `upgrade`), given as `what`, is no function, if it is not:
 * from plain JavaScript, the migration died on it ("is not a function") once it was called, after it connected.
 */
export const checkCallback = (what: string, value: unknown): string | undefined =>
  value === undefined || typeof value === "function" ? undefined : `${what} must be a function, not ${describeInput(value)}`

/**
 * Calls a callback given in the options (`what` names it, "the progress report (onProgress)") and runs the Effect it
 * returns. From plain JavaScript it may return something else: an `async` function's Promise (the migration died on
 * "Not a valid effect: {}", a stack trace, once connected), or `undefined`; that fails `CallbackFailed`, saying
 * what it returned and what to do. With `strict`, a callback that throws, dies or fails (its type says it cannot)
 * fails `CallbackFailed` naming it and its error too, rather than end the transfer with a defect (or an error of no
 * type the caller was told of); an interruption goes on as it is.
 */
export const callback = <A, E, R>(
  what: string,
  call: () => Effect.Effect<A, E, R>,
  strict: boolean
): Effect.Effect<A, E | MigrationError.MigrationError, R> =>
  Effect.suspend((): Effect.Effect<A, E | MigrationError.MigrationError, R> => {
    const failed = (detail: string) => new MigrationError.MigrationError({ reason: "CallbackFailed", detail: `${what} ${detail}` })
    let result: unknown
    try {
      result = call()
    } catch (thrown) {
      if (!strict) throw thrown
      return Effect.fail(failed(`threw: ${oneLine(thrown)}`))
    }
    if (!Effect.isEffect(result)) {
      return Effect.fail(failed(
        result instanceof Promise || (typeof result === "object" && result !== null && typeof (result as PromiseLike<unknown>).then === "function")
          ? "returned a Promise, not an Effect (an async function? wrap its work in Effect.promise)"
          : `returned ${describeInput(result)}, not an Effect`
      ))
    }
    const effect = result as Effect.Effect<A, E, R>
    return strict
      ? Effect.catchAllCause(effect, (cause) =>
        Cause.isInterruptedOnly(cause)
          ? Effect.failCause(cause as Cause.Cause<never>)
          : Effect.fail(failed(`${Cause.isFailure(cause) ? "failed" : "died"}: ${oneLine(Cause.squash(cause))}`)))
      : effect
  })

/** The one-line message of anything thrown or failed with. */
const oneLine = (error: unknown): string => {
  const text = typeof error === "object" && error !== null && "message" in error && typeof error.message === "string" &&
      error.message.length > 0
    ? error.message
    : String(error)
  return text.split("\n")[0]!
}

/**
 * A value a caller gave, for a message: strings quoted (a "4" is not 4), objects and functions named as such.
 */
export const describeInput = (input: unknown): string =>
  Duration.isDuration(input)
    ? Duration.format(input)
    : typeof input === "string"
    ? JSON.stringify(input)
    : typeof input === "number" || typeof input === "bigint" || input === null || input === undefined
    ? String(input)
    : typeof input === "object"
    ? "(an object)"
    : `(a ${typeof input})`

/**
 * Why `listener` is no listener, if it is not (`Transport.Listener`, what `transport.listen` gives: `{ address, accept
 * }`): from plain JavaScript, `incoming(undefined)` threw as it was called ("Cannot read properties of undefined"),
 * and an object that is none died inside ("Not a valid effect").
 */
export const checkListener = (listener: unknown): string | undefined => {
  const l = listener as { readonly address?: unknown; readonly accept?: unknown } | null
  return typeof l === "object" && l !== null && typeof l.address === "object" && l.address !== null &&
      Effect.isEffect(l.accept)
    ? undefined
    : `the listener ${describeInput(listener)} is not a Transport.Listener (what transport.listen gives)`
}
