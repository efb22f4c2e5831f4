/**
 * Channel loss survival (issue 14): a multifd channel whose connection breaks mid-migration is re-attached
 * (same id, a new connection announced on the main channel with a nonce its init packet must carry) and the
 * pages the destination has not got before one of the channel's SYNCs are resent.
 *
 * - a live migration with a writer running, channel k cut in every round at a point chosen by a seeded plan
 *   (inside a packet, between two packets of a hand-off, between the last packet and the SYNC, between the
 *   SYNC and the round's acknowledgement): the memories are equal, every cut was one reconnect, nothing leaks;
 * - the attempts running out fails the migration naming the channel and the cause (and leaks nothing);
 * - strangers re-attaching a channel (this migration's uuid, a wrong nonce; another uuid) are turned away and
 *   the migration completes.
 *
 * Nothing waits on a timer: `noHang` guards turn a hang into a failure.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as LogLevel from "effect/LogLevel"
import * as TestClock from "effect/TestClock"
import * as Crypto from "node:crypto"
import * as Net from "node:net"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as Protocol from "../src/Protocol.js"
import * as Transport from "../src/Transport.js"
import { advanceUntil } from "./support/clock.js"
import { fakeDestination } from "./support/fakeDestination.js"
import { fakeSource, ramPacket, randomPage, syncPacket } from "./support/fakeSource.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import * as Faulty from "./support/faultyTransport.js"
import { noHang } from "./support/guards.js"
import { leakFree, nextTurn } from "./support/handles.js"
import { mixedImage } from "./support/images.js"
import { sameMemory } from "./support/memory.js"

const PAGE = 4096
const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

type Ram = GuestRam.GuestRam["Type"]

/** 2 MiB + 512 KiB, about one page in five zero. */
const sourceRam = () =>
  GuestRam.make({
    blocks: [{ name: "pc.ram", bytes: mixedImage(512, 0.8, PAGE) }, { name: "vga.vram", bytes: mixedImage(128, 0.8, PAGE) }]
  })

/** A destination on `faulty`'s listener in a fiber of the caller's scope; what it logs is kept. */
const startDestination = (faulty: Faulty.Faulty) =>
  Effect.gen(function*() {
    const logs: Array<string> = []
    const bound = yield* Deferred.make<Transport.Address, Transport.TransportError>()
    const destination = Effect.scoped(Effect.gen(function*() {
      const listener = yield* faulty.transport.listen(tcp0).pipe(Effect.tapError((e) => Deferred.fail(bound, e)))
      yield* Deferred.succeed(bound, listener.address)
      return yield* Migration.incoming(listener, { timeouts: TIMEOUTS })
    }))
    const fiber = yield* Effect.forkScoped(Effect.provide(
      destination,
      Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => logs.push(String(message))))
    ).pipe(Logger.withMinimumLogLevel(LogLevel.Debug)))
    return { fiber, address: yield* Deferred.await(bound), logs }
  })

const migrateWith = (faulty: Faulty.Faulty, ram: Ram, options: Migration.MigrateOptions, logs: Array<string> = []) =>
  Migration.migrate({ timeouts: TIMEOUTS, ...options }).pipe(
    Effect.provide(faulty.layer),
    Effect.provideService(GuestRam.GuestRam, ram),
    Effect.provide(Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => logs.push(String(message)))))
  )

/** A writer cycling over `pages` pages of the first block, yielding after each write. */
const startWriter = (ram: Ram, pages: number) =>
  Effect.gen(function*() {
    const count = { n: 0 }
    const data = Buffer.alloc(100)
    const once = Effect.suspend(() => {
      data.fill(count.n & 255)
      const i = count.n++
      return GuestRam.write(ram, "pc.ram", ((i * 7) % pages) * PAGE + ((i * 100) % (PAGE - 100)), data)
    })
    yield* Effect.forkScoped(Effect.forever(Effect.zipRight(once, Effect.yieldNow())))
    return count
  })

/** A small deterministic generator (mulberry32): the same seed, the same cuts. */
const random = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0
  let t = seed
  t = Math.imul(t ^ (t >>> 15), t | 1)
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

type Mode = "inside a packet" | "between two packets of a hand-off" | "before the SYNC" | "after the SYNC"
const MODES: ReadonlyArray<Mode> = ["inside a packet", "between two packets of a hand-off", "before the SYNC", "after the SYNC"]

/**
 * Cuts `channel` once in every round (rounds counted by the SYNC packets it handed over), each round at a
 * point of the mode the seeded plan picks; a round whose mode found no place before its SYNC is cut at the
 * SYNC. Records what it cut.
 */
const everyRound = (channel: number, seed: number) => {
  const next = random(seed)
  const state = { syncs: 0, cutRound: -1, modes: [] as Array<Mode> }
  let mode: Mode = MODES[Math.floor(next() * MODES.length)]!
  // data writes of the channel in this round
  let writes = 0
  const cutWrite = (write: Faulty.CutWrite): number | undefined => {
    if (write.channel !== channel) return undefined
    const sync = write.packets.some((p) => p.sync)
    const cut = (keep: number, as: Mode) => {
      state.cutRound = state.syncs
      state.modes.push(as)
      if (sync && keep === write.bytes) state.syncs++
      mode = MODES[Math.floor(next() * MODES.length)]!
      return keep
    }
    if (state.cutRound !== state.syncs) {
      if (!sync && write.packets.length > 0) {
        writes++
        if (mode === "inside a packet") {
          // any byte but a packet's first
          const boundaries = new Set(write.packets.map((p) => p.at))
          let keep = 1 + Math.floor(next() * (write.bytes - 1))
          while (boundaries.has(keep)) keep++
          return cut(keep, mode)
        }
        if (mode === "between two packets of a hand-off") {
          // inside one vectored write of several packets, or before the second write of a round
          if (write.packets.length > 1) {
            return cut(write.packets[1 + Math.floor(next() * (write.packets.length - 1))]!.at, mode)
          }
          if (writes > 1) return cut(0, mode)
        }
      }
      if (sync) return mode === "after the SYNC" ? cut(write.bytes, mode) : cut(0, "before the SYNC")
    }
    if (sync) {
      state.syncs++
      writes = 0
    }
    return undefined
  }
  return { cutWrite, state }
}

/** The kinds of point the live cases cut at (the seeds are chosen so that together they cut at every kind). */
const seenModes = new Set<Mode>()

describe("a lost channel is re-attached", () => {
  const cases = [
    { name: "2 channels, uncompressed, channel 1", channels: 2, channel: 1, compression: "none", seed: 1 },
    { name: "3 channels, uncompressed, channel 0", channels: 3, channel: 0, compression: "none", seed: 7 },
    { name: "2 channels, zstd, channel 0", channels: 2, channel: 0, compression: "zstd", seed: 3 }
  ] as const
  for (const c of cases) {
    it.live(`${c.name}: cut in every round of a live migration, the memories are equal`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        const plan = everyRound(c.channel, c.seed)
        const faulty = yield* Faulty.make({ cutWrite: plan.cutWrite })
        const dest = yield* startDestination(faulty)
        const writes = yield* startWriter(ram, 300)
        const logs: Array<string> = []
        const exit = yield* noHang(
          Effect.exit(migrateWith(faulty, ram, {
            address: dest.address,
            channels: c.channels,
            compression: c.compression,
            live: { downtimeLimit: 0, maxRounds: 4, onNoConvergence: "switchover" }
          }, logs)),
          "migrate"
        )
        if (Exit.isFailure(exit)) {
          throw new Error(`${Cause.pretty(exit.cause)}\nsource:\n${logs.join("\n")}\ndestination:\n${dest.logs.join("\n")}`)
        }
        const stats = exit.value
        for (const mode of plan.state.modes) seenModes.add(mode)
        const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
        // the writer waits at the closed gate: the source is frozen, and the destination has it all
        expect(writes.n).toBeGreaterThan(0)
        expect(sameMemory(received.ram, ram)).toBe(true)
        expect(stats.rounds).toBe(5)
        // a cut in every round (a round whose SYNC went twice counts twice), each one reconnect
        expect(plan.state.modes.length).toBeGreaterThanOrEqual(stats.rounds - 1)
        expect(stats.reconnects).toBe(plan.state.modes.length)
        expect(faulty.records.filter((r) => r.cut)).toHaveLength(plan.state.modes.length)
        // pages the destination had not got before a SYNC went again
        if (plan.state.modes.some((m) => m === "inside a packet" || m === "between two packets of a hand-off")) {
          expect(stats.resentPages).toBeGreaterThan(0)
        }
        // every connection of the channel after the first re-attached with its nonce
        expect(dest.logs.filter((l) => l.includes("re-attaching after"))).toHaveLength(plan.state.modes.length)
        expect(received.stats.reconnects).toBe(plan.state.modes.length)
        // every fiber's end was someone's business (Effect logs one that failed unobserved)
        expect([...logs, ...dest.logs].filter((l) => l.includes("unhandled"))).toEqual([])
      })))
  }

  it("between them, the cases above cut at every kind of point", () => {
    expect([...seenModes].sort()).toEqual([...MODES].sort())
  })

  it.live("the attempts run out: the migration fails naming the channel and the cause", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      // channel 1: every connection is cut inside its first data packet
      const faulty = yield* Faulty.make({
        cutWrite: (w) => w.channel === 1 && w.packets.length > 0 ? 100 : undefined
      })
      const dest = yield* startDestination(faulty)
      const exit = yield* noHang(
        Effect.exit(migrateWith(faulty, ram, { address: dest.address, channels: 2, reconnect: 2 })),
        "migrate"
      )
      const error = failureOf(exit)
      expectOneLine(error)
      expect(error).toBeInstanceOf(MigrationError.ChannelError)
      expect((error as MigrationError.ChannelError).channel).toBe(1)
      expect(error.message).toContain("multifd channel 1: ")
      expect(error.message).toContain("fault injection")
      // the first connection and two more, each cut
      expect(faulty.records.filter((r) => r.side === "connect" && r.role === 1 && r.cut)).toHaveLength(3)
      const destExit = yield* noHang(Fiber.await(dest.fiber), "incoming")
      expect(Exit.isFailure(destExit)).toBe(true)
    })))

  it.live("reconnect 0: a lost channel fails the migration, naming it", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make({ cutWrite: (w) => w.channel === 0 && w.packets.length > 0 ? 2000 : undefined })
      const dest = yield* startDestination(faulty)
      const exit = yield* noHang(
        Effect.exit(migrateWith(faulty, ram, { address: dest.address, channels: 2, reconnect: 0 })),
        "migrate"
      )
      const error = failureOf(exit)
      expect(error.message).toContain("multifd channel 0: ")
      expect(faulty.records.filter((r) => r.side === "connect" && r.role === 0)).toHaveLength(1)
      yield* noHang(Fiber.await(dest.fiber), "incoming")
    })))

  it.live("a channel lost while the destination stores the memory (every page verified, Done not yet said): both succeed", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make()
      const listener = yield* faulty.transport.listen(tcp0)
      // the store step (an image written and synced, say): meanwhile channel 1's connection is reset
      const store = () =>
        Effect.sync(() => {
          const channel1 = faulty.records.find((r) => r.side === "accept" && r.role === 1)!
          ;(channel1.stream as Net.Socket).resetAndDestroy()
        })
      const dest = yield* Effect.forkScoped(
        Migration.incoming(listener, { timeouts: TIMEOUTS, store }).pipe(Effect.provide(Logger.remove(Logger.defaultLogger)))
      )
      const stats = yield* noHang(migrateWith(faulty, ram, { address: listener.address, channels: 2 }), "migrate")
      const received = yield* noHang(Fiber.join(dest), "incoming")
      expect(sameMemory(received.ram, ram)).toBe(true)
      expect(received.stats.uuid).toBe(stats.uuid)
    })))

  it.live("strangers re-attaching a channel (a wrong nonce, another uuid) are turned away; the migration completes", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      // the source's channel 1 is cut once; its new connection (connect #3: main, channels 0 and 1, then it)
      // waits until two strangers have tried to take channel 1's place
      const faulty = yield* Faulty.make({
        cutWrite: (w) => w.channel === 1 && w.connection === 0 && w.packets.length > 0 ? 500 : undefined,
        stallConnect: (index) => index === 3
      })
      const dest = yield* startDestination(faulty)
      const port = (dest.address as { readonly port: number }).port
      /** A connection that sends `init` and waits until the destination closes it. */
      const stranger = (init: Buffer) =>
        Effect.async<void>((resume) => {
          const socket = Net.connect(port, "127.0.0.1", () => socket.write(init))
          socket.on("error", () => {})
          socket.on("close", () => resume(Effect.void))
          return Effect.sync(() => socket.destroy())
        })
      const migration = yield* Effect.fork(migrateWith(faulty, ram, { address: dest.address, channels: 2 }))
      // the source announced the re-attach (the destination accepts again) and connects
      yield* noHang(faulty.until((f) => f.attempts.some((a) => a.index === 3 && a.state === "stalled")), "the re-attach")
      const uuid = Protocol.parseUuid(/migration ([0-9a-f-]{36})/.exec(dest.logs.join("\n"))?.[1] ?? "")!
      const wrongNonce = Protocol.encodeInit({ uuid, id: 1, nonce: Crypto.randomBytes(16) })
      const noNonce = Protocol.encodeInit({ uuid, id: 1 })
      const otherUuid = Protocol.encodeInit({ uuid: Crypto.randomBytes(16), id: 1, nonce: Crypto.randomBytes(16) })
      yield* noHang(
        Effect.all([stranger(wrongNonce), stranger(noNonce), stranger(otherUuid)], { concurrency: "unbounded" }),
        "the strangers turned away"
      )
      yield* faulty.release
      const stats = yield* noHang(Fiber.join(migration), "migrate")
      const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(received.ram, ram)).toBe(true)
      expect(stats.reconnects).toBe(1)
      // the two strangers with this uuid (and the source's lost connection itself, when its init packet had
      // not been read before the re-attach was announced: it comes too late to be channel 1)
      const unauthorized = received.rejected.filter((r) => r.includes("without the main channel's authorization"))
      expect(unauthorized.length).toBeGreaterThanOrEqual(2)
      expect(unauthorized.length).toBeLessThanOrEqual(3)
      expect(received.rejected.filter((r) => r.includes("is not this migration's"))).toHaveLength(1)
      expect(received.rejected).toHaveLength(unauthorized.length + 1)
    })))
})

describe("a channel quiet between packets while it owes the round's SYNC (a fake source, TestClock)", () => {
  /**
   * A destination behind a fake source that re-attaches lost channels: channel 1 sends one whole packet and
   * falls quiet, channel 0 its SYNC (the barrier waits for channel 1's), and with `flush` the source says
   * Flush (it has written every SYNC). The destination's `Lost` messages are collected.
   */
  const quietChannel = (paced: boolean, flush: boolean) =>
    Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS }))
      const src = yield* fakeSource(listener.address, 2, "none", true, { reconnectMs: 10_000, ...(paced ? { paced: true } : {}) })
      const lost: Array<number> = []
      yield* Effect.forkScoped(Effect.forever(Effect.map(Control.receive(src.control), (message) => {
        if (message._tag === "Lost") lost.push(message.channel)
      })))
      const c0 = yield* src.channel(0)
      const c1 = yield* src.channel(1)
      yield* c1.write(ramPacket([{ offset: 0, bytes: randomPage() }]))
      yield* c0.write([syncPacket()])
      if (flush) yield* src.control.write([Control.encode(new Control.Flush({ round: 0, final: false }))])
      return { lost, t0: yield* TestClock.currentTimeMillis }
    })

  it.effect("another channel at the barrier: after half the peer timeout the destination says channel 1 is lost", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const { lost, t0 } = yield* quietChannel(false, false)
      yield* advanceUntil(Effect.sync(() => lost.length > 0), "Lost")
      expect(lost).toEqual([1])
      const waited = (yield* TestClock.currentTimeMillis) - t0
      expect(waited).toBeGreaterThanOrEqual(1_000)
      expect(waited).toBeLessThanOrEqual(1_600)
    }))))

  it.effect("a source held back by a bandwidth limit (paced): quiet is no sign of a silent path until it says Flush", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const { lost } = yield* quietChannel(true, false)
      // longer than the stall watch takes (1–1.25 s), shorter than the destination's own peer timeout (2 s)
      for (let i = 0; i < 17; i++) yield* Effect.zipRight(TestClock.adjust("100 millis"), nextTurn)
      expect(lost).toEqual([])
    }))))

  it.effect("a paced source that said Flush (its SYNCs are written): the destination says channel 1 is lost", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const { lost, t0 } = yield* quietChannel(true, true)
      yield* advanceUntil(Effect.sync(() => lost.length > 0), "Lost")
      expect(lost).toEqual([1])
      expect((yield* TestClock.currentTimeMillis) - t0).toBeLessThanOrEqual(1_600)
    }))))
})

describe("a source's hello (a fake destination)", () => {
  it.live("a source says paced in its hello when a bandwidth limit holds its channels back, and only then", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const ram = yield* sourceRam()
      for (const maxBandwidth of [undefined, 1024 * 1024 * 1024]) {
        const hellos: Array<Control.Hello> = []
        const address = yield* fakeDestination({ heartbeats: true, onHello: (hello) => hellos.push(hello) })
        yield* noHang(
          Migration.migrate({ address, channels: 2, timeouts: TIMEOUTS, maxBandwidth }).pipe(
            Effect.provide(Transport.layer),
            Effect.provideService(GuestRam.GuestRam, ram)
          ),
          "migrate"
        )
        expect(hellos.map((hello) => hello.paced)).toEqual([maxBandwidth === undefined ? undefined : true])
      }
    }))))
})

describe("the reconnect budget (TestClock)", () => {
  /** Longer than the clock is moved: only the budget's window is at stake. */
  const LONG = { connect: "60 seconds", handshake: "60 seconds", peer: "60 seconds" } as const

  /** A destination (its log silenced) and a source of 2 channels over `faulty`, with 3 reconnects within 10 s. */
  const startBoth = (faulty: Faulty.Faulty, ram: GuestRam.GuestRam["Type"]) =>
    Effect.gen(function*() {
      const listener = yield* faulty.transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(
        Migration.incoming(listener, { timeouts: LONG }).pipe(Effect.provide(Logger.remove(Logger.defaultLogger)))
      )
      const migration = yield* Effect.fork(migrateWith(faulty, ram, {
        address: listener.address,
        channels: 2,
        timeouts: LONG,
        reconnect: { attempts: 3, within: "10 seconds" }
      }))
      return { destination, migration }
    })

  /**
   * Channel 1 cut inside its first data packet, and every connect from then on refused while `blip.on` (a path that
   * refuses new connections for a while: a firewall reloading, a route flapping), with 3 attempts within 10 s.
   */
  const blipped = (blip: { on: boolean }) =>
    Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make({
        cutWrite: (w) => w.channel === 1 && w.connection === 0 && w.packets.length > 0 ? 100 : undefined,
        failConnect: (index) =>
          index >= 3 && blip.on
            ? new Transport.TransportError({ reason: "Connect", address: "tcp:127.0.0.1:1", detail: "connection refused" })
            : undefined
      })
      const { destination, migration } = yield* startBoth(faulty, ram)
      // the first re-attach, at once, refused
      yield* noHang(faulty.until((f) => f.attempts.some((a) => a.index === 3 && a.state === "failed")), "the first re-attach")
      return { ram, faulty, destination, migration }
    })

  // the attempts came 0, 0.1 and 0.3 s after the loss: a path that refused connections for a second failed the
  // migration with 9.7 s of its 10 s window unused
  it.effect("a path refusing connections for 2 s after the loss: the attempts back off (0, 1, 3 s), and the third re-attaches", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const blip = { on: true }
      const { destination, faulty, migration, ram } = yield* blipped(blip)
      // two seconds of refusals, a tenth at a time (each followed by a turn of the event loop)
      for (let i = 0; i < 20; i++) {
        yield* TestClock.adjust("100 millis")
        yield* nextTurn
      }
      expect(faulty.attempts.filter((a) => a.index >= 3).map((a) => a.state)).toEqual(["failed", "failed"])
      blip.on = false
      yield* advanceUntil(Effect.map(migration.poll, (done) => done._tag === "Some"), "the migration")
      const stats = yield* Fiber.join(migration)
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expect(stats.reconnects).toBe(1)
      expect(faulty.attempts.filter((a) => a.index >= 3).map((a) => a.state)).toEqual(["failed", "failed", "connected"])
      expect(sameMemory(received.ram, ram)).toBe(true)
    }))))

  // the error was the last attempt's alone ("multifd channel 1: ...: connection refused"): nothing said that the
  // channel had been lost, nor that it had been tried again, how often and how long
  it.effect("a path refusing connections for longer: the error says the channel was lost and how often and how long it was tried", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const { destination, migration } = yield* blipped({ on: true })
      yield* advanceUntil(Effect.map(migration.poll, (done) => done._tag === "Some"), "the migration")
      const error = failureOf(yield* Fiber.await(migration))
      expectOneLine(error)
      expect(error).toBeInstanceOf(MigrationError.ChannelError)
      expect(error.message).toBe(
        "multifd channel 1: tcp:127.0.0.1:1: connection refused (lost, and not back after 3 reconnect attempts in 3 s: the last one's error)"
      )
      yield* Fiber.await(destination)
    }))))

  it.effect("a second break of a re-attached channel, later than `within` after the first, in the same round: re-attached again", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const ram = yield* sourceRam()
      // channel 1's first connection is cut inside its first data packet, and so is its second (the re-attach,
      // connect #3: main, channels 0 and 1, then it), which connects 11 s later
      const faulty = yield* Faulty.make({
        cutWrite: (w) => w.channel === 1 && w.connection < 2 && w.packets.length > 0 ? 100 : undefined,
        stallConnect: (index) => index === 3
      })
      const { destination, migration } = yield* startBoth(faulty, ram)
      yield* noHang(faulty.until((f) => f.attempts.some((a) => a.index === 3 && a.state === "stalled")), "the re-attach")
      yield* TestClock.adjust("11 seconds")
      yield* faulty.releaseOne(3)
      // before: the second break was counted in the first one's window, run out by then: the migration failed at
      // once ("giving up after 1 reconnect attempts"), 2 attempts of 3 unused
      const stats = yield* noHang(Fiber.join(migration), "migrate")
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expect(stats.reconnects).toBe(2)
      expect(faulty.records.filter((r) => r.side === "connect" && r.role === 1)).toHaveLength(3)
      expect(sameMemory(received.ram, ram)).toBe(true)
    }))))
})
