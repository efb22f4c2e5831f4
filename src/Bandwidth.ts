/**
 * A bandwidth limit on a migration's channels, as QEMU's `max-bandwidth`: one budget shared by every channel
 * (whichever thread a channel runs on), counting the bytes each packet puts on the wire, that a running
 * migration follows as soon as it is changed.
 *
 * ```ts
 * const limit = yield* Bandwidth.make(64 * Bandwidth.MIB)   // 64 MiB/s
 * const fiber = yield* Effect.fork(Migration.migrate({ address, maxBandwidth: limit }))
 * yield* limit.set(0)                                       // later: no limit
 * ```
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import { LimitTypeId as TypeId, RateLimit } from "./internal/native/rateLimit.js"
import * as MigrationError from "./MigrationError.js"

/**
 * Bytes in a mebibyte: rates in MiB/s, as QEMU's `max-bandwidth` takes them (`100M` is 100 MiB/s).
 *
 * @since 0.1.0
 * @category constants
 */
export const MIB = 1024 * 1024

/**
 * A limit that migrations share their channels' bytes under. Changing it takes effect at the channels' next
 * packets.
 *
 * @since 0.1.0
 * @category models
 */
export interface Limit {
  readonly [TypeId]: RateLimit
  /** Bytes per second now (0: no limit). */
  readonly rate: Effect.Effect<number>
  /**
   * Sets the rate in bytes per second (0 lifts the limit); a negative, non-finite or unsafe rate, or a positive one
   * under one byte a second, is `BadOptions`.
   */
  readonly set: (bytesPerSecond: number) => Effect.Effect<void, MigrationError.MigrationError>
}

const badRate = (bytesPerSecond: number) =>
  new MigrationError.MigrationError({
    reason: "BadOptions",
    detail: `a bandwidth limit must be a number of bytes per second >= 0 (0: none; else from 1 to ` +
      `${Number.MAX_SAFE_INTEGER}), not ${
        typeof bytesPerSecond === "string"
          ? JSON.stringify(bytesPerSecond)
          : typeof bytesPerSecond === "object" && bytesPerSecond !== null
          ? "(an object)"
          : String(bytesPerSecond)
      }`
  })

/**
 * 0 (no limit), or a rate the shared state holds as it is: a positive rate under one byte a second rounded to 0, and
 * one of 2^63 or more wrapped around its 64-bit slot (2^64 to 0), both of which lifted the limit they were to set.
 */
// (a string from plain JavaScript, "100", compared as a number here and was a defect in the limit: a RangeError)
const isRate = (n: number) => typeof n === "number" && (n === 0 || (n >= 1 && n <= Number.MAX_SAFE_INTEGER))

/**
 * A limit of `bytesPerSecond` (0: none) that lets one packet's worth go at once after an idle moment.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (bytesPerSecond: number): Effect.Effect<Limit, MigrationError.MigrationError> =>
  isRate(bytesPerSecond) ? Effect.sync(() => fromRateLimit(RateLimit.make(bytesPerSecond))) : Effect.fail(badRate(bytesPerSecond))

const fromRateLimit = (limit: RateLimit): Limit => ({
  [TypeId]: limit,
  rate: Effect.sync(() => limit.rate),
  set: (bytesPerSecond) =>
    isRate(bytesPerSecond) ? Effect.sync(() => limit.set(bytesPerSecond)) : Effect.fail(badRate(bytesPerSecond))
})

/**
 * Whether `u` is a `Limit`.
 *
 * @since 0.1.0
 * @category guards
 */
export const isLimit = (u: unknown): u is Limit => typeof u === "object" && u !== null && TypeId in u

const RATE = /^(\d+(?:\.\d+)?)\s*([BKMGT]?)(?:i?B)?(?:\/s)?$/i

/**
 * Parses a rate as QEMU's `max-bandwidth` does: a number of MiB/s, or with a unit (`B`, `K`, `M`, `G`, `T`,
 * binary): `100M` and `100` are 100 MiB/s, `512K` is 512 KiB/s, `1G` 1 GiB/s; `0` is no limit. Gives bytes
 * per second.
 *
 * @since 0.1.0
 * @category parsers
 */
export const parse = (text: string): Either.Either<number, string> => {
  // (from plain JavaScript, a number threw: "text.trim is not a function"; a rate as a number is `make`'s)
  if (typeof text !== "string") return Either.left(`${String(text)} is not a rate as text like 100M (MiB/s), 512K, 1G or 0`)
  const m = RATE.exec(text.trim())
  const unit = m === null ? 0 : 1024 ** "BKMGT".indexOf(m[2]!.toUpperCase() || "M")
  const bytes = m === null ? NaN : Math.round(Number(m[1]) * unit)
  if (!Number.isSafeInteger(bytes) || bytes < 0) {
    return Either.left(`${JSON.stringify(text)} is not a rate like 100M (MiB/s), 512K, 1G or 0 (no limit)`)
  }
  // a positive rate under one byte a second would round to 0, which means no limit at all
  if (bytes === 0 && Number(m![1]) > 0) return Either.left(`${JSON.stringify(text)} is less than one byte a second`)
  return Either.right(bytes)
}

/**
 * A rate for people: `64 MiB/s`, `1.5 GiB/s`, `no limit`.
 *
 * @since 0.1.0
 * @category formatting
 */
export const format = (bytesPerSecond: number): string => {
  if (bytesPerSecond === 0) return "no limit"
  const units = ["B", "KiB", "MiB", "GiB", "TiB"]
  let value = bytesPerSecond
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit++
  }
  return `${Number.isInteger(value) ? value : value.toFixed(2)} ${units[unit]}/s`
}
