/**
 * Lifecycle invariants of DESIGN §2, proved over real loopback sockets with faults injected through a
 * transport wrapper and the TLS upgrade hook: a channel's handshake fails, a channel errors while others are
 * still connecting, scopes close at random points, a channel is cut mid-packet, the destination disappears,
 * a fake source sends duplicate / out-of-range / foreign channels and bad packets, strangers connect.
 *
 * Every test: no hang (a guard fails the test long before vitest's timeout), the first error is the one
 * reported, every connection opened is closed and no socket handle is left (expectNoLeaks), and destination
 * memory is untouched by rejected input. Timeouts are short (2 s) and no scenario waits on one: every wait
 * is on a Deferred, a fiber or a recorded event.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as FastCheck from "effect/FastCheck"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as Option from "effect/Option"
import * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as PageCodec from "../src/PageCodec.js"
import * as Protocol from "../src/Protocol.js"
import * as QemuIncoming from "../src/QemuIncoming.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import * as Faulty from "./support/faultyTransport.js"
import {
  BLOCK,
  BLOCK_PAGES,
  compressedPacket,
  fakeSource,
  ramPacket,
  randomPage,
  syncPacket,
  touchedPages
} from "./support/fakeSource.js"
import { leakFree, nextTurn, tempSocketPath } from "./support/handles.js"
import { mixedImage, timed } from "./support/images.js"
import { sameMemory } from "./support/memory.js"

// ---------------------------------------------------------------------------------------------------------
// helpers

const PAGE = 4096
const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
/**
 * "Promptly": below every timeout of the migration (2 s). Errors are also checked not to be timeouts; this
 * bound is loose so that a loaded machine does not make it flaky (a run takes tens of milliseconds).
 */
const PROMPT_MS = 1500

/** A guard (never used to let things settle): fail instead of hanging the file. */
const noHang = <A, E, R>(self: Effect.Effect<A, E, R>, what: string, seconds = 5) =>
  Effect.timeoutFail(self, { duration: `${seconds} seconds`, onTimeout: () => new Error(`hung: ${what}`) })

/** A block of `pages` pages: about 60 % random pages, the rest zero. */
const image = (pages: number): Buffer => mixedImage(pages, 0.6, PAGE)

/** 3 MiB + 1 MiB of mixed random and zero pages. */
const sourceRam = () =>
  GuestRam.make({ blocks: [{ name: "pc.ram", bytes: image(768) }, { name: "vga.vram", bytes: image(256) }] })

const unixAddress = (name: string): Transport.Address => ({ _tag: "Unix", path: tempSocketPath(name) })
const tcpAddress: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

/**
 * A peer's failure after the other side went away: a closed / reset connection or an abort it was told
 * about — never a timeout (nothing here waits 2 s), never a defect.
 */
const expectPeerGone = (error: { readonly _tag: string; readonly message: string }) => {
  expectOneLine(error)
  if (error instanceof MigrationError.MigrationError) {
    expect(["Aborted", "ChannelClosed", "Rejected"]).toContain(error.reason)
    // a source reads a main channel closed before the destination answered as a refusal
    if (error.reason === "Rejected") expect(error.message).toContain("closed the main channel before answering")
  } else if (error instanceof MigrationError.ChannelError) {
    expect(error.cause._tag).toBe("TransportError")
    expect(["Closed", "Reset", "Write", "Connect"]).toContain((error.cause as Transport.TransportError).reason)
  } else {
    throw new Error(`unexpected ${error._tag}: ${error.message}`)
  }
}

const expectAllClosed = (faulty: Faulty.Faulty) => {
  const open = faulty.records.filter((r) => !r.closed).map((r) => `${r.side} #${r.index} (${String(r.role)})`)
  expect(open, "connections left open").toEqual([])
}

/** A destination in its own fiber; its listener lives in that fiber's scope (interrupting it closes both). */
const startDestination = (
  faulty: Faulty.Faulty,
  address: Transport.Address,
  options: Migration.IncomingOptions = {}
) =>
  Effect.gen(function*() {
    // what the destination logs (rejected connections) is kept here rather than printed
    const logs: Array<string> = []
    const bound = yield* Deferred.make<Transport.Address, Transport.TransportError>()
    const destination = Effect.scoped(Effect.gen(function*() {
      const listener = yield* faulty.transport.listen(address).pipe(Effect.tapError((e) => Deferred.fail(bound, e)))
      yield* Deferred.succeed(bound, listener.address)
      return yield* Migration.incoming(listener, { timeouts: TIMEOUTS, ...options })
    }))
    const fiber = yield* Effect.forkScoped(Effect.provide(
      destination,
      Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => logs.push(String(message))))
    ))
    return { fiber, address: yield* Deferred.await(bound), logs }
  })

const migrateWith = (
  faulty: Faulty.Faulty,
  ram: GuestRam.GuestRam["Type"],
  options: Migration.MigrateOptions
) =>
  Migration.migrate({ timeouts: TIMEOUTS, ...options }).pipe(
    Effect.provide(faulty.layer),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

// ---------------------------------------------------------------------------------------------------------
// the harness itself

describe("harness", () => {
  it.live("a clean migration through the fault-free wrapper records and closes every connection", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make()
      const dest = yield* startDestination(faulty, unixAddress("clean"))
      const stats = yield* noHang(migrateWith(faulty, ram, { address: dest.address, channels: 4 }), "migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected).toEqual([])
      expect(stats.channels).toBe(4)
      const sourceRoles = faulty.records.filter((r) => r.side === "connect").map((r) => r.role)
      const destRoles = faulty.records.filter((r) => r.side === "accept").map((r) => r.role)
      for (const roles of [sourceRoles, destRoles]) {
        expect([...roles].sort()).toEqual([0, 1, 2, 3, "main"])
      }
      expect(faulty.bytesAccepted()).toBeGreaterThan(stats.wireBytes)
      // a small image is spread over every channel: each carried pages, not just its init and SYNC packets
      for (const r of faulty.records.filter((r) => r.side === "connect" && typeof r.role === "number")) {
        expect(r.bytesWritten, `channel ${r.role}`).toBeGreaterThan(64 * 1024)
      }
      expectAllClosed(faulty)
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("a. the handshake of channel k of N fails", () => {
  const N = 4
  const k = 2

  const scenario = (
    upgrade: Faulty.RecordingUpgrade,
    hookBytes: number,
    expectCause: (cause: { readonly _tag: string }) => void
  ) =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make()
      const dest = yield* startDestination(faulty, unixAddress("handshake"))
      const exit = yield* noHang(
        Effect.exit(migrateWith(faulty, ram, { address: dest.address, channels: N, upgrade })),
        "migrate"
      )
      const failedAt = performance.now()
      const error = failureOf(exit)
      expect(error).toBeInstanceOf(MigrationError.ChannelError)
      const channelError = error as MigrationError.ChannelError
      expect(channelError.channel).toBe(k)
      expect(channelError.message.startsWith(`multifd channel ${k}: `)).toBe(true)
      expectCause(channelError.cause)
      expectOneLine(error)

      // the hook ran for channel k: its connection carried nothing but what the hook wrote — no init packet,
      // so no worker can exist for it — and is closed
      const calls = upgrade.calls.filter((c) => c.channel === k)
      expect(calls).toHaveLength(1)
      // and migrate returned promptly after the handshake failed (with every fiber ended, handles closed)
      expect(failedAt - calls[0]!.at).toBeLessThan(PROMPT_MS)
      const record = faulty.recordOf(calls[0]!.connection)!
      expect(record.role === undefined || record.role === "other").toBe(true)
      expect(record.bytesWritten).toBe(hookBytes)
      expect(record.closed).toBe(true)
      // no connection of the source ever announced itself as channel k
      expect(faulty.records.some((r) => r.side === "connect" && r.role === k)).toBe(false)

      // the destination is told (Abort) instead of being left waiting for channel k
      const destExit = yield* noHang(Fiber.await(dest.fiber), "incoming after the source failed")
      const destError = failureOf(destExit)
      expectPeerGone(destError)
      if (destError instanceof MigrationError.MigrationError && destError.reason === "Aborted") {
        expect(destError.message).toContain(`multifd channel ${k}`)
      }
      expectAllClosed(faulty)
    }))

  it.live("the upgrade hook fails for channel k: migrate fails at once naming channel k", () =>
    scenario(Faulty.failHandshakeOn(k), 0, (cause) => {
      expect(cause._tag).toBe("TlsError")
    }))

  it.live("the connection drops in the middle of channel k's handshake", () =>
    scenario(Faulty.dropMidHandshake(k), 4, (cause) => {
      expect(cause).toBeInstanceOf(Transport.TransportError)
      expect((cause as Transport.TransportError).reason).toBe("Reset")
    }))

  it.live("the destination drops the main channel mid-handshake: the source fails at once; the destination stays available", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make()
      const upgrade = Faulty.dropMidHandshake((_, call) => call === 0)
      const dest = yield* startDestination(faulty, unixAddress("dropmain"), { upgrade })
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateWith(faulty, ram, { address: dest.address, channels: 2 })), "migrate")
      )
      const error = failureOf(exit)
      if (error instanceof MigrationError.MigrationError) {
        // the source reads the close before its answer as a refusal (what a TLS authorization failure is)
        expect(error.reason).toBe("Rejected")
        expect(error.message).toContain("closed the main channel")
        expectOneLine(error)
      } else {
        // or a write on the main channel noticed first
        expect(error).toBeInstanceOf(MigrationError.ChannelError)
        expect((error as MigrationError.ChannelError).channel).toBe("main")
        expectPeerGone(error)
      }
      expect(elapsed).toBeLessThan(PROMPT_MS)
      // a dropped handshake is a turned-away connection, not the end of the destination: it is still waiting
      expect(dest.fiber.unsafePoll()).toBeNull()
      const [, interruptMs] = yield* timed(noHang(Fiber.interrupt(dest.fiber), "interrupting incoming"))
      expect(interruptMs).toBeLessThan(PROMPT_MS)
      expectAllClosed(faulty)
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("b. a channel errors while others are still connecting", () => {
  it.live("channel connects 2..N stall, connect 1 fails: migrate fails with that error at once", () =>
    leakFree(Effect.gen(function*() {
      const N = 4
      const ram = yield* sourceRam()
      const injected = new Transport.TransportError({
        reason: "Connect",
        address: "fault",
        detail: "connection refused (fault injection)"
      })
      const faulty = yield* Faulty.make({
        // connect #0 is the main channel; the multifd connects #1..#N all stall, then #1 is let go to fail
        failConnect: (i) => (i === 1 ? injected : undefined),
        stallConnect: (i) => i >= 1
      })
      const dest = yield* startDestination(faulty, unixAddress("stall"))
      const source = yield* Effect.forkScoped(migrateWith(faulty, ram, { address: dest.address, channels: N }))
      yield* noHang(faulty.until((f) => f.attempts.filter((a) => a.state === "stalled").length === N), "stalls")
      // every multifd connect is stuck connecting; now let connect #1 go on (to its injected failure)
      const first = faulty.attempts.find((a) => a.index === 1)!
      expect(first.state).toBe("stalled")
      const [exit, elapsed] = yield* timed(Effect.gen(function*() {
        yield* faulty.releaseOne(1)
        return yield* noHang(Fiber.await(source), "migrate")
      }))
      const error = failureOf(exit)
      expect(error).toBeInstanceOf(MigrationError.ChannelError)
      const channelError = error as MigrationError.ChannelError
      expect(channelError.cause).toBe(injected)
      expect(typeof channelError.channel).toBe("number")
      expect(channelError.message).toBe(`multifd channel ${channelError.channel}: fault: connection refused (fault injection)`)
      expect(elapsed).toBeLessThan(PROMPT_MS)
      // the connects still stalled were interrupted, none connected
      const rest = faulty.attempts.filter((a) => a.index >= 2)
      expect(rest.map((a) => a.state)).toEqual(Array(N - 1).fill("interrupted"))
      // the destination learns why
      const destError = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
      expect(destError).toBeInstanceOf(MigrationError.MigrationError)
      expect((destError as MigrationError.MigrationError).reason).toBe("Aborted")
      expect(destError.message).toContain(`multifd channel ${channelError.channel}: fault: connection refused`)
      expectAllClosed(faulty)
    })))
})

// ---------------------------------------------------------------------------------------------------------

/** Where to interrupt: after some event-loop turns, or once the destination has read some bytes. */
const interruptPoint = FastCheck.oneof(
  FastCheck.record({ kind: FastCheck.constant("turns" as const), n: FastCheck.integer({ min: 0, max: 30 }) }),
  FastCheck.record({ kind: FastCheck.constant("bytes" as const), n: FastCheck.integer({ min: 0, max: 2_400_000 }) })
)

describe("c. the scope is closed at random points during setup and transfer", () => {
  it.live.prop(
    "interrupting either side completes promptly; the other side then fails clearly or finishes; nothing leaks",
    {
      victim: FastCheck.constantFrom("source" as const, "destination" as const),
      point: interruptPoint,
      channels: FastCheck.integer({ min: 1, max: 4 }),
      tcp: FastCheck.boolean()
    },
    ({ channels, point, tcp, victim }) =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        const faulty = yield* Faulty.make()
        const dest = yield* startDestination(faulty, tcp ? tcpAddress : unixAddress("interrupt"))
        const source = yield* Effect.forkScoped(migrateWith(faulty, ram, { address: dest.address, channels }))
        const bothDone = Effect.zip(Fiber.await(source), Fiber.await(dest.fiber))
        const reached = point.kind === "turns"
          ? Effect.repeatN(nextTurn, point.n)
          : faulty.until((f) => f.bytesAccepted() >= point.n)
        yield* noHang(Effect.raceFirst(Effect.asVoid(reached), Effect.asVoid(bothDone)), "the interruption point")

        const victimFiber: Fiber.Fiber<unknown, unknown> = victim === "source" ? source : dest.fiber
        const other: Fiber.Fiber<unknown, { readonly _tag: string; readonly message: string }> = victim === "source"
          ? dest.fiber
          : source
        const [, interruptMs] = yield* timed(noHang(Fiber.interrupt(victimFiber), `interrupting the ${victim}`))
        expect(interruptMs).toBeLessThan(PROMPT_MS)

        if (victim === "source") {
          // The destination ends by itself once it has taken the main channel. A source interrupted before
          // its main channel reached the destination leaves nothing to react to: the destination turns the
          // half-made connections away and keeps waiting for a source (then we interrupt it, promptly).
          const connected = faulty.records.filter((r) => r.side === "connect").length
          yield* noHang(
            Effect.raceFirst(
              Effect.asVoid(Fiber.await(dest.fiber)),
              faulty.until((f) => {
                const accepted = f.records.filter((r) => r.side === "accept")
                return accepted.length >= connected && accepted.every((r) => r.classified)
              })
            ),
            "the destination classifying what the source left"
          )
          if (!faulty.records.some((r) => r.side === "accept" && r.role === "main")) {
            yield* noHang(Fiber.interrupt(dest.fiber), "interrupting an idle destination")
          }
        }
        // the other side ended by itself (unless we interrupted an idle destination above)
        const [otherExit, otherMs] = yield* timed(noHang(Fiber.await(other), "the other side"))
        expect(otherMs).toBeLessThan(PROMPT_MS)
        const idle = victim === "source" && !faulty.records.some((r) => r.side === "accept" && r.role === "main")
        if (Exit.isSuccess(otherExit)) {
          if (victim === "source") expect(sameMemory((otherExit.value as Migration.Incoming).ram, ram)).toBe(true)
        } else if (!(idle && Exit.isInterrupted(otherExit))) {
          expectPeerGone(failureOf(otherExit))
        }
        expectAllClosed(faulty)
      })),
    // LIFECYCLE_RUNS=300 for a longer hunt
    { fastCheck: { numRuns: Number(process.env["LIFECYCLE_RUNS"] ?? 15) } }
  )
})

// ---------------------------------------------------------------------------------------------------------

describe("d. a channel is cut mid-packet", () => {
  const cases = [
    { name: "the first channel to send 64 + 1344 + 1000 bytes (inside its first data packet)", channel: undefined, afterBytes: 64 + 1344 + 1000 },
    { name: "channel 1, 700 bytes into its first packet header", channel: 1, afterBytes: 64 + 700 }
  ]
  for (const c of cases) {
    it.live(c.name, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        const faulty = yield* Faulty.make({ cut: { channel: c.channel, afterBytes: c.afterBytes } })
        const dest = yield* startDestination(faulty, unixAddress("cut"))
        // with reconnecting off (test/Reconnect.test.ts: on, the default, the channel comes back)
        const exit = yield* noHang(
          Effect.exit(migrateWith(faulty, ram, { address: dest.address, channels: 4, reconnect: 0 })),
          "migrate"
        )
        const cut = yield* noHang(Deferred.await(faulty.cutChannel), "the cut")
        if (c.channel !== undefined) expect(cut).toBe(c.channel)
        const error = failureOf(exit)
        expect(error).toBeInstanceOf(MigrationError.ChannelError)
        expect((error as MigrationError.ChannelError).channel).toBe(cut)
        expect(error.message).toContain(`multifd channel ${cut}: `)
        expect(error.message).toContain("fault injection")
        // the destination fails naming the channel: it saw the packet end early, or the source told it
        const [destExit, destMs] = yield* timed(noHang(Fiber.await(dest.fiber), "incoming"))
        expect(destMs).toBeLessThan(PROMPT_MS)
        const destError = failureOf(destExit)
        expectPeerGone(destError)
        expect(destError.message).toContain(`multifd channel ${cut}`)
        const cutRecord = faulty.records.find((r) => r.cut)!
        expect(cutRecord.bytesWritten).toBe(c.afterBytes)
        expectAllClosed(faulty)
      })))
  }
})

// ---------------------------------------------------------------------------------------------------------

describe("e. the destination disappears mid-transfer", () => {
  for (const tcp of [false, true]) {
    it.live(`the source fails at once with a transport error, not a timeout (${tcp ? "tcp" : "unix"})`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        const faulty = yield* Faulty.make()
        const dest = yield* startDestination(faulty, tcp ? tcpAddress : unixAddress("gone"))
        const source = yield* Effect.forkScoped(migrateWith(faulty, ram, { address: dest.address, channels: 4 }))
        yield* noHang(faulty.until((f) => f.bytesAccepted() >= 1024 * 1024), "1 MiB transferred")
        // gone without a word, as a killed process is: its sockets closed under it (a destination that is only
        // interrupted says "cancelled by destination" first: Trust.test)
        for (const r of faulty.records) if (r.side === "accept") r.stream.destroy()
        const [, interruptMs] = yield* timed(noHang(Fiber.interrupt(dest.fiber), "interrupting incoming"))
        expect(interruptMs).toBeLessThan(PROMPT_MS)
        const [exit, ms] = yield* timed(noHang(Fiber.await(source), "migrate"))
        expect(ms).toBeLessThan(PROMPT_MS)
        const error = failureOf(exit)
        expect(error).toBeInstanceOf(MigrationError.ChannelError)
        expectPeerGone(error)
        expectAllClosed(faulty)
      })))
  }
})

// ---------------------------------------------------------------------------------------------------------
// A hand-written source, to send what a real one never would

/** Destination memory to inspect: one zeroed 1 MiB block. */
const destinationRam = () => GuestRam.make({ blocks: [{ name: BLOCK, size: BLOCK_PAGES * PAGE }] })

describe("f. duplicate, out-of-range and foreign channel ids", () => {
  const failsWith = (
    name: string,
    open: (src: Effect.Effect.Success<ReturnType<typeof fakeSource>>) => Effect.Effect<unknown, Transport.TransportError, Scope.Scope>,
    reason: Protocol.ProtocolError["reason"],
    channel: number
  ) =>
    it.live(name, () =>
      leakFree(Effect.gen(function*() {
        const faulty = yield* Faulty.make()
        const ram = yield* destinationRam()
        const dest = yield* startDestination(faulty, unixAddress("ids"), { ram })
        const src = yield* fakeSource(dest.address, 2)
        yield* open(src)
        const [exit, ms] = yield* timed(noHang(Fiber.await(dest.fiber), "incoming"))
        expect(ms).toBeLessThan(PROMPT_MS)
        const error = failureOf(exit)
        expect(error).toBeInstanceOf(Protocol.ProtocolError)
        expect((error as Protocol.ProtocolError).reason).toBe(reason)
        expect((error as Protocol.ProtocolError).channel).toBe(channel)
        expect(error.message).toContain(`multifd channel ${channel}`)
        expectOneLine(error)
        // the source is told why
        const abort = yield* noHang(Control.receive(src.control), "the abort")
        expect(abort).toMatchObject({ _tag: "Abort" })
        expect((abort as Control.Abort).reason).toContain(reason === "DuplicateChannel" ? "claims channel" : "channel id")
        expect(touchedPages(ram)).toEqual([])
      })))

  failsWith("two connections claim channel 0: DuplicateChannel", (src) => Effect.zip(src.channel(0), src.channel(0)), "DuplicateChannel", 0)
  failsWith("channel id 2 of 2 channels: BadChannelId", (src) => src.channel(2), "BadChannelId", 2)
  failsWith("channel id 255 of 2 channels: BadChannelId", (src) => src.channel(255), "BadChannelId", 255)

  const foreign = (id: number) =>
    it.live(`a channel ${id} with another migration's uuid is turned away; the migration then completes`, () =>
      leakFree(Effect.gen(function*() {
        const faulty = yield* Faulty.make()
        const ram = yield* destinationRam()
        const dest = yield* startDestination(faulty, unixAddress("foreign"), { ram })
        const src = yield* fakeSource(dest.address, 2)
        const stranger = yield* src.channel(id, Crypto.randomUUID())
        // the destination closes the foreign connection (we see EOF) and goes on waiting
        expect(yield* noHang(stranger.atEnd, "the foreign channel closed")).toBe(true)
        expect(dest.fiber.unsafePoll()).toBeNull()

        // now drive the migration properly: both channels, pages 0..3 (and a zero page) on channel 0, a SYNC
        // on each, flush, complete with the digests of what we sent, done, graceful close
        const expected = yield* destinationRam()
        const pages = [0, 1, 2, 3].map((p) => ({ offset: p * PAGE, bytes: randomPage() }))
        for (const p of pages) Buffer.from(p.bytes).copy(expected.block(BLOCK)!.bytes, p.offset)
        const c0 = yield* src.channel(0)
        const c1 = yield* src.channel(1)
        yield* c0.write(ramPacket(pages, [9 * PAGE]))
        yield* c0.write([syncPacket()])
        yield* c1.write([syncPacket()])
        yield* src.control.write([Control.encode(new Control.Flush({ round: 0, final: true }))])
        expect(yield* noHang(Control.receive(src.control), "FlushAck")).toMatchObject({ _tag: "FlushAck", round: 0 })
        const digests = yield* GuestRam.digest(expected)
        yield* src.control.write([Control.encode(new Control.Complete({ digests }))])
        expect(yield* noHang(Control.receive(src.control), "Done")).toMatchObject({ _tag: "Done" })
        yield* Effect.all([c0.end, c1.end, src.control.end], { discard: true })

        const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(result.rejected).toHaveLength(1)
        expect(result.rejected[0]).toContain("uuid")
        expect(result.stats.normalPages).toBe(4)
        expect(result.stats.zeroPages).toBe(1)
        expect(touchedPages(ram)).toEqual([0, 1, 2, 3])
        expect(sameMemory(ram, expected)).toBe(true)
      })))
  foreign(0)
  foreign(7) // out of range too: the uuid says "not ours" before the id can say "broken"

  for (const late of ["a data packet", "a sync packet"] as const) {
    it.live(`${late} after the final round's sync is refused and writes nothing: the digests judge the memory that stays`, () =>
      leakFree(Effect.gen(function*() {
        const faulty = yield* Faulty.make()
        const ram = yield* destinationRam()
        let stored = 0
        const dest = yield* startDestination(faulty, unixAddress("late"), { ram, store: () => Effect.sync(() => stored++) })
        const src = yield* fakeSource(dest.address, 1)
        const c0 = yield* src.channel(0)
        const first = { offset: 0, bytes: randomPage() }
        yield* c0.write(ramPacket([first]))
        yield* c0.write([syncPacket()])
        yield* src.control.write([Control.encode(new Control.Flush({ round: 0, final: true }))])
        expect(yield* noHang(Control.receive(src.control), "FlushAck")).toMatchObject({ _tag: "FlushAck", round: 0 })
        // the memory is final now: a page aimed at it (a hostile source, after the flush or after Complete) is
        // refused before a byte of it is written, and the migration fails
        yield* c0.write(late === "a data packet" ? ramPacket([{ offset: 5 * PAGE, bytes: randomPage() }]) : [syncPacket()])
        const abort = yield* noHang(Control.receive(src.control), "the abort")
        expect(abort).toMatchObject({ _tag: "Abort" })
        expect((abort as Control.Abort).reason).toBe(
          "multifd channel 0: bad packet: a packet after the final round's sync packet (the transfer was complete; nothing was written)"
        )
        const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
        expect(error).toBeInstanceOf(Protocol.ProtocolError)
        expect((error as Protocol.ProtocolError).reason).toBe("AfterEnd")
        expect(touchedPages(ram)).toEqual([0])
        expect(stored).toBe(0)
      })))
  }

  // every block's digest right, and one more in the list: the reason named no block ("memory digest mismatch in
  // block ", an empty list)
  it.live("a Complete whose digests name a block the destination lacks, or one twice: DigestMismatch naming it", () =>
    leakFree(Effect.gen(function*() {
      const right = yield* GuestRam.digest(yield* destinationRam())
      for (const [extra, said] of [
        [{ name: "extra\u001b[2J", digest: right[0]!.digest }, `"extra\\u001b[2J" which this destination's memory does not have`],
        [right[0]!, `${JSON.stringify(BLOCK)} twice`]
      ] as const) {
        const faulty = yield* Faulty.make()
        const dest = yield* startDestination(faulty, unixAddress("digests"), { ram: yield* destinationRam() })
        const src = yield* fakeSource(dest.address, 1)
        const c0 = yield* src.channel(0)
        yield* c0.write([syncPacket()])
        yield* src.control.write([Control.encode(new Control.Flush({ round: 0, final: true }))])
        expect(yield* noHang(Control.receive(src.control), "FlushAck")).toMatchObject({ _tag: "FlushAck", round: 0 })
        yield* src.control.write([Control.encode(new Control.Complete({ digests: [...right, extra] }))])
        const reason = `memory digest mismatch: the source's digests name block ${said}`
        expect(yield* noHang(Control.receive(src.control), "the abort")).toMatchObject({ _tag: "Abort", reason })
        const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
        expect([(error as MigrationError.MigrationError).reason, error.message]).toEqual(["DigestMismatch", reason])
      }
    })))

  const outOfTurn = (name: string, message: Control.Message, why: string) =>
    it.live(name, () =>
      leakFree(Effect.gen(function*() {
        const faulty = yield* Faulty.make()
        const ram = yield* destinationRam()
        let stored = 0
        const dest = yield* startDestination(faulty, unixAddress("turn"), { ram, store: () => Effect.sync(() => stored++) })
        const src = yield* fakeSource(dest.address, 2)
        yield* src.control.write([Control.encode(message)])
        const [exit, ms] = yield* timed(noHang(Fiber.await(dest.fiber), "incoming"))
        expect(ms).toBeLessThan(PROMPT_MS)
        const error = failureOf(exit)
        expect(error.message).toBe(`unexpected ${message._tag} message ${why}`)
        expect(yield* noHang(Control.receive(src.control), "the abort")).toMatchObject({ _tag: "Abort" })
        expect(stored).toBe(0)
        expect(touchedPages(ram)).toEqual([])
      })))
  outOfTurn(
    "Complete before the final round's flush (no channel ever connected): refused at once, nothing stored, no Done",
    new Control.Complete({ digests: [] }),
    "before the final round's flush"
  )
  outOfTurn(
    "Hashing before the final round's flush (a peer keeping a destination's memory with heartbeats): refused at once",
    new Control.Hashing(),
    "before the final round's flush"
  )

  it.live("a channel that stops inside a packet: the timeout names it and how far into the packet it got", () =>
    leakFree(Effect.gen(function*() {
      const faulty = yield* Faulty.make()
      const ram = yield* destinationRam()
      const dest = yield* startDestination(faulty, unixAddress("midpacket"), { ram, timeouts: { ...TIMEOUTS, peer: "300 millis" } })
      const src = yield* fakeSource(dest.address, 1)
      const c0 = yield* src.channel(0)
      const packet = Buffer.concat(ramPacket([{ offset: 0, bytes: randomPage() }]))
      yield* c0.write([packet.subarray(0, packet.length - 100)])
      const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
      expect(error.message).toMatch(new RegExp(`multifd channel 0(: nothing arrived for 300ms,| is) ${packet.length - 100} bytes into a packet`))
      expectOneLine(error)
      expect(touchedPages(ram)).toEqual([])
    })))

  it.live("a foreign channel while ours never come: the destination times out naming the missing channels", () =>
    leakFree(Effect.gen(function*() {
      const faulty = yield* Faulty.make()
      const ram = yield* destinationRam()
      const dest = yield* startDestination(faulty, unixAddress("missing"), {
        ram,
        timeouts: { ...TIMEOUTS, peer: "300 millis" }
      })
      const src = yield* fakeSource(dest.address, 2)
      const stranger = yield* src.channel(1, Crypto.randomUUID())
      expect(yield* noHang(stranger.atEnd, "the foreign channel closed")).toBe(true)
      const c0 = yield* src.channel(0)
      yield* c0.write([syncPacket()])
      yield* src.control.write([Control.encode(new Control.Flush({ round: 0 }))])
      const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
      expect(error).toBeInstanceOf(MigrationError.MigrationError)
      expect((error as MigrationError.MigrationError).reason).toBe("Timeout")
      expect(error.message).toContain("1 of 2 multifd channels connected")
      expect(error.message).toContain("rejected:")
      expect(error.message).toContain("uuid")
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("g. a stranger connects to the destination port while a real migration runs", () => {
  const strangers = [
    { name: "an HTTP request", send: Buffer.from("GET / HTTP/1.1\r\n\r\n"), close: false, listed: "not a migration stream (first bytes 47455420)" },
    { name: "nothing, then a close", send: undefined, close: true, listed: "peer closed the connection" }
  ]
  for (const s of strangers) {
    it.live(`${s.name}: the migration succeeds and rejected names the stranger`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        // hold the source's first multifd connect until the stranger has been dealt with, so that the
        // stranger arrives mid-migration and is turned away before it completes
        const faulty = yield* Faulty.make({ stallConnect: (i) => i === 1 })
        const dest = yield* startDestination(faulty, tcpAddress)
        const source = yield* Effect.forkScoped(migrateWith(faulty, ram, { address: dest.address, channels: 3 }))
        yield* noHang(faulty.until((f) => f.attempts.some((a) => a.index === 1 && a.state === "stalled")), "the stall")

        const stranger = yield* Transport.connect(dest.address)
        if (s.send) yield* stranger.write([s.send])
        if (s.close) yield* stranger.end
        yield* noHang(
          faulty.until((f) => f.records.some((r) => r.side === "accept" && r.role !== "main" && r.closed)),
          "the stranger turned away"
        )
        expect(yield* stranger.atEnd).toBe(true)
        yield* faulty.release

        const stats = yield* noHang(Fiber.join(source), "migrate")
        const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(stats.channels).toBe(3)
        expect(sameMemory(result.ram, ram)).toBe(true)
        expect(result.rejected).toHaveLength(1)
        expect(result.rejected[0]).toContain("127.0.0.1")
        expect(result.rejected[0]).toContain(s.listed)
        // the peer is named once (a transport error's message named it again)
        const peer = result.rejected[0]!.slice(0, result.rejected[0]!.indexOf(": "))
        expect(result.rejected[0]!.indexOf(peer, peer.length)).toBe(-1)
        expect(dest.logs.filter((l) => l.includes("rejected a connection"))).toHaveLength(1)
        expectAllClosed(faulty)
      })))
  }

  it.live("a silent stranger that stays connected does not hold the migration up, and is closed with it", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make({ stallConnect: (i) => i === 1 })
      const dest = yield* startDestination(faulty, unixAddress("silent"))
      const source = yield* Effect.forkScoped(migrateWith(faulty, ram, { address: dest.address, channels: 2 }))
      yield* noHang(faulty.until((f) => f.attempts.some((a) => a.index === 1 && a.state === "stalled")), "the stall")
      const stranger = yield* Transport.connect(dest.address)
      yield* noHang(faulty.until((f) => f.records.filter((r) => r.side === "accept").length === 2), "the accept")
      yield* faulty.release
      const stats = yield* noHang(Fiber.join(source), "migrate")
      expect(stats.channels).toBe(2)
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      // the migration ended while the stranger was still being waited for (its 2 s wait for first bytes had
      // not run out, or it would be listed): nothing waited on it
      expect(result.rejected).toEqual([])
      // incoming closed the stranger's connection on its way out
      expect(yield* noHang(stranger.atEnd, "the stranger's EOF")).toBe(true)
      expectAllClosed(faulty)
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("h. destination memory is untouched by rejected input", () => {
  const fill = (byte: number) => Buffer.alloc(PAGE, byte)

  it.live("before the bad packet: long runs read in place, scattered pages staged, zero pages cleared, each where its offset says", () =>
    leakFree(Effect.gen(function*() {
      const faulty = yield* Faulty.make()
      const ram = yield* destinationRam()
      const memory = ram.block(BLOCK)!.bytes
      memory.fill(0x55, 200 * PAGE, 202 * PAGE) // pages the source then sends as zero pages
      const dest = yield* startDestination(faulty, unixAddress("layouts"), { ram })
      const src = yield* fakeSource(dest.address, 1)
      const channel = yield* src.channel(0)
      // one run of 64 pages and two runs of 20 (read in place), 16 pages in reverse order and runs of mixed
      // lengths (staged)
      const run = Array.from({ length: 64 }, (_, i) => ({ offset: (10 + i) * PAGE, bytes: randomPage() }))
      const twoRuns = [...Array.from({ length: 20 }, (_, i) => 210 + i), ...Array.from({ length: 20 }, (_, i) => 232 + i)]
        .map((p) => ({ offset: p * PAGE, bytes: randomPage() }))
      const reversed = Array.from({ length: 16 }, (_, i) => ({ offset: (120 - 2 * i) * PAGE, bytes: randomPage() }))
      const mixed = [130, 131, 132, 140, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 166, 167]
        .map((p) => ({ offset: p * PAGE, bytes: randomPage() }))
      for (const pages of [run, reversed, mixed, twoRuns]) yield* channel.write(ramPacket(pages))
      yield* channel.write(ramPacket([], [200 * PAGE, 201 * PAGE]))
      yield* channel.write(ramPacket([{ offset: 8 * PAGE + 1, bytes: fill(0xaa) }]))
      const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
      expect(error).toMatchObject({ _tag: "ProtocolError", reason: "BadOffset", channel: 0 })
      const all = [...run, ...reversed, ...mixed, ...twoRuns]
      for (const p of all) expect(memory.subarray(p.offset, p.offset + PAGE).equals(p.bytes), `page ${p.offset / PAGE}`).toBe(true)
      expect(touchedPages(ram)).toEqual(all.map((p) => p.offset / PAGE).sort((a, b) => a - b))
      expectAllClosed(faulty)
    })))

  for (const compression of ["zlib", "zstd"] as const) {
    for (const path of ["read callback", "fiber"] as const) {
      it.live(`${compression}, decoded in the ${path}: a payload that does not decode is a CodecError naming the channel; only the good packets' pages were written`, () =>
        leakFree(Effect.gen(function*() {
          const faulty = yield* Faulty.make({ noReadChain: path === "fiber" })
          const ram = yield* destinationRam()
          const memory = ram.block(BLOCK)!.bytes
          memory.fill(0x55, 20 * PAGE, 22 * PAGE) // zero pages of the bad packet: must stay as they are
          const dest = yield* startDestination(faulty, unixAddress(`bad-${compression}`), { ram })
          const src = yield* fakeSource(dest.address, 1, compression)
          const channel = yield* src.channel(0)
          const encoder = yield* PageCodec.encoder(compression, 1)
          const pages = [0, 1, 2, 3].map((p) => ({ offset: p * PAGE, bytes: randomPage() }))
          const more = [6, 8].map((p) => ({ offset: p * PAGE, bytes: randomPage() }))
          yield* channel.write(yield* compressedPacket(compression, encoder, pages))
          // zlib: BFINAL=1 BTYPE=11 (reserved); zstd: a block header of reserved type 3
          yield* channel.write(yield* compressedPacket(compression, encoder, more, [], Buffer.alloc(64, 0xff)))
          yield* channel.write(yield* compressedPacket(compression, encoder, [], [20 * PAGE, 21 * PAGE]))
          const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
          expect(error).toMatchObject({ _tag: "CodecError", reason: "Corrupt", channel: 0 })
          expect(error.message.startsWith("multifd channel 0: bad payload: ")).toBe(true)
          expectOneLine(error)
          for (const p of pages) expect(memory.subarray(p.offset, p.offset + PAGE).equals(p.bytes)).toBe(true)
          expect(touchedPages(ram)).toEqual([0, 1, 2, 3, 20, 21])
          expect(memory.subarray(20 * PAGE, 22 * PAGE).every((b) => b === 0x55)).toBe(true)
          expectAllClosed(faulty)
        })))

      it.live(`${compression}, decoded in the ${path}: good packets and zero pages land where their offsets say`, () =>
        leakFree(Effect.gen(function*() {
          const faulty = yield* Faulty.make({ noReadChain: path === "fiber" })
          const ram = yield* destinationRam()
          const memory = ram.block(BLOCK)!.bytes
          memory.fill(0x55, 200 * PAGE, 202 * PAGE) // pages the source then sends as zero pages
          const dest = yield* startDestination(faulty, unixAddress(`good-${compression}`), { ram })
          const src = yield* fakeSource(dest.address, 1, compression)
          const channel = yield* src.channel(0)
          const encoder = yield* PageCodec.encoder(compression, 1)
          const run = Array.from({ length: 64 }, (_, i) => ({ offset: (10 + i) * PAGE, bytes: randomPage() }))
          const scattered = Array.from({ length: 16 }, (_, i) => ({ offset: (120 - 2 * i) * PAGE, bytes: randomPage() }))
          yield* channel.write(yield* compressedPacket(compression, encoder, run))
          yield* channel.write(yield* compressedPacket(compression, encoder, scattered, [200 * PAGE, 201 * PAGE]))
          // then a packet that decodes to fewer pages than its header says: TooLarge, nothing of it written
          const extra = [{ offset: 150 * PAGE, bytes: randomPage() }, { offset: 151 * PAGE, bytes: randomPage() }]
          const [, twoPages] = yield* compressedPacket(compression, encoder, extra)
          yield* channel.write(yield* compressedPacket(compression, encoder, [extra[0]!], [], twoPages as Buffer))
          const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
          expect(error).toMatchObject({ _tag: "CodecError", reason: "TooLarge", channel: 0 })
          const all = [...run, ...scattered]
          for (const p of all) expect(memory.subarray(p.offset, p.offset + PAGE).equals(p.bytes), `page ${p.offset / PAGE}`).toBe(true)
          expect(touchedPages(ram)).toEqual(all.map((p) => p.offset / PAGE).sort((a, b) => a - b))
          expectAllClosed(faulty)
        })))
    }
  }

  /**
   * A zstd frame whose header asks for a window of 2^`windowLog` bytes, then `pages` pages of RLE blocks (four
   * bytes a 128 KiB block): a few bytes that make a decoder keep that window, and fill it as packets go by.
   */
  const zstdWindow = (windowLog: number, pages: number) => {
    const rle = (size: number, byte: number) => {
      const header = (size << 3) | (1 << 1)
      return Buffer.from([header & 0xff, (header >> 8) & 0xff, header >> 16, byte])
    }
    const blocks = Array.from({ length: Math.ceil(pages * PAGE / 131072) }, (_, i) => rle(Math.min(131072, pages * PAGE - i * 131072), i))
    return Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, (windowLog - 10) << 3]), ...blocks])
  }

  for (const path of ["read callback", "fiber"] as const) {
    it.live(`zstd, decoded in the ${path}: a frame asking for a window larger than any level makes (2^25, level 20's) is Corrupt naming the channel, nothing written`, () =>
      leakFree(Effect.gen(function*() {
        // (a 128 MiB window: some 350 KiB of packets filled it, on each of up to 255 channels, whatever memory
        // the destination had agreed to)
        const faulty = yield* Faulty.make({ noReadChain: path === "fiber" })
        const ram = yield* destinationRam()
        const dest = yield* startDestination(faulty, unixAddress("zstd-window"), { ram })
        const src = yield* fakeSource(dest.address, 1, "zstd")
        const channel = yield* src.channel(0)
        const encoder = yield* PageCodec.encoder("zstd", 1)
        const pages = Array.from({ length: 128 }, (_, i) => ({ offset: i * PAGE, bytes: Buffer.alloc(PAGE) }))
        yield* channel.write(yield* compressedPacket("zstd", encoder, pages, [], zstdWindow(27, 128)))
        const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
        expect(error).toMatchObject({ _tag: "CodecError", reason: "Corrupt", channel: 0 })
        expect(error.message).toContain("multifd channel 0: bad payload: zstd: ")
        expectOneLine(error)
        expect(touchedPages(ram)).toEqual([])
        expectAllClosed(faulty)
      })))
  }

  const cases: ReadonlyArray<{
    readonly name: string
    readonly reason: Protocol.ProtocolError["reason"]
    readonly field: string
    readonly packet: () => Array<Uint8Array>
  }> = [
    {
      name: "a normal page offset that is not page aligned",
      reason: "BadOffset",
      field: "offset[0]",
      packet: () => ramPacket([{ offset: 8 * PAGE + 1, bytes: fill(0xaa) }])
    },
    {
      name: "a normal page offset beyond the block",
      reason: "BadOffset",
      field: "offset[1]",
      packet: () => ramPacket([{ offset: 8 * PAGE, bytes: fill(0xaa) }, { offset: BLOCK_PAGES * PAGE, bytes: fill(0xbb) }])
    },
    {
      name: "valid normal pages with a zero page beyond the block",
      reason: "BadOffset",
      field: "offset[2]",
      packet: () => ramPacket([{ offset: 8 * PAGE, bytes: fill(0xaa) }, { offset: 9 * PAGE, bytes: fill(0xbb) }], [(BLOCK_PAGES + 3) * PAGE])
    },
    {
      name: "bad magic on an otherwise valid packet",
      reason: "BadMagic",
      field: "magic",
      packet: () => ramPacket([{ offset: 8 * PAGE, bytes: fill(0xaa) }], [0], (h) => h.writeUInt32BE(0x51455649, 0))
    },
    {
      name: "an unknown block name",
      reason: "UnknownBlock",
      field: "ramblock",
      packet: () => ramPacket([{ offset: 8 * PAGE, bytes: fill(0xaa) }], [], (h) => h.write("pc.rom", 64))
    }
  ]
  for (const c of cases) {
    it.live(`${c.name}: ${c.reason} naming the channel; only pages 0..3 were written`, () =>
      leakFree(Effect.gen(function*() {
        const faulty = yield* Faulty.make()
        const ram = yield* destinationRam()
        const dest = yield* startDestination(faulty, unixAddress("untouched"), { ram })
        const src = yield* fakeSource(dest.address, 1)
        const channel = yield* src.channel(0)
        const pages = [0, 1, 2, 3].map((p) => ({ offset: p * PAGE, bytes: randomPage() }))
        yield* channel.write(ramPacket(pages))
        yield* channel.write(c.packet())
        const [exit, ms] = yield* timed(noHang(Fiber.await(dest.fiber), "incoming"))
        expect(ms).toBeLessThan(PROMPT_MS)
        const error = failureOf(exit)
        expect(error).toBeInstanceOf(Protocol.ProtocolError)
        const protocolError = error as Protocol.ProtocolError
        expect(protocolError.reason).toBe(c.reason)
        expect(protocolError.channel).toBe(0)
        expect(protocolError.field).toBe(c.field)
        expect(protocolError.message.startsWith(`multifd channel 0: bad ${c.field}: `)).toBe(true)
        expectOneLine(error)
        // exactly pages 0..3 were written, with what was sent; the page the bad packet pointed at is zero
        expect(touchedPages(ram)).toEqual([0, 1, 2, 3])
        for (const p of pages) expect(ram.block(BLOCK)!.bytes.subarray(p.offset, p.offset + PAGE).equals(p.bytes)).toBe(true)
        expect(GuestRam.isZeroPage(ram.block(BLOCK)!.bytes, 8 * PAGE, PAGE)).toBe(true)
        // and the source was told
        const abort = yield* noHang(Control.receive(src.control), "the abort")
        expect(abort).toMatchObject({ _tag: "Abort" })
        expect((abort as Control.Abort).reason).toBe(protocolError.message)
        // an adopted channel that goes bad is a failure, not a stranger turned away
        expect(dest.logs.filter((l) => l.includes("rejected"))).toEqual([])
        expectAllClosed(faulty)
      })))
  }
})

describe("i. one migration of a memory at a time", () => {
  it.live("a second migrate (or snapshot save) of memory being migrated fails Busy before it connects or makes a file; after the first, it migrates again", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const run = (options: Migration.MigrateOptions) =>
        Migration.migrate({ timeouts: TIMEOUTS, ...options }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram)
        )
      const listener = yield* Transport.listen(unixAddress("claim"))
      const first = yield* Effect.fork(run({ address: listener.address }))
      // its main channel is here: the first has the memory (nobody answers it here)
      yield* noHang(listener.accept, "the first source's main channel")
      // sharing the dirty log and the write gate, two migrations of one live memory both failed DigestMismatch
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-claim-"))
      for (const address of [listener.address, { _tag: "File", path: Path.join(dir, "ram.snap") } as const]) {
        const error = yield* noHang(Effect.flip(run({ address })), "the second migration")
        expectOneLine(error)
        expect(error).toBeInstanceOf(MigrationError.MigrationError)
        expect((error as MigrationError.MigrationError).reason).toBe("Busy")
        expect(error.message).toContain("another migration, snapshot save or restore of this memory is under way")
      }
      expect(Fs.readdirSync(dir)).toEqual([])
      Fs.rmSync(dir, { recursive: true })
      yield* Fiber.interrupt(first)
      // the memory is free again
      const again = yield* Transport.listen(unixAddress("claim-again"))
      const [stats, received] = yield* noHang(
        Effect.all([run({ address: again.address }), Migration.incoming(again, { timeouts: TIMEOUTS })], {
          concurrency: "unbounded"
        }),
        "the migration after"
      )
      expect(stats.ramBytes).toBe(ram.size)
      expect(sameMemory(received.ram, ram)).toBe(true)
    })))
})

describe("i'. receiving into memory that is busy", () => {
  /**
   * `listenAndReceive` into memory given found it Busy only after it listened: it bound the address (a Unix socket
   * file made) and called `onListening` (a program that tells its source where to connect said "ready"), then
   * failed Busy and closed it again — the source, told to connect, was refused. Busy now comes first.
   */
  for (const from of ["Migration", "QemuIncoming"] as const) {
    it.live(`${from}.listenAndReceive into memory being saved: Busy before it listens; onListening never called, no socket file`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        const address = unixAddress("busy-into")
        let told = 0
        const onListening = (): Effect.Effect<void> => Effect.sync(() => void told++)
        const receive: Effect.Effect<unknown, { readonly message: string }, Transport.Transport> = from === "Migration"
          ? Migration.listenAndReceive(address, { ram, timeouts: TIMEOUTS, onListening })
          : QemuIncoming.listenAndReceive(address, { ram, channels: 2, timeouts: TIMEOUTS, onListening })
        const error = yield* ram.transfer.withPermits(1)(noHang(
          Effect.flip(Effect.provide(receive, Transport.layer)),
          "listenAndReceive"
        ))
        expectOneLine(error)
        expect((error as MigrationError.MigrationError).reason).toBe("Busy")
        expect(told).toBe(0)
        expect(Fs.existsSync((address as { readonly path: string }).path)).toBe(false)
      })))
  }
})

describe("j. one incoming on a listener at a time", () => {
  it.live("a second incoming on a listener in use fails Busy at once; the first receives its migration; then the listener serves the next", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(unixAddress("one-incoming"))
      const first = yield* Effect.fork(Migration.incoming(listener, { timeouts: TIMEOUTS }))
      // the first has the listener once it accepts; a second beside it took the first's multifd channels away
      // (turned away as strangers) and the migration timed out
      yield* Effect.yieldNow()
      const error = yield* noHang(Effect.flip(Migration.incoming(listener, { timeouts: TIMEOUTS })), "the second incoming")
      expectOneLine(error)
      expect(error).toBeInstanceOf(MigrationError.MigrationError)
      expect((error as MigrationError.MigrationError).reason).toBe("Busy")
      expect(error.message).toContain("a migration is already being received on this listener")
      const migrate = (channels: number) =>
        Migration.migrate({ address: listener.address, channels, timeouts: TIMEOUTS }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram)
        )
      yield* noHang(migrate(4), "the migration")
      const received = yield* noHang(Fiber.join(first), "the first incoming")
      expect(received.rejected).toEqual([])
      expect(sameMemory(received.ram, ram)).toBe(true)
      // the listener is free again
      const [, next] = yield* noHang(
        Effect.all([migrate(2), Migration.incoming(listener, { timeouts: TIMEOUTS })], { concurrency: "unbounded" }),
        "the next migration"
      )
      expect(sameMemory(next.ram, ram)).toBe(true)
    })))
})

describe("k. a listener whose scope has closed", () => {
  /**
   * A listener is a scoped resource: once its scope closed nothing connects to it again (every source is refused).
   * An incoming given such a listener (listened in a scope of its own by mistake, or closed while the destination
   * waits) waited for a source for ever, without a word, unless it had an acceptTimeout.
   */
  it.live("incoming on it fails at once, saying the listener is closed; one waiting on it fails when it closes", () =>
    leakFree(Effect.gen(function*() {
      for (const address of [tcpAddress, unixAddress("closed-listener")]) {
        const closed = yield* Effect.scoped(Transport.listen(address))
        const error = yield* noHang(Effect.flip(Migration.incoming(closed, { timeouts: TIMEOUTS })), "incoming on a closed listener")
        expectOneLine(error)
        expect(error).toBeInstanceOf(Transport.TransportError)
        expect((error as Transport.TransportError).reason).toBe("Closed")
        expect(error.message).toBe(`${Transport.formatAddress(closed.address)}: the listener is closed (its scope has ended): listen again`)
        // the same front door receives from QEMU
        const fromQemu = yield* noHang(Effect.flip(QemuIncoming.incoming(closed, { channels: 2, timeouts: TIMEOUTS })), "QemuIncoming")
        expect(fromQemu.message).toBe(error.message)

        const scope = yield* Scope.make()
        const listener = yield* Transport.listen(address._tag === "Unix" ? unixAddress("closing-listener") : address).pipe(
          Scope.extend(scope)
        )
        const waiting = yield* Effect.fork(Migration.incoming(listener, { timeouts: TIMEOUTS }))
        // it waits for a source (some event-loop turns, no timer)
        for (let i = 0; i < 5; i++) yield* nextTurn
        expect(Option.isNone(yield* Fiber.poll(waiting))).toBe(true)
        yield* Scope.close(scope, Exit.void)
        const later = failureOf(yield* noHang(Fiber.await(waiting), "incoming waiting on a listener that closed"))
        expect((later as Transport.TransportError).reason).toBe("Closed")
      }
    })))
})
