/**
 * RAM image files: reading one into shared memory for the source, and writing the received memory so that
 * the destination path only ever holds a complete, verified image.
 *
 * Every file handle is acquired with `acquireRelease`; reads and writes go in chunks so that an interruption
 * (Ctrl-C) takes effect between them.
 *
 * @since 0.1.0
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as Fs from "node:fs/promises"
import * as Path from "node:path"
import * as GuestRam from "../GuestRam.js"

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

const describe = (error: unknown): string => {
  const code = typeof error === "object" && error !== null && "code" in error ? String(error.code) : undefined
  switch (code) {
    case "ENOENT":
      return "no such file or directory"
    case "EACCES":
    case "EPERM":
      return "permission denied"
    case "EISDIR":
      return "is a directory"
    case "ENOTDIR":
      return "a parent is not a directory"
    case "ENOSPC":
      return "no space left on device"
    case "EEXIST":
      return "already exists"
    default:
      return error instanceof Error ? error.message : String(error)
  }
}

const fsError = (path: string, what: string, reason: ImageError["reason"]) => (cause: unknown) =>
  new ImageError({
    reason: reason === "Io" ? "Io" : (cause as { code?: string })?.code === "ENOENT" ? "Missing" : reason,
    path,
    detail: `${what}: ${describe(cause)}`,
    cause
  })

const openFile = (path: string, flags: string, what: string) =>
  Effect.acquireRelease(
    Effect.tryPromise({ try: () => Fs.open(path, flags), catch: fsError(path, what, "Unusable") }),
    (handle) => Effect.promise(() => handle.close().catch(() => undefined))
  )

const formatSize = (n: number) => `${n} bytes`

/**
 * Reads the image at `path` into shared memory (so that digests hash it on worker threads). Its size must be
 * a positive multiple of `pageSize` and fit one block.
 */
export const read = (path: string, pageSize: number): Effect.Effect<Buffer, ImageError> =>
  Effect.scoped(Effect.gen(function*() {
    const handle = yield* openFile(path, "r", "cannot open the image")
    const stat = yield* Effect.tryPromise({ try: () => handle.stat(), catch: fsError(path, "cannot stat the image", "Io") })
    const bad = (detail: string) => new ImageError({ reason: "BadSize", path, detail })
    if (!stat.isFile()) return yield* new ImageError({ reason: "Unusable", path, detail: "is not a regular file" })
    const size = stat.size
    if (size === 0) return yield* bad("the image is empty")
    if (size % pageSize !== 0) {
      return yield* bad(`the image size ${formatSize(size)} is not a multiple of the page size ${pageSize}`)
    }
    if (size > GuestRam.MAX_BLOCK_SIZE) {
      return yield* bad(`the image size ${formatSize(size)} exceeds the largest block, ${formatSize(GuestRam.MAX_BLOCK_SIZE)}`)
    }
    const bytes = GuestRam.allocate(size)
    let at = 0
    while (at < size) {
      const { bytesRead } = yield* Effect.tryPromise({
        try: () => handle.read(bytes, at, Math.min(CHUNK, size - at), at),
        catch: fsError(path, "cannot read the image", "Io")
      })
      if (bytesRead === 0) return yield* new ImageError({ reason: "Io", path, detail: "the image shrank while it was read" })
      at += bytesRead
    }
    return bytes
  }))

/** A destination prepared by `create`: `commit` writes the image and moves it into place. */
export interface Output {
  /** The final path. */
  readonly path: string
  /** The temporary file beside it. */
  readonly temporary: string
  /** Writes the chunks in order, flushes them to disk and renames the temporary file to `path`. */
  readonly commit: (chunks: ReadonlyArray<Uint8Array>) => Effect.Effect<void, ImageError>
}

/**
 * Prepares to write an image at `path`: creates its temporary file (`<path>.<pid>.partial`) right away, so an
 * unwritable destination fails before any transfer. When the scope closes the handle is closed and the
 * temporary file removed — after a commit it no longer exists, so only an uncommitted (failed or interrupted)
 * image is removed; `path` itself is only ever replaced by a complete image. An existing regular file at
 * `path` is replaced; anything else there (a directory) is refused up front.
 */
export const create = (path: string): Effect.Effect<Output, ImageError, Scope.Scope> =>
  Effect.gen(function*() {
    const temporary = `${path}.${process.pid}.partial`
    const existing = yield* Effect.promise(() => Fs.stat(path).catch(() => undefined))
    if (existing !== undefined && !existing.isFile()) {
      return yield* new ImageError({ reason: "Unusable", path, detail: "exists and is not a regular file" })
    }
    const handle = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => Fs.open(temporary, "wx"),
        catch: (cause) =>
          new ImageError({
            reason: (cause as { code?: string })?.code === "ENOENT" ? "Missing" : "Unusable",
            path,
            detail: `cannot create ${Path.basename(temporary)} beside it: ${describe(cause)}`,
            cause
          })
      }),
      (handle) =>
        Effect.promise(async () => {
          await handle.close().catch(() => undefined)
          await Fs.rm(temporary, { force: true }).catch(() => undefined)
        })
    )
    const io = fsError(path, "cannot write the image", "Io")

    const commit = (chunks: ReadonlyArray<Uint8Array>) =>
      Effect.gen(function*() {
        let position = 0
        for (const chunk of chunks) {
          let at = 0
          while (at < chunk.length) {
            const { bytesWritten } = yield* Effect.tryPromise({
              try: () => handle.write(chunk, at, Math.min(CHUNK, chunk.length - at), position),
              catch: io
            })
            at += bytesWritten
            position += bytesWritten
          }
        }
        yield* Effect.tryPromise({ try: () => handle.sync(), catch: io })
        yield* Effect.tryPromise({ try: () => handle.close(), catch: io })
        // once started, the rename completes: the image is either wholly in place or not at all
        yield* Effect.uninterruptible(Effect.tryPromise({ try: () => Fs.rename(temporary, path), catch: io }))
        yield* syncDirectory(Path.dirname(path))
      })

    return { path, temporary, commit }
  })

/**
 * Error codes by which a platform or file system says it cannot sync a directory at all (rather than that
 * the sync failed): there the rename is as durable as that file system makes it, and that is accepted.
 */
const CANNOT_SYNC_DIRECTORY: ReadonlySet<string> = new Set(["EINVAL", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EISDIR"])

/**
 * Makes a rename durable by syncing the directory that holds it. A file system that cannot sync a directory
 * is accepted; any other failure (EIO, EACCES, ENOENT...) is an `ImageError`.
 *
 * @internal
 */
export const syncDirectory = (dir: string): Effect.Effect<void, ImageError> =>
  Effect.scoped(Effect.gen(function*() {
    const unsupported = (cause: unknown) => CANNOT_SYNC_DIRECTORY.has(String((cause as { code?: unknown })?.code))
    const failed = (cause: unknown) =>
      new ImageError({ reason: "Io", path: dir, detail: `cannot sync the directory: ${describe(cause)}`, cause })
    const handle = yield* Effect.either(openFile(dir, "r", "cannot open the directory"))
    if (handle._tag === "Left") {
      return unsupported(handle.left.cause) ? undefined : yield* failed(handle.left.cause)
    }
    yield* Effect.tryPromise({ try: () => handle.right.sync(), catch: (cause) => cause }).pipe(
      Effect.catchAll((cause) => unsupported(cause) ? Effect.void : Effect.fail(failed(cause)))
    )
  }))
