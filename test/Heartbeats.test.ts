/**
 * A slow peer is not a dead one: the waits that may legitimately outlast the peer timeout are bounded by the
 * silence between two heartbeats instead (`Receiving` while a round's bytes arrive, `Hashing` while a side
 * hashes a large memory; `Storing` is Trust.test's).
 *
 * A slow link is not a dead one. On a slow link a round's last bytes sit in the kernels' buffers (and the
 * network's) after the source wrote them, and reach the destination at the link's rate: longer, possibly, than
 * the peer timeout. The destination waits at the round's barrier while bytes arrive and tells the source so
 * (`Receiving`, about every second); the source's wait for the round's acknowledgement runs its peer timeout
 * from the last growth of that count. A link that goes dead still fails both sides within the timeout.
 *
 * - a real slow link (a proxy passing the multifd channels' bytes at a fixed rate) whose round takes several
 *   peer timeouts: the migration succeeds, the memories are equal;
 * - the same link going dead mid-round: both sides fail, each with one line, nothing hangs or leaks;
 * - the source's rule, against a fake destination on the TestClock: a `Receiving` whose count grows restarts
 *   the peer timeout, one that repeats the same count does not; and while it sends, a write that waits for
 *   seconds (a full socket on a slow link) is not a stall while the destination hears bytes;
 * - the messages: `Receiving` on the wire, and an older source's hello (no `heartbeats`: it hears none).
 *
 * Hashing a large memory takes longer than the peer timeout (a few GiB a second). Against fakes on the
 * TestClock, each side's `Hashing` keeps the other waiting, for four peer timeouts; a peer that falls silent
 * after it is timed out one peer timeout after its last word.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Option from "effect/Option"
import * as Ref from "effect/Ref"
import * as TestClock from "effect/TestClock"
import * as Crypto from "node:crypto"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import type * as MigrationError from "../src/MigrationError.js"
import * as Transport from "../src/Transport.js"
import { advanceUntil } from "./support/clock.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { noHang } from "./support/guards.js"
import { fakeDestination } from "./support/fakeDestination.js"
import { BLOCK, BLOCK_PAGES, fakeSource, PAGE as FAKE_PAGE, ramPacket, randomPage, syncPacket } from "./support/fakeSource.js"
import { leakFree, nextTurn } from "./support/handles.js"
import * as Precopy from "../src/internal/precopy.js"
import { sameMemory } from "./support/memory.js"
import { slowLink } from "./support/slowLink.js"
import { smallHello } from "./support/wire.js"

const PAGE = 4096
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }
const fiberDone = <A, E>(fiber: Fiber.Fiber<A, E>) => Effect.map(Fiber.poll(fiber), Option.isSome)

/**
 * Moves the TestClock until `fiber` fails, which must be a `Timeout` (with `message`, when given); yields how
 * long after `since` it failed.
 */
const timedOut = <A, E>(fiber: Fiber.Fiber<A, E>, since: number, what: string, message?: string) =>
  Effect.gen(function*() {
    yield* advanceUntil(fiberDone(fiber), what)
    const error = failureOf(yield* Fiber.await(fiber)) as unknown as MigrationError.MigrationError
    expect(error.reason).toBe("Timeout")
    if (message !== undefined) expect(error.message).toBe(message)
    return (yield* TestClock.currentTimeMillis) - since
  })

/** `pages` random pages in one block. */
const randomRam = (pages: number) => GuestRam.make({ blocks: [{ name: "pc.ram", bytes: Crypto.randomBytes(pages * PAGE) }] })

/** A destination with `timeouts`, in a fiber of the caller's scope, behind a slow link passing `rate` bytes/s a channel. */
const behindSlowLink = (
  timeouts: Migration.Timeouts,
  plan: { readonly rate: number; readonly stopAfter?: number; readonly hold?: number }
) =>
  Effect.gen(function*() {
    const listener = yield* Transport.listen(tcp0)
    const fiber = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts }))
    const link = yield* Effect.acquireRelease(
      Effect.promise(() => slowLink({ host: "127.0.0.1", port: (listener.address as { readonly port: number }).port }, plan)),
      (link) => Effect.promise(() => link.close())
    )
    return { fiber, link, address: { _tag: "Tcp", host: "127.0.0.1", port: link.port } as Transport.Address }
  })

const migrate = (address: Transport.Address, ram: GuestRam.GuestRam["Type"], timeouts: Migration.Timeouts) =>
  Migration.migrate({ address, channels: 2, timeouts }).pipe(
    Effect.provide(Transport.layer),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

describe("a slow link is not a dead one", () => {
  const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "1 second" } as const
  // a round of 2 × 512 KiB at 100 KiB/s a channel: about 5.2 s of arrival, more than twice the peer timeout (a
  // peer timeout of 2 s, not 1: a loaded machine's event loop can lag a second without the link being slow)
  const SLOW_LINK_TIMEOUTS = { ...TIMEOUTS, peer: "2 seconds" } as const

  it.live("a round's bytes arriving for longer than the peer timeout: the migration succeeds, the memories are equal", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* randomRam(256)
      const dest = yield* behindSlowLink(SLOW_LINK_TIMEOUTS, { rate: 100 * 1024 })
      const started = Date.now()
      const stats = yield* noHang(migrate(dest.address, ram, SLOW_LINK_TIMEOUTS), "the migration over the slow link", 30)
      const received = yield* noHang(Fiber.join(dest.fiber), "the destination", 30)
      expect(sameMemory(received.ram, ram)).toBe(true)
      expect(stats.ramBytes).toBe(ram.size)
      // the round did take longer than two peer timeouts: the waits were bounded by silence, not by the whole
      expect(Date.now() - started).toBeGreaterThan(4_000)
      expect(dest.link.passed()).toBeGreaterThanOrEqual(ram.size)
    })), 40_000)

  it.live("the link goes dead mid-round: both sides fail within the timeouts, each with one line", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* randomRam(256)
      // 300 KiB of each channel pass, then nothing (nothing is closed either)
      const dest = yield* behindSlowLink(TIMEOUTS, { rate: 400 * 1024, stopAfter: 300 * 1024 })
      const source = yield* Effect.exit(noHang(migrate(dest.address, ram, TIMEOUTS), "the source", 20))
      const destination = yield* noHang(Fiber.await(dest.fiber), "the destination", 20)
      const sourceError = failureOf(source) as MigrationError.MigrationError
      const destinationError = failureOf(destination) as MigrationError.MigrationError
      expectOneLine(sourceError)
      expectOneLine(destinationError)
    })), 40_000)
})

describe("the source's wait for a round's acknowledgement (TestClock)", () => {
  const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const

  /**
   * A fake destination that answers the first flush with `Receiving` messages (one every 500 ms of the
   * TestClock, counting `bytes(i)` for the i-th) until `ackAfter` of them, then `FlushAck`; later flushes at once.
   */
  const receivingDestination = (bytes: (i: number) => number, ackAfter: number) =>
    Effect.gen(function*() {
      const flushed = yield* Deferred.make<void>()
      const address = yield* fakeDestination({
        heartbeats: true,
        onHello: (hello) => expect(hello.heartbeats).toBe(true),
        onFlush: (control, flush, index) =>
          index > 0 ? Effect.void : Effect.gen(function*() {
            yield* Deferred.succeed(flushed, undefined)
            for (let i = 0; i < ackAfter; i++) {
              yield* Effect.sleep("500 millis")
              yield* Control.send(control, new Control.Receiving({ round: flush.round, bytes: bytes(i) }))
            }
          })
      })
      return { address, flushed }
    })

  it.effect("a count that grows restarts the peer timeout: acknowledged after four peer timeouts, the source succeeds", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* randomRam(16)
      // 16 messages 500 ms apart: 8 s of TestClock before the FlushAck, the peer timeout is 2 s
      const fake = yield* receivingDestination((i) => 1000 * (i + 1), 16)
      const source = yield* Effect.forkScoped(migrate(fake.address, ram, TIMEOUTS))
      yield* noHang(Deferred.await(fake.flushed), "the first flush")
      const t0 = yield* TestClock.currentTimeMillis
      yield* advanceUntil(fiberDone(source), "the source")
      const stats = yield* Fiber.join(source)
      expect(stats.ramBytes).toBe(ram.size)
      expect((yield* TestClock.currentTimeMillis) - t0).toBeGreaterThanOrEqual(8_000)
    })))

  /** How long (TestClock) after the first flush the source gave up on a destination counting `bytes(i)`. */
  const waitedFor = (bytes: (i: number) => number) =>
    Effect.gen(function*() {
      const ram = yield* randomRam(16)
      const fake = yield* receivingDestination(bytes, 1000)
      const source = yield* Effect.forkScoped(migrate(fake.address, ram, TIMEOUTS))
      yield* noHang(Deferred.await(fake.flushed), "the first flush")
      const t0 = yield* TestClock.currentTimeMillis
      return yield* timedOut(
        source,
        t0,
        "the source timing out",
        "timed out after 2s waiting for the destination to acknowledge the flush"
      )
    })

  it.effect("a count that does not grow does not: the source times out one peer timeout after the last growth", () =>
    leakFree(Effect.gen(function*() {
      // the count grows for the first two messages (1 s), then stays: the source gives up at about 3 s
      const waited = yield* waitedFor((i) => Math.min(i, 1) * 1000 + 1000)
      expect(waited).toBeGreaterThanOrEqual(3_000)
      expect(waited).toBeLessThanOrEqual(3_500)
    })))

  it.effect("a count beyond the bytes this side sent is not believed past them: the source times out as if it did not grow", () =>
    leakFree(Effect.gen(function*() {
      // a terabyte more each time, for ever: only the first message's growth (to all that was sent) counts
      const waited = yield* waitedFor((i) => 1e12 * (i + 1))
      expect(waited).toBeGreaterThanOrEqual(2_000)
      expect(waited).toBeLessThanOrEqual(3_000)
    })))
})

describe("Control.Receiving on the wire", () => {
  const hello = smallHello
  const decoded = (message: Control.Message) => {
    const frame = Control.encode(message)
    return Control.decode(frame.subarray(4))
  }

  it("a Receiving round-trips; a negative count or a fractional round is a bad message naming the field", () => {
    const back = decoded(new Control.Receiving({ round: 3, bytes: 123456 }))
    expect(back._tag === "Right" && back.right).toMatchObject({ _tag: "Receiving", round: 3, bytes: 123456 })
    const bad = Control.decode(Buffer.from(JSON.stringify({ _tag: "Receiving", round: 1, bytes: -5 })))
    expect(bad._tag).toBe("Left")
    expect(bad._tag === "Left" && bad.left.message).toContain("Receiving: [\"bytes\"]")
    const fractional = Control.decode(Buffer.from(JSON.stringify({ _tag: "Receiving", round: 1.5, bytes: 5 })))
    expect(fractional._tag === "Left" && fractional.left.message).toContain("Receiving: [\"round\"]")
  })

  it("a hello says whether the source hears Receiving; an older source's hello (without the field) does not", () => {
    const ours = decoded(hello({ heartbeats: true }))
    expect(ours._tag === "Right" && (ours.right as Control.Hello).heartbeats).toBe(true)
    const older = decoded(hello({}))
    expect(older._tag === "Right" && (older.right as Control.Hello).heartbeats).toBeUndefined()
  })
})

describe("hashing a large memory (TestClock)", () => {
  const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const

  /** Moves the TestClock by `ms` in 100 ms steps, letting the event loop turn after each (sockets deliver). */
  const advance = (ms: number) =>
    Effect.forEach(Array.from({ length: ms / 100 }), () => Effect.zipRight(TestClock.adjust("100 millis"), nextTurn), {
      discard: true
    })

  /**
   * A fake destination that hears heartbeats and, after Complete, sends `Hashing` every 500 ms of the TestClock
   * `hashFor` times, then `Done` if `done`, else nothing more.
   */
  const hashingDestination = (hashFor: number, done: boolean) =>
    Effect.gen(function*() {
      const completed = yield* Deferred.make<void>()
      const sent = { hashing: 0 }
      const address = yield* fakeDestination({
        heartbeats: true,
        onHello: (hello) => expect(hello.heartbeats).toBe(true),
        onComplete: (control) =>
          Effect.gen(function*() {
            yield* Deferred.succeed(completed, undefined)
            for (let i = 0; i < hashFor; i++) {
              yield* Effect.sleep("500 millis")
              yield* Control.send(control, new Control.Hashing())
              sent.hashing++
            }
            if (done) yield* Control.send(control, new Control.Done())
          })
      })
      return { address, completed, sent }
    })

  it.effect("the destination hashes for four peer timeouts, saying so: the source waits, then succeeds", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* randomRam(16)
      const fake = yield* hashingDestination(16, true)
      const source = yield* Effect.forkScoped(migrate(fake.address, ram, TIMEOUTS))
      yield* noHang(Deferred.await(fake.completed), "the source's Complete")
      const t0 = yield* TestClock.currentTimeMillis
      yield* advanceUntil(fiberDone(source), "the source")
      const stats = yield* Fiber.join(source)
      expect(stats.ramBytes).toBe(ram.size)
      expect(fake.sent.hashing).toBe(16)
      expect((yield* TestClock.currentTimeMillis) - t0).toBeGreaterThanOrEqual(8_000)
    })))

  it.effect("the destination says Hashing, then nothing: the source times out one peer timeout after its last word", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* randomRam(16)
      const fake = yield* hashingDestination(4, false)
      const source = yield* Effect.forkScoped(migrate(fake.address, ram, TIMEOUTS))
      yield* noHang(Deferred.await(fake.completed), "the source's Complete")
      const t0 = yield* TestClock.currentTimeMillis
      const waited = yield* timedOut(
        source,
        t0,
        "the source timing out",
        "timed out after 2s waiting for the destination to verify the digests"
      )
      expect(waited).toBeGreaterThanOrEqual(4_000)
      expect(waited).toBeLessThanOrEqual(4_600)
    })))

  /**
   * A destination behind a fake source that asks for heartbeats: four pages and a final round on one channel,
   * then `Hashing` every 500 ms of the TestClock `hashFor` times, then (if `complete`) the right digests.
   */
  /** The next message that is not a heartbeat (`Receiving` comes whenever bytes arrived). */
  const receiveWork = (control: Transport.Connection): Effect.Effect<Control.Message, Control.ReceiveError> =>
    Effect.flatMap(Control.receive(control), (message) => message._tag === "Receiving" ? receiveWork(control) : Effect.succeed(message))

  const hashingSource = (hashFor: number, complete: boolean) =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: BLOCK, size: BLOCK_PAGES * FAKE_PAGE }] })
      const listener = yield* Transport.listen(tcp0)
      const dest = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, ram }))
      const src = yield* fakeSource(listener.address, 1, "none", true)
      expect((src.accept as Control.Accept).heartbeats).toBe(true)
      const c0 = yield* src.channel(0)
      const expected = yield* GuestRam.make({ blocks: [{ name: BLOCK, size: BLOCK_PAGES * FAKE_PAGE }] })
      const pages = [0, 1, 2, 3].map((p) => ({ offset: p * FAKE_PAGE, bytes: randomPage() }))
      for (const p of pages) Buffer.from(p.bytes).copy(expected.block(BLOCK)!.bytes, p.offset)
      yield* c0.write(ramPacket(pages))
      yield* c0.write([syncPacket()])
      yield* src.control.write([Control.encode(new Control.Flush({ round: 0, final: true }))])
      expect(yield* noHang(receiveWork(src.control), "FlushAck")).toMatchObject({ _tag: "FlushAck", round: 0 })
      const t0 = yield* TestClock.currentTimeMillis
      for (let i = 0; i < hashFor; i++) {
        yield* advance(500)
        yield* src.control.write([Control.encode(new Control.Hashing())])
      }
      if (complete) {
        yield* src.control.write([Control.encode(new Control.Complete({ digests: yield* GuestRam.digest(expected) }))])
        expect(yield* noHang(receiveWork(src.control), "Done")).toMatchObject({ _tag: "Done" })
        yield* Effect.all([c0.end, src.control.end], { discard: true })
      }
      return { dest, ram, expected, t0 }
    })

  it.effect("the source hashes for four peer timeouts, saying so: the destination waits, then verifies", () =>
    leakFree(Effect.gen(function*() {
      const { dest, expected, ram, t0 } = yield* hashingSource(16, true)
      expect((yield* TestClock.currentTimeMillis) - t0).toBeGreaterThanOrEqual(8_000)
      yield* noHang(Fiber.join(dest), "the destination")
      expect(sameMemory(ram, expected)).toBe(true)
    })))

  it.effect("the source says Hashing, then nothing: the destination times out one peer timeout after its last word", () =>
    leakFree(Effect.gen(function*() {
      const { dest, t0 } = yield* hashingSource(4, false)
      const last = yield* TestClock.currentTimeMillis
      expect(last - t0).toBeGreaterThanOrEqual(2_000)
      const waited = yield* timedOut(dest, last, "the destination timing out")
      expect(waited).toBeGreaterThanOrEqual(2_000)
      expect(waited).toBeLessThanOrEqual(2_600)
    })))
})

describe("the source's transfer: bytes the destination heard are progress (TestClock)", () => {
  /** Precopy over a sink whose one batch waits until `release`, its own counter still; `heard` as given. */
  const blockedSend = (heard: Ref.Ref<number>, release: Deferred.Deferred<void>) =>
    Effect.gen(function*() {
      const ram = yield* randomRam(8)
      // the sink's own counter moves only when the write is done (the whole batch accepted at once)
      const sent = yield* Ref.make(0)
      return yield* Effect.forkScoped(Precopy.run(ram, {
        sink: {
          slots: 128,
          send: (_block, _pages, count) => Effect.zipRight(Deferred.await(release), Ref.update(sent, (n) => n + count * PAGE)),
          sync: Effect.void,
          failure: Effect.never,
          progress: Ref.get(sent),
          heard: Ref.get(heard)
        },
        started: 0,
        live: undefined,
        stallTimeout: "2 seconds",
        onProgress: undefined,
        flush: () => Effect.void
      }))
    })

  it.scoped("a write waiting four peer timeouts while the destination's count grows: the round completes", () =>
    Effect.gen(function*() {
      const heard = yield* Ref.make(0)
      const release = yield* Deferred.make<void>()
      const run = yield* blockedSend(heard, release)
      for (let i = 0; i < 16; i++) {
        yield* TestClock.adjust("500 millis")
        yield* Ref.update(heard, (n) => n + 1000)
      }
      expect(run.unsafePoll()).toBeNull()
      yield* Deferred.succeed(release, undefined)
      const result = yield* Fiber.join(run)
      expect(result.pagesPerRound[0]).toBe(8)
    }))

  it.scoped("the same write with a count that does not grow: the stall watch fires after the timeout", () =>
    Effect.gen(function*() {
      const heard = yield* Ref.make(0)
      const release = yield* Deferred.make<void>()
      const run = yield* blockedSend(heard, release)
      yield* TestClock.adjust("500 millis")
      yield* Ref.update(heard, (n) => n + 1000)
      yield* advanceUntil(fiberDone(run), "the stall watch")
      const error = failureOf(yield* Fiber.await(run)) as MigrationError.MigrationError
      expect(error.message).toBe("timed out after 2s without progress sending pages")
      const now = yield* TestClock.currentTimeMillis
      expect(now).toBeGreaterThanOrEqual(2_500)
      expect(now).toBeLessThanOrEqual(3_100)
    }))
})
