/**
 * The pre-copy loop shared by every kind of destination: round 0 hands every page to a sink, each later
 * round the pages written meanwhile, until the rest fits the downtime limit at the bandwidth measured; then
 * the write gate closes and the last round runs with writers paused.
 *
 * @internal
 */
import * as Clock from "effect/Clock"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Option from "effect/Option"
import type * as Scope from "effect/Scope"
import * as Bandwidth from "../Bandwidth.js"
import * as GuestRam from "../GuestRam.js"
import * as MigrationError from "../MigrationError.js"
import * as Transfer from "../Transfer.js"
import * as DirtyLog from "./native/dirtyLog.js"
import * as WriteGate from "./native/writeGate.js"
import { unlessStalled, within } from "./stall.js"
import * as Inputs from "./inputs.js"
import * as Memory from "./memory.js"

/** Where pages go: a channel set, or a snapshot file's writers. */
export interface Sink<E> {
  /** Pages per batch, at most. */
  readonly slots: number
  /**
   * Spreads a small round over the sink's `workers` (channels): batches shrink, in whole `unit`s (a
   * packet's pages), until every worker gets one. Without it every batch is `slots` pages.
   */
  readonly spread?: { readonly workers: number; readonly unit: number } | undefined
  /** Hands a batch of pages of one block to the sink; waits while it is busy. */
  readonly send: (block: GuestRam.Block, pages: Uint32Array, count: number) => Effect.Effect<void, E>
  /** Completes once every page handed over so far is on its way (the round's barrier). */
  readonly sync: Effect.Effect<void, E>
  /** Fails with the sink's first failure. */
  readonly failure: Effect.Effect<never, E>
  /**
   * A counter that grows while pages move (bytes that really left: handed to the kernel, written to the
   * file): the stall detector and the bandwidth.
   */
  readonly progress: Effect.Effect<number>
  /**
   * Another counter that grows while pages move, if the sink has one: the bytes the destination says
   * arrived. The stall detector counts either's growth (the kernels' buffers may hide this side's writes
   * from it for seconds on a slow link); the bandwidth counts only `progress`.
   */
  readonly heard?: Effect.Effect<number> | undefined
  /**
   * Pages sent so far in all rounds (their packets accepted by the sockets), if the sink can tell: the
   * progress reports count them. Without it they count the pages handed to the sink.
   */
  readonly pagesSent?: Effect.Effect<number> | undefined
  /**
   * Where sending stopped, for the message of a round that made no progress for the stall timeout, if the sink can
   * tell: the bytes written that its peer has not taken (a peer that reads nothing, a dead path), and who that is.
   * `undefined` when nothing waits on the peer.
   */
  readonly stalled?: Effect.Effect<string | undefined> | undefined
}

/** A round as it starts (its pages chosen) and as it ends (flushed: the destination has its pages). */
export interface Round {
  readonly round: number
  readonly phase: Transfer.Phase
  /** Pages the round sends. */
  readonly pages: number
  /** When it started (clock milliseconds). */
  readonly startedAt: number
  /** Bytes per second the round moved (at its end; at its start the previous round's, 0 before one ended). */
  readonly bandwidth: number
}

/** Someone who wants to know about rounds (the status and the metrics). */
export interface Observer {
  readonly started: (round: Round) => Effect.Effect<void>
  readonly ended: (round: Round) => Effect.Effect<void>
}

/** Pages of one block to send in a round. */
interface Selection {
  readonly block: GuestRam.Block
  readonly pages: Uint32Array
}

const allPages = (ram: GuestRam.GuestRam["Type"]): ReadonlyArray<Selection> =>
  ram.blocks.map((block) => ({ block, pages: Uint32Array.from({ length: block.pages }, (_, i) => i) }))

/** Takes (reads and clears) every block's dirty log. */
const takeDirty = (ram: GuestRam.GuestRam["Type"]): ReadonlyArray<Selection> =>
  ram.blocks.map((block) => {
    const bits = block.dirty.take()
    const pages: Array<number> = []
    DirtyLog.forEachPage(bits, (page) => pages.push(page))
    return { block, pages: Uint32Array.from(pages) }
  })

/**
 * The downtime a switch-over would take to send `bytes` at `bandwidth` (bytes a second): none when nothing is
 * left, unknown (Infinity) when nothing was measured. A round that moved no bytes (every page zero, to a
 * snapshot file that stores none) measures no bandwidth, and Infinity for nothing left kept an idle memory
 * from converging: a save of an all-zero image failed NotConverged with "0 pages still dirty".
 */
const downtimeMs = (bytes: number, bandwidth: number): number =>
  bytes === 0 ? 0 : bandwidth > 0 ? bytes / bandwidth * 1000 : Infinity

/**
 * A measured rate for a message, in the unit that fits it: in GiB/s with two decimals, a link held back by a bandwidth
 * limit (a few MiB/s, which is what keeps a migration from converging) read "0.00 GiB/s" beside a downtime of
 * seconds.
 */
/**
 * Milliseconds for a message: whole ones, or two significant digits below one (a page or two at a fast link
 * read "about 0 ms of downtime, more than the limit of 0").
 */
const msOf = (ms: number): string => ms >= 1 || ms === 0 || !Number.isFinite(ms) ? ms.toFixed(0) : String(Number(ms.toPrecision(2)))

const rateOf = (bytesPerSecond: number): string =>
  bytesPerSecond > 0 ? Bandwidth.format(bytesPerSecond) : "no rate measured (nothing moved)"

/** The progress report, as a message names it. */
const REPORT = "the progress report (onProgress)"

/** What a round's stall watch says when nothing moved for the stall timeout. */
const STALLED = "without progress sending pages"

/** What a transfer waits for while its progress report runs. */
const REPORT_WAIT = "waiting for the progress report (onProgress) to return"

const resolveLive = (live: Transfer.LiveOptions | undefined) => ({
  downtimeLimit: Duration.decode(live?.downtimeLimit ?? Duration.millis(300)),
  maxRounds: live?.maxRounds ?? 30,
  maxDuration: Duration.decode(live?.maxDuration ?? Duration.minutes(10)),
  onNoConvergence: live?.onNoConvergence ?? "fail"
})

/**
 * `Memory.exclusively` for a migration or a save of `ram`, or a migration into it: while another runs, fails
 * `Busy`; memory that is no longer all there (a detached buffer) is `BadOptions`.
 */
export const exclusive = <A, E, R>(
  ram: GuestRam.GuestRam["Type"],
  self: Effect.Effect<A, E, R>
): Effect.Effect<A, E | MigrationError.MigrationError, R> =>
  Memory.exclusively(
    ram,
    self,
    (detail) => new MigrationError.MigrationError({ reason: "Busy", detail }),
    (detail) => new MigrationError.MigrationError({ reason: "BadOptions", detail })
  )

/**
 * Runs the rounds. The write gate is closed in the caller's scope: it stays closed when the scope closes
 * successfully (the destination owns the memory now) and opens again on failure or interruption, unless it was
 * closed already when the switch-over began (then it stays as the application left it).
 */
export const run = <E, F>(
  ram: GuestRam.GuestRam["Type"],
  options: {
    readonly sink: Sink<E>
    /** When the migration started (for `maxDuration`). */
    readonly started: number
    readonly live: Transfer.LiveOptions | undefined
    /** Fail when the sink makes no progress for this long. */
    readonly stallTimeout: Duration.DurationInput
    readonly onProgress: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
    /** Ends a round once its pages are synced (the destination's acknowledgement); `final` for the last. */
    readonly flush: (round: number, final: boolean) => Effect.Effect<void, F>
    /** Told as each round starts and ends. */
    readonly observe?: Observer | undefined
  }
): Effect.Effect<
  {
    readonly pagesPerRound: ReadonlyArray<number>
    readonly pausedAt: number
    /**
     * Reports, once every page is sent, what the transfer waits for (the source's destination verifying or storing):
     * the switch-over round's numbers, every page sent, with `destination` (nothing without `onProgress`).
     */
    readonly waiting: (wait: Transfer.DestinationWait) => Effect.Effect<void, MigrationError.MigrationError>
  },
  E | F | MigrationError.MigrationError,
  Scope.Scope
> =>
  Effect.gen(function*() {
    const { sink } = options
    const pageSize = ram.pageSize
    // a report runs as the gate's: a write from inside it while the gate is closed (the switch-over) fails at once
    // rather than wait for this migration, which waits for the report
    const onProgress = options.onProgress
    const self = WriteGate.holder()
    // the transfer waits for each report: one that does not return within the stall timeout fails it, saying so (a
    // save whose callback hung failed "without progress sending pages", and one at a round's start waited for good)
    let reporting = false
    // the last report (its rate is the one `waiting` repeats)
    let lastReport: Transfer.Progress | undefined
    const report = onProgress === undefined
      ? () => Effect.void
      : (progress: Transfer.Progress) =>
        Effect.suspend(() => {
          reporting = true
          lastReport = progress
          // (a callback that throws, dies, fails or returns no Effect, from plain JavaScript, fails CallbackFailed
          // naming it, where it was a defect with a stack trace: "Not a valid effect: {}" of an async function)
          return ram.gate.reporting(self, Inputs.callback(REPORT, () => onProgress(progress), true))
        }).pipe(
          within(options.stallTimeout, REPORT_WAIT),
          Effect.ensuring(Effect.sync(() => {
            reporting = false
          }))
        )
    const live = resolveLive(options.live)

    const runRound = (round: number, phase: Transfer.Phase, selection: ReadonlyArray<Selection>, bandwidth: number) =>
      Effect.gen(function*() {
        const totalPages = selection.reduce((n, s) => n + s.pages.length, 0)
        const totalBytes = totalPages * pageSize
        const spread = sink.spread
        const batch = spread === undefined
          ? sink.slots
          : Math.min(sink.slots, Math.max(1, Math.ceil(totalPages / spread.workers / spread.unit)) * spread.unit)
        const startedAt = yield* Clock.currentTimeMillis
        if (options.observe !== undefined) {
          yield* options.observe.started({ round, phase, pages: totalPages, startedAt, bandwidth })
        }
        const bytesBefore = yield* sink.progress
        const pagesBefore = sink.pagesSent === undefined ? 0 : yield* sink.pagesSent
        let handedPages = 0
        let reportedBytes = 0
        /**
         * What is known now: the round's pages sent (accepted by the sockets, or handed over when the sink
         * cannot tell), the rate of the round so far (the previous round's until it can be measured), and the
         * pages a switch-over now would still have to send — this round's not yet sent and those written
         * since it began (a page in both counts twice) — at that rate.
         */
        const current = (ended: boolean) => Effect.gen(function*() {
          const sentPages = ended
            ? totalPages
            : sink.pagesSent === undefined
            ? handedPages
            : (yield* sink.pagesSent) - pagesBefore
          const doneBytes = Math.min(totalBytes, sentPages * pageSize)
          const elapsed = (yield* Clock.currentTimeMillis) - startedAt
          const moved = (yield* sink.progress) - bytesBefore
          const rate = elapsed > 0 && moved > 0 ? moved / elapsed * 1000 : bandwidth
          const dirtyPages = totalPages - doneBytes / pageSize + GuestRam.dirtyPages(ram)
          const expectedDowntimeMs = downtimeMs(dirtyPages * pageSize, rate)
          return { round, phase, doneBytes, totalBytes, dirtyPages, bandwidth: rate, expectedDowntimeMs }
        })
        // a report when the pages sent moved on: a round's only report with doneBytes 0 is its first
        const reportMoved = Effect.gen(function*() {
          const now = yield* current(false)
          if (now.doneBytes > reportedBytes) {
            reportedBytes = now.doneBytes
            yield* report(now)
          }
        })
        /**
         * `wait` (a hand-off that waits for an idle channel, the round's sync), reporting meanwhile, about ten times
         * a second (`Transfer.REPORT_INTERVAL`), as the pages sent move on. Reported only after each hand-off, a
         * round's last hand-offs (a channel's batch is up to 16 MiB: a whole round of memory smaller than that per
         * channel) went out unreported: on a slow link or under a bandwidth limit the command's bar sat at 0 % until
         * the round ended, and its lines every 5 s never came.
         */
        const reportingMeanwhile = <A, X>(wait: Effect.Effect<A, X>) =>
          options.onProgress === undefined ? wait : Effect.flatMap(Effect.fork(wait), (waiting) =>
            Effect.gen(function*() {
              for (;;) {
                const ended = yield* Effect.timeoutOption(Fiber.await(waiting), Transfer.REPORT_INTERVAL)
                if (Option.isSome(ended)) return yield* Fiber.join(waiting)
                yield* reportMoved
              }
            }).pipe(
              // interrupted (the migration failed, a report timed out): the wait is interrupted too, and awaited,
              // as it was when it ran in this fiber
              Effect.ensuring(Fiber.interrupt(waiting))
            ))
        const transfer = Effect.gen(function*() {
          for (const { block, pages } of selection) {
            for (let first = 0; first < pages.length; first += batch) {
              const some = pages.subarray(first, first + batch)
              yield* reportingMeanwhile(sink.send(block, some, some.length))
              handedPages += some.length
              if (options.onProgress !== undefined) yield* reportMoved
            }
          }
          yield* reportingMeanwhile(sink.sync)
        })
        // the stall watch's own timeout (not a report's): said with where sending stopped, when the sink can tell
        const stalledAt = sink.stalled === undefined
          ? Effect.succeed(STALLED)
          : Effect.map(sink.stalled, (where) => where === undefined ? STALLED : `${STALLED} (${where})`)
        yield* unlessStalled(
          Effect.raceFirst(transfer, sink.failure),
          sink.heard === undefined ? sink.progress : Effect.zipWith(sink.progress, sink.heard, (sent, heard) => sent + heard),
          options.stallTimeout,
          Effect.suspend(() => reporting ? Effect.succeed(REPORT_WAIT) : stalledAt)
        )
        yield* options.flush(round, phase === "switchover")
        // the destination has every page of the round: the last report of a round says all of it
        if (options.onProgress !== undefined && totalBytes > reportedBytes) yield* report(yield* current(true))
        if (options.observe !== undefined) {
          const ended = yield* current(true)
          yield* options.observe.ended({ round, phase, pages: totalPages, startedAt, bandwidth: ended.bandwidth })
        }
        return totalPages
      }).pipe(Effect.withSpan("multifd.round", { attributes: { "multifd.round": round, "multifd.phase": phase } }))

    const pagesPerRound: Array<number> = []
    let bandwidth = 0
    for (const block of ram.blocks) block.dirty.take() // start the dirty log: round 0 covers everything
    for (let round = 0;; round++) {
      const dirty = round === 0 ? ram.size / pageSize : GuestRam.dirtyPages(ram)
      const expectedDowntimeMs = downtimeMs(dirty * pageSize, bandwidth)
      if (round > 0 && expectedDowntimeMs <= Duration.toMillis(live.downtimeLimit)) break
      const elapsed = (yield* Clock.currentTimeMillis) - options.started
      // round 0 (every page) always runs: a switch-over without it would leave the destination incomplete
      if (round > 0 && (round >= live.maxRounds || elapsed >= Duration.toMillis(live.maxDuration))) {
        if (live.onNoConvergence === "switchover") break
        return yield* new MigrationError.MigrationError({
          reason: "NotConverged",
          detail: `the migration did not converge after ${round} rounds in ${(elapsed / 1000).toFixed(1)} s: ` +
            `${dirty} pages still dirty, about ${msOf(expectedDowntimeMs)} ms of downtime at ` +
            `${rateOf(bandwidth)}, more than the limit of ${Duration.format(live.downtimeLimit)}`
        })
      }
      yield* report({
        round,
        phase: "precopy",
        doneBytes: 0,
        totalBytes: dirty * pageSize,
        dirtyPages: dirty,
        bandwidth,
        expectedDowntimeMs
      })
      const roundStart = yield* Clock.currentTimeMillis
      const bytesBefore = yield* sink.progress
      pagesPerRound.push(yield* runRound(round, "precopy", round === 0 ? allPages(ram) : takeDirty(ram), bandwidth))
      const roundMs = Math.max(1, (yield* Clock.currentTimeMillis) - roundStart)
      const moved = (yield* sink.progress) - bytesBefore
      // a round that moved nothing (every page of it zero, to a snapshot file that stores none) measured no rate:
      // the last one measured stands (a writer clearing a page a round kept a save "about Infinity ms" from its
      // switch-over, round after round, until NotConverged)
      if (moved > 0) bandwidth = moved / roundMs * 1000
    }

    // switch-over: writers wait at the gate while the last dirty pages go out
    const pausedAt = yield* Clock.currentTimeMillis
    // a gate found closed (by the application, or kept closed by an earlier successful migration) is not this
    // migration's to open: it opens on failure only the gate it closed itself
    yield* Effect.acquireRelease(
      ram.gate.closing,
      (closedHere, exit) => closedHere && Exit.isFailure(exit) ? ram.gate.open : Effect.void
    )
    // this transfer's reports may not wait at the gate now: it waits for them (released first, before the gate opens)
    yield* Effect.acquireRelease(ram.gate.holding(self), (release) => release)
    const last = pagesPerRound.length
    pagesPerRound.push(yield* runRound(last, "switchover", takeDirty(ram), bandwidth))
    // the switch-over round's numbers, every page of it sent (a round of no pages reports none of its own)
    const lastBytes = pagesPerRound[last]! * pageSize
    const waiting = (wait: Transfer.DestinationWait): Effect.Effect<void, MigrationError.MigrationError> =>
      report({
        round: last,
        phase: "switchover",
        doneBytes: lastBytes,
        totalBytes: lastBytes,
        dirtyPages: 0,
        bandwidth: lastReport?.round === last ? lastReport.bandwidth : bandwidth,
        expectedDowntimeMs: 0,
        destination: wait
      })
    return { pagesPerRound, pausedAt, waiting }
  })
