/**
 * A TCP proxy on loopback that a test drives chunk by chunk: every connection is forwarded to `target`, told
 * apart by its first bytes (`main`: the control magic; a multifd channel's id, read off its init packet, with
 * whether the init packet carries a nonce: a re-attaching connection), and `onChunk` decides, for each chunk
 * either way, what the proxy does with it: forward it (the default), hold it back, or break the connection
 * there (`reset`: RST both ways; `fin`: end both ways; either after forwarding the first `keep` bytes of the
 * chunk), or forward other bytes in its place (`Replace`). Held chunks go on with `release`. The connections can also be broken from outside (`breakAll`). Scoped:
 * closing the scope destroys every socket, then the server.
 */
import * as Effect from "effect/Effect"
import * as Net from "node:net"
import * as Control from "../../src/Control.js"
import * as Protocol from "../../src/Protocol.js"
import type * as Transport from "../../src/Transport.js"
import { loopbackServer } from "./tcpServer.js"

export type Role = "main" | number | "other"

/** One proxied connection. */
export interface Link {
  readonly index: number
  /** Known once the first bytes came (`undefined` before). */
  role: Role | undefined
  /** A multifd init packet with a nonce (a re-attaching connection). */
  reattaching: boolean
  /**
   * A multifd channel's packets, as far as they have come from the client (judged chunks included): where each
   * one ends in the client's bytes (the init packet counted), and whether it is a SYNC.
   */
  readonly packets: Array<{ readonly end: number; readonly sync: boolean }>
  /** Bytes of the client judged before the chunk being judged (forwarded, replaced or not). */
  judged: number
  /** Bytes forwarded from the client (up) and from the server (down). */
  up: number
  down: number
  broken: boolean
  readonly client: Net.Socket
  readonly upstream: Net.Socket
  /** Breaks the connection now: RST (`reset`) or FIN (`fin`) both ways. */
  readonly breakNow: (how: "reset" | "fin") => void
}

/** What to do with a chunk. */
export type Verdict =
  | undefined
  | { readonly _tag: "Forward" }
  | { readonly _tag: "Hold" }
  | { readonly _tag: "Break"; readonly how: "reset" | "fin"; readonly keep?: number | undefined }
  /** Forwards `bytes` instead of the chunk. */
  | { readonly _tag: "Replace"; readonly bytes: Buffer }

export interface HostileProxy {
  readonly address: Transport.Address
  readonly links: ReadonlyArray<Link>
  /** Forwards every held chunk (in order) and lets the held connections go on. */
  readonly release: () => void
  /** Sends the connections accepted from now on to `target` instead. */
  readonly retarget: (target: Transport.Address) => void
}

export const hostileProxy = (
  target: Transport.Address,
  onChunk: (link: Link, direction: "up" | "down", chunk: Buffer, links: ReadonlyArray<Link>) => Verdict
) =>
  Effect.gen(function*() {
    const links: Array<Link> = []
    const held: Array<() => void> = []
    // a chunk released after a hold is not judged again
    const released = new WeakSet<Buffer>()
    // where new connections go (`retarget`: a destination restarted on the same address)
    let port = target._tag === "Tcp" ? target.port : 0
    const { address } = yield* loopbackServer((client, track) => {
      const upstream = Net.connect({ host: "127.0.0.1", port })
      track(upstream)
      let head = Buffer.alloc(0)
      const link: Link = {
        index: links.length,
        role: undefined,
        reattaching: false,
        packets: [],
        judged: 0,
        up: 0,
        down: 0,
        broken: false,
        client,
        upstream,
        breakNow: (how) => {
          if (link.broken) return
          link.broken = true
          if (how === "reset") {
            client.resetAndDestroy()
            upstream.resetAndDestroy()
          } else {
            client.end()
            upstream.end()
            client.destroySoon()
            upstream.destroySoon()
          }
        }
      }
      links.push(link)
      // the multifd packets of the client's bytes (4 KiB pages): after the init packet, headers, each saying the
      // size of the payload after it
      const HEADER = Protocol.headerSize(4096)
      let scanned = 0
      let packetStart = Protocol.INIT_PACKET_SIZE
      let header = Buffer.alloc(0)
      let notMultifd = false
      const scan = (chunk: Buffer) => {
        const from = scanned
        scanned += chunk.length
        if (from === 0 && (chunk.length < 4 || chunk.readUInt32BE(0) !== Protocol.MAGIC)) notMultifd = true
        if (notMultifd) return
        let at = Math.max(packetStart, from)
        while (at < scanned) {
          if (header.length < 24) {
            const take = Math.min(24 - header.length, scanned - at)
            header = Buffer.concat([header, chunk.subarray(at - from, at - from + take)])
            at += take
            if (header.length < 24) return
          }
          const end = packetStart + HEADER + header.readUInt32BE(20)
          link.packets.push({ end, sync: (header.readUInt32BE(8) & 1) === 1 })
          packetStart = end
          header = Buffer.alloc(0)
          at = end
        }
      }
      // chunks of each direction are handled in order, one held chunk holding the ones after it
      const queues = { up: [] as Array<Buffer>, down: [] as Array<Buffer> }
      const holding = { up: false, down: false }
      const pump = (direction: "up" | "down") => {
        const to = direction === "up" ? upstream : client
        while (!holding[direction] && queues[direction].length > 0 && !link.broken) {
          const chunk = queues[direction][0]!
          if (direction === "up" && link.role === undefined) {
            head = Buffer.concat([head, chunk.subarray(0, 64)])
            if (head.length >= 4) {
              const magic = head.readUInt32BE(0)
              if (magic === Control.MAGIC) link.role = "main"
              else if (magic !== Protocol.MAGIC) link.role = "other"
              else if (head.length >= 64) {
                link.role = head[24]!
                link.reattaching = head.subarray(32, 48).some((b) => b !== 0)
              }
            }
          }
          const verdict = released.has(chunk) ? undefined : onChunk(link, direction, chunk, links)
          if (verdict?._tag === "Hold") {
            holding[direction] = true
            held.push(() => {
              holding[direction] = false
              released.add(chunk)
              pump(direction)
            })
            return
          }
          queues[direction].shift()
          if (direction === "up") link.judged += chunk.length
          if (verdict?._tag === "Break") {
            const keep = verdict.keep ?? 0
            if (keep > 0) to.write(chunk.subarray(0, keep), () => link.breakNow(verdict.how))
            else link.breakNow(verdict.how)
            return
          }
          const bytes = verdict?._tag === "Replace" ? verdict.bytes : chunk
          if (direction === "up") link.up += bytes.length
          else link.down += bytes.length
          to.write(bytes)
        }
      }
      client.on("data", (chunk: Buffer) => {
        scan(chunk)
        queues.up.push(chunk)
        pump("up")
      })
      upstream.on("data", (chunk: Buffer) => {
        queues.down.push(chunk)
        pump("down")
      })
      client.on("end", () => link.broken || upstream.end())
      upstream.on("end", () => link.broken || client.end())
      client.on("close", () => upstream.destroy())
      upstream.on("close", () => client.destroy())
    })
    return {
      address,
      links,
      release: () => {
        for (const go of held.splice(0)) go()
      },
      retarget: (next) => {
        port = next._tag === "Tcp" ? next.port : 0
      }
    } satisfies HostileProxy
  })
