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
 * - a live pre-copy whose channel is reset and re-attached, then ended; a destination on a Unix socket ended in
 *   four ways (its socket file goes); a snapshot save and restore interrupted at several points, and a restore
 *   of a damaged file (the digest's own hashing threads included);
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
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import * as V8 from "node:v8"
import * as Vm from "node:vm"
import { inject } from "vitest"
import * as ChannelThreads from "../src/ChannelThreads.js"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as Snapshot from "../src/Snapshot.js"
import * as Tls from "../src/Tls.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { fakeDestination } from "./support/fakeDestination.js"
import { noHang } from "./support/guards.js"
import { expectNothingLeft, type ProbeOptions } from "./support/leakProbe.js"
import { sameMemory } from "./support/memory.js"
import { resetProxy } from "./support/resetProxy.js"

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
  run("60 small migrations, half of them failing: descriptors, threads and memory do not grow", () =>
    Effect.gen(function*() {
      const pool = yield* ChannelThreads.ChannelThreads
      // warm: the first ones load what stays loaded (modules, zstd's tables, the threads' first heap growth)
      for (let i = 0; i < 12; i++) yield* oneOf(i)
      const before = heldBytes()
      const opened = (yield* pool.stats).opened
      yield* expectNothingLeft(
        Effect.gen(function*() {
          for (let i = 12; i < 72; i++) yield* oneOf(i)
        }),
        { pool }
      )
      expect((yield* pool.stats).opened).toBeGreaterThan(opened)
      // no thread failed meanwhile (one that did was replaced)
      expect(yield* pool.stats).toMatchObject({ sessions: 0, hosted: 0, replaced: 0 })
      // an idle thread collects once its last session's port has closed, a turn or two of its event loop after the
      // session's end: each inspection is a round trip, a few of them are turns enough (held for good stays held)
      let inspections = yield* pool.inspect
      for (let k = 0; k < 10 && inspections.some((i) => i.sharedBuffers > 0); k++) inspections = yield* pool.inspect
      expect(inspections.map((i) => i.sharedBuffers)).toEqual(inspections.map(() => 0))
      const after = heldBytes()
      // a migration's memory is 256 KiB: sixty kept would be 15 MiB
      expect(after.arrayBuffers - before.arrayBuffers, "array buffers").toBeLessThan(2 * 1024 * 1024)
      expect(after.external - before.external, "external memory").toBeLessThan(4 * 1024 * 1024)
      expect(after.heap - before.heap, "heap").toBeLessThan(8 * 1024 * 1024)
    }), 120_000)
}


// ---------------------------------------------------------------------------------------------------------
// Live pre-copy: a channel lost and re-attached, then the migration fails

const reattachedThenFails = (run: Run, shared: boolean) => {
  for (const who of ["source", "destination"] as const) {
    run(`live pre-copy, channel 1 reset and re-attached, then the ${who} is interrupted: nothing left${shared ? " (channels on the threads)" : ""}`, () =>
      nothingLeft(Effect.gen(function*() {
        const ram = yield* ramOf(1024, shared)
        const listener = yield* Transport.listen(tcp0)
        const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS }))
        const proxy = yield* Effect.acquireRelease(
          Effect.promise(() =>
            resetProxy({ host: "127.0.0.1", port: (listener.address as { readonly port: number }).port }, {
              channel: 1,
              afterBytes: 256 * 1024
            })
          ),
          (proxy) => Effect.promise(() => proxy.close())
        )
        // a guest writing all the time: the pre-copy rounds go on until the test ends them
        yield* Effect.forkScoped(Effect.forever(Effect.zipRight(
          GuestRam.write(ram, "pc.ram", Math.floor(Math.random() * 1024) * PAGE, Crypto.randomBytes(PAGE)),
          Effect.promise(() => new Promise((r) => setImmediate(r)))
        )).pipe(Effect.ignore))
        const source = yield* Effect.forkScoped(migrate(ram, {
          address: { _tag: "Tcp", host: "127.0.0.1", port: proxy.port },
          channels: 3,
          compression: "zlib",
          maxBandwidth: 4 * 1024 * 1024,
          live: { maxRounds: 1000, downtimeLimit: "1 millis", onNoConvergence: "fail" }
        }))
        // the main channel, three channels, and channel 1 again
        const reattached = Effect.gen(function*() {
          while (proxy.resets() < 1 || proxy.connections() < 5) yield* Effect.promise(() => new Promise((r) => setImmediate(r)))
        })
        yield* noHang(Effect.raceFirst(reattached, Effect.asVoid(Fiber.await(source))), "channel 1 re-attached")
        expect(proxy.resets()).toBe(1)
        const [victim, other]: ReadonlyArray<Fiber.Fiber<unknown, { readonly message: string }>> = who === "destination"
          ? [destination, source]
          : [source, destination]
        yield* noHang(Fiber.interrupt(victim!), `interrupting the ${who}`)
        const exit = yield* noHang(Fiber.await(other!), "the other side")
        expect(Exit.isFailure(exit)).toBe(true)
        if (Exit.isFailure(exit) && !Exit.isInterrupted(exit)) expectOneLine(failureOf(exit))
      })))
  }
}


// ---------------------------------------------------------------------------------------------------------
// Unix sockets: the socket file goes with its listener, whatever ended the migration

describe("a destination on a Unix socket", () => {
  for (const end of ["the destination is interrupted mid-transfer", "the source is interrupted mid-transfer", "the source is refused", "listenAndReceive is interrupted while waiting"] as const) {
    it.live(`${end}: no socket file, descriptor or handle left`, () =>
      Effect.gen(function*() {
        const dir = yield* Effect.acquireRelease(
          Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-leaks-"))),
          (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
        )
        const address: Transport.Address = { _tag: "Unix", path: Path.join(dir, "dest.sock") }
        yield* nothingLeft(Effect.gen(function*() {
          const ram = yield* ramOf(1024, false)
          const listening = yield* Deferred.make<void>()
          const reached = yield* Deferred.make<void>()
          const destination = yield* Effect.forkScoped(Migration.listenAndReceive(address, {
            timeouts: TIMEOUTS,
            onListening: () => Deferred.succeed(listening, undefined),
            onProgress: (p) => p.doneBytes > 0 ? Deferred.succeed(reached, undefined) : Effect.void,
            ...(end === "the source is refused" ? { expect: { channels: 4 } } : {})
          }).pipe(Effect.provide(Transport.layer)))
          yield* noHang(Deferred.await(listening), "listening")
          expect(Fs.readdirSync(dir)).toEqual(["dest.sock"])
          if (end === "listenAndReceive is interrupted while waiting") {
            yield* noHang(Fiber.interrupt(destination), "interrupting the destination")
            return
          }
          const source = yield* Effect.forkScoped(migrate(ram, { address, channels: 2, maxBandwidth: 1024 * 1024 }))
          if (end === "the source is refused") {
            expectOneLine(failureOf(yield* noHang(Fiber.await(source), "the source")))
            yield* noHang(Fiber.await(destination), "the destination")
            return
          }
          yield* noHang(Deferred.await(reached), "pages received")
          const [victim, other]: ReadonlyArray<Fiber.Fiber<unknown, { readonly message: string }>> =
            end === "the destination is interrupted mid-transfer" ? [destination, source] : [source, destination]
          yield* noHang(Fiber.interrupt(victim!), "the interruption")
          const exit = yield* noHang(Fiber.await(other!), "the other side")
          expect(Exit.isFailure(exit)).toBe(true)
        }), { dirs: [dir] })
        expect(Fs.readdirSync(dir)).toEqual([])
      }).pipe(Effect.scoped))
  }
})


// ---------------------------------------------------------------------------------------------------------
// TLS refused on the channels (the main channel's handshake passed)

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/tls/${name}`, import.meta.url))

const channelsRefused = (run: Run, shared: boolean) => {
  const cases = [
    { name: "a PSK the channels' peer does not share", client: { psk: "keys.psk" }, good: { psk: "keys.psk" }, bad: { psk: "wrong-keys.psk" } },
    {
      name: "a certificate of another host on the channels' peer",
      client: { ca: "ca-cert.pem" },
      good: { ca: "ca-cert.pem", cert: "server-cert.pem", key: "server-key.pem" },
      bad: { ca: "ca-cert.pem", cert: "wronghost-cert.pem", key: "wronghost-key.pem" }
    },
    {
      name: "a certificate of a foreign CA on the channels' peer",
      client: { ca: "ca-cert.pem" },
      good: { ca: "ca-cert.pem", cert: "server-cert.pem", key: "server-key.pem" },
      bad: { ca: "other-ca-cert.pem", cert: "other-ca-alice-cert.pem", key: "other-ca-alice-key.pem" }
    }
  ]
  for (const c of cases) {
    run(`TLS: ${c.name}: the source fails naming a channel and leaves nothing${shared ? " (channels on the threads)" : ""}`, () =>
      nothingLeft(Effect.gen(function*() {
        const files = (o: Record<string, string>) => Object.fromEntries(Object.entries(o).map(([k, v]) => [k, fixture(v)]))
        const client = yield* Tls.make(files(c.client))
        const good = yield* Tls.make(files(c.good))
        const bad = yield* Tls.make(files(c.bad))
        let accepted = 0
        // the first connection (the main channel) is answered with the right credentials, the channels not
        const upgrade: Transport.Upgrade<Tls.TlsError> = (connection, channel) =>
          (accepted++ === 0 ? good : bad).server(connection, channel)
        const ram = yield* ramOf(256, shared)
        const listener = yield* Transport.listen(tcp0)
        const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, upgrade }))
        const exit = yield* noHang(
          Effect.exit(migrate(ram, { address: listener.address, channels: 3, upgrade: client.client("localhost"), reconnect: 0 })),
          "migrate"
        )
        const error = failureOf(exit)
        expectOneLine(error)
        expect(error.message).toMatch(/multifd channel \d/)
        yield* noHang(Fiber.await(destination), "incoming")
      })))
  }
}


// ---------------------------------------------------------------------------------------------------------
// The source's final digest (hash sessions on the channel threads) interrupted

const digestInterrupted = (run: Run<ChannelThreads.ChannelThreads>) => {
  for (const n of [0, 20, 100, 400]) {
    run(`the source interrupted ${n} turns after its last flush was acknowledged (hashing its digest on the threads): nothing left`, () =>
      nothingLeft(Effect.gen(function*() {
        const pool = yield* ChannelThreads.ChannelThreads
        const sessions = (yield* pool.stats).sessions
        // two digest chunks (64 MiB each) and a bit, mostly zero: hash sessions on the threads beside the channels
        const bytes = GuestRam.allocate(2 * 64 * 1024 * 1024 + 256 * PAGE)
        for (let p = 0; p < bytes.length / PAGE; p += 199) Crypto.randomFillSync(bytes, p * PAGE, PAGE)
        const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes }] })
        const acked = yield* Deferred.make<void>()
        const address = yield* fakeDestination({
          onFlush: () => Deferred.succeed(acked, undefined),
          onComplete: () => Effect.never
        })
        const source = yield* Effect.forkScoped(migrate(ram, { address, channels: 2 }))
        yield* noHang(Effect.raceFirst(Deferred.await(acked), Effect.asVoid(Fiber.await(source))), "a flush")
        for (let i = 0; i < n; i++) yield* Effect.promise(() => new Promise((r) => setImmediate(r)))
        yield* noHang(Fiber.interrupt(source), "interrupting the source")
        // every lease given back once the source returned: interrupted while it closed its hash sessions, a
        // close's wait for the thread's answer was itself ended, and the lease (and its port) kept for good
        expect((yield* pool.stats).sessions).toBe(sessions)
      })), 30_000)
  }
}

describe("a source whose destination stops at a step, in this thread", () => {
  sourceStops((name, self, timeout) => it.live(name, self, timeout), false)
  reattachedThenFails((name, self, timeout) => it.live(name, self, timeout), false)
  channelsRefused((name, self, timeout) => it.live(name, self, timeout), false)
})

layer(ChannelThreads.layer(POOL), { excludeTestServices: true })("on one pool of channel threads", (it) => {
  describe("a source whose destination stops at a step", () => {
    sourceStops((name, self, timeout) => it.effect(name, self, timeout), true)
  })
  describe("a destination decoding on the threads", () => {
    destinationStops((name, self, timeout) => it.effect(name, self, timeout))
  })
  describe("live pre-copy with a re-attached channel", () => {
    reattachedThenFails((name, self, timeout) => it.effect(name, self, timeout), true)
  })
  describe("TLS refused on the channels", () => {
    channelsRefused((name, self, timeout) => it.effect(name, self, timeout), true)
  })
  describe("the source's digest", () => {
    digestInterrupted((name, self, timeout) => it.effect(name, self, timeout))
  })
})

// a pool of its own: its counts start from nothing whatever the tests above left in theirs
layer(ChannelThreads.layer(POOL), { excludeTestServices: true })("on a pool of channel threads of its own", (it) => {
  describe("many migrations", () => {
    manyMigrations((name, self, timeout) => it.effect(name, self, timeout))
  })
})


// ---------------------------------------------------------------------------------------------------------
// Snapshots failing midway

describe("a snapshot save or restore ended midway", () => {
  // two digest chunks (64 MiB each) and a bit, shared: the digest starts hashing threads of its own
  const SIZE = 2 * 64 * 1024 * 1024 + 256 * PAGE
  const bigRam = Effect.suspend(() => {
    const bytes = GuestRam.allocate(SIZE)
    for (let p = 0; p < SIZE / PAGE; p += 97) Crypto.randomFillSync(bytes, p * PAGE, PAGE)
    return GuestRam.make({ blocks: [{ name: "pc.ram", bytes }] })
  })
  const turns = (n: number) => Effect.forEach(Array.from({ length: n }), () => Effect.promise(() => new Promise((r) => setImmediate(r))), { discard: true })

  for (const n of [0, 10, 100, 1000]) {
    it.live(`save, then restore, each interrupted after ${n} turns of the event loop: no file, descriptor or thread left`, () =>
      Effect.gen(function*() {
        const dir = yield* Effect.acquireRelease(
          Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-leaks-"))),
          (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
        )
        const ram = yield* bigRam
        const path = Path.join(dir, "guest.snap")
        // interrupted save: no temporary file, nothing open
        yield* expectNothingLeft(Effect.scoped(Effect.gen(function*() {
          const save = yield* Effect.fork(Snapshot.save(path).pipe(Effect.provideService(GuestRam.GuestRam, ram)))
          yield* Effect.raceFirst(turns(n), Effect.asVoid(Fiber.await(save)))
          yield* noHang(Fiber.interrupt(save), "interrupting the save")
        })), { dirs: [dir] }).pipe(Effect.ensuring(Effect.sync(() => Fs.rmSync(path, { force: true }))))
        yield* noHang(Snapshot.save(path).pipe(Effect.provideService(GuestRam.GuestRam, ram)), "a save")
        // interrupted restore
        yield* expectNothingLeft(Effect.scoped(Effect.gen(function*() {
          const restore = yield* Effect.fork(Snapshot.restore(path))
          yield* Effect.raceFirst(turns(n), Effect.asVoid(Fiber.await(restore)))
          yield* noHang(Fiber.interrupt(restore), "interrupting the restore")
        })), { dirs: [dir] })
        // a restore that fails on a flipped byte of a stored page (page 0, random: found by its bytes)
        const file = Fs.readFileSync(path)
        const at = file.indexOf(ram.blocks[0]!.bytes.subarray(0, 64))
        expect(at).toBeGreaterThan(0)
        const fd = Fs.openSync(path, "r+")
        Fs.writeSync(fd, Buffer.from([file[at]! ^ 0xff]), 0, 1, at)
        Fs.closeSync(fd)
        yield* expectNothingLeft(Effect.gen(function*() {
          const exit = yield* noHang(Effect.exit(Snapshot.restore(path)), "a restore of a damaged file")
          expectOneLine(failureOf(exit))
        }), { dirs: [dir] })
      }).pipe(Effect.scoped), 60_000)
  }
})
