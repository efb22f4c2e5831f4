/**
 * A source channel as a session in a channel thread: the same work as `MultifdSend`'s in-process channel
 * (`sendChannel`: connect, TLS, init packet, zero-page test, compression, writes), on a socket of this thread,
 * reading guest memory in place (shared memory, given once per channel and block). `Established` goes back once
 * the handshake and the init packet are done; then each hand-off of pages is answered by `Idle`, each SYNC by
 * `Synced`; `Finish` ends the channel gracefully, and the session's end says how it went. The counters (packet
 * number, stats) are the set's, in shared memory.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as TlsClient from "../tls/client.js"
import type { TlsError } from "../tls/model.js"
import * as Transport from "../../Transport.js"
import * as SendChannel from "../sendChannel.js"
import type { SessionIo } from "./protocol.js"

/** The kind of session (`ChannelThreads` opens it by this name). */
export const KIND = "multifd-send"

/** A block's memory as it crosses: its shared buffer (not copied) and where the block lies in it. */
export interface SharedBlock {
  readonly name: string
  readonly buffer: SharedArrayBuffer
  readonly byteOffset: number
  readonly length: number
}

/** What a channel session is opened with. */
export interface Data {
  readonly settings: SendChannel.Settings
  readonly address: Transport.Address
  readonly connectTimeoutMs: number | undefined
  /** The TLS client handshake's data (`Tls.clientData`), when the channel is secured. */
  readonly tls: TlsClient.ClientData | undefined
  /** The set's counters (`SendChannel.Counters`' memory). */
  readonly packetNum: SharedArrayBuffer
  readonly stats: SharedArrayBuffer
}

/** To the session: pages of block number `block` (its memory comes with the first hand-off of it), SYNC, the end. */
export type In =
  | {
    readonly _tag: "Pages"
    readonly block: number
    readonly memory: SharedBlock | undefined
    readonly pages: Uint32Array
    /** `SendChannel.Job`'s `origin`: the memory is a window of the block starting there. */
    readonly origin: number
    /** Answer `Idle` only once the hand-off's bytes are in the kernel (the owner then reuses the memory). */
    readonly drain: boolean
  }
  | { readonly _tag: "Sync" }
  | { readonly _tag: "Finish" }

/** From the session. */
export type Out =
  | { readonly _tag: "Established" }
  | { readonly _tag: "Idle" }
  | { readonly _tag: "Synced" }

/** How often a channel publishes what its socket accepted (the set reads it from shared memory). */
const PUBLISH_EVERY = "20 millis"

const established: Out = { _tag: "Established" }
const idle: Out = { _tag: "Idle" }
const synced: Out = { _tag: "Synced" }

/** The session's program: establish, say so, then serve the hand-offs until `Finish`. */
export const run = (
  data: Data,
  io: SessionIo<In, Out>
): Effect.Effect<void, SendChannel.Failure | TlsError, Scope.Scope> =>
  Effect.gen(function*() {
    const upgrade = data.tls === undefined ? undefined : yield* TlsClient.clientFromData(data.tls)
    const counters = SendChannel.countersOf(data.packetNum, data.stats)
    const channel = yield* SendChannel.establish(
      data.settings,
      Transport.connect(data.address, { timeout: data.connectTimeoutMs }),
      upgrade
    )
    yield* io.send(established)
    const blocks: Array<SendChannel.Memory> = []
    const next = Effect.map(io.receive, (message) => job(message))
    const job = (message: In): SendChannel.Job => {
      switch (message._tag) {
        case "Pages": {
          const shared = message.memory
          if (shared !== undefined) {
            blocks[message.block] = {
              name: shared.name,
              bytes: Buffer.from(shared.buffer, shared.byteOffset, shared.length)
            }
          }
          return {
            _tag: "Pages",
            block: blocks[message.block]!,
            pages: message.pages,
            count: message.pages.length,
            origin: message.origin,
            sent: message.drain ? Effect.void : undefined
          }
        }
        case "Sync":
          return { _tag: "Sync", done: io.send(synced) }
        case "Finish":
          return message
      }
    }
    yield* SendChannel.serve(data.settings, channel, counters, {
      next,
      idle: io.send(idle),
      publishEvery: PUBLISH_EVERY
    })
  })
