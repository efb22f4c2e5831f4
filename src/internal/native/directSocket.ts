/**
 * Reading a socket straight into guest memory. Node's `onread` option lets libuv read into a buffer we choose
 * for every read: when a consumer asks for a long run of bytes (a packet's pages), the socket reads directly
 * into that view of guest RAM, without the 'data' event's per-chunk allocation and the copy after it. Short
 * reads (headers, control messages) go through a staging buffer into a queue, as `SocketReader` does.
 *
 * `net.createServer` has no `onread` option, so an accepted socket (server made with `pauseOnConnect`) is
 * re-wrapped as `new net.Socket({ handle, onread, pauseOnCreate })` (`handle` and `pauseOnCreate` are
 * undocumented but stable since Node 12) and the original object is detached from the handle and destroyed,
 * so that the server's count of connections stays right. Nothing is read until the first read asks: a TLS
 * upgrade can still take the socket over. A TLS socket is adopted after its handshake (`adopt`): its decrypted
 * bytes are copied straight where the reader says (OpenSSL's record buffer to guest memory), instead of into a
 * fresh 16 KiB buffer a record that the collector frees later. Everything that relies on Node internals is in
 * this file; its test is `test/DirectSocket.test.ts`.
 *
 * @internal
 */
import * as Net from "node:net"
import { ReadQueue } from "./readQueue.js"

/** Size of the staging buffer for reads nobody directed (a packet header and a little more). */
const STAGING = 16 * 1024

interface Target {
  readonly view: Uint8Array
  filled: number
  /** The rest of `view` last handed to the socket. */
  handed: Uint8Array | undefined
  readonly done: (filled: number) => void
}

/** How a chain ended early: the stream ended inside (or just before) `view`, or `next` threw. */
export type ChainEnd =
  | { readonly view: Uint8Array; readonly filled: number }
  | { readonly defect: unknown }

/**
 * The reader of a re-wrapped socket: the queue of `ReadQueue`, plus `fill`, which makes the socket read into
 * a given view.
 */
export class DirectReader extends ReadQueue {
  private target: Target | undefined = undefined
  private readonly staging = Buffer.allocUnsafe(STAGING)
  /** Not reading: not started yet (so that a TLS upgrade can take the socket over first), or stopped. */
  private stopped = true
  private started = false
  private socket: Net.Socket | undefined = undefined

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
          this.received += n
        } else {
          // the read went to the staging buffer (or a view whose consumer went away) after the target was set:
          // these are the target's first bytes (the queue was empty when it was set)
          const take = Math.min(n, t.view.length - t.filled)
          t.view.set(buf.subarray(0, take), t.filled)
          t.filled += take
          this.received += take
          if (take < n) this.push(Buffer.from(buf.subarray(take, n)))
        }
        if (t.filled === t.view.length) {
          this.target = undefined
          t.done(t.filled)
        }
        return true
      }
      this.push(Buffer.from(buf.subarray(0, n)))
      if (this.available >= this.highWater) {
        this.stopped = true
        return false
      }
      return true
    }
  }

  /** Queues bytes read before this reader took the socket over. */
  queue(chunk: Buffer): void {
    this.push(chunk)
  }

  /** Reads through `socket` from now on. */
  attach(socket: Net.Socket): void {
    this.socket = socket
    this.listen(socket)
  }

  /** At the end of the stream a pending `fill` completes short: its caller sees `end` and fails. */
  protected override ended(): void {
    const t = this.target
    this.target = undefined
    t?.done(t.filled)
  }

  /** Starts reading: the first time somebody reads, or again after the queue made the socket stop. */
  protected wanted(waiting: boolean): void {
    if (!this.stopped || (!waiting && this.available >= this.highWater / 2)) return
    if (this.socket === undefined || this.socket.destroyed) return
    this.stopped = false
    if (!this.started) {
      // the first read: the socket starts flowing (and will emit 'end')
      this.started = true
      this.socket.resume()
      return
    }
    // readStop was called from onread; `_read` starts the handle reading again (Readable never calls it: no
    // data is ever pushed to it)
    ;(this.socket as unknown as { _read: (n: number) => void })._read(0)
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
    this.wanted(true)
    return () => {
      if (this.target === t) this.target = undefined
    }
  }

  /**
   * Fills `first`, then each view `next` returns for the view just filled, until it returns `undefined`:
   * from the queue first, then straight from the socket. `next` runs synchronously in the socket's read
   * callback, so the next view is in place before libuv reads again: a packet stream is read header,
   * pages, header, … without staging or a trip through the caller per view. `done` is called once: with
   * `undefined` when `next` stopped, with how much of the current view was filled when the stream ended, or
   * with what `next` threw.
   * Returns a canceller (after which neither `next` nor `done` is called).
   */
  chain(
    first: Uint8Array,
    next: (full: Uint8Array) => Uint8Array | undefined,
    done: (ended: ChainEnd | undefined) => void
  ): () => void {
    let view: Uint8Array | undefined = first
    let cancelFill: (() => void) | undefined
    let cancelled = false
    let thrown: { readonly defect: unknown } | undefined
    // `next` runs inside libuv's read callback: whatever it throws ends the chain, not the process
    const following = (full: Uint8Array): Uint8Array | undefined => {
      try {
        return next(full)
      } catch (defect) {
        thrown = { defect }
        return undefined
      }
    }
    const advance = (filledSoFar: number): void => {
      let filled = filledSoFar
      while (view !== undefined) {
        filled += this.copyTo(view, filled, view.length - filled)
        if (filled < view.length) break
        view = following(view)
        filled = 0
        if (cancelled) return
      }
      if (view === undefined) return done(thrown)
      if (this.end !== undefined) return done({ view, filled })
      const current: Uint8Array = view
      const from = filled
      cancelFill = this.fill(from === 0 ? current : current.subarray(from), (n) => {
        cancelFill = undefined
        if (from + n < current.length) return done({ view: current, filled: from + n })
        view = following(current)
        if (!cancelled) advance(0)
      })
    }
    advance(0)
    return () => {
      cancelled = true
      cancelFill?.()
    }
  }

  override detach(): void {
    this.target = undefined
    super.detach()
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
  // `pauseOnCreate` (as the server uses for `pauseOnConnect`): the new socket must not start reading by itself
  const socket = new Net.Socket({ handle, onread: reader.onread, pauseOnCreate: true } as Net.SocketConstructorOpts)
  internal._handle = null
  accepted.destroy()
  reader.attach(socket)
  // no reading until the first read asks: a TLS upgrade takes the socket over before any byte is consumed
  return { socket, reader }
}

/** The private symbols under which `net.Socket` keeps its `onread` option (Node 12 and later). */
const onreadSlots = (socket: Net.Socket) => {
  const symbols = Object.getOwnPropertySymbols(socket)
  const named = (description: string) => symbols.find((symbol) => symbol.description === description)
  const buffer = named("kBuffer")
  const callback = named("kBufferCb")
  const generator = named("kBufferGen")
  return buffer === undefined || callback === undefined || generator === undefined
    ? undefined
    : { buffer, callback, generator }
}

/**
 * Makes a socket that may already be reading (a TLS socket after its handshake, whose handle is Node's TLS
 * stream) read through a new `DirectReader`, as `onread` would have from its creation: what it buffered so far
 * is queued first, then every read goes where the reader says. `undefined` when this Node keeps its sockets
 * differently, or the socket already reads into a buffer of its own: the caller reads through 'data' events.
 */
export const adopt = (socket: Net.Socket): DirectReader | undefined => {
  const handle = (socket as unknown as { _handle: { useUserBuffer?: (buffer: Uint8Array) => void } | null })._handle
  const slots = onreadSlots(socket)
  const fields = socket as unknown as Record<symbol, unknown>
  if (
    handle === null || typeof handle.useUserBuffer !== "function" || slots === undefined ||
    fields[slots.buffer] || socket.destroyed || socket.listenerCount("data") > 0
  ) return undefined
  const reader = new DirectReader()
  // as `net.Socket` sets these up for its `onread` option: the handle reads into the buffer under `kBuffer`,
  // Node's read callback calls `kBufferCb` with it, then asks `kBufferGen` for the next one
  const first = reader.onread.buffer()
  fields[slots.generator] = reader.onread.buffer
  fields[slots.callback] = reader.onread.callback
  fields[slots.buffer] = first
  handle.useUserBuffer(first)
  // bytes the socket read before (in its readable buffer) come first; nothing new is read before this returns
  for (let chunk: Buffer | null; (chunk = socket.read() as Buffer | null) !== null;) reader.queue(chunk)
  // an end already emitted is not emitted again
  if (socket.readableEnded) reader.end = { _tag: "Eof" }
  reader.attach(socket)
  return reader
}
