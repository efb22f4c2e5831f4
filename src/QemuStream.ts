/**
 * A reader of QEMU's main migration stream (savevm file format version 3) as QEMU 10 sends it for a multifd
 * precopy migration: the header, the CONFIGURATION record, the RAM section (`SECTION_START` / `PART` / `END`
 * with the block list, `RAM_SAVE_FLAG_MULTIFD_FLUSH` and `RAM_SAVE_FLAG_EOS` words), COMMAND records, and —
 * once the RAM section has ended — the device state up to the end of the stream, drained without being
 * interpreted (QEMU does not length-prefix a device's state, so only the device's own code could skip it).
 *
 * The reader knows nothing of sockets: it pulls bytes from a `ByteSource` and tells a `Handler` what it
 * met (the block list, each flush, the end of the RAM section). Everything it does not understand is a
 * `QemuStreamError` naming what it met — the section, the record flag, the command or the QEMU feature —
 * and the byte offset where it started. Nothing is written to memory before the record that writes it was
 * fully validated.
 *
 * @since 0.1.0
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as GuestRam from "./GuestRam.js"
import * as Protocol from "./Protocol.js"

// ---------------------------------------------------------------------------------------------------------
// Constants (QEMU migration/savevm.h, migration/savevm.c, migration/ram.h)

/** `QEVM`: the first 4 bytes of a QEMU migration stream. */
export const FILE_MAGIC = 0x5145564d
/** The stream format every QEMU since 0.13 writes. */
export const FILE_VERSION = 3
/** The format before it (QEMU 0.12), which QEMU still accepts on input. */
export const FILE_VERSION_COMPAT = 2

/** Record types of the savevm stream. */
export const Record = {
  EOF: 0x00,
  SECTION_START: 0x01,
  SECTION_PART: 0x02,
  SECTION_END: 0x03,
  SECTION_FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  SECTION_FOOTER: 0x7e
} as const

/** Flags in the low bits of a RAM section's 64-bit words (the rest is a page address or a size). */
export const RamFlag = {
  FULL: 0x01,
  ZERO: 0x02,
  MEM_SIZE: 0x04,
  PAGE: 0x08,
  EOS: 0x10,
  CONTINUE: 0x20,
  XBZRLE: 0x40,
  HOOK: 0x80,
  COMPRESS_PAGE: 0x100,
  MULTIFD_FLUSH: 0x200
} as const

/** Sub-commands of a COMMAND record (QEMU's `enum qemu_vm_cmd`). */
export const Command = {
  INVALID: 0,
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
  ENABLE_COLO: 8,
  POSTCOPY_RESUME: 9,
  RECV_BITMAP: 10,
  SWITCHOVER_START: 11
} as const

const commandNames: ReadonlyArray<string> = [
  "INVALID",
  "OPEN_RETURN_PATH",
  "PING",
  "POSTCOPY_ADVISE",
  "POSTCOPY_LISTEN",
  "POSTCOPY_RUN",
  "POSTCOPY_RAM_DISCARD",
  "PACKAGED",
  "ENABLE_COLO",
  "POSTCOPY_RESUME",
  "RECV_BITMAP",
  "SWITCHOVER_START"
]

/** Name of a command, as QEMU's trace events print it. */
export const commandName = (command: number): string => commandNames[command] ?? `unknown command ${command}`

/** The RAM section's name and the version QEMU 10 saves it with. */
export const RAM_SECTION = "ram"
export const RAM_SECTION_VERSION = 4

// ---------------------------------------------------------------------------------------------------------
// Errors

/** A byte of the main stream that this reader does not accept, with the byte offset of its record. */
export class QemuStreamError extends Data.TaggedError("QemuStreamError")<{
  readonly reason:
    | "BadMagic"
    | "BadVersion"
    | "Truncated"
    | "Malformed"
    | "Unsupported"
    | "UnknownSection"
    | "UnknownRecord"
    | "UnknownBlock"
    | "BadOffset"
    | "Incomplete"
  /** Offset in the main stream of the record (or field) in question. */
  readonly offset: number
  readonly detail: string
  /** The QEMU feature the stream uses, when that is why it is refused (`postcopy-ram`, `xbzrle`, ...). */
  readonly feature?: string | undefined
}> {
  override get message(): string {
    return `QEMU main channel: ${this.detail} (at byte ${this.offset})`
  }
}

// ---------------------------------------------------------------------------------------------------------
// What the stream says

/** A RAM block as the RAM section announces it (its id string and used length). */
export interface RamBlock {
  readonly name: string
  readonly size: number
}

/** The CONFIGURATION record. */
export interface Configuration {
  /** The source's machine type (`pc-q35-10.0`, `none`, ...). */
  readonly machine: string
  /** Target page bits, when the source sent them (variable-page-size targets). */
  readonly targetPageBits: number | undefined
  /** QEMU's `-uuid`, when the source validates it (parameter `validate-uuid`). */
  readonly uuid: Uint8Array | undefined
}

/** What happened on the stream, once it has ended. */
export interface Summary {
  readonly configuration: Configuration | undefined
  readonly pageSize: number
  readonly blocks: ReadonlyArray<RamBlock>
  /** `RAM_SAVE_FLAG_MULTIFD_FLUSH` words (and EOS words that flushed, with `flushAfterEachSection`). */
  readonly flushes: number
  /** RAM section records (START, every PART, END). */
  readonly ramSections: number
  /** Pages the main channel itself carried: zero pages (`zero-page-detection=legacy`) and whole pages. */
  readonly zeroPages: number
  readonly normalPages: number
  /** Commands met, by name, in order (e.g. `SWITCHOVER_START`). */
  readonly commands: ReadonlyArray<string>
  /** Bytes of device state, end marker and description after the RAM section (drained). */
  readonly deviceStateBytes: number
  /** Devices listed by the stream's trailing JSON description, when it had one. */
  readonly devices: number | undefined
  /** Bytes read from the main stream in all. */
  readonly bytes: number
}

/** Where the reader's bytes come from. */
export interface ByteSource<E> {
  /** At least 1 and at most `max` bytes (waiting for the first); an empty result is a clean end of stream. */
  readonly readSome: (max: number) => Effect.Effect<Uint8Array, E>
}

/** A byte source over a buffer, handed out in pieces of at most `piece` bytes (tests and replays). */
export const fromBuffer = (bytes: Uint8Array, piece = 64 * 1024): ByteSource<never> => {
  let at = 0
  return {
    readSome: (max) =>
      Effect.sync(() => {
        const n = Math.min(max, piece, bytes.length - at)
        const out = bytes.subarray(at, at + n)
        at += n
        return out
      })
  }
}

/** What the reader tells the destination, in stream order. Each step may fail with the destination's error. */
export interface Handler<E, R = never> {
  /** The CONFIGURATION record (absent from streams whose source runs with `send-configuration` off). */
  readonly configuration?: ((configuration: Configuration) => Effect.Effect<void, E, R>) | undefined
  /**
   * The RAM section's block list, validated: names unique, sizes positive multiples of the page size. Returns
   * the memory that pages go to; its layout must be exactly this one.
   */
  readonly blocks: (blocks: ReadonlyArray<RamBlock>, pageSize: number) => Effect.Effect<GuestRam.GuestRam["Type"], E, R>
  /** A flush: every multifd channel sends one SYNC packet for it; returns once they all arrived. */
  readonly flush: (index: number) => Effect.Effect<void, E, R>
  /** The RAM section's last record begins (`SECTION_END`): its final flush follows, then the channels end. */
  readonly ramEnding?: Effect.Effect<void, E, R> | undefined
  /** The RAM section ended; what follows is device state. */
  readonly ramEnded?: Effect.Effect<void, E, R> | undefined
  /** A COMMAND record that was accepted (`SWITCHOVER_START`, `PING`). */
  readonly command?: ((name: string) => Effect.Effect<void, E, R>) | undefined
}

/** How to read. */
export interface ReadOptions {
  /**
   * Target page size, when the stream does not say (x86: 4096, the default; only targets whose page size
   * varies send it). A stream that says otherwise is refused.
   */
  readonly pageSize?: number | undefined
  /**
   * QEMU's `multifd-flush-after-each-section` (on for machine types before 7.2): every EOS word is a flush too.
   * Default off, as QEMU 10 with a current machine type.
   */
  readonly flushAfterEachSection?: boolean | undefined
}

// ---------------------------------------------------------------------------------------------------------
// Buffered reading

const CHUNK = 64 * 1024
/** How much of the drained device state is kept to check the end of the stream. */
const TAIL_LIMIT = 16 * 1024 * 1024

class Reader<E> {
  private buf: Buffer = Buffer.alloc(0)
  private pos = 0
  /** Bytes consumed so far: the offset of the next byte. */
  offset = 0
  /** Bytes received from the source so far (consumed or buffered). */
  received = 0

  constructor(private readonly source: ByteSource<E>) {}

  get buffered(): number {
    return this.buf.length - this.pos
  }

  /** Makes `n` bytes available; a clean end of stream before them fails with `onEnd`. */
  ensure(n: number, onEnd: (got: number) => QemuStreamError): Effect.Effect<void, E | QemuStreamError> {
    if (this.buffered >= n) return Effect.void
    const self = this
    return Effect.gen(function*() {
      while (self.buffered < n) {
        const chunk = yield* self.source.readSome(Math.max(CHUNK, n - self.buffered))
        if (chunk.length === 0) return yield* Effect.fail(onEnd(self.buffered))
        self.received += chunk.length
        const rest = self.buf.subarray(self.pos)
        self.buf = rest.length === 0 ? Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length) : Buffer.concat([rest, chunk])
        self.pos = 0
      }
    })
  }

  take(n: number): Buffer {
    const out = this.buf.subarray(this.pos, this.pos + n)
    this.pos += n
    this.offset += n
    return out
  }

  /** The next byte without consuming it, or `undefined` at a clean end of stream. */
  peekByte(): Effect.Effect<number | undefined, E> {
    if (this.buffered > 0) return Effect.succeed(this.buf[this.pos]!)
    const self = this
    return Effect.gen(function*() {
      const chunk = yield* self.source.readSome(CHUNK)
      if (chunk.length === 0) return undefined
      self.received += chunk.length
      self.buf = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length)
      self.pos = 0
      return self.buf[0]!
    })
  }

  /** Everything up to the end of the stream: its length, and its last `TAIL_LIMIT` bytes at most. */
  drain(): Effect.Effect<{ readonly length: number; readonly tail: Buffer }, E> {
    const self = this
    return Effect.gen(function*() {
      const pieces: Array<Buffer> = []
      let kept = 0
      let length = 0
      const keep = (piece: Buffer) => {
        if (piece.length === 0) return
        // a copy: the source may reuse its buffers, and a view would pin the whole chunk
        pieces.push(Buffer.from(piece))
        kept += piece.length
        length += piece.length
        while (pieces.length > 1 && kept - pieces[0]!.length >= TAIL_LIMIT) kept -= pieces.shift()!.length
      }
      keep(self.take(self.buffered))
      while (true) {
        const chunk = yield* self.source.readSome(1024 * 1024)
        if (chunk.length === 0) break
        self.received += chunk.length
        self.offset += chunk.length
        keep(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length))
      }
      const all = Buffer.concat(pieces)
      return { length, tail: all.length > TAIL_LIMIT ? all.subarray(all.length - TAIL_LIMIT) : all }
    })
  }
}

// ---------------------------------------------------------------------------------------------------------
// The end of the stream

/** What the drained end of a stream turned out to be. */
export type Ending =
  | { readonly _tag: "Complete"; readonly devices: number | undefined }
  | { readonly _tag: "Incomplete" }

/**
 * Checks the drained end of a stream (`tail` = its last bytes, `length` = how many were drained in all): a
 * complete stream ends with the EOF marker (0x00), followed — unless the machine suppresses it — by the
 * VMDESCRIPTION record (0x06, u32 length, that many bytes of JSON). A stream that stops anywhere else was
 * cut off: QEMU cancelled, failed or was killed while it sent the device state.
 */
export const checkEnding = (tail: Buffer, length: number): Ending => {
  const n = tail.length
  for (let p = n - 6; p >= 0; p--) {
    if (tail[p] !== Record.EOF || tail[p + 1] !== Record.VMDESCRIPTION) continue
    if (tail.readUInt32BE(p + 2) !== n - p - 6 || tail[p + 6] !== 0x7b /* { */) continue
    try {
      const description = JSON.parse(tail.toString("utf8", p + 6)) as { readonly devices?: unknown }
      return { _tag: "Complete", devices: Array.isArray(description.devices) ? description.devices.length : undefined }
    } catch {
      continue
    }
  }
  // no description: the EOF marker right after the footer (0x7e + section id) of the last device section
  if (n >= 1 && tail[n - 1] === Record.EOF && (length === 1 || (n >= 6 && tail[n - 6] === Record.SECTION_FOOTER))) {
    return { _tag: "Complete", devices: undefined }
  }
  return { _tag: "Incomplete" }
}

// ---------------------------------------------------------------------------------------------------------
// The reader

const hex = (n: number, width = 2) => "0x" + n.toString(16).padStart(width, "0")

const flagNames: ReadonlyArray<readonly [number, string]> = [
  [RamFlag.FULL, "FULL"],
  [RamFlag.ZERO, "ZERO"],
  [RamFlag.MEM_SIZE, "MEM_SIZE"],
  [RamFlag.PAGE, "PAGE"],
  [RamFlag.EOS, "EOS"],
  [RamFlag.CONTINUE, "CONTINUE"],
  [RamFlag.XBZRLE, "XBZRLE"],
  [RamFlag.HOOK, "HOOK"],
  [RamFlag.COMPRESS_PAGE, "COMPRESS_PAGE"],
  [RamFlag.MULTIFD_FLUSH, "MULTIFD_FLUSH"]
]

/** `RAM_SAVE_FLAG_A|RAM_SAVE_FLAG_B (0x..)` for a flags value. */
export const describeFlags = (flags: number): string => {
  const names = flagNames.filter(([bit]) => (flags & bit) !== 0).map(([, name]) => `RAM_SAVE_FLAG_${name}`)
  const unknown = flags & ~flagNames.reduce((m, [bit]) => m | bit, 0)
  if (unknown !== 0) names.push(`unknown bits ${hex(unknown, 3)}`)
  return `${names.join("|") || "no flags"} (${hex(flags, 3)})`
}

/**
 * Reads a QEMU main migration stream to its end. Returns what it met once the RAM section ended, the device
 * state was drained and the stream ended as a complete stream ends.
 */
export const read = <E, R = never>(
  source: ByteSource<E>,
  handler: Handler<E, R>,
  options: ReadOptions = {}
): Effect.Effect<Summary, E | QemuStreamError, R> => {
  const r = new Reader(source)
  const fail = (
    reason: QemuStreamError["reason"],
    offset: number,
    detail: string,
    feature?: string
  ): Effect.Effect<never, QemuStreamError> => Effect.fail(new QemuStreamError({ reason, offset, detail, feature }))
  const truncated = (what: string, at: number) => (got: number) =>
    new QemuStreamError({
      reason: "Truncated",
      offset: at,
      detail: `the stream ended inside ${what} (${got} of its bytes received): ` +
        "QEMU closed the main channel mid-migration (cancelled, failed or killed?)"
    })

  const u8 = (what: string) => Effect.map(r.ensure(1, truncated(what, r.offset)), () => r.take(1)[0]!)
  const u16 = (what: string) => Effect.map(r.ensure(2, truncated(what, r.offset)), () => r.take(2).readUInt16BE(0))
  const u32 = (what: string) => Effect.map(r.ensure(4, truncated(what, r.offset)), () => r.take(4).readUInt32BE(0))
  /** A big-endian u64 as [high, low] u32 halves. */
  const u64 = (what: string) =>
    Effect.map(r.ensure(8, truncated(what, r.offset)), () => {
      const b = r.take(8)
      return [b.readUInt32BE(0), b.readUInt32BE(4)] as const
    })
  const bytes = (n: number, what: string) => Effect.map(r.ensure(n, truncated(what, r.offset)), () => r.take(n))
  /** A u8 length and that many bytes of text (QEMU's idstr fields). */
  const shortString = (what: string) =>
    Effect.flatMap(u8(`the length of ${what}`), (n) => Effect.map(bytes(n, what), (b) => b.toString("latin1")))

  return Effect.gen(function*() {
    // ---- header
    const magic = yield* u32("the file magic")
    if (magic !== FILE_MAGIC) {
      return yield* fail("BadMagic", 0, `not a QEMU migration stream: magic ${hex(magic, 8)}, expected ${hex(FILE_MAGIC, 8)} (QEVM)`)
    }
    const version = yield* u32("the file version")
    if (version !== FILE_VERSION) {
      return yield* fail(
        "BadVersion",
        4,
        `savevm file version ${version} is not supported, only version ${FILE_VERSION} (QEMU 0.13 and later)`
      )
    }

    let pageSize = options.pageSize ?? GuestRam.DEFAULT_PAGE_SIZE
    let configuration: Configuration | undefined
    let ram: GuestRam.GuestRam["Type"] | undefined
    let blocks: ReadonlyArray<RamBlock> = []
    let ramId: number | undefined
    let ramState: "none" | "open" | "ended" = "none"
    let flushes = 0
    let ramSections = 0
    let zeroPages = 0
    let normalPages = 0
    let lastBlock: GuestRam.Block | undefined
    const commands: Array<string> = []
    let records = 0

    // ---- CONFIGURATION (vmstate "configuration": u32 len, machine name, then its subsections)
    const readConfiguration = (at: number) =>
      Effect.gen(function*() {
        if (records > 0) return yield* fail("Malformed", at, "a CONFIGURATION record after the first record")
        const length = yield* u32("the machine type's length")
        if (length > 4096) return yield* fail("Malformed", at, `machine type length ${length} is implausible`)
        const machine = (yield* bytes(length, "the machine type")).toString("latin1")
        let targetPageBits: number | undefined
        let uuid: Uint8Array | undefined
        while ((yield* r.peekByte()) === Record.SUBSECTION) {
          const subAt = r.offset
          yield* u8("a subsection marker")
          const name = yield* shortString("a subsection name")
          const subVersion = yield* u32(`the version of subsection '${name}'`)
          if (subVersion !== 1) {
            return yield* fail("Unsupported", subAt, `configuration subsection '${name}' version ${subVersion} is not supported`)
          }
          switch (name) {
            case "configuration/target-page-bits": {
              targetPageBits = yield* u32("the target page bits")
              if (targetPageBits < 9 || targetPageBits > 19) {
                return yield* fail("Malformed", subAt, `target page bits ${targetPageBits} are implausible`)
              }
              break
            }
            case "configuration/capabilities": {
              const count = yield* u32("the capability count")
              const names: Array<string> = []
              for (let i = 0; i < count && i < 256; i++) names.push(yield* shortString("a capability name"))
              if (count > 0) {
                return yield* fail(
                  "Unsupported",
                  subAt,
                  `the source enabled migration capabilit${count === 1 ? "y" : "ies"} ${names.map((n) => `'${n}'`).join(", ")}` +
                    ", which change the RAM stream format; turn them off on the source",
                  names[0]
                )
              }
              break
            }
            case "configuration/uuid": {
              uuid = Uint8Array.from(yield* bytes(16, "the VM uuid"))
              break
            }
            default:
              return yield* fail("UnknownSection", subAt, `unknown configuration subsection '${name}'`)
          }
        }
        if (targetPageBits !== undefined) {
          const announced = 2 ** targetPageBits
          if (options.pageSize !== undefined && options.pageSize !== announced) {
            return yield* fail(
              "Unsupported",
              at,
              `the source's target page size is ${announced} bytes, not the ${options.pageSize} asked for`
            )
          }
          pageSize = announced
        }
        configuration = { machine, targetPageBits, uuid }
        if (handler.configuration) yield* handler.configuration(configuration)
      })

    // ---- the RAM section's block list (after a RAM_SAVE_FLAG_MEM_SIZE word carrying the total)
    const readBlocks = (at: number, total: number) =>
      Effect.gen(function*() {
        if (ram !== undefined) return yield* fail("Malformed", at, "a second RAM block list (RAM_SAVE_FLAG_MEM_SIZE)")
        const list: Array<RamBlock> = []
        const names = new Set<string>()
        let left = total
        while (left > 0) {
          const blockAt = r.offset
          const name = yield* shortString("a RAM block name")
          const [hi, lo] = yield* u64(`the used length of RAM block '${name}'`)
          const size = hi * 2 ** 32 + lo
          if (name.length === 0) return yield* fail("Malformed", blockAt, "a RAM block with an empty name")
          if (names.has(name)) return yield* fail("Malformed", blockAt, `RAM block '${name}' is listed twice`)
          if (size === 0 || size % pageSize !== 0 || size > left) {
            return yield* fail(
              "Malformed",
              blockAt,
              `RAM block '${name}' used length ${size} is not a positive multiple of the page size ${pageSize}` +
                ` within the announced total of ${total} bytes (${left} left)`
            )
          }
          names.add(name)
          list.push({ name, size })
          left -= size
        }
        if (list.length === 0) return yield* fail("Malformed", at, "the RAM section announces no RAM at all")
        const problem = GuestRam.checkLayout(pageSize, list)
        if (problem) return yield* fail("Malformed", at, problem.detail)
        blocks = list
        const memory = yield* handler.blocks(list, pageSize)
        for (const b of list) {
          if (memory.block(b.name)?.bytes.length !== b.size || memory.pageSize !== pageSize) {
            return yield* Effect.dieMessage(`QemuStream: the handler's memory does not have block ${b.name} of ${b.size} bytes`)
          }
        }
        ram = memory
      })

    // ---- the block a page record refers to (its name, unless RAM_SAVE_FLAG_CONTINUE)
    const pageBlock = (at: number, flags: number) =>
      Effect.gen(function*() {
        if ((flags & RamFlag.CONTINUE) !== 0) {
          if (lastBlock === undefined) {
            return yield* fail("Malformed", at, "RAM_SAVE_FLAG_CONTINUE on the first page record: no block to continue")
          }
          return lastBlock
        }
        const name = yield* shortString("a page record's block name")
        const block = ram?.block(name)
        if (block === undefined) {
          return yield* fail("UnknownBlock", at, `a page record names RAM block '${name}', which the block list did not announce`)
        }
        lastBlock = block
        return block
      })

    // ---- the records of one RAM section, up to its EOS word
    const readRamRecords = (kind: string) =>
      Effect.gen(function*() {
        ramSections++
        while (true) {
          const at = r.offset
          const [hi, lo] = yield* u64("a RAM record")
          const flags = lo & (pageSize - 1)
          const address = hi * 2 ** 32 + (lo - flags)
          switch (flags & ~RamFlag.CONTINUE) {
            case RamFlag.MEM_SIZE: {
              if (kind !== "SECTION_START" || (flags & RamFlag.CONTINUE) !== 0) {
                return yield* fail("Malformed", at, `${describeFlags(flags)} outside the RAM section's start`)
              }
              yield* readBlocks(at, address)
              break
            }
            case RamFlag.MULTIFD_FLUSH: {
              if (ram === undefined) return yield* fail("Malformed", at, "RAM_SAVE_FLAG_MULTIFD_FLUSH before the RAM block list")
              if (flags !== RamFlag.MULTIFD_FLUSH || address !== 0) {
                return yield* fail("Malformed", at, `${describeFlags(flags)} with address ${address}`)
              }
              yield* handler.flush(flushes++)
              break
            }
            case RamFlag.EOS: {
              if (flags !== RamFlag.EOS || address !== 0) {
                return yield* fail("Malformed", at, `${describeFlags(flags)} with address ${address}`)
              }
              if (ram === undefined) return yield* fail("Malformed", at, "the RAM section started without its block list")
              if (options.flushAfterEachSection) yield* handler.flush(flushes++)
              return
            }
            case RamFlag.ZERO:
            case RamFlag.PAGE: {
              // zero-page-detection=legacy sends zero pages here; QEMU's own loader takes whole pages here too
              if (ram === undefined) return yield* fail("Malformed", at, "a page record before the RAM block list")
              const block = yield* pageBlock(at, flags)
              if (address + pageSize > block.bytes.length) {
                return yield* fail(
                  "BadOffset",
                  at,
                  `page offset ${address} is outside RAM block '${block.name}' (${block.bytes.length} bytes)`
                )
              }
              if ((flags & RamFlag.ZERO) !== 0) {
                const fill = yield* u8("a zero page's fill byte")
                if (fill !== 0) return yield* fail("Malformed", at, `a zero page record with fill byte ${fill}`)
                block.bytes.fill(0, address, address + pageSize)
                zeroPages++
              } else {
                const page = yield* bytes(pageSize, "a page's data")
                page.copy(block.bytes, address)
                normalPages++
              }
              break
            }
            case RamFlag.XBZRLE:
              return yield* fail(
                "Unsupported",
                at,
                `${describeFlags(flags)}: XBZRLE-compressed pages are not supported; turn capability xbzrle off`,
                "xbzrle"
              )
            case RamFlag.COMPRESS_PAGE:
              return yield* fail(
                "Unsupported",
                at,
                `${describeFlags(flags)}: multi-thread compressed pages (capability compress, removed in QEMU 9.1) are not supported`,
                "compress"
              )
            case RamFlag.HOOK:
              return yield* fail("Unsupported", at, `${describeFlags(flags)}: RDMA migration is not supported`, "rdma")
            default:
              return yield* fail("UnknownRecord", at, `unknown RAM record ${describeFlags(flags)} in the RAM section`)
          }
        }
      })

    /** The optional section footer (0x7e + section id; machine types before 2.3 do not send it). */
    const readFooter = (id: number) =>
      Effect.gen(function*() {
        if ((yield* r.peekByte()) !== Record.SECTION_FOOTER) return
        const at = r.offset
        yield* u8("a section footer")
        const footerId = yield* u32("a section footer's section id")
        if (footerId !== id) {
          return yield* fail("Malformed", at, `section footer for section ${footerId} ends section ${id}`)
        }
      })

    /** Where QEMU asked for a return path (`MIG_CMD_OPEN_RETURN_PATH`), refused at the next record. */
    let returnPathAt: number | undefined
    const refuseReturnPath = Effect.suspend(() =>
      fail(
        "Unsupported",
        returnPathAt!,
        `command ${Command.OPEN_RETURN_PATH} (MIG_CMD_OPEN_RETURN_PATH): the source wants a return path ` +
          "(capability return-path, or switchover-ack which needs it); this destination never answers QEMU, " +
          "turn return-path off",
        "return-path"
      )
    )

    const readCommand = (at: number) =>
      Effect.gen(function*() {
        const command = yield* u16("a command number")
        const length = yield* u16("a command's length")
        const name = commandName(command)
        const refuse = (feature: string, why: string) =>
          fail("Unsupported", at, `command ${command} (MIG_CMD_${name}): ${why}`, feature)
        if (returnPathAt !== undefined && command !== Command.POSTCOPY_ADVISE) yield* refuseReturnPath
        switch (command) {
          case Command.SWITCHOVER_START:
          case Command.PING: {
            const expected = command === Command.PING ? 4 : 0
            if (length !== expected) {
              return yield* fail("Malformed", at, `command MIG_CMD_${name} with ${length} data bytes, expected ${expected}`)
            }
            yield* bytes(length, `command MIG_CMD_${name}'s data`)
            commands.push(name)
            if (handler.command) yield* handler.command(name)
            return
          }
          case Command.OPEN_RETURN_PATH:
            // postcopy opens the return path first and advises right after: wait for that to name the feature
            if (length !== 0) return yield* fail("Malformed", at, `command MIG_CMD_${name} with ${length} data bytes`)
            returnPathAt = at
            return
          case Command.POSTCOPY_ADVISE:
          case Command.POSTCOPY_LISTEN:
          case Command.POSTCOPY_RUN:
          case Command.POSTCOPY_RAM_DISCARD:
          case Command.PACKAGED:
            return yield* refuse("postcopy-ram", "postcopy migration is not supported; turn capability postcopy-ram off")
          case Command.POSTCOPY_RESUME:
          case Command.RECV_BITMAP:
            return yield* refuse("postcopy-ram", "postcopy recovery is not supported")
          case Command.ENABLE_COLO:
            return yield* refuse("x-colo", "COLO is not supported; turn capability x-colo off")
          default:
            return yield* fail("UnknownRecord", at, `unknown command ${command} (${length} data bytes)`)
        }
      })

    // ---- records, up to the end of the RAM section
    while (ramState !== "ended") {
      const at = r.offset
      const type = yield* r.peekByte()
      if (type === undefined) {
        return yield* fail(
          "Truncated",
          at,
          ramState === "none"
            ? "the stream ended before the RAM section: QEMU closed the main channel (cancelled, failed or killed?)"
            : "the stream ended before the RAM section completed: QEMU cancelled or failed the migration, or was killed"
        )
      }
      yield* u8("a record type")
      if (returnPathAt !== undefined && type !== Record.COMMAND) yield* refuseReturnPath
      switch (type) {
        case Record.CONFIGURATION:
          yield* readConfiguration(at)
          break
        case Record.COMMAND:
          yield* readCommand(at)
          break
        case Record.SECTION_START:
        case Record.SECTION_FULL: {
          const kind = type === Record.SECTION_START ? "SECTION_START" : "SECTION_FULL"
          const id = yield* u32("a section id")
          const name = yield* shortString("a section name")
          const instance = yield* u32(`the instance id of section '${name}'`)
          const sectionVersion = yield* u32(`the version of section '${name}'`)
          if (type === Record.SECTION_FULL) {
            return yield* fail(
              "UnknownSection",
              at,
              `device section '${name}' (SECTION_FULL, instance ${instance}) came ${
                ramState === "none" ? "before the RAM section" : "before the RAM section ended"
              }: device state carries no length, so it can only be skipped after the RAM section`
            )
          }
          if (name !== RAM_SECTION) {
            return yield* fail(
              "UnknownSection",
              at,
              `iterative section '${name}' (${kind}) is not supported: only the 'ram' section can be read ` +
                "(block dirty bitmaps, VFIO and other iterative device state are not)"
            )
          }
          if (ramState !== "none") return yield* fail("Malformed", at, "a second SECTION_START for 'ram'")
          if (sectionVersion !== RAM_SECTION_VERSION || instance !== 0) {
            return yield* fail(
              "Unsupported",
              at,
              `section 'ram' instance ${instance} version ${sectionVersion}; only instance 0 version ${RAM_SECTION_VERSION} is supported`
            )
          }
          ramId = id
          ramState = "open"
          yield* readRamRecords(kind)
          yield* readFooter(id)
          break
        }
        case Record.SECTION_PART:
        case Record.SECTION_END: {
          const kind = type === Record.SECTION_PART ? "SECTION_PART" : "SECTION_END"
          const id = yield* u32("a section id")
          if (ramState !== "open" || id !== ramId) {
            return yield* fail(
              "UnknownSection",
              at,
              ramState === "open"
                ? `${kind} for section ${id}, which never started (the RAM section is ${ramId})`
                : `${kind} for section ${id} ${ramState === "none" ? "before any SECTION_START" : "after the RAM section ended"}`
            )
          }
          if (type === Record.SECTION_END && handler.ramEnding) yield* handler.ramEnding
          yield* readRamRecords(kind)
          yield* readFooter(id)
          if (type === Record.SECTION_END) ramState = "ended"
          break
        }
        case Record.EOF:
          return yield* fail(
            "Malformed",
            at,
            ramState === "none" ? "end of stream marker before any RAM section" : "end of stream marker before the RAM section ended"
          )
        case Record.SUBSECTION:
        case Record.VMDESCRIPTION:
        case Record.SECTION_FOOTER:
          return yield* fail("Malformed", at, `record type ${hex(type)} where a record starts`)
        default:
          return yield* fail("UnknownRecord", at, `unknown record type ${hex(type)}`)
      }
      records++
    }
    if (handler.ramEnded) yield* handler.ramEnded

    // ---- device state, EOF marker and description: drained, then the ending is checked
    const drainedAt = r.offset
    const { length, tail } = yield* r.drain()
    const ending = checkEnding(tail, length)
    if (ending._tag === "Incomplete") {
      return yield* fail(
        "Incomplete",
        drainedAt,
        `the stream ended inside the device state (${length} bytes after the RAM section, no end-of-stream marker): ` +
          "QEMU cancelled or failed the migration, or was killed, after sending all RAM"
      )
    }
    return {
      configuration,
      pageSize,
      blocks,
      flushes,
      ramSections,
      zeroPages,
      normalPages,
      commands,
      deviceStateBytes: length,
      devices: ending.devices,
      bytes: r.offset
    } satisfies Summary
  })
}

/** Whether the first 4 bytes of a connection are a QEMU main stream's. */
export const isMainStream = (first: Uint8Array): boolean =>
  first.length >= 4 && Buffer.from(first.buffer, first.byteOffset, 4).readUInt32BE(0) === FILE_MAGIC

/** Whether the first 4 bytes of a connection are a multifd channel's. */
export const isMultifdChannel = (first: Uint8Array): boolean =>
  first.length >= 4 && Buffer.from(first.buffer, first.byteOffset, 4).readUInt32BE(0) === Protocol.MAGIC
