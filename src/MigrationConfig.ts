/**
 * Migration settings from Effect's `Config` (by default the environment): a `MigrationConfig` service whose
 * values `Migration.migrate` and `Migration.incoming` use for every option the caller did not give.
 *
 * | variable | setting |
 * |---|---|
 * | `MULTIFD_CHANNELS` | channels, 1–255 (`Protocol.Channels`) |
 * | `MULTIFD_PAGE_SIZE` | page size of memory built from an image (`Protocol.PageSize`; the CLI's `--page-size`) |
 * | `MULTIFD_COMPRESSION` | `none`, `zlib` or `zstd` |
 * | `MULTIFD_COMPRESSION_LEVEL` | the compression's level (`Protocol.CompressionLevel`) |
 * | `MULTIFD_ZERO_PAGE` | `multifd` or `none` |
 * | `MULTIFD_TIMEOUT` | the peer timeout (`Transfer.Timeouts.peer`) |
 * | `MULTIFD_CONNECT_TIMEOUT`, `MULTIFD_HANDSHAKE_TIMEOUT` | the other timeouts |
 * | `MULTIFD_DOWNTIME_LIMIT`, `MULTIFD_MAX_ROUNDS`, `MULTIFD_MAX_DURATION`, `MULTIFD_ON_NO_CONVERGENCE` | the live policy |
 * | `MULTIFD_MAX_RAM` | the largest memory a source may make a destination allocate |
 * | `MULTIFD_ACCEPT_TIMEOUT` | how long a destination waits for a source |
 * | `MULTIFD_MAX_BANDWIDTH` | the source's bandwidth limit (`100M` is 100 MiB/s, `0` none: `Bandwidth.parse`) |
 * | `MULTIFD_RECONNECT` | how many times a source connects a lost multifd channel again |
 *
 * Durations are written `30s`, `500ms`, `2m`, `1h` or as plain seconds; sizes as bytes or `512M`, `16G`. A bad
 * value is one error naming its variable (`MULTIFD_CHANNELS: must be between 1 and 255, not 0`): a
 * `ConfigError` from `config`, a `MigrationError` of reason `BadOptions` from `layerConfig`.
 *
 * @since 0.1.0
 */
import * as Config from "effect/Config"
import type * as ConfigError from "effect/ConfigError"
import * as Context from "effect/Context"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Layer from "effect/Layer"
import * as Bandwidth from "./Bandwidth.js"
import * as Field from "./internal/configField.js"
import * as Inputs from "./internal/inputs.js"
import * as MigrationError from "./MigrationError.js"
import * as Protocol from "./Protocol.js"
import * as Transfer from "./Transfer.js"

/**
 * Settings a migration uses where its options leave them out; every field is optional.
 *
 * @since 0.1.0
 * @category models
 */
export interface Settings {
  readonly channels?: number | undefined
  /** The page size of memory made from an image (the CLI); `migrate` sends the memory's own page size. */
  readonly pageSize?: number | undefined
  readonly compression?: Protocol.Compression | undefined
  readonly compressionLevel?: number | undefined
  readonly zeroPage?: "multifd" | "none" | undefined
  readonly timeouts?: Partial<Transfer.Timeouts> | undefined
  readonly live?: Transfer.LiveOptions | undefined
  /** A destination's `maxRamBytes`. */
  readonly maxRamBytes?: number | undefined
  /** A destination's `acceptTimeout`. */
  readonly acceptTimeout?: Duration.DurationInput | undefined
  /** A source's `maxBandwidth` (bytes per second; 0: none). */
  readonly maxBandwidth?: number | Bandwidth.Limit | undefined
  /** A source's `reconnect`: attempts (0: off), or attempts within a window. */
  readonly reconnect?: number | { readonly attempts: number; readonly within?: Duration.DurationInput | undefined } | undefined
}

/**
 * The settings `migrate` and `incoming` fall back on.
 *
 * @since 0.1.0
 * @category tags
 */
export class MigrationConfig extends Context.Tag("effect-multifd/MigrationConfig")<MigrationConfig, Settings>() {}

// ---------------------------------------------------------------------------------------------------------
// Parsers

const DURATION = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/

/**
 * Parses `30s`, `500ms`, `2m`, `1h` or a plain number of seconds; it must be positive, at most 24 days.
 *
 * @since 0.1.0
 * @category parsers
 */
export const parseDuration = (text: string): Either.Either<Duration.Duration, string> => {
  // (from plain JavaScript, a number threw: "text.trim is not a function")
  if (typeof text !== "string") return Either.left(`${String(text)} is not a duration as text like 30s, 500ms, 2m or 1h`)
  const m = DURATION.exec(text.trim())
  const value = m === null ? NaN : Number(m[1])
  if (m === null || !Number.isFinite(value) || value <= 0) {
    return Either.left(`${JSON.stringify(text)} is not a positive duration like 30s, 500ms, 2m or 1h`)
  }
  const duration = m[2] === "ms"
    ? Duration.millis(value)
    : m[2] === "m"
    ? Duration.minutes(value)
    : m[2] === "h"
    ? Duration.hours(value)
    : Duration.seconds(value)
  // timers count milliseconds: less would be a timeout of 0; and wait at most 2^31 - 1 of them: more never fires
  return Duration.toMillis(duration) < 1
    ? Either.left(`${JSON.stringify(text)} is shorter than a millisecond`)
    : Duration.toMillis(duration) > Transfer.MAX_TIMEOUT_MS
    ? Either.left(`${JSON.stringify(text)} is longer than 24 days, the longest a timer waits`)
    : Either.right(duration)
}

const SIZE = /^(\d+)\s*([KMGT]?)(?:i?B)?$/i

/**
 * Parses a size: bytes, or with a binary suffix (`512K`, `64M`, `16G`, `1T`, also `16GiB`); it must be positive.
 *
 * @since 0.1.0
 * @category parsers
 */
export const parseSize = (text: string): Either.Either<number, string> => {
  if (typeof text !== "string") return Either.left(`${String(text)} is not a size as text like 512K, 64M or 16G`)
  const m = SIZE.exec(text.trim())
  const unit = m === null ? 0 : 1024 ** "_KMGT".indexOf(m[2]!.toUpperCase() || "_")
  const bytes = m === null ? NaN : Number(m[1]) * unit
  return Number.isSafeInteger(bytes) && bytes > 0
    ? Either.right(bytes)
    : Either.left(`${JSON.stringify(text)} is not a size like 4096, 512M or 16G`)
}

const checked = (problem: (n: number) => string | undefined) => (text: string) =>
  Either.flatMap(Field.integer(text), (n) => {
    const why = problem(n)
    return why === undefined ? Either.right(n) : Either.left(why)
  })

const LEVEL_MIN = Math.min(Protocol.compressionLevels.zlib.min, Protocol.compressionLevels.zstd.min)
const LEVEL_MAX = Math.max(Protocol.compressionLevels.zlib.max, Protocol.compressionLevels.zstd.max)

/**
 * Why `n` is no compression method's level (outside the widest of their ranges), if it is not one: a level
 * is checked so before its method is known (`MULTIFD_COMPRESSION_LEVEL`, `--compression-level`).
 *
 * @since 0.1.0
 * @category parsers
 */
export const checkAnyCompressionLevel = (n: number): string | undefined =>
  n >= LEVEL_MIN && n <= LEVEL_MAX ? undefined : `must be between ${LEVEL_MIN} and ${LEVEL_MAX}, not ${n}`

// ---------------------------------------------------------------------------------------------------------
// One variable each (`MULTIFD_` is added by `Config.nested`)

/**
 * `MULTIFD_CHANNELS`: a channel count (`Protocol.Channels`).
 *
 * @since 0.1.0
 * @category config
 */
export const channels: Config.Config<number> = Config.nested(
  Field.field("CHANNELS", checked((n) =>
    Protocol.isChannels(n) ? undefined : `must be between ${Protocol.MIN_CHANNELS} and ${Protocol.MAX_CHANNELS}, not ${n}`)),
  "MULTIFD"
)

/**
 * `MULTIFD_PAGE_SIZE`: a page size (`Protocol.PageSize`).
 *
 * @since 0.1.0
 * @category config
 */
export const pageSize: Config.Config<number> = Config.nested(
  Field.field("PAGE_SIZE", checked((n) =>
    Protocol.isPageSize(n)
      ? undefined
      : `must be a power of two between ${Protocol.MIN_PAGE_SIZE} and ${Protocol.MAX_PAGE_SIZE}, not ${n}`)),
  "MULTIFD"
)

/**
 * `MULTIFD_COMPRESSION`: `none`, `zlib` or `zstd`.
 *
 * @since 0.1.0
 * @category config
 */
export const compression: Config.Config<Protocol.Compression> = Config.nested(
  Field.field("COMPRESSION", Field.oneOf(Protocol.compressions)),
  "MULTIFD"
)

/**
 * `MULTIFD_COMPRESSION_LEVEL`: an integer in the widest level range (`config` checks it against the method).
 *
 * @since 0.1.0
 * @category config
 */
export const compressionLevel: Config.Config<number> = Config.nested(
  Field.field("COMPRESSION_LEVEL", checked(checkAnyCompressionLevel)),
  "MULTIFD"
)

/**
 * `MULTIFD_ZERO_PAGE`: `multifd` or `none`.
 *
 * @since 0.1.0
 * @category config
 */
export const zeroPage: Config.Config<"multifd" | "none"> = Config.nested(
  Field.field("ZERO_PAGE", Field.oneOf(["multifd", "none"] as const)),
  "MULTIFD"
)

const duration = (name: string) => Config.nested(Field.field(name, parseDuration), "MULTIFD")

const optional = Field.optional

/** The fields that are not `undefined`. */
const defined = <A extends object>(a: A): { [K in keyof A]?: Exclude<A[K], undefined> } =>
  Object.fromEntries(Object.entries(a).filter(([, v]) => v !== undefined)) as { [K in keyof A]?: Exclude<A[K], undefined> }

/**
 * `MULTIFD_TIMEOUT` (the peer timeout), `MULTIFD_CONNECT_TIMEOUT`, `MULTIFD_HANDSHAKE_TIMEOUT`: those set.
 *
 * @since 0.1.0
 * @category config
 */
export const timeouts: Config.Config<Partial<Transfer.Timeouts>> = Config.map(
  Config.all({
    peer: optional(duration("TIMEOUT")),
    connect: optional(duration("CONNECT_TIMEOUT")),
    handshake: optional(duration("HANDSHAKE_TIMEOUT"))
  }),
  defined
)

/**
 * `MULTIFD_DOWNTIME_LIMIT`, `MULTIFD_MAX_ROUNDS`, `MULTIFD_MAX_DURATION`, `MULTIFD_ON_NO_CONVERGENCE`: the live
 * policy, those set.
 *
 * @since 0.1.0
 * @category config
 */
export const live: Config.Config<Transfer.LiveOptions> = Config.map(
  Config.all({
    downtimeLimit: optional(duration("DOWNTIME_LIMIT")),
    maxRounds: optional(Config.nested(
      Field.field("MAX_ROUNDS", checked((n) => n >= 1 ? undefined : `must be at least 1, not ${n}`)),
      "MULTIFD"
    )),
    maxDuration: optional(duration("MAX_DURATION")),
    onNoConvergence: optional(Config.nested(Field.field("ON_NO_CONVERGENCE", Field.oneOf(["fail", "switchover"] as const)), "MULTIFD"))
  }),
  defined
)

/**
 * `MULTIFD_MAX_RAM`: the largest memory a source may make a destination allocate (bytes, or `512M`, `16G`).
 *
 * @since 0.1.0
 * @category config
 */
export const maxRamBytes: Config.Config<number> = Config.nested(Field.field("MAX_RAM", parseSize), "MULTIFD")

/**
 * `MULTIFD_ACCEPT_TIMEOUT`: how long a destination waits for a source.
 *
 * @since 0.1.0
 * @category config
 */
export const acceptTimeout: Config.Config<Duration.Duration> = duration("ACCEPT_TIMEOUT")

/**
 * `MULTIFD_MAX_BANDWIDTH`: the source's bandwidth limit in bytes per second (`Bandwidth.parse`: `100M` or
 * `100` is 100 MiB/s; `0` is none).
 *
 * @since 0.1.0
 * @category config
 */
export const maxBandwidth: Config.Config<number> = Config.nested(Field.field("MAX_BANDWIDTH", Bandwidth.parse), "MULTIFD")

/**
 * `MULTIFD_RECONNECT`: how many times a source connects a lost multifd channel again (0: never; default 3).
 *
 * @since 0.1.0
 * @category config
 */
export const reconnect: Config.Config<number> = Config.nested(
  Field.field("RECONNECT", checked((n) => n >= 0 && n <= 1000 ? undefined : `must be between 0 and 1000, not ${n}`)),
  "MULTIFD"
)

/**
 * Every setting from its variable, each optional; the compression level checked against the method
 * (`Protocol.CompressionLevel`).
 *
 * @since 0.1.0
 * @category config
 */
export const config: Config.Config<Settings> = Config.all({
  channels: optional(channels),
  pageSize: optional(pageSize),
  compression: optional(compression),
  compressionLevel: optional(compressionLevel),
  zeroPage: optional(zeroPage),
  timeouts,
  live,
  maxRamBytes: optional(maxRamBytes),
  acceptTimeout: optional(acceptTimeout),
  maxBandwidth: optional(maxBandwidth),
  reconnect: optional(reconnect)
}).pipe(
  Config.mapOrFail((settings) => {
    const method = settings.compression ?? "none"
    const level = settings.compressionLevel
    const problem = level === undefined ? undefined : Protocol.checkCompressionLevel(method, level)
    return problem === undefined
      ? Either.right<Settings>(settings)
      : Either.left(Field.invalid(["MULTIFD", "COMPRESSION_LEVEL"], problem))
  })
)

/**
 * The variables `config` reads (`Tls.layerConfig` reads `MULTIFD_TLS_*` besides), for a program that wants to
 * tell a misspelt one: `multifd` warns of any other `MULTIFD_` variable.
 *
 * @since 0.1.0
 * @category config
 */
export const variables: ReadonlyArray<string> = [
  "CHANNELS",
  "PAGE_SIZE",
  "COMPRESSION",
  "COMPRESSION_LEVEL",
  "ZERO_PAGE",
  "TIMEOUT",
  "CONNECT_TIMEOUT",
  "HANDSHAKE_TIMEOUT",
  "DOWNTIME_LIMIT",
  "MAX_ROUNDS",
  "MAX_DURATION",
  "ON_NO_CONVERGENCE",
  "MAX_RAM",
  "ACCEPT_TIMEOUT",
  "MAX_BANDWIDTH",
  "RECONNECT"
].map((name) => `MULTIFD_${name}`)

/**
 * A `ConfigError` as one line naming the variable: `MULTIFD_CHANNELS: must be between 1 and 255, not 0`.
 *
 * @since 0.1.0
 * @category utils
 */
export const describeError = (error: ConfigError.ConfigError): string => Field.describe(error)

/**
 * The settings as given in code.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (settings: Settings): Layer.Layer<MigrationConfig> => Layer.succeed(MigrationConfig, settings)

/**
 * The settings from `config` (the environment by default); a bad value fails the layer with a `MigrationError`
 * of reason `BadOptions` whose message names the variable.
 *
 * @since 0.1.0
 * @category layers
 */
export const layerConfig: Layer.Layer<MigrationConfig, MigrationError.MigrationError> = Layer.effect(
  MigrationConfig,
  Effect.mapError(config, (error) => new MigrationError.MigrationError({ reason: "BadOptions", detail: describeError(error) }))
)

// ---------------------------------------------------------------------------------------------------------
// Resolution

/** `given` where defined, else `fallback`. */
const pick = <A extends object>(given: A | undefined, fallback: A | undefined): Partial<A> => {
  const out: Record<string, unknown> = { ...fallback }
  for (const [key, value] of Object.entries(given ?? {})) if (value !== undefined) out[key] = value
  return out as Partial<A>
}

/**
 * The settings in context, if any (`MigrationConfig`), under those given: a field of `given` that is not
 * `undefined` wins, field by field (also inside `timeouts` and `live`). Settings in context that are no object
 * (plain JavaScript: `layer(null)`) fail it (`BadOptions`); what each field holds is checked with the options.
 *
 * @since 0.1.0
 * @category utils
 */
export const resolve = <A extends Settings>(given: A): Effect.Effect<A, MigrationError.MigrationError> =>
  Effect.flatMap(Effect.serviceOption(MigrationConfig), (found) => {
    if (found._tag === "None") return Effect.succeed(given)
    const settings = found.value
    if (typeof settings !== "object" || settings === null || Array.isArray(settings)) {
      return Effect.fail(new MigrationError.MigrationError({
        reason: "BadOptions",
        detail: `the MigrationConfig in context must be an object, not ${Inputs.describeInput(settings)}`
      }))
    }
    return Effect.succeed({
      ...pick(given, settings),
      timeouts: pick(given.timeouts, settings.timeouts),
      live: pick(given.live, settings.live)
    } as A)
  })
