/**
 * Runs a migration, save or restore whose fibers stay its own to interrupt, whoever runs it uninterruptibly (a
 * store step's `commit`, `Effect.uninterruptible` around a save, a finalizer). Fibers forked in an
 * uninterruptible region inherit it: the workers, watchdogs and progress fibers that such a run forks, and the
 * losers of its races, could then never be interrupted, and the run waited for them for ever. Here the run is a
 * fiber of its own, interruptible inside; the caller still decides whether the run may be interrupted from outside
 * (its join is interruptible only where the caller is; an interruption interrupts the run and waits for it).
 * The run is a daemon fiber, told of an interruption by that join alone: a child fiber hears of every interruption
 * of its parent at once (the runtime tells the children), and an uninterruptible caller's run was interrupted all
 * the same (`Effect.uninterruptible(Snapshot.save(...))`, or a store step's commit, ended half-way, no snapshot).
 *
 * A native adapter: it imports no public module.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"

export const ownFibers = <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  Effect.uninterruptibleMask((restore) =>
    Effect.flatMap(Effect.forkDaemon(Effect.interruptible(self)), (fiber) =>
      Effect.onInterrupt(restore(Fiber.join(fiber)), () => Fiber.interrupt(fiber)))
  )
