/**
 * The TestClock against real sockets: time moved in small steps, each followed by an event-loop turn so that
 * the sockets' callbacks run between them.
 */
import * as Effect from "effect/Effect"
import * as TestClock from "effect/TestClock"
import { noHang } from "./guards.js"
import { nextTurn } from "./handles.js"

/** Moves the TestClock a tenth of a second per event-loop turn until `done` holds (a real-time guard bounds it). */
export const advanceUntil = (done: Effect.Effect<boolean>, what: string) => {
  const step: Effect.Effect<void> = Effect.flatMap(done, (isDone) =>
    isDone ? Effect.void : Effect.zipRight(Effect.zipRight(TestClock.adjust("100 millis"), nextTurn), step))
  return noHang(step, what)
}
