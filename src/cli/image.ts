/**
 * RAM image files: reading one into shared memory for the source, and writing the received memory so that
 * the destination path only ever holds a complete, verified image.
 *
 * File handling is `internal/native/fileIo`'s: every handle acquired with `acquireRelease`, reads and writes in
 * chunks so that an interruption (Ctrl-C) takes effect between them, the image written beside its path and
 * renamed into place, its runs of zeros left holes (a guest's free memory takes neither writes nor disk space).
 *
 * @since 0.1.0
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as GuestRam from "../GuestRam.js"
import * as FileIo from "../internal/native/fileIo.js"
import * as SnapshotFormat from "../internal/snapshotFormat.js"
import { formatBytes } from "./report.js"

/** A problem with an image file. `Io` is a failure while transferring bytes; the others are configuration. */
export class ImageError extends Data.TaggedError("ImageError")<{
  readonly reason: "Missing" | "Unusable" | "BadSize" | "Io"
  readonly path: string
  readonly detail: string
  readonly cause?: unknown
}> {
  override get message(): string {
    return `${this.path}: ${this.detail}`
  }
}

/** Bytes moved per read or write call. */
const CHUNK = 64 * 1024 * 1024

/** Bytes per read call when reading an image. */
const READ_CHUNK = 32 * 1024 * 1024

/**
 * Reads at once (one per core, up to libuv's four threads): an image is read into fresh memory, whose page faults
 * then run in parallel (1 GiB here: 0.32 s with two at once, 0.61–0.73 s with one).
 */
const READS = Math.min(4, Os.availableParallelism())

/** Configuration problems keep their reason, except a missing path or parent, which is `Missing`. */
const configuration = (reason: ImageError["reason"], error: FileIo.FileError) =>
  FileIo.errorCode(error.cause) === "ENOENT" ? "Missing" : reason

const formatSize = (n: number) => `${n} bytes`

/**
 * Reads the image at `path` into shared memory (so that digests hash it on worker threads). Its size must be
 * a positive multiple of `pageSize` and fit one block.
 */
export const read = (path: string, pageSize: number): Effect.Effect<Buffer, ImageError> =>
  Effect.scoped(Effect.gen(function*() {
    const file = yield* FileIo.openForReading(path)
    const bad = (detail: string) => new ImageError({ reason: "BadSize", path, detail })
    const size = file.size
    if (size === 0) return yield* bad("the image is empty")
    if (size % pageSize !== 0) {
      return yield* bad(`the image size ${formatSize(size)} is not a multiple of the page size ${pageSize}`)
    }
    if (size > GuestRam.MAX_BLOCK_SIZE) {
      return yield* bad(`the image size ${formatSize(size)} exceeds the largest block, ${formatSize(GuestRam.MAX_BLOCK_SIZE)}`)
    }
    // a file of another kind named in its place (one of ours, or of QEMU's): refused before it is read, never migrated
    // as the guest's memory, header and all
    const kind = yield* otherKind(file, path)
    if (kind !== undefined) return yield* new ImageError({ reason: "Unusable", path, detail: kind })
    const bytes = yield* GuestRam.allocateOrFail(size, "the image").pipe(
      Effect.mapError((error) => new ImageError({ reason: "Io", path, detail: error.detail }))
    )
    yield* FileIo.transferChunked("read", file, bytes, 0, READ_CHUNK, READS)
    // written meanwhile, what was read may be part old, part new: an image the guest never had
    if (yield* FileIo.changed(file)) {
      return yield* new ImageError({
        reason: "Io",
        path,
        detail: "the image changed while it was read (another process writing it?): what was read may mix its " +
          "old and new bytes; read it again once nothing writes it"
      })
    }
    return bytes
  })).pipe(Effect.mapError((error) => error._tag === "ImageError" ? error : readError(path, error)))

/** A QEMU stream's first bytes: `QEVM`, then file version 3. */
const QEMU_STREAM = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3])

/** What the file is when it starts as a snapshot or a QEMU stream does, and what reads it; else `undefined`. */
const otherKind = (file: FileIo.Readable, path: string): Effect.Effect<string | undefined, FileIo.FileError> =>
  Effect.gen(function*() {
    const head = Buffer.alloc(Math.min(8, file.size))
    yield* FileIo.transfer("read", file, head, 0, head.length, 0)
    if (head.equals(SnapshotFormat.MAGIC)) {
      return `is an effect-multifd snapshot (send file:, Snapshot.save), not a RAM image: restore it (recv file:${path} ` +
        "--out IMAGE) and send that"
    }
    if (head.equals(QEMU_STREAM)) {
      return `is a QEMU migration stream, not a RAM image: send --to-qemu --vm ${path} migrates it into QEMU, recv ` +
        `file:${path} --from-qemu --out IMAGE reads its RAM`
    }
    return undefined
  })

const readError = (path: string, error: FileIo.FileError): ImageError => {
  const { cause } = error
  switch (error.step) {
    case "Open":
      return new ImageError({
        reason: configuration("Unusable", error),
        path,
        detail: `cannot open the image: ${FileIo.describe(cause)}`,
        cause
      })
    case "NotRegular":
      return new ImageError({ reason: "Unusable", path, detail: "is not a regular file" })
    case "Stat":
      return new ImageError({ reason: "Io", path, detail: `cannot stat the image: ${FileIo.describe(cause)}`, cause })
    case "Ended":
      return new ImageError({ reason: "Io", path, detail: "the image shrank while it was read" })
    default:
      return new ImageError({ reason: "Io", path, detail: `cannot read the image: ${FileIo.describe(cause)}`, cause })
  }
}

/**
 * Marks the file at `path` as one the command reads (a snapshot, a file QEMU wrote) before it prepares its outputs:
 * whatever its name, `create` never takes it for a stale temporary file of theirs (`OUT.<pid>.partial`) and removes it.
 */
export const markInput = (path: string): Effect.Effect<void> => FileIo.markInput(path)

/**
 * Whether a write of a file at `path` (its links followed, as `create` follows them) renames one into place from now
 * on: the effect returned says whether one did. For a command interrupted as its output is published (a rename lets
 * an interruption take effect only once it is done, the older file gone), which that interruption hid from it.
 */
export const publishedFromNow = (path: string): Effect.Effect<Effect.Effect<boolean>> =>
  Effect.map(Effect.orElseSucceed(FileIo.followLinks(path), () => path), (target) => {
    const before = FileIo.publications(target)
    return Effect.sync(() => FileIo.publications(target) > before)
  })

/** A destination prepared by `create`: `commit` writes the image and moves it into place. */
export interface Output {
  /** The final path. */
  readonly path: string
  /** The file the image replaces: `path`, its symbolic links followed. */
  readonly target: string
  /** The temporary file beside it. */
  readonly temporary: string
  /**
   * Writes the chunks in order (interruptibly; runs of zeros are left holes of a sparse file), then flushes them to disk and renames the temporary file to
   * `path` (uninterruptibly: Node cannot cancel an fsync anyway), through `around` if given (a migration's
   * `Migration.Commit`, which tells the source once the image is in place).
   */
  readonly commit: (
    chunks: ReadonlyArray<Uint8Array>,
    around?: <A, E>(effect: Effect.Effect<A, E>) => Effect.Effect<A, E>
  ) => Effect.Effect<void, ImageError>
  /** Writes the chunks and flushes them to disk under the temporary name; `publish` then renames it. */
  readonly write: (chunks: ReadonlyArray<Uint8Array>) => Effect.Effect<void, ImageError>
  /** Renames the written temporary file to `path`, uninterruptibly (after `write`). */
  readonly publish: Effect.Effect<void, ImageError>
  /** Whether the image is in place at `path` (`commit` or `publish` got that far). */
  readonly committed: Effect.Effect<boolean>
  /**
 * Why an image of `bytes` will not fit where it goes (this process's file size limit, the file system's free
 * space), if the system says so.
 */
  readonly tooBig: (bytes: number) => string | undefined
}

/**
 * Prepares to write an image at `path`: creates its temporary file (`<path>.<pid>.partial`) right away, so an
 * unwritable destination fails before any transfer. When the scope closes the handle is closed and, if the
 * image was not committed (a failure or an interruption), the temporary file removed; `path` itself is only
 * ever replaced by a complete image. An existing regular file at `path` is replaced; anything else there (a
 * directory) is refused up front.
 */
export const create = (path: string): Effect.Effect<Output, ImageError, Scope.Scope> =>
  Effect.gen(function*() {
    const file = yield* FileIo.atomicFile(path).pipe(Effect.mapError((error) => writeError(path, error)))
    const fill = (chunks: ReadonlyArray<Uint8Array>) =>
      Effect.gen(function*() {
        // the fresh file given the image's length first: the zero runs are never written, and read as zeros
        yield* FileIo.resize(file, chunks.reduce((sum, chunk) => sum + chunk.length, 0))
        let position = 0
        for (const chunk of chunks) {
          yield* FileIo.writeSparse(file, chunk, position, CHUNK)
          position += chunk.length
        }
      })
    const commit = (
      chunks: ReadonlyArray<Uint8Array>,
      around: <A, E>(effect: Effect.Effect<A, E>) => Effect.Effect<A, E> = Effect.uninterruptible
    ) =>
      Effect.zipRight(fill(chunks), around(file.commit)).pipe(
        Effect.mapError((error) => writeError(path, error))
      )
    const write = (chunks: ReadonlyArray<Uint8Array>) =>
      Effect.zipRight(fill(chunks), file.sync).pipe(Effect.mapError((error) => writeError(path, error)))
    const tooBig = (bytes: number) => beyondFileSizeLimit(path, bytes) ?? wontFit(path, Path.dirname(file.path), bytes)
    return {
      path,
      target: file.target,
      temporary: file.path,
      commit,
      write,
      publish: Effect.mapError(file.publish, (error) => writeError(path, error)),
      committed: file.committed,
      tooBig
    }
  })

/**
 * Renames every output (each one `write`n) into place, as one step as far as a failure goes: the older files they
 * replace are kept under a second name meanwhile (`FileIo.keepOlder`), and when one cannot be renamed into place (or
 * its directory synced after it) every one renamed before it (and itself) is put back, so that the outputs are all
 * this write's or all as they were — `recv --from-qemu --out-dir`'s blocks never a mix of two migrations'. The error
 * is the failed output's, saying what was put back (or, should that fail too, what was not). Uninterruptible.
 */
export const publishAll = (outputs: ReadonlyArray<Output>): Effect.Effect<void, ImageError> =>
  Effect.uninterruptible(Effect.scoped(Effect.gen(function*() {
    const olders = yield* Effect.forEach(outputs, (output) => FileIo.keepOlder(output.target))
    // a process that exits at once meanwhile (a second signal) puts back what was renamed, as a failure here does
    const onExit = yield* FileIo.undoingOnExit()
    for (const [i, output] of outputs.entries()) {
      // before its publish, which renames it at any moment (putting back one not renamed yet changes nothing)
      yield* onExit.add(output.target, olders[i]!)
      const published = yield* Effect.either(output.publish)
      if (published._tag === "Right") continue
      const failed = published.left
      // renamed, and only its directory's sync failed: put back as well
      const renamed = yield* output.committed
      const undo = outputs.slice(0, renamed ? i + 1 : i)
      if (undo.length === 0) return yield* failed
      const undone: Array<string> = []
      const notBack: Array<string> = []
      for (const [j, done] of undo.entries()) {
        const name = Path.basename(done.path)
        const back = yield* Effect.either(FileIo.putBack(done.target, olders[j]))
        if (back._tag === "Right") undone.push(olders[j]!.existed ? `${name} put back` : `${name} removed (there was none)`)
        else notBack.push(`${name} (${FileIo.describe(back.left.cause)})`)
      }
      // the put-backs made durable: one whose directory cannot be synced may be undone by a crash, which brings back
      // this write's file beside the older others (a mix, where the error said every file was as it was)
      const dirs = [...new Set(undo.map((done) => Path.dirname(done.target)))]
      const unsynced = (yield* Effect.forEach(dirs, (dir) => Effect.flip(FileIo.syncDirectory(dir)).pipe(Effect.option)))
        .flatMap((error) => error._tag === "Some" ? [error.value] : [])
      const detail = renamed
        ? `its directory could not be synced after the rename: ${FileIo.describe(failed.cause)}`
        : failed.detail
      const undoneText = `undone: ${undone.join(", ")}`
      return yield* new ImageError({
        reason: "Io",
        path: failed.path,
        detail: notBack.length > 0
          ? `${detail}; ${undone.length === 0 ? "" : `${undoneText}; `}not undone, this write's: ${notBack.join(", ")}`
          : unsynced.length > 0
          ? `${detail}; ${undoneText}, but ${unsynced.length === 1 ? "its directory" : "their directories"} ` +
            `${unsynced.map((error) => error.path).join(", ")} could not be synced after that, so a crash may still ` +
            `undo it: ${FileIo.describe(unsynced[0]!.cause)}`
          : `${detail}; ${undoneText}: every file is as it was`,
        cause: failed.cause
      })
    }
  })))

/**
 * Holds `dir`'s lock (`FileIo.lockDirectory`, `<dir>/.multifd-out-dir.lock`) for the scope, before `publishAll` renames
 * files into it: another command publishing there meanwhile is waited for, at most `patienceMs` (`--timeout`), so that
 * the directory holds all of one's files or all of the other's. Says that it waits, and when it takes over a lock
 * whose process is gone (killed as it published: the directory may hold some of its files beside older ones).
 */
export const lockForPublish = (dir: string, patienceMs: number): Effect.Effect<void, ImageError, Scope.Scope> =>
  FileIo.lockDirectory(dir, {
    patience: patienceMs,
    onWait: (pid) =>
      Effect.logWarning(
        `waiting for ${pid === undefined ? "the process" : `process ${pid}`}, which is publishing its blocks in ${dir} ` +
          `(${Path.join(dir, FileIo.LOCK_NAME)})`
      ),
    onStale: (pid) =>
      Effect.logWarning(
        `took over ${Path.join(dir, FileIo.LOCK_NAME)}, which ${pid === undefined ? "a process" : `process ${pid}`} ` +
          `left (killed while it published its blocks? ${dir} may hold some of them beside older ones until this ` +
          "command's are in place)"
      ),
    onUnlocked: (cause) =>
      Effect.logWarning(
        `cannot make ${Path.join(dir, FileIo.LOCK_NAME)} (${FileIo.describe(cause)}): publishing without it (a command ` +
          "publishing in that directory at once could leave some blocks of each)"
      )
  }).pipe(Effect.mapError((error) => {
    if (error.step !== "Locked") return writeError(dir, error)
    const pid = (error.cause as { readonly pid?: number | undefined } | undefined)?.pid
    return new ImageError({
      reason: "Io",
      path: dir,
      detail: `${pid === undefined ? "a process" : `process ${pid}`} is publishing its blocks there (${error.path}): ` +
        `waited ${(patienceMs / 1000).toFixed(1)} s for it (--timeout); if no such process writes there, remove that file`,
      cause: error
    })
  }))

/**
 * Whether `a` and `b` name one existing file (symbolic links followed, hard links included): writing one would
 * destroy the other while it is read.
 */
export const sameFile = (a: string, b: string): boolean => {
  try {
    const x = Fs.statSync(a)
    const y = Fs.statSync(b)
    return x.dev === y.dev && x.ino === y.ino
  } catch {
    return false
  }
}

/** `path` with its directory's symbolic links resolved (the last component kept), if its directory exists. */
const canonical = (path: string): string | undefined => {
  try {
    return Path.join(Fs.realpathSync(Path.dirname(path)), Path.basename(path))
  } catch {
    return undefined
  }
}

/**
 * Whether writing an image at `out` (its symbolic links followed, as `create` writes through them) would put it
 * at `path`, which need not exist yet (the Unix socket recv is about to listen on).
 */
export const writesAt = (out: string, path: string): Effect.Effect<boolean> =>
  Effect.match(FileIo.followLinks(out), {
    onFailure: () => false,
    onSuccess: (target) => {
      const a = canonical(target)
      return a !== undefined && a === canonical(path)
    }
  })

/**
 * Why a file of `bytes` written as `what` is more than this process may write (`ulimit -f`: the write past it
 * fails, after the whole transfer), if it is.
 */
export const beyondFileSizeLimit = (what: string, bytes: number, noun = "the image"): string | undefined => {
  const limit = FileIo.fileSizeLimit()
  return limit === undefined || bytes <= limit
    ? undefined
    : `${what}: ${noun} needs ${formatBytes(bytes)}, and this process may write files of at most ${formatBytes(limit)} (ulimit -f)`
}

/**
 * Why `bytes` written as `what` will not fit in the file system of `dir` (its free space, as `statfs` gives it
 * to this user), if they will not; nothing when they fit or the system does not say.
 */
export const wontFit = (what: string, dir: string, bytes: number): string | undefined => {
  try {
    const fs = Fs.statfsSync(dir)
    const free = Number(fs.bavail) * Number(fs.bsize)
    return free >= bytes ? undefined : `${what}: the image needs ${formatBytes(bytes)}, and ${dir} has ${formatBytes(free)} free`
  } catch {
    return undefined
  }
}

/**
 * Why a snapshot of the image in `input` (`send file:`) will not fit in the free space where it goes, if it will not
 * (`not saved: ...`): it holds every page that is not zero, counted as every byte, as `recv --out` counts the image.
 * Nothing when the image cannot be sized (`read` says what is wrong with it). (A file size limit, `ulimit -f`, the
 * save itself refuses as it sizes its file.)
 */
export const snapshotWontFit = (input: string, snapshot: string, pageSize: number): string | undefined => {
  let size: number
  try {
    size = Fs.statSync(input).size
  } catch {
    return undefined
  }
  if (size === 0 || size % pageSize !== 0 || size > GuestRam.MAX_BLOCK_SIZE) return undefined
  return wontFit("not saved", Path.dirname(snapshot), size)
}

const writeError = (path: string, error: FileIo.FileError): ImageError => {
  const { cause } = error
  switch (error.step) {
    case "NotRegular":
      return new ImageError({ reason: "Unusable", path, detail: "exists and is not a regular file" })
    case "Unsafe":
      return new ImageError({ reason: "Unusable", path, detail: FileIo.describeUnsafe(path, error), cause })
    case "Create":
      return new ImageError({
        reason: configuration("Unusable", error),
        path,
        detail: error.path === path
          ? `cannot create it: ${FileIo.describe(cause)}`
          : `cannot create ${Path.basename(error.path)} beside it: ${FileIo.describe(cause)}`,
        cause
      })
    case "SyncDirectory":
      // after the rename: the image is in place, and the older file gone
      return error.replaced === undefined
        ? syncError(error)
        : new ImageError({ reason: "Io", path, detail: FileIo.describeUnsynced(error), cause })
    case "OpenDirectory":
      return new ImageError({ reason: "Unusable", path, detail: FileIo.describeOpenDirectory(error), cause })
    default:
      return new ImageError({ reason: "Io", path, detail: `cannot write the image: ${FileIo.describe(cause)}`, cause })
  }
}

const syncError = (error: FileIo.FileError): ImageError =>
  new ImageError({
    reason: "Io",
    path: error.path,
    detail: `cannot sync the directory: ${FileIo.describe(error.cause)}`,
    cause: error.cause
  })

/**
 * Makes a rename durable by syncing the directory that holds it. A file system that cannot sync a directory
 * is accepted; any other failure (EIO, EACCES, ENOENT...) is an `ImageError`.
 *
 * @internal
 */
export const syncDirectory = (dir: string): Effect.Effect<void, ImageError> =>
  Effect.mapError(FileIo.syncDirectory(dir), syncError)
