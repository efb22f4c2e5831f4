/**
 * The source's channels on worker threads (`ChannelThreads`, issue 13), over real loopback sockets, real TLS
 * and real threads:
 *
 * - the pool: a thread per core up to `maxThreads`, each ready before the pool is; closing its scope
 *   terminates every thread and waits for each (`liveThreads`); the threads' module from the TypeScript
 *   sources works too (tsx in the thread);
 * - a migration whose channels run in the threads is byte-identical (none, zlib, zstd; PSK and x509 TLS), sends
 *   the same packets as one in this thread, and leaves no session, socket or zstd context in any thread; plain
 *   memory, a wrapped transport or a wrapped upgrade keep the channels in this thread;
 * - lifecycle across threads: closing the scope mid-connect, mid-handshake or mid-transfer closes every session
 *   (its socket destroyed in its thread) before the scope is closed, and leaves nothing; a thread that throws,
 *   exits or is terminated fails the channel set naming the channel, leaks nothing, and the pool replaces it;
 *   a connect refused or a TLS failure in a thread fails naming the channel, with the message of the same
 *   failure in this thread; the first error wins; `established` comes only after the handshake.
 *
 * Most tests share one pool of two threads started on the bundled module that the CLI tests' bundle puts
 * beside the command (built from these sources once per run: a thread that loads the sources through tsx takes
 * seconds to start). Nothing waits on a timer: waits are on Deferreds, fibers, socket events and the threads'
 * answers; `noHang` guards only turn a hang into a failure.
 */
import { describe, expect, it, layer } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import type * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import * as WorkerThreads from "node:worker_threads"
import { fileURLToPath } from "node:url"
import * as Esbuild from "esbuild"
import { inject } from "vitest"
import * as ChannelThreads from "../src/ChannelThreads.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Digest from "../src/internal/native/digest.js"
import * as HashPool from "../src/internal/threads/hashPool.js"
import { unsafeGcTurn, unsafeThreads } from "../src/internal/threads/pool.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as MultifdSend from "../src/MultifdSend.js"
import * as Protocol from "../src/Protocol.js"
import * as Tls from "../src/Tls.js"
import * as Transport from "../src/Transport.js"
import { bundleOptions, commandEntryPoints } from "../scripts/bundle.mjs"
import { expectOneLine, failureOf } from "./support/failures.js"
import * as Faulty from "./support/faultyTransport.js"
import { noHang } from "./support/guards.js"
import { leakFree, nextTurn, SOCKET_KINDS } from "./support/handles.js"
import { resetProxy } from "./support/resetProxy.js"
import { sameMemory } from "./support/memory.js"
import { stalledListener } from "./support/stalledListener.js"
import { loopbackServer } from "./support/tcpServer.js"

// ---------------------------------------------------------------------------------------------------------
// helpers

const PAGE = 4096
const TIMEOUTS = { connect: "10 seconds", handshake: "10 seconds", peer: "10 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

/** The bundled threads' module (beside the tests' CLI bundle). */
const MODULE = Path.join(Path.dirname(inject("cliBundle")), "channelWorker.js")
const POOL: ChannelThreads.Options = { maxThreads: 2, module: MODULE }

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/tls/${name}`, import.meta.url))

/** Shared memory (as `GuestRam.allocate` gives) of `pages` pages, a share of them random, the rest zero. */
const sharedBlock = (pages: number, randomShare = 0.6): Buffer => {
  const bytes = GuestRam.allocate(pages * PAGE)
  for (let p = 0; p < pages; p++) if (Math.random() < randomShare) Crypto.randomFillSync(bytes, p * PAGE, PAGE)
  return bytes
}

/** 3 MiB + 1 MiB of shared memory, mixed random and zero pages. */
const sharedRam = () =>
  GuestRam.make({ blocks: [{ name: "pc.ram", bytes: sharedBlock(768) }, { name: "vga.vram", bytes: sharedBlock(256) }] })

type Ram = GuestRam.GuestRam["Type"]

/** Hash sessions a source on the pool (`POOL`) opens for its digest of `ram`: one per core but one, at most its threads. */
const hashSessions = (ram: Ram) =>
  Math.min(Math.min(POOL.maxThreads!, Os.availableParallelism()), Digest.threadsFor(ram.blocks.map((b) => b.bytes)))

/** A destination listening on loopback, in a fiber of the caller's scope. */
const startDestination = (options: Migration.IncomingOptions = {}) =>
  Effect.gen(function*() {
    const listener = yield* Transport.listen(tcp0)
    const fiber = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, ...options }))
    return { fiber, address: listener.address }
  })

const migrate = (ram: Ram, options: Migration.MigrateOptions, transport = Transport.layer) =>
  Migration.migrate({ timeouts: TIMEOUTS, ...options }).pipe(
    Effect.provide(transport),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

/** A whole migration to a destination of this process; the destination's result. */
const migrateOnce = (ram: Ram, options: Partial<Migration.MigrateOptions> = {}, server?: Transport.Upgrade<Tls.TlsError>) =>
  Effect.gen(function*() {
    const dest = yield* startDestination({ upgrade: server })
    const stats = yield* noHang(migrate(ram, { address: dest.address, channels: 4, ...options }), "migrate")
    const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
    return { stats, received }
  })

/** What the pool's threads hold that a finished session must not have left: sockets, zstd contexts. */
const leftInThreads = Effect.gen(function*() {
  const pool = yield* ChannelThreads.ChannelThreads
  const inspections = yield* pool.inspect
  return inspections.flatMap((inspection, thread) => [
    ...inspection.resources.filter((kind) => SOCKET_KINDS.has(kind)).map((kind) => `thread ${thread}: ${kind}`),
    ...(inspection.zstdContexts > 0 ? [`thread ${thread}: ${inspection.zstdContexts} zstd context(s)`] : [])
  ])
})

/**
 * No session open, none left in any thread (as the threads count them, in shared memory: read at once, before
 * anything lets a thread catch up), and nothing left there.
 */
const expectThreadsClean = Effect.gen(function*() {
  const pool = yield* ChannelThreads.ChannelThreads
  expect(yield* pool.stats).toMatchObject({ sessions: 0, hosted: 0 })
  expect(yield* leftInThreads).toEqual([])
})

/** Sessions opened in the pool so far. */
const opened = Effect.map(Effect.flatMap(ChannelThreads.ChannelThreads, (pool) => pool.stats), (s) => s.opened)

/** Waits until `predicate` holds of what the threads say (each try one round trip to every thread). */
const untilThreads = (predicate: (inspections: ReadonlyArray<ChannelThreads.Inspection>) => boolean, what: string) =>
  Effect.gen(function*() {
    const pool = yield* ChannelThreads.ChannelThreads
    while (!predicate(yield* pool.inspect)) yield* nextTurn
  }).pipe((self) => noHang(self, what))

const count = (inspections: ReadonlyArray<ChannelThreads.Inspection>, kinds: ReadonlyArray<string>) =>
  inspections.reduce((n, i) => n + i.resources.filter((kind) => kinds.includes(kind)).length, 0)

/** A source channel set on the pool, made in a scope of its own (closed by the test). */
const channelSet = (address: Transport.Address, options: Partial<MultifdSend.Config> = {}) =>
  Effect.gen(function*() {
    const threads = yield* ChannelThreads.ChannelThreads
    const scope = yield* Scope.make()
    const send = yield* MultifdSend.make({
      address,
      channels: 2,
      uuid: Protocol.parseUuid(Crypto.randomUUID())!,
      pageSize: PAGE,
      compression: "none",
      zeroPage: "multifd",
      connectTimeout: "30 seconds",
      threads,
      ...options
    }).pipe(Scope.extend(scope), Effect.provide(Transport.layer))
    return { send, scope }
  })

/**
 * A peer below the migration: accepts, reads until it has `readBytes` bytes of a connection, then stops
 * reading (the sender's writes back up). `reached` completes once `connections` connections have each given
 * that many; `closed` reads them again and completes once every connection it accepted has closed (a paused
 * socket does not see its peer's end).
 */
const silentPeer = (connections: number, readBytes: number) =>
  Effect.gen(function*() {
    const reached = yield* Deferred.make<void>()
    const sockets: Array<Net.Socket> = []
    const closedAll = yield* Deferred.make<void>()
    let full = 0
    let open = 0
    const server = yield* loopbackServer((socket) => {
      sockets.push(socket)
      open++
      let got = 0
      const onData = (chunk: Buffer) => {
        got += chunk.length
        if (got < readBytes) return
        socket.off("data", onData)
        socket.pause()
        if (++full === connections) Deferred.unsafeDone(reached, Exit.void)
      }
      socket.on("data", onData)
      socket.once("close", () => {
        if (--open === 0 && sockets.length >= connections) Deferred.unsafeDone(closedAll, Exit.void)
      })
    })
    return {
      address: server.address,
      reached: Deferred.await(reached),
      closed: Effect.zipRight(
        Effect.sync(() => {
          for (const socket of sockets) socket.resume()
        }),
        Deferred.await(closedAll)
      )
    }
  })

/** The set's failure, once it failed. */
const failureOfSet = (send: MultifdSend.MultifdSend["Type"]) =>
  Effect.map(noHang(Effect.exit(send.failure), "the channel set's failure"), failureOf)

// ---------------------------------------------------------------------------------------------------------

describe("the pool", () => {
  it.live("starts a thread per core up to maxThreads, each ready; closing its scope terminates and awaits every one", () =>
    Effect.gen(function*() {
      const before = ChannelThreads.liveThreads()
      const scope = yield* Scope.make()
      const pool = yield* Scope.extend(ChannelThreads.make(POOL), scope)
      const size = Math.min(2, Os.availableParallelism())
      expect(pool.size).toBe(size)
      expect(yield* pool.stats).toEqual({ threads: size, sessions: 0, hosted: 0, opened: 0, replaced: 0 })
      expect(ChannelThreads.liveThreads()).toBe(before + size)
      // every thread answers (it is ready) and holds no socket
      const inspections = yield* pool.inspect
      expect(inspections).toHaveLength(size)
      for (const inspection of inspections) expect(inspection.resources.filter((k) => SOCKET_KINDS.has(k))).toEqual([])
      yield* Scope.close(scope, Exit.void)
      expect(ChannelThreads.liveThreads()).toBe(before)
    }))

  it.live("a thread whose collection after its last session finds --expose-gc turned off (by another thread) lives on", () =>
    Effect.gen(function*() {
      const pool = yield* ChannelThreads.make(POOL)
      // V8's flags are the process's: a thread turning --expose-gc off over and over, as another thread taking
      // its own gc (the pool's other threads, once, each) turns it off after it
      const stop = new Int32Array(new SharedArrayBuffer(4))
      yield* Effect.acquireRelease(
        Effect.sync(() =>
          new WorkerThreads.Worker(
            `const { workerData } = require("node:worker_threads")
            while (Atomics.load(workerData.stop, 0) === 0) require("node:v8").setFlagsFromString("--no-expose-gc")`,
            { eval: true, workerData: { stop } }
          )
        ),
        (worker) => Effect.promise(() => (Atomics.store(stop, 0, 1), worker.terminate()))
      )
      for (let i = 0; i < 3; i++) {
        const ram = yield* sharedRam()
        const { received } = yield* Effect.scoped(migrateOnce(ram, { channels: 2 })).pipe(
          Effect.provideService(ChannelThreads.ChannelThreads, pool)
        )
        expect(sameMemory(received.ram, ram)).toBe(true)
        // the threads, idle, collect on their next turn: a few round trips to each later, each has (or died)
        for (let turn = 0; turn < 5; turn++) yield* noHang(pool.inspect, "the threads' answers")
      }
      // a thread that took gc while the flag was off had none: it died of "gc is not defined", and was replaced
      expect(yield* pool.stats).toMatchObject({ threads: pool.size, replaced: 0 })
    }).pipe(Effect.scoped))

  it.live("a thread terminated inside its turn at --expose-gc (its pool closed as it collected) holds up no other thread: the others skip their collection meanwhile, and its exit hands the turn back", () =>
    Effect.gen(function*() {
      const turn = unsafeGcTurn()
      yield* Effect.addFinalizer(() => Effect.sync(() => Atomics.store(turn, 0, 0)))
      // a thread of another pool, terminated while it had the turn (the pool's close does not wait for a
      // collection): it never handed the turn back, and the next thread to collect waited for it for ever
      const otherScope = yield* Scope.make()
      const other = yield* ChannelThreads.make({ ...POOL, maxThreads: 1 }).pipe(Scope.extend(otherScope))
      const holder = unsafeThreads(other)[0]!.worker
      Atomics.store(turn, 0, holder.threadId)
      const pool = yield* ChannelThreads.make(POOL)
      for (let i = 0; i < 2; i++) {
        const ram = yield* sharedRam()
        const { received } = yield* Effect.scoped(migrateOnce(ram, { channels: 2 })).pipe(
          Effect.provideService(ChannelThreads.ChannelThreads, pool)
        )
        expect(sameMemory(received.ram, ram)).toBe(true)
        // idle, each thread collects (or skips it) on its next turn: it still answers
        for (let k = 0; k < 5; k++) yield* noHang(pool.inspect, "the threads' answers")
      }
      expect(yield* pool.stats).toMatchObject({ threads: pool.size, replaced: 0 })
      // the holder's exit (its pool's close terminates it) gives the turn back
      yield* Scope.close(otherScope, Exit.void)
      expect(Atomics.load(turn, 0)).toBe(0)
    }).pipe(Effect.scoped))

  it.live("inspect answers in a finalizer (uninterruptibly), as a leak check at a scope's end asks it", () =>
    Effect.gen(function*() {
      const pool = yield* ChannelThreads.make(POOL)
      // a race whose loser (the thread's failure, which does not come) was uninterruptible waited for it for ever
      const inspections = yield* noHang(Effect.uninterruptible(pool.inspect), "inspect, uninterruptibly")
      expect(inspections).toHaveLength(pool.size)
      const inFinalizer = yield* Deferred.make<number>()
      yield* noHang(
        Effect.scoped(Effect.addFinalizer(() =>
          Effect.flatMap(Effect.orDie(pool.inspect), (i) => Deferred.succeed(inFinalizer, i.length))
        )),
        "a scope whose finalizer inspects the pool"
      )
      expect(yield* Deferred.await(inFinalizer)).toBe(pool.size)
    }).pipe(Effect.scoped))

  it.live("inspect asked uninterruptibly, its fiber interrupted while a thread has not answered yet: it answers", () =>
    Effect.gen(function*() {
      const pool = yield* ChannelThreads.make({ ...POOL, maxThreads: 1 })
      // the thread holds its answer until the interruption has been sent
      const release = unsafeThreads(pool)[0]!.hold()
      const asking = yield* Deferred.make<void>()
      const fiber = yield* Effect.uninterruptible(
        Effect.forkDaemon(Effect.zipRight(Deferred.succeed(asking, undefined), Effect.exit(pool.inspect)))
      )
      yield* Deferred.await(asking)
      for (let turn = 0; turn < 3; turn++) yield* nextTurn
      // the race's sides were children of the asking fiber, interruptible: the interruption reached them at once,
      // and the leak check a finalizer ran ended interrupted, with no answer
      fiber.unsafeInterruptAsFork(fiber.id())
      release()
      const answered = yield* noHang(Fiber.join(fiber), "inspect, interrupted")
      expect(Exit.isSuccess(answered) && answered.value).toHaveLength(1)
    }).pipe(Effect.scoped))

  it.live("the bundled thread's module holds neither the Tls module nor effect's Schema (each thread is an isolate of its own)", () =>
    Effect.promise(async () => {
      // an isolate per thread pays for every module it evaluates: Tls's configuration (its schema, effect's
      // Config) and effect's Schema cost each channel thread about 2.5 MiB of the source's peak RSS
      const root = Path.resolve(import.meta.dirname, "..")
      const result = await Esbuild.build({
        ...bundleOptions,
        entryPoints: { channelWorker: commandEntryPoints(root).channelWorker },
        outdir: Path.join(Os.tmpdir(), "multifd-thread-bundle-check"),
        write: false,
        metafile: true
      })
      const kept = Object.values(result.metafile.outputs).flatMap((output) =>
        Object.entries(output.inputs).filter(([, input]) => input.bytesInOutput > 0).map(([file]) => file)
      )
      expect(kept.some((file) => file.endsWith("src/internal/threads/sendSession.ts"))).toBe(true)
      expect(kept.filter((file) => /src\/Tls\.ts$|effect\/dist\/esm\/(Schema|ParseResult|SchemaAST|Config)\.js$/.test(file)))
        .toEqual([])
    }))

  it.live("from the TypeScript sources (tsx in the thread): a migration on the default module", () =>
    leakFree(Effect.gen(function*() {
      const before = ChannelThreads.liveThreads()
      const ram = yield* sharedRam()
      const { received, stats } = yield* migrateOnce(ram, { channels: 2 }).pipe(
        Effect.provide(ChannelThreads.layer({ maxThreads: 1 }))
      )
      expect(sameMemory(received.ram, ram)).toBe(true)
      expect(stats.channels).toBe(2)
      expect(ChannelThreads.liveThreads()).toBe(before)
    })), 60_000)
})

layer(ChannelThreads.layer(POOL), { excludeTestServices: true })("channels on the pool's threads", (it) => {
  for (const tlsOn of [false, true]) {
    it.effect(
      `a channel on a thread whose connection is reset re-attaches on a new session for the same id${
        tlsOn ? " (PSK TLS, zstd: the new connection's handshake in the thread, a new compression stream)" : ""
      }`,
      () =>
        leakFree(Effect.gen(function*() {
          const ram = yield* sharedRam()
          const tls = tlsOn ? yield* Tls.make({ psk: fixture("keys.psk") }) : undefined
          const dest = yield* startDestination({ upgrade: tls?.server })
          // channel 1's first connection is reset 256 KiB in (by a proxy: the thread's socket is out of reach)
          const proxy = yield* Effect.acquireRelease(
            Effect.promise(() =>
              resetProxy({ host: "127.0.0.1", port: (dest.address as { readonly port: number }).port }, {
                channel: 1,
                afterBytes: 256 * 1024,
                // under TLS the proxy cannot read the init packet: the second connection is channel 0 or 1
                ...(tlsOn ? { connection: 2 } : {})
              })
            ),
            (proxy) => Effect.promise(() => proxy.close())
          )
          const before = yield* opened
          const stats = yield* noHang(
            migrate(ram, {
              address: { _tag: "Tcp", host: "127.0.0.1", port: proxy.port },
              channels: 2,
              ...(tls === undefined ? {} : { compression: "zstd", upgrade: tls.client("127.0.0.1") })
            }),
            "migrate"
          )
          const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
          expect(proxy.resets()).toBe(1)
          expect(sameMemory(received.ram, ram)).toBe(true)
          expect(stats.reconnects).toBe(1)
          expect(stats.resentPages).toBeGreaterThan(0)
          // two sessions, and a third for the reset channel; with zstd the destination (the pool in its context
          // too) decodes on the threads: a decode session for each connection it adopted, the new one included;
          // and the source's digest
          expect((yield* opened) - before).toBe((tlsOn ? 6 : 3) + hashSessions(ram))
          yield* expectThreadsClean
        }))
    )
  }

  /**
   * Where channel 1's path goes silent (nothing more forwarded either way, nothing closed or reset), on 64 MiB
   * of random pages (a packet is a header and 128 pages; channel 1's hand-off, 16 MiB, is far more than the
   * sockets hold) with a destination whose peer timeout is 2 s (its stall watch: 1 s).
   */
  const silentCuts = [
    {
      // inside a packet, the channel inside a write that never hears of it: the destination's stall watch sees a
      // connection stuck inside a packet, and the source is told
      what: "blocked in a write when its path goes silent re-attaches once the destination says it lost it",
      afterBytes: 1024 * 1024 + 100
    },
    {
      // right after its init packet and its first packet, exactly: the destination is never inside a packet of
      // it; channel 0 takes the rest of the round, sends its SYNC and waits at the barrier for channel 1's
      what: "whose path goes silent right after a whole packet re-attaches once the other waits at the sync",
      afterBytes: Protocol.INIT_PACKET_SIZE + Protocol.headerSize(PAGE) + Protocol.slotsFor(PAGE) * PAGE
    }
  ]
  for (const cut of silentCuts) {
    for (const threaded of [true, false]) {
      it.effect(`a channel ${threaded ? "on a thread" : "in this thread (plain memory)"} ${cut.what}`, () =>
        leakFree(Effect.gen(function*() {
          const shared = sharedBlock(16384, 1)
          const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: threaded ? shared : Buffer.from(shared) }] })
          const dest = yield* startDestination({ timeouts: { ...TIMEOUTS, peer: "2 seconds" } })
          const proxy = yield* Effect.acquireRelease(
            Effect.promise(() =>
              resetProxy({ host: "127.0.0.1", port: (dest.address as { readonly port: number }).port }, {
                channel: 1,
                afterBytes: cut.afterBytes,
                silent: true
              })
            ),
            (proxy) => Effect.promise(() => proxy.close())
          )
          const stats = yield* noHang(
            migrate(ram, { address: { _tag: "Tcp", host: "127.0.0.1", port: proxy.port }, channels: 2 }),
            "migrate",
            20
          )
          const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
          expect(proxy.resets()).toBe(1)
          expect(sameMemory(received.ram, ram)).toBe(true)
          expect(stats.reconnects).toBe(1)
          yield* expectThreadsClean
        })), 30_000)
    }
  }

  describe("the source's digest on the channel threads", () => {
    it.effect("a source on the pool hashes its memory there: a hash session beside its channels, closed after; the digests agree", () =>
      leakFree(Effect.gen(function*() {
        // two digest chunks (64 MiB each) and a bit: worth a hashing thread beside the calling one
        const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: sharedBlock(2 * 16384 + 256, 0.3) }] })
        const before = yield* opened
        const { received, stats } = yield* migrateOnce(ram, { channels: 2 })
        expect(sameMemory(received.ram, ram)).toBe(true)
        expect(stats.ramBytes).toBe(ram.size)
        // two channel sessions and the digest's (one per core but one, at most the pool's threads)
        expect(hashSessions(ram)).toBe(Math.min(2, Os.availableParallelism() - 1))
        expect((yield* opened) - before).toBe(2 + hashSessions(ram))
        yield* expectThreadsClean
      })), 60_000)

    it.effect("HashPool.poolOn: the channel threads' hash sessions give the digest this thread alone gives", () =>
      leakFree(Effect.gen(function*() {
        const pool = yield* ChannelThreads.ChannelThreads
        const bytes = sharedBlock(3 * 16384 + 100, 1)
        const alone = yield* Digest.digestAll([bytes])
        const shared = yield* Effect.scoped(Effect.flatMap(HashPool.poolOn(pool, 2), (hashers) => Digest.digestAll([bytes], hashers)))
        expect(shared).toEqual(alone)
        yield* expectThreadsClean
      })))
  })

    describe("byte-identical", () => {
    for (const compression of ["none", "zlib", "zstd"] as const) {
      it.effect(`${compression}: every block arrives as it was; the channels ran in the threads; nothing is left there`, () =>
        leakFree(Effect.gen(function*() {
          const ram = yield* sharedRam()
          const before = yield* opened
          const { received, stats } = yield* migrateOnce(ram, { compression, channels: 4 })
          expect(sameMemory(received.ram, ram)).toBe(true)
          expect(stats.normalPages + stats.zeroPages).toBeGreaterThanOrEqual(ram.size / PAGE)
          expect(received.stats.packets).toBe(stats.packets)
          // the source's 4 channels, and the destination's (in context too) decoding of compressed ones; and the
          // source's digest
          expect((yield* opened) - before).toBe((compression === "none" ? 4 : 8) + hashSessions(ram))
          yield* expectThreadsClean
        })))
    }

    it.effect("the same packets, pages and wire bytes as the same migration in this thread (plain memory stays here)", () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sharedRam()
        // the same bytes in plain memory: the channels cannot run in a thread and stay in this one
        const plain = yield* GuestRam.make({
          blocks: ram.blocks.map((block) => ({ name: block.name, bytes: Buffer.from(block.bytes) }))
        })
        const before = yield* opened
        const here = yield* migrateOnce(plain, { channels: 3 })
        expect(yield* opened).toBe(before)
        const there = yield* migrateOnce(ram, { channels: 3 })
        expect((yield* opened) - before).toBe(3 + hashSessions(ram))
        expect(sameMemory(there.received.ram, here.received.ram)).toBe(true)
        const { packets, normalPages, syncs, wireBytes, zeroPages } = here.stats
        expect(there.stats).toMatchObject({ packets, normalPages, zeroPages, syncs, wireBytes })
        yield* expectThreadsClean
      })))

    it.effect("PSK TLS: the handshakes in the threads, every block as it was", () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sharedRam()
        const tls = yield* Tls.make({ psk: fixture("keys.psk") })
        const before = yield* opened
        const { received } = yield* migrateOnce(ram, { compression: "zstd", upgrade: tls.client("127.0.0.1") }, tls.server)
        expect(sameMemory(received.ram, ram)).toBe(true)
        // the source's 4 channels, the destination's decoding of them, the source's digest
        expect((yield* opened) - before).toBe(8 + hashSessions(ram))
        yield* expectThreadsClean
      })))

    it.effect("x509 TLS (the destination's certificate checked against the CA in the threads): every block as it was", () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sharedRam()
        const server = yield* Tls.make({ ca: fixture("ca-cert.pem"), cert: fixture("server-cert.pem"), key: fixture("server-key.pem") })
        const client = yield* Tls.make({ ca: fixture("ca-cert.pem") })
        const before = yield* opened
        const { received } = yield* migrateOnce(ram, { upgrade: client.client("127.0.0.1") }, server.server)
        expect(sameMemory(received.ram, ram)).toBe(true)
        expect((yield* opened) - before).toBe(4 + hashSessions(ram))
        yield* expectThreadsClean
      })))

    it.effect("a wrapped transport or a wrapped upgrade keeps the channels in this thread, where they see them", () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sharedRam()
        const before = yield* opened
        // a fault-injecting transport records every channel it connected
        const faulty = yield* Faulty.make()
        const dest = yield* startDestination()
        yield* noHang(migrate(ram, { address: dest.address, channels: 2 }, faulty.layer), "migrate")
        yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(faulty.records.filter((r) => r.side === "connect" && typeof r.role === "number")).toHaveLength(2)
        // an upgrade that is not Tls.client's
        const upgraded: Array<number | "main"> = []
        const upgrade: Transport.Upgrade<never> = (connection, channel) =>
          Effect.sync(() => {
            upgraded.push(channel)
            return connection
          })
        yield* migrateOnce(ram, { channels: 2, upgrade })
        expect(upgraded.filter((c) => c !== "main").sort()).toEqual([0, 1])
        // no channel session: only the two migrations' digests' (the memory is shared and the pool there)
        expect((yield* opened) - before).toBe(2 * hashSessions(ram))
      })))
  })

  describe("closing the scope closes every session in its thread, and waits for it", () => {
    it.effect("mid-connect: the threads' connects (stalled for real) are abandoned; nothing is left there or here", () =>
      leakFree(Effect.gen(function*() {
        const address = yield* stalledListener
        const { scope, send } = yield* channelSet(address)
        const established = yield* Effect.fork(send.established)
        // both connects are in flight, in the threads
        yield* untilThreads((all) => count(all, ["TCPConnectWrap", "ConnectWrap"]) === 2, "two connects in the threads")
        expect(established.unsafePoll()).toBeNull()
        expect(yield* Effect.flatMap(ChannelThreads.ChannelThreads, (p) => p.stats)).toMatchObject({ sessions: 2, hosted: 2 })
        yield* noHang(Scope.close(scope, Exit.void), "closing the channel set")
        yield* expectThreadsClean
        yield* Fiber.interrupt(established)
      })))

    it.effect("mid-handshake: the TLS handshakes in the threads stop, their sockets are destroyed there", () =>
      leakFree(Effect.gen(function*() {
        // a peer that reads the ClientHello and never answers
        const peer = yield* silentPeer(2, 1)
        const tls = yield* Tls.make({ psk: fixture("keys.psk") })
        const { scope, send } = yield* channelSet(peer.address, { upgrade: tls.client("127.0.0.1") })
        const established = yield* Effect.fork(send.established)
        yield* noHang(peer.reached, "both ClientHellos")
        expect(established.unsafePoll()).toBeNull()
        yield* noHang(Scope.close(scope, Exit.void), "closing the channel set")
        yield* expectThreadsClean
        // the threads destroyed the sockets: the peer sees both connections closed
        yield* noHang(peer.closed, "the peer seeing both connections closed")
        yield* Fiber.interrupt(established)
      })))

    it.effect("mid-transfer: writes blocked on a peer that stopped reading; sessions closed, sockets destroyed", () =>
      leakFree(Effect.gen(function*() {
        // the init packet and a packet's header and more, then no more reading
        const peer = yield* silentPeer(2, 64 + 2 * Protocol.headerSize(PAGE))
        const { scope, send } = yield* channelSet(peer.address)
        yield* noHang(send.established, "established")
        const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: sharedBlock(8192, 1) }] })
        const block = ram.blocks[0]!
        const pages = Uint32Array.from({ length: block.pages }, (_, i) => i)
        // batches for both channels, more than the sockets take: the threads wait on their writes
        const sending = yield* Effect.fork(Effect.forEach(
          Array.from({ length: pages.length / send.batchPages }, (_, i) => i),
          (i) => send.send(block, pages.subarray(i * send.batchPages), send.batchPages),
          { discard: true }
        ))
        yield* noHang(peer.reached, "both channels' first packets")
        yield* noHang(Scope.close(scope, Exit.void), "closing the channel set")
        yield* expectThreadsClean
        yield* noHang(peer.closed, "the peer seeing both connections closed")
        yield* Fiber.interrupt(sending)
      })))
  })

  describe("a window's hand-off (MultifdSend.send with a Window): its memory is given back only once sent", () => {
    for (const threaded of [false, true]) {
      it.effect(`${threaded ? "on a thread" : "in this thread"}: \`sent\` runs once every byte is in the kernel, not while the peer holds it back`, () =>
        leakFree(Effect.gen(function*() {
          // the init packet and a packet's header and more, then no more reading: a batch (16 MiB) is far more
          // than the sockets hold while nobody reads
          const peer = yield* silentPeer(1, 64 + 2 * Protocol.headerSize(PAGE))
          const { scope, send } = yield* channelSet(peer.address, { channels: 1, ...(threaded ? {} : { threads: undefined }) })
          yield* noHang(send.established, "established")
          const window = sharedBlock(send.batchPages, 1)
          const pages = Uint32Array.from({ length: send.batchPages }, (_, i) => i)
          const released = yield* Deferred.make<void>()
          yield* send.send({ name: "pc.ram", bytes: window }, pages, send.batchPages, {
            origin: 1024 * 1024 * 1024,
            sent: Deferred.succeed(released, undefined)
          })
          yield* noHang(peer.reached, "the channel's first packet")
          expect(yield* Deferred.isDone(released)).toBe(false)
          // the peer reads again: the channel's writes drain, and only then is the window given back
          const closed = yield* Effect.fork(peer.closed)
          yield* noHang(Deferred.await(released), "the window given back")
          yield* noHang(send.finish, "finish")
          yield* noHang(Scope.close(scope, Exit.void), "closing the channel set")
          yield* noHang(Fiber.join(closed), "the peer seeing the connection closed")
          if (threaded) yield* expectThreadsClean
        })))
    }
  })

  describe("a channel that fails in its thread is named", () => {
    it.effect("connect refused: the same message as in this thread", () =>
      leakFree(Effect.gen(function*() {
        // a port nobody listens on any more
        const address = yield* Effect.scoped(Effect.map(Transport.listen(tcp0), (listener) => listener.address))
        const failureWith = (threads: boolean) =>
          Effect.scoped(Effect.gen(function*() {
            const { scope, send } = yield* channelSet(address, { channels: 1, ...(threads ? {} : { threads: undefined }) })
            yield* Effect.addFinalizer(() => Scope.close(scope, Exit.void))
            return yield* failureOfSet(send)
          }))
        const there = yield* failureWith(true)
        const here = yield* failureWith(false)
        expect(there).toBeInstanceOf(MigrationError.ChannelError)
        expect(there.message).toBe(`multifd channel 0: ${Transport.formatAddress(address)}: connection refused`)
        expect(there.message).toBe(here.message)
        yield* expectThreadsClean
      })))

    it.effect("a TLS handshake that fails (another PSK): the same message as in this thread, naming the channel", () =>
      leakFree(Effect.gen(function*() {
        const tls = yield* Tls.make({ psk: fixture("keys.psk") })
        const wrong = yield* Tls.make({ psk: fixture("wrong-keys.psk") })
        // a destination's TLS side for every connection
        const listener = yield* Transport.listen(tcp0)
        yield* Effect.forkScoped(Effect.forever(Effect.flatMap(listener.accept, (connection) =>
          Effect.forkScoped(Effect.ignore(Effect.scoped(tls.server(connection, 0)))))))
        const failureWith = (threads: boolean) =>
          Effect.scoped(Effect.gen(function*() {
            const { scope, send } = yield* channelSet(listener.address, {
              channels: 1,
              upgrade: wrong.client("127.0.0.1"),
              ...(threads ? {} : { threads: undefined })
            })
            yield* Effect.addFinalizer(() => Scope.close(scope, Exit.void))
            return yield* failureOfSet(send)
          }))
        const there = yield* failureWith(true)
        const here = yield* failureWith(false)
        expect(there).toBeInstanceOf(MigrationError.ChannelError)
        expect((there as MigrationError.ChannelError).cause._tag).toBe("TlsError")
        expect(there.message).toMatch(/^multifd channel 0: TLS handshake with tcp:127\.0\.0\.1:\d+ failed: /)
        expect(there.message).toBe(here.message)
        expectOneLine(there)
        yield* expectThreadsClean
      })))

    it.effect("established only after every handshake: a destination holding the handshakes back", () =>
      leakFree(Effect.gen(function*() {
        const tls = yield* Tls.make({ psk: fixture("keys.psk") })
        const listener = yield* Transport.listen(tcp0)
        const hellos = yield* Deferred.make<void>()
        const go = yield* Deferred.make<void>()
        let arrived = 0
        // each connection: accepted (its ClientHello on the way), then, once let go, the handshake and the init
        yield* Effect.forkScoped(Effect.forever(Effect.flatMap(listener.accept, (connection) =>
          Effect.forkScoped(Effect.scoped(Effect.gen(function*() {
            if (++arrived === 2) yield* Deferred.succeed(hellos, undefined)
            yield* Deferred.await(go)
            const secure = yield* tls.server(connection, 0)
            yield* secure.read(64)
            yield* Effect.never
          })).pipe(Effect.ignore)))))
        const { scope, send } = yield* channelSet(listener.address, { upgrade: tls.client("127.0.0.1") })
        const established = yield* Effect.fork(send.established)
        yield* noHang(Deferred.await(hellos), "both connections")
        // the threads are mid-handshake: no channel is established
        expect(established.unsafePoll()).toBeNull()
        yield* Deferred.succeed(go, undefined)
        yield* noHang(Fiber.join(established), "established")
        yield* Scope.close(scope, Exit.void)
        yield* expectThreadsClean
      })))
  })
})

describe("a thread that fails", () => {
  const faults = [
    { name: "throws", fault: (t: ReturnType<typeof unsafeThreads>[number]) => t.fault("throw"), detail: "its thread failed: fault injected by a test" },
    { name: "exits", fault: (t: ReturnType<typeof unsafeThreads>[number]) => t.fault("exit", 7), detail: "its thread exited (code 7)" },
    { name: "is terminated from outside", fault: (t: ReturnType<typeof unsafeThreads>[number]) => void t.worker.terminate(), detail: "its thread exited (code 1)" }
  ]
  for (const { detail, fault, name } of faults) {
    it.live(`${name} mid-transfer: the set fails naming a channel it hosted; nothing leaks; the pool replaces it`, () =>
      leakFree(Effect.gen(function*() {
        const before = ChannelThreads.liveThreads()
        yield* Effect.scoped(Effect.gen(function*() {
          // one thread: both channels on it
          const pool = yield* ChannelThreads.make({ ...POOL, maxThreads: 1 })
          const threads = Layer.succeed(ChannelThreads.ChannelThreads, pool)
          const peer = yield* silentPeer(2, 64 + 2 * Protocol.headerSize(PAGE))
          const { scope, send } = yield* channelSet(peer.address).pipe(Effect.provide(threads))
          yield* noHang(send.established, "established")
          const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: sharedBlock(8192, 1) }] })
          const block = ram.blocks[0]!
          const pages = Uint32Array.from({ length: block.pages }, (_, i) => i)
          const sending = yield* Effect.fork(Effect.forEach(
            [0, 1, 2, 3],
            (i) => send.send(block, pages.subarray(i * send.batchPages), send.batchPages),
            { discard: true }
          ))
          yield* noHang(peer.reached, "both channels' first packets")
          const [thread] = unsafeThreads(pool)
          fault(thread!)
          const error = yield* failureOfSet(send)
          expect(error).toBeInstanceOf(MigrationError.ChannelError)
          expect(error.message).toMatch(new RegExp(`^multifd channel [01]: ${detail.replace(/[()]/g, "\\$&")}$`))
          expect((error as MigrationError.ChannelError).cause._tag).toBe("ThreadError")
          // the sending caller hears it too
          expect(failureOf(yield* noHang(Fiber.await(sending), "send")).message).toBe(error.message)
          yield* noHang(Scope.close(scope, Exit.void), "closing the channel set")
          yield* noHang(peer.closed, "the peer seeing both connections closed")
          expect(yield* pool.stats).toMatchObject({ threads: 0, sessions: 0 })
          expect(ChannelThreads.liveThreads()).toBe(before)
          // the next channel gets a new thread in its place
          const again = yield* migrateOnce(yield* sharedRam(), { channels: 2 }).pipe(Effect.provide(threads))
          expect(again.stats.channels).toBe(2)
          expect(yield* pool.stats).toMatchObject({ threads: 1, sessions: 0, replaced: 1 })
          expect(ChannelThreads.liveThreads()).toBe(before + 1)
        }))
        expect(ChannelThreads.liveThreads()).toBe(before)
      })))
  }

  it.live("every thread of the set fails: one error, naming one channel (the first wins)", () =>
    leakFree(Effect.gen(function*() {
      const pool = yield* ChannelThreads.make(POOL)
      const threads = Layer.succeed(ChannelThreads.ChannelThreads, pool)
      const peer = yield* silentPeer(2, 64)
      const { scope, send } = yield* channelSet(peer.address).pipe(Effect.provide(threads))
      yield* noHang(send.established, "established")
      for (const thread of unsafeThreads(pool)) thread.fault("exit", 3)
      const exit = yield* noHang(Effect.exit(send.failure), "the set's failure")
      expect(Exit.isFailure(exit) && Cause.failures(exit.cause).length).toBe(1)
      expect(failureOf(exit).message).toMatch(/^multifd channel [01]: its thread exited \(code 3\)$/)
      yield* Scope.close(scope, Exit.void)
    })))

  it.live("at the start of a migration: migrate fails naming the channel, and the next migration on the pool succeeds", () =>
    leakFree(Effect.gen(function*() {
      const pool = yield* ChannelThreads.make({ ...POOL, maxThreads: 1 })
      const threads = Layer.succeed(ChannelThreads.ChannelThreads, pool)
      const ram = yield* sharedRam()
      const dest = yield* startDestination()
      // the first report comes once every channel is established: the thread exits then, before any page
      const [thread] = unsafeThreads(pool)
      const exited = yield* Deferred.make<void>()
      thread!.worker.once("exit", () => Deferred.unsafeDone(exited, Exit.void))
      let reports = 0
      const onProgress = () =>
        reports++ > 0 ? Effect.void : Effect.zipRight(Effect.sync(() => thread!.fault("exit", 5)), Deferred.await(exited))
      const exit = yield* noHang(
        Effect.exit(migrate(ram, { address: dest.address, channels: 2, onProgress }).pipe(Effect.provide(threads))),
        "migrate"
      )
      const error = failureOf(exit)
      expect(error.message).toMatch(/^multifd channel [01]: its thread exited \(code 5\)$/)
      expectOneLine(error)
      // the destination fails too (told why, or seeing the channels closed first)
      expectOneLine(failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming")))
      const again = yield* migrateOnce(ram, { channels: 2 }).pipe(Effect.provide(threads))
      expect(sameMemory(again.received.ram, ram)).toBe(true)
      expect(yield* pool.stats).toMatchObject({ threads: 1, replaced: 1 })
    })))
})

describe("migrations in sequence on one pool", () => {
  /**
   * A thread given a guest's memory (shared: the buffer's whole size) kept it referenced after its sessions
   * ended, until its heap was collected, which an idle thread never does: each migration on a long-lived pool
   * kept its guest's memory alive (a migration of 32 MiB left ~20 MiB more resident each time, all of it freed
   * only when the pool's threads were terminated). A thread now collects once it hosts no session.
   */
  it.live("no thread keeps a finished migration's memory: the shared buffers it was given are released once its sessions end", () =>
    leakFree(Effect.gen(function*() {
      const pool = yield* ChannelThreads.make(POOL)
      const threads = Layer.succeed(ChannelThreads.ChannelThreads, pool)
      for (let i = 0; i < 3; i++) {
        yield* Effect.scoped(Effect.gen(function*() {
          const ram = yield* sharedRam()
          const { received } = yield* migrateOnce(ram, { channels: 2 }).pipe(Effect.provide(threads))
          expect(sameMemory(received.ram, ram)).toBe(true)
        }))
        // the threads let go once idle (before the fix: never, as nothing else made them collect)
        yield* untilThreads((inspections) => inspections.every((inspection) => inspection.sharedBuffers === 0), `the threads letting go of migration ${i}'s memory`).pipe(Effect.provide(threads))
      }
      expect(yield* pool.stats).toMatchObject({ sessions: 0, hosted: 0 })
    }).pipe(Effect.scoped)))
})

describe("a thread that stops answering", () => {
  /**
   * A thread held up mid-transfer (a loop, a long synchronous task): the migration's failure was known (the
   * destination aborted, no data for its peer timeout), but closing the channels waited for the thread's word
   * that each session was gone, for ever; the migration never returned. Now a close the thread does not answer
   * in the pool's closeTimeout terminates the thread, the migration fails, and the pool replaces the thread.
   */
  it.live("mid-transfer: the migration fails and returns; the hung thread is terminated and replaced", () =>
    leakFree(Effect.gen(function*() {
      const before = ChannelThreads.liveThreads()
      const pool = yield* ChannelThreads.make({ ...POOL, maxThreads: 1, closeTimeout: "100 millis" })
      const threads = Layer.succeed(ChannelThreads.ChannelThreads, pool)
      const ram = yield* sharedRam()
      const timeouts = { ...TIMEOUTS, peer: "1 second" } as const
      const dest = yield* startDestination({ timeouts })
      let release: (() => void) | undefined
      yield* Effect.addFinalizer(() => Effect.sync(() => release?.()))
      let reports = 0
      const onProgress = (p: Migration.Progress) =>
        Effect.sync(() => {
          if (p.doneBytes > 0 && reports++ === 0) release = unsafeThreads(pool)[0]!.hold()
        })
      const exit = yield* noHang(
        Effect.exit(migrate(ram, { address: dest.address, channels: 2, timeouts, onProgress }).pipe(Effect.provide(threads))),
        "migrate"
      )
      expectOneLine(failureOf(exit))
      expectOneLine(failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming")))
      expect(yield* pool.stats).toMatchObject({ threads: 0, sessions: 0 })
      expect(ChannelThreads.liveThreads()).toBe(before)
      const again = yield* migrateOnce(ram, { channels: 2 }).pipe(Effect.provide(threads))
      expect(sameMemory(again.received.ram, ram)).toBe(true)
      expect(yield* pool.stats).toMatchObject({ threads: 1, sessions: 0, replaced: 1 })
    }).pipe(Effect.scoped)))
})

describe("a channel thread that dies while it hashes a digest", () => {
  it.live("fails the digest with a clear error naming the thread, instead of leaving it waiting", () =>
    leakFree(Effect.gen(function*() {
      const pool = yield* ChannelThreads.make({ ...POOL, maxThreads: 1 })
      const hashers = yield* HashPool.poolOn(pool, 1)
      const [thread] = unsafeThreads(pool)
      const exited = yield* Deferred.make<void>()
      thread!.worker.once("exit", () => Deferred.unsafeDone(exited, Exit.void))
      thread!.fault("exit", 4)
      yield* noHang(Deferred.await(exited), "the thread's exit")
      const exit = yield* noHang(Effect.exit(Digest.digestAll([sharedBlock(2 * 16384 + 1, 1)], hashers)), "the digest")
      const defect = Exit.isFailure(exit) ? Cause.dieOption(exit.cause) : undefined
      expect(defect !== undefined && defect._tag === "Some" && defect.value).toBeInstanceOf(Digest.WorkerFailed)
      expect((defect as { value: Digest.WorkerFailed }).value.message).toBe(
        "digest worker thread on channel thread 0: its thread exited (code 4)"
      )
    }).pipe(Effect.scoped)))
})

describe("a channel thread that stops answering while it hashes a digest", () => {
  /**
   * No time bounded a hash session's answer: a thread held up (a loop, a long synchronous task) left the digest,
   * and the migration hashing it (its Hashing heartbeats keeping the peer waiting), waiting for ever. Now a
   * chunk the thread has not answered within the pool's closeTimeout fails the digest naming the thread, and
   * the hung thread is terminated as the hash session closes.
   */
  it.live("fails the digest with a clear error naming the thread; the thread is terminated as the session closes", () =>
    leakFree(Effect.gen(function*() {
      const pool = yield* ChannelThreads.make({ ...POOL, maxThreads: 1, closeTimeout: "100 millis" })
      const [thread] = unsafeThreads(pool)
      let release: (() => void) | undefined
      yield* Effect.addFinalizer(() => Effect.sync(() => release?.()))
      const exit = yield* noHang(
        Effect.exit(Effect.scoped(Effect.flatMap(HashPool.poolOn(pool, 1), (hashers) => {
          release = thread!.hold()
          return Digest.digestAll([sharedBlock(2 * 16384 + 1, 1)], hashers)
        }))),
        "the digest"
      )
      const defect = Exit.isFailure(exit) ? Cause.dieOption(exit.cause) : undefined
      expect(defect !== undefined && defect._tag === "Some" && defect.value).toBeInstanceOf(Digest.WorkerFailed)
      expect((defect as { value: Digest.WorkerFailed }).value.message).toBe(
        "digest worker thread on channel thread 0: stopped answering: a chunk had no answer after 100ms"
      )
      // the session's close went unanswered too: the thread is terminated, and the next session gets a new one
      expect(yield* pool.stats).toMatchObject({ threads: 0, sessions: 0 })
    }).pipe(Effect.scoped)))
})

describe("the pool's size", () => {
  /** NaN (a `Number(process.env.X)` unset) made a pool of no threads, whose first session died on a TypeError. */
  // from plain JavaScript, `layer("4")` or `make(4)` were read as no options: the defaults, in silence
  it.live("options that are no object (a string, a number, null) fail make, naming them; no thread starts", () =>
    Effect.gen(function*() {
      const before = ChannelThreads.liveThreads()
      for (const [options, shown] of [["4", "\"4\""], [4, "4"], [null, "null"]] as const) {
        const error = yield* Effect.flip(Effect.scoped(ChannelThreads.make(options as never)))
        expect([error.reason, error.message]).toEqual([
          "Start",
          `the channel threads' pool: the options must be an object (or left out), not ${shown}`
        ])
      }
      expect(ChannelThreads.liveThreads()).toBe(before)
    }))

  it.live("a maxThreads that is no whole number of 1 or more fails make, naming it; no thread starts", () =>
    Effect.gen(function*() {
      const before = ChannelThreads.liveThreads()
      for (const maxThreads of [Number.NaN, 0, -3, 2.5]) {
        const error = yield* Effect.flip(Effect.scoped(ChannelThreads.make({ ...POOL, maxThreads })))
        expect([error.reason, error.message]).toEqual([
          "Start",
          `the channel threads' pool: maxThreads ${maxThreads} is not a whole number of 1 or more`
        ])
      }
      expect(ChannelThreads.liveThreads()).toBe(before)
    }))

  /**
   * A closeTimeout of 0 took every thread for hung at its first close; "soon" was a defect (Duration.decode threw);
   * Infinity waited for a hung thread for ever.
   */
  it.live("a closeTimeout that is no finite duration of more than 0 fails make, naming it; no thread starts", () =>
    Effect.gen(function*() {
      const before = ChannelThreads.liveThreads()
      const cases: Array<[Duration.DurationInput, string]> = [
        [0, "closeTimeout must be more than 0, not 0"],
        [-5, "closeTimeout -5 is not a duration of 0 or more"],
        [Number.NaN, "closeTimeout NaN is not a duration of 0 or more"],
        ["soon" as Duration.DurationInput, "closeTimeout \"soon\" is not a duration of 0 or more"],
        // (a hung thread was waited for for ever)
        [Duration.infinity, "closeTimeout must be finite, at most 24 days (the longest a timer waits), not Infinity"]
      ]
      for (const [closeTimeout, detail] of cases) {
        const error = yield* Effect.flip(Effect.scoped(ChannelThreads.make({ ...POOL, closeTimeout })))
        expect([error.reason, error.message]).toEqual(["Start", `the channel threads' pool: ${detail}`])
      }
      expect(ChannelThreads.liveThreads()).toBe(before)
    }))

  /**
   * A module Node's Worker cannot take — a bare file name (neither absolute nor ./relative), a number, null, an
   * http: URL — was a defect thrown as the first thread was made ("ERR_WORKER_PATH", with a stack trace).
   */
  it.live("a module that is no absolute path, ./relative one or file: URL fails make, naming it; no thread starts", () =>
    Effect.gen(function*() {
      const before = ChannelThreads.liveThreads()
      const cases: Array<[unknown, string]> = [
        ["channelWorker.js", `"channelWorker.js"`],
        [5, "5"],
        [null, "null"],
        [new URL("https://example.com/channelWorker.js"), `"https://example.com/channelWorker.js"`]
      ]
      for (const [module, shown] of cases) {
        const exit = yield* Effect.exit(Effect.scoped(ChannelThreads.make({ ...POOL, module: module as string })))
        const error = failureOf(exit) as ChannelThreads.ThreadError
        expect([error.reason, error.message]).toEqual([
          "Start",
          `the channel threads' pool: module ${shown} is not an absolute path, a ./relative one or a file: URL`
        ])
      }
      expect(ChannelThreads.liveThreads()).toBe(before)
    }))
})

describe("a pool whose scope has closed", () => {
  /**
   * A pool is a scoped resource (its layer's). Used after its scope closed (a runtime disposed, a layer built in a
   * scope of its own), each channel's session started a new thread that was terminated at once, and the migration
   * failed "multifd channel 0: its thread exited (code 0)"; closed under a running migration, "its thread exited
   * (code 1)". Both now say the pool is closed, and no thread is started in a closed pool.
   */
  const CLOSED = /^multifd channel [01]: its thread's pool \(ChannelThreads\) is closed: its scope has ended$/

  it.live("used after: migrate fails at once saying so; no thread starts", () =>
    leakFree(Effect.gen(function*() {
      const scope = yield* Scope.make()
      const pool = yield* ChannelThreads.make(POOL).pipe(Scope.extend(scope))
      yield* Scope.close(scope, Exit.void)
      const threadsBefore = ChannelThreads.liveThreads()
      const ram = yield* sharedRam()
      const dest = yield* startDestination()
      const exit = yield* noHang(
        Effect.exit(migrate(ram, { address: dest.address, channels: 2 }).pipe(
          Effect.provideService(ChannelThreads.ChannelThreads, pool)
        )),
        "migrate"
      )
      const error = failureOf(exit)
      expect(error.message).toMatch(CLOSED)
      expectOneLine(error)
      expect(((error as MigrationError.ChannelError).cause as ChannelThreads.ThreadError).reason).toBe("Closed")
      yield* noHang(Fiber.await(dest.fiber), "incoming")
      expect(ChannelThreads.liveThreads()).toBe(threadsBefore)
      expect(yield* pool.stats).toMatchObject({ threads: 0, sessions: 0, replaced: 0 })
    })))

  it.live("closed under a running migration: the migration fails saying so, nothing is left", () =>
    leakFree(Effect.gen(function*() {
      const threadsBefore = ChannelThreads.liveThreads()
      const scope = yield* Scope.make()
      const pool = yield* ChannelThreads.make(POOL).pipe(Scope.extend(scope))
      const ram = yield* sharedRam()
      const dest = yield* startDestination()
      const reached = yield* Deferred.make<void>()
      const resume = yield* Deferred.make<void>()
      let reports = 0
      const onProgress = (p: Migration.Progress) =>
        p.doneBytes > 0 && reports++ === 0
          ? Effect.zipRight(Deferred.succeed(reached, undefined), Deferred.await(resume))
          : Effect.void
      const source = yield* Effect.fork(migrate(ram, { address: dest.address, channels: 2, onProgress }).pipe(
        Effect.provideService(ChannelThreads.ChannelThreads, pool)
      ))
      yield* noHang(Deferred.await(reached), "round 0 under way")
      const closing = yield* Effect.fork(Scope.close(scope, Exit.void))
      yield* Deferred.succeed(resume, undefined)
      const error = failureOf(yield* noHang(Fiber.await(source), "migrate"))
      expect(error.message).toMatch(CLOSED)
      expectOneLine(error)
      yield* noHang(Fiber.join(closing), "the pool's close")
      yield* noHang(Fiber.await(dest.fiber), "incoming")
      expect(ChannelThreads.liveThreads()).toBe(threadsBefore)
    })))

  /**
   * The source's digest hashes on the pool's threads: closed then (after the last round, before Complete), the
   * digest died with the hash sessions' `WorkerFailed`, and `migrate` with it, a defect (a stack trace, "internal
   * error" on the command line), where a close a moment earlier failed it with the channels' typed error. It now
   * fails the same way whenever the pool closes: the channels' error, one line, no defect.
   */
  it.live("closed under the source's digest: the migration fails saying so, a typed error; nothing is left", () =>
    leakFree(Effect.gen(function*() {
      const threadsBefore = ChannelThreads.liveThreads()
      const scope = yield* Scope.make()
      const pool = yield* ChannelThreads.make(POOL).pipe(Scope.extend(scope))
      // two digest chunks and a bit, mostly zero: the digest hashes on the pool's threads
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: sharedBlock(2 * 16384 + 64, 0.01) }] })
      expect(hashSessions(ram)).toBeGreaterThan(0)
      const dest = yield* startDestination()
      const closing = yield* Deferred.make<Fiber.RuntimeFiber<void>>()
      // a page written after round 0 makes a switch-over round of one page; its last report comes after its flush,
      // right before the digest: the pool starts closing there
      const onProgress = (p: Migration.Progress) =>
        p.doneBytes < p.totalBytes
          ? Effect.void
          : p.phase === "switchover"
          ? Effect.flatMap(Effect.forkDaemon(Scope.close(scope, Exit.void)), (f) => Deferred.succeed(closing, f))
          : p.round === 0
          ? Effect.orDie(GuestRam.write(ram, "pc.ram", 0, Buffer.alloc(PAGE, 7)))
          : Effect.void
      const exit = yield* noHang(Effect.exit(migrate(ram, { address: dest.address, channels: 2, onProgress }).pipe(
        Effect.provideService(ChannelThreads.ChannelThreads, pool)
      )), "migrate")
      expect(Exit.isFailure(exit) && Option.isNone(Cause.dieOption(exit.cause))).toBe(true)
      const error = failureOf(exit)
      expect(error.message).toMatch(CLOSED)
      expectOneLine(error)
      yield* noHang(Fiber.join(yield* noHang(Deferred.await(closing), "the switch-over's last report")), "the pool's close")
      yield* noHang(Fiber.await(dest.fiber), "incoming")
      expect(ChannelThreads.liveThreads()).toBe(threadsBefore)
    })))
})

