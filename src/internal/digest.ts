/**
 * Digests of guest memory: SHA-256 over the XXH3-128 of each 64 MiB chunk (XXH3 from `hash-wasm`, several
 * GiB/s a core where SHA-256 manages one: the digest is checked while a migration is paused). Memory backed
 * by a `SharedArrayBuffer` is hashed by worker threads and the calling thread in parallel (without copying);
 * other memory on the calling thread alone. The calling thread yields every 4 MiB.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as HashWasm from "hash-wasm"
import * as Crypto from "node:crypto"
import * as Module from "node:module"
import * as Os from "node:os"
import * as WorkerThreads from "node:worker_threads"

/** Chunk size of the digest tree. */
export const CHUNK = 64 * 1024 * 1024

const workerSource = `
const { parentPort, workerData } = require("node:worker_threads")
const ready = require(workerData.hashWasm).createXXHash128()
parentPort.on("message", (m) => {
  ready.then((hasher) => {
    hasher.init()
    hasher.update(new Uint8Array(m.buffer, m.offset, m.length))
    parentPort.postMessage(hasher.digest("binary"))
  })
})
`

/** Where the workers load hash-wasm from (an eval'd worker resolves modules from the working directory). */
const hashWasmPath = Module.createRequire(import.meta.url).resolve("hash-wasm")

interface Chunk {
  readonly bytes: Uint8Array
}

/** A hashing worker thread, terminated when the scope closes. */
const worker = Effect.acquireRelease(
  Effect.sync(() => new WorkerThreads.Worker(workerSource, { eval: true, workerData: { hashWasm: hashWasmPath } })),
  (w) => Effect.promise(() => w.terminate())
)

const hashOn = (w: WorkerThreads.Worker, chunk: Chunk) =>
  Effect.async<Buffer, Error>((resume) => {
    const onMessage = (digest: Uint8Array) => {
      w.off("error", onError)
      resume(Effect.succeed(Buffer.from(digest)))
    }
    const onError = (error: Error) => {
      w.off("message", onMessage)
      resume(Effect.fail(error))
    }
    w.once("message", onMessage)
    w.once("error", onError)
    w.postMessage({ buffer: chunk.bytes.buffer, offset: chunk.bytes.byteOffset, length: chunk.bytes.byteLength })
    return Effect.sync(() => {
      w.off("message", onMessage)
      w.off("error", onError)
    })
  })

/** Bytes hashed on the calling thread between two yields. */
const SLICE = 4 * 1024 * 1024

/** Hashes a chunk on this thread, a slice at a time, yielding between slices (interruptible, I/O goes on). */
const hashHere = (chunk: Chunk) =>
  Effect.flatMap(Effect.promise(() => HashWasm.createXXHash128()), (hasher) =>
    Effect.gen(function*() {
      hasher.init()
      for (let at = 0; at < chunk.bytes.length; at += SLICE) {
        hasher.update(chunk.bytes.subarray(at, Math.min(chunk.bytes.length, at + SLICE)))
        yield* Effect.yieldNow()
      }
      return Buffer.from(hasher.digest("binary"))
    }))

/**
 * Hashes every chunk: when all the memory is shared, one worker thread per core but one, and this thread
 * takes chunks too (one isolate fewer: worker threads cost memory, about 14 MiB each).
 */
const hashChunks = (chunks: ReadonlyArray<Chunk>): Effect.Effect<ReadonlyArray<Buffer>> => {
  const shared = chunks.every((c) => c.bytes.buffer instanceof SharedArrayBuffer)
  const workers = Math.min(chunks.length, Os.availableParallelism()) - 1
  if (!shared || workers < 1) return Effect.forEach(chunks, hashHere)
  return Effect.scoped(Effect.gen(function*() {
    const results = new Array<Buffer>(chunks.length)
    let next = 0
    const take = <E>(hash: (chunk: Chunk) => Effect.Effect<Buffer, E>) =>
      Effect.gen(function*() {
        while (next < chunks.length) {
          const index = next++
          results[index] = yield* hash(chunks[index]!)
        }
      })
    yield* Effect.all(
      [
        take(hashHere),
        ...Array.from({ length: workers }, () => Effect.flatMap(worker, (w) => take((chunk) => hashOn(w, chunk))))
      ],
      { concurrency: "unbounded", discard: true }
    )
    return results
  })).pipe(Effect.orDie)
}

/** Digests each of the given memory regions (hex SHA-256 of the chunks' XXH3-128 digests). */
export const digestAll = (regions: ReadonlyArray<Uint8Array>): Effect.Effect<ReadonlyArray<string>> =>
  Effect.gen(function*() {
    const chunks: Array<Chunk & { readonly region: number }> = []
    regions.forEach((bytes, region) => {
      for (let at = 0; at < bytes.length; at += CHUNK) {
        chunks.push({ region, bytes: bytes.subarray(at, Math.min(bytes.length, at + CHUNK)) })
      }
    })
    const digests = yield* hashChunks(chunks)
    const trees = regions.map(() => Crypto.createHash("sha256"))
    chunks.forEach((c, i) => trees[c.region]!.update(digests[i]!))
    return trees.map((t) => t.digest("hex"))
  })
