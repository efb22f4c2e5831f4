/**
 * A Node stream as a `Connection` (see `Transport`): exact reads through a `SocketReader`, or straight into
 * memory through a re-wrapped socket's `DirectReader`; vectored writes with backpressure; a graceful end. The
 * error and the connection's interface are defined here, beside the only code that makes them, and
 * re-exported by `Transport`.
 *
 * @internal
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import type * as Stream from "node:stream"
import * as Util from "node:util"
import * as DirectSocket from "./directSocket.js"
import { SocketReader } from "./socketReader.js"

/**
 * A connection or listener failure, naming the address and, when known, what was using it. `Tls`: this side's TLS
 * found a record of an established connection bad (it failed authentication: tampered with or corrupted on the
 * way): the connection is broken for good, not merely lost (an alert from the peer is `Closed`).
 */
export class TransportError extends Data.TaggedError("TransportError")<{
  readonly reason: "BadAddress" | "Connect" | "Listen" | "Closed" | "Reset" | "Timeout" | "Write" | "Tls"
  readonly address: string
  readonly detail: string
  readonly cause?: unknown
}> {
  override get message(): string {
    return `${this.address}: ${this.detail}`
  }
}

/** A byte connection. Reads are exact: they complete with every byte asked for, or fail. */
export interface Connection {
  /** The peer, for messages. */
  readonly peer: string
  /** The underlying stream: a TLS upgrade wraps it before the first read. */
  readonly stream: Stream.Duplex
  /**
   * Who the peer proved to be in the upgrade: a destination's TLS handshake sets it to the PSK identity, or the
   * verified client certificate, it admitted (`undefined` when the peer proved nothing: no TLS, or no client
   * certificate asked for). Every connection of one migration must be the same peer's.
   */
  readonly peerIdentity?: string | undefined
  /**
   * What the end of the peer's stream most likely means, when the upgrade knows (a TLS source whose certificate the
   * destination refused right after the handshake): a reader that meets the end (not an error) makes it an error
   * through this. `undefined`: no more than that the peer closed the connection.
   */
  readonly explainEnd?: ((error: TransportError) => TransportError) | undefined
  /**
   * Writes the chunks in order (one vectored write), without copying them: they must stay unchanged until
   * sent. Completes at once while less than `WRITE_BUFFER` bytes wait in user space, else once they have
   * drained to the kernel (backpressure). A failed write destroys the stream: the next call reports it.
   */
  readonly write: (chunks: ReadonlyArray<Uint8Array>) => Effect.Effect<void, TransportError>
  /** Completes once every byte written so far has been handed to the kernel (fails if the stream closed first). */
  readonly drained: Effect.Effect<void, TransportError>
  /** Reads exactly `length` bytes into a new buffer. */
  readonly read: (length: number) => Effect.Effect<Buffer, TransportError>
  /** Reads exactly `length` bytes into `target` at `at`. */
  readonly readInto: (target: Uint8Array, at: number, length: number) => Effect.Effect<void, TransportError>
  /** Reads `count × length` bytes, the i-th `length` bytes into `target` at `offsets[i]`. */
  readonly readScatter: (
    target: Uint8Array,
    offsets: ArrayLike<number>,
    count: number,
    length: number
  ) => Effect.Effect<void, TransportError>
  /**
   * Reads a chain of views, each filled exactly: `first`, then each view `next` returns for the view just
   * filled, until it returns `undefined` (`next` runs synchronously as bytes arrive: the socket reads the
   * next view without a trip through the fiber). Completes with `true` once `next` stopped, with `false`
   * when the stream ended cleanly just before a view's first byte; fails if it ended inside a view, or failed
   * (a reset, a TLS record that failed authentication) wherever it was. Only
   * connections that read straight into memory (accepted TCP and Unix sockets, a destination's TLS connections) have it.
   */
  readonly readChain?:
    | ((first: Uint8Array, next: (full: Uint8Array) => Uint8Array | undefined) => Effect.Effect<boolean, TransportError>)
    | undefined
  /** The next `length` bytes without consuming them. */
  readonly peek: (length: number) => Effect.Effect<Buffer, TransportError>
  /** Waits for more data (`false`) or a clean end of stream at this point (`true`). */
  readonly atEnd: Effect.Effect<boolean, TransportError>
  /**
   * Reads whatever is buffered, at least 1 and at most `max` bytes (waiting for the first), into a new
   * buffer; an empty buffer means a clean end of stream. For streams whose length nobody announces.
   */
  readonly readSome: (max: number) => Effect.Effect<Buffer, TransportError>
  /** Graceful close: flushes, ends the sending side (TLS close_notify, then FIN) and waits until it is sent. */
  readonly end: Effect.Effect<void, TransportError>
  /**
   * Bytes that arrived so far, read or still buffered (after TLS: decrypted bytes), counted from the first
   * read on: an inactivity watch compares it over time.
   */
  readonly received: () => number
}

/** A one-line description of a Node socket or TLS error. */
export const describeError = (error: unknown): string => {
  const e = error as (NodeJS.ErrnoException & { reason?: string }) | undefined
  if (typeof e?.code === "string" && e.code.startsWith("ERR_SSL_")) {
    return `TLS: ${e.reason ?? e.code.slice(8).toLowerCase().replace(/_/g, " ")}`
  }
  if (e?.code === "ECONNREFUSED") return "connection refused"
  if (e?.code === "ECONNRESET") return "connection reset by peer"
  if (e?.code === "EPIPE") return "peer closed the connection"
  if (e?.code === "ENOENT") return "no such socket"
  if (e?.code === "EADDRINUSE") return "address already in use"
  if (e?.code === "EACCES") return "permission denied"
  if (e?.code === "ENOTDIR") return "a component of the path is not a directory"
  if (e?.code === "EADDRNOTAVAIL") return "address not available"
  if (e?.code === "ENOTFOUND") return "host not found"
  if (e?.code === "EAI_AGAIN") return "host name lookup failed for now (temporary failure in name resolution)"
  if (e?.code === "EHOSTUNREACH") return "no route to host"
  if (e?.code === "ENETUNREACH") return "network is unreachable"
  if (e?.code === "ETIMEDOUT") return "connection timed out"
  if (e?.code === "ECONNABORTED") return "connection aborted"
  if (e?.code === "EPROTOTYPE") return "not a stream socket (a datagram socket?)"
  if (e?.code === "EMFILE") return "too many open files (this process's limit, ulimit -n)"
  if (e?.code === "ENFILE") return "too many open files in the system"
  // any other code in the system's words (Node says a connect's as "connect EPERM 10.0.0.2:4444": the code alone)
  const words = typeof e?.errno === "number" ? Util.getSystemErrorMap().get(e.errno) : undefined
  if (words !== undefined && words[0] === e?.code) {
    const lookup = e.syscall === "getaddrinfo" || e.code.startsWith("EAI_") ? "host name lookup failed: " : ""
    return `${lookup}${words[1]} (${e.code})`
  }
  return e?.message ?? String(error)
}

/** Bytes a connection queues in user space before `write` waits for them to drain. */
export const WRITE_BUFFER = 4 * 1024 * 1024

/**
 * The same for a stream that copies what it is given (TLS: a write's ciphertext is kept until the socket took
 * it, and Node hands a stream every write queued meanwhile at once): 4 MiB of ciphertext a channel cost a
 * TLS source 24 MiB of peak RSS over 4 channels; 1 MiB keeps it at 11 MiB, at the same speed.
 */
export const COPIED_WRITE_BUFFER = 1024 * 1024

/**
 * Whether `error` is a connection that went away (reset, closed, a write that failed, a stall): what a new
 * connection may get past. A TLS record that failed authentication (`Tls`) is not: somebody tampers with the path.
 */
export const isLostConnection = (error: unknown): error is TransportError =>
  // by tag, not class: a failure that crossed from a channel thread is rebuilt as a plain tagged object
  (error as { readonly _tag?: unknown } | undefined)?._tag === "TransportError" && (error as TransportError).reason !== "Tls"

/**
 * Whether an error is OpenSSL's own finding on an established connection (a record that failed authentication,
 * a record it cannot parse): not the socket's, and not an alert the peer sent (`ERR_SSL_..._ALERT_...`: the peer
 * ended the session, saying why, as a destination refusing a certificate after a TLS 1.3 handshake does).
 */
const isTlsError = (error: unknown): boolean => {
  const code = (error as NodeJS.ErrnoException | undefined)?.code
  return typeof code === "string" && code.startsWith("ERR_SSL_") && !code.includes("_ALERT_")
}

/** A stream's failure; `where` (" after N of M bytes") said after the socket's own words (not a TLS finding's). */
const closedError = (peer: string, error: unknown, where = "") =>
  new TransportError({
    reason: isTlsError(error)
      ? "Tls"
      : (error as NodeJS.ErrnoException | undefined)?.code === "ECONNRESET"
      ? "Reset"
      : "Closed",
    address: peer,
    detail: describeError(error) + (isTlsError(error) ? "" : where),
    cause: error
  })

/**
 * Why a stream can take no more writes: its peer's end was read (with `allowHalfOpen` off, Node then ends and
 * closes this side too), or it was closed here. "connection is closed" alone did not say which side closed it.
 */
const closedDetail = (stream: Stream.Duplex): string =>
  stream.readableEnded ? "peer closed the connection" : "connection is closed"

/** Destroys a stream and waits until its handle is closed. */
export const destroy = (stream: Stream.Duplex): Effect.Effect<void> =>
  Effect.async<void>((resume) => {
    if (stream.closed) return resume(Effect.void)
    stream.once("close", () => resume(Effect.void))
    stream.destroy()
  })

/** `chunks` in groups of at most `limit` bytes (a chunk longer than that is split). */
const inGroups = (chunks: ReadonlyArray<Uint8Array>, limit: number): Array<Array<Uint8Array>> => {
  const groups: Array<Array<Uint8Array>> = [[]]
  let room = limit
  for (const chunk of chunks) {
    for (let at = 0; at < chunk.length;) {
      if (room === 0) {
        groups.push([])
        room = limit
      }
      const n = Math.min(room, chunk.length - at)
      groups[groups.length - 1]!.push(n === chunk.length ? chunk : chunk.subarray(at, at + n))
      at += n
      room -= n
    }
  }
  return groups
}

/** Runs this long and longer, contiguous in memory, are read straight into it on a re-wrapped socket. */
export const DIRECT_MIN = 64 * 1024

type Reader = SocketReader | DirectSocket.DirectReader

/**
 * Wraps a stream as a `Connection`: `direct`, a re-wrapped socket's reader, reads long runs straight into
 * memory; `handOver` bounds what one write call hands to the stream.
 */
export const make = (
  stream: Stream.Duplex,
  peer: string,
  direct?: DirectSocket.DirectReader,
  /**
   * For streams that copy what they are given: the most bytes handed to the stream by one write call, and
   * queued before a write waits (instead of `WRITE_BUFFER`).
   */
  handOver?: number
): Connection => {
  // an 'error' listener from the first instant: an unhandled 'error' event would crash the process
  let streamError: Error | undefined
  stream.on("error", (e) => {
    streamError ??= e
  })
  let reader: Reader | undefined = direct
  const queued = handOver ?? WRITE_BUFFER
  const getReader = (): Reader => (reader ??= new SocketReader(stream))

  const waitData = (r: Reader, atLeast = 1) =>
    Effect.async<void>((resume) => {
      const cancel = r.wait(() => resume(Effect.void), atLeast)
      return Effect.sync(cancel)
    })

  const fillDirect = (r: DirectSocket.DirectReader, view: Uint8Array) =>
    Effect.async<number>((resume) => Effect.sync(r.fill(view, (filled) => resume(Effect.succeed(filled)))))

  const endFailure = (r: Reader, wanted: number, got: number) =>
    r.end?._tag === "Error"
      // where it broke, as for a close: inside a packet or a message, or between two
      ? closedError(peer, r.end.error, got > 0 ? ` after ${got} of ${wanted} bytes` : "")
      : new TransportError({
        reason: "Closed",
        address: peer,
        detail: got === 0 && wanted > 0
          ? "peer closed the connection"
          : `peer closed the connection after ${got} of ${wanted} bytes`
      })

  const readScatter = (
    target: Uint8Array,
    offsets: ArrayLike<number>,
    count: number,
    length: number
  ): Effect.Effect<void, TransportError> =>
    Effect.suspend(() => {
      const r = getReader()
      const total = count * length
      let index = 0
      let within = 0
      const step = (): Effect.Effect<void, TransportError> => {
        while (index < count) {
          const n = r.copyTo(target, offsets[index]! + within, length - within)
          within += n
          if (within === length) {
            index++
            within = 0
            continue
          }
          // nothing is buffered now: a long contiguous run is read by the socket straight into `target`
          if (r instanceof DirectSocket.DirectReader && r.end === undefined) {
            let last = index
            while (last + 1 < count && offsets[last + 1] === offsets[last]! + length) last++
            const run = (last + 1 - index) * length - within
            if (run >= DIRECT_MIN) {
              const from = offsets[index]! + within
              return Effect.flatMap(fillDirect(r, target.subarray(from, from + run)), (filled) => {
                const at = within + filled
                index += Math.floor(at / length)
                within = at % length
                return step()
              })
            }
          }
          break
        }
        if (index === count) return Effect.void
        if (r.end !== undefined && r.available === 0) {
          return Effect.fail(endFailure(r, total, index * length + within))
        }
        return Effect.flatMap(waitData(r), step)
      }
      return step()
    })

  const readInto = (target: Uint8Array, at: number, length: number) =>
    length === 0 ? Effect.void : readScatter(target, [at], 1, length)

  // writes issued and called back, for `drained`
  let writesIssued = 0
  let writesDone = 0
  const writeWaiters = new Set<() => void>()

  /** Waits until the stream's buffer drained, or fails if it closed with bytes still unsent. */
  const awaitDrain = (resume: (effect: Effect.Effect<void, TransportError>) => void) => {
    const settle = () => {
      stream.off("drain", settle)
      stream.off("close", settle)
      resume(
        stream.destroyed && stream.writableLength > 0
          ? Effect.fail(
            streamError ? closedError(peer, streamError) : new TransportError({
              reason: "Closed",
              address: peer,
              detail: "connection closed before the data was sent"
            })
          )
          : Effect.void
      )
    }
    stream.on("drain", settle)
    stream.on("close", settle)
    return Effect.sync(() => {
      stream.off("drain", settle)
      stream.off("close", settle)
    })
  }

  /** One vectored write; completes at once below `queued` bytes waiting, else once drained. */
  const writeNow = (chunks: ReadonlyArray<Uint8Array>) =>
    Effect.async<void, TransportError>((resume) => {
      if (stream.destroyed || !stream.writable) {
        return resume(
          Effect.fail(
            streamError ? closedError(peer, streamError) : new TransportError({
              reason: "Closed",
              address: peer,
              detail: closedDetail(stream)
            })
          )
        )
      }
      const last = chunks.length - 1
      if (last < 0) return resume(Effect.void)
      stream.cork()
      for (let i = 0; i < last; i++) stream.write(chunks[i])
      writesIssued++
      stream.write(chunks[last], (error) => {
        // Node calls back without an error when the stream was destroyed first: the bytes did not leave
        if (error || stream.destroyed) streamError ??= error ?? new Error("connection closed before the data was sent")
        writesDone++
        for (const waiter of writeWaiters) waiter()
      })
      stream.uncork()
      if (stream.writableLength < queued) return resume(Effect.void)
      return awaitDrain(resume)
    })

  /** Completes once every write issued so far called back, or fails with the stream's error. */
  const writesCalledBack = Effect.async<void, TransportError>((resume) => {
    // write callbacks run in order: once the last write issued so far called back, everything before did
    const target = writesIssued
    const settle = () => {
      if (writesDone < target) return
      writeWaiters.delete(settle)
      resume(streamError ? Effect.fail(closedError(peer, streamError)) : Effect.void)
    }
    if (writesDone >= target) return settle()
    writeWaiters.add(settle)
    return Effect.sync(() => writeWaiters.delete(settle))
  })

  return {
    peer,
    stream,
    received: () => reader?.received ?? 0,
    write: (chunks) => {
      if (handOver !== undefined && chunks.reduce((n, c) => n + c.length, 0) > handOver) {
        return Effect.forEach(inGroups(chunks, handOver), writeNow, { discard: true })
      }
      return writeNow(chunks)
    },
    drained: Effect.suspend(() =>
      // the stream took every byte written so far (a write the kernel took at once has left the stream's
      // buffer at once; its callback is only due on the next tick): nothing to wait for
      stream.writableLength === 0 && !stream.destroyed && streamError === undefined ? Effect.void : writesCalledBack
    ),
    read: (length) =>
      Effect.suspend(() => {
        const buf = Buffer.allocUnsafe(length)
        return Effect.as(readInto(buf, 0, length), buf)
      }),
    readInto,
    readScatter,
    readChain: direct === undefined ? undefined : (first, next) =>
      Effect.async<boolean, TransportError>((resume) => {
        const cancel = direct.chain(first, next, (ended) =>
          resume(
            ended === undefined
              ? Effect.succeed(true)
              : "defect" in ended
              ? Effect.die(ended.defect)
              : ended.filled === 0 && direct.end?._tag !== "Error"
              ? Effect.succeed(false)
              : Effect.fail(endFailure(direct, ended.view.length, ended.filled))
          ))
        return Effect.sync(cancel)
      }),
    peek: (length) =>
      Effect.suspend(() => {
        const r = getReader()
        const buf = Buffer.allocUnsafe(length)
        const step = (): Effect.Effect<Buffer, TransportError> => {
          if (r.peekTo(buf, length)) return Effect.succeed(buf)
          if (r.end !== undefined) return Effect.fail(endFailure(r, length, r.available))
          // wait for more than is buffered now: waiting for "any data" would return at once and spin
          return Effect.flatMap(waitData(r, r.available + 1), step)
        }
        return step()
      }),
    readSome: (max) =>
      Effect.suspend(() => {
        const r = getReader()
        const step = (): Effect.Effect<Buffer, TransportError> => {
          if (r.available > 0) {
            const buf = Buffer.allocUnsafe(Math.max(1, Math.min(max, r.available)))
            r.copyTo(buf, 0, buf.length)
            return Effect.succeed(buf)
          }
          if (r.end?._tag === "Eof") return Effect.succeed(Buffer.alloc(0))
          if (r.end !== undefined) return Effect.fail(endFailure(r, 0, 0))
          return Effect.flatMap(waitData(r), step)
        }
        return step()
      }),
    atEnd: Effect.suspend(() => {
      const r = getReader()
      const check = (): Effect.Effect<boolean, TransportError> => {
        if (r.available > 0) return Effect.succeed(false)
        if (r.end?._tag === "Eof") return Effect.succeed(true)
        if (r.end !== undefined) return Effect.fail(endFailure(r, 0, 0))
        return Effect.flatMap(waitData(r), check)
      }
      return check()
    }),
    end: Effect.async<void, TransportError>((resume) => {
      if (stream.writableFinished) return resume(Effect.void)
      if (stream.destroyed) {
        return resume(Effect.fail(new TransportError({ reason: "Closed", address: peer, detail: closedDetail(stream) })))
      }
      const onError = (error: Error) => resume(Effect.fail(closedError(peer, error)))
      stream.once("error", onError)
      stream.end(() => {
        stream.off("error", onError)
        resume(Effect.void)
      })
      return Effect.sync(() => stream.off("error", onError))
    })
  }
}

