/**
 * One zlib stream (deflate or inflate, zlib format as QEMU's `deflateInit`/`inflateInit`) kept for a
 * channel's life and driven one packet at a time: each call feeds one input buffer with `Z_SYNC_FLUSH`, so
 * the output of a call is exactly that input's compressed (or decompressed) bytes and the stream is never
 * ended. The output goes into the caller's buffer: no allocation per packet.
 *
 * Two ways to drive it:
 * - `process`, on libuv's thread pool (Node's asynchronous zlib): the channels of a migration compress in
 *   parallel while the event loop stays free. One pool round trip a call: the stream's flush flag is
 *   `Z_SYNC_FLUSH` for every write (no separate flush write).
 * - `processSync`, on the calling thread: for a channel thread (whose own thread is the parallelism) and for
 *   inflating, which is fast at every level (a packet's worth in about a millisecond).
 *
 * A deflate stream's level can change between calls (`setLevel`, zlib's `deflateParams`: the encoder stores
 * incompressible pages at level 0 and deflates the rest at the user's).
 *
 * Both rely on Node internals, all of them here (stable since Node 10; `test/PageCodec.test.ts` exercises
 * both paths): the stream writes its next output at `_outBuffer[_outOffset]` with `_chunkSize - _outOffset`
 * bytes of room (`process` points them at the caller's buffer before each call; if that ever changed, the
 * output would arrive in Node's own buffers and be copied: slower, still right), and `_handle.writeSync(flush,
 * in, inOff, inLen, out, outOff, outLen)` reports what is left in `_writeState` (`[availOut, availIn]`), a
 * zlib error through the stream's error handler (the stream is destroyed before `writeSync` returns);
 * `_handle.params(level, strategy)` is `deflateParams`, an error reported the same way.
 *
 * @internal
 */
import * as Zlib from "node:zlib"

/** Why a call did not complete normally. */
export type ProcessFailure =
  | { readonly _tag: "Stopped" }
  | { readonly _tag: "Error"; readonly error: Error }
  | { readonly _tag: "Closed" }

/** What a call did: output bytes written to the caller's buffer, input bytes consumed. */
export interface Processed {
  readonly produced: number
  readonly consumed: number
  /** The output buffer filled up before the input was used up and flushed (there is more output). */
  readonly full: boolean
}

let open = 0

/** zlib streams created and not yet closed (for leak tests). */
export const openStreams = (): number => open

/** The Node internals this module drives (see the module's header). */
interface Internals {
  _outBuffer: Buffer
  _outOffset: number
  _chunkSize: number
  readonly _writeState: Uint32Array
  readonly _handle: {
    writeSync(
      flush: number,
      input: Uint8Array,
      inOff: number,
      inLen: number,
      output: Uint8Array,
      outOff: number,
      outLen: number
    ): void
    params(level: number, strategy: number): void
  } | null
}

const { Z_BLOCK, Z_DEFAULT_STRATEGY, Z_NO_FLUSH, Z_SYNC_FLUSH } = Zlib.constants

/**
 * How a `processSync` call ends: `none`, the input is taken and may be held back (more of the packet
 * follows); `block`, the deflate block is completed and written (up to 7 bits held for the next one) so that
 * the level can change; `sync`, flushed to a byte boundary (`Z_SYNC_FLUSH`: the end of a packet).
 */
export type Flush = "none" | "block" | "sync"

const FLUSH: Record<Flush, number> = { none: Z_NO_FLUSH, block: Z_BLOCK, sync: Z_SYNC_FLUSH }

/** A deflate or inflate stream, used one call at a time. */
export class ZlibStream {
  private readonly stream: Zlib.Deflate | Zlib.Inflate
  private readonly internals: Internals
  private settle: ((result: Processed | ProcessFailure) => void) | undefined = undefined
  // the call in progress: the caller's buffer and how much of it is filled
  private output: Buffer | undefined = undefined
  private produced = 0
  private consumedBefore = 0
  private error: Error | undefined = undefined
  private released = false
  private busy = false
  /** Input bytes consumed by `processSync` calls (`bytesWritten` counts the asynchronous ones). */
  private consumedSync = 0
  /** A deflate stream's current level (`setLevel`). */
  private level: number

  private constructor(stream: Zlib.Deflate | Zlib.Inflate, level: number) {
    this.stream = stream
    this.level = level
    this.internals = stream as unknown as Internals
    open++
    stream.on("data", (chunk: Buffer) => this.take(chunk))
    // an error destroys the stream; the 'close' that follows reports it
    stream.on("error", (error: Error) => {
      this.error ??= error
    })
    stream.once("close", () => {
      if (!this.released) {
        this.released = true
        open--
      }
      const error = this.error
      this.finish(error === undefined ? { _tag: "Closed" } : { _tag: "Error", error })
    })
  }

  /** A deflate stream at `level` (0–9), zlib header, window 15, memLevel 8 — QEMU's `deflateInit(level)`. */
  static deflate(level: number): ZlibStream {
    return new ZlibStream(Zlib.createDeflate({ level, flush: Z_SYNC_FLUSH }), level)
  }

  /** An inflate stream for a zlib-format stream (any window size its header announces). */
  static inflate(): ZlibStream {
    return new ZlibStream(Zlib.createInflate({ flush: Z_SYNC_FLUSH }), -1)
  }

  /** Whether the stream can take no more calls (failed, stopped or closed). */
  get closed(): boolean {
    return this.stream.destroyed
  }

  /** Total input bytes the engine has consumed. */
  get consumed(): number {
    return this.stream.bytesWritten + this.consumedSync
  }

  /** Why the stream can take no more calls (after `closed` turned true). */
  private failure(): ProcessFailure {
    const error = this.error ?? this.stream.errored ?? undefined
    return error === undefined || error === null ? { _tag: "Closed" } : { _tag: "Error", error }
  }

  /**
   * Feeds `input` with `Z_SYNC_FLUSH` on the thread pool; the output goes into `output` from its start.
   * `done` is called exactly once: with what the call did (`full` when `output` filled up first: the stream
   * is then stopped, it cannot go on), or with why it failed. `input` and `output` must not be touched until
   * `done` (the thread pool uses them meanwhile).
   */
  process(input: Uint8Array, output: Buffer, done: (result: Processed | ProcessFailure) => void): void {
    if (this.busy) throw new Error("ZlibStream.process: a call is already in progress")
    if (this.stream.destroyed) return done(this.failure())
    this.busy = true
    this.settle = done
    this.output = output
    this.produced = 0
    const s = this.internals
    if ("_outBuffer" in s && "_outOffset" in s && "_chunkSize" in s && output.length > 0) {
      // the engine writes straight into `output` (and allocates a buffer of its own only past its end)
      s._outBuffer = output
      s._outOffset = 0
      s._chunkSize = output.length
    }
    this.consumedBefore = this.stream.bytesWritten
    this.stream.write(input, () => {
      // after a failure the pending callbacks run with ERR_STREAM_DESTROYED; 'close' reports the real cause
      if (this.stream.destroyed) return
      // in flowing mode every chunk was emitted before this callback; take anything still buffered anyway
      while (this.stream.readableLength > 0 && this.settle === done) {
        if (this.stream.read() === null) break
      }
      this.finish({ produced: this.produced, consumed: this.stream.bytesWritten - this.consumedBefore, full: false })
    })
  }

  /** An output chunk of the call in progress: in place in the caller's buffer, or copied there. */
  private take(chunk: Buffer): void {
    const output = this.output
    if (output === undefined) return
    if (chunk.buffer === output.buffer && chunk.byteOffset === output.byteOffset + this.produced) {
      this.produced += chunk.length
    } else {
      // the engine's own buffer: the output did not fit (or Node's internals changed): copy what fits
      const n = Math.min(chunk.length, output.length - this.produced)
      chunk.copy(output, this.produced, 0, n)
      this.produced += n
      if (n < chunk.length) {
        // more output than room: the stream cannot go on without it
        this.stream.destroy()
        this.finish({ produced: this.produced, consumed: this.stream.bytesWritten - this.consumedBefore, full: true })
      }
    }
  }

  /**
   * Feeds `input` on the calling thread, ended as `flush` says (a packet fed in pieces is flushed after its
   * last); the output goes into `output` from its start. Returns what the call did (`full` when `output`
   * filled up first: the stream cannot go on), or why it failed (the stream is then destroyed).
   */
  processSync(input: Uint8Array, output: Uint8Array, flush: Flush): Processed | ProcessFailure {
    if (this.busy) throw new Error("ZlibStream.processSync: a call is already in progress")
    const s = this.internals
    const handle = s._handle
    if (this.stream.destroyed || handle === null) return this.failure()
    const state = s._writeState
    let inOff = 0
    let outOff = 0
    while (true) {
      const inLen = input.length - inOff
      const room = output.length - outOff
      handle.writeSync(FLUSH[flush], input, inOff, inLen, output, outOff, room)
      // an error destroys the stream from inside writeSync
      if (this.stream.destroyed) return this.failure()
      const availOut = state[0]!
      const availIn = state[1]!
      outOff += room - availOut
      inOff += inLen - availIn
      // room left: everything was taken (and flushed), or the stream ended
      if (availOut > 0) break
      if (outOff === output.length) {
        this.consumedSync += inOff
        return { produced: outOff, consumed: inOff, full: true }
      }
    }
    this.consumedSync += inOff
    return { produced: outOff, consumed: inOff, full: false }
  }

  /** Whether `setLevel` can change this stream's level (a deflate stream on a Node that has `params`). */
  get canSetLevel(): boolean {
    const handle = this.internals._handle
    return this.level >= 0 && handle !== null && typeof handle.params === "function"
  }

  /**
   * Sets a deflate stream's level for the calls that follow (zlib's `deflateParams`; the stream goes on, its
   * history kept). Only between calls, and only after a call that ended with `block` or `sync` (or before the
   * first): `deflateParams` then has nothing left to flush, so it writes no output of its own (output the
   * caller's next call would not know of). Returns why it failed, if it did (the stream is then destroyed).
   */
  setLevel(level: number): ProcessFailure | undefined {
    if (level === this.level) return undefined
    if (this.busy) throw new Error("ZlibStream.setLevel: a call is in progress")
    const handle = this.internals._handle
    if (this.stream.destroyed || handle === null) return this.failure()
    if (typeof handle.params !== "function") throw new Error("ZlibStream.setLevel: this Node's zlib has no params")
    handle.params(level, Z_DEFAULT_STRATEGY)
    // an error destroys the stream from inside params
    if (this.stream.destroyed) return this.failure()
    this.level = level
    return undefined
  }

  /** Abandons the stream: destroyed, no more output; a call in progress ends with `Stopped`. */
  stop(): void {
    this.stream.destroy()
    this.finish({ _tag: "Stopped" })
  }

  /** Destroys the stream (if not yet) and waits until its zlib handle is closed. */
  close(done: () => void): void {
    // `stream.closed` turns true before 'close' is emitted: wait for the event itself
    if (this.released) return done()
    this.stream.once("close", () => done())
    this.stream.destroy()
  }

  private finish(result: Processed | ProcessFailure): void {
    const settle = this.settle
    if (settle === undefined) return
    this.settle = undefined
    this.output = undefined
    this.busy = false
    settle(result)
  }
}
