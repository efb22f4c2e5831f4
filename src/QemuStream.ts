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
 * The format's vocabulary (constants, error, models) is `internal/qemu/format.ts`, re-exported here; the
 * parsers are `internal/qemu/records.ts` (one per top-level record) and `internal/qemu/ram.ts` (the RAM
 * section's words), over the buffered reader of `internal/qemu/reader.ts` and the explicit parse state of
 * `internal/qemu/state.ts`.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as format from "./internal/qemu/format.js"
import * as records from "./internal/qemu/records.js"
import * as Protocol from "./Protocol.js"

// ---------------------------------------------------------------------------------------------------------
// Constants (QEMU migration/savevm.h, migration/savevm.c, migration/ram.h)

/**
 * `QEVM`: the first 4 bytes of a QEMU migration stream.
 *
 * @since 0.1.0
 * @category constants
 */
export const FILE_MAGIC: typeof format.FILE_MAGIC = format.FILE_MAGIC

/**
 * The stream format every QEMU since 0.13 writes.
 *
 * @since 0.1.0
 * @category constants
 */
export const FILE_VERSION: typeof format.FILE_VERSION = format.FILE_VERSION

/**
 * The format before it (QEMU 0.12), which QEMU still accepts on input.
 *
 * @since 0.1.0
 * @category constants
 */
export const FILE_VERSION_COMPAT: typeof format.FILE_VERSION_COMPAT = format.FILE_VERSION_COMPAT

/**
 * The file header's size: the magic and the version, 4 bytes each.
 *
 * @since 0.1.0
 * @category constants
 */
export const HEADER_SIZE: typeof format.HEADER_SIZE = format.HEADER_SIZE

/**
 * Record types of the savevm stream.
 *
 * @since 0.1.0
 * @category constants
 */
export const Record: typeof format.Record = format.Record

/**
 * Flags in the low bits of a RAM section's 64-bit words (the rest is a page address or a size).
 *
 * @since 0.1.0
 * @category constants
 */
export const RamFlag: typeof format.RamFlag = format.RamFlag

/**
 * Sub-commands of a COMMAND record (QEMU's `enum qemu_vm_cmd`).
 *
 * @since 0.1.0
 * @category constants
 */
export const Command: typeof format.Command = format.Command

/**
 * The RAM section's name.
 *
 * @since 0.1.0
 * @category constants
 */
export const RAM_SECTION: typeof format.RAM_SECTION = format.RAM_SECTION

/**
 * The version QEMU 10 saves the RAM section with.
 *
 * @since 0.1.0
 * @category constants
 */
export const RAM_SECTION_VERSION: typeof format.RAM_SECTION_VERSION = format.RAM_SECTION_VERSION

/**
 * Messages of the return path, destination to source (QEMU's `enum mig_rp_message_type`): u16 type, u16
 * length, that many bytes.
 *
 * @since 0.1.0
 * @category constants
 */
export const ReturnPath: typeof format.ReturnPath = format.ReturnPath

/**
 * The capability of QEMU's `migrate file:` whose RAM pages sit at fixed offsets of the file.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAPPED_RAM: typeof format.MAPPED_RAM = format.MAPPED_RAM

/**
 * Size of the mapped-ram header after each block of a mapped-ram file's block list.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAPPED_RAM_HEADER_SIZE: typeof format.MAPPED_RAM_HEADER_SIZE = format.MAPPED_RAM_HEADER_SIZE

/**
 * The mapped-ram header version QEMU 10 writes and reads.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAPPED_RAM_VERSION: typeof format.MAPPED_RAM_VERSION = format.MAPPED_RAM_VERSION

/**
 * Where QEMU puts a block's pages in a mapped-ram file: the next multiple of this after its bitmap.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAPPED_RAM_ALIGNMENT: typeof format.MAPPED_RAM_ALIGNMENT = format.MAPPED_RAM_ALIGNMENT

/**
 * Name of a return path message, as QEMU's trace events print it.
 *
 * @since 0.1.0
 * @category utils
 */
export const returnPathName: (type: number) => string = format.returnPathName

/**
 * Name of a command, as QEMU's trace events print it.
 *
 * @since 0.1.0
 * @category utils
 */
export const commandName: (command: number) => string = format.commandName

/**
 * `RAM_SAVE_FLAG_A|RAM_SAVE_FLAG_B (0x..)` for a flags value.
 *
 * @since 0.1.0
 * @category utils
 */
export const describeFlags: (flags: number) => string = format.describeFlags

// ---------------------------------------------------------------------------------------------------------
// Errors

/**
 * A byte of the main stream that this reader does not accept, with the byte offset of its record: `reason`,
 * `offset`, `detail`, and `feature` when a QEMU feature the stream uses is why it is refused (`postcopy-ram`,
 * `xbzrle`, ...).
 *
 * @since 0.1.0
 * @category errors
 */
export const QemuStreamError: typeof format.QemuStreamError = format.QemuStreamError

/**
 * @since 0.1.0
 * @category errors
 */
export type QemuStreamError = format.QemuStreamError

// ---------------------------------------------------------------------------------------------------------
// What the stream says

/**
 * A RAM block as the RAM section announces it (its id string and used length).
 *
 * @since 0.1.0
 * @category models
 */
export type RamBlock = format.RamBlock

/**
 * The CONFIGURATION record: the source's machine type, its target page bits and its `-uuid` when sent.
 *
 * @since 0.1.0
 * @category models
 */
export type Configuration = format.Configuration

/**
 * A COMMAND record as it was sent (kept to be sent on verbatim).
 *
 * @since 0.1.0
 * @category models
 */
export type CommandRecord = format.CommandRecord

/**
 * The mapped-ram header after a block in a mapped-ram file's block list.
 *
 * @since 0.1.0
 * @category models
 */
export type MappedRamHeader = format.MappedRamHeader

/**
 * What happened on the stream, once it has ended.
 *
 * @since 0.1.0
 * @category models
 */
export type Summary = format.Summary

/**
 * Where the reader's bytes come from: `readSome(max, awaiting)` gives at least 1 and at most `max` bytes (waiting
 * for the first); an empty result is a clean end of stream. `awaiting` says what the reader waits for.
 *
 * @since 0.1.0
 * @category models
 */
export type ByteSource<E> = format.ByteSource<E>

/**
 * What the reader waits for when it asks its source for more: `what` (a field, `the next record`, `the device
 * state`), starting at byte `at` of the stream, `got` of its bytes already there; `between`: between two records,
 * not inside one. A source that gives up waiting can say where the stream stopped.
 *
 * @since 0.1.0
 * @category models
 */
export type Awaiting = format.Awaiting

/**
 * What the reader tells the destination, in stream order (the configuration, the validated block list, each
 * flush, the RAM section's end, accepted commands). Each step may fail with the destination's error.
 *
 * @since 0.1.0
 * @category models
 */
export type Handler<E, R = never> = format.Handler<E, R>

/**
 * How to read: the target page size when the stream does not say (default 4096), QEMU's
 * `multifd-flush-after-each-section` (default: as the stream's machine type has it), whether to keep the device
 * state, whether the stream may be a mapped-ram file.
 *
 * @since 0.1.0
 * @category models
 */
export type ReadOptions = format.ReadOptions

/**
 * What the drained end of a stream turned out to be.
 *
 * @since 0.1.0
 * @category models
 */
export type Ending = format.Ending

/**
 * A byte source over a buffer, handed out in pieces of at most `piece` bytes (tests and replays).
 *
 * @since 0.1.0
 * @category constructors
 */
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

// ---------------------------------------------------------------------------------------------------------
// Reading

/**
 * Reads a QEMU main migration stream to its end. Returns what it met once the RAM section ended, the device
 * state was drained and the stream ended as a complete stream ends.
 *
 * @since 0.1.0
 * @category reading
 */
export const read: <E, R = never>(
  source: ByteSource<E>,
  handler: Handler<E, R>,
  options?: ReadOptions
) => Effect.Effect<Summary, E | QemuStreamError, R> = records.read

/**
 * Why the first `HEADER_SIZE` bytes of a stream are not a header `read` accepts (the magic `QEVM`, then file
 * version 3) — a `BadMagic` or `BadVersion` error —, or `undefined` when they are.
 *
 * @since 0.1.0
 * @category reading
 */
export const checkHeader: (header: Uint8Array) => QemuStreamError | undefined = format.checkHeader

/**
 * Checks the drained end of a stream (`tail` = its last bytes, `length` = how many were drained in all): a
 * complete stream ends with the EOF marker (0x00), followed — unless the machine suppresses it — by the
 * VMDESCRIPTION record (0x06, u32 length, that many bytes of JSON). A stream that stops anywhere else was
 * cut off: QEMU cancelled, failed or was killed while it sent the device state.
 *
 * @since 0.1.0
 * @category reading
 */
export const checkEnding: (tail: Buffer, length: number) => Ending = format.checkEnding

/**
 * Whether the first 4 bytes of a connection are a QEMU main stream's.
 *
 * @since 0.1.0
 * @category predicates
 */
export const isMainStream = (first: Uint8Array): boolean =>
  first.length >= 4 && Buffer.from(first.buffer, first.byteOffset, 4).readUInt32BE(0) === FILE_MAGIC

/**
 * Whether the first 4 bytes of a connection are a multifd channel's.
 *
 * @since 0.1.0
 * @category predicates
 */
export const isMultifdChannel = (first: Uint8Array): boolean =>
  first.length >= 4 && Buffer.from(first.buffer, first.byteOffset, 4).readUInt32BE(0) === Protocol.MAGIC
