import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs/promises"
import { PassThrough } from "node:stream"
import * as Zlib from "node:zlib"
import * as GuestRam from "../src/GuestRam.js"
import * as Incompressible from "../src/internal/incompressible.js"
import { openStreams as openZlibStreams } from "../src/internal/native/zlibStream.js"
import { openContexts as openZstdContexts } from "../src/internal/native/zstdStream.js"
import * as Migration from "../src/Migration.js"
import * as PageCodec from "../src/PageCodec.js"
import * as Protocol from "../src/Protocol.js"
import * as Transport from "../src/Transport.js"
import { expectNoLeaks, tempSocketPath } from "./support/handles.js"

const FIXTURES = new URL("./fixtures/qemu-10.0.2/", import.meta.url)
const PAGE = 4096
const SLOTS = Protocol.slotsFor(PAGE)

// ---------------------------------------------------------------------------------------------------------
// A Connection that serves the bytes of a buffer (a capture, or payloads an encoder produced)

const bufferConnection = (bytes: Buffer): Effect.Effect<Transport.Connection, never, Scope.Scope> =>
  Effect.suspend(() => {
    const stream = new PassThrough()
    stream.end(bytes)
    return Transport.fromStream(stream, "buffer")
  })

// ---------------------------------------------------------------------------------------------------------
// Real QEMU 10.0.2 captures

interface Manifest {
  readonly channels: number
  readonly compression: Protocol.Compression
  readonly normal_pages_per_channel: Record<string, number>
  readonly zero_pages_per_channel: Record<string, number>
  readonly data_packets_per_channel: Record<string, number>
  readonly sync_packets_per_channel: Record<string, number>
}

const readFixture = (path: string) => Effect.promise(() => Fs.readFile(new URL(path, FIXTURES)))

/** Replays one captured multifd stream through a decoder into `ram`; returns what it counted. */
const replay = (capture: Buffer, compression: Protocol.Compression, ram: Buffer, firstData = 0) =>
  Effect.scoped(Effect.gen(function*() {
    const connection = yield* bufferConnection(capture)
    const init = yield* Protocol.decodeInit(yield* connection.read(Protocol.INIT_PACKET_SIZE), {
      channels: 2,
      uuid: undefined
    })
    const codec = yield* PageCodec.decoder(compression, init.id)
    const header = Buffer.alloc(Protocol.headerSize(PAGE))
    const offsets = new Float64Array(SLOTS)
    const limits: Protocol.HeaderLimits = {
      channel: init.id,
      pageSize: PAGE,
      compression,
      blockSize: (name) => (name === "mem" ? ram.length : undefined)
    }
    let data = 0
    let syncs = 0
    let normal = 0
    let zero = 0
    let payloadBytes = 0
    while (!(yield* connection.atEnd)) {
      yield* connection.readInto(header, 0, header.length)
      const packet = yield* Protocol.decodeHeader(header, limits, offsets)
      if (packet.sync) {
        syncs++
        continue
      }
      if (data++ < firstData) {
        // skip this packet's payload: the decoder never sees it
        yield* connection.read(packet.nextPacketSize)
        continue
      }
      yield* codec.decode(connection, packet.nextPacketSize, ram, offsets, packet.normalPages, PAGE)
      for (let i = packet.normalPages; i < packet.normalPages + packet.zeroPages; i++) {
        ram.fill(0, offsets[i]!, offsets[i]! + PAGE)
      }
      normal += packet.normalPages
      zero += packet.zeroPages
      payloadBytes += packet.nextPacketSize
    }
    return { id: init.id, data, syncs, normal, zero, payloadBytes }
  }))

describe("QEMU 10.0.2 captures", () => {
  for (const capture of ["none-2ch", "zlib-2ch", "zstd-2ch"] as const) {
    it.effect(`${capture}: every channel decodes, packet by packet, into ram.img`, () =>
      Effect.gen(function*() {
        const manifest = JSON.parse((yield* readFixture(`${capture}/manifest.json`)).toString("utf8")) as Manifest
        const expected = yield* readFixture("ram.bin")
        // garbage everywhere: every page must be written (normal) or cleared (zero)
        const ram = Buffer.alloc(expected.length, 0xa5)
        for (let id = 0; id < manifest.channels; id++) {
          const stream = yield* readFixture(`${capture}/multifd-${id}.bin`)
          const counted = yield* replay(stream, manifest.compression, ram)
          expect(counted.id).toBe(id)
          expect(counted.data).toBe(manifest.data_packets_per_channel[id])
          expect(counted.syncs).toBe(manifest.sync_packets_per_channel[id])
          expect(counted.normal).toBe(manifest.normal_pages_per_channel[id])
          expect(counted.zero).toBe(manifest.zero_pages_per_channel[id])
          if (manifest.compression !== "none") expect(counted.payloadBytes).toBeLessThan(counted.normal * PAGE)
        }
        expect(ram.equals(expected)).toBe(true)
      }))
  }

  for (const capture of ["zlib-2ch", "zstd-2ch"] as const) {
    it.effect(`${capture}: a later packet alone does not decode (one stream per channel), and nothing is written`, () =>
      Effect.gen(function*() {
        const stream = yield* readFixture(`${capture}/multifd-0.bin`)
        const ram = Buffer.alloc(4 << 20, 0xa5)
        const result = yield* Effect.either(replay(stream, capture === "zlib-2ch" ? "zlib" : "zstd", ram, 1))
        expect(Either.isLeft(result)).toBe(true)
        const error = Either.getLeft(result).pipe((o) => o._tag === "Some" ? o.value : undefined)
        expect(error?._tag).toBe("CodecError")
        expect(error?._tag === "CodecError" && error.reason).toBe("Corrupt")
        expect(error?._tag === "CodecError" && error.channel).toBe(0)
        expect(ram.equals(Buffer.alloc(4 << 20, 0xa5))).toBe(true)
      }))
  }
})

// ---------------------------------------------------------------------------------------------------------
// Round trips over many packets on one stream

/** 512 pages: random, zero, one repeated byte, and copies of earlier pages (back references across packets). */
const makeMemory = (seed: number): Buffer => {
  const pages = 512
  const memory = Buffer.alloc(pages * PAGE)
  let x = seed
  const next = () => (x = (x * 1103515245 + 12345) >>> 0)
  for (let p = 0; p < pages; p++) {
    const kind = p % 4
    if (kind === 0) Crypto.randomFillSync(memory, p * PAGE, PAGE)
    else if (kind === 1) memory.fill(next() & 0xff, p * PAGE, (p + 1) * PAGE)
    else if (kind === 2 && p > 8) {
      const from = next() % (p - 1)
      memory.copy(memory, p * PAGE, from * PAGE, (from + 1) * PAGE)
    }
    // kind 3 (and early kind 2): zero
  }
  return memory
}

/** Packets: runs, shuffled pages, single pages, full packets, and packets without pages. */
const makePackets = (pages: number): ReadonlyArray<Float64Array> => {
  const packets: Array<Float64Array> = []
  let p = 0
  let k = 0
  while (p < pages) {
    const shape = k++ % 5
    const count = shape === 0 ? Math.min(SLOTS, pages - p) : shape === 1 ? 1 : shape === 2 ? 0 : Math.min(37 + k, pages - p)
    const offsets = Float64Array.from({ length: count }, (_, i) => (p + i) * PAGE)
    if (shape === 3) offsets.reverse() // unsorted, as QEMU's zero-page detection leaves them
    if (shape === 4) for (let i = 0; i + 1 < count; i += 2) [offsets[i], offsets[i + 1]] = [offsets[i + 1]!, offsets[i]!]
    packets.push(offsets)
    p += count
  }
  return packets
}

/** Encodes every packet on one channel stream, then decodes them all on one decoder; returns the payloads. */
const roundTrip = (
  compression: Protocol.Compression,
  level: number | undefined,
  memory: Buffer,
  options?: PageCodec.EncoderOptions
) =>
  Effect.scoped(Effect.gen(function*() {
    const encoder = yield* PageCodec.encoder(compression, level, options)
    const packets = makePackets(memory.length / PAGE)
    const payloads: Array<Buffer> = []
    for (const offsets of packets) {
      const chunks: Array<Uint8Array> = []
      const size = yield* encoder.encode(memory, offsets, offsets.length, PAGE, chunks)
      const payload = Buffer.concat(chunks)
      expect(payload.length).toBe(size)
      payloads.push(payload)
    }
    const decoder = yield* PageCodec.decoder(compression, 3)
    const target = Buffer.alloc(memory.length, 0x5a)
    const connection = yield* bufferConnection(Buffer.concat(payloads))
    for (let i = 0; i < packets.length; i++) {
      const offsets = packets[i]!
      yield* decoder.decode(connection, payloads[i]!.length, target, offsets, offsets.length, PAGE)
    }
    expect(yield* connection.atEnd).toBe(true)
    expect(target.equals(memory)).toBe(true)
    return { packets, payloads }
  }))

describe("round trips", () => {
  for (let level = 0; level <= 9; level++) {
    it.effect(`zlib level ${level}`, () =>
      Effect.gen(function*() {
        const memory = makeMemory(level)
        const { packets, payloads } = yield* roundTrip("zlib", level, memory)
        const data = payloads.filter((_, i) => packets[i]!.length > 0)
        // zlib header once, at the start of the first payload; every payload ends with a sync flush
        expect(data[0]!.readUInt8(0)).toBe(0x78)
        expect((data[0]!.readUInt16BE(0) % 31)).toBe(0)
        for (const payload of data) expect(payload.subarray(-4).toString("hex")).toBe("0000ffff")
        // packets without normal pages carry no payload (as QEMU)
        for (let i = 0; i < packets.length; i++) if (packets[i]!.length === 0) expect(payloads[i]!.length).toBe(0)
        // an independent inflate of the concatenation sees one stream with every page in order
        const all = Zlib.inflateSync(Buffer.concat(payloads), { finishFlush: Zlib.constants.Z_SYNC_FLUSH })
        expect(all.length).toBe(packets.reduce((n, p) => n + p.length, 0) * PAGE)
        if (level > 0) expect(all.length).toBeGreaterThan(Buffer.concat(payloads).length)
      }))
  }

  for (const level of [1, 6, 9]) {
    it.effect(`zlib level ${level} on the calling thread (a channel thread's way), in pieces`, () =>
      Effect.gen(function*() {
        const memory = makeMemory(200 + level)
        const pool = yield* roundTrip("zlib", level, memory, { runOn: "pool" })
        const caller = yield* roundTrip("zlib", level, memory, { runOn: "caller" })
        const data = caller.payloads.filter((_, i) => caller.packets[i]!.length > 0)
        expect(data[0]!.readUInt8(0)).toBe(0x78)
        for (const payload of data) expect(payload.subarray(-4).toString("hex")).toBe("0000ffff")
        // the same stream either way: an independent inflate sees the same pages
        const inflate = (payloads: ReadonlyArray<Buffer>) =>
          Zlib.inflateSync(Buffer.concat(payloads), { finishFlush: Zlib.constants.Z_SYNC_FLUSH })
        expect(inflate(caller.payloads).equals(inflate(pool.payloads))).toBe(true)
      }))
  }

  for (const runOn of ["pool", "caller"] as const) {
    it.effect(`zlib (${runOn}): every packet's payload is written into one buffer of the encoder's`, () =>
      Effect.scoped(Effect.gen(function*() {
        // 8 packets of 512 KiB of random pages: more output than any buffer of Node's own (1 MiB at most)
        const memory = Crypto.randomBytes(8 * SLOTS * PAGE)
        const encoder = yield* PageCodec.encoder("zlib", 1, { runOn })
        expect(encoder.output).toBe("reused")
        const buffers = new Set<ArrayBufferLike>()
        for (let k = 0; k < 8; k++) {
          const offsets = Float64Array.from({ length: SLOTS }, (_, i) => (k * SLOTS + i) * PAGE)
          const chunks: Array<Uint8Array> = []
          const size = yield* encoder.encode(memory, offsets, SLOTS, PAGE, chunks)
          expect(chunks.length).toBe(1)
          expect(chunks[0]!.length).toBe(size)
          expect(chunks[0]!.byteOffset).toBe(0)
          buffers.add(chunks[0]!.buffer)
        }
        expect(buffers.size).toBe(1)
      })))
  }

  for (const level of [1, 3, 9, 19]) {
    it.effect(`zstd level ${level}`, () =>
      Effect.gen(function*() {
        const memory = makeMemory(100 + level)
        const { packets, payloads } = yield* roundTrip("zstd", level, memory)
        const data = payloads.filter((_, i) => packets[i]!.length > 0)
        // one frame for the channel's life: its magic only at the start of the first payload
        expect(data[0]!.readUInt32LE(0)).toBe(0xfd2fb528)
        for (const payload of data.slice(1)) expect(payload.readUInt32LE(0)).not.toBe(0xfd2fb528)
        const total = data.reduce((n, p) => n + p.length, 0)
        expect(total).toBeLessThan(memory.length * 0.6)
      }))
  }

  it.effect("levels: defaults are QEMU's (1), out of range is BadLevel", () =>
    Effect.gen(function*() {
      expect(PageCodec.checkLevel("zlib", undefined)).toEqual(Either.right(1))
      expect(PageCodec.checkLevel("zstd", undefined)).toEqual(Either.right(1))
      for (const [c, l] of [["zlib", 10], ["zlib", -1], ["zstd", 21], ["zlib", 1.5]] as const) {
        const e = PageCodec.checkLevel(c, l)
        expect(Either.isLeft(e) && e.left.reason).toBe("BadLevel")
      }
      const exit = yield* Effect.exit(Effect.scoped(PageCodec.encoder("zlib", 12)))
      expect(Exit.isFailure(exit)).toBe(true)
      expect(PageCodec.checkAvailable("zstd")).toEqual(Either.void)
    }))
})

// ---------------------------------------------------------------------------------------------------------
// Incompressible pages: stored, not searched (zlib)

/** `pages` pages of random-looking bytes, the same every run (AES-CTR's key stream under a fixed key). */
const randomPages = (pages: number, seed = 1): Buffer => {
  const key = Buffer.alloc(16, seed)
  return Crypto.createCipheriv("aes-128-ctr", key, Buffer.alloc(16)).update(Buffer.alloc(pages * PAGE))
}

/** `pages` pages of a real program's bytes (this Node.js binary's, past its first MiB). */
const programPages = (pages: number): Effect.Effect<Buffer> =>
  Effect.promise(async () => {
    const file = await Fs.open(process.execPath, "r")
    try {
      const bytes = Buffer.alloc(pages * PAGE)
      await file.read(bytes, 0, bytes.length, 1 << 20)
      return bytes
    } finally {
      await file.close()
    }
  })

/** `pages` pages of English text. */
const textPages = (pages: number): Buffer =>
  Buffer.from(
    "The destination reads every packet's pages straight into guest memory, and says so when asked. ".repeat(
      Math.ceil((pages * PAGE) / 96)
    )
  ).subarray(0, pages * PAGE)

/**
 * The deflate blocks of a payload that starts on a block boundary (after the zlib header for the first):
 * the stored blocks' lengths, or `undefined` if a block is not stored.
 */
const storedBlocks = (payload: Buffer, from: number): Array<number> | undefined => {
  const lengths: Array<number> = []
  let at = from
  while (at < payload.length) {
    const type = (payload[at]! >> 1) & 3
    if (type !== 0) return undefined
    // a stored block's 3 header bits, then the rest of that byte, then LEN and NLEN
    const length = payload.readUInt16LE(at + 1)
    expect(payload.readUInt16LE(at + 3)).toBe(length ^ 0xffff)
    lengths.push(length)
    at += 5 + length
  }
  return lengths
}

describe("incompressible pages", () => {
  it.effect("judged from a sample: random bytes are, text, a program, zeros, half a page and a repeated block are not", () =>
    Effect.gen(function*() {
      const judge = (pages: Buffer) => {
        const kinds = new Uint8Array(pages.length / PAGE)
        return Incompressible.judge(pages, kinds.length, PAGE, kinds)
      }
      expect(judge(randomPages(256))).toBeGreaterThanOrEqual(255)
      expect(judge(textPages(64))).toBe(0)
      expect(judge(Buffer.alloc(64 * PAGE))).toBe(0)
      const program = yield* programPages(256)
      // a program's pages: a few are (its compressed or random data), most are not
      expect(judge(program)).toBeLessThan(256 / 10)
      // half random, half zero: deflate halves it
      const half = Buffer.alloc(16 * PAGE)
      for (let p = 0; p < 16; p++) randomPages(1, p + 2).copy(half, p * PAGE, 0, PAGE / 2)
      expect(judge(half)).toBe(0)
      // a 1 KiB random block copied over the page: random bytes, but deflate finds the repeats
      const repeated = Buffer.alloc(16 * PAGE)
      for (let p = 0; p < 16; p++) {
        const block = randomPages(1, p + 40).subarray(0, 1024)
        for (let k = 0; k < 4; k++) block.copy(repeated, p * PAGE + k * 1024)
      }
      expect(judge(repeated)).toBe(0)
      // a buffer not aligned to 4 bytes is judged the same, a byte at a time
      const mixed = Buffer.concat([randomPages(8, 9), program.subarray(0, 8 * PAGE), textPages(2), repeated.subarray(0, 2 * PAGE)])
      const unaligned = Buffer.alloc(mixed.length + 1).subarray(1)
      mixed.copy(unaligned)
      const a = new Uint8Array(20)
      const b = new Uint8Array(20)
      expect(Incompressible.judge(unaligned, 20, PAGE, b)).toBe(Incompressible.judge(mixed, 20, PAGE, a))
      expect(Array.from(b)).toEqual(Array.from(a))
      // pages smaller than a KiB are never judged incompressible
      expect(Incompressible.judge(randomPages(1), 8, 512, new Uint8Array(8))).toBe(0)
    }))

  for (const runOn of ["pool", "caller"] as const) {
    it.effect(`zlib (${runOn}): random pages go out in stored blocks of up to 64 KiB (a copy, not deflate's search)`, () =>
      Effect.scoped(Effect.gen(function*() {
        const memory = randomPages(2 * SLOTS)
        const encoder = yield* PageCodec.encoder("zlib", 1, { runOn })
        const payloads: Array<Buffer> = []
        for (let k = 0; k < 2; k++) {
          const offsets = Float64Array.from({ length: SLOTS }, (_, i) => (k * SLOTS + i) * PAGE)
          const chunks: Array<Uint8Array> = []
          yield* encoder.encode(memory, offsets, SLOTS, PAGE, chunks)
          payloads.push(Buffer.concat(chunks))
        }
        const bytes = SLOTS * PAGE
        for (const [k, payload] of payloads.entries()) {
          const blocks = storedBlocks(payload, k === 0 ? 2 : 0)
          expect(blocks).toBeDefined()
          // deflate's own stored blocks end every 16 KiB of literals, level 0's hold up to 65535 bytes (a page
          // judged wrongly, about one in a thousand, is deflated: a block of its own, and a flush on the pool)
          expect(blocks!.length).toBeLessThanOrEqual(Math.ceil(bytes / 65535) + 4)
          expect(blocks!.reduce((n, length) => n + length, 0)).toBe(bytes)
          expect(blocks!.at(-1)).toBe(0) // the sync flush
        }
        const all = Zlib.inflateSync(Buffer.concat(payloads), { finishFlush: Zlib.constants.Z_SYNC_FLUSH })
        expect(all.equals(memory)).toBe(true)
      })))
  }

  for (const [runOn, level] of [["pool", 1], ["caller", 1], ["caller", 9]] as const) {
    it.effect(`zlib level ${level} (${runOn}): packets that mix random, program and text pages decode, and compress as deflate alone does`, () =>
      Effect.gen(function*() {
        // in each group of 8 pages: random, program, program, text, random, random, program, text
        const program = yield* programPages(256)
        const memory = Buffer.alloc(512 * PAGE)
        for (let p = 0; p < 512; p++) {
          const kind = [0, 1, 1, 2, 0, 0, 1, 2][p % 8]!
          const source = kind === 0 ? randomPages(1, p % 200 + 50) : kind === 1 ? program.subarray((p % 256) * PAGE) : textPages(1)
          source.copy(memory, p * PAGE, 0, PAGE)
        }
        const { packets, payloads } = yield* roundTrip("zlib", level, memory, { runOn })
        const pages = Buffer.concat(packets.flatMap((offsets) => Array.from(offsets, (o) => memory.subarray(o, o + PAGE))))
        const deflated = Zlib.deflateSync(pages, { level }).length
        const ours = payloads.reduce((n, payload) => n + payload.length, 0)
        expect(ours).toBeLessThan(pages.length * 0.8)
        expect(ours).toBeLessThan(deflated * 1.02)
      }))
  }
})

// ---------------------------------------------------------------------------------------------------------
// Hostile payloads: corrupt, truncated, bombs. Nothing may reach memory.

const SENTINEL = 0xc3

/** Encodes `count` packets of pages from `memory` on one stream; returns the payloads and their offsets. */
const encodeAll = (compression: Protocol.Compression, memory: Buffer, packets: ReadonlyArray<Float64Array>) =>
  Effect.scoped(Effect.gen(function*() {
    const encoder = yield* PageCodec.encoder(compression, 1)
    const out: Array<Buffer> = []
    for (const offsets of packets) {
      const chunks: Array<Uint8Array> = []
      yield* encoder.encode(memory, offsets, offsets.length, PAGE, chunks)
      out.push(Buffer.concat(chunks))
    }
    return out
  }))

/** Feeds valid payloads, then `bad` for a packet of `normal` pages; returns the error of the bad one. */
const feedBad = (
  compression: Protocol.Compression,
  valid: ReadonlyArray<Buffer>,
  packets: ReadonlyArray<Float64Array>,
  bad: Buffer,
  normal: number
) =>
  Effect.scoped(Effect.gen(function*() {
    const decoder = yield* PageCodec.decoder(compression, 7)
    const target = Buffer.alloc(1 << 20)
    const connection = yield* bufferConnection(Buffer.concat([...valid, bad]))
    for (let i = 0; i < valid.length; i++) {
      yield* decoder.decode(connection, valid[i]!.length, target, packets[i]!, packets[i]!.length, PAGE)
    }
    const memory = Buffer.alloc(1 << 20, SENTINEL)
    const offsets = Float64Array.from({ length: SLOTS }, (_, i) => i * PAGE)
    const error = yield* Effect.flip(decoder.decode(connection, bad.length, memory, offsets, normal, PAGE))
    expect(memory.equals(Buffer.alloc(1 << 20, SENTINEL))).toBe(true)
    // a broken stream stays broken
    const again = yield* Effect.flip(decoder.decode(yield* bufferConnection(valid[0] ?? bad), (valid[0] ?? bad).length, memory, offsets, 1, PAGE))
    expect(again._tag).toBe("CodecError")
    expect(memory.equals(Buffer.alloc(1 << 20, SENTINEL))).toBe(true)
    return error
  }))

const reasonOf = (error: PageCodec.CodecError | Transport.TransportError) =>
  error._tag === "CodecError" ? `${error.reason} ch${error.channel}` : `TransportError ${error.message}`

describe("hostile payloads", () => {
  const memory = makeMemory(7).subarray(0, 1 << 20)
  const packets = [0, 1, 2].map((k) => Float64Array.from({ length: 64 }, (_, i) => (k * 64 + i) * PAGE))

  for (const compression of ["zlib", "zstd"] as const) {
    it.effect(`${compression}: garbage as the first payload is Corrupt`, () =>
      Effect.gen(function*() {
        const error = yield* feedBad(compression, [], packets, Crypto.randomBytes(5000), 4)
        expect(reasonOf(error)).toBe("Corrupt ch7")
        expect(error.message).toMatch(/multifd channel 7: bad payload/)
      }))

    it.effect(`${compression}: an invalid block after valid packets is Corrupt`, () =>
      Effect.gen(function*() {
        const valid = yield* encodeAll(compression, memory, packets.slice(0, 2))
        // zlib: BFINAL=1 BTYPE=11 (reserved); zstd: a block header of reserved type 3
        const error = yield* feedBad(compression, valid, packets, Buffer.alloc(64, 0xff), 4)
        expect(reasonOf(error)).toBe("Corrupt ch7")
      }))

    it.effect(`${compression}: a payload cut short is TooShort`, () =>
      Effect.gen(function*() {
        const all = yield* encodeAll(compression, memory, packets)
        const error = yield* feedBad(compression, all.slice(0, 2), packets, all[2]!.subarray(0, all[2]!.length >> 1), 64)
        expect(reasonOf(error)).toBe("TooShort ch7")
      }))

    it.effect(`${compression}: a payload for fewer pages than it holds is TooLarge`, () =>
      Effect.gen(function*() {
        const all = yield* encodeAll(compression, memory, packets)
        const error = yield* feedBad(compression, all.slice(0, 2), packets, all[2]!, 63)
        expect(reasonOf(error)).toBe("TooLarge ch7")
      }))

    it.effect(`${compression}: a decompression bomb is TooLarge and memory is untouched`, () =>
      Effect.gen(function*() {
        // 64 MiB of zeros on one stream, flushed: a few KiB of payload claiming one page
        const zeros = Buffer.alloc(64 << 20)
        const bomb = yield* Effect.scoped(Effect.gen(function*() {
          const encoder = yield* PageCodec.encoder(compression, 9)
          const chunks: Array<Uint8Array> = []
          const offsets = Float64Array.from({ length: zeros.length / PAGE }, (_, i) => i * PAGE)
          yield* encoder.encode(zeros, offsets, offsets.length, PAGE, chunks)
          return Buffer.concat(chunks)
        }))
        expect(bomb.length).toBeLessThan(1 << 20)
        const error = yield* feedBad(compression, [], packets, bomb, 1)
        expect(reasonOf(error)).toBe("TooLarge ch7")
      }))

    it.effect(`${compression}: a payload larger than its pages can compress to is refused before it is read`, () =>
      Effect.gen(function*() {
        const error = yield* feedBad(compression, [], packets, Buffer.alloc(4 * PAGE), 2)
        expect(reasonOf(error)).toBe("TooLarge ch7")
        expect(error.message).toMatch(/more than 2 normal pages can compress to/)
      }))

    it.effect(`${compression}: a payload for a packet without normal pages is refused before it is read`, () =>
      Effect.gen(function*() {
        const error = yield* feedBad(compression, [], packets, Buffer.alloc(16), 0)
        expect(reasonOf(error)).toBe("TooLarge ch7")
      }))
  }
})

// ---------------------------------------------------------------------------------------------------------
// Contexts are released on every exit path

const openContexts = () => ({ zlib: openZlibStreams(), zstd: openZstdContexts() })

describe("release", () => {
  const memory = makeMemory(11).subarray(0, 1 << 20)
  const offsets = Float64Array.from({ length: SLOTS }, (_, i) => i * PAGE)

  for (const [compression, runOn] of [["zlib", "pool"], ["zlib", "caller"], ["zstd", undefined]] as const) {
    it.effect(`${compression}${runOn ? ` (${runOn})` : ""}: success, failure, interruption and a failing scope all release`, () =>
      Effect.gen(function*() {
        const before = openContexts()
        // success
        yield* roundTrip(compression, 1, makeMemory(12).subarray(0, 256 * PAGE))
        expect(openContexts()).toEqual(before)
        // failure (corrupt payload)
        yield* feedBad(compression, [], [offsets], Crypto.randomBytes(3000), 2)
        expect(openContexts()).toEqual(before)
        // acquisition in a scope that then fails
        const failed = yield* Effect.exit(Effect.scoped(Effect.gen(function*() {
          yield* PageCodec.encoder(compression, 1)
          yield* PageCodec.decoder(compression, 1)
          expect(openContexts()[compression]).toBe(before[compression] + 2)
          return yield* Effect.fail("boom")
        })))
        expect(Exit.isFailure(failed)).toBe(true)
        expect(openContexts()).toEqual(before)
        // interruption while compressing (zlib: on the thread pool)
        const big = Buffer.alloc(32 << 20)
        Crypto.randomFillSync(big, 0, 8 << 20)
        const all = Float64Array.from({ length: big.length / PAGE }, (_, i) => i * PAGE)
        const scope = yield* Scope.make()
        const encoder = yield* Scope.extend(PageCodec.encoder(compression, 9, { runOn }), scope)
        const fiber = yield* Effect.fork(encoder.encode(big, all, all.length, PAGE, []))
        for (let i = 0; i < 5; i++) yield* Effect.yieldNow()
        yield* Fiber.interrupt(fiber)
        yield* Scope.close(scope, Exit.void)
        expect(openContexts()).toEqual(before)
        // a released encoder is not usable any more
        const after = yield* Effect.exit(encoder.encode(memory, offsets, 1, PAGE, []))
        expect(Exit.isFailure(after)).toBe(true)
      }))
  }
})

// ---------------------------------------------------------------------------------------------------------
// End to end: Migration.migrate → Migration.incoming over a Unix socket

describe("migration with compression", () => {
  for (const compression of ["zlib", "zstd"] as const) {
    it.live(`${compression}: 2 channels, 8 MiB half-zero image arrives byte-identical`, () =>
      expectNoLeaks(Effect.scoped(Effect.gen(function*() {
        const before = openContexts()
        const bytes = Buffer.alloc(8 << 20)
        for (let p = 0; p < bytes.length / PAGE; p++) {
          if (p % 2 === 0) continue
          if (p % 3 === 0) bytes.fill(p & 0xff, p * PAGE, (p + 1) * PAGE)
          else Crypto.randomFillSync(bytes, p * PAGE, PAGE)
        }
        const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes }] })
        const listener = yield* Transport.listen({ _tag: "Unix", path: tempSocketPath(`codec-${compression}`) })
        const dest = yield* Effect.fork(Migration.incoming(listener, { timeouts: { peer: "10 seconds" } }))
        const sent = yield* Migration.migrate({
          address: listener.address,
          channels: 2,
          compression,
          timeouts: { peer: "10 seconds" }
        }).pipe(Effect.provide(Transport.layer), Effect.provideService(GuestRam.GuestRam, ram))
        const received = yield* Fiber.join(dest)
        expect(received.ram.blocks[0]!.bytes.equals(bytes)).toBe(true)
        expect(sent.compression).toBe(compression)
        expect(received.stats.compression).toBe(compression)
        // half the pages are zero (offsets only); a third of the rest is one repeated byte
        expect(sent.wireBytes).toBeLessThan(bytes.length * 0.45)
        expect(openContexts()).toEqual(before)
      }))))
  }
})
