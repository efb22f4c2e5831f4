/**
 * Guards against hangs (never used to let things settle): a test that would hang fails instead, long before
 * vitest's own timeout, naming what it was waiting for.
 */
import * as Effect from "effect/Effect"

/**
 * Fails with `hung: <what>` when `self` has not ended after `seconds`. Its timer is a real one, so that it also
 * guards tests that move the TestClock.
 */
export const noHang = <A, E, R>(self: Effect.Effect<A, E, R>, what: string, seconds = 10): Effect.Effect<A, E | Error, R> =>
  Effect.raceFirst(
    self,
    Effect.async<never, Error>((resume) => {
      const timer = setTimeout(() => resume(Effect.fail(new Error(`hung: ${what}`))), seconds * 1000)
      return Effect.sync(() => clearTimeout(timer))
    })
  )
