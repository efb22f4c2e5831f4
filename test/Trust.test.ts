/**
 * Issue 11, "Trust" (DESIGN §2.8–2.9), at the library level over real loopback sockets:
 *
 * - success is durable: a destination's `store` step runs after the digests matched and before `Done`; the
 *   source succeeds only after it, fails with the destination's reason when it fails, and is kept waiting
 *   (not timed out) while a long store runs — yet times out when the destination falls silent;
 * - strangers are candidates: connections that send the control magic and then close, stall, announce a
 *   4 GiB frame or send garbage, or the multifd magic and half an init packet, are turned away (logged and
 *   listed in `rejected`) while the destination keeps waiting, half-open ones after the handshake timeout
 *   (TestClock), and a real source then migrates; a second complete hello is refused without disturbing the
 *   migration in progress.
 *
 * Nothing waits on a timer to let things settle: waits are on Deferreds, fibers, recorded events or
 * event-loop turns; `noHang` guards (real timers) only turn a hang into a failure.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Data from "effect/Data"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as FiberId from "effect/FiberId"
import * as Layer from "effect/Layer"
import * as Logger from "effect/Logger"
import * as LogLevel from "effect/LogLevel"
import * as Option from "effect/Option"
import * as Ref from "effect/Ref"
import * as Stream from "effect/Stream"
import * as Supervisor from "effect/Supervisor"
import * as TestClock from "effect/TestClock"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Path from "node:path"
import * as Control from "../src/Control.js"
import { MAX_CANDIDATES } from "../src/internal/acceptor.js"
import { HELLO_BUDGET } from "../src/internal/candidates.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationStatus from "../src/MigrationStatus.js"
import * as MigrationError from "../src/MigrationError.js"
import * as Protocol from "../src/Protocol.js"
import * as Snapshot from "../src/Snapshot.js"
import * as Tls from "../src/Tls.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { tempDirectory } from "./support/files.js"
import { fakeDestination } from "./support/fakeDestination.js"
import { fakeSource, syncPacket } from "./support/fakeSource.js"
import { advanceUntil } from "./support/clock.js"
import * as Faulty from "./support/faultyTransport.js"
import { noHang } from "./support/guards.js"
import { leakFree, nextTurn, tempSocketPath } from "./support/handles.js"
import { mixedImage } from "./support/images.js"
import { sameMemory } from "./support/memory.js"
import { stranger, turnedAway } from "./support/strangers.js"
import { loopbackServer } from "./support/tcpServer.js"
import { controlMagic, smallHello } from "./support/wire.js"

// ---------------------------------------------------------------------------------------------------------
// helpers

const PAGE = 4096
const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

type Ram = GuestRam.GuestRam["Type"]

/** 1 MiB + 256 KiB of mixed random and zero pages. */
const sourceRam = () =>
  GuestRam.make({
    blocks: [{ name: "pc.ram", bytes: mixedImage(256, 0.7, PAGE) }, { name: "vga.vram", bytes: mixedImage(64, 0.7, PAGE) }]
  })

/** A destination in a fiber of the caller's scope, its log lines (rejected connections) kept in `logs`. */
const startDestination = <E = never>(options: Migration.IncomingOptions<E> = {}) =>
  Effect.gen(function*() {
    const logs: Array<string> = []
    const listener = yield* Transport.listen(tcp0)
    const fiber = yield* Effect.forkScoped(Effect.provide(
      Migration.incoming(listener, { timeouts: TIMEOUTS, ...options }),
      Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => logs.push(String(message))))
    ))
    return { fiber, address: listener.address, logs }
  })

const migrateTo = (
  address: Transport.Address,
  ram: Ram,
  options: Partial<Migration.MigrateOptions> = {},
  transport = Transport.layer
) =>
  Migration.migrate({ address, channels: 3, timeouts: TIMEOUTS, ...options }).pipe(
    Effect.provide(transport),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

const frameLength = (n: number) => {
  const length = Buffer.alloc(4)
  length.writeUInt32BE(n, 0)
  return length
}

/** The first `bytes` bytes of a valid multifd init packet (the magic included). */
const halfInit = (bytes = 30) => Protocol.encodeInit({ uuid: Protocol.parseUuid(Crypto.randomUUID())!, id: 0 }).subarray(0, bytes)

/** A valid hello of a small migration. */
const hello = () => smallHello()

const fiberDone = <A, E>(fiber: Fiber.Fiber<A, E>) => Effect.map(Fiber.poll(fiber), Option.isSome)

// ---------------------------------------------------------------------------------------------------------

class DiskFull extends Data.TaggedError("DiskFull")<{ readonly path: string }> {
  override get message(): string {
    return `${this.path}: no space left on device`
  }
}

describe("success is durable: the destination's store step", () => {
  it.live("fails: the source fails with the destination's reason, incoming with the store's error, nothing leaks", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const storedMemory = yield* Deferred.make<boolean>()
      const failure = new DiskFull({ path: "/mnt/full/out.img" })
      const dest = yield* startDestination({
        // the store sees the verified memory, then fails as a full disk would
        store: (received) => Effect.zipRight(Deferred.succeed(storedMemory, sameMemory(received, ram)), Effect.fail(failure))
      })
      const sourceExit = yield* noHang(Effect.exit(migrateTo(dest.address, ram)), "migrate")
      expect(yield* Deferred.await(storedMemory)).toBe(true)
      const error = failureOf(sourceExit)
      expect(error).toBeInstanceOf(MigrationError.MigrationError)
      expect((error as MigrationError.MigrationError).reason).toBe("Aborted")
      expect(error.message).toBe("the destination could not store the image: /mnt/full/out.img: no space left on device")
      const destError = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
      expect(destError).toBe(failure)
    })))

  /**
   * A store step that dies, or throws instead of returning an effect (synchronous file I/O that fails, say): the
   * source hears that the store failed and why, as for a failure. A step that threw did so where the step was
   * called, outside the guard that tells the source: the destination's main channel just closed, and the source
   * failed with "peer closed the connection", unaware that its destination had the memory and failed to store it.
   */
  for (const how of ["dies", "throws"] as const) {
    it.live(`${how}: the source fails with the destination's reason, incoming with the defect`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        const bug = new Error("/mnt/full/out.img: ENOSPC")
        const dest = yield* startDestination({
          store: (): Effect.Effect<void> => {
            if (how === "throws") throw bug
            return Effect.die(bug)
          }
        })
        const error = failureOf(yield* noHang(Effect.exit(migrateTo(dest.address, ram)), "migrate"))
        expect((error as MigrationError.MigrationError).reason).toBe("Aborted")
        expect(error.message).toBe("the destination could not store the image: /mnt/full/out.img: ENOSPC")
        const destExit = yield* noHang(Fiber.await(dest.fiber), "incoming")
        expect(Exit.isFailure(destExit) && (Cause.squash(destExit.cause) as Error).message).toBe(bug.message)
      })))
  }

  /**
   * Receiving into memory given, the destination holds it against other migrations, saves and restores (Busy) until
   * it returns; its own store step found it Busy too, so the natural durable store — a snapshot of the memory just
   * received (or passing it on with migrate) — failed "the destination could not store the image: another
   * migration, snapshot save or restore of this memory is under way". The step now has the memory, one save or
   * migration at a time; anyone else still finds it Busy.
   */
  it.live("into memory given, a store step that saves a snapshot of it: stored; others still find the memory Busy meanwhile", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const into = yield* GuestRam.make({ blocks: GuestRam.layoutOf(ram) })
      const dir = yield* tempDirectory("emfd-store-")
      const path = Path.join(dir, "stored.snap")
      const storing = yield* Deferred.make<void>()
      const goOn = yield* Deferred.make<void>()
      const inside = yield* Deferred.make<ReadonlyArray<string>>()
      const dest = yield* startDestination({
        ram: into,
        store: (received) =>
          Effect.gen(function*() {
            const save = (to: string) => Snapshot.save(to).pipe(Effect.provideService(GuestRam.GuestRam, received))
            // the test tries the memory from outside the step meanwhile
            yield* Deferred.succeed(storing, undefined)
            yield* Deferred.await(goOn)
            // inside the step, one at a time: a second save beside the first is Busy
            const [first, second] = yield* Effect.all(
              [Effect.either(save(path)), Effect.either(save(Path.join(dir, "second.snap")))],
              { concurrency: "unbounded" }
            )
            yield* Deferred.succeed(inside, [first._tag, second._tag].sort())
            yield* received.gate.open
          }).pipe(Effect.orDie)
      })
      const source = yield* Effect.fork(migrateTo(dest.address, ram))
      yield* noHang(Deferred.await(storing), "the store step")
      const refused = yield* Effect.flip(Snapshot.save(Path.join(dir, "outside.snap")).pipe(
        Effect.provideService(GuestRam.GuestRam, into)
      ))
      expect((refused as MigrationError.MigrationError).reason).toBe("Busy")
      yield* Deferred.succeed(goOn, undefined)
      yield* noHang(Fiber.join(source), "migrate")
      yield* ram.gate.open
      yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory((yield* Snapshot.restore(path)).ram, ram)).toBe(true)
      expect(yield* Deferred.await(inside)).toEqual(["Left", "Right"])
    }).pipe(Effect.scoped)))

  it.live("the loan ends with the step: a fiber the step forked that outlives it finds the memory Busy like anyone", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const into = yield* GuestRam.make({ blocks: GuestRam.layoutOf(ram) })
      const dir = yield* tempDirectory("emfd-loan-")
      const go = yield* Deferred.make<void>()
      const outcome = yield* Deferred.make<Either.Either<unknown, unknown>>()
      const dest = yield* startDestination({
        ram: into,
        store: (received) =>
          Effect.asVoid(Effect.forkDaemon(Effect.zipRight(
            Deferred.await(go),
            Effect.flatMap(
              Effect.either(Snapshot.save(Path.join(dir, "late.snap")).pipe(Effect.provideService(GuestRam.GuestRam, received))),
              (result) => Deferred.succeed(outcome, result)
            )
          )))
      })
      yield* noHang(migrateTo(dest.address, ram), "migrate")
      yield* ram.gate.open
      yield* noHang(Fiber.join(dest.fiber), "incoming")
      // another holds the memory now (a save, a restore): the late save must find it Busy
      const result = yield* into.transfer.withPermits(1)(
        Effect.zipRight(Deferred.succeed(go, undefined), noHang(Deferred.await(outcome), "the late save"))
      )
      expect(Either.isLeft(result) && (result.left as MigrationError.MigrationError).reason).toBe("Busy")
    }).pipe(Effect.scoped)))

  /**
   * A save the step started (forked, so as not to hold the source up) that was still running when the step ended
   * kept only the step's loan, and the memory was free for anyone once `incoming` returned: a second save (or a
   * migration) of it then ran beside the first, the two taking each other's dirty pages. The memory now stays held
   * until such a transfer ends, and everyone else finds it Busy meanwhile: memory given by `incoming` (which returns
   * after the save; interrupted, it interrupts it), memory `incoming` made by the save itself (nobody lends it).
   */
  /**
   * Waits until `incoming`'s own steps on `listener` are over, its scope closed (what it holds besides the memory
   * given): its claim on the listener is the first thing it takes and the last it gives back, and another incoming
   * on the listener fails Busy until then (once it is free, that one waits for a source, and is interrupted).
   */
  const stepsOver = (listener: Transport.Listener) =>
    Effect.gen(function*() {
      while (true) {
        const attempt = yield* Effect.fork(Migration.incoming(listener, { timeouts: TIMEOUTS }))
        for (let i = 0; i < 3; i++) yield* nextTurn
        if (Option.isNone(yield* Fiber.poll(attempt))) return yield* Fiber.interrupt(attempt)
      }
    })

  /** Runs an `incoming` with its debug log watched: `lastStep` is done once it heard the source close the main channel. */
  const lastStepIn = (lastStep: Deferred.Deferred<void>) => <A, E, R>(self: Effect.Effect<A, E, R>) =>
    self.pipe(
      Effect.provide(Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => {
        if (String(message) === "main channel: closed") Deferred.unsafeDone(lastStep, Exit.void)
      }))),
      Logger.withMinimumLogLevel(LogLevel.Debug)
    )

  for (const given of [true, false]) {
    it.live(`the loan ends with the step: a save the step started that outlives it keeps the memory held (${given ? "memory given" : "memory incoming made"})`, () =>
      leakFree(Effect.gen(function*() {
        const ram = yield* sourceRam()
        const into = given ? yield* GuestRam.make({ blocks: GuestRam.layoutOf(ram) }) : undefined
        const dir = yield* tempDirectory("emfd-loan-")
        const started = yield* Deferred.make<Ram>()
        const goOn = yield* Deferred.make<void>()
        const saved = yield* Deferred.make<Either.Either<unknown, unknown>>()
        // incoming's last step: it heard the source close the main channel (then it returns, nothing more to wait for)
        const lastStep = yield* Deferred.make<void>()
        const listener = yield* Transport.listen(tcp0)
        const dest = yield* Effect.forkScoped(Migration.incoming(listener, {
          timeouts: TIMEOUTS,
          ...(into === undefined ? {} : { ram: into }),
          store: (received) =>
            Effect.gen(function*() {
              // a save in the background: the step ends once it is under way (its first report), the save goes on
              yield* Effect.forkDaemon(Effect.flatMap(
                Effect.either(Snapshot.save(Path.join(dir, "background.snap"), {
                  onProgress: () => Effect.zipRight(Deferred.succeed(started, received), Deferred.await(goOn))
                }).pipe(Effect.provideService(GuestRam.GuestRam, received))),
                (result) => Deferred.succeed(saved, result)
              ))
              yield* Deferred.await(started)
            })
        }).pipe(lastStepIn(lastStep)))
        yield* noHang(migrateTo(listener.address, ram), "migrate")
        yield* ram.gate.open
        const received = yield* Deferred.await(started)
        yield* noHang(Deferred.await(lastStep), "incoming's last step")
        yield* noHang(stepsOver(listener), "incoming's steps over")
        // the background save still runs: the memory is not free (incoming has not returned: it waits for the save)
        const second = yield* noHang(
          Effect.either(Snapshot.save(Path.join(dir, "second.snap")).pipe(Effect.provideService(GuestRam.GuestRam, received))),
          "a second save"
        )
        expect(Either.isLeft(second) && (second.left as MigrationError.MigrationError).reason).toBe("Busy")
        // memory given is held by incoming until the save ends; memory it made, by the save itself
        if (given) expect(Option.isNone(yield* Fiber.poll(dest))).toBe(true)
        yield* Deferred.succeed(goOn, undefined)
        const result = yield* noHang(Deferred.await(saved), "the background save")
        expect(Either.isRight(result)).toBe(true)
        expect(sameMemory((yield* noHang(Fiber.join(dest), "incoming")).ram, ram)).toBe(true)
        expect(sameMemory((yield* Snapshot.restore(Path.join(dir, "background.snap"))).ram, ram)).toBe(true)
        // and now it is free
        yield* noHang(Snapshot.save(Path.join(dir, "third.snap")).pipe(Effect.provideService(GuestRam.GuestRam, received)), "a save after")
      }).pipe(Effect.scoped)))
  }

  it.live("the loan ends with the step: interrupted while it waits for the save the step started, incoming interrupts it and lets the memory go", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const into = yield* GuestRam.make({ blocks: GuestRam.layoutOf(ram) })
      const dir = yield* tempDirectory("emfd-loan-")
      const started = yield* Deferred.make<void>()
      const lastStep = yield* Deferred.make<void>()
      const listener = yield* Transport.listen(tcp0)
      const dest = yield* Effect.forkScoped(Migration.incoming(listener, {
        timeouts: TIMEOUTS,
        ram: into,
        store: (received) =>
          Effect.gen(function*() {
            // a save that never ends by itself
            yield* Effect.forkDaemon(Snapshot.save(Path.join(dir, "background.snap"), {
              onProgress: () => Effect.zipRight(Deferred.succeed(started, undefined), Effect.never)
            }).pipe(Effect.provideService(GuestRam.GuestRam, received)))
            yield* Deferred.await(started)
          })
      }).pipe(lastStepIn(lastStep)))
      yield* noHang(migrateTo(listener.address, ram), "migrate")
      yield* ram.gate.open
      // incoming's own steps are over: it waits for the save
      yield* noHang(Deferred.await(lastStep), "incoming's last step")
      yield* noHang(stepsOver(listener), "incoming's steps over")
      expect(Option.isNone(yield* Fiber.poll(dest))).toBe(true)
      yield* noHang(Fiber.interrupt(dest), "interrupting incoming")
      // the save it lent the memory to has ended: no file of it, the memory free
      expect(Fs.readdirSync(dir)).toEqual([])
      yield* noHang(Snapshot.save(Path.join(dir, "after.snap")).pipe(Effect.provideService(GuestRam.GuestRam, into)), "a save after")
    }).pipe(Effect.scoped)))

  it.live("throws (a defect): the source still hears that the store failed, and why", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const dest = yield* startDestination({
        store: () => Effect.sync(() => {
          throw new Error("the disk controller went away")
        })
      })
      const error = failureOf(yield* noHang(Effect.exit(migrateTo(dest.address, ram)), "migrate"))
      expect(error.message).toBe("the destination could not store the image: the disk controller went away")
      const destExit = yield* noHang(Fiber.await(dest.fiber), "incoming")
      expect(Exit.isFailure(destExit) && Cause.isDie(destExit.cause)).toBe(true)
    })))

  it.live("succeeds: the source's success comes after the store completed", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const events = yield* Ref.make<ReadonlyArray<string>>([])
      const dest = yield* startDestination({
        store: (received) =>
          Ref.update(events, (e) => [...e, sameMemory(received, ram) ? "stored the same memory" : "stored other memory"])
      })
      yield* noHang(migrateTo(dest.address, ram), "migrate")
      yield* Ref.update(events, (e) => [...e, "source succeeded"])
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(yield* Ref.get(events)).toEqual(["stored the same memory", "source succeeded"])
    })))

  it.effect("a store that outlasts the source's peer timeout fivefold: the source keeps waiting, then succeeds", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const started = yield* Deferred.make<void>()
      const release = yield* Deferred.make<void>()
      const dest = yield* startDestination({
        store: () => Effect.zipRight(Deferred.succeed(started, undefined), Deferred.await(release))
      })
      const faulty = yield* Faulty.make()
      const source = yield* Effect.forkScoped(migrateTo(dest.address, ram, {}, faulty.layer))
      yield* noHang(Deferred.await(started), "the store step starting")
      const mainRead = () => faulty.records.find((r) => r.side === "connect" && r.role === "main")!.bytesRead
      const before = mainRead()
      // 10 s of virtual time: five times the source's peer timeout (2 s)
      const t0 = yield* TestClock.currentTimeMillis
      yield* advanceUntil(
        Effect.map(TestClock.currentTimeMillis, (now) => now - t0 >= 10_000 || source.unsafePoll() !== null),
        "10 s of storing"
      )
      expect(source.unsafePoll(), "the source ended while the destination was storing").toBeNull()
      // the destination said it was storing, again and again (a Storing frame is 22 bytes)
      expect(mainRead() - before).toBeGreaterThanOrEqual(10 * Control.encode(new Control.Storing()).length)
      yield* Deferred.succeed(release, undefined)
      const stats = yield* noHang(Fiber.join(source), "migrate")
      expect(stats.ramBytes).toBe(ram.size)
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
    })))

  it.effect("a destination that falls silent while storing: the source times out after its peer timeout", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const storing = yield* Deferred.make<void>()
      // a fake destination: accepts, acknowledges every flush, says Storing once after Complete, then nothing
      const address = yield* fakeDestination({
        onComplete: (control) =>
          Effect.zipRight(Control.send(control, new Control.Storing()), Deferred.succeed(storing, undefined))
      })
      const source = yield* Effect.forkScoped(migrateTo(address, ram, { channels: 1 }))
      yield* noHang(Deferred.await(storing), "the Storing message")
      const t0 = yield* TestClock.currentTimeMillis
      yield* advanceUntil(fiberDone(source), "the source timing out")
      const error = failureOf(yield* Fiber.await(source))
      expect((error as MigrationError.MigrationError).reason).toBe("Timeout")
      expect(error.message).toBe("timed out after 2s waiting for the destination to store the image")
      expect((yield* TestClock.currentTimeMillis) - t0).toBeLessThanOrEqual(2_500)
    })))

  it.live("a destination that closes the main channel right after Done, before this side ended its channels: the source succeeds", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const listener = yield* Transport.listen(tcp0)
      // the source's channels end only once its main channel has read the destination's close
      const closeSeen = yield* Deferred.make<void>()
      const upgrade: Transport.Upgrade<Transport.UpgradeError> = (connection, channel) =>
        Effect.succeed(
          channel === "main"
            ? {
              ...connection,
              readInto: (target, at, length) =>
                Effect.tapError(connection.readInto(target, at, length), () => Deferred.succeed(closeSeen, undefined)),
              read: (length) => Effect.tapError(connection.read(length), () => Deferred.succeed(closeSeen, undefined))
            }
            : { ...connection, end: Effect.zipRight(Deferred.await(closeSeen), connection.end) }
        )
      // a fake destination: accepts, acknowledges every flush, answers Complete with Done and closes the main
      // channel at once, then reads the channels to their end
      const drain = (connection: Transport.Connection): Effect.Effect<void, Transport.TransportError> =>
        Effect.flatMap(connection.readSome(1 << 20), (chunk) => (chunk.length === 0 ? Effect.void : drain(connection)))
      const fake = Effect.gen(function*() {
        const control = yield* listener.accept
        yield* control.read(4)
        const first = yield* Control.receive(control)
        yield* Control.send(control, new Control.Accept())
        const channels: Array<Transport.Connection> = []
        for (let i = 0; i < (first as Control.Hello).channels; i++) channels.push(yield* listener.accept)
        while (true) {
          const message = yield* Control.receive(control)
          if (message._tag === "Flush") yield* Control.send(control, new Control.FlushAck({ round: message.round }))
          if (message._tag === "Complete") break
        }
        yield* Control.send(control, new Control.Done())
        yield* Transport.destroy(control.stream)
        yield* Effect.forEach(channels, drain, { concurrency: "unbounded", discard: true })
      }).pipe(Effect.orDie, Effect.scoped)
      const destination = yield* Effect.forkScoped(fake)
      // what the source logs, down to Debug: its conversation ends there, no fiber of it fails
      const logs: Array<string> = []
      const stats = yield* noHang(migrateTo(listener.address, ram, { upgrade }), "migrate").pipe(
        Effect.provide(Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => logs.push(String(message))))),
        Logger.withMinimumLogLevel(LogLevel.Debug)
      )
      expect(stats.ramBytes).toBe(ram.size)
      expect(yield* Deferred.isDone(closeSeen)).toBe(true)
      expect(logs.filter((line) => line.includes("unhandled"))).toEqual([])
      yield* noHang(Fiber.join(destination), "the fake destination")
    })))

  it.live("admit: the destination's own word on a proposal; refused, the source fails with its reason and nothing is received", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const proposals: Array<Migration.Proposal> = []
      const dest = yield* startDestination({
        admit: (proposal) => {
          proposals.push(proposal)
          return "no room for it here"
        }
      })
      const error = failureOf(yield* noHang(Effect.exit(migrateTo(dest.address, ram, { compression: "zstd" })), "migrate"))
      expect((error as MigrationError.MigrationError).reason).toBe("Rejected")
      expect(error.message).toBe("the destination refused the migration: no room for it here")
      expect(proposals).toEqual([{
        ramBytes: ram.size,
        blocks: GuestRam.layoutOf(ram),
        pageSize: PAGE,
        channels: 3,
        compression: "zstd"
      }])
      const destError = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
      expect(destError.message).toBe("refused the migration: no room for it here")
    })))

  it.live("a hello of 20 000 tiny blocks (each a memory of its own, reserving address space) gets Reject, nothing allocated", () =>
    leakFree(Effect.gen(function*() {
      const dest = yield* startDestination()
      const peer = yield* Transport.connect(dest.address)
      const blocks = Array.from({ length: 20_000 }, (_, i) => ({ name: `b${i}`, size: PAGE }))
      yield* peer.write([controlMagic(), Control.encode(new Control.Hello({ ...hello(), blocks }))])
      const answer = yield* noHang(Control.receive(peer), "the answer")
      expect(answer).toMatchObject({
        _tag: "Reject",
        reason: `invalid memory layout: 20000 blocks, more than ${GuestRam.MAX_BLOCKS}`
      })
      yield* Fiber.await(dest.fiber)
    })))

  it.live("a zstd hello of 255 channels and 16 pages under a 64 MiB limit (8 GiB of decompression windows) gets Reject; one channel's fits", () =>
    leakFree(Effect.gen(function*() {
      // (each channel's zstd window, 32 MiB at most, is filled by a few KiB of packets: 16 channels took 522 MiB
      // more of a destination whose limit was 2 MiB, 255 would take 8 GiB, whatever memory it had agreed to)
      const limit = 64 * 1024 * 1024
      const dest = yield* startDestination({ maxRamBytes: limit })
      const peer = yield* Transport.connect(dest.address)
      yield* peer.write([controlMagic(), Control.encode(new Control.Hello({ ...hello(), channels: 255, compression: "zstd" }))])
      const answer = yield* noHang(Control.receive(peer), "the answer")
      const reason = `${16 * PAGE} bytes of memory and the zstd decompression windows of 255 channels (up to ` +
        `${255 * 2 ** 25} bytes, ${2 ** 25} a channel) exceed this destination's limit of ${limit}`
      expect(answer).toEqual(new Control.Reject({ reason }))
      expect(failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming")).message).toBe(`refused the migration: ${reason}`)
      // one channel's window and the memory fit: it migrates
      const next = yield* startDestination({ maxRamBytes: limit })
      const ram = yield* sourceRam()
      yield* noHang(migrateTo(next.address, ram, { channels: 1, compression: "zstd", compressionLevel: 20 }), "migrate")
      expect(sameMemory((yield* noHang(Fiber.join(next.fiber), "incoming")).ram, ram)).toBe(true)
    })))

  it.live("an old peer is refused, not misunderstood: a hello of control protocol version 1 gets Reject", () =>
    leakFree(Effect.gen(function*() {
      const dest = yield* startDestination()
      const old = yield* Transport.connect(dest.address)
      yield* old.write([controlMagic(), Control.encode(new Control.Hello({ ...hello(), version: 1 }))])
      const answer = yield* noHang(Control.receive(old), "the answer")
      expect(answer).toMatchObject({ _tag: "Reject", reason: `control protocol version 1 is not ${Control.VERSION}` })
      expect(Control.VERSION).toBeGreaterThan(1)
      yield* Fiber.await(dest.fiber)
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("a cancelled destination tells the source why, as a cancelled source does", () => {
  const CANCELLED = "the destination aborted the migration: cancelled by destination"
  /** "Promptly": well below the source's peer timeout (2 s), after which it would give up on its own. */
  const PROMPT_MS = 1500

  /** Interrupts the destination, then the source fails promptly with the destination's word; nothing leaks. */
  const cancelled = (
    dest: Effect.Effect.Success<ReturnType<typeof startDestination>>,
    source: Fiber.RuntimeFiber<unknown, { readonly message: string }>
  ) =>
    Effect.gen(function*() {
      const t0 = performance.now()
      const destExit = yield* noHang(Fiber.interrupt(dest.fiber), "interrupting the destination")
      expect(Exit.isInterrupted(destExit)).toBe(true)
      const error = failureOf(yield* noHang(Fiber.await(source), "the source"))
      expect(performance.now() - t0).toBeLessThan(PROMPT_MS)
      expect(error).toBeInstanceOf(MigrationError.MigrationError)
      expect((error as MigrationError.MigrationError).reason).toBe("Aborted")
      expect(error.message).toBe(CANCELLED)
    })

  it.live("in the middle of round 0 (pages are arriving)", () =>
    leakFree(Effect.gen(function*() {
      // 16 MiB at 4 MiB/s: four seconds of transfer, of which the first 64 KiB are waited for
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(4096, 0.7, PAGE) }] })
      const dest = yield* startDestination()
      const faulty = yield* Faulty.make()
      const source = yield* Effect.forkScoped(migrateTo(dest.address, ram, { maxBandwidth: 4 * 1024 * 1024 }, faulty.layer))
      yield* noHang(
        faulty.until((f) => f.records.some((r) => typeof r.role === "number" && r.bytesWritten >= 64 * 1024)),
        "the first pages"
      )
      yield* cancelled(dest, source)
    })))

  it.live("while it stores the image (after the digests matched, before Done)", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const storing = yield* Deferred.make<void>()
      const dest = yield* startDestination({ store: () => Effect.zipRight(Deferred.succeed(storing, undefined), Effect.never) })
      const source = yield* Effect.forkScoped(migrateTo(dest.address, ram))
      yield* noHang(Deferred.await(storing), "the store step")
      yield* cancelled(dest, source)
    })))

  it.live("inside the store step's commit (a rename over the older image): the commit completes, the source hears Done", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const committing = yield* Deferred.make<void>()
      const release = yield* Deferred.make<void>()
      let committed = false
      const dest = yield* startDestination({
        store: (_, commit) =>
          commit(Effect.gen(function*() {
            yield* Deferred.succeed(committing, undefined)
            yield* Deferred.await(release)
            committed = true
          }))
      })
      const source = yield* Effect.forkScoped(migrateTo(dest.address, ram))
      yield* noHang(Deferred.await(committing), "the commit")
      // the interruption waits for the commit, which the test lets finish once the interruption is under way
      const interrupting = yield* Effect.fork(Fiber.interrupt(dest.fiber))
      yield* nextTurn
      yield* Deferred.succeed(release, undefined)
      expect(Exit.isInterrupted(yield* noHang(Fiber.join(interrupting), "interrupting the destination"))).toBe(true)
      expect(committed).toBe(true)
      // stored memory: the two sides agree that it was (the source was not told "cancelled")
      const stats = yield* noHang(Fiber.join(source), "the source")
      expect(stats.ramBytes).toBe(ram.size)
    })))
})

// ---------------------------------------------------------------------------------------------------------

/** Runs a real source to completion against `dest`, checking what the destination received and rejected. */
const realSourceSucceeds = (dest: Effect.Effect.Success<ReturnType<typeof startDestination>>) =>
  Effect.gen(function*() {
    expect(dest.fiber.unsafePoll(), "the destination gave up before the real source came").toBeNull()
    const ram = yield* sourceRam()
    const stats = yield* noHang(migrateTo(dest.address, ram), "migrate")
    expect(stats.channels).toBe(3)
    const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
    expect(sameMemory(result.ram, ram)).toBe(true)
    return result
  })

describe("strangers are candidates, never owners", () => {
  const closing = [
    {
      name: "the control magic, then a close",
      bytes: () => [controlMagic()],
      listed: "no valid hello: peer closed the connection"
    },
    {
      name: "the control magic and a frame of 4 GiB - 1",
      bytes: () => [controlMagic(), frameLength(0xffffffff)],
      listed: "no valid hello: bad control message: frame of 4294967295 bytes exceeds 1048576"
    },
    {
      name: "the control magic and a garbage frame",
      bytes: () => [controlMagic(), frameLength(9), Buffer.from("not json!")],
      listed: "no valid hello: bad control message: not JSON ("
    },
    {
      name: "the control magic and a frame that is no hello (Done)",
      bytes: () => [controlMagic(), Control.encode(new Control.Done())],
      listed: "no valid hello: a Done message came first"
    },
    {
      name: "the multifd magic and half an init packet, then a close",
      bytes: () => [halfInit()],
      listed: "no valid init packet: peer closed the connection after 30 of 64 bytes"
    },
    {
      // QEMU migrating to recv without --from-qemu: the user heard "first bytes 5145564d" and nothing more
      name: "QEMU's migration stream (QEVM, file version 3)",
      bytes: () => [Buffer.from("5145564d00000003", "hex")],
      listed: "not a migration stream (first bytes 5145564d): QEMU's migration stream (QEVM), which this destination " +
        "does not take (a QEMU destination does: recv --from-qemu)"
    }
  ]
  for (const s of closing) {
    it.live(`${s.name}: turned away and listed; the destination keeps waiting; a real source then succeeds`, () =>
      leakFree(Effect.gen(function*() {
        const dest = yield* startDestination()
        const connection = yield* stranger(dest.address, s.bytes(), true)
        yield* turnedAway(connection, "the stranger turned away")
        const result = yield* realSourceSucceeds(dest)
        expect(result.rejected).toHaveLength(1)
        expect(result.rejected[0]).toMatch(/^tcp:127\.0\.0\.1:\d+ \(from 127\.0\.0\.1:\d+\): /)
        expect(result.rejected[0]).toContain(s.listed)
        expect(dest.logs).toEqual([`rejected a connection from ${result.rejected[0]}`])
      })))
  }

  it.live("a listener nobody accepts on (a migration with all its channels) holds Transport.MAX_QUEUED connections; more are closed as they come", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      // (each was accepted and held, socket and descriptor, until somebody accepted it or the listener closed:
      // strangers connecting while a migration had all its channels piled up to the open-files limit)
      const listener = yield* Transport.listen(tcp0)
      const port = listener.address._tag === "Tcp" ? listener.address.port : 0
      const extra = 8
      let closed = 0
      const allClosed = yield* Deferred.make<void>()
      yield* Effect.acquireRelease(
        Effect.sync(() =>
          Array.from({ length: Transport.MAX_QUEUED + extra }, () => {
            const socket = Net.connect({ host: "127.0.0.1", port })
            socket.on("error", () => {})
            socket.once("close", () => {
              if (++closed === extra) Deferred.unsafeDone(allClosed, Exit.void)
            })
            socket.resume()
            return socket
          })
        ),
        (sockets) => Effect.forEach(sockets, (socket) => Transport.destroy(socket), { discard: true })
      )
      yield* noHang(Deferred.await(allClosed), `${extra} connections beyond the queue closed`, 20)
      // the queued ones are still there for whoever accepts next
      for (let i = 0; i < 4; i++) yield* nextTurn
      expect(closed).toBe(extra)
      const first = yield* listener.accept
      expect(first.peer).toContain("127.0.0.1")
    }))))

  it.live("more strangers at once than Acceptor.MAX_CANDIDATES, saying nothing: that many are accepted, the next wait in the listener's queue until a place is free", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      // (every one was accepted and held, descriptor, socket and read-ahead, until its handshake deadline: strangers
      // that connected faster than the deadline closed them piled up to the open-files limit.) Beyond the queue they
      // are closed as they come (Transport.MAX_QUEUED, above); the deadline closes a candidate (below)
      const faulty = yield* Faulty.make()
      const listener = yield* faulty.transport.listen(tcp0)
      const dest = yield* Effect.forkScoped(Effect.provide(
        Migration.incoming(listener, { timeouts: { ...TIMEOUTS, handshake: "1 minute" } }),
        Logger.replace(Logger.defaultLogger, Logger.none)
      ))
      const port = listener.address._tag === "Tcp" ? listener.address.port : 0
      const queued = 8
      const strangers = MAX_CANDIDATES + queued
      const sockets: Array<Net.Socket> = []
      yield* Effect.addFinalizer(() => Effect.forEach(sockets, (socket) => Transport.destroy(socket), { discard: true }))
      // connected a hundred at a time (a burst of hundreds overflows the kernel's listen backlog: the rest come a
      // second or more later, as their SYNs are sent again)
      for (let from = 0; from < strangers; from += 100) {
        const batch = Array.from({ length: Math.min(100, strangers - from) }, () => {
          const socket = Net.connect({ host: "127.0.0.1", port })
          socket.on("error", () => {})
          socket.resume()
          sockets.push(socket)
          return socket
        })
        yield* noHang(
          Effect.forEach(batch, (socket) =>
            Effect.async<void>((resume) => {
              if (!socket.connecting) return resume(Effect.void)
              socket.once("connect", () => resume(Effect.void))
              socket.once("close", () => resume(Effect.void))
            }), { discard: true }),
          "the strangers connected"
        )
      }
      // (the faulty transport records the connections accepted, and no other)
      const accepted = () => faulty.records.length
      yield* noHang(faulty.until(() => accepted() >= MAX_CANDIDATES), "the strangers accepted")
      for (let i = 0; i < 20; i++) yield* nextTurn
      expect(accepted(), "strangers accepted at once").toBe(MAX_CANDIDATES)
      // the strangers leave: each candidate's place goes to a queued one, which is accepted (and leaves too)
      yield* Effect.forEach(sockets, (socket) => Transport.destroy(socket), { discard: true })
      yield* noHang(faulty.until(() => accepted() === strangers), "the queued strangers accepted")
      const ram = yield* sourceRam()
      yield* noHang(migrateTo(listener.address, ram), "migrate")
      const result = yield* noHang(Fiber.join(dest), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected).toHaveLength(257)
      expect(result.rejected[256]).toBe(`… and ${strangers - 256} more connections`)
    }))))

  const stalling = [
    { name: "the control magic, then nothing", bytes: () => [controlMagic()], listed: "timed out after 5s waiting for a complete hello" },
    { name: "a frame length, then nothing", bytes: () => [controlMagic(), frameLength(100)], listed: "timed out after 5s waiting for a complete hello" },
    { name: "the multifd magic and half an init packet, then nothing", bytes: () => [halfInit()], listed: "timed out after 5s waiting for a complete multifd init packet" },
    { name: "nothing at all", bytes: () => [], listed: "timed out after 5s waiting for the first bytes" }
  ]
  for (const s of stalling) {
    it.effect(`${s.name}: closed after the handshake timeout (TestClock), listed; a real source then succeeds`, () =>
      leakFree(Effect.gen(function*() {
        const dest = yield* startDestination({ timeouts: { ...TIMEOUTS, handshake: "5 seconds" } })
        const connection = yield* stranger(dest.address, s.bytes(), false)
        const closed = yield* Effect.fork(turnedAway(connection, "the stalled stranger closed"))
        const t0 = yield* TestClock.currentTimeMillis
        yield* advanceUntil(fiberDone(closed), "the handshake timeout")
        yield* Fiber.join(closed)
        expect((yield* TestClock.currentTimeMillis) - t0).toBeGreaterThanOrEqual(5_000)
        const result = yield* realSourceSucceeds(dest)
        expect(result.rejected).toHaveLength(1)
        expect(result.rejected[0]).toContain(s.listed)
      })))
  }

  it.effect("a candidate that trickles its first bytes gets one handshake deadline, not one per wait (TestClock)", () =>
    leakFree(Effect.gen(function*() {
      const faulty = yield* Faulty.make()
      const logs: Array<string> = []
      const listener = yield* faulty.transport.listen(tcp0)
      const dest = yield* Effect.forkScoped(Effect.provide(
        Migration.incoming(listener, { timeouts: { ...TIMEOUTS, handshake: "5 seconds" } }),
        Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => logs.push(String(message))))
      ))
      const t0 = yield* TestClock.currentTimeMillis
      const connection = yield* stranger(listener.address, [controlMagic().subarray(0, 2)], false)
      yield* noHang(faulty.until((f) => f.records.some((r) => r.side === "accept")), "the accept")
      for (let i = 0; i < 5; i++) yield* nextTurn
      // the rest of the magic 4 s later: the wait for the hello has 1 s left, not 5
      yield* advanceUntil(Effect.map(TestClock.currentTimeMillis, (now) => now - t0 >= 4_000), "4 s")
      yield* connection.write([controlMagic().subarray(2)])
      const closed = yield* Effect.fork(turnedAway(connection, "the trickling stranger closed"))
      yield* advanceUntil(fiberDone(closed), "the handshake deadline")
      yield* Fiber.join(closed)
      const elapsed = (yield* TestClock.currentTimeMillis) - t0
      expect(elapsed).toBeGreaterThanOrEqual(5_000)
      expect(elapsed).toBeLessThan(6_500)
      expect(logs).toEqual([expect.stringContaining("no valid hello: timed out after 5s waiting for a complete hello")])
      expect(dest.unsafePoll()).toBeNull()
    })))

  // the wait for the first bytes began when the TLS handshake ended, with a handshake timeout of its own: a candidate
  // that finished its handshake just in time then had as long again to send nothing, twice the deadline (the
  // README's "a complete hello or channel header within --timeout")
  it.effect("a TLS candidate gets one handshake deadline for its handshake and its hello, not one each (TestClock)", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* Tls.make({ psk: Path.join(import.meta.dirname, "fixtures", "tls", "keys.psk") })
      const faulty = yield* Faulty.make()
      const logs: Array<string> = []
      const listener = yield* faulty.transport.listen(tcp0)
      const dest = yield* Effect.forkScoped(Effect.provide(
        Migration.incoming(listener, { upgrade: tls.server, timeouts: { ...TIMEOUTS, handshake: "5 seconds" } }),
        Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => logs.push(String(message))))
      ))
      const t0 = yield* TestClock.currentTimeMillis
      const raw = yield* Transport.connect(listener.address)
      yield* noHang(faulty.until((f) => f.records.some((r) => r.side === "accept")), "the accept")
      for (let i = 0; i < 5; i++) yield* nextTurn
      // the handshake 4 s later: the wait for the hello has 1 s left, not 5
      yield* advanceUntil(Effect.map(TestClock.currentTimeMillis, (now) => now - t0 >= 4_000), "4 s")
      const connection = yield* noHang(tls.client("localhost")(raw, "main"), "the TLS handshake")
      const closed = yield* Effect.fork(turnedAway(connection, "the silent TLS candidate closed"))
      yield* advanceUntil(fiberDone(closed), "the handshake deadline")
      yield* Fiber.join(closed)
      const elapsed = (yield* TestClock.currentTimeMillis) - t0
      expect(elapsed).toBeGreaterThanOrEqual(5_000)
      expect(elapsed).toBeLessThan(6_500)
      expect(logs.filter((line) => line.includes("rejected"))).toEqual([
        expect.stringContaining("timed out after 5s waiting for the first bytes")
      ])
      expect(dest.unsafePoll()).toBeNull()
    })))

  it.live("several strangers at once, some still stalling: a real source succeeds meanwhile; all are closed", () =>
    leakFree(Effect.gen(function*() {
      const dest = yield* startDestination()
      const closers = yield* Effect.all([
        stranger(dest.address, [controlMagic()], true),
        stranger(dest.address, [controlMagic(), frameLength(0xffffffff)], false),
        stranger(dest.address, [controlMagic(), frameLength(9), Buffer.from("not json!")], false),
        stranger(dest.address, [halfInit()], true),
        stranger(dest.address, [halfInit(63)], true),
        stranger(dest.address, [Buffer.from("GET / HTTP/1.1\r\n\r\n")], false)
      ], { concurrency: "unbounded" })
      const stallers = yield* Effect.all([
        stranger(dest.address, [controlMagic()], false),
        stranger(dest.address, [controlMagic(), frameLength(100), Buffer.from("{")], false),
        stranger(dest.address, [halfInit()], false),
        stranger(dest.address, [], false)
      ], { concurrency: "unbounded" })
      yield* Effect.forEach(closers, (c, i) => turnedAway(c, `stranger ${i} turned away`), { concurrency: "unbounded" })
      // the stallers are still candidates (2 s handshake timeout): the real source does not wait for them
      const result = yield* realSourceSucceeds(dest)
      expect(result.rejected.length).toBeGreaterThanOrEqual(closers.length)
      // incoming closed the candidates still pending on its way out
      yield* Effect.forEach(stallers, (c, i) => turnedAway(c, `staller ${i} closed`), { concurrency: "unbounded" })
    })))

  it.live("400 strangers one after another: the first 256 listed with their reasons, the rest counted; a real source then succeeds", () =>
    leakFree(Effect.gen(function*() {
      const dest = yield* startDestination()
      for (let i = 0; i < 400; i += 50) {
        yield* Effect.scoped(Effect.gen(function*() {
          const batch = yield* Effect.all(
            Array.from({ length: 50 }, () => stranger(dest.address, [Buffer.from("GET / HTTP/1.1\r\n\r\n")], true)),
            { concurrency: "unbounded" }
          )
          yield* Effect.forEach(batch, (c) => turnedAway(c, `stranger ${i}`), { concurrency: "unbounded", discard: true })
        }))
      }
      const result = yield* realSourceSucceeds(dest)
      expect(result.rejected).toHaveLength(257)
      expect(result.rejected[0]).toContain("not a migration stream (first bytes 47455420)")
      expect(result.rejected[256]).toBe("… and 144 more connections")
      // the log says so once, not once a stranger
      expect(dest.logs.filter((line) => line.startsWith("rejected a connection"))).toHaveLength(256)
      expect(dest.logs.filter((line) => line.includes("counted, not listed"))).toHaveLength(1)
    })))

  it.live("a second complete hello during a migration is refused (\"a migration is already in progress\"), the migration goes on", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      // hold the source's first multifd connect so that the second hello arrives mid-migration
      const faulty = yield* Faulty.make({ stallConnect: (i) => i === 1 })
      const dest = yield* startDestination()
      const source = yield* Effect.forkScoped(migrateTo(dest.address, ram, {}, faulty.layer))
      yield* noHang(faulty.until((f) => f.attempts.some((a) => a.index === 1 && a.state === "stalled")), "the stall")
      const second = yield* stranger(dest.address, [controlMagic(), Control.encode(hello())], false)
      const answer = yield* noHang(Control.receive(second), "the answer to the second hello")
      expect(answer).toMatchObject({ _tag: "Reject", reason: "a migration is already in progress" })
      yield* turnedAway(second, "the second source closed")
      yield* faulty.release
      yield* noHang(Fiber.join(source), "migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected).toEqual([expect.stringContaining("a migration is already in progress")])
    })))

  it.effect("a complete init packet while no migration runs is turned away after the handshake timeout (TestClock)", () =>
    leakFree(Effect.gen(function*() {
      const dest = yield* startDestination({ timeouts: { ...TIMEOUTS, handshake: "5 seconds" } })
      const connection = yield* stranger(dest.address, [halfInit(64)], false)
      const closed = yield* Effect.fork(turnedAway(connection, "the early channel turned away"))
      yield* advanceUntil(fiberDone(closed), "the handshake timeout")
      yield* Fiber.join(closed)
      const result = yield* realSourceSucceeds(dest)
      expect(result.rejected).toEqual([
        expect.stringContaining("a multifd channel without a migration: timed out after 5s waiting for a migration to join")
      ])
    })))

  it.effect("strangers that send a complete init packet and then megabytes: each is read a little ahead, not megabytes of it held until its deadline (TestClock)", () =>
    leakFree(Effect.gen(function*() {
      // (each was read ahead to the connection's 8 MiB high-water mark while it waited for a migration to join,
      // and held until its handshake deadline: as many strangers as the open-files limit allows, 8 MiB each.) Over
      // a Unix socket the kernel holds a few hundred KiB: what a stranger could not hand over is still in its
      // own buffer, and the rest the destination took
      const path = tempSocketPath("flood")
      const faulty = yield* Faulty.make()
      const listener = yield* faulty.transport.listen({ _tag: "Unix", path })
      const dest = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: { ...TIMEOUTS, handshake: "5 seconds" } }))
      const flood = 4 * 1024 * 1024
      const strangers = 6
      const sockets = yield* Effect.acquireRelease(
        Effect.sync(() =>
          Array.from({ length: strangers }, () => {
            const socket = Net.connect({ path })
            socket.on("error", () => {})
            socket.write(halfInit(64))
            socket.write(Buffer.alloc(flood, 0xa5))
            return socket
          })
        ),
        (sockets) => Effect.forEach(sockets, (socket) => Transport.destroy(socket), { discard: true })
      )
      // every init packet read (each stranger waits for a migration to join), then until the strangers' writes
      // stop moving (the destination took what it takes): event-loop turns, no timer
      yield* noHang(
        faulty.until((f) => f.records.filter((r) => r.side === "accept" && r.role === 0).length === strangers),
        "the strangers' init packets read"
      )
      const unsent = () => sockets.map((socket) => socket.writableLength)
      yield* writesSettled(sockets)
      for (const [i, left] of unsent().entries()) {
        expect(flood + 64 - left, `stranger ${i}: bytes the destination and the kernel took`).toBeLessThan(1024 * 1024)
      }
      // then turned away at the deadline, as before; the destination goes on to a real migration
      const closed = allClosed(sockets)
      yield* advanceUntil(closed, "the handshake deadline")
      const ram = yield* sourceRam()
      yield* noHang(migrateTo(listener.address, ram), "migrate")
      const result = yield* noHang(Fiber.join(dest), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected).toHaveLength(sockets.length)
      for (const line of result.rejected) expect(line).toContain("a multifd channel without a migration: timed out after 5s")
    })))
})

/** Event-loop turns (no timer) until `sockets`' unsent bytes stop moving: the destination took what it takes. */
const writesSettled = (sockets: ReadonlyArray<Net.Socket>) =>
  noHang(
    Effect.gen(function*() {
      for (let still = 0, last = ""; still < 200;) {
        yield* nextTurn
        const now = sockets.map((socket) => socket.writableLength).join()
        still = now === last ? still + 1 : 0
        last = now
      }
    }),
    "the strangers' writes settle"
  )

/** Whether every one of `sockets` has closed (counted from now). */
const allClosed = (sockets: ReadonlyArray<Net.Socket>): Effect.Effect<boolean> => {
  const closed = Deferred.unsafeMake<void>(FiberId.none)
  let open = sockets.length
  for (const socket of sockets) {
    socket.once("close", () => {
      if (--open === 0) Deferred.unsafeDone(closed, Exit.void)
    })
  }
  return Deferred.isDone(closed)
}

describe("strangers that announce the largest hello", () => {
  it.effect("each sends all of a Control.MAX_FRAME hello but its last byte: a few are read at once, not a megabyte each held until its deadline (TestClock)", () =>
    leakFree(Effect.gen(function*() {
      // (each frame was read into a buffer of its announced length as it came, and held until the handshake
      // deadline: 300 such strangers made the destination hold 300 MiB, as many as the open-files limit let connect.)
      // Over a Unix socket the kernel holds a few hundred KiB: what a stranger could not hand over is still in its
      // own buffer
      const path = tempSocketPath("hellos")
      const faulty = yield* Faulty.make()
      const listener = yield* faulty.transport.listen({ _tag: "Unix", path })
      const dest = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: { ...TIMEOUTS, handshake: "5 seconds" } }))
      const strangers = 12
      const body = Buffer.alloc(Control.MAX_FRAME - 1, 0x20)
      const sockets = yield* Effect.acquireRelease(
        Effect.sync(() =>
          Array.from({ length: strangers }, () => {
            const socket = Net.connect({ path })
            socket.on("error", () => {})
            socket.write(Buffer.concat([controlMagic(), frameLength(Control.MAX_FRAME)]))
            socket.write(body)
            return socket
          })
        ),
        (sockets) => Effect.forEach(sockets, (socket) => Transport.destroy(socket), { discard: true })
      )
      // every stranger taken for a main channel, then until their writes stop moving: event-loop turns, no timer
      yield* noHang(
        faulty.until((f) => f.records.filter((r) => r.side === "accept" && r.role === "main").length === strangers),
        "the strangers' control magic read"
      )
      const unsent = () => sockets.map((socket) => socket.writableLength)
      yield* writesSettled(sockets)
      // the frames being read are the budget's: the others wait for room, their bytes in their senders' buffers
      const whole = unsent().filter((left) => left === 0).length
      expect(whole, "strangers whose whole frame the destination took").toBeLessThanOrEqual(HELLO_BUDGET / Control.MAX_FRAME)
      for (const [i, left] of unsent().entries()) {
        if (left > 0) expect(Control.MAX_FRAME + 7 - left, `stranger ${i}: bytes the destination and the kernel took`).toBeLessThan(Control.MAX_FRAME / 2)
      }
      // turned away at their deadline, each saying so; the destination goes on to a real migration
      const closed = allClosed(sockets)
      yield* advanceUntil(closed, "the handshake deadline")
      const ram = yield* sourceRam()
      yield* noHang(migrateTo(listener.address, ram), "migrate")
      const result = yield* noHang(Fiber.join(dest), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected).toHaveLength(strangers)
      for (const line of result.rejected) expect(line).toContain("no valid hello: timed out after 5s waiting for a complete hello")
    })))
})

describe("a source that reached something other than a multifd destination", () => {
  // an answer that is no control message was read as a frame's length: "main channel: bad control message: frame
  // of 1397966893 bytes exceeds 1048576", naming neither the peer nor what it was
  const others = [
    { name: "an SSH server (its banner)", answer: (socket: Net.Socket) => void socket.write("SSH-2.0-OpenSSH_9.6\r\n"), text: "\"SSH-\"" },
    {
      name: "an HTTP server (its answer)",
      answer: (socket: Net.Socket) => void socket.once("data", () => socket.end("HTTP/1.1 400 Bad Request\r\n\r\n")),
      text: "\"HTTP\""
    },
    { name: "a binary protocol", answer: (socket: Net.Socket) => void socket.write(Buffer.from([0xde, 0xad, 0xbe, 0xef])), text: "" }
  ]
  for (const other of others) {
    it.scopedLive(`${other.name}: Rejected, naming the address, not a multifd destination`, () =>
      Effect.gen(function*() {
        const { address } = yield* loopbackServer((socket) => other.answer(socket))
        const error = failureOf(yield* Effect.exit(noHang(migrateTo(address, yield* sourceRam()), "the source")))
        expect(error).toMatchObject({ _tag: "MigrationError", reason: "Rejected" })
        expectOneLine(error)
        expect(error.message).toMatch(
          new RegExp(`^${Transport.formatAddress(address)} is not a multifd destination: its answer is no control message \\(`)
        )
        expect(error.message).toContain(other.text)
      }))
  }

  it.effect("a server that says nothing: the source times out after its peer timeout, naming the address (TestClock)", () =>
    leakFree(Effect.gen(function*() {
      const { address } = yield* loopbackServer(() => {})
      const source = yield* Effect.fork(migrateTo(address, yield* sourceRam()))
      yield* advanceUntil(fiberDone(source), "the source's timeout")
      const error = failureOf(yield* Fiber.await(source))
      expect(error).toMatchObject({ _tag: "MigrationError", reason: "Timeout" })
      expect(error.message).toBe(
        `timed out after 2s waiting for the destination (${Transport.formatAddress(address)}) to accept the migration`
      )
    })))
})

describe("a peer's words are shown, never acted on", () => {
  // escapes that would retitle the terminal and colour it, a carriage return, a bidi override, and 5000 more
  const hostile = "evil \x1b]0;pwned\x07 \x1b[31mRED\r\u202eyes\x9b" + "y".repeat(5000)
  const expectTamed = (message: string) => {
    expect(message).toContain("evil \\u001b]0;pwned\\u0007 \\u001b[31mRED\\u000d\\u202eyes\\u009b")
    expect(message).not.toMatch(/[\u0000-\u001f\u007f-\u009f\u202e]/)
    expect(message).toMatch(/… \(\d+ more characters\)$/)
    expect(message.length).toBeLessThan(600)
  }

  it.scopedLive("a destination's refusal: its reason escaped and cut short in the source's error", () =>
    Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      yield* Effect.forkScoped(Effect.scoped(Effect.gen(function*() {
        const control = yield* listener.accept
        yield* control.read(4)
        yield* Control.receive(control)
        yield* Control.send(control, new Control.Reject({ reason: hostile }))
        yield* Effect.never
      })).pipe(Effect.ignore))
      const error = failureOf(yield* Effect.exit(migrateTo(listener.address, yield* sourceRam())))
      expect(error).toMatchObject({ _tag: "MigrationError", reason: "Rejected" })
      expectTamed(error.message)
    }))

  it.scopedLive("a source's block names, quoted back in a refusal, are escaped too", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: GuestRam.allocate(16 * PAGE) }] })
      const dest = yield* startDestination({ ram })
      const hostileHello = new Control.Hello({ ...smallHello(), blocks: [{ name: "r\x1b[2J\u202eam", size: 16 * PAGE }] })
      const connection = yield* stranger(dest.address, [controlMagic(), Control.encode(hostileHello)], false)
      const answer = yield* noHang(Control.receive(connection), "the refusal")
      expect(answer).toMatchObject({ _tag: "Reject" })
      const reason = (answer as Control.Reject).reason
      expect(reason).toContain("block layout [r\\u001b[2J\\u202eam=65536] differs from the destination's [mem=65536]")
      expect(reason).not.toMatch(/[\u0000-\u001f\u202e]/)
    }))

  it.scopedLive("a destination's abort: the same", () =>
    Effect.gen(function*() {
      const address = yield* fakeDestination({
        onFlush: (control) => Effect.zipRight(Control.send(control, new Control.Abort({ reason: hostile })), Effect.never)
      })
      const error = failureOf(yield* Effect.exit(migrateTo(address, yield* sourceRam())))
      expect(error).toMatchObject({ _tag: "MigrationError", reason: "Aborted" })
      expectTamed(error.message)
    }))

  const enormous = [
    { what: "a uuid", hello: () => new Control.Hello({ ...smallHello(), uuid: "u\x9b\u202e" + "u".repeat(400_000) }) },
    {
      what: "a block name",
      hello: () => new Control.Hello({ ...smallHello(), blocks: [{ name: "n\x9b\u202e" + "n".repeat(400_000), size: 16 * PAGE }] })
    }
  ]
  for (const { hello, what } of enormous) {
    it.scopedLive(`${what} of 400 000 characters in a hello: quoted cut short and escaped, in the refusal and the destination's error`, () =>
      Effect.gen(function*() {
        // (both quoted it whole: a refusal, and an error line, of up to a control frame's megabyte)
        const dest = yield* startDestination()
        const connection = yield* stranger(dest.address, [controlMagic(), Control.encode(hello())], false)
        const answer = yield* noHang(Control.receive(connection), "the refusal")
        expect(answer).toMatchObject({ _tag: "Reject" })
        const error = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming"))
        expect(error).toMatchObject({ _tag: "MigrationError", reason: "Rejected" })
        for (const message of [(answer as Control.Reject).reason, error.message]) {
          expect(message).toContain("\\u009b\\u202e")
          expect(message).toContain(" more characters)")
          expect(message).not.toMatch(/[\u0000-\u001f\u007f-\u009f\u202e]/)
          expect(message.length).toBeLessThan(600)
        }
      }))
  }
})

describe("a control frame a peer made to hurt", () => {
  const frame = (json: string) => Buffer.from(json, "utf8")
  const badMessage = (json: string) => {
    const error = Either.getLeft(Control.decode(frame(json))).pipe(Option.getOrThrow)
    expect(error).toMatchObject({ _tag: "ProtocolError", reason: "BadMessage" })
    expect(error.message).not.toMatch(/[\u0000-\u001f\u007f-\u009f\u202e]/)
    expect(error.message.length).toBeLessThan(500)
    return error.message
  }

  it("deep nesting, a huge value, a body that is not JSON: a typed error on one short line (the nesting overflowed the stack)", () => {
    const deep = (n: number) => `{"_tag":"FlushAck","round":${"[".repeat(n)}${"]".repeat(n)}}`
    expect(badMessage(deep(3000))).toContain("nested more than 16 levels deep")
    expect(badMessage(`{"_tag":"Hello","version":${"{\"a\":".repeat(2500)}1${"}".repeat(2500)}}`)).toContain("nested more than 16")
    expect(badMessage(deep(10))).toContain("FlushAck")
    expect(badMessage(`{"_tag":"Reject","reason":${JSON.stringify(["x".repeat(1_000_000)])}}`)).toMatch(/more characters\)$/)
    expect(badMessage("{\"_tag\": \n\u001b[2J")).toContain("not JSON")
    expect(badMessage(`{"_tag":"Abort","reason":7,"x":"\u0085\u202e"}`)).toContain("Abort")
    expect(badMessage(JSON.stringify({ _tag: `\u001b]0;x\u0007${"y".repeat(2000)}` }))).toMatch(/^main channel: bad control message: unknown message "\\u001b\]0;x\\u0007y+… \(\d+ more characters\)/)
  })

  it("the errors that quote a peer's bytes (a packet's block name, a file's) show them escaped", () => {
    const hostile = "mem\u0085\u202e\x1b[2J\n"
    const protocol = new Protocol.ProtocolError({ reason: "UnknownBlock", channel: 1, field: "ramblock", detail: `no block named "${hostile}"` })
    expect(protocol.message).toBe(`multifd channel 1: bad ramblock: no block named "mem\\u0085\\u202e\\u001b[2J\\u000a"`)
    const snapshot = new Snapshot.SnapshotError({ reason: "Corrupt", path: "/s", detail: `block "${hostile}"` })
    expect(snapshot.message).toBe(`snapshot /s: block "mem\\u0085\\u202e\\u001b[2J\\u000a"`)
  })

  it.live("a stranger sending one: turned away and listed; the destination goes on to a real migration", () =>
    leakFree(Effect.gen(function*() {
      const dest = yield* startDestination()
      const body = frame(`{"_tag":"FlushAck","round":${"[".repeat(3000)}${"]".repeat(3000)}}`)
      const length = Buffer.alloc(4)
      length.writeUInt32BE(body.length)
      const connection = yield* stranger(dest.address, [controlMagic(), length, body], false)
      yield* turnedAway(connection, "the stranger turned away")
      const result = yield* realSourceSucceeds(dest)
      expect(result.rejected).toEqual([expect.stringContaining("nested more than 16 levels deep")])
    })))
})

describe("a destination's answer out of turn", () => {
  it.scopedLive("a FlushAck for another round names both rounds", () =>
    Effect.gen(function*() {
      const address = yield* fakeDestination({
        onFlush: (control) => Effect.zipRight(Control.send(control, new Control.FlushAck({ round: 7 })), Effect.never)
      })
      const error = failureOf(yield* Effect.exit(migrateTo(address, yield* sourceRam())))
      expect(error).toMatchObject({ _tag: "MigrationError", reason: "Unexpected" })
      expect(error.message).toContain("unexpected FlushAck message for round 7 instead of round 0")
    }))

  for (const [what, lost] of [
    ["a channel the source does not have", new Control.Lost({ channel: 7 })],
    ["a connection the source never made (a nonce it never announced)", new Control.Lost({ channel: 0, nonce: "ab".repeat(16) })]
  ] as const) {
    it.scopedLive(`a Lost about ${what} is out of turn, not kept`, () =>
      Effect.gen(function*() {
        // (each was kept, by channel and nonce, for a wait that would never come: without bound)
        const address = yield* fakeDestination({ onFlush: (control) => Control.send(control, lost) })
        const error = failureOf(yield* Effect.exit(migrateTo(address, yield* sourceRam(), { reconnect: { attempts: 2, within: "5 seconds" } })))
        expect(error).toMatchObject({ _tag: "MigrationError", reason: "Unexpected" })
        expect(error.message).toContain("unexpected Lost message instead of FlushAck for round 0")
      }))
  }
})

describe("a listener that serves one migration after another", () => {
  it.live("the next source, connecting right after the previous one's Done, is the next migration's, not closed with the last", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const ram = yield* sourceRam()
      // the destination takes migrations one after another on the same listener; each source starts the
      // moment the one before it succeeded (its Done arrived), while that destination is still closing
      const destination = yield* Effect.fork(Effect.forEach(
        [1, 2, 3, 4, 5],
        () => Migration.incoming(listener, { timeouts: TIMEOUTS }),
        { discard: false }
      ))
      for (let i = 0; i < 5; i++) {
        yield* Migration.migrate({ address: listener.address, channels: 4, timeouts: TIMEOUTS }).pipe(
          Effect.provideService(GuestRam.GuestRam, ram)
        )
      }
      const received = yield* noHang(Fiber.join(destination), "five migrations")
      for (const incoming of received) expect(sameMemory(incoming.ram, ram)).toBe(true)
    })).pipe(Effect.provide(Transport.layer))))

  it.live("listenAndReceive's listener is its migration's alone: a source that comes once every channel is in is refused at once", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const bound = yield* Deferred.make<Transport.Address>()
      const storing = yield* Deferred.make<void>()
      const release = yield* Deferred.make<void>()
      // the first migration holds in its store step: every channel adopted (incoming stopped accepting there)
      const destination = yield* Effect.fork(Migration.listenAndReceive(tcp0, {
        timeouts: TIMEOUTS,
        onListening: (address) => Deferred.succeed(bound, address),
        store: () => Effect.zipRight(Deferred.succeed(storing, undefined), Deferred.await(release))
      }))
      const address = yield* Deferred.await(bound)
      const first = yield* Effect.fork(migrateTo(address, ram, { timeouts: { ...TIMEOUTS, peer: "30 seconds" } }))
      yield* noHang(Deferred.await(storing), "the first migration's store step")
      // before, it waited in the listener's queue until its own timeout ("waiting for the destination to accept")
      // another memory: a second migration of the first's memory is refused by the source itself (Busy)
      const second = failureOf(yield* noHang(Effect.exit(migrateTo(address, yield* sourceRam(), { timeouts: { ...TIMEOUTS, peer: "30 seconds", handshake: "30 seconds" } })), "the second source", 10))
      expect(second).toMatchObject({ _tag: "MigrationError", reason: "Rejected" })
      expect(second.message).toContain("the destination refused the migration: a migration is already in progress")
      yield* Deferred.succeed(release, undefined)
      yield* noHang(Fiber.join(first), "the first migration")
      const received = yield* noHang(Fiber.join(destination), "listenAndReceive")
      expect(sameMemory(received.ram, ram)).toBe(true)
      expect(received.rejected).toEqual([expect.stringContaining("a migration is already in progress")])
    })).pipe(Effect.provide(Transport.layer))))
})

describe("a listener that serves one migration after another: a lost channel meanwhile", () => {
  /**
   * A source that connects while a migration runs waits in the listener's queue for the next `incoming` (the first
   * stops accepting once it has every channel). A channel of the running migration that was lost and re-attached
   * had its acceptor accept again, for the channel's new connection: it took the waiting source's main channel
   * first (connections are accepted in order) and refused it, "a migration is already in progress", and that source
   * failed instead of being the next migration.
   */
  it.live("a channel re-attaching does not take the next source from the listener's queue: it is the next migration", () =>
    leakFree(Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const status = yield* MigrationStatus.make
      const slow = { ...TIMEOUTS, peer: "30 seconds", handshake: "30 seconds" } as const
      const first = yield* Effect.fork(Migration.incoming(listener, { timeouts: slow, status }))
      const fake = yield* fakeSource(listener.address, 1, "none", true, { reconnectMs: 30_000 })
      const uuid = Protocol.parseUuid(fake.uuid)!
      yield* fake.channel(0)
      // every channel in: the first accepts no more
      yield* noHang(Stream.runHead(Stream.filter(status.changes, (s) => s.status === "active")), "the first migration active")
      // the next source, waiting in the listener's queue (its hello sent) for the next incoming
      const faulty = yield* Faulty.make()
      const ram = yield* sourceRam()
      const second = yield* Effect.fork(migrateTo(listener.address, ram, { timeouts: slow }, faulty.layer))
      yield* noHang(
        faulty.until((f) => f.records.some((r) => r.side === "connect" && r.role === "main" && r.bytesWritten > 4)),
        "the second source's hello"
      )
      // the first migration's channel 0 is lost and re-attached
      const nonce = Crypto.randomBytes(16)
      yield* fake.control.write([Control.encode(new Control.Reattach({ channel: 0, nonce: nonce.toString("hex") }))])
      while ((yield* Control.receive(fake.control))._tag !== "Reattached") {
        // (heartbeats)
      }
      const again = yield* Transport.connect(listener.address)
      yield* again.write([Protocol.encodeInit({ uuid, id: 0, nonce })])
      // its new connection adopted (a SYNC packet on it counted): the acceptor has taken what it took
      yield* again.write([syncPacket()])
      yield* noHang(Effect.gen(function*() {
        while ((yield* status.get).rounds < 1) yield* nextTurn
      }), "the new connection's SYNC packet")
      yield* Fiber.interrupt(first)
      // the next incoming on the listener: the second source's migration
      const [received] = yield* noHang(
        Effect.all([Migration.incoming(listener, { timeouts: slow }), Fiber.join(second)], { concurrency: "unbounded" }),
        "the next migration"
      )
      expect(sameMemory(received.ram, ram)).toBe(true)
    })).pipe(Effect.provide(Transport.layer))))
})

describe("a source that floods its control channel", () => {
  it.live("Reattach after Reattach for one channel: one new connection awaited for the channel at a time, not one more per message", () =>
    leakFree(Effect.gen(function*() {
      const supervisor = yield* Supervisor.track
      const listener = yield* Transport.listen(tcp0)
      const fiber = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS }).pipe(
        Effect.supervised(supervisor),
        Effect.provide(Logger.remove(Logger.defaultLogger))
      ))
      // a source whose lost channels keep their place for an hour: each Reattach had the destination accept
      // for the channel's new connection that long, beside every earlier one's wait (a fiber or more each)
      const source = yield* fakeSource(listener.address, 1, "none", true, { reconnectMs: 3_600_000 })
      yield* source.channel(0)
      const reattach = (n: number) =>
        Effect.gen(function*() {
          const frames = Array.from({ length: n }, () =>
            Control.encode(new Control.Reattach({ channel: 0, nonce: Crypto.randomBytes(16).toString("hex") })))
          yield* source.control.write(frames)
          for (let heard = 0; heard < n;) {
            const message = yield* Control.receive(source.control)
            if (message._tag === "Reattached") heard++
          }
        })
      yield* noHang(reattach(1), "the first Reattached")
      const before = (yield* supervisor.value).length
      yield* noHang(reattach(300), "300 Reattached")
      const after = (yield* supervisor.value).length
      expect(after - before).toBeLessThan(30)
      expect(Option.isNone(yield* Fiber.poll(fiber))).toBe(true)
    })))
})

describe("a peer that floods the control channel while the other side waits for something else", () => {
  /** A listener whose connections count the bytes the destination consumed with `read`. */
  const counting = (listener: Transport.Listener) => {
    let consumed = 0
    const wrapped: Transport.Listener = {
      ...listener,
      accept: Effect.map(listener.accept, (connection): Transport.Connection => ({
        ...connection,
        read: (n) => Effect.tap(connection.read(n), (bytes) => Effect.sync(() => (consumed += bytes.length)))
      }))
    }
    return { listener: wrapped, consumed: () => consumed }
  }
  /** Waits until `count` has not changed for `quiet` event-loop turns in a row; its value then. */
  const plateau = (count: () => number, quiet = 200) =>
    Effect.gen(function*() {
      let last = -1
      let still = 0
      while (still < quiet) {
        yield* nextTurn
        const now = count()
        still = now === last ? still + 1 : 0
        last = now
      }
      return last
    })

  it.live("the destination at a round's barrier, the source sending Flush after Flush: it stops reading them (backpressure), not keeps each", () =>
    leakFree(Effect.gen(function*() {
      const raw = yield* Transport.listen(tcp0)
      const { consumed, listener } = counting(raw)
      yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: { ...TIMEOUTS, peer: "60 seconds" } }).pipe(
        Effect.provide(Logger.remove(Logger.defaultLogger))
      ))
      // one channel never connects: the first Flush holds the destination at the barrier; 16 MiB of them follow
      const source = yield* fakeSource(raw.address, 1, "none", true)
      const flush = Control.encode(new Control.Flush({ round: 0, final: false }))
      const flood = Buffer.concat(Array.from({ length: Math.ceil(16 * 1024 * 1024 / flush.length) }, () => flush))
      yield* Effect.forkScoped(Effect.ignore(source.control.write([flush, flood])))
      // (each one read was kept as a message in the destination's queues, never taken: some three times its
      // bytes of heap, for as long as the source went on)
      const read = yield* noHang(plateau(consumed), "the destination's reading to settle", 30)
      expect(read).toBeLessThan(1024 * 1024)
    })))

  it.effect("the source sending flush after flush and reading no answer: the destination's write gives up after the peer timeout (TestClock)", () =>
    leakFree(Effect.gen(function*() {
      // (once the source's buffers and this side's were full of FlushAcks, some 100 000 rounds on, the write of the
      // next waited for the source to read, for ever: no watch covered it.) Here a connection that takes the
      // destination's first write (Accept) and then nothing, as a full one does
      const raw = yield* Transport.listen(tcp0)
      const released = yield* Deferred.make<void>()
      const listener: Transport.Listener = {
        ...raw,
        accept: Effect.map(raw.accept, (connection): Transport.Connection => {
          let writes = 0
          return { ...connection, write: (chunks) => ++writes === 1 ? connection.write(chunks) : Deferred.await(released) }
        })
      }
      const dest = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: { ...TIMEOUTS, peer: "5 seconds" } }))
      // the test's end lets the held writes go (the destination's Abort on its way out among them)
      yield* Effect.addFinalizer(() => Deferred.succeed(released, undefined))
      const source = yield* fakeSource(raw.address, 1)
      const channel = yield* source.channel(0)
      yield* channel.write([syncPacket()])
      yield* source.control.write([Control.encode(new Control.Flush({ round: 0, final: false }))])
      yield* advanceUntil(fiberDone(dest), "the destination's end")
      const error = failureOf(yield* Fiber.await(dest))
      expect(error).toMatchObject({ _tag: "MigrationError", reason: "Timeout" })
      expect(error.message).toBe("timed out after 5s waiting for the source to read the main channel (to tell it FlushAck)")
    })))

  it.live("the source in the middle of a round, the destination sending Hashing after Hashing: it stops reading them, not keeps each", () =>
    leakFree(Effect.gen(function*() {
      // the source's main channel (its first connect) counts what the source consumed of it
      let consumed = 0
      let connects = 0
      const transport = Layer.succeed(Transport.Transport, {
        listen: Transport.listen,
        connect: (address, options) =>
          Effect.map(Transport.connect(address, options), (connection): Transport.Connection =>
            connects++ > 0 ? connection : {
              ...connection,
              read: (n) => Effect.tap(connection.read(n), (bytes) => Effect.sync(() => (consumed += bytes.length)))
            })
      })
      // a destination that accepts, takes the channels' connections but never reads them (round 0 cannot end),
      // and sends 16 MiB of Hashing meanwhile
      const listener = yield* Transport.listen(tcp0)
      yield* Effect.forkScoped(Effect.ignore(Effect.gen(function*() {
        const control = yield* listener.accept
        yield* control.read(4)
        const hello = (yield* Control.receive(control)) as Control.Hello
        yield* Control.send(control, new Control.Accept({ heartbeats: true }))
        for (let i = 0; i < hello.channels; i++) yield* listener.accept
        const hashing = Control.encode(new Control.Hashing())
        yield* control.write([Buffer.concat(Array.from({ length: Math.ceil(16 * 1024 * 1024 / hashing.length) }, () => hashing))])
        yield* Effect.never
      })))
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(16384, 0.7, PAGE) }] })
      yield* Effect.forkScoped(migrateTo(listener.address, ram, { channels: 1, timeouts: { ...TIMEOUTS, peer: "60 seconds" } }, transport))
      const read = yield* noHang(plateau(() => consumed), "the source's reading to settle", 30)
      expect(read).toBeLessThan(1024 * 1024)
    })))
})

describe("the destination's admit", () => {
  /**
   * An admit that throws (a free-space check whose statfs failed) ended the destination with that defect without a
   * word to the source, which failed Rejected with "the destination closed the main channel before answering ...
   * it may use TLS (this source does not), or not be a multifd destination". It is refused saying why now.
   */
  it.live("that throws: the source is refused saying why; incoming ends with the defect", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const bug = new Error("statfs /srv/images: EACCES")
      const dest = yield* startDestination({
        admit: () => {
          throw bug
        }
      })
      const error = failureOf(yield* noHang(Effect.exit(migrateTo(dest.address, ram)), "migrate"))
      expect((error as MigrationError.MigrationError).reason).toBe("Rejected")
      expect(error.message).toBe("the destination refused the migration: its admit check failed: statfs /srv/images: EACCES")
      const destExit = yield* noHang(Fiber.await(dest.fiber), "incoming")
      expect(Exit.isFailure(destExit) && (Cause.squash(destExit.cause) as Error).message).toBe(bug.message)
    })))
})
