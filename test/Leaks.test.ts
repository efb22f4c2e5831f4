/**
 * Nothing is left open after a failure (DESIGN §2.6), checked wider than the socket count of `handles.ts`: every
 * descriptor (files, pipes, a worker thread's event fds), every kind of active resource (timers included), the
 * channel threads running and what they hold (sessions, sockets, timers, zstd contexts), and the entries of the
 * directories a migration writes (`leakProbe.ts`). Over real loopback sockets:
 *
 * - a source, on the channel threads or in this thread, whose destination stops answering, goes away, or aborts
 *   at each step (hello, transfer, flush, complete), and a source interrupted there;
 * - a destination decoding on the channel threads, interrupted or left by its source mid-transfer or while it
 *   stores;
 * - a hundred small migrations on one long-lived pool, every other one failing: descriptors, threads and memory
 *   do not grow.
 */
import { describe, expect, it, layer } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import type * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Path from "node:path"
import * as V8 from "node:v8"
import * as Vm from "node:vm"
import { inject } from "vitest"
import * as ChannelThreads from "../src/ChannelThreads.js"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { noHang } from "./support/guards.js"
import { expectNothingLeft, type ProbeOptions } from "./support/leakProbe.js"
import { sameMemory } from "./support/memory.js"

const PAGE = 4096
const TIMEOUTS = { connect: "10 seconds", handshake: "10 seconds", peer: "10 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

/** The bundled threads' module (beside the tests' CLI bundle). */
const MODULE = Path.join(Path.dirname(inject("cliBundle")), "channelWorker.js")
const POOL: ChannelThreads.Options = { maxThreads: 2, module: MODULE }

/** `it.live` outside a layer; in one (`excludeTestServices`), `it.effect`, which provides the layer. */
type Run<R = never> = (name: string, self: () => Effect.Effect<void, unknown, R>, timeout?: number) => void

type Ram = GuestRam.GuestRam["Type"]

/** Memory of `pages` pages, a share random, the rest zero: shared (the threads read it in place) or not. */
const block = (pages: number, shared: boolean, randomShare = 0.6): Buffer => {
  const bytes = shared ? GuestRam.allocate(pages * PAGE) : Buffer.alloc(pages * PAGE)
  for (let p = 0; p < pages; p++) if (Math.random() < randomShare) Crypto.randomFillSync(bytes, p * PAGE, PAGE)
  return bytes
}

const ramOf = (pages: number, shared: boolean) =>
  GuestRam.make({ blocks: [{ name: "pc.ram", bytes: block(pages, shared) }] })

const migrate = (ram: Ram, options: Migration.MigrateOptions) =>
  Migration.migrate({ timeouts: TIMEOUTS, ...options }).pipe(
    Effect.provide(Transport.layer),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

/** Runs `body` in a scope and proves, once it closed, that nothing is left (the pool's threads included). */
const nothingLeft = <A, E, R>(body: Effect.Effect<A, E, R | Scope.Scope>, options: ProbeOptions = {}) =>
  Effect.flatMap(Effect.serviceOption(ChannelThreads.ChannelThreads), (pool) =>
    expectNothingLeft(Effect.scoped(body), {
      ...options,
      ...(pool._tag === "Some" ? { pool: pool.value } : {})
    }))

// ---------------------------------------------------------------------------------------------------------
// A destination that stops at a step

type Step = "hello" | "transfer" | "flush" | "complete"
type Act = "silent" | "gone" | "abort"

/**
 * A destination of our own on a real listener: takes the hello, accepts, drains the channels, acks flushes and
 * answers Complete with Done — until `step`, where it signals `reached` and then does `act`: nothing more
 * (`silent`: the test interrupts the source), closes every connection (`gone`), or sends Abort (`abort`).
 * `transfer` is reached once the channels brought 256 KiB (then they are no longer read).
 */
const stoppingDestination = (step: Step, act: Act) =>
  Effect.gen(function*() {
    const listener = yield* Transport.listen(tcp0)
    const reached = yield* Deferred.make<void>()
    const stop = (control: Transport.Connection, others: ReadonlyArray<Transport.Connection>) =>
      Effect.gen(function*() {
        yield* Deferred.succeed(reached, undefined)
        if (act === "silent") return yield* Effect.never
        if (act === "abort") {
          yield* Control.send(control, new Control.Abort({ reason: `fake destination stops at ${step}` }))
          return yield* Effect.never
        }
        for (const c of [control, ...others]) c.stream.destroy()
        return yield* Effect.never
      })
    const fake = Effect.gen(function*() {
      const control = yield* listener.accept
      yield* control.read(4)
      const hello = (yield* Control.receive(control)) as Control.Hello
      if (step === "hello") return yield* stop(control, [])
      yield* Control.send(control, new Control.Accept({}))
      const channels: Array<Transport.Connection> = []
      let got = 0
      const transferReached = yield* Deferred.make<void>()
      for (let i = 0; i < hello.channels; i++) {
        const channel = yield* listener.accept
        channels.push(channel)
        yield* Effect.forkScoped(Effect.gen(function*() {
          while (true) {
            if (step === "transfer" && got >= 256 * 1024) {
              yield* Deferred.succeed(transferReached, undefined)
              return yield* Effect.never
            }
            const chunk = yield* channel.read(64 * 1024)
            got += chunk.length
          }
        }).pipe(Effect.ignore))
      }
      if (step === "transfer") {
        yield* Deferred.await(transferReached)
        return yield* stop(control, channels)
      }
      while (true) {
        const message = yield* Control.receive(control)
        if (message._tag === "Flush") {
          if (step === "flush") return yield* stop(control, channels)
          yield* Control.send(control, new Control.FlushAck({ round: message.round }))
        }
        if (message._tag === "Complete") {
          if (step === "complete") return yield* stop(control, channels)
          yield* Control.send(control, new Control.Done())
        }
      }
    }).pipe(Effect.ignore, Effect.scoped)
    yield* Effect.forkScoped(fake)
    return { address: listener.address, reached: Deferred.await(reached) }
  })

const steps: ReadonlyArray<Step> = ["hello", "transfer", "flush", "complete"]
const acts: ReadonlyArray<Act> = ["silent", "gone", "abort"]

const sourceStops = (run: Run, shared: boolean) => {
  for (const step of steps) {
    for (const act of acts) {
      const what = act === "silent" ? "the source is interrupted" : act === "gone" ? "the destination goes away" : "the destination aborts"
      run(`at ${step}, ${what}: the source ends and leaves nothing${shared ? " (channels on the threads)" : ""}`, () =>
        nothingLeft(Effect.gen(function*() {
          const ram = yield* ramOf(512, shared)
          const dest = yield* stoppingDestination(step, act)
          const source = yield* Effect.forkScoped(
            migrate(ram, { address: dest.address, channels: 3, compression: "zstd", reconnect: 0 })
          )
          yield* noHang(Effect.raceFirst(dest.reached, Effect.asVoid(Fiber.await(source))), `the destination's ${step}`)
          if (act === "silent") {
            yield* noHang(Fiber.interrupt(source), "interrupting the source")
          } else {
            const exit = yield* noHang(Fiber.await(source), "the source's failure")
            expectOneLine(failureOf(exit))
          }
        })))
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// A destination decoding on the threads

/**
 * A real source (held back by a bandwidth limit, so that the transfer lasts) and a destination on the pool
 * (compressed channels: decoded there); once the destination reached `where` (its admit, its first progress
 * report with pages, its store step), `who` is interrupted.
 */
const destinationStops = (run: Run<ChannelThreads.ChannelThreads>) => {
  for (const where of ["hello", "transfer", "store"] as const) {
    for (const who of ["destination", "source"] as const) {
      run(`at ${where}, the ${who} is interrupted: both end and leave nothing`, () =>
        nothingLeft(Effect.gen(function*() {
          const ram = yield* ramOf(1024, true)
          const reached = yield* Deferred.make<void>()
          const listener = yield* Transport.listen(tcp0)
          const destination = yield* Effect.forkScoped(Migration.incoming(listener, {
            timeouts: TIMEOUTS,
            admit: () => {
              if (where === "hello") Deferred.unsafeDone(reached, Exit.void)
              return undefined
            },
            onProgress: (p) => where === "transfer" && p.doneBytes > 0 ? Deferred.succeed(reached, undefined) : Effect.void,
            store: () => where === "store" ? Effect.zipRight(Deferred.succeed(reached, undefined), Effect.never) : Effect.void
          }))
          const source = yield* Effect.forkScoped(migrate(ram, {
            address: listener.address,
            channels: 3,
            compression: "zstd",
            maxBandwidth: where === "transfer" ? 1024 * 1024 : 0
          }))
          yield* noHang(Deferred.await(reached), `the destination's ${where}`)
          const [victim, other]: ReadonlyArray<Fiber.Fiber<unknown, { readonly message: string }>> = who === "destination"
            ? [destination, source]
            : [source, destination]
          yield* noHang(Fiber.interrupt(victim!), `interrupting the ${who}`)
          const exit = yield* noHang(Fiber.await(other!), "the other side")
          if (Exit.isFailure(exit)) expectOneLine(failureOf(exit))
        })))
    }
  }
}


// ---------------------------------------------------------------------------------------------------------
// Many migrations on one long-lived pool

/** This thread's gc, taken as the channel threads take theirs (the flag put back at once). */
const gc = (() => {
  V8.setFlagsFromString("--expose-gc")
  try {
    return Vm.runInNewContext("gc") as () => void
  } finally {
    V8.setFlagsFromString("--no-expose-gc")
  }
})()

/** Bytes this thread holds after a full collection: its heap, and memory outside it (buffers, shared memory). */
const heldBytes = () => {
  gc()
  gc()
  const usage = process.memoryUsage()
  return { heap: usage.heapUsed, external: usage.external, arrayBuffers: usage.arrayBuffers }
}

/** One small migration of kind `i % 4`: it succeeds, is refused at the hello, loses its destination, or is interrupted. */
const oneOf = (i: number) =>
  Effect.scoped(Effect.gen(function*() {
    const ram = yield* ramOf(64, true)
    const kind = i % 4
    if (kind === 0 || kind === 1) {
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(Migration.incoming(listener, {
        timeouts: TIMEOUTS,
        ...(kind === 1 ? { expect: { channels: 3 } } : {})
      }))
      const exit = yield* noHang(Effect.exit(migrate(ram, { address: listener.address, channels: 2, compression: "zstd" })), "migrate")
      const received = yield* noHang(Fiber.await(destination), "incoming")
      if (kind === 0) {
        expect(Exit.isSuccess(exit)).toBe(true)
        expect(Exit.isSuccess(received) && sameMemory(received.value.ram, ram)).toBe(true)
      } else {
        expectOneLine(failureOf(exit))
      }
      return
    }
    const dest = yield* stoppingDestination(kind === 2 ? "flush" : "complete", kind === 2 ? "gone" : "silent")
    const source = yield* Effect.forkScoped(migrate(ram, { address: dest.address, channels: 2, compression: "zstd", reconnect: 0 }))
    yield* noHang(Effect.raceFirst(dest.reached, Effect.asVoid(Fiber.await(source))), "the destination's stop")
    yield* noHang(Fiber.interrupt(source), "the source")
  }))

const manyMigrations = (run: Run<ChannelThreads.ChannelThreads>) => {
  run("100 small migrations, half of them failing: descriptors, threads and memory do not grow", () =>
    Effect.gen(function*() {
      const pool = yield* ChannelThreads.ChannelThreads
      // warm: the first ones load what stays loaded (modules, zstd's tables, the threads' first heap growth)
      for (let i = 0; i < 12; i++) yield* oneOf(i)
      const before = heldBytes()
      const opened = (yield* pool.stats).opened
      yield* expectNothingLeft(
        Effect.gen(function*() {
          for (let i = 12; i < 112; i++) yield* oneOf(i)
        }),
        { pool }
      )
      expect((yield* pool.stats).opened).toBeGreaterThan(opened)
      // no thread failed meanwhile (one that did was replaced)
      expect(yield* pool.stats).toMatchObject({ sessions: 0, hosted: 0, replaced: 0 })
      const inspections = yield* pool.inspect
      expect(inspections.map((i) => i.sharedBuffers)).toEqual(inspections.map(() => 0))
      const after = heldBytes()
      // a migration's memory is 256 KiB: a hundred kept would be 25 MiB
      expect(after.arrayBuffers - before.arrayBuffers, "array buffers").toBeLessThan(2 * 1024 * 1024)
      expect(after.external - before.external, "external memory").toBeLessThan(4 * 1024 * 1024)
      expect(after.heap - before.heap, "heap").toBeLessThan(8 * 1024 * 1024)
    }), 120_000)
}

describe("a source whose destination stops at a step, in this thread", () => {
  sourceStops((name, self, timeout) => it.live(name, self, timeout), false)
})

layer(ChannelThreads.layer(POOL), { excludeTestServices: true })("on one pool of channel threads", (it) => {
  describe("a source whose destination stops at a step", () => {
    sourceStops((name, self, timeout) => it.effect(name, self, timeout), true)
  })
  describe("a destination decoding on the threads", () => {
    destinationStops((name, self, timeout) => it.effect(name, self, timeout))
  })
  describe("many migrations", () => {
    manyMigrations((name, self, timeout) => it.effect(name, self, timeout))
  })
})

