/**
 * One zlib stream (deflate or inflate, zlib format as QEMU's `deflateInit`/`inflateInit`) kept for a
 * channel's life and driven one packet at a time: each `process` call feeds one input buffer and
 * `Z_SYNC_FLUSH`es, so the output of a call is exactly that input's compressed (or decompressed) bytes and
 * the stream is never ended. The work runs on libuv's thread pool (Node's asynchronous zlib), so the
 * channels of a migration compress in parallel and the event loop stays free.
 *
 * Output is delivered chunk by chunk, in order, to the caller's sink before the call completes. A chunk is a
 * view of a buffer that Node's zlib never writes again (it allocates a new one when its buffer is full), so
 * chunks stay valid after the call. The sink may stop the call (a decompression bomb): the stream is then
 * destroyed at once and produces nothing more.
 *
 * @internal
 */
import * as Zlib from "node:zlib"

/** Why a `process` call did not complete normally. */
export type ProcessFailure =
  | { readonly _tag: "Stopped" }
  | { readonly _tag: "Error"; readonly error: Error }
  | { readonly _tag: "Closed" }

let open = 0

/** zlib streams created and not yet closed (for leak tests). */
export const openStreams = (): number => open

/** Output chunks of at most this size: a packet's worth, so that a packet costs one or two pool round trips. */
const CHUNK_SIZE = 1024 * 1024

/** A deflate or inflate stream in flowing mode, used one `process` call at a time. */
export class ZlibStream {
  private readonly stream: Zlib.Deflate | Zlib.Inflate
  private sink: ((chunk: Buffer) => boolean) | undefined = undefined
  private settle: ((failure: ProcessFailure | undefined) => void) | undefined = undefined
  private error: Error | undefined = undefined
  private released = false
  private busy = false

  private constructor(stream: Zlib.Deflate | Zlib.Inflate) {
    this.stream = stream
    open++
    stream.on("data", (chunk: Buffer) => {
      const sink = this.sink
      if (sink !== undefined && !sink(chunk)) this.stop()
    })
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
    return new ZlibStream(Zlib.createDeflate({ level, chunkSize: CHUNK_SIZE }))
  }

  /** An inflate stream for a zlib-format stream (any window size its header announces). */
  static inflate(): ZlibStream {
    return new ZlibStream(Zlib.createInflate({ chunkSize: CHUNK_SIZE }))
  }

  /** Whether the stream can take no more calls (failed, stopped or closed). */
  get closed(): boolean {
    return this.stream.destroyed
  }

  /** Total input bytes the engine has consumed. */
  get consumed(): number {
    return this.stream.bytesWritten
  }

  /**
   * Feeds `input` and flushes (`Z_SYNC_FLUSH`). Every output chunk goes to `sink` before `done` is called;
   * a `false` from the sink stops the stream (destroyed, `Stopped`). `done` is called exactly once.
   * `input` must not change until `done` (the thread pool reads it meanwhile).
   */
  process(
    input: Uint8Array,
    sink: (chunk: Buffer) => boolean,
    done: (failure: ProcessFailure | undefined) => void
  ): void {
    if (this.busy) throw new Error("ZlibStream.process: a call is already in progress")
    if (this.stream.destroyed) {
      const error = this.error
      return done(error === undefined ? { _tag: "Closed" } : { _tag: "Error", error })
    }
    this.busy = true
    this.sink = sink
    this.settle = done
    this.stream.write(input)
    this.stream.flush(Zlib.constants.Z_SYNC_FLUSH, () => {
      // after a failure the pending callbacks run with ERR_STREAM_DESTROYED; 'close' reports the real cause
      if (this.stream.destroyed) return
      // in flowing mode every chunk was emitted before this callback; drain anything still buffered anyway
      while (this.stream.readableLength > 0 && this.settle === done) {
        if (this.stream.read() === null) break
      }
      this.finish(undefined)
    })
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

  private finish(failure: ProcessFailure | undefined): void {
    const settle = this.settle
    if (settle === undefined) return
    this.settle = undefined
    this.sink = undefined
    this.busy = false
    settle(failure)
  }
}
