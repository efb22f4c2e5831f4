/**
 * A snapshot's file as `Snapshot`'s internals use it: `SnapshotError` (which `Snapshot` exports), the file
 * opened for counted positional reads, and the temporary file a save writes, every failure of `fileIo`
 * worded as a one-line `SnapshotError` naming the snapshot.
 *
 * @internal
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as Path from "node:path"
import * as FileIo from "./native/fileIo.js"
import * as PeerText from "./peerText.js"

/** Why a snapshot could not be saved or restored; the message is one line naming the file. */
export class SnapshotError extends Data.TaggedError("SnapshotError")<{
  /**
   * `Io`: a read or write failed; `Unusable`: the path cannot be used (missing directory, not a regular file,
   * permissions, a snapshot longer than a file there may be); `Unsupported`: an option that does not apply to snapshots or cannot be used; `NotASnapshot`,
   * `Truncated`, `Version`, `Corrupt`: what is wrong with the file; `DigestMismatch`: pages damaged; `Layout`: the
   * memory given (or the size limit) does not fit the snapshot; `Refused`: the caller's `admit` gave a reason;
   * `Busy`: the memory given is being migrated, saved or restored.
   */
  readonly reason:
    | "Io"
    | "Unusable"
    | "Unsupported"
    | "NotASnapshot"
    | "Truncated"
    | "Version"
    | "Corrupt"
    | "DigestMismatch"
    | "Layout"
    | "Refused"
    | "Busy"
  readonly path: string
  readonly detail: string
  readonly cause?: unknown
}> {
  override get message(): string {
    return `snapshot${this.path.length === 0 ? "" : ` ${this.path}`}: ${PeerText.printable(this.detail)}`
  }
}

/** Transfers a batch keeps in flight: enough to hide the thread pool's round trip for runs of one page. */
const IN_FLIGHT = 8

const io = (path: string, what: string, cause: unknown) =>
  new SnapshotError({ reason: "Io", path, detail: `${what}: ${FileIo.describe(cause)}`, cause })

// ---------------------------------------------------------------------------------------------------------
// Reading

/** A snapshot file open for reading; it counts what it reads (the restore's stats). */
export interface Reader {
  /** The file's size (apparent, holes included). */
  readonly size: number
  /** Reads ranges into `into` (see `FileIo.transferAll`). */
  readonly readAll: (into: Uint8Array, list: FileIo.IoList) => Effect.Effect<void, SnapshotError>
  readonly read: (into: Uint8Array, at: number, length: number, position: number) => Effect.Effect<void, SnapshotError>
  /** Bytes read so far. */
  readonly bytesRead: () => number
  /** Reads issued so far. */
  readonly reads: () => number
  /**
   * Fails (`Io`) if the file was written since it was opened (`FileIo.changed`: its length or modification time): what
   * was read of it may be part old, part new — pages that do not match the digests read before them, a sound snapshot
   * taken for a damaged one.
   */
  readonly unchanged: Effect.Effect<void, SnapshotError>
}

const readError = (path: string) => (error: FileIo.FileError): SnapshotError => {
  switch (error.step) {
    case "Open":
      return new SnapshotError({
        reason: "Unusable",
        path,
        detail: `cannot open it: ${FileIo.describe(error.cause)}`,
        cause: error.cause
      })
    case "Stat":
      return io(path, "cannot stat it", error.cause)
    case "NotRegular":
      return new SnapshotError({ reason: "Unusable", path, detail: "is not a regular file" })
    case "Ended":
      return new SnapshotError({
        reason: "Truncated",
        path,
        detail: `the file ended early, at ${error.position} (was it truncated while being read?)`
      })
    default:
      return io(path, `cannot read ${error.length} bytes at ${error.position}`, error.cause)
  }
}

/** Opens the regular file at `path` for reading; the handle closes with the scope. */
export const openReader = (path: string): Effect.Effect<Reader, SnapshotError, Scope.Scope> =>
  Effect.gen(function*() {
    const failed = readError(path)
    const file = yield* Effect.mapError(FileIo.openForReading(path), failed)
    let bytesRead = 0
    let reads = 0
    const readAll = (into: Uint8Array, list: FileIo.IoList) =>
      FileIo.transferAll("read", file, into, list, IN_FLIGHT).pipe(
        Effect.mapError(failed),
        Effect.tap(() => {
          for (let i = 0; i < list.count; i++) bytesRead += list.length[i]!
          reads += list.count
        })
      )
    return {
      size: file.size,
      readAll,
      read: (into, at, length, position) =>
        Effect.suspend(() => {
          const list = FileIo.ioList(1)
          FileIo.push(list, at, length, position)
          return readAll(into, list)
        }),
      bytesRead: () => bytesRead,
      reads: () => reads,
      unchanged: Effect.flatMap(Effect.mapError(FileIo.changed(file), failed), (changed) =>
        changed
          ? Effect.fail(
            new SnapshotError({
              reason: "Io",
              path,
              detail: "the file changed while it was read (another process writing it?): what was read may mix its " +
                "old and new bytes; read it again once nothing writes it"
            })
          )
          : Effect.void)
    }
  })

// ---------------------------------------------------------------------------------------------------------
// Writing

/** The temporary file of a save: positional writes, then `commit` moves it to its final name. */
export interface Temporary {
  /** Writes ranges of `buffer` (see `FileIo.transferAll`). */
  readonly writeAll: (buffer: Uint8Array, list: FileIo.IoList) => Effect.Effect<void, SnapshotError>
  readonly write: (bytes: Uint8Array, position: number) => Effect.Effect<void, SnapshotError>
  /** fsync, close, rename to the final path (all or nothing), then fsync the directory. */
  readonly commit: Effect.Effect<void, SnapshotError>
}

const writeError = (path: string) => (error: FileIo.FileError): SnapshotError => {
  const temporary = Path.basename(error.path)
  switch (error.step) {
    case "NotRegular":
      return new SnapshotError({ reason: "Unusable", path, detail: "exists and is not a regular file" })
    case "Unsafe":
      return new SnapshotError({ reason: "Unusable", path, detail: FileIo.describeUnsafe(path, error), cause: error.cause })
    case "Create":
      return new SnapshotError({
        reason: "Unusable",
        path,
        detail: FileIo.errorCode(error.cause) === "EEXIST"
          ? `${temporary} already exists beside it (another save to it is under way)`
          : error.path === path
          ? `cannot create it: ${FileIo.describe(error.cause)}`
          : `cannot create ${temporary} beside it: ${FileIo.describe(error.cause)}`,
        cause: error.cause
      })
    case "Size":
      // longer than this process may write (ulimit -f) or the file system holds (FAT's 4 GiB): so is every later
      // try, which an Io error (a failed save, exit 1 in the command) invited
      return FileIo.errorCode(error.cause) === "EFBIG"
        ? new SnapshotError({
          reason: "Unusable",
          path,
          detail: `cannot size the file to ${error.length} bytes: ${FileIo.describe(error.cause)}`,
          cause: error.cause
        })
        : io(path, `cannot size the file to ${error.length} bytes`, error.cause)
    case "Sync":
      return io(path, "cannot flush the file to disk", error.cause)
    case "Close":
      return io(path, "cannot close the file", error.cause)
    case "Rename":
      return io(path, `cannot rename ${temporary} to it`, error.cause)
    case "SyncDirectory":
      // after the rename: the snapshot is in place, and the older file gone
      return error.replaced === undefined
        ? io(path, "cannot sync its directory", error.cause)
        : new SnapshotError({ reason: "Io", path, detail: FileIo.describeUnsynced(error), cause: error.cause })
    case "OpenDirectory":
      return new SnapshotError({ reason: "Unusable", path, detail: FileIo.describeOpenDirectory(error), cause: error.cause })
    default:
      return io(path, `cannot write ${error.length} bytes at ${error.position}`, error.cause)
  }
}

/**
 * Creates `<path>.<pid>.partial` (refusing a directory at `path` up front) at its full length. When the scope
 * closes the handle is closed and, unless it was committed, the temporary file removed.
 */
export const createTemporary = (path: string, length: number): Effect.Effect<Temporary, SnapshotError, Scope.Scope> =>
  Effect.gen(function*() {
    const failed = writeError(path)
    const file = yield* Effect.mapError(FileIo.atomicFile(path, { size: length }), failed)
    const writeAll = (buffer: Uint8Array, list: FileIo.IoList) =>
      Effect.mapError(FileIo.transferAll("write", file, buffer, list, IN_FLIGHT), failed)
    return {
      writeAll,
      write: (bytes, position) =>
        Effect.suspend(() => {
          const list = FileIo.ioList(1)
          FileIo.push(list, 0, bytes.length, position)
          return writeAll(bytes, list)
        }),
      commit: Effect.mapError(file.commit, failed)
    }
  })
