/**
 * QEMU 10's mapped-ram migration file — what `migrate file:PATH` writes, and `migrate-incoming file:PATH`
 * reads, with capabilities `mapped-ram` (and `multifd`) on — as the file format of a whole VM (`QemuVm`):
 * its RAM, and its main stream's configuration, commands and device state verbatim.
 *
 * The layout is QEMU's (`migration/ram.c`, docs/devel/migration/mapped-ram.rst): the main stream from offset
 * 0, with capability `mapped-ram` in its configuration; in the RAM section's block list each block is
 * followed by a 28-byte header (version 1, page size, bitmap offset, pages offset), its bitmap (one bit a
 * page present, little-endian 64-bit words) and, at the next multiple of 1 MiB, its pages at fixed offsets
 * (page i at pages offset + i × page size), after which the stream goes on; the device state, end marker
 * and description close the file. Zero pages are not written: the file is sparse.
 *
 * `write` goes through a temporary file beside the target (fsync, rename, directory fsync): the target only
 * ever holds a complete file. `read` takes QEMU's own files as well as ours, and also a plain QEMU stream
 * file (`migrate file:` without mapped-ram, the pages on the stream).
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as internal from "./internal/qemu/mappedRam.js"
import type * as QemuStream from "./QemuStream.js"
import type * as QemuVm from "./QemuVm.js"
import * as Transfer from "./Transfer.js"
import * as Inputs from "./internal/inputs.js"
import * as Memory from "./internal/memory.js"

/**
 * A mapped-ram file that cannot be written or read: `reason` (`Unusable`: cannot be opened or created;
 * `Malformed`: not a QEMU migration file QEMU 10 would load; `Truncated`: cut short; `TooLarge`: more RAM
 * than allowed; `Unsupported`: a VM the format cannot carry; `Io`; `Busy`: `write` of a VM whose memory a migration,
 * save or restore is using), the path, a one-line `detail`.
 *
 * @since 0.1.0
 * @category errors
 */
export const MappedRamError: typeof internal.MappedRamError = internal.MappedRamError

/**
 * @since 0.1.0
 * @category errors
 */
export type MappedRamError = internal.MappedRamError

/**
 * What writing a file did: its length (mostly holes) and the pages it holds (the non-zero ones).
 *
 * @since 0.1.0
 * @category models
 */
export interface Written {
  readonly size: number
  readonly pages: number
}

/**
 * Writes `vm` to `path` as a QEMU 10 mapped-ram file that QEMU resumes the VM from (`-incoming defer`,
 * capabilities mapped-ram and multifd, `migrate-incoming file:PATH`, and the same machine options). A save of the
 * VM's memory: while a migration, save or restore of that memory runs, it fails `Busy` and writes nothing. The VM of
 * `open` whose pages were not all loaded (`load`) is refused (`Unsupported`): its memory holds zeros for them.
 *
 * @since 0.1.0
 * @category writing
 */
export const write = (path: string, vm: QemuVm.QemuVm): Effect.Effect<Written, MappedRamError> =>
  Effect.suspend(() => {
    // (from plain JavaScript, a VM that is none threw as `write` was called: "Cannot read properties of null")
    const notVm = typeof vm === "object" && vm !== null && Memory.notGuestRam(vm.ram, "the VM's ram") === undefined
      ? undefined
      : `the VM ${Inputs.describeInput(vm)} is not a QemuVm (what QemuIncoming, MappedRam.read or open give)`
    return notPath(path) ??
      (notVm === undefined ? internal.write(path, vm) : Effect.fail(new MappedRamError({ reason: "Unsupported", path, detail: notVm })))
  })

/**
 * How to read a file: the most RAM it may make this process allocate (default 16 GiB), the target page size
 * when the stream does not say (default 4096).
 *
 * @since 0.1.0
 * @category models
 */
export interface ReadOptions {
  readonly maxRamBytes?: number | undefined
  readonly pageSize?: number | undefined
  /**
   * Where QEMU's stream starts in the file: the `N` of QEMU's `migrate file:PATH,offset=N`, whose mapped-ram
   * offsets are the file's own. Default: after the header and domain XML of a libvirt save image (`virsh save`,
   * raw or sparse; a compressed or unfinished one is refused), else 0.
   */
  readonly offset?: number | undefined
}

/**
 * What a file held: the VM, and what its stream said.
 *
 * @since 0.1.0
 * @category models
 */
export interface Read {
  readonly vm: QemuVm.QemuVm
  readonly summary: QemuStream.Summary
  /** Pages the file held (the others are zero). */
  readonly pages: number
}

/**
 * Reads the VM in a QEMU migration file: a mapped-ram file (QEMU's or ours) or a plain stream file.
 *
 * @since 0.1.0
 * @category reading
 */
export const read = (path: string, options: ReadOptions = {}): Effect.Effect<Read, MappedRamError> =>
  Effect.suspend(() =>
    notOptions(path, options) ??
      internal.read(path, settingsOf(options))
  )

/** `read`'s and `open`'s options with their defaults. */
const settingsOf = (options: ReadOptions) => ({
  // (null, from plain JavaScript, is no limit: the limit check says so, rather than take the default in silence)
  maxRamBytes: options.maxRamBytes === undefined ? Transfer.DEFAULT_MAX_RAM : options.maxRamBytes,
  pageSize: options.pageSize,
  offset: options.offset
})

/** The options as a whole that are none (`null`, from plain JavaScript: it threw as `read` or `open` was called). */
const notOptions = (path: string, options: unknown) => {
  const problem = Inputs.checkOptions(options, true)
  return notPath(path) ??
    (problem === undefined ? undefined : Effect.fail(new MappedRamError({ reason: "Unsupported", path, detail: problem })))
}

/**
 * A path that is no string (plain JavaScript): `open(null)` threw as it was called, `read(5)` failed with Node's
 * own words ('The "path" argument must be of type string...'), `write(null, vm)` threw.
 */
const notPath = (path: unknown) =>
  typeof path === "string"
    ? undefined
    : Effect.fail(new MappedRamError({ reason: "Unusable", path: "", detail: `the path ${Inputs.describeInput(path)} is not a string` }))

/**
 * A file opened by `open`: its VM, whose memory is allocated (untouched) but whose pages (of a mapped-ram
 * file) are read only by `load` or `readPages`, and how to read them — so that a migration reads each batch
 * of pages just before it sends them, the file's reads and the network's writes overlapping.
 *
 * @since 0.1.0
 * @category models
 */
export interface Opened extends internal.Opened {}

/**
 * Opens a QEMU migration file in the current scope (it stays open with it): its main stream read whole
 * (configuration, block list, commands, device state), its pages left to `load`. Once that scope has closed,
 * `load` and `readPages` fail (`Unusable`) rather than read through a descriptor that may name another file.
 *
 * @since 0.1.0
 * @category reading
 */
export const open = (path: string, options: ReadOptions = {}): Effect.Effect<Opened, MappedRamError, Scope.Scope> =>
  Effect.suspend(() =>
    notOptions(path, options) ??
      internal.open(path, settingsOf(options))
  )
