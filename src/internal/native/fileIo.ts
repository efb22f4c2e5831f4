/**
 * Files as scoped resources, for `Snapshot` and the CLI's image files: opening, positional reads and writes
 * of big buffers, the temporary file that becomes the target only once complete, and the one table that
 * turns an errno into a short phrase.
 *
 * Every handle is acquired with `acquireRelease`. A positional transfer runs on the raw descriptor and is
 * uninterruptible (an interruption lands between two of them), so no I/O is in flight on a descriptor when
 * its handle closes. Failures are `FileError`s saying which step failed; callers word them for their users.
 *
 * A native adapter: it imports no public module.
 *
 * @internal
 */
import * as Clock from "effect/Clock"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Ref from "effect/Ref"
import type * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as FsP from "node:fs/promises"
import * as Os from "node:os"
import * as Path from "node:path"

/** The code of a system error (`ENOENT`, ...), if it has one. */
export const errorCode = (error: unknown): string | undefined => {
  const code = typeof error === "object" && error !== null && "code" in error ? error.code : undefined
  return code === undefined ? undefined : String(code)
}

/** A system error as a short phrase, one line: the common codes in words, others as the system says them. */
export const describe = (error: unknown): string => {
  switch (errorCode(error)) {
    case "ENOENT":
      return "no such file or directory"
    case "EACCES":
    case "EPERM":
      return "permission denied"
    case "ENOSPC":
      return "no space left on device"
    case "EDQUOT":
      return "disk quota exceeded"
    case "EISDIR":
      return "is a directory"
    case "ENOTDIR":
      return "a component of the path is not a directory"
    case "EROFS":
      return "read-only file system"
    case "EEXIST":
      return "file already exists"
    case "EIO":
      return "input/output error"
    case "EFBIG":
      return "file too large (for the file system, or this process's file size limit, ulimit -f)"
    case "ELOOP":
      return "too many levels of symbolic links"
    case "ENAMETOOLONG":
      return "file name too long"
  }
  const message = (error as { message?: unknown } | undefined)?.message
  return (typeof message === "string" ? message : String(error)).replace(/\s*\n\s*/g, " ")
}

/**
 * The largest file this process may write (its soft limit, `ulimit -f`, in bytes), where the system says one
 * (Linux: `/proc/self/limits`); `undefined` when unlimited or unknown. A write past it fails EFBIG.
 */
export const fileSizeLimit = (): number | undefined => {
  try {
    const m = /^Max file size\s+(\d+|unlimited)\s/m.exec(Fs.readFileSync("/proc/self/limits", "utf8"))
    return m === null || m[1] === "unlimited" ? undefined : Number(m[1])
  } catch {
    return undefined
  }
}

/** Which step of working with a file failed. */
export type Step =
  | "Open"
  | "Stat"
  /** The path exists and is not a regular file (reading it, or replacing it). */
  | "NotRegular"
  /** Creating the temporary file beside the target. */
  | "Create"
  /** Setting the temporary file's length. */
  | "Size"
  | "Read"
  /** A read found the end of the file before the bytes it was to read. */
  | "Ended"
  | "Write"
  | "Sync"
  | "Close"
  | "Rename"
  | "SyncDirectory"
  /**
   * The target's directory cannot be opened for reading, which its fsync needs (a directory this process may write
   * in but not read: a drop box); the error's path is the directory. `describeOpenDirectory` words it.
   */
  | "OpenDirectory"
  /**
   * Another user's symbolic link on the way to the target, or file at the target (the error's path), in a
   * world-writable sticky directory (`/tmp`): not followed, not replaced; or a target that is a mount point (a file
   * bind-mounted there) or immutable (`chattr +i`), which no rename can replace. The cause says why, `describeUnsafe`
   * words it.
   */
  | "Unsafe"
  /**
   * Another process holds the directory's lock (`lockDirectory`) and did not let it go in time; the error's path is
   * the lock file, its cause's `pid` the holder's (if the file says).
   */
  | "Locked"

/** A failed file operation: the step, the file (the directory for `SyncDirectory`), the system's error. */
export class FileError extends Data.TaggedError("FileError")<{
  readonly step: Step
  readonly path: string
  /** The transfer that failed (`Read`, `Ended`, `Write`), or the length asked for (`Size`). */
  readonly position?: number | undefined
  readonly length?: number | undefined
  /**
   * A `SyncDirectory` after an `atomicFile`'s rename: the target, where the new file is already (an older file
   * there, if there was one, is gone); only the rename's durability failed. `describeUnsynced` words it.
   */
  readonly replaced?: { readonly target: string; readonly older: boolean } | undefined
  readonly cause?: unknown
}> {
  override get message(): string {
    if (this.replaced !== undefined) return `${this.replaced.target}: ${describeUnsynced(this)}`
    const why = this.cause === undefined ? "" : `: ${describe(this.cause)}`
    return `${this.path}: ${this.step.toLowerCase()} failed${why}`
  }
}

/**
 * A `SyncDirectory` error of a file already renamed into place (`replaced`), worded for the user of that file: it is
 * there, complete, and the older file is gone, but a crash may still undo the rename. Without saying so, "cannot sync
 * the directory" read as a failure that left the target as it was.
 */
export const describeUnsynced = (error: FileError): string =>
  `the new file is in place${error.replaced?.older === true ? " (the older one is gone)" : ""}, but its directory ` +
  `${error.path} could not be synced to make that durable, so a crash may undo it: ${describe(error.cause)}`

// ---------------------------------------------------------------------------------------------------------
// Opening

/** An open file: its handle is closed when the scope that opened it closes. */
export interface File {
  readonly path: string
  /** The raw descriptor, for positional transfers. */
  readonly fd: number
}

/** Opens `path` as a scoped handle (`flags` as `fs.open` takes them: `"r"`, or `fs.constants` or-ed together). */
export const open = (path: string, flags: string | number): Effect.Effect<FsP.FileHandle, FileError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: () => FsP.open(path, flags),
      catch: (cause) => new FileError({ step: "Open", path, cause })
    }),
    (handle) => Effect.promise(() => handle.close().catch(() => undefined))
  )

/**
 * Read-only and non-blocking: opening a FIFO for reading otherwise waits for a writer, on a thread of the pool
 * that no interruption (nor SIGTERM) reaches, so the process hung. A FIFO then opens at once and is refused as
 * not a regular file; reads of a regular file ignore the flag.
 */
const READ_FLAGS = Fs.constants.O_RDONLY | Fs.constants.O_NONBLOCK

/** A regular file open for reading: its size, and when it was last written, as they were when it was opened. */
export interface Readable extends File {
  readonly size: number
  /** Its modification time in nanoseconds (`changed` compares it). */
  readonly modified: bigint
}

/**
 * Opens a regular file for reading, with its size and modification time; anything else (a FIFO, a device, a
 * directory) is `NotRegular`.
 */
export const openForReading = (path: string): Effect.Effect<Readable, FileError, Scope.Scope> =>
  Effect.gen(function*() {
    // what cannot be opened may still be plainly no file to read (a socket: ENXIO; a device: EACCES, ENODEV...)
    const handle = yield* Effect.catchTag(open(path, READ_FLAGS), "FileError", (error) =>
      Effect.flatMap(
        Effect.promise(() => FsP.stat(path).then((stat) => stat.isFile(), () => true)),
        (regular) => regular ? Effect.fail(error) : Effect.fail(new FileError({ step: "NotRegular", path }))
      ))
    const stat = yield* Effect.tryPromise({
      try: () => handle.stat({ bigint: true }),
      catch: (cause) => new FileError({ step: "Stat", path, cause })
    })
    if (!stat.isFile()) return yield* new FileError({ step: "NotRegular", path })
    inputs.add(inputKey(stat))
    return { path, fd: handle.fd, size: Number(stat.size), modified: stat.mtimeNs }
  })

/**
 * The files (`dev:ino`) this process reads or has read (`openForReading`), or is about to (`markInput`): never taken
 * for a stale temporary file by `removeStale`, whatever their names. A user's file named as a dead process's temporary
 * file of the output (`OUT.<pid>.partial`, `OUT.<pid>.older`: a crashed save renamed by hand, a backup) and given as
 * the input was removed by the command that was to read it.
 */
const inputs = new Set<string>()

/**
 * A file's key in `inputs`: its device and inode, and its birth time where the system tells it (a file removed since,
 * whose inode number a new file took, is not that file).
 */
const inputKey = (stat: Fs.BigIntStats): string => `${stat.dev}:${stat.ino}:${stat.birthtimeNs}`

/**
 * Marks the file at `path`, if there is one, as one this process is about to read (its symbolic links followed): the
 * write of an output, started first, then does not take it for a stale temporary file of its own (`removeStale`).
 */
export const markInput = (path: string): Effect.Effect<void> =>
  Effect.promise(() =>
    FsP.stat(path, { bigint: true }).then((stat) => void inputs.add(inputKey(stat)), () => undefined)
  )

/**
 * Whether a file opened by `openForReading` was written since it was opened (its length or its modification time
 * are not what they were then): another process writing it meanwhile (`cp` over it, `dd conv=notrunc`), whose
 * bytes a read may have met in one part of the file and not in another. A file read whole and then found
 * unchanged was read as it was at the open — as far as its modification time tells: a write within the clock tick
 * of the open may keep it as it was on a file system of coarse times (Linux before 6.13's fine-grained timestamps).
 */
export const changed = (file: Readable): Effect.Effect<boolean, FileError> =>
  Effect.async<boolean, FileError>((resume) => {
    Fs.fstat(file.fd, { bigint: true }, (error, stat) =>
      resume(
        error === null
          ? Effect.succeed(Number(stat.size) !== file.size || stat.mtimeNs !== file.modified)
          : Effect.fail(new FileError({ step: "Stat", path: file.path, cause: error }))
      ))
  })

// ---------------------------------------------------------------------------------------------------------
// Positional transfers

/** Positional transfers: the i-th moves `length[i]` bytes between a buffer at `at[i]` and the file at `position[i]`. */
export interface IoList {
  count: number
  readonly at: Float64Array
  readonly length: Float64Array
  readonly position: Float64Array
}

/** An empty list with room for `capacity` transfers. */
export const ioList = (capacity: number): IoList => ({
  count: 0,
  at: new Float64Array(capacity),
  length: new Float64Array(capacity),
  position: new Float64Array(capacity)
})

/** Adds a transfer to a list. */
export const push = (list: IoList, at: number, length: number, position: number): void => {
  const i = list.count++
  list.at[i] = at
  list.length[i] = length
  list.position[i] = position
}

/**
 * Runs every transfer of `list` (each looping over short reads or writes) on libuv's thread pool, up to
 * `inFlight` at once, as one effect: one resumption for a whole batch, however many small runs it has. Fails
 * with the first error once nothing is in flight any more (a read that meets the end of the file: `Ended`; a
 * write that writes nothing: `Write`). Uninterruptible: interrupting waits for the transfers under way, so a
 * descriptor is never closed under one — keep a batch small (about 1 MiB to 64 MiB).
 */
export const transferAll = (
  op: "write" | "read",
  file: File,
  buffer: Uint8Array,
  list: IoList,
  inFlight: number
): Effect.Effect<void, FileError> =>
  Effect.uninterruptible(Effect.async<void, FileError>((resume) => {
    let next = 0
    let active = 0
    let failed: FileError | undefined
    const failure = (i: number, step: Step, cause: unknown) =>
      new FileError({ step, path: file.path, position: list.position[i]!, length: list.length[i]!, cause })
    const start = (i: number) => {
      active++
      const step = (at: number, left: number, position: number) => {
        const done = (error: NodeJS.ErrnoException | null, n: number) => {
          if (error === null && n > 0 && n < left) return step(at + n, left - n, position + n)
          active--
          if (error !== null) failed ??= failure(i, op === "write" ? "Write" : "Read", error)
          else if (n === 0) {
            failed ??= op === "write"
              ? failure(i, "Write", new Error("the system wrote nothing"))
              : failure(i, "Ended", undefined)
          }
          pump()
        }
        if (op === "write") Fs.write(file.fd, buffer, at, left, position, done)
        else Fs.read(file.fd, buffer, at, left, position, done)
      }
      step(list.at[i]!, list.length[i]!, list.position[i]!)
    }
    const pump = () => {
      while (failed === undefined && active < inFlight && next < list.count) {
        const i = next++
        if (list.length[i]! > 0) start(i)
      }
      if (active === 0 && (failed !== undefined || next === list.count)) {
        resume(failed === undefined ? Effect.void : Effect.fail(failed))
      }
    }
    pump()
  }))

/** Moves `length` bytes between `buffer` at `at` and the file at `position`, as one transfer. */
export const transfer = (
  op: "write" | "read",
  file: File,
  buffer: Uint8Array,
  at: number,
  length: number,
  position: number
): Effect.Effect<void, FileError> =>
  Effect.suspend(() => {
    const list = ioList(1)
    push(list, at, length, position)
    return transferAll(op, file, buffer, list, 1)
  })

/**
 * Moves all of `buffer` between memory and the file at `position`, `chunk` bytes at a time, `inFlight` chunks at
 * once (on libuv's threads: reading into fresh memory, its page faults are taken in parallel, which is faster on
 * a virtual machine by about the number of threads). Each group of chunks is one uninterruptible transfer, and
 * an interruption takes effect between two of them.
 */
export const transferChunked = (
  op: "write" | "read",
  file: File,
  buffer: Uint8Array,
  position: number,
  chunk: number,
  inFlight = 1
): Effect.Effect<void, FileError> =>
  Effect.gen(function*() {
    for (let at = 0; at < buffer.length; at += chunk * inFlight) {
      const list = ioList(inFlight)
      for (let from = at; from < Math.min(buffer.length, at + chunk * inFlight); from += chunk) {
        push(list, from, Math.min(chunk, buffer.length - from), position + from)
      }
      yield* transferAll(op, file, buffer, list, inFlight)
    }
  })

/** The run judged at once by `writeSparse`: a run of zeros this long is left a hole. */
const HOLE = 64 * 1024
const HOLE_ZEROS = Buffer.alloc(HOLE)

/**
 * Writes `buffer` at `position` of a file that already reads as zeros there (a fresh file given its length by
 * `resize`), skipping every `HOLE`-byte run of zeros, which stays a hole: a mostly zero image (a guest's free
 * memory) costs neither the writes nor the disk space. The rest is written as `transferChunked` writes, `chunk`
 * bytes judged per step, an interruption taking effect between two steps.
 */
export const writeSparse = (file: File, buffer: Uint8Array, position: number, chunk: number): Effect.Effect<void, FileError> =>
  Effect.gen(function*() {
    const bytes = Buffer.from(buffer.buffer, buffer.byteOffset, buffer.length)
    for (let at = 0; at < buffer.length; at += chunk) {
      const end = Math.min(buffer.length, at + chunk)
      const list = ioList(Math.ceil((end - at) / HOLE / 2) + 1)
      let run = -1
      for (let from = at; from < end; from += HOLE) {
        const to = Math.min(end, from + HOLE)
        const zero = HOLE_ZEROS.compare(bytes, from, to, 0, to - from) === 0
        if (!zero && run < 0) run = from
        else if (zero && run >= 0) {
          push(list, run, from - run, position + run)
          run = -1
        }
      }
      if (run >= 0) push(list, run, end - run, position + run)
      if (list.count > 0) yield* transferAll("write", file, buffer, list, 1)
    }
  })

/**
 * Sets the file's length (`ftruncate`): grown, it reads as zeros up to the new end, without using the disk.
 * Uninterruptible, as `transferAll`: the descriptor is never closed under it.
 */
export const resize = (file: File, size: number): Effect.Effect<void, FileError> =>
  Effect.uninterruptible(Effect.async<void, FileError>((resume) => {
    Fs.ftruncate(file.fd, size, (error) =>
      resume(
        error === null
          ? Effect.void
          : Effect.fail(new FileError({ step: "Size", path: file.path, length: size, cause: error }))
      )
    )
  }))

// ---------------------------------------------------------------------------------------------------------
// Replacing a file atomically

/** A file being written under a temporary name beside its target; `commit` moves it into place. */
export interface AtomicFile extends File {
  /** The file the commit replaces: the target given, its symbolic links followed. */
  readonly target: string
  /**
   * fsync, close, rename to the target, then fsync the target's directory (`syncDirectory`): `sync`, then
   * `publish`.
   */
  readonly commit: Effect.Effect<void, FileError>
  /** fsync: the bytes written are on the disk (under the temporary name). */
  readonly sync: Effect.Effect<void, FileError>
  /**
   * close, rename to the target and fsync its directory, uninterruptibly: once it starts, the target is
   * replaced and the replacement durable, or it fails (and the target is untouched unless the directory's
   * fsync failed: that `SyncDirectory` error has `replaced`). Call it after `sync`; `commit` is both.
   */
  readonly publish: Effect.Effect<void, FileError>
  /** Whether the target has been replaced (`publish` renamed the temporary file). */
  readonly committed: Effect.Effect<boolean>
}

/** Whether a process of this pid exists (one of another user's counts: `kill` then says EPERM). */
const processExists = (pid: number): boolean => {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    return errorCode(error) !== "ESRCH"
  }
}

/** The longest file name Linux's file systems take, in bytes (NAME_MAX). */
const NAME_MAX = 255

/** Room a temporary file's name keeps for its suffix: the longest pid, `.4294967295.partial`. */
const SUFFIX_ROOM = ".4294967295.partial".length

/** What a cut name keeps of its full name: `~` and 8 hex digits of its SHA-256. */
const MARK_ROOM = 9

/**
 * The part of a temporary file's name before `.<pid>.partial`: the target's name, cut (at a character) where
 * the suffix would make it longer than a file name may be — a target named with 237 to 255 bytes could not be
 * written at all ("file name too long") — and marked with `~` and 8 hex digits of the whole name's SHA-256: two
 * targets alike in the bytes kept (recv --out-dir's files of two such blocks, written at once) had one temporary
 * name, and the second failed "file already exists" once everything had arrived.
 */
const temporaryStem = (target: string): string => {
  const name = Path.basename(target)
  const bytes = Buffer.from(name)
  if (bytes.length <= NAME_MAX - SUFFIX_ROOM) return name
  let cut = NAME_MAX - SUFFIX_ROOM - MARK_ROOM
  while (cut > 0 && (bytes[cut]! & 0xc0) === 0x80) cut-- // not inside a UTF-8 character
  return `${bytes.subarray(0, cut).toString()}~${Crypto.createHash("sha256").update(bytes).digest("hex").slice(0, 8)}`
}

/** The temporary file of `target` that process `pid` writes: `<target>.<pid>.partial`, its name cut if need be. */
const temporaryOf = (target: string, pid: number | string): string => {
  const stem = temporaryStem(target)
  return stem === Path.basename(target)
    ? `${target}.${pid}.partial`
    : Path.join(Path.dirname(target), `${stem}.${pid}.partial`)
}

/**
 * Removes the temporary files of `target` (`<target>.<pid>.partial`, regular files) that processes which are
 * gone left beside it — killed before they could clean up (SIGKILL, a crash, a power loss) — and returns their
 * names. A file whose process still exists, or that is not ours by its name, is left alone. "Gone" is as this
 * system's pids see it: a process of another pid namespace (a container) writing the same target looks gone.
 * A file of this process's own pid is an earlier process's — a container's command is pid 1 run after run, and
 * one killed (out of memory, `docker kill`) left `OUT.1.partial` that every later run then refused as existing —
 * unless this process has it open (`atomicFile`: a write of the same target under way here). A file this process
 * reads (`inputs`) is never one.
 */
export const removeStale = (target: string): Effect.Effect<ReadonlyArray<string>> =>
  Effect.promise(async () => {
    const dir = Path.dirname(target)
    const prefix = `${temporaryStem(target)}.`
    const removed: Array<string> = []
    for (const name of await FsP.readdir(dir).catch(() => [] as Array<string>)) {
      const suffix = name.endsWith(".partial") ? ".partial" : name.endsWith(".older") ? ".older" : undefined
      if (!name.startsWith(prefix) || suffix === undefined) continue
      const pid = name.slice(prefix.length, -suffix.length)
      if (!/^[1-9][0-9]{0,9}$/.test(pid)) continue
      const mine = Number(pid) === process.pid
      const held = suffix === ".partial"
        ? temporaries.has(Path.resolve(temporaryOf(target, pid)))
        : olders.has(Path.resolve(olderOf(target, pid)))
      if (mine ? held : processExists(Number(pid))) continue
      const path = Path.join(dir, name)
      const stat = await FsP.lstat(path, { bigint: true }).catch(() => undefined)
      if (stat?.isFile() !== true || inputs.has(inputKey(stat))) continue
      if (await FsP.rm(path).then(() => true, () => false)) removed.push(name)
    }
    return removed
  })

/**
 * How many names of the file `existing` at `target` are `keepOlder`'s second names beside it (`<target>.<pid>.older`):
 * those of publishes under way, here or in another process (a dead process's were removed by `removeStale`).
 */
const olderNamesOf = async (target: string, existing: Fs.Stats): Promise<number> => {
  const prefix = `${temporaryStem(target)}.`
  let count = 0
  for (const name of await FsP.readdir(Path.dirname(target)).catch(() => [] as Array<string>)) {
    if (!name.startsWith(prefix) || !name.endsWith(".older")) continue
    if (!/^[1-9][0-9]{0,9}$/.test(name.slice(prefix.length, -".older".length))) continue
    const stat = await FsP.lstat(Path.join(Path.dirname(target), name)).catch(() => undefined)
    if (stat !== undefined && stat.dev === existing.dev && stat.ino === existing.ino) count++
  }
  return count
}

/** The second name `keepOlder` gives the file at `target` (`<target>.<pid>.older`, a name cut as `temporaryOf`'s). */
const olderOf = (target: string, pid: number | string): string =>
  `${temporaryOf(target, pid).slice(0, -".partial".length)}.older`

/** The second names `keepOlder` holds now (resolved): `removeStale` leaves them alone. */
const olders = new Set<string>()

/**
 * The file `keepOlder` found at a target: none, or one kept under a second name (`path`), or one it could not keep
 * (`path` undefined: a file system without hard links), which nothing can put back.
 */
export interface Older {
  readonly existed: boolean
  readonly path: string | undefined
}

/**
 * Keeps the file now at `target` (if there is one) under a second name beside it, a hard link `<target>.<pid>.older`,
 * for as long as the scope is open: a publish of several files that fails at one of them can then put back the older
 * files that the ones published before it replaced (`putBack`). The name is removed when the scope closes; one that a
 * killed process left is removed, with a warning, by the next `atomicFile` of the target (`removeStale`).
 */
export const keepOlder = (target: string): Effect.Effect<Older, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.promise(async (): Promise<Older> => {
      const existed = await FsP.lstat(target).then(() => true, () => false)
      if (!existed) return { existed, path: undefined }
      const older = olderOf(target, process.pid)
      olders.add(Path.resolve(older))
      await FsP.rm(older, { force: true }).catch(() => undefined)
      return FsP.link(target, older).then(() => ({ existed, path: older }), () => {
        olders.delete(Path.resolve(older))
        return { existed, path: undefined }
      })
    }),
    ({ path }) =>
      path === undefined ? Effect.void : Effect.promise(async () => {
        await FsP.rm(path, { force: true }).catch(() => undefined)
        olders.delete(Path.resolve(path))
      })
  )

/**
 * Undoes the publish of `target`: puts back the older file `keepOlder` kept, or removes `target` where there was
 * none. Fails (the step `Rename`, on `target`) where it cannot: the system's error, or an older file not kept.
 */
export const putBack = (target: string, older: Older): Effect.Effect<void, FileError> =>
  Effect.tryPromise({
    try: () =>
      !older.existed
        ? FsP.rm(target)
        : older.path !== undefined
        ? FsP.rename(older.path, target)
        : Promise.reject(new Error("the older file could not be kept (no second name could be made for it)")),
    catch: (cause) => new FileError({ step: "Rename", path: target, cause })
  })

/** The name of the lock file `lockDirectory` makes in a directory. */
export const LOCK_NAME = ".multifd-out-dir.lock"

/** The lock files this process holds (resolved), each with its file's identity: `removeTemporariesNow` removes them. */
const locks = new Map<string, Temporary>()

/** How often `lockDirectory` looks at a lock another process holds. */
const LOCK_POLL_MS = 50

/** What `lockDirectory` found at the lock file: its holder (a pid, or none readable yet) and the file's identity. */
interface LockFile {
  readonly pid: number | undefined
  readonly dev: number
  readonly ino: number
  readonly modifiedMs: number
}

/** The lock at `path` (its holder's pid, if it names one: a regular file there names none), if there is one. */
const readLock = async (path: string): Promise<LockFile | undefined> => {
  const stat = await FsP.lstat(path).catch(() => undefined)
  if (stat === undefined) return undefined
  const text = await FsP.readlink(path).catch(() => "")
  const pid = /^([1-9][0-9]{0,9})$/.exec(text)?.[1]
  return { pid: pid === undefined ? undefined : Number(pid), dev: stat.dev, ino: stat.ino, modifiedMs: stat.mtimeMs }
}

/** `dir` with its links resolved, where it can be; else as `Path.resolve` makes it. */
const realOrResolved = (dir: string): string => {
  try {
    return Fs.realpathSync(dir)
  } catch {
    return Path.resolve(dir)
  }
}

/** Removes the lock file at `path` if it is still the one `found` (device and inode); whether it did. */
const removeLock = (path: string, found: LockFile): Promise<boolean> =>
  FsP.lstat(path).then(
    (now) => now.dev === found.dev && now.ino === found.ino ? FsP.rm(path).then(() => true) : false,
    () => false
  ).catch(() => false)

/**
 * Holds the lock of a directory for the scope, so that two processes never rename files into it at once
 * (`recv --from-qemu --out-dir`: all of one migration's blocks or all of another's, never some of each): `<dir>/
 * .multifd-out-dir.lock`, a symbolic link to this process's pid (created only where nothing is: as O_EXCL), removed
 * when the scope closes. One that cannot be made (`onUnlocked`: no inode left) is not held: the files are published
 * without it, as they were before there was one, rather than lost after they were all written.
 *
 * A lock held by a live process (or by this one, elsewhere) is waited for, at most `patience` ms (`onWait` hears once
 * that it waits), then `Locked` (the error's path the lock file). One whose process is gone — SIGKILLed while it held
 * it, or before the machine last started — is taken over (`onStale` hears of it), as is one whose pid this process has
 * and does not hold (a container's command is pid 1 run after run), and one that names no pid (cut short between its
 * creation and its write) once it is older than `patience`. The take-over removes the file it read only if it is the
 * same file (device and inode): two processes taking over one stale lock at once then lose each other's lock only if
 * the other made it between those two system calls.
 */
export const lockDirectory = (
  dir: string,
  options: {
    readonly patience: number
    readonly onWait: (pid: number | undefined) => Effect.Effect<void>
    readonly onStale: (pid: number | undefined) => Effect.Effect<void>
    /** The lock cannot be made (the system's error: no inode left, a file system without symbolic links): not held. */
    readonly onUnlocked: (cause: unknown) => Effect.Effect<void>
  }
): Effect.Effect<void, FileError, Scope.Scope> => {
  const path = Path.join(dir, LOCK_NAME)
  // one key however the directory is named (through a link to it too): this process's lock is its own, not stale
  const key = Path.join(realOrResolved(dir), LOCK_NAME)
  const bootMs = Date.now() - Os.uptime() * 1000
  // a symbolic link whose target is this process's pid: made at once with what it says (a file is empty until written,
  // and another process would read no pid), and taking no data block of a disk the blocks just filled
  const tryCreate = Effect.promise(async (): Promise<Temporary | "held" | { readonly cannot: unknown }> => {
    if (locks.has(key)) return "held"
    try {
      await FsP.symlink(String(process.pid), path)
    } catch (cause) {
      return errorCode(cause) === "EEXIST" ? "held" : { cannot: cause }
    }
    const lock: Temporary = { path, directory: undefined, identity: undefined }
    const stat = await FsP.lstat(path).catch(() => undefined)
    if (stat !== undefined) lock.identity = { dev: stat.dev, ino: stat.ino }
    locks.set(key, lock)
    return lock
  })
  const acquire = Effect.gen(function*() {
    const start = yield* Clock.currentTimeMillis
    let told = false
    while (true) {
      const made = yield* tryCreate
      if (made !== "held") {
        if ("cannot" in made) yield* options.onUnlocked(made.cannot)
        return made
      }
      const found = yield* Effect.promise(() => readLock(path))
      // removed meanwhile: try again; but a lock this process holds (elsewhere: `tryCreate` said so) is waited for,
      // its file there or not (removed by hand)
      if (found === undefined && !locks.has(key)) continue
      const pid = found === undefined ? process.pid : found.pid
      const now = yield* Clock.currentTimeMillis
      const stale = found === undefined ? false : found.pid === undefined
        ? Date.now() - found.modifiedMs >= options.patience
        : found.modifiedMs < bootMs || (found.pid === process.pid ? !locks.has(key) : !processExists(found.pid))
      // one that cannot be removed (another user's, in a sticky directory) is waited for as a live one
      if (stale && (yield* Effect.promise(() => removeLock(path, found!)))) {
        yield* options.onStale(pid)
        continue
      }
      if (now - start >= options.patience) {
        const holder = pid === undefined ? "a process" : `process ${pid}`
        return yield* new FileError({
          step: "Locked",
          path,
          cause: Object.assign(new Error(`held by ${holder}`), { pid })
        })
      }
      if (!told) {
        told = true
        yield* options.onWait(pid)
      }
      // (an acquisition is uninterruptible: the wait is not, and no lock of this process exists during it)
      yield* Effect.interruptible(Effect.sleep(LOCK_POLL_MS))
    }
  })
  return Effect.asVoid(Effect.acquireRelease(acquire, (lock) =>
    "cannot" in lock ? Effect.void : Effect.promise(async () => {
      // a lock file another process took over meanwhile (as stale: this pid seen from another pid namespace) is its
      if (await whose(lock, path) === "ours") await FsP.rm(path, { force: true }).catch(() => undefined)
      locks.delete(key)
    })))
}

/**
 * Why the regular file `existing` at `target` cannot be replaced by a rename, if it cannot: an `Unsafe` error (a mount
 * point, an immutable file, another user's file in a sticky directory). Synchronous, so that a check of many files at
 * once (`recv --out-dir`'s blocks, as QEMU announces them) can say it before anything is transferred, as `atomicFile`
 * says it of one file.
 */
export const unreplaceable = (target: string, existing: Fs.Stats): FileError | undefined => {
  if (isMountPoint(target)) {
    return new FileError({
      step: "Unsafe",
      path: target,
      cause: Object.assign(
        new Error(
          "it is a mount point (a file mounted there, as a container's volume), which a rename cannot replace; " +
            "name a file in a mounted directory instead"
        ),
        { kind: "mount" }
      )
    })
  }
  // nor can one replace an immutable file (EPERM): the whole file was written, and only the rename failed
  if (isImmutable(target)) {
    return new FileError({
      step: "Unsafe",
      path: target,
      cause: Object.assign(
        new Error("it is immutable (chattr +i: lsattr shows it), which no rename can replace; chattr -i lifts it"),
        { kind: "immutable" }
      )
    })
  }
  // its owner and permissions are given to the new file: another user's there would be given what is written
  if (othersInSticky(Path.dirname(target), existing.uid)) return unsafe("file", target)
  // nor, in any sticky directory (a group's shared one, 1770), may the rename replace another user's file (EPERM)
  if (stickyForbids(Path.dirname(target), existing.uid)) {
    return new FileError({
      step: "Unsafe",
      path: target,
      cause: Object.assign(
        new Error(
          `another user's file in the sticky directory ${Path.resolve(Path.dirname(target))}, where none but its ` +
            "owner (or the directory's) may replace it"
        ),
        { kind: "file" }
      )
    })
  }
  return undefined
}

/**
 * Undoes, synchronously, the publish of `target` that `putBack` undoes: for a process about to exit without closing its
 * scopes (`removeTemporariesNow`). Whatever fails is left as it is.
 */
const putBackNow = (target: string, older: Older): void => {
  try {
    if (!older.existed) Fs.rmSync(target, { force: true })
    else if (older.path !== undefined) Fs.renameSync(older.path, target)
  } catch {
    // nothing more can be done on the way out
  }
}

/** The publishes of several files under way (`undoingOnExit`), each the targets renamed so far with their older files. */
const publishing = new Set<Array<readonly [string, Older]>>()

/**
 * A record, for the scope, of the files a publish of several (`recv --out-dir`'s blocks) has renamed into place so far
 * (`add` each as its rename begins: a file not renamed yet is put back as it is, its second name a link to itself, or
 * none there): a process that exits at once meanwhile (a second signal, `removeTemporariesNow`) puts them
 * back, as a failed publish does, rather than leave some files of this publish beside older others — and remove the
 * older ones' second names, which held what the renamed ones replaced.
 */
export const undoingOnExit = (): Effect.Effect<{ readonly add: (target: string, older: Older) => Effect.Effect<void> }, never, Scope.Scope> =>
  Effect.map(
    Effect.acquireRelease(
      Effect.sync(() => {
        const renamed: Array<readonly [string, Older]> = []
        publishing.add(renamed)
        return renamed
      }),
      (renamed) => Effect.sync(() => void publishing.delete(renamed))
    ),
    (renamed) => ({ add: (target, older) => Effect.sync(() => void renamed.push([target, older])) })
  )

/** Links followed before giving up, as Linux's own limit for a path (`ELOOP`). */
const MAX_LINKS = 40

/**
 * Whether `path` (a symbolic link or a file, owned by `owner`, in `dir`: its directory) is another user's in a
 * world-writable sticky directory (`/tmp`, `/var/tmp`, `/dev/shm`): it belongs neither to this process's user nor
 * to the directory's owner. That is the rule of Linux's `fs.protected_symlinks` and `fs.protected_regular` (on
 * by default in the major distributions), which the kernel applies to the links it follows and the files it opens
 * with O_CREAT; `atomicFile` follows links itself and replaces files by renaming, so it applies the rule itself.
 */
const othersInSticky = (dir: string, owner: number): boolean => {
  const me = process.geteuid?.()
  if (me === undefined || owner === me) return false
  const parent = statOrUndefined(dir)
  return parent !== undefined && (parent.mode & 0o1002) === 0o1002 && parent.uid !== owner
}

/**
 * Whether `path` (an existing file) is a mount point: a file bind-mounted there (a container's volume, `docker -v
 * host.img:/out.img`), which a rename cannot replace (EBUSY) — found out after the whole transfer, at the rename.
 * Linux says which paths are mount points in /proc/self/mountinfo (a file mounted from the same file system has the
 * same device as its directory); elsewhere a device other than its directory's tells.
 */
const isMountPoint = (path: string): boolean => {
  let real: string
  let table: string | undefined
  try {
    real = Fs.realpathSync(path)
  } catch {
    return false
  }
  try {
    table = Fs.readFileSync("/proc/self/mountinfo", "utf8")
  } catch {
    const [file, dir] = [statOrUndefined(real), statOrUndefined(Path.dirname(real))]
    return file !== undefined && dir !== undefined && file.dev !== dir.dev
  }
  // the fifth field, its space, tab, newline and backslash written \040, \011, \012, \134
  return table.split("\n").some((line) =>
    line.split(" ")[4]?.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8))) === real
  )
}

/**
 * Whether a rename may not replace a file of `owner` in `dir` because `dir` is sticky (any sticky directory, not only a
 * world-writable one: a group's shared directory, mode 1770): the kernel lets none but the file's owner or the
 * directory's (or root: CAP_FOWNER) rename over it or remove it, and the rename failed after the whole file was written.
 */
const stickyForbids = (dir: string, owner: number): boolean => {
  const me = process.geteuid?.()
  if (me === undefined || me === 0 || owner === me) return false
  const parent = statOrUndefined(dir)
  return parent !== undefined && (parent.mode & 0o1000) !== 0 && parent.uid !== me
}

/**
 * Whether the existing file at `path` is immutable (`chattr +i`): the only write permission even root is refused
 * with EPERM rather than EACCES. Nothing can rename over it or remove it.
 */
const isImmutable = (path: string): boolean => {
  try {
    Fs.accessSync(path, Fs.constants.W_OK)
    return false
  } catch (error) {
    return errorCode(error) === "EPERM"
  }
}

/** `stat` of `path` (its links followed), or nothing where it cannot be had. */
const statOrUndefined = (path: string): Fs.Stats | undefined => {
  try {
    return Fs.statSync(path)
  } catch {
    return undefined
  }
}

/** The cause of an `Unsafe` error: what `path` is, and where. */
const unsafe = (kind: "link" | "file", path: string): FileError =>
  new FileError({
    step: "Unsafe",
    path,
    cause: Object.assign(
      new Error(
        `another user's ${kind === "link" ? "symbolic link" : "file"} in the world-writable sticky directory ` +
          Path.resolve(Path.dirname(path))
      ),
      { kind }
    )
  })

/**
 * An `Unsafe` error of the file given as `target`, worded for its user: which link was not followed (or which
 * file not replaced), and why.
 */
export const describeUnsafe = (target: string, error: FileError): string => {
  const kind = (error.cause as { readonly kind?: unknown } | undefined)?.kind
  return `${kind === "link" ? "not following" : "not replacing"} ${error.path === target ? "it" : error.path}: ` +
    describe(error.cause)
}

/** An `OpenDirectory` error, worded for the user of its file. */
export const describeOpenDirectory = (error: FileError): string =>
  `cannot open its directory ${error.path} to sync it (which makes the file durable): ${describe(error.cause)}`

/**
 * The file `path` names once its symbolic links are followed — whether that file exists yet or not (a dangling
 * link names the file it would create) —, or `path` itself when it is not a link. A relative link is read
 * from the directory that holds it, as the kernel reads it. Another user's link in a world-writable sticky
 * directory is not followed (`Unsafe`, as the kernel's `protected_symlinks` refuses it).
 */
export const followLinks = (path: string): Effect.Effect<string, FileError> =>
  Effect.tryPromise({
    try: async () => {
      let current = path
      for (let links = 0; links <= MAX_LINKS; links++) {
        const stat = await FsP.lstat(current).catch(() => undefined)
        if (stat === undefined || !stat.isSymbolicLink()) return current
        const dir = await FsP.realpath(Path.dirname(current))
        // another user could point it at any file (~/.bashrc, /etc/shadow for root)
        if (othersInSticky(dir, stat.uid)) throw unsafe("link", current)
        const next = Path.resolve(dir, await FsP.readlink(current))
        if (dir === "/proc" || dir.startsWith("/proc/")) await checkProcLink(current, next)
        current = next
      }
      throw Object.assign(new Error(`${path}: too many levels of symbolic links`), { code: "ELOOP" })
    },
    catch: (cause) => cause instanceof FileError ? cause : new FileError({ step: "Create", path, cause })
  })

/**
 * A link of /proc (`/proc/self/fd/N`, which `/dev/stdout` leads to) is the kernel's, to a file open: its text is the
 * file's name only while the file has it. A regular file deleted since reads `/dir/x (deleted)` (a memfd `/memfd:x
 * (deleted)`), which was taken for a name: a file of that name was created beside it and renamed into place. Refused
 * (`Unsafe`) when the text does not lead to the file the link reaches; what is no regular file (a pipe) is left to
 * `atomicFile` to refuse as such.
 */
const checkProcLink = async (link: string, next: string): Promise<void> => {
  const reached = await FsP.stat(link).catch(() => undefined)
  if (reached === undefined || !reached.isFile()) return
  const named = await FsP.stat(next).catch(() => undefined)
  if (named !== undefined && named.dev === reached.dev && named.ino === reached.ino) return
  throw new FileError({
    step: "Unsafe",
    path: link,
    cause: Object.assign(
      new Error("it is an open file that has no name (deleted, or made without one), which no rename can replace"),
      { kind: "nameless" }
    )
  })
}

/**
 * The temporary files of `atomicFile` that exist now (or are about to), for `removeTemporariesNow` and
 * `removeStale`: absolute, so that one file has one key however its target was spelt (`out`, `./out`, `dir//out`);
 * each with what `removal` needs to reach it.
 */
const temporaries = new Map<string, Temporary>()

/**
 * A temporary file's name in its directory, and the directory held open while the file exists (if it could be
 * opened): a directory renamed meanwhile (`mv out-dir elsewhere` during a save) took the file with it, and its
 * path no longer led to it, so the file was never removed.
 */
interface Temporary {
  readonly path: string
  directory: FsP.FileHandle | undefined
  /** The file's device and inode once created: what is at its name may be another's by then (`whose`). */
  identity: { readonly dev: number; readonly ino: number } | undefined
}

/**
 * Whether the file at `path` is still the temporary file this process created, another file, or none. Another
 * process writing the same target under the same pid (one in another pid namespace: two containers' commands, each pid 1, sharing a volume)
 * takes this one for a dead process's, removes it and creates its own under the same name: renaming or removing by
 * name then renamed or removed that process's unfinished file.
 */
const whose = (temporary: Temporary, path: string): Promise<"ours" | "gone" | "another's"> =>
  FsP.lstat(path).then((stat) => sameFile(temporary, stat) ? "ours" : "another's", () => "gone")

const sameFile = (temporary: Temporary, stat: Fs.Stats): boolean =>
  temporary.identity === undefined || (stat.dev === temporary.identity.dev && stat.ino === temporary.identity.ino)

/** Whether the file at `path` is ours (`whose`), synchronously (for `removeTemporariesNow`). */
const isOursNow = (temporary: Temporary, path: string): boolean => {
  try {
    return sameFile(temporary, Fs.lstatSync(path))
  } catch {
    return false
  }
}

/** Whether `/proc/self/fd/N/name` reaches `name` in the directory open as descriptor N (Linux). */
const procFd = Fs.existsSync("/proc/self/fd")

/**
 * The path that reaches a temporary file now: through its open directory (`/proc/self/fd/N/name`), wherever the
 * directory went, or else its path as created.
 */
const removal = (temporary: Temporary): string =>
  procFd && temporary.directory !== undefined
    ? `/proc/self/fd/${temporary.directory.fd}/${Path.basename(temporary.path)}`
    : temporary.path

/**
 * Removes, synchronously, every temporary file of an `atomicFile` this process has open, and the second names
 * `keepOlder` holds: for a process about to exit without closing its scopes (a second Ctrl-C), which would leave
 * them behind.
 */
export const removeTemporariesNow = (): void => {
  // a publish of several files cut short: the ones renamed so far put back, from their older files' second names
  for (const renamed of publishing) for (const [target, older] of [...renamed].reverse()) putBackNow(target, older)
  publishing.clear()
  for (const temporary of temporaries.values()) {
    try {
      const path = removal(temporary)
      if (isOursNow(temporary, path)) Fs.rmSync(path, { force: true })
    } catch {
      // nothing more can be done on the way out
    }
  }
  temporaries.clear()
  // the second names of older files kept while several files are published (`keepOlder`): nothing will put them back now
  for (const older of olders) {
    try {
      Fs.rmSync(older, { force: true })
    } catch {
      // as above
    }
  }
  olders.clear()
  // the directories' locks (`lockDirectory`): another process would wait for them until it gave up
  for (const lock of locks.values()) {
    try {
      if (isOursNow(lock, lock.path)) Fs.rmSync(lock.path, { force: true })
    } catch {
      // as above
    }
  }
  locks.clear()
}

/**
 * The targets of `atomicFile`s whose bytes, or whose rename, are being flushed to disk now (an fsync under way),
 * each with how many such flushes it has: for a process asked to stop, which waits for them (Node cannot cancel
 * an fsync, and a big image takes seconds to flush to a slow disk) and says so (`signals.ts`).
 */
const flushing = new Map<string, number>()

/** Runs `effect`, an fsync for `target`, known to `flushingNow` while it runs. */
export const flushingFor = <A, E>(target: string, effect: Effect.Effect<A, E>): Effect.Effect<A, E> =>
  Effect.acquireUseRelease(
    Effect.sync(() => void flushing.set(target, (flushing.get(target) ?? 0) + 1)),
    () => effect,
    () =>
      Effect.sync(() => {
        const left = (flushing.get(target) ?? 1) - 1
        if (left > 0) flushing.set(target, left)
        else flushing.delete(target)
      })
  )

/** How many times `atomicFile`s renamed a file into place at each target (resolved). */
const publishedTargets = new Map<string, number>()

/**
 * How many times an `atomicFile` of `target` (its links followed: `AtomicFile.target`) renamed its file into place in
 * this process: for a caller whose write was interrupted once its publish (uninterruptible) had begun, which the
 * interruption hid from it — the target replaced, the older file gone. Compare with the count before the write.
 */
export const publications = (target: string): number => publishedTargets.get(Path.resolve(target)) ?? 0

/** The files (`dev:ino`) whose other names `atomicFile` has warned of: once a file. */
const toldLinks = new Set<string>()

/** The targets of `atomicFile`s being flushed to disk now (their final paths), oldest first. */
export const flushingNow = (): ReadonlyArray<string> => Array.from(flushing.keys())

/**
 * The permissions of a file `atomicFile` creates where none was: its owner's alone. What it writes is a guest's
 * memory (keys, passwords, whatever the guest held), which no other user of the machine may read; QEMU's own
 * migration files are not world-readable either.
 */
export const NEW_FILE_MODE = 0o600

/**
 * The permissions a file replacing one of `mode` gets: the same, but when it could not be given that file's group
 * (this user may not give it away: it then has this user's group, or its directory's) its group has no more than
 * everyone else — the group bits granted another group than the one they were meant for. A file 0640 of group
 * kvm replaced by a user of group users (many systems give every user that one) was readable by all of users.
 */
const keptMode = (mode: number, sameGroup: boolean): number =>
  sameGroup ? mode & 0o777 : (mode & 0o707) | (mode & ((mode & 0o007) << 3))

/**
 * Creates `<target>.<pid>.partial` (a long name cut to leave room for the suffix: `temporaryOf`), refusing up
 * front anything at `target` that is not a regular file or that no rename can replace (a mount point, an immutable
 * file: `Unsafe`), and a temporary file that exists already; optionally
 * at a length (sparse). When the scope closes the handle is closed and, unless it was committed, the temporary
 * file removed — through its directory, held open meanwhile, so also when that directory was renamed — : `target`
 * itself is only ever replaced by a complete file. A `target` that is a symbolic link
 * is written through: the file it points at is replaced (the temporary file beside that one, on its file
 * system), the link kept — unless it is another user's link in a world-writable sticky directory (`Unsafe`,
 * see `followLinks`).
 * Another user's file there is not replaced either (`Unsafe`), as the kernel's `protected_regular` refuses to
 * open it: it would have become that user's, readable as that user chose; nor is another user's file in any other
 * sticky directory (a group's, 1770), over which the kernel refuses the rename (`stickyForbids`). Temporary files of `target` that
 * killed processes left are removed first (`removeStale`, each with a warning).
 *
 * A target with other names (hard links) is replaced under its own name alone, with a warning: the other names keep
 * the older file.
 *
 * The temporary file is created readable by its owner alone (`NEW_FILE_MODE`). When it replaces an existing
 * file it takes that file's permissions, and its owner and group as far as this process may give them, as
 * `cp` over an existing file keeps them: the file's readers stay the file's readers, from the first byte (its
 * group, if it could not be given, has no more than everyone else: `keptMode`).
 */
export const atomicFile = (
  given: string,
  options: { readonly size?: number | undefined } = {}
): Effect.Effect<AtomicFile, FileError, Scope.Scope> =>
  Effect.gen(function*() {
    // "" names no file: its temporary file was `.<pid>.partial` in the working directory, written in full, and
    // only the rename to "" failed
    if (given.length === 0) {
      return yield* new FileError({ step: "Create", path: given, cause: new Error("the path is empty") })
    }
    // "dir/" names a directory: its temporary file was `dir/.<pid>.partial`, and the error named that
    if (given.endsWith("/")) {
      const cause = new Error("the path ends with /, which names a directory, not a file")
      return yield* new FileError({ step: "Create", path: given, cause })
    }
    const target = yield* followLinks(given)
    // a link the kernel follows to something that has no path (/dev/stdout on a pipe or a socket: /proc/self/fd/1
    // reads "pipe:[123]"), which `followLinks` took for a relative name: it was refused as a missing directory,
    // "cannot create pipe:[123].<pid>.partial beside it: no such file or directory"
    const reached = yield* Effect.promise(() => FsP.stat(given).catch(() => undefined))
    if (reached !== undefined && !reached.isFile()) return yield* new FileError({ step: "NotRegular", path: given })
    // a name longer than the file system takes (NAME_MAX, 255 bytes on most): its temporary file's name is cut to
    // fit, so it was written in full and only the rename into place failed, "file name too long", after a whole
    // migration or save. The kernel's lookup says so now, whatever this file system's limit
    const tooLong = yield* Effect.promise(() =>
      FsP.lstat(target).then(() => undefined, (cause: unknown) => errorCode(cause) === "ENAMETOOLONG" ? cause : undefined)
    )
    if (tooLong !== undefined) return yield* new FileError({ step: "Create", path: given, cause: tooLong })
    const path = temporaryOf(target, process.pid)
    const key = Path.resolve(path)
    for (const name of yield* removeStale(target)) {
      yield* Effect.logWarning(`removed ${name}, which a process that is gone left beside ${Path.basename(target)}`)
    }
    const existing = yield* Effect.promise(() => FsP.stat(target).catch(() => undefined))
    if (existing !== undefined && !existing.isFile()) return yield* new FileError({ step: "NotRegular", path: target })
    const refused = existing === undefined ? undefined : unreplaceable(target, existing)
    if (refused !== undefined) return yield* refused
    // a rename replaces this name alone: the file's other names (hard links) go on naming the older file, where
    // cp or QEMU, which write in place, would have changed it under every name
    // said once of a file: a command that checks its output first (recv --from-qemu --vm) and writes it later said
    // it twice, and silenced the second write's warnings for it, "left OUT.<pid>.partial behind" among them
    // (but the second names of older files that publishes under way give them for a moment: `keepOlder`'s)
    const others = existing === undefined || existing.nlink === 1
      ? 0
      : existing.nlink - 1 - (yield* Effect.promise(() => olderNamesOf(target, existing)))
    if (existing !== undefined && others > 0 && !toldLinks.has(`${existing.dev}:${existing.ino}`)) {
      toldLinks.add(`${existing.dev}:${existing.ino}`)
      yield* Effect.logWarning(
        `${Path.basename(target)} has ${others} other ${others === 1 ? "name" : "names"} (hard links), which will ` +
          `keep the older file: only ${Path.basename(target)} is replaced`
      )
    }
    const committed = yield* Ref.make(false)
    const temporary: Temporary = { path, directory: undefined, identity: undefined }
    // the directory first, so that it is closed after the file is removed; its fsync makes the rename durable. One
    // this process may not read (a drop box) cannot be synced: refused now, not once the file replaced the target.
    // What else it cannot open, the create fails on (or `syncDirectory` after the rename)
    const dir = Path.dirname(path)
    yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () =>
          FsP.open(dir, Fs.constants.O_RDONLY | Fs.constants.O_DIRECTORY).then(
            (directory) => (temporary.directory = directory),
            (cause) => {
              if (errorCode(cause) === "EACCES" || errorCode(cause) === "EPERM") throw cause
              return undefined
            }
          ),
        catch: (cause) => new FileError({ step: "OpenDirectory", path: dir, cause })
      }),
      () => Effect.promise(() => temporary.directory?.close().catch(() => undefined) ?? Promise.resolve())
    )
    const handle = yield* Effect.acquireRelease(
      // the name is this process's from before the file exists: another write of the target here (its
      // `removeStale`) never takes the file for an earlier process's
      Effect.suspend(() => {
        if (temporaries.has(key)) {
          const cause = Object.assign(new Error(`${path}: file already exists`), { code: "EEXIST" })
          return Effect.fail(new FileError({ step: "Create", path, cause }))
        }
        temporaries.set(key, temporary)
        return Effect.tryPromise({
          try: async () => {
            const handle = await FsP.open(path, "wx", NEW_FILE_MODE)
            await handle.stat().then(({ dev, ino }) => (temporary.identity = { dev, ino }), () => undefined)
            return handle
          },
          catch: (cause) => new FileError({ step: "Create", path, cause })
        }).pipe(Effect.tapError(() => Effect.sync(() => temporaries.delete(key))))
      }),
      (handle) =>
        Effect.flatMap(Ref.get(committed), (done) =>
          Effect.flatMap(
            Effect.promise(async () => {
              // removed before the close, which waits for an fsync under way (seconds for a big image); a file of
              // another process at its name is that process's
              const at = removal(temporary)
              let kept: { readonly cause: unknown } | undefined
              if (!done && await whose(temporary, at) === "ours") {
                await FsP.rm(at, { force: true }).catch((cause: unknown) => (kept = { cause }))
              }
              temporaries.delete(key)
              await handle.close().catch(() => undefined)
              return kept
            }),
            // one that cannot be removed (its file system remounted read-only after an error) stays: said, with its
            // name, rather than left for the user to come across
            (kept) =>
              kept === undefined ? Effect.void : Effect.logWarning(
                `left ${path} behind, an unfinished file: cannot remove it: ${describe(kept.cause)} (remove it, or ` +
                  `the next command that writes ${Path.basename(target)} will)`
              )
          ))
    )
    const failed = (step: Step) => (cause: unknown) => new FileError({ step, path, cause })
    if (existing !== undefined) {
      // a user may give a file away to none but itself, but to any of its groups
      yield* Effect.promise(() =>
        handle.chown(existing.uid, existing.gid).catch(() => handle.chown(-1, existing.gid)).catch(() => undefined)
      )
      const group = yield* Effect.tryPromise({ try: () => handle.stat().then((s) => s.gid), catch: failed("Create") })
      yield* Effect.tryPromise({
        try: () => handle.chmod(keptMode(existing.mode, group === existing.gid)),
        catch: failed("Create")
      })
    }
    const size = options.size
    if (size !== undefined) {
      yield* Effect.tryPromise({
        try: () => handle.truncate(size),
        catch: (cause) => new FileError({ step: "Size", path, length: size, cause })
      })
    }
    const sync = flushingFor(target, Effect.tryPromise({ try: () => handle.sync(), catch: failed("Sync") }))
    // the directory's fsync inside: a rename that an interruption could separate from it would be a replaced
    // target reported as a failure
    const publish = Effect.uninterruptible(Effect.gen(function*() {
      yield* Effect.tryPromise({ try: () => handle.close(), catch: failed("Close") })
      // what is at the temporary name now may be another process's unfinished file (see `whose`)
      if ((yield* Effect.promise(() => whose(temporary, path))) === "another's") {
        return yield* failed("Rename")(
          new Error(
            `${Path.basename(path)} was replaced meanwhile by another file (another process writing ` +
              `${Path.basename(target)}?)`
          )
        )
      }
      yield* Effect.tryPromise({ try: () => FsP.rename(path, target), catch: failed("Rename") })
      yield* Ref.set(committed, true)
      publishedTargets.set(Path.resolve(target), publications(target) + 1)
      temporaries.delete(key)
      // the directory held open (where it went, had it been renamed since), else opened now. Failing, it says
      // that the target was replaced already
      const held = temporary.directory
      yield* flushingFor(
        target,
        held === undefined ? syncDirectory(Path.dirname(target)) : syncHandle(held, Path.dirname(target))
      ).pipe(Effect.mapError((error) =>
        new FileError({
          step: error.step,
          path: error.path,
          cause: error.cause,
          replaced: { target, older: existing !== undefined }
        })
      ))
    }))
    return {
      path,
      fd: handle.fd,
      target,
      commit: Effect.zipRight(sync, publish),
      sync,
      publish,
      committed: Ref.get(committed)
    }
  })

/**
 * Error codes by which a platform or file system says it cannot sync a directory at all (rather than that
 * the sync failed): there the rename is as durable as that file system makes it, and that is accepted.
 */
const CANNOT_SYNC_DIRECTORY: ReadonlySet<string> = new Set(["EINVAL", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EISDIR"])

/**
 * Makes a rename durable by syncing the directory that holds it. A file system that cannot sync a directory
 * is accepted; any other failure (EIO, EACCES, ENOENT...) is a `SyncDirectory` error.
 */
export const syncDirectory = (dir: string): Effect.Effect<void, FileError> =>
  Effect.scoped(Effect.gen(function*() {
    const handle = yield* Effect.either(open(dir, "r"))
    if (handle._tag === "Left") {
      const cause = handle.left.cause
      return cannotSync(cause) ? undefined : yield* new FileError({ step: "SyncDirectory", path: dir, cause })
    }
    yield* syncHandle(handle.right, dir)
  }))

const cannotSync = (cause: unknown) => CANNOT_SYNC_DIRECTORY.has(String(errorCode(cause)))

/** fsync of an open directory (`dir` names it in errors), as `syncDirectory`. */
const syncHandle = (handle: FsP.FileHandle, dir: string): Effect.Effect<void, FileError> =>
  Effect.tryPromise({ try: () => handle.sync(), catch: (cause) => cause }).pipe(
    Effect.catchAll((cause) =>
      cannotSync(cause) ? Effect.void : Effect.fail(new FileError({ step: "SyncDirectory", path: dir, cause }))
    )
  )
