/**
 * A TCP listener whose connects never complete, for tests that need a connect stalled for real (not through a
 * wrapped transport, which a channel in another thread does not use): a listener with a backlog of one in a
 * worker thread whose event loop is blocked (`Atomics.wait`), so that it accepts nothing; two connections fill
 * the kernel's accept queue, and every connect after them waits for a SYN-ACK that does not come. Closing the
 * scope destroys the two connections, wakes the thread and terminates it.
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as Net from "node:net"
import * as WorkerThreads from "node:worker_threads"
import * as Transport from "../../src/Transport.js"

const LISTENER = `
const { parentPort, workerData } = require("node:worker_threads")
const server = require("node:net").createServer(() => {})
server.listen({ port: 0, host: "127.0.0.1", backlog: 1 }, () => {
  parentPort.postMessage(server.address().port)
  Atomics.wait(workerData.gate, 0, 0)
})
`

const connected = (port: number) =>
  Effect.acquireRelease(
    Effect.async<Net.Socket, Error>((resume) => {
      const socket = Net.connect({ host: "127.0.0.1", port })
      socket.once("connect", () => resume(Effect.succeed(socket)))
      socket.once("error", (error) => resume(Effect.fail(error)))
    }),
    Transport.destroy
  )

/** The listener's address; every connect to it stalls (until the scope closes). */
export const stalledListener: Effect.Effect<Transport.Address, Error, Scope.Scope> = Effect.gen(
  function*() {
    const gate = new Int32Array(new SharedArrayBuffer(4))
    const worker = yield* Effect.acquireRelease(
      Effect.sync(() => new WorkerThreads.Worker(LISTENER, { eval: true, workerData: { gate } })),
      (worker) =>
        Effect.promise(() => {
          Atomics.store(gate, 0, 1)
          Atomics.notify(gate, 0)
          return worker.terminate()
        })
    )
    const port = yield* Effect.async<number, Error>((resume) => {
      worker.once("message", (port: number) => resume(Effect.succeed(port)))
      worker.once("error", (error) => resume(Effect.fail(error)))
    })
    // the accept queue (backlog 1: two connections) filled
    yield* connected(port)
    yield* connected(port)
    return { _tag: "Tcp", host: "127.0.0.1", port }
  }
)
