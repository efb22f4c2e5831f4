/**
 * The queue both socket readers share: received chunks, copied out exactly where the caller wants them,
 * a single waiter, and the end of the stream. Subclasses feed it (`push`) and decide how to stop and restart
 * the stream around `highWater` (`wanted`).
 *
 * @internal
 */
import type * as Stream from "node:stream"

/** Bytes buffered before the stream stops reading (backpressure to the peer through TCP). */
export const HIGH_WATER = 8 * 1024 * 1024

/**
 * Bytes buffered before the stream stops reading while its reader has consumed less than that: what a peer can
 * make this side hold that nobody asked for. The read-ahead grows with what the reader consumed, up to
 * `HIGH_WATER` (a connection in use reaches it after its first megabytes): a stranger that sent a complete init
 * packet and then megabytes, held while it waited for a migration to join, was read to `HIGH_WATER` (8 MiB a
 * connection, as many connections as the open-files limit allows).
 */
export const FIRST_HIGH_WATER = 64 * 1024

/** Why a reader can deliver no more bytes. */
export type ReaderEnd =
  | { readonly _tag: "Eof" }
  | { readonly _tag: "Error"; readonly error: Error }

/** A queue of received chunks with a single waiter. */
export abstract class ReadQueue {
  private chunks: Array<Buffer> = []
  private head = 0
  /** Offset already consumed inside `chunks[head]`. */
  private skip = 0
  /** Bytes buffered and not yet consumed. */
  available = 0
  /** Bytes that arrived in all (consumed, buffered, or read straight into a caller's view by a subclass). */
  received = 0
  /** Set once the stream ended or failed; bytes still buffered may be read first. */
  end: ReaderEnd | undefined = undefined
  private waiter: (() => void) | undefined = undefined
  private source: Stream.Duplex | undefined = undefined

  /**
   * Bytes buffered before the stream stops reading: as many as the reader consumed so far, from
   * `FIRST_HIGH_WATER` to `HIGH_WATER` (a peer cannot make this side hold more than it took of it, and a little).
   */
  protected get highWater(): number {
    return Math.min(HIGH_WATER, Math.max(FIRST_HIGH_WATER, this.received - this.available))
  }

  /**
   * The stream should read (again): somebody waits for more than is buffered (`waiting`), or the queue fell
   * below half the high-water mark.
   */
  protected abstract wanted(waiting: boolean): void

  /** Called once the stream ended or failed (after `end` is set). */
  protected ended(): void {}

  /** Listens to the stream's end, error and close. */
  protected listen(stream: Stream.Duplex): void {
    this.source = stream
    stream.once("end", this.onEnd)
    stream.once("error", this.onError)
    stream.once("close", this.onClose)
  }

  /** Queues received bytes and wakes the waiter. */
  protected push(chunk: Buffer): void {
    this.chunks.push(chunk)
    this.available += chunk.length
    this.received += chunk.length
    this.wake()
  }

  private readonly onEnd = (): void => {
    if (this.end === undefined) this.end = { _tag: "Eof" }
    this.ended()
    this.wake()
  }

  private readonly onError = (error: Error): void => {
    if (this.end === undefined || this.end._tag === "Eof") this.end = { _tag: "Error", error }
    this.ended()
    this.wake()
  }

  private readonly onClose = (): void => {
    if (this.end === undefined) this.end = { _tag: "Error", error: new Error("connection closed") }
    this.ended()
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
    this.wanted(true)
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
    if (this.available < this.highWater / 2) this.wanted(false)
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

  /** Detaches the listeners (the stream itself is closed by its owner) and wakes the waiter. */
  detach(): void {
    const stream = this.source
    if (stream !== undefined) {
      stream.off("end", this.onEnd)
      stream.off("error", this.onError)
      stream.off("close", this.onClose)
    }
    this.wake()
  }
}
