/**
 * Page payload codecs: how a packet's normal pages travel. `none` sends views of guest memory (no copy) and
 * reads straight into it; compressed methods keep one stream per channel for the channel's life.
 *
 * @since 0.1.0
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import type * as Protocol from "./Protocol.js"
import type * as Transport from "./Transport.js"

/** A payload that does not decode, or decodes to something other than its pages. */
export class CodecError extends Data.TaggedError("CodecError")<{
  readonly reason: "Corrupt" | "TooLarge" | "TooShort" | "Unavailable"
  readonly channel: number | undefined
  readonly detail: string
}> {
  override get message(): string {
    return this.channel === undefined
      ? `compression: ${this.detail}`
      : `multifd channel ${this.channel}: bad payload: ${this.detail}`
  }
}

/** Turns a packet's normal pages into payload chunks. */
export interface Encoder {
  /**
   * Appends the payload of the `normal` pages at `offsets` of `memory` to `chunks` and returns its size.
   * The chunks stay valid until the next call.
   */
  readonly encode: (
    memory: Buffer,
    offsets: Float64Array,
    normal: number,
    pageSize: number,
    chunks: Array<Uint8Array>
  ) => Effect.Effect<number, CodecError>
}

/** Reads a packet's payload from a connection into the normal pages' places in memory. */
export interface Decoder {
  readonly decode: (
    connection: Transport.Connection,
    size: number,
    memory: Buffer,
    offsets: Float64Array,
    normal: number,
    pageSize: number
  ) => Effect.Effect<void, CodecError | Transport.TransportError>
}

/** Raw pages: contiguous runs go out as one view of guest memory each. */
const rawEncoder: Encoder = {
  encode: (memory, offsets, normal, pageSize, chunks) =>
    Effect.sync(() => {
      let i = 0
      while (i < normal) {
        const start = offsets[i]!
        let end = start + pageSize
        i++
        while (i < normal && offsets[i] === end) {
          end += pageSize
          i++
        }
        chunks.push(memory.subarray(start, end))
      }
      return normal * pageSize
    })
}

/** Raw pages: read straight into guest memory, one copy. */
const rawDecoder: Decoder = {
  decode: (connection, _size, memory, offsets, normal, pageSize) =>
    connection.readScatter(memory, offsets, normal, pageSize)
}

/** The encoder for a channel (its compression stream, if any, is released with the scope). */
export const encoder = (
  compression: Protocol.Compression,
  _level?: number | undefined
): Effect.Effect<Encoder, CodecError, Scope.Scope> =>
  compression === "none"
    ? Effect.succeed(rawEncoder)
    : new CodecError({ reason: "Unavailable", channel: undefined, detail: `${compression} is not supported yet` })

/** The decoder for a channel (its decompression stream, if any, is released with the scope). */
export const decoder = (
  compression: Protocol.Compression,
  channel: number
): Effect.Effect<Decoder, CodecError, Scope.Scope> =>
  compression === "none"
    ? Effect.succeed(rawDecoder)
    : new CodecError({ reason: "Unavailable", channel, detail: `${compression} is not supported yet` })
