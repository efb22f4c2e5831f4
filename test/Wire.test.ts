/**
 * The wire, byte by byte: what a broken path or a hostile peer does to the bytes of a migration, and what each
 * side then says.
 *
 * - One bit flipped in each field of a multifd channel's first bytes (its init packet, its first packet's header,
 *   block name, offsets and payload), plain and zstd, through a proxy on a real migration: success with the very
 *   memory sent, or a typed one-line error on both sides before any timeout; never a byte written outside the
 *   destination's blocks (guard regions around each); nothing left open. (Swept at every offset of the first
 *   packets, main channel and channels, either way, zlib too, on channel threads: all handled; these points keep
 *   one of each field.)
 * - A control message whose frame length was corrupted on the way (one bit of its length flipped: 131 072 bytes
 *   more announced) leaves its reader waiting for bytes its peer never sends, while the peer waits for the answer:
 *   both time out after the peer timeout, and the side inside the frame says so (where it said "without any data
 *   from the source", which was not true).
 *
 * - A destination that accepts and then reads nothing on its multifd channels (a zero window: its buffers and this
 *   side's fill up): the source times out after the peer timeout, holding no more than its channels' batches
 *   (checked by hand: a few MiB of RSS over 64 MiB of pages), and says where sending stopped — the bytes written
 *   that the destination has not taken, and its address (it said only "without progress sending pages").
 *
 * Real sockets on loopback, fake peers (test/support/fakeSource.ts, fakeDestination.ts), the TestClock.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as Option from "effect/Option"
import * as Crypto from "node:crypto"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import type * as MigrationError from "../src/MigrationError.js"
import * as Protocol from "../src/Protocol.js"
import * as Transport from "../src/Transport.js"
import { advanceUntil } from "./support/clock.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { fakeDestination } from "./support/fakeDestination.js"
import { BLOCK, BLOCK_PAGES, fakeSource, PAGE } from "./support/fakeSource.js"
import { noHang } from "./support/guards.js"
import { leakFree } from "./support/handles.js"
import { hostileProxy } from "./support/hostileProxy.js"
import { controlMagic } from "./support/wire.js"
import { expectNothingLeft } from "./support/leakProbe.js"

const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }
const fiberDone = <A, E>(fiber: Fiber.Fiber<A, E>) => Effect.map(Fiber.poll(fiber), Option.isSome)

/** `message`'s frame with one bit of its length flipped (the second byte's: 131 072 bytes more announced). */
const corruptedFrame = (message: Control.Message) => {
  const frame = Control.encode(message)
  frame[1] = frame[1]! ^ 0x02
  return { frame, announced: frame.readUInt32BE(0) }
}

/** The timeout `fiber` failed with once the TestClock moved past it. */
const timeoutOf = <A, E>(fiber: Fiber.Fiber<A, E>, what: string) =>
  Effect.gen(function*() {
    yield* advanceUntil(fiberDone(fiber), what)
    const error = failureOf(yield* Fiber.await(fiber)) as unknown as MigrationError.MigrationError
    expect(error._tag).toBe("MigrationError")
    expect(error.reason).toBe("Timeout")
    expectOneLine(error)
    return error
  })

describe("a control message whose frame length was corrupted on the way (TestClock)", () => {
  it.effect("from the source: the destination times out saying it waited for the rest of the message, not 'without any data'", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: BLOCK, size: BLOCK_PAGES * PAGE }] })
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, ram }))
      const source = yield* fakeSource(listener.address, 1, "none", true)
      yield* source.channel(0)
      // the final flush, its length 131 072 bytes more than its 39: the source then waits for the acknowledgement
      const { announced, frame } = corruptedFrame(new Control.Flush({ round: 0, final: true }))
      yield* source.control.write([frame])
      const error = yield* timeoutOf(destination, "the destination")
      expect(error.message).toBe(
        `timed out after 2s waiting for the rest of a control message of ${announced} bytes on the main channel`
      )
    })))

  it.effect("from the destination: the source times out waiting for the flush's acknowledgement, saying where the answer stopped", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: Crypto.randomBytes(16 * PAGE) }] })
      const { announced, frame } = corruptedFrame(new Control.FlushAck({ round: 0 }))
      // (its FlushAck after it is read as more of that frame)
      const address = yield* fakeDestination({ heartbeats: true, bye: true, onFlush: (control) => control.write([frame]) })
      const source = yield* Effect.forkScoped(
        Migration.migrate({ address, channels: 1, timeouts: TIMEOUTS, reconnect: 0 }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram)
        )
      )
      const error = yield* timeoutOf(source, "the source")
      expect(error.message).toBe(
        "timed out after 2s waiting for the destination to acknowledge the flush " +
          `(its answer stopped inside a control message of ${announced} bytes on the main channel)`
      )
    })))
})

describe("a hello whose block name is half a character (a lone UTF-16 surrogate, which its JSON carries as \\ud83d)", () => {
  it.live("the destination refuses it saying so, not only that a name is 1-255 bytes without NUL (which it is)", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS }))
      const control = yield* Transport.connect(listener.address)
      const hello = new Control.Hello({
        version: Control.VERSION,
        uuid: Crypto.randomUUID(),
        pageSize: PAGE,
        channels: 1,
        compression: "none",
        zeroPage: "multifd",
        blocks: [{ name: "cache-😀".slice(0, 7), size: 16 * PAGE }]
      })
      yield* control.write([controlMagic(), Control.encode(hello)])
      const answer = yield* Control.receive(control)
      expect(answer._tag).toBe("Reject")
      expect((answer as Control.Reject).reason).toBe(
        "invalid memory layout: block name \"cache-\\ud83d\" contains half of a character (a lone UTF-16 surrogate: a " +
          "string cut inside an emoji?), which UTF-8 cannot carry: a name is 1-255 UTF-8 bytes without NUL"
      )
      yield* Fiber.interrupt(destination)
    })))
})

describe("a destination that accepts and never reads its multifd channels (a zero window) (TestClock)", () => {
  it.effect("the source times out after the peer timeout saying how many bytes the destination has not taken, and where", () =>
    leakFree(Effect.gen(function*() {
      // 32 MiB of random pages: more than the kernels' buffers of two loopback connections hold
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: Crypto.randomBytes(32 << 20) }] })
      const listener = yield* Transport.listen(tcp0)
      const held: Array<Transport.Connection> = []
      yield* Effect.forkScoped(Effect.gen(function*() {
        const control = yield* listener.accept
        yield* control.read(4)
        yield* Control.receive(control)
        yield* Control.send(control, new Control.Accept({ heartbeats: true, bye: true }))
        // its channels, accepted and never read
        while (true) held.push(yield* listener.accept)
      }).pipe(Effect.ignore))
      const source = yield* Effect.forkScoped(
        Migration.migrate({ address: listener.address, channels: 2, timeouts: TIMEOUTS, reconnect: 0 }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram)
        )
      )
      const error = yield* timeoutOf(source, "the source")
      const address = Transport.formatAddress(listener.address).replace(/\./g, "\\.")
      expect(error.message).toMatch(new RegExp(
        `^timed out after 2s without progress sending pages \\(\\d+ bytes written on the multifd channels are not taken by ` +
          `${address}: it reads nothing, or the path to it is dead\\)$`
      ))
      expect(held.length).toBe(2)
    })))
})

// ---------------------------------------------------------------------------------------------------------
// One bit flipped in each field of a channel's first bytes

/** Long: an end that came from a timeout is a hang here (each side's guard is far shorter). */
const LONG = { connect: "30 seconds", handshake: "30 seconds", peer: "30 seconds" } as const
const PROMPT_SECONDS = 8
const GUARD = 2 * PAGE
const SIZES = [24, 8] as const
const NAMES = ["pc.ram", "vga"] as const

/** `pages` pages: zero, one repeated byte, random, in turn. */
const image = (pages: number, seed: number): Buffer => {
  const bytes = GuestRam.allocate(pages * PAGE)
  for (let p = 0; p < pages; p++) {
    if (p % 5 === 0) continue
    if (p % 5 === 1) bytes.fill((p + seed) & 0xff, p * PAGE, (p + 1) * PAGE)
    else Crypto.randomFillSync(bytes, p * PAGE, PAGE)
  }
  return bytes
}

/** What is wrong with a side's exit: a failure must be typed, of one line, and no timeout. */
const judge = (exit: Exit.Exit<unknown, unknown>): string | undefined => {
  if (Exit.isSuccess(exit)) return undefined
  const failure = Cause.failureOption(exit.cause)
  if (Option.isNone(failure)) return `not a typed failure: ${Cause.pretty(exit.cause).split("\n")[0]}`
  const error = failure.value as { readonly _tag?: unknown; readonly message?: unknown; readonly reason?: unknown }
  if (typeof error._tag !== "string" || typeof error.message !== "string") return `untyped: ${String(failure.value)}`
  if (error.message.length === 0 || error.message.includes("\n")) return `not one line: ${JSON.stringify(error.message)}`
  if (error.reason === "Timeout") return `a timeout: ${error.message}`
  return undefined
}

/**
 * A migration of two blocks over 2 channels through a proxy that flips `bit` of byte `offset` of the first multifd
 * connection's bytes; the destination's blocks lie in one buffer with a guard region before, between and after
 * them. The problems seen.
 */
const flipped = (compression: Protocol.Compression, offset: number, bit: number) =>
  Effect.scoped(Effect.gen(function*() {
    const sent = SIZES.map((pages, i) => image(pages, i + 1))
    const ram = yield* GuestRam.make({ blocks: NAMES.map((name, i) => ({ name, bytes: sent[i]! })) })
    const backing = Buffer.from(GuestRam.allocate(SIZES.reduce((n, pages) => n + pages * PAGE + GUARD, GUARD)))
    backing.fill(0xa5)
    const was = Buffer.from(backing)
    const views: Array<Buffer> = []
    let at = GUARD
    for (const pages of SIZES) {
      views.push(backing.subarray(at, at + pages * PAGE))
      at += pages * PAGE + GUARD
    }
    const target = yield* GuestRam.make({ blocks: NAMES.map((name, i) => ({ name, bytes: views[i]! })) })
    const listener = yield* Transport.listen(tcp0)
    let admitted = false
    const destination = yield* Effect.fork(Migration.incoming(listener, {
      timeouts: LONG,
      ram: target,
      admit: () => {
        admitted = true
        return undefined
      }
    }))
    let done = false
    const proxy = yield* hostileProxy(listener.address, (link, direction, chunk) => {
      if (done || link.index !== 1 || direction !== "up" || link.judged + chunk.length <= offset) return undefined
      done = true
      const bytes = Buffer.from(chunk)
      bytes[offset - link.judged] = bytes[offset - link.judged]! ^ (1 << bit)
      return { _tag: "Replace", bytes }
    })
    const source = yield* Effect.exit(noHang(
      Migration.migrate({ address: proxy.address, channels: 2, compression, timeouts: LONG, reconnect: 0 }).pipe(
        Effect.provide(Transport.layer),
        Effect.provideService(GuestRam.GuestRam, ram)
      ),
      "the source",
      PROMPT_SECONDS
    ))
    const problems: Array<string> = []
    if (!done) problems.push("nothing flipped")
    const sourceWrong = judge(source)
    if (sourceWrong !== undefined) problems.push(`source: ${sourceWrong}`)
    if (!admitted && Exit.isFailure(source)) {
      // (never admitted: the destination waits for a source, as it should)
      yield* Fiber.interrupt(destination)
    } else {
      const exit = yield* noHang(Fiber.await(destination), "the destination", PROMPT_SECONDS)
      const wrong = judge(exit)
      if (wrong !== undefined) problems.push(`destination: ${wrong}`)
      const same = views.every((view, i) => view.equals(sent[i]!))
      if (Exit.isSuccess(exit) && !same) problems.push("the destination succeeded with other memory")
      if (Exit.isSuccess(source) && !Exit.isSuccess(exit)) problems.push("the source succeeded, the destination failed")
    }
    for (let i = 0, g = 0; i <= SIZES.length; g += GUARD + (SIZES[i] ?? 0) * PAGE, i++) {
      if (!backing.subarray(g, g + GUARD).equals(was.subarray(g, g + GUARD))) problems.push(`guard region ${i} written`)
    }
    return problems
  }))

/** Where the fields are: the init packet, then the first packet's header (at 64), then its payload. */
const H = Protocol.INIT_PACKET_SIZE
const HEADER = Protocol.headerSize(PAGE)
const FIELDS: ReadonlyArray<readonly [string, number, number]> = [
  ["init channel id", 24, 1],
  ["init nonce", 40, 0],
  ["magic", H + 1, 2],
  ["flags: SYNC", H + 11, 0],
  ["flags: a compression bit", H + 11, 3],
  ["flags: an unknown bit", H + 9, 6],
  ["pages_alloc", H + 15, 7],
  ["normal_pages", H + 19, 0],
  ["next_packet_size", H + 21, 1],
  ["packet_num", H + 31, 0],
  ["zero_pages", H + 35, 0],
  ["block name's NUL", H + 70, 0],
  ["offset[0], not aligned", H + 327, 3],
  ["offset[0], another page", H + 326, 4],
  ["offset[127] (unused)", H + 320 + 8 * 127 + 6, 0],
  ["payload", H + HEADER + 100, 5]
]

describe("one bit flipped in each field of a multifd channel's first bytes, through a proxy", () => {
  const cases: ReadonlyArray<readonly [Protocol.Compression, ReadonlyArray<readonly [string, number, number]>]> = [
    ["none", FIELDS.filter(([name]) => name !== "flags: a compression bit")],
    ["zstd", FIELDS.filter(([name]) => /^(flags: a compression bit|next_packet_size|offset\[0\], another|payload)/.test(name))]
  ]
  for (const [compression, fields] of cases) {
    it.live(`${compression}: success with the memory sent, or a typed one-line error on both sides before any timeout; no guard byte written; nothing left`, () =>
      Effect.gen(function*() {
        const problems: Array<string> = []
        for (const [name, offset, bit] of fields) {
          const result = yield* Effect.exit(flipped(compression, offset, bit))
          if (Exit.isFailure(result)) problems.push(`${name} (byte ${offset}, bit ${bit}): ${Cause.pretty(result.cause).split("\n")[0]}`)
          else for (const p of result.value) problems.push(`${name} (byte ${offset}, bit ${bit}): ${p}`)
        }
        expect(problems).toEqual([])
      }).pipe(expectNothingLeft, Effect.provide(Logger.remove(Logger.defaultLogger))), 60_000)
  }
})
