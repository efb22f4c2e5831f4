/**
 * Parallel file snapshots (`file:` addresses): `save` writes guest memory to a snapshot file with several
 * writers at once, `restore` reads one back with several readers. QEMU's mapped-ram idea: every page has a
 * fixed place in the file, so writers need no coordination, a page sent again in a later round of a live
 * save simply overwrites its slot, and zero pages are not stored at all — the file stays sparse.
 *
 * ## File format, version 1
 *
 * All integers big-endian (as the multifd wire format). Offsets are absolute byte offsets in the file.
 *
 * ```
 * header      at 0, 128 + 384 × blocks + 32 bytes
 *   0   magic "EMFDSNAP" (8 bytes)
 *   8   u32 format version (1)
 *   12  u32 header length in bytes (the checksum included)
 *   16  u32 page size
 *   20  u32 number of blocks (1..4096)
 *   24  u32 data alignment (1 MiB)
 *   28  u32 flags (0; a reader refuses flags it does not know)
 *   32  u64 file length (apparent size, holes included; the file must be exactly this long)
 *   40  u64 memory size (sum of the block sizes)
 *   48  uuid of the save (16 bytes)
 *   64  u32 writers (channels) the save used      68  u32 rounds the save ran
 *   72  u64 time the save completed (ms since the epoch)
 *   80  reserved, zero (48 bytes)
 *   128 block table, one 384-byte entry a block, in memory order:
 *         0   name, UTF-8, NUL-padded (256 bytes; names are 1-255 bytes)
 *         256 u64 block size in bytes   264 u64 bitmap offset   272 u64 data offset
 *         280 u64 stored pages (bits set in the bitmap)
 *         288 digest of the block's memory, as `GuestRam.digest` computes it (32 bytes)
 *         320 SHA-256 of the block's bitmap (32 bytes)
 *         352 reserved, zero (32 bytes)
 *   end-32  SHA-256 of every header byte before it
 * bitmaps     each at a 4 KiB-aligned offset after the header: one bit a page, bit i = bit (i & 7) of byte
 *             (i >> 3); set = the page is stored; the padding bits of the last byte are clear
 * page data   each block at a 1 MiB-aligned offset after the bitmaps: page i at data offset + i × page size;
 *             only pages whose bit is set are ever written (a page that became zero in a later round has
 *             its bit cleared; its stale bytes stay but are never read), so zero pages are holes
 * ```
 *
 * `save` creates `<path>.<pid>.partial`, sets its length (sparse), writes pages in rounds, then the bitmaps,
 * the header (digests computed with writers paused), fsyncs and renames it to `path`, then fsyncs the
 * directory (a file system that cannot sync a directory is accepted, any other failure is an `Io` error; a
 * directory this process may not open to sync it, or a `path` that is a mount point, which no rename replaces, is
 * refused as `Unusable` before a page is written); on failure or interruption the temporary file is removed (also
 * from its directory renamed meanwhile) and nothing is ever left under `path` that is not complete.
 * `restore` checks magic, version, header checksum, every offset and the file's length before it reads a
 * page, the bitmaps' checksums before it trusts them, and every block's digest after reading.
 *
 * Every file handle is acquired with `acquireRelease`, and each positional read or write is uninterruptible
 * (an interruption lands between two of them), so no I/O is in flight on a handle when it closes.
 *
 * This module is the public face: `save`, `restore`, their options and results, and this documentation of the
 * format. The rest lives in `internal/`: the orchestration of both (with the status a `MigrationStatus` keeps of
 * a `file:` migration) in `snapshot`, file handling in `fileIo` and `snapshotFile` (which also defines
 * `SnapshotError`), the writers and the index in `snapshotSave`, reading the index and the pages and verifying
 * them in `snapshotRestore`, the format's encoding in `snapshotFormat`.
 *
 * @since 0.1.0
 */
import type * as Effect from "effect/Effect"
import type * as GuestRam from "./GuestRam.js"
import * as Internal from "./internal/snapshot.js"
import * as SnapshotFile from "./internal/snapshotFile.js"
import type * as MigrationError from "./MigrationError.js"
import * as Transfer from "./Transfer.js"

/**
 * Writers of `save` and readers of `restore` when not told (libuv's thread pool has 4 threads by default).
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_CHANNELS: number = Internal.DEFAULT_CHANNELS

/**
 * Why a snapshot could not be saved or restored; the message is one line naming the file. `reason` — `Io`: a
 * read or write failed; `Unusable`: the path cannot be used (missing directory, not a regular file,
 * permissions, a snapshot longer than a file there may be: `ulimit -f`); `Unsupported`: an option that does not apply to snapshots; `NotASnapshot`, `Truncated`,
 * `Version`, `Corrupt`: what is wrong with the file; `DigestMismatch`: pages damaged; `Layout`: the memory
 * given (or the size limit) does not fit the snapshot.
 *
 * @since 0.1.0
 * @category errors
 */
export const SnapshotError: typeof SnapshotFile.SnapshotError = SnapshotFile.SnapshotError

/**
 * A `SnapshotError` value (see the constructor above).
 *
 * @since 0.1.0
 * @category errors
 */
export type SnapshotError = SnapshotFile.SnapshotError

// ---------------------------------------------------------------------------------------------------------
// Save

/**
 * How `save` writes.
 *
 * @since 0.1.0
 * @category models
 */
export interface SaveOptions extends Internal.SaveOptions {}

/**
 * What a save did: the migration's stats (writes as packets, bytes written as wire bytes) and the file.
 *
 * @since 0.1.0
 * @category models
 */
export interface SaveResult extends Internal.SaveResult {}

/**
 * Saves the `GuestRam` in context to a snapshot file at `path` (replacing a file there only once the new one
 * is complete). Memory may be written meanwhile (through `GuestRam.write` / `update`): the save runs pre-copy
 * rounds, then pauses writers for the last one, exactly as `Migration.migrate`; the snapshot is the memory at
 * that switch-over.
 *
 * @since 0.1.0
 * @category save
 */
export const save = (
  path: string,
  options: SaveOptions = {}
): Effect.Effect<SaveResult, SnapshotError | MigrationError.MigrationError, GuestRam.GuestRam> =>
  Internal.save(path, options, undefined)

// ---------------------------------------------------------------------------------------------------------
// Restore

/**
 * How `restore` reads.
 *
 * @since 0.1.0
 * @category models
 */
export interface RestoreOptions extends Internal.RestoreOptions {}

/**
 * What a snapshot holds, as `RestoreOptions.admit` sees it before restoring.
 *
 * @since 0.1.0
 * @category models
 */
export interface Contents extends Internal.Contents {}

/**
 * A restored snapshot: the memory and stats (`channels`, `rounds` and `uuid` are the save's; `normalPages` the
 * pages read, `zeroPages` the absent ones, `packets` the reads, `wireBytes` the bytes read).
 *
 * @since 0.1.0
 * @category models
 */
export interface Restored extends Internal.Restored {}

/**
 * Default cap on memory a snapshot may make `restore` allocate.
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_MAX_RAM: number = Transfer.DEFAULT_MAX_RAM

/**
 * Restores the snapshot at `path`: validates the file completely before touching memory (magic, version,
 * header checksum, offsets, length, bitmap checksums), reads the stored pages with parallel readers straight
 * into memory, zeroes the others, and verifies every block's digest. Into a given `ram`, a restore that fails
 * once pages are being read — pages that turn out damaged (digest mismatch), a read that fails (`Io`), a file
 * cut short meanwhile (`Truncated`), a file written meanwhile (`Io`: "the file changed while it was read") — has
 * already overwritten it, wholly or in part; a given `ram` that a
 * migration, save or restore is using is refused (`Busy`) before anything is read. The writers of a given `ram`
 * (`GuestRam.write` / `update`) wait while the restore runs (its write gate closed, unless it was already) and go
 * on after it, on the restored memory.
 *
 * @since 0.1.0
 * @category restore
 */
export const restore = (path: string, options: RestoreOptions = {}): Effect.Effect<Restored, SnapshotError> =>
  Internal.restore(path, options, undefined)
