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
 * the header (digests computed with writers paused), fsyncs and renames it to `path`; on failure or
 * interruption the temporary file is removed and nothing is ever left under `path` that is not complete.
 * `restore` checks magic, version, header checksum, every offset and the file's length before it reads a
 * page, the bitmaps' checksums before it trusts them, and every block's digest after reading.
 *
 * Every file handle is acquired with `acquireRelease`, and each positional read or write is uninterruptible
 * (an interruption lands between two of them), so no I/O is in flight on a handle when it closes.
 *
 * @since 0.1.0
 */
import * as Clock from "effect/Clock"
import * as Data from "effect/Data"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as FiberSet from "effect/FiberSet"
import * as Queue from "effect/Queue"
import * as Ref from "effect/Ref"
import * as Schedule from "effect/Schedule"
import type * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as FsP from "node:fs/promises"
import * as Path from "node:path"
import * as GuestRam from "./GuestRam.js"
import * as Precopy from "./internal/precopy.js"
import * as Format from "./internal/snapshotFormat.js"
import type * as Migration from "./Migration.js"
import type * as MigrationError from "./MigrationError.js"

/** Writers of `save` and readers of `restore` when not told (libuv's thread pool has 4 threads by default). */
export const DEFAULT_CHANNELS = 4

/** Bytes of pages a writer gets at once (the largest single write). */
const BATCH_BYTES = 1024 * 1024
/** Bytes of pages a reader handles at once. */
const READ_JOB_BYTES = 1024 * 1024
/** A restore reads across a gap of absent pages up to this size rather than issuing two reads. */
const MERGE_GAP_BYTES = 64 * 1024

const GIB = 1024 * 1024 * 1024

/** Why a snapshot could not be saved or restored; the message is one line naming the file. */
export class SnapshotError extends Data.TaggedError("SnapshotError")<{
  /**
   * `Io`: a read or write failed; `Unusable`: the path cannot be used (missing directory, not a regular file,
   * permissions); `Unsupported`: an option that does not apply to snapshots; `NotASnapshot`, `Truncated`,
   * `Version`, `Corrupt`: what is wrong with the file; `DigestMismatch`: pages damaged; `Layout`: the memory
   * given (or the size limit) does not fit the snapshot.
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
  readonly path: string
  readonly detail: string
  readonly cause?: unknown
}> {
  override get message(): string {
    return `snapshot ${this.path}: ${this.detail}`
  }
}

const describeFsError = (error: unknown): string => {
  const e = error as NodeJS.ErrnoException | undefined
  switch (e?.code) {
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
      return "file too large for the file system"
  }
  return (e?.message ?? String(error)).replace(/\s*\n\s*/g, " ")
}

const fsError = (path: string, reason: "Io" | "Unusable", what: string) => (cause: unknown) =>
  new SnapshotError({ reason, path, detail: `${what}: ${describeFsError(cause)}`, cause })

/** Positional transfers: the i-th moves `length[i]` bytes between `buffer` at `at[i]` and the file at `position[i]`. */
interface IoList {
  count: number
  readonly at: Float64Array
  readonly length: Float64Array
  readonly position: Float64Array
}

const ioList = (capacity: number): IoList => ({
  count: 0,
  at: new Float64Array(capacity),
  length: new Float64Array(capacity),
  position: new Float64Array(capacity)
})

const push = (list: IoList, at: number, length: number, position: number) => {
  const i = list.count++
  list.at[i] = at
  list.length[i] = length
  list.position[i] = position
}

/**
 * Runs every transfer of `list` (each looping over short reads or writes) on libuv's thread pool, up to
 * `inFlight` at once, as one effect: one resumption for a whole batch, however many small runs it has. Fails
 * with the first error once nothing is in flight any more. Uninterruptible: interrupting waits for the
 * transfers under way (a batch is at most about 1 MiB), so a descriptor is never closed under one.
 */
const transferAll = (
  op: "write" | "read",
  fd: number,
  buffer: Uint8Array,
  list: IoList,
  inFlight: number,
  onError: (error: unknown, position: number, length: number) => SnapshotError,
  onEof: (position: number, length: number) => SnapshotError
): Effect.Effect<void, SnapshotError> =>
  Effect.uninterruptible(Effect.async<void, SnapshotError>((resume) => {
    let next = 0
    let active = 0
    let failed: SnapshotError | undefined
    const start = (i: number) => {
      active++
      const step = (at: number, left: number, position: number) => {
        const done = (error: NodeJS.ErrnoException | null, n: number) => {
          if (error === null && n > 0 && n < left) return step(at + n, left - n, position + n)
          active--
          if (error !== null) failed ??= onError(error, list.position[i]!, list.length[i]!)
          else if (n === 0) failed ??= onEof(list.position[i]!, list.length[i]!)
          pump()
        }
        if (op === "write") Fs.write(fd, buffer, at, left, position, done)
        else Fs.read(fd, buffer, at, left, position, done)
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

/** Transfers a batch keeps in flight: enough to hide the thread pool's round trip for runs of one page. */
const IN_FLIGHT = 8

// ---------------------------------------------------------------------------------------------------------
// Save

/** How `save` writes. */
export interface SaveOptions {
  /** Parallel writers, 1-255 (default 4). More than libuv's thread pool (UV_THREADPOOL_SIZE, 4) gains nothing. */
  readonly channels?: number | undefined
  /** `multifd` (default): zero pages are not stored (holes); `none`: every page is stored. */
  readonly zeroPage?: "multifd" | "none" | undefined
  /**
   * Pre-copy policy for memory written while the snapshot is taken (as `Migration.migrate`). As with a
   * migration, writers stay paused (`ram.gate`) after a successful save — the snapshot is the memory as of
   * then; call `ram.gate.open` to let them go on. On failure the gate opens again.
   */
  readonly live?: Migration.LiveOptions | undefined
  /** Called as pages are handed to the writers. */
  readonly onProgress?: ((progress: Migration.Progress) => Effect.Effect<void>) | undefined
  /** Fail when no page is written for this long (default 30 s). */
  readonly stallTimeout?: Duration.DurationInput | undefined
}

/** What a save did: the migration's stats (writes as packets, bytes written as wire bytes) and the file. */
export interface SaveResult extends Migration.Stats {
  readonly path: string
  /** The file's apparent size (holes included). */
  readonly fileBytes: number
  /** Pages stored in the file (bits set). */
  readonly storedPages: number
}

interface WriteStats {
  readonly writes: number
  readonly rounds: number
  readonly storedPages: number
  readonly zeroPages: number
  readonly bytes: number
}

/** The temporary file of a save: positional writes, then `commit` moves it to its final name. */
interface Temporary {
  /** Writes ranges of `buffer` (see `transferAll`). */
  readonly writeAll: (buffer: Uint8Array, list: IoList) => Effect.Effect<void, SnapshotError>
  readonly write: (bytes: Uint8Array, position: number) => Effect.Effect<void, SnapshotError>
  /** fsync, close, rename to the final path (all or nothing), then fsync the directory (best effort). */
  readonly commit: Effect.Effect<void, SnapshotError>
}

/**
 * Creates `<path>.<pid>.partial` (refusing a directory at `path` up front) at its full length. When the scope
 * closes the handle is closed and, unless it was committed, the temporary file removed.
 */
const createTemporary = (path: string, length: number): Effect.Effect<Temporary, SnapshotError, Scope.Scope> =>
  Effect.gen(function*() {
    const temporary = `${path}.${process.pid}.partial`
    const existing = yield* Effect.promise(() => FsP.stat(path).catch(() => undefined))
    if (existing !== undefined && !existing.isFile()) {
      return yield* new SnapshotError({ reason: "Unusable", path, detail: "exists and is not a regular file" })
    }
    const committed = yield* Ref.make(false)
    const handle = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => FsP.open(temporary, "wx", 0o644),
        catch: (cause) =>
          new SnapshotError({
            reason: "Unusable",
            path,
            detail: (cause as NodeJS.ErrnoException | undefined)?.code === "EEXIST"
              ? `${Path.basename(temporary)} already exists beside it (a save in progress, or left by a crash: remove it)`
              : `cannot create ${Path.basename(temporary)} beside it: ${describeFsError(cause)}`,
            cause
          })
      }),
      (handle) =>
        Effect.flatMap(Ref.get(committed), (done) =>
          Effect.promise(async () => {
            await handle.close().catch(() => undefined)
            if (!done) await FsP.rm(temporary, { force: true }).catch(() => undefined)
          }))
    )
    const io = (what: string) => fsError(path, "Io", what)
    yield* Effect.tryPromise({ try: () => handle.truncate(length), catch: io(`cannot size the file to ${length} bytes`) })
    const fd = handle.fd
    const writeAll = (buffer: Uint8Array, list: IoList) =>
      transferAll(
        "write",
        fd,
        buffer,
        list,
        IN_FLIGHT,
        (error, position, n) => io(`cannot write ${n} bytes at ${position}`)(error),
        (position, n) => io(`cannot write ${n} bytes at ${position}`)(new Error("the system wrote nothing"))
      )
    return {
      writeAll,
      write: (bytes, position) =>
        Effect.suspend(() => {
          const list = ioList(1)
          push(list, 0, bytes.length, position)
          return writeAll(bytes, list)
        }),
      commit: Effect.gen(function*() {
        yield* Effect.tryPromise({ try: () => handle.sync(), catch: io("cannot flush the file to disk") })
        // once started, the rename completes: the snapshot is either wholly in place or not at all
        yield* Effect.uninterruptible(Effect.gen(function*() {
          yield* Effect.tryPromise({ try: () => handle.close(), catch: io("cannot close the file") })
          yield* Effect.tryPromise({
            try: () => FsP.rename(temporary, path),
            catch: io(`cannot rename ${Path.basename(temporary)} to it`)
          })
          yield* Ref.set(committed, true)
        }))
        yield* syncDirectory(Path.dirname(path))
      })
    }
  })

/** Makes a rename durable (best effort: some file systems refuse to sync a directory). */
const syncDirectory = (dir: string): Effect.Effect<void> =>
  Effect.promise(async () => {
    const handle = await FsP.open(dir, "r").catch(() => undefined)
    if (handle === undefined) return
    await handle.sync().catch(() => undefined)
    await handle.close().catch(() => undefined)
  })

interface Job {
  readonly block: GuestRam.Block
  readonly pages: Uint32Array
  readonly count: number
}

interface Writer {
  readonly id: number
  readonly mailbox: Queue.Queue<Job>
  /** The writes of the current batch (reused: no allocation per batch). */
  runs: IoList
}

/**
 * The writers as a pre-copy sink: batches go to whichever writer is idle; each writer tests its pages for
 * zeros, updates the bitmap and writes each run of consecutive stored pages with one positional write (a
 * view of guest memory, no copy). `sync` completes when every writer is idle again, so a later round never
 * races an earlier round's write of the same page. The first failure of any writer is the sink's failure;
 * closing the scope interrupts and awaits every writer.
 */
const makeWriters = (
  path: string,
  file: Temporary,
  ram: GuestRam.GuestRam["Type"],
  plan: Format.Plan,
  bitmaps: ReadonlyArray<Uint8Array>,
  channels: number,
  detectZeros: boolean
) =>
  Effect.gen(function*() {
    const pageSize = ram.pageSize
    const slots = Math.max(1, Math.floor(BATCH_BYTES / pageSize))
    const where = new Map(
      ram.blocks.map((block, i) => [block, { dataOffset: plan.blocks[i]!.dataOffset, bitmap: bitmaps[i]! }])
    )
    // shared state first: released only after every writer has ended
    const idle = yield* Queue.bounded<Writer>(channels)
    const stats = yield* Ref.make<WriteStats>({ writes: 0, rounds: 0, storedPages: 0, zeroPages: 0, bytes: 0 })
    const fibers = yield* FiberSet.make<void, SnapshotError>()
    const failure = Effect.zipRight(FiberSet.join(fibers), Effect.never)

    const writeBatch = (writer: Writer, job: Job) =>
      Effect.suspend(() => {
        const { block, count, pages } = job
        const place = where.get(block)
        if (place === undefined) {
          const detail = `block ${JSON.stringify(block.name)} is not in the snapshot`
          return new SnapshotError({ reason: "Layout", path, detail })
        }
        if (writer.runs.at.length < count) writer.runs = ioList(count)
        const runs = writer.runs
        runs.count = 0
        const run = (first: number, end: number) =>
          push(runs, first * pageSize, (end - first) * pageSize, place.dataOffset + first * pageSize)
        let stored = 0
        let first = -1
        let end = -1
        let zero = 0
        for (let i = 0; i < count; i++) {
          const page = pages[i]!
          if (detectZeros && GuestRam.isZeroPage(block.bytes, page * pageSize, pageSize)) {
            Format.clearBit(place.bitmap, page)
            zero++
            continue
          }
          Format.setBit(place.bitmap, page)
          stored++
          if (page === end) {
            end++
            continue
          }
          if (first >= 0) run(first, end)
          first = page
          end = page + 1
        }
        if (first >= 0) run(first, end)
        const writes = runs.count
        return file.writeAll(block.bytes, runs).pipe(
          Effect.mapError((e) =>
            new SnapshotError({ reason: e.reason, path, detail: `writer ${writer.id}: ${e.detail}`, cause: e.cause })
          ),
          Effect.zipRight(Ref.update(stats, (s) => ({
            ...s,
            writes: s.writes + writes,
            storedPages: s.storedPages + stored,
            zeroPages: s.zeroPages + zero,
            bytes: s.bytes + stored * pageSize
          })))
        )
      })

    const worker = (writer: Writer) =>
      Effect.gen(function*() {
        yield* Queue.offer(idle, writer)
        while (true) {
          const job = yield* Queue.take(writer.mailbox)
          yield* writeBatch(writer, job)
          yield* Queue.offer(idle, writer)
        }
      })

    for (let id = 0; id < channels; id++) {
      const writer: Writer = { id, mailbox: yield* Queue.bounded<Job>(1), runs: ioList(slots) }
      yield* FiberSet.run(fibers, worker(writer))
    }

    const guarded = <A, E>(effect: Effect.Effect<A, E>) => Effect.raceFirst(effect, failure)
    const sink: Precopy.Sink<SnapshotError> = {
      slots,
      send: (block, pages, count) =>
        guarded(Effect.flatMap(Queue.take(idle), (writer) => Queue.offer(writer.mailbox, { block, pages, count }))),
      // every writer idle = every batch handed over so far is written
      sync: guarded(Effect.gen(function*() {
        const all = yield* Queue.takeBetween(idle, channels, channels)
        yield* Queue.offerAll(idle, all)
        yield* Ref.update(stats, (s) => ({ ...s, rounds: s.rounds + 1 }))
      })),
      failure,
      progress: Effect.map(Ref.get(stats), (s) => s.bytes)
    }
    return { sink, stats: Ref.get(stats) }
  })

/**
 * Saves the `GuestRam` in context to a snapshot file at `path` (replacing a file there only once the new one
 * is complete). Memory may be written meanwhile (through `GuestRam.write` / `update`): the save runs pre-copy
 * rounds, then pauses writers for the last one, exactly as `Migration.migrate`; the snapshot is the memory at
 * that switch-over.
 */
export const save = (
  path: string,
  options: SaveOptions = {}
): Effect.Effect<SaveResult, SnapshotError | MigrationError.MigrationError, GuestRam.GuestRam> =>
  Effect.gen(function*() {
    const ram = yield* GuestRam.GuestRam
    const channels = options.channels ?? DEFAULT_CHANNELS
    if (!Number.isInteger(channels) || channels < 1 || channels > 255) {
      return yield* new SnapshotError({ reason: "Unsupported", path, detail: `channels must be 1-255, not ${channels}` })
    }
    const started = yield* Clock.currentTimeMillis
    const uuid = Crypto.randomUUID()
    const plan = Format.plan(ram.pageSize, GuestRam.layoutOf(ram))

    return yield* Effect.scoped(Effect.gen(function*() {
      const file = yield* createTemporary(path, plan.fileBytes)
      const bitmaps = plan.blocks.map((b) => new Uint8Array(b.bitmapBytes))
      const writers = yield* makeWriters(path, file, ram, plan, bitmaps, channels, options.zeroPage !== "none")
      const { pagesPerRound, pausedAt } = yield* Precopy.run(ram, {
        sink: writers.sink,
        started,
        live: options.live,
        stallTimeout: options.stallTimeout ?? Duration.seconds(30),
        onProgress: options.onProgress,
        flush: () => Effect.void
      })
      // writers are paused: the digests are of exactly the memory the pages were written from
      const digests = yield* GuestRam.digest(ram)
      const header = Format.encodeHeader({
        version: Format.VERSION,
        pageSize: ram.pageSize,
        dataAlignment: Format.DATA_ALIGNMENT,
        fileBytes: plan.fileBytes,
        uuid,
        channels,
        rounds: pagesPerRound.length,
        savedAt: yield* Clock.currentTimeMillis,
        blocks: plan.blocks.map((b, i) => ({
          name: b.name,
          size: b.size,
          bitmapOffset: b.bitmapOffset,
          dataOffset: b.dataOffset,
          presentPages: Format.countBits(bitmaps[i]!),
          digest: digests[i]!.digest,
          bitmapDigest: Format.sha256(bitmaps[i]!)
        }))
      })
      for (const [i, b] of plan.blocks.entries()) yield* file.write(bitmaps[i]!, b.bitmapOffset)
      yield* file.write(header, 0)
      yield* file.commit
      const s = yield* writers.stats
      const finished = yield* Clock.currentTimeMillis
      const durationMs = finished - started
      return {
        path,
        fileBytes: plan.fileBytes,
        storedPages: bitmaps.reduce((n, b) => n + Format.countBits(b), 0),
        uuid,
        channels,
        compression: "none",
        ramBytes: ram.size,
        rounds: pagesPerRound.length,
        pagesPerRound,
        downtimeMs: finished - pausedAt,
        packets: s.writes + plan.blocks.length + 1,
        syncs: s.rounds,
        normalPages: s.storedPages,
        zeroPages: s.zeroPages,
        wireBytes: s.bytes + header.length + bitmaps.reduce((n, b) => n + b.length, 0),
        durationMs,
        gibPerSecond: ram.size / GIB / Math.max(durationMs, 1) * 1000
      } satisfies SaveResult
    }))
  })

// ---------------------------------------------------------------------------------------------------------
// Restore

/** How `restore` reads. */
export interface RestoreOptions {
  /** Memory to restore into: its layout must equal the snapshot's. Without it, new memory is allocated. */
  readonly ram?: GuestRam.GuestRam["Type"] | undefined
  /** Largest total memory a snapshot may make `restore` allocate when `ram` is not given (default 16 GiB). */
  readonly maxRamBytes?: number | undefined
  /** Parallel readers (default 4). */
  readonly readers?: number | undefined
  /** Called about ten times a second while pages are read (`doneBytes` counts memory restored). */
  readonly onProgress?: ((progress: Migration.Progress) => Effect.Effect<void>) | undefined
}

/**
 * A restored snapshot: the memory and stats (`channels`, `rounds` and `uuid` are the save's; `normalPages` the
 * pages read, `zeroPages` the absent ones, `packets` the reads, `wireBytes` the bytes read).
 */
export interface Restored {
  readonly ram: GuestRam.GuestRam["Type"]
  readonly stats: Migration.Stats
  readonly path: string
  readonly fileBytes: number
  /** When the snapshot was saved (milliseconds since the epoch). */
  readonly savedAt: number
}

/** Default cap on memory a snapshot may make `restore` allocate. */
export const DEFAULT_MAX_RAM = 16 * GIB

const describeLayout = (pageSize: number, layout: ReadonlyArray<GuestRam.BlockLayout>): string =>
  `page size ${pageSize}, ` +
  layout.slice(0, 4).map((b) => `${JSON.stringify(b.name)} ${b.size} bytes`).join(", ") +
  (layout.length > 4 ? `, … (${layout.length} blocks)` : "")

const sameLayout = (ram: GuestRam.GuestRam["Type"], header: Format.Header): boolean =>
  ram.pageSize === header.pageSize && ram.blocks.length === header.blocks.length &&
  ram.blocks.every((b, i) => b.name === header.blocks[i]!.name && b.bytes.length === header.blocks[i]!.size)

/**
 * Restores the snapshot at `path`: validates the file completely before touching memory (magic, version,
 * header checksum, offsets, length, bitmap checksums), reads the stored pages with parallel readers straight
 * into memory, zeroes the others, and verifies every block's digest. Into a given `ram`, a snapshot whose
 * pages turn out damaged (digest mismatch) has already overwritten it.
 */
export const restore = (path: string, options: RestoreOptions = {}): Effect.Effect<Restored, SnapshotError> =>
  Effect.scoped(Effect.gen(function*() {
    const started = yield* Clock.currentTimeMillis
    const readers = options.readers ?? DEFAULT_CHANNELS
    if (!Number.isInteger(readers) || readers < 1 || readers > 255) {
      return yield* new SnapshotError({ reason: "Unsupported", path, detail: `readers must be 1-255, not ${readers}` })
    }
    const handle = yield* Effect.acquireRelease(
      Effect.tryPromise({ try: () => FsP.open(path, "r"), catch: fsError(path, "Unusable", "cannot open it") }),
      (handle) => Effect.promise(() => handle.close().catch(() => undefined))
    )
    const stat = yield* Effect.tryPromise({ try: () => handle.stat(), catch: fsError(path, "Io", "cannot stat it") })
    if (!stat.isFile()) return yield* new SnapshotError({ reason: "Unusable", path, detail: "is not a regular file" })
    const fd = handle.fd
    const fileSize = stat.size
    let bytesRead = 0
    let reads = 0
    const readAll = (into: Uint8Array, list: IoList) =>
      Effect.tap(
        transferAll(
          "read",
          fd,
          into,
          list,
          IN_FLIGHT,
          (error, position, length) => fsError(path, "Io", `cannot read ${length} bytes at ${position}`)(error),
          (position) =>
            new SnapshotError({
              reason: "Truncated",
              path,
              detail: `the file ended early, at ${position} (was it truncated while being read?)`
            })
        ),
        () => {
          for (let i = 0; i < list.count; i++) bytesRead += list.length[i]!
          reads += list.count
        }
      )
    const read = (into: Uint8Array, at: number, length: number, position: number) =>
      Effect.suspend(() => {
        const list = ioList(1)
        push(list, at, length, position)
        return readAll(into, list)
      })
    const fail = (problem: Format.Problem) => new SnapshotError({ path, ...problem })

    const first = Buffer.alloc(Math.min(fileSize, Format.PREFIX_SIZE))
    yield* read(first, 0, first.length, 0)
    const prefix = Format.decodePrefix(first, fileSize)
    if (Format.isProblem(prefix)) return yield* fail(prefix)
    const headerBytes = Buffer.alloc(prefix.headerBytes)
    yield* read(headerBytes, 0, headerBytes.length, 0)
    const header = Format.decodeHeader(headerBytes, prefix, fileSize)
    if (Format.isProblem(header)) return yield* fail(header)

    const bitmaps: Array<Uint8Array> = []
    for (const entry of header.blocks) {
      const pages = entry.size / header.pageSize
      const bitmap = new Uint8Array(Format.bitmapSize(pages))
      yield* read(bitmap, 0, bitmap.length, entry.bitmapOffset)
      const damaged = Format.sha256(bitmap) !== entry.bitmapDigest || Format.hasBitsPast(bitmap, pages) ||
        Format.countBits(bitmap) !== entry.presentPages
      if (damaged) {
        return yield* new SnapshotError({
          reason: "Corrupt",
          path,
          detail: `the page bitmap of block ${JSON.stringify(entry.name)} is damaged`
        })
      }
      bitmaps.push(bitmap)
    }

    const given = options.ram
    if (given !== undefined && !sameLayout(given, header)) {
      return yield* new SnapshotError({
        reason: "Layout",
        path,
        detail: `the snapshot's memory (${describeLayout(header.pageSize, header.blocks)}) does not match the ` +
          `memory given (${describeLayout(given.pageSize, GuestRam.layoutOf(given))})`
      })
    }
    const total = header.blocks.reduce((n, b) => n + b.size, 0)
    const maxRam = options.maxRamBytes ?? DEFAULT_MAX_RAM
    if (given === undefined && total > maxRam) {
      return yield* new SnapshotError({
        reason: "Layout",
        path,
        detail: `the snapshot holds ${(total / GIB).toFixed(2)} GiB of memory, more than the limit of ` +
          `${(maxRam / GIB).toFixed(2)} GiB`
      })
    }
    // fresh memory is not touched up front: the readers' copies fault its pages in on libuv's threads, in
    // parallel (faster here than filling first), and pages never stored stay untouched
    const fresh = header.blocks.map((b) => ({ name: b.name, bytes: GuestRam.allocate(b.size) }))
    const ram = given ?? (yield* GuestRam.make({ pageSize: header.pageSize, blocks: fresh }).pipe(
      Effect.mapError((e) => new SnapshotError({ reason: "Corrupt", path, detail: e.message }))
    ))

    // jobs of up to 1 MiB of pages; fresh memory is zero already, so only jobs with stored pages matter
    const pageSize = header.pageSize
    const jobPages = Math.max(1, Math.floor(READ_JOB_BYTES / pageSize))
    const mergeGap = Math.floor(MERGE_GAP_BYTES / pageSize)
    const jobs: Array<{ readonly block: number; readonly first: number; readonly end: number }> = []
    header.blocks.forEach((entry, block) => {
      const pages = entry.size / pageSize
      for (let page = 0; page < pages; page += jobPages) {
        jobs.push({ block, first: page, end: Math.min(pages, page + jobPages) })
      }
    })
    let restoredBytes = 0
    const readJob = (job: (typeof jobs)[number]) =>
      Effect.suspend(() => {
        const bytes = ram.blocks[job.block]!.bytes
        const dataOffset = header.blocks[job.block]!.dataOffset
        const spans = ioList(job.end - job.first)
        const zeros: Array<Format.Run> = []
        Format.forEachSpan(
          bitmaps[job.block]!,
          job.first,
          job.end,
          mergeGap,
          ({ end, first }) => push(spans, first * pageSize, (end - first) * pageSize, dataOffset + first * pageSize),
          (gap, inSpan) => {
            if (inSpan || given !== undefined) zeros.push(gap)
          }
        )
        return Effect.map(readAll(bytes, spans), () => {
          // absent pages read as part of a span (holes, or stale bytes of a page that became zero), and every
          // absent page of memory that was not fresh
          for (const { end, first } of zeros) bytes.fill(0, first * pageSize, end * pageSize)
          restoredBytes += (job.end - job.first) * pageSize
        })
      })

    const report = options.onProgress
    const progress = (doneBytes: number): Migration.Progress => ({
      round: 0,
      phase: "precopy",
      doneBytes,
      totalBytes: ram.size,
      dirtyPages: 0,
      bandwidth: 0,
      expectedDowntimeMs: 0
    })
    if (report) {
      yield* Effect.suspend(() => report(progress(restoredBytes))).pipe(
        Effect.repeat(Schedule.spaced(Duration.millis(100))),
        Effect.forkScoped
      )
    }
    yield* Effect.forEach(jobs, readJob, { concurrency: readers, discard: true })
    if (report) yield* report(progress(ram.size))

    const digests = yield* GuestRam.digest(ram)
    const bad = header.blocks
      .filter((entry, i) => digests[i]!.digest !== entry.digest)
      .map((entry) => JSON.stringify(entry.name))
    if (bad.length > 0) {
      return yield* new SnapshotError({
        reason: "DigestMismatch",
        path,
        detail: `${bad.length === 1 ? "block" : "blocks"} ${bad.join(", ")} ${bad.length === 1 ? "does" : "do"} ` +
          "not match the saved digest: the page data is damaged"
      })
    }
    const stored = header.blocks.reduce((n, b) => n + b.presentPages, 0)
    const durationMs = (yield* Clock.currentTimeMillis) - started
    return {
      ram,
      path,
      fileBytes: header.fileBytes,
      savedAt: header.savedAt,
      stats: {
        uuid: header.uuid,
        channels: header.channels,
        compression: "none",
        ramBytes: ram.size,
        rounds: header.rounds,
        pagesPerRound: [],
        downtimeMs: 0,
        packets: reads,
        syncs: 0,
        normalPages: stored,
        zeroPages: ram.size / pageSize - stored,
        wireBytes: bytesRead,
        durationMs,
        gibPerSecond: ram.size / GIB / Math.max(durationMs, 1) * 1000
      }
    } satisfies Restored
  }))

// ---------------------------------------------------------------------------------------------------------
// The file transport of Migration

const unsupported = (path: string, detail: string) => new SnapshotError({ reason: "Unsupported", path, detail })

/**
 * `Migration.migrate` to a `file:` address: `save` with the migration's channels, zero-page mode, live policy,
 * progress and peer timeout (as the stall timeout). Compression and TLS do not apply to a file.
 */
export const migrateToFile = (
  path: string,
  options: Migration.MigrateOptions
): Effect.Effect<SaveResult, SnapshotError | MigrationError.MigrationError, GuestRam.GuestRam> =>
  Effect.suspend(() => {
    if ((options.compression ?? "none") !== "none") {
      return unsupported(path, `compression ${options.compression} does not apply to a file: snapshot`)
    }
    if (options.upgrade !== undefined) return unsupported(path, "TLS does not apply to a file: snapshot")
    return save(path, {
      channels: options.channels,
      zeroPage: options.zeroPage,
      live: options.live,
      onProgress: options.onProgress,
      stallTimeout: options.timeouts?.peer
    })
  })

/** `Migration.listenAndReceive` from a `file:` address: `restore` with the destination's memory options. */
export const receiveFromFile = (
  path: string,
  options: Migration.IncomingOptions
): Effect.Effect<Migration.Incoming, SnapshotError> =>
  options.upgrade !== undefined
    ? Effect.fail(unsupported(path, "TLS does not apply to a file: snapshot"))
    : Effect.map(
      restore(path, { ram: options.ram, maxRamBytes: options.maxRamBytes, onProgress: options.onProgress }),
      ({ ram, stats }) => ({ ram, stats, rejected: [] })
    )
