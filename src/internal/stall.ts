/**
 * Inactivity timeouts: a wait that may legitimately last long (a whole round of pages) fails only when no
 * progress is seen for the given time.
 *
 * @internal
 */
import * as Clock from "effect/Clock"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as MigrationError from "../MigrationError.js"

/** Checks of the progress counter per inactivity timeout: the timeout fires at most a quarter late. */
const CHECKS = 4

/**
 * Runs `effect`, failing with a timeout when `progress` stays unchanged for `after`. The counter is read
 * `CHECKS` times per `after`, and the time of the last change seen is kept: the timeout fires between `after`
 * and `after × (1 + 1/CHECKS)` after the last progress (sampling once per `after` could wait twice as long).
 */
export const unlessStalled = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  progress: Effect.Effect<number>,
  after: Duration.DurationInput,
  /**
   * What was waited for, as the timeout says it (asked when it fires: what it waits for may change meanwhile; an
   * Effect when saying it reads state, as where sending stopped).
   */
  what: string | (() => string) | Effect.Effect<string>
): Effect.Effect<A, E | MigrationError.MigrationError, R> => {
  const limit = Duration.toMillis(after)
  const every = Duration.millis(limit / CHECKS)
  const watch = Effect.gen(function*() {
    let last = yield* progress
    let changedAt = yield* Clock.currentTimeMillis
    while (true) {
      yield* Effect.sleep(every)
      const now = yield* progress
      const time = yield* Clock.currentTimeMillis
      if (now !== last) {
        last = now
        changedAt = time
      } else if (time - changedAt >= limit) {
        const said = typeof what === "string" ? what : Effect.isEffect(what) ? yield* what : what()
        return yield* Effect.fail(MigrationError.timeout(said, after))
      }
    }
  })
  return Effect.raceFirst(effect, watch)
}

/** `Effect.timeoutFail` with the migration's timeout error (`what` asked when it fires, if a function). */
export const within = (after: Duration.DurationInput, what: string | (() => string)) =>
<A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E | MigrationError.MigrationError, R> =>
  Effect.timeoutFail(effect, {
    duration: Duration.decode(after),
    onTimeout: () => MigrationError.timeout(typeof what === "string" ? what : what(), after)
  })
