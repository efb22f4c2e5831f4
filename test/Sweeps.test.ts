/**
 * Systematic fault sweeps over the network paths: rather than a few hand-picked moments, the source or the
 * destination is interrupted after n turns of the event loop for n across the whole migration (every k-th
 * turn, until the migration ends by itself), over plain TCP, a Unix socket, TLS (x509 with verifyPeer, PSK),
 * zstd and zlib, live pre-copy, channel threads, and QemuIncoming fed QEMU's recorded streams. After each point:
 * nothing left (descriptors, sockets, socket files, timers, threads; `leakProbe.ts`), the other side ended
 * promptly (a guard, never a timer to settle) with a typed one-line error or its own success, and the
 * destination's memory holds, page by page, what it held before or what the source sent (never anything else).
 *
 * A peer that vanishes at every byte offset: the main channel (either way) or the first multifd channel (from the
 * source), through a proxy that forwards the real bytes up to offset k and then resets or ends the connection;
 * QEMU's recorded streams into QemuIncoming, a connection reset after k bytes and the others closed.
 *
 * Each sweep is one test looping over its points and listing every point that went wrong.
 */
import { describe, expect, inject, it, layer } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import type * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import type * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import * as ChannelThreads from "../src/ChannelThreads.js"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as Protocol from "../src/Protocol.js"
import * as QemuIncoming from "../src/QemuIncoming.js"
import * as Tls from "../src/Tls.js"
import * as Transport from "../src/Transport.js"
import { failureOf } from "./support/failures.js"
import { noHang } from "./support/guards.js"
import { hostileProxy } from "./support/hostileProxy.js"
import { expectNothingLeft, type ProbeOptions } from "./support/leakProbe.js"

const PAGE = 4096
/** Long: an end that comes from a timeout is a hang here (the guard below is shorter). */
const TIMEOUTS = { connect: "20 seconds", handshake: "20 seconds", peer: "20 seconds" } as const
const PROMPT_SECONDS = 8
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }
const VERBOSE = process.env["SWEEP_VERBOSE"] === "1"

const MODULE = Path.join(Path.dirname(inject("cliBundle")), "channelWorker.js")
const POOL: ChannelThreads.Options = { maxThreads: 2, module: MODULE }

const turn = Effect.promise(() => new Promise<void>((r) => setImmediate(r)))
const turns = (n: number) => Effect.forEach(Array.from({ length: n }), () => turn, { discard: true })

/** `pages` pages, most random, some zero, some repetitive; shared memory (the channel threads read it in place). */
const image = (pages: number, seed: number, sparse = false): Buffer => {
  const bytes = GuestRam.allocate(pages * PAGE)
  for (let p = 0; p < pages; p++) {
    if (sparse && p % 211 !== 0) continue
    if (p % 5 === 0) continue
    if (p % 5 === 1) bytes.fill(p & 0xff, p * PAGE, (p + 1) * PAGE)
    else Crypto.randomFillSync(bytes, p * PAGE, PAGE)
  }
  bytes[0] = seed
  return bytes
}

/** Destination memory before: a pattern no source page has (0xA5 then the page number). */
const before = (pages: number): Buffer => {
  const bytes = GuestRam.allocate(pages * PAGE)
  bytes.fill(0xa5)
  for (let p = 0; p < pages; p++) bytes.writeUInt32LE(p, p * PAGE)
  return bytes
}

/** Pages of `now` that are neither what they were (`was`) nor what the source sent (`sent`). */
const strangePages = (now: Buffer, was: Buffer, sent: Buffer): ReadonlyArray<number> => {
  const strange: Array<number> = []
  for (let p = 0; p * PAGE < now.length; p++) {
    const page = now.subarray(p * PAGE, (p + 1) * PAGE)
    if (!page.equals(was.subarray(p * PAGE, (p + 1) * PAGE)) && !page.equals(sent.subarray(p * PAGE, (p + 1) * PAGE))) strange.push(p)
  }
  return strange
}

const describeExit = (exit: Exit.Exit<unknown, unknown>): string =>
  Exit.isSuccess(exit) ? "success" : Cause.pretty(exit.cause).split("\n").slice(0, 3).join(" / ")

/** What is wrong with the exit of the side that was not interrupted (undefined: fine). */
const judgeOther = (exit: Exit.Exit<unknown, unknown>): string | undefined => {
  if (Exit.isSuccess(exit)) return undefined
  const failure = Cause.failureOption(exit.cause)
  if (failure._tag === "None") return `not a typed failure: ${describeExit(exit)}`
  const error = failure.value as { readonly _tag?: unknown; readonly message?: unknown; readonly reason?: unknown }
  if (typeof error._tag !== "string" || typeof error.message !== "string") return `untyped failure: ${String(failure.value)}`
  if (error.message.length === 0 || error.message.includes("\n")) return `not one line: ${JSON.stringify(error.message)}`
  if (error.reason === "Timeout" || /timed out|within \d/.test(error.message)) return `a timeout, not a prompt end: ${error.message}`
  return undefined
}

/** One migration set up for a point of a sweep: both sides forked in the scope, and what to check after. */
interface Pair {
  readonly source: Fiber.Fiber<unknown, unknown>
  readonly destination: Fiber.Fiber<unknown, unknown>
  /** Problems with the destination's memory once both ended (given memory compared page by page). */
  readonly memory?: () => ReadonlyArray<string>
  /** Whether the destination may still wait, for another source, once its source was interrupted (none admitted). */
  readonly mayWait?: () => boolean
  /** Whether the source has started (an interrupted destination may not have listened yet: nothing to connect to). */
  readonly started?: () => boolean
}

type Victim = "source" | "destination"

/**
 * Interrupts `victim` after n turns, for n = 0, step, 2 step, ... until a migration ends by itself before its
 * point (at most `maxPoints`): the problems of every point, `n=<turns>: ...`, and the points tried.
 */
const sweep = <R>(
  setup: Effect.Effect<Pair, unknown, R | Scope.Scope>,
  victim: Victim,
  step: number,
  options: ProbeOptions & {
    readonly maxPoints?: number
    /** The turns to interrupt at, instead of 0, step, 2 step, ... */
    readonly at?: ReadonlyArray<number>
  } = {}
): Effect.Effect<{ readonly problems: ReadonlyArray<string>; readonly points: number; readonly lastTurns: number }, never, Exclude<R, Scope.Scope>> =>
  Effect.gen(function*() {
    const problems: Array<string> = []
    let points = 0
    let n = 0
    for (; points < (options.at?.length ?? options.maxPoints ?? 200); n += step, points++) {
      let finished = false
      const at = options.at?.[points] ?? n
      const exit = yield* Effect.exit(expectNothingLeft(
        Effect.scoped(Effect.gen(function*() {
          const pair = yield* setup
          const both = Effect.zip(Fiber.await(pair.source), Fiber.await(pair.destination))
          yield* Effect.raceFirst(turns(at), Effect.asVoid(both))
          const victimFiber = victim === "source" ? pair.source : pair.destination
          const other = victim === "source" ? pair.destination : pair.source
          const victimDone = yield* Fiber.poll(victimFiber)
          if (victimDone._tag === "Some") {
            finished = true
            const [s, d] = yield* noHang(both, "the other side after the victim ended by itself", PROMPT_SECONDS)
            for (const [who, e] of [["source", s], ["destination", d]] as const) {
              const wrong = judgeOther(e)
              if (wrong !== undefined) problems.push(`n=${at} (ended by itself): ${who}: ${wrong}`)
            }
          } else {
            yield* noHang(Fiber.interrupt(victimFiber), `interrupting the ${victim}`, PROMPT_SECONDS)
            if (victim === "source" ? pair.mayWait?.() === true : pair.started?.() === false) {
              // no source admitted: the destination waits for another, as it should; or the destination never
              // listened: the source has nowhere to connect
              yield* noHang(Fiber.interrupt(other), "interrupting the other side, which had not begun", PROMPT_SECONDS)
              for (const p of pair.memory?.() ?? []) problems.push(`n=${at}: ${p}`)
              return
            }
            const otherExit = yield* noHang(Fiber.await(other), `the other side of the interrupted ${victim}`, PROMPT_SECONDS)
            const wrong = judgeOther(otherExit)
            if (wrong !== undefined) problems.push(`n=${at}: ${victim === "source" ? "destination" : "source"}: ${wrong}`)
            if (VERBOSE) console.log(`n=${at}: other: ${describeExit(otherExit)}`)
          }
          for (const p of pair.memory?.() ?? []) problems.push(`n=${at}: ${p}`)
        })),
        options
      ))
      if (Exit.isFailure(exit)) problems.push(`n=${at}: ${describeExit(exit)}`)
      if (finished) break
    }
    return { problems, points: points + 1, lastTurns: n }
  }).pipe(VERBOSE ? (x) => x : Effect.provide(Logger.remove(Logger.defaultLogger)))

// ---------------------------------------------------------------------------------------------------------
// Our protocol, end to end

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/tls/${name}`, import.meta.url))

interface Flavour {
  readonly name: string
  readonly pages: number
  readonly channels: number
  readonly compression?: Protocol.Compression
  readonly unix?: boolean
  readonly tls?: "x509" | "psk"
  readonly live?: boolean
  /** Mostly zero pages (memory of two digest chunks and more: the digests hash on threads of their own). */
  readonly sparse?: boolean
}

const tlsPair = (kind: "x509" | "psk") =>
  Effect.gen(function*() {
    if (kind === "psk") {
      const creds = yield* Tls.make({ psk: fixture("keys.psk") })
      return { client: creds.client(undefined), server: creds.server }
    }
    const server = yield* Tls.make({
      ca: fixture("ca-cert.pem"),
      cert: fixture("server-cert.pem"),
      key: fixture("server-key.pem"),
      verifyPeer: true
    })
    const client = yield* Tls.make({ ca: fixture("ca-cert.pem"), cert: fixture("alice-cert.pem"), key: fixture("alice-key.pem") })
    return { client: client.client("localhost"), server: server.server }
  })

const ourPair = (flavour: Flavour, dir: string | undefined) =>
  Effect.gen(function*() {
    const sent = image(flavour.pages, 1, flavour.sparse)
    const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: sent }] })
    const was = before(flavour.pages)
    const into = Buffer.from(was)
    const target = GuestRam.allocate(flavour.pages * PAGE)
    was.copy(target)
    const destinationRam = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: target }] })
    const address: Transport.Address = flavour.unix
      ? { _tag: "Unix", path: Path.join(dir!, "dest.sock") }
      : flavour.tls === "x509" ? { _tag: "Tcp", host: "localhost", port: 0 } : tcp0
    const tls = flavour.tls === undefined ? undefined : yield* tlsPair(flavour.tls)
    let admitted = false
    // the listener is the destination's own: interrupted, it closes it (as listenAndReceive)
    const listening = yield* Deferred.make<Transport.Address>()
    const destination = yield* Effect.forkScoped(Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen(address)
      yield* Deferred.succeed(listening, listener.address)
      return yield* Migration.incoming(listener, {
        timeouts: TIMEOUTS,
        ram: destinationRam,
        admit: () => {
          admitted = true
          return undefined
        },
        ...(tls ? { upgrade: tls.server } : {})
      })
    })))
    if (flavour.live) {
      // a guest writing now and then while it migrates (its own pages: the destination ends with the last copy)
      yield* Effect.forkScoped(Effect.forever(Effect.zipRight(
        Effect.suspend(() => GuestRam.write(ram, "pc.ram", Math.floor(Math.random() * flavour.pages) * PAGE, Crypto.randomBytes(64))),
        turns(3)
      )).pipe(Effect.ignore))
    }
    let started = false
    const source = yield* Effect.forkScoped(Effect.flatMap(Deferred.await(listening), (listenAddress) => (started = true, Migration.migrate({
      address: listenAddress,
      channels: flavour.channels,
      timeouts: TIMEOUTS,
      reconnect: 0,
      ...(flavour.compression ? { compression: flavour.compression } : {}),
      ...(tls ? { upgrade: tls.client } : {}),
      ...(flavour.live ? { live: { maxRounds: 4, downtimeLimit: "1 second", onNoConvergence: "switchover" } } : {})
    }))).pipe(Effect.provide(Transport.layer), Effect.provideService(GuestRam.GuestRam, ram)))
    void into
    return {
      source,
      destination,
      mayWait: () => !admitted,
      started: () => started,
      memory: () => {
        // live: the source's pages move while it migrates; only compare a still memory
        if (flavour.live) return []
        const strange = strangePages(target, was, sent)
        return strange.length === 0 ? [] : [`destination pages neither before nor sent: ${strange.slice(0, 8).join(", ")}`]
      }
    } satisfies Pair
  })

const FLAVOURS: ReadonlyArray<Flavour> = [
  { name: "plain TCP", pages: 64, channels: 2 },
  { name: "a Unix socket", pages: 64, channels: 2, unix: true },
  { name: "zstd", pages: 64, channels: 3, compression: "zstd" },
  { name: "zlib", pages: 64, channels: 2, compression: "zlib" },
  { name: "TLS x509, verifyPeer", pages: 32, channels: 2, tls: "x509" },
  { name: "TLS PSK", pages: 32, channels: 2, tls: "psk" },
  { name: "live pre-copy", pages: 64, channels: 2, live: true }
]

/**
 * Every 9th turn in this thread, every 23rd on the channel threads (more turns, each a round trip; fewer kinds) and
 * every 2nd for QemuIncoming (a replay of a dozen or two turns, cheap), by default: the suite's time. `SWEEP_STEP=1 SWEEP_QEMU_STEP=1 SWEEP_THREADS_STEP=3`
 * sweeps every point (the turns of a migration vary from run to run, so the default's points shift too).
 */
const STEP = Number(process.env["SWEEP_STEP"] ?? "9")
const BIG_STEP = 1
const QEMU_STEP = Number(process.env["SWEEP_QEMU_STEP"] ?? "2")
const THREADS_STEP = Number(process.env["SWEEP_THREADS_STEP"] ?? "23")
const ON_THREADS = new Set(["plain TCP", "zstd", "live pre-copy"])

/**
 * `sweep` at `step`, and again at a third of it (down to every turn) while the migration ended by itself within two
 * steps: the turns a migration takes vary several-fold from run to run (on channel threads, where this thread takes
 * few, and fewer on a quiet machine), and a sweep of two points says little.
 */
const sweepSome = <R>(
  setup: Effect.Effect<Pair, unknown, R | Scope.Scope>,
  victim: Victim,
  step: number,
  options: ProbeOptions = {}
) =>
  Effect.gen(function*() {
    let result = yield* sweep(setup, victim, step, options)
    for (let finer = Math.floor(step / 3); result.points <= 2 && finer >= 1; finer = Math.floor(finer / 3)) {
      result = yield* sweep(setup, victim, finer, options)
    }
    return result
  })

type Run = (name: string, self: () => Effect.Effect<void, unknown>, timeout?: number) => void

const ourSweeps = (run: Run, threads: boolean) => {
  const step = threads ? THREADS_STEP : STEP
  for (const flavour of FLAVOURS.filter((f) => !threads || ON_THREADS.has(f.name))) {
    for (const victim of ["source", "destination"] as const) {
      run(`${flavour.name}${threads ? " (channel threads)" : ""}: the ${victim} interrupted after n turns, for n = 0, ${step}, ${2 * step}, ... until it ends by itself`, () =>
        Effect.gen(function*() {
          const dir = flavour.unix ? Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-sweep-")) : undefined
          try {
            const result = yield* sweepSome(ourPair(flavour, dir), victim, step, { dirs: dir ? [dir] : [] })
            if (VERBOSE) console.log(`${flavour.name} ${victim}: ${result.points} points, ${result.lastTurns} turns`)
            expect(result.problems).toEqual([])
            expect(result.points).toBeGreaterThan(2)
          } finally {
            if (dir) Fs.rmSync(dir, { recursive: true, force: true })
          }
        }), 120_000)
    }
  }
}

describe("interrupted at every point, in this thread", () => {
  ourSweeps((name, self, timeout) => it.live(name, self, timeout), false)
})

describe("interrupted while the digests hash (on threads of their own)", () => {
  // 132 MiB, mostly zero pages: the transfer is short, the digests on both sides long
  const big: Flavour = { name: "132 MiB, mostly zero", pages: 2 * 16384 + 256, channels: 2, sparse: true }
  for (const victim of ["source", "destination"] as const) {
    it.live(`the ${victim} interrupted at two points of its last sixth (its last flush, its digests)`, () =>
      Effect.gen(function*() {
        // how many turns the whole migration takes, then points in its last sixth (its digests at the end)
        const whole = yield* Effect.scoped(Effect.gen(function*() {
          const pair = yield* ourPair(big, undefined)
          let turns = 0
          while ((yield* Fiber.poll(pair.source))._tag === "None" || (yield* Fiber.poll(pair.destination))._tag === "None") {
            yield* turn
            turns++
          }
          return turns
        })).pipe(Effect.provide(Logger.remove(Logger.defaultLogger)))
        const at = [0.85, 0.97].map((f) => Math.floor(f * whole))
        const result = yield* sweep(ourPair(big, undefined), victim, BIG_STEP, { at })
        if (VERBOSE) console.log(`big ${victim}: ${whole} turns in all, ${at.join(" ")}`)
        if (VERBOSE) console.log(`big ${victim}: ${result.points} points, ${result.lastTurns} turns`)
        expect(result.problems).toEqual([])
      }), 120_000)
  }
})

layer(ChannelThreads.layer(POOL), { excludeTestServices: true })("interrupted at every point, on channel threads", (it) => {
  ourSweeps((name, self, timeout) => it.effect(name, self, timeout), true)
})


// ---------------------------------------------------------------------------------------------------------
// QemuIncoming fed QEMU's recorded streams

const QEMU_FIXTURES = new URL("./fixtures/qemu-10.0.2/", import.meta.url)
const qemuFixture = (path: string): Buffer => Fs.readFileSync(new URL(path, QEMU_FIXTURES))
const RAM_IMG = qemuFixture("ram.bin")
const captures = (compression: Protocol.Compression) =>
  ["main.bin", "multifd-0.bin", "multifd-1.bin"].map((f) => qemuFixture(`${compression}-2ch/${f}`))

/**
 * QEMU, played back: each recorded connection written as it was (its main channel first), ended as QEMU ends it,
 * then held open until the destination closes it (QEMU without return path waits for nothing more).
 * `cut`: the `index`-th connection is reset (RST) after `at` bytes instead, once the others have written
 * everything; then, as QEMU whose migration failed, the others are closed.
 */
const replay = (address: Transport.Address, streams: ReadonlyArray<Buffer>, cut?: { readonly index: number; readonly at: number }) =>
  Effect.scoped(Effect.gen(function*() {
    const connections: Array<Transport.Connection> = []
    for (const _ of streams) connections.push(yield* Transport.connect(address))
    const write = (index: number, upTo: number) =>
      Effect.gen(function*() {
        const bytes = streams[index]!
        for (let at = 0; at < upTo; at += 64 * 1024) {
          yield* connections[index]!.write([bytes.subarray(at, Math.min(upTo, at + 64 * 1024))])
        }
        yield* connections[index]!.drained
      })
    if (cut === undefined) {
      yield* Effect.forEach(streams, (bytes, index) =>
        Effect.gen(function*() {
          yield* write(index, bytes.length)
          yield* connections[index]!.end
          while ((yield* connections[index]!.readSome(4096)).length > 0) {
            // (QEMU reads nothing on these connections)
          }
        }), { concurrency: "unbounded", discard: true })
      return
    }
    // (the others but their last byte: QEMU whose channel failed never sends the main channel's end marker, nor a
    // channel's last packet)
    yield* Effect.forEach(streams, (bytes, index) => write(index, index === cut.index ? cut.at : bytes.length - 1), {
      concurrency: "unbounded",
      discard: true
    })
    ;(connections[cut.index]!.stream as Net.Socket).resetAndDestroy()
  })).pipe(Effect.ignore)

const qemuPair = (compression: Protocol.Compression, cut?: { readonly index: number; readonly at: number }) =>
  Effect.gen(function*() {
    const pages = RAM_IMG.length / PAGE
    const was = before(pages)
    const target = GuestRam.allocate(RAM_IMG.length)
    was.copy(target)
    const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: target }] })
    const listening = yield* Deferred.make<Transport.Address>()
    const destination = yield* Effect.forkScoped(Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      yield* Deferred.succeed(listening, listener.address)
      return yield* QemuIncoming.incoming(listener, { channels: 2, compression, ram, timeouts: TIMEOUTS })
    })))
    let started = false
    const source = yield* Effect.forkScoped(Effect.flatMap(Deferred.await(listening), (address) => {
      started = true
      return replay(address, captures(compression), cut)
    }))
    return {
      source,
      destination,
      started: () => started,
      memory: () => {
        const strange = strangePages(target, was, RAM_IMG)
        return strange.length === 0 ? [] : [`destination pages neither before nor QEMU's: ${strange.slice(0, 8).join(", ")}`]
      }
    } satisfies Pair
  })

describe("QemuIncoming fed QEMU's recorded streams", () => {
  for (const compression of ["none", "zstd"] as const) {
    it.live(`${compression}: the destination interrupted after n turns, for n = 0, ${QEMU_STEP}, ${2 * QEMU_STEP}, ... until it ends by itself`, () =>
      Effect.gen(function*() {
        const result = yield* sweepSome(qemuPair(compression), "destination", QEMU_STEP)
        if (VERBOSE) console.log(`qemu ${compression}: ${result.points} points, ${result.lastTurns} turns`)
        expect(result.problems).toEqual([])
        expect(result.points).toBeGreaterThan(2)
      }), 120_000)
  }
  it.live("zlib: the main channel or a channel reset after k bytes, QEMU closing the others: the destination fails promptly, typed, nothing left", () =>
    Effect.gen(function*() {
      const problems: Array<string> = []
      const streams = captures("zlib")
      for (const index of [0, 1]) {
        for (const at of [0, 1, 3, 4, 17, 64, 600, 1142, 4096, 4097, 65_536, 300_000, streams[index]!.length - 1]) {
          // (a main channel cut before its header's 8 bytes is a stranger's: the destination waits for QEMU. A channel
          // cut before its init packet is complete cannot be told from a stranger's either, but once QEMU closed its
          // main channel short of the stream's end, the main channel's end fails the migration, whatever the first
          // flush waits for)
          if (at >= streams[index]!.length || (index === 0 && at < 8)) continue
          const exit = yield* Effect.exit(expectNothingLeft(Effect.scoped(Effect.gen(function*() {
            const pair = yield* qemuPair("zlib", { index, at })
            const exit = yield* noHang(Fiber.await(pair.destination), "the destination", PROMPT_SECONDS)
            const wrong = Exit.isSuccess(exit) ? "the destination succeeded with a stream cut short" : judgeOther(exit)
            if (wrong !== undefined) problems.push(`connection ${index} at ${at}: ${wrong}`)
            for (const p of pair.memory()) problems.push(`connection ${index} at ${at}: ${p}`)
          }))))
          if (Exit.isFailure(exit)) problems.push(`connection ${index} at ${at}: ${describeExit(exit)}`)
        }
      }
      expect(problems).toEqual([])
    }).pipe(VERBOSE ? (x) => x : Effect.provide(Logger.remove(Logger.defaultLogger))), 120_000)
})

// ---------------------------------------------------------------------------------------------------------
// A peer that vanishes at every byte offset

type Cut = {
  /** The connection cut: the main channel (the first), or the first multifd channel (the second). */
  readonly link: "main" | "channel"
  /** Bytes from the source (`up`) or from the destination (`down`). */
  readonly direction: "up" | "down"
  readonly how: "reset" | "fin"
}

/**
 * One migration through a proxy that forwards `cut.link`'s bytes of `cut.direction` up to `offset` and then
 * breaks that connection (`how` both ways): both sides' exits, whether the destination admitted the source,
 * and the bytes that went that way in all (to know where the sweep ends).
 */
const cutAt = (cut: Cut, offset: number, reconnect: number) =>
  Effect.scoped(Effect.gen(function*() {
    const pages = 64
    const sent = image(pages, 2)
    const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: sent }] })
    const was = before(pages)
    const target = GuestRam.allocate(pages * PAGE)
    was.copy(target)
    const destinationRam = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: target }] })
    const listener = yield* Transport.listen(tcp0)
    let admitted = false
    const destination = yield* Effect.fork(Migration.incoming(listener, {
      timeouts: TIMEOUTS,
      ram: destinationRam,
      admit: () => {
        admitted = true
        return undefined
      }
    }))
    let broke = false
    const index = cut.link === "main" ? 0 : 1
    const proxy = yield* hostileProxy(listener.address, (link, direction, chunk) => {
      if (link.index !== index || direction !== cut.direction) return undefined
      // (the break comes once the kept bytes were written: nothing after them goes on meanwhile)
      if (broke) return { _tag: "Hold" }
      const at = direction === "up" ? link.judged : link.down
      if (at + chunk.length <= offset) return undefined
      broke = true
      return { _tag: "Break", how: cut.how, keep: offset - at }
    })
    const source = yield* Effect.exit(noHang(
      Migration.migrate({ address: proxy.address, channels: 2, timeouts: TIMEOUTS, reconnect }).pipe(
        Effect.provide(Transport.layer),
        Effect.provideService(GuestRam.GuestRam, ram)
      ),
      "the source",
      PROMPT_SECONDS
    ))
    const link = proxy.links[index]
    const total = link === undefined ? 0 : cut.direction === "up" ? link.judged : link.down
    const problems: Array<string> = []
    const sourceWrong = judgeOther(source)
    if (sourceWrong !== undefined) problems.push(`source: ${sourceWrong}`)
    let destinationExit: Exit.Exit<unknown, unknown> = Exit.void
    if (!admitted && Exit.isFailure(source)) {
      // never admitted: the destination waits for a source, as it should
      yield* Fiber.interrupt(destination)
    } else {
      const exit = yield* noHang(Fiber.await(destination), "the destination", PROMPT_SECONDS)
      destinationExit = exit
      const wrong = judgeOther(exit)
      if (wrong !== undefined) problems.push(`destination: ${wrong}`)
      // (the source heard Done, the destination did not hear it heard it: it fails, so that the guest is not
      // resumed on both sides — as designed, and said)
      if (Exit.isSuccess(source) && Exit.isFailure(exit) && !/after Done and before the source said it heard Done/.test(describeExit(exit))) {
        problems.push(`the source succeeded, the destination failed: ${describeExit(exit)}`)
      }
      if (Exit.isSuccess(exit) && !target.equals(sent)) problems.push("the destination succeeded with other memory")
    }
    const strange = strangePages(target, was, sent)
    if (strange.length > 0) problems.push(`destination pages neither before nor sent: ${strange.slice(0, 8).join(", ")}`)
    return { problems, broke, total, source, destination: destinationExit }
  }))

/** Offsets to cut at: every byte of the first `dense`, then every `stride`-th, up to `limit`. */
const offsets = (dense: number, stride: number, limit: number) => {
  const all: Array<number> = []
  for (let k = 0; k < Math.min(dense, limit); k++) all.push(k)
  for (let k = dense; k < limit; k += stride) all.push(k)
  return all
}

const cutSweep = (cut: Cut, reconnect: number, points: ReadonlyArray<number>) =>
  Effect.gen(function*() {
    const problems: Array<string> = []
    let tried = 0
    for (const offset of points) {
      const result = yield* Effect.exit(expectNothingLeft(cutAt(cut, offset, reconnect)))
      tried++
      if (Exit.isFailure(result)) {
        problems.push(`offset ${offset}: ${describeExit(result)}`)
        continue
      }
      for (const p of result.value.problems) problems.push(`offset ${offset}: ${p}`)
      if (VERBOSE) console.log(`${cut.link} ${cut.direction} ${cut.how} @${offset}: ${describeExit(result.value.source)}`)
      // past the last byte that went that way: nothing more to cut
      if (!result.value.broke) break
    }
    return { problems, tried }
  }).pipe(VERBOSE ? (x) => x : Effect.provide(Logger.remove(Logger.defaultLogger)))

describe("a peer that vanishes at every byte offset", () => {
  const cases: ReadonlyArray<{ readonly cut: Cut; readonly reconnect: number; readonly points: ReadonlyArray<number> }> = [
    { cut: { link: "main", direction: "up", how: "reset" }, reconnect: 0, points: offsets(8, 9, 1024) },
    { cut: { link: "main", direction: "up", how: "fin" }, reconnect: 0, points: offsets(8, 23, 1024) },
    { cut: { link: "main", direction: "down", how: "reset" }, reconnect: 0, points: offsets(8, 9, 1024) },
    { cut: { link: "main", direction: "down", how: "fin" }, reconnect: 0, points: offsets(8, 23, 1024) },
    { cut: { link: "channel", direction: "up", how: "reset" }, reconnect: 0, points: offsets(4, 13, 80).concat(offsets(0, 8269, 66 * 1024)) },
    { cut: { link: "channel", direction: "up", how: "fin" }, reconnect: 0, points: offsets(4, 13, 80).concat(offsets(0, 8269, 66 * 1024)) },
    { cut: { link: "channel", direction: "up", how: "reset" }, reconnect: 3, points: offsets(2, 19, 80).concat(offsets(0, 16411, 66 * 1024)) }
  ]
  for (const { cut, points, reconnect } of cases) {
    it.live(`the ${cut.link === "main" ? "main channel" : "first multifd channel"} ${cut.how === "reset" ? "reset" : "ended (FIN)"} after k bytes ${cut.direction === "up" ? "from the source" : "from the destination"}${reconnect > 0 ? " (re-attaching)" : ""}, for k up to ${points[points.length - 1]!}`, () =>
      Effect.gen(function*() {
        const result = yield* cutSweep(cut, reconnect, points)
        if (VERBOSE) console.log(`${JSON.stringify(cut)}: ${result.tried} points`)
        expect(result.problems).toEqual([])
      }), 120_000)
  }
})

// ---------------------------------------------------------------------------------------------------------
// What the sweeps found, each on its own

describe("found by the sweeps", () => {
  it.live("the source's Bye cut by a reset (its main channel reset as it says it heard Done): the destination fails saying the source may not have heard Done, as it does for a close", () =>
    Effect.gen(function*() {
      // where Bye starts: the main channel's bytes from the source, less Bye's frame (4 bytes of length, its JSON)
      const whole = yield* cutAt({ link: "main", direction: "up", how: "reset" }, 1 << 20, 0)
      expect(whole.broke).toBe(false)
      const bye = Control.encode(new Control.Bye())
      for (const how of ["reset", "fin"] as const) {
        const result = yield* expectNothingLeft(cutAt({ link: "main", direction: "up", how }, whole.total - bye.length, 0))
        expect(result.broke).toBe(true)
        expect(Exit.isSuccess(result.source)).toBe(true)
        const error = failureOf(result.destination) as { readonly message: string }
        expect(error.message).toMatch(/^main channel: .*, after Done and before the source said it heard Done \(Bye\): the source may not have, and may go on with its memory$/)
      }
    }).pipe(Effect.provide(Logger.remove(Logger.defaultLogger))))

  it.live("a multifd channel reset before its init packet arrived, the source not re-attaching (reconnect 0): the source fails at once naming the channel, not at the peer timeout", () =>
    Effect.gen(function*() {
      // the destination turns the broken connection away as a stranger (a few bytes name no migration) and waits
      // for the channel; the source has written every page and waits for the flush's answer, reading nothing on
      // the channel: only its connection's reset, which it must watch for, tells it the channel is gone
      const result = yield* expectNothingLeft(cutAt({ link: "channel", direction: "up", how: "reset" }, 1, 0))
      expect(result.broke).toBe(true)
      expect(result.problems).toEqual([])
      const error = failureOf(result.source) as { readonly message: string }
      expect(error.message).toMatch(/^multifd channel \d: .*connection reset/)
    }).pipe(Effect.provide(Logger.remove(Logger.defaultLogger))))

  it.live("a TCP listen interrupted while it binds (its address looked up, the port not yet bound) leaves no server listening", () =>
    Effect.gen(function*() {
      // the bind of 127.0.0.1 is a turn or two of the event loop: interrupted at each of the first few
      const left: Array<string> = []
      for (let n = 0; n < 6; n++) {
        const exit = yield* Effect.exit(expectNothingLeft(Effect.scoped(Effect.gen(function*() {
          const fiber = yield* Effect.fork(Effect.scoped(Effect.zipRight(Transport.listen(tcp0), Effect.never)))
          yield* turns(n)
          yield* noHang(Fiber.interrupt(fiber), "interrupting the listen")
        }))))
        if (Exit.isFailure(exit)) left.push(`n=${n}: ${describeExit(exit)}`)
      }
      expect(left).toEqual([])
    }))
})
