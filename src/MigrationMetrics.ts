/**
 * The metrics a migration updates, as Effect `Metric`s: every one is tagged `side` (`source` or
 * `destination`), the bytes also `channel` (the multifd channel's id). An exporter reads them from Effect's
 * metric registry (`@effect/opentelemetry`'s `NodeSdk.layer` with a metric reader: see `examples/otel.ts`);
 * `Metric.value(MigrationMetrics.rounds.pipe(Metric.tagged("side", "source")))` reads one in code.
 *
 * The channels do not touch them per packet: a migration adds what its channel sets' plain counters moved at
 * each round's end and at its own end (so a counter lags a running round, never a finished one).
 *
 * @since 0.1.0
 */
import * as Metric from "effect/Metric"

/**
 * Bytes on the multifd channels (headers and payload), tagged `side` and `channel`.
 *
 * @since 0.1.0
 * @category metrics
 */
export const wireBytes = Metric.counter("multifd_wire_bytes", {
  description: "bytes on the multifd channels (headers and payload), per channel"
})

/**
 * Normal pages (sent or received with their bytes).
 *
 * @since 0.1.0
 * @category metrics
 */
export const normalPages = Metric.counter("multifd_normal_pages", { description: "pages sent with their bytes" })

/**
 * Zero pages (sent or received as offsets only).
 *
 * @since 0.1.0
 * @category metrics
 */
export const zeroPages = Metric.counter("multifd_zero_pages", { description: "zero pages, sent as offsets only" })

/**
 * Multifd packets (RAM and SYNC packets).
 *
 * @since 0.1.0
 * @category metrics
 */
export const packets = Metric.counter("multifd_packets", { description: "multifd packets, RAM and SYNC" })

/**
 * SYNC packets (one per channel and round).
 *
 * @since 0.1.0
 * @category metrics
 */
export const syncs = Metric.counter("multifd_syncs", { description: "SYNC packets, one per channel and round" })

/**
 * Rounds completed (each one acknowledged by the destination).
 *
 * @since 0.1.0
 * @category metrics
 */
export const rounds = Metric.counter("multifd_rounds", { description: "rounds acknowledged by the destination" })

/**
 * Dirty pages at the start of the latest round (the source: pages that round sends).
 *
 * @since 0.1.0
 * @category metrics
 */
export const dirtyPages = Metric.gauge("multifd_dirty_pages", { description: "dirty pages at the start of the latest round" })

/**
 * Bytes per second on the wire: the latest round's (source), the latest migration's average (destination).
 *
 * @since 0.1.0
 * @category metrics
 */
export const bandwidth = Metric.gauge("multifd_bandwidth_bytes_per_second", {
  description: "bytes per second on the multifd channels: the latest round's (source), the latest migration's (destination)"
})

/**
 * Milliseconds the latest completed migration paused writers (source).
 *
 * @since 0.1.0
 * @category metrics
 */
export const downtime = Metric.gauge("multifd_downtime_ms", { description: "writers paused by the latest completed migration, ms" })

/**
 * Migrations that ended, tagged `side` and `outcome` (`completed`, `failed`, `cancelled`).
 *
 * @since 0.1.0
 * @category metrics
 */
export const migrations = Metric.counter("multifd_migrations", { description: "migrations that ended, by outcome" })
