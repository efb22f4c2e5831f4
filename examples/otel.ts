/**
 * A migration observed with OpenTelemetry: `@effect/opentelemetry`'s `NodeSdk.layer` turns the library's spans
 * (`multifd.migrate`, `multifd.incoming`, `multifd.round`, `multifd.channel.connect` / `handshake` / `init`,
 * `multifd.sync`, `multifd.digest`, ...) into OpenTelemetry spans, and a metric reader reads its metrics
 * (`MigrationMetrics`: bytes per channel, pages, packets, syncs, rounds, dirty pages, bandwidth, downtime).
 * Both sides run here, over loopback TCP, each with a `MigrationStatus` handle; a short summary is printed.
 *
 * Run: npx tsx examples/otel.ts            (add --console to also print every span as ConsoleSpanExporter does)
 *
 * Exporting elsewhere is a matter of the processor and reader given to `NodeSdk.layer` (an OTLP exporter, a
 * `PeriodicExportingMetricReader`, ...).
 */
import * as NodeSdk from "@effect/opentelemetry/NodeSdk"
import type { ReadableSpan } from "@opentelemetry/sdk-trace-base"
import { ConsoleSpanExporter, InMemorySpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base"
import { MetricReader } from "@opentelemetry/sdk-metrics"
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"
import * as Url from "node:url"
// in an application: import { GuestRam, Migration, MigrationStatus, Transport } from "effect-multifd"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationStatus from "../src/MigrationStatus.js"
import * as Transport from "../src/Transport.js"

/** A metric reader that collects when asked (an exporter would do so on a schedule). */
class OnDemandReader extends MetricReader {
  protected override onForceFlush(): Promise<void> {
    return Promise.resolve()
  }
  protected override onShutdown(): Promise<void> {
    return Promise.resolve()
  }
}

/** Spans of one name: how many, and their durations. */
export interface SpanSummary {
  readonly name: string
  readonly count: number
  readonly totalMs: number
  readonly maxMs: number
}

/** One data point of a metric. */
export interface MetricPoint {
  readonly name: string
  readonly attributes: Record<string, string>
  readonly value: number
}

/** What the example found. */
export interface Summary {
  readonly stats: Migration.Stats
  readonly spans: ReadonlyArray<SpanSummary>
  /** Every finished span, as OpenTelemetry has it. */
  readonly finished: ReadonlyArray<ReadableSpan>
  readonly metrics: ReadonlyArray<MetricPoint>
  readonly source: MigrationStatus.Snapshot
  readonly destination: MigrationStatus.Snapshot
  /** The source's status read during its first round (at its first report of pages sent). */
  readonly midway: MigrationStatus.Snapshot | undefined
}

const ms = (hr: readonly [number, number]) => hr[0] * 1000 + hr[1] / 1e6

/** Spans grouped by name, in the order they started. */
const summarize = (spans: ReadonlyArray<ReadableSpan>): Array<SpanSummary> => {
  const byName = new Map<string, { count: number; totalMs: number; maxMs: number; first: number }>()
  for (const span of spans) {
    const entry = byName.get(span.name) ?? { count: 0, totalMs: 0, maxMs: 0, first: ms(span.startTime) }
    const duration = ms(span.duration)
    byName.set(span.name, {
      count: entry.count + 1,
      totalMs: entry.totalMs + duration,
      maxMs: Math.max(entry.maxMs, duration),
      first: Math.min(entry.first, ms(span.startTime))
    })
  }
  return [...byName].sort((a, b) => a[1].first - b[1].first).map(([name, s]) => ({
    name,
    count: s.count,
    totalMs: s.totalMs,
    maxMs: s.maxMs
  }))
}

/**
 * Migrates `megabytes` MiB over `channels` channels in this process, observed: the spans, the `multifd_*`
 * metrics and both sides' status.
 */
export const observe = (options: { readonly megabytes?: number; readonly channels?: number; readonly console?: boolean } = {}) =>
  Effect.gen(function*() {
    const exporter = new InMemorySpanExporter()
    const reader = new OnDemandReader()
    const processors = [new SimpleSpanProcessor(exporter)]
    if (options.console) processors.push(new SimpleSpanProcessor(new ConsoleSpanExporter()))
    const telemetry = NodeSdk.layer(() => ({
      resource: { serviceName: "effect-multifd-example" },
      spanProcessor: processors,
      metricReader: reader
    }))

    const migration = Effect.gen(function*() {
      const transport = yield* Transport.Transport
      const listener = yield* transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
      const sourceStatus = yield* MigrationStatus.make
      const destinationStatus = yield* MigrationStatus.make
      const bytes = Buffer.alloc((options.megabytes ?? 32) * 1024 * 1024)
      // random pages, every fourth one left zero
      for (let at = 0; at < bytes.length; at += 4 * 4096) Crypto.randomFillSync(bytes, at, 3 * 4096)
      let midway: MigrationStatus.Snapshot | undefined
      const [stats] = yield* Effect.all([
        Migration.migrate({
          address: listener.address,
          channels: options.channels ?? 4,
          status: sourceStatus,
          // the status can be read at any moment: here once, during the first round
          onProgress: (p) =>
            midway === undefined && p.round === 0 && p.doneBytes > 0
              ? Effect.map(sourceStatus.get, (s) => void (midway = s))
              : Effect.void
        }).pipe(Effect.provideServiceEffect(GuestRam.GuestRam, GuestRam.make({ blocks: [{ name: "pc.ram", bytes }] }))),
        Migration.incoming(listener, { status: destinationStatus })
      ], { concurrency: "unbounded" })
      // every span has ended (the processor exported it); the reader collects the metrics now
      const collected = yield* Effect.promise(() => reader.collect())
      const metrics = collected.resourceMetrics.scopeMetrics.flatMap((scope) =>
        scope.metrics.filter((m) => m.descriptor.name.startsWith("multifd_")).flatMap((m) =>
          (m.dataPoints as ReadonlyArray<{ readonly attributes: Record<string, unknown>; readonly value: unknown }>).map((point) => ({
            name: m.descriptor.name,
            attributes: Object.fromEntries(Object.entries(point.attributes).map(([k, v]) => [k, String(v)])),
            value: typeof point.value === "number" ? point.value : Number.NaN
          }))
        )
      )
      const finished = exporter.getFinishedSpans()
      return {
        stats,
        spans: summarize(finished),
        finished: [...finished],
        metrics,
        source: yield* sourceStatus.get,
        destination: yield* destinationStatus.get,
        midway
      } satisfies Summary
    })
    return yield* migration.pipe(Effect.scoped, Effect.provide([Transport.layer, telemetry]))
  })

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`

/** The summary as text. */
export const format = (summary: Summary): string => {
  const out: Array<string> = []
  out.push("spans (name, count, total ms, longest ms):")
  for (const s of summary.spans) {
    out.push(`  ${s.name.padEnd(28)} ${String(s.count).padStart(4)} ${s.totalMs.toFixed(1).padStart(9)} ${s.maxMs.toFixed(1).padStart(9)}`)
  }
  out.push("metrics:")
  for (const m of summary.metrics) {
    const tags = Object.entries(m.attributes).map(([k, v]) => `${k}=${v}`).join(",")
    out.push(`  ${`${m.name}{${tags}}`.padEnd(60)} ${Number.isInteger(m.value) ? m.value : m.value.toFixed(1)}`)
  }
  const status = (side: string, s: MigrationStatus.Snapshot) =>
    `${side}: ${s.status}, ${mib(s.transferred)} of ${mib(s.total)} transferred, ${s.normal} normal and ` +
    `${s.duplicate} zero pages, ${s.rounds} rounds in ${s.totalTimeMs} ms (setup ${s.setupTimeMs} ms), ` +
    `${s.mbps.toFixed(0)} Mbit/s, downtime ${s.downtimeMs} ms`
  out.push("status:")
  if (summary.midway !== undefined) {
    const m = summary.midway
    out.push(`  source during round 0: ${m.status}, ${mib(m.transferred)} transferred, ${mib(m.remaining)} remaining, ` +
      `${m.mbps.toFixed(0)} Mbit/s, expected downtime ${m.expectedDowntimeMs.toFixed(0)} ms`)
  }
  out.push(`  ${status("source", summary.source)}`, `  ${status("destination", summary.destination)}`)
  return out.join("\n")
}

if (process.argv[1] !== undefined && import.meta.url === Url.pathToFileURL(process.argv[1]).href) {
  Effect.runPromise(observe({ console: process.argv.includes("--console") })).then(
    (summary) => console.log(format(summary)),
    (error) => {
      console.error(`otel example: ${error?.message ?? error}`)
      process.exit(1)
    }
  )
}
