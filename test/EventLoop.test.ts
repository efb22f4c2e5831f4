/**
 * Timers and signals whatever the CPU does (issue 11): compression at high levels gives Node's event loop its
 * turn between pieces of a packet, and an inactivity timeout fires at most a quarter after its time.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as TestClock from "effect/TestClock"
import * as Crypto from "node:crypto"
import * as MigrationError from "../src/MigrationError.js"
import * as PageCodec from "../src/PageCodec.js"
import * as Protocol from "../src/Protocol.js"
import { unlessStalled } from "../src/internal/stall.js"

const PAGE = 4096

describe("compression lets the event loop run", () => {
  it.live("zstd level 19: a timer due while packets are compressed fires on time, not after them", () =>
    Effect.scoped(Effect.gen(function*() {
      const encoder = yield* PageCodec.encoder("zstd", 19)
      const slots = Protocol.slotsFor(PAGE)
      // four packets of random bytes with every other byte zero: 300–450 ms each at level 19 here
      const memory = Crypto.randomBytes(4 * slots * PAGE)
      for (let i = 0; i < memory.length; i += 2) memory[i] = 0
      const offsets = new Float64Array(slots)
      const chunks: Array<Uint8Array> = []
      // which packet was being compressed when the timer fired (4: only after all of them)
      let packet = 0
      let firedDuring: number | undefined
      const timer = setTimeout(() => (firedDuring = packet), 20)
      try {
        for (; packet < 4; packet++) {
          for (let i = 0; i < slots; i++) offsets[i] = (packet * slots + i) * PAGE
          chunks.length = 0
          expect(yield* encoder.encode(memory, offsets, slots, PAGE, chunks)).toBeGreaterThan(0)
        }
      } finally {
        clearTimeout(timer)
      }
      // it fired while the first packets were compressed (before, the whole loop ran without a turn for timers);
      // a count of packets rather than milliseconds, so that a loaded machine does not change the verdict
      expect(firedDuring).toBeDefined()
      expect(firedDuring!).toBeLessThan(2)
    })))
})

describe("inactivity timeouts (unlessStalled)", () => {
  /** Steps the clock 50 ms at a time, with progress at 100 ms only; returns when the watch failed. */
  const failsAt = (after: number) =>
    Effect.gen(function*() {
      let counter = 0
      const watch = yield* Effect.fork(unlessStalled(Effect.never, Effect.sync(() => counter), `${after} millis`, "without progress"))
      for (let t = 0; t <= 4 * after; t += 50) {
        if (t === 100) counter++
        yield* TestClock.adjust("50 millis")
        yield* Effect.yieldNow()
        const exit = yield* Fiber.poll(watch)
        if (exit._tag === "Some") {
          expect(exit.value._tag).toBe("Failure")
          const error = yield* Effect.flip(Fiber.join(watch))
          expect(error).toBeInstanceOf(MigrationError.MigrationError)
          expect(error.message).toBe(`timed out after ${after / 1000}s without progress`)
          return t + 50
        }
      }
      return Infinity
    })

  it.effect("fires between the timeout and 1.25 × it after the last progress (sampling once per timeout took up to 2 ×)", () =>
    Effect.gen(function*() {
      for (const after of [2000, 5000]) {
        const at = yield* failsAt(after)
        expect(at - 100).toBeGreaterThanOrEqual(after)
        expect(at - 100).toBeLessThanOrEqual(after * 1.25)
      }
    }))
})
