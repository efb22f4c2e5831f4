/**
 * How many of the bytes given to a writable stream have not reached the kernel yet — to the byte, not a write
 * request at a time. Node's `writableLength` keeps a whole write request until all of it has left: a channel's
 * 16 MiB vectored write on a slow link would look like no progress at all for as long as it takes. The part of
 * the request in flight that libuv still holds is its handle's `writeQueueSize` (for TLS, the socket's under
 * it, which holds the ciphertext). Everything that relies on Node internals is in this file.
 *
 * @internal
 */
import type { Writable } from "node:stream"

interface Internals {
  readonly _writableState?: { readonly writing?: boolean; readonly writelen?: number }
  readonly _handle?: { readonly writeQueueSize?: unknown } | null
  /** A TLS socket's underlying socket (when it was made over one: `tls.connect({ socket })`, as `Tls` does). */
  readonly _parent?: Internals | null
  /** True on a TLS socket, whose own handle's queue is not libuv's. */
  readonly encrypted?: boolean
}

const queued = (stream: Internals | null | undefined): number | undefined => {
  const size = stream?._handle?.writeQueueSize
  return typeof size === "number" ? size : undefined
}

/**
 * Bytes written to `stream` that the kernel has not taken: `writableLength`, less the part of the write in
 * flight that libuv already handed to the kernel (when the stream says; otherwise all of `writableLength`).
 */
export const unsent = (stream: Writable): number => {
  const length = stream.writableLength
  const internals = stream as unknown as Internals
  const state = internals._writableState
  if (state?.writing !== true || typeof state.writelen !== "number") return length
  const left = internals.encrypted === true ? queued(internals._parent) : queued(internals)
  if (left === undefined) return length
  // a TLS socket's queue is ciphertext, a little more than the plaintext in flight
  return length - state.writelen + Math.min(state.writelen, left)
}
