/**
 * A fake source on real sockets, for destination tests that need packets of their own making: the main
 * channel's hello (one block), multifd connections announcing a channel, RAM, compressed and SYNC packets.
 */
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"
import * as Control from "../../src/Control.js"
import type * as GuestRam from "../../src/GuestRam.js"
import * as PageCodec from "../../src/PageCodec.js"
import * as Protocol from "../../src/Protocol.js"
import * as Transport from "../../src/Transport.js"

export const PAGE = 4096
export const BLOCK = "pc.ram"
export const BLOCK_PAGES = 256 // 1 MiB
const HEADER_SIZE = Protocol.headerSize(PAGE)

/**
 * Connects the main channel, sends the magic and a valid Hello for `channels` channels (asking for the
 * destination's heartbeats with `heartbeats`, as this library's sources do; without, as an older source);
 * dies unless accepted.
 */
export const fakeSource = (
  address: Transport.Address,
  channels: number,
  compression: Protocol.Compression = "none",
  heartbeats = false,
  /** More of the hello: a source that re-attaches lost channels (`reconnectMs`), one held back by a limit (`paced`). */
  more: { readonly reconnectMs?: number; readonly paced?: boolean } = {}
) =>
  Effect.gen(function*() {
    const uuid = Crypto.randomUUID()
    const control = yield* Transport.connect(address)
    const magic = Buffer.alloc(4)
    magic.writeUInt32BE(Control.MAGIC, 0)
    const hello = new Control.Hello({
      version: Control.VERSION,
      uuid,
      pageSize: PAGE,
      channels,
      compression,
      zeroPage: "multifd",
      blocks: [{ name: BLOCK, size: BLOCK_PAGES * PAGE }],
      ...(heartbeats ? { heartbeats: true } : {}),
      ...more
    })
    yield* control.write([magic, Control.encode(hello)])
    const answer = yield* Control.receive(control)
    if (answer._tag !== "Accept") return yield* Effect.dieMessage(`the destination answered ${answer._tag}`)
    /** Opens a multifd connection announcing channel `id` (with this migration's uuid unless told otherwise). */
    const channel = (id: number, uuid_ = uuid) =>
      Effect.tap(Transport.connect(address), (c) => c.write([Protocol.encodeInit({ uuid: Protocol.parseUuid(uuid_)!, id })]))
    return { uuid, control, channel, accept: answer }
  })

let packetNum = 0n

/** A RAM packet: header for `normal` + `zero` pages at the given byte offsets, then the normal pages' bytes. */
export const ramPacket = (
  normal: ReadonlyArray<{ readonly offset: number; readonly bytes: Uint8Array }>,
  zero: ReadonlyArray<number> = [],
  tamper?: (header: Buffer) => void
): Array<Uint8Array> => {
  const header = Buffer.alloc(HEADER_SIZE)
  Protocol.writeHeader(header, PAGE, {
    flags: 0,
    pagesAlloc: Protocol.slotsFor(PAGE),
    normalPages: normal.length,
    zeroPages: zero.length,
    nextPacketSize: normal.length * PAGE,
    packetNum: packetNum++,
    block: BLOCK,
    offsets: [...normal.map((p) => p.offset), ...zero]
  })
  tamper?.(header)
  return [header, ...normal.map((p) => p.bytes)]
}

/** A compressed RAM packet: header for `normal` + `zero` pages, then `payload` (by default `normal` encoded). */
export const compressedPacket = (
  compression: "zlib" | "zstd",
  encoder: PageCodec.Encoder,
  normal: ReadonlyArray<{ readonly offset: number; readonly bytes: Uint8Array }>,
  zero: ReadonlyArray<number> = [],
  payload?: Buffer
) =>
  Effect.gen(function*() {
    const memory = Buffer.concat(normal.map((p) => p.bytes))
    const chunks: Array<Uint8Array> = []
    const offsets = Float64Array.from(normal, (_, i) => i * PAGE)
    yield* encoder.encode(memory, offsets, normal.length, PAGE, chunks)
    const bytes = payload ?? Buffer.concat(chunks)
    const header = Buffer.alloc(HEADER_SIZE)
    Protocol.writeHeader(header, PAGE, {
      flags: Protocol.compressionFlags(compression),
      pagesAlloc: Protocol.slotsFor(PAGE),
      normalPages: normal.length,
      zeroPages: zero.length,
      nextPacketSize: bytes.length,
      packetNum: packetNum++,
      block: BLOCK,
      offsets: [...normal.map((p) => p.offset), ...zero]
    })
    return [header, bytes]
  })

/** A SYNC packet. */
export const syncPacket = (): Buffer => {
  const header = Buffer.alloc(HEADER_SIZE)
  Protocol.writeSync(header, PAGE, packetNum++)
  return header
}

/** A page of random bytes. */
export const randomPage = () => Crypto.randomBytes(PAGE)

/** Indices of the pages of the block that are not all zero. */
export const touchedPages = (ram: GuestRam.GuestRam["Type"]) => {
  const block = ram.block(BLOCK)!
  const touched: Array<number> = []
  for (let p = 0; p < block.pages; p++) if (block.bytes.subarray(p * PAGE, (p + 1) * PAGE).some((b) => b !== 0)) touched.push(p)
  return touched
}
