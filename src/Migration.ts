/**
 * A whole migration: `migrate` on the source and `incoming` on the destination drive the channel sets
 * through the control channel — hello, accept, rounds of pages each ended by a flush the destination
 * acknowledges, complete with digests, done. Everything runs in one scope: when `migrate` or `incoming`
 * returns (success, failure or interruption) every fiber has ended and every handle is closed.
 *
 * A `file:` address saves (`migrate`) or restores (`listenAndReceive`) a snapshot file instead (`Snapshot`):
 * Migration knows Snapshot, Snapshot does not know Migration (what both share is in `Transfer`).
 *
 * This module holds the options, their checks and the entry points; the two sides' steps are in
 * `internal/source` and `internal/destination` (its candidates in `internal/candidates`), the control
 * channel's conversation in `internal/conversation`.
 *
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Duration from "effect/Duration"
import type * as Scope from "effect/Scope"
import * as Stream from "effect/Stream"
import * as Bandwidth from "./Bandwidth.js"
import * as GuestRam from "./GuestRam.js"
import * as Destination from "./internal/destination.js"
import * as Precopy from "./internal/precopy.js"
import * as Recorder from "./internal/recorder.js"
import * as Source from "./internal/source.js"
import * as SnapshotInternal from "./internal/snapshot.js"
import * as Status from "./internal/status.js"
import * as MigrationConfig from "./MigrationConfig.js"
import * as MigrationError from "./MigrationError.js"
import type * as MigrationStatus from "./MigrationStatus.js"
import type * as MultifdRecv from "./MultifdRecv.js"
import type * as MultifdSend from "./MultifdSend.js"
import * as PageCodec from "./PageCodec.js"
import * as Protocol from "./Protocol.js"
import * as Snapshot from "./Snapshot.js"
import * as Transfer from "./Transfer.js"
import * as Transport from "./Transport.js"
import { ownFibers } from "./internal/native/ownFibers.js"
import * as Inputs from "./internal/inputs.js"
import * as Memory from "./internal/memory.js"

// ---------------------------------------------------------------------------------------------------------
// What both sides share (`Transfer`)

/**
 * How long to wait for a peer (`Transfer.Timeouts`).
 *
 * @since 0.1.0
 * @category models
 */
export type Timeouts = Transfer.Timeouts

/**
 * Where a migration is (`Transfer.Phase`).
 *
 * @since 0.1.0
 * @category models
 */
export type Phase = Transfer.Phase

/**
 * A progress report (`Transfer.Progress`).
 *
 * @since 0.1.0
 * @category models
 */
export type Progress = Transfer.Progress

/**
 * What a source waits for after its last round: its destination verifying or storing (`Transfer.DestinationWait`).
 *
 * @since 0.1.0
 * @category models
 */
export type DestinationWait = Transfer.DestinationWait

/**
 * When a live migration switches over, and what it does when it cannot (`Transfer.LiveOptions`).
 *
 * @since 0.1.0
 * @category models
 */
export type LiveOptions = Transfer.LiveOptions

/**
 * What a finished migration did (`Transfer.Stats`).
 *
 * @since 0.1.0
 * @category models
 */
export type Stats = Transfer.Stats

/**
 * Default timeouts (`Transfer.defaultTimeouts`).
 *
 * @since 0.1.0
 * @category constants
 */
export const defaultTimeouts: Timeouts = Transfer.defaultTimeouts

/**
 * Default cap on memory a source may make the destination allocate (`Transfer.DEFAULT_MAX_RAM`, 16 GiB).
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_MAX_RAM: number = Transfer.DEFAULT_MAX_RAM

// ---------------------------------------------------------------------------------------------------------
// Source

/**
 * Options of the source.
 *
 * @since 0.1.0
 * @category models
 */
export interface MigrateOptions {
  readonly address: Transport.Address
  /** Parallel multifd channels, 1–255 (default 2). */
  readonly channels?: number | undefined
  /** Compression of the pages on the multifd channels (default `none`). */
  readonly compression?: Protocol.Compression | undefined
  /** The compression's level (`Protocol.compressionLevels`; default 1). */
  readonly compressionLevel?: number | undefined
  /** `multifd` (default): zero pages travel as offsets only; `none`: as data. */
  readonly zeroPage?: "multifd" | "none" | undefined
  readonly timeouts?: Partial<Timeouts> | undefined
  /** Secures every connection (the main channel and each multifd channel) before it is used. */
  readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
  /**
   * Called at each round's start, as its pages are sent (after each hand-off to a channel, and about ten times a
   * second while the channels send, when the pages sent moved on), and at its end, in the migration's fiber: the
   * migration waits for it. It may write the memory (`GuestRam.write` / `update`) while `phase` is `precopy`; during the
   * switch-over (`phase` `switchover`) the migration holds writers paused and waits for the callback, so a write
   * from inside it (or a fiber it forks) fails at once with `GuestRam.WriteBlocked` (`Deadlock`), writing
   * nothing, rather than wait for a migration that waits for it. Writers outside the callback wait as always. A
   * callback that has not returned within the peer timeout fails the migration (`Timeout`, naming it).
   */
  readonly onProgress?: ((progress: Progress) => Effect.Effect<void>) | undefined
  /** Pre-copy and switch-over policy (for memory written while it migrates). */
  readonly live?: LiveOptions | undefined
  /** Kept up to date with this migration's status (`MigrationStatus.make`), for anyone to read at any moment. */
  readonly status?: MigrationStatus.MigrationStatus | undefined
  /**
   * One bandwidth limit for all the channels, counting the bytes of every packet (QEMU's `max-bandwidth`):
   * bytes per second (0: none, the default), or a `Bandwidth.Limit` to change while the migration runs.
   */
  readonly maxBandwidth?: number | Bandwidth.Limit | undefined
  /**
   * A multifd channel whose connection breaks mid-migration (reset, end, a failed write) while the main
   * channel is alive is re-attached: a new connection for the same channel (the same upgrade), announced on
   * the main channel, resending every page the destination has not got before one of the channel's SYNCs.
   * A number is the attempts per loss (0: a lost channel fails the migration); default 3 attempts within
   * 10 s of the loss. A connection lost once the destination has every page of the last round and was told the
   * digests (while it verifies and stores, or as the channels end) carries nothing more: that channel has
   * ended, on both sides.
   */
  readonly reconnect?: number | Reconnect | undefined
}

/**
 * How a lost multifd channel comes back (`MigrateOptions.reconnect`).
 *
 * @since 0.1.0
 * @category models
 */
export interface Reconnect {
  /** New connections tried per loss (0: none). */
  readonly attempts: number
  /** Time from the loss within which they are tried (default 10 s; finite: the destination is told it). */
  readonly within?: Duration.DurationInput | undefined
}

/**
 * Everything a source can fail with. Options it cannot use fail with a `MigrationError` of reason
 * `BadOptions` (a compression level out of range: a `CodecError` of reason `BadLevel`) before anything
 * connects.
 *
 * @since 0.1.0
 * @category errors
 */
export type MigrateError =
  | MultifdSend.ChannelFailure
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | Snapshot.SnapshotError

/** The first option `migrate` cannot use with memory of `pageSize`, described; `undefined` when all are usable. */
const checkOptions = (options: MigrateOptions, pageSize: number): string | undefined => {
  // only `undefined` is left out: `null` (plain JavaScript, a JSON setting that is none) is checked as a value, as the
  // options that hold objects are (it took the default, or MULTIFD_CHANNELS' place, in silence)
  const compression = options.compression === undefined ? "none" : options.compression
  const zeroPage = options.zeroPage === undefined ? "multifd" : options.zeroPage
  return Protocol.checkChannels(options.channels === undefined ? 2 : options.channels) ??
    (Protocol.compressions.includes(compression)
      ? undefined
      : `compression ${JSON.stringify(compression)} is not one of ${Protocol.compressions.join(", ")}`) ??
    (zeroPage === "multifd" || zeroPage === "none"
      ? undefined
      : `zero-page mode ${JSON.stringify(zeroPage)} is not multifd or none`) ??
    Protocol.checkPageSize(pageSize, "the memory's page size") ??
    checkReconnect(options.reconnect) ??
    Transfer.checkTimeouts(options.timeouts) ??
    Transfer.checkLive(options.live)
}

const checkReconnect = (reconnect: MigrateOptions["reconnect"]): string | undefined => {
  // (null was a defect, a string ignored in silence: plain JavaScript)
  if (reconnect !== undefined && typeof reconnect !== "number" && (typeof reconnect !== "object" || reconnect === null)) {
    return `reconnect must be a number of attempts or { attempts, within }, not ${Inputs.describeInput(reconnect)}`
  }
  const attempts = typeof reconnect === "number" ? reconnect : reconnect?.attempts === undefined ? 3 : reconnect.attempts
  const within = typeof reconnect === "object" ? reconnect.within : undefined
  return !(Number.isInteger(attempts) && attempts >= 0 && attempts <= 1000)
    ? `reconnect attempts ${attempts} is not a whole number from 0 to 1000`
    : within === undefined
    ? undefined
    : Transfer.checkDuration("reconnect.within", within, "positive") ?? checkFinite("reconnect.within", within)
}

/**
 * A window the hello tells the destination (`reconnectMs`) is finite: JSON has no Infinity (it wrote null, the
 * destination refused the hello, and the source failed as if it were no multifd destination).
 */
const checkFinite = (what: string, input: Duration.DurationInput): string | undefined =>
  Duration.isFinite(Duration.decode(input)) ? undefined : `${what} must be finite, not Infinity`

/**
 * The options checked and with their defaults: every one of them is known usable before anything connects
 * (a bad channel count, method, zero-page mode or page size is a `BadOptions` error; a bad level a
 * `CodecError`; a missing codec an `Unavailable` one).
 */
const sourceSettings = (
  options: MigrateOptions,
  ram: GuestRam.GuestRam["Type"],
  tracker: Status.Tracker
): Effect.Effect<Source.Settings, MigrationError.MigrationError | PageCodec.CodecError> =>
  Effect.gen(function*() {
    const problem = checkOptions(options, ram.pageSize)
    if (problem !== undefined) return yield* new MigrationError.MigrationError({ reason: "BadOptions", detail: problem })
    const compression = options.compression ?? "none"
    yield* PageCodec.checkLevel(compression, options.compressionLevel)
    yield* PageCodec.checkAvailable(compression)
    const maxBandwidth = options.maxBandwidth
    return {
      maxBandwidth: maxBandwidth === undefined || Bandwidth.isLimit(maxBandwidth)
        ? maxBandwidth
        : maxBandwidth === 0
        ? undefined
        : yield* Bandwidth.make(maxBandwidth),
      address: options.address,
      channels: options.channels ?? 2,
      compression,
      compressionLevel: options.compressionLevel,
      zeroPage: options.zeroPage ?? "multifd",
      timeouts: Transfer.resolveTimeouts(options.timeouts),
      upgrade: options.upgrade,
      onProgress: options.onProgress,
      live: options.live,
      tracker,
      reconnect: typeof options.reconnect === "number"
        ? { attempts: options.reconnect, within: Duration.seconds(10) }
        : { attempts: options.reconnect?.attempts ?? 3, within: options.reconnect?.within ?? Duration.seconds(10) }
    }
  })

const unsupported = (path: string, detail: string) => new Snapshot.SnapshotError({ reason: "Unsupported", path, detail })

/**
 * `migrate` to a `file:` address: `Snapshot.save` with the migration's channels, zero-page mode, live policy,
 * progress and peer timeout (as the stall timeout). Compression and TLS do not apply to a file.
 */
const saveToFile = (
  path: string,
  options: MigrateOptions,
  tracker: Status.Tracker,
  pageSize: number
): Effect.Effect<Snapshot.SaveResult, Snapshot.SnapshotError | MigrationError.MigrationError, GuestRam.GuestRam> =>
  Effect.gen(function*() {
    if ((options.compression ?? "none") !== "none") {
      return yield* unsupported(path, `compression ${options.compression} does not apply to a file: snapshot`)
    }
    if (options.upgrade !== undefined) return yield* unsupported(path, "TLS does not apply to a file: snapshot")
    // the peer timeout is the save's stall timeout: checked as a network migration checks it (the other options
    // that apply, Snapshot.save checks)
    const badTimeouts = Transfer.checkTimeouts(options.timeouts)
    if (badTimeouts !== undefined) {
      return yield* new MigrationError.MigrationError({ reason: "BadOptions", detail: badTimeouts })
    }
    if (options.maxBandwidth !== undefined && options.maxBandwidth !== 0) {
      return yield* unsupported(path, "a bandwidth limit does not apply to a file: snapshot (it limits the channels' sockets)")
    }
    yield* tracker.active
    return yield* SnapshotInternal.save(path, {
      channels: options.channels,
      zeroPage: options.zeroPage,
      live: options.live,
      onProgress: tracker.withProgress(options.onProgress, pageSize),
      stallTimeout: options.timeouts?.peer
    }, tracker)
  })

/**
 * Migrates the `GuestRam` in context to a destination listening at `options.address`, and returns once the
 * destination confirmed that its memory has the same digests. To a `file:` address it saves a snapshot file
 * (`Snapshot.save`; compression and TLS do not apply).
 *
 * @since 0.1.0
 * @category constructors
 */
export const migrate = (
  options: MigrateOptions
): Effect.Effect<Stats, MigrateError, Transport.Transport | GuestRam.GuestRam> =>
  Effect.gen(function*() {
    const ram = yield* GuestRam.GuestRam
    const badOptions = Inputs.checkOptions(options, false)
    if (badOptions !== undefined) return yield* new MigrationError.MigrationError({ reason: "BadOptions", detail: badOptions })
    const resolved = yield* MigrationConfig.resolve(options)
    const address = resolved.address
    // options of the wrong type, from plain JavaScript (no compiler checked them), are BadOptions before anything
    // connects: an address that is none (null, a URI string, a `_tag` of "tcp", an empty host: a `_tag` it did not
    // know was taken for Tcp and connected), a callback that is no function (the migration died on it once it
    // called it, connected by then), a status that is no handle, memory in context that is no GuestRam (defects)
    const badStatus = checkStatus(resolved.status)
    const bad = Memory.notGuestRam(ram, "the GuestRam in context") ?? badStatus ?? Transport.addressProblem(address) ??
      Inputs.checkCallback("onProgress", resolved.onProgress) ?? Inputs.checkCallback("upgrade", resolved.upgrade)
    return yield* observed("source", badStatus === undefined ? resolved.status : undefined, ram?.size ?? 0, (tracker): Effect.Effect<Stats, MigrateError, Transport.Transport | GuestRam.GuestRam> =>
      bad !== undefined
        ? Effect.fail(new MigrationError.MigrationError({ reason: "BadOptions", detail: bad }))
        // a file: address saves a snapshot instead (Snapshot: parallel writers at fixed offsets)
        : address._tag === "File"
        // a compression or bandwidth limit from the MigrationConfig in context (MULTIFD_COMPRESSION, ...) is a
        // default for migrations over sockets, where it applies; only one given here is refused for a file
        ? saveToFile(
          address.path,
          { ...resolved, compression: options.compression, maxBandwidth: options.maxBandwidth },
          tracker,
          ram.pageSize
        )
        : Effect.flatMap(sourceSettings(resolved, ram, tracker), Source.run)).pipe(
        Effect.withSpan("multifd.migrate", {
          attributes: { "multifd.address": spanAddress(address), "multifd.role": "source" }
        }),
        originalErrors
      )
  })

/** Why `status` is no `MigrationStatus` handle (`MigrationStatus.make`), if it is not (it was a defect). */
const checkStatus = (status: unknown): string | undefined =>
  status === undefined || (typeof status === "object" && status !== null && Status.TypeId in status)
    ? undefined
    : `status ${Inputs.describeInput(status)} is not a MigrationStatus handle (MigrationStatus.make)`

/**
 * Why the options of a destination that plain JavaScript may get wrong are unusable, if they are: memory given that
 * is no GuestRam, callbacks that are no functions, `expect` that is no object (each a defect, some once a source
 * had connected). The status, checked apart, is not one of them.
 */
const checkIncomingTypes = (options: IncomingOptions<unknown>): string | undefined =>
  (options.ram === undefined ? undefined : Memory.notGuestRam(options.ram, "ram")) ??
    Inputs.checkCallback("admit", options.admit) ?? Inputs.checkCallback("store", options.store) ??
    Inputs.checkCallback("onProgress", options.onProgress) ?? Inputs.checkCallback("upgrade", options.upgrade) ??
    Inputs.checkObject("expect", options.expect) ??
    // (listenAndReceive's own)
    Inputs.checkCallback("onListening", (options as { readonly onListening?: unknown }).onListening)

/** An address for a span's attribute, even one that is no address (`Transport.addressProblem`: BadOptions). */
const spanAddress = (address: Transport.Address): string =>
  Transport.addressProblem(address) === undefined ? Transport.formatAddress(address) : "(no address)"

/**
 * The errors as they were failed with: an error failed inside a span reaches the caller as Effect's stand-in
 * that carries the span (a `Proxy`); the caller gets the error itself (`Cause.originalError`), so that
 * `incoming` fails with the very error its `store` step failed with.
 */
const originalErrors = <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  Effect.mapErrorCause(self, (cause) => Cause.map(cause, Cause.originalError))

/** A `MigrationStatus` given to a migration while it follows another one that runs. */
const busyHandle = Effect.suspend(() =>
  new MigrationError.MigrationError({
    reason: "Busy",
    detail: "the MigrationStatus handle given follows another migration that is under way: one migration at a time per handle"
  })
)

/**
 * Runs one side of a migration with its status kept (`MigrationStatus`) and its outcome counted
 * (`MigrationMetrics`): the status's final values come from the migration's stats.
 */
const observed = <A extends Stats, E, R>(
  side: "source" | "destination",
  status: MigrationStatus.MigrationStatus | undefined,
  total: number,
  body: (tracker: Status.Tracker) => Effect.Effect<A, E, R>
): Effect.Effect<A, E | MigrationError.MigrationError, R> =>
  // its fibers its own to interrupt, even when the caller runs it uninterruptibly (a store step's commit)
  ownFibers(Status.track(status, total, (stats: A) => ({
    transferred: stats.wireBytes,
    total: stats.ramBytes,
    normal: stats.normalPages,
    duplicate: stats.zeroPages,
    rounds: stats.rounds,
    totalTimeMs: stats.durationMs,
    downtimeMs: stats.downtimeMs,
    mbps: Status.mbps(stats.wireBytes / Math.max(1, stats.durationMs) * 1000)
  }), busyHandle, body)).pipe(
    Effect.onExit((exit) =>
      Recorder.ended(
        side,
        exit,
        exit._tag === "Success"
          ? { downtimeMs: exit.value.downtimeMs, bandwidth: exit.value.wireBytes / Math.max(1, exit.value.durationMs) * 1000 }
          : undefined
      )
    )
  )

// ---------------------------------------------------------------------------------------------------------
// Destination

/**
 * Options of the destination; `E` is what its `store` step can fail with.
 *
 * @since 0.1.0
 * @category models
 */
export interface IncomingOptions<E = never> {
  /**
   * Memory to receive into: its layout must equal the source's. Without it, memory of the source's layout
   * is allocated, up to `maxRamBytes`. Pages are written as they arrive: a migration that fails after the hello
   * (a lost source, a digest mismatch, an interruption) leaves this memory partly overwritten — what it held
   * before is not kept; receive into fresh memory, or keep a copy, when it must survive a failed migration. Its
   * writers (`GuestRam.write` / `update`) wait from the source's admission until the memory verified (its write gate
   * closed, unless it was already), and go on after it, on the received memory, before the `store` step; a write from
   * inside this migration's own progress report meanwhile fails at once (`WriteBlocked`).
   */
  readonly ram?: GuestRam.GuestRam["Type"] | undefined
  /**
   * Largest total memory a source may ask for when `ram` is not given (default 16 GiB; `Infinity`: no limit): its
   * blocks and, with zstd, its channels' decompression windows (up to 32 MiB a channel, whatever the blocks).
   * Anything but a number >= 0 fails `incoming` with a `MigrationError` of reason `BadOptions` before it accepts.
   * Whatever the limit, memory that is more than the machine has available (`process.availableMemory()`) is
   * refused too: it is touched before pages arrive (`GuestRam.make`), and would end in the out-of-memory killer.
   */
  readonly maxRamBytes?: number | undefined
  readonly timeouts?: Partial<Timeouts> | undefined
  /** How long to wait for a source to connect at all (default, and `Infinity`: for ever). */
  readonly acceptTimeout?: Duration.DurationInput | undefined
  /** Secures every accepted connection (TLS server side) before it is classified. */
  readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
  /**
   * Settings the source must use, else its hello is refused with the reason (the source fails with
   * `Rejected`, nothing is written here). Unset fields follow the source. A `file:` address holds the
   * snapshot to them (channels: the writers that saved it) before reading it.
   */
  readonly expect?: Expectations | undefined
  /**
   * The destination's last word on a proposal that passed its own checks: a reason to refuse it (the source
   * fails with `Rejected` and that reason; nothing is allocated or written here), or `undefined` to take it.
   * `multifd recv` refuses memory larger than the free space where `--out` goes. A `file:` address asks it
   * about the snapshot's memory (`Snapshot.RestoreOptions.admit`).
   */
  readonly admit?: ((proposal: Proposal) => string | undefined) | undefined
  /**
   * Called about ten times a second while pages arrive (`doneBytes` counts pages received), in a fiber of its
   * own, and once more, counting every page, after a success (the source has been told `Done` by then: it is
   * not kept paused waiting for the callback; that last one is given the peer timeout to return, then logged and
   * left behind). A callback that fails or dies never fails the migration, on
   * either side: it is logged as a warning (the first periodic failure ends the periodic reports). What must
   * decide whether the migration succeeded belongs in `store`.
   */
  readonly onProgress?: ((progress: Progress) => Effect.Effect<void>) | undefined
  /**
   * Puts the received memory durably where it belongs (writes, syncs and renames an image file, say). It runs
   * once the digests matched and before the destination confirms (`Done`), so the source reports success
   * only once it succeeded; meanwhile the destination tells the source about every second that it is still
   * storing. If it fails, the source is told the reason (it fails with "the destination could not store the
   * image: ...") and `incoming` fails with its error. Without it, `Done` means "verified in memory".
   *
   * A step with a point of no return (a rename over an older image) runs it through `commit`: uninterruptibly,
   * and once it succeeded the source is told `Done` even if the destination is interrupted meanwhile (the
   * interruption then goes on), so that the two sides never disagree about memory that was stored. The rest
   * of the step stays interruptible. The step may save the memory (`Snapshot.save`) or migrate it on, one at a
   * time, even into memory given (`ram`), which everyone else finds `Busy` until `incoming` returns. A save or
   * migration the step started and did not wait for (forked) keeps the memory held until it ends: `incoming`
   * returns after it (interrupted, or failing, it interrupts it first).
   */
  readonly store?: ((ram: GuestRam.GuestRam["Type"], commit: Commit) => Effect.Effect<void, E>) | undefined
  /** Kept up to date with this migration's status (`MigrationStatus.make`), for anyone to read at any moment. */
  readonly status?: MigrationStatus.MigrationStatus | undefined
}

/**
 * What the destination received.
 *
 * @since 0.1.0
 * @category models
 */
export interface Incoming {
  readonly ram: GuestRam.GuestRam["Type"]
  readonly stats: Stats
  /** Connections that were turned away (strangers, foreign uuids), each with the reason. */
  readonly rejected: ReadonlyArray<string>
}

/**
 * Everything a destination can fail with.
 *
 * @since 0.1.0
 * @category errors
 */
export type IncomingError =
  | MultifdRecv.ChannelFailure
  | Transport.UpgradeError
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | GuestRam.GuestRamError
  | Snapshot.SnapshotError

/**
 * What a source proposes in its hello, as `IncomingOptions.admit` sees it.
 *
 * @since 0.1.0
 * @category models
 */
export interface Proposal {
  /** The memory's size: every block's bytes. */
  readonly ramBytes: number
  readonly blocks: ReadonlyArray<GuestRam.BlockLayout>
  readonly pageSize: number
  readonly channels: number
  readonly compression: Protocol.Compression
}

/**
 * Transfer settings a destination may insist on (see `IncomingOptions.expect`).
 *
 * @since 0.1.0
 * @category models
 */
export interface Expectations {
  readonly channels?: number | undefined
  readonly pageSize?: number | undefined
  readonly compression?: Protocol.Compression | undefined
  readonly zeroPage?: "multifd" | "none" | undefined
}

/**
 * Receives one migration on `listener`. Every accepted connection is a candidate until it proves itself
 * within the handshake timeout: a main channel by the control magic and a complete hello (the first one
 * wins; a later one is refused, "a migration is already in progress"), a multifd channel by a complete init
 * packet of this migration. Candidates that do not — strangers, connections that stall, close half-way or
 * send garbage, channels of other migrations — are closed, logged and reported in `rejected`, without
 * disturbing the migration. Returns once every page is in memory, the digests matched, `store` (if given)
 * succeeded and every channel ended, the main channel last (the source ends it once it heard `Done`: a source that
 * gave up before, say its `Done` lost on the way, and resumed its writers, fails this side too). Interrupted before it confirmed, it tells the source ("cancelled by
 * destination"). A listener receives one migration at a time: `incoming` on a listener another `incoming` is
 * using fails `Busy` at once.
 *
 * @since 0.1.0
 * @category constructors
 */
export const incoming = <E = never>(
  listener: Transport.Listener,
  options: IncomingOptions<E> = {}
): Effect.Effect<Incoming, IncomingError | E, never> => {
  const notListener = Inputs.checkListener(listener)
  return receive(
    (listener as Transport.Listener | null | undefined)?.address as Transport.Address,
    notListener === undefined
      ? Effect.succeed(listener)
      : Effect.fail(new MigrationError.MigrationError({ reason: "BadOptions", detail: notListener })),
    options,
    false
  )
}

/**
 * A migration into memory given, run as the only one on it (`Memory.exclusively`): its pages are written past the
 * memory's gate and dirty log, so no migration or save of it may run meanwhile (`Busy`).
 */
const into = <A, E, R>(
  ram: GuestRam.GuestRam["Type"] | undefined,
  self: Effect.Effect<A, E, R>
): Effect.Effect<A, E | MigrationError.MigrationError, R> =>
  ram === undefined ? self : Precopy.exclusive(ram, self)

/**
 * The first expectation no source can meet (a channel count, page size, method or zero-page mode that does not
 * exist), described: every source would be refused, and the destination would wait for ever.
 */
const checkExpectations = (expect: Expectations | undefined): string | undefined => {
  if (expect === undefined) return undefined
  const { channels, compression, pageSize, zeroPage } = expect
  return (channels === undefined ? undefined : Protocol.checkChannels(channels, "expect.channels")) ??
    (pageSize === undefined ? undefined : Protocol.checkPageSize(pageSize, "expect.pageSize")) ??
    (compression === undefined || Protocol.compressions.includes(compression)
      ? undefined
      : `expect.compression ${JSON.stringify(compression)} is not one of ${Protocol.compressions.join(", ")}`) ??
    (zeroPage === undefined || zeroPage === "multifd" || zeroPage === "none"
      ? undefined
      : `expect.zeroPage ${JSON.stringify(zeroPage)} is not multifd or none`)
}

/**
 * `incoming` on the listener `listening` gives (`listenAndReceive`: listening at its address, in this receive's
 * scope), at `address`; `exclusive`: the listener serves this migration alone (see `Destination.Settings`). The
 * status follows it all: options it cannot use and a listener it cannot have fail it too (they left it in setup).
 */
const receive = <E, E2, R>(
  address: Transport.Address,
  listening: Effect.Effect<Transport.Listener, E2, R | Scope.Scope>,
  options: IncomingOptions<E>,
  exclusive: boolean
): Effect.Effect<Incoming, IncomingError | E | E2, Exclude<R, Scope.Scope>> =>
  givenOptions(options, Effect.flatMap(MigrationConfig.resolve(options), (options) =>
    Effect.map(
      observed("destination", checkStatus(options.status) === undefined ? options.status : undefined, options.ram?.size ?? 0, (tracker) =>
        Effect.gen(function*() {
          const problem = checkStatus(options.status) ?? checkIncomingTypes(options) ??
            Transfer.checkMaxRam(options.maxRamBytes) ?? Transfer.checkTimeouts(options.timeouts) ??
            Transfer.checkAcceptTimeout(options.acceptTimeout) ?? checkExpectations(options.expect)
          if (problem !== undefined) {
            return yield* new MigrationError.MigrationError({ reason: "BadOptions", detail: problem })
          }
          // memory given that another migration, save or restore holds is Busy before anything listens (a listener
          // made, and `onListening` told, for a receive that cannot happen)
          const received = yield* into(options.ram, Effect.flatMap(listening, (listener) => Destination.run(listener, {
            ram: options.ram,
            maxRamBytes: options.maxRamBytes ?? DEFAULT_MAX_RAM,
            timeouts: Transfer.resolveTimeouts(options.timeouts),
            acceptTimeout: options.acceptTimeout,
            upgrade: options.upgrade,
            expect: options.expect,
            admit: options.admit,
            onProgress: options.onProgress,
            store: options.store,
            tracker,
            exclusive
          })))
          return { ...received.stats, received }
        }).pipe(Effect.scoped)),
      ({ received }) => received
    ).pipe(
      Effect.withSpan("multifd.incoming", {
        attributes: { "multifd.address": spanAddress(address), "multifd.role": "destination" }
      }),
      originalErrors
    )))

/**
 * `self`, unless the options it was given are none as a whole (`null`, from plain JavaScript: it was a defect,
 * "Cannot read properties of null"): then BadOptions. (`self` reads them only once it runs.)
 */
const givenOptions = <A, E, R>(
  options: unknown,
  self: Effect.Effect<A, E, R>
): Effect.Effect<A, E | MigrationError.MigrationError, R> => {
  const problem = Inputs.checkOptions(options, true)
  return problem === undefined ? self : Effect.fail(new MigrationError.MigrationError({ reason: "BadOptions", detail: problem }))
}

/**
 * `listenAndReceive` from a `file:` address: `Snapshot.restore` with the destination's memory options, then `store`
 * (no source to tell: its commit is just uninterruptible). The status follows both: a restore whose store step
 * failed is `failed`, as a migration's (it said `completed` while `listenAndReceive` failed with the step's error).
 */
const restoreFromFile = <E>(
  path: string,
  options: IncomingOptions<E>
): Effect.Effect<Incoming, Snapshot.SnapshotError | MigrationError.MigrationError | E> =>
  Effect.map(
    observed("destination", checkStatus(options.status) === undefined ? options.status : undefined, options.ram?.size ?? 0, (tracker) =>
      Effect.zipRight(
        Effect.suspend((): Effect.Effect<void, Snapshot.SnapshotError | MigrationError.MigrationError> => {
          if (options.upgrade !== undefined) return Effect.fail(unsupported(path, "TLS does not apply to a file: snapshot"))
          const problem = checkStatus(options.status) ?? checkIncomingTypes(options) ?? checkExpectations(options.expect)
          return problem === undefined
            ? tracker.active
            : Effect.fail(new MigrationError.MigrationError({ reason: "BadOptions", detail: problem }))
        }),
        Effect.tap(
          SnapshotInternal.restore(path, {
            ram: options.ram,
            maxRamBytes: options.maxRamBytes,
            // a snapshot is a proposal too (its pages stored as they are): expectations and admit, before a
            // page is read
            admit: (snapshot) => {
              const proposal: Proposal = { ...snapshot, compression: "none" }
              const unmet = options.expect && Destination.unmet(proposal, options.expect, "it was saved with")
              return unmet ?? options.admit?.(proposal)
            },
            onProgress: tracker.withProgress(options.onProgress, options.ram?.pageSize ?? 0)
          }, tracker),
          ({ ram }) => options.store === undefined ? Effect.void : Effect.suspend(() => options.store!(ram, Effect.uninterruptible))
        ).pipe(Effect.map(({ ram, stats }) => ({ ...stats, received: { ram, stats, rejected: [] } })))
      )),
    ({ received }) => received
  )

/**
 * A store step's point of no return (`IncomingOptions.store`): runs `effect` uninterruptibly and, once it
 * succeeded, counts the memory as stored.
 *
 * @since 0.1.0
 * @category models
 */
export type Commit = <A, E, R>(effect: Effect.Effect<A, E, R>) => Effect.Effect<A, E, R>

/**
 * Listens at `address` and receives one migration there (a convenience over `Transport.listen` + `incoming`;
 * the listener being this migration's alone, a source that connects while it runs is refused at once, "a
 * migration is already in progress", where `incoming` leaves it queued for the listener's next migration).
 * A `file:` address restores that snapshot file instead (`Snapshot.restore`; `onListening` is not called),
 * then runs `store`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const listenAndReceive = <E = never>(
  address: Transport.Address,
  options: IncomingOptions<E> & { readonly onListening?: ((address: Transport.Address) => Effect.Effect<void>) | undefined } = {}
): Effect.Effect<Incoming, IncomingError | Transport.TransportError | E, Transport.Transport> =>
  // an address that is none (plain JavaScript: null, a URI string, a `_tag` of "unix", an empty host): BadOptions
  // before anything listens, the status following it as it follows options it cannot use
  Transport.addressProblem(address) !== undefined
    ? receive(
      address,
      Effect.fail(
        new MigrationError.MigrationError({ reason: "BadOptions", detail: Transport.addressProblem(address)! })
      ),
      options,
      true
    ) :
    address._tag === "File"
    ? givenOptions(options, Effect.flatMap(MigrationConfig.resolve(options), (options) => restoreFromFile(address.path, options))) :
  // the listener is this migration's alone: a later source is refused at once, not left waiting
  receive(
    address,
    Effect.gen(function*() {
      const transport = yield* Transport.Transport
      const listener = yield* transport.listen(address)
      // (one that returns no Effect, an async function's Promise, fails CallbackFailed saying so: it was a defect)
      const onListening = options.onListening
      if (onListening) yield* Inputs.callback("onListening", () => onListening(listener.address), false)
      return listener
    }),
    options,
    true
  )

// ---------------------------------------------------------------------------------------------------------
// As a stream

/**
 * What `migrateStream` emits: progress while the migration runs, then its stats.
 *
 * @since 0.1.0
 * @category models
 */
export type Event =
  | ({ readonly _tag: "Progress" } & Progress)
  | { readonly _tag: "Completed"; readonly stats: Stats }

/**
 * `migrate` as a stream of events: `Progress` reports (the latest 64 are kept for a slow consumer), then
 * `Completed` with the stats; the stream fails with the migration's error. Interrupting the stream cancels
 * the migration.
 *
 * @since 0.1.0
 * @category constructors
 */
export const migrateStream = (
  options: Omit<MigrateOptions, "onProgress">
): Stream.Stream<Event, MigrateError, Transport.Transport | GuestRam.GuestRam> =>
  Stream.asyncScoped<Event, MigrateError, Transport.Transport | GuestRam.GuestRam>(
    (emit) =>
      migrate({
        ...options,
        onProgress: (progress) => Effect.promise(() => emit.single({ _tag: "Progress", ...progress }))
      }).pipe(
        Effect.matchCauseEffect({
          onSuccess: (stats) => Effect.promise(() => emit.single({ _tag: "Completed", stats }).then(() => emit.end())),
          onFailure: (cause) => Effect.promise(() => emit.halt(cause))
        }),
        Effect.forkScoped
      ),
    { bufferSize: 64, strategy: "sliding" }
  )
