/**
 * Observability and configuration of a migration (issue 15), over real loopback sockets:
 *
 * - `MigrationStatus`: read mid-migration (the source held in its progress callback) it says `active` with
 *   sane numbers on both sides; after the end `completed` with the stats' totals; `failed` with the reason;
 *   `cancelled` when interrupted;
 * - `MigrationMetrics`: a migration adds its bytes per channel, pages, packets, syncs and rounds, its outcome
 *   and downtime;
 * - `MigrationConfig`: settings from a `ConfigProvider` fill in the options left out (options win); a bad
 *   variable is one line naming it.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as ConfigProvider from "effect/ConfigProvider"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as Metric from "effect/Metric"
import * as Stream from "effect/Stream"
import * as TestClock from "effect/TestClock"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationConfig from "../src/MigrationConfig.js"
import * as MigrationError from "../src/MigrationError.js"
import * as MigrationMetrics from "../src/MigrationMetrics.js"
import * as MigrationStatus from "../src/MigrationStatus.js"
import * as Status from "../src/internal/status.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { tempDirectory } from "./support/files.js"
import { noHang } from "./support/guards.js"
import { leakFree } from "./support/handles.js"
import { mixedImage } from "./support/images.js"

const PAGE = 4096
const PAGES = 2048 // 8 MiB: several batches per channel
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }
const TIMEOUTS = { connect: "5 seconds", handshake: "5 seconds", peer: "5 seconds" } as const

const sourceRam = (pages = PAGES) => GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(pages, 0.75, PAGE) }] })
/**
 * 64 MiB over one channel: four hand-offs of 16 MiB, the channel busy with one while the next waits, so that
 * a report comes with some of the round's pages sent and not all.
 */
const BIG = 16384

/** A destination listening on a free port, receiving in a fiber of the test's scope. */
const startDestination = (options: Migration.IncomingOptions = {}) =>
  Effect.gen(function*() {
    const transport = yield* Transport.Transport
    const listener = yield* transport.listen(tcp0)
    const fiber = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, ...options }))
    return { address: listener.address, fiber }
  })

/**
 * A progress callback that holds the migration at its first report with some pages sent (mid round 0) until
 * `release` completes, and says so through `reached`.
 */
const holdAtFirstPages = Effect.gen(function*() {
  const reached = yield* Deferred.make<Migration.Progress>()
  const release = yield* Deferred.make<void>()
  const onProgress = (p: Migration.Progress) =>
    p.doneBytes > 0 && p.doneBytes < p.totalBytes
      ? Effect.flatMap(Deferred.succeed(reached, p), (first) => (first ? Deferred.await(release) : Effect.void))
      : Effect.void
  return { reached, release, onProgress }
})

/** The first snapshot published with `status`. */
const firstWith = (handle: MigrationStatus.MigrationStatus, status: MigrationStatus.Status) =>
  noHang(
    Effect.map(
      Stream.runHead(Stream.filter(handle.changes, (s) => s.status === status)),
      (o) => (o._tag === "Some" ? o.value : undefined)
    ),
    `status ${status}`
  )

const run = <A, E>(self: Effect.Effect<A, E, Transport.Transport | import("effect/Scope").Scope>) =>
  leakFree(Effect.scoped(self).pipe(Effect.provide(Transport.layer)))

describe("the destination's progress", () => {
  it.live("counts a round once every channel finished it: one channel's SYNC in, the other's held, the round is 0", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam(256)
      const reports: Array<Migration.Progress> = []
      const dest = yield* startDestination({ onProgress: (p) => Effect.sync(() => void reports.push(p)) })
      // channel 1's first SYNC waits for `release`; channel 0's goes at once
      const release = yield* Deferred.make<void>()
      const held = yield* Deferred.make<void>()
      const isSync = (chunks: ReadonlyArray<Uint8Array>) => {
        const first = chunks[0]
        if (first === undefined || first.length < 12 || first.length === 64) return false
        const view = Buffer.from(first.buffer, first.byteOffset, first.byteLength)
        return view.readUInt32BE(0) === 0x11223344 && (view.readUInt32BE(8) & 1) === 1
      }
      const upgrade: Transport.Upgrade<never> = (connection, channel) =>
        Effect.succeed(
          channel === 1
            ? {
              ...connection,
              write: (chunks) =>
                isSync(chunks)
                  ? Effect.zipRight(Effect.zipRight(Deferred.succeed(held, undefined), Deferred.await(release)), connection.write(chunks))
                  : connection.write(chunks)
            }
            : connection
        )
      const source = yield* Effect.forkScoped(
        Migration.migrate({ address: dest.address, channels: 2, timeouts: TIMEOUTS, upgrade }).pipe(
          Effect.provideService(GuestRam.GuestRam, ram)
        )
      )
      yield* noHang(Deferred.await(held), "channel 1's SYNC")
      // reports (one a second) until one counts every page: channel 0's SYNC is in, channel 1's still held
      const whole = () => reports.filter((r) => r.doneBytes === ram.size)
      yield* noHang(Effect.repeat(Effect.sleep("50 millis"), { until: () => whole().length > 0 }), "a report of every page")
      const whileHeld = whole()
      yield* Deferred.succeed(release, undefined)
      yield* noHang(Fiber.join(source), "migrate")
      yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(reports.map((r) => r.round).filter((round) => !Number.isInteger(round))).toEqual([])
      expect(whileHeld.map((r) => r.round)).toEqual(whileHeld.map(() => 0))
    })))

  /**
   * The destination's last report runs after the source was told Done: a callback that died there failed
   * `incoming` while the source reported success (a periodic report that died was ignored, in its fiber). A
   * report never fails the migration now, on either side: its failure is logged as a warning.
   */
  it.live("an onProgress that dies at every report of all pages (the last after Done): both sides succeed, logged", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam(256)
      const warnings: Array<{ readonly message: string; readonly cause: string }> = []
      const logger = Logger.make(({ cause, logLevel, message }) => {
        if (logLevel._tag === "Warning") {
          warnings.push({ message: [message].flat().join(" "), cause: Cause.pretty(cause) })
        }
      })
      const dest = yield* startDestination({
        onProgress: (p) => p.doneBytes === p.totalBytes ? Effect.die(new Error("the application's bug")) : Effect.void
      }).pipe(Effect.provide(Logger.replace(Logger.defaultLogger, logger)))
      const stats = yield* noHang(
        Migration.migrate({ address: dest.address, channels: 1, timeouts: TIMEOUTS }).pipe(
          Effect.provideService(GuestRam.GuestRam, ram)
        ),
        "migrate"
      )
      const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(received.stats.uuid).toBe(stats.uuid)
      expect(received.ram.blocks[0]!.bytes.equals(ram.blocks[0]!.bytes)).toBe(true)
      expect(warnings.length).toBeGreaterThan(0)
      for (const w of warnings) {
        expect(w.message).toBe("a progress report (onProgress) failed; the transfer goes on without it")
        expect(w.cause).toContain("the application's bug")
      }
    })))
})

describe("the source's progress while its destination stores", () => {
  /**
   * Once every page was sent, the source's onProgress heard nothing until Done: a destination storing its image for
   * minutes (a slow disk's fsync) left the last round's report standing still, while the source heard Storing every
   * second. Each heartbeat is now a report, the last round's numbers with `destination` saying what it does and for
   * how long so far.
   */
  it.live("a store step held until the source heard of it: reports say storing, every page sent; then it succeeds", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam(256)
      const heard = yield* Deferred.make<void>()
      const dest = yield* startDestination({ store: () => Deferred.await(heard) })
      const reports: Array<Migration.Progress> = []
      const stats = yield* noHang(
        Migration.migrate({
          address: dest.address,
          timeouts: TIMEOUTS,
          // (a write meanwhile fails at once, as during the switch-over: the writers are still paused)
          onProgress: (p) =>
            Effect.gen(function*() {
              reports.push(p)
              if (p.destination?.state !== "storing") return
              const write = yield* Effect.exit(GuestRam.write(ram, "pc.ram", 0, Buffer.alloc(8)))
              expect(failureOf(write)).toMatchObject({ _tag: "WriteBlocked" })
              yield* Deferred.succeed(heard, undefined)
            })
        }).pipe(Effect.provideService(GuestRam.GuestRam, ram)),
        "migrate"
      )
      yield* noHang(Fiber.join(dest.fiber), "incoming")
      const storing = reports.filter((p) => p.destination?.state === "storing")
      expect(storing.length).toBeGreaterThan(0)
      // the last round's numbers (the switch-over's: no page written meanwhile, none), every page of it sent
      const lastRound = stats.pagesPerRound.at(-1)! * PAGE
      expect(storing[0]).toMatchObject({
        round: stats.rounds - 1,
        phase: "switchover",
        doneBytes: lastRound,
        totalBytes: lastRound,
        dirtyPages: 0,
        destination: { state: "storing", forMs: expect.any(Number) }
      })
      // and only once every page was sent: the reports before say nothing of the destination
      const first = reports.findIndex((p) => p.destination !== undefined)
      expect(reports.slice(first).every((p) => p.destination !== undefined)).toBe(true)
      expect(reports.slice(0, first).at(-1)).toMatchObject({ round: 0, doneBytes: PAGE * 256 })
    })))
})

describe("MigrationStatus", () => {
  it.live("mid-migration both sides say active with sane numbers; at the end completed with the stats' totals", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam(BIG)
      const srcStatus = yield* MigrationStatus.make
      const dstStatus = yield* MigrationStatus.make
      expect((yield* srcStatus.get).status).toBe("setup")
      const dest = yield* startDestination({ status: dstStatus })
      const hold = yield* holdAtFirstPages
      const source = yield* Effect.forkScoped(
        Migration.migrate({ address: dest.address, channels: 1, timeouts: TIMEOUTS, onProgress: hold.onProgress, status: srcStatus })
          .pipe(Effect.provideService(GuestRam.GuestRam, ram))
      )
      const progress = yield* noHang(Deferred.await(hold.reached), "the first pages")
      const src = yield* srcStatus.get
      expect(src.status).toBe("active")
      expect(src.total).toBe(ram.size)
      expect(src.transferred).toBeGreaterThan(0)
      expect(src.transferred).toBeLessThan(ram.size * 1.1)
      expect(src.normal + src.duplicate).toBeGreaterThan(0)
      expect(src.normal + src.duplicate).toBeLessThanOrEqual(BIG)
      // the pages a switch-over now would still send: those of round 0 not yet sent
      expect(src.remaining).toBe(progress.dirtyPages * PAGE)
      expect(src.remaining).toBeGreaterThan(0)
      expect(src.remaining).toBeLessThan(ram.size)
      expect(src.rounds).toBe(0)
      expect(src.phase).toBe("precopy")
      expect(src.setupTimeMs).toBeGreaterThanOrEqual(0)
      expect(src.totalTimeMs).toBeGreaterThanOrEqual(src.setupTimeMs)
      expect(src.downtimeMs).toBe(0)
      expect(src.mbps).toBeGreaterThanOrEqual(0)
      // live: read again later, the clock moved on and the numbers did not go back
      const again = yield* srcStatus.get
      expect(again.totalTimeMs).toBeGreaterThanOrEqual(src.totalTimeMs)
      expect(again.transferred).toBeGreaterThanOrEqual(src.transferred)

      const dst = yield* firstWith(dstStatus, "active")
      expect(dst!.total).toBe(ram.size)
      const dstNow = yield* dstStatus.get
      expect(dstNow.status).toBe("active")
      expect(dstNow.transferred).toBeLessThanOrEqual(src.transferred)
      expect(dstNow.remaining).toBe(ram.size - (dstNow.normal + dstNow.duplicate) * PAGE)

      yield* Deferred.succeed(hold.release, undefined)
      const stats = yield* noHang(Fiber.join(source), "migrate")
      const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
      const done = yield* srcStatus.get
      expect(done).toMatchObject({
        status: "completed",
        total: ram.size,
        transferred: stats.wireBytes,
        remaining: 0,
        normal: stats.normalPages,
        duplicate: stats.zeroPages,
        rounds: stats.rounds,
        totalTimeMs: stats.durationMs,
        downtimeMs: stats.downtimeMs,
        expectedDowntimeMs: 0
      })
      expect(done.normal + done.duplicate).toBe(BIG)
      expect(done.mbps).toBeGreaterThan(0)
      expect(done.setupTimeMs).toBeLessThanOrEqual(done.totalTimeMs)
      expect(done.error).toBeUndefined()
      expect(yield* srcStatus.await).toEqual(done)
      const dstDone = yield* dstStatus.await
      expect(dstDone).toMatchObject({
        status: "completed",
        total: ram.size,
        transferred: received.stats.wireBytes,
        remaining: 0,
        normal: received.stats.normalPages,
        duplicate: received.stats.zeroPages,
        rounds: received.stats.rounds,
        totalTimeMs: received.stats.durationMs
      })
      expect(dstDone.transferred).toBe(stats.wireBytes)
    })))

  it.live("a refused migration: both sides say failed, with the reason", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const srcStatus = yield* MigrationStatus.make
      const dstStatus = yield* MigrationStatus.make
      const dest = yield* startDestination({ status: dstStatus, expect: { channels: 4 } })
      const error = yield* Effect.flip(
        Migration.migrate({ address: dest.address, channels: 2, timeouts: TIMEOUTS, status: srcStatus })
          .pipe(Effect.provideService(GuestRam.GuestRam, ram))
      )
      yield* Effect.exit(Fiber.join(dest.fiber))
      const src = yield* srcStatus.await
      expect(src.status).toBe("failed")
      expect(src.error).toBe(error.message)
      expect(src.error).toContain("the destination expects 4")
      expect(src.transferred).toBe(0)
      const dst = yield* dstStatus.await
      expect(dst.status).toBe("failed")
      expect(dst.error).toContain("the destination expects 4")
      // options the source cannot use fail before anything connects: failed too, not stuck in setup
      const bad = yield* MigrationStatus.make
      yield* Effect.flip(Migration.migrate({ address: dest.address, channels: 0, status: bad }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram)
      ))
      expect((yield* bad.get).status).toBe("failed")
    })))

  /**
   * A destination that fails before it receives anything — options it cannot use, an address it cannot listen on, TLS
   * asked of a file: — left its handle in setup for good: `await` never returned (the source's failed, as said above).
   */
  it.live("a destination that fails before it listens or accepts says failed, with the reason; await returns", () =>
    run(Effect.gen(function*() {
      const transport = yield* Transport.Transport
      const taken = yield* transport.listen(tcp0)
      const upgrade: Transport.Upgrade<never> = (connection) => Effect.succeed(connection)
      const attempts = [
        (status: MigrationStatus.MigrationStatus) => Migration.incoming(taken, { maxRamBytes: -1, status }),
        (status: MigrationStatus.MigrationStatus) => Migration.listenAndReceive(taken.address, { status }),
        (status: MigrationStatus.MigrationStatus) =>
          Migration.listenAndReceive({ _tag: "File", path: "/nonexistent/ram.snap" }, { upgrade, status })
      ]
      for (const attempt of attempts) {
        const status = yield* MigrationStatus.make
        const error = yield* Effect.flip(attempt(status))
        const end = yield* noHang(status.await, "the status's end")
        expect(end.status).toBe("failed")
        expect(end.error).toBe(error.message)
      }
    })))

  it.live("an interrupted migration: cancelled, with what had moved", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam(BIG)
      const srcStatus = yield* MigrationStatus.make
      const dest = yield* startDestination()
      const hold = yield* holdAtFirstPages
      const source = yield* Effect.forkScoped(
        Migration.migrate({ address: dest.address, channels: 1, timeouts: TIMEOUTS, onProgress: hold.onProgress, status: srcStatus })
          .pipe(Effect.provideService(GuestRam.GuestRam, ram))
      )
      yield* noHang(Deferred.await(hold.reached), "the first pages")
      yield* noHang(Fiber.interrupt(source), "interrupt")
      yield* Effect.exit(Fiber.join(dest.fiber))
      const src = yield* srcStatus.get
      expect(src.status).toBe("cancelled")
      expect(src.transferred).toBeGreaterThan(0)
      expect(src.error).toBeUndefined()
      expect(yield* srcStatus.await).toEqual(src)
    })))

  /**
   * One handle for "the migration" (a health endpoint reads it), and a second migrate of the same memory started
   * while the first runs: refused Busy, it still took the handle — reset it to setup, then said failed and completed
   * `await` with Busy while the first migration went on (and succeeded: `get` then said completed, with Busy's
   * error). A handle follows one migration at a time now: the second fails Busy and leaves it alone. Given to a
   * later migration, the handle follows that one: its `await` answered at once with the first's end.
   */
  it.live("a handle given to a second migration while it follows one: Busy, the handle left alone; a later one follows the next", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam(BIG)
      const other = yield* sourceRam(256)
      const status = yield* MigrationStatus.make
      const dest = yield* startDestination()
      const hold = yield* holdAtFirstPages
      const source = yield* Effect.forkScoped(
        Migration.migrate({ address: dest.address, channels: 1, timeouts: TIMEOUTS, onProgress: hold.onProgress, status })
          .pipe(Effect.provideService(GuestRam.GuestRam, ram))
      )
      yield* noHang(Deferred.await(hold.reached), "the first pages")
      const before = yield* status.get
      expect(before.status).toBe("active")
      // the same memory (Busy as documented), and other memory (it would migrate, but not with this handle)
      for (const memory of [ram, other]) {
        const error = yield* Effect.flip(
          Migration.migrate({ address: dest.address, channels: 1, timeouts: TIMEOUTS, status }).pipe(
            Effect.provideService(GuestRam.GuestRam, memory)
          )
        )
        expect(error).toBeInstanceOf(MigrationError.MigrationError)
        expect((error as MigrationError.MigrationError).reason).toBe("Busy")
        expectOneLine(error)
      }
      const during = yield* status.get
      expect(during.status).toBe("active")
      expect(during.error).toBeUndefined()
      expect(during.total).toBe(ram.size)
      expect(during.transferred).toBeGreaterThanOrEqual(before.transferred)
      const awaiting = yield* Effect.fork(status.await)
      yield* Deferred.succeed(hold.release, undefined)
      yield* noHang(Fiber.join(source), "migrate")
      yield* noHang(Fiber.join(dest.fiber), "incoming")
      const end = yield* noHang(Fiber.join(awaiting), "await")
      expect(end.status).toBe("completed")
      expect(end.error).toBeUndefined()
      expect(yield* status.get).toEqual(end)
      // a later migration with the same handle: its await waits for that one's end
      yield* ram.gate.open
      const next = yield* startDestination({ expect: { channels: 4 } })
      yield* Effect.flip(Migration.migrate({ address: next.address, channels: 1, timeouts: TIMEOUTS, status }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram)
      ))
      yield* Fiber.interrupt(next.fiber)
      const second = yield* status.await
      expect(second.status).toBe("failed")
      expect(second.error).toContain("the destination expects 4")
    })))
})

describe("MigrationStatus.changes", () => {
  /**
   * `changes` never ended: `Stream.runForEach(status.changes, log)` run beside a migration waited for ever once the
   * migration was over, and `runCollect` never returned. It ends with the migration's final snapshot now.
   */
  it.live("a stream run beside a migration ends with it: its last snapshot is the final one, await's", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam(256)
      const srcStatus = yield* MigrationStatus.make
      const dstStatus = yield* MigrationStatus.make
      const collect = (handle: MigrationStatus.MigrationStatus) =>
        Effect.forkScoped(Stream.runCollect(handle.changes))
      const srcChanges = yield* collect(srcStatus)
      const dstChanges = yield* collect(dstStatus)
      const dest = yield* startDestination({ status: dstStatus })
      yield* Migration.migrate({ address: dest.address, channels: 2, timeouts: TIMEOUTS, status: srcStatus }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram)
      )
      yield* noHang(Fiber.join(dest.fiber), "incoming")
      for (const [handle, changes] of [[srcStatus, srcChanges], [dstStatus, dstChanges]] as const) {
        const seen = Array.from(yield* noHang(Fiber.join(changes), "the end of changes"))
        expect(seen.at(-1)).toEqual(yield* handle.await)
        expect(seen.map((s) => s.status).filter(MigrationStatus.isFinal)).toEqual(["completed"])
        // run after the end: the final snapshot alone
        expect(Array.from(yield* noHang(Stream.runCollect(handle.changes), "changes after the end"))).toEqual([seen.at(-1)])
      }
      // a failed migration's stream ends with failed
      const failing = yield* MigrationStatus.make
      const failingChanges = yield* collect(failing)
      yield* Effect.flip(Migration.migrate({ address: dest.address, channels: 0, status: failing }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram)
      ))
      const failed = Array.from(yield* noHang(Fiber.join(failingChanges), "the end of a failed migration's changes"))
      expect(failed.at(-1)?.status).toBe("failed")
    })))
})

/** The current value of a counter tagged `side` (and more tags). */
const count = (metric: Metric.Metric.Counter<number>, tags: Record<string, string>) =>
  Effect.map(Metric.value(Object.entries(tags).reduce((m, [k, v]) => Metric.tagged(m, k, v), metric)), (s) => s.count)

describe("MigrationStatus of a file: save or restore", () => {
  const FILE_PAGES = 2048 // 8 MiB, three in four pages random

  /**
   * A save (`migrate` to a file: address) said active with every count at 0 all along: nothing written, no page,
   * no round done, no downtime while it held writers paused; only its end had the numbers.
   */
  it.scoped("a save: bytes and pages written so far, rounds done, the writers' pause so far", () =>
    Effect.gen(function*() {
      const dir = yield* tempDirectory("emfd-status-")
      const ram = yield* sourceRam(FILE_PAGES)
      const status = yield* MigrationStatus.make
      const seen: Array<readonly [Migration.Progress, MigrationStatus.Snapshot]> = []
      const onProgress = (p: Migration.Progress) =>
        Effect.gen(function*() {
          // the switch-over: a second of it passes (the TestClock) before the status is read
          if (p.phase === "switchover") yield* TestClock.adjust("1 second")
          seen.push([p, yield* status.get])
          // once a round took its pages, a page written: each later round has one
          if (p.phase === "precopy" && p.doneBytes > 0) {
            yield* GuestRam.write(ram, "pc.ram", 3 * PAGE, Buffer.from([p.round, p.doneBytes & 255])).pipe(Effect.orDie)
          }
        })
      const stats = yield* Migration.migrate({
        address: { _tag: "File", path: `${dir}/ram.snap` },
        channels: 1,
        onProgress,
        status,
        live: { downtimeLimit: 0, maxRounds: 2, onNoConvergence: "switchover" }
      }).pipe(Effect.provide(Transport.layer), Effect.provideService(GuestRam.GuestRam, ram))
      yield* ram.gate.open
      expect(stats.pagesPerRound).toEqual([FILE_PAGES, 1, 1])
      // round 1 starts: round 0 is in the file, every page of it
      const [, round1] = seen.find(([p]) => p.round === 1 && p.doneBytes === 0)!
      expect(round1).toMatchObject({ status: "active", rounds: 1, phase: "precopy", downtimeMs: 0 })
      expect(round1.normal + round1.duplicate).toBe(FILE_PAGES)
      expect(round1.normal).toBeGreaterThan(0)
      expect(round1.transferred).toBe(round1.normal * PAGE)
      // the switch-over's report: writers paused for the second that passed, rounds 0 and 1 done
      const [, switchover] = seen.find(([p]) => p.phase === "switchover")!
      expect(switchover).toMatchObject({ status: "active", rounds: 2, phase: "switchover", downtimeMs: 1000 })
      expect(switchover.normal + switchover.duplicate).toBe(FILE_PAGES + 2)
      // and the end: the stats
      expect(yield* status.get).toMatchObject({
        status: "completed",
        rounds: 3,
        transferred: stats.wireBytes,
        normal: stats.normalPages,
        duplicate: stats.zeroPages,
        downtimeMs: stats.downtimeMs
      })
      expect(stats.downtimeMs).toBe(1000)
    }))

  /**
   * A restore (`listenAndReceive` from a file: address) into memory it makes said a total of 0 bytes, 0 remaining,
   * nothing read and no page while it read, until its end.
   */
  it.scoped("a restore: the snapshot's size, bytes read, pages restored and what remains", () =>
    Effect.gen(function*() {
      const dir = yield* tempDirectory("emfd-status-")
      const ram = yield* sourceRam(FILE_PAGES)
      const path = `${dir}/ram.snap`
      yield* Migration.migrate({ address: { _tag: "File", path } }).pipe(
        Effect.provide(Transport.layer),
        Effect.provideService(GuestRam.GuestRam, ram)
      )
      const status = yield* MigrationStatus.make
      const seen: Array<readonly [Migration.Progress, MigrationStatus.Snapshot]> = []
      const received = yield* Migration.listenAndReceive({ _tag: "File", path }, {
        status,
        // the restore's last report (every page read, not yet verified)
        onProgress: (p) => Effect.map(status.get, (now) => void seen.push([p, now]))
      }).pipe(Effect.provide(Transport.layer))
      const last = seen.at(-1)!
      expect(last[0].doneBytes).toBe(ram.size)
      expect(last[1]).toMatchObject({
        status: "active",
        total: ram.size,
        remaining: 0,
        transferred: received.stats.wireBytes,
        normal: received.stats.normalPages,
        duplicate: received.stats.zeroPages
      })
      expect(last[1].transferred).toBeGreaterThan(0)
      // bytes read over at least the millisecond the restore counts on the TestClock
      expect(last[1].mbps).toBeGreaterThan(0)
      expect(last[1].mbps).toBeLessThanOrEqual(Status.mbps(last[1].transferred * 1000))
      expect(yield* status.get).toMatchObject({ status: "completed", total: ram.size, remaining: 0 })
    }))
})

describe("MigrationMetrics", () => {
  it.live("a migration adds its bytes per channel, pages, packets, syncs, rounds, outcome and downtime", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const CHANNELS = 3
      const read = (side: string) =>
        Effect.all({
          bytes: Effect.map(
            Effect.forEach(Array.from({ length: CHANNELS }, (_, i) => i), (channel) =>
              count(MigrationMetrics.wireBytes, { side, channel: String(channel) })),
            (each) => each
          ),
          normal: count(MigrationMetrics.normalPages, { side }),
          zero: count(MigrationMetrics.zeroPages, { side }),
          packets: count(MigrationMetrics.packets, { side }),
          syncs: count(MigrationMetrics.syncs, { side }),
          rounds: count(MigrationMetrics.rounds, { side }),
          completed: count(MigrationMetrics.migrations, { side, outcome: "completed" })
        })
      const before = { source: yield* read("source"), destination: yield* read("destination") }
      const dest = yield* startDestination()
      const stats = yield* Migration.migrate({ address: dest.address, channels: CHANNELS, timeouts: TIMEOUTS })
        .pipe(Effect.provideService(GuestRam.GuestRam, ram))
      const received = yield* Fiber.join(dest.fiber)
      for (const [side, s] of [["source", stats], ["destination", received.stats]] as const) {
        const after = yield* read(side)
        const was = before[side]
        const perChannel = after.bytes.map((b, i) => b - was.bytes[i]!)
        expect({ side, every: perChannel.every((b) => b > 0) }).toEqual({ side, every: true })
        expect(perChannel.reduce((a, b) => a + b, 0)).toBe(s.wireBytes)
        expect(after.normal - was.normal).toBe(s.normalPages)
        expect(after.zero - was.zero).toBe(s.zeroPages)
        expect(after.packets - was.packets).toBe(s.packets)
        expect(after.syncs - was.syncs).toBe(s.syncs)
        expect(after.rounds - was.rounds).toBe(stats.rounds)
        expect(after.completed - was.completed).toBe(1)
      }
      const downtime = yield* Metric.value(Metric.tagged(MigrationMetrics.downtime, "side", "source"))
      expect(downtime.value).toBe(stats.downtimeMs)
      const bandwidth = yield* Metric.value(Metric.tagged(MigrationMetrics.bandwidth, "side", "source"))
      expect(bandwidth.value).toBeGreaterThan(0)
    })))
})

const fromEnv = (env: Record<string, string>) =>
  Effect.withConfigProvider(ConfigProvider.fromMap(new Map(Object.entries(env)), { pathDelim: "_" }))

describe("MigrationConfig", () => {
  it.effect("reads every MULTIFD_* variable; durations and sizes in their short forms", () =>
    Effect.gen(function*() {
      const settings = yield* MigrationConfig.config.pipe(fromEnv({
        MULTIFD_CHANNELS: "6",
        MULTIFD_PAGE_SIZE: "65536",
        MULTIFD_COMPRESSION: "zlib",
        MULTIFD_COMPRESSION_LEVEL: "9",
        MULTIFD_ZERO_PAGE: "none",
        MULTIFD_TIMEOUT: "45s",
        MULTIFD_CONNECT_TIMEOUT: "500ms",
        MULTIFD_HANDSHAKE_TIMEOUT: "2",
        MULTIFD_DOWNTIME_LIMIT: "100ms",
        MULTIFD_MAX_ROUNDS: "7",
        MULTIFD_MAX_DURATION: "2m",
        MULTIFD_ON_NO_CONVERGENCE: "switchover",
        MULTIFD_MAX_RAM: "2G",
        MULTIFD_ACCEPT_TIMEOUT: "1h",
        MULTIFD_RECONNECT: "0"
      }))
      expect(settings).toMatchObject({
        reconnect: 0,
        channels: 6,
        pageSize: 65536,
        compression: "zlib",
        compressionLevel: 9,
        zeroPage: "none",
        maxRamBytes: 2 * 1024 ** 3,
        live: { maxRounds: 7, onNoConvergence: "switchover" }
      })
      const ms = (d: unknown) => (d as { value: { millis: number } }).value.millis
      expect(ms(settings.timeouts!.peer)).toBe(45_000)
      expect(ms(settings.timeouts!.connect)).toBe(500)
      expect(ms(settings.timeouts!.handshake)).toBe(2000)
      expect(ms(settings.live!.downtimeLimit)).toBe(100)
      expect(ms(settings.live!.maxDuration)).toBe(120_000)
      expect(ms(settings.acceptTimeout)).toBe(3_600_000)
      // nothing set: nothing
      const empty = yield* MigrationConfig.config.pipe(fromEnv({}))
      expect(empty.channels).toBeUndefined()
      expect(empty.timeouts).toEqual({})
    }))

  it.effect("a bad variable is one line naming it (layerConfig: a BadOptions MigrationError)", () =>
    Effect.gen(function*() {
      const cases: ReadonlyArray<readonly [Record<string, string>, string]> = [
        [{ MULTIFD_CHANNELS: "0" }, "MULTIFD_CHANNELS: must be between 1 and 255, not 0"],
        [{ MULTIFD_CHANNELS: "256" }, "MULTIFD_CHANNELS: must be between 1 and 255, not 256"],
        [{ MULTIFD_CHANNELS: "four" }, `MULTIFD_CHANNELS: "four" is not an integer`],
        [{ MULTIFD_CHANNELS: "99999999999999999999" }, `MULTIFD_CHANNELS: "99999999999999999999" is out of range`],
        [{ MULTIFD_PAGE_SIZE: "3000" }, "MULTIFD_PAGE_SIZE: must be a power of two between 512 and 524288, not 3000"],
        [{ MULTIFD_COMPRESSION: "lz4" }, `MULTIFD_COMPRESSION: must be one of none, zlib, zstd, not "lz4"`],
        [{ MULTIFD_COMPRESSION: "zlib", MULTIFD_COMPRESSION_LEVEL: "15" }, "MULTIFD_COMPRESSION_LEVEL: zlib level 15 is out of range 0-9"],
        [{ MULTIFD_COMPRESSION_LEVEL: "99" }, "MULTIFD_COMPRESSION_LEVEL: must be between 0 and 20, not 99"],
        [{ MULTIFD_ZERO_PAGE: "yes" }, `MULTIFD_ZERO_PAGE: must be one of multifd, none, not "yes"`],
        [{ MULTIFD_TIMEOUT: "soon" }, `MULTIFD_TIMEOUT: "soon" is not a positive duration like 30s, 500ms, 2m or 1h`],
        [{ MULTIFD_MAX_ROUNDS: "0" }, "MULTIFD_MAX_ROUNDS: must be at least 1, not 0"],
        [{ MULTIFD_ON_NO_CONVERGENCE: "wait" }, `MULTIFD_ON_NO_CONVERGENCE: must be one of fail, switchover, not "wait"`],
        [{ MULTIFD_MAX_RAM: "lots" }, `MULTIFD_MAX_RAM: "lots" is not a size like 4096, 512M or 16G`],
        [{ MULTIFD_RECONNECT: "1001" }, "MULTIFD_RECONNECT: must be between 0 and 1000, not 1001"]
      ]
      for (const [env, line] of cases) {
        const error = yield* Effect.flip(Effect.provide(MigrationConfig.MigrationConfig, MigrationConfig.layerConfig).pipe(fromEnv(env)))
        expect({ env, error: error instanceof MigrationError.MigrationError && error.reason }).toEqual({ env, error: "BadOptions" })
        expect(error.message).toBe(line)
        expectOneLine(error)
        // the Config itself: the same line from its ConfigError
        const raw = yield* Effect.flip(MigrationConfig.config.pipe(fromEnv(env)))
        expect(MigrationConfig.describeError(raw)).toBe(line)
      }
    }))

  it.live("migrate takes what the options leave out from the layer; what they give wins", () =>
    run(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const layer = MigrationConfig.layerConfig
      const env = fromEnv({ MULTIFD_CHANNELS: "3", MULTIFD_ZERO_PAGE: "none" })
      const dest1 = yield* startDestination()
      const fromConfig = yield* Migration.migrate({ address: dest1.address, timeouts: TIMEOUTS }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram),
        Effect.provide(layer),
        env
      )
      yield* Fiber.join(dest1.fiber)
      expect(fromConfig.channels).toBe(3)
      expect(fromConfig.zeroPages).toBe(0) // zero pages travelled as data
      const dest2 = yield* startDestination()
      const given = yield* Migration.migrate({ address: dest2.address, channels: 2, timeouts: TIMEOUTS }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram),
        Effect.provide(layer),
        env
      )
      yield* Fiber.join(dest2.fiber)
      expect(given.channels).toBe(2)
      expect(given.zeroPages).toBe(0)
      // a bad variable fails the layer before anything connects
      const bad = yield* Effect.flip(Migration.migrate({ address: dest2.address }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram),
        Effect.provide(layer),
        fromEnv({ MULTIFD_CHANNELS: "0" })
      ))
      expect(bad.message).toBe("MULTIFD_CHANNELS: must be between 1 and 255, not 0")
    })))

  it.scoped("incoming takes its accept timeout from the layer (MULTIFD_ACCEPT_TIMEOUT)", () =>
    Effect.gen(function*() {
      const transport = yield* Transport.Transport
      const listener = yield* transport.listen(tcp0)
      const fiber = yield* Effect.fork(Migration.incoming(listener).pipe(
        Effect.provide(MigrationConfig.layerConfig),
        fromEnv({ MULTIFD_ACCEPT_TIMEOUT: "3s" })
      ))
      yield* TestClock.adjust("2 seconds")
      expect(fiber.unsafePoll()).toBeNull()
      yield* TestClock.adjust("2 seconds")
      const error = failureOf(yield* Fiber.await(fiber))
      expect(error.message).toBe("timed out after 3s waiting for a source to connect")
    }).pipe(Effect.provide(Transport.layer)))
})
