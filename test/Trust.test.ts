/**
 * Issue 11, "Trust" (DESIGN §2.8), at the library level over real loopback sockets:
 *
 * - success is durable: a destination's `store` step runs after the digests matched and before `Done`; the
 *   source succeeds only after it, fails with the destination's reason when it fails, and is kept waiting
 *   (not timed out) while a long store runs — yet times out when the destination falls silent.
 *
 * Nothing waits on a timer to let things settle: waits are on Deferreds, fibers, recorded events or
 * event-loop turns; `noHang` guards (real timers) only turn a hang into a failure.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Data from "effect/Data"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as Option from "effect/Option"
import * as Ref from "effect/Ref"
import type * as Scope from "effect/Scope"
import * as TestClock from "effect/TestClock"
import * as Crypto from "node:crypto"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as Transport from "../src/Transport.js"
import * as Faulty from "./support/faultyTransport.js"
import { expectNoLeaks, nextTurn } from "./support/handles.js"
import { mixedImage } from "./support/images.js"

// ---------------------------------------------------------------------------------------------------------
// helpers

const PAGE = 4096
const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

type Ram = GuestRam.GuestRam["Type"]

const leakFree = <A, E>(body: Effect.Effect<A, E, Scope.Scope>) => expectNoLeaks(Effect.scoped(body))

/** A guard with a real timer (it also guards tests that move the TestClock): fail instead of hanging. */
const noHang = <A, E, R>(self: Effect.Effect<A, E, R>, what: string, seconds = 10): Effect.Effect<A, E | Error, R> =>
  Effect.raceFirst(
    self,
    Effect.async<never, Error>((resume) => {
      const timer = setTimeout(() => resume(Effect.fail(new Error(`hung: ${what}`))), seconds * 1000)
      return Effect.sync(() => clearTimeout(timer))
    })
  )

/** 1 MiB + 256 KiB of mixed random and zero pages. */
const sourceRam = () =>
  GuestRam.make({
    blocks: [{ name: "pc.ram", bytes: mixedImage(256, 0.7, PAGE) }, { name: "vga.vram", bytes: mixedImage(64, 0.7, PAGE) }]
  })

const sameMemory = (a: Ram, b: Ram) =>
  a.blocks.length === b.blocks.length && a.blocks.every((block, i) => block.bytes.equals(b.blocks[i]!.bytes))

const failureOf = <A, E>(exit: Exit.Exit<A, E>): E => {
  if (Exit.isSuccess(exit)) throw new Error("expected a failure, got success")
  const failure = Cause.failureOption(exit.cause)
  if (Option.isNone(failure)) throw new Error(`expected a failure, got ${Cause.pretty(exit.cause)}`)
  return failure.value
}

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

/** The control magic, as a source's first bytes. */
const controlMagic = () => {
  const magic = Buffer.alloc(4)
  magic.writeUInt32BE(Control.MAGIC, 0)
  return magic
}

/** A valid hello of a small migration. */
const hello = () =>
  new Control.Hello({
    version: Control.VERSION,
    uuid: Crypto.randomUUID(),
    pageSize: PAGE,
    channels: 1,
    compression: "none",
    zeroPage: "multifd",
    blocks: [{ name: "ram", size: 16 * PAGE }]
  })

/** Moves the TestClock a tenth of a second per event-loop turn until `done` holds (a real-time guard bounds it). */
const advanceUntil = (done: Effect.Effect<boolean>, what: string) => {
  const step: Effect.Effect<void> = Effect.flatMap(done, (isDone) =>
    isDone ? Effect.void : Effect.zipRight(Effect.zipRight(TestClock.adjust("100 millis"), nextTurn), step))
  return noHang(step, what)
}

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
      const listener = yield* Transport.listen(tcp0)
      const storing = yield* Deferred.make<void>()
      // a fake destination: accepts, acknowledges every flush, says Storing once after Complete, then nothing
      const drain = (connection: Transport.Connection): Effect.Effect<void> =>
        Effect.forever(connection.read(64)).pipe(Effect.ignore)
      const fake = Effect.gen(function*() {
        const control = yield* listener.accept
        yield* control.read(4)
        const first = yield* Control.receive(control)
        yield* Control.send(control, new Control.Accept())
        for (let i = 0; i < (first as Control.Hello).channels; i++) yield* Effect.forkScoped(drain(yield* listener.accept))
        while (true) {
          const message = yield* Control.receive(control)
          if (message._tag === "Flush") yield* Control.send(control, new Control.FlushAck({ round: message.round }))
          if (message._tag === "Complete") {
            yield* Control.send(control, new Control.Storing())
            yield* Deferred.succeed(storing, undefined)
          }
        }
      }).pipe(Effect.ignore, Effect.scoped)
      yield* Effect.forkScoped(fake)
      const source = yield* Effect.forkScoped(migrateTo(listener.address, ram, { channels: 1 }))
      yield* noHang(Deferred.await(storing), "the Storing message")
      const t0 = yield* TestClock.currentTimeMillis
      yield* advanceUntil(fiberDone(source), "the source timing out")
      const error = failureOf(yield* Fiber.await(source))
      expect((error as MigrationError.MigrationError).reason).toBe("Timeout")
      expect(error.message).toBe("timed out after 2s waiting for the destination to store the image")
      expect((yield* TestClock.currentTimeMillis) - t0).toBeLessThanOrEqual(2_500)
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
