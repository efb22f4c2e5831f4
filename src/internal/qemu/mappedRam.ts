/**
 * QEMU's mapped-ram file (capability `mapped-ram` of `migrate file:`) as QEMU 10 lays it out
 * (`migration/ram.c`: `mapped_ram_setup_ramblock`, `ram_save_file_bmap`, `parse_ramblock_mapped_ram`):
 *
 * - the main stream from offset 0: header, CONFIGURATION with capability `mapped-ram`, the RAM section's
 *   SECTION_START with `RAM_SAVE_FLAG_MEM_SIZE` and the block list, where each block's entry (id, used
 *   length) is followed by a 28-byte mapped-ram header (u32 version 1, u64 page size, u64 bitmap offset, u64
 *   pages offset), its bitmap right after the header (one bit a page, set for a page present in the file, as
 *   little-endian 64-bit words), and its pages at the next multiple of 1 MiB, page i at `pages offset + i *
 *   page size`; the stream goes on right after the block's last page;
 * - after the list, the RAM section's EOS and footer, the commands of the RAM phase, SECTION_END (EOS,
 *   footer), and the device state, end marker and description, verbatim, to the end of the file.
 *
 * Zero pages are not written (their bit is clear): the file is sparse. Reading accepts any offsets QEMU's
 * loader accepts (pages at a multiple of the page size), so QEMU's own files read the same as ours, and a
 * plain QEMU stream file (`migrate file:` without mapped-ram: pages on the stream) reads too.
 *
 * @internal
 */
import * as Data from "effect/Data"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as GuestRam from "../../GuestRam.js"
import * as Protocol from "../../Protocol.js"
import * as QemuStream from "../../QemuStream.js"
import * as QemuVm from "../../QemuVm.js"
import * as Transfer from "../../Transfer.js"
import * as FileIo from "../native/fileIo.js"
import * as EventLoop from "../native/eventLoop.js"
import * as PeerText from "../peerText.js"
import * as SnapshotFormat from "../snapshotFormat.js"
import { MAPPED_RAM, MAPPED_RAM_ALIGNMENT, MAPPED_RAM_HEADER_SIZE } from "./format.js"
import * as Unloaded from "./unloaded.js"
import * as Writer from "./writer.js"
import * as Memory from "../memory.js"

/** A mapped-ram file that cannot be written or read. */
export class MappedRamError extends Data.TaggedError("MappedRamError")<{
  readonly reason: "Unusable" | "Malformed" | "Truncated" | "TooLarge" | "Unsupported" | "Io" | "Busy"
  readonly path: string
  readonly detail: string
  readonly cause?: unknown
  /**
   * Where the file holds a QEMU stream's header, when it holds none where it was looked for (a file QEMU's
   * `migrate file:PATH,offset=N` wrote at N): the offset to read it from.
   */
  readonly streamAt?: number | undefined
}> {
  override get message(): string {
    return `${this.path.length === 0 ? "mapped-ram file" : this.path}: ${PeerText.printable(this.detail)}`
  }
}

/** Bytes moved per positional transfer batch (an interruption lands between two). */
const BATCH = 64 * 1024 * 1024
/** Transfers in flight at once (libuv's thread pool has 4 threads). */
const IN_FLIGHT = 4
/** Largest single transfer: a run is split so that the thread pool moves it in parallel. */
const PIECE = 1024 * 1024
/** Bytes read at a time while following the main stream. */
const STREAM_CHUNK = 1024 * 1024
/** Bytes searched for a QEMU stream's header when a file holds none where it was looked for. */
const SEARCH_LIMIT = 64 * 1024 * 1024
/** A QEMU stream's first bytes: `QEVM`, then file version 3. */
const STREAM_HEADER = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3])

/** The first bytes of a compressed file, by the compressor that wrote it. */
const COMPRESSED: ReadonlyArray<readonly [string, Buffer]> = [
  ["gzip", Buffer.from([0x1f, 0x8b])],
  ["zstd", Buffer.from([0x28, 0xb5, 0x2f, 0xfd])],
  ["xz", Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])],
  ["bzip2", Buffer.from("BZh", "latin1")],
  ["lzop", Buffer.from([0x89, 0x4c, 0x5a, 0x4f])],
  ["lz4", Buffer.from([0x04, 0x22, 0x4d, 0x18])]
]

/**
 * What the file holds at `at` instead of QEMU's stream, when it is something a user may mistake for one: a
 * compressor's output (QEMU's stream through a pipe, `migrate "exec:gzip -c > FILE"`, as QEMU's documentation shows
 * it, which it reads back the same way), an effect-multifd snapshot (`send file:`), or a raw RAM image (`recv --out`).
 */
const otherFormat = (file: FileIo.Readable, at: number): Effect.Effect<string | undefined, FileIo.FileError> =>
  Effect.gen(function*() {
    const first = Buffer.alloc(Math.max(0, Math.min(SnapshotFormat.MAGIC.length, file.size - at)))
    if (first.length > 0) yield* FileIo.transfer("read", file, first, 0, first.length, at)
    if (first.equals(SnapshotFormat.MAGIC)) {
      return "it is an effect-multifd snapshot (send file:, Snapshot.save), not a file of QEMU's: restore it with " +
        "recv file:PATH without --from-qemu (Snapshot.restore)"
    }
    const by = COMPRESSED.find(([, magic]) => first.subarray(0, magic.length).equals(magic))?.[0]
    if (by !== undefined) {
      return `it is ${by}-compressed (QEMU's migrate "exec:${by} -c > FILE"?): decompress it first (${by} -d)`
    }
    // a whole number of pages from its start, no header: what recv --out (Migration's destination) writes
    return at === 0 && file.size > 0 && file.size % RAW_PAGE === 0
      ? `it looks like a raw RAM image (as recv --out writes: no stream header, ${file.size} bytes, a whole number of ` +
        `${RAW_PAGE}-byte pages): send --in migrates one to this library's recv; a QEMU takes a VM file (recv ` +
        `--from-qemu --vm, or QEMU's own migrate file: with capability mapped-ram)`
      : undefined
  })

/** The smallest page size of a raw RAM image (every larger one is a multiple of it). */
const RAW_PAGE = 4096

/**
 * Where, in the file's first `SEARCH_LIMIT` bytes, a QEMU stream's header is (other than at `not`, where it was
 * looked for), or `undefined`: a file QEMU's `migrate file:PATH,offset=N` wrote after a header of the user's own.
 */
const findStreamHeader = (file: FileIo.Readable, not: number): Effect.Effect<number | undefined, FileIo.FileError> =>
  Effect.gen(function*() {
    const end = Math.min(file.size, SEARCH_LIMIT)
    const chunk = Buffer.allocUnsafe(STREAM_CHUNK + STREAM_HEADER.length - 1)
    for (let at = 0; at < end; at += STREAM_CHUNK) {
      const n = Math.min(chunk.length, file.size - at)
      if (n < STREAM_HEADER.length) return undefined
      yield* FileIo.transfer("read", file, chunk, 0, n, at)
      for (let i = chunk.subarray(0, n).indexOf(STREAM_HEADER); i >= 0; i = chunk.subarray(0, n).indexOf(STREAM_HEADER, i + 1)) {
        if (at + i !== not) return at + i
      }
    }
    return undefined
  })

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to

/** Bytes of a block's bitmap: one bit a page, in 64-bit words. */
export const bitmapSize = (pages: number): number => Math.ceil(pages / 64) * 8

/** Where one block lies in the file. */
export interface BlockPlace {
  readonly block: GuestRam.Block
  readonly bitmapOffset: number
  readonly pagesOffset: number
}

/** Where everything of a VM goes: the stream's bytes at their offsets, each block's bitmap and pages. */
export interface Layout {
  readonly stream: ReadonlyArray<{ readonly position: number; readonly bytes: Buffer }>
  readonly blocks: ReadonlyArray<BlockPlace>
  /** The file's length. */
  readonly size: number
}

/** The layout of `vm`'s mapped-ram file (QEMU's: each block's pages at the next MiB after its bitmap). */
export const layout = (vm: QemuVm.QemuVm, configuration: QemuStream.Configuration): Layout => {
  const stream: Array<{ readonly position: number; readonly bytes: Buffer }> = []
  const blocks: Array<BlockPlace> = []
  const pageSize = vm.ram.pageSize
  const id = vm.ramSectionId
  const list = vm.ram.blocks.map((b) => ({ name: b.name, size: b.bytes.length }))
  let position = 0
  const put = (bytes: Buffer) => {
    stream.push({ position, bytes })
    position += bytes.length
  }
  put(Buffer.concat([
    Writer.header(),
    Writer.configuration(configuration, [MAPPED_RAM]),
    Writer.ramStart(id),
    Writer.memSize(list)
  ]))
  for (const block of vm.ram.blocks) {
    const entry = Writer.blockEntry({ name: block.name, size: block.bytes.length })
    const bitmapOffset = position + entry.length + MAPPED_RAM_HEADER_SIZE
    const pagesOffset = roundUp(bitmapOffset + bitmapSize(block.pages), MAPPED_RAM_ALIGNMENT)
    put(Buffer.concat([entry, Writer.mappedRamHeader({ pageSize, bitmapOffset, pagesOffset })]))
    blocks.push({ block, bitmapOffset, pagesOffset })
    position = pagesOffset + block.bytes.length
  }
  put(Buffer.concat([
    Writer.EOS,
    Writer.footer(id),
    ...vm.commands.map(Writer.command),
    Writer.ramPart(id, true),
    Writer.EOS,
    Writer.footer(id),
    Buffer.from(vm.deviceState.buffer, vm.deviceState.byteOffset, vm.deviceState.length)
  ]))
  return { stream, blocks, size: position }
}

const fileError = (path: string, what: string) => (error: FileIo.FileError) =>
  new MappedRamError({
    reason: error.step === "Open" || error.step === "NotRegular" || error.step === "Create" || error.step === "Unsafe" ||
        error.step === "OpenDirectory"
      ? "Unusable"
      : error.step === "Ended"
      ? "Truncated"
      : "Io",
    path,
    // a read that met the end of the file where its size at the open said there were bytes: shortened under the
    // reader (it said "cannot read the file: ended failed")
    detail: error.step === "Ended"
      ? `the file ended early, at ${error.position} (was it truncated while being read?)`
      : error.step === "NotRegular"
      ? "is not a regular file"
      : error.step === "Unsafe"
      ? FileIo.describeUnsafe(path, error)
      : error.step === "OpenDirectory"
      ? FileIo.describeOpenDirectory(error)
      : error.replaced !== undefined
      ? FileIo.describeUnsynced(error)
      : `cannot ${what}: ${error.step.toLowerCase()} failed` +
        (error.cause === undefined ? "" : `: ${FileIo.describe(error.cause)}`),
    cause: error
  })

/**
 * Pages of `block` present in the file, as runs [first, end) of page indices: the pages that are not
 * zero (writing), or whose bit is set (reading).
 */
const runsOf = function*(pages: number, present: (page: number) => boolean): Generator<readonly [number, number]> {
  // `present` is asked once a page
  let first = -1
  for (let page = 0; page < pages; page++) {
    if (present(page)) {
      if (first < 0) first = page
    } else if (first >= 0) {
      yield [first, page]
      first = -1
    }
  }
  if (first >= 0) yield [first, pages]
}

/**
 * Moves the runs of one block between memory and the file, in batches of `BATCH` bytes: the block's own
 * memory, or `into` holding the block's bytes from `origin` on (a window).
 */
const transferRuns = (
  op: "read" | "write",
  file: FileIo.File,
  place: BlockPlace,
  pageSize: number,
  runs: Iterable<readonly [number, number]>,
  into: Uint8Array = place.block.bytes,
  origin = 0
): Effect.Effect<void, FileIo.FileError> =>
  Effect.gen(function*() {
    const maxRun = Math.max(1, PIECE / pageSize)
    const list = FileIo.ioList(1024)
    let bytes = 0
    const flush = Effect.suspend(() => {
      if (list.count === 0) return Effect.void
      const run = FileIo.transferAll(op, file, into, list, IN_FLIGHT)
      return Effect.zipRight(run, Effect.sync(() => {
        list.count = 0
        bytes = 0
      }))
    })
    for (const [first, end] of runs) {
      for (let from = first; from < end; from += maxRun) {
        const to = Math.min(end, from + maxRun)
        const at = from * pageSize
        const length = (to - from) * pageSize
        FileIo.push(list, at - origin, length, place.pagesOffset + at)
        bytes += length
        if (bytes >= BATCH || list.count === 1024) {
          yield* flush
          yield* EventLoop.cooperate
        }
      }
    }
    yield* flush
  })

/**
 * Writes `vm` as a mapped-ram file at `path`: a temporary file beside it of the whole length (sparse), the
 * stream and every non-zero page at its place, each block's bitmap, then fsync and rename into place (and
 * the directory's fsync). On failure or interruption nothing is left at `path` or beside it. A save of the VM's
 * memory: one at a time with every other migration, save or restore of it (`Busy`, nothing written); a restore or
 * migration into it wrote past its gate while its pages were written, and QEMU, which verifies nothing, resumed a VM
 * of pages from two memories. The VM of `open` whose pages were not all loaded is refused (`Unsupported`): its
 * memory holds zeros for them.
 */
export const write = (
  path: string,
  vm: QemuVm.QemuVm
): Effect.Effect<{ readonly size: number; readonly pages: number }, MappedRamError> =>
  Memory.exclusively(
    vm.ram,
    writeFile(path, vm),
    (detail) => new MappedRamError({ reason: "Busy", path, detail: `not written: ${detail}` }),
    (detail) => new MappedRamError({ reason: "Unsupported", path, detail: `not written: ${detail}` })
  )

const writeFile = (
  path: string,
  vm: QemuVm.QemuVm
): Effect.Effect<{ readonly size: number; readonly pages: number }, MappedRamError> =>
  Effect.scoped(Effect.gen(function*() {
    // an empty path made a hidden `.<pid>.partial` in the working directory, wrote the whole VM into it, and failed
    // only at the rename
    if (path.length === 0) return yield* new MappedRamError({ reason: "Unusable", path, detail: "no file path given" })
    // a VM of `open` whose pages were not all loaded: its memory holds zeros for them
    const notLoaded = Unloaded.problem(vm.ram, "load them first, or read it whole with MappedRam.read")
    if (notLoaded !== undefined) return yield* new MappedRamError({ reason: "Unsupported", path, detail: `not written: ${notLoaded}` })
    const configuration = vm.configuration
    if (configuration === undefined) {
      return yield* new MappedRamError({
        reason: "Unsupported",
        path,
        detail: "the VM's stream had no configuration record (send-configuration off), which a mapped-ram file " +
          "needs to carry capability mapped-ram"
      })
    }
    const plan = layout(vm, configuration)
    const failed = fileError(path, "write the file")
    const file = yield* Effect.mapError(FileIo.atomicFile(path, { size: plan.size }), failed)
    const pageSize = vm.ram.pageSize
    let pages = 0
    for (const piece of plan.stream) {
      yield* Effect.mapError(FileIo.transfer("write", file, piece.bytes, 0, piece.bytes.length, piece.position), failed)
    }
    for (const place of plan.blocks) {
      const { block } = place
      const bitmap = Buffer.alloc(bitmapSize(block.pages))
      const present = (page: number) => {
        if (GuestRam.isZeroPage(block.bytes, page * pageSize, pageSize)) return false
        bitmap[page >>> 3]! |= 1 << (page & 7)
        pages++
        return true
      }
      yield* Effect.mapError(transferRuns("write", file, place, pageSize, runsOf(block.pages, present)), failed)
      yield* Effect.mapError(FileIo.transfer("write", file, bitmap, 0, bitmap.length, place.bitmapOffset), failed)
    }
    yield* Effect.mapError(file.commit, failed)
    return { size: plan.size, pages }
  }))

/** Zeros to copy over a window's pages that the file does not hold (`fill` on shared memory is slow). */
const ZEROS = Buffer.alloc(PIECE)

const zeroRange = (into: Uint8Array, from: number, to: number): void => {
  for (let at = from; at < to; at += ZEROS.length) into.set(ZEROS.subarray(0, Math.min(ZEROS.length, to - at)), at)
}

/** A QEMU migration file opened: its VM (the pages of a mapped-ram file not read yet), and how to read them. */
export interface Opened {
  /** The VM; a mapped-ram file's pages are read into its memory by `load`. */
  readonly vm: QemuVm.QemuVm
  readonly summary: QemuStream.Summary
  /** Pages the file holds (the others are zero). */
  readonly pages: number
  /**
   * Reads the pages `first` to `first + count - 1` of `block` that the file holds into its memory (a plain
   * stream's are there already: nothing to do).
   */
  readonly load: (block: GuestRam.Block, first: number, count: number) => Effect.Effect<void, MappedRamError>
  /**
   * Reads the pages `first` to `first + count - 1` of `block` into `into` (at least `count` pages; the pages
   * the file does not hold are zeroed there). A mapped-ram file's pages are read from the file, leaving the
   * VM's memory untouched: a migration that sends each batch from a small window never touches the VM's whole
   * RAM. (A plain stream's pages were read with it: they are copied from the VM's memory.)
   */
  readonly readPages: (
    block: GuestRam.Block,
    first: number,
    count: number,
    into: Uint8Array
  ) => Effect.Effect<void, MappedRamError>
}

/** libvirt's save image header (`virsh save`, libvirt's qemu_saveimage.h): magic, then u32 fields in host order. */
const LIBVIRT_SAVE = "LibvirtQemudSave"
const LIBVIRT_PARTIAL = "LibvirtQemudPart"
/** 16 bytes of magic, version, data_len, was_running, format, cookieOffset, 14 unused: 92 bytes. */
const LIBVIRT_HEADER_SIZE = 92
/** libvirt's save image formats (`save_image_format`): raw and sparse (mapped-ram) hold QEMU's stream as it is. */
const LIBVIRT_FORMATS: ReadonlyArray<string> = ["raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse"]

/**
 * Where QEMU's stream starts in `file`: after the header and domain XML of a libvirt save image (`virsh save`,
 * `virsh managedsave`: QEMU wrote its stream after them, at an offset), else at its start. A libvirt image whose
 * stream is compressed, or whose save never finished, is refused saying so.
 */
const libvirtSaveStart = (file: FileIo.Readable, path: string): Effect.Effect<number, MappedRamError> =>
  Effect.gen(function*() {
    if (file.size < LIBVIRT_HEADER_SIZE) return 0
    const header = Buffer.alloc(LIBVIRT_HEADER_SIZE)
    yield* Effect.mapError(FileIo.transfer("read", file, header, 0, LIBVIRT_HEADER_SIZE, 0), fileError(path, "read the file"))
    const magic = header.toString("latin1", 0, 16)
    if (magic === LIBVIRT_PARTIAL) {
      return yield* new MappedRamError({
        reason: "Truncated",
        path,
        detail: `an incomplete libvirt save image (its header says ${LIBVIRT_PARTIAL}: the save never finished)`
      })
    }
    if (magic !== LIBVIRT_SAVE) return 0
    // host order: the version (2) tells which
    const little = header.readUInt32LE(16) === 2
    const u32 = (at: number) => little ? header.readUInt32LE(at) : header.readUInt32BE(at)
    if (u32(16) !== 2) {
      return yield* new MappedRamError({
        reason: "Unsupported",
        path,
        detail: `a libvirt save image of version ${header.readUInt32LE(16)}; only version 2 is supported`
      })
    }
    const format = u32(28)
    const name = LIBVIRT_FORMATS[format] ?? `format ${format}`
    if (name !== "raw" && name !== "sparse") {
      return yield* new MappedRamError({
        reason: "Unsupported",
        path,
        detail: `a libvirt save image whose QEMU stream is compressed (${name}), which is not supported: ` +
          "save it with libvirt's save_image_format raw or sparse"
      })
    }
    const start = LIBVIRT_HEADER_SIZE + u32(20)
    if (start > file.size) {
      return yield* new MappedRamError({
        reason: "Truncated",
        path,
        detail: `a libvirt save image of ${file.size} bytes whose domain XML runs to byte ${start}: cut short?`
      })
    }
    return start
  })

/**
 * Opens the QEMU migration file at `path` in the current scope (it stays open with it): a mapped-ram file
 * (QEMU's or ours), or a plain stream (`migrate file:` without mapped-ram). The main stream is read whole —
 * configuration, block list and bitmaps, commands, device state — and memory of the file's layout is
 * allocated, up to `maxRamBytes`, untouched; a mapped-ram file's pages are read by `load`, as they are needed.
 * A file written since it was opened (QEMU still writing it, a `migrate file:` to it run again, `cp` over it) fails
 * the open, or the `load` or `readPages` that read from it after the write (`FileIo.changed`): what was read of it
 * may be part old, part new, a VM that never was.
 */
export const open = (
  path: string,
  options: { readonly maxRamBytes: number; readonly pageSize?: number | undefined; readonly offset?: number | undefined }
): Effect.Effect<Opened, MappedRamError, Scope.Scope> =>
  Effect.gen(function*() {
    const given = options.offset
    const badLimit = Transfer.checkMaxRam(options.maxRamBytes) ??
      (options.pageSize === undefined ? undefined : Protocol.checkPageSize(options.pageSize, "pageSize")) ??
      (given === undefined || (Number.isSafeInteger(given) && given >= 0)
        ? undefined
        : `offset must be a byte offset (an integer >= 0), not ${given}`)
    if (badLimit !== undefined) return yield* new MappedRamError({ reason: "Unsupported", path, detail: badLimit })
    const failed = fileError(path, "read the file")
    const file = yield* Effect.mapError(FileIo.openForReading(path), failed)
    const offset = given ?? 0
    if (offset > file.size) {
      return yield* new MappedRamError({
        reason: "Truncated",
        path,
        detail: `the file (${file.size} bytes) ends before offset ${offset}, where QEMU's stream was to start`
      })
    }
    // `load` and `readPages` read through the raw descriptor, which the scope closes: kept past it, they would read
    // whatever the number names by then (a socket, another file). Set before the descriptor closes (finalizers run
    // in reverse order)
    const closed = yield* Deferred.make<void>()
    yield* Effect.addFinalizer(() => Deferred.succeed(closed, undefined))
    const whenOpen = <A>(read: Effect.Effect<A, MappedRamError>): Effect.Effect<A, MappedRamError> =>
      Effect.flatMap(Deferred.isDone(closed), (gone) =>
        gone
          ? Effect.fail(
            new MappedRamError({
              reason: "Unusable",
              path,
              detail: "closed: the scope that opened it (MappedRam.open) has ended; read its pages (load, readPages) within it"
            })
          )
          : read
      )
    // (a stream QEMU wrote at an offset: its mapped-ram offsets, and so the reader's, are the file's own)
    let position = 0
    const source: QemuStream.ByteSource<MappedRamError> = {
      readSome: (max) =>
        Effect.suspend(() => {
          const n = Math.max(0, Math.min(max, STREAM_CHUNK, file.size - position))
          if (n === 0) return Effect.succeed(new Uint8Array(0))
          const chunk = Buffer.allocUnsafe(n)
          return Effect.as(
            Effect.tap(Effect.mapError(FileIo.transfer("read", file, chunk, 0, n, position), failed), () =>
              Effect.sync(() => (position += n))),
            chunk
          )
        }),
      seek: (to) => Effect.sync(() => (position = to))
    }
    const truncated = (detail: string) => new MappedRamError({ reason: "Truncated", path, detail })
    let memory: GuestRam.GuestRam["Type"] | undefined
    // where each block's pages are, and which the file holds
    const places = new Map<string, BlockPlace & { readonly bitmap: Buffer }>()
    let pages = 0
    const handler: QemuStream.Handler<MappedRamError> = {
      blocks: (blocks, pageSize) =>
        Effect.gen(function*() {
          const total = blocks.reduce((n, b) => n + b.size, 0)
          if (total > options.maxRamBytes) {
            return yield* new MappedRamError({
              reason: "TooLarge",
              path,
              detail: `its ${total} bytes of RAM exceed the limit of ${options.maxRamBytes}`
            })
          }
          memory = yield* GuestRam.make({
            pageSize,
            blocks: blocks.map((b) => ({ name: b.name, size: b.size })),
            prefault: false
          }).pipe(Effect.mapError((e) =>
            new MappedRamError({ reason: e.reason === "OutOfMemory" ? "TooLarge" : "Malformed", path, detail: e.message })
          ))
          return memory
        }),
      mappedRam: (block, header, target) =>
        Effect.gen(function*() {
          const size = bitmapSize(target.pages)
          if (header.bitmapOffset + size > file.size || header.pagesOffset + block.size > file.size) {
            return yield* truncated(
              `the file (${file.size} bytes) ends inside RAM block '${block.name}' (bitmap at ${header.bitmapOffset}, ` +
                `pages at ${header.pagesOffset}, ${block.size} bytes): cut short?`
            )
          }
          const bitmap = Buffer.alloc(size)
          yield* Effect.mapError(FileIo.transfer("read", file, bitmap, 0, size, header.bitmapOffset), failed)
          for (let page = 0; page < target.pages; page++) if ((bitmap[page >>> 3]! & (1 << (page & 7))) !== 0) pages++
          places.set(block.name, { block: target, bitmapOffset: header.bitmapOffset, pagesOffset: header.pagesOffset, bitmap })
        }),
      // a mapped-ram stream carries no flush (its channels wrote to the file); a plain one has no channels
      flush: () => Effect.void
    }
    /** QEMU's stream from `start`; `within` says, when its header is not one, where it was looked for. */
    const readStream = (start: number, within: string) =>
      Effect.suspend(() => {
        position = start
        return QemuStream.read(source, handler, {
          mappedRam: true,
          // a file is a mapped-ram one (flushed once, after its block list) or one without multifd: no EOS flushes
          flushAfterEachSection: false,
          keepDeviceState: true,
          pageSize: options.pageSize,
          startOffset: start
        })
      }).pipe(
        Effect.catchTag("QemuStreamError", (e) =>
          Effect.fail(
            new MappedRamError({
              reason: e.reason === "Truncated" || e.reason === "Incomplete"
                ? "Truncated"
                : e.reason === "BadMagic" || e.reason === "BadVersion"
                ? "Unusable"
                : "Malformed",
              path,
              detail: `${e.reason === "BadMagic" || e.reason === "BadVersion" ? within : ""}${
                e.detail.replace(/: QEMU closed the main channel.*$|: QEMU cancelled.*$/, "")
              } (at byte ${e.offset})`,
              cause: e
            })
          ))
      )
    // no QEMU stream at the start of a file given no offset: a libvirt save image's is after its header and XML (read
    // only then: a QEMU file is read as it always was)
    /** Where the stream was looked for, when no QEMU stream was there (its magic not QEVM). */
    const lookedAt = (e: MappedRamError) =>
      e.cause instanceof QemuStream.QemuStreamError && e.cause.reason === "BadMagic" ? e.cause.offset : undefined
    const notAStream = (e: MappedRamError) => lookedAt(e) !== undefined
    const summary = yield* readStream(offset, "").pipe(
      Effect.catchIf(
        (e) => given === undefined && notAStream(e),
        (e) =>
          Effect.flatMap(libvirtSaveStart(file, path), (start) =>
            start === 0
              ? Effect.fail(e)
              : readStream(start, `a libvirt save image, whose QEMU stream at byte ${start} is `))
      ),
      // none where it was looked for, but one further on (QEMU's migrate file:PATH,offset=N wrote it at N): say where
      Effect.catchIf(
        notAStream,
        (e) =>
          Effect.flatMap(Effect.mapError(findStreamHeader(file, lookedAt(e)!), failed), (at) =>
            at === undefined
              ? Effect.fail(e)
              : Effect.fail(
                new MappedRamError({
                  reason: e.reason,
                  path,
                  detail: `${e.detail}; a QEMU stream starts at byte ${at} (${
                    at === 0 ? "the file's start" : `written by QEMU's migrate file:PATH,offset=${at}?`
                  })`,
                  cause: e.cause,
                  streamAt: at
                })
              ))
      ),
      // none at all, but a compressor's output (QEMU's stream through a pipe) or one of our snapshots: said so
      Effect.catchIf(
        (e) => notAStream(e) && e.streamAt === undefined,
        (e) =>
          Effect.flatMap(Effect.mapError(otherFormat(file, lookedAt(e)!), failed), (what) =>
            Effect.fail(
              what === undefined
                ? e
                : new MappedRamError({ reason: e.reason, path, detail: `${e.detail}; ${what}`, cause: e.cause })
            ))
      )
    )
    // written meanwhile: the stream read may be part old, part new (and so may the pages read later)
    const unchanged = Effect.flatMap(Effect.mapError(FileIo.changed(file), failed), (changed) =>
      changed
        ? Effect.fail(
          new MappedRamError({
            reason: "Io",
            path,
            detail: "the file changed while it was read (QEMU or another process still writing it?): what was read " +
              "may mix its old and new bytes; read it again once nothing writes it"
          })
        )
        : Effect.void)
    yield* unchanged
    const vm = memory === undefined ? undefined : QemuVm.fromSummary(summary, memory)
    if (vm === undefined) return yield* new MappedRamError({ reason: "Malformed", path, detail: "no RAM section" })
    // the pages `load` read into the memory, by block: a VM whose held pages are not all there is not one yet
    // (`Unloaded`: sent or written as it is, its pages not loaded would be zeros)
    const loaded = new Map<string, Uint8Array>()
    for (const [name, place] of places) loaded.set(name, new Uint8Array(Math.ceil(place.block.pages / 8)))
    if (places.size > 0) {
      Unloaded.track(vm.ram, () => {
        let missing = 0
        for (const [name, { bitmap, block }] of places) {
          const done = loaded.get(name)!
          for (let page = 0; page < block.pages; page++) {
            const bit = 1 << (page & 7)
            if ((bitmap[page >>> 3]! & bit) !== 0 && (done[page >>> 3]! & bit) === 0) missing++
          }
        }
        return missing
      })
    }
    const markLoaded = (name: string, first: number, count: number) =>
      Effect.sync(() => {
        const done = loaded.get(name)
        if (done === undefined) return
        for (let page = first; page < first + count; page++) done[page >>> 3]! |= 1 << (page & 7)
      })
    /** The runs of pages `first` to `first + count - 1` the file holds (their bits set), as block page indices. */
    const heldRuns = ({ bitmap }: { readonly bitmap: Buffer }, first: number, count: number) =>
      Array.from(runsOf(count, (i) => (bitmap[(first + i) >>> 3]! & (1 << ((first + i) & 7))) !== 0))
        .map(([from, to]) => [first + from, first + to] as const)
    const load = (block: GuestRam.Block, first: number, count: number) =>
      whenOpen(Effect.suspend(() => {
        const place = places.get(block.name)
        if (place === undefined) return Effect.void
        return Effect.zipRight(
          Effect.mapError(transferRuns("read", file, place, vm.ram.pageSize, heldRuns(place, first, count)), failed),
          Effect.zipRight(unchanged, markLoaded(block.name, first, count))
        )
      }))
    const readPages = (block: GuestRam.Block, first: number, count: number, into: Uint8Array) =>
      whenOpen(Effect.suspend(() => {
        const pageSize = vm.ram.pageSize
        const origin = first * pageSize
        const place = places.get(block.name)
        // a plain stream's pages were read with it
        if (place === undefined) {
          into.set(block.bytes.subarray(origin, origin + count * pageSize))
          return Effect.void
        }
        const runs = heldRuns(place, first, count)
        let at = origin
        for (const [from, to] of runs) {
          zeroRange(into, at - origin, from * pageSize - origin)
          at = to * pageSize
        }
        zeroRange(into, at - origin, count * pageSize)
        return Effect.zipRight(Effect.mapError(transferRuns("read", file, place, pageSize, runs, into, origin), failed), unchanged)
      }))
    return { vm, summary, pages: summary.mappedRam ? pages : summary.normalPages, load, readPages }
  })

/**
 * Reads the VM in the QEMU migration file at `path`: a mapped-ram file (QEMU's or ours), or a plain stream
 * (`migrate file:` without mapped-ram). Memory of the file's layout is allocated, up to `maxRamBytes`.
 */
export const read = (
  path: string,
  options: { readonly maxRamBytes: number; readonly pageSize?: number | undefined; readonly offset?: number | undefined }
): Effect.Effect<
  { readonly vm: QemuVm.QemuVm; readonly summary: QemuStream.Summary; readonly pages: number },
  MappedRamError
> =>
  Effect.scoped(Effect.gen(function*() {
    const opened = yield* open(path, options)
    for (const block of opened.vm.ram.blocks) yield* opened.load(block, 0, block.pages)
    return { vm: opened.vm, summary: opened.summary, pages: opened.pages }
  }))
