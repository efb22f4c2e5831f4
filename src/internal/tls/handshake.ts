/**
 * A TLS handshake as an Effect (resolved on the secure event, failed on an error, a close or the timeout),
 * the secured connection it yields, and the source's reading of a destination that hangs up right after it.
 *
 * @internal
 */
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import type * as NodeTls from "node:tls"
import * as Transport from "../../Transport.js"
import * as Connections from "../native/connection.js"
import * as DirectSocket from "../native/directSocket.js"
import { ownFibers } from "../native/ownFibers.js"
import { TlsError } from "./model.js"
import { describe } from "./verification.js"

/**
 * Fails at once when `connection` is closed already (its scope ended, or it was destroyed): a TLS socket over a
 * destroyed stream hears nothing, and the handshake waited its whole timeout, then said "timed out" of a connection
 * that had been gone from the start.
 */
export const open = (connection: Transport.Connection): Effect.Effect<void, TlsError> =>
  Effect.suspend(() =>
    connection.stream.destroyed
      ? Effect.fail(
        new TlsError({
          reason: "Handshake",
          detail: `handshake with ${connection.peer} failed: the connection is closed already (its scope has ended)`
        })
      )
      : Effect.void
  )

/** Runs a handshake on a TLS socket: resolves on `secureEvent`, fails on error, close or timeout. */
export const handshake = (
  socket: NodeTls.TLSSocket,
  secureEvent: "secureConnect" | "secure",
  peer: string,
  timeout: Duration.Duration,
  explain: (error: unknown) => string,
  authorize: (socket: NodeTls.TLSSocket) => string | undefined,
  /** What a close in the middle of the handshake most likely means. */
  closed = "connection closed"
) =>
  // in a fiber of its own, interruptible inside (`ownFibers`): run uninterruptibly (an acquire, a finalizer), the
  // timeout could not interrupt the wait for a peer that says nothing, and waited with it for ever
  ownFibers(Effect.async<void, TlsError>((resume) => {
    // (judging a peer's certificate runs in these listeners: a throw there, on a certificate of a shape nobody
    // foresaw, was an uncaught exception that ended the process; it refuses the peer instead)
    const onSecure = () => {
      cleanup()
      let refusal: string | undefined
      try {
        refusal = authorize(socket)
      } catch (cause) {
        refusal = `its certificate could not be judged (${describe(cause)})`
      }
      resume(
        refusal === undefined
          ? Effect.void
          : Effect.fail(new TlsError({ reason: "Unauthorized", detail: `handshake with ${peer}: ${refusal}` }))
      )
    }
    const onError = (error: Error) => {
      cleanup()
      let why: string
      try {
        why = explain(error)
      } catch {
        why = describe(error)
      }
      resume(Effect.fail(new TlsError({ reason: "Handshake", detail: `handshake with ${peer} failed: ${why}`, cause: error })))
    }
    const onClose = () => {
      cleanup()
      resume(Effect.fail(new TlsError({ reason: "Handshake", detail: `handshake with ${peer} failed: ${closed}` })))
    }
    const cleanup = () => {
      socket.off(secureEvent, onSecure)
      socket.off("error", onError)
      socket.off("close", onClose)
    }
    socket.once(secureEvent, onSecure)
    socket.once("error", onError)
    socket.once("close", onClose)
    return Effect.sync(cleanup)
  }).pipe(
    Effect.timeoutFail({
      duration: timeout,
      onTimeout: () =>
        new TlsError({ reason: "Timeout", detail: `handshake with ${peer} timed out after ${Duration.format(timeout)}` })
    })
  ))

/**
 * The source's main channel, which the destination may still turn away without a word: a Node destination
 * cannot send the alert that says why it refuses a client certificate (Node judges certificates after the
 * handshake, and in TLS 1.3 the client's handshake is over before the server has seen its certificate), so
 * the source just sees the connection close before any answer. Until the first byte arrives, a close or
 * reset is reported as the most likely `refusal`: the `TransportError` says it, its cause is a `TlsError`
 * "Unauthorized" (which `Migration.migrate` reports as the refusal, and a lost channel does not re-attach after).
 * A multifd `channel`'s destination never answers: its close is not said to come "without answering".
 */
export const explainingEarlyClose = (
  connection: Transport.Connection,
  refusal: string,
  channel: "main" | number = "main"
): Transport.Connection => {
  let heard = false
  const explain = (error: Transport.TransportError) => {
    if (heard || (error.reason !== "Closed" && error.reason !== "Reset" && error.reason !== "Write")) return error
    // (a multifd channel's destination never answers: only the main channel's close comes "without answering")
    const closed = `the destination closed the connection right after the TLS handshake${
      channel === "main" ? ", without answering" : ""
    }: it most likely refused ${refusal}`
    return new Transport.TransportError({
      reason: error.reason,
      address: error.address,
      detail: closed,
      cause: new TlsError({
        reason: "Unauthorized",
        detail: `handshake with ${connection.peer}: ${closed}; its log says why`,
        cause: error
      })
    })
  }
  const reading = <A>(effect: Effect.Effect<A, Transport.TransportError>) =>
    heard ? effect : effect.pipe(
      Effect.tap(() => {
        heard = true
      }),
      Effect.mapError(explain)
    )
  const writing = <A>(effect: Effect.Effect<A, Transport.TransportError>) =>
    heard ? effect : Effect.mapError(effect, explain)
  return {
    ...connection,
    write: (chunks) => writing(connection.write(chunks)),
    drained: Effect.suspend(() => writing(connection.drained)),
    read: (length) => reading(connection.read(length)),
    readInto: (target, at, length) => reading(connection.readInto(target, at, length)),
    readScatter: (target, offsets, count, length) => reading(connection.readScatter(target, offsets, count, length)),
    peek: (length) => reading(connection.peek(length)),
    atEnd: Effect.suspend(() => writing(connection.atEnd)),
    readSome: (max) =>
      Effect.suspend(() =>
        heard ? connection.readSome(max) : connection.readSome(max).pipe(
          Effect.tap((chunk) => {
            if (chunk.length > 0) heard = true
          }),
          Effect.mapError(explain)
        )
      ),
    end: Effect.suspend(() => writing(connection.end)),
    explainEnd: (error) => heard ? error : explain(error)
  }
}

/**
 * Makes a TLS socket report the TLS errors of its established connection as 'error' events. Node emits them
 * (a record that failed authentication: "decryption failed or bad record mac") as 'error' only once the socket's
 * control was released, which `tls.connect` and `tls.Server` do and a `TLSSocket` made by hand — a destination's,
 * upgrading a connection it accepted — never does: its errors went to an internal event, the socket stayed open
 * and nothing read from it again, so a destination that found a tampered record waited for its peer timeout.
 * `_releaseControl` is Node's own step (since Node 0.11) and does nothing on a socket already released.
 */
const releaseControl = (socket: NodeTls.TLSSocket): void => {
  const internal = socket as unknown as { _releaseControl?: () => boolean }
  if (typeof internal._releaseControl === "function") internal._releaseControl()
}

/**
 * Wraps a TLS socket as a scoped connection: destroyed at once on failure, `end` sends close_notify. With
 * `direct` (a destination's connection, which reads packets of pages) decrypted bytes are copied straight
 * where a read wants them (`DirectSocket.adopt`), and the connection reads chains of packets (`readChain`).
 */
export const secured = (socket: NodeTls.TLSSocket, peer: string, direct = false) =>
  Effect.acquireRelease(Effect.succeed(socket), Transport.destroy).pipe(
    Effect.tap(() =>
      Effect.sync(() => {
        releaseControl(socket)
        // once secure, Node only emits a TLS error (a fatal alert, say) and leaves the socket open, where further
        // writes never complete: destroy it, as a plain socket is on error
        socket.on("error", () => socket.destroy())
      })
    ),
    Effect.zipRight(
      direct
        ? Effect.acquireRelease(
          Effect.sync(() => Connections.make(socket, peer, DirectSocket.adopt(socket), Connections.COPIED_WRITE_BUFFER)),
          () => Connections.destroy(socket)
        )
        : Transport.fromStream(socket, peer)
    )
  )


/**
 * `upgrade` given at most `timeout`, a migration's handshake timeout (`Transfer.Timeouts.handshake`), whatever
 * the TLS settings' own (`TlsConfig.handshakeTimeoutMs`, 10 s by default): the shorter of the two ends it, with
 * the same `Timeout` error.
 */
export const bounded = <E>(
  upgrade: Transport.Upgrade<E>,
  timeout: Duration.DurationInput
): Transport.Upgrade<E | TlsError> =>
(connection, channel) =>
  ownFibers(upgrade(connection, channel).pipe(
    Effect.timeoutFail({
      duration: timeout,
      onTimeout: () =>
        new TlsError({
          reason: "Timeout",
          detail: `handshake with ${connection.peer} timed out after ${Duration.format(Duration.decode(timeout))}`
        })
    })
  ))

const ServerNoteKey = Symbol.for("effect-multifd/Tls/ServerNote")

/** `upgrade`, carrying `note` (if any): what a destination that secures its connections with it says once as it starts. */
export const withServerNote = <E>(upgrade: Transport.Upgrade<E>, note: string | undefined): Transport.Upgrade<E> =>
  note === undefined ? upgrade : Object.assign(upgrade, { [ServerNoteKey]: note })

/** The note `withServerNote` gave `upgrade`, if any (a warning: `Tls.server` of settings that verify no client). */
export const serverNote = (upgrade: Transport.Upgrade<Transport.UpgradeError> | undefined): string | undefined =>
  (upgrade as { readonly [ServerNoteKey]?: string } | undefined)?.[ServerNoteKey]
