import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as FastCheck from "effect/FastCheck"
import * as Schema from "effect/Schema"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs/promises"
import * as Zlib from "node:zlib"
import * as Protocol from "../src/Protocol.js"

const FIXTURES = new URL("./fixtures/qemu-10.0.2/", import.meta.url)
const RAM_SHA256 = "f7c4d62e4ab0b13c3f01ef0c05bbe9d8aa15afc814434d2d401b5b5715d653f2"
const RAM_SIZE = 4194304

type Reason = Protocol.ProtocolError["reason"]

const HEADER_REASONS: ReadonlyArray<Reason> = [
  "Truncated",
  "BadMagic",
  "BadVersion",
  "BadFlags",
  "BadPageCount",
  "UnknownBlock",
  "BadOffset",
  "BadPayload"
]
const INIT_REASONS: ReadonlyArray<Reason> = ["Truncated", "BadMagic", "BadVersion", "BadChannelId", "BadUuid"]

const FIELD_OF: Record<string, string> = {
  BadMagic: "magic",
  BadVersion: "version"
}

// ---------------------------------------------------------------------------------------------------------
// Arbitraries

const pageSizeArb = FastCheck.constantFrom(4096, 8192, 65536)

const utf8Length = (s: string): number => Buffer.byteLength(s, "utf8")

/** Cuts a string (by code point) so that its UTF-8 encoding is at most `max` bytes. */
const truncateUtf8 = (s: string, max: number): string => {
  let out = ""
  let n = 0
  for (const cp of s) {
    const len = utf8Length(cp)
    if (n + len > max) break
    out += cp
    n += len
  }
  return out
}

/** Block names: 1..255 UTF-8 bytes, no NUL (and no U+FFFD, so that a corrupted name never decodes back). */
const blockNameArb = FastCheck.oneof(
  FastCheck.string({ unit: "binary-ascii", minLength: 1, maxLength: 255 }),
  // any code point but the surrogate halves (fast-check's "binary" unit does the same, but slowly)
  FastCheck.array(FastCheck.integer({ min: 0, max: 0x10ffff - 0x800 }), { minLength: 1, maxLength: 255 }).map((cps) =>
    String.fromCodePoint(...cps.map((cp) => (cp >= 0xd800 ? cp + 0x800 : cp)))
  ),
  FastCheck.constantFrom("mem", "pc.ram", "a".repeat(255), "é".repeat(127) + "a", "😀".repeat(63) + "abc")
)
  .map((s) => truncateUtf8(s.replace(/[\u0000\ufffd]/g, "x"), 255))
  .filter((s) => utf8Length(s) >= 1 && utf8Length(s) <= 255)

interface Case {
  readonly pageSize: number
  readonly compression: Protocol.Compression
  readonly blockSize: number
  readonly channel: number
  readonly header: Protocol.PacketHeader
}

const caseArb: FastCheck.Arbitrary<Case> = FastCheck.record({
  pageSize: pageSizeArb,
  compression: FastCheck.constantFrom(...Protocol.compressions),
  // up to 2^28 pages (2^44 bytes with 64 KiB pages): offsets well above 2^32
  blockPages: FastCheck.oneof(FastCheck.integer({ min: 1, max: 300 }), FastCheck.integer({ min: 1, max: 2 ** 28 })),
  channel: FastCheck.integer({ min: 0, max: 254 }),
  block: blockNameArb,
  packetNum: FastCheck.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
  counts: FastCheck.tuple(FastCheck.nat(), FastCheck.nat(), FastCheck.nat()),
  pages: FastCheck.array(FastCheck.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), {
    minLength: 128,
    maxLength: 128
  }),
  nextPacketSize: FastCheck.integer({ min: 0, max: 0xffff_ffff })
}).map((r): Case => {
  const slots = Protocol.slotsFor(r.pageSize)
  const pagesAlloc = r.counts[0] % (slots + 1)
  const normalPages = r.counts[1] % (pagesAlloc + 1)
  const zeroPages = r.counts[2] % (pagesAlloc - normalPages + 1)
  const used = normalPages + zeroPages
  const offsets = r.pages.slice(0, used).map((x) => Math.floor(x * r.blockPages) * r.pageSize)
  return {
    pageSize: r.pageSize,
    compression: r.compression,
    blockSize: r.blockPages * r.pageSize,
    channel: r.channel,
    header: {
      flags: Protocol.compressionFlags(r.compression),
      pagesAlloc,
      normalPages,
      zeroPages,
      nextPacketSize: r.compression === "none" ? normalPages * r.pageSize : r.nextPacketSize,
      packetNum: r.packetNum,
      block: r.block,
      offsets
    }
  }
})

const limitsOf = (c: Case): Protocol.HeaderLimits => ({
  channel: c.channel,
  pageSize: c.pageSize,
  compression: c.compression,
  blockSize: (name) => (name === c.header.block ? c.blockSize : undefined)
})

const encode = (c: Case, fill = 0xa5): Buffer => {
  const buf = Buffer.alloc(Protocol.headerSize(c.pageSize), fill)
  Protocol.writeHeader(buf, c.pageSize, c.header)
  return buf
}

// ---------------------------------------------------------------------------------------------------------
// Reference validator, written from DESIGN.md §3 and the documented check order of decodeHeader (magic,
// version, flags, page counts, block name, offsets, next_packet_size), with BigInt arithmetic throughout.

const referenceReason = (bytes: Buffer, c: Case): Reason | undefined => {
  const slots = Protocol.slotsFor(c.pageSize)
  if (bytes.length < 320 + 8 * slots) return "Truncated"
  if (bytes.readUInt32BE(0) !== 0x11223344) return "BadMagic"
  if (bytes.readUInt32BE(4) !== 1) return "BadVersion"
  const flags = bytes.readUInt32BE(8)
  const pagesAlloc = bytes.readUInt32BE(12)
  const normal = bytes.readUInt32BE(16)
  const size = bytes.readUInt32BE(20)
  const zero = bytes.readUInt32BE(32)
  if (flags & 1) {
    if (flags > 0x3f) return "BadFlags"
    if (normal !== 0 || zero !== 0 || size !== 0) return "BadPageCount"
    return undefined
  }
  const expected = c.compression === "none" ? 0 : c.compression === "zlib" ? 2 : 4
  if (flags !== expected) return "BadFlags"
  if (pagesAlloc > slots) return "BadPageCount"
  if (normal + zero > pagesAlloc) return "BadPageCount"
  let end = 64
  while (end < 320 && bytes[end] !== 0) end++
  const name = new TextDecoder().decode(bytes.subarray(64, end))
  if (name !== c.header.block) return "UnknownBlock"
  for (let i = 0; i < normal + zero; i++) {
    const off = bytes.readBigUInt64BE(320 + 8 * i)
    if (off % BigInt(c.pageSize) !== 0n || off + BigInt(c.pageSize) > BigInt(c.blockSize)) return "BadOffset"
  }
  if (expected === 0 && size !== normal * c.pageSize) return "BadPayload"
  return undefined
}

const expectProtocolError = (result: Either.Either<unknown, Protocol.ProtocolError>, channel: string): Reason => {
  if (Either.isRight(result)) throw new Error("expected a Left")
  const error = result.left
  expect(error).toBeInstanceOf(Protocol.ProtocolError)
  expect(error._tag).toBe("ProtocolError")
  expect(error.message.startsWith(`${channel}: bad ${error.field}: `)).toBe(true)
  expect(error.message).not.toContain("\n")
  return error.reason
}

// ---------------------------------------------------------------------------------------------------------

describe("Protocol constants", () => {
  it("match QEMU packet version 1", () => {
    expect(Protocol.MAGIC).toBe(0x11223344)
    expect(Protocol.VERSION).toBe(1)
    expect(Protocol.INIT_PACKET_SIZE).toBe(64)
    expect(Protocol.FLAG_SYNC).toBe(0x1)
    expect(Protocol.FLAG_ZLIB).toBe(0x2)
    expect(Protocol.FLAG_ZSTD).toBe(0x4)
    expect(Protocol.COMPRESSION_MASK).toBe(0x3e)
    expect(Protocol.compressionFlags("none")).toBe(0)
    expect(Protocol.slotsFor(4096)).toBe(128)
    expect(Protocol.slotsFor(8192)).toBe(64)
    expect(Protocol.slotsFor(65536)).toBe(8)
    expect(Protocol.headerSize(4096)).toBe(1344)
    expect(Protocol.headerSize(65536)).toBe(320 + 64)
  })
})

describe("init packet", () => {
  const initArb = FastCheck.record({
    uuid: FastCheck.uint8Array({ minLength: 16, maxLength: 16 }),
    id: FastCheck.integer({ min: 0, max: 255 }),
    extra: FastCheck.integer({ min: 1, max: 256 })
  })

  it("round trips through encodeInit / decodeInit", () => {
    FastCheck.assert(
      FastCheck.property(initArb, FastCheck.boolean(), ({ extra, id, uuid }, checkUuid) => {
        const bytes = Protocol.encodeInit({ uuid, id })
        expect(bytes.length).toBe(64)
        expect(bytes.readUInt32BE(0)).toBe(0x11223344)
        expect(bytes.readUInt32BE(4)).toBe(1)
        expect([...bytes.subarray(8, 24)]).toEqual([...uuid])
        expect(bytes[24]).toBe(id)
        expect(bytes.subarray(25).every((b) => b === 0)).toBe(true)
        const channels = Math.min(256, id + extra)
        const decoded = Protocol.decodeInit(bytes, { channels, uuid: checkUuid ? uuid : undefined })
        if (Either.isLeft(decoded)) throw decoded.left
        expect(decoded.right.id).toBe(id)
        expect([...decoded.right.uuid]).toEqual([...uuid])
        // the decoded uuid is a copy, not a view of the packet
        bytes[8] = bytes[8]! ^ 0xff
        expect(decoded.right.uuid[0]).toBe(uuid[0])
      })
    )
  })

  it("decodes from a view at a non-zero offset of a larger buffer", () => {
    const big = Buffer.alloc(200, 0xee)
    const uuid = Uint8Array.from({ length: 16 }, (_, i) => i + 1)
    Protocol.encodeInit({ uuid, id: 5 }).copy(big, 77)
    const decoded = Protocol.decodeInit(big.subarray(77, 77 + 64), { channels: 6, uuid })
    expect(Either.isRight(decoded) && decoded.right.id).toBe(5)
  })

  it("rejects a channel id not below the channel count (QEMU's off-by-one is not copied)", () => {
    FastCheck.assert(
      FastCheck.property(initArb, ({ id, uuid }) => {
        const channels = Math.max(0, id - (id % 7))
        const result = Protocol.decodeInit(Protocol.encodeInit({ uuid, id }), { channels, uuid })
        expect(expectProtocolError(result, `multifd channel ${id}`)).toBe("BadChannelId")
      })
    )
    const result = Protocol.decodeInit(Protocol.encodeInit({ uuid: new Uint8Array(16), id: 2 }), {
      channels: 2,
      uuid: undefined
    })
    expect(expectProtocolError(result, "multifd channel 2")).toBe("BadChannelId")
  })

  it("rejects a uuid other than this migration's", () => {
    FastCheck.assert(
      FastCheck.property(initArb, FastCheck.nat(15), FastCheck.integer({ min: 1, max: 255 }), (init, at, x) => {
        const expected = Uint8Array.from(init.uuid)
        expected[at] = expected[at]! ^ x
        const result = Protocol.decodeInit(Protocol.encodeInit(init), { channels: 256, uuid: expected })
        expect(expectProtocolError(result, `multifd channel ${init.id}`)).toBe("BadUuid")
        if (Either.isLeft(result)) {
          expect(result.left.message).toContain(Protocol.formatUuid(expected))
          expect(result.left.message).toContain(Protocol.formatUuid(init.uuid))
        }
      })
    )
  })

  it("rejects bad magic, bad version and short input with the right reason", () => {
    const good = Protocol.encodeInit({ uuid: new Uint8Array(16), id: 0 })
    const magic = Buffer.from(good)
    magic.writeUInt32BE(0x51455649, 0) // "QEVI"
    const r1 = Protocol.decodeInit(magic, { channels: 2, uuid: undefined })
    expect(expectProtocolError(r1, "unidentified channel")).toBe("BadMagic")
    if (Either.isLeft(r1)) expect(r1.left.message).toBe("unidentified channel: bad magic: 0x51455649, expected 0x11223344")
    const version = Buffer.from(good)
    version.writeUInt32BE(2, 4)
    expect(expectProtocolError(Protocol.decodeInit(version, { channels: 2, uuid: undefined }), "unidentified channel"))
      .toBe("BadVersion")
    expect(
      expectProtocolError(Protocol.decodeInit(good.subarray(0, 63), { channels: 2, uuid: undefined }), "unidentified channel")
    ).toBe("Truncated")
  })

  it("never throws on random bytes or mutated packets", () => {
    const inputArb = FastCheck.oneof(
      FastCheck.uint8Array({ minLength: 0, maxLength: 100 }),
      FastCheck.record({
        init: initArb,
        mutations: FastCheck.array(FastCheck.tuple(FastCheck.nat(63), FastCheck.nat(255)), { minLength: 1, maxLength: 4 })
      }).map(({ init, mutations }) => {
        const bytes = Protocol.encodeInit(init)
        for (const [at, v] of mutations) bytes[at] = v
        return new Uint8Array(bytes)
      })
    )
    FastCheck.assert(
      FastCheck.property(
        inputArb,
        FastCheck.integer({ min: 0, max: 256 }),
        FastCheck.option(FastCheck.uint8Array({ minLength: 16, maxLength: 16 }), { nil: undefined }),
        (bytes, channels, uuid) => {
          const result = Protocol.decodeInit(bytes, { channels, uuid })
          expect(Either.isEither(result)).toBe(true)
          if (Either.isLeft(result)) {
            expect(result.left).toBeInstanceOf(Protocol.ProtocolError)
            expect(INIT_REASONS).toContain(result.left.reason)
            expect(result.left.message).not.toContain("\n")
          } else {
            expect(bytes.length).toBeGreaterThanOrEqual(64)
            expect(result.right.id).toBeLessThan(channels)
          }
        }
      ),
      { numRuns: 500 }
    )
  })
})

describe("RAM packet header", () => {
  it("round trips through writeHeader / decodeHeader", () => {
    FastCheck.assert(
      FastCheck.property(caseArb, FastCheck.constantFrom(0x00, 0xa5, 0xff), (c, fill) => {
        const slots = Protocol.slotsFor(c.pageSize)
        const buf = Buffer.alloc(Protocol.headerSize(c.pageSize), fill)
        const written = Protocol.writeHeader(buf, c.pageSize, c.header)
        expect(written).toBe(320 + 8 * slots)
        if (c.pageSize === 4096) expect(written).toBe(1344)
        const h = c.header
        const used = h.normalPages + h.zeroPages

        // the raw layout, field by field
        expect(buf.readUInt32BE(0)).toBe(0x11223344)
        expect(buf.readUInt32BE(4)).toBe(1)
        expect(buf.readUInt32BE(8)).toBe(h.flags)
        expect(buf.readUInt32BE(12)).toBe(h.pagesAlloc)
        expect(buf.readUInt32BE(16)).toBe(h.normalPages)
        expect(buf.readUInt32BE(20)).toBe(h.nextPacketSize)
        expect(buf.readBigUInt64BE(24)).toBe(h.packetNum)
        expect(buf.readUInt32BE(32)).toBe(h.zeroPages)
        expect(buf.subarray(36, 64).every((b) => b === 0)).toBe(true)
        const nameLen = utf8Length(h.block)
        expect(buf.subarray(64, 64 + nameLen).equals(Buffer.from(h.block, "utf8"))).toBe(true)
        expect(buf.subarray(64 + nameLen, 320).every((b) => b === 0)).toBe(true)
        for (let i = 0; i < used; i++) expect(buf.readBigUInt64BE(320 + 8 * i)).toBe(BigInt(h.offsets[i]!))
        expect(buf.subarray(320 + 8 * used, written).every((b) => b === 0)).toBe(true)

        const offsets = new Float64Array(slots).fill(-1)
        const decoded = Protocol.decodeHeader(buf, limitsOf(c), offsets)
        if (Either.isLeft(decoded)) throw decoded.left
        expect(decoded.right).toEqual({
          sync: false,
          normalPages: h.normalPages,
          zeroPages: h.zeroPages,
          nextPacketSize: h.nextPacketSize,
          packetNum: h.packetNum,
          block: h.block,
          blockSize: c.blockSize
        })
        expect(Array.from(offsets.subarray(0, used))).toEqual(Array.from(h.offsets))
      }),
      { numRuns: 300 }
    )
  })

  it("decodes from a view at a non-zero offset of a larger buffer", () => {
    const c: Case = {
      pageSize: 4096,
      compression: "zstd",
      blockSize: 1 << 20,
      channel: 1,
      header: {
        flags: Protocol.FLAG_ZSTD,
        pagesAlloc: 128,
        normalPages: 2,
        zeroPages: 1,
        nextPacketSize: 1234,
        packetNum: 9n,
        block: "pc.ram",
        offsets: [8192, 0, 4096 * 255]
      }
    }
    const big = Buffer.alloc(5000, 0x77)
    encode(c).copy(big, 1001)
    const offsets = new Float64Array(128)
    const decoded = Protocol.decodeHeader(big.subarray(1001, 1001 + 1344), limitsOf(c), offsets)
    if (Either.isLeft(decoded)) throw decoded.left
    expect(decoded.right.block).toBe("pc.ram")
    expect(Array.from(offsets.subarray(0, 3))).toEqual([8192, 0, 4096 * 255])
  })

  it("a 255-byte block name fills the field; its last byte stays NUL", () => {
    const c: Case = {
      pageSize: 4096,
      compression: "none",
      blockSize: 4096,
      channel: 0,
      header: {
        flags: 0,
        pagesAlloc: 0,
        normalPages: 0,
        zeroPages: 0,
        nextPacketSize: 0,
        packetNum: 0n,
        block: "b".repeat(255),
        offsets: []
      }
    }
    const buf = encode(c, 0xff)
    expect(buf[319]).toBe(0)
    const decoded = Protocol.decodeHeader(buf, limitsOf(c), new Float64Array(128))
    expect(Either.isRight(decoded) && decoded.right.block).toBe("b".repeat(255))
    // a longer name is cut so that the field stays NUL-terminated, as QEMU forces ramblock[255] = 0
    const long = encode({ ...c, header: { ...c.header, block: "c".repeat(300) } }, 0xff)
    expect(long.toString("latin1", 64, 319)).toBe("c".repeat(255))
    expect(long[319]).toBe(0)
  })

  it("never throws on mutated headers; a Left has the reason of the first failing check", () => {
    const mutationArb = (size: number) =>
      FastCheck.array(
        FastCheck.tuple(
          FastCheck.oneof(
            FastCheck.integer({ min: 0, max: 63 }),
            FastCheck.integer({ min: 64, max: 70 }),
            FastCheck.integer({ min: 320, max: 336 }),
            FastCheck.integer({ min: 0, max: size - 1 })
          ),
          FastCheck.nat(255)
        ),
        { minLength: 1, maxLength: 6 }
      )
    FastCheck.assert(
      FastCheck.property(
        caseArb.chain((c) => FastCheck.tuple(FastCheck.constant(c), mutationArb(Protocol.headerSize(c.pageSize)))),
        ([c, mutations]) => {
          const buf = encode(c)
          for (const [at, v] of mutations) buf[at] = v
          const result = Protocol.decodeHeader(buf, limitsOf(c), new Float64Array(Protocol.slotsFor(c.pageSize)))
          expect(Either.isEither(result)).toBe(true)
          const expected = referenceReason(buf, c)
          if (expected === undefined) {
            if (Either.isLeft(result)) throw result.left
          } else {
            expect(expectProtocolError(result, `multifd channel ${c.channel}`)).toBe(expected)
            if (Either.isLeft(result) && expected in FIELD_OF) expect(result.left.field).toBe(FIELD_OF[expected])
          }
        }
      ),
      { numRuns: 2000 }
    )
  })

  it("never throws on whole-field corruption; a Left has the reason of the first failing check", () => {
    // (byte position, width) of every u32/u64 field of the fixed part, plus the first offset slots
    const fields: ReadonlyArray<readonly [number, 4 | 8]> = [
      [0, 4],
      [4, 4],
      [8, 4],
      [12, 4],
      [16, 4],
      [20, 4],
      [24, 8],
      [32, 4],
      [36, 4],
      [320, 8],
      [328, 8],
      [336, 8]
    ]
    FastCheck.assert(
      FastCheck.property(
        caseArb,
        FastCheck.constantFrom(...fields),
        FastCheck.oneof(
          FastCheck.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
          FastCheck.bigInt({ min: 0n, max: 300n }),
          FastCheck.constantFrom(0x11223344n, 1n, 2n, 3n, 4n, 0x80000000n, 0xffffffffn, 2n ** 53n, 2n ** 63n)
        ),
        (c, [at, width], value) => {
          const buf = encode(c)
          if (width === 4) buf.writeUInt32BE(Number(value & 0xffffffffn), at)
          else buf.writeBigUInt64BE(value, at)
          const result = Protocol.decodeHeader(buf, limitsOf(c), new Float64Array(Protocol.slotsFor(c.pageSize)))
          const expected = referenceReason(buf, c)
          if (expected === undefined) {
            if (Either.isLeft(result)) throw result.left
          } else {
            expect(expectProtocolError(result, `multifd channel ${c.channel}`)).toBe(expected)
          }
        }
      ),
      { numRuns: 2000 }
    )
  })

  it("never throws on random bytes", () => {
    FastCheck.assert(
      FastCheck.property(
        caseArb,
        FastCheck.uint8Array({ minLength: 0, maxLength: 1400 }),
        FastCheck.boolean(),
        (c, random, prefix) => {
          const buf = Buffer.from(random)
          if (prefix && buf.length >= 8) {
            buf.writeUInt32BE(0x11223344, 0)
            buf.writeUInt32BE(1, 4)
          }
          const result = Protocol.decodeHeader(buf, limitsOf(c), new Float64Array(Protocol.slotsFor(c.pageSize)))
          expect(Either.isEither(result)).toBe(true)
          if (Either.isLeft(result)) {
            expect(result.left).toBeInstanceOf(Protocol.ProtocolError)
            expect(HEADER_REASONS).toContain(result.left.reason)
            expect(result.left.reason).toBe(referenceReason(buf, c))
            expect(result.left.message.startsWith(`multifd channel ${c.channel}: bad `)).toBe(true)
          } else {
            expect(referenceReason(buf, c)).toBeUndefined()
          }
        }
      ),
      { numRuns: 1000 }
    )
  })

  describe("targeted corruptions", () => {
    const base: Case = {
      pageSize: 4096,
      compression: "none",
      blockSize: 64 * 4096,
      channel: 3,
      header: {
        flags: 0,
        pagesAlloc: 128,
        normalPages: 2,
        zeroPages: 1,
        nextPacketSize: 2 * 4096,
        packetNum: 42n,
        block: "mem",
        offsets: [4096, 8192, 0]
      }
    }
    const decode = (buf: Buffer, c: Case = base) => Protocol.decodeHeader(buf, limitsOf(c), new Float64Array(128))
    const reasonOf = (buf: Buffer, c: Case = base) => expectProtocolError(decode(buf, c), `multifd channel ${c.channel}`)

    it("accepts the uncorrupted header", () => {
      expect(Either.isRight(decode(encode(base)))).toBe(true)
    })

    it("wrong magic -> BadMagic, naming the channel", () => {
      const buf = encode(base)
      buf.writeUInt32BE(0xdeadbeef, 0)
      const result = decode(buf)
      expect(reasonOf(buf)).toBe("BadMagic")
      if (Either.isLeft(result)) {
        expect(result.left.message).toBe("multifd channel 3: bad magic: 0xdeadbeef, expected 0x11223344")
        expect(result.left.channel).toBe(3)
      }
    })

    it("wrong version -> BadVersion", () => {
      for (const v of [0, 2, 0xffffffff]) {
        const buf = encode(base)
        buf.writeUInt32BE(v, 4)
        expect(reasonOf(buf)).toBe("BadVersion")
      }
    })

    it("compression bits other than negotiated on a data packet -> BadFlags", () => {
      for (const compression of Protocol.compressions) {
        for (const flags of [0, 2, 4, 6, 0x3e, 0x40, 0x80000000]) {
          if (flags === Protocol.compressionFlags(compression)) continue
          const c: Case = {
            ...base,
            compression,
            header: { ...base.header, flags: Protocol.compressionFlags(compression), nextPacketSize: 8192 }
          }
          const buf = encode(c)
          buf.writeUInt32BE(flags, 8)
          expect(reasonOf(buf, c)).toBe("BadFlags")
        }
      }
    })

    it("unknown bits on a SYNC packet -> BadFlags", () => {
      const buf = Buffer.alloc(1344)
      Protocol.writeSync(buf, 4096, 1n)
      buf.writeUInt32BE(0x41, 8)
      expect(reasonOf(buf)).toBe("BadFlags")
    })

    it("a SYNC packet carrying pages -> BadPageCount", () => {
      for (const at of [16, 20, 32]) {
        const buf = Buffer.alloc(1344)
        Protocol.writeSync(buf, 4096, 1n)
        buf.writeUInt32BE(1, at)
        expect(reasonOf(buf)).toBe("BadPageCount")
      }
    })

    it("unknown block -> UnknownBlock", () => {
      const buf = encode({ ...base, header: { ...base.header, block: "mem2" } })
      expect(reasonOf(buf)).toBe("UnknownBlock")
      const empty = encode({ ...base, header: { ...base.header, block: "" } })
      expect(reasonOf(empty)).toBe("UnknownBlock")
    })

    it("offset not page aligned or outside the block -> BadOffset", () => {
      for (const [slot, value] of [
        [0, 1],
        [1, 4097],
        [2, 4095],
        [0, base.blockSize],
        [1, base.blockSize + 4096],
        [2, base.blockSize - 1],
        [0, 2 ** 40],
        [0, Number.MAX_SAFE_INTEGER - 4095]
      ] as const) {
        const buf = encode(base)
        buf.writeBigUInt64BE(BigInt(value), 320 + 8 * slot)
        const result = decode(buf)
        expect(reasonOf(buf)).toBe("BadOffset")
        if (Either.isLeft(result)) expect(result.left.field).toBe(`offset[${slot}]`)
      }
      const huge = encode(base)
      huge.writeBigUInt64BE(2n ** 64n - 4096n, 320)
      expect(reasonOf(huge)).toBe("BadOffset")
      // the last page of the block is fine
      const last = encode(base)
      last.writeBigUInt64BE(BigInt(base.blockSize - 4096), 320)
      expect(Either.isRight(decode(last))).toBe(true)
    })

    it("normal+zero > pages_alloc, or pages_alloc > slots -> BadPageCount", () => {
      const counts = encode(base)
      counts.writeUInt32BE(3, 12) // pages_alloc 3, used 3: fine
      expect(Either.isRight(decode(counts))).toBe(true)
      counts.writeUInt32BE(2, 12)
      expect(reasonOf(counts)).toBe("BadPageCount")
      const alloc = encode(base)
      alloc.writeUInt32BE(129, 12)
      expect(reasonOf(alloc)).toBe("BadPageCount")
      const overflow = encode(base)
      overflow.writeUInt32BE(0xffffffff, 16)
      overflow.writeUInt32BE(0xffffffff, 32)
      expect(reasonOf(overflow)).toBe("BadPageCount")
    })

    it("next_packet_size other than normal_pages * page size without compression -> BadPayload", () => {
      const buf = encode(base)
      buf.writeUInt32BE(3 * 4096, 20)
      expect(reasonOf(buf)).toBe("BadPayload")
    })

    it("a short header -> Truncated", () => {
      expect(reasonOf(encode(base).subarray(0, 1343))).toBe("Truncated")
    })
  })
})

describe("SYNC packets", () => {
  it("writeSync writes flags exactly 0x1, pages_alloc 0 and nothing else but magic, version and packet_num", () => {
    FastCheck.assert(
      FastCheck.property(
        pageSizeArb,
        FastCheck.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
        FastCheck.constantFrom(...Protocol.compressions),
        FastCheck.integer({ min: 0, max: 255 }),
        (pageSize, packetNum, compression, channel) => {
          const buf = Buffer.alloc(Protocol.headerSize(pageSize), 0xff)
          expect(Protocol.writeSync(buf, pageSize, packetNum)).toBe(Protocol.headerSize(pageSize))
          const expected = Buffer.alloc(Protocol.headerSize(pageSize))
          expected.writeUInt32BE(0x11223344, 0)
          expected.writeUInt32BE(1, 4)
          expected.writeUInt32BE(1, 8)
          expected.writeBigUInt64BE(packetNum, 24)
          expect(buf.equals(expected)).toBe(true)
          // decodes as SYNC whatever compression was negotiated, and touches no offset
          const offsets = new Float64Array(Protocol.slotsFor(pageSize)).fill(7)
          const decoded = Protocol.decodeHeader(
            buf,
            { channel, pageSize, compression, blockSize: () => undefined },
            offsets
          )
          if (Either.isLeft(decoded)) throw decoded.left
          expect(decoded.right).toEqual({
            sync: true,
            normalPages: 0,
            zeroPages: 0,
            nextPacketSize: 0,
            packetNum,
            block: "",
            blockSize: 0
          })
          expect(offsets.every((o) => o === 7)).toBe(true)
        }
      ),
      { numRuns: 200 }
    )
  })
})

// ---------------------------------------------------------------------------------------------------------
// Real QEMU 10.0.2 captures

interface Packet {
  readonly header: Buffer
  readonly decoded: Protocol.DecodedHeader
  readonly offsets: ReadonlyArray<number>
  readonly payload: Buffer
}

const readFixture = (path: string) => Effect.promise(() => Fs.readFile(new URL(path, FIXTURES)))

const memLimits = (channel: number, compression: Protocol.Compression): Protocol.HeaderLimits => ({
  channel,
  pageSize: 4096,
  compression,
  blockSize: (name) => (name === "mem" ? RAM_SIZE : undefined)
})

/** Splits a captured multifd stream into its init packet and packets, validating each header. */
const parseChannel = (bytes: Buffer, file: number, compression: Protocol.Compression) => {
  const init = Protocol.decodeInit(bytes.subarray(0, 64), { channels: 2, uuid: new Uint8Array(16) })
  if (Either.isLeft(init)) throw init.left
  expect(init.right.id).toBe(file)
  expect([...init.right.uuid]).toEqual(new Array(16).fill(0))
  const packets: Array<Packet> = []
  let at = 64
  const offsets = new Float64Array(128)
  while (at < bytes.length) {
    const header = bytes.subarray(at, at + 1344)
    const decoded = Protocol.decodeHeader(header, memLimits(file, compression), offsets)
    if (Either.isLeft(decoded)) throw decoded.left
    const used = decoded.right.normalPages + decoded.right.zeroPages
    const payload = bytes.subarray(at + 1344, at + 1344 + decoded.right.nextPacketSize)
    expect(payload.length).toBe(decoded.right.nextPacketSize)
    packets.push({ header, decoded: decoded.right, offsets: Array.from(offsets.subarray(0, used)), payload })
    at += 1344 + decoded.right.nextPacketSize
  }
  // every stream ends exactly at the end of its last packet
  expect(at).toBe(bytes.length)
  return packets
}

const reencode = (p: Packet, compression: Protocol.Compression): Buffer => {
  const out = Buffer.alloc(1344, 0xcc)
  const d = p.decoded
  const n = Protocol.writeHeader(out, 4096, {
    flags: d.sync ? Protocol.FLAG_SYNC : Protocol.compressionFlags(compression),
    pagesAlloc: d.sync ? 0 : 128,
    normalPages: d.normalPages,
    zeroPages: d.zeroPages,
    nextPacketSize: d.nextPacketSize,
    packetNum: d.packetNum,
    block: d.block,
    offsets: p.offsets
  })
  expect(n).toBe(1344)
  return out
}

describe("QEMU 10.0.2 captures", () => {
  it.effect("none-2ch: decodes every packet and reassembles ram.img byte for byte", () =>
    Effect.gen(function*() {
      const ramImg = yield* readFixture("ram.bin")
      expect(ramImg.length).toBe(RAM_SIZE)
      expect(Crypto.createHash("sha256").update(ramImg).digest("hex")).toBe(RAM_SHA256)
      const ram = Buffer.alloc(RAM_SIZE)
      const seen = new Uint8Array(RAM_SIZE / 4096)
      const packetNums: Array<bigint> = []
      let normal = 0
      let zero = 0
      for (const file of [0, 1]) {
        const bytes = yield* readFixture(`none-2ch/multifd-${file}.bin`)
        const packets = parseChannel(bytes, file, "none")
        expect(packets.map((p) => (p.decoded.sync ? "S" : "D")).join(" ")).toBe("S D D D D S S")
        // packet_num increases within a channel
        const nums = packets.map((p) => p.decoded.packetNum)
        expect([...nums].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))).toEqual(nums)
        packetNums.push(...nums)
        for (const p of packets) {
          // writeHeader re-encodes the captured header byte for byte (same flags, pages_alloc, offset order)
          expect(reencode(p, "none").equals(p.header)).toBe(true)
          const d = p.decoded
          if (d.sync) {
            expect(p.header.readUInt32BE(8)).toBe(0x1)
            expect(p.header.readUInt32BE(12)).toBe(0)
            continue
          }
          expect(d.block).toBe("mem")
          expect(d.blockSize).toBe(RAM_SIZE)
          expect(p.header.readUInt32BE(8)).toBe(0)
          expect(p.header.readUInt32BE(12)).toBe(128)
          expect(d.normalPages + d.zeroPages).toBe(128)
          expect(d.nextPacketSize).toBe(d.normalPages * 4096)
          for (let i = 0; i < d.normalPages; i++) {
            const o = p.offsets[i]!
            p.payload.copy(ram, o, i * 4096, (i + 1) * 4096)
            seen[o / 4096]!++
          }
          for (let i = d.normalPages; i < d.normalPages + d.zeroPages; i++) seen[p.offsets[i]! / 4096]!++
          normal += d.normalPages
          zero += d.zeroPages
        }
      }
      expect(normal).toBe(819)
      expect(zero).toBe(205)
      expect(seen.every((n) => n === 1)).toBe(true)
      expect([...packetNums].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))).toEqual(
        Array.from({ length: 14 }, (_, i) => BigInt(i))
      )
      expect(ram.equals(ramImg)).toBe(true)
      expect(Crypto.createHash("sha256").update(ram).digest("hex")).toBe(RAM_SHA256)
    }))

  it.effect("zlib-2ch and zstd-2ch: every header decodes with its compression and re-encodes byte for byte", () =>
    Effect.gen(function*() {
      for (const compression of ["zlib", "zstd"] as const) {
        let normal = 0
        for (const file of [0, 1]) {
          const bytes = yield* readFixture(`${compression}-2ch/multifd-${file}.bin`)
          const packets = parseChannel(bytes, file, compression)
          expect(packets.map((p) => (p.decoded.sync ? "S" : "D")).join(" ")).toBe("S D D D D S S")
          for (const p of packets) {
            expect(reencode(p, compression).equals(p.header)).toBe(true)
            // SYNC packets carry flags exactly 0x1 even on compressed channels
            expect(p.header.readUInt32BE(8)).toBe(p.decoded.sync ? 0x1 : Protocol.compressionFlags(compression))
            normal += p.decoded.normalPages
          }
          // the same stream read as if "none" had been negotiated fails on the first data packet
          const firstData = packets.find((p) => !p.decoded.sync)!
          const result = Protocol.decodeHeader(firstData.header, memLimits(file, "none"), new Float64Array(128))
          expect(expectProtocolError(result, `multifd channel ${file}`)).toBe("BadFlags")
        }
        expect(normal).toBe(819)
      }
    }))

  it.effect("zlib-2ch: one zlib stream per channel, sync-flushed per packet, reassembles ram.img", () =>
    Effect.gen(function*() {
      const ramImg = yield* readFixture("ram.bin")
      const ram = Buffer.alloc(RAM_SIZE)
      for (const file of [0, 1]) {
        const bytes = yield* readFixture(`zlib-2ch/multifd-${file}.bin`)
        const data = parseChannel(bytes, file, "zlib").filter((p) => !p.decoded.sync)
        for (const p of data) expect(p.payload.subarray(-4).toString("hex")).toBe("0000ffff")
        const pages = Zlib.inflateSync(Buffer.concat(data.map((p) => p.payload)), {
          finishFlush: Zlib.constants.Z_SYNC_FLUSH
        })
        let at = 0
        for (const p of data) {
          for (let i = 0; i < p.decoded.normalPages; i++) {
            pages.copy(ram, p.offsets[i]!, at, at + 4096)
            at += 4096
          }
        }
        expect(at).toBe(pages.length)
      }
      expect(ram.equals(ramImg)).toBe(true)
    }))

  describe("a real QEMU data header with one field corrupted", () => {
    const firstDataHeader = Effect.gen(function*() {
      const bytes = yield* readFixture("none-2ch/multifd-0.bin")
      const packets = parseChannel(bytes, 0, "none")
      return Buffer.from(packets.find((p) => !p.decoded.sync)!.header)
    })

    const cases: ReadonlyArray<readonly [string, (b: Buffer) => void, Reason, string]> = [
      ["magic", (b) => b.writeUInt32BE(0x11223345, 0), "BadMagic", "magic"],
      ["version", (b) => b.writeUInt32BE(2, 4), "BadVersion", "version"],
      ["flags 0x2 with none negotiated", (b) => b.writeUInt32BE(0x2, 8), "BadFlags", "flags"],
      ["ramblock \"nope\"", (b) => b.write("nope\0", 64, "utf8"), "UnknownBlock", "ramblock"],
      ["an offset 4097", (b) => b.writeBigUInt64BE(4097n, 320 + 8 * 5), "BadOffset", "offset[5]"],
      ["an offset = block size", (b) => b.writeBigUInt64BE(BigInt(RAM_SIZE), 320 + 8 * 127), "BadOffset", "offset[127]"],
      ["normal_pages 200", (b) => b.writeUInt32BE(200, 16), "BadPageCount", "page counts"],
      ["pages_alloc 129", (b) => b.writeUInt32BE(129, 12), "BadPageCount", "pages_alloc"]
    ]

    for (const [name, corrupt, reason, field] of cases) {
      it.effect(`${name} -> ${reason}`, () =>
        Effect.gen(function*() {
          const header = yield* firstDataHeader
          expect(Either.isRight(Protocol.decodeHeader(header, memLimits(0, "none"), new Float64Array(128)))).toBe(true)
          corrupt(header)
          const result = Protocol.decodeHeader(header, memLimits(0, "none"), new Float64Array(128))
          expect(expectProtocolError(result, "multifd channel 0")).toBe(reason)
          if (Either.isLeft(result)) {
            expect(result.left.field).toBe(field)
            expect(result.left.message.startsWith(`multifd channel 0: bad ${field}: `)).toBe(true)
          }
        }))
    }
  })
})

describe("limits: one source for channels, page sizes and compression levels", () => {
  it("channels: integers 1-255; the problem names what was checked", () => {
    for (const n of [1, 2, 128, 255]) expect(Protocol.checkChannels(n)).toBeUndefined()
    for (const n of [0, -1, 256, 1.5, NaN, Infinity]) {
      expect(Protocol.isChannels(n)).toBe(false)
      expect(Protocol.checkChannels(n, "--channels")).toBe(`--channels must be between 1 and 255, not ${n}`)
    }
  })

  it("page sizes: powers of two from 512 to 524288", () => {
    for (let n = 512; n <= 512 * 1024; n *= 2) expect(Protocol.checkPageSize(n)).toBeUndefined()
    for (const n of [256, 1024 * 1024, 1000, 4095, 4096.5, 0, -4096]) {
      expect(Protocol.isPageSize(n)).toBe(false)
      expect(Protocol.checkPageSize(n)).toBe(`page size must be a power of two between 512 and 524288, not ${n}`)
    }
  })

  it("compression levels: zlib 0-9, zstd 0-20, any without compression", () => {
    expect(Protocol.checkCompressionLevel("zlib", 0)).toBeUndefined()
    expect(Protocol.checkCompressionLevel("zlib", 9)).toBeUndefined()
    expect(Protocol.checkCompressionLevel("zlib", 10)).toBe("zlib level 10 is out of range 0-9")
    expect(Protocol.checkCompressionLevel("zstd", 20)).toBeUndefined()
    expect(Protocol.checkCompressionLevel("zstd", 21)).toBe("zstd level 21 is out of range 0-20")
    expect(Protocol.checkCompressionLevel("zstd", 1.5)).toBe("zstd level 1.5 is out of range 0-20")
    expect(Protocol.checkCompressionLevel("none", 99)).toBeUndefined()
  })

  it("the plain checks say what the schemas say (they are kept apart from Schema for the channel threads)", () => {
    const values = [0, 1, 2, 3, 255, 256, 511, 512, 513, 4096, 65536, 524288, 524289, 1048576, -4096, 1.5, NaN, Infinity]
    for (const n of values) {
      expect(Protocol.isChannels(n)).toBe(Schema.is(Protocol.Channels)(n))
      expect(Protocol.isPageSize(n)).toBe(Schema.is(Protocol.PageSize)(n))
      for (const method of ["zlib", "zstd"] as const) {
        expect(Protocol.checkCompressionLevel(method, n) === undefined).toBe(Schema.is(Protocol.CompressionLevel(method))(n))
      }
    }
    for (const u of ["4", null, undefined, 4n]) {
      expect(Protocol.isChannels(u)).toBe(false)
      expect(Protocol.isPageSize(u)).toBe(false)
    }
  })
})
