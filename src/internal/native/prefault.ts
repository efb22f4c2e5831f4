/**
 * Backing fresh guest memory with pages before a migration writes into it. A first write to a page faults,
 * and faults are dear on virtual machines (here about 1 s a GiB on one thread, when copying received pages in
 * would take a tenth of that), so a destination's fresh blocks are touched up front, as QEMU's `prealloc`
 * does, and in parallel: page faults scale with threads (two threads here fault a GiB in 0.3–0.4 s).
 * Only fresh memory, zero-filled and not in use, is touched (a zero is written in each page); the wait for the
 * threads is interruptible.
 *
 * @internal
 */
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Queue from "effect/Queue"
import * as Os from "node:os"
import * as Digest from "./digest.js"
import * as EventLoop from "./eventLoop.js"
import { touchPages } from "./hashRequest.js"

/**
 * Bytes of memory this process may still touch: `process.availableMemory()`, which heeds a container's limit
 * (Node 20.13 and later); on an earlier Node 20, which lacks it, the machine's memory (`os.totalmem()`), under a
 * cgroup's limit where `process.constrainedMemory()` knows one: nothing more can ever be had.
 */
export const availableMemory = (): number => {
  if (typeof process.availableMemory === "function") return process.availableMemory()
  const constrained = typeof process.constrainedMemory === "function" ? process.constrainedMemory() : 0
  return constrained > 0 ? Math.min(constrained, Os.totalmem()) : Os.totalmem()
}

/** The bytes touched per page: the system's page size (4 KiB on x86-64; a larger one is touched more than needed). */
export const STEP = 4096

/** Bytes a worker thread touches per request. */
const CHUNK = 64 * 1024 * 1024

/** Bytes this thread touches between two turns of the event loop. */
const SLICE = 8 * 1024 * 1024

/** Touches every page of `bytes` on this thread, a slice at a time, letting the event loop run between. */
const touchHere = (bytes: Uint8Array): Effect.Effect<void> =>
  Effect.gen(function*() {
    for (let at = 0; at < bytes.length; at += SLICE) {
      touchPages(bytes.subarray(at, at + SLICE), STEP)
      yield* EventLoop.yieldToEventLoop
    }
  })

/** Most threads a prefault starts: faults of one mapping stop scaling long before a large machine's cores run out. */
const MAX_THREADS = 8

/**
 * Touches every page of `bytes`, fresh zero-filled memory that nothing uses yet, 64 MiB at a time: shared memory
 * by this thread and `threads - 1` worker threads started for it (by default one per core, at most
 * `MAX_THREADS`), as a digest shares its chunks (this thread works while the workers boot, which takes a while
 * when they load TypeScript); other memory, or a single chunk, by this thread alone. A thread that cannot start
 * or fails leaves the rest to this thread.
 */
export const prefault = (
  bytes: Uint8Array,
  threads: number = Math.min(MAX_THREADS, Os.availableParallelism())
): Effect.Effect<void> => {
  const chunks = Math.ceil(bytes.length / CHUNK)
  if (!(bytes.buffer instanceof SharedArrayBuffer) || chunks < 2 || threads < 2) return touchHere(bytes)
  return Effect.scoped(Effect.gen(function*() {
    const pool = yield* Digest.pool(Math.min(threads, chunks) - 1)
    const workers = yield* Queue.takeAll(pool.idle)
    let next = 0
    const take = <E>(touch: (chunk: Uint8Array) => Effect.Effect<void, E>) =>
      Effect.gen(function*() {
        while (next < chunks) {
          const at = CHUNK * next++
          yield* touch(bytes.subarray(at, at + CHUNK))
        }
      })
    yield* Effect.all([take(touchHere), ...Array.from(workers, (w) => take((chunk) => w.touch!(chunk, STEP)))], {
      concurrency: "unbounded",
      discard: true
    })
  })).pipe(
    // threads are a speed-up, not a requirement: the pages are touched here instead (zeros over zeros)
    Effect.catchAllCause((cause) => Cause.isInterruptedOnly(cause) ? Effect.interrupt : touchHere(bytes))
  )
}
