/**
 * The wire, byte by byte: what a broken path or a hostile peer does to the bytes of a migration, and what each
 * side then says. (Bit flips at every offset of the first packets, compressed payloads as an attack, header
 * fields at their limits and TCP half-closes and zero windows were swept in this round and found handled: see
 * Fuzz.test, Tamper.test, Sweeps.test, PageCodec.test and Lifecycle.test for the cases kept.)
 *
 * - A control message whose frame length was corrupted on the way (one bit of its length flipped: 131 072 bytes
 *   more announced) leaves its reader waiting for bytes its peer never sends, while the peer waits for the answer:
 *   both time out after the peer timeout, and the side inside the frame says so (where it said "without any data
 *   from the source", which was not true).
 *
 * Real sockets on loopback, fake peers (test/support/fakeSource.ts, fakeDestination.ts), the TestClock.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Option from "effect/Option"
import * as Crypto from "node:crypto"
import * as Control from "../src/Control.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import type * as MigrationError from "../src/MigrationError.js"
import * as Transport from "../src/Transport.js"
import { advanceUntil } from "./support/clock.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { fakeDestination } from "./support/fakeDestination.js"
import { BLOCK, BLOCK_PAGES, fakeSource, PAGE } from "./support/fakeSource.js"
import { leakFree } from "./support/handles.js"

const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }
const fiberDone = <A, E>(fiber: Fiber.Fiber<A, E>) => Effect.map(Fiber.poll(fiber), Option.isSome)

/** `message`'s frame with one bit of its length flipped (the second byte's: 131 072 bytes more announced). */
const corruptedFrame = (message: Control.Message) => {
  const frame = Control.encode(message)
  frame[1] = frame[1]! ^ 0x02
  return { frame, announced: frame.readUInt32BE(0) }
}

/** The timeout `fiber` failed with once the TestClock moved past it. */
const timeoutOf = <A, E>(fiber: Fiber.Fiber<A, E>, what: string) =>
  Effect.gen(function*() {
    yield* advanceUntil(fiberDone(fiber), what)
    const error = failureOf(yield* Fiber.await(fiber)) as unknown as MigrationError.MigrationError
    expect(error._tag).toBe("MigrationError")
    expect(error.reason).toBe("Timeout")
    expectOneLine(error)
    return error
  })

describe("a control message whose frame length was corrupted on the way (TestClock)", () => {
  it.effect("from the source: the destination times out saying it waited for the rest of the message, not 'without any data'", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: BLOCK, size: BLOCK_PAGES * PAGE }] })
      const listener = yield* Transport.listen(tcp0)
      const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, ram }))
      const source = yield* fakeSource(listener.address, 1, "none", true)
      yield* source.channel(0)
      // the final flush, its length 131 072 bytes more than its 39: the source then waits for the acknowledgement
      const { announced, frame } = corruptedFrame(new Control.Flush({ round: 0, final: true }))
      yield* source.control.write([frame])
      const error = yield* timeoutOf(destination, "the destination")
      expect(error.message).toBe(
        `timed out after 2s waiting for the rest of a control message of ${announced} bytes on the main channel`
      )
    })))

  it.effect("from the destination: the source times out waiting for the flush's acknowledgement, saying where the answer stopped", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: Crypto.randomBytes(16 * PAGE) }] })
      const { announced, frame } = corruptedFrame(new Control.FlushAck({ round: 0 }))
      // (its FlushAck after it is read as more of that frame)
      const address = yield* fakeDestination({ heartbeats: true, bye: true, onFlush: (control) => control.write([frame]) })
      const source = yield* Effect.forkScoped(
        Migration.migrate({ address, channels: 1, timeouts: TIMEOUTS, reconnect: 0 }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram)
        )
      )
      const error = yield* timeoutOf(source, "the source")
      expect(error.message).toBe(
        "timed out after 2s waiting for the destination to acknowledge the flush " +
          `(its answer stopped inside a control message of ${announced} bytes on the main channel)`
      )
    })))
})
