/**
 * What every way of moving guest memory shares — a migration over the network (`Migration`), one from QEMU
 * (`QemuIncoming`), a snapshot file (`Snapshot`): how long to wait for a peer, the pre-copy policy, where a
 * transfer is (`Phase`), its progress reports and the stats of a finished one. A leaf: of the other public
 * modules it knows only `Protocol` (pure, it imports nothing), so that each of them may import it.
 *
 * @since 0.1.0
 */
import * as Clock from "effect/Clock"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Schedule from "effect/Schedule"
import type * as Scope from "effect/Scope"
import { RecentRate } from "./internal/native/rate.js"
import * as Inputs from "./internal/inputs.js"
import type * as Protocol from "./Protocol.js"

// ---------------------------------------------------------------------------------------------------------
// Timeouts

/**
 * How long to wait for a peer. Each is a duration more than 0 and finite, at most 24 days (`checkTimeout`):
 * `Infinity` is refused (`BadOptions`), since a peer gone silent would then be waited for for ever. Slow work needs
 * no longer one: a peer at work says so about every second (a destination hashing or storing, bytes arriving).
 *
 * @since 0.1.0
 * @category models
 */
export interface Timeouts {
  /** Establishing a TCP or Unix connection (default 10 s). */
  readonly connect: Duration.DurationInput
  /**
   * A TLS handshake (the TLS settings' `handshakeTimeoutMs` ends it sooner if it is shorter); on the destination
   * also a new connection's first bytes and its hello or init packet: a connection that has not sent a complete,
   * valid one by then is closed (default 10 s).
   */
  readonly handshake: Duration.DurationInput
  /**
   * Any single answer of the peer, or no progress at all during a transfer (default 30 s). While a destination
   * stores the memory it says so about every second (`Control.Storing`): this bounds the silence, not the store.
   * A destination whose source re-attaches lost channels gives up on a connection stuck inside a packet (nothing
   * arriving) after half of it, so that the channel is re-attached before the migration would time out.
   */
  readonly peer: Duration.DurationInput
}

/**
 * Default timeouts.
 *
 * @since 0.1.0
 * @category constants
 */
export const defaultTimeouts: Timeouts = {
  connect: Duration.seconds(10),
  handshake: Duration.seconds(10),
  peer: Duration.seconds(30)
}

/**
 * The timeouts to use: the defaults, overridden by those given.
 *
 * @since 0.1.0
 * @category utils
 */
export const resolveTimeouts = (partial: Partial<Timeouts> | undefined): Timeouts => ({ ...defaultTimeouts, ...partial })

/**
 * Why `input`, given as `what`, is not a duration of at least `min` (a malformed one, a negative one, NaN, 0 where
 * it must be positive), if it is not: a timeout of 0 would fail every wait at once ("timed out after 0"), a
 * malformed one was a defect.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkDuration = (what: string, input: unknown, min: "positive" | "non-negative"): string | undefined => {
  const duration = Duration.decodeUnknown(input)
  // Duration reads a negative number or NaN as 0: they are mistakes, not 0
  const negative = typeof input === "number" ? !(input >= 0) : typeof input === "string" && /^\s*-/.test(input)
  if (duration._tag === "None" || negative) return `${what} ${Inputs.describeInput(input)} is not a duration of 0 or more`
  return min === "positive" && Duration.toMillis(duration.value) === 0
    ? `${what} must be more than 0, not ${Inputs.describeInput(input)}`
    : undefined
}

/**
 * The longest timeout, in milliseconds (2^31 - 1, about 24.8 days): the longest a timer waits. A longer one, or
 * `Infinity`, never fires (Node's timers and Effect's clock take it for "never").
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_TIMEOUT_MS = 2 ** 31 - 1

/**
 * Why `input`, given as `what`, is no timeout, if it is not: a duration more than 0 (`checkDuration`) and finite, at
 * most `MAX_TIMEOUT_MS`. `Infinity` was taken, and so was 30 days, which no timer waits for: a peer gone silent
 * (a path that drops everything, a stranger that never sends its hello) was waited for for ever, a migration hung
 * and a listener's places held. Work that takes long needs none: a peer at work says so (heartbeats).
 *
 * @since 0.1.0
 * @category utils
 */
export const checkTimeout = (what: string, input: unknown): string | undefined =>
  checkDuration(what, input, "positive") ??
    (Duration.toMillis(Duration.decode(input as Duration.DurationInput)) <= MAX_TIMEOUT_MS
      ? undefined
      : `${what} must be finite, at most 24 days (the longest a timer waits), not ${Inputs.describeInput(input)}`)

/**
 * Why the timeouts given cannot be used, if they cannot: each must be a finite duration more than 0
 * (`checkTimeout`).
 *
 * @since 0.1.0
 * @category utils
 */
export const checkTimeouts = (partial: Partial<Timeouts> | undefined): string | undefined => {
  const notObject = Inputs.checkObject("timeouts", partial)
  if (notObject !== undefined) return notObject
  for (const name of ["connect", "handshake", "peer"] as const) {
    const input = partial?.[name]
    const problem = input === undefined ? undefined : checkTimeout(`timeouts.${name}`, input)
    if (problem !== undefined) return problem
  }
  return undefined
}

/**
 * A destination's `acceptTimeout`, if given: a duration more than 0, else what is wrong with it (0, or a negative
 * number read as 0, timed out at once; a malformed one was a defect). `Infinity` is the default's "for ever" (a
 * destination waits for its source as long as it is asked to; a source that connected is bound by the timeouts).
 *
 * @since 0.1.0
 * @category utils
 */
export const checkAcceptTimeout = (input: unknown): string | undefined =>
  input === undefined ? undefined : checkDuration("acceptTimeout", input, "positive")

// ---------------------------------------------------------------------------------------------------------
// Live policy

/**
 * When a live migration switches over, and what it does when it cannot.
 *
 * @since 0.1.0
 * @category models
 */
export interface LiveOptions {
  /** Switch over when the remaining dirty pages can be sent within this time (default 300 ms, as QEMU). */
  readonly downtimeLimit?: Duration.DurationInput | undefined
  /** Give up converging after this many rounds (default 30; 0: after round 0). */
  readonly maxRounds?: number | undefined
  /** Give up converging after this long (default 10 minutes). */
  readonly maxDuration?: Duration.DurationInput | undefined
  /** `fail` (default): a migration that does not converge fails; `switchover`: it switches over anyway. */
  readonly onNoConvergence?: "fail" | "switchover" | undefined
}

/**
 * Why the live policy given cannot be used, if it cannot: durations and a whole number of rounds of 0 or more (0:
 * round 0 only), `fail` or `switchover`.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkLive = (live: LiveOptions | undefined): string | undefined => {
  if (live === undefined) return undefined
  // (null, from plain JavaScript, was a defect)
  const notObject = Inputs.checkObject("live", live)
  if (notObject !== undefined) return notObject
  for (const name of ["downtimeLimit", "maxDuration"] as const) {
    const input = live[name]
    const problem = input === undefined ? undefined : checkDuration(`live.${name}`, input, "non-negative")
    if (problem !== undefined) return problem
  }
  const rounds = live.maxRounds
  if (rounds !== undefined && !(Number.isInteger(rounds) && rounds >= 0)) {
    return `live.maxRounds must be a whole number of 0 or more, not ${Inputs.describeInput(rounds)}`
  }
  const policy = live.onNoConvergence
  if (policy !== undefined && policy !== "fail" && policy !== "switchover") {
    return `live.onNoConvergence ${JSON.stringify(policy)} is not fail or switchover`
  }
  return undefined
}

// ---------------------------------------------------------------------------------------------------------
// Progress

/**
 * Where a migration is: pre-copy rounds while writers run, then the switch-over with writers paused.
 *
 * @since 0.1.0
 * @category models
 */
export type Phase = "precopy" | "switchover"

/**
 * A progress report.
 *
 * @since 0.1.0
 * @category models
 */
export interface Progress {
  readonly round: number
  readonly phase: Phase
  /**
   * Bytes of this round's pages sent: in packets the sockets accepted (the destination: pages received in
   * all). A round's last report has all of them; its first (and only that one) has 0.
   */
  readonly doneBytes: number
  /** Bytes of this round's pages (the destination: memory size). */
  readonly totalBytes: number
  /**
   * Pages a switch-over now would still have to send: at a round's start the pages it sends; during a round
   * those not yet sent plus those written since it began (a page in both counts twice). 0 on the destination.
   */
  readonly dirtyPages: number
  /**
   * Bytes per second on the wire: at a round's start measured over the previous round (0 before one
   * completed), during a round over the round so far; the destination: the receive rate over the last second.
   */
  readonly bandwidth: number
  /** Expected downtime if the switch-over happened now: `dirtyPages` at `bandwidth`. 0 on the destination. */
  readonly expectedDowntimeMs: number
  /**
   * A source's wait for its destination once every page was sent (writers still paused, `phase` `switchover`), as the
   * destination says about every second: `verifying` (hashing its memory against the digests) or `storing` (its
   * `store` step: writing and syncing the image, which may take minutes on a slow disk), and for how long so far, in
   * milliseconds. The report has the last round's numbers, every page of it sent. Absent before, on the destination
   * and in a snapshot save.
   */
  readonly destination?: DestinationWait | undefined
}

/**
 * What a source waits for after its last round (`Progress.destination`).
 *
 * @since 0.1.0
 * @category models
 */
export interface DestinationWait {
  readonly state: "verifying" | "storing"
  /** Milliseconds since the destination first said it was in this state. */
  readonly forMs: number
}

/**
 * How often a receiving side reports its progress.
 *
 * @since 0.1.0
 * @category constants
 */
export const REPORT_INTERVAL = Duration.millis(100)

/**
 * A progress report of a receiving side (`reportEvery`'s, a restore's last one) that cannot fail the transfer:
 * a report that fails or dies is logged, as a warning, and the transfer goes on. Such reports run in a
 * background fiber, or after the source was told `Done` — a failure there cannot fail the migration on both
 * sides, so it fails it on neither.
 *
 * @since 0.1.0
 * @category utils
 */
export const tolerated = (report: Effect.Effect<void>): Effect.Effect<void> =>
  Effect.catchAllCause(
    report,
    (cause) => Effect.logWarning("a progress report (onProgress) failed; the transfer goes on without it", cause)
  )

/**
 * Reports progress about ten times a second (`REPORT_INTERVAL`, the first report at once) while the current
 * scope is open — the receiving side's ticker. `current` builds each report; `rate(bytes)` gives the bytes per
 * second of a growing counter over the last second. With `lastOnSuccess`, one more report when the scope
 * closes after a success (a received migration's last report counts every page). Returns the report, for a
 * caller that sends a last one itself; without `onProgress` nothing runs. No report fails the transfer
 * (`tolerated`): the first that fails is logged and ends the ticker; a last one that fails is logged.
 *
 * @since 0.1.0
 * @category utils
 */
export const reportEvery = (
  onProgress: ((progress: Progress) => Effect.Effect<void>) | undefined,
  current: (rate: (bytes: number) => Effect.Effect<number>) => Effect.Effect<Progress>,
  options?: {
    readonly lastOnSuccess?: boolean | undefined
    /**
     * How long the last report (`lastOnSuccess`) may take: one that has not returned by then is logged and left
     * behind (it runs as the scope closes, uninterruptibly: one that never returned held the transfer, after its
     * success, for good, deaf to any interruption).
     */
    readonly lastWithin?: Duration.DurationInput | undefined
  }
): Effect.Effect<Effect.Effect<void>, never, Scope.Scope> =>
  Effect.gen(function*() {
    if (onProgress === undefined) return Effect.void
    const recent = new RecentRate()
    const rate = (bytes: number) => Effect.map(Clock.currentTimeMillis, (now) => recent.sample(now, bytes))
    const report = Effect.flatMap(Effect.suspend(() => current(rate)), onProgress)
    yield* Effect.forkScoped(tolerated(Effect.repeat(report, Schedule.spaced(REPORT_INTERVAL))))
    if (options?.lastOnSuccess) {
      const within = options.lastWithin
      const last = within === undefined ? tolerated(report) : Effect.interruptible(Effect.timeoutTo(
        // interruptible (a finalizer runs uninterruptibly: the timeout could not have cut it short, nor its timer been
        // stopped), and not waited for once the time is up (a report that ignores its interruption included)
        Effect.disconnect(tolerated(report)),
        {
          duration: within,
          onSuccess: () => Effect.void,
          onTimeout: () =>
            Effect.logWarning(
              `the last progress report (onProgress) did not return within ${Duration.format(within)}; ` +
                "the transfer ends without it"
            )
        }
      )).pipe(Effect.flatten)
      yield* Effect.addFinalizer((exit) => Exit.isSuccess(exit) ? last : Effect.void)
    }
    return tolerated(report)
  })

// ---------------------------------------------------------------------------------------------------------
// Stats

/**
 * What a finished migration did.
 *
 * @since 0.1.0
 * @category models
 */
export interface Stats {
  readonly uuid: string
  readonly channels: number
  readonly compression: Protocol.Compression
  /** Guest memory size. */
  readonly ramBytes: number
  readonly rounds: number
  /** Pages sent in each round; the last round ran with writers paused (source only; empty on the destination). */
  readonly pagesPerRound: ReadonlyArray<number>
  /** Writers paused until the destination confirmed (source only; 0 on the destination). */
  readonly downtimeMs: number
  readonly packets: number
  readonly syncs: number
  readonly normalPages: number
  readonly zeroPages: number
  /** Bytes that crossed the multifd channels. */
  readonly wireBytes: number
  /**
   * Multifd channels re-attached after a lost connection: the source's (with reconnecting on), the
   * destination's (when there were any).
   */
  readonly reconnects?: number | undefined
  /** Pages sent again on re-attached channels (source). */
  readonly resentPages?: number | undefined
  /** Bytes each multifd channel carried, by channel id (source only). */
  readonly channelWireBytes?: ReadonlyArray<number> | undefined
  /** Source: from connecting to the verified end; destination: from the source's hello to the end. */
  readonly durationMs: number
  /** Guest memory size over duration. */
  readonly gibPerSecond: number
}

/**
 * Bytes in a GiB.
 *
 * @since 0.1.0
 * @category constants
 */
export const GIB = 1024 * 1024 * 1024

/**
 * `Stats.gibPerSecond`: `bytes` moved in `durationMs` (at least 1 ms).
 *
 * @since 0.1.0
 * @category utils
 */
export const gibPerSecond = (bytes: number, durationMs: number): number => bytes / GIB / Math.max(durationMs, 1) * 1000

/**
 * Default cap on memory a source (or a snapshot file, or QEMU) may make a destination allocate: 16 GiB.
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_MAX_RAM = 16 * GIB

/**
 * Why `maxRamBytes`, the most memory a transfer may allocate, cannot be used, if it cannot: it must be a number
 * of bytes of 0 or more (`Infinity`: no limit). NaN turned the limit off, since no size exceeds it.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkMaxRam = (maxRamBytes: number | undefined): string | undefined =>
  maxRamBytes === undefined || (typeof maxRamBytes === "number" && maxRamBytes >= 0)
    ? undefined
    : `the memory limit maxRamBytes must be a number of bytes >= 0, not ${Inputs.describeInput(maxRamBytes)}`
