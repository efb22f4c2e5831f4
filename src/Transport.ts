/**
 * Byte connections over `tcp:` and `unix:` addresses: connect and listen as scoped effects, writes with
 * backpressure, exact-length and scatter reads. Knows nothing of pages or packets. A connection over a Node
 * stream is implemented in `internal/native/connection`.
 *
 * About 700 lines: addresses, the service and its Node implementation (connect; listen on every address of a
 * host name, on a Unix socket others cannot write, making way where a stale socket file lies) belong together;
 * most of the length is documentation.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as ExecutionStrategy from "effect/ExecutionStrategy"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Queue from "effect/Queue"
import * as Scope from "effect/Scope"
import * as Dns from "node:dns"
import * as FsSync from "node:fs"
import * as Fs from "node:fs/promises"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import type * as Stream from "node:stream"
import * as Connections from "./internal/native/connection.js"
import { type Connection, describeError, destroy, TransportError } from "./internal/native/connection.js"
import * as DirectSocket from "./internal/native/directSocket.js"
import * as Lookups from "./internal/native/lookups.js"
import * as Requeue from "./internal/requeue.js"
import * as SocketFiles from "./internal/native/socketFiles.js"

// ---------------------------------------------------------------------------------------------------------
// Addresses

/**
 * Where to connect or listen. `File` is a snapshot file: `Migration.migrate` / `listenAndReceive` save and
 * restore it (`Snapshot`); `connect` and `listen` refuse it.
 *
 * @since 0.1.0
 * @category models
 */
export type Address =
  | { readonly _tag: "Tcp"; readonly host: string; readonly port: number }
  | { readonly _tag: "Unix"; readonly path: string }
  | { readonly _tag: "File"; readonly path: string }

/** The addresses of sockets. */
type SocketAddress = Exclude<Address, { readonly _tag: "File" }>

/**
 * Longest Unix socket path, in bytes: what fits `sockaddr_un.sun_path` with its NUL (108 bytes on Linux, 104
 * elsewhere). Node does not refuse a longer one: it binds and connects a truncated path, another file.
 *
 * @since 0.1.0
 * @category addresses
 */
export const MAX_UNIX_PATH_BYTES = process.platform === "linux" ? 107 : 103

/** Why `path` cannot be a Unix socket's path, if it cannot. */
const unixPathProblem = (path: string): string | undefined => {
  if (path.length === 0) return "unix: needs a socket path"
  // bind and connect fail on it with EACCES ("permission denied"), which sends the user looking at permissions
  if (path.endsWith("/")) return "the socket path ends with /: it names a directory, not a socket"
  const bytes = Buffer.byteLength(path, "utf8")
  return bytes > MAX_UNIX_PATH_BYTES
    ? `the socket path is ${bytes} bytes long; at most ${MAX_UNIX_PATH_BYTES} fit in a socket address`
    : undefined
}

/** Characters of a host name, at most (DNS: 255 bytes on the wire, a trailing dot aside). */
const MAX_HOST_NAME = 253

/** Why `port` cannot be a TCP port, if it cannot. */
const portProblem = (port: number): string | undefined =>
  Number.isInteger(port) && port >= 0 && port <= 65535 ? undefined : `port ${port} is out of range 0-65535`

/** A value a caller gave, for a message: strings quoted (a port "4444" read as 4444), objects named as such. */
const describeValue = (value: unknown): string =>
  typeof value === "string"
    ? JSON.stringify(value)
    : value === null || typeof value === "number" || typeof value === "boolean" || typeof value === "bigint"
    ? String(value)
    : value === undefined
    ? "undefined"
    : `(a ${Array.isArray(value) ? "array" : typeof value})`

/**
 * Why `address` is no `Address`, if it is not: not an object, a `_tag` other than `Tcp`, `Unix` or `File`, a host that is
 * not a name or an IP address (empty: Node connected to localhost; blanks: a lookup that failed "host not found"), a
 * port that is not a whole number 0-65535, a path that is not a string, or a socket path no socket address holds. A
 * caller from plain JavaScript gets no compiler's help: a `_tag` of `"tcp"` was taken for `Tcp` and connected, a path
 * of `null` was a defect.
 *
 * @since 0.1.0
 * @category addresses
 */
export const addressProblem = (address: unknown): string | undefined => {
  if (typeof address !== "object" || address === null) {
    return `the address ${describeValue(address)} is not an address object ({ _tag: "Tcp", host, port }, ` +
      `{ _tag: "Unix", path } or { _tag: "File", path }; Transport.parseAddress reads tcp:HOST:PORT)`
  }
  const a = address as { readonly _tag?: unknown; readonly host?: unknown; readonly port?: unknown; readonly path?: unknown }
  switch (a._tag) {
    case "Tcp":
      return typeof a.host !== "string" || a.host.length === 0 || /[\s\p{Cc}]/u.test(a.host)
        ? `the address's host ${describeValue(a.host)} is not a host name or IP address`
        : typeof a.port !== "number"
        ? `the address's port ${describeValue(a.port)} is not a number`
        : portProblem(a.port)
    case "Unix":
      return typeof a.path !== "string" ? `the address's path ${describeValue(a.path)} is not a string` : unixPathProblem(a.path)
    case "File":
      return typeof a.path !== "string" ? `the address's path ${describeValue(a.path)} is not a string` : undefined
    default:
      return `the address's _tag ${describeValue(a._tag)} is not Tcp, Unix or File`
  }
}

/** An address for a message, even one that is no `Address` (`addressProblem`): formatted where its fields are strings. */
const addressText = (address: Address): string => {
  const a = address as { readonly _tag?: unknown; readonly host?: unknown; readonly path?: unknown } | null
  return a !== null && typeof a === "object" &&
      ((a._tag === "Tcp" && typeof a.host === "string") || ((a._tag === "Unix" || a._tag === "File") && typeof a.path === "string"))
    ? formatAddress(address)
    : describeValue(address)
}

/**
 * Parses `tcp:HOST:PORT` (IPv6 hosts in brackets, port 0 picks a free port), `unix:PATH` or `file:PATH`.
 *
 * @since 0.1.0
 * @category addresses
 */
export const parseAddress = (uri: string): Either.Either<Address, TransportError> => {
  // (from plain JavaScript, a uri that is no string threw: "uri.startsWith is not a function")
  if (typeof uri !== "string") {
    return Either.left(new TransportError({ reason: "BadAddress", address: String(uri), detail: "a uri must be a string" }))
  }
  const bad = (detail: string) => Either.left(new TransportError({ reason: "BadAddress", address: uri, detail }))
  if (uri.startsWith("unix:")) {
    const path = uri.slice(5)
    const problem = unixPathProblem(path)
    return problem !== undefined ? bad(problem) : Either.right({ _tag: "Unix", path })
  }
  if (uri.startsWith("file:")) {
    const path = uri.slice(5)
    return path.length === 0 ? bad("file: needs a snapshot file path") : Either.right({ _tag: "File", path })
  }
  if (uri.startsWith("tcp:")) {
    // no blank in a host name: "tcp: 10.0.0.2:4444" (a stray space, a pasted line) was looked up, "host not found"
    // an IPv6 address may carry its interface (fe80::1%eth0: a link-local address means nothing without one)
    const m = /^tcp:(?:\[([0-9a-fA-F:.]+(?:%[^\]%\s]+)?)\]|([^:[\]\s]+)):(\d{1,5})$/.exec(uri)
    if (m === null) return bad("expected tcp:HOST:PORT (IPv6 as tcp:[::1]:PORT)")
    const host = m[1] ?? m[2]!
    if (m[1] !== undefined && Net.isIPv6(host) === false) return bad(`${host} is not an IPv6 address`)
    // a name longer than DNS allows was looked up all the same, and failed "getaddrinfo EINVAL <the name>" (a
    // connect: exit 1, as a destination that is down)
    if (m[2] !== undefined && Net.isIP(host) === 0 && host.replace(/\.$/, "").length > MAX_HOST_NAME) {
      return bad(`the host name is ${host.length} characters long; a name has at most ${MAX_HOST_NAME}`)
    }
    const port = Number(m[3])
    const problem = portProblem(port)
    if (problem !== undefined) return bad(problem)
    return Either.right({ _tag: "Tcp", host, port })
  }
  return bad("expected an address of the form tcp:HOST:PORT, unix:PATH or file:PATH")
}

/**
 * Whether a host is an IP address literal (not a name a certificate is issued for).
 *
 * @since 0.1.0
 * @category addresses
 */
export const isIp = (host: string): boolean => Net.isIP(host) !== 0

/**
 * Formats an address as a URI that `parseAddress` accepts.
 *
 * @since 0.1.0
 * @category addresses
 */
export const formatAddress = (address: Address): string =>
  address._tag === "File"
    ? `file:${address.path}`
    : address._tag === "Unix"
    ? `unix:${address.path}`
    : Net.isIPv6(address.host)
    ? `tcp:[${address.host}]:${address.port}`
    : `tcp:${address.host}:${address.port}`

// ---------------------------------------------------------------------------------------------------------
// Connections (implemented over Node streams in internal/native/connection)

export {
  /**
   * A byte connection. Reads are exact: they complete with every byte asked for, or fail.
   *
   * @since 0.1.0
   * @category models
   */
  type Connection,
  /**
   * Bytes a connection queues in user space before `write` waits for them to drain.
   *
   * @since 0.1.0
   * @category constants
   */
  WRITE_BUFFER,
  /**
   * Runs this long and longer, contiguous in memory, are read straight into it on a re-wrapped socket.
   *
   * @since 0.1.0
   * @category constants
   */
  DIRECT_MIN,
  /**
   * A one-line description of a Node socket or TLS error.
   *
   * @since 0.1.0
   * @category utils
   */
  describeError,
  /**
   * Destroys a stream and waits until its handle is closed.
   *
   * @since 0.1.0
   * @category utils
   */
  destroy,
  /**
   * A connection or listener failure, naming the address and, when known, what was using it.
   *
   * @since 0.1.0
   * @category errors
   */
  TransportError,
  /**
   * Whether an error is a connection that went away (reset, closed, a stall), which a new connection may get
   * past; a TLS record that failed authentication is not.
   *
   * @since 0.1.0
   * @category utils
   */
  isLostConnection
} from "./internal/native/connection.js"

/**
 * Wraps a connected stream as a `Connection`. The stream is destroyed (abortively) when the scope closes,
 * unless it was ended gracefully and has closed by itself. Such a stream (TLS) may copy what it is given,
 * so a long write is handed over 1 MiB at a time, each once the previous has drained, and a write waits
 * while 1 MiB is queued (not `WRITE_BUFFER`).
 *
 * @since 0.1.0
 * @category constructors
 */
export const fromStream = (stream: Stream.Duplex, peer: string): Effect.Effect<Connection, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => Connections.make(stream, peer, undefined, Connections.COPIED_WRITE_BUFFER)),
    () => destroy(stream)
  )

// ---------------------------------------------------------------------------------------------------------
// Connect and listen

/**
 * Options for connecting.
 *
 * @since 0.1.0
 * @category models
 */
export interface ConnectOptions {
  /** Give up connecting after this long (default 10 seconds). */
  readonly timeout?: Duration.DurationInput | undefined
}

/**
 * A listening server: its bound address (the real port when 0 was asked) and the accepted connections.
 *
 * @since 0.1.0
 * @category models
 */
export interface Listener {
  readonly address: Address
  /**
   * Waits for the next connection; it is closed when the caller's scope closes. Fails (`Closed`) once the
   * listener's own scope has closed: nothing will ever connect to it again.
   */
  readonly accept: Effect.Effect<Connection, TransportError, Scope.Scope>
}

/**
 * Connects and listens. A service so that tests can wrap it (inject faults, count handles).
 *
 * @since 0.1.0
 * @category tags
 */
export class Transport extends Context.Tag("effect-multifd/Transport")<Transport, {
  readonly connect: (
    address: Address,
    options?: ConnectOptions
  ) => Effect.Effect<Connection, TransportError, Scope.Scope>
  readonly listen: (address: Address) => Effect.Effect<Listener, TransportError, Scope.Scope>
}>() {}

/**
 * Default connect timeout.
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_CONNECT_TIMEOUT = Duration.seconds(10)

/** `connect` and `listen` of a `file:` address: a snapshot file is no socket. */
const notASocket = (address: Exclude<Address, SocketAddress>): TransportError =>
  new TransportError({
    reason: "BadAddress",
    address: formatAddress(address),
    detail: "a file: address is a snapshot file, not a socket (Migration.migrate and listenAndReceive save and " +
      "restore it)"
  })

/**
 * `connect` and `listen` of an address no socket can have, if it is that: a Unix path that no socket address
 * holds (or an empty one), a TCP port outside 0-65535 (Node throws on it, after a connect made its handle).
 */
const badSocketAddress = (address: SocketAddress): TransportError | undefined => {
  const problem = addressProblem(address)
  return problem === undefined
    ? undefined
    : new TransportError({ reason: "BadAddress", address: addressText(address), detail: problem })
}

const connectOptions = (address: SocketAddress): Net.NetConnectOpts =>
  address._tag === "Unix"
    ? { path: address.path }
    // the lookup of a name counted while it runs: a process that exits meanwhile must not wait for it (`Lookups`)
    : { host: address.host, port: address.port, lookup: Lookups.lookup }

/**
 * Connects over TCP or a Unix socket; the socket is destroyed when the scope closes.
 *
 * @since 0.1.0
 * @category constructors
 */
export const connect = (
  address: Address,
  options?: ConnectOptions
): Effect.Effect<Connection, TransportError, Scope.Scope> =>
  Effect.gen(function*() {
    // (an address that is none, from plain JavaScript, first: `null._tag` was a defect)
    const refused = badSocketAddress(address as SocketAddress)
    if (refused !== undefined) return yield* refused
    if (address._tag === "File") return yield* notASocket(address)
    const uri = formatAddress(address)
    const timeout = options?.timeout ?? DEFAULT_CONNECT_TIMEOUT
    const socket = yield* Effect.acquireRelease(Effect.sync(() => Net.connect(connectOptions(address))), destroy)
    const connection = Connections.make(socket, uri)
    yield* Effect.async<void, TransportError>((resume) => {
      const onError = (error: Error) =>
        resume(Effect.fail(new TransportError({ reason: "Connect", address: uri, detail: connectDetail(address, error), cause: error })))
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

/**
 * Connections a listener holds for whoever accepts next (Node accepts every connection at once): beyond this,
 * one more is closed as it comes, as a kernel's full backlog refuses it. Far more than one migration opens at
 * once (its main channel and at most `Protocol.MAX_CHANNELS` channels, taken as they come while it accepts).
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_QUEUED = 512

/**
 * Listens on TCP or a Unix socket; the server and every connection it accepted are closed with the scope. A host
 * name is listened on at every address it resolves to (`localhost`: ::1 and 127.0.0.1), on one port; a Unix
 * socket's file is never writable by others, whatever the umask.
 * Connections nobody has accepted yet wait in a queue of `MAX_QUEUED`; more are closed as they come (each held a
 * descriptor and its socket until somebody accepted it or the listener closed: a migration that has all its
 * channels accepts no more until it ends, and strangers connecting meanwhile piled up to the open-files limit).
 *
 * @since 0.1.0
 * @category constructors
 */
export const listen = (address: Address): Effect.Effect<Listener, TransportError, Scope.Scope> =>
  Effect.gen(function*() {
    // (an address that is none, from plain JavaScript, first: `null._tag` was a defect)
    const refused = badSocketAddress(address as SocketAddress)
    if (refused !== undefined) return yield* refused
    if (address._tag === "File") return yield* notASocket(address)
    const uri = formatAddress(address)
    const pending = yield* Queue.unbounded<{ readonly socket: Net.Socket; readonly reader: DirectSocket.DirectReader }>()
    // every accepted socket until it closes: the server's release destroys the stragglers, so that closing
    // the server never waits on a connection somebody forgot
    const accepted = new Set<Net.Socket>()
    // once the listener's scope closed, every accept (waiting or to come) fails: a destination given a listener
    // that is gone waited for ever while every source was refused
    const gone = yield* Deferred.make<never, TransportError>()
    /** A server on `bindTo` whose connections go to `pending`, closed with the scope; bound, or failed. */
    const serve = (bindTo: SocketAddress) =>
      Effect.gen(function*() {
        // another listener of ours at this path (listening, or making way there now) is a live one: its file is
        // never removed under it (claimed first, released after the server closed and removed its file)
        if (bindTo._tag === "Unix" && !(yield* SocketFiles.claim(bindTo.path))) {
          return yield* Effect.fail(new TransportError({
            reason: "Listen",
            address: uri,
            detail: "address already in use: something is listening on it"
          }))
        }
        const server = yield* Effect.acquireRelease(
          Effect.sync(() =>
            // paused on connect: each socket is re-wrapped to read long runs straight into guest memory
            Net.createServer({ noDelay: true, pauseOnConnect: true }, (raw) => {
              if (Option.getOrElse(pending.unsafeSize(), () => 0) >= MAX_QUEUED) {
                raw.on("error", () => {})
                raw.destroy()
                return
              }
              const { reader, socket } = DirectSocket.rewrap(raw)
              socket.on("error", () => {}) // errors surface on read; this keeps an early reset from crashing
              accepted.add(socket)
              socket.once("close", () => accepted.delete(socket))
              Queue.unsafeOffer(pending, { socket, reader })
            })
          ),
          // stop accepting first, then destroy what was accepted: a connection accepted while the stragglers
          // close would otherwise be left open
          (server) =>
            Effect.flatMap(stopAccepting(server), (closed) =>
              Effect.zipRight(
                Effect.forEach(Array.from(accepted), destroy, { discard: true, concurrency: "unbounded" }),
                closed
              ))
        )
        const bind = Effect.async<void, TransportError>((resume) => {
          const onError = (error: Error) => {
            // a host name's address other than the name itself: which of them failed
            const which = bindTo._tag === "Tcp" && address._tag === "Tcp" && bindTo.host !== address.host
              ? ` (on ${bindTo.host}, an address of ${address.host})`
              : ""
            resume(Effect.fail(new TransportError({
              reason: "Listen",
              address: uri,
              detail: listenDetail(bindTo, error) + which,
              cause: error
            })))
          }
          server.once("error", onError)
          const listening = () => {
            server.off("error", onError)
            resume(Effect.void)
          }
          if (bindTo._tag === "Unix") listenUnix(server, bindTo.path, listening)
          else server.listen({ host: bindTo.host, port: bindTo.port }, listening)
          // interrupted while it binds (Node binds a TCP port a turn or two after \`listen\`, once it looked the host
          // up): wait for the bind to settle, so that the release finds the server listening and closes it — it
          // found it not yet listening, closed nothing, and the port was bound a turn later, a server left
          // listening for good
          return Effect.async<void>((settled) => {
            if (server.listening) return settled(Effect.void)
            const done = () => {
              server.off("listening", done)
              server.off("error", done)
              settled(Effect.void)
            }
            server.once("listening", done)
            server.once("error", done)
          })
        })
        yield* bindTo._tag === "Unix"
          // a socket file left by a listener that died (kill -9) is removed, as QEMU does; anything else stays
          ? Effect.catchIf(bind, isInUse, (error) => Effect.zipRight(clearStale(bindTo.path, error), bind))
          : bind
        // known until the server closes (which removes it): a process that exits at once removes it itself
        if (bindTo._tag === "Unix") yield* SocketFiles.held(bindTo.path)
        server.on("error", () => {}) // after listening, failures show up on the accepted sockets
        return server
      })
    const port = address._tag === "Unix" ? undefined : yield* bindTcp(address, uri, serve)
    if (address._tag === "Unix") yield* serve(address)
    const actual: Address = address._tag === "Tcp" ? { ...address, port: port! } : address
    const actualUri = formatAddress(actual)
    // first as the scope closes (before the servers stop accepting): the listener's, not a server's (a server
    // of a port picked again, closed, is not the listener's end)
    yield* Effect.addFinalizer(() =>
      Deferred.fail(gone, new TransportError({
        reason: "Closed",
        address: actualUri,
        detail: "the listener is closed (its scope has ended): listen again"
      }))
    )
    // a connection handed out and given back (`Requeue.requeue`) is kept open when the scope it was accepted in closes
    const handedOut = new WeakMap<Connection, { readonly socket: Net.Socket; readonly reader: DirectSocket.DirectReader; kept: boolean }>()
    const listener: Listener = {
      address: actual,
      // the wait runs interruptible in a fiber of its own, interrupted by the join alone: asked uninterruptibly (an
      // acquire, `Effect.uninterruptible`), a race's loser (the listener's end, which does not come) inherited that
      // and the race waited for it for ever, a connection come; and a fiber's children hear of its interruption at
      // once. A connection taken as the wait was interrupted goes back to the queue for the next accept (it was
      // closed: a source that had connected for the listener's next migration lost its connection), or is closed
      // once the listener is
      accept: Effect.uninterruptibleMask((restore) =>
        Effect.flatMap(
          Effect.forkDaemon(Effect.interruptible(Effect.raceFirst(Deferred.await(gone), Queue.take(pending)))),
          (waiting) =>
            Effect.flatMap(
              Effect.onInterrupt(restore(Fiber.join(waiting)), () =>
                Effect.flatMap(Fiber.interrupt(waiting), (exit) =>
                  Exit.isFailure(exit)
                    ? Effect.void
                    : Effect.flatMap(Deferred.isDone(gone), (closed) =>
                      closed ? destroy(exit.value.socket) : Effect.sync(() => Queue.unsafeOffer(pending, exit.value))))),
              ({ reader, socket }) =>
                Effect.acquireRelease(
                  Effect.sync(() => {
                    const connection = Connections.make(socket, `${actualUri} (from ${peerOf(socket)})`, reader)
                    handedOut.set(connection, { socket, reader, kept: false })
                    return connection
                  }),
                  (connection) => handedOut.get(connection)?.kept === true ? Effect.void : destroy(socket)
                )
            )
        )
      )
    }
    Requeue.register(listener, (connection) =>
      Effect.map(Deferred.isDone(gone), (closed) => {
        const entry = handedOut.get(connection)
        if (entry === undefined || entry.kept || closed || entry.socket.destroyed) return false
        entry.kept = true
        Queue.unsafeOffer(pending, { socket: entry.socket, reader: entry.reader })
        return true
      }))
    return listener
  })

type TcpAddress = Extract<Address, { readonly _tag: "Tcp" }>

/**
 * The addresses a listener on `address` binds: an IP address itself; a host name, every address it resolves to,
 * as QEMU's listener does. `localhost` is ::1 and 127.0.0.1 on most systems, and Node's listen binds the first
 * alone: `recv tcp:localhost:4444` refused a source at tcp:127.0.0.1:4444, or QEMU's `migrate` of the same name
 * resolving the other way.
 */
const listenHosts = (address: TcpAddress, uri: string): Effect.Effect<ReadonlyArray<string>, TransportError> =>
  isIp(address.host) ? Effect.succeed([address.host]) : Effect.async((resume) => {
    // counted while it runs, as a connect's: a process that exits meanwhile must not wait for it (`Lookups`)
    Lookups.lookup(address.host, { all: true }, (error, found) =>
      resume(
        error !== null
          ? Effect.fail(new TransportError({ reason: "Listen", address: uri, detail: describeError(error), cause: error }))
          : Effect.succeed(Array.from(new Set((found as ReadonlyArray<Dns.LookupAddress>).map((a) => a.address))))
      ))
  })

/** A bind this machine cannot make (an IPv6 address where IPv6 is off): passed over while another address of the name binds. */
const unavailable = (error: TransportError): boolean => {
  const code = (error.cause as NodeJS.ErrnoException | undefined)?.code
  return code === "EADDRNOTAVAIL" || code === "EAFNOSUPPORT"
}

/** The port a TCP server listens on. */
const portOf = (server: Net.Server): number => (server.address() as Net.AddressInfo).port

/**
 * Binds a server on every address of `address` (`listenHosts`), all on one port: the first one's, when 0 was
 * asked (picked again if another address has it taken). Gives the port.
 */
const bindTcp = (
  address: TcpAddress,
  uri: string,
  serve: (bindTo: SocketAddress) => Effect.Effect<Net.Server, TransportError, Scope.Scope>
): Effect.Effect<number, TransportError, Scope.Scope> =>
  Effect.gen(function*() {
    const hosts = yield* listenHosts(address, uri)
    if (hosts.length === 1) return portOf(yield* serve({ _tag: "Tcp", host: hosts[0]!, port: address.port }))
    const all = Effect.gen(function*() {
      let port = address.port
      let bound = 0
      let passedOver: TransportError | undefined
      for (const host of hosts) {
        const served = yield* Effect.either(serve({ _tag: "Tcp", host, port }))
        if (Either.isRight(served)) {
          if (bound++ === 0) port = portOf(served.right)
        } else if (unavailable(served.left)) {
          passedOver ??= served.left
        } else {
          return yield* served.left
        }
      }
      return bound > 0 ? port : yield* passedOver!
    })
    // in a scope of their own, closed at once when one failed: a port picked again binds every address anew
    const attempt = Effect.flatMap(Effect.scope, (outer) =>
      Effect.flatMap(Scope.fork(outer, ExecutionStrategy.sequential), (inner) =>
        Effect.onError(Scope.extend(all, inner), (cause) => Scope.close(inner, Exit.failCause(cause)))))
    return yield* address.port === 0 ? Effect.retry(attempt, { times: 8, while: isInUse }) : attempt
  })

/**
 * Listens on a Unix socket whose file is never writable by others, whatever the umask (connecting takes write
 * permission on it): under umask 000, a service manager's or a container's, it was made srwxrwxrwx and any local
 * user could connect and, without TLS, offer the migration its pages. Owner and group get what the umask gives.
 * The umask is narrowed for the bind itself (Node binds and listens within `listen`, at once), so that no
 * connection comes before the file is right, and restored at once; where the umask cannot be set (a worker
 * thread), the file is changed right after.
 */
const listenUnix = (server: Net.Server, path: string, listening: () => void): void => {
  const umask = process.umask()
  let narrowed = false
  try {
    process.umask(umask | 0o002)
    narrowed = true
  } catch {
    // a worker thread: the chmod below
  }
  try {
    server.listen({ path }, listening)
  } finally {
    if (narrowed) process.umask(umask)
  }
  // a bind that failed made no file (its error comes as an event)
  if (!narrowed && server.listening) {
    try {
      FsSync.chmodSync(path, 0o777 & ~(umask | 0o002))
    } catch {
      // gone already: nothing to connect to
    }
  }
}

/**
 * What a failed listen says. libuv reports a Unix socket path in a directory that does not exist as EACCES
 * ("permission denied"), which sends the user looking at permissions: the missing directory is named instead.
 */
const listenDetail = (address: SocketAddress, error: Error): string => {
  if (address._tag === "Tcp") return tcpDetail(address, error)
  if ((error as NodeJS.ErrnoException).code !== "EACCES") return describeError(error)
  const dir = Path.dirname(address.path)
  return FsSync.existsSync(dir) ? describeError(error) : `no such directory: ${dir}${tildeHint(address.path)}`
}

/**
 * What a failed TCP listen or connect says. An IPv6 link-local address without its interface is EINVAL, which Node
 * words as "listen EINVAL: invalid argument fe80::1:4444": the interface it needs is named instead.
 */
const tcpDetail = (address: TcpAddress, error: Error): string => {
  if ((error as NodeJS.ErrnoException).code !== "EINVAL") return describeError(error)
  const [host, scope] = address.host.split("%")
  if (scope === undefined) {
    return /^fe[89ab][0-9a-f]:/i.test(host!)
      ? `a link-local address needs its interface, as tcp:[${address.host}%eth0]:${address.port}`
      : describeError(error)
  }
  // an interface this machine does not have (a typo, another host's name for it) is EINVAL too, which Node words as
  // "connect EINVAL fe80::1%eht0:4444 - Local (:::0)": the interface is named instead
  const interfaces = Os.networkInterfaces()
  const index = /^\d+$/.test(scope) ? Number(scope) : undefined
  const known = index === undefined
    ? Object.hasOwn(interfaces, scope)
    : Object.values(interfaces).some((addresses) => addresses?.some((a) => a.family === "IPv6" && a.scopeid === index))
  return known
    ? describeError(error)
    : `this machine has no network interface ${index === undefined ? scope : `of index ${index}`} (the address's %${scope})`
}

/**
 * What to add when a missing path starts with `~`: a shell expands `~` only at the start of a word, never in
 * `unix:~/x`, so the path is taken literally (a directory named `~` under the working directory).
 */
const tildeHint = (path: string): string =>
  path === "~" || path.startsWith("~/")
    ? " (the shell does not expand ~ inside unix:~/...: write the path out, as unix:$HOME/...)"
    : ""

/**
 * What a failed connect says. A Unix path that holds a file of another kind (the image, a directory) refuses the
 * connection as a socket nobody listens on does ("connection refused"): what is there is named instead.
 */
const connectDetail = (address: SocketAddress, error: Error): string => {
  if (address._tag === "Unix" && (error as NodeJS.ErrnoException).code === "ENOENT") {
    return describeError(error) + tildeHint(address.path)
  }
  if (address._tag === "Tcp") return tcpDetail(address, error)
  if ((error as NodeJS.ErrnoException).code !== "ECONNREFUSED") return describeError(error)
  try {
    const stat = FsSync.statSync(address.path)
    return stat.isSocket() ? describeError(error) : `${address.path} is ${kindOf(stat)}, not a socket`
  } catch {
    return describeError(error)
  }
}

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

const kindOf = (stat: FsSync.Stats): string =>
  stat.isFile()
    ? "a regular file"
    : stat.isDirectory()
    ? "a directory"
    : stat.isSymbolicLink()
    ? "a symbolic link"
    : stat.isFIFO()
    ? "a FIFO"
    : "a device or other special file"

/** Who connected: `127.0.0.1:40000`, `[::1]:40000` (bracketed, as a uri writes it: `::1:40000` reads as one address). */
const peerOf = (socket: Net.Socket): string =>
  socket.remoteAddress === undefined
    ? "local peer"
    : Net.isIPv6(socket.remoteAddress)
    ? `[${socket.remoteAddress}]:${socket.remotePort}`
    : `${socket.remoteAddress}:${socket.remotePort}`

/**
 * Closes the server's listening handle now (no connection is accepted after this returns) and gives the wait
 * for its `close`. Connections handed out are owned (and closed) by their own scopes.
 */
const stopAccepting = (server: Net.Server): Effect.Effect<Effect.Effect<void>> =>
  Effect.map(Deferred.make<void>(), (closed) => {
    if (server.listening) server.close(() => Deferred.unsafeDone(closed, Exit.void))
    else Deferred.unsafeDone(closed, Exit.void)
    return Deferred.await(closed)
  })

/**
 * The Node implementation of `Transport`.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer: Layer.Layer<Transport> = Layer.succeed(Transport, { connect, listen })

/**
 * Secures a fresh connection before anything else is read or written on it (a TLS handshake, or a test's
 * fault injection). The identity upgrade is `Effect.succeed`.
 *
 * @since 0.1.0
 * @category models
 */
export type Upgrade<E = never> = (
  connection: Connection,
  channel: number | "main"
) => Effect.Effect<Connection, E, Scope.Scope>

/**
 * What the upgrade of a migration's connections may fail with: the connection broke (`TransportError`), or
 * the handshake failed or refused the peer (`Tls.TlsError`, or a stand-in of that tag in tests). The source's
 * and the destination's upgrade hooks (`Migration`, `QemuIncoming`) take an `Upgrade<UpgradeError>`.
 *
 * @since 0.1.0
 * @category errors
 */
export type UpgradeError = TransportError | { readonly _tag: "TlsError"; readonly message: string }
