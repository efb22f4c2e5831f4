/**
 * A man in the middle for TLS tests: a TCP proxy on loopback that forwards every connection to `target`
 * unchanged (half-closes included) and, on the `connection`-th one it accepts (0 = the first: a migration's
 * main channel), tampers with one direction once the handshake is over: inside the body of that direction's
 * `record`-th encrypted record (type application_data, 0x17) after the client's Finished, it either flips one
 * byte of ciphertext (`flip`) or stops forwarding there and ends that direction with a FIN (`truncate`: a peer
 * that vanishes mid-record). Scoped: closing the scope destroys every socket, then the server.
 */
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Net from "node:net"
import type * as Transport from "../../src/Transport.js"
import { loopbackServer } from "./tcpServer.js"
import { TlsRecords } from "./tlsRecords.js"

/** What to do to the stream, where. */
export interface TamperPlan {
  /** Which accepted connection (0 = the first). */
  readonly connection: number
  /** `up`: client (source) → server (destination); `down`: the other way. */
  readonly direction: "up" | "down"
  /** Which application_data record after the handshake (0 = the first). */
  readonly record: number
  readonly mode: "flip" | "truncate"
  /**
   * After the tampering, drop what the other direction carries (the receiver's alert): only the side that
   * detected the tampering can tell.
   */
  readonly swallowReply?: boolean | undefined
}

const CHANGE_CIPHER_SPEC = 20
const HANDSHAKE = 22
const APPLICATION_DATA = 23

/** Starts the proxy; `tampered` completes once the tampering happened. */
export const tamperProxy = (target: Transport.Address, plan: TamperPlan) =>
  Effect.gen(function*() {
    const tampered = yield* Deferred.make<void>()
    let accepted = 0
    const port = target._tag === "Tcp" ? target.port : 0
    const { address } = yield* loopbackServer((client, track) => {
      const index = accepted++
      const upstream = Net.connect({ host: "127.0.0.1", port, allowHalfOpen: true })
      track(upstream)
      // the handshake is over once the client's Finished went by: its first encrypted record after its
      // ChangeCipherSpec (TLS 1.3), or its first handshake record after it (TLS 1.2)
      let secured = false
      let done = false
      let clientChangedCipher = false
      const pipe = (from: Net.Socket, to: Net.Socket, direction: "up" | "down") => {
        const targeted = index === plan.connection && direction === plan.direction
        let counted = 0
        let bodyNext = false
        let cut = false
        const records = new TlsRecords()
        /** Whether a record counts: an encrypted application_data record after the handshake. */
        const counts = (type: number) => {
          const after = secured
          if (direction === "up" && !secured) {
            if (type === CHANGE_CIPHER_SPEC) clientChangedCipher = true
            else if (clientChangedCipher && (type === APPLICATION_DATA || type === HANDSHAKE)) secured = true
          }
          return after && type === APPLICATION_DATA
        }
        from.on("data", (chunk: Buffer) => {
          if (cut) return
          if (!targeted && plan.swallowReply === true && index === plan.connection && done) return
          // where the bodies of the counted records that start in this chunk begin, and their lengths
          const starts: Array<readonly [number, number]> = []
          records.scan(chunk, (type, length, at) => {
            if (counts(type) && length > 0) starts.push([at, length])
          })
          if (targeted) {
            // a body that begins in the next chunk is tampered with at its first byte
            const found = bodyNext ? [0] : []
            bodyNext = false
            for (const [at, length] of starts) {
              if (counted++ !== plan.record) continue
              if (at === chunk.length) bodyNext = true
              // the middle of the record's body, or the last byte of it in this chunk
              else found.push(Math.min(at + Math.floor(length / 2), chunk.length - 1))
            }
            const middle = found[0]
            if (middle !== undefined) {
              done = true
              Deferred.unsafeDone(tampered, Exit.void)
              if (plan.mode === "flip") {
                const copy = Buffer.from(chunk)
                copy[middle] = copy[middle]! ^ 0x5a
                to.write(copy)
              } else {
                cut = true
                to.end(chunk.subarray(0, middle))
              }
              return
            }
          }
          to.write(chunk)
        })
        from.on("end", () => {
          if (!cut) to.end()
        })
        from.on("error", () => to.destroy())
        from.on("close", () => {
          if (!to.writableEnded) to.destroy()
        })
      }
      pipe(client, upstream, "up")
      pipe(upstream, client, "down")
    }, { allowHalfOpen: true })
    return { address, tampered }
  })
