/**
 * Reading a socket straight into guest memory. Node's `onread` option lets libuv read into a buffer we choose
 * for every read: when a consumer asks for a long run of bytes (a packet's pages), the socket reads directly
 * into that view of guest RAM, without the 'data' event's per-chunk allocation and the copy after it. Short
 * reads (headers, control messages) go through a staging buffer into a queue, as `SocketReader` does.
 *
 * `net.createServer` has no `onread` option, so an accepted socket (server made with `pauseOnConnect`) is
 * re-wrapped as `new net.Socket({ handle, onread })` (the `handle` option is undocumented but stable since
 * Node 12) and the original object is detached from the handle and destroyed, so that the server's count of
 * connections stays right. Everything that relies on Node internals is in this file; its test is
 * `test/DirectSocket.test.ts`.
 *
 * @internal
 */
import * as Net from "node:net"
import type { ReaderEnd } from "./socketReader.js"

/** Bytes buffered in the queue before the socket stops reading (backpressure to the peer through TCP). */
const HIGH_WATER = 8 * 1024 * 1024
/** Size of the staging buffer for reads nobody directed. */
const STAGING = 16 * 1024

interface Target {
  readonly view: Uint8Array
  filled: number
  /** The rest of `view` last handed to the socket. */
  handed: Uint8Array | undefined
  readonly done: (filled: number) => void
}

/**
 * The reader of a re-wrapped socket: the same queue interface as `SocketReader`, plus `fill`, which makes the
 * socket read into a given view.
 */
export class DirectReader {
  private chunks: Array<Buffer> = []
  private head = 0
  private skip = 0
  /** Bytes buffered in the queue and not yet consumed. */
  available = 0
  /** Set once the stream ended or failed; bytes still buffered may be read first. */
  end: ReaderEnd | undefined = undefined
  private waiter: (() => void) | undefined = undefined
  private target: Target | undefined = undefined
  private readonly staging = Buffer.allocUnsafe(STAGING)
  private stopped = false
  /** The socket, once `attach` made it. */
  socket: Net.Socket | undefined = undefined

  /** The `onread` option for the socket: where the next read goes, and what to do with what it read. */
  readonly onread = {
    buffer: (): Uint8Array => {
      const t = this.target
      if (t === undefined) return this.staging
      t.handed = t.view.subarray(t.filled)
      return t.handed
    },
    callback: (n: number, buf: Uint8Array): boolean => {
      const t = this.target
      if (t !== undefined) {
        if (buf === t.handed) {
          t.handed = undefined
          t.filled += n
        } else {
          // the read went to the staging buffer (or a view whose consumer went away) after the target was set:
          // these are the target's first bytes (the queue was empty when it was set)
          const take = Math.min(n, t.view.length - t.filled)
          t.view.set(buf.subarray(0, take), t.filled)
          t.filled += take
          if (take < n) this.enqueue(buf.subarray(take, n))
        }
        if (t.filled === t.view.length) {
          this.target = undefined
          t.done(t.filled)
        }
        return true
      }
      this.enqueue(buf.subarray(0, n))
      this.wake()
      if (this.available >= HIGH_WATER) {
        this.stopped = true
        return false
      }
      return true
    }
  }

  private enqueue(bytes: Uint8Array): void {
    this.chunks.push(Buffer.from(bytes))
    this.available += bytes.length
  }

  /** Listens to the socket's end, error and close. */
  attach(socket: Net.Socket): void {
    this.socket = socket
    socket.once("end", this.onEnd)
    socket.once("error", this.onError)
    socket.once("close", this.onClose)
  }

  private readonly onEnd = (): void => {
    if (this.end === undefined) this.end = { _tag: "Eof" }
    this.finishTarget()
  }

  private readonly onError = (error: Error): void => {
    if (this.end === undefined || this.end._tag === "Eof") this.end = { _tag: "Error", error }
    this.finishTarget()
  }

  private readonly onClose = (): void => {
    if (this.end === undefined) this.end = { _tag: "Error", error: new Error("connection closed") }
    this.finishTarget()
  }

  /** At the end of the stream a pending `fill` completes short: its caller sees `end` and fails. */
  private finishTarget(): void {
    const t = this.target
    this.target = undefined
    t?.done(t.filled)
    this.wake()
  }

  private wake(): void {
    const w = this.waiter
    if (w !== undefined) {
      this.waiter = undefined
      w()
    }
  }

  /** Starts reading again after the queue made the socket stop. */
  private restart(): void {
    if (!this.stopped || this.socket === undefined || this.socket.destroyed) return
    this.stopped = false
    // readStop was called from onread; `_read` starts the handle reading again (Readable never calls it: no
    // data is ever pushed to it)
    ;(this.socket as unknown as { _read: (n: number) => void })._read(0)
  }

  /** See `SocketReader.wait`. */
  wait(callback: () => void, atLeast = 1): () => void {
    if (this.available >= atLeast || this.end !== undefined) {
      callback()
      return () => {}
    }
    this.restart()
    this.waiter = callback
    return () => {
      if (this.waiter === callback) this.waiter = undefined
    }
  }

  /** See `SocketReader.copyTo`. */
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
    if (this.available < HIGH_WATER / 2) this.restart()
    return copied
  }

  /** See `SocketReader.peekTo`. */
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

  /**
   * Makes the socket read the next `view.length` bytes straight into `view` (the queue must be empty);
   * `done` is called with the bytes filled once it is full or the stream ended. Returns a canceller.
   */
  fill(view: Uint8Array, done: (filled: number) => void): () => void {
    const t: Target = { view, filled: 0, handed: undefined, done }
    if (this.end !== undefined) {
      done(0)
      return () => {}
    }
    this.target = t
    this.restart()
    return () => {
      if (this.target === t) this.target = undefined
    }
  }

  /** Detaches the listeners (the socket itself is closed by its owner). */
  detach(): void {
    const socket = this.socket
    if (socket !== undefined) {
      socket.off("end", this.onEnd)
      socket.off("error", this.onError)
      socket.off("close", this.onClose)
    }
    this.target = undefined
    this.wake()
  }
}

/**
 * Re-wraps a socket accepted by a server created with `pauseOnConnect: true` so that it reads through a new
 * `DirectReader`. The accepted object is detached from its handle and destroyed.
 */
export const rewrap = (accepted: Net.Socket): { readonly socket: Net.Socket; readonly reader: DirectReader } => {
  const reader = new DirectReader()
  const internal = accepted as unknown as { _handle: unknown }
  const handle = internal._handle
  const socket = new Net.Socket({ handle, onread: reader.onread } as Net.SocketConstructorOpts)
  internal._handle = null
  accepted.destroy()
  reader.attach(socket)
  socket.resume()
  return { socket, reader }
}
