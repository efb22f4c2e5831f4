/**
 * Live pre-copy (issue 4): memory written while it migrates. Real loopback sockets, a writer fiber going
 * through `GuestRam.write` / `update` (the write gate and the dirty log) while rounds run.
 *
 * - the write gate: a write never lands while the gate is closed, even when its fiber yields mid-write;
 * - round ordering: after `migrate` returns the writer waits at the gate, so the source is frozen and the
 *   destination must equal it byte for byte (property test over write patterns and channel counts);
 * - a page written in round k and again in round k+1, the copies travelling on different channels (seen on
 *   the wire), ends with the k+1 copy;
 * - convergence with a slow writer, non-convergence with a clear error, forced switch-over;
 * - TestClock: `maxDuration` and a peer that never acknowledges a flush;
 * - cancel in every phase: the destination hears "cancelled by source", writers resume, nothing stays
 *   open, and a second migration on the same listener succeeds (QEMU's multifd cancel test);
 * - `migrateStream`: progress by round, then Completed; interrupting the consumer cancels the migration;
 * - the end: the main channel's end seen before the channels' ends (after Done) is no failure.
 *
 * Every test that opens a socket runs under `expectNoLeaks`. Nothing waits on a timer to let things settle: waits are on
 * Deferreds, fibers, recorded events or event-loop turns; `noHang` guards only turn a hang into a failure.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Chunk from "effect/Chunk"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as FastCheck from "effect/FastCheck"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Logger from "effect/Logger"
import * as Option from "effect/Option"
import * as Stream from "effect/Stream"
import * as TestClock from "effect/TestClock"
import * as Crypto from "node:crypto"
import * as Net from "node:net"
import * as Path from "node:path"
import type { Writable } from "node:stream"
import * as Control from "../src/Control.js"
import * as Bandwidth from "../src/Bandwidth.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as MigrationStatus from "../src/MigrationStatus.js"
import { unsent } from "../src/internal/native/unsent.js"
import * as Protocol from "../src/Protocol.js"
import * as Snapshot from "../src/Snapshot.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { tempDirectory } from "./support/files.js"
import * as Faulty from "./support/faultyTransport.js"
import { noHang } from "./support/guards.js"
import { leakFree, nextTurn } from "./support/handles.js"
import { mixedImage, timed } from "./support/images.js"
import { loopbackServer } from "./support/tcpServer.js"

// ---------------------------------------------------------------------------------------------------------
// helpers

const PAGE = 4096
const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
const TIMEOUTS_MS = 2000
/** "Promptly": well below every timeout of the migration (2 s); loose so that a loaded machine is no flake. */
const PROMPT_MS = 1500
const CANCELLED = "the source aborted the migration: cancelled by source"
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

type Ram = GuestRam.GuestRam["Type"]

/** Pages of random bytes, about one in five left zero (so that zero pages travel too). */
const image = (pages: number): Buffer => mixedImage(pages, 0.8, PAGE)

/** 4 MiB + 1 MiB of mixed random and zero pages. */
const sourceRam = (pcPages = 1024, vgaPages = 256) =>
  GuestRam.make({ blocks: [{ name: "pc.ram", bytes: image(pcPages) }, { name: "vga.vram", bytes: image(vgaPages) }] })

/** The first difference between two memories, or undefined when they are byte-identical. */
const firstDifference = (a: Ram, b: Ram): string | undefined => {
  if (a.blocks.length !== b.blocks.length) return `${a.blocks.length} blocks vs ${b.blocks.length}`
  for (let i = 0; i < a.blocks.length; i++) {
    const x = a.blocks[i]!.bytes
    const y = b.blocks[i]!.bytes
    if (x.length !== y.length) return `block ${a.blocks[i]!.name}: ${x.length} bytes vs ${y.length}`
    if (x.equals(y)) continue
    for (let page = 0; page * PAGE < x.length; page++) {
      if (x.compare(y, page * PAGE, (page + 1) * PAGE, page * PAGE, (page + 1) * PAGE) !== 0) {
        return `block ${a.blocks[i]!.name} differs first at page ${page}`
      }
    }
  }
  return undefined
}

const successOf = <A, E>(exit: Exit.Exit<A, E>): A => {
  if (Exit.isFailure(exit)) throw new Error(`expected success, got ${Cause.pretty(exit.cause)}`)
  return exit.value
}

const expectSameMemory = (destination: Ram, source: Ram) => expect(firstDifference(destination, source)).toBeUndefined()

/** Keeps the destination's log lines (connections it turned away) out of the test output. */
const quiet = <A, E, R>(self: Effect.Effect<A, E, R>) =>
  Effect.provide(self, Logger.replace(Logger.defaultLogger, Logger.none))

/** Receives one migration on `listener` in a fiber of the caller's scope. */
const receive = <E = never>(listener: Transport.Listener, options: Migration.IncomingOptions<E> = {}) =>
  Effect.forkScoped(quiet(Migration.incoming(listener, { timeouts: TIMEOUTS, ...options })))

const migrateFrom = (
  ram: Ram,
  options: Migration.MigrateOptions,
  transport: Layer.Layer<Transport.Transport> = Transport.layer
) =>
  Migration.migrate({ timeouts: TIMEOUTS, ...options }).pipe(
    Effect.provide(transport),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

/**
 * A writer fiber in the caller's scope: `write(i)` for i = 0, 1, 2, …, yielding after each, as an
 * application serving requests would — or, with `opsBeforeYield`, never yielding by itself: the runtime
 * then preempts it every that many operations, anywhere inside a write. `count` is the number of writes
 * that completed.
 */
const startWriter = (
  write: (i: number) => Effect.Effect<void, GuestRam.OutOfBounds | GuestRam.WriteBlocked>,
  opsBeforeYield?: number | undefined
) =>
  Effect.gen(function*() {
    const count = { n: 0 }
    const once = Effect.suspend(() => write(count.n)).pipe(
      Effect.zipRight(Effect.sync(() => {
        count.n++
      }))
    )
    const fiber = yield* Effect.forkScoped(
      opsBeforeYield === undefined
        ? Effect.forever(Effect.zipRight(once, Effect.yieldNow()))
        : Effect.withMaxOpsBeforeYield(Effect.forever(once), opsBeforeYield)
    )
    return { fiber, count }
  })

/** A writer cycling over the pages `first .. first + pages - 1` of a block, 64 bytes at a time. */
const hotWriter = (ram: Ram, block: string, first: number, pages: number) => {
  const data = Buffer.alloc(64)
  return startWriter((i) => {
    data.fill(i & 255)
    return GuestRam.write(ram, block, (first + (i % pages)) * PAGE + ((i * 64) % PAGE), data)
  })
}

/** Waits (event-loop turns, no timer) until the writer has completed `more` further writes: it is running. */
const writerRuns = (writer: { readonly count: { readonly n: number } }, more = 3) =>
  Effect.suspend(() => {
    const target = writer.count.n + more
    const loop: Effect.Effect<void> = Effect.suspend(() =>
      writer.count.n >= target ? Effect.void : Effect.zipRight(nextTurn, loop)
    )
    return noHang(loop, "the writer writing again")
  })

/** A write that must go through at once (the gate is open). */
const writeNow = (ram: Ram) => noHang(GuestRam.write(ram, ram.blocks[0]!.name, 0, Buffer.from([1, 2, 3])), "a write", 2)

/** Whether `fiber` is still running after a number of event-loop turns (no timer). */
const stillRunningAfterTurns = <A, E>(fiber: Fiber.Fiber<A, E>, turns = 20) =>
  Effect.zipRight(Effect.repeatN(nextTurn, turns - 1), Effect.map(Fiber.poll(fiber), Option.isNone))

// ---------------------------------------------------------------------------------------------------------

describe("the write gate", () => {
  /**
   * A fiber may yield between any two effects (every `maxOpsBeforeYield` operations). A gate that checks
   * "open" in one effect and writes in the next lets a write land after the gate closed, when the writer
   * happens to yield between the two: after the switch-over took the last dirty pages, a write that
   * neither reaches the destination nor blocks. Here the writer's yield point is moved across every
   * operation of a write (`withMaxOpsBeforeYield(k)`), with the gate closed while it is yielded.
   */
  it.effect("a write never lands while the gate is closed, wherever its fiber yields", () =>
    Effect.gen(function*() {
      const landedWhileClosed: Array<number> = []
      // below ~12 the runtime yields again right after resuming and a fiber never gets anywhere
      for (let k = 12; k <= 80; k++) {
        const ram = yield* GuestRam.make({ blocks: [{ name: "a", size: PAGE }] })
        const bytes = ram.blocks[0]!.bytes
        const writer = yield* Effect.fork(
          GuestRam.write(ram, "a", 0, Buffer.from([1])).pipe(Effect.withMaxOpsBeforeYield(k))
        )
        yield* Effect.yieldNow() // the writer runs until it yields (somewhere inside the write for some k)
        yield* ram.gate.close
        const before = bytes[0]
        yield* Effect.yieldNow() // the writer resumes: it must now wait
        yield* Effect.yieldNow()
        if (bytes[0] !== before) landedWhileClosed.push(k)
        expect(ram.blocks[0]!.dirty.count()).toBe(bytes[0])
        yield* ram.gate.open
        yield* Fiber.join(writer)
        expect(bytes[0]).toBe(1)
      }
      expect(landedWhileClosed, "maxOpsBeforeYield values for which a write landed behind a closed gate").toEqual([])
    }))

  it.effect("closing twice and opening once opens it; writers queued while closed all go through", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "a", size: 4 * PAGE }] })
      yield* ram.gate.close
      yield* ram.gate.close
      const writers = yield* Effect.forEach([0, 1, 2, 3], (p) =>
        Effect.fork(GuestRam.write(ram, "a", p * PAGE + 10, Buffer.from([p + 1]))))
      for (const w of writers) expect(yield* stillRunningAfterTurns(w, 3)).toBe(true)
      expect(GuestRam.dirtyPages(ram)).toBe(0)
      yield* ram.gate.open
      yield* Effect.forEach(writers, Fiber.join, { discard: true })
      expect([0, 1, 2, 3].map((p) => ram.blocks[0]!.bytes[p * PAGE + 10])).toEqual([1, 2, 3, 4])
      expect(GuestRam.dirtyPages(ram)).toBe(4)
    }))

  /**
   * A progress callback that writes at every report, recording how each write ended. During the switch-over
   * the gate is closed by the very migration that awaits the callback: the write waited for the migration,
   * which waited for the write (a save failed after its 30 s stall timeout, "without progress sending pages";
   * a migration at the peer timeout). It now fails at once with WriteBlocked, writing nothing.
   */
  const writingReporter = (ram: Ram) => {
    const outcomes: Array<{ readonly phase: Migration.Progress["phase"]; readonly exit: Exit.Exit<void, GuestRam.OutOfBounds | GuestRam.WriteBlocked> }> = []
    const onProgress = (p: Migration.Progress) =>
      Effect.map(
        Effect.exit(GuestRam.write(ram, "pc.ram", 3 * PAGE, Buffer.from([p.round + 1, p.doneBytes & 255]))),
        (exit) => void outcomes.push({ phase: p.phase, exit })
      )
    return { outcomes, onProgress }
  }

  const expectBlockedInSwitchover = (outcomes: ReturnType<typeof writingReporter>["outcomes"]) => {
    const precopy = outcomes.filter((o) => o.phase === "precopy")
    const switchover = outcomes.filter((o) => o.phase === "switchover")
    expect(precopy.length).toBeGreaterThan(0)
    for (const o of precopy) expect(Exit.isSuccess(o.exit)).toBe(true)
    expect(switchover.length).toBeGreaterThan(0)
    for (const o of switchover) {
      const error = failureOf(o.exit)
      expect(error).toBeInstanceOf(GuestRam.WriteBlocked)
      expect((error as GuestRam.WriteBlocked).reason).toBe("Deadlock")
      expect(error.message).toContain("from inside the progress report of the migration or save of this memory")
      expectOneLine(error)
    }
  }

  it.live("a write from the source's own onProgress during the switch-over fails at once (WriteBlocked), no deadlock", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(256, 64)
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      const { onProgress, outcomes } = writingReporter(ram)
      const [stats, ms] = yield* timed(noHang(migrateFrom(ram, { address: listener.address, channels: 2, onProgress }), "migrate"))
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expect(ms).toBeLessThan(PROMPT_MS)
      expectSameMemory(received.ram, ram)
      expect(stats.pagesPerRound[stats.rounds - 1]).toBe(1) // the page the last pre-copy report wrote
      expectBlockedInSwitchover(outcomes)
      // writers other than the migration's own reports still wait at the gate, and go on once it opens
      const writer = yield* Effect.fork(GuestRam.write(ram, "pc.ram", 0, Buffer.from([7])))
      expect(yield* stillRunningAfterTurns(writer, 3)).toBe(true)
      yield* ram.gate.open
      yield* Fiber.join(writer)
    })))

  it.scopedLive("the same for Snapshot.save: it succeeds at once rather than fail after its stall timeout", () =>
    Effect.gen(function*() {
      const dir = yield* tempDirectory("emfd-live-")
      const ram = yield* sourceRam(256, 64)
      const { onProgress, outcomes } = writingReporter(ram)
      const [saved, ms] = yield* timed(noHang(
        Snapshot.save(Path.join(dir, "vm.snap"), { onProgress, stallTimeout: "5 seconds" }).pipe(
          Effect.provideService(GuestRam.GuestRam, ram)
        ),
        "save"
      ))
      expect(ms).toBeLessThan(PROMPT_MS)
      expect(saved.pagesPerRound[saved.rounds - 1]).toBe(1)
      expectBlockedInSwitchover(outcomes)
      yield* ram.gate.open
    }))

  /**
   * A gate closed by the application (or kept closed by an earlier successful migration, as documented: the
   * destination owns that memory until the application opens it) belongs to the application. A migration that
   * then fails in its switch-over opened it on its way out — it opens "again" what it found closed — and the
   * application's writers went on writing memory it had frozen.
   */
  for (const closedBy of ["the application", "an earlier successful migration"] as const) {
    it.live(`a gate closed by ${closedBy} stays closed when a migration then fails in its switch-over`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam(64, 16)
        const listener = yield* Transport.listen(tcp0)
        if (closedBy === "the application") {
          yield* ram.gate.close
        } else {
          const first = yield* receive(listener)
          yield* noHang(migrateFrom(ram, { address: listener.address, channels: 2 }), "the first migrate")
          yield* noHang(Fiber.join(first), "the first incoming")
        }
        // a byte other than the one there (random memory: a fixed 42 was already there once in 256 runs)
        const before = ram.blocks[0]!.bytes[0]!
        const written = (before + 1) % 256
        const writer = yield* Effect.fork(GuestRam.write(ram, "pc.ram", 0, Buffer.from([written])))
        expect(yield* stillRunningAfterTurns(writer, 3)).toBe(true)
        // a destination whose store fails: the source fails after its switch-over closed (found closed) the gate
        const destination = yield* receive(listener, {
          store: () => Effect.fail(new Error("disk full"))
        })
        const exit = yield* noHang(Effect.exit(migrateFrom(ram, { address: listener.address, channels: 2 })), "migrate")
        expect(failureOf(exit).message).toContain("disk full")
        yield* noHang(Fiber.await(destination), "incoming")
        // the writer still waits: the gate is the application's to open
        expect(yield* stillRunningAfterTurns(writer, 20)).toBe(true)
        expect(ram.blocks[0]!.bytes[0]).toBe(before)
        yield* ram.gate.open
        yield* noHang(Fiber.join(writer), "the write once the application opened the gate")
        expect(ram.blocks[0]!.bytes[0]).toBe(written)
      })))
  }

  /**
   * Memory that migrated away (its gate kept closed by that success) receives a migration back, its `incoming`
   * reporting progress with a write into it: the write waited at the closed gate, and the destination, which waits for
   * its last report, hung for good after the source had succeeded. The write now fails at once (WriteBlocked).
   */
  it.live("a write into memory received, from the destination's report while its gate is closed: WriteBlocked, no hang", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(64, 16)
      const listener = yield* Transport.listen(tcp0)
      const first = yield* receive(listener)
      yield* noHang(migrateFrom(ram, { address: listener.address, channels: 2 }), "the first migrate")
      const away = yield* noHang(Fiber.join(first), "the first incoming")
      // and back, into the same memory, its gate still closed
      const back = yield* Transport.listen(tcp0)
      const outcomes: Array<Exit.Exit<void, GuestRam.OutOfBounds | GuestRam.WriteBlocked>> = []
      const destination = yield* receive(back, {
        ram,
        onProgress: (p) =>
          p.doneBytes === p.totalBytes
            ? Effect.map(Effect.exit(GuestRam.write(ram, "pc.ram", 0, Buffer.from([42]))), (exit) => void outcomes.push(exit))
            : Effect.void
      })
      yield* noHang(migrateFrom(away.ram, { address: back.address, channels: 2 }), "the migration back")
      yield* noHang(Fiber.join(destination), "the incoming of the migration back")
      expect(outcomes.length).toBeGreaterThanOrEqual(1)
      for (const exit of outcomes) {
        expect(Exit.isFailure(exit) && Cause.failureOption(exit.cause)).toMatchObject({
          _tag: "Some",
          value: { _tag: "WriteBlocked", reason: "Deadlock" }
        })
      }
      expectSameMemory(ram, away.ram)
      // the gate is still the application's: closed until it opens it
      yield* ram.gate.open
      yield* writeNow(ram)
    })))

  /**
   * A report's writes fail at once only while its own transfer holds the gate closed (it waits for the report). A
   * fiber a report forked carried the mark for good: long after its migration, whenever the gate was closed — by a
   * later migration's switch-over, or by the application — its writes failed WriteBlocked ("Deadlock") instead of
   * waiting as every other writer does.
   */
  it.live("a fiber forked by a report of an earlier migration waits at the gate like any writer", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(64, 16)
      const listener = yield* Transport.listen(tcp0)
      const go = yield* Deferred.make<void>()
      const outcome = yield* Deferred.make<Exit.Exit<void, GuestRam.OutOfBounds | GuestRam.WriteBlocked>>()
      let forked = false
      // the first migration's first report starts a background writer (it outlives the migration)
      const startWriter = Effect.suspend(() => {
        if (forked) return Effect.void
        forked = true
        return Effect.asVoid(Effect.forkDaemon(Effect.zipRight(
          Deferred.await(go),
          Effect.flatMap(Effect.exit(GuestRam.write(ram, "pc.ram", 0, Buffer.from([42]))), (exit) => Deferred.succeed(outcome, exit))
        )))
      })
      const first = yield* receive(listener)
      yield* noHang(migrateFrom(ram, { address: listener.address, channels: 2, onProgress: () => startWriter }), "the first migrate")
      yield* noHang(Fiber.join(first), "the first incoming")
      yield* ram.gate.open
      // the second migration's switch-over lets it write
      const second = yield* receive(listener)
      // (its pre-copy reports dirty a page, so that the switch-over has pages and reports)
      const onProgress = (p: Migration.Progress) =>
        p.phase === "switchover"
          ? Deferred.succeed(go, undefined)
          : Effect.orDie(GuestRam.write(ram, "vga.vram", 3 * PAGE, Buffer.from([p.round + 1, p.doneBytes & 255])))
      yield* noHang(migrateFrom(ram, { address: listener.address, channels: 2, onProgress }), "the second migrate")
      yield* noHang(Fiber.join(second), "the second incoming")
      expect(yield* Deferred.isDone(go)).toBe(true)
      // the writer waits at the gate (kept closed after the success), and goes on once the application opens it
      for (let i = 0; i < 20; i++) yield* nextTurn
      expect(yield* Deferred.poll(outcome)).toEqual(Option.none())
      yield* ram.gate.open
      expect(Exit.isSuccess(yield* noHang(Deferred.await(outcome), "the background write"))).toBe(true)
      expect(ram.blocks[0]!.bytes[0]).toBe(42)
    })))

  it.live("a migration that fails in its switch-over still opens the gate it closed itself", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(64, 16)
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener, { store: () => Effect.fail(new Error("disk full")) })
      const exit = yield* noHang(Effect.exit(migrateFrom(ram, { address: listener.address, channels: 2 })), "migrate")
      expect(failureOf(exit).message).toContain("disk full")
      yield* noHang(Fiber.await(destination), "incoming")
      yield* writeNow(ram)
    })))
})

// ---------------------------------------------------------------------------------------------------------

/** Writes of a hot set: page (index into the hot set), offset inside it, length (up to two pages and a bit). */
const writeArb = FastCheck.record({
  page: FastCheck.nat({ max: 15 }),
  at: FastCheck.oneof(FastCheck.constantFrom(0, PAGE - 1, PAGE - 8), FastCheck.nat({ max: PAGE - 1 })),
  length: FastCheck.oneof(FastCheck.constantFrom(1, 2, PAGE, PAGE + 1), FastCheck.integer({ min: 1, max: 2 * PAGE + 100 }))
})

describe("a source that dies (a defect: its progress report, say)", () => {
  /**
   * A failure tells the destination why (Abort), an interruption says "cancelled by source"; a defect (an
   * `onProgress` that dies, in pre-copy or in the switch-over with writers paused) told it nothing: the source's
   * sockets just closed, and the destination failed with "peer closed the connection". It hears the reason now.
   */
  for (const phase of ["precopy", "switchover"] as const) {
    it.live(`in ${phase}: the destination hears why, writers resume, the status says failed`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam(64, 16)
        const listener = yield* Transport.listen(tcp0)
        const destination = yield* receive(listener)
        const status = yield* MigrationStatus.make
        // every pre-copy report dirties a page, so that the switch-over has pages (and reports)
        const onProgress = (p: Migration.Progress) =>
          p.phase === phase && p.doneBytes > 0
            ? Effect.die(new Error("the application's bug"))
            : p.phase === "precopy"
            ? Effect.orDie(GuestRam.write(ram, "vga.vram", 3 * PAGE, Buffer.from([p.round + 1, p.doneBytes & 255])))
            : Effect.void
        const exit = yield* noHang(Effect.exit(migrateFrom(ram, { address: listener.address, channels: 2, onProgress, status })), "migrate")
        expect(Exit.isFailure(exit) && Cause.pretty(exit.cause)).toContain("the application's bug")
        yield* writeNow(ram)
        expect((yield* status.get).status).toBe("failed")
        const error = failureOf(yield* noHang(Fiber.await(destination), "incoming"))
        // (the source fails CallbackFailed naming its report since the callback commit: the destination hears that)
        expect(error.message).toBe("the source aborted the migration: the progress report (onProgress) died: the application's bug")
        expect((error as MigrationError.MigrationError).reason).toBe("Aborted")
      })))
  }
})

describe("round ordering under concurrent writes", () => {
  it.live.prop(
    "after migrate returns the writer waits at the gate, and the destination equals the frozen source",
    {
      channels: FastCheck.constantFrom(1, 2, 4, 8),
      block: FastCheck.constantFrom("pc.ram", "vga.vram"),
      hotFirst: FastCheck.nat({ max: 200 }),
      hotPages: FastCheck.integer({ min: 1, max: 16 }),
      writes: FastCheck.array(writeArb, { minLength: 1, maxLength: 12 }),
      maxRounds: FastCheck.integer({ min: 1, max: 5 }),
      // the writer yields after each write, or is preempted by the runtime anywhere inside one
      opsBeforeYield: FastCheck.option(FastCheck.integer({ min: 12, max: 64 }), { nil: undefined })
    },
    ({ block, channels, hotFirst, hotPages, maxRounds, opsBeforeYield, writes }) =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        const size = ram.block(block)!.bytes.length
        const listener = yield* Transport.listen(tcp0)
        const destination = yield* receive(listener)
        const datas = writes.map((w) => Crypto.randomBytes(w.length))
        const writer = yield* startWriter((i) => {
          const w = writes[i % writes.length]!
          const offset = (hotFirst + (w.page % hotPages)) * PAGE + w.at
          const data = datas[i % writes.length]!.subarray(0, Math.min(w.length, size - offset))
          data[0] = i & 255
          data[data.length - 1] = (i >> 8) & 255
          return GuestRam.write(ram, block, offset, data)
        }, opsBeforeYield)
        // downtime limit 0: rounds go on while anything is dirty, up to maxRounds, then switch over anyway
        const stats = yield* noHang(
          migrateFrom(ram, {
            address: listener.address,
            channels,
            live: { downtimeLimit: 0, maxRounds, onNoConvergence: "switchover" }
          }),
          "migrate"
        )
        const received = yield* noHang(Fiber.join(destination), "incoming")

        // the writer is blocked at the gate (kept closed after success): the source is frozen
        const writesAtEnd = writer.count.n
        expect(yield* stillRunningAfterTurns(writer.fiber)).toBe(true)
        expect(writer.count.n).toBe(writesAtEnd)
        expectSameMemory(received.ram, ram)

        expect(writesAtEnd).toBeGreaterThan(0)
        expect(stats.rounds).toBeGreaterThanOrEqual(2)
        expect(stats.rounds).toBeLessThanOrEqual(maxRounds + 1)
        expect(stats.pagesPerRound).toHaveLength(stats.rounds)
        expect(stats.pagesPerRound[0]).toBe(ram.size / PAGE)
        // later rounds carry the writer's pages (and never more than the hot set and its spill-over)
        expect(stats.pagesPerRound.slice(1).reduce((n, p) => n + p, 0)).toBeGreaterThan(0)
        for (const pages of stats.pagesPerRound.slice(1)) expect(pages).toBeLessThanOrEqual(hotPages + 3)
        expect(stats.normalPages + stats.zeroPages).toBe(stats.pagesPerRound.reduce((n, p) => n + p, 0))
        expect(received.stats.rounds).toBe(stats.rounds)
        expect(stats.syncs).toBe(stats.rounds * channels)

        // the application decides: here it resumes on the source
        yield* ram.gate.open
        yield* writerRuns(writer)
      })),
    { fastCheck: { numRuns: Number(process.env["LIVE_RUNS"] ?? 10) } }
  )
})

// ---------------------------------------------------------------------------------------------------------

/** One multifd packet as the source wrote it: its channel, the round (SYNCs seen before it on the channel). */
interface WirePacket {
  readonly channel: number
  readonly round: number
  readonly block: string
  /** Normal pages: offset → first byte of the page as it went out. */
  readonly pages: ReadonlyMap<number, number>
  readonly zeroOffsets: ReadonlyArray<number>
}

/**
 * The real transport, with every multifd packet the source writes decoded (header) and sampled (first byte
 * of each normal page) at the moment it is handed to the kernel: what each channel carried, in which round.
 */
const wireRecorder = (pageSize: number, blockSize: (name: string) => number | undefined) => {
  const packets: Array<WirePacket> = []
  const connect: Transport.Transport["Type"]["connect"] = (address, options) =>
    Effect.map(Transport.connect(address, options), (connection): Transport.Connection => {
      let channel: number | undefined
      let syncs = 0
      const offsets = new Float64Array(Protocol.slotsFor(pageSize))
      return {
        ...connection,
        write: (chunks) =>
          Effect.suspend(() => {
            const first = Buffer.from(chunks[0]!.buffer, chunks[0]!.byteOffset, chunks[0]!.byteLength)
            if (channel === undefined && first.length === Protocol.INIT_PACKET_SIZE && first.readUInt32BE(0) === Protocol.MAGIC) {
              channel = first[24]!
            } else if (channel !== undefined) {
              const limits = { channel, pageSize, compression: "none" as const, blockSize }
              const header = Protocol.decodeHeader(first, limits, offsets)
              if (header._tag === "Left") throw new Error(`recorder: ${header.left.message}`)
              if (header.right.sync) {
                syncs++
              } else {
                const payload = Buffer.concat(chunks.slice(1))
                const pages = new Map<number, number>()
                for (let i = 0; i < header.right.normalPages; i++) pages.set(offsets[i]!, payload[i * pageSize]!)
                const zeroOffsets = Array.from(
                  offsets.subarray(header.right.normalPages, header.right.normalPages + header.right.zeroPages)
                )
                packets.push({ channel, round: syncs, block: header.right.block, pages, zeroOffsets })
              }
            }
            return connection.write(chunks)
          })
      }
    })
  return { packets, layer: Layer.succeed(Transport.Transport, { connect, listen: Transport.listen }) }
}

/** A listener whose odd-numbered accepted connections wait a few event-loop turns before every read. */
const slowReads = (listener: Transport.Listener, turns = 3): Transport.Listener => {
  let accepted = 0
  const lag = Effect.repeatN(nextTurn, turns - 1)
  return {
    address: listener.address,
    accept: Effect.map(listener.accept, (connection): Transport.Connection =>
      accepted++ % 2 === 0 ? connection : {
        ...connection,
        atEnd: Effect.zipRight(lag, connection.atEnd),
        read: (length) => Effect.zipRight(lag, connection.read(length)),
        readInto: (target, at, length) => Effect.zipRight(lag, connection.readInto(target, at, length)),
        readScatter: (target, offsets, count, length) =>
          Effect.zipRight(lag, connection.readScatter(target, offsets, count, length))
      })
  }
}

describe("the end of a migration", () => {
  /**
   * The source ends its multifd channels, then its main channel. On the destination both ends can be seen
   * in either order: channels that notice their end late must not turn the main channel's end — after the
   * destination said Done — into a failure (the source has already returned success and handed over).
   */
  it.live("the destination succeeds when the main channel's end overtakes the channels' ends", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(256, 256)
      const listener = yield* Transport.listen(tcp0)
      const lateEnds: Transport.Listener = {
        address: listener.address,
        accept: Effect.map(listener.accept, (connection): Transport.Connection => ({
          ...connection,
          // a channel notices its end a few event-loop turns late
          atEnd: Effect.flatMap(connection.atEnd, (end) => end ? Effect.as(Effect.repeatN(nextTurn, 10), end) : Effect.succeed(end))
        }))
      }
      const destination = yield* receive(lateEnds)
      const stats = yield* noHang(migrateFrom(ram, { address: listener.address, channels: 4 }), "migrate")
      const received = successOf(yield* noHang(Fiber.await(destination), "incoming"))
      expectSameMemory(received.ram, ram)
      expect(received.stats.uuid).toBe(stats.uuid)
    })))

  /**
   * A proxy that forwards every connection, and goes silent on the main channel (nothing more either way,
   * nothing closed) as the destination's `Done` passes: the source never hears it. `swallowed` completes then.
   */
  const losingDone = (target: Transport.Address) =>
    Effect.gen(function*() {
      const port = (target as { readonly port: number }).port
      const swallowed = yield* Deferred.make<void>()
      const { address } = yield* loopbackServer((client, track) => {
        const upstream = Net.connect({ host: "127.0.0.1", port })
        track(upstream)
        let main: boolean | undefined
        let silent = false
        let down = Buffer.alloc(0)
        client.on("data", (chunk: Buffer) => {
          main ??= chunk.readUInt32BE(0) === Control.MAGIC
          if (!silent) upstream.write(chunk)
        })
        upstream.on("data", (chunk: Buffer) => {
          if (silent) return
          if (!main) return void client.write(chunk)
          down = Buffer.concat([down, chunk])
          while (down.length >= 4 && down.length >= 4 + down.readUInt32BE(0)) {
            const frame = down.subarray(0, 4 + down.readUInt32BE(0))
            down = down.subarray(frame.length)
            const message = Control.decode(frame.subarray(4))
            if (Either.isRight(message) && message.right._tag === "Done") {
              silent = true
              Deferred.unsafeDone(swallowed, Exit.void)
              return
            }
            client.write(frame)
          }
        })
        client.on("end", () => silent || upstream.end())
        upstream.on("end", () => silent || client.end())
      })
      return { address, swallowed: Deferred.await(swallowed) }
    })

  it.live("a source that gives up without having heard Done resumes its writers: the destination fails too, never succeeds", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(256, 256)
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      const proxy = yield* losingDone(listener.address)
      const source = yield* Effect.fork(migrateFrom(ram, { address: proxy.address, channels: 2 }))
      // Done went out, and is lost on the way: the source gives up (cancelled; as when its wait times out), says
      // Abort (lost too), closes its channels and lets its writers go on
      yield* noHang(proxy.swallowed, "Done")
      expect(Exit.isInterrupted(yield* noHang(Fiber.interrupt(source), "the source's cancel"))).toBe(true)
      yield* writeNow(ram)
      // the destination's copy is no longer the source's memory: incoming must not succeed with it
      const received = yield* noHang(Fiber.await(destination), "incoming")
      expect(Exit.isFailure(received)).toBe(true)
      expect(failureOf(received).message).toBe("timed out after 2s waiting for the source to close the main channel")
    })))
})

describe("a page written in round k and again in round k+1", () => {
  it.live("travelling on different channels, the destination ends with the k+1 copy", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: image(512) }] })
      const P = 100 // the page written once per round, with the round's tag
      const Q = 300 // written after every batch, so that each round leaves something dirty
      const tag = (round: number) => 0x10 + round
      const listener = yield* Transport.listen(tcp0)
      // the destination reads every other connection slowly: a barrier that let a round go on before every
      // channel reached its SYNC would let an older copy land after a newer one
      const destination = yield* receive(slowReads(listener))
      const wire = wireRecorder(PAGE, (name) => ram.block(name)?.bytes.length)
      const qData = Buffer.alloc(16)
      const written: Array<number> = []
      // onProgress runs in the migration's fiber: a round-start report (doneBytes 0) comes before the round
      // takes the dirty log, so P written there goes out in that round, and nothing writes P again before
      // the round's flush was acknowledged: each round's copy of P on the wire carries that round's tag
      const onProgress = (p: Migration.Progress) => {
        if (p.phase !== "precopy") return Effect.void
        if (p.doneBytes === 0) {
          written.push(tag(p.round))
          return GuestRam.write(ram, "pc.ram", P * PAGE, Buffer.alloc(PAGE, tag(p.round))).pipe(Effect.orDie)
        }
        qData.fill(p.doneBytes & 255)
        return GuestRam.write(ram, "pc.ram", Q * PAGE + 8, qData).pipe(Effect.orDie)
      }
      const stats = yield* noHang(
        migrateFrom(ram, {
          address: listener.address,
          channels: 2,
          onProgress,
          live: { downtimeLimit: 0, maxRounds: 5, onNoConvergence: "switchover" }
        }, wire.layer),
        "migrate"
      )
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expectSameMemory(received.ram, ram)
      expect(stats.rounds).toBe(6) // 5 pre-copy rounds (0..4), then the switch-over with Q
      expect(written).toEqual([0, 1, 2, 3, 4].map(tag))
      expect(received.ram.blocks[0]!.bytes.subarray(P * PAGE, (P + 1) * PAGE).every((b) => b === tag(4))).toBe(true)

      // the wire: one copy of P per pre-copy round, carrying that round's tag, and on which channel
      const copies = wire.packets.filter((p) => p.pages.has(P * PAGE)).map((p) => ({
        round: p.round,
        channel: p.channel,
        tag: p.pages.get(P * PAGE)!
      }))
      expect(copies.map((c) => c.round)).toEqual([0, 1, 2, 3, 4])
      expect(copies.map((c) => c.tag)).toEqual([0, 1, 2, 3, 4].map(tag))
      // consecutive copies went on different channels (seen on the wire, not assumed): a channel re-queues
      // itself at the back of the idle queue after each batch, so with one batch a round (rounds >= 1) the
      // two channels take turns
      const switches = copies.slice(1).filter((c, i) => c.channel !== copies[i]!.channel)
      expect(switches.length).toBeGreaterThanOrEqual(1)
      expect(new Set(copies.map((c) => c.channel)).size).toBe(2)
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("a writer past the API (block.bytes written directly: no gate, no dirty log)", () => {
  it.live("the migration fails with a digest mismatch naming the block written, never succeeds; writers resume", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(256, 64)
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      // once round 0 sent every page, a byte of vga.vram changes behind the migration's back
      const onProgress = (p: Migration.Progress) =>
        Effect.sync(() => {
          if (p.round === 0 && p.doneBytes === p.totalBytes) ram.block("vga.vram")!.bytes[5 * PAGE + 3]! ^= 0xff
        })
      const error = failureOf(yield* noHang(Effect.exit(migrateFrom(ram, { address: listener.address, channels: 2, onProgress })), "migrate"))
      // (the source hears the destination's verdict: DigestMismatch, its message naming the mismatch and the block;
      // it said Aborted, as if the destination had given up)
      expect(error).toMatchObject({ _tag: "MigrationError", reason: "DigestMismatch" })
      expectOneLine(error)
      expect(error.message).toBe(`the destination aborted the migration: memory digest mismatch in block "vga.vram"`)
      expect(failureOf(yield* noHang(Fiber.await(destination), "incoming")).message).toBe(
        `memory digest mismatch in block "vga.vram"`
      )
      yield* writeNow(ram)
    })))
})

describe("convergence", () => {
  it.live("a slow writer (a few pages a round): converges under the default limit, rounds >= 2", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(2048, 256) // 9 MiB
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      let writes = 0
      // three pages per batch handed over, from the application's side of the gate
      const onProgress = (p: Migration.Progress) =>
        p.phase === "precopy"
          ? Effect.forEach([7, 500, 1500], (page) =>
            GuestRam.update(ram, "pc.ram", page * PAGE + 100, 8, (view) => {
              writes++
              view.writeDoubleLE(writes)
            }), { discard: true }).pipe(Effect.orDie)
          : Effect.void
      const stats = yield* noHang(migrateFrom(ram, { address: listener.address, channels: 4, onProgress }), "migrate")
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expectSameMemory(received.ram, ram)
      expect(stats.rounds).toBeGreaterThanOrEqual(2)
      expect(stats.pagesPerRound[0]).toBe(ram.size / PAGE)
      // what remained after round 0 was those three pages: sent in the next round, with writers paused
      for (const pages of stats.pagesPerRound.slice(1)) expect(pages).toBeLessThanOrEqual(3)
      expect(stats.pagesPerRound[stats.rounds - 1]).toBe(3)
      expect(stats.downtimeMs).toBeGreaterThanOrEqual(0)
      expect(stats.downtimeMs).toBeLessThan(TIMEOUTS_MS)
      expect(stats.downtimeMs).toBeLessThanOrEqual(stats.durationMs)
      expect(received.stats.rounds).toBe(stats.rounds)
      expect(writes).toBeGreaterThan(0)
    })))

  /** A writer that dirties 256 pages (1 MiB) at every pre-copy report: more than any tiny limit allows. */
  const heavyWriter = (ram: Ram) => (p: Migration.Progress) =>
    p.phase === "precopy"
      ? GuestRam.update(ram, "pc.ram", 0, 256 * PAGE, (view) => {
        for (let page = 0; page < 256; page++) view[page * PAGE + (p.doneBytes % 64)]! ^= 0xff
      }).pipe(Effect.orDie)
      : Effect.void

  it.live("a writer dirtying many pages, a tiny limit, maxRounds 3: NotConverged naming rounds and dirty pages", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      const [exit, ms] = yield* timed(noHang(
        Effect.exit(migrateFrom(ram, {
          address: listener.address,
          channels: 2,
          onProgress: heavyWriter(ram),
          live: { downtimeLimit: Duration.micros(1n), maxRounds: 3 }
        })),
        "migrate"
      ))
      const error = failureOf(exit)
      expect(error).toBeInstanceOf(MigrationError.MigrationError)
      expect((error as MigrationError.MigrationError).reason).toBe("NotConverged")
      expectOneLine(error)
      expect(error.message).toMatch(/did not converge after 3 rounds in [\d.]+ s: 256 pages still dirty/)
      expect(ms).toBeLessThan(5000)
      // the writers were never paused for long: the gate is open
      yield* writeNow(ram)
      // the destination was told why
      const destError = failureOf(yield* noHang(Fiber.await(destination), "incoming"))
      expect(destError.message).toBe(`the source aborted the migration: ${error.message}`)
    })))

  it.live("a writer dirtying pages faster than a bandwidth limit sends them: NotConverged after maxRounds, at the rate in MiB/s", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(256, 64) // 1.25 MiB
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      const error = failureOf(yield* noHang(
        Effect.exit(migrateFrom(ram, {
          address: listener.address,
          channels: 2,
          onProgress: heavyWriter(ram),
          // 1 MiB dirtied at every report, 8 MiB/s: each round of it takes about 125 ms, more than the limit
          maxBandwidth: 8 * Bandwidth.MIB,
          live: { downtimeLimit: "20 millis", maxRounds: 3 }
        })),
        "migrate"
      ))
      expect(error).toMatchObject({ _tag: "MigrationError", reason: "NotConverged" })
      expectOneLine(error)
      // it said "at 0.01 GiB/s" of a link held to 8 MiB/s
      expect(error.message).toMatch(
        /^the migration did not converge after 3 rounds in [\d.]+ s: 256 pages still dirty, about \d+ ms of downtime at [\d.]+ MiB\/s, more than the limit of 20ms$/
      )
      yield* writeNow(ram)
      expect(failureOf(yield* noHang(Fiber.await(destination), "incoming")).message).toBe(
        `the source aborted the migration: ${error.message}`
      )
    })))

  for (const live of [{ maxRounds: 0, onNoConvergence: "switchover" }, { maxRounds: 0 }, { maxDuration: 0 }] as const) {
    it.live(`a bound reached before round 0 (${JSON.stringify(live)}): round 0 still sends every page`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam(256, 256)
        const listener = yield* Transport.listen(tcp0)
        const destination = yield* receive(listener)
        const stats = yield* noHang(migrateFrom(ram, { address: listener.address, live }), "migrate")
        const received = yield* noHang(Fiber.join(destination), "incoming")
        expectSameMemory(received.ram, ram)
        expect(stats.pagesPerRound).toEqual([ram.size / PAGE, 0])
      })))
  }

  it.live("the same with onNoConvergence: switchover: switches over after maxRounds and succeeds", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      const stats = yield* noHang(
        migrateFrom(ram, {
          address: listener.address,
          channels: 2,
          onProgress: heavyWriter(ram),
          live: { downtimeLimit: Duration.micros(1n), maxRounds: 3, onNoConvergence: "switchover" }
        }),
        "migrate"
      )
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expectSameMemory(received.ram, ram)
      expect(stats.rounds).toBe(4)
      expect(stats.pagesPerRound.slice(1)).toEqual([256, 256, 256])
      yield* ram.gate.open
      yield* writeNow(ram)
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("TestClock", () => {
  const LONG = { connect: "1 hour", handshake: "1 hour", peer: "1 hour" } as const

  // real sockets work under the TestClock: only Effect's own timers (timeouts, the stall watch, the
  // migration's clock) are virtual, and every one of them is set far beyond what the test adjusts
  it.effect("maxDuration: the clock passes 10 s during round 1; round 2 is not started (NotConverged, 11.0 s)", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(quiet(Migration.incoming(listener, { timeouts: LONG })))
      const dirty = Buffer.alloc(8)
      const onProgress = (p: Migration.Progress) =>
        p.phase !== "precopy" ? Effect.void : Effect.zipRight(
          GuestRam.write(ram, "pc.ram", 5 * PAGE, dirty.fill(p.round + p.doneBytes)).pipe(Effect.orDie),
          p.round === 1 && p.doneBytes === 0 ? TestClock.adjust("11 seconds") : Effect.void
        )
      const exit = yield* noHang(
        Effect.exit(Migration.migrate({
          address: listener.address,
          timeouts: LONG,
          onProgress,
          live: { downtimeLimit: 0, maxRounds: 100, maxDuration: "10 seconds" }
        }).pipe(Effect.provide(Transport.layer), Effect.provideService(GuestRam.GuestRam, ram))),
        "migrate"
      )
      const error = failureOf(exit)
      expect((error as MigrationError.MigrationError).reason).toBe("NotConverged")
      expect(error.message).toContain("did not converge after 2 rounds in 11.0 s: 1 pages still dirty")
      // the rate measured (a page and its round's packets, in the millisecond the round took on this clock) in a
      // unit that says it: "0.01 GiB/s" said nothing of a link held to a few MiB/s
      expect(error.message).toMatch(/about \d+(\.\d+)? ms of downtime at \d+(\.\d+)? (B|KiB|MiB)\/s, more than the limit of 0$/)
      yield* writeNow(ram)
      const destError = failureOf(yield* noHang(Fiber.await(destination), "incoming"))
      expect(destError.message).toBe(`the source aborted the migration: ${error.message}`)
    })))

  it.effect("maxDuration with onNoConvergence: switchover: exact virtual duration in the stats", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(quiet(Migration.incoming(listener, { timeouts: LONG })))
      const onProgress = (p: Migration.Progress) =>
        p.phase !== "precopy" ? Effect.void : Effect.zipRight(
          GuestRam.write(ram, "pc.ram", 5 * PAGE, Buffer.from([p.round, p.doneBytes & 255])).pipe(Effect.orDie),
          p.round === 1 && p.doneBytes === 0 ? TestClock.adjust("11 seconds") : Effect.void
        )
      const stats = yield* noHang(
        Migration.migrate({
          address: listener.address,
          timeouts: LONG,
          onProgress,
          live: { downtimeLimit: 0, maxRounds: 100, maxDuration: "10 seconds", onNoConvergence: "switchover" }
        }).pipe(Effect.provide(Transport.layer), Effect.provideService(GuestRam.GuestRam, ram)),
        "migrate"
      )
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expectSameMemory(received.ram, ram)
      expect(stats.rounds).toBe(3)
      expect(stats.pagesPerRound.slice(1)).toEqual([1, 1])
      expect(stats.durationMs).toBe(11_000)
      expect(stats.downtimeMs).toBe(0)
    })))

  it.effect("setup outlasting maxDuration (a slow handshake) still sends every page before switching over", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(quiet(Migration.incoming(listener, { timeouts: LONG })))
      // the main channel's handshake takes 11 s of the 10 s the migration may last
      const slowHandshake: Transport.Upgrade<never> = (connection, channel) =>
        channel === "main" ? Effect.as(TestClock.adjust("11 seconds"), connection) : Effect.succeed(connection)
      const stats = yield* noHang(
        Migration.migrate({
          address: listener.address,
          timeouts: LONG,
          upgrade: slowHandshake,
          live: { maxDuration: "10 seconds", onNoConvergence: "switchover" }
        }).pipe(Effect.provide(Transport.layer), Effect.provideService(GuestRam.GuestRam, ram)),
        "migrate"
      )
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expectSameMemory(received.ram, ram)
      expect(stats.pagesPerRound).toEqual([ram.size / PAGE, 0])
    })))

  it.effect("a destination that never acknowledges a flush: Timeout after exactly the peer timeout", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(256, 256)
      const listener = yield* Transport.listen(tcp0)
      const gotFlush = yield* Deferred.make<number>()
      // a fake destination: accepts, reads hello, answers Accept, drains the channels, never acknowledges
      const drain = (connection: Transport.Connection): Effect.Effect<void> =>
        Effect.forever(connection.read(64)).pipe(Effect.ignore)
      const fake = Effect.gen(function*() {
        const control = yield* listener.accept
        yield* control.read(4)
        const hello = yield* Control.receive(control)
        expect(hello._tag).toBe("Hello")
        yield* Control.send(control, new Control.Accept())
        for (let i = 0; i < (hello as Control.Hello).channels; i++) {
          yield* Effect.forkScoped(drain(yield* listener.accept))
        }
        while (true) {
          const message = yield* Control.receive(control)
          if (message._tag === "Flush") yield* Deferred.succeed(gotFlush, performance.now())
        }
      }).pipe(Effect.ignore, Effect.scoped)
      yield* Effect.forkScoped(fake)
      const source = yield* Effect.forkScoped(Migration.migrate({
        address: listener.address,
        timeouts: { connect: "1 hour", handshake: "1 hour", peer: "30 seconds" }
      }).pipe(Effect.provide(Transport.layer), Effect.provideService(GuestRam.GuestRam, ram)))
      yield* noHang(Deferred.await(gotFlush), "the flush")
      // move the clock a second per event-loop turn until the source gives up
      const t0 = yield* TestClock.currentTimeMillis
      const advance: Effect.Effect<void> = Effect.flatMap(Fiber.poll(source), (done) =>
        Option.isSome(done) ? Effect.void : Effect.zipRight(Effect.zipRight(nextTurn, TestClock.adjust("1 second")), advance))
      yield* noHang(advance, "the source timing out")
      const error = failureOf(yield* Fiber.await(source))
      expect((error as MigrationError.MigrationError).reason).toBe("Timeout")
      expect(error.message).toBe("timed out after 30s waiting for the destination to acknowledge the flush")
      const waited = (yield* TestClock.currentTimeMillis) - t0
      expect(waited).toBeGreaterThanOrEqual(29_000)
      expect(waited).toBeLessThanOrEqual(31_000)
      yield* writeNow(ram)
    })))
})

// ---------------------------------------------------------------------------------------------------------

type CancelPhase =
  | "setup: the main channel is still connecting"
  | "setup: hello sent, no Accept yet"
  | "setup: the multifd channels are still connecting"
  | "round 0"
  | "a later round (2)"
  | "the switch-over (writers paused)"
  | "the switch-over: digests sent, Done not yet received"

const phases: ReadonlyArray<CancelPhase> = [
  "setup: the main channel is still connecting",
  "setup: hello sent, no Accept yet",
  "setup: the multifd channels are still connecting",
  "round 0",
  "a later round (2)",
  "the switch-over (writers paused)",
  "the switch-over: digests sent, Done not yet received"
]

/** A listener whose connections never get to write the destination's Done (they wait, interruptibly). */
const withholdingDone = (listener: Transport.Listener, reached: Deferred.Deferred<void>): Transport.Listener => {
  const done = Control.encode(new Control.Done())
  return {
    address: listener.address,
    accept: Effect.map(listener.accept, (connection) => ({
      ...connection,
      write: (chunks) =>
        chunks.some((chunk) => Buffer.compare(chunk, done) === 0)
          ? Effect.zipRight(Deferred.succeed(reached, undefined), Effect.never)
          : connection.write(chunks)
    }))
  }
}

describe("cancel in every phase (QEMU's multifd cancel test)", () => {
  const CHANNELS = 4
  for (const phase of phases) {
    it.live(`${phase}: prompt, the destination hears why, writers resume, a second migration succeeds`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        // connect #0 is the first source's main channel, #1..#4 its multifd channels
        let stallMain = phase === "setup: the main channel is still connecting"
        let stallChannels = phase === "setup: the multifd channels are still connecting"
        const faulty = yield* Faulty.make({
          stallConnect: (index) => (index === 0 && stallMain) || (index >= 1 && stallChannels)
        })
        const listener = yield* faulty.transport.listen(tcp0)
        // before Accept: the destination holds the accepted main channel (in its TLS hook) until released
        const hold = yield* Deferred.make<void>()
        const holdFirst = phase === "setup: hello sent, no Accept yet"
        let upgrades = 0
        const upgrade: Transport.Upgrade<never> = (connection) =>
          upgrades++ === 0 && holdFirst ? Effect.as(Deferred.await(hold), connection) : Effect.succeed(connection)
        const withheld = yield* Deferred.make<void>()
        const first = yield* receive(
          phase === "the switch-over: digests sent, Done not yet received" ? withholdingDone(listener, withheld) : listener,
          { upgrade }
        )

        const writer = yield* hotWriter(ram, "pc.ram", 10, 4)
        // every pre-copy report also dirties a page, so that every round — the switch-over too — has pages
        const reached = yield* Deferred.make<Migration.Progress>()
        const pinned = (p: Migration.Progress) =>
          (phase === "round 0" && p.round === 0 && p.doneBytes > 0) ||
          (phase === "a later round (2)" && p.round === 2 && p.doneBytes > 0) ||
          (phase === "the switch-over (writers paused)" && p.phase === "switchover")
        const onProgress = (p: Migration.Progress) =>
          Effect.zipRight(
            p.phase === "precopy"
              ? GuestRam.write(ram, "vga.vram", 3 * PAGE, Buffer.from([p.round, p.doneBytes & 255])).pipe(Effect.orDie)
              : Effect.void,
            pinned(p) ? Effect.zipRight(Deferred.succeed(reached, p), Effect.never) : Effect.void
          )
        const source = yield* Effect.forkScoped(migrateFrom(ram, {
          address: listener.address,
          channels: CHANNELS,
          onProgress,
          live: { downtimeLimit: 0, maxRounds: 4, onNoConvergence: "switchover" }
        }, faulty.layer))

        switch (phase) {
          case "setup: the main channel is still connecting":
            yield* noHang(faulty.until((f) => f.attempts[0]?.state === "stalled"), "the stalled main connect")
            break
          case "setup: hello sent, no Accept yet":
            yield* noHang(
              faulty.until((f) =>
                f.records.some((r) => r.side === "connect" && r.role === "main" && r.bytesWritten > 4) &&
                f.records.some((r) => r.side === "accept")
              ),
              "the hello"
            )
            break
          case "setup: the multifd channels are still connecting":
            yield* noHang(
              faulty.until((f) => f.attempts.filter((a) => a.state === "stalled").length === CHANNELS),
              "the stalled channel connects"
            )
            break
          case "the switch-over: digests sent, Done not yet received":
            yield* noHang(Deferred.await(withheld), "the destination's Done")
            break
          default:
            yield* noHang(Deferred.await(reached), "the pinned progress report")
        }
        // in the switch-over the gate is closed: a write waits
        const blocked = phase.startsWith("the switch-over")
          ? yield* Effect.fork(GuestRam.write(ram, "pc.ram", 0, Buffer.from([42])))
          : undefined
        if (blocked) expect(yield* stillRunningAfterTurns(blocked)).toBe(true)

        const [sourceExit, ms] = yield* timed(noHang(Fiber.interrupt(source), "interrupting the source"))
        expect(ms).toBeLessThan(PROMPT_MS)
        expect(Exit.isInterrupted(sourceExit)).toBe(true)
        // writers resume
        if (blocked) yield* noHang(Fiber.join(blocked), "the paused write")
        yield* writerRuns(writer)
        yield* writeNow(ram)

        // what the destination saw
        yield* Deferred.succeed(hold, undefined)
        const controlExisted = phase !== "setup: the main channel is still connecting"
        if (controlExisted) {
          const [destExit, destMs] = yield* timed(noHang(Fiber.await(first), "the first incoming"))
          expect(destMs).toBeLessThan(PROMPT_MS)
          const error = failureOf(destExit)
          expect(error.message).toBe(CANCELLED)
          expect((error as MigrationError.MigrationError).reason).toBe("Aborted")
        } else {
          // nothing ever reached it: it still waits for a source, and will receive the next one
          expect(yield* stillRunningAfterTurns(first)).toBe(true)
        }

        // a second migration on the same listener
        stallMain = false
        stallChannels = false
        yield* faulty.release
        const second = controlExisted ? yield* receive(listener) : first
        const stats = yield* noHang(migrateFrom(ram, { address: listener.address, channels: CHANNELS }, faulty.layer), "second migrate")
        const received = yield* noHang(Fiber.join(second), "the second incoming")
        expectSameMemory(received.ram, ram)
        expect(received.stats.uuid).toBe(stats.uuid)
        expect(stats.rounds).toBeGreaterThanOrEqual(2)
        yield* ram.gate.open
        yield* writerRuns(writer)
        yield* Fiber.interrupt(writer.fiber)
        yield* noHang(
          faulty.until((f) => f.records.every((r) => r.closed)),
          "every connection of both migrations closed"
        )
      })))
  }
})

// ---------------------------------------------------------------------------------------------------------

describe("migrateStream", () => {
  const streamFrom = (ram: Ram, options: Omit<Migration.MigrateOptions, "onProgress">) =>
    Migration.migrateStream({ timeouts: TIMEOUTS, ...options }).pipe(
      Stream.provideLayer(Layer.merge(Transport.layer, Layer.succeed(GuestRam.GuestRam, ram)))
    )

  it.live("Progress events with non-decreasing rounds (pre-copy, then the switch-over), then Completed", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      yield* hotWriter(ram, "pc.ram", 40, 8)
      const events = Chunk.toReadonlyArray(yield* noHang(
        Stream.runCollect(streamFrom(ram, {
          address: listener.address,
          channels: 4,
          live: { downtimeLimit: 0, maxRounds: 3, onNoConvergence: "switchover" }
        })),
        "the stream"
      ))
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expectSameMemory(received.ram, ram)
      const last = events[events.length - 1]!
      expect(last._tag).toBe("Completed")
      const progress = events.slice(0, -1)
      expect(progress.every((e) => e._tag === "Progress")).toBe(true)
      const reports = progress as ReadonlyArray<Extract<Migration.Event, { _tag: "Progress" }>>
      const rounds = reports.map((e) => e.round)
      expect(rounds).toEqual([...rounds].sort((a, b) => a - b))
      expect(rounds[0]).toBe(0)
      const stats = (last as Extract<Migration.Event, { _tag: "Completed" }>).stats
      expect(stats.rounds).toBe(4)
      expect(new Set(rounds)).toEqual(new Set([0, 1, 2, 3]))
      // pre-copy first, then only the switch-over (the last round)
      const firstSwitch = reports.findIndex((e) => e.phase === "switchover")
      expect(firstSwitch).toBeGreaterThan(0)
      expect(reports.slice(firstSwitch).every((e) => e.phase === "switchover" && e.round === 3)).toBe(true)
      // a round-start report names the dirty pages and, after round 0, the measured bandwidth
      const starts = reports.filter((e) => e.phase === "precopy" && e.doneBytes === 0)
      expect(starts.map((e) => e.round)).toEqual([0, 1, 2])
      expect(starts[0]!.dirtyPages).toBe(ram.size / PAGE)
      for (const s of starts.slice(1)) {
        expect(s.dirtyPages).toBeGreaterThan(0)
        expect(s.bandwidth).toBeGreaterThan(0)
        expect(s.expectedDowntimeMs).toBeGreaterThan(0)
      }
    })))

  it.live("interrupting the consumer cancels the migration: the destination hears it, writers resume", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      const writer = yield* hotWriter(ram, "pc.ram", 40, 8)
      const sawRound1 = yield* Deferred.make<void>()
      const seen: Array<Migration.Event> = []
      // a migration that never converges on its own (limit 0, many rounds): only the interruption ends it
      const consumer = yield* Effect.fork(
        Stream.runForEach(
          streamFrom(ram, { address: listener.address, channels: 2, live: { downtimeLimit: 0, maxRounds: 100_000 } }),
          (e) =>
            Effect.sync(() => seen.push(e)).pipe(
              Effect.zipRight(e._tag === "Progress" && e.round >= 1 ? Deferred.succeed(sawRound1, undefined) : Effect.void)
            )
        )
      )
      yield* noHang(Deferred.await(sawRound1), "round 1")
      const [, ms] = yield* timed(noHang(Fiber.interrupt(consumer), "interrupting the consumer"))
      expect(ms).toBeLessThan(PROMPT_MS)
      expect(seen.every((e) => e._tag === "Progress")).toBe(true)
      const destError = failureOf(yield* noHang(Fiber.await(destination), "incoming"))
      expect(destError.message).toBe(CANCELLED)
      yield* writerRuns(writer)
    })))

  it.live("a consumer that stops early (take) cancels the migration the same way", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      const writer = yield* hotWriter(ram, "pc.ram", 40, 8)
      const events = yield* noHang(
        Stream.runCollect(
          streamFrom(ram, { address: listener.address, channels: 2, live: { downtimeLimit: 0, maxRounds: 100_000 } }).pipe(
            Stream.takeUntil((e) => e._tag === "Progress" && e.round >= 2)
          )
        ),
        "the stream"
      )
      expect(Chunk.size(events)).toBeGreaterThan(0)
      const destError = failureOf(yield* noHang(Fiber.await(destination), "incoming"))
      expect(destError.message).toBe(CANCELLED)
      yield* writerRuns(writer)
      yield* writeNow(ram)
    })))

  it.live("a failing migration fails the stream with its error", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      yield* hotWriter(ram, "pc.ram", 0, 64)
      const exit = yield* noHang(
        Effect.exit(Stream.runCollect(streamFrom(ram, {
          address: listener.address,
          channels: 2,
          live: { downtimeLimit: 0, maxRounds: 2 }
        }))),
        "the stream"
      )
      const error = failureOf(exit)
      expect((error as MigrationError.MigrationError).reason).toBe("NotConverged")
      yield* noHang(Fiber.await(destination), "incoming")
      yield* writeNow(ram)
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("progress reports tell the truth", () => {
  /** The source's multifd sockets (told by their init packet), through a transport that notes them. */
  const channelSockets = () => {
    const sockets: Array<Writable & { readonly bytesWritten: number }> = []
    const connect: Transport.Transport["Type"]["connect"] = (address, options) =>
      Effect.map(Transport.connect(address, options), (connection): Transport.Connection => {
        let seen = false
        return {
          ...connection,
          write: (chunks) =>
            Effect.suspend(() => {
              const first = chunks[0]
              if (!seen && first !== undefined && first.length === Protocol.INIT_PACKET_SIZE) {
                seen = true
                if (Buffer.from(first.buffer, first.byteOffset, 4).readUInt32BE(0) === Protocol.MAGIC) {
                  sockets.push(connection.stream as unknown as (typeof sockets)[number])
                }
              }
              return connection.write(chunks)
            })
        }
      })
    return {
      sockets,
      /** Bytes after the init packets that the sockets handed to the kernel (to the byte: `native/unsent`). */
      accepted: () =>
        sockets.reduce((n, s) => n + s.bytesWritten - unsent(s) - Protocol.INIT_PACKET_SIZE, 0),
      layer: Layer.succeed(Transport.Transport, { connect, listen: Transport.listen })
    }
  }

  /** The listener's connections after the first (the main channel) are not read until `gate` opens. */
  const gated = (listener: Transport.Listener, gate: Deferred.Deferred<void>): Transport.Listener => {
    let accepted = 0
    return {
      address: listener.address,
      accept: Effect.map(listener.accept, (connection): Transport.Connection =>
        accepted++ === 0 ? connection : { ...connection, peek: (length) => Effect.zipRight(Deferred.await(gate), connection.peek(length)) })
    }
  }

  it.live("the source counts pages the sockets accepted, not pages handed to the channels; each round ends at 100 %", () =>
    leakFree(Effect.gen(function*() {
      // 64 MiB of random pages, two channels: a hand-off is 16 MiB, more than the kernel holds for a reader
      // that does not read
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(16384, 1, PAGE) }] })
      const listener = yield* Transport.listen(tcp0)
      const gate = yield* Deferred.make<void>()
      const dstReports: Array<Migration.Progress> = []
      const destination = yield* receive(gated(listener, gate), {
        onProgress: (p) => Effect.sync(() => void dstReports.push(p))
      })
      const wire = channelSockets()
      const reports: Array<Migration.Progress & { readonly accepted: number }> = []
      const source = yield* Effect.forkScoped(migrateFrom(ram, {
        address: listener.address,
        channels: 2,
        onProgress: (p) => Effect.sync(() => void reports.push({ ...p, accepted: wire.accepted() }))
      }, wire.layer))
      // both channels were handed a batch, and the destination reads nothing: the pages are not sent yet
      const handedBoth: Effect.Effect<void> = Effect.suspend(() =>
        wire.sockets.length === 2 && wire.sockets.every((s) => s.bytesWritten >= 16 * 1024 * 1024)
          ? Effect.void
          : Effect.zipRight(nextTurn, handedBoth))
      yield* noHang(handedBoth, "both channels handed a batch")
      // what the kernel took so far at most (reported while the channels send, since the hand-offs were
      // reported alone), never the 32 MiB handed
      const sofar = reports.filter((r) => r.round === 0)
      expect(sofar[0]!.doneBytes).toBe(0)
      for (const r of sofar) expect(r.doneBytes).toBeLessThanOrEqual(Math.max(0, r.accepted))
      expect(Math.max(...sofar.map((r) => r.doneBytes))).toBeLessThan(32 * 1024 * 1024)
      yield* Deferred.succeed(gate, undefined)
      const stats = yield* noHang(Fiber.join(source), "migrate")
      const received = yield* noHang(Fiber.join(destination), "incoming")
      expectSameMemory(received.ram, ram)

      // never more than the sockets had accepted (raw pages: wire bytes are pages plus headers)
      for (const r of reports) expect(r.doneBytes).toBeLessThanOrEqual(Math.max(0, r.accepted))
      // round 0: from 0 to every page, with reports on the way that carry what is known
      const round0 = reports.filter((r) => r.round === 0)
      expect(round0[0]!.doneBytes).toBe(0)
      expect(round0.at(-1)!.doneBytes).toBe(ram.size)
      expect(round0.at(-1)!.totalBytes).toBe(ram.size)
      const mid = round0.filter((r) => r.doneBytes > 0 && r.doneBytes < r.totalBytes)
      expect(mid.length).toBeGreaterThan(0)
      for (const r of mid) {
        expect(r.dirtyPages).toBe((r.totalBytes - r.doneBytes) / PAGE)
        expect(r.bandwidth).toBeGreaterThan(0)
        expect(r.expectedDowntimeMs).toBeGreaterThan(0)
        expect(Number.isFinite(r.expectedDowntimeMs)).toBe(true)
      }
      // the last report of the migration has every page of its round
      expect(reports.at(-1)!.doneBytes).toBe(reports.at(-1)!.totalBytes)
      expect(stats.rounds).toBe(2)

      // the destination: its measured receive rate, and a last report with every page
      expect(dstReports.some((r) => r.bandwidth > 0)).toBe(true)
      expect(dstReports.at(-1)!.doneBytes).toBe(ram.size)
    })))

  it.live("with writers: mid-round reports carry the dirty pages known and the expected downtime; the stream ends at its total", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* GuestRam.make({
        blocks: [{ name: "pc.ram", bytes: image(8192) }, { name: "vga.vram", bytes: image(256) }]
      })
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* receive(listener)
      const writer = yield* hotWriter(ram, "vga.vram", 0, 64)
      const events = Chunk.toReadonlyArray(yield* noHang(
        Stream.runCollect(
          Migration.migrateStream({
            timeouts: TIMEOUTS,
            address: listener.address,
            channels: 2,
            live: { downtimeLimit: 0, maxRounds: 3, onNoConvergence: "switchover" }
          }).pipe(Stream.provideLayer(Layer.merge(Transport.layer, Layer.succeed(GuestRam.GuestRam, ram))))
        ),
        "the stream"
      ))
      yield* noHang(Fiber.join(destination), "incoming")
      const reports = events.filter((e): e is Extract<Migration.Event, { _tag: "Progress" }> => e._tag === "Progress")
      const mid = reports.filter((r) => r.phase === "precopy" && r.doneBytes > 0 && r.doneBytes < r.totalBytes)
      expect(mid.length).toBeGreaterThan(0)
      for (const r of mid) {
        // the round's pages not yet sent, and those the writer dirtied since the round began
        expect(r.dirtyPages).toBeGreaterThan(0)
        expect(r.dirtyPages).toBeGreaterThanOrEqual((r.totalBytes - r.doneBytes) / PAGE)
        expect(r.expectedDowntimeMs).toBeGreaterThan(0)
        expect(r.bandwidth).toBeGreaterThan(0)
      }
      // every round's last report has all its pages; the stream's last report is the switch-over's total
      for (const round of new Set(reports.map((r) => r.round))) {
        const last = reports.filter((r) => r.round === round).at(-1)!
        expect(last.doneBytes).toBe(last.totalBytes)
      }
      const last = reports.at(-1)!
      expect(last.phase).toBe("switchover")
      expect(last.doneBytes).toBe(last.totalBytes)
      yield* ram.gate.open
      yield* writerRuns(writer)
      yield* Fiber.interrupt(writer.fiber)
    })))
})
