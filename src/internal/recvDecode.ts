/**
 * A destination channel's decoding on a channel thread (`ChannelThreads`), as `MultifdRecv` sees it: the
 * channel's reader (this thread, where the accepted socket must stay) validates each header as before, reads
 * a compressed payload into the next slot of the channel's ring (shared memory: no allocation a packet) and
 * `submit`s it with its offsets; the channel's decode session (`threads/decodeSession`) decompresses, checks
 * and writes the pages into guest memory (shared), and clears the packet's zero pages, in the channel's order.
 *
 * - Bounded: `DEPTH` packets in flight a channel; with the ring full the reader stops (`ready` is false) and
 *   waits for `room` before it reads on, so the socket's reads back up.
 * - Ordered: the reader waits until `drained` (every packet it submitted is in memory) before a SYNC is
 *   acknowledged and before the channel's end counts as its end.
 * - Failures name the channel: a payload that does not decode is the session's `CodecError` (none of that
 *   packet's pages written; nothing after it either); a thread that throws, exits or is terminated is a
 *   `ChannelError` around its `ThreadError`. `during` lets the reader hear either while it reads.
 * - Scoped: the session is a lease of the channel's scope; closing it ends the session in its thread (after
 *   the packet it is decoding, if any) and waits for that, so nothing writes memory after the channel ended.
 *
 * Used only when guest memory is shared (`GuestRam.allocate`): a thread can write nothing else.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import type * as ChannelThreads from "../ChannelThreads.js"
import type * as GuestRam from "../GuestRam.js"
import * as MigrationError from "../MigrationError.js"
import * as PageCodec from "../PageCodec.js"
import * as DecodeSession from "./threads/decodeSession.js"
import { type EncodedFailure, ThreadError } from "./threads/protocol.js"

/** Packets in flight a channel: enough to keep its thread busy while the reader reads the next. */
export const DEPTH = 4

/** What a decoding channel fails with. */
export type Failure = PageCodec.CodecError | MigrationError.ChannelError

/** A channel's decoding in its thread. */
export interface Offload {
  /** The buffer the next packet's payload is read into (its slot of the ring). */
  readonly slot: () => Buffer
  /** Hands the packet whose payload is in `slot()` to the thread: `normal` then `zero` pages at `offsets`. */
  readonly submit: (block: string, offsets: Float64Array, normal: number, zero: number, size: number) => void
  /** Whether a next packet can be read now: a free slot, and the thread has not failed. */
  readonly ready: () => boolean
  /** Waits for a free slot; fails with the thread's failure. */
  readonly room: Effect.Effect<void, Failure>
  /** Waits until every packet submitted is in memory; fails with the thread's failure. */
  readonly drained: Effect.Effect<void, Failure>
  /** Runs `self` until it ends or the thread fails, whichever comes first. */
  readonly during: <A, E, R>(self: Effect.Effect<A, E, R>) => Effect.Effect<A, E | Failure, R>
}

/** What a decode session's end means for its channel. */
const endOf = (channel: number, failure: EncodedFailure | undefined): Failure => {
  if (failure?._tag === "Error" && failure.tag === "CodecError") return new PageCodec.CodecError(failure.fields as never)
  const detail = failure === undefined || failure._tag === "Interrupted"
    ? "its decoding in its thread ended before the channel did"
    : `its thread failed: ${failure.message}`
  return new MigrationError.ChannelError({ channel, cause: new ThreadError({ reason: "Defect", detail }) })
}

/**
 * Opens `channel`'s decode session on `threads` for payloads of up to `maxPayload` bytes and packets of up to
 * `slots` pages. Every block of `ram` must be shared memory (`canWrite`).
 */
export const make = (
  threads: ChannelThreads.ChannelThreads["Type"],
  options: {
    readonly ram: GuestRam.GuestRam["Type"]
    readonly compression: "zlib" | "zstd"
    readonly channel: number
    readonly maxPayload: number
    readonly slots: number
  }
): Effect.Effect<Offload, never, Scope.Scope> =>
  Effect.gen(function*() {
    const { channel, ram } = options
    const numbers = new Map(ram.blocks.map((block, n) => [block.name, n]))
    const ring = DecodeSession.makeRing(DEPTH, options.maxPayload, options.slots)
    const views = Array.from({ length: DEPTH }, (_, slot) => DecodeSession.ringViews(ring, slot))
    const control = new Int32Array(new SharedArrayBuffer(DecodeSession.controlWords(DEPTH) * 4))
    // the session sleeps until the first packet
    Atomics.store(control, DecodeSession.SLEEPING, 1)
    const data: DecodeSession.Data = {
      compression: options.compression,
      channel,
      pageSize: ram.pageSize,
      blocks: ram.blocks.map((block) => ({
        buffer: block.bytes.buffer as SharedArrayBuffer,
        byteOffset: block.bytes.byteOffset,
        length: block.bytes.length
      })),
      ring,
      control: control.buffer as SharedArrayBuffer
    }
    const session = yield* threads.open<DecodeSession.In, DecodeSession.Out>(DecodeSession.KIND, data)
    yield* Effect.logDebug(`channel ${channel}: decoding on channel thread ${session.thread}`)
    let submitted = 0
    const free = () => submitted - Atomics.load(control, DecodeSession.DONE) < DEPTH
    const failed = () => Atomics.load(control, DecodeSession.FAILED) === 1
    /** The session's next word: a wake-up, or its end (a failure whatever it was). */
    const next: Effect.Effect<void, Failure> = Effect.flatMap(
      Effect.mapError(session.receive, (cause) => new MigrationError.ChannelError({ channel, cause })),
      (event) => event._tag === "Message" ? Effect.void : Effect.fail(endOf(channel, event.failure))
    )
    const waitUntil = (done: () => boolean): Effect.Effect<void, Failure> =>
      Effect.gen(function*() {
        while (true) {
          // said before looking: a packet handled after the look sees it and wakes this wait
          Atomics.store(control, DecodeSession.WAITING, 1)
          if (done()) {
            Atomics.store(control, DecodeSession.WAITING, 0)
            return
          }
          yield* next
        }
      })
    const watch: Effect.Effect<never, Failure> = Effect.forever(next)
    return {
      slot: () => views[submitted % DEPTH]!.payload,
      submit: (block, offsets, normal, zero, size) => {
        const slot = submitted % DEPTH
        views[slot]!.offsets.set(offsets.subarray(0, normal + zero))
        const at = DecodeSession.PACKETS + slot * DecodeSession.PACKET_WORDS
        control[at] = numbers.get(block)!
        control[at + 1] = size
        control[at + 2] = normal
        control[at + 3] = zero
        Atomics.store(control, DecodeSession.SUBMITTED, ++submitted)
        // a message only to wake the session (from the socket's read callback: no fiber here)
        if (Atomics.exchange(control, DecodeSession.SLEEPING, 0) === 1) session.unsafeSend("Go")
      },
      ready: () => free() && !failed(),
      room: waitUntil(() => free() && !failed()),
      drained: waitUntil(() => submitted === Atomics.load(control, DecodeSession.DONE)),
      during: (self) => Effect.raceFirst(self, watch)
    } satisfies Offload
  })

/** Whether a channel thread can write `ram`: every block in shared memory. */
export const canWrite = (ram: GuestRam.GuestRam["Type"]): boolean =>
  ram.blocks.every((block) => block.bytes.buffer instanceof SharedArrayBuffer)

/** A payload decoder that only checks sizes, for a channel whose thread decodes (`submit`). */
export const checkOnly = (compression: "zlib" | "zstd", channel: number): PageCodec.PayloadDecoder => ({
  check: PageCodec.payloadCheck(compression, channel),
  decode: () => {
    throw new Error(`multifd channel ${channel}: its payloads are decoded in its thread`)
  }
})
