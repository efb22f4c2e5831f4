/**
 * internal/native/rateLimit: one bandwidth limit shared by every channel, whatever thread it runs on. The waits
 * it asks for are checked as numbers (no sleeping): each reservation starts where the one before ended.
 */
import { describe, expect, it } from "vitest"
import * as WorkerThreads from "node:worker_threads"
import { RateLimit } from "../src/internal/native/rateLimit.js"

const MB = 1_000_000

/**
 * `wait`, asked for now, is that of a reservation ending `ms` after a moment at or after `t0` (the limit's making
 * or its last change): between `ms` less the time since `t0` and `ms` (±1 ms of rounding), however long this
 * process was held up between the calls.
 */
const expectEndsAt = (wait: number, ms: number, t0: bigint) => {
  const since = Number(process.hrtime.bigint() - t0) / 1e6
  expect(wait).toBeGreaterThanOrEqual(ms - since - 1)
  expect(wait).toBeLessThanOrEqual(ms + 1)
}

describe("RateLimit", () => {
  it("no limit: every reservation may go at once", () => {
    const limit = RateLimit.make(0)
    for (let i = 0; i < 10; i++) expect(limit.reserve(64 * MB)).toBe(0)
  })

  it("reservations queue up at the rate: 100 KB at 1 MB/s ends 100 ms after the one before", () => {
    const t0 = process.hrtime.bigint()
    const limit = RateLimit.make(1 * MB, 0)
    const waits = Array.from({ length: 5 }, () => limit.reserve(100_000))
    waits.forEach((wait, i) => expectEndsAt(wait, (i + 1) * 100, t0)) // 100, 200, ... ms
  })

  it("after an idle moment a burst goes at once, and no more than the burst", () => {
    const t0 = process.hrtime.bigint()
    const limit = RateLimit.make(1 * MB, 300_000)
    // the link has been idle since it was made: 300 KB may go at once, the next waits its turn
    expect(limit.reserve(100_000)).toBe(0)
    expect(limit.reserve(100_000)).toBe(0)
    expect(limit.reserve(100_000)).toBeLessThan(1)
    expectEndsAt(limit.reserve(100_000), 100, t0)
  })

  it("a new rate applies at once: what was reserved at the old rate is forgotten, waiters see a new generation", () => {
    const t0 = process.hrtime.bigint()
    const limit = RateLimit.make(1 * MB, 0)
    expectEndsAt(limit.reserve(1 * MB), 1000, t0) // the link is busy for the next second
    const generation = limit.generation
    const changed = process.hrtime.bigint()
    limit.set(10 * MB)
    expect(limit.generation).toBe(generation + 1n)
    // not behind the old megabyte: 1 MB at 10 MB/s is 100 ms, the next 100 ms after it
    expectEndsAt(limit.reserve(1 * MB), 100, changed)
    expectEndsAt(limit.reserve(1 * MB), 200, changed)
    // the same rate again changes nothing
    limit.set(10 * MB)
    expect(limit.generation).toBe(generation + 1n)
    expectEndsAt(limit.reserve(1 * MB), 300, changed)
    expect(() => limit.set(-1)).toThrow(RangeError)
  })

  it("threads share it: reservations from another thread queue behind this thread's", async () => {
    const t0 = process.hrtime.bigint()
    const limit = RateLimit.make(1 * MB, 0)
    expectEndsAt(limit.reserve(500_000), 500, t0)
    const worker = new WorkerThreads.Worker(
      `const { parentPort, workerData } = require("node:worker_threads")
       const state = new BigInt64Array(workerData)
       // the same arithmetic as RateLimit.reserve, on the shared state (a plain CommonJS worker cannot import TS)
       const rate = Atomics.load(state, 1), cost = BigInt(Math.ceil(500000 * 1e9 / Number(rate)))
       const t = process.hrtime.bigint(), next = Atomics.load(state, 0)
       const start = next < t ? t : next
       Atomics.store(state, 0, start + cost)
       parentPort.postMessage(Number(start + cost - t) / 1e6)`,
      { eval: true, workerData: limit.buffer }
    )
    const theirs = await new Promise<number>((resolve) => worker.once("message", resolve))
    await worker.terminate()
    expect(theirs).toBeGreaterThan(0) // its slot ends 1000 ms after t0, behind this thread's 500 KB
    // behind both: its 100 KB end 1100 ms after t0
    const wait = limit.reserve(100_000)
    const since = Number(process.hrtime.bigint() - t0) / 1e6
    expect(wait).toBeCloseTo(1100 - since, -1)
  })
})
