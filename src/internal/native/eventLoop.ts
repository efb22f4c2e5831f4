/**
 * Giving Node's event loop its turn during long synchronous work (compression at high levels). Effect's
 * scheduler runs fibers in microtasks and only goes through the macrotask queue every 2048 tasks, and
 * `Effect.yieldNow` only lets other fibers run: a fiber compressing packet after packet would hold every
 * timer, signal and socket of the process until it is done. `cooperate` is a yield point that costs a clock
 * read, and lets the event loop run once `BUDGET_MS` of work has passed since it last did (by time, not by
 * count: fast paths pay nothing measurable, slow ones never hold the loop for long).
 *
 * @internal
 */
import * as Effect from "effect/Effect"

/** Most milliseconds of work between two turns of the event loop that `cooperate` allows. */
export const BUDGET_MS = 20

/** When the event loop last had its turn through `yieldToEventLoop` (shared by every fiber of the thread). */
let lastTurn = performance.now()

/**
 * Lets Node's event loop run (timers, signals, I/O callbacks) before going on, through `setImmediate`;
 * interruptible.
 */
export const yieldToEventLoop: Effect.Effect<void> = Effect.async<void>((resume) => {
  const handle = setImmediate(() => {
    lastTurn = performance.now()
    resume(Effect.void)
  })
  return Effect.sync(() => clearImmediate(handle))
})

/** A yield point: lets the event loop run if this thread has worked `BUDGET_MS` since it last did. */
export const cooperate: Effect.Effect<void> = Effect.suspend(() =>
  performance.now() - lastTurn >= BUDGET_MS ? yieldToEventLoop : Effect.void
)
