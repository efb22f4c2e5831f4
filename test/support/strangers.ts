/**
 * Strangers on a destination's listener (DESIGN §2.9: strangers are candidates, never owners): a connection
 * that writes some bytes and half-closes or stays silent, and the wait until the destination turned it away.
 */
import { expect } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Transport from "../../src/Transport.js"
import { noHang } from "./guards.js"

/** Connects a stranger that writes `bytes`, then half-closes (`close`) or stays silent. */
export const stranger = (address: Transport.Address, bytes: ReadonlyArray<Uint8Array>, close: boolean) =>
  Effect.gen(function*() {
    const connection = yield* Transport.connect(address)
    if (bytes.length > 0) yield* connection.write(bytes)
    if (close) yield* connection.end
    return connection
  })

/** Waits until the destination closed the stranger's connection (a clean end or a reset: it is gone). */
export const turnedAway = (connection: Transport.Connection, what: string) =>
  noHang(Effect.catchAll(connection.atEnd, () => Effect.succeed(true)), what).pipe(
    Effect.tap((ended) => expect(ended, `${what}: the destination sent data instead of closing`).toBe(true))
  )
