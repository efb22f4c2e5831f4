/**
 * Pull-based reading from a Node stream through 'data' events: chunks are queued as they arrive and copied
 * out exactly where the caller wants them (straight into guest memory), with the stream paused while too
 * much is buffered.
 *
 * @internal
 */
import type * as Stream from "node:stream"
import { ReadQueue } from "./readQueue.js"

export type { ReaderEnd } from "./readQueue.js"

/** A reader of any duplex stream (TLS sockets, wrapped streams). */
export class SocketReader extends ReadQueue {
  private paused = false

  constructor(private readonly stream: Stream.Duplex) {
    super()
    // a reader is created at the first read, so the stream may already have ended, failed or closed: those
    // events will not be emitted again
    if (stream.errored !== null) this.end = { _tag: "Error", error: stream.errored }
    else if (stream.readableEnded) this.end = { _tag: "Eof" }
    else if (stream.destroyed) this.end = { _tag: "Error", error: new Error("connection closed") }
    stream.on("data", this.onData)
    this.listen(stream)
  }

  private readonly onData = (chunk: Buffer): void => {
    this.push(chunk)
    if (this.available >= this.highWater && !this.paused) {
      this.paused = true
      this.stream.pause()
    }
  }

  protected wanted(waiting: boolean): void {
    if (this.paused && (waiting || this.available < this.highWater / 2)) {
      this.paused = false
      this.stream.resume()
    }
  }

  override detach(): void {
    this.stream.off("data", this.onData)
    super.detach()
  }
}
