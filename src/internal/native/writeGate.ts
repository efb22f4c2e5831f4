/**
 * The gate every write to guest memory goes through. Writes are synchronous once admitted, so closing the
 * gate is enough to know that no write is under way: a writer checks the gate and writes in one step.
 *
 * @internal
 */
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"

export class WriteGate {
  /** While closed, the deferred writers wait for; opened by `open`. */
  private closed: Deferred.Deferred<void> | undefined = undefined

  /** Runs `write` (synchronous) as soon as the gate is open. */
  pass<A>(write: () => A): Effect.Effect<A> {
    // the check and the write are one synchronous step: a fiber may yield between two effects, and a gate
    // closed in that gap must not let the write through
    const attempt: Effect.Effect<A> = Effect.suspend(() => {
      const closed = this.closed
      return closed === undefined ? Effect.succeed(write()) : Effect.zipRight(Deferred.await(closed), attempt)
    })
    return attempt
  }

  /** Closes the gate; writers wait from now on. */
  readonly close: Effect.Effect<void> = Effect.suspend(() =>
    this.closed === undefined
      ? Effect.map(Deferred.make<void>(), (d) => {
        this.closed ??= d
      })
      : Effect.void
  )

  /** Opens the gate and lets every waiting writer through. */
  readonly open: Effect.Effect<void> = Effect.suspend(() => {
    const closed = this.closed
    this.closed = undefined
    return closed === undefined ? Effect.void : Deferred.succeed(closed, undefined)
  })
}
