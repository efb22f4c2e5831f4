/**
 * What the library's modules share about a `GuestRam` beyond its public API: whether a value is one (from plain
 * JavaScript), whether its memory is still there, its digest on a pool's threads, and the one-transfer-at-a-time
 * turn of a memory (`exclusively`, `lending`). Typed by the shape of a `GuestRam` (`Memory`, `Held`), since
 * `GuestRam` itself uses them.
 */
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as FiberRef from "effect/FiberRef"
import * as Option from "effect/Option"
import * as Digest from "./native/digest.js"
import { WriteGate } from "./native/writeGate.js"
import * as HashPool from "./threads/hashPool.js"
import type * as ThreadPool from "./threads/pool.js"

/** A `GuestRam`'s memory, as far as these checks and digests see it. */
export interface Memory {
  readonly pageSize: number
  readonly blocks: ReadonlyArray<{ readonly name: string; readonly pages: number; readonly bytes: Buffer }>
}

/** A `GuestRam`'s memory with its transfer permit (`GuestRam["Type"]["transfer"]`). */
export interface Held extends Memory {
  readonly transfer: Effect.Semaphore
}

/** A block's digest (`GuestRam.BlockDigest`). */
export interface BlockDigest {
  readonly name: string
  readonly digest: string
}

/**
 * Why `ram`, given as memory (`what`), is no `GuestRam`, if it is not: from plain JavaScript, `null` or an object
 * that no `make` built (no blocks, no write gate) was a defect inside the transfer. Memory built by hand from one
 * that `make` built (`{ ...ram, pageSize }`) passes: its page size is checked where it is used.
 */
export const notGuestRam = (ram: unknown, what: string): string | undefined => {
  const r = ram as { readonly [K in "pageSize" | "blocks" | "block" | "gate" | "transfer"]?: unknown } | null
  return typeof r === "object" && r !== null && typeof r.pageSize === "number" && Array.isArray(r.blocks) &&
      typeof r.block === "function" && r.gate instanceof WriteGate && typeof r.transfer === "object"
    ? undefined
    : `${what} is not a GuestRam (memory that GuestRam.make built)`
}

/**
 * Why the memory of `ram` is not all there any more, if it is not: bytes given to `make` whose `ArrayBuffer` was
 * detached since (transferred to another thread, `structuredClone` with `transfer`) or shrunk (a resizable one)
 * read as none, and a save, migration or restore of such memory died on a `RangeError` half-way.
 */
export const missing = (ram: Memory): string | undefined => {
  for (const block of ram.blocks) {
    const size = block.pages * ram.pageSize
    if (block.bytes.length !== size) {
      return `the memory of block ${JSON.stringify(block.name)} is no longer there (${block.bytes.length} of its ` +
        `${size} bytes): its ArrayBuffer was detached (transferred) or resized since GuestRam.make`
    }
  }
  return undefined
}

/**
 * Runs `self`, a migration or save of `ram`, or a restore or migration into it, from its start to its end, as the
 * only one on that memory (`transfer`); while another runs, fails at once with `busy(detail)`, before anything
 * opens. Rounds take the dirty logs, and a restore writes past them: with two at once a save had reported success
 * with old bytes in its file. Memory that is no longer all there (`missing`) fails with `gone(detail)` first.
 */
export const exclusively = <A, E, R, B>(
  ram: Held,
  self: Effect.Effect<A, E, R>,
  busy: (detail: string) => B,
  gone: (detail: string) => B
): Effect.Effect<A, E | B, R> =>
  Effect.suspend(() => {
    const problem = missing(ram)
    if (problem !== undefined) return Effect.fail(gone(problem))
    // its ArrayBuffer detached (transferred to another thread) or shrunk while the transfer runs: the pages' views of
    // it died where they were read or written (a RangeError, "Cannot perform Construct on a detached ArrayBuffer"), a
    // defect with a stack trace, or read as none (the peer timed out waiting for their bytes); it is the memory that
    // is gone, as up front
    return Effect.catchAllCause(exclusiveRun(ram, self, busy), (cause) => {
      const lost = Cause.isInterruptedOnly(cause) ? undefined : missing(ram)
      return lost === undefined ? Effect.failCause(cause) : Effect.fail(gone(lost))
    })
  })

const exclusiveRun = <A, E, R, B>(
  ram: Held,
  self: Effect.Effect<A, E, R>,
  busy: (detail: string) => B
): Effect.Effect<A, E | B, R> =>
  Effect.flatMap(
    // inside a step the holder lends the memory to (`lending`), the step's own permit
    Effect.flatMap(FiberRef.get(lent), (lent) => {
      // a fiber the step forked that outlived it has the memory no longer
      const loan = lent.get(ram)
      return loan !== undefined && loan.open
        ? loan.permit.withPermitsIfAvailable(1)(onLoan(loan, self))
        : ram.transfer.withPermitsIfAvailable(1)(holding(ram, self))
    }),
    Option.match({
      onNone: () =>
        Effect.fail(busy(
          "another migration, snapshot save or restore of this memory is under way: one at a time, since a " +
            "migration or save takes the pages written meanwhile"
        )),
      onSome: Effect.succeed
    })
  )

/** The memories the current fiber's transfer holds (`exclusively`), each with the loans of its steps (`lending`). */
const held = FiberRef.unsafeMake<ReadonlyMap<Held, Holding>>(new Map())

/** A transfer's hold on a memory: the steps it lent the memory to, while it runs. */
interface Holding {
  open: boolean
  readonly loans: Set<Loan>
}

/**
 * Runs `self`, the holder of `ram`'s permit, and gives the permit back only once the transfers its steps started on
 * loan have ended: one that outlives its step (forked, so that the step ends while it saves) would otherwise run
 * beside whoever takes the memory next. The holder waits for them when it succeeded; failed or interrupted, it
 * interrupts them (the memory's holder is gone) and waits for that.
 */
const holding = <A, E, R>(ram: Held, self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  Effect.suspend(() => {
    const hold: Holding = { open: true, loans: new Set() }
    const running = () => Array.from(hold.loans, (loan) => Array.from(loan.running)).flat()
    return Effect.locallyWith(self, held, (map) => new Map(map).set(ram, hold)).pipe(
      // (the wait interruptible as the holder is: interrupted meanwhile, it interrupts them below)
      Effect.zipLeft(Effect.suspend(() => {
        hold.open = false
        return Effect.forEach(running(), Fiber.await, { discard: true })
      })),
      Effect.onExit(() =>
        Effect.suspend(() => {
          hold.open = false
          return Fiber.interruptAll(running())
        })
      )
    )
  })

/**
 * Runs `self`, a transfer on `loan`, in a fiber the holder knows of (it waits for it, or interrupts it, before it
 * lets the memory go); interruptible inside, its caller's interruption interrupting it (as `ownFibers`).
 */
const onLoan = <A, E, R>(loan: Loan, self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  Effect.uninterruptibleMask((restore) =>
    Effect.flatMap(Effect.forkDaemon(Effect.interruptible(self)), (fiber) => {
      loan.running.add(fiber)
      return Effect.onInterrupt(restore(Fiber.join(fiber)), () => Fiber.interrupt(fiber)).pipe(
        Effect.ensuring(Effect.sync(() => loan.running.delete(fiber)))
      )
    })
  )

/** The memories whose holder lent them to the current fiber's step (`lending`), each with the step's own permit. */
const lent = FiberRef.unsafeMake<ReadonlyMap<Held, Loan>>(new Map())

/** A memory lent to a step: its own permit, while the step runs; the transfers on it, until they end. */
interface Loan {
  readonly permit: Effect.Semaphore
  open: boolean
  readonly running: Set<Fiber.RuntimeFiber<unknown, unknown>>
}

/**
 * Runs `self`, a step of the holder of `ram`'s permit (`exclusively`) that may migrate, save or restore that memory
 * itself (an incoming migration's `store` step saving a snapshot of the memory it received, or passing it on): one
 * at a time inside the step (a permit of its own), while everyone else still finds the memory `Busy`. The loan
 * ends with the step: a fiber it forked that outlives it takes the memory's own permit, as anyone; a transfer it
 * started that outlives it keeps the memory held by its holder until it ends (see `holding`). Memory nobody holds
 * (an incoming migration's own, made for it) is not lent: the step's transfers take its own permit.
 */
export const lending = <A, E, R>(ram: Held, self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  Effect.flatMap(FiberRef.get(held), (held) => {
    const hold = held.get(ram)
    if (hold === undefined || !hold.open) return self
    return Effect.flatMap(Effect.makeSemaphore(1), (permit) => {
      const loan: Loan = { permit, open: true, running: new Set() }
      hold.loans.add(loan)
      return Effect.locallyWith(self, lent, (map) => new Map(map).set(ram, loan)).pipe(
        Effect.ensuring(Effect.sync(() => {
          loan.open = false
        }))
      )
    })
  })

/**
 * The digest of every block of `ram` on `pool` (`undefined`: this thread alone), failing with `gone(detail)` when
 * its memory is no longer all there (`missing`).
 */
export const digestOn = <E>(
  ram: Memory,
  pool: Digest.Pool | undefined,
  gone: (detail: string) => E
): Effect.Effect<ReadonlyArray<BlockDigest>, E> =>
  Effect.suspend(() => {
    // a detached ArrayBuffer reads as no bytes: its digest was the empty input's, given as the block's
    const detail = missing(ram)
    if (detail !== undefined) return Effect.fail(gone(detail))
    return Effect.map(
      Digest.digestAll(ram.blocks.map((b) => b.bytes), pool),
      (hashes) => ram.blocks.map((b, i) => ({ name: b.name, digest: hashes[i]! }))
    )
  })

/** `digest`, or `here` (the digest on the calling thread) when a thread of its pool is gone (`Digest.WorkerFailed`), with a warning. */
export const hereIfStopped = <A, E>(digest: Effect.Effect<A, E>, here: Effect.Effect<A, E>): Effect.Effect<A, E> =>
  Effect.catchSomeDefect(digest, (defect) =>
    defect instanceof Digest.WorkerFailed
      ? Option.some(Effect.zipRight(
        Effect.logWarning(`the memory's digest: ${defect.message}; hashing it in this thread instead`),
        here
      ))
      : Option.none())

/**
 * A digest that hashes on channel threads of `threads` (a hash session on each of as many as `GuestRam.digester`
 * would start threads, opened for the digest and closed after it) beside the calling thread: a source whose
 * channels run on the pool hashes there, its channels idle by then, instead of on threads of its own (each
 * one more isolate in memory).
 */
export const digestOnThreads = <E>(
  ram: Memory,
  threads: ThreadPool.Pool,
  gone: (detail: string) => E
): Effect.Effect<ReadonlyArray<BlockDigest>, E> =>
  Effect.scoped(Effect.flatMap(
    HashPool.poolOn(threads, Math.min(threads.size, Digest.threadsFor(ram.blocks.map((b) => b.bytes)))),
    (pool) => digestOn(ram, pool, gone)
  )).pipe(
    // a channel thread gone under the digest (the pool closed, its layer's scope ended; a thread that died): the
    // memory is hashed here instead. Its death was a defect that ended the migration with a stack trace, where the
    // same close a moment earlier failed it with the channels' own error (which the caller hears of as before)
    (digest) => hereIfStopped(digest, digestOn(ram, undefined, gone))
  )
