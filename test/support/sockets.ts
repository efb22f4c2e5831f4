/**
 * Connected sockets for transport tests: a listener and one client connected to it, over the real Transport.
 */
import * as Effect from "effect/Effect"
import { type Address, connect, listen } from "../../src/Transport.js"

/** Listens on `address` and connects one client to it, both in the current scope. */
export const pair = (address: Address) =>
  Effect.gen(function*() {
    const listener = yield* listen(address)
    const [client, server] = yield* Effect.all([connect(listener.address), listener.accept], { concurrency: 2 })
    return { listener, client, server }
  })
