/**
 * Updates `MigrationMetrics` from a channel set's plain counters: at a round's end and at the migration's end
 * the recorder adds what moved since it last looked. Nothing runs per packet.
 *
 * @internal
 */
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import type * as Exit from "effect/Exit"
import * as Metric from "effect/Metric"
import * as MigrationMetrics from "../MigrationMetrics.js"

/** A channel set's counters (`MultifdSend.Stats`, `MultifdRecv.Stats`). */
export interface Counts {
  readonly packets: number
  readonly syncs: number
  readonly normalPages: number
  readonly zeroPages: number
  /** Bytes per channel id. */
  readonly channelBytes: ReadonlyArray<number>
}

/** Adds to the metrics what moved since the last call. */
export interface Recorder {
  readonly record: (counts: Counts) => Effect.Effect<void>
  /** A round ended: one more round, and its rate (bytes per second), if known. */
  readonly round: (bandwidth?: number) => Effect.Effect<void>
  /** A round starts with `pages` dirty pages. */
  readonly dirty: (pages: number) => Effect.Effect<void>
}

type Side = "source" | "destination"

const tagged = (side: Side) => <T, I, O>(metric: Metric.Metric<T, I, O>) => Metric.tagged(metric, "side", side)

/** A recorder for one migration's `side`. */
export const make = (side: Side): Recorder => {
  const tag = tagged(side)
  const normal = tag(MigrationMetrics.normalPages)
  const zero = tag(MigrationMetrics.zeroPages)
  const packets = tag(MigrationMetrics.packets)
  const syncs = tag(MigrationMetrics.syncs)
  const channelBytes = new Map<number, Metric.Metric.Counter<number>>()
  const bytesOf = (channel: number) => {
    let metric = channelBytes.get(channel)
    if (metric === undefined) {
      metric = Metric.tagged(tag(MigrationMetrics.wireBytes), "channel", String(channel))
      channelBytes.set(channel, metric)
    }
    return metric
  }
  // what the metrics have so far (updated in synchronous steps, as the counters they follow)
  const seen = { packets: 0, syncs: 0, normalPages: 0, zeroPages: 0, channelBytes: [] as Array<number> }
  const add = (metric: Metric.Metric.Counter<number>, delta: number) =>
    delta > 0 ? Metric.incrementBy(metric, delta) : Effect.void
  return {
    record: (counts) =>
      Effect.suspend(() => {
        const updates = [
          add(packets, counts.packets - seen.packets),
          add(syncs, counts.syncs - seen.syncs),
          add(normal, counts.normalPages - seen.normalPages),
          add(zero, counts.zeroPages - seen.zeroPages)
        ]
        counts.channelBytes.forEach((bytes, channel) => {
          updates.push(add(bytesOf(channel), bytes - (seen.channelBytes[channel] ?? 0)))
          seen.channelBytes[channel] = bytes
        })
        seen.packets = counts.packets
        seen.syncs = counts.syncs
        seen.normalPages = counts.normalPages
        seen.zeroPages = counts.zeroPages
        return Effect.all(updates, { discard: true })
      }),
    round: (bandwidth) =>
      Effect.zipRight(
        Metric.increment(tag(MigrationMetrics.rounds)),
        bandwidth === undefined || !Number.isFinite(bandwidth) ? Effect.void : Metric.set(tag(MigrationMetrics.bandwidth), bandwidth)
      ),
    dirty: (pages) => Metric.set(tag(MigrationMetrics.dirtyPages), pages)
  }
}

/**
 * A migration of `side` ended: one more of its outcome (`completed`, `failed`, `cancelled`); when it completed
 * its average rate (bytes per second) and, on the source, its downtime.
 */
export const ended = (
  side: Side,
  exit: Exit.Exit<unknown, unknown>,
  completed?: { readonly downtimeMs: number; readonly bandwidth: number }
): Effect.Effect<void> => {
  const tag = tagged(side)
  const outcome = exit._tag === "Success" ? "completed" : Cause.isInterruptedOnly(exit.cause) ? "cancelled" : "failed"
  return Effect.all([
    Metric.increment(Metric.tagged(tag(MigrationMetrics.migrations), "outcome", outcome)),
    completed === undefined ? Effect.void : Metric.set(tag(MigrationMetrics.bandwidth), completed.bandwidth),
    completed === undefined || side !== "source" ? Effect.void : Metric.set(tag(MigrationMetrics.downtime), completed.downtimeMs)
  ], { discard: true })
}
