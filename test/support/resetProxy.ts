/**
 * A TCP proxy for tests that resets one multifd channel's connection: it forwards every connection to `target`
 * and, for the first `times` connections whose init packet names `channel` (or the `connection`-th accepted),
 * resets both sides (RST) — or with `silent` stops forwarding anything — once `afterBytes` bytes came from the client — the network failing under a migration, wherever its channels run
 * (a channel thread included, which a wrapped transport cannot reach). `close` destroys every socket and the
 * server and resolves once the server is closed.
 */
import * as Net from "node:net"
import * as Protocol from "../../src/Protocol.js"
import { openSockets } from "./sockets.js"

export interface ResetProxy {
  readonly port: number
  /** Connections reset so far. */
  readonly resets: () => number
  /** Connections accepted so far. */
  readonly connections: () => number
  readonly close: () => Promise<void>
}

export const resetProxy = (
  target: { readonly host: string; readonly port: number },
  plan: {
    readonly channel: number
    readonly afterBytes: number
    readonly times?: number | undefined
    /** Resets the `connection`-th connection accepted (0 = the first) instead (TLS: the init packet is secret). */
    readonly connection?: number | undefined
    /**
     * Instead of resetting: the path goes silent — nothing more is forwarded either way and nothing is closed
     * or reset on either side (a network that drops everything); the client's socket stays open until `close`.
     */
    readonly silent?: boolean | undefined
  }
): Promise<ResetProxy> =>
  new Promise((resolve, reject) => {
    const { destroyAll, track } = openSockets()
    let resets = 0
    let connections = 0
    const server = Net.createServer((client) => {
      const index = connections++
      track(client)
      const upstream = Net.connect(target.port, target.host)
      track(upstream)
      let head = Buffer.alloc(0)
      let targeted: boolean | undefined
      let forwarded = 0
      let cut = false
      const reset = () => {
        resets++
        client.resetAndDestroy()
        upstream.resetAndDestroy()
      }
      client.on("data", (chunk: Buffer) => {
        if (cut) return
        if (targeted === undefined && head.length < 25) {
          head = Buffer.concat([head, chunk.subarray(0, 25)])
          if (head.length >= 25) {
            targeted = resets < (plan.times ?? 1) && (plan.connection !== undefined
              ? index === plan.connection
              : head.readUInt32BE(0) === Protocol.MAGIC && head[24] === plan.channel)
          }
        }
        if (targeted === true && forwarded + chunk.length > plan.afterBytes && plan.silent === true) {
          // neither side hears anything more of the other, whatever it does
          upstream.write(chunk.subarray(0, plan.afterBytes - forwarded))
          resets++
          cut = true
          targeted = false
          upstream.unpipe(client)
          client.pause()
          return
        }
        if (targeted === true && forwarded + chunk.length > plan.afterBytes) {
          upstream.write(chunk.subarray(0, plan.afterBytes - forwarded), reset)
          targeted = false
          forwarded = plan.afterBytes
          client.pause()
          return
        }
        forwarded += chunk.length
        if (!upstream.write(chunk)) {
          client.pause()
          upstream.once("drain", () => cut || client.resume())
        }
      })
      client.on("end", () => cut || upstream.end())
      upstream.on("end", () => cut || client.end())
      upstream.on("close", () => cut || client.destroy())
      client.on("close", () => cut || upstream.destroy())
      upstream.pipe(client, { end: false })
    })
    server.on("error", reject)
    server.listen(0, "127.0.0.1", () =>
      resolve({
        port: (server.address() as Net.AddressInfo).port,
        resets: () => resets,
        connections: () => connections,
        close: () =>
          new Promise<void>((done) => {
            destroyAll()
            server.close(() => done())
          })
      }))
  })
