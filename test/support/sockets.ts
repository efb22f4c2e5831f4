/**
 * Sockets for tests: a listener and one client connected to it, over the real Transport; a test proxy's open
 * sockets.
 */
import * as Effect from "effect/Effect"
import type * as Net from "node:net"
import { type Address, connect, listen } from "../../src/Transport.js"

/** Listens on `address` and connects one client to it, both in the current scope. */
export const pair = (address: Address) =>
  Effect.gen(function*() {
    const listener = yield* listen(address)
    const [client, server] = yield* Effect.all([connect(listener.address), listener.accept], { concurrency: 2 })
    return { listener, client, server }
  })

/**
 * The open sockets of a test proxy: `track` adds one (its errors ignored: the proxy breaks connections on
 * purpose) until it closes; `destroyAll` destroys those still open.
 */
export const openSockets = () => {
  const sockets = new Set<Net.Socket>()
  return {
    track: (socket: Net.Socket) => {
      sockets.add(socket)
      socket.on("error", () => {})
      socket.on("close", () => sockets.delete(socket))
    },
    destroyAll: () => {
      for (const socket of sockets) socket.destroy()
    }
  }
}
