/**
 * The gate every write to guest memory goes through. Writes are synchronous once admitted, so closing the
 * gate is enough to know that no write is under way: a writer checks the gate and writes in one step.
 *
 * @internal
 */
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as FiberRef from "effect/FiberRef"
import type * as Scope from "effect/Scope"

/**
 * A transfer whose progress reports may not wait at a gate it holds closed: one per transfer (`WriteGate.holding`).
 */
export interface Holder {
  readonly _: unique symbol
}

/** A new transfer's token. */
export const holder = (): Holder => ({}) as Holder

/**
 * The transfer whose progress report the current fiber runs inside (and the fibers it forks): set by
 * `WriteGate.reporting`.
 */
const reportingFor = FiberRef.unsafeMake<Holder | undefined>(undefined)

export class WriteGate {
  /** While closed, the deferred writers wait for; opened by `open`. */
  private closed: Deferred.Deferred<void> | undefined = undefined
  /** The transfer whose switch-over holds the gate closed now (and waits for its reports), if any. */
  private holder: Holder | undefined = undefined

  /**
   * Runs `write` (synchronous) as soon as the gate is open. A write from inside a progress report of the
   * transfer that holds the gate closed for its switch-over (`reporting`, `holding`) would wait for that transfer,
   * which waits for its report: it fails at once with `deadlock()` instead. Any other write waits: one from a
   * fiber a report of an earlier transfer forked (it outlived that transfer), or from a report while the gate is
   * closed by the application (it goes through once the application opens it).
   */
  pass<A, E>(write: () => A, deadlock: () => E): Effect.Effect<A, E> {
    // the check and the write are one synchronous step: a fiber may yield between two effects, and a gate
    // closed in that gap must not let the write through
    const attempt: Effect.Effect<A, E> = Effect.withFiberRuntime((fiber) => {
      const closed = this.closed
      if (closed === undefined) return Effect.succeed(write())
      if (this.holder !== undefined && fiber.getFiberRef(reportingFor) === this.holder) return Effect.fail(deadlock())
      return Effect.zipRight(Deferred.await(closed), attempt)
    })
    return attempt
  }

  /**
   * Runs `report`, a progress report of the transfer `holder`, as such: a write through this gate from inside it
   * (or a fiber it forks) while that transfer holds the gate closed (`holding`) fails instead of waiting.
   */
  reporting<A, E, R>(holder: Holder, report: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> {
    return Effect.locally(report, reportingFor, holder)
  }

  /**
   * Marks the gate, closed now, as held by `holder`'s switch-over until `release` (whoever closed it: a transfer
   * that found it closed by the application relies on it as much); returns the release.
   */
  holding(holder: Holder): Effect.Effect<Effect.Effect<void>> {
    return Effect.sync(() => {
      this.holder = holder
      return Effect.sync(() => {
        if (this.holder === holder) this.holder = undefined
      })
    })
  }

  /**
   * `onProgress` of a transfer into the memory behind this gate (a restore, an incoming migration), which waits for
   * its reports (its last one at its end): while the scope is open, a write from inside one of them (or a fiber it
   * forks) while the gate is closed — by the application, by a migration or save whose success left it so, or by the
   * transfer itself — fails at once with `deadlock()` rather than wait for writers to go on (it hung the transfer for
   * good); with the gate open it goes through.
   */
  reports<P>(
    onProgress: ((progress: P) => Effect.Effect<void>) | undefined
  ): Effect.Effect<((progress: P) => Effect.Effect<void>) | undefined, never, Scope.Scope> {
    if (onProgress === undefined) return Effect.succeed(undefined)
    const self = holder()
    return Effect.as(
      Effect.acquireRelease(this.holding(self), (release) => release),
      (progress: P) => this.reporting(self, Effect.suspend(() => onProgress(progress)))
    )
  }

  /** Closes the gate; writers wait from now on. */
  readonly close: Effect.Effect<void> = Effect.asVoid(Effect.suspend(() => this.closing))

  /**
   * Closes the gate; whether this call closed it (`false`: it was closed already, by the application or an
   * earlier transfer, and is not this caller's to open again).
   */
  readonly closing: Effect.Effect<boolean> = Effect.suspend(() =>
    this.closed === undefined
      ? Effect.map(Deferred.make<void>(), (d) => {
        if (this.closed !== undefined) return false
        this.closed = d
        return true
      })
      : Effect.succeed(false)
  )

  /** Opens the gate and lets every waiting writer through. */
  readonly open: Effect.Effect<void> = Effect.suspend(() => {
    const closed = this.closed
    this.closed = undefined
    return closed === undefined ? Effect.void : Deferred.succeed(closed, undefined)
  })

  /**
   * Closes the gate for the current scope: writers wait until the effect given back runs (once; the scope's end runs
   * it too). A gate closed already (by the application, or kept closed by a transfer's success) stays as it was found.
   */
  readonly closedForScope: Effect.Effect<Effect.Effect<void>, never, Scope.Scope> = Effect.uninterruptible(
    Effect.suspend(() =>
      Effect.flatMap(this.closing, (closedHere) =>
        closedHere
          ? Effect.tap(Effect.once(this.open), (reopen) => Effect.addFinalizer(() => reopen))
          : Effect.succeed(Effect.void))
    )
  )
}
