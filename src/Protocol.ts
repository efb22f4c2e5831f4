/**
 * QEMU multifd wire format (packet version 1, as in QEMU 9.0–10.x): constants, encoders and validating
 * decoders. Pure: no I/O, no per-page allocation. All integers are big-endian. It also holds the limits
 * every module checks against (channels, page sizes, compression levels).
 *
 * Longer than 400 lines on purpose: the whole wire format in one place, each encoder beside its validating
 * decoder and each limit beside its check; most of the length is their documentation.
 *
 * @since 0.1.0
 */
import * as Data from "effect/Data"
import * as Either from "effect/Either"
import * as Schema from "effect/Schema"
import * as PeerText from "./internal/peerText.js"

/**
 * Magic number that starts every multifd init and RAM packet.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAGIC = 0x11223344
/**
 * Packet version spoken by QEMU 9.0–10.x.
 *
 * @since 0.1.0
 * @category constants
 */
export const VERSION = 1
/**
 * Size of the init packet a channel sends first.
 *
 * @since 0.1.0
 * @category constants
 */
export const INIT_PACKET_SIZE = 64
/**
 * Fixed part of a RAM packet header, before the offset array.
 *
 * @since 0.1.0
 * @category constants
 */
export const HEADER_FIXED_SIZE = 320
/**
 * Bytes reserved for the NUL-padded RAM block name.
 *
 * @since 0.1.0
 * @category constants
 */
export const BLOCK_NAME_SIZE = 256
/**
 * Payload budget of one packet: the offset array has `PACKET_PAGE_BYTES / pageSize` slots.
 *
 * @since 0.1.0
 * @category constants
 */
export const PACKET_PAGE_BYTES = 512 * 1024
/**
 * SYNC flag: the packet carries no pages and marks a barrier.
 *
 * @since 0.1.0
 * @category constants
 */
export const FLAG_SYNC = 1 << 0
/**
 * Mask of the compression-method bits.
 *
 * @since 0.1.0
 * @category constants
 */
export const COMPRESSION_MASK = 0x1f << 1
/**
 * Compression-method bits for zlib.
 *
 * @since 0.1.0
 * @category constants
 */
export const FLAG_ZLIB = 1 << 1
/**
 * Compression-method bits for zstd.
 *
 * @since 0.1.0
 * @category constants
 */
export const FLAG_ZSTD = 2 << 1

/**
 * Channel compression method.
 *
 * @since 0.1.0
 * @category models
 */
export type Compression = "none" | "zlib" | "zstd"

/**
 * Every compression method, in flag order.
 *
 * @since 0.1.0
 * @category constants
 */
export const compressions: ReadonlyArray<Compression> = ["none", "zlib", "zstd"]

/**
 * The flag bits QEMU sets on data packets for a compression method.
 *
 * @since 0.1.0
 * @category utils
 */
export const compressionFlags = (compression: Compression): number =>
  compression === "zlib" ? FLAG_ZLIB : compression === "zstd" ? FLAG_ZSTD : 0

/** The compression a data packet's flags name, QEMU's accelerated methods included (undefined: not one). */
const compressionOfFlags = (flags: number): string | undefined => {
  switch (flags) {
    case 0:
      return "none"
    case FLAG_ZLIB:
      return "zlib"
    case FLAG_ZSTD:
      return "zstd"
    // QEMU's MULTIFD_FLAG_QPL, MULTIFD_FLAG_UADK and MULTIFD_FLAG_QATZIP (hardware-accelerated methods)
    case 4 << 1:
      return "qpl"
    case 8 << 1:
      return "uadk"
    case 16 << 1:
      return "qatzip"
    default:
      return undefined
  }
}

// ---------------------------------------------------------------------------------------------------------
// Limits: the one source of the rules for channels, page sizes and compression levels (the CLI, Control,
// GuestRam, Migration, QemuIncoming and Snapshot all check against these)

/**
 * Fewest multifd channels of a migration.
 *
 * @since 0.1.0
 * @category limits
 */
export const MIN_CHANNELS = 1

/**
 * Most multifd channels of a migration: the init packet carries a channel's id in one byte (QEMU's limit too).
 *
 * @since 0.1.0
 * @category limits
 */
export const MAX_CHANNELS = 255

/**
 * A channel count: an integer from `MIN_CHANNELS` to `MAX_CHANNELS`. (This module's schemas are marked pure
 * and its checks are plain functions, so that a bundle that uses neither — a channel thread's — leaves effect's
 * Schema out: each thread is an isolate that pays for every module it evaluates.)
 *
 * @since 0.1.0
 * @category limits
 */
export const Channels = /* @__PURE__ */ Schema.Number.pipe(
  /* @__PURE__ */ Schema.int(),
  /* @__PURE__ */ Schema.between(MIN_CHANNELS, MAX_CHANNELS)
)

/**
 * Whether `n` is a channel count.
 *
 * @since 0.1.0
 * @category limits
 */
export const isChannels = (n: unknown): n is number =>
  typeof n === "number" && Number.isInteger(n) && n >= MIN_CHANNELS && n <= MAX_CHANNELS

/**
 * Why `n` is not a channel count, naming it `what` (`--channels`, `multifd channels`); `undefined` when it is
 * one.
 *
 * @since 0.1.0
 * @category limits
 */
export const checkChannels = (n: number, what = "channels"): string | undefined =>
  isChannels(n) ? undefined : `${what} must be between ${MIN_CHANNELS} and ${MAX_CHANNELS}, not ${quotedIfString(n)}`

/** A number for a message, a string (from plain JavaScript) quoted: channels "4" said "not 4". */
const quotedIfString = (n: unknown): string => typeof n === "string" ? JSON.stringify(n) : String(n)

/**
 * Smallest page size.
 *
 * @since 0.1.0
 * @category limits
 */
export const MIN_PAGE_SIZE = 512

/**
 * Largest page size: one page fills a packet's payload budget (`PACKET_PAGE_BYTES`).
 *
 * @since 0.1.0
 * @category limits
 */
export const MAX_PAGE_SIZE = 512 * 1024

/**
 * A page size: a power of two from `MIN_PAGE_SIZE` to `MAX_PAGE_SIZE`.
 *
 * @since 0.1.0
 * @category limits
 */
export const PageSize = /* @__PURE__ */ Schema.Number.pipe(
  /* @__PURE__ */ Schema.int(),
  /* @__PURE__ */ Schema.between(MIN_PAGE_SIZE, MAX_PAGE_SIZE),
  /* @__PURE__ */ Schema.filter((n) => (n & (n - 1)) === 0, { message: () => "Expected a power of two" })
)

/**
 * Whether `n` is a page size.
 *
 * @since 0.1.0
 * @category limits
 */
export const isPageSize = (n: unknown): n is number =>
  typeof n === "number" && Number.isInteger(n) && n >= MIN_PAGE_SIZE && n <= MAX_PAGE_SIZE && (n & (n - 1)) === 0

/**
 * Why `n` is not a page size, naming it `what` (`--page-size`, `page size`); `undefined` when it is one.
 *
 * @since 0.1.0
 * @category limits
 */
export const checkPageSize = (n: number, what = "page size"): string | undefined =>
  isPageSize(n) ? undefined : `${what} must be a power of two between ${MIN_PAGE_SIZE} and ${MAX_PAGE_SIZE}, not ${n}`

/**
 * Why `compression` is not a compression method, naming it `what`; `undefined` when it is one.
 *
 * @since 0.1.0
 * @category limits
 */
export const checkCompression = (compression: unknown, what = "compression"): string | undefined =>
  compressions.includes(compression as Compression)
    ? undefined
    : `${what} ${JSON.stringify(compression)} is not one of ${compressions.join(", ")}`

/**
 * Why `uuid` is not a migration's uuid (16 bytes, as QEMU's `-uuid`), naming it `what`; `undefined` when it is one.
 *
 * @since 0.1.0
 * @category limits
 */
export const checkUuid = (uuid: unknown, what = "uuid"): string | undefined =>
  uuid instanceof Uint8Array && uuid.length === 16
    ? undefined
    : `${what} must be 16 bytes (QEMU's -uuid), not ${uuid instanceof Uint8Array ? `${uuid.length} bytes` : typeof uuid}`

/**
 * Accepted and default levels per compression method: QEMU's `multifd-zlib-level` and `multifd-zstd-level`.
 *
 * @since 0.1.0
 * @category limits
 */
export const compressionLevels = {
  zlib: { min: 0, max: 9, default: 1 },
  zstd: { min: 0, max: 20, default: 1 }
} as const

/**
 * A compression level of `method`: an integer in its range (`compressionLevels`).
 *
 * @since 0.1.0
 * @category limits
 */
export const CompressionLevel = (method: Exclude<Compression, "none">) =>
  Schema.Number.pipe(Schema.int(), Schema.between(compressionLevels[method].min, compressionLevels[method].max))

/**
 * Why `level` is not a level of `method`; `undefined` when it is one (any level goes without compression,
 * which has none: QEMU keeps its levels apart from the method too).
 *
 * @since 0.1.0
 * @category limits
 */
export const checkCompressionLevel = (method: Compression, level: number): string | undefined =>
  method === "none" ||
    (Number.isInteger(level) && level >= compressionLevels[method].min && level <= compressionLevels[method].max)
    ? undefined
    : typeof level !== "number"
    ? `${method} level ${quotedIfString(level)} is not a number (${compressionLevels[method].min}-${compressionLevels[method].max})`
    : `${method} level ${level} is out of range ${compressionLevels[method].min}-${compressionLevels[method].max}`

/**
 * Offset slots in a packet for the given page size (128 for 4 KiB pages).
 *
 * @since 0.1.0
 * @category utils
 */
export const slotsFor = (pageSize: number): number => Math.max(1, Math.floor(PACKET_PAGE_BYTES / pageSize))

/**
 * Size in bytes of a RAM packet header (fixed part plus the offset array) for the given page size.
 *
 * @since 0.1.0
 * @category utils
 */
export const headerSize = (pageSize: number): number => HEADER_FIXED_SIZE + 8 * slotsFor(pageSize)

/**
 * Who a protocol error is about: a multifd channel id, the main channel, or an unidentified connection.
 *
 * @since 0.1.0
 * @category models
 */
export type ChannelRef = number | "main" | "unidentified"

/**
 * A byte that failed validation; names the channel and the field.
 *
 * @since 0.1.0
 * @category errors
 */
export class ProtocolError extends Data.TaggedError("ProtocolError")<{
  readonly reason:
    | "BadMagic"
    | "BadVersion"
    | "BadFlags"
    | "BadPageCount"
    | "UnknownBlock"
    | "BadOffset"
    | "BadChannelId"
    | "DuplicateChannel"
    /** A connection re-attaching a channel without the control channel's authorization (its nonce). */
    | "Unauthorized"
    | "BadUuid"
    | "BadPayload"
    | "BadMessage"
    | "Truncated"
    /** A packet after the final round's SYNC, where only the end of the channel's stream may come. */
    | "AfterEnd"
    /** A channel's uuid differs from the one adopted from the first channel (no uuid was given to expect). */
    | "UuidConflict"
  readonly channel: ChannelRef
  readonly field: string
  readonly detail: string
}> {
  override get message(): string {
    const where = typeof this.channel === "number" ? `multifd channel ${this.channel}` : `${this.channel} channel`
    // what it quotes (a block's name) is the peer's: shown, never acted on
    return `${where}: bad ${this.field}: ${PeerText.printable(this.detail)}`
  }
}

const fail = (
  reason: ProtocolError["reason"],
  channel: ChannelRef,
  field: string,
  detail: string
): Either.Either<never, ProtocolError> => Either.left(new ProtocolError({ reason, channel, field, detail }))

const hex = (n: number): string => "0x" + (n >>> 0).toString(16).padStart(8, "0")

// ---------------------------------------------------------------------------------------------------------
// Init packet

/**
 * The first packet on every multifd channel.
 *
 * @since 0.1.0
 * @category models
 */
export interface InitPacket {
  readonly uuid: Uint8Array
  readonly id: number
  /**
   * A channel re-attaching after its connection was lost: the nonce the source announced on the control
   * channel (16 bytes, in the init packet's reserved bytes 32–47, which QEMU leaves zero). Absent: all zero.
   */
  readonly nonce?: Uint8Array | undefined
}

/** Where an init packet carries a re-attaching channel's nonce, and its length. */
const NONCE_AT = 32
const NONCE_SIZE = 16

/**
 * Encodes an init packet (64 bytes).
 *
 * @since 0.1.0
 * @category encoding
 */
export const encodeInit = (init: InitPacket): Buffer => {
  const buf = Buffer.alloc(INIT_PACKET_SIZE)
  buf.writeUInt32BE(MAGIC, 0)
  buf.writeUInt32BE(VERSION, 4)
  buf.set(init.uuid.subarray(0, 16), 8)
  buf.writeUInt8(init.id, 24)
  if (init.nonce !== undefined) buf.set(init.nonce.subarray(0, NONCE_SIZE), NONCE_AT)
  return buf
}

/**
 * What the receiver expects of an init packet.
 *
 * @since 0.1.0
 * @category models
 */
export interface InitExpectation {
  /** Number of channels of this migration: the id must be below it. */
  readonly channels: number
  /** The migration's uuid; `undefined` accepts any (QEMU sends the `-uuid` of the VM, zeros by default). */
  readonly uuid: Uint8Array | undefined
}

/**
 * Decodes and validates an init packet (exactly 64 bytes).
 *
 * @since 0.1.0
 * @category decoding
 */
export const decodeInit = (
  bytes: Uint8Array,
  expect: InitExpectation
): Either.Either<InitPacket, ProtocolError> => {
  const ch: ChannelRef = "unidentified"
  if (bytes.length < INIT_PACKET_SIZE) {
    return fail("Truncated", ch, "init packet", `${bytes.length} bytes, need ${INIT_PACKET_SIZE}`)
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, INIT_PACKET_SIZE)
  const magic = view.getUint32(0)
  if (magic !== MAGIC) return fail("BadMagic", ch, "magic", `${hex(magic)}, expected ${hex(MAGIC)}`)
  const version = view.getUint32(4)
  if (version !== VERSION) return fail("BadVersion", ch, "version", `${version}, expected ${VERSION}`)
  const id = bytes[24]!
  // the uuid first (as QEMU): a channel of another migration is a stranger whatever id it claims
  const uuid = Uint8Array.prototype.slice.call(bytes, 8, 24)
  if (expect.uuid !== undefined && !Buffer.from(uuid).equals(Buffer.from(expect.uuid))) {
    return fail("BadUuid", id, "uuid", `${formatUuid(uuid)} is not this migration's ${formatUuid(expect.uuid)}`)
  }
  if (id >= expect.channels) {
    return fail("BadChannelId", id, "channel id", `${id} is not below the channel count ${expect.channels}`)
  }
  const nonce = Uint8Array.prototype.slice.call(bytes, NONCE_AT, NONCE_AT + NONCE_SIZE)
  return Either.right(nonce.some((b) => b !== 0) ? { uuid, id, nonce } : { uuid, id })
}

/**
 * Formats 16 bytes as a canonical uuid string.
 *
 * @since 0.1.0
 * @category utils
 */
export const formatUuid = (uuid: Uint8Array): string => {
  const h = Buffer.from(uuid).toString("hex").padEnd(32, "0")
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`
}

/**
 * Parses a canonical uuid string into 16 bytes; `undefined` when it is not one.
 *
 * @since 0.1.0
 * @category decoding
 */
export const parseUuid = (text: string): Uint8Array | undefined =>
  /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(text)
    ? new Uint8Array(Buffer.from(text.replace(/-/g, ""), "hex"))
    : undefined

// ---------------------------------------------------------------------------------------------------------
// RAM packet header

/**
 * A RAM packet header. Offsets live in a caller-owned array (byte offsets inside the block: normal pages
 * first, then zero pages) so that hot paths reuse it.
 *
 * @since 0.1.0
 * @category models
 */
export interface PacketHeader {
  readonly flags: number
  readonly pagesAlloc: number
  readonly normalPages: number
  readonly zeroPages: number
  readonly nextPacketSize: number
  readonly packetNum: bigint
  readonly block: string
  /** At least `normalPages + zeroPages` entries are meaningful. */
  readonly offsets: ArrayLike<number>
}

/**
 * Writes a packet header into `target` (at least `headerSize(pageSize)` bytes, reused per channel).
 * Unused offset slots and reserved fields are zeroed. Returns the header's length.
 *
 * @since 0.1.0
 * @category encoding
 */
export const writeHeader = (target: Buffer, pageSize: number, header: PacketHeader): number => {
  const slots = slotsFor(pageSize)
  const size = HEADER_FIXED_SIZE + 8 * slots
  target.writeUInt32BE(MAGIC, 0)
  target.writeUInt32BE(VERSION, 4)
  target.writeUInt32BE(header.flags >>> 0, 8)
  target.writeUInt32BE(header.pagesAlloc >>> 0, 12)
  target.writeUInt32BE(header.normalPages >>> 0, 16)
  target.writeUInt32BE(header.nextPacketSize >>> 0, 20)
  target.writeBigUInt64BE(header.packetNum, 24)
  target.writeUInt32BE(header.zeroPages >>> 0, 32)
  target.fill(0, 36, 64)
  const nameEnd = 64 + target.write(header.block, 64, BLOCK_NAME_SIZE - 1, "utf8")
  target.fill(0, nameEnd, HEADER_FIXED_SIZE)
  const used = header.normalPages + header.zeroPages
  for (let i = 0; i < used; i++) {
    const o = header.offsets[i]!
    const at = HEADER_FIXED_SIZE + 8 * i
    target.writeUInt32BE(Math.floor(o / 0x1_0000_0000), at)
    target.writeUInt32BE(o % 0x1_0000_0000, at + 4)
  }
  target.fill(0, HEADER_FIXED_SIZE + 8 * used, size)
  return size
}

/**
 * What the receiver checks a RAM packet header against.
 *
 * @since 0.1.0
 * @category models
 */
export interface HeaderLimits {
  readonly channel: number
  readonly pageSize: number
  readonly compression: Compression
  /** Size in bytes of the named block, or `undefined` when no such block exists. */
  readonly blockSize: (name: string) => number | undefined
}

/**
 * A validated packet header; `offsets` is the caller's array, filled in place.
 *
 * @since 0.1.0
 * @category models
 */
export interface DecodedHeader {
  readonly sync: boolean
  readonly normalPages: number
  readonly zeroPages: number
  readonly nextPacketSize: number
  readonly packetNum: bigint
  readonly block: string
  readonly blockSize: number
}

const readBlockName = (bytes: Buffer): string => {
  const end = bytes.indexOf(0, 64)
  return bytes.toString("utf8", 64, end < 0 || end > HEADER_FIXED_SIZE ? HEADER_FIXED_SIZE : end)
}

/**
 * Decodes and validates a RAM packet header (exactly `headerSize(pageSize)` bytes) and fills `offsets`
 * (at least `slotsFor(pageSize)` entries) with the used offsets. Checks, in order: magic, version, flags
 * (SYNC alone, or the negotiated compression bits on data packets), page counts, block name, every offset
 * (page-aligned, inside the block), and — without compression — `next_packet_size`.
 *
 * @since 0.1.0
 * @category decoding
 */
export const decodeHeader = (
  bytes: Buffer,
  limits: HeaderLimits,
  offsets: Float64Array
): Either.Either<DecodedHeader, ProtocolError> => {
  const ch = limits.channel
  const slots = slotsFor(limits.pageSize)
  if (bytes.length < HEADER_FIXED_SIZE + 8 * slots) {
    return fail("Truncated", ch, "packet header", `${bytes.length} bytes, need ${HEADER_FIXED_SIZE + 8 * slots}`)
  }
  const magic = bytes.readUInt32BE(0)
  if (magic !== MAGIC) return fail("BadMagic", ch, "magic", `${hex(magic)}, expected ${hex(MAGIC)}`)
  const version = bytes.readUInt32BE(4)
  if (version !== VERSION) return fail("BadVersion", ch, "version", `${version}, expected ${VERSION}`)
  const flags = bytes.readUInt32BE(8)
  const pagesAlloc = bytes.readUInt32BE(12)
  const normalPages = bytes.readUInt32BE(16)
  const nextPacketSize = bytes.readUInt32BE(20)
  const packetNum = bytes.readBigUInt64BE(24)
  const zeroPages = bytes.readUInt32BE(32)
  const sync = (flags & FLAG_SYNC) !== 0
  if (sync) {
    if ((flags & ~(FLAG_SYNC | COMPRESSION_MASK)) !== 0) {
      return fail("BadFlags", ch, "flags", `${hex(flags)} has unknown bits`)
    }
    if (normalPages !== 0 || zeroPages !== 0 || nextPacketSize !== 0) {
      return fail(
        "BadPageCount",
        ch,
        "SYNC packet",
        `carries normal_pages ${normalPages}, zero_pages ${zeroPages}, next_packet_size ${nextPacketSize}`
      )
    }
    return Either.right({ sync, normalPages, zeroPages, nextPacketSize, packetNum, block: "", blockSize: 0 })
  }
  const expected = compressionFlags(limits.compression)
  if (flags !== expected) {
    const theirs = compressionOfFlags(flags)
    return fail(
      "BadFlags",
      ch,
      "flags",
      theirs === undefined
        ? `${hex(flags)} on a data packet, expected ${hex(expected)} (compression ${limits.compression})`
        : `${hex(flags)} on a data packet: the source uses compression ${theirs}, this destination expects ` +
          `compression ${limits.compression}; set the same compression on both sides (QEMU's multifd-compression)`
    )
  }
  if (pagesAlloc > slots) {
    return fail("BadPageCount", ch, "pages_alloc", `${pagesAlloc} exceeds ${slots} slots`)
  }
  if (normalPages + zeroPages > pagesAlloc) {
    return fail(
      "BadPageCount",
      ch,
      "page counts",
      `normal_pages ${normalPages} + zero_pages ${zeroPages} exceed pages_alloc ${pagesAlloc}`
    )
  }
  const block = readBlockName(bytes)
  const blockSize = limits.blockSize(block)
  if (blockSize === undefined) {
    return fail("UnknownBlock", ch, "ramblock", `no block named ${JSON.stringify(block)}`)
  }
  const used = normalPages + zeroPages
  const pageSize = limits.pageSize
  for (let i = 0; i < used; i++) {
    const at = HEADER_FIXED_SIZE + 8 * i
    const hi = bytes.readUInt32BE(at)
    const lo = bytes.readUInt32BE(at + 4)
    const offset = hi * 0x1_0000_0000 + lo
    if (hi >= 0x20_0000 || offset % pageSize !== 0 || offset + pageSize > blockSize) {
      return fail(
        "BadOffset",
        ch,
        `offset[${i}]`,
        `${hi >= 0x20_0000 ? "0x" + bytes.toString("hex", at, at + 8) : offset} is not a page-aligned offset inside block ${JSON.stringify(block)} (${blockSize} bytes)`
      )
    }
    offsets[i] = offset
  }
  if (expected === 0 && nextPacketSize !== normalPages * pageSize) {
    return fail(
      "BadPayload",
      ch,
      "next_packet_size",
      `${nextPacketSize}, expected ${normalPages * pageSize} for ${normalPages} normal pages`
    )
  }
  return Either.right({ sync, normalPages, zeroPages, nextPacketSize, packetNum, block, blockSize })
}

/**
 * Writes a SYNC packet header: flags exactly `0x1`, no pages, as QEMU sends it.
 *
 * @since 0.1.0
 * @category encoding
 */
export const writeSync = (target: Buffer, pageSize: number, packetNum: bigint): number =>
  writeHeader(target, pageSize, {
    flags: FLAG_SYNC,
    pagesAlloc: 0,
    normalPages: 0,
    zeroPages: 0,
    nextPacketSize: 0,
    packetNum,
    block: "",
    offsets: []
  })
