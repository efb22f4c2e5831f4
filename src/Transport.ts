/**
 * Byte connections over `tcp:` and `unix:` addresses: connect and listen as scoped effects, writes with
 * backpressure, exact-length and scatter reads. Knows nothing of pages or packets.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import * as Data from "effect/Data"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Layer from "effect/Layer"
import * as Queue from "effect/Queue"
import type * as Scope from "effect/Scope"
import type { Stats } from "node:fs"
import * as Fs from "node:fs/promises"
import * as Net from "node:net"
import type * as Stream from "node:stream"
import * as DirectSocket from "./internal/native/directSocket.js"
import { SocketReader } from "./internal/native/socketReader.js"

// ---------------------------------------------------------------------------------------------------------
// Addresses

/**
 * Where to connect or listen. `File` is a snapshot file: `Migration.migrate` / `listenAndReceive` save and
 * restore it (`Snapshot`); `connect` and `listen` refuse it.
 */
export type Address =
  | { readonly _tag: "Tcp"; readonly host: string; readonly port: number }
  | { readonly _tag: "Unix"; readonly path: string }
  | { readonly _tag: "File"; readonly path: string }

/** The addresses of sockets. */
type SocketAddress = Exclude<Address, { readonly _tag: "File" }>

/** A connection or listener failure, naming the address and, when known, what was using it. */
export class TransportError extends Data.TaggedError("TransportError")<{
  readonly reason: "BadAddress" | "Connect" | "Listen" | "Closed" | "Reset" | "Timeout" | "Write"
  readonly address: string
  readonly detail: string
  readonly cause?: unknown
}> {
  override get message(): string {
    return `${this.address}: ${this.detail}`
  }
}

/** Parses `tcp:HOST:PORT` (IPv6 hosts in brackets, port 0 picks a free port), `unix:PATH` or `file:PATH`. */
export const parseAddress = (uri: string): Either.Either<Address, TransportError> => {
  const bad = (detail: string) => Either.left(new TransportError({ reason: "BadAddress", address: uri, detail }))
  if (uri.startsWith("unix:")) {
    const path = uri.slice(5)
    return path.length === 0 ? bad("unix: needs a socket path") : Either.right({ _tag: "Unix", path })
  }
  if (uri.startsWith("file:")) {
    const path = uri.slice(5)
    return path.length === 0 ? bad("file: needs a snapshot file path") : Either.right({ _tag: "File", path })
  }
  if (uri.startsWith("tcp:")) {
    const m = /^tcp:(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(uri)
    if (m === null) return bad("expected tcp:HOST:PORT (IPv6 as tcp:[::1]:PORT)")
    const host = m[1] ?? m[2]!
    if (m[1] !== undefined && Net.isIPv6(host) === false) return bad(`${host} is not an IPv6 address`)
    const port = Number(m[3])
    if (port > 65535) return bad(`port ${port} is out of range 0-65535`)
    return Either.right({ _tag: "Tcp", host, port })
  }
  return bad("expected an address of the form tcp:HOST:PORT, unix:PATH or file:PATH")
}

/** Whether a host is an IP address literal (not a name a certificate is issued for). */
export const isIp = (host: string): boolean => Net.isIP(host) !== 0

/** Formats an address as a URI that `parseAddress` accepts. */
export const formatAddress = (address: Address): string =>
  address._tag === "File"
    ? `file:${address.path}`
    : address._tag === "Unix"
    ? `unix:${address.path}`
    : Net.isIPv6(address.host)
    ? `tcp:[${address.host}]:${address.port}`
    : `tcp:${address.host}:${address.port}`

// ---------------------------------------------------------------------------------------------------------
// Connections

/** A byte connection. Reads are exact: they complete with every byte asked for, or fail. */
export interface Connection {
  /** The peer, for messages. */
  readonly peer: string
  /** The underlying stream: a TLS upgrade wraps it before the first read. */
  readonly stream: Stream.Duplex
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
   * when the stream ended cleanly just before a view's first byte; fails if it ended inside a view. Only
   * connections that read straight into memory (accepted TCP and Unix sockets without TLS) have it.
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
  if (e?.code === "EADDRNOTAVAIL") return "address not available"
  if (e?.code === "ENOTFOUND") return "host not found"
  return e?.message ?? String(error)
}

/** Bytes a connection queues in user space before `write` waits for them to drain. */
export const WRITE_BUFFER = 4 * 1024 * 1024

const closedError = (peer: string, error: unknown) =>
  new TransportError({
    reason: (error as NodeJS.ErrnoException | undefined)?.code === "ECONNRESET" ? "Reset" : "Closed",
    address: peer,
    detail: describeError(error),
    cause: error
  })

/** Destroys a stream and waits until its handle is closed. */
export const destroy = (stream: Stream.Duplex): Effect.Effect<void> =>
  Effect.async<void>((resume) => {
    if (stream.closed) return resume(Effect.void)
    stream.once("close", () => resume(Effect.void))
    stream.destroy()
  })

/**
 * Wraps a connected stream as a `Connection`. The stream is destroyed (abortively) when the scope closes,
 * unless it was ended gracefully and has closed by itself. Such a stream (TLS) may copy what it is given,
 * so a long write is handed over `WRITE_BUFFER` bytes at a time, each once the previous has drained.
 */
export const fromStream = (stream: Stream.Duplex, peer: string): Effect.Effect<Connection, never, Scope.Scope> =>
  Effect.acquireRelease(Effect.sync(() => makeConnection(stream, peer, undefined, WRITE_BUFFER)), () => destroy(stream))

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

const makeConnection = (
  stream: Stream.Duplex,
  peer: string,
  direct?: DirectSocket.DirectReader,
  /** Most bytes handed to the stream by one write call (for streams that copy what they are given). */
  handOver?: number
): Connection => {
  // an 'error' listener from the first instant: an unhandled 'error' event would crash the process
  let streamError: Error | undefined
  stream.on("error", (e) => {
    streamError ??= e
  })
  let reader: Reader | undefined = direct
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
      ? closedError(peer, r.end.error)
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

  /** One vectored write; completes at once below `WRITE_BUFFER` bytes waiting, else once drained. */
  const writeNow = (chunks: ReadonlyArray<Uint8Array>) =>
    Effect.async<void, TransportError>((resume) => {
      if (stream.destroyed || !stream.writable) {
        return resume(
          Effect.fail(
            streamError ? closedError(peer, streamError) : new TransportError({
              reason: "Closed",
              address: peer,
              detail: "connection is closed"
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
      if (stream.writableLength < WRITE_BUFFER) return resume(Effect.void)
      return awaitDrain(resume)
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
    drained: Effect.async<void, TransportError>((resume) => {
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
    }),
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
              : ended.filled === 0
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
        return resume(Effect.fail(new TransportError({ reason: "Closed", address: peer, detail: "connection is closed" })))
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

// ---------------------------------------------------------------------------------------------------------
// Connect and listen

/** Options for connecting. */
export interface ConnectOptions {
  /** Give up connecting after this long (default 10 seconds). */
  readonly timeout?: Duration.DurationInput | undefined
}

/** A listening server: its bound address (the real port when 0 was asked) and the accepted connections. */
export interface Listener {
  readonly address: Address
  /** Waits for the next connection; it is closed when the caller's scope closes. */
  readonly accept: Effect.Effect<Connection, never, Scope.Scope>
}

/** Connects and listens. A service so that tests can wrap it (inject faults, count handles). */
export class Transport extends Context.Tag("effect-multifd/Transport")<Transport, {
  readonly connect: (
    address: Address,
    options?: ConnectOptions
  ) => Effect.Effect<Connection, TransportError, Scope.Scope>
  readonly listen: (address: Address) => Effect.Effect<Listener, TransportError, Scope.Scope>
}>() {}

/** Default connect timeout. */
export const DEFAULT_CONNECT_TIMEOUT = Duration.seconds(10)

/** `connect` and `listen` of a `file:` address: a snapshot file is no socket. */
const notASocket = (address: Exclude<Address, SocketAddress>): TransportError =>
  new TransportError({
    reason: "BadAddress",
    address: formatAddress(address),
    detail: "a file: address is a snapshot file, not a socket (Migration.migrate and listenAndReceive save and " +
      "restore it)"
  })

const connectOptions = (address: SocketAddress): Net.NetConnectOpts =>
  address._tag === "Unix" ? { path: address.path } : { host: address.host, port: address.port }

/** Connects over TCP or a Unix socket; the socket is destroyed when the scope closes. */
export const connect = (
  address: Address,
  options?: ConnectOptions
): Effect.Effect<Connection, TransportError, Scope.Scope> =>
  Effect.gen(function*() {
    if (address._tag === "File") return yield* notASocket(address)
    const uri = formatAddress(address)
    const timeout = options?.timeout ?? DEFAULT_CONNECT_TIMEOUT
    const socket = yield* Effect.acquireRelease(Effect.sync(() => Net.connect(connectOptions(address))), destroy)
    const connection = makeConnection(socket, uri)
    yield* Effect.async<void, TransportError>((resume) => {
      const onError = (error: Error) =>
        resume(Effect.fail(new TransportError({ reason: "Connect", address: uri, detail: describeError(error), cause: error })))
      const onConnect = () => resume(Effect.void)
      socket.once("error", onError)
      socket.once("connect", onConnect)
      return Effect.sync(() => {
        socket.off("error", onError)
        socket.off("connect", onConnect)
      })
    }).pipe(
      Effect.timeoutFail({
        duration: timeout,
        onTimeout: () =>
          new TransportError({ reason: "Timeout", address: uri, detail: `no connection after ${Duration.format(timeout)}` })
      })
    )
    socket.setNoDelay(true)
    return connection
  })

/** Listens on TCP or a Unix socket; the server and every connection it accepted are closed with the scope. */
export const listen = (address: Address): Effect.Effect<Listener, TransportError, Scope.Scope> =>
  Effect.gen(function*() {
    if (address._tag === "File") return yield* notASocket(address)
    const uri = formatAddress(address)
    const pending = yield* Queue.unbounded<{ readonly socket: Net.Socket; readonly reader: DirectSocket.DirectReader }>()
    // every accepted socket until it closes: the server's release destroys the stragglers, so that closing
    // the server never waits on a connection somebody forgot
    const accepted = new Set<Net.Socket>()
    const server = yield* Effect.acquireRelease(
      Effect.sync(() =>
        // paused on connect: each socket is re-wrapped to read long runs straight into guest memory
        Net.createServer({ noDelay: true, pauseOnConnect: true }, (raw) => {
          const { reader, socket } = DirectSocket.rewrap(raw)
          socket.on("error", () => {}) // errors surface on read; this keeps an early reset from crashing
          accepted.add(socket)
          socket.once("close", () => accepted.delete(socket))
          Queue.unsafeOffer(pending, { socket, reader })
        })
      ),
      (server) =>
        Effect.zipRight(
          Effect.forEach(Array.from(accepted), destroy, { discard: true, concurrency: "unbounded" }),
          closeServer(server)
        )
    )
    const bind = Effect.async<void, TransportError>((resume) => {
      const onError = (error: Error) =>
        resume(Effect.fail(new TransportError({ reason: "Listen", address: uri, detail: describeError(error), cause: error })))
      server.once("error", onError)
      server.listen(
        address._tag === "Unix" ? { path: address.path } : { host: address.host, port: address.port },
        () => {
          server.off("error", onError)
          resume(Effect.void)
        }
      )
    })
    yield* address._tag === "Unix"
      // a socket file left by a listener that died (kill -9) is removed, as QEMU does; anything else stays
      ? Effect.catchIf(bind, isInUse, (error) => Effect.zipRight(clearStale(address.path, error), bind))
      : bind
    server.on("error", () => {}) // after listening, failures show up on the accepted sockets
    const bound = server.address()
    const actual: Address = address._tag === "Tcp" && bound !== null && typeof bound === "object"
      ? { _tag: "Tcp", host: address.host, port: bound.port }
      : address
    const actualUri = formatAddress(actual)
    return {
      address: actual,
      accept: Effect.uninterruptibleMask((restore) =>
        Effect.flatMap(
          restore(Queue.take(pending)),
          ({ reader, socket }) =>
            Effect.acquireRelease(
              Effect.sync(() => makeConnection(socket, `${actualUri} (from ${peerOf(socket)})`, reader)),
              () => destroy(socket)
            )
        )
      )
    }
  })

const isInUse = (error: TransportError): boolean => (error.cause as NodeJS.ErrnoException | undefined)?.code === "EADDRINUSE"

/** How long a probe of an existing Unix socket may take to connect before it counts as alive. */
const PROBE_TIMEOUT = Duration.seconds(1)

/**
 * Makes way for a Unix listener at `path`, where binding failed with `inUse`: a socket file that nobody
 * accepts on (a connection is refused) is stale and removed; a live socket, a file of another kind, or a
 * socket that cannot be probed fails with what is there, and stays.
 */
const clearStale = (path: string, inUse: TransportError): Effect.Effect<void, TransportError> =>
  Effect.gen(function*() {
    const fail = (detail: string, cause?: unknown) =>
      Effect.fail(new TransportError({ reason: "Listen", address: inUse.address, detail, cause: cause ?? inUse.cause }))
    const stat = yield* Effect.either(Effect.tryPromise(() => Fs.lstat(path)))
    // gone meanwhile: the second bind tells
    if (Either.isLeft(stat)) return
    if (!stat.right.isSocket()) {
      return yield* fail(`address already in use: ${path} is ${kindOf(stat.right)}, not a socket (left alone)`)
    }
    const probe = yield* Effect.scoped(Effect.gen(function*() {
      const socket = yield* Effect.acquireRelease(
        Effect.sync(() => Net.connect({ path }).on("error", () => {})),
        destroy
      )
      return yield* Effect.async<"live" | "stale" | "gone" | "silent" | NodeJS.ErrnoException>((resume) => {
        socket.once("connect", () => resume(Effect.succeed("live")))
        socket.once("error", (error: NodeJS.ErrnoException) =>
          resume(Effect.succeed(
            error.code === "ECONNREFUSED" ? "stale" : error.code === "ENOENT" ? "gone" : error
          )))
      }).pipe(Effect.timeoutTo({ duration: PROBE_TIMEOUT, onTimeout: () => "silent" as const, onSuccess: (r) => r }))
    }))
    if (probe === "gone") return
    if (probe === "live") return yield* fail("address already in use: something is listening on it")
    if (probe === "silent") {
      return yield* fail(
        `address already in use: the socket there neither accepts nor refuses a connection within ${Duration.format(PROBE_TIMEOUT)} (left alone)`
      )
    }
    if (probe !== "stale") {
      return yield* fail(`address already in use, and the socket there cannot be probed: ${describeError(probe)}`, probe)
    }
    yield* Effect.tryPromise({
      try: () => Fs.unlink(path),
      catch: (error) => new TransportError({
        reason: "Listen",
        address: inUse.address,
        detail: `cannot remove the stale socket left there: ${describeError(error)}`,
        cause: error
      })
    }).pipe(Effect.catchIf((e) => (e.cause as NodeJS.ErrnoException | undefined)?.code === "ENOENT", () => Effect.void))
  })

const kindOf = (stat: Stats): string =>
  stat.isFile()
    ? "a regular file"
    : stat.isDirectory()
    ? "a directory"
    : stat.isSymbolicLink()
    ? "a symbolic link"
    : stat.isFIFO()
    ? "a FIFO"
    : "a device or other special file"

const peerOf = (socket: Net.Socket): string =>
  socket.remoteAddress === undefined ? "local peer" : `${socket.remoteAddress}:${socket.remotePort}`

const closeServer = (server: Net.Server): Effect.Effect<void> =>
  Effect.async<void>((resume) => {
    if (!server.listening) return resume(Effect.void)
    server.close(() => resume(Effect.void))
    // connections handed out are owned (and closed) by their own scopes
  })

/** The Node implementation of `Transport`. */
export const layer: Layer.Layer<Transport> = Layer.succeed(Transport, { connect, listen })

/**
 * Secures a fresh connection before anything else is read or written on it (a TLS handshake, or a test's
 * fault injection). The identity upgrade is `Effect.succeed`.
 */
export type Upgrade<E = never> = (
  connection: Connection,
  channel: number | "main"
) => Effect.Effect<Connection, E, Scope.Scope>
