/**
 * The digest's own XXH3-128 (a WebAssembly SIMD stripe loop assembled from `src/internal/native/xxh3.wat`, short
 * inputs in TypeScript) against hash-wasm's, and every way a digest reaches memory: in place in memory from
 * `GuestRam.allocate`, through a copy from other shared memory or from plain memory, on this thread and on
 * worker threads, a pool of threads shared by concurrent and interrupted digests, and threads that fail.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Option from "effect/Option"
import * as Queue from "effect/Queue"
import * as TestClock from "effect/TestClock"
import * as HashWasm from "hash-wasm"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import wabtInit from "wabt"
import * as GuestRam from "../src/GuestRam.js"
import * as Digest from "../src/internal/native/digest.js"
import * as Prefault from "../src/internal/native/prefault.js"
import * as Xxh3 from "../src/internal/native/xxh3.js"

const reference = (bytes: Uint8Array): Promise<string> => HashWasm.xxhash128(bytes)

/** The XXH3-128 of `bytes` (a view of `memory`, starting `at` bytes in) computed in place by the module. */
const inPlace = (memory: Xxh3.WasmMemory, bytes: Uint8Array): string => {
  const exports = Xxh3.instantiate(memory)
  Xxh3.setAccumulators(exports, Xxh3.INITIAL_ACCUMULATORS)
  exports.blocks(bytes.byteOffset, Xxh3.fullBlocks(bytes.length))
  return Xxh3.finish(Xxh3.accumulators(exports), bytes).toString("hex")
}

/** A digest as documented: SHA-256 over the XXH3-128 of each 64 MiB chunk. */
const referenceDigest = async (bytes: Uint8Array): Promise<string> => {
  const tree = Crypto.createHash("sha256")
  for (let at = 0; at < bytes.length; at += GuestRam.DIGEST_CHUNK) {
    tree.update(Buffer.from(await reference(bytes.subarray(at, Math.min(bytes.length, at + GuestRam.DIGEST_CHUNK))), "hex"))
  }
  return tree.digest("hex")
}

/** Two chunks and a bit: the digest spreads over this thread and a worker. */
const TWO_CHUNKS = GuestRam.DIGEST_CHUNK + 5 * 4096

const randomInto = <B extends Uint8Array>(bytes: B): B => {
  for (let at = 0; at < bytes.length; at += 65536) Crypto.randomFillSync(bytes.subarray(at, Math.min(bytes.length, at + 65536)))
  return bytes
}

describe("XXH3-128 (internal/native/xxh3)", () => {
  it.effect("embeds the module that xxh3.wat assembles to, byte for byte (npm run build:wasm regenerates it)", () =>
    Effect.promise(async () => {
      const features = { simd: true, threads: true }
      const text = Fs.readFileSync(new URL("../src/internal/native/xxh3.wat", import.meta.url), "utf8")
      const parsed = (await wabtInit()).parseWat("xxh3.wat", text, features)
      try {
        expect(Buffer.from(Xxh3.moduleBytes).equals(Buffer.from(parsed.toBinary({}).buffer))).toBe(true)
      } finally {
        parsed.destroy()
      }
    }))

  it.effect("matches hash-wasm at every length from 0 to 256 (the short paths, then the stripe loop)", () =>
    Effect.promise(async () => {
      const memory = new Xxh3.Wasm.Memory({ initial: 1, maximum: 1, shared: true })
      const all = new Uint8Array(memory.buffer)
      for (let length = 0; length <= 256; length++) {
        for (let round = 0; round < 4; round++) {
          // random contents at an odd offset, and the two fills where a byte mix-up would cancel out
          const bytes = all.subarray(7, 7 + length)
          if (round < 2) randomInto(bytes)
          else bytes.fill(round === 2 ? 0 : 0xff)
          expect(inPlace(memory, bytes), `length ${length}, round ${round}`).toBe(await reference(bytes))
        }
        // from plain memory too (the short paths read no WebAssembly memory)
        const plain = randomInto(new Uint8Array(length))
        expect(Xxh3.finish(Xxh3.INITIAL_ACCUMULATORS, plain).toString("hex")).toBe(await reference(plain))
      }
    }))

  it.effect("matches hash-wasm at every length class of the long path, block and stripe boundaries included", () =>
    Effect.promise(async () => {
      const lengths = [241, 255, 256, 511, 512, 1023, 1024, 1025, 1087, 1088, 1089, 2047, 2048, 2049, 4096, 16391, 65536, 1048576 + 64]
      const memory = new Xxh3.Wasm.Memory({ initial: 32, maximum: 32, shared: true })
      const all = new Uint8Array(memory.buffer)
      for (const length of lengths) {
        // at offset 0 and at an odd offset: the loop reads unaligned
        for (const at of [0, 4099]) {
          const bytes = randomInto(all.subarray(at, at + length))
          expect(inPlace(memory, bytes), `length ${length} at ${at}`).toBe(await reference(bytes))
        }
      }
      // inputs of one repeated byte, where a lane mix-up would cancel out
      for (const fill of [0, 0xff]) {
        const bytes = all.subarray(0, 3 * 1024 + 17).fill(fill)
        expect(inPlace(memory, bytes)).toBe(await reference(bytes))
      }
    }))

  it("finish takes signed accumulators as WebAssembly hands them out", () => {
    const bytes = randomInto(new Uint8Array(300))
    const unsigned = Xxh3.INITIAL_ACCUMULATORS.map((a) => a ^ (1n << 63n))
    const signed = unsigned.map((a) => BigInt.asIntN(64, a))
    expect(Xxh3.finish(signed, bytes)).toEqual(Xxh3.finish(unsigned, bytes))
  })
})

describe("memory from GuestRam.allocate", () => {
  it("is zero-filled, shared, exactly the size asked, and read in place by digests", () => {
    for (const size of [4096, 65536 + 4096, 3 * 65536]) {
      const bytes = GuestRam.allocate(size)
      expect(bytes.length).toBe(size)
      expect(bytes.buffer).toBeInstanceOf(SharedArrayBuffer)
      expect(bytes.every((b) => b === 0)).toBe(true)
      expect(Digest.memoryOf(bytes)).toBeDefined()
      expect(Digest.memoryOf(bytes.subarray(4096))).toBe(Digest.memoryOf(bytes))
    }
    expect(Digest.memoryOf(Buffer.from(new SharedArrayBuffer(4096)))).toBeUndefined()
    expect(Digest.memoryOf(new Uint8Array(4096))).toBeUndefined()
  })
})

describe("GuestRam.digest reaches memory every way and agrees", () => {
  it.effect("in place, from other shared memory, from plain memory, and from a view at an offset", () =>
    Effect.gen(function*() {
      const source = randomInto(new Uint8Array(TWO_CHUNKS))
      const expected = yield* Effect.promise(() => referenceDigest(source))
      const allocated = GuestRam.allocate(TWO_CHUNKS)
      allocated.set(source)
      const shared = Buffer.from(new SharedArrayBuffer(TWO_CHUNKS))
      shared.set(source)
      const plain = Uint8Array.from(source)
      // a block that starts 3 pages into allocated memory: its chunks are not at offset 0
      const larger = GuestRam.allocate(TWO_CHUNKS + 3 * 4096)
      larger.set(source, 3 * 4096)
      const offset = larger.subarray(3 * 4096)
      for (const bytes of [allocated, shared, plain, offset]) {
        const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes }] })
        expect((yield* GuestRam.digest(ram))[0]!.digest).toBe(expected)
      }
    }))

  it.effect("a digester's threads serve concurrent digests, and one interrupted mid-way leaves no stale answer", () =>
    Effect.gen(function*() {
      const bytes = randomInto(GuestRam.allocate(4 * GuestRam.DIGEST_CHUNK))
      const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes }] })
      const expected = yield* Effect.promise(() => referenceDigest(bytes))
      const digest = yield* GuestRam.digester(ram)
      const [a, b] = yield* Effect.all([digest, digest], { concurrency: "unbounded" })
      expect(a![0]!.digest).toBe(expected)
      expect(b![0]!.digest).toBe(expected)
      // interrupted once the threads are at work: their answers to it must not be taken for the next digest
      const interrupted = yield* Effect.fork(digest)
      yield* Effect.yieldNow()
      yield* Fiber.interrupt(interrupted)
      bytes[bytes.length - 1] = bytes[bytes.length - 1]! ^ 1
      const changed = yield* digest
      expect(changed[0]!.digest).toBe(yield* Effect.promise(() => referenceDigest(bytes)))
    }).pipe(Effect.scoped))

  it.live("hashing on this thread lets the event loop run between slices (socket reads, workers' answers)", () =>
    Effect.gen(function*() {
      // plain memory: hashed on this thread only, 16 slices
      const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: new Uint8Array(GuestRam.DIGEST_CHUNK) }] })
      const digest = yield* Effect.fork(GuestRam.digest(ram))
      const stillHashing = yield* Effect.async<boolean>((resume) => {
        setImmediate(() => resume(Effect.succeed(digest.unsafePoll() === null)))
      })
      expect(stillHashing).toBe(true)
      yield* Fiber.join(digest)
    }))
})

describe("digest worker threads (internal/native/digestWorker)", () => {
  /** Memory of three chunks: this thread takes one, and the workers of a pool of two the others. */
  const threeChunks = () => randomInto(GuestRam.allocate(2 * GuestRam.DIGEST_CHUNK + 4096))

  /** The defect a digest died of, which must be a worker's failure. */
  const failureOf = <A>(exit: Exit.Exit<A>) => {
    expect(Exit.isFailure(exit)).toBe(true)
    const defect = Exit.isFailure(exit) ? Cause.dieOption(exit.cause) : Option.none()
    expect(Option.isSome(defect) && defect.value).toBeInstanceOf(Digest.WorkerFailed)
    return Option.getOrThrow(defect) as Digest.WorkerFailed
  }

  it.effect("a pool's threads hash three chunks right, and end when the pool's scope closes", () =>
    Effect.gen(function*() {
      const bytes = threeChunks()
      const expected = yield* Effect.promise(() => referenceDigest(bytes))
      const threads = yield* Effect.scoped(Effect.gen(function*() {
        const pool = yield* Digest.pool(2)
        expect(yield* Digest.digestAll([bytes], pool)).toEqual([expected])
        const workers = Array.from(yield* Queue.takeAll(pool.idle))
        yield* Queue.offerAll(pool.idle, workers)
        expect(workers.map((w) => w.thread!.threadId)).not.toContain(-1)
        return workers.map((w) => w.thread!)
      }))
      expect(threads).toHaveLength(2)
      // a terminated worker's id is -1
      expect(threads.map((t) => t.threadId)).toEqual([-1, -1])
    }))

  it.effect("a thread that throws fails the digest with a clear error (and does not crash this process while idle)", () =>
    Effect.gen(function*() {
      const pool = yield* Digest.pool(1)
      const w = yield* Queue.take(pool.idle)
      // a request the worker cannot read: its message handler throws
      w.thread!.postMessage({ id: 0, bytes: null, blocks: 1 })
      yield* Effect.flip(Deferred.await(w.failed!))
      yield* Queue.offer(pool.idle, w)
      const failure = failureOf(yield* Effect.exit(Digest.digestAll([threeChunks()], pool)))
      expect(failure.message).toMatch(/^digest worker thread failed: .*null/)
    }).pipe(Effect.scoped))

  it.effect("a thread that exits while hashing fails the digest instead of leaving it waiting", () =>
    Effect.gen(function*() {
      const pool = yield* Digest.pool(1)
      const w = yield* Queue.take(pool.idle)
      yield* Queue.offer(pool.idle, w)
      const digest = yield* Effect.fork(Digest.digestAll([threeChunks()], pool))
      // the digest has borrowed the worker: its request is posted
      while ((yield* Queue.size(pool.idle)) > 0) yield* Effect.yieldNow()
      yield* Effect.promise(() => w.thread!.terminate())
      const failure = failureOf(yield* Fiber.await(digest))
      // (terminated before its first instruction, a thread exits with code 0; once running, with 1)
      expect(failure.message).toMatch(/^digest worker thread exited \(code [01]\)$/)
    }).pipe(Effect.scoped))

  /**
   * No time bounded a worker's answer: a thread held up (a loop, a long synchronous task) left the digest waiting
   * for ever, and a migration hashing with it (its Hashing heartbeats keeping the peer waiting). Now a chunk
   * unanswered for 30 s (a 64 MiB chunk takes tens of milliseconds) fails the digest, and the thread is taken for
   * failed: a later digest on it fails at once rather than wait again.
   */
  it.effect("a thread that never answers fails the digest after 30 s, and a later digest on it at once", () =>
    Effect.gen(function*() {
      const pool = yield* Digest.pool(1)
      const w = yield* Queue.take(pool.idle)
      yield* Queue.offer(pool.idle, w)
      // the thread never hears of the request, as a thread held up never answers it
      const posted = yield* Deferred.make<void>()
      w.thread!.postMessage = () => Deferred.unsafeDone(posted, Exit.void)
      const digest = yield* Effect.fork(Digest.digestAll([threeChunks()], pool))
      yield* Deferred.await(posted)
      yield* TestClock.adjust("29 seconds")
      expect(yield* Fiber.poll(digest)).toEqual(Option.none())
      yield* TestClock.adjust("1 second")
      const failure = failureOf(yield* Fiber.await(digest))
      expect(failure.message).toBe("digest worker thread stopped answering: a chunk had no answer after 30s")
      const again = failureOf(yield* Effect.exit(Digest.digestAll([threeChunks()], pool)))
      expect(again.message).toBe(failure.message)
    }).pipe(Effect.scoped))

  it.live("a digest, or a prefault, run uninterruptibly (a finalizer, a store step's commit) completes", () =>
    Effect.gen(function*() {
      const bytes = threeChunks()
      const expected = yield* Effect.promise(() => referenceDigest(bytes))
      const pool = yield* Digest.pool(2)
      /** Its end, awaited in a daemon fiber (an uninterruptible fiber that hung would hold up the test's own end). */
      const ended = <A>(effect: Effect.Effect<A>, what: string) =>
        Effect.flatMap(Effect.forkDaemon(effect), (fiber) =>
          Effect.timeoutFail(Fiber.join(fiber), { duration: "10 seconds", onTimeout: () => new Error(`hung: ${what}`) }))
      // each request raced the thread's answer against the thread's failure: the failure, the loser, inherited
      // the uninterruptibility and never came, and the race waited for it for ever
      expect(yield* ended(Effect.uninterruptible(Digest.digestAll([bytes], pool)), "an uninterruptible digest"))
        .toEqual([expected])
      const fresh = GuestRam.allocate(3 * GuestRam.DIGEST_CHUNK)
      yield* ended(Effect.uninterruptible(Prefault.prefault(fresh, 2)), "an uninterruptible prefault")
    }).pipe(Effect.scoped))
})
