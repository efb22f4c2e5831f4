/**
 * A destination channel's decoding as a session in a channel thread: the main thread reads the channel's
 * socket and validates each header, reads a compressed packet's payload into a slot of the channel's ring
 * (shared memory) with the packet's page offsets beside it, and posts `Packet`; this session decompresses the
 * payload (`PageCodec.payloadDecoder`: the channel's one stream, fed in the channel's order), checks the
 * decoded length, and only then writes the pages into guest memory (shared) and clears the packet's zero
 * pages. A payload that does not decode ends the session with its `CodecError`, no page of it written.
 *
 * Both directions go through shared memory, with a message only to wake a side that sleeps (a message to an
 * idle thread is a wake-up: on a VM, an interrupt to another CPU, the dearest part of a hand-off). The owner
 * writes a packet's numbers into its slot and counts it in `SUBMITTED`, and posts `Go` only if the session
 * said it was `SLEEPING`; a woken session handles every packet submitted, synchronously, before it sleeps
 * again. `DONE` counts the packets handled (their slots are free again); the owner sets `WAITING` before it
 * waits, and a session that sees it set after a packet clears it and posts `Wake`. Each side says it sleeps
 * or waits before it looks a last time, so no wake-up is lost. `FAILED` is set before a failing session
 * ends, for an owner that looks without waiting.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as GuestRam from "../../GuestRam.js"
import * as PageCodec from "../../PageCodec.js"
import type { SessionIo } from "./protocol.js"

/** The kind of session (`ChannelThreads` opens it by this name). */
export const KIND = "multifd-decode"

/** Slots of the control words (an `Int32Array` over `Data.control`). */
export const DONE = 0
export const WAITING = 1
export const FAILED = 2
export const SUBMITTED = 3
export const SLEEPING = 4
/** Then each slot's packet: block number, payload size, normal pages, zero pages. */
export const PACKETS = 5
export const PACKET_WORDS = 4
export const controlWords = (depth: number): number => PACKETS + depth * PACKET_WORDS

/** A block of guest memory as it crosses: its shared buffer (not copied) and where the block lies in it. */
export interface SharedBlock {
  readonly buffer: SharedArrayBuffer
  readonly byteOffset: number
  readonly length: number
}

/** How a channel's ring is laid out: `depth` slots of `payloadBytes`, then `depth` arrays of `slots` offsets. */
export interface Ring {
  readonly buffer: SharedArrayBuffer
  readonly depth: number
  readonly payloadBytes: number
  readonly slots: number
}

/** Where a ring's slot `slot` keeps its payload and its offsets. */
export const ringViews = (ring: Ring, slot: number): { payload: Buffer; offsets: Float64Array } => ({
  payload: Buffer.from(ring.buffer, slot * ring.payloadBytes, ring.payloadBytes),
  offsets: new Float64Array(ring.buffer, ring.depth * ring.payloadBytes + slot * ring.slots * 8, ring.slots)
})

/** A ring of `depth` slots for payloads of up to `payloadBytes` and packets of up to `slots` pages. */
export const makeRing = (depth: number, payloadBytes: number, slots: number): Ring => {
  const aligned = Math.ceil(payloadBytes / 8) * 8
  return { buffer: new SharedArrayBuffer(depth * (aligned + slots * 8)), depth, payloadBytes: aligned, slots }
}

/** What a decode session is opened with. */
export interface Data {
  readonly compression: "zlib" | "zstd"
  readonly channel: number
  readonly pageSize: number
  /** Guest memory, by block number. */
  readonly blocks: ReadonlyArray<SharedBlock>
  readonly ring: Ring
  /** `controlWords(ring.depth)` words: `DONE`, `WAITING`, `FAILED`, `SUBMITTED`, `SLEEPING`, the packets. */
  readonly control: SharedArrayBuffer
}

/**
 * To the session: packets were submitted while it slept (each in the next slot of the ring, in turn: `size`
 * payload bytes, `normal` pages then `zero` zero pages at the slot's offsets, in block number `block`).
 */
export type In = "Go"

/** From the session: the owner waits and a packet is done. */
export type Out = "Wake"

/** The session's program: decode every packet, in order, until closed or a payload fails. */
export const run = (
  data: Data,
  io: SessionIo<In, Out>
): Effect.Effect<void, PageCodec.CodecError, Scope.Scope> =>
  Effect.gen(function*() {
    const { pageSize, ring } = data
    const decoder = yield* PageCodec.payloadDecoder(data.compression, data.channel)
    const control = new Int32Array(data.control)
    const memory = data.blocks.map((block) => Buffer.from(block.buffer, block.byteOffset, block.length))
    const slots = Array.from({ length: ring.depth }, (_, slot) => ringViews(ring, slot))
    let handled = 0
    /** Handles every packet submitted, then sleeps; the first payload that does not decode instead. */
    const drain = (): PageCodec.CodecError | undefined => {
      while (true) {
        while (handled < Atomics.load(control, SUBMITTED)) {
          const slot = handled % ring.depth
          const at = PACKETS + slot * PACKET_WORDS
          const bytes = memory[control[at]!]!
          const size = control[at + 1]!
          const normal = control[at + 2]!
          const zero = control[at + 3]!
          const { offsets, payload } = slots[slot]!
          if (normal > 0) {
            const wrong = decoder.decode(payload.subarray(0, size), bytes, offsets, normal, pageSize)
            if (wrong !== undefined) return wrong
          }
          for (let i = normal; i < normal + zero; i++) GuestRam.clearPage(bytes, offsets[i]!, pageSize)
          Atomics.store(control, DONE, ++handled)
          if (Atomics.exchange(control, WAITING, 0) === 1) io.unsafeSend("Wake")
        }
        // said before looking: a packet submitted after the look finds it said, and posts Go
        Atomics.store(control, SLEEPING, 1)
        if (Atomics.load(control, SUBMITTED) === handled) return undefined
        Atomics.store(control, SLEEPING, 0)
      }
    }
    while (true) {
      yield* io.receive
      const wrong = drain()
      if (wrong !== undefined) {
        Atomics.store(control, FAILED, 1)
        return yield* wrong
      }
    }
  })
