/**
 * Page payload codecs: how a packet's normal pages travel. `none` sends views of guest memory (no copy) and
 * reads straight into it; `zlib` and `zstd` are QEMU's multifd-zlib and multifd-zstd, byte-compatible:
 * one compression stream per channel for the channel's life, flushed (zlib `Z_SYNC_FLUSH`, zstd
 * `ZSTD_e_flush`) at the end of every packet's normal pages and never ended, so the receiver keeps one
 * decompressor per channel and feeds it packet by packet.
 *
 * - zlib runs on libuv's thread pool (Node's asynchronous zlib): channels compress in parallel. The pages
 *   are first copied into a per-channel buffer (QEMU copies too): guest memory may change while a pool
 *   thread reads it, and zlib is not safe against that.
 * - zstd runs synchronously on the event loop (`zstd-napi`, libzstd built at install), a block's worth of
 *   pages at a time with a yield point between (`internal/native/eventLoop`): at high levels a packet takes
 *   hundreds of milliseconds, and timers, signals and sockets must not wait for it. It reads the pages in place:
 *   nothing writes them during a call, and libzstd keeps its own copy of what it was fed.
 *
 * Receiving never lets a payload touch guest memory before it has been checked: the payload is read into a
 * per-channel buffer, decompressed into a per-channel buffer of `normal × pageSize + 1` bytes (the extra
 * byte reveals an excess: decompression stops there), and only an exact `normal × pageSize` result is
 * copied to the pages' places. Anything else is a `CodecError` naming the channel.
 *
 * Longer than 400 lines on purpose: the three methods' encoders and decoders side by side, each with the
 * rules above spelled out where they apply; the native streams themselves are in `internal/native`.
 *
 * @since 0.1.0
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import type * as Scope from "effect/Scope"
import * as EventLoop from "./internal/native/eventLoop.js"
import { type ProcessFailure, ZlibStream } from "./internal/native/zlibStream.js"
import * as Zstd from "./internal/native/zstdStream.js"
import * as Protocol from "./Protocol.js"
import type * as Transport from "./Transport.js"

/**
 * A payload that does not decode, or decodes to something other than its pages; or a codec not usable.
 *
 * @since 0.1.0
 * @category errors
 */
export class CodecError extends Data.TaggedError("CodecError")<{
  readonly reason: "Corrupt" | "TooLarge" | "TooShort" | "Unavailable" | "BadLevel"
  readonly channel: number | undefined
  readonly detail: string
}> {
  override get message(): string {
    return this.channel === undefined
      ? `compression: ${this.detail}`
      : `multifd channel ${this.channel}: bad payload: ${this.detail}`
  }
}

/**
 * What an encoder's chunks are: `views` of guest memory (they cost no memory: a sender may gather many
 * packets into one write), `fresh` buffers (each packet's are its own: better written at once), or
 * `reused` buffers (the next call overwrites them: the caller waits until they were sent).
 *
 * @since 0.1.0
 * @category models
 */
export type EncoderOutput = "views" | "fresh" | "reused"

/**
 * Turns a packet's normal pages into payload chunks.
 *
 * @since 0.1.0
 * @category models
 */
export interface Encoder {
  readonly output: EncoderOutput
  /** Appends the payload of the `normal` pages at `offsets` of `memory` to `chunks` and returns its size. */
  readonly encode: (
    memory: Buffer,
    offsets: Float64Array,
    normal: number,
    pageSize: number,
    chunks: Array<Uint8Array>
  ) => Effect.Effect<number, CodecError>
}

/**
 * Reads a packet's payload from a connection into the normal pages' places in memory.
 *
 * @since 0.1.0
 * @category models
 */
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

// ---------------------------------------------------------------------------------------------------------
// Levels

/**
 * Accepted and default levels per method: QEMU's `multifd-zlib-level` and `multifd-zstd-level` (`Protocol`'s).
 *
 * @since 0.1.0
 * @category constants
 */
export const levels = Protocol.compressionLevels

/**
 * The level to use: the method's default when not given; a `BadLevel` error when out of its range.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkLevel = (
  compression: Protocol.Compression,
  level: number | undefined
): Either.Either<number, CodecError> => {
  // no compression, no level to check (QEMU keeps its levels apart from the method too)
  if (compression === "none") return Either.right(0)
  if (level === undefined) return Either.right(levels[compression].default)
  const problem = Protocol.checkCompressionLevel(compression, level)
  return problem === undefined
    ? Either.right(level)
    : Either.left(new CodecError({ reason: "BadLevel", channel: undefined, detail: problem }))
}

/**
 * Whether this process can use a method (zstd needs its native binding); an `Unavailable` error if not.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkAvailable = (
  compression: Protocol.Compression,
  channel?: number | undefined
): Either.Either<void, CodecError> => {
  if (compression !== "zstd") return Either.void
  const zstd = Zstd.load()
  return typeof zstd === "string"
    ? Either.left(new CodecError({ reason: "Unavailable", channel, detail: zstd }))
    : Either.void
}

// ---------------------------------------------------------------------------------------------------------
// none

/** Raw pages: contiguous runs go out as one view of guest memory each. */
const rawEncoder: Encoder = {
  output: "views",
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

// ---------------------------------------------------------------------------------------------------------
// Shared helpers of the compressed codecs

/** A per-channel buffer that grows to the largest size asked (a packet's worth, allocated once). */
class Scratch {
  private buffer = Buffer.alloc(0)
  get(size: number): Buffer {
    if (this.buffer.length < size) this.buffer = Buffer.allocUnsafe(size)
    return this.buffer
  }
}

/** Copies `normal` pages at `offsets` of `memory` one after the other into `target`. */
const gather = (memory: Buffer, offsets: Float64Array, normal: number, pageSize: number, target: Buffer): void => {
  let i = 0
  let at = 0
  while (i < normal) {
    const start = offsets[i]!
    let end = start + pageSize
    i++
    while (i < normal && offsets[i] === end) {
      end += pageSize
      i++
    }
    at += memory.copy(target, at, start, end)
  }
}

/** Copies `normal` consecutive pages of `source` to their places at `offsets` of `memory`. */
const scatter = (source: Buffer, memory: Buffer, offsets: Float64Array, normal: number, pageSize: number): void => {
  for (let i = 0; i < normal; i++) source.copy(memory, offsets[i]!, i * pageSize, (i + 1) * pageSize)
}

const fail = (channel: number, reason: CodecError["reason"], detail: string) =>
  Effect.fail(new CodecError({ reason, channel, detail }))

/**
 * The checks before any payload byte is read: a packet without normal pages carries no payload (QEMU
 * asserts it), a packet with normal pages carries some, and no more than its pages can compress to.
 */
const checkSize = (
  method: string,
  channel: number,
  size: number,
  normal: number,
  pageSize: number
): Effect.Effect<void, CodecError> =>
  normal === 0 && size !== 0
    ? fail(channel, "TooLarge", `${size} ${method} payload bytes for a packet without normal pages`)
    : normal > 0 && size === 0
    ? fail(channel, "TooShort", `an empty ${method} payload for ${normal} normal pages`)
    : size > payloadBound(normal * pageSize)
    ? fail(
      channel,
      "TooLarge",
      `${size} ${method} payload bytes: more than ${normal} normal pages can compress to (${payloadBound(normal * pageSize)})`
    )
    : Effect.void

/**
 * The largest payload that `bytes` of pages compress to, generously: incompressible data costs zlib 5
 * bytes per stored block (at least 16 KiB each) plus its header and the flush marker, and zstd 3 bytes per
 * block (128 KiB) plus its frame header. Anything larger is not a compressed packet.
 */
const payloadBound = (bytes: number): number => bytes + (bytes >>> 6) + 4096

/**
 * Makes a decoder's first `CodecError` final: a stream that failed once cannot go on (later packets would
 * decode against a wrong history), so every later call fails the same way, before reading anything.
 */
const sticky = (decoder: Decoder): Decoder => {
  let broken: CodecError | undefined
  return {
    decode: (connection, size, memory, offsets, normal, pageSize) =>
      broken !== undefined
        ? Effect.fail(broken)
        : Effect.tapError(decoder.decode(connection, size, memory, offsets, normal, pageSize), (error) =>
          Effect.sync(() => {
            if (error._tag === "CodecError") broken ??= error
          }))
  }
}

/** The result's size check, before the pages are copied to memory. */
const checkProduced = (
  method: string,
  channel: number,
  produced: number,
  expected: number,
  normal: number
): Effect.Effect<void, CodecError> =>
  produced > expected
    ? fail(channel, "TooLarge", `the ${method} payload inflates past ${expected} bytes (${normal} normal pages)`)
    : produced < expected
    ? fail(channel, "TooShort", `the ${method} payload decodes to ${produced} bytes, expected ${expected} (${normal} normal pages)`)
    : Effect.void

// ---------------------------------------------------------------------------------------------------------
// zlib

/** One `ZlibStream.process` call as an effect; interrupting it abandons the stream. */
const runZlib = (
  stream: ZlibStream,
  input: Uint8Array,
  sink: (chunk: Buffer) => boolean
): Effect.Effect<ProcessFailure | undefined> =>
  Effect.async<ProcessFailure | undefined>((resume) => {
    let settled = false
    stream.process(input, sink, (failure) => {
      settled = true
      resume(Effect.succeed(failure))
    })
    return Effect.sync(() => {
      if (!settled) stream.stop()
    })
  })

const zlibStream = (make: () => ZlibStream): Effect.Effect<ZlibStream, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(make),
    (stream) => Effect.async<void>((resume) => stream.close(() => resume(Effect.void)))
  )

const describeFailure = (failure: ProcessFailure): string =>
  failure._tag === "Error"
    ? failure.error.message
    : failure._tag === "Stopped"
    ? "the stream was abandoned"
    : "the stream is closed"

const zlibEncoder = (level: number): Effect.Effect<Encoder, never, Scope.Scope> =>
  Effect.map(zlibStream(() => ZlibStream.deflate(level)), (stream) => {
    const pages = new Scratch()
    return {
      output: "fresh",
      encode: (memory, offsets, normal, pageSize, chunks) =>
        Effect.suspend(() => {
          // QEMU sends no payload at all for a packet of zero pages only
          if (normal === 0) return Effect.succeed(0)
          const input = pages.get(normal * pageSize).subarray(0, normal * pageSize)
          gather(memory, offsets, normal, pageSize, input)
          let size = 0
          return Effect.flatMap(
            runZlib(stream, input, (chunk) => {
              chunks.push(chunk)
              size += chunk.length
              return true
            }),
            (failure) =>
              failure === undefined ? Effect.succeed(size) : new CodecError({
                reason: "Corrupt",
                channel: undefined,
                detail: `zlib compression failed: ${describeFailure(failure)}`
              })
          )
        })
    }
  })

const zlibDecoder = (channel: number): Effect.Effect<Decoder, never, Scope.Scope> =>
  Effect.map(zlibStream(() => ZlibStream.inflate()), (stream) => {
    const payload = new Scratch()
    const pages = new Scratch()
    return sticky({
      decode: (connection, size, memory, offsets, normal, pageSize) =>
        Effect.gen(function*() {
          yield* checkSize("zlib", channel, size, normal, pageSize)
          if (normal === 0) return
          const input = payload.get(size).subarray(0, size)
          yield* connection.readInto(input, 0, size)
          const expected = normal * pageSize
          // one byte more than the pages: decompression stops as soon as it is reached
          const output = pages.get(expected + 1).subarray(0, expected + 1)
          const consumedBefore = stream.consumed
          let produced = 0
          const failure = yield* runZlib(stream, input, (chunk) => {
            produced += chunk.copy(output, produced)
            return produced < output.length
          })
          if (failure !== undefined && !(failure._tag === "Stopped" && produced === output.length)) {
            return yield* fail(channel, "Corrupt", `zlib: ${describeFailure(failure)}`)
          }
          yield* checkProduced("zlib", channel, produced, expected, normal)
          const consumed = stream.consumed - consumedBefore
          if (consumed !== size) {
            // the zlib stream ended inside this payload: QEMU never ends it, and the rest is not its data
            return yield* fail(channel, "Corrupt", `zlib: the stream ended after ${consumed} of ${size} payload bytes`)
          }
          scatter(output, memory, offsets, normal, pageSize)
        })
    })
  })

// ---------------------------------------------------------------------------------------------------------
// zstd

const zstdBinding = (channel: number | undefined) =>
  Effect.suspend(() => {
    const zstd = Zstd.load()
    return typeof zstd === "string"
      ? Effect.fail(new CodecError({ reason: "Unavailable", channel, detail: zstd }))
      : Effect.succeed(zstd)
  })

/**
 * Input bytes compressed between two yield points: one zstd block (libzstd compresses whole 128 KiB blocks,
 * 100 ms at most at level 19 here), so that a packet at a high level never holds the event loop for long.
 */
const ZSTD_PIECE = 128 * 1024

const zstdEncoder = (level: number): Effect.Effect<Encoder, CodecError, Scope.Scope> =>
  Effect.gen(function*() {
    const zstd = yield* zstdBinding(undefined)
    const compressor = yield* Effect.acquireRelease(
      Effect.try({
        try: () => new Zstd.ZstdCompressor(zstd, level, Protocol.PACKET_PAGE_BYTES),
        catch: (error) =>
          new CodecError({ reason: "Unavailable", channel: undefined, detail: `zstd: ${Zstd.describe(error)}` })
      }),
      (compressor) => Effect.sync(() => compressor.release())
    )
    const failed = (error: unknown) =>
      new CodecError({ reason: "Corrupt", channel: undefined, detail: `zstd compression failed: ${Zstd.describe(error)}` })
    // a piece at a time, with a yield point between pieces: the event loop runs at least every BUDGET_MS
    const step = Effect.try({ try: () => compressor.step(ZSTD_PIECE), catch: failed })
    return {
      output: "reused",
      encode: (memory, offsets, normal, pageSize, chunks) =>
        normal === 0 ? Effect.succeed(0) : Effect.gen(function*() {
          yield* Effect.try({ try: () => compressor.begin(memory, offsets, normal, pageSize), catch: failed })
          while (!(yield* step)) yield* EventLoop.cooperate
          return compressor.finish(chunks)
        })
    } satisfies Encoder
  })

const zstdDecoder = (channel: number): Effect.Effect<Decoder, CodecError, Scope.Scope> =>
  Effect.gen(function*() {
    const zstd = yield* zstdBinding(channel)
    const decompressor = yield* Effect.acquireRelease(
      Effect.try({
        try: () => new Zstd.ZstdDecompressor(zstd),
        catch: (error) => new CodecError({ reason: "Unavailable", channel, detail: `zstd: ${Zstd.describe(error)}` })
      }),
      (decompressor) => Effect.sync(() => decompressor.release())
    )
    const payload = new Scratch()
    const pages = new Scratch()
    return sticky({
      decode: (connection, size, memory, offsets, normal, pageSize) =>
        Effect.gen(function*() {
          yield* checkSize("zstd", channel, size, normal, pageSize)
          if (normal === 0) return
          const input = payload.get(size).subarray(0, size)
          yield* connection.readInto(input, 0, size)
          const expected = normal * pageSize
          const output = pages.get(expected + 1).subarray(0, expected + 1)
          const result = yield* Effect.try({
            try: () => decompressor.decompress(input, output),
            catch: (error) => new CodecError({ reason: "Corrupt", channel, detail: `zstd: ${Zstd.describe(error)}` })
          })
          yield* checkProduced("zstd", channel, result.produced, expected, normal)
          if (result.leftover > 0) {
            return yield* fail(channel, "Corrupt", `zstd: ${result.leftover} of ${size} payload bytes were not taken`)
          }
          scatter(output, memory, offsets, normal, pageSize)
        })
    })
  })

// ---------------------------------------------------------------------------------------------------------
// Acquisition

/**
 * The encoder for a channel: its compression stream lives in the scope and is released (zlib handle
 * closed, zstd context dropped) when the scope closes. `level` defaults to the method's default (1).
 *
 * @since 0.1.0
 * @category constructors
 */
export const encoder = (
  compression: Protocol.Compression,
  level?: number | undefined
): Effect.Effect<Encoder, CodecError, Scope.Scope> =>
  compression === "none"
    ? Effect.succeed(rawEncoder)
    : Effect.flatMap(checkLevel(compression, level), (lvl) =>
      compression === "zlib" ? zlibEncoder(lvl) : zstdEncoder(lvl))

/**
 * The decoder for a channel: its decompression stream lives in the scope, released when it closes.
 *
 * @since 0.1.0
 * @category constructors
 */
export const decoder = (
  compression: Protocol.Compression,
  channel: number
): Effect.Effect<Decoder, CodecError, Scope.Scope> =>
  compression === "none"
    ? Effect.succeed(rawDecoder)
    : compression === "zlib"
    ? zlibDecoder(channel)
    : zstdDecoder(channel)
