/**
 * The implementation of `MigrationStatus`: the handle, and the tracker a running migration keeps it with. The
 * handle holds the last values a migration published (at each change of status, progress report and round)
 * and, while the migration runs, a probe of its live counters (the channel sets' plain counters, read through
 * their `stats`): `get` merges both and the clock, so a snapshot is current whenever it is asked for, and the
 * migration does nothing per packet for it.
 *
 * @internal
 */
import * as Cause from "effect/Cause"
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Stream from "effect/Stream"
import * as SubscriptionRef from "effect/SubscriptionRef"
import type * as Transfer from "../Transfer.js"

/** Where a migration is, as QEMU's `query-migrate` says it. */
export type Status = "setup" | "active" | "completed" | "failed" | "cancelled"

/** A migration's state at one moment, with the fields of QEMU's `query-migrate`. */
export interface Snapshot {
  readonly status: Status
  /**
   * Milliseconds spent in `setup`: the source from connecting until every channel is established, the
   * destination from the source's hello until every channel is adopted (so far, while in `setup`).
   */
  readonly setupTimeMs: number
  /** Milliseconds since the migration started (the source: connecting; the destination: the hello), or in all. */
  readonly totalTimeMs: number
  /**
   * Bytes on the multifd channels so far (the source: accepted by the sockets; the destination: received); of a
   * `file:` snapshot, pages written to it (a save) or read from it (a restore).
   */
  readonly transferred: number
  /**
   * Bytes of memory still to send: the source's dirty pages (this round's not yet sent and those written since
   * it began); the destination's pages not yet received once (a restore: not yet read). 0 once completed.
   */
  readonly remaining: number
  /** Bytes of guest memory. */
  readonly total: number
  /** Zero pages (sent as offsets only). */
  readonly duplicate: number
  /** Normal pages (sent with their bytes). */
  readonly normal: number
  /**
   * Megabits per second on the wire: the source's current round (the previous one's at a round's start), the
   * destination's average since it became active; once completed, the whole migration's average.
   */
  readonly mbps: number
  /** Pages written per second while the previous round was sent (the source; 0 on the destination). */
  readonly dirtyPagesRate: number
  /** Downtime a switch-over now would take, at `mbps` (the source; 0 while unknown and on the destination). */
  readonly expectedDowntimeMs: number
  /** Writers paused (the source): so far during the switch-over, in all once completed; else 0. */
  readonly downtimeMs: number
  /** Rounds the destination acknowledged (the source) or whose flush arrived (the destination). */
  readonly rounds: number
  readonly phase: Transfer.Phase
  /** What failed (status `failed` only). */
  readonly error?: string | undefined
}

/** @internal */
export const TypeId: unique symbol = Symbol.for("effect-multifd/MigrationStatus")

/** @internal */
export type TypeId = typeof TypeId

/** A handle on a migration's status. */
export interface MigrationStatus {
  readonly [TypeId]: TypeId
  /** The snapshot now (live counters while the migration runs). */
  readonly get: Effect.Effect<Snapshot>
  /**
   * Snapshots as the migration publishes them, starting with the current one: each change of status, each
   * progress report and round, ending with the migration's final one (`completed`, `failed` or `cancelled`), as
   * `await` returns it: a stream run beside a migration ends with it. Run once the migration ended (and before a
   * later one given this handle starts), it is that final snapshot alone. (`get` is fresher: it also reads the live
   * counters.)
   */
  readonly changes: Stream.Stream<Snapshot>
  /** Waits for the migration's end: the snapshot with status `completed`, `failed` or `cancelled`. */
  readonly await: Effect.Effect<Snapshot>
}

/** What the handle keeps. */
interface State {
  /** Last published values (times are computed from `startedAt` / `activeAt` while it runs). */
  readonly snapshot: Snapshot
  readonly startedAt: number | undefined
  readonly activeAt: number | undefined
  readonly pausedAt: number | undefined
  /** Live values of the running migration, read at each `get`. */
  readonly probe: Effect.Effect<Partial<Snapshot>> | undefined
  /** Completed with the final snapshot of the migration this handle follows (or its next one, before it starts). */
  readonly final: Deferred.Deferred<Snapshot>
}

const initial: Snapshot = {
  status: "setup",
  setupTimeMs: 0,
  totalTimeMs: 0,
  transferred: 0,
  remaining: 0,
  total: 0,
  duplicate: 0,
  normal: 0,
  mbps: 0,
  dirtyPagesRate: 0,
  expectedDowntimeMs: 0,
  downtimeMs: 0,
  rounds: 0,
  phase: "precopy"
}

const isFinal = (status: Status) => status === "completed" || status === "failed" || status === "cancelled"

/**
 * Whether a migration follows the handle now (a second one is refused, the handle left alone): one started and
 * has not ended (its end sets the final status).
 */
const following = (state: State): boolean => state.startedAt !== undefined && !isFinal(state.snapshot.status)

/** The snapshot of `state` at `now`. */
const view = (state: State, now: number, live: Partial<Snapshot>): Snapshot => {
  const s = { ...state.snapshot, ...live }
  if (isFinal(s.status) || state.startedAt === undefined) return s
  return {
    ...s,
    totalTimeMs: now - state.startedAt,
    setupTimeMs: (state.activeAt ?? now) - state.startedAt,
    downtimeMs: state.pausedAt === undefined ? s.downtimeMs : now - state.pausedAt
  }
}

class Handle implements MigrationStatus {
  readonly [TypeId]: TypeId = TypeId
  constructor(readonly state: SubscriptionRef.SubscriptionRef<State>) {}

  get get(): Effect.Effect<Snapshot> {
    return Effect.gen(this, function*() {
      const state = yield* SubscriptionRef.get(this.state)
      const live = state.probe === undefined || isFinal(state.snapshot.status) ? {} : yield* state.probe
      return view(state, yield* Clock.currentTimeMillis, live)
    })
  }

  get changes(): Stream.Stream<Snapshot> {
    // to the end of the migration it follows: a stream of every snapshot to come, migrations of this handle after
    // it included, never ended, and a `runForEach` beside a migration waited for ever once it was over
    return Stream.mapEffect(this.state.changes, (state) =>
      Effect.map(Clock.currentTimeMillis, (now) => view(state, now, {}))).pipe(
        Stream.takeUntil((snapshot) => isFinal(snapshot.status))
      )
  }

  get await(): Effect.Effect<Snapshot> {
    return Effect.flatMap(SubscriptionRef.get(this.state), (state) => Deferred.await(state.final))
  }
}

/** A new handle, status `setup`. */
export const make: Effect.Effect<MigrationStatus> = Effect.gen(function*() {
  const state = yield* SubscriptionRef.make<State>({
    snapshot: initial,
    startedAt: undefined,
    activeAt: undefined,
    pausedAt: undefined,
    probe: undefined,
    final: yield* Deferred.make<Snapshot>()
  })
  return new Handle(state)
})

// ---------------------------------------------------------------------------------------------------------
// The tracker

/** How a running migration keeps its status; a no-op without a handle. */
export interface Tracker {
  /** The migration starts now (the destination: its source's hello came), with `total` bytes of memory. */
  readonly begin: (total: number) => Effect.Effect<void>
  /** Setup is over: every channel is there. */
  readonly active: Effect.Effect<void>
  /** Installs the probe of the live counters. */
  readonly probe: (read: Effect.Effect<Partial<Snapshot>>) => Effect.Effect<void>
  /** Publishes new values. */
  readonly update: (values: Partial<Snapshot>) => Effect.Effect<void>
  /**
   * `onProgress` that also publishes each report (the source's: phase, remaining, rate, expected downtime):
   * `onProgress` itself without a handle (no report is made for nobody).
   */
  readonly withProgress: (
    onProgress: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined,
    pageSize: number
  ) => ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
  /** Writers are paused from now on (the switch-over). */
  readonly paused: Effect.Effect<void>
}

/** A pre-copy round as a tracker hears of it (the fields of `Precopy.Round` it reads). */
export interface RoundInfo {
  readonly round: number
  readonly phase: Transfer.Phase
  /** Pages the round sends. */
  readonly pages: number
  /** When it started (clock milliseconds). */
  readonly startedAt: number
}

/**
 * What a source's status says of its pre-copy rounds (a migration's or a snapshot save's): at each round's start its
 * phase and the rate pages were written at while the previous round went out, writers paused from the switch-over's
 * start; at each end one more round done.
 */
export const rounds = (tracker: Tracker): {
  readonly started: (round: RoundInfo) => Effect.Effect<void>
  readonly ended: (round: RoundInfo) => Effect.Effect<void>
} => {
  let previousStart: number | undefined
  return {
    started: (round) =>
      Effect.suspend(() => {
        // pages written per second while the previous round went out
        const rate = previousStart === undefined || round.round === 0
          ? 0
          : round.pages / Math.max(1, round.startedAt - previousStart) * 1000
        previousStart = round.startedAt
        return Effect.zipRight(
          round.phase === "switchover" ? tracker.paused : Effect.void,
          tracker.update({ dirtyPagesRate: rate, phase: round.phase })
        )
      }),
    ended: (round) => tracker.update({ rounds: round.round + 1 })
  }
}

const noop: Tracker = {
  begin: () => Effect.void,
  active: Effect.void,
  probe: () => Effect.void,
  update: () => Effect.void,
  withProgress: (onProgress) => onProgress,
  paused: Effect.void
}

/** Bytes per second as megabits per second. */
export const mbps = (bytesPerSecond: number): number =>
  Number.isFinite(bytesPerSecond) && bytesPerSecond > 0 ? bytesPerSecond * 8 / 1e6 : 0

const modify = (handle: Handle, f: (state: State) => State) => SubscriptionRef.update(handle.state, f)

const trackerOf = (handle: Handle): Tracker => {
  const publish = (values: Partial<Snapshot>) => modify(handle, (s) => ({ ...s, snapshot: { ...s.snapshot, ...values } }))
  const progress = (p: Transfer.Progress, pageSize: number) =>
    publish({
      phase: p.phase,
      remaining: p.dirtyPages * pageSize,
      mbps: mbps(p.bandwidth),
      expectedDowntimeMs: Number.isFinite(p.expectedDowntimeMs) ? p.expectedDowntimeMs : 0
    })
  return {
    begin: (total) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) =>
        modify(handle, (s) => ({ ...s, startedAt: now, snapshot: { ...s.snapshot, total } }))),
    active: Effect.flatMap(Clock.currentTimeMillis, (now) =>
      modify(handle, (s) => ({
        ...s,
        activeAt: now,
        snapshot: { ...s.snapshot, status: "active", setupTimeMs: now - (s.startedAt ?? now) }
      }))),
    probe: (read) => modify(handle, (s) => ({ ...s, probe: read })),
    update: publish,
    withProgress: (onProgress, pageSize) => (p) =>
      onProgress === undefined ? progress(p, pageSize) : Effect.zipRight(progress(p, pageSize), onProgress(p)),
    paused: Effect.flatMap(Clock.currentTimeMillis, (now) => modify(handle, (s) => ({ ...s, pausedAt: now })))
  }
}

/**
 * Runs a migration `body` with its status kept in `handle` (if any): `setup` from now (`total` bytes of
 * memory), then what `body` reports through its tracker, and at the end `completed` with the values
 * `completed(result)` gives, `failed` with the error's message (and the last live values), or `cancelled`.
 *
 * A handle follows one migration at a time: while one runs, another given the same handle fails with `busy` at
 * once, the handle left to the one it follows (it reset the handle to `setup`, then said `failed` and completed
 * its `await` for a migration that went on and succeeded). A handle given to a later migration follows that one,
 * `await` included (it kept answering with the first migration's end).
 */
export const track = <A, E, R, B>(
  handle: MigrationStatus | undefined,
  total: number,
  completed: (result: A) => Partial<Snapshot>,
  busy: Effect.Effect<never, B>,
  body: (tracker: Tracker) => Effect.Effect<A, E, R>
): Effect.Effect<A, E | B, R> => {
  if (handle === undefined) return body(noop)
  const h = handle as Handle
  return Effect.uninterruptibleMask((restore) =>
    Effect.gen(function*() {
      const now = yield* Clock.currentTimeMillis
      const fresh = yield* Deferred.make<Snapshot>()
      const taken = yield* SubscriptionRef.modify(h.state, (s): [boolean, State] =>
        following(s) ? [false, s] : [true, {
          snapshot: { ...initial, total },
          startedAt: now,
          activeAt: undefined,
          pausedAt: undefined,
          probe: undefined,
          // an earlier migration's end stays its own: this one's `await` waits for this one
          final: isFinal(s.snapshot.status) ? fresh : s.final
        }])
      if (!taken) return yield* busy
      return yield* Effect.onExit(restore(body(trackerOf(h))), (exit) =>
        Effect.gen(function*() {
          const last = yield* h.get
          const end = yield* Clock.currentTimeMillis
          const state = yield* SubscriptionRef.get(h.state)
          const setupTimeMs = (state.activeAt ?? end) - (state.startedAt ?? end)
          const snapshot: Snapshot = Exit.isSuccess(exit)
            ? {
              ...last,
              remaining: 0,
              expectedDowntimeMs: 0,
              downtimeMs: 0,
              ...completed(exit.value),
              setupTimeMs,
              status: "completed"
            }
            : Cause.isInterruptedOnly(exit.cause)
            ? { ...last, setupTimeMs, totalTimeMs: end - (state.startedAt ?? end), status: "cancelled" }
            : {
              ...last,
              setupTimeMs,
              totalTimeMs: end - (state.startedAt ?? end),
              status: "failed",
              error: messageOf(Cause.squash(exit.cause))
            }
          yield* modify(h, (s) => ({ ...s, snapshot, probe: undefined }))
          yield* Deferred.succeed(state.final, snapshot)
        }))
    })
  )
}

const messageOf = (error: unknown): string =>
  typeof error === "object" && error !== null && "message" in error && typeof error.message === "string"
    ? error.message
    : String(error)
