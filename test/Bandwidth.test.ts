/**
 * The bandwidth limit (issue 14, `--max-bandwidth`), over real loopback sockets:
 *
 * - `Bandwidth.parse` reads rates as QEMU's `max-bandwidth` does (MiB/s by default);
 * - a limited migration is never faster than its limit (a lower bound only: a slow machine can only make it
 *   slower), and its bytes are spread evenly over the channels, in this thread and on channel threads;
 * - at a rate where a packet takes longer than the peer timeout, a packet goes in pieces and the bytes keep
 *   flowing: neither peer takes the pacing for silence;
 * - a limit changed while the migration runs applies at once: a migration limited to 64 KiB/s (minutes for
 *   its 8 MiB) finishes once the limit is lifted, its channels waking from their waits;
 * - bad rates are `BadOptions` before anything connects; `MULTIFD_MAX_BANDWIDTH` names itself when bad.
 *
 * The benchmark (`npm run bench`, BANDWIDTH row) measures how close to the limit a migration runs.
 */
import { describe, expect, it } from "@effect/vitest"
import * as ConfigProvider from "effect/ConfigProvider"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Fiber from "effect/Fiber"
import * as Crypto from "node:crypto"
import * as Bandwidth from "../src/Bandwidth.js"
import * as ChannelThreads from "../src/ChannelThreads.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationConfig from "../src/MigrationConfig.js"
import * as MigrationError from "../src/MigrationError.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { noHang } from "./support/guards.js"
import { leakFree } from "./support/handles.js"
import { sameMemory } from "./support/memory.js"

const PAGE = 4096
const MIB = 1024 * 1024
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }
const TIMEOUTS = { connect: "5 seconds", handshake: "5 seconds", peer: "5 seconds" } as const

/** `mib` MiB of random pages in shared memory (channel threads read it in place). */
const randomRam = (mib: number) => {
  const bytes = GuestRam.allocate(mib * MIB)
  Crypto.randomFillSync(bytes)
  return GuestRam.make({ pageSize: PAGE, blocks: [{ name: "pc.ram", bytes }] })
}

/** A destination on a free port, receiving in a fiber of the caller's scope. */
const startDestination = (options: Migration.IncomingOptions = {}) =>
  Effect.gen(function*() {
    const listener = yield* Transport.listen(tcp0)
    const fiber = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, ...options }))
    return { address: listener.address, fiber }
  })

describe("Bandwidth.parse", () => {
  it("reads MiB/s by default and binary units, as QEMU's max-bandwidth", () => {
    const cases: ReadonlyArray<readonly [string, number]> = [
      ["100", 100 * MIB],
      ["100M", 100 * MIB],
      ["100MiB", 100 * MIB],
      ["512K", 512 * 1024],
      ["1G", 1024 * MIB],
      ["1.5G", 1.5 * 1024 * MIB],
      ["4096B", 4096],
      ["0", 0]
    ]
    for (const [text, bytes] of cases) expect(Bandwidth.parse(text)).toStrictEqual(Either.right(bytes))
    for (const text of ["fast", "-1", "10X", "", "1e9"]) {
      const parsed = Bandwidth.parse(text)
      expect(Either.isLeft(parsed) && parsed.left).toContain("is not a rate like 100M")
    }
    // a positive rate that rounds to 0 bytes a second would mean no limit at all
    for (const text of ["0.4B", "0.0000001"]) {
      expect(Bandwidth.parse(text)).toStrictEqual(Either.left(`${JSON.stringify(text)} is less than one byte a second`))
    }
    expect(Bandwidth.parse("0.0")).toStrictEqual(Either.right(0))
    expect(Bandwidth.format(64 * MIB)).toBe("64 MiB/s")
    expect(Bandwidth.format(0)).toBe("no limit")
  })
})

describe("a limited migration", () => {
  for (const threaded of [false, true]) {
    it.live(`is no faster than its limit, its bytes spread evenly over 4 channels (${threaded ? "channel threads" : "this thread"})`, () =>
      leakFree(Effect.provide(Effect.gen(function*() {
        const ram = yield* randomRam(6)
        const dest = yield* startDestination()
        const limit = 12 * MIB
        const started = performance.now()
        const stats = yield* noHang(
          Migration.migrate({ address: dest.address, channels: 4, timeouts: TIMEOUTS, maxBandwidth: limit }).pipe(
            Effect.provideService(GuestRam.GuestRam, ram),
            threaded ? Effect.provide(ChannelThreads.layer({ maxThreads: 2 })) : (self) => self
          ),
          "migrate",
          20
        )
        const seconds = (performance.now() - started) / 1000
        const received = yield* Fiber.join(dest.fiber)
        expect(sameMemory(received.ram, ram)).toBe(true)
        // every byte on the wire counts: what went beyond the first packet's burst took its time at the rate
        const wire = stats.wireBytes
        expect(wire).toBeGreaterThan(6 * MIB)
        expect(seconds).toBeGreaterThanOrEqual((wire - 600 * 1024) / limit * 0.95)
        expect(stats.channelWireBytes).toHaveLength(4)
        for (const bytes of stats.channelWireBytes ?? []) {
          expect(bytes / wire).toBeGreaterThan(0.15)
          expect(bytes / wire).toBeLessThan(0.35)
        }
      }), Transport.layer)))
  }

  // (a channel on a channel thread runs the same code: sendChannel.serve)
  it.live("keeps its bytes flowing when a packet takes longer than the peer timeout: 512 KiB/s, peers that give up after 500 ms of silence", () =>
    leakFree(Effect.provide(Effect.gen(function*() {
      // 1.5 MiB on one channel: three packets of 512 KiB, a second each at the rate; the first goes at once
      // (the link was idle), and each of the others would leave the link quiet for a second if written whole
      const ram = yield* randomRam(1.5)
      const timeouts = { ...TIMEOUTS, peer: "500 millis" } as const
      const dest = yield* startDestination({ timeouts })
      const started = performance.now()
      const stats = yield* noHang(
        Migration.migrate({ address: dest.address, channels: 1, timeouts, maxBandwidth: 512 * 1024 }).pipe(
          Effect.provideService(GuestRam.GuestRam, ram)
        ),
        "migrate",
        20
      )
      const seconds = (performance.now() - started) / 1000
      expect(sameMemory((yield* Fiber.join(dest.fiber)).ram, ram)).toBe(true)
      // still no faster than the limit
      expect(seconds).toBeGreaterThanOrEqual((stats.wireBytes - 600 * 1024) / (512 * 1024) * 0.95)
    }), Transport.layer)))

  it.live("follows a change while it runs: limited to 64 KiB/s (minutes for 8 MiB), it ends once the limit is lifted", () =>
    leakFree(Effect.provide(Effect.gen(function*() {
      const ram = yield* randomRam(8)
      // the first pages arrive (the first packet goes at once: the link was idle), the rest waits its turn
      const moving = yield* Deferred.make<void>()
      const dest = yield* startDestination({
        timeouts: { ...TIMEOUTS, peer: "60 seconds" },
        onProgress: (p) => (p.doneBytes > 0 ? Deferred.succeed(moving, undefined) : Effect.void)
      })
      const limit = yield* Bandwidth.make(64 * 1024)
      const fiber = yield* Effect.fork(
        Migration.migrate({
          address: dest.address,
          channels: 2,
          timeouts: { ...TIMEOUTS, peer: "60 seconds" },
          maxBandwidth: limit
        }).pipe(Effect.provideService(GuestRam.GuestRam, ram))
      )
      yield* noHang(Deferred.await(moving), "the first bytes")
      expect(yield* limit.rate).toBe(64 * 1024)
      yield* limit.set(0)
      expect(yield* limit.rate).toBe(0)
      yield* noHang(Fiber.join(fiber), "the migration once the limit is lifted", 15)
      expect(sameMemory((yield* Fiber.join(dest.fiber)).ram, ram)).toBe(true)
    }), Transport.layer)))
})

describe("bad rates", () => {
  it.live("a negative, infinite, sub-byte or unsafe rate is BadOptions before anything connects; so is a bad Bandwidth.set", () =>
    leakFree(Effect.provide(Effect.gen(function*() {
      const ram = yield* randomRam(1)
      // nothing listens at port 1: a check after connecting would fail with Connect instead
      // 0.4 B/s rounded to 0 and 2^64 wrapped to 0 in the limit's 64-bit slot: each lifted the limit it was to set
      for (const maxBandwidth of [-1, Infinity, NaN, 0.4, 2 ** 64, 1e19]) {
        const exit = yield* Effect.exit(
          Migration.migrate({ address: { _tag: "Tcp", host: "127.0.0.1", port: 1 }, maxBandwidth }).pipe(
            Effect.provideService(GuestRam.GuestRam, ram)
          )
        )
        const error = failureOf(exit)
        expect(error).toBeInstanceOf(MigrationError.MigrationError)
        expect((error as MigrationError.MigrationError).reason).toBe("BadOptions")
        expect(error.message).toContain("a bandwidth limit must be a number of bytes per second >= 0")
        expectOneLine(error)
      }
      const limit = yield* Bandwidth.make(MIB)
      const set = yield* Effect.flip(limit.set(-5))
      expect(set.reason).toBe("BadOptions")
      expect(yield* limit.rate).toBe(MIB)
      expect((yield* Effect.flip(limit.set(2 ** 63))).reason).toBe("BadOptions")
      expect(yield* limit.rate).toBe(MIB)
    }), Transport.layer)))

  it.effect("MULTIFD_MAX_BANDWIDTH: a rate in the environment, or one line naming the variable", () =>
    Effect.gen(function*() {
      const read = (value: string) =>
        Effect.withConfigProvider(MigrationConfig.config, ConfigProvider.fromMap(new Map([["MULTIFD_MAX_BANDWIDTH", value]]), { pathDelim: "_" }))
      expect((yield* read("64M")).maxBandwidth).toBe(64 * MIB)
      const error = yield* Effect.flip(read("lots"))
      expect(MigrationConfig.describeError(error)).toMatch(/^MULTIFD_MAX_BANDWIDTH: "lots" is not a rate like 100M/)
    }))
})
