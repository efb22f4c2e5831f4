/**
 * The OpenTelemetry example (examples/otel.ts): the library's spans and metrics through
 * `@effect/opentelemetry` (an `InMemorySpanExporter` and a metric reader), in this process; and the example as
 * users run it, printing its summary.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as ChildProcess from "node:child_process"
import * as Path from "node:path"
import * as Otel from "../examples/otel.js"

const ROOT = Path.resolve(import.meta.dirname, "..")
const CHANNELS = 3

describe("examples/otel.ts", () => {
  it.live("spans of the migration, each round, channel and sync; metrics with the stats' values; both statuses", () =>
    Effect.gen(function*() {
      const summary = yield* Otel.observe({ megabytes: 16, channels: CHANNELS })
      const { stats } = summary
      const count = (name: string) => summary.spans.find((s) => s.name === name)?.count ?? 0
      expect(stats.rounds).toBeGreaterThanOrEqual(2)
      expect({
        migrate: count("multifd.migrate"),
        incoming: count("multifd.incoming"),
        // the main channel and each multifd channel
        connect: count("multifd.channel.connect"),
        establish: count("multifd.channel.establish"),
        // sent by the source, received by the destination
        init: count("multifd.channel.init"),
        rounds: count("multifd.round"),
        // each round's barrier, on both sides
        syncs: count("multifd.sync"),
        digest: count("multifd.digest"),
        // no TLS here
        handshake: count("multifd.channel.handshake")
      }).toEqual({
        migrate: 1,
        incoming: 1,
        connect: CHANNELS + 1,
        establish: CHANNELS,
        init: 2 * CHANNELS,
        rounds: stats.rounds,
        syncs: 2 * stats.rounds,
        digest: 2,
        handshake: 0
      })
      const spans = summary.finished
      const migrate = spans.find((s) => s.name === "multifd.migrate")!
      const incoming = spans.find((s) => s.name === "multifd.incoming")!
      const millis = (s: typeof migrate) => s.duration[0] * 1000 + s.duration[1] / 1e6
      // every other span lies inside one of the two sides' spans, in its trace
      for (const span of spans) {
        expect(millis(span)).toBeGreaterThanOrEqual(0)
        if (span === migrate || span === incoming) continue
        const root = span.spanContext().traceId === migrate.spanContext().traceId ? migrate : incoming
        expect({ span: span.name, trace: span.spanContext().traceId }).toEqual({ span: span.name, trace: root.spanContext().traceId })
        expect(millis(span)).toBeLessThanOrEqual(millis(root))
      }
      // rounds are the source's, children of its migration span, numbered in order
      const rounds = spans.filter((s) => s.name === "multifd.round")
      expect(rounds.map((s) => s.parentSpanContext?.spanId)).toEqual(rounds.map(() => migrate.spanContext().spanId))
      expect(rounds.map((s) => s.attributes["multifd.round"])).toEqual(rounds.map((_, i) => i))
      expect(rounds.at(-1)!.attributes["multifd.phase"]).toBe("switchover")
      const inits = spans.filter((s) => s.name === "multifd.channel.init")
      expect(inits.map((s) => s.attributes["multifd.channel"]).sort()).toEqual([0, 0, 1, 1, 2, 2])
      expect(inits.filter((s) => s.spanContext().traceId === incoming.spanContext().traceId)).toHaveLength(CHANNELS)

      // the metrics, as OpenTelemetry reads them
      const value = (name: string, attributes: Record<string, string>) =>
        summary.metrics.find((m) =>
          m.name === name && Object.entries(attributes).every(([k, v]) => m.attributes[k] === v) &&
          Object.keys(m.attributes).length === Object.keys(attributes).length
        )?.value
      for (const side of ["source", "destination"]) {
        const perChannel = Array.from({ length: CHANNELS }, (_, channel) =>
          value("multifd_wire_bytes", { side, channel: String(channel) }) ?? 0)
        expect(perChannel.every((b) => b > 0)).toBe(true)
        expect(perChannel.reduce((a, b) => a + b, 0)).toBe(stats.wireBytes)
        expect(value("multifd_normal_pages", { side })).toBe(stats.normalPages)
        expect(value("multifd_zero_pages", { side })).toBe(stats.zeroPages)
        expect(value("multifd_packets", { side })).toBe(stats.packets)
        expect(value("multifd_syncs", { side })).toBe(stats.syncs)
        expect(value("multifd_rounds", { side })).toBe(stats.rounds)
        expect(value("multifd_migrations", { side, outcome: "completed" })).toBe(1)
        expect(value("multifd_bandwidth_bytes_per_second", { side })).toBeGreaterThan(0)
      }
      expect(value("multifd_downtime_ms", { side: "source" })).toBe(stats.downtimeMs)
      expect(value("multifd_dirty_pages", { side: "source" })).toBeDefined()

      // the statuses
      expect(summary.source).toMatchObject({ status: "completed", transferred: stats.wireBytes, total: stats.ramBytes, remaining: 0 })
      expect(summary.destination).toMatchObject({ status: "completed", transferred: stats.wireBytes, total: stats.ramBytes })
      expect(summary.midway?.status).toBe("active")
      expect(summary.midway!.transferred).toBeGreaterThan(0)
      expect(Otel.format(summary)).toContain("multifd.round")
    }))

  it("npx tsx examples/otel.ts prints spans, metrics and statuses, and exits 0", async () => {
    const result = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = ChildProcess.spawn(process.execPath, ["--import", "tsx", "examples/otel.ts"], {
        cwd: ROOT,
        stdio: ["ignore", "pipe", "pipe"]
      })
      let stdout = ""
      let stderr = ""
      child.stdout.setEncoding("utf8").on("data", (s: string) => (stdout += s))
      child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s))
      const timer = setTimeout(() => child.kill("SIGKILL"), 30_000)
      child.once("close", (code) => {
        clearTimeout(timer)
        resolve({ code, stdout, stderr })
      })
    })
    expect(result.code, result.stderr).toBe(0)
    expect(result.stdout).toMatch(/^spans \(name, count, total ms, longest ms\):$/m)
    expect(result.stdout).toMatch(/^ {2}multifd\.migrate +1 /m)
    expect(result.stdout).toMatch(/^ {2}multifd_wire_bytes\{side=source,channel=3\} +\d+$/m)
    expect(result.stdout).toMatch(/^ {2}source: completed, 24\.\d MiB of 32\.0 MiB transferred/m)
    expect(result.stdout).toMatch(/^ {2}destination: completed/m)
  })
})
