/**
 * Seeded mutation fuzzing of every input the program parses from outside (test/support/fuzz.ts mutates):
 *
 * - our protocol into a destination: a real migration (none, zlib, zstd) recorded per connection through a
 *   proxy, replayed into `Migration.incoming` with bytes flipped or replaced, integers set to 0 / huge /
 *   off-by-one, truncations, packets duplicated, dropped or swapped, block names unknown or unterminated,
 *   payloads corrupted, and control messages' fields given other values or types;
 * - a hostile destination against `Migration.migrate`: the recorded answers, mutated;
 * - QEMU 10.0.2's captures (fixtures/qemu-10.0.2) into `QemuIncoming.incoming`, mutated the same way;
 * - files: a mapped-ram VM file (`MappedRam.read`, `recv file: --from-qemu`), a snapshot (`Snapshot.restore`,
 *   its header also mutated behind a recomputed checksum), and both through the command (`recv file:`);
 * - a hostile QEMU destination against `QemuOutgoing.migrate` (`send --to-qemu`): its return path, mutated.
 *
 * Every case must end within the short timeouts, with success (for our protocol and snapshots: the very memory
 * that was sent) or a typed failure whose message is one line without JavaScript internals (`judgeFailure`);
 * no socket left open, nothing escaping as an unhandled rejection or uncaught exception; the command leaves no
 * output file when it fails. The suite runs a few cases per target with fixed seeds; for a long run:
 * `FUZZ_ITERATIONS=500 FUZZ_SEED=7 FUZZ_VERBOSE=1 npx vitest run test/Fuzz.test.ts -t '<target>'`.
 */
import { describe, expect, it } from "@effect/vitest"
import { afterAll } from "vitest"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as MappedRam from "../src/MappedRam.js"
import * as Migration from "../src/Migration.js"
import * as Protocol from "../src/Protocol.js"
import * as QemuIncoming from "../src/QemuIncoming.js"
import * as QemuOutgoing from "../src/QemuOutgoing.js"
import * as Snapshot from "../src/Snapshot.js"
import * as Transport from "../src/Transport.js"
import {
  controlFrames,
  describeExit,
  joinFrames,
  judgeFailure,
  mutateBytes,
  mutateJsonFrame,
  prng,
  type Recorded,
  recordingProxy,
  type Rng
} from "./support/fuzz.js"
import * as Cli from "./support/cli.js"
import { noHang } from "./support/guards.js"
import { openHandles, settle } from "./support/handles.js"
import { loopbackServer } from "./support/tcpServer.js"

const PAGE = 4096
const ITERATIONS = Number(process.env["FUZZ_ITERATIONS"] ?? 0)
const SEED = Number(process.env["FUZZ_SEED"] ?? 1)
/** Cases per campaign: `n` in the suite, FUZZ_ITERATIONS when fuzzing for long. */
const few = (n: number) => (ITERATIONS > 0 ? ITERATIONS : n)
const VERBOSE = process.env["FUZZ_VERBOSE"] === "1"
/** Short, so that a case that waits (a stream cut, a packet dropped) ends soon; every wait is bounded by one. */
const TIMEOUTS = { connect: "700 millis", handshake: "700 millis", peer: "700 millis" } as const
/** For the real migrations that make the captures: no timeout on a loaded machine. */
const CAPTURE_TIMEOUTS = { connect: "30 seconds", handshake: "30 seconds", peer: "30 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

// process-wide watch for what escapes Effect
const escaped: Array<string> = []
process.on("unhandledRejection", (reason) => escaped.push(`unhandled rejection: ${String(reason)}`))
process.on("uncaughtException", (error) => escaped.push(`uncaught exception: ${String(error)}`))

/** 64 pages in two blocks: random, zero and single-byte pages. */
const sourceImage = () => {
  const block = (pages: number, seed: number) => {
    const bytes = Buffer.alloc(pages * PAGE)
    const rng = prng(seed)
    for (let p = 0; p < pages; p++) {
      const kind = p % 3
      if (kind === 0) Crypto.randomFillSync(bytes, p * PAGE, PAGE)
      else if (kind === 1) bytes.fill(rng.int(256), p * PAGE, (p + 1) * PAGE)
    }
    return bytes
  }
  return [{ name: "pc.ram", bytes: block(48, 1) }, { name: "vga", bytes: block(16, 2) }]
}

// ---------------------------------------------------------------------------------------------------------
// raw sockets for replay

/**
 * Connects, writes `bytes` in pieces; reads whatever comes back, calling `onDone` when a `Done` frame came
 * (the source's cue to close its channels). Destroyed with the scope.
 */
const replayConnection = (
  address: Transport.Address,
  bytes: Uint8Array,
  onDone: (socket: Net.Socket) => void = () => {}
) =>
  Effect.acquireRelease(
    Effect.async<Net.Socket>((resume) => {
      const port = address._tag === "Tcp" ? address.port : 0
      const socket = Net.connect({ host: "127.0.0.1", port, allowHalfOpen: true })
      let heard = ""
      socket.on("error", () => {})
      socket.on("data", (chunk: Buffer) => {
        heard = (heard + chunk.toString("latin1")).slice(-4096)
        if (heard.includes('"_tag":"Done"')) onDone(socket)
      })
      socket.once("connect", () => {
        for (let at = 0; at < bytes.length; at += 64 * 1024) socket.write(bytes.subarray(at, at + 64 * 1024))
        resume(Effect.succeed(socket))
      })
      socket.once("error", () => resume(Effect.succeed(socket)))
    }),
    (socket) => Transport.destroy(socket)
  )

// ---------------------------------------------------------------------------------------------------------
// our own protocol into a destination

interface Capture {
  readonly compression: Protocol.Compression
  readonly image: ReadonlyArray<{ readonly name: string; readonly bytes: Buffer }>
  readonly connections: ReadonlyArray<Recorded>
}

/** A real migration of `sourceImage` through a recording proxy: every connection's bytes. */
const capture = (compression: Protocol.Compression) =>
  Effect.scoped(Effect.gen(function*() {
    const image = sourceImage()
    const ram = yield* GuestRam.make({ blocks: image.map((b) => ({ name: b.name, bytes: Buffer.from(b.bytes) })) })
    const listener = yield* Transport.listen(tcp0)
    const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: CAPTURE_TIMEOUTS }))
    const proxy = yield* recordingProxy(listener.address)
    yield* Migration.migrate({ address: proxy.address, channels: 2, compression, timeouts: CAPTURE_TIMEOUTS, reconnect: 0 }).pipe(
      Effect.provide(Transport.layer),
      Effect.provideService(GuestRam.GuestRam, ram)
    )
    yield* Fiber.join(destination)
    return { compression, image, connections: proxy.recorded() } satisfies Capture
  }))

/** Where the packet headers of a multifd channel's stream are (after its init packet). */
const packetHeaders = (stream: Buffer): Array<number> => {
  const at: Array<number> = []
  const size = Protocol.headerSize(PAGE)
  for (let p = Protocol.INIT_PACKET_SIZE; p + size <= stream.length;) {
    at.push(p)
    p += size + stream.readUInt32BE(p + 20)
  }
  return at
}

/** One mutation of a capture: which connection, and how. */
const mutateCapture = (rng: Rng, c: Capture): { readonly streams: Array<Buffer>; readonly what: string } =>
  mutateStreams(rng, c.connections.map((r) => r.up), true)

/**
 * One mutation of a migration's streams: `streams[0]` is the main channel (ours, framed control messages, when
 * `control`; else QEMU's), the others multifd channels.
 */
const mutateStreams = (
  rng: Rng,
  streams: Array<Buffer>,
  control: boolean
): { readonly streams: Array<Buffer>; readonly what: string } => {
  const target = rng.int(streams.length)
  const stream = streams[target]!
  if (control && target === 0 && rng.int(2) === 0) {
    // a control message's field (the hello most often), its frame re-measured
    const { head, frames, tail } = controlFrames(stream, 4)
    const k = rng.int(2) === 0 ? 0 : rng.int(frames.length)
    const m = mutateJsonFrame(rng, frames[k]!)
    frames[k] = m.body
    streams[0] = joinFrames(head, frames, tail)
    return { streams, what: `main frame ${k}: ${m.what}` }
  }
  if (target === 0 || rng.int(4) === 0) {
    // the main channel (small), or anywhere in a multifd stream
    const m = mutateBytes(rng, stream)
    streams[target] = m.bytes
    return { streams, what: `connection ${target}: ${m.what}` }
  }
  // a multifd channel: a packet's header, the init packet, or a packet-level change
  const headers = packetHeaders(stream)
  const choice = rng.int(6)
  if (choice === 0) {
    const m = mutateBytes(rng, stream, 0, Protocol.INIT_PACKET_SIZE)
    streams[target] = m.bytes
    return { streams, what: `connection ${target} init: ${m.what}` }
  }
  const k = rng.int(headers.length)
  const start = headers[k]!
  const end = k + 1 < headers.length ? headers[k + 1]! : stream.length
  if (choice === 1 && headers.length > 1) {
    // packets duplicated, dropped or swapped
    const packets = headers.map((h, i) => stream.subarray(h, i + 1 < headers.length ? headers[i + 1]! : stream.length))
    const j = rng.int(packets.length)
    const op = rng.int(3)
    if (op === 0) packets.splice(j, 0, packets[k]!)
    else if (op === 1) packets.splice(k, 1)
    else [packets[k], packets[j]] = [packets[j]!, packets[k]!]
    streams[target] = Buffer.concat([stream.subarray(0, Protocol.INIT_PACKET_SIZE), ...packets])
    return { streams, what: `connection ${target}: packet ${k} ${["duplicated before " + j, "dropped", "swapped with " + j][op]}` }
  }
  if (choice === 2 && end - start > Protocol.headerSize(PAGE)) {
    // the payload (a compressed stream corrupted, or raw pages changed)
    const m = mutateBytes(rng, stream, start + Protocol.headerSize(PAGE), end)
    streams[target] = m.bytes
    return { streams, what: `connection ${target} packet ${k} payload: ${m.what}` }
  }
  if (choice === 3) {
    // the block name: unknown, unterminated
    const out = Buffer.from(stream)
    const name = start + Protocol.HEADER_FIXED_SIZE - Protocol.BLOCK_NAME_SIZE
    const op = rng.int(3)
    if (op === 0) out.fill(0x41, name, name + Protocol.BLOCK_NAME_SIZE)
    else if (op === 1) out.write("nope\0", name, "latin1")
    else out.write("vga\0", name, "latin1")
    streams[target] = out
    return { streams, what: `connection ${target} packet ${k} block name ${["unterminated", "unknown", "other block"][op]}` }
  }
  // the header's fields
  const m = mutateBytes(rng, stream, start, Math.min(end, start + (rng.int(2) === 0 ? 48 : Protocol.headerSize(PAGE))))
  streams[target] = m.bytes
  return { streams, what: `connection ${target} packet ${k} header: ${m.what}` }
}

/**
 * Replays `streams` into a fresh destination: the main channel first (kept open), then the multifd channels
 * (each half-closed). What went wrong, if anything.
 */
const replayIntoDestination = (c: Capture, streams: ReadonlyArray<Buffer>) =>
  Effect.gen(function*() {
    const baseline = openHandles()
    const problems: Array<string> = []
    const exit = yield* Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, acceptTimeout: "1500 millis" }).pipe(
        Effect.provide(Logger.remove(Logger.defaultLogger))
      ))
      // the channels end once the destination said Done, and then the main channel, as a source's do
      const channels: Array<Net.Socket> = []
      yield* replayConnection(listener.address, streams[0]!, (main) => {
        channels.forEach((s) => s.end())
        main.end()
      })
      for (const stream of streams.slice(1)) channels.push(yield* replayConnection(listener.address, stream))
      const exit = yield* noHang(Fiber.await(destination), "incoming", 20)
      if (Exit.isSuccess(exit)) {
        const ram = exit.value.ram
        for (const [i, block] of c.image.entries()) {
          if (!ram.blocks[i]!.bytes.equals(block.bytes)) problems.push(`success with other memory in ${block.name}`)
        }
      }
      return exit
    }))
    const leaks = yield* settle(baseline)
    if (leaks.length > 0) problems.push(`left open: ${leaks.join(", ")}`)
    const judged = judgeFailure(exit)
    if (judged !== undefined) problems.push(judged)
    return { exit, problems }
  })

const captures = new Map<Protocol.Compression, Capture>()
const captured = (compression: Protocol.Compression) =>
  Effect.suspend(() => {
    const known = captures.get(compression)
    return known !== undefined
      ? Effect.succeed(known)
      : Effect.tap(capture(compression), (c) => Effect.sync(() => captures.set(compression, c)))
  })

const fuzzDestination = (compression: Protocol.Compression, seed: number, iterations: number) =>
  Effect.gen(function*() {
    const c = yield* captured(compression)
    const rng = prng(seed)
    const found: Array<string> = []
    const outcomes = new Map<string, number>()
    for (let i = 0; i < iterations; i++) {
      const { streams, what } = mutateCapture(rng, c)
      if (VERBOSE) console.log(`${compression} #${i} ${what} ...`)
      const { exit, problems } = yield* replayIntoDestination(c, streams)
      const outcome = describeExit(exit).replace(/\d+/g, "N").slice(0, 140)
      outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1)
      if (VERBOSE) console.log(`${compression} #${i} ${what} -> ${describeExit(exit)}`)
      if (VERBOSE && problems.length > 0) console.log(`  PROBLEM ${problems.join(" | ")}`)
      for (const p of problems) found.push(`${compression} seed ${seed} #${i} (${what}): ${p}`)
      for (const e of escaped.splice(0)) found.push(`${compression} seed ${seed} #${i} (${what}): ${e}`)
    }
    if (ITERATIONS > 0) console.log([...outcomes.entries()].sort((a, b) => b[1] - a[1]).map(([o, n]) => `${n}\t${o}`).join("\n"))
    return found
  })

describe("our protocol into a destination: mutated captures", () => {
  for (const compression of ["none", "zlib", "zstd"] as const) {
    it.live(`${compression}: the unmutated capture replays to success`, () =>
      Effect.gen(function*() {
        const c = yield* captured(compression)
        expect(c.connections.length).toBe(3)
        const { exit, problems } = yield* replayIntoDestination(c, c.connections.map((r) => r.up))
        expect(problems).toEqual([])
        expect(describeExit(exit)).toBe("success")
      }))

    it.live(`${compression}: every mutation fails cleanly or succeeds with the same memory`, () =>
      Effect.gen(function*() {
        const found = yield* fuzzDestination(compression, SEED, few(1))
        expect(found).toEqual([])
      }), ITERATIONS > 0 ? 3_600_000 : 60_000)
  }
})

// ---------------------------------------------------------------------------------------------------------
// a hostile destination against a source

/**
 * A fake destination that answers a source's main channel with `pieces`: piece i after the source's i-th
 * control frame (its hello is frame 0), the rest after the last; other connections are drained.
 */
const hostileDestination = (pieces: ReadonlyArray<Buffer>) =>
  loopbackServer((socket) => {
    let pending = Buffer.alloc(0)
    let main: boolean | undefined
    let frames = 0
    socket.on("data", (chunk: Buffer) => {
      if (main === false) return
      pending = Buffer.concat([pending, chunk])
      if (main === undefined) {
        if (pending.length < 4) return
        main = pending.readUInt32BE(0) === Control.MAGIC
        if (!main) return
        pending = pending.subarray(4)
      }
      while (pending.length >= 4 && pending.length >= 4 + pending.readUInt32BE(0)) {
        pending = pending.subarray(4 + pending.readUInt32BE(0))
        const piece = frames < pieces.length - 1 ? pieces[frames] : frames === pieces.length - 1 ? Buffer.concat(pieces.slice(frames)) : undefined
        frames++
        if (piece !== undefined && piece.length > 0 && !socket.destroyed) socket.write(piece)
      }
    })
  }, { allowHalfOpen: true })

/** The recorded answers of a destination, mutated, in the pieces a hostile destination sends them in. */
const mutateAnswers = (rng: Rng, c: Capture): { readonly pieces: Array<Buffer>; readonly what: string } => {
  const down = c.connections[0]!.down
  const { frames, head } = controlFrames(down, 0)
  const whole = (bytes: Buffer) => cutAsAnswered(frames, bytes)
  const op = rng.int(3)
  if (op === 0) {
    const m = mutateBytes(rng, down)
    return { pieces: whole(m.bytes), what: `answers: ${m.what}` }
  }
  const k = rng.int(frames.length)
  const changed = [...frames]
  let what: string
  if (op === 1) {
    const m = mutateJsonFrame(rng, frames[k]!)
    changed[k] = m.body
    what = `answer ${k}: ${m.what}`
  } else {
    // another message in its place
    const replacement = rng.pick([
      { _tag: "Done" },
      { _tag: "Reject", reason: "no\u001b[31m\nway" },
      { _tag: "Abort", reason: "x".repeat(5000) },
      { _tag: "Abort", reason: "disk", step: "store" },
      { _tag: "Lost", channel: 1 },
      { _tag: "Lost", channel: 99 },
      { _tag: "Reattached", channel: 0, syncs: 9 },
      { _tag: "Reattached", channel: 7, syncs: 0 },
      { _tag: "FlushAck", round: 7 },
      { _tag: "FlushAck", round: -1 },
      { _tag: "Receiving", round: 0, bytes: 1e300 },
      { _tag: "Hashing" },
      { _tag: "Storing" },
      { _tag: "Accept" },
      { _tag: "Hello" },
      { _tag: "Complete", digests: [] }
    ])
    changed[k] = Buffer.from(JSON.stringify(replacement))
    what = `answer ${k} -> ${JSON.stringify(replacement).slice(0, 60)}`
  }
  return { pieces: whole(joinFrames(head, changed)), what }
}

const againstHostile = (c: Capture, pieces: ReadonlyArray<Buffer>, reconnect: number) =>
  Effect.gen(function*() {
    const baseline = openHandles()
    const problems: Array<string> = []
    const exit = yield* Effect.scoped(Effect.gen(function*() {
      const { address } = yield* hostileDestination(pieces)
      const ram = yield* GuestRam.make({ blocks: c.image.map((b) => ({ name: b.name, bytes: Buffer.from(b.bytes) })) })
      return yield* noHang(
        Effect.exit(Migration.migrate({ address, channels: 2, compression: c.compression, timeouts: TIMEOUTS, reconnect }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram),
          Effect.provide(Logger.remove(Logger.defaultLogger))
        )),
        "migrate",
        20
      )
    }))
    const leaks = yield* settle(baseline)
    if (leaks.length > 0) problems.push(`left open: ${leaks.join(", ")}`)
    const judged = judgeFailure(exit)
    if (judged !== undefined) problems.push(judged)
    return { exit, problems }
  })

const fuzzSource = (compression: Protocol.Compression, seed: number, iterations: number) =>
  Effect.gen(function*() {
    const c = yield* captured(compression)
    const rng = prng(seed)
    const found: Array<string> = []
    const outcomes = new Map<string, number>()
    for (let i = 0; i < iterations; i++) {
      const { pieces, what } = mutateAnswers(rng, c)
      const reconnect = rng.int(2)
      if (VERBOSE) console.log(`source ${compression} #${i} ${what} ...`)
      const { exit, problems } = yield* againstHostile(c, pieces, reconnect)
      const outcome = describeExit(exit).replace(/\d+/g, "N").slice(0, 140)
      outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1)
      if (VERBOSE) console.log(`source ${compression} #${i} ${what} -> ${describeExit(exit)}`)
      if (VERBOSE && problems.length > 0) console.log(`  PROBLEM ${problems.join(" | ")}`)
      for (const p of problems) found.push(`source ${compression} seed ${seed} #${i} (${what}): ${p}`)
      for (const e of escaped.splice(0)) found.push(`source ${compression} seed ${seed} #${i} (${what}): ${e}`)
    }
    if (ITERATIONS > 0) console.log([...outcomes.entries()].sort((a, b) => b[1] - a[1]).map(([o, n]) => `${n}\t${o}`).join("\n"))
    return found
  })

describe("a hostile destination against a source: mutated answers", () => {
  it.live("the unmutated answers: the source succeeds", () =>
    Effect.gen(function*() {
      const c = yield* captured("none")
      const { exit, problems } = yield* againstHostile(c, mutateAnswersNone(c), 0)
      expect(problems).toEqual([])
      expect(describeExit(exit)).toBe("success")
    }))

  it.live("every mutation: the source fails cleanly or succeeds", () =>
    Effect.gen(function*() {
      const found = yield* fuzzSource("none", SEED, few(3))
      expect(found).toEqual([])
    }), ITERATIONS > 0 ? 3_600_000 : 60_000)
})

/** The recorded answers, unchanged, in their pieces. */
const mutateAnswersNone = (c: Capture) => {
  const { frames } = controlFrames(c.connections[0]!.down, 0)
  return cutAsAnswered(frames, joinFrames(Buffer.alloc(0), frames))
}

/**
 * `bytes` (the answers, maybe mutated) cut where the original answers to one of the source's frames ended: after
 * each Accept and FlushAck (heartbeats go with the answer they preceded); the last piece takes the rest.
 */
const cutAsAnswered = (frames: ReadonlyArray<Buffer>, bytes: Buffer): Array<Buffer> => {
  const ends: Array<number> = []
  let at = 0
  for (const f of frames) {
    at += 4 + f.length
    if (/"_tag":"(Accept|FlushAck)"/.test(f.toString("utf8"))) ends.push(at)
  }
  const pieces: Array<Buffer> = []
  let from = 0
  for (const end of ends) {
    pieces.push(bytes.subarray(Math.min(from, bytes.length), Math.min(end, bytes.length)))
    from = end
  }
  pieces.push(bytes.subarray(Math.min(from, bytes.length)))
  return pieces
}

// ---------------------------------------------------------------------------------------------------------
// QEMU's streams into the QEMU receive paths

const QEMU_FIXTURES = new URL("./fixtures/qemu-10.0.2/", import.meta.url)
const qemuFixture = (path: string): Buffer => Fs.readFileSync(new URL(path, QEMU_FIXTURES))
const RAM_IMG = qemuFixture("ram.bin")
const qemuCapture = (compression: Protocol.Compression): Array<Buffer> =>
  ["main.bin", "multifd-0.bin", "multifd-1.bin"].map((f) => qemuFixture(`${compression}-2ch/${f}`))

/** Replays QEMU's streams (mutated) into `QemuIncoming.incoming`, concurrently, each half-closed as QEMU does. */
const replayIntoQemuIncoming = (compression: Protocol.Compression, streams: ReadonlyArray<Buffer>, vm: boolean) =>
  Effect.gen(function*() {
    const baseline = openHandles()
    const problems: Array<string> = []
    const exit = yield* Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(
        QemuIncoming.incoming(listener, { channels: 2, compression, timeouts: TIMEOUTS, acceptTimeout: "1500 millis", vm }).pipe(
          Effect.provide(Logger.remove(Logger.defaultLogger))
        )
      )
      for (const stream of streams) {
        const socket = yield* replayConnection(listener.address, stream)
        socket.end()
      }
      const exit = yield* noHang(Fiber.await(destination), "QemuIncoming.incoming", 20)
      // (QEMU's stream has no digest: changed pages, or pages sent elsewhere, arrive as they came)
      if (Exit.isSuccess(exit) && exit.value.ram.blocks[0]!.bytes.length !== RAM_IMG.length) problems.push("success with other layout")
      return exit
    }))
    const leaks = yield* settle(baseline)
    if (leaks.length > 0) problems.push(`left open: ${leaks.join(", ")}`)
    const judged = judgeFailure(exit)
    if (judged !== undefined) problems.push(judged)
    return { exit, problems }
  })

/** Runs `iterations` cases of `one`, collecting what went wrong, and (when fuzzing for long) a tally of outcomes. */
const campaign = (
  name: string,
  iterations: number,
  one: (i: number) => Effect.Effect<{ readonly what: string; readonly exit: Exit.Exit<unknown, unknown>; readonly problems: ReadonlyArray<string> }, unknown>
) =>
  Effect.gen(function*() {
    const found: Array<string> = []
    const outcomes = new Map<string, number>()
    for (let i = 0; i < iterations; i++) {
      const { exit, problems, what } = yield* one(i)
      const outcome = describeExit(exit).replace(/\d+/g, "N").slice(0, 140)
      outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1)
      if (VERBOSE) console.log(`${name} #${i} ${what} -> ${describeExit(exit)}`)
      if (VERBOSE && problems.length > 0) console.log(`  PROBLEM ${problems.join(" | ")}`)
      for (const p of problems) found.push(`${name} #${i} (${what}): ${p}`)
      for (const e of escaped.splice(0)) found.push(`${name} #${i} (${what}): ${e}`)
    }
    if (ITERATIONS > 0) console.log([...outcomes.entries()].sort((a, b) => b[1] - a[1]).map(([o, n]) => `${n}\t${o}`).join("\n"))
    return found
  })

describe("QEMU's streams into QemuIncoming: mutated captures", () => {
  for (const compression of ["none", "zlib", "zstd"] as const) {
    it.live(`${compression}: every mutation fails cleanly or succeeds with ram.img`, () =>
      Effect.gen(function*() {
        const rng = prng(SEED + 100)
        const found = yield* campaign(`qemu ${compression}`, few(1), () =>
          Effect.gen(function*() {
            const { streams, what } = mutateStreams(rng, qemuCapture(compression), false)
            const vm = rng.int(2) === 0
            return { what: `${what}${vm ? " (vm)" : ""}`, ...(yield* replayIntoQemuIncoming(compression, streams, vm)) }
          }))
        expect(found).toEqual([])
      }), ITERATIONS > 0 ? 3_600_000 : 60_000)
  }
})

// ---------------------------------------------------------------------------------------------------------
// files: QEMU's mapped-ram (MappedRam.read, recv file: --from-qemu) and our snapshots (recv file:)

const fuzzDir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-fuzz-"))
afterAll(() => Fs.rmSync(fuzzDir, { recursive: true, force: true }))

/** Reads a (mutated) file with `read`; what went wrong. */
const readFile = <A>(bytes: Buffer, read: (path: string) => Effect.Effect<A, unknown>, check: (a: A) => string | undefined) =>
  Effect.gen(function*() {
    const path = Path.join(fuzzDir, `case-${process.pid}.bin`)
    Fs.writeFileSync(path, bytes)
    const baseline = openHandles()
    const exit = yield* noHang(Effect.exit(read(path)), "reading the file", 20)
    const problems: Array<string> = []
    const leaks = yield* settle(baseline)
    if (leaks.length > 0) problems.push(`left open: ${leaks.join(", ")}`)
    const judged = judgeFailure(exit)
    if (judged !== undefined) problems.push(judged)
    if (Exit.isSuccess(exit)) {
      const wrong = check(exit.value)
      if (wrong !== undefined) problems.push(wrong)
    }
    return { exit, problems }
  })

/** The captured VM (none-2ch) as a mapped-ram file. */
const mappedRamFile = Effect.gen(function*() {
  const exit = yield* Effect.scoped(Effect.gen(function*() {
    const listener = yield* Transport.listen(tcp0)
    const destination = yield* Effect.forkScoped(QemuIncoming.incoming(listener, { channels: 2, timeouts: TIMEOUTS, vm: true }))
    for (const stream of qemuCapture("none")) (yield* replayConnection(listener.address, stream)).end()
    return yield* Fiber.join(destination)
  }))
  const path = Path.join(fuzzDir, "whole.vm")
  yield* MappedRam.write(path, exit.vm!)
  return Fs.readFileSync(path)
})

/** The region of a mapped-ram file worth mutating most: everything before the pages (the stream, the bitmap). */
const mappedRamHead = (bytes: Buffer) => Math.min(bytes.length, 0x100000 + 4096)

describe("files: mutated QEMU mapped-ram files and snapshots", () => {
  it.live("MappedRam.read (recv file: --from-qemu): every mutation fails cleanly or reads a VM of the file's size", () =>
    Effect.gen(function*() {
      const original = yield* mappedRamFile
      const rng = prng(SEED + 200)
      const found = yield* campaign("mapped-ram", few(12), () =>
        Effect.gen(function*() {
          const region = rng.int(4) === 0 ? original.length : mappedRamHead(original)
          // the stream and bitmap at the start are sparse: aim at the bytes that are not zero, mostly
          const m = mutateBytes(rng, original, 0, rng.int(2) === 0 ? 1200 : region)
          return { what: m.what, ...(yield* readFile(m.bytes, (path) => MappedRam.read(path), () => undefined)) }
        }))
      expect(found).toEqual([])
    }), ITERATIONS > 0 ? 3_600_000 : 60_000)

  it.live("Snapshot.restore (recv file:): every mutation fails cleanly or restores the saved memory", () =>
    Effect.gen(function*() {
      const image = sourceImage()
      const ram = yield* GuestRam.make({ blocks: image.map((b) => ({ name: b.name, bytes: Buffer.from(b.bytes) })) })
      const saved = Path.join(fuzzDir, "saved.snap")
      yield* Effect.provideService(Snapshot.save(saved, { channels: 2 }), GuestRam.GuestRam, ram)
      yield* ram.gate.open
      const original = Fs.readFileSync(saved)
      const headerBytes = original.readUInt32BE(12)
      const rng = prng(SEED + 300)
      const found = yield* campaign("snapshot", few(4), () =>
        Effect.gen(function*() {
          const op = rng.int(3)
          let bytes: Buffer
          let what: string
          if (op === 0) {
            // the header, its checksum made right again: past the checksum, into the fields
            const m = mutateBytes(rng, original.subarray(0, headerBytes - 32), 0, headerBytes - 32)
            const sum = Crypto.createHash("sha256").update(m.bytes).digest()
            bytes = Buffer.concat([m.bytes, sum, original.subarray(headerBytes)])
            what = `header (checksum fixed): ${m.what}`
          } else {
            const m = mutateBytes(rng, original, 0, op === 1 ? headerBytes + 8192 : original.length)
            bytes = m.bytes
            what = m.what
          }
          const restored = yield* readFile(bytes, (path) => Snapshot.restore(path), (r) =>
            r.ram.blocks.every((b, i) => b.bytes.equals(image[i]!.bytes)) ? undefined : "restored other memory")
          return { what, ...restored }
        }))
      expect(found).toEqual([])
    }), ITERATIONS > 0 ? 3_600_000 : 60_000)
})

describe("the command on mutated files: exit 1 with one line, no output file left, or exit 0 with it", () => {
  /** `recv file:IN ... --out OUT` in this process on `bytes`; what went wrong. */
  const recvFile = (bytes: Buffer, fromQemu: boolean) =>
    Effect.gen(function*() {
      const dir = Fs.mkdtempSync(Path.join(fuzzDir, "cli-"))
      const input = Path.join(dir, "in.bin")
      const out = Path.join(dir, "out.img")
      Fs.writeFileSync(input, bytes)
      const finished = yield* Effect.promise(() => Cli.runHere(["recv", `file:${input}`, ...(fromQemu ? ["--from-qemu"] : []), "--out", out]))
      const problems: Array<string> = []
      const left = Fs.readdirSync(dir).filter((f) => f !== "in.bin" && f !== "out.img")
      if (left.length > 0) problems.push(`left beside the output: ${left.join(", ")}`)
      if (finished.code === 0) {
        if (!Fs.existsSync(out)) problems.push("exit 0 without the output file")
      } else {
        if (Fs.existsSync(out)) problems.push(`exit ${finished.code} with an output file`)
        const lines = finished.stderr.trimEnd().split("\n")
        const last = lines[lines.length - 1]!
        if (!/^multifd: error: /.test(last)) problems.push(`stderr: ${JSON.stringify(finished.stderr)}`)
        const judged = judgeFailure(Exit.fail({ _tag: "stderr", message: last }))
        if (judged !== undefined) problems.push(judged)
      }
      Fs.rmSync(dir, { recursive: true, force: true })
      return { what: `exit ${finished.code}: ${finished.stderr.trim().split("\n").pop()}`, problems }
    })

  it.live("recv file:SNAP and recv file:VM --from-qemu", () =>
    Effect.gen(function*() {
      const vm = yield* mappedRamFile
      const image = sourceImage()
      const ram = yield* GuestRam.make({ blocks: image.map((b) => ({ name: b.name, bytes: Buffer.from(b.bytes) })) })
      const saved = Path.join(fuzzDir, "cli.snap")
      yield* Effect.provideService(Snapshot.save(saved, { channels: 2 }), GuestRam.GuestRam, ram)
      const snap = Fs.readFileSync(saved)
      const rng = prng(SEED + 400)
      const found = yield* campaign("cli", few(4), (i) =>
        Effect.gen(function*() {
          const fromQemu = i % 2 === 1
          const original = fromQemu ? vm : snap
          const m = mutateBytes(rng, original, 0, rng.int(2) === 0 ? 1200 : Math.min(original.length, 0x100000 + 8192))
          const r = yield* recvFile(m.bytes, fromQemu)
          return { what: `${fromQemu ? "vm" : "snap"} ${m.what} -> ${r.what}`, exit: Exit.void, problems: r.problems }
        }))
      expect(found).toEqual([])
    }), ITERATIONS > 0 ? 3_600_000 : 60_000)
})

// ---------------------------------------------------------------------------------------------------------
// a hostile QEMU destination against QemuOutgoing (send --to-qemu): its return path mutated

/** The captured VM migrated by QemuOutgoing into QemuIncoming through a recording proxy: the main channel both ways. */
const capturedReturnPath = Effect.scoped(Effect.gen(function*() {
  const listener = yield* Transport.listen(tcp0)
  const incoming = yield* Effect.forkScoped(QemuIncoming.incoming(listener, { channels: 2, timeouts: CAPTURE_TIMEOUTS, vm: true }))
  const vm = yield* Effect.scoped(Effect.gen(function*() {
    const first = yield* Transport.listen(tcp0)
    const fiber = yield* Effect.forkScoped(QemuIncoming.incoming(first, { channels: 2, timeouts: CAPTURE_TIMEOUTS, vm: true }))
    for (const stream of qemuCapture("none")) (yield* replayConnection(first.address, stream)).end()
    return (yield* Fiber.join(fiber)).vm!
  }))
  const proxy = yield* recordingProxy(listener.address)
  yield* QemuOutgoing.migrate({ address: proxy.address, vm, channels: 2, timeouts: CAPTURE_TIMEOUTS }).pipe(Effect.provide(Transport.layer))
  yield* Fiber.join(incoming)
  const main = proxy.recorded().find((r) => r.up.subarray(0, 4).toString("latin1") === "QEVM")!
  return { vm, main }
}))

/**
 * A QEMU stand-in: on the main channel's first bytes it answers `early` (what QEMU says as the stream opens), once
 * the channel brought `after` bytes (or ended) the rest, `late` (its verdict); other channels are drained.
 */
const hostileQemu = (after: number, early: Buffer, late: Buffer) =>
  loopbackServer((socket) => {
    let received = 0
    let said = 0
    const say = (upTo: number) => {
      if (socket.destroyed) return
      if (said < 1 && upTo >= 1) socket.write(early)
      if (said < 2 && upTo >= 2) socket.write(late)
      said = Math.max(said, upTo)
    }
    socket.on("data", (chunk: Buffer) => {
      received += chunk.length
      say(received >= after ? 2 : 1)
    })
    socket.on("end", () => say(2))
  }, { allowHalfOpen: true })

describe("a hostile QEMU destination against QemuOutgoing: mutated return path", () => {
  it.live("every mutation fails cleanly or succeeds", () =>
    Effect.gen(function*() {
      const { vm, main } = yield* capturedReturnPath
      const rng = prng(SEED + 500)
      const found = yield* campaign("return path", few(4), (i) =>
        Effect.gen(function*() {
          const m = i === 0 ? { bytes: main.down, what: "unmutated" } : mutateBytes(rng, main.down)
          const baseline = openHandles()
          const exit = yield* Effect.scoped(Effect.gen(function*() {
            // QEMU's verdict (SHUT, its last message) once the stream is in; what precedes it at once
            const cut = Math.min(m.bytes.length, main.down.length - 8)
            const after = rng.int(3) === 0 ? 1 + rng.int(main.up.length) : main.up.length
            const { address } = yield* hostileQemu(after, m.bytes.subarray(0, cut), m.bytes.subarray(cut))
            return yield* noHang(
              Effect.exit(QemuOutgoing.migrate({ address, vm, channels: 2, timeouts: TIMEOUTS }).pipe(
                Effect.provide(Transport.layer),
                Effect.provide(Logger.remove(Logger.defaultLogger))
              )),
              "QemuOutgoing.migrate",
              20
            )
          }))
          const problems: Array<string> = []
          const leaks = yield* settle(baseline)
          if (leaks.length > 0) problems.push(`left open: ${leaks.join(", ")}`)
          const judged = judgeFailure(exit)
          if (judged !== undefined) problems.push(judged)
          return { what: m.what, exit, problems }
        }))
      expect(found).toEqual([])
    }), ITERATIONS > 0 ? 3_600_000 : 60_000)
})
