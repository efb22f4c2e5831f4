/**
 * Page payload codecs: how a packet's normal pages travel. `none` sends views of guest memory (no copy) and
 * reads straight into it; `zlib` and `zstd` are QEMU's multifd-zlib and multifd-zstd, byte-compatible:
 * one compression stream per channel for the channel's life, flushed (zlib `Z_SYNC_FLUSH`, zstd
 * `ZSTD_e_flush`) at the end of every packet's normal pages and never ended, so the receiver keeps one
 * decompressor per channel and feeds it packet by packet.
 *
 * - zlib runs on libuv's thread pool (Node's asynchronous zlib, one round trip a packet), so that channels
 *   on the event loop's thread compress in parallel, or on the calling thread (a channel thread: `runOn`).
 *   The pages are first copied into a per-channel buffer (QEMU copies too): guest memory may change while
 *   zlib reads it, and zlib is not safe against that. The output goes into a per-channel buffer. Pages that
 *   look incompressible are stored (level 0: a copy) rather than searched by deflate, which stores them too.
 * - zstd runs synchronously on the calling thread (`zstd-napi`, libzstd built at install); above level 3 a
 *   block's worth of pages at a time with a yield point between (`internal/native/eventLoop`): at high levels
 *   a packet takes hundreds of milliseconds, and timers, signals and sockets must not wait for it. Long runs
 *   of pages are read in place (libzstd keeps its own copy of what it was fed), scattered pages copied
 *   together first (one call into libzstd for many pages).
 *
 * Receiving never lets a payload touch guest memory before it has been checked: the payload is read into a
 * per-channel buffer, decompressed (synchronously: fast at every level) into a per-channel buffer of
 * `normal × pageSize + 1` bytes (the extra byte reveals an excess: decompression stops there), and only an
 * exact `normal × pageSize` result is copied to the pages' places. Anything else is a `CodecError` naming the
 * channel. (Decompressing straight into guest memory would save that copy, about 0.1 CPU-s a GiB, and give
 * up this guarantee.)
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
import * as WorkerThreads from "node:worker_threads"
import * as EventLoop from "./internal/native/eventLoop.js"
import * as Incompressible from "./internal/incompressible.js"
import { type Flush, type Processed, type ProcessFailure, ZlibStream } from "./internal/native/zlibStream.js"
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
  /**
   * `encode` done synchronously, for an encoder that never needs to let the event loop run during a packet
   * (zstd up to level 3: a millisecond or two a packet): returns the payload's size, or the error. Absent when a
   * packet may take long; a sender calls it rather than `encode` when present (no effect to run per packet).
   */
  readonly encodeNow?:
    | ((
      memory: Buffer,
      offsets: Float64Array,
      normal: number,
      pageSize: number,
      chunks: Array<Uint8Array>
    ) => number | CodecError)
    | undefined
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

/**
 * Calls `f` for each run of consecutive pages among the first `normal` `offsets`: where it starts in memory,
 * its length, and where it starts when the pages lie one after the other (a copy a run, not a page).
 */
const forEachRun = (
  offsets: Float64Array,
  normal: number,
  pageSize: number,
  f: (start: number, length: number, packed: number) => void
): void => {
  let i = 0
  let packed = 0
  while (i < normal) {
    const start = offsets[i]!
    let end = start + pageSize
    i++
    while (i < normal && offsets[i] === end) {
      end += pageSize
      i++
    }
    f(start, end - start, packed)
    packed += end - start
  }
}

/** Copies `normal` pages at `offsets` of `memory` one after the other into `target`. */
const gather = (memory: Buffer, offsets: Float64Array, normal: number, pageSize: number, target: Buffer): void =>
  forEachRun(offsets, normal, pageSize, (start, length, packed) => target.set(memory.subarray(start, start + length), packed))

/** Copies `normal` consecutive pages of `source` to their places at `offsets` of `memory` (a copy a run). */
const scatter = (source: Uint8Array, memory: Buffer, offsets: Float64Array, normal: number, pageSize: number): void =>
  forEachRun(offsets, normal, pageSize, (start, length, packed) => memory.set(source.subarray(packed, packed + length), start))

const codecError = (channel: number | undefined, reason: CodecError["reason"], detail: string) =>
  new CodecError({ reason, channel, detail })

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
): CodecError | undefined =>
  normal === 0 && size !== 0
    ? codecError(channel, "TooLarge", `${size} ${method} payload bytes for a packet without normal pages`)
    : normal > 0 && size === 0
    ? codecError(channel, "TooShort", `an empty ${method} payload for ${normal} normal pages`)
    : size > payloadBound(normal * pageSize)
    ? codecError(
      channel,
      "TooLarge",
      `${size} ${method} payload bytes: more than ${normal} normal pages can compress to (${payloadBound(normal * pageSize)})`
    )
    : undefined

/**
 * The largest payload that `bytes` of pages compress to, generously: incompressible data costs zlib 5
 * bytes per stored block (at least 16 KiB each) plus its header and the flush marker, and zstd 3 bytes per
 * block (128 KiB) plus its frame header. Anything larger is not a compressed packet.
 */
const payloadBound = (bytes: number): number => bytes + (bytes >>> 6) + 4096

/** The result's size check, before the pages are copied to memory. */
const checkProduced = (
  method: string,
  channel: number,
  produced: number,
  expected: number,
  normal: number
): CodecError | undefined =>
  produced > expected
    ? codecError(channel, "TooLarge", `the ${method} payload inflates past ${expected} bytes (${normal} normal pages)`)
    : produced < expected
    ? codecError(
      channel,
      "TooShort",
      `the ${method} payload decodes to ${produced} bytes, expected ${expected} (${normal} normal pages)`
    )
    : undefined

/**
 * Decodes a channel's payloads once they are read, synchronously (decompression is fast at every level: a
 * packet in a millisecond or so), so that it runs the same in a socket's read callback, in a fiber and on a
 * channel thread. Each returns the `CodecError` of a payload that is not one of its pages' (memory is then
 * untouched), `undefined` when all is well. The first error is final: a stream that failed once fails every
 * later call the same way (later packets would decode against a wrong history).
 *
 * @since 0.1.0
 * @category models
 */
export interface PayloadDecoder {
  /** The checks of a payload's announced `size` before any of it is read. */
  readonly check: (size: number, normal: number, pageSize: number) => CodecError | undefined
  /** Decodes `payload` (a whole packet's) into the `normal` pages at `offsets` of `memory`. */
  readonly decode: (
    payload: Uint8Array,
    memory: Buffer,
    offsets: Float64Array,
    normal: number,
    pageSize: number
  ) => CodecError | undefined
}

/** A payload decoder of `method` whose first error (of `check` or `decode`) is final. */
const stickyPayload = (method: string, channel: number, decode: PayloadDecoder["decode"]): PayloadDecoder => {
  let broken: CodecError | undefined
  const keep = (error: CodecError | undefined) => {
    if (error !== undefined) broken = error
    return error
  }
  return {
    check: (size, normal, pageSize) => broken ?? keep(checkSize(method, channel, size, normal, pageSize)),
    decode: (payload, memory, offsets, normal, pageSize) =>
      broken ?? keep(decode(payload, memory, offsets, normal, pageSize))
  }
}

/** A decoder that reads each payload, once checked, into a per-channel buffer and hands it to `payload`. */
const reading = (payload: PayloadDecoder): Decoder => {
  const input = new Scratch()
  return {
    decode: (connection, size, memory, offsets, normal, pageSize) =>
      Effect.suspend(() => {
        const wrong = payload.check(size, normal, pageSize)
        if (wrong !== undefined) return Effect.fail(wrong)
        if (normal === 0) return Effect.void
        const buffer = input.get(size).subarray(0, size)
        return Effect.flatMap(connection.readInto(buffer, 0, size), () => {
          const error = payload.decode(buffer, memory, offsets, normal, pageSize)
          return error === undefined ? Effect.void : Effect.fail(error)
        })
      })
  }
}

// ---------------------------------------------------------------------------------------------------------
// zlib

/** One asynchronous `ZlibStream.process` call as an effect; interrupting it abandons the stream. */
const runZlib = (
  stream: ZlibStream,
  input: Uint8Array,
  output: Buffer
): Effect.Effect<Processed | ProcessFailure> =>
  Effect.async<Processed | ProcessFailure>((resume) => {
    let settled = false
    stream.process(input, output, (result) => {
      settled = true
      resume(Effect.succeed(result))
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

/**
 * Input bytes a channel thread deflates between two yield points: deflate runs at a few tens of MB/s here
 * (level 1 on incompressible pages; slower at higher levels), so a packet goes in pieces.
 */
const ZLIB_PIECE = 128 * 1024

/**
 * zlib compression. The pages are copied together first (QEMU copies too: zlib does not promise to read its
 * input once, and the guest may write a page meanwhile); the output goes into a per-channel buffer.
 *
 * Pages that look incompressible (`internal/incompressible`: random, encrypted, already compressed) go in at
 * level 0, a copy into stored blocks, instead of through deflate's search, which stores them anyway; runs of
 * the other pages at the user's level. The stream is one stream either way (its history kept across levels:
 * `ZlibStream.setLevel`), each run but the last ended with `block` so the level can change, the packet's last
 * with `sync`, as QEMU's.
 *
 * Deflating runs on libuv's thread pool on the event loop's thread (one round trip a run, flushed), so that
 * channels compress in parallel; on a channel thread (a worker) in place, a piece at a time with a yield point
 * between pieces. Stored runs always in place: they cost a copy.
 */
const zlibEncoder = (level: number, runOn: "pool" | "caller"): Effect.Effect<Encoder, never, Scope.Scope> =>
  Effect.map(zlibStream(() => ZlibStream.deflate(level)), (stream) => {
    const pages = new Scratch()
    const out = new Scratch()
    const kinds = new Scratch()
    const inline = runOn === "caller"
    const failed = (detail: string) => codecError(undefined, "Corrupt", `zlib compression failed: ${detail}`)
    const overflow = (output: Buffer, bytes: number) =>
      failed(`more than ${output.length} bytes of output for ${bytes} bytes`)
    /** Feeds `input` on this thread into `output` from `at`, in pieces of `piece`; returns the new `at`. */
    const inPlace = (input: Buffer, output: Buffer, at: number, end: Flush, piece: number) =>
      Effect.gen(function*() {
        let from = 0
        while (true) {
          const to = Math.min(input.length, from + piece)
          const last = to === input.length
          const result = stream.processSync(input.subarray(from, to), output.subarray(at), last ? end : "none")
          if ("_tag" in result) return yield* Effect.fail(failed(describeFailure(result)))
          if (result.full) return yield* Effect.fail(overflow(output, input.length))
          at += result.produced
          from = to
          if (last) return at
          yield* EventLoop.cooperate
        }
      })
    /** Deflates `input` on the thread pool (flushed: the stream's flag) into `output` from `at`. */
    const onPool = (input: Buffer, output: Buffer, at: number) =>
      Effect.flatMap(runZlib(stream, input, output.subarray(at)), (result) =>
        "_tag" in result
          ? Effect.fail(failed(describeFailure(result)))
          : result.full
          ? Effect.fail(overflow(output, input.length))
          : Effect.succeed(at + result.produced))
    return {
      output: "reused",
      encode: (memory, offsets, normal, pageSize, chunks) =>
        Effect.suspend(() => {
          // QEMU sends no payload at all for a packet of zero pages only
          if (normal === 0) return Effect.succeed(0)
          const bytes = normal * pageSize
          const input = pages.get(bytes).subarray(0, bytes)
          gather(memory, offsets, normal, pageSize, input)
          const stored = kinds.get(normal)
          // (a Node whose zlib cannot change levels deflates every page, as before)
          const some = level > 0 && stream.canSetLevel && Incompressible.judge(input, normal, pageSize, stored) > 0
          const output = out.get(payloadBound(bytes))
          return Effect.gen(function*() {
            let at = 0
            let page = 0
            while (page < normal) {
              // the next run of pages of one kind
              const store = some && stored[page] === 1
              let next = page + 1
              if (!some) next = normal
              else while (next < normal && (stored[next] === 1) === store) next++
              const end: Flush = next === normal ? "sync" : "block"
              const failure = stream.setLevel(store ? 0 : level)
              if (failure !== undefined) return yield* Effect.fail(failed(describeFailure(failure)))
              const run = input.subarray(page * pageSize, next * pageSize)
              at = store
                ? yield* inPlace(run, output, at, end, run.length)
                : inline
                ? yield* inPlace(run, output, at, end, ZLIB_PIECE)
                : yield* onPool(run, output, at)
              page = next
            }
            chunks.push(output.subarray(0, at))
            return at
          })
        })
    } satisfies Encoder
  })

/**
 * zlib decompression, in place (inflate is fast at every level): the payload decodes into a per-channel
 * buffer of `normal × pageSize + 1` bytes, whose last byte reveals an excess (decompression stops there).
 */
const zlibPayloadDecoder = (channel: number): Effect.Effect<PayloadDecoder, never, Scope.Scope> =>
  Effect.map(zlibStream(() => ZlibStream.inflate()), (stream) => {
    const pages = new Scratch()
    return stickyPayload("zlib", channel, (payload, memory, offsets, normal, pageSize) => {
      const expected = normal * pageSize
      // one byte more than the pages: decompression stops as soon as it is reached
      const output = pages.get(expected + 1).subarray(0, expected + 1)
      const result = stream.processSync(payload, output, "sync")
      if ("_tag" in result) return codecError(channel, "Corrupt", `zlib: ${describeFailure(result)}`)
      const wrong = checkProduced("zlib", channel, result.produced, expected, normal)
      if (wrong !== undefined) return wrong
      if (result.consumed !== payload.length) {
        // the zlib stream ended inside this payload: QEMU never ends it, and the rest is not its data
        return codecError(
          channel,
          "Corrupt",
          `zlib: the stream ended after ${result.consumed} of ${payload.length} payload bytes`
        )
      }
      scatter(output, memory, offsets, normal, pageSize)
      return undefined
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
 * Up to `ZSTD_WHOLE_LEVEL` a packet goes in one piece: a millisecond or two (about 1 GiB/s at level 3).
 */
const ZSTD_PIECE = 128 * 1024
const ZSTD_WHOLE_LEVEL = 3

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
    const piece = level <= ZSTD_WHOLE_LEVEL ? Number.POSITIVE_INFINITY : ZSTD_PIECE
    const step = Effect.try({ try: () => compressor.step(piece), catch: failed })
    // up to ZSTD_WHOLE_LEVEL a packet is one call into libzstd: no yield point, nothing to run as an effect
    const encodeNow = level <= ZSTD_WHOLE_LEVEL
      ? (memory: Buffer, offsets: Float64Array, normal: number, pageSize: number, chunks: Array<Uint8Array>) => {
        if (normal === 0) return 0
        try {
          return compressor.compress(memory, offsets, normal, pageSize, chunks)
        } catch (error) {
          return failed(error)
        }
      }
      : undefined
    return {
      output: "reused",
      encodeNow,
      encode: (memory, offsets, normal, pageSize, chunks) =>
        normal === 0 ? Effect.succeed(0) : encodeNow !== undefined
        ? Effect.suspend(() => {
          const result = encodeNow(memory, offsets, normal, pageSize, chunks)
          return typeof result === "number" ? Effect.succeed(result) : Effect.fail(result)
        })
        : Effect.gen(function*() {
          yield* Effect.try({ try: () => compressor.begin(memory, offsets, normal, pageSize), catch: failed })
          while (!(yield* step)) yield* EventLoop.cooperate
          return compressor.finish(chunks)
        })
    } satisfies Encoder
  })

const zstdPayloadDecoder = (channel: number): Effect.Effect<PayloadDecoder, CodecError, Scope.Scope> =>
  Effect.gen(function*() {
    const zstd = yield* zstdBinding(channel)
    const decompressor = yield* Effect.acquireRelease(
      Effect.try({
        try: () => new Zstd.ZstdDecompressor(zstd),
        catch: (error) => new CodecError({ reason: "Unavailable", channel, detail: `zstd: ${Zstd.describe(error)}` })
      }),
      (decompressor) => Effect.sync(() => decompressor.release())
    )
    const pages = new Scratch()
    return stickyPayload("zstd", channel, (payload, memory, offsets, normal, pageSize) => {
      const expected = normal * pageSize
      const output = pages.get(expected + 1).subarray(0, expected + 1)
      let result: Zstd.Decompressed
      try {
        result = decompressor.decompress(payload, output)
      } catch (error) {
        return codecError(channel, "Corrupt", `zstd: ${Zstd.describe(error)}`)
      }
      const wrong = checkProduced("zstd", channel, result.produced, expected, normal)
      if (wrong !== undefined) return wrong
      if (result.leftover > 0) {
        return codecError(channel, "Corrupt", `zstd: ${result.leftover} of ${payload.length} payload bytes were not taken`)
      }
      scatter(output, memory, offsets, normal, pageSize)
      return undefined
    })
  })

// ---------------------------------------------------------------------------------------------------------
// Acquisition

/**
 * Where an encoder compresses: `pool`, on libuv's thread pool (zlib: the event loop stays free and the
 * channels compress in parallel; zstd always runs on the caller's thread, a piece at a time), or `caller`, on
 * the calling thread (a channel thread: its own thread is the parallelism). Default: `pool` on the main
 * thread, `caller` on a worker thread.
 *
 * @since 0.1.0
 * @category models
 */
export interface EncoderOptions {
  readonly runOn?: "pool" | "caller" | undefined
}

/**
 * The encoder for a channel: its compression stream lives in the scope and is released (zlib handle
 * closed, zstd context dropped) when the scope closes. `level` defaults to the method's default (1).
 *
 * @since 0.1.0
 * @category constructors
 */
export const encoder = (
  compression: Protocol.Compression,
  level?: number | undefined,
  options?: EncoderOptions
): Effect.Effect<Encoder, CodecError, Scope.Scope> =>
  compression === "none"
    ? Effect.succeed(rawEncoder)
    : Effect.flatMap(checkLevel(compression, level), (lvl) =>
      compression === "zlib"
        ? zlibEncoder(lvl, options?.runOn ?? (WorkerThreads.isMainThread ? "pool" : "caller"))
        : zstdEncoder(lvl))

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
    : Effect.map(payloadDecoder(compression, channel), reading)

/**
 * The payload decoder for a channel of a compressed method (`decoder` reads through one): its decompression
 * stream lives in the scope, released when it closes.
 *
 * @since 0.1.0
 * @category constructors
 */
export const payloadDecoder = (
  compression: "zlib" | "zstd",
  channel: number
): Effect.Effect<PayloadDecoder, CodecError, Scope.Scope> =>
  compression === "zlib" ? zlibPayloadDecoder(channel) : zstdPayloadDecoder(channel)

/**
 * The checks of a payload's announced size alone (a `PayloadDecoder`'s `check`, without its stream), for a
 * channel whose payloads are decoded in another thread.
 *
 * @since 0.1.0
 * @category utils
 */
export const payloadCheck = (compression: "zlib" | "zstd", channel: number): PayloadDecoder["check"] =>
(size, normal, pageSize) => checkSize(compression, channel, size, normal, pageSize)
