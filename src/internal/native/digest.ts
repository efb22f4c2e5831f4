/**
 * Digests of guest memory: SHA-256 over the XXH3-128 of each 64 MiB chunk (XXH3 several GiB/s a core where
 * SHA-256 manages one: the digest is checked while a migration is paused). The XXH3 stripe loop
 * (`native/xxh3`) reads memory from `allocate` where it lies and copies other memory into a
 * scratch memory first. Shared memory is hashed by hashers on other threads (worker threads of the digest's
 * own, `native/digestWorker`, or a source's channel threads, `threads/hashPool`) and the calling thread in
 * parallel; other memory by the calling thread alone. The calling thread yields every 4 MiB.
 *
 * @internal
 */
import * as Data from "effect/Data"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import * as Queue from "effect/Queue"
import type * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Os from "node:os"
import * as WorkerThreads from "node:worker_threads"
import { ownFibers } from "./ownFibers.js"
import type * as DigestWorker from "./digestWorker.js"
import * as EventLoop from "./eventLoop.js"
import * as Xxh3 from "./xxh3.js"

/** Chunk size of the digest tree. */
export const CHUNK = 64 * 1024 * 1024

/** Bytes the stripe loop takes between two yields (and the size of a scratch memory). */
export const SLICE = 4 * 1024 * 1024
const SLICE_BLOCKS = SLICE / Xxh3.BLOCK

// ---------------------------------------------------------------------------------------------------------
// Guest memory that the XXH3 module reads in place.
// ---------------------------------------------------------------------------------------------------------

const memories = new WeakMap<ArrayBufferLike, Xxh3.WasmMemory>()

/**
 * Zero-filled shared memory of `size` bytes inside a `WebAssembly.Memory` (so that digests read it in
 * place), or a plain `SharedArrayBuffer` when `size` is more than a 32-bit module addresses or the engine
 * refuses the reservation.
 */
export const allocate = (size: number): Buffer => {
  const pages = Math.ceil(size / Xxh3.WASM_PAGE)
  if (pages > 0 && pages <= Xxh3.MAX_WASM_PAGES) {
    try {
      const memory = new Xxh3.Wasm.Memory({ initial: pages, maximum: pages, shared: true })
      memories.set(memory.buffer, memory)
      return Buffer.from(memory.buffer, 0, size)
    } catch {
      // address space for WebAssembly memories is limited: plain shared memory instead
    }
  }
  return Buffer.from(new SharedArrayBuffer(size))
}

/** The WebAssembly memory `bytes` lie in, if `allocate` made it. */
export const memoryOf = (bytes: Uint8Array): Xxh3.WasmMemory | undefined => memories.get(bytes.buffer)

/** A piece of memory to hash. */
export interface Chunk {
  readonly bytes: Uint8Array
}

/** A hashing thread failed: it threw, or it exited (the digest it was hashing for fails with this). */
export class WorkerFailed extends Data.TaggedError("WorkerFailed")<{ readonly reason: string }> {
  override get message() {
    return `digest worker thread ${this.reason}`
  }
}

/** A hasher on another thread: hashes a chunk's full blocks there, or fails once that thread failed. */
export interface Hasher {
  readonly hash: (chunk: Chunk) => Effect.Effect<Buffer, WorkerFailed>
  /** Touches every `step` bytes of shared memory there (`hashRequest.touchPages`): a digest's own threads only. */
  readonly touch?: ((bytes: Uint8Array, step: number) => Effect.Effect<void, WorkerFailed>) | undefined
  /** A hasher's own worker thread, and its failure once it threw or exited (for tests). */
  readonly thread?: WorkerThreads.Worker | undefined
  readonly failed?: Deferred.Deferred<never, WorkerFailed> | undefined
}

/**
 * Starts a thread on the worker module beside this one: `digestWorker.js`, compiled (the library in `dist/`,
 * and the bundled command, whose build puts it beside the bundle), or, when this module runs from its
 * TypeScript source (tests, `npm run multifd`), `digestWorkerSource.mjs`, which loads `digestWorker.ts`
 * through tsx (a worker thread does not inherit its parent's TypeScript loader).
 */
const startThread = (workerData: DigestWorker.WorkerData): WorkerThreads.Worker =>
  new WorkerThreads.Worker(
    new URL(import.meta.url.endsWith(".ts") ? "./digestWorkerSource.mjs" : "./digestWorker.js", import.meta.url),
    { workerData }
  )

let requests = 0

/**
 * How long a hashing thread may leave a request unanswered before it is taken for hung: generous (a 64 MiB chunk
 * takes tens of milliseconds, a second on a loaded machine), as a bound must not trip on a slow one.
 */
const ANSWER_TIMEOUT = Duration.seconds(30)

/** The request for a chunk's full blocks (in place when it lies in WebAssembly memory), with a fresh id. */
export const requestFor = (chunk: Chunk): DigestWorker.Request => {
  const id = ++requests
  const memory = memoryOf(chunk.bytes)
  const blocks = Xxh3.fullBlocks(chunk.bytes.length)
  return memory ? { id, memory, offset: chunk.bytes.byteOffset, blocks } : { id, bytes: chunk.bytes, blocks }
}

/**
 * A hashing thread of its own, terminated when the scope closes. It is watched from its start to its end: an
 * exception in it or its exit fails the chunk it hashes (or the next one, if idle). Every request has its own
 * id: the answer to a request whose digest was interrupted may still come, and is not taken for the next one.
 */
const worker: Effect.Effect<Hasher, never, Scope.Scope> = Effect.map(
  Effect.acquireRelease(
    Effect.gen(function*() {
      const failed = yield* Deferred.make<never, WorkerFailed>()
      const thread = startThread({ module: Xxh3.module(), scratch: SLICE })
      const fail = (reason: string) => Deferred.unsafeDone(failed, Exit.fail(new WorkerFailed({ reason })))
      const onError = (error: Error) => fail(`failed: ${error.message}`)
      const onExit = (code: number) => fail(`exited (code ${code})`)
      thread.on("error", onError).on("exit", onExit)
      return { thread, failed, fail, unwatch: () => thread.off("error", onError).off("exit", onExit) }
    }),
    ({ failed, thread, unwatch }) =>
      Effect.promise(() => {
        unwatch()
        // a digest that asks it after its scope closed (a digester kept past it) fails, rather than wait for ever for
        // the answer of a thread that is gone
        Deferred.unsafeDone(failed, Exit.fail(new WorkerFailed({ reason: "was stopped: the scope that started it has closed" })))
        return thread.terminate()
      })
  ),
  ({ fail, failed, thread }): Hasher => {
    /**
     * The answer to `request`, or the thread's failure; an interrupted request's late answer is passed over. The
     * race runs interruptible in a fiber of its own (`ownFibers`): asked uninterruptibly (a digest or a prefault in
     * a finalizer, a store step's commit, `Effect.uninterruptible`), the failure that loses inherited that and never
     * came, and the race waited for it for ever; and the fiber's own, as no child's, is not cut short by a second
     * interruption of its caller.
     */
    const ask = (request: DigestWorker.Request) =>
      ownFibers(Effect.raceFirst(
        Deferred.await(failed),
        Effect.async<DigestWorker.Answer>((resume) => {
          const onMessage = (answer: DigestWorker.Answer) => {
            if (answer.id !== request.id) return
            thread.off("message", onMessage)
            resume(Effect.succeed(answer))
          }
          thread.on("message", onMessage)
          thread.postMessage(request)
          return Effect.sync(() => thread.off("message", onMessage))
        }).pipe(
          // a thread held up (a loop, a long synchronous task) never answers: the digest, and a migration hashing
          // (its Hashing heartbeats keeping the peer waiting), waited for ever. Unanswered after ANSWER_TIMEOUT it
          // is taken for failed (a later request fails at once), and terminated as its scope closes
          Effect.timeout(ANSWER_TIMEOUT),
          Effect.catchTag("TimeoutException", () =>
            Effect.zipRight(
              Effect.sync(() => fail(`stopped answering: a chunk had no answer after ${Duration.format(ANSWER_TIMEOUT)}`)),
              Deferred.await(failed)
            ))
        )
      ))
    return {
      thread,
      failed,
      hash: (chunk) =>
        Effect.suspend(() =>
          Effect.map(ask(requestFor(chunk)), (answer) => Xxh3.finish(answer.accumulators, chunk.bytes))
        ),
      touch: (bytes, step) =>
        Effect.suspend(() =>
          ask({
            id: ++requests,
            touch: bytes.buffer as SharedArrayBuffer,
            offset: bytes.byteOffset,
            length: bytes.length,
            step
          })
        )
    }
  }
)

/** Hashers ready for the digests that use them (a thread takes tens of milliseconds to start). */
export interface Pool {
  readonly size: number
  readonly idle: Queue.Queue<Hasher>
}

/** Starts `threads` hashing threads (by default one per core but one), terminated when the scope closes. */
export const pool = (threads: number = Os.availableParallelism() - 1): Effect.Effect<Pool, never, Scope.Scope> =>
  Effect.flatMap(Effect.forEach(Array.from({ length: threads }), () => worker), poolOf)

/** A pool of the given hashers (hashers on other threads than a digest's own: `threads/hashPool`). */
export const poolOf = (hashers: ReadonlyArray<Hasher>): Effect.Effect<Pool> =>
  Effect.gen(function*() {
    const idle = yield* Queue.unbounded<Hasher>()
    yield* Queue.offerAll(idle, hashers)
    return { size: hashers.length, idle }
  })

/** A hasher of the pool if one is idle (a concurrent digest may have them all), given back with the scope. */
const borrow = (from: Pool) =>
  Effect.acquireRelease(
    Queue.poll(from.idle),
    (w) => Option.isSome(w) ? Queue.offer(from.idle, w.value) : Effect.void
  )

/** This thread's instances: one per guest memory, and one on a scratch memory for everything else. */
const instances = new WeakMap<Xxh3.WasmMemory, Xxh3.Exports>()
let scratch: { readonly view: Uint8Array; readonly exports: Xxh3.Exports } | undefined

const instanceFor = (memory: Xxh3.WasmMemory): Xxh3.Exports => {
  let exports = instances.get(memory)
  if (exports === undefined) {
    exports = Xxh3.instantiate(memory)
    instances.set(memory, exports)
  }
  return exports
}

/** Copies `bytes` (at most a slice) to the start of the scratch memory; its instance reads them there. */
const copyToScratch = (bytes: Uint8Array): Xxh3.Exports => {
  if (scratch === undefined) {
    const pages = SLICE / Xxh3.WASM_PAGE
    const memory = new Xxh3.Wasm.Memory({ initial: pages, maximum: pages, shared: true })
    scratch = { view: new Uint8Array(memory.buffer), exports: Xxh3.instantiate(memory) }
  }
  scratch.view.set(bytes)
  return scratch.exports
}

/**
 * Hashes a chunk on this thread, a slice at a time, yielding between slices (interruptible, I/O goes on).
 * The accumulators are carried here between slices: instances are shared by every digest in the process.
 */
const hashHere = (chunk: Chunk) =>
  Effect.gen(function*() {
    const memory = memoryOf(chunk.bytes)
    const blocks = Xxh3.fullBlocks(chunk.bytes.length)
    let accumulators: ReadonlyArray<bigint> = Xxh3.INITIAL_ACCUMULATORS
    for (let done = 0; done < blocks; done += SLICE_BLOCKS) {
      const n = Math.min(blocks - done, SLICE_BLOCKS)
      const slice = chunk.bytes.subarray(done * Xxh3.BLOCK, (done + n) * Xxh3.BLOCK)
      // in place, or copied into the scratch memory first
      const [exports, at] = memory ? [instanceFor(memory), slice.byteOffset] : [copyToScratch(slice), 0]
      Xxh3.setAccumulators(exports, accumulators)
      exports.blocks(at, n)
      accumulators = Xxh3.accumulators(exports)
      // the event loop's turn (I/O, the workers' answers): a thread hashing slice after slice would hold them
      yield* EventLoop.yieldToEventLoop
    }
    return Xxh3.finish(accumulators, chunk.bytes)
  })

/**
 * Hashes every chunk: this thread takes chunks, and so do the idle workers of `threads` when the memory is
 * shared (a worker would get a copy of other memory).
 */
const hashChunks = (chunks: ReadonlyArray<Chunk>, threads: Pool | undefined): Effect.Effect<ReadonlyArray<Buffer>> => {
  const shared = chunks.every((c) => c.bytes.buffer instanceof SharedArrayBuffer)
  if (threads === undefined || threads.size === 0 || !shared) return Effect.forEach(chunks, hashHere)
  const results = new Array<Buffer>(chunks.length)
  let next = 0
  const take = <E>(hash: (chunk: Chunk) => Effect.Effect<Buffer, E>) =>
    Effect.gen(function*() {
      while (next < chunks.length) {
        const index = next++
        results[index] = yield* hash(chunks[index]!)
      }
    })
  const onWorker = Effect.scoped(Effect.flatMap(
    borrow(threads),
    Option.match({ onNone: () => Effect.void, onSome: (w) => take(w.hash) })
  ))
  return Effect.all([take(hashHere), ...Array.from({ length: threads.size }, () => onWorker)], {
    concurrency: "unbounded",
    discard: true
  }).pipe(Effect.as(results), Effect.orDie)
}

/**
 * Worker threads worth starting for a digest of `regions`: one per core but one, and none when a worker
 * could not read the memory (not shared) or there is a single chunk.
 */
export const threadsFor = (regions: ReadonlyArray<Uint8Array>): number => {
  const chunks = regions.reduce((n, r) => n + Math.ceil(r.length / CHUNK), 0)
  const shared = regions.every((r) => r.buffer instanceof SharedArrayBuffer)
  return shared && chunks > 1 ? Math.min(chunks, Os.availableParallelism()) - 1 : 0
}

/**
 * Digests each of the given memory regions (hex SHA-256 of the chunks' XXH3-128 digests), on the threads
 * of `threads`, or else on threads started for this digest.
 */
export const digestAll = (
  regions: ReadonlyArray<Uint8Array>,
  threads?: Pool | undefined
): Effect.Effect<ReadonlyArray<string>> =>
  Effect.scoped(Effect.gen(function*() {
    const chunks: Array<Chunk & { readonly region: number }> = []
    regions.forEach((bytes, region) => {
      for (let at = 0; at < bytes.length; at += CHUNK) {
        chunks.push({ region, bytes: bytes.subarray(at, Math.min(bytes.length, at + CHUNK)) })
      }
    })
    const digests = yield* hashChunks(chunks, threads ?? (yield* pool(threadsFor(regions))))
    const trees = regions.map(() => Crypto.createHash("sha256"))
    chunks.forEach((c, i) => trees[c.region]!.update(digests[i]!))
    return trees.map((t) => t.digest("hex"))
  }))
