/**
 * A TCP proxy for tests that makes the multifd channels a slow link: every connection is forwarded to
 * `target`; what a multifd channel's client sends (its first bytes are the multifd magic) is read at once and
 * held in the proxy, then passed on at `rate` bytes a second (in pieces every 20 ms), so the source's writes all
 * complete quickly while its bytes reach the destination slowly — as on a link whose buffers hold a round's
 * last bytes for longer than the peer timeout. With `hold`, the proxy reads a channel only while it holds less
 * than that: the source's socket buffers fill and its writes wait (the kernel says a full socket is writable
 * again only once a good part of its buffer drained: seconds at a slow rate). `stopAfter` bytes a connection,
 * nothing more is passed on (a link that went dead). The main channel and everything the destination sends pass at once. `close` destroys
 * every socket and the server and resolves once the server is closed.
 */
import * as Net from "node:net"
import * as Protocol from "../../src/Protocol.js"
import { openSockets } from "./sockets.js"

export interface SlowLink {
  readonly port: number
  /** Bytes of the multifd channels passed on to the destination so far. */
  readonly passed: () => number
  readonly close: () => Promise<void>
}

const TICK_MS = 20

export const slowLink = (
  target: { readonly host: string; readonly port: number },
  plan: { readonly rate: number; readonly stopAfter?: number | undefined; readonly hold?: number | undefined }
): Promise<SlowLink> =>
  new Promise((resolve, reject) => {
    const { destroyAll, track } = openSockets()
    const timers = new Set<NodeJS.Timeout>()
    let passed = 0
    const server = Net.createServer((client) => {
      track(client)
      const upstream = Net.connect(target.port, target.host)
      track(upstream)
      upstream.pipe(client)
      let held: Array<Buffer> = []
      let holding = 0
      let multifd: boolean | undefined
      let sent = 0
      let ended = false
      const budget = Math.max(1, Math.round(plan.rate * TICK_MS / 1000))
      const pass = () => {
        let room = Math.min(budget, (plan.stopAfter ?? Infinity) - sent)
        while (room > 0 && held.length > 0) {
          const chunk = held[0]!
          const piece = chunk.subarray(0, room)
          upstream.write(piece)
          sent += piece.length
          passed += piece.length
          room -= piece.length
          holding -= piece.length
          if (piece.length === chunk.length) held.shift()
          else held[0] = chunk.subarray(piece.length)
        }
        if (plan.hold !== undefined && holding < plan.hold && client.isPaused()) client.resume()
        if (ended && held.length === 0) {
          clearInterval(timer)
          timers.delete(timer)
          upstream.end()
        }
      }
      const timer = setInterval(pass, TICK_MS)
      timers.add(timer)
      client.on("data", (chunk: Buffer) => {
        if (multifd === undefined) multifd = chunk.length >= 4 && chunk.readUInt32BE(0) === Protocol.MAGIC
        if (!multifd) return void upstream.write(chunk)
        held.push(chunk)
        holding += chunk.length
        if (plan.hold !== undefined && holding >= plan.hold) client.pause()
      })
      client.on("end", () => {
        ended = true
        if (!multifd) upstream.end()
      })
      const stop = () => {
        clearInterval(timer)
        timers.delete(timer)
        held = []
        client.destroy()
        upstream.destroy()
      }
      client.on("close", stop)
      upstream.on("close", stop)
    })
    server.on("error", reject)
    server.listen(0, "127.0.0.1", () => {
      resolve({
        port: (server.address() as Net.AddressInfo).port,
        passed: () => passed,
        close: () =>
          new Promise<void>((done) => {
            for (const timer of timers) clearInterval(timer)
            destroyAll()
            server.close(() => done())
          })
      })
    })
  })
