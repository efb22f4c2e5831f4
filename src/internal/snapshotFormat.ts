/**
 * The snapshot file format, pure: the layout of a file for a memory layout, the header's encoding and its
 * validating decoder, and the page bitmaps. No I/O (the format itself is documented in `Snapshot`). One module
 * because the encoder and the decoder must agree field by field: each field's write and its checked read sit
 * side by side (about 400 lines, most of them the decoder's checks).
 *
 * @internal
 */
import * as Crypto from "node:crypto"
import * as GuestRam from "../GuestRam.js"
import * as Protocol from "../Protocol.js"

/** The first 8 bytes of every snapshot. */
export const MAGIC = Buffer.from("EMFDSNAP", "latin1")
/** The format version this code writes and reads. */
export const VERSION = 1
/** Fixed part of the header: magic, version, sizes, uuid, how it was saved. */
export const PREFIX_SIZE = 128
/** One block-table entry. */
export const ENTRY_SIZE = 384
/** The header's trailing SHA-256. */
export const CHECKSUM_SIZE = 32
/** Bytes of a block name field (UTF-8, NUL-padded; names are at most 255 bytes). */
export const NAME_SIZE = 256
/** Page data of each block starts at a multiple of this (QEMU's mapped-ram aligns to 1 MiB too). */
export const DATA_ALIGNMENT = 1024 * 1024
/** Bitmaps start at a multiple of this. */
export const BITMAP_ALIGNMENT = 4096
/** Most blocks a snapshot may have (bounds the header a reader accepts: about 1.5 MiB). */
export const MAX_BLOCKS = 4096

/** Header size for `blocks` blocks. */
export const headerSize = (blocks: number): number => PREFIX_SIZE + ENTRY_SIZE * blocks + CHECKSUM_SIZE

/** Bytes of a bitmap of `pages` pages (one bit a page, least significant bit first). */
export const bitmapSize = (pages: number): number => Math.ceil(pages / 8)

const alignUp = (n: number, to: number): number => Math.ceil(n / to) * to

/** Where one block lives in the file. */
export interface BlockPlacement {
  readonly name: string
  /** Bytes of the block. */
  readonly size: number
  readonly pages: number
  readonly bitmapOffset: number
  readonly bitmapBytes: number
  /** Page `i` is at `dataOffset + i × pageSize`. */
  readonly dataOffset: number
}

/** Where everything lives in a file for a memory layout. */
export interface Plan {
  readonly pageSize: number
  readonly headerBytes: number
  readonly blocks: ReadonlyArray<BlockPlacement>
  /** The file's apparent size (its holes included). */
  readonly fileBytes: number
}

/**
 * Lays a memory layout out: the header, then the bitmaps (each 4 KiB aligned), then each block's pages
 * starting on a 1 MiB boundary, in the order of the blocks.
 */
export const plan = (pageSize: number, layout: ReadonlyArray<GuestRam.BlockLayout>): Plan => {
  const headerBytes = headerSize(layout.length)
  let at = alignUp(headerBytes, BITMAP_ALIGNMENT)
  const bitmaps = layout.map(({ size }) => {
    const bitmapOffset = at
    const bitmapBytes = bitmapSize(size / pageSize)
    at = alignUp(at + bitmapBytes, BITMAP_ALIGNMENT)
    return { bitmapOffset, bitmapBytes }
  })
  at = alignUp(at, DATA_ALIGNMENT)
  const blocks = layout.map(({ name, size }, i): BlockPlacement => {
    const dataOffset = at
    at = alignUp(at + size, DATA_ALIGNMENT)
    return { name, size, pages: size / pageSize, ...bitmaps[i]!, dataOffset }
  })
  const last = blocks[blocks.length - 1]
  return { pageSize, headerBytes, blocks, fileBytes: last === undefined ? at : last.dataOffset + last.size }
}

/** One block as the header records it. */
export interface BlockEntry {
  readonly name: string
  readonly size: number
  readonly bitmapOffset: number
  readonly dataOffset: number
  /** Pages whose bit is set (stored in the file). */
  readonly presentPages: number
  /** The block's digest as `GuestRam.digest` computes it (hex). */
  readonly digest: string
  /** SHA-256 of the block's bitmap (hex). */
  readonly bitmapDigest: string
}

/** A snapshot's header. */
export interface Header {
  readonly version: number
  readonly pageSize: number
  readonly dataAlignment: number
  readonly fileBytes: number
  /** The uuid of the save that wrote it (as `Transfer.Stats.uuid`). */
  readonly uuid: string
  /** Writers the save used. */
  readonly channels: number
  /** Rounds the save ran (more than one when the memory was written meanwhile). */
  readonly rounds: number
  /** When the save completed (milliseconds since the epoch). */
  readonly savedAt: number
  readonly blocks: ReadonlyArray<BlockEntry>
}

/** Why bytes are not a usable snapshot (without the path: `Snapshot` adds it). */
export interface Problem {
  readonly reason: "NotASnapshot" | "Truncated" | "Version" | "Corrupt"
  readonly detail: string
}

const problem = (reason: Problem["reason"], detail: string): Problem => ({ reason, detail })

/** SHA-256 of bytes, hex. */
export const sha256 = (bytes: Uint8Array): string => Crypto.createHash("sha256").update(bytes).digest("hex")

const writeU64 = (buf: Buffer, n: number, at: number) => buf.writeBigUInt64BE(BigInt(n), at)

/** The latest time a JavaScript Date holds, in milliseconds since 1970 (ECMA-262's time value range). */
const MAX_DATE_MS = 8_640_000_000_000_000

/** Reads a u64 (`u64Fields` were checked to fit a safe integer first). */
const readU64 = (buf: Buffer, at: number): number => Number(buf.readBigUInt64BE(at))

/** Where a header of `blocks` blocks has its u64 fields, each named as a message names it. */
const u64Fields = (blocks: number): Array<readonly [number, string]> => [
  [32, "file size"],
  [40, "memory size"],
  [72, "save time"],
  ...Array.from({ length: blocks }, (_, i) => {
    const at = PREFIX_SIZE + i * ENTRY_SIZE
    return [
      [at + 256, `block ${i} size`],
      [at + 264, `block ${i} bitmap offset`],
      [at + 272, `block ${i} data offset`],
      [at + 280, `block ${i} stored page count`]
    ] as const
  }).flat()
]

const uuidBytes = (uuid: string): Buffer => Buffer.from(uuid.replace(/-/g, ""), "hex")

const uuidText = (bytes: Buffer): string => {
  const h = bytes.toString("hex")
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`
}

/** Encodes a header, its checksum included. */
export const encodeHeader = (header: Header): Buffer => {
  const buf = Buffer.alloc(headerSize(header.blocks.length))
  MAGIC.copy(buf, 0)
  buf.writeUInt32BE(header.version, 8)
  buf.writeUInt32BE(buf.length, 12)
  buf.writeUInt32BE(header.pageSize, 16)
  buf.writeUInt32BE(header.blocks.length, 20)
  buf.writeUInt32BE(header.dataAlignment, 24)
  buf.writeUInt32BE(0, 28) // flags: none defined
  writeU64(buf, header.fileBytes, 32)
  writeU64(buf, header.blocks.reduce((n, b) => n + b.size, 0), 40)
  uuidBytes(header.uuid).copy(buf, 48)
  buf.writeUInt32BE(header.channels, 64)
  buf.writeUInt32BE(header.rounds, 68)
  writeU64(buf, header.savedAt, 72)
  header.blocks.forEach((block, i) => {
    const at = PREFIX_SIZE + i * ENTRY_SIZE
    buf.write(block.name, at, NAME_SIZE - 1, "utf8")
    writeU64(buf, block.size, at + 256)
    writeU64(buf, block.bitmapOffset, at + 264)
    writeU64(buf, block.dataOffset, at + 272)
    writeU64(buf, block.presentPages, at + 280)
    Buffer.from(block.digest, "hex").copy(buf, at + 288)
    Buffer.from(block.bitmapDigest, "hex").copy(buf, at + 320)
  })
  const sum = Crypto.createHash("sha256").update(buf.subarray(0, buf.length - CHECKSUM_SIZE)).digest()
  sum.copy(buf, buf.length - CHECKSUM_SIZE)
  return buf
}

/** Magic numbers of files people might mistake for a snapshot, to say what a foreign file is. */
const KNOWN: ReadonlyArray<readonly [string, string]> = [
  ["5145564d", "a QEMU migration stream (QEMU's own file: format), not an effect-multifd snapshot"],
  ["89504e47", "a PNG image"],
  ["7f454c46", "an ELF binary"],
  ["1f8b", "a gzip file"],
  ["28b52ffd", "a zstd file"],
  ["504b0304", "a zip file"]
]

/** What the fixed prefix says: enough to read the whole header. */
export interface Prefix {
  readonly version: number
  readonly headerBytes: number
  readonly blockCount: number
}

/**
 * Checks the first bytes of a file of `fileSize` bytes (`bytes` holds its first `min(fileSize, PREFIX_SIZE)` bytes):
 * magic, version, a header length consistent with the block count and within the file.
 */
export const decodePrefix = (bytes: Buffer, fileSize: number): Prefix | Problem => {
  if (fileSize === 0) return problem("NotASnapshot", "the file is empty, not a snapshot")
  const head = bytes.subarray(0, Math.min(MAGIC.length, bytes.length))
  if (!head.equals(MAGIC.subarray(0, head.length))) {
    const hex = bytes.subarray(0, 8).toString("hex")
    const known = KNOWN.find(([magic]) => hex.startsWith(magic))
    return problem(
      "NotASnapshot",
      `not an effect-multifd snapshot (it starts with ${hex.replace(/(..)(?=.)/g, "$1 ")}` +
        `${known ? `: ${known[1]}` : ""})`
    )
  }
  if (fileSize < PREFIX_SIZE) {
    return problem("Truncated", `the file is truncated: it ends after ${fileSize} bytes, inside the header`)
  }
  const version = bytes.readUInt32BE(8)
  if (version !== VERSION) {
    return problem(
      "Version",
      `snapshot format version ${version} is not supported (this library reads version ${VERSION})`
    )
  }
  const headerBytes = bytes.readUInt32BE(12)
  const blockCount = bytes.readUInt32BE(20)
  if (blockCount === 0 || blockCount > MAX_BLOCKS || headerBytes !== headerSize(blockCount)) {
    return problem(
      "Corrupt",
      `the header is damaged: ${blockCount} blocks cannot have a ${headerBytes}-byte header`
    )
  }
  if (fileSize < headerBytes) {
    return problem(
      "Truncated",
      `the file is truncated: it ends after ${fileSize} bytes, inside the ${headerBytes}-byte header`
    )
  }
  return { version, headerBytes, blockCount }
}

/** Whether a decode result is a problem. */
export const isProblem = (u: Prefix | Header | Problem): u is Problem => "reason" in u

/**
 * Decodes and validates the whole header (`bytes`: exactly `prefix.headerBytes`) of a file of `fileSize`
 * bytes: the checksum first, then every field — page size, alignment, a valid memory layout, every region
 * aligned, inside the file and overlapping no other, and the file exactly as long as the header says.
 */
export const decodeHeader = (bytes: Buffer, prefix: Prefix, fileSize: number): Header | Problem => {
  const body = bytes.subarray(0, prefix.headerBytes - CHECKSUM_SIZE)
  const sum = Crypto.createHash("sha256").update(body).digest()
  if (!sum.equals(bytes.subarray(prefix.headerBytes - CHECKSUM_SIZE, prefix.headerBytes))) {
    return problem("Corrupt", "the header checksum does not match: the header is damaged")
  }
  const corrupt = (detail: string) => problem("Corrupt", `the header is inconsistent: ${detail}`)
  // no file, memory or time is 2^53 of anything: a larger u64 is damage, named with its exact value
  for (const [at, what] of u64Fields(prefix.blockCount)) {
    const n = bytes.readBigUInt64BE(at)
    if (n > BigInt(Number.MAX_SAFE_INTEGER)) return corrupt(`${what} ${n} is out of range`)
  }
  // a time a Date holds: `Restored.savedAt` is one (an application that shows a later one gets a RangeError)
  const savedAt = readU64(bytes, 72)
  if (savedAt > MAX_DATE_MS) return corrupt(`save time ${savedAt} is later than any date (${MAX_DATE_MS} ms after 1970)`)
  const pageSize = bytes.readUInt32BE(16)
  const dataAlignment = bytes.readUInt32BE(24)
  const flags = bytes.readUInt32BE(28)
  const fileBytes = readU64(bytes, 32)
  const ramBytes = readU64(bytes, 40)
  if (flags !== 0) {
    return problem("Version", `the snapshot uses features this library does not know (flags 0x${flags.toString(16)})`)
  }
  if (!Protocol.isPageSize(pageSize)) return corrupt(`page size ${pageSize}`)
  const alignmentOk = dataAlignment >= pageSize && dataAlignment <= 1024 * 1024 * 1024 &&
    (dataAlignment & (dataAlignment - 1)) === 0
  if (!alignmentOk) return corrupt(`data alignment ${dataAlignment}`)
  if (!Number.isSafeInteger(fileBytes)) return corrupt("file size")
  // a save has 1-255 writers (Protocol.MAX_CHANNELS); the count only informs (the digests verify the pages), so
  // another is read as unknown, 0, which a summary leaves out, rather than reported ("saved by 4294967295 writers")
  const written = bytes.readUInt32BE(64)
  const channels = written >= 1 && written <= Protocol.MAX_CHANNELS ? written : 0

  const blocks: Array<BlockEntry> = []
  for (let i = 0; i < prefix.blockCount; i++) {
    const at = PREFIX_SIZE + i * ENTRY_SIZE
    const field = bytes.subarray(at, at + NAME_SIZE)
    const end = field.indexOf(0)
    if (end < 0 || field.subarray(end).some((b) => b !== 0)) return corrupt(`block ${i} has a malformed name`)
    blocks.push({
      name: field.subarray(0, end).toString("utf8"),
      size: readU64(bytes, at + 256),
      bitmapOffset: readU64(bytes, at + 264),
      dataOffset: readU64(bytes, at + 272),
      presentPages: readU64(bytes, at + 280),
      digest: bytes.subarray(at + 288, at + 320).toString("hex"),
      bitmapDigest: bytes.subarray(at + 320, at + 352).toString("hex")
    })
  }
  const layoutProblem = GuestRam.checkLayout(pageSize, blocks)
  if (layoutProblem) return corrupt(layoutProblem.detail)
  if (blocks.reduce((n, b) => n + b.size, 0) !== ramBytes) return corrupt("block sizes do not add up")

  // every region inside the file, aligned, and none overlapping another
  const regions: Array<{ start: number; end: number; what: string }> = [
    { start: 0, end: prefix.headerBytes, what: "the header" }
  ]
  for (const b of blocks) {
    const pages = b.size / pageSize
    const label = JSON.stringify(b.name)
    if (!Number.isSafeInteger(b.presentPages) || b.presentPages > pages) {
      return corrupt(`block ${label} claims ${b.presentPages} stored pages of ${pages}`)
    }
    if (!Number.isSafeInteger(b.dataOffset) || b.dataOffset % dataAlignment !== 0) {
      return corrupt(`block ${label} data offset ${b.dataOffset} is not aligned to ${dataAlignment}`)
    }
    if (!Number.isSafeInteger(b.bitmapOffset)) return corrupt(`block ${label} bitmap offset`)
    regions.push({ start: b.bitmapOffset, end: b.bitmapOffset + bitmapSize(pages), what: `the bitmap of ${label}` })
    regions.push({ start: b.dataOffset, end: b.dataOffset + b.size, what: `the pages of ${label}` })
  }
  regions.sort((x, y) => x.start - y.start)
  for (let i = 0; i < regions.length; i++) {
    const r = regions[i]!
    if (r.end > fileBytes) return corrupt(`${r.what} extends past the end of the snapshot`)
    const next = regions[i + 1]
    if (next !== undefined && next.start < r.end) return corrupt(`${r.what} and ${next.what} overlap`)
  }
  if (fileSize < fileBytes) {
    return problem(
      "Truncated",
      `the file is truncated: it has ${fileSize} bytes, the snapshot is ${fileBytes} bytes long`
    )
  }
  if (fileSize > fileBytes) {
    return problem("Corrupt", `the file has ${fileSize - fileBytes} bytes after the end of the snapshot`)
  }
  return {
    version: prefix.version,
    pageSize,
    dataAlignment,
    fileBytes,
    uuid: uuidText(bytes.subarray(48, 64)),
    channels,
    rounds: bytes.readUInt32BE(68),
    savedAt,
    blocks
  }
}

// ---------------------------------------------------------------------------------------------------------
// Bitmaps: bit i of a block is bit (i & 7) of byte (i >> 3); set = the page is stored in the file.

export const setBit = (bitmap: Uint8Array, page: number): void => {
  bitmap[page >>> 3]! |= 1 << (page & 7)
}

export const clearBit = (bitmap: Uint8Array, page: number): void => {
  bitmap[page >>> 3]! &= ~(1 << (page & 7))
}

export const testBit = (bitmap: Uint8Array, page: number): boolean => (bitmap[page >>> 3]! & (1 << (page & 7))) !== 0

/** Number of set bits. */
export const countBits = (bitmap: Uint8Array): number => {
  let n = 0
  for (let i = 0; i < bitmap.length; i++) {
    let b = bitmap[i]!
    while (b !== 0) {
      b &= b - 1
      n++
    }
  }
  return n
}

/** Whether any bit at or past `pages` is set (the padding bits of the last byte must be clear). */
export const hasBitsPast = (bitmap: Uint8Array, pages: number): boolean => {
  for (let page = pages; page < bitmap.length * 8; page++) if (testBit(bitmap, page)) return true
  return false
}

/** A run of pages `[first, end)`. */
export interface Run {
  readonly first: number
  readonly end: number
}

/**
 * The spans to read for pages `[first, end)`: runs of stored pages, merged across gaps of at most
 * `mergeGap` absent pages (one larger read beats several small ones; the absent pages read in between are
 * zeroed afterwards). Calls `span` for each span and `gap` for every run of absent pages, telling whether
 * the gap lies inside a span.
 */
export const forEachSpan = (
  bitmap: Uint8Array,
  first: number,
  end: number,
  mergeGap: number,
  span: (run: Run) => void,
  gap: (run: Run, inSpan: boolean) => void
): void => {
  let page = first
  let spanFirst = -1
  let spanEnd = -1
  const pendingGaps: Array<Run> = []
  const closeSpan = () => {
    if (spanFirst < 0) return
    span({ first: spanFirst, end: spanEnd })
    spanFirst = -1
  }
  while (page < end) {
    const present = testBit(bitmap, page)
    let runEnd = page + 1
    while (runEnd < end && testBit(bitmap, runEnd) === present) runEnd++
    if (present) {
      if (spanFirst < 0) spanFirst = page
      else for (const g of pendingGaps) gap(g, true)
      pendingGaps.length = 0
      spanEnd = runEnd
    } else if (spanFirst >= 0 && runEnd < end && runEnd - page <= mergeGap) {
      pendingGaps.push({ first: page, end: runEnd }) // inside the span if a stored page follows
    } else {
      closeSpan()
      gap({ first: page, end: runEnd }, false)
    }
    page = runEnd
  }
  closeSpan()
  for (const g of pendingGaps) gap(g, false)
}
