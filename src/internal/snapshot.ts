/**
 * `Snapshot.save` and `Snapshot.restore`, each with the status a `MigrationStatus` keeps of it (`Migration.migrate`
 * to a `file:` address, `Migration.listenAndReceive` of one): the options, results and orchestration, which the
 * public `Snapshot` module gives as they are (its steps: `snapshotFile`, `snapshotSave`, `snapshotRestore`,
 * `snapshotFormat`).
 */
import * as Clock from "effect/Clock"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"
import * as GuestRam from "../GuestRam.js"
import * as MigrationError from "../MigrationError.js"
import * as Protocol from "../Protocol.js"
import * as Transfer from "../Transfer.js"
import { ownFibers } from "./native/ownFibers.js"
import * as Precopy from "./precopy.js"
import * as SnapshotFile from "./snapshotFile.js"
import { SnapshotError } from "./snapshotFile.js"
import * as Format from "./snapshotFormat.js"
import * as Restore from "./snapshotRestore.js"
import * as Save from "./snapshotSave.js"
import * as Status from "./status.js"
import * as Inputs from "./inputs.js"
import * as Memory from "./memory.js"

/** Writers of `save` and readers of `restore` when not told (libuv's thread pool has 4 threads by default). */
export const DEFAULT_CHANNELS = 4

// ---------------------------------------------------------------------------------------------------------
// Save

/**
 * How `save` writes.
 */
export interface SaveOptions {
  /** Parallel writers, 1-255 (default 4). More than libuv's thread pool (UV_THREADPOOL_SIZE, 4) gains nothing. */
  readonly channels?: number | undefined
  /** `multifd` (default): zero pages are not stored (holes); `none`: every page is stored. */
  readonly zeroPage?: "multifd" | "none" | undefined
  /**
   * Pre-copy policy for memory written while the snapshot is taken (as `Migration.migrate`). As with a
   * migration, writers stay paused (`ram.gate`) after a successful save — the snapshot is the memory as of
   * then; call `ram.gate.open` to let them go on. On failure the gate opens again, unless it was closed already
   * when the save's switch-over began (by the application, or kept closed by an earlier success): it stays so.
   */
  readonly live?: Transfer.LiveOptions | undefined
  /**
   * Called as pages are handed to the writers (and about ten times a second while they write, when the pages
   * written moved on), in the save's fiber: the save waits for it. As with
   * `Migration.migrate`, a write to the memory from inside it (`GuestRam.write` / `update`, or a fiber it forks)
   * goes through while `phase` is `precopy`, and fails at once with `GuestRam.WriteBlocked` (`Deadlock`) during
   * the switch-over, when the save holds writers paused and waits for the callback. A callback that has not
   * returned within `stallTimeout` fails the save (`Timeout`, naming it).
   */
  readonly onProgress?: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
  /** Fail when no page is written for this long (default 30 s; finite, at most 24 days: `Transfer.checkTimeout`). */
  readonly stallTimeout?: Duration.DurationInput | undefined
}

/**
 * What a save did: the migration's stats (writes as packets, bytes written as wire bytes) and the file.
 */
export interface SaveResult extends Transfer.Stats {
  readonly path: string
  /** The file's apparent size (holes included). */
  readonly fileBytes: number
  /** Pages stored in the file (bits set). */
  readonly storedPages: number
}

/**
 * `Snapshot.save`, its status kept by `tracker` when there is one (`migrate` to a `file:` address given a
 * `MigrationStatus`): the bytes and pages written so far, the rounds done, the writers' pause during the switch-over
 * (it said 0 of each until the end).
 */
export const save = (
  path: string,
  options: SaveOptions,
  tracker: Status.Tracker | undefined
): Effect.Effect<SaveResult, SnapshotError | MigrationError.MigrationError, GuestRam.GuestRam> =>
  ownFibers(Effect.gen(function*() {
    const ram = yield* GuestRam.GuestRam
    // an empty path made a hidden `.<pid>.partial` in the working directory, wrote every page into it, and failed
    // only at the rename
    // (a path that is no string, from plain JavaScript, was a defect)
    if (typeof path !== "string" || path.length === 0) return yield* noPath(path)
    const notOptions = Inputs.checkOptions(options, true)
    if (notOptions !== undefined) return yield* new MigrationError.MigrationError({ reason: "BadOptions", detail: notOptions })
    // (null, from plain JavaScript, is no channel count: it took the default in silence)
    const channels = options.channels === undefined ? DEFAULT_CHANNELS : options.channels
    const badChannels = Protocol.checkChannels(channels)
    if (badChannels !== undefined) return yield* new SnapshotError({ reason: "Unsupported", path, detail: badChannels })
    const zeroPage = options.zeroPage
    const badOptions = Memory.notGuestRam(ram, "the GuestRam in context") ??
      Inputs.checkCallback("onProgress", options.onProgress) ?? Transfer.checkLive(options.live) ??
      (options.stallTimeout === undefined ? undefined : Transfer.checkTimeout("stallTimeout", options.stallTimeout)) ??
      (zeroPage === undefined || zeroPage === "multifd" || zeroPage === "none"
        ? undefined
        : `zero-page mode ${JSON.stringify(zeroPage)} is not multifd or none`)
    if (badOptions !== undefined) return yield* new MigrationError.MigrationError({ reason: "BadOptions", detail: badOptions })
    const started = yield* Clock.currentTimeMillis
    const uuid = Crypto.randomUUID()
    const plan = Format.plan(ram.pageSize, GuestRam.layoutOf(ram))

    return yield* Precopy.exclusive(ram, Effect.scoped(Effect.gen(function*() {
      const file = yield* SnapshotFile.createTemporary(path, plan.fileBytes)
      const bitmaps = plan.blocks.map((b) => new Uint8Array(b.bitmapBytes))
      const writers = yield* Save.makeWriters(path, file, ram, plan, bitmaps, channels, options.zeroPage !== "none")
      if (tracker !== undefined) {
        yield* tracker.probe(Effect.map(writers.stats, (s) => ({
          transferred: s.bytes,
          normal: s.storedPages,
          duplicate: s.zeroPages
        })))
      }
      const { pagesPerRound, pausedAt } = yield* Precopy.run(ram, {
        sink: writers.sink,
        started,
        live: options.live,
        stallTimeout: options.stallTimeout ?? Duration.seconds(30),
        onProgress: options.onProgress,
        flush: () => Effect.void,
        observe: tracker === undefined ? undefined : Status.rounds(tracker)
      })
      // writers are paused: the digests are of exactly the memory the pages were written from
      const header = yield* Save.writeIndex(file, ram, plan, bitmaps, {
        uuid,
        channels,
        rounds: pagesPerRound.length
      }).pipe(
        // its ArrayBuffer detached meanwhile (transferred to another thread): refused as up front
        Effect.mapError((error) =>
          error._tag === "GuestRamError" ? new MigrationError.MigrationError({ reason: "BadOptions", detail: error.detail }) : error
        )
      )
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
        gibPerSecond: Transfer.gibPerSecond(ram.size, durationMs)
      } satisfies SaveResult
    })))
  }))

// ---------------------------------------------------------------------------------------------------------
// Restore

/**
 * How `restore` reads.
 */
export interface RestoreOptions {
  /** Memory to restore into: its layout must equal the snapshot's. Without it, new memory is allocated. */
  readonly ram?: GuestRam.GuestRam["Type"] | undefined
  /** Largest total memory a snapshot may make `restore` allocate when `ram` is not given (default 16 GiB). */
  readonly maxRamBytes?: number | undefined
  /** Parallel readers (default 4). */
  readonly readers?: number | undefined
  /**
   * Called about ten times a second while pages are read (`doneBytes` counts memory restored), in a fiber of its
   * own, and once more, counting all the memory, at the end. A callback that fails or dies does not fail the
   * restore: it is logged as a warning (as `Migration.IncomingOptions.onProgress`, which a `file:` address
   * passes here).
   */
  readonly onProgress?: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
  /**
   * The caller's last word on the snapshot's memory, once the file is validated and before any memory is
   * allocated or a page read: a reason refuses it (`Refused`, saying it).
   */
  readonly admit?: ((snapshot: Contents) => string | undefined) | undefined
}

/**
 * What a snapshot holds, as `RestoreOptions.admit` sees it before restoring.
 */
export interface Contents {
  /** The memory's size: every block's bytes. */
  readonly ramBytes: number
  readonly blocks: ReadonlyArray<GuestRam.BlockLayout>
  readonly pageSize: number
  /** Writers the save used. */
  readonly channels: number
}

/**
 * A restored snapshot: the memory and stats (`channels`, `rounds` and `uuid` are the save's; `normalPages` the
 * pages read, `zeroPages` the absent ones, `packets` the reads, `wireBytes` the bytes read).
 */
export interface Restored {
  readonly ram: GuestRam.GuestRam["Type"]
  readonly stats: Transfer.Stats
  readonly path: string
  readonly fileBytes: number
  /** When the snapshot was saved (milliseconds since the epoch). */
  readonly savedAt: number
}

const describeLayout = (pageSize: number, layout: ReadonlyArray<GuestRam.BlockLayout>): string =>
  `page size ${pageSize}, ` +
  layout.slice(0, 4).map((b) => `${JSON.stringify(b.name)} ${b.size} bytes`).join(", ") +
  (layout.length > 4 ? `, … (${layout.length} blocks)` : "")

const sameLayout = (ram: GuestRam.GuestRam["Type"], header: Format.Header): boolean =>
  ram.pageSize === header.pageSize && ram.blocks.length === header.blocks.length &&
  ram.blocks.every((b, i) => b.name === header.blocks[i]!.name && b.bytes.length === header.blocks[i]!.size)

/**
 * Whether the memory the header describes may be restored: the layout of the memory given, else the limit, then
 * the caller's `admit`. Checked on the header alone, before the bitmaps are read: a forged header of thousands of
 * 4 GiB blocks of 512-byte pages (a sparse file) had a gigabyte of bitmaps read before the limit refused it.
 */
const admitted = (
  path: string,
  header: Format.Header,
  options: RestoreOptions
): Effect.Effect<void, SnapshotError> =>
  Effect.gen(function*() {
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
    const maxRam = options.maxRamBytes ?? Transfer.DEFAULT_MAX_RAM
    if (given === undefined && total > maxRam) {
      return yield* new SnapshotError({
        reason: "Layout",
        path,
        // in bytes, as a destination's limit is worded: GiB with two decimals said "0.01 GiB ... limit of 0.00 GiB"
        detail: `the snapshot's ${total} bytes of memory exceed the limit of ${maxRam}`
      })
    }
    const refusal = options.admit?.({
      ramBytes: total,
      blocks: header.blocks.map((b) => ({ name: b.name, size: b.size })),
      pageSize: header.pageSize,
      channels: header.channels
    })
    if (refusal !== undefined) return yield* new SnapshotError({ reason: "Refused", path, detail: `not restored: ${refusal}` })
  })

/**
 * The memory to restore into (once `admitted`): the memory given, or new memory. Fresh memory is not touched up
 * front: the readers' copies fault its pages in on libuv's threads, in parallel (faster here than filling
 * first), and pages never stored stay untouched.
 */
const memoryFor = (
  path: string,
  header: Format.Header,
  options: RestoreOptions
): Effect.Effect<GuestRam.GuestRam["Type"], SnapshotError> =>
  options.ram !== undefined
    ? Effect.succeed(options.ram)
    : GuestRam.make({
      pageSize: header.pageSize,
      blocks: header.blocks.map((b) => ({ name: b.name, size: b.size })),
      prefault: false
    }).pipe(
      Effect.mapError((e) =>
        new SnapshotError({ reason: e.reason === "OutOfMemory" ? "Layout" : "Corrupt", path, detail: e.message })
      )
    )

/**
 * `Snapshot.restore`, its status kept by `tracker` when there is one (`listenAndReceive` from a `file:` address given
 * a `MigrationStatus`): the snapshot's size once its header is read, the bytes read so far, the pages restored and
 * what remains (it said a total of 0, nothing read and nothing remaining until the end).
 */
export const restore = (
  path: string,
  options: RestoreOptions,
  tracker: Status.Tracker | undefined
): Effect.Effect<Restored, SnapshotError> => {
  // options of null as a whole (plain JavaScript) threw as `restore` was called
  // and memory given that is none (`null`, or no GuestRam) was a defect ("Cannot read properties of null"), taken
  // before the options' own check (restoreInto's) could say so
  const notOptions = Inputs.checkOptions(options, true) ??
    (options.ram === undefined ? undefined : Memory.notGuestRam(options.ram, "ram"))
  return notOptions !== undefined
    ? Effect.fail(new SnapshotError({ reason: "Unsupported", path: typeof path === "string" ? path : "", detail: notOptions }))
    : ownFibers(
      options.ram === undefined
        ? restoreInto(path, options, tracker)
        : Memory.exclusively(
          options.ram,
          restoreInto(path, options, tracker),
          (detail) => new SnapshotError({ reason: "Busy", path, detail: `not restored: ${detail}` }),
          (detail) => new SnapshotError({ reason: "Layout", path, detail: `not restored: ${detail}` })
        )
    )
}

/** A snapshot's path that is empty, or no string (plain JavaScript). */
const noPath = (path: unknown) =>
  new SnapshotError({
    reason: "Unusable",
    path: typeof path === "string" ? path : "",
    detail: typeof path === "string" ? "no file path given" : `the path ${Inputs.describeInput(path)} is not a string`
  })

const restoreInto = (
  path: string,
  options: RestoreOptions,
  tracker: Status.Tracker | undefined
): Effect.Effect<Restored, SnapshotError> =>
  Effect.scoped(Effect.gen(function*() {
    const started = yield* Clock.currentTimeMillis
    const readers = options.readers === undefined ? DEFAULT_CHANNELS : options.readers
    const badReaders = Protocol.checkChannels(readers, "readers")
    if (typeof path !== "string" || path.length === 0) return yield* noPath(path)
    const badOptions = badReaders ?? Transfer.checkMaxRam(options.maxRamBytes) ??
      (options.ram === undefined ? undefined : Memory.notGuestRam(options.ram, "ram")) ??
      Inputs.checkCallback("admit", options.admit) ?? Inputs.checkCallback("onProgress", options.onProgress)
    if (badOptions !== undefined) return yield* new SnapshotError({ reason: "Unsupported", path, detail: badOptions })
    const file = yield* SnapshotFile.openReader(path)
    const index = yield* Restore.readIndex(path, file, (header) => admitted(path, header, options))
    const { header } = index
    const ram = yield* memoryFor(path, header, options)
    const pages = Restore.pageReads(file, index, ram, options.ram === undefined)
    if (tracker !== undefined) {
      yield* tracker.update({ total: ram.size, remaining: ram.size })
      yield* tracker.probe(Effect.map(Clock.currentTimeMillis, (now) => {
        const { absent, stored } = pages.restoredPages()
        return {
          transferred: file.bytesRead(),
          remaining: ram.size - pages.restoredBytes(),
          normal: stored,
          duplicate: absent,
          // the read rate since the restore began (its reports carry none)
          mbps: Status.mbps(file.bytesRead() / Math.max(1, now - started) * 1000)
        }
      }))
    }

    // the application's writers of memory given wait while the restore writes and verifies it, and go on after it
    // (a write landed among the restored pages, and a sound file failed DigestMismatch, "the page data is damaged");
    // a write from inside this restore's own report fails at once (WriteBlocked) rather than wait for it. A gate
    // closed already (by the application, or kept closed by a migration's success) stays as it was found.
    const given = options.ram
    if (given !== undefined) {
      yield* Effect.acquireRelease(given.gate.closing, (closedHere) => closedHere ? given.gate.open : Effect.void)
    }
    const onProgress = given === undefined ? options.onProgress : yield* given.gate.reports(options.onProgress)

    const progress = (doneBytes: number): Transfer.Progress => ({
      round: 0,
      phase: "precopy",
      doneBytes,
      totalBytes: ram.size,
      dirtyPages: 0,
      bandwidth: 0,
      expectedDowntimeMs: 0
    })
    yield* Transfer.reportEvery(onProgress, () => Effect.sync(() => progress(pages.restoredBytes())))
    yield* pages.run(readers)
    // every page is in place now, the absent ones (zero, or never stored) included
    // (called inside the guard: a callback that throws rather than return an effect dies there, logged)
    if (onProgress) yield* Transfer.tolerated(Effect.suspend(() => onProgress(progress(ram.size))))

    // written meanwhile (cp over it, dd conv=notrunc), pages may mix two versions: said so, rather than "damaged"
    yield* file.unchanged
    yield* Restore.verify(path, ram, header)
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
        packets: file.reads(),
        syncs: 0,
        normalPages: stored,
        zeroPages: ram.size / header.pageSize - stored,
        wireBytes: file.bytesRead(),
        durationMs,
        gibPerSecond: Transfer.gibPerSecond(ram.size, durationMs)
      }
    } satisfies Restored
  }))
