/**
 * The destination's decoding on channel threads (`ChannelThreads` in the destination's context): compressed
 * payloads are read here (the accepted sockets stay on this thread), decompressed and written into shared
 * guest memory by a decode session per channel on the pool. Byte-identical migrations; a payload that does not
 * decode is a `CodecError` naming the channel with none of its pages written; a SYNC is acknowledged only once
 * every packet before it is in memory; a thread that throws, exits or is terminated fails the migration
 * naming the channel, leaks nothing, and is replaced.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as Crypto from "node:crypto"
import * as Path from "node:path"
import { inject } from "vitest"
import * as ChannelThreads from "../src/ChannelThreads.js"
import * as GuestRam from "../src/GuestRam.js"
import { unsafeThreads } from "../src/internal/threads/pool.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as MultifdRecv from "../src/MultifdRecv.js"
import * as PageCodec from "../src/PageCodec.js"
import * as Protocol from "../src/Protocol.js"
import * as Transport from "../src/Transport.js"
import {
  BLOCK,
  BLOCK_PAGES,
  compressedPacket,
  fakeSource,
  PAGE,
  randomPage,
  syncPacket,
  touchedPages
} from "./support/fakeSource.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import * as Faulty from "./support/faultyTransport.js"
import { noHang } from "./support/guards.js"
import { leakFree, nextTurn, SOCKET_KINDS, tempSocketPath } from "./support/handles.js"
import { mixedImage } from "./support/images.js"
import { sameMemory } from "./support/memory.js"

const TIMEOUTS = { connect: "10 seconds", handshake: "10 seconds", peer: "10 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }
const unixAddress = (name: string): Transport.Address => ({ _tag: "Unix", path: tempSocketPath(name) })

/** The bundled threads' module (beside the tests' CLI bundle). */
const MODULE = Path.join(Path.dirname(inject("cliBundle")), "channelWorker.js")

type Pool = ChannelThreads.ChannelThreads["Type"]
type Ram = GuestRam.GuestRam["Type"]

/** 3 MiB + 1 MiB of shared memory, mixed random and zero pages. */
const sourceRam = () =>
  GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(768, 0.6, PAGE) }, { name: "vga.vram", bytes: mixedImage(256, 0.6, PAGE) }] })

/** A destination decoding on `pool` (its listener on `address`, through `transport`), in a fiber of the scope. */
const startDestination = (
  pool: Pool,
  options: Migration.IncomingOptions = {},
  transport: Transport.Transport["Type"] = { connect: Transport.connect, listen: Transport.listen },
  address: Transport.Address = tcp0
) =>
  Effect.gen(function*() {
    const listener = yield* transport.listen(address)
    const fiber = yield* Effect.forkScoped(
      Migration.incoming(listener, { timeouts: TIMEOUTS, ...options }).pipe(
        Effect.provideService(ChannelThreads.ChannelThreads, pool),
        Effect.provide(Logger.replace(Logger.defaultLogger, Logger.none))
      )
    )
    return { fiber, address: listener.address }
  })

/** A migration of `ram` from this thread (no pool on the source). */
const migrate = (ram: Ram, options: Migration.MigrateOptions) =>
  Migration.migrate({ timeouts: TIMEOUTS, ...options }).pipe(
    Effect.provide(Transport.layer),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

/** No session open or hosted, and no socket or zstd context left in any thread. */
const expectThreadsClean = (pool: Pool) =>
  Effect.gen(function*() {
    expect(yield* pool.stats).toMatchObject({ sessions: 0, hosted: 0 })
    const left = (yield* pool.inspect).flatMap((inspection, thread) => [
      ...inspection.resources.filter((kind) => SOCKET_KINDS.has(kind)).map((kind) => `thread ${thread}: ${kind}`),
      ...(inspection.zstdContexts > 0 ? [`thread ${thread}: ${inspection.zstdContexts} zstd context(s)`] : [])
    ])
    expect(left).toEqual([])
  })

const opened = (pool: Pool) => Effect.map(pool.stats, (s) => s.opened)

/** Waits (turn by turn, no timer) until `predicate` holds. */
const until = (predicate: () => boolean, what: string) =>
  noHang(Effect.gen(function*() {
    while (!predicate()) yield* nextTurn
  }), what)

// ---------------------------------------------------------------------------------------------------------

describe("byte-identical", () => {
  for (const compression of ["zlib", "zstd"] as const) {
    it.live(`${compression}: every block arrives as it was; one decode session a channel; nothing left in the threads`, () =>
      leakFree(Effect.gen(function*() {
        const pool = yield* ChannelThreads.make({ maxThreads: 2, module: MODULE })
        const ram = yield* sourceRam()
        const dest = yield* startDestination(pool)
        const stats = yield* noHang(migrate(ram, { address: dest.address, channels: 3, compression }), "migrate")
        const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(sameMemory(received.ram, ram)).toBe(true)
        expect(received.stats.uuid).toBe(stats.uuid)
        expect(yield* opened(pool)).toBe(3)
        yield* expectThreadsClean(pool)
      })))
  }

  it.live("memory the caller gives that is not shared: decoded in this thread, as without a pool", () =>
    leakFree(Effect.gen(function*() {
      const pool = yield* ChannelThreads.make({ maxThreads: 1, module: MODULE })
      const ram = yield* sourceRam()
      const plain = yield* GuestRam.make({
        blocks: ram.blocks.map((block) => ({ name: block.name, bytes: Buffer.alloc(block.bytes.length) }))
      })
      const dest = yield* startDestination(pool, { ram: plain })
      yield* noHang(migrate(ram, { address: dest.address, channels: 2, compression: "zstd" }), "migrate")
      const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(received.ram, ram)).toBe(true)
      expect(yield* opened(pool)).toBe(0)
    })))

  it.live("live, with a writer between rounds (zstd, 2 channels): the digest matches and the last copy wins", () =>
    leakFree(Effect.gen(function*() {
      const pool = yield* ChannelThreads.make({ maxThreads: 2, module: MODULE })
      const ram = yield* sourceRam()
      const P = 100
      const tag = (round: number) => 0x10 + round
      // in the migration's fiber: P at each round's start, Q after every batch (each round leaves something dirty)
      const onProgress = (p: Migration.Progress) =>
        p.phase !== "precopy"
          ? Effect.void
          : p.doneBytes === 0
          ? GuestRam.write(ram, "pc.ram", P * PAGE, Buffer.alloc(PAGE, tag(p.round))).pipe(Effect.orDie)
          : GuestRam.write(ram, "pc.ram", 300 * PAGE + 8, Buffer.alloc(16, p.doneBytes & 255)).pipe(Effect.orDie)
      const dest = yield* startDestination(pool)
      const stats = yield* noHang(
        migrate(ram, {
          address: dest.address,
          channels: 2,
          compression: "zstd",
          onProgress,
          live: { downtimeLimit: 0, maxRounds: 4, onNoConvergence: "switchover" }
        }),
        "migrate"
      )
      const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(stats.rounds).toBeGreaterThanOrEqual(4)
      expect(sameMemory(received.ram, ram)).toBe(true)
      expect(received.ram.blocks[0]!.bytes.subarray(P * PAGE, (P + 1) * PAGE).every((b) => b === tag(3))).toBe(true)
      expect(yield* opened(pool)).toBe(2)
      yield* expectThreadsClean(pool)
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("SYNC ordering", () => {
  for (const compression of ["zlib", "zstd"] as const) {
    it.live(`${compression}: the barrier lets a round go only once every packet before the SYNC is in memory`, () =>
      leakFree(Effect.gen(function*() {
        const pool = yield* ChannelThreads.make({ maxThreads: 1, module: MODULE })
        const ram = yield* GuestRam.make({ blocks: [{ name: BLOCK, size: BLOCK_PAGES * PAGE }] })
        const uuid = Crypto.randomUUID()
        const recv = yield* MultifdRecv.make({ channels: 1, uuid: Protocol.parseUuid(uuid), ram, compression, threads: pool })
        const listener = yield* Transport.listen(tcp0)
        const source = yield* Transport.connect(listener.address)
        const accepted = yield* listener.accept
        // the thread is held up (as by a long task): nothing it is given is written until it is let go
        const release = unsafeThreads(pool)[0]!.hold()
        yield* Effect.addFinalizer(() => Effect.sync(release))
        yield* Effect.forkScoped(recv.adopt(accepted))
        const encoder = yield* PageCodec.encoder(compression, 1)
        // three packets (fewer than the ring holds: the SYNC is read too), then the SYNC
        const packets = Array.from({ length: 3 }, (_, k) =>
          Array.from({ length: 64 }, (_, i) => ({ offset: (k * 64 + i) * PAGE, bytes: randomPage() })))
        const wire: Array<Uint8Array> = [Protocol.encodeInit({ uuid: Protocol.parseUuid(uuid)!, id: 0 })]
        for (const pages of packets) wire.push(...(yield* compressedPacket(compression, encoder, pages)))
        wire.push(syncPacket())
        const total = wire.reduce((n, b) => n + b.length, 0)
        const sync = yield* Effect.fork(recv.sync)
        yield* source.write(wire)
        yield* until(() => accepted.received() === total, "every byte read, the SYNC's too")
        for (let turn = 0; turn < 20; turn++) yield* nextTurn
        expect(sync.unsafePoll(), "the barrier passed before the packets were in memory").toBeNull()
        expect(touchedPages(ram)).toEqual([])
        release()
        yield* noHang(Fiber.join(sync), "the barrier")
        // at once: every packet before the SYNC is in memory
        const memory = ram.block(BLOCK)!.bytes
        for (const p of packets.flat()) {
          expect(memory.subarray(p.offset, p.offset + PAGE).equals(p.bytes), `page ${p.offset / PAGE}`).toBe(true)
        }
        expect(yield* opened(pool)).toBe(1)
      })))
  }
})

// ---------------------------------------------------------------------------------------------------------

describe("a payload that does not decode", () => {
  for (const compression of ["zlib", "zstd"] as const) {
    for (const path of ["read callback", "fiber"] as const) {
      it.live(`${compression}, read in the ${path}: a CodecError naming the channel; none of its pages, nothing after it`, () =>
        leakFree(Effect.gen(function*() {
          const pool = yield* ChannelThreads.make({ maxThreads: 1, module: MODULE })
          const faulty = yield* Faulty.make({ noReadChain: path === "fiber" })
          const ram = yield* GuestRam.make({ blocks: [{ name: BLOCK, size: BLOCK_PAGES * PAGE }] })
          const memory = ram.block(BLOCK)!.bytes
          memory.fill(0x55, 20 * PAGE, 22 * PAGE) // zero pages of the bad packet: must stay as they are
          const dest = yield* startDestination(pool, { ram }, faulty.transport, unixAddress(`bad-${compression}`))
          const src = yield* fakeSource(dest.address, 1, compression)
          const channel = yield* src.channel(0)
          const encoder = yield* PageCodec.encoder(compression, 1)
          const pages = [0, 1, 2, 3].map((p) => ({ offset: p * PAGE, bytes: randomPage() }))
          const more = [6, 8].map((p) => ({ offset: p * PAGE, bytes: randomPage() }))
          yield* channel.write(yield* compressedPacket(compression, encoder, pages))
          yield* channel.write(yield* compressedPacket(compression, encoder, more, [20 * PAGE, 21 * PAGE], Buffer.alloc(64, 0xff)))
          yield* channel.write(yield* compressedPacket(compression, encoder, [], [30 * PAGE]))
          const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
          expect(error).toMatchObject({ _tag: "CodecError", reason: "Corrupt", channel: 0 })
          expect(error.message.startsWith("multifd channel 0: bad payload: ")).toBe(true)
          expectOneLine(error)
          for (const p of pages) expect(memory.subarray(p.offset, p.offset + PAGE).equals(p.bytes)).toBe(true)
          expect(touchedPages(ram)).toEqual([0, 1, 2, 3, 20, 21])
          expect(memory.subarray(20 * PAGE, 22 * PAGE).every((b) => b === 0x55)).toBe(true)
          expect(yield* opened(pool)).toBe(1)
          yield* expectThreadsClean(pool)
        })))
    }
  }
})

// ---------------------------------------------------------------------------------------------------------

describe("a decode thread that fails mid-transfer", () => {
  type Thread = ReturnType<typeof unsafeThreads>[number]
  const faults = [
    { name: "throws", fault: (t: Thread) => t.fault("throw"), detail: "its thread failed: fault injected by a test" },
    { name: "exits", fault: (t: Thread) => t.fault("exit", 7), detail: "its thread exited (code 7)" },
    { name: "is terminated from outside", fault: (t: Thread) => void t.worker.terminate(), detail: "its thread exited (code 1)" }
  ]
  for (const { detail, fault, name } of faults) {
    it.live(`${name}: the migration fails naming the channel; nothing leaks; the pool replaces the thread`, () =>
      leakFree(Effect.gen(function*() {
        const before = ChannelThreads.liveThreads()
        yield* Effect.scoped(Effect.gen(function*() {
          const pool = yield* ChannelThreads.make({ maxThreads: 1, module: MODULE })
          const ram = yield* GuestRam.make({ blocks: [{ name: BLOCK, size: BLOCK_PAGES * PAGE }] })
          const memory = ram.block(BLOCK)!.bytes
          const dest = yield* startDestination(pool, { ram })
          const src = yield* fakeSource(dest.address, 2, "zstd")
          const encoder = yield* PageCodec.encoder("zstd", 1)
          yield* src.channel(0)
          const channel = yield* src.channel(1)
          const page = randomPage()
          yield* channel.write(yield* compressedPacket("zstd", encoder, [{ offset: 5 * PAGE, bytes: page }]))
          // the thread wrote the first packet: the transfer is under way
          yield* until(() => memory.subarray(5 * PAGE, 6 * PAGE).equals(page), "the first packet in memory")
          fault(unsafeThreads(pool)[0]!)
          const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
          expect(error).toBeInstanceOf(MigrationError.ChannelError)
          expect(error.message).toMatch(new RegExp(`^multifd channel [01]: ${detail.replace(/[()]/g, "\\$&")}$`))
          expect((error as MigrationError.ChannelError).cause._tag).toBe("ThreadError")
          expectOneLine(error)
          expect(yield* pool.stats).toMatchObject({ threads: 0, sessions: 0 })
          expect(ChannelThreads.liveThreads()).toBe(before)
          // the next migration gets a new thread in its place
          const ram2 = yield* sourceRam()
          const again = yield* startDestination(pool)
          yield* noHang(migrate(ram2, { address: again.address, channels: 2, compression: "zstd" }), "migrate")
          expect(sameMemory((yield* noHang(Fiber.join(again.fiber), "incoming")).ram, ram2)).toBe(true)
          expect(yield* pool.stats).toMatchObject({ threads: 1, sessions: 0, replaced: 1 })
          yield* expectThreadsClean(pool)
        }))
        expect(ChannelThreads.liveThreads()).toBe(before)
      })))
  }
})

