/**
 * Settings read through Effect's `Config`, one variable at a time: each value is read as text and parsed here,
 * so that a bad one is one `ConfigError` whose path names the variable (`MULTIFD_CHANNELS`) and whose message
 * says in one line what is wrong with it; and the one line a `ConfigError` becomes (`describe`), for the
 * environment (`ConfigProvider.fromEnv`: path segments joined by `_`).
 *
 * @internal
 */
import * as Config from "effect/Config"
import * as ConfigError from "effect/ConfigError"
import * as Either from "effect/Either"
import * as Option from "effect/Option"

/**
 * The variable `name` (under the enclosing `Config.nested` prefix), parsed by `parse`: a value it refuses is an
 * `InvalidData` error at the variable's path with `parse`'s reason as its message.
 */
export const field = <A>(name: string, parse: (text: string) => Either.Either<A, string>): Config.Config<A> =>
  Config.nested(
    Config.mapOrFail(Config.string(), (text) => Either.mapLeft(parse(text.trim()), (why) => ConfigError.InvalidData([], why))),
    name
  )

/** A bad value at `path` (an error found across variables, say). */
export const invalid = (path: ReadonlyArray<string>, message: string): ConfigError.ConfigError =>
  ConfigError.InvalidData([...path], message)

/** A variable that may be absent (`undefined` then); a present but bad one still fails. */
export const optional = <A>(config: Config.Config<A>): Config.Config<A | undefined> =>
  Config.map(Config.option(config), Option.getOrUndefined)

/** The leaves of an error, bad values before missing ones (a missing variable is rarely the point). */
const leaves = (error: ConfigError.ConfigError): Array<ConfigError.ConfigError> => {
  switch (error._op) {
    case "And":
    case "Or":
      return [...leaves(error.left), ...leaves(error.right)]
    default:
      return [error]
  }
}

/** The variable a path names in the environment: `["MULTIFD", "CHANNELS"]` is `MULTIFD_CHANNELS`. */
export const variableOf = (path: ReadonlyArray<string>): string => path.join("_")

/**
 * A `ConfigError` as one line naming the variable: `MULTIFD_CHANNELS: must be between 1 and 255, not 0` (the
 * first bad value when there are several).
 */
export const describe = (error: ConfigError.ConfigError): string => {
  const all = leaves(error)
  const first = all.find((e) => e._op === "InvalidData") ?? all[0]!
  const path = "path" in first ? first.path : []
  const message = ("message" in first ? first.message : String(first)).replace(/\s*\n\s*/g, " ").trim()
  return path.length === 0 ? message : `${variableOf(path)}: ${message}`
}

/**
 * An integer, or why the text is not one. One past 2^53 is refused as out of range: as a number it reads as
 * another ("not 100000000000000000000" for 99999999999999999999).
 */
export const integer = (text: string): Either.Either<number, string> =>
  !/^[+-]?\d+$/.test(text.trim())
    ? Either.left(`${JSON.stringify(text)} is not an integer`)
    : Number.isSafeInteger(Number(text))
    ? Either.right(Number(text))
    : Either.left(`${JSON.stringify(text)} is out of range`)

/** `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`), or why the text is none of them. */
export const boolean = (text: string): Either.Either<boolean, string> => {
  const lower = text.toLowerCase()
  if (["true", "1", "yes", "on"].includes(lower)) return Either.right(true)
  if (["false", "0", "no", "off"].includes(lower)) return Either.right(false)
  return Either.left(`${JSON.stringify(text)} is not true or false`)
}

/** One of `values`, or why the text is not. */
export const oneOf = <const A extends string>(values: ReadonlyArray<A>) => (text: string): Either.Either<A, string> =>
  (values as ReadonlyArray<string>).includes(text)
    ? Either.right(text as A)
    : Either.left(`must be one of ${values.join(", ")}, not ${JSON.stringify(text)}`)
