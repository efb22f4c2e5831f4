/**
 * Inactivity timeouts: a wait that may legitimately last long (a whole round of pages) fails only when no
 * progress is seen for the given time.
 *
 * @internal
 */
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as MigrationError from "../MigrationError.js"

/** Runs `effect`, failing with a timeout when `progress` stays unchanged for `after`. */
export const unlessStalled = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  progress: Effect.Effect<number>,
  after: Duration.DurationInput,
  what: string
): Effect.Effect<A, E | MigrationError.MigrationError, R> => {
  const watch = Effect.gen(function*() {
    let last = yield* progress
    while (true) {
      yield* Effect.sleep(after)
      const now = yield* progress
      if (now === last) return yield* Effect.fail(MigrationError.timeout(what, after))
      last = now
    }
  })
  return Effect.raceFirst(effect, watch)
}

/** `Effect.timeoutFail` with the migration's timeout error. */
export const within = (after: Duration.DurationInput, what: string) =>
<A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E | MigrationError.MigrationError, R> =>
  Effect.timeoutFail(effect, { duration: Duration.decode(after), onTimeout: () => MigrationError.timeout(what, after) })
