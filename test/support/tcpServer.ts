/**
 * A raw TCP server on loopback for tests that play a peer below the migration's own code (a TLS server that
 * drops or stalls the handshake, a proxy that watches TLS records): scoped, so that closing the test's scope
 * destroys every socket it tracks and then closes the server.
 */
import * as Effect from "effect/Effect"
import * as Net from "node:net"
import * as Transport from "../../src/Transport.js"

const LOOPBACK = "127.0.0.1"

/**
 * Listens on a fresh loopback port; `onConnection` gets each accepted socket (already tracked) and `track`, for
 * other sockets to destroy with the server (a proxy's upstream connections). Tracked sockets ignore their errors.
 */
export const loopbackServer = (
  onConnection: (socket: Net.Socket, track: (socket: Net.Socket) => void) => void,
  options: Net.ServerOpts = {}
) =>
  Effect.gen(function*() {
    const sockets = new Set<Net.Socket>()
    const track = (socket: Net.Socket) => {
      socket.on("error", () => {})
      sockets.add(socket)
      socket.once("close", () => sockets.delete(socket))
    }
    const server = yield* Effect.acquireRelease(
      Effect.async<Net.Server>((resume) => {
        const server = Net.createServer(options, (socket) => {
          track(socket)
          onConnection(socket, track)
        })
        server.listen(0, LOOPBACK, () => resume(Effect.succeed(server)))
      }),
      (server) =>
        Effect.zipRight(
          Effect.forEach(Array.from(sockets), Transport.destroy, { discard: true }),
          Effect.async<void>((resume) => {
            server.close(() => resume(Effect.void))
          })
        )
    )
    const address: Transport.Address = { _tag: "Tcp", host: LOOPBACK, port: (server.address() as Net.AddressInfo).port }
    return { address }
  })
