/**
 * QEMU's main migration stream format (savevm file format version 3), as data: the constants of QEMU's
 * migration/savevm.h, migration/savevm.c and migration/ram.h, the reader's error, what the stream says
 * (blocks, configuration, summary), what the reader is given (byte source, handler, options) and the check of
 * a drained stream's end. A leaf: the parsers (`reader`, `records`, `ram`) and `QemuStream`, which re-exports
 * all of it, build on it; it imports nothing of theirs.
 *
 * @internal
 */
import * as Data from "effect/Data"
import type * as Effect from "effect/Effect"
import type * as GuestRam from "../../GuestRam.js"
import * as PeerText from "../peerText.js"

// ---------------------------------------------------------------------------------------------------------
// Constants

/** `QEVM`: the first 4 bytes of a QEMU migration stream. */
export const FILE_MAGIC = 0x5145564d
/** The stream format every QEMU since 0.13 writes. */
export const FILE_VERSION = 3
/** The format before it (QEMU 0.12), which QEMU still accepts on input. */
export const FILE_VERSION_COMPAT = 2
/** The file header: the magic and the version, 4 bytes each. */
export const HEADER_SIZE = 8

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

/**
 * Messages a destination sends on the return path (QEMU's `enum mig_rp_message_type`): u16 type, u16 length,
 * that many bytes of data.
 */
export const ReturnPath = {
  INVALID: 0,
  /** u32 status: 0 the destination loaded the migration (and started the VM), else it failed. */
  SHUT: 1,
  /** u32: the value of the PING it answers. */
  PONG: 2,
  REQ_PAGES_ID: 3,
  REQ_PAGES: 4,
  RECV_BITMAP: 5,
  RESUME_ACK: 6,
  /** No data: the source may switch over (capability switchover-ack). */
  SWITCHOVER_ACK: 7
} as const

const returnPathNames: ReadonlyArray<string> = [
  "INVALID",
  "SHUT",
  "PONG",
  "REQ_PAGES_ID",
  "REQ_PAGES",
  "RECV_BITMAP",
  "RESUME_ACK",
  "SWITCHOVER_ACK"
]

/** Name of a return path message, as QEMU's trace events print it. */
export const returnPathName = (type: number): string => returnPathNames[type] ?? `unknown message ${type}`

/** The migration capability of QEMU's `migrate file:` whose RAM pages sit at fixed offsets of the file. */
export const MAPPED_RAM = "mapped-ram"
/** The mapped-ram header after each block of the list (u32 version, u64 page size, bitmap and pages offsets). */
export const MAPPED_RAM_HEADER_SIZE = 28
/** The mapped-ram header version QEMU 10 writes and reads. */
export const MAPPED_RAM_VERSION = 1
/** Where QEMU puts a block's pages: the next multiple of 1 MiB after its bitmap. */
export const MAPPED_RAM_ALIGNMENT = 0x100000

/** `0x..` with at least `width` hex digits. */
export const hex = (n: number, width = 2): string => "0x" + n.toString(16).padStart(width, "0")

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

// ---------------------------------------------------------------------------------------------------------
// Errors

/** A byte of the main stream that the reader does not accept, with the byte offset of its record. */
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
    // the names it quotes (blocks, sections, devices) are the stream's: shown, never acted on
    return `QEMU main channel: ${PeerText.printable(this.detail)} (at byte ${this.offset})`
  }
}

/** A stream that does not start with `QEVM`. */
export const badMagic = (magic: number, at = 0): QemuStreamError =>
  new QemuStreamError({
    reason: "BadMagic",
    offset: at,
    detail: `not a QEMU migration stream: magic ${hex(magic, 8)}, expected ${hex(FILE_MAGIC, 8)} (QEVM)`
  })

/** A stream of another file version than 3. */
export const badVersion = (version: number, at = 4): QemuStreamError =>
  new QemuStreamError({
    reason: "BadVersion",
    offset: at,
    detail: `savevm file version ${version} is not supported, only version ${FILE_VERSION} (QEMU 0.13 and later)`
  })

/**
 * Why the first `HEADER_SIZE` bytes of a stream are not a header the reader accepts (the magic `QEVM`, then
 * file version 3), or `undefined` when they are.
 */
export const checkHeader = (header: Uint8Array): QemuStreamError | undefined => {
  const view = new DataView(header.buffer, header.byteOffset, HEADER_SIZE)
  const magic = view.getUint32(0)
  if (magic !== FILE_MAGIC) return badMagic(magic)
  const version = view.getUint32(4)
  return version === FILE_VERSION ? undefined : badVersion(version)
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
  /** The capabilities the source validates on the destination (only `mapped-ram` is accepted, from files). */
  readonly capabilities: ReadonlyArray<string>
}

/** A COMMAND record as it was sent: its number and data (kept to be sent on verbatim). */
export interface CommandRecord {
  readonly command: number
  readonly data: Uint8Array
}

/** The mapped-ram header that follows a block in the list of a mapped-ram file. */
export interface MappedRamHeader {
  readonly version: number
  readonly pageSize: number
  /** Where the block's bitmap of pages present is (one bit a page, little-endian 64-bit words). */
  readonly bitmapOffset: number
  /** Where the block's page 0 is; page i is at `pagesOffset + i * pageSize`. */
  readonly pagesOffset: number
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
  /**
   * The commands of the migration itself, verbatim, in order (`SWITCHOVER_START`; not the return path's
   * `OPEN_RETURN_PATH` and `PING`, which concern one connection).
   */
  readonly commandRecords: ReadonlyArray<CommandRecord>
  /** The RAM section's id (its SECTION_START, PART and END records carry it). */
  readonly ramSectionId: number | undefined
  /** Whether the source opened a return path (`MIG_CMD_OPEN_RETURN_PATH`). */
  readonly returnPath: boolean
  /** Whether the RAM came from a mapped-ram file (capability `mapped-ram`). */
  readonly mappedRam: boolean
  /**
   * Everything after the RAM section — device sections, end marker and description — verbatim, with
   * `keepDeviceState`.
   */
  readonly deviceState: Uint8Array | undefined
  /** Bytes of device state, end marker and description after the RAM section (drained). */
  readonly deviceStateBytes: number
  /** Devices listed by the stream's trailing JSON description, when it had one. */
  readonly devices: number | undefined
  /** Bytes read from the main stream in all. */
  readonly bytes: number
}

/** Where the reader's bytes come from. */
/**
 * What the reader waits for when it asks its source for more: `what` (a field, "the next record", "the device
 * state"), which starts at byte `at` of the stream, `got` of its bytes already there; `between`: it waits between
 * two records (for the next one's first byte), not inside one.
 */
export interface Awaiting {
  readonly what: string
  readonly at: number
  readonly got: number
  readonly between: boolean
}

export interface ByteSource<E> {
  /**
   * At least 1 and at most `max` bytes (waiting for the first); an empty result is a clean end of stream.
   * `awaiting` says what the reader waits for (a source that times out can say where the stream stopped).
   */
  readonly readSome: (max: number, awaiting?: Awaiting) => Effect.Effect<Uint8Array, E>
  /**
   * Goes on reading at `position` (a file: a mapped-ram file's stream continues after each block's pages).
   * A source without it cannot carry a mapped-ram stream.
   */
  readonly seek?: ((position: number) => Effect.Effect<void, E>) | undefined
}

/** What the reader tells the destination, in stream order. Each step may fail with the destination's error. */
export interface Handler<E, R = never> {
  /** The CONFIGURATION record (absent from streams whose source runs with `send-configuration` off). */
  readonly configuration?: ((configuration: Configuration) => Effect.Effect<void, E, R>) | undefined
  /**
   * The RAM section's block list, validated: names unique, sizes positive multiples of the page size. Returns
   * the memory that pages go to; its layout must be exactly this one. `mainPages` counts the pages the main stream
   * itself carried so far (QEMU without multifd, or zero-page-detection=legacy), each once however often it came.
   */
  readonly blocks: (
    blocks: ReadonlyArray<RamBlock>,
    pageSize: number,
    mainPages?: () => number
  ) => Effect.Effect<GuestRam.GuestRam["Type"], E, R>
  /** A flush: every multifd channel sends one SYNC packet for it; returns once they all arrived. */
  readonly flush: (index: number) => Effect.Effect<void, E, R>
  /** The RAM section's last record begins (`SECTION_END`): its final flush follows, then the channels end. */
  readonly ramEnding?: Effect.Effect<void, E, R> | undefined
  /** The RAM section ended; what follows is device state. */
  readonly ramEnded?: Effect.Effect<void, E, R> | undefined
  /** A COMMAND record that was accepted (`SWITCHOVER_START`, `PING`). */
  readonly command?: ((name: string) => Effect.Effect<void, E, R>) | undefined
  /**
   * The source opened a return path (`MIG_CMD_OPEN_RETURN_PATH`): without this step the stream is refused,
   * naming capability return-path.
   */
  readonly openReturnPath?: Effect.Effect<void, E, R> | undefined
  /** A `MIG_CMD_PING` with its value (answered with a PONG on an open return path). */
  readonly ping?: ((value: number) => Effect.Effect<void, E, R>) | undefined
  /**
   * A block of a mapped-ram stream, once the whole list is known and the memory given: the block's header
   * (validated against the page size) and the memory its pages go to. The handler reads them.
   */
  readonly mappedRam?:
    | ((block: RamBlock, header: MappedRamHeader, target: GuestRam.Block) => Effect.Effect<void, E, R>)
    | undefined
}

/** How to read. */
export interface ReadOptions {
  /**
   * Target page size, when the stream does not say (x86: 4096, the default; only targets whose page size
   * varies send it). A stream that says otherwise is refused.
   */
  readonly pageSize?: number | undefined
  /**
   * QEMU's `multifd-flush-after-each-section`: every EOS word is a flush too, and QEMU sends no
   * `RAM_SAVE_FLAG_MULTIFD_FLUSH`. Default: as the configuration record's machine type has it (on for machine
   * types of QEMU 8.0 and before, such as `pc-i440fx-8.0` or `pc-q35-7.1`, which QEMU 10 still runs), unless
   * the stream is a mapped-ram file or a
   * `RAM_SAVE_FLAG_MULTIFD_FLUSH` came (QEMU sends none with it on).
   */
  readonly flushAfterEachSection?: boolean | undefined
  /** Keep the device state after the RAM section (`Summary.deviceState`). Default off: it is drained. */
  readonly keepDeviceState?: boolean | undefined
  /**
   * Accept capability `mapped-ram` in the configuration: the stream is a mapped-ram file (its source can
   * `seek`). Default off: a socket never carries one.
   */
  readonly mappedRam?: boolean | undefined
  /**
   * Where the stream starts in its source (default 0): a file QEMU wrote at an offset (`migrate
   * file:PATH,offset=N`), whose mapped-ram offsets are the file's own. The reader's offsets (and `seek`'s
   * positions) count from the file's start; `Summary.bytes` from the stream's.
   */
  readonly startOffset?: number | undefined
  /**
   * A source with capability `postcopy-ram` (libvirt's `--postcopy`), which advises postcopy at the start and
   * migrates in precopy until told to switch: `"refuse"` (the default) fails at the advise, where the source's
   * migration still fails cleanly, its guest running; `"precopy"` takes the precopy migration, and refuses a switch
   * (`migrate-start-postcopy`) when it comes — by then QEMU 10.0 may have handed its VM over, and it then stays
   * `postcopy-paused`, the guest stopped until it is recovered elsewhere or killed.
   */
  readonly postcopyRam?: "refuse" | "precopy" | undefined
}

// ---------------------------------------------------------------------------------------------------------
// The end of the stream

/** What the drained end of a stream turned out to be. */
export type Ending =
  | { readonly _tag: "Complete"; readonly devices: number | undefined }
  | { readonly _tag: "Incomplete" }

/**
 * Whether QEMU's `multifd-flush-after-each-section` is on for `machine` (a configuration record's machine
 * type) unless set otherwise: on for the versioned machine types of QEMU 8.0 and before (QEMU's `hw_compat_8_0`
 * turns it on: `pc-i440fx-8.0`, `pc-q35-7.1`, `virt-6.2`), off for later ones and for unversioned ones
 * (`none`, `microvm`). With it on, a multifd source syncs its channels before every EOS word and sends no
 * `RAM_SAVE_FLAG_MULTIFD_FLUSH`, and a destination syncs them at every EOS word (and at each flush word).
 */
export const flushesAfterEachSection = (machine: string | undefined): boolean => {
  const version = machine === undefined ? null : /-(\d+)\.(\d+)$/.exec(machine)
  if (version === null) return false
  const major = Number(version[1])
  return major < 8 || (major === 8 && Number(version[2]) === 0)
}

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
