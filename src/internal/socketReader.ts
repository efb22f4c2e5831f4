/**
 * Pull-based reading from a Node stream: chunks are queued as they arrive and copied out exactly where the
 * caller wants them (straight into guest memory), with the stream paused while too much is buffered.
 *
 * @internal
 */
import type * as Stream from "node:stream"

/** Bytes buffered before the stream is paused (backpressure to the peer through TCP). */
const HIGH_WATER = 8 * 1024 * 1024

/** Why a reader can deliver no more bytes. */
export type ReaderEnd =
  | { readonly _tag: "Eof" }
  | { readonly _tag: "Error"; readonly error: Error }

/** A queue of received chunks with a single waiter. */
export class SocketReader {
  private chunks: Array<Buffer> = []
  private head = 0
  /** Offset already consumed inside `chunks[head]`. */
  private skip = 0
  /** Bytes buffered and not yet consumed. */
  available = 0
  /** Set once the stream ended or failed; bytes still buffered may be read first. */
  end: ReaderEnd | undefined = undefined
  private waiter: (() => void) | undefined = undefined
  private paused = false

  constructor(private readonly stream: Stream.Duplex) {
    // a reader is created at the first read, so the stream may already have ended, failed or closed: those
    // events will not be emitted again
    if (stream.errored !== null) this.end = { _tag: "Error", error: stream.errored }
    else if (stream.readableEnded) this.end = { _tag: "Eof" }
    else if (stream.destroyed) this.end = { _tag: "Error", error: new Error("connection closed") }
    stream.on("data", this.onData)
    stream.once("end", this.onEnd)
    stream.once("error", this.onError)
    stream.once("close", this.onClose)
  }

  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk)
    this.available += chunk.length
    if (this.available >= HIGH_WATER && !this.paused) {
      this.paused = true
      this.stream.pause()
    }
    this.wake()
  }

  private readonly onEnd = (): void => {
    if (this.end === undefined) this.end = { _tag: "Eof" }
    this.wake()
  }

  private readonly onError = (error: Error): void => {
    if (this.end === undefined || this.end._tag === "Eof") this.end = { _tag: "Error", error }
    this.wake()
  }

  private readonly onClose = (): void => {
    if (this.end === undefined) this.end = { _tag: "Error", error: new Error("connection closed") }
    this.wake()
  }

  private wake(): void {
    const w = this.waiter
    if (w !== undefined) {
      this.waiter = undefined
      w()
    }
  }

  /**
   * Registers the single waiter, called once when data arrives or the stream ends (at once if at least
   * `atLeast` bytes are already buffered or the stream has ended); returns its canceller.
   */
  wait(callback: () => void, atLeast = 1): () => void {
    if (this.available >= atLeast || this.end !== undefined) {
      callback()
      return () => {}
    }
    this.waiter = callback
    return () => {
      if (this.waiter === callback) this.waiter = undefined
    }
  }

  /** Copies up to `length` buffered bytes into `target` at `at`; returns how many were copied. */
  copyTo(target: Uint8Array, at: number, length: number): number {
    let copied = 0
    while (copied < length && this.head < this.chunks.length) {
      const chunk = this.chunks[this.head]!
      const n = Math.min(length - copied, chunk.length - this.skip)
      chunk.copy(target, at + copied, this.skip, this.skip + n)
      copied += n
      this.skip += n
      if (this.skip === chunk.length) {
        this.chunks[this.head] = undefined as never
        this.head++
        this.skip = 0
      }
    }
    if (this.head > 64 && this.head * 2 > this.chunks.length) {
      this.chunks = this.chunks.slice(this.head)
      this.head = 0
    }
    this.available -= copied
    if (this.paused && this.available < HIGH_WATER / 2) {
      this.paused = false
      this.stream.resume()
    }
    return copied
  }

  /** Copies the first `length` buffered bytes into `target` without consuming them; `false` if fewer are buffered. */
  peekTo(target: Uint8Array, length: number): boolean {
    if (this.available < length) return false
    let copied = 0
    let skip = this.skip
    for (let i = this.head; copied < length; i++) {
      const chunk = this.chunks[i]!
      const n = Math.min(length - copied, chunk.length - skip)
      chunk.copy(target, copied, skip, skip + n)
      copied += n
      skip = 0
    }
    return true
  }

  /** Detaches the listeners (the stream itself is closed by its owner). */
  detach(): void {
    this.stream.off("data", this.onData)
    this.stream.off("end", this.onEnd)
    this.stream.off("error", this.onError)
    this.stream.off("close", this.onClose)
    this.wake()
  }
}
