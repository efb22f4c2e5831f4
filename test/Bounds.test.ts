/**
 * Bounds (issue 12): `migrate` checks every option before anything connects, and every wait on a peer at the
 * end of a migration is bounded —
 *
 * - a channel count, compression method, zero-page mode or page size it cannot use fails `migrate` with a
 *   `BadOptions` error and no connect attempted (`channels: 0` used to become a defect once the main channel
 *   was up);
 * - the multifd channels' graceful end (`MultifdSend.finish`) and the main channel's (`control.end`) are
 *   bounded by the peer timeout: a peer that never takes the last bytes fails the source with a `Timeout`;
 * - `MultifdRecv.adopt` of a connection that never completes its 64-byte init packet fails after the
 *   handshake timeout.
 *
 * Timeouts run on the TestClock over real loopback sockets (`support/clock`); `noHang` guards (a real timer)
 * only turn a hang into a failure.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as TestClock from "effect/TestClock"
import * as Crypto from "node:crypto"
import { PassThrough } from "node:stream"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as MappedRam from "../src/MappedRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as MultifdRecv from "../src/MultifdRecv.js"
import * as MultifdSend from "../src/MultifdSend.js"
import * as PageCodec from "../src/PageCodec.js"
import * as Protocol from "../src/Protocol.js"
import * as QemuIncoming from "../src/QemuIncoming.js"
import * as Snapshot from "../src/Snapshot.js"
import * as Transfer from "../src/Transfer.js"
import * as Transport from "../src/Transport.js"
import { advanceUntil } from "./support/clock.js"
import { failureOf } from "./support/failures.js"
import * as Faulty from "./support/faultyTransport.js"
import { noHang } from "./support/guards.js"
import { leakFree } from "./support/handles.js"
import { mixedImage } from "./support/images.js"

const PAGE = 4096
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

/** 1 MiB of mixed random and zero pages. */
const sourceRam = () => GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(256, 0.6, PAGE) }] })

/** Moves the TestClock (`advanceUntil`) until `fiber` is done; the virtual time that took. */
const advanceUntilDone = <A, E>(fiber: Fiber.Fiber<A, E>) =>
  Effect.gen(function*() {
    const t0 = yield* TestClock.currentTimeMillis
    yield* advanceUntil(Effect.map(Fiber.poll(fiber), Option.isSome), "the wait timing out")
    return (yield* TestClock.currentTimeMillis) - t0
  })

/**
 * The real transport, with the graceful `end` of the connections `stuck(k)` (connect #k: #0 is the source's
 * main channel, then its multifd channels) never completing, as if the peer never took the last bytes;
 * `reached` completes once such an `end` was called.
 */
const stuckEnds = (stuck: (index: number) => boolean, reached: Deferred.Deferred<void>): Layer.Layer<Transport.Transport> => {
  let connects = 0
  return Layer.succeed(Transport.Transport, {
    listen: Transport.listen,
    connect: (address, options) =>
      Effect.suspend(() => {
        const index = connects++
        return Effect.map(Transport.connect(address, options), (connection): Transport.Connection =>
          stuck(index) ? { ...connection, end: Effect.zipRight(Deferred.succeed(reached, undefined), Effect.never) } : connection)
      })
  })
}

describe("migrate checks its options before anything connects", () => {
  const cases: ReadonlyArray<readonly [string, Partial<Migration.MigrateOptions>, string]> = [
    ["channels: 0", { channels: 0 }, "channels must be between 1 and 255, not 0"],
    ["channels: 256", { channels: 256 }, "channels must be between 1 and 255, not 256"],
    ["channels: 1.5", { channels: 1.5 }, "channels must be between 1 and 255, not 1.5"],
    [
      "an unknown compression method",
      { compression: "lz4" as unknown as "zstd" },
      `compression "lz4" is not one of none, zlib, zstd`
    ],
    ["an unknown zero-page mode", { zeroPage: "some" as unknown as "none" }, `zero-page mode "some" is not multifd or none`]
  ]
  for (const [name, options, message] of cases) {
    it.effect(`${name}: a BadOptions MigrationError, and no connect`, () =>
      Effect.gen(function*() {
        const ram = yield* sourceRam()
        const faulty = yield* Faulty.make()
        const exit = yield* Migration.migrate({ address: { _tag: "Tcp", host: "127.0.0.1", port: 1 }, ...options }).pipe(
          Effect.provide(faulty.layer),
          Effect.provideService(GuestRam.GuestRam, ram),
          Effect.exit
        )
        const error = failureOf(exit)
        expect(error).toBeInstanceOf(MigrationError.MigrationError)
        expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
        expect(error.message).toBe(message)
        expect(faulty.attempts).toEqual([])
      }))
  }

  it.effect("memory whose page size is no page size (a GuestRam built by hand): BadOptions, and no connect", () =>
    Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make()
      const exit = yield* Migration.migrate({ address: { _tag: "Tcp", host: "127.0.0.1", port: 1 } }).pipe(
        Effect.provide(faulty.layer),
        Effect.provideService(GuestRam.GuestRam, { ...ram, pageSize: 1000 }),
        Effect.exit
      )
      const error = failureOf(exit)
      expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
      expect(error.message).toBe("the memory's page size must be a power of two between 512 and 524288, not 1000")
      expect(faulty.attempts).toEqual([])
    }))

  it.effect("a compression level out of range is still a CodecError BadLevel, and no connect", () =>
    Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make()
      const exit = yield* Migration.migrate({
        address: { _tag: "Tcp", host: "127.0.0.1", port: 1 },
        compression: "zlib",
        compressionLevel: 10
      }).pipe(Effect.provide(faulty.layer), Effect.provideService(GuestRam.GuestRam, ram), Effect.exit)
      const error = failureOf(exit)
      expect(error).toBeInstanceOf(PageCodec.CodecError)
      expect(error.message).toContain("zlib level 10 is out of range 0-9")
      expect(faulty.attempts).toEqual([])
    }))
})

describe("incoming checks its memory limit before it accepts", () => {
  for (const maxRamBytes of [Number.NaN, -1]) {
    it.live(`maxRamBytes ${maxRamBytes}: a BadOptions MigrationError at once (NaN turned the limit off)`, () =>
      leakFree(Effect.gen(function*() {
        const listener = yield* Transport.listen(tcp0)
        const error = yield* noHang(Effect.flip(Migration.incoming(listener, { maxRamBytes })), "incoming", 5)
        expect(error).toBeInstanceOf(MigrationError.MigrationError)
        expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
        expect(error.message).toBe(`the memory limit maxRamBytes must be a number of bytes >= 0, not ${maxRamBytes}`)
      })))

    it.live(`maxRamBytes ${maxRamBytes}: refused by QemuIncoming.incoming, Snapshot.restore and MappedRam.read too`, () =>
      leakFree(Effect.gen(function*() {
        const why = `the memory limit maxRamBytes must be a number of bytes >= 0, not ${maxRamBytes}`
        const listener = yield* Transport.listen(tcp0)
        const qemu = yield* noHang(Effect.flip(QemuIncoming.incoming(listener, { channels: 2, maxRamBytes })), "QEMU incoming", 5)
        expect([(qemu as MigrationError.MigrationError).reason, qemu.message]).toEqual(["BadOptions", why])
        const snapshot = yield* Effect.flip(Snapshot.restore("/nonexistent.snap", { maxRamBytes }))
        expect([snapshot.reason, snapshot.message]).toEqual(["Unsupported", `snapshot /nonexistent.snap: ${why}`])
        const file = yield* Effect.flip(MappedRam.read("/nonexistent.vm", { maxRamBytes }))
        expect([file.reason, file.message]).toEqual(["Unsupported", `/nonexistent.vm: ${why}`])
      })))
  }
})

/**
 * A layout of 4 GiB blocks (the largest a block may be) that is more than this machine has available: touching it
 * all ran into the out-of-memory killer (or swap) wherever the machine's limit was not the caller's `maxRamBytes`.
 */
const moreThanAvailable = () => {
  const blocks = Math.ceil((process.availableMemory() + 2 ** 30) / GuestRam.MAX_BLOCK_SIZE)
  return Array.from({ length: blocks }, (_, i) => ({ name: `ram${i}`, size: GuestRam.MAX_BLOCK_SIZE }))
}

describe("memory that is more than the machine has available is refused before it is allocated", () => {
  it.effect("GuestRam.make: OutOfMemory, saying how much was asked and how much there is", () =>
    Effect.gen(function*() {
      const blocks = moreThanAvailable()
      const error = yield* Effect.flip(GuestRam.make({ blocks }))
      expect(error.reason).toBe("OutOfMemory")
      expect(error.message).toMatch(
        new RegExp(`^${blocks.length * GuestRam.MAX_BLOCK_SIZE} bytes \\(${blocks.length * 4}\\.00 GiB\\) of memory are more than this machine has available \\(\\d+\\.\\d\\d GiB\\)$`)
      )
    }))

  it.live("incoming under a memory limit above what the machine has: the hello is refused, the source told why", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.fork(Effect.flip(Migration.incoming(listener, { maxRamBytes: 2 ** 50 })))
      const control = yield* Transport.connect(listener.address)
      const magic = Buffer.alloc(4)
      magic.writeUInt32BE(Control.MAGIC, 0)
      yield* control.write([magic, Control.encode(new Control.Hello({
        version: Control.VERSION,
        uuid: "6f0d3c2e-8a1b-4c5d-9e7f-0a1b2c3d4e5f",
        pageSize: 4096,
        channels: 1,
        compression: "none",
        zeroPage: "multifd",
        blocks: moreThanAvailable()
      }))])
      const answer = yield* noHang(Control.receive(control), "the destination's answer", 10)
      expect(answer._tag).toBe("Reject")
      expect(answer._tag === "Reject" && answer.reason).toMatch(/of memory are more than this machine has available/)
      const error = yield* noHang(Fiber.join(destination), "incoming", 10)
      expect([(error as MigrationError.MigrationError).reason, error.message]).toEqual([
        "Rejected",
        expect.stringMatching(/refused the migration: .* more than this machine has available/)
      ])
    }))))
})

describe("durations, rounds and policies are checked before anything connects", () => {
  const bad = [
    [{ timeouts: { peer: 0 } }, "timeouts.peer must be more than 0, not 0"],
    [{ timeouts: { connect: -1 } }, "timeouts.connect -1 is not a duration of 0 or more"],
    [{ timeouts: { handshake: "soon" as never } }, `timeouts.handshake "soon" is not a duration of 0 or more`],
    [{ timeouts: { peer: {} as never } }, "timeouts.peer (an object) is not a duration of 0 or more"],
    [{ timeouts: { peer: Number.NaN } }, "timeouts.peer NaN is not a duration of 0 or more"],
    [{ live: { maxRounds: -1 } }, "live.maxRounds must be a whole number of 0 or more, not -1"],
    [{ live: { maxRounds: 2.5 } }, "live.maxRounds must be a whole number of 0 or more, not 2.5"],
    [{ live: { onNoConvergence: "maybe" as never } }, `live.onNoConvergence "maybe" is not fail or switchover`],
    [{ live: { maxDuration: "-5 seconds" } }, `live.maxDuration "-5 seconds" is not a duration of 0 or more`],
    [{ reconnect: { attempts: 3, within: "0 seconds" } }, `reconnect.within must be more than 0, not "0 seconds"`],
    // the window goes to the destination in the hello, as JSON (where Infinity is null: the hello was refused,
    // and the source failed saying the destination "may use TLS, or not be a multifd destination")
    [{ reconnect: { attempts: 3, within: Duration.infinity } }, "reconnect.within must be finite, not Infinity"],
    [{ reconnect: { attempts: 3, within: Number.POSITIVE_INFINITY } }, "reconnect.within must be finite, not Infinity"],
    // a timeout no timer waits for was taken: a peer gone silent (a path that drops everything) hung the migration
    [{ timeouts: { peer: Number.POSITIVE_INFINITY } }, "timeouts.peer must be finite, at most 24 days (the longest a timer waits), not Infinity"],
    [{ timeouts: { handshake: Duration.infinity } }, "timeouts.handshake must be finite, at most 24 days (the longest a timer waits), not Infinity"],
    [{ timeouts: { connect: "30 days" } }, `timeouts.connect must be finite, at most 24 days (the longest a timer waits), not "30 days"`]
  ] as const
  for (const [options, message] of bad) {
    it.live(`migrate ${JSON.stringify(options)}: BadOptions, "${message}"`, () =>
      leakFree(Effect.gen(function*() {
        // a listener nobody answers: BadOptions comes before the connect
        const listener = yield* Transport.listen(tcp0)
        const ram = yield* GuestRam.make({ blocks: [{ name: "ram", size: 64 * 1024 }] })
        const error = yield* noHang(
          Effect.flip(Migration.migrate({ address: listener.address, ...options }).pipe(
            Effect.provide(Transport.layer),
            Effect.provideService(GuestRam.GuestRam, ram)
          )),
          "migrate",
          5
        )
        expect(error).toBeInstanceOf(MigrationError.MigrationError)
        expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
        expect(error.message).toBe(message)
      })))
  }

  it.live("incoming { timeouts: { peer: 0 } }: BadOptions before it accepts", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const error = yield* noHang(Effect.flip(Migration.incoming(listener, { timeouts: { peer: 0 } })), "incoming", 5)
      expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
      expect(error.message).toBe("timeouts.peer must be more than 0, not 0")
    })))

  // a handshake timeout of Infinity let strangers that say nothing hold the listener's places (Acceptor.MAX_CANDIDATES)
  // for ever, and a real source wait behind them for ever
  it.live("incoming { timeouts: { handshake: Infinity } }: BadOptions before it accepts", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const error = yield* noHang(
        Effect.flip(Migration.incoming(listener, { timeouts: { handshake: Number.POSITIVE_INFINITY } })),
        "incoming",
        5
      )
      expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
      expect(error.message).toBe("timeouts.handshake must be finite, at most 24 days (the longest a timer waits), not Infinity")
    })))

  /**
   * acceptTimeout was not checked with the timeouts: 0 or a negative number failed at once "timed out after 0
   * waiting for a source to connect", a malformed one was a defect (a stack trace); an expectation no source can
   * meet (expect.channels 0) refused every source while the destination waited for ever.
   */
  const badIncoming = [
    [{ acceptTimeout: 0 }, "acceptTimeout must be more than 0, not 0"],
    [{ acceptTimeout: -5 }, "acceptTimeout -5 is not a duration of 0 or more"],
    [{ acceptTimeout: "soon" as never }, `acceptTimeout "soon" is not a duration of 0 or more`],
    [{ expect: { channels: 0 } }, "expect.channels must be between 1 and 255, not 0"],
    [{ expect: { pageSize: 3000 } }, "expect.pageSize must be a power of two between 512 and 524288, not 3000"],
    [{ expect: { compression: "lz4" as never } }, `expect.compression "lz4" is not one of none, zlib, zstd`],
    [{ expect: { zeroPage: "auto" as never } }, `expect.zeroPage "auto" is not multifd or none`]
  ] as const
  for (const [options, message] of badIncoming) {
    it.live(`incoming ${JSON.stringify(options)}: BadOptions before it accepts`, () =>
      leakFree(Effect.gen(function*() {
        const listener = yield* Transport.listen(tcp0)
        const error = yield* noHang(Effect.flip(Migration.incoming(listener, options)), "incoming", 5)
        expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
        expect(error.message).toBe(message)
      })))
  }

  it.live("QemuIncoming.incoming { acceptTimeout: 0 }: BadOptions before it accepts", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const error = yield* noHang(
        Effect.flip(QemuIncoming.incoming(listener, { channels: 2, acceptTimeout: 0 })),
        "QEMU incoming",
        5
      )
      expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
      expect(error.message).toBe("acceptTimeout must be more than 0, not 0")
    })))

  // a page size no QEMU has was taken, and the first QEMU to connect was blamed for it: 'QEMU main channel: unknown
  // RAM record RAM_SAVE_FLAG_MEM_SIZE|unknown bits 0x400000' (0, -1, 2^40, 1.5), '... is not a positive multiple
  // of the page size 3000' (3000)
  for (const pageSize of [0, -1, 3000, 1.5, 2 ** 40]) {
    it.live(`QemuIncoming.incoming { pageSize: ${pageSize} } and MappedRam.read: BadOptions / Unsupported before anything connects or is read`, () =>
      leakFree(Effect.gen(function*() {
        const listener = yield* Transport.listen(tcp0)
        const error = yield* noHang(Effect.flip(QemuIncoming.incoming(listener, { channels: 2, pageSize })), "QEMU incoming", 5)
        expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
        expect(error.message).toBe(`pageSize must be a power of two between 512 and 524288, not ${pageSize}`)
        const read = yield* Effect.flip(MappedRam.read("/nonexistent/vm.file", { pageSize }))
        expect(read).toMatchObject({ reason: "Unsupported" })
        expect(read.message).toContain(`pageSize must be a power of two between 512 and 524288, not ${pageSize}`)
      })))
  }

  // a method that does not exist was taken, and QEMU's packets then failed 'bad payload: zstd: Unknown frame
  // descriptor'; a uuid not of 16 bytes turned every channel of QEMU away ('bad uuid') until the peer timeout
  const badQemuIncoming = [
    [{ compression: "lz4" as never }, `compression "lz4" is not one of none, zlib, zstd`],
    [{ uuid: new Uint8Array(8) }, "uuid must be 16 bytes (QEMU's -uuid), not 8 bytes"],
    [{ uuid: "6c1bd8a6-4a6e-4c1f-9d36-1f0e3a2b5c7d" as never }, "uuid must be 16 bytes (QEMU's -uuid), not string"]
  ] as const
  for (const [options, message] of badQemuIncoming) {
    it.live(`QemuIncoming.incoming ${JSON.stringify(options)}: BadOptions before it accepts`, () =>
      leakFree(Effect.gen(function*() {
        const listener = yield* Transport.listen(tcp0)
        const error = yield* noHang(Effect.flip(QemuIncoming.incoming(listener, { channels: 2, ...options })), "QEMU incoming", 5)
        expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
        expect(error.message).toBe(message)
      })))
  }

  it.live("the accepted forms still pass: numbers of milliseconds, Durations, strings; an acceptTimeout of Infinity (for ever, the default)", () =>
    Effect.sync(() => {
      expect(Transfer.checkTimeouts({ connect: 1, handshake: Duration.seconds(1), peer: "1 minute" })).toBeUndefined()
      expect(Transfer.checkTimeouts({ peer: Transfer.MAX_TIMEOUT_MS })).toBeUndefined()
      expect(Transfer.checkAcceptTimeout(Duration.infinity)).toBeUndefined()
      expect(Transfer.checkLive({ maxRounds: 0, maxDuration: 0, downtimeLimit: "0 millis", onNoConvergence: "switchover" }))
        .toBeUndefined()
    }))
})

describe("the end of a migration is bounded by the peer timeout (TestClock)", () => {
  const TIMEOUTS = { connect: "1 hour", handshake: "1 hour", peer: "30 seconds" } as const

  /**
   * A fake destination that keeps every connection open: it accepts the hello, drains the channels,
   * acknowledges each flush, answers Complete with Done, and then only reads.
   */
  const destination = (listener: Transport.Listener) =>
    Effect.gen(function*() {
      const control = yield* listener.accept
      yield* control.read(4)
      const hello = yield* Control.receive(control)
      if (hello._tag !== "Hello") return yield* Effect.die(new Error(`a ${hello._tag} message instead of Hello`))
      yield* Control.send(control, new Control.Accept())
      for (let i = 0; i < hello.channels; i++) {
        yield* Effect.forkScoped(Effect.ignore(Effect.forever((yield* listener.accept).read(64))))
      }
      while (true) {
        const message = yield* Control.receive(control)
        if (message._tag === "Flush") yield* Control.send(control, new Control.FlushAck({ round: message.round }))
        if (message._tag === "Complete") yield* Control.send(control, new Control.Done())
      }
    }).pipe(Effect.ignore, Effect.scoped)

  const stuckAt = (stuck: (index: number) => boolean, message: string) =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      yield* Effect.forkScoped(destination(listener))
      const reached = yield* Deferred.make<void>()
      const source = yield* Effect.forkScoped(
        Migration.migrate({ address: listener.address, channels: 2, timeouts: TIMEOUTS }).pipe(
          Effect.provide(stuckEnds(stuck, reached)),
          Effect.provideService(GuestRam.GuestRam, ram)
        )
      )
      yield* noHang(Deferred.await(reached), "the stuck end")
      const waited = yield* advanceUntilDone(source)
      const error = failureOf(yield* Fiber.await(source))
      expect((error as MigrationError.MigrationError).reason).toBe("Timeout")
      expect(error.message).toBe(message)
      expect(waited).toBeGreaterThanOrEqual(29_000)
      expect(waited).toBeLessThanOrEqual(31_000)
      // the failed source opened the write gate again
      yield* noHang(GuestRam.write(ram, "pc.ram", 0, Buffer.from([1, 2, 3])), "a write after the failure", 2)
    }))

  it.effect("a multifd channel whose end never completes (send.finish): Timeout after the peer timeout", () =>
    stuckAt((k) => k === 2, "timed out after 30s waiting for the multifd channels to send their last bytes and close"))

  it.effect("a main channel whose end never completes (control.end): Timeout after the peer timeout", () =>
    stuckAt((k) => k === 0, "timed out after 30s waiting for the main channel to send its last bytes and close"))
})

describe("MultifdRecv.adopt reads an init packet within the handshake timeout (TestClock)", () => {
  it.effect("a connection that sends 10 of the 64 bytes and then nothing: Timeout after the handshake timeout", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", size: 16 * PAGE }] })
      const recv = yield* MultifdRecv.make({
        channels: 1,
        uuid: undefined,
        ram,
        compression: "none",
        handshakeTimeout: "10 seconds"
      })
      const stream = new PassThrough()
      const connection = yield* Transport.fromStream(stream, "a silent peer")
      stream.write(Buffer.alloc(10))
      const adopting = yield* Effect.fork(recv.adopt(connection))
      const waited = yield* advanceUntilDone(adopting)
      const error = failureOf(yield* Fiber.await(adopting))
      expect((error as MigrationError.MigrationError).reason).toBe("Timeout")
      expect(error.message).toBe("timed out after 10s waiting for the multifd init packet of a silent peer")
      expect(waited).toBeGreaterThanOrEqual(9_000)
      expect(waited).toBeLessThanOrEqual(11_000)
      // nothing was adopted: the set is still waiting for its channel, and has not failed
      expect((yield* recv.stats).channels).toBe(0)
      expect(Option.isNone(yield* Effect.either(recv.failure).pipe(Effect.timeoutOption("0 millis")))).toBe(true)
    })))
})

describe("a channel set's waits run uninterruptibly (a finalizer, a store step's commit) end", () => {
  it.live("MultifdSend's established, sync and finish, and MultifdRecv's adopted, sync and finalSync, each run uninterruptibly", () =>
    leakFree(Effect.gen(function*() {
      const uuid = Protocol.parseUuid(Crypto.randomUUID())!
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", size: 16 * PAGE }] })
      const recv = yield* MultifdRecv.make({ channels: 2, uuid, ram, compression: "none", handshakeTimeout: "10 seconds" })
      const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
      yield* Effect.forkScoped(Effect.forever(Effect.flatMap(listener.accept, (c) => Effect.forkScoped(recv.adopt(c)))))
      const send = yield* MultifdSend.make({
        address: listener.address,
        channels: 2,
        uuid,
        pageSize: PAGE,
        compression: "none",
        zeroPage: "multifd",
        connectTimeout: "10 seconds"
      }).pipe(Effect.provide(Transport.layer))
      // each raced its wait against the set's failure, which had inherited the uninterruptibility and never came:
      // the race waited for that loser for ever
      const both = <A, B>(a: Effect.Effect<A, unknown>, b: Effect.Effect<B, unknown>, what: string) =>
        // awaited in a daemon fiber: an uninterruptible fiber that hung would hold up the test's own end
        Effect.flatMap(
          Effect.forkDaemon(Effect.all([Effect.uninterruptible(a), Effect.uninterruptible(b)], { concurrency: 2 })),
          (fiber) => noHang(Fiber.join(fiber), what)
        )
      yield* both(send.established, recv.adopted, "established / adopted, uninterruptibly")
      yield* both(send.sync, recv.sync, "sync, uninterruptibly")
      yield* both(send.sync, recv.finalSync, "the final sync, uninterruptibly")
      yield* both(send.finish, Effect.void, "finish, uninterruptibly")
    }).pipe(Effect.scoped)))
})
