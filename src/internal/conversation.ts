/**
 * The control channel as both sides of `Migration` hold it: its messages raised as a queue by a reader fiber
 * that fails on an abort, EOF or garbage; telling the peer why we give up; the errors of a conversation.
 *
 * @internal
 */
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Queue from "effect/Queue"
import type * as Scope from "effect/Scope"
import * as Control from "../Control.js"
import * as MigrationError from "../MigrationError.js"
import type * as Transport from "../Transport.js"
import * as PeerText from "./peerText.js"

/** What ends a conversation from the peer's side. */
export type ReaderFailure = Control.ReceiveError | MigrationError.MigrationError | MigrationError.ChannelError

/** A control channel being read: the messages that arrived, and the reader's failure. */
export interface Reader {
  readonly inbox: Queue.Queue<Control.Message>
  /** Fails once the reader fails (an abort, EOF or garbage); never succeeds. */
  readonly failure: Effect.Effect<never, ReaderFailure>
  /** Completes once the peer closed the channel where `endAllowed` allowed it; fails as `failure` does. */
  readonly closed: Effect.Effect<void, ReaderFailure>
  /**
   * The message being received now, for a timeout's message: `a control message of 131111 bytes on the main
   * channel` once its frame's length came and until its last byte did (a length corrupted on the way waits for
   * bytes that never come: neither side sent too little, and both wait); `undefined` between messages.
   */
  readonly inside: () => string | undefined
}

/**
 * Messages of the control channel held for a side that has not taken them yet. A conversation never has more
 * than a few waiting (each side answers the other's one message at a time; heartbeats are taken as they come):
 * a peer that sends message after message meanwhile is read no further (its socket's backpressure holds it)
 * rather than each one kept, without bound, until the side gets to them.
 */
export const INBOX = 64

/**
 * Raises the control channel's messages as a queue (of `INBOX` at most: the reader waits while it is full); the
 * reader fails on an abort, EOF or garbage — except a close once `endAllowed` says the conversation is over (it is
 * given the last message that came before the close), where it just stops; `notAllowed` then says why a close that
 * came too soon is a failure, if it says anything.
 */
export const reader = (
  connection: Transport.Connection,
  peer: string,
  endAllowed: (last: Control.Message | undefined) => Effect.Effect<boolean> = () => Effect.succeed(false),
  notAllowed: (
    last: Control.Message | undefined,
    error: Transport.TransportError
  ) => Effect.Effect<MigrationError.MigrationError | undefined> = () => Effect.succeed(undefined)
): Effect.Effect<Reader, never, Scope.Scope> =>
  Effect.gen(function*() {
    const inbox = yield* Queue.bounded<Control.Message>(INBOX)
    let last: Control.Message | undefined
    let frame: number | undefined
    const inFrame = (length: number | undefined) => {
      frame = length
    }
    const fiber = yield* Effect.forkScoped(Effect.gen(function*() {
      while (true) {
        const message = yield* Control.receive(connection, inFrame).pipe(
          // a reset is never the conversation's end, but what is said of an end out of turn is said of it too (a
          // destination whose source's Bye was cut by a reset said only 'connection reset by peer', not that the
          // source may not have heard Done)
          Effect.catchIf(
            (error) => error._tag === "TransportError" && (error.reason === "Closed" || error.reason === "Reset"),
            (error) =>
              Effect.flatMap((error as Transport.TransportError).reason === "Closed" ? endAllowed(last) : Effect.succeed(false), (allowed) =>
                allowed ? Effect.succeed(undefined) : Effect.flatMap(
                  notAllowed(last, error as Transport.TransportError),
                  (why): Effect.Effect<never, ReaderFailure> => Effect.fail(why ?? error)
                ))
          )
        )
        if (message === undefined) return
        last = message
        if (message._tag === "Abort") {
          return yield* new MigrationError.MigrationError({
            // the destination's digest mismatch is the source's too (it said Aborted, as if the destination had given
            // up, where the pages it received did not verify); a source's word is no verdict on this side's memory
            reason: message.found === "DigestMismatch" && peer === "destination" ? "DigestMismatch" : "Aborted",
            detail: message.step === "store"
              ? `the ${peer} could not store the image: ${PeerText.fromPeer(message.reason)}`
              : `the ${peer} aborted the migration: ${PeerText.fromPeer(message.reason)}`
          })
        }
        yield* Queue.offer(inbox, message)
      }
    }).pipe(Effect.mapError(MigrationError.onChannel("main"))))
    return {
      inbox,
      failure: Effect.zipRight(Fiber.join(fiber), Effect.never),
      closed: Fiber.join(fiber),
      inside: () => frame === undefined ? undefined : `a control message of ${frame} bytes on the main channel`
    }
  })

/** Sends a message on the control channel, naming the channel in its failure (as the reader's failures do). */
export const tell = (connection: Transport.Connection, message: Control.Message) =>
  Effect.mapError(Control.send(connection, message), MigrationError.onChannel("main"))

/** How often a side says it is still at work (receiving, hashing, storing): every second, or a quarter of the peer timeout. */
export const heartbeatInterval = (peer: Duration.DurationInput): Duration.Duration =>
  Duration.min(Duration.seconds(1), Duration.times(Duration.decode(peer), 0.25))

/**
 * Says `message` every `heartbeatInterval(peer)` until interrupted (first at once with `atOnce`). A write that
 * fails is ignored: it means the peer is gone, which the control reader reports.
 */
export const heartbeat = (
  tell: (message: Control.Message) => Effect.Effect<void, unknown>,
  message: Control.Message,
  peer: Duration.DurationInput,
  atOnce = false
): Effect.Effect<never> => {
  const say = Effect.ignore(tell(message))
  const wait = Effect.sleep(heartbeatInterval(peer))
  return Effect.forever(atOnce ? Effect.zipRight(say, wait) : Effect.zipRight(wait, say))
}

/** Tells the peer why we give up, if the control channel still works; never fails, never waits long. */
export const abortPeer = (connection: Transport.Connection, reason: string, step?: "store"): Effect.Effect<void> =>
  Control.send(connection, new Control.Abort({ reason, step })).pipe(
    Effect.timeout(Duration.seconds(1)),
    Effect.ignore
  )

/** A message that has no place in the conversation now. */
export const unexpected = (message: Control.Message, waiting: string): MigrationError.MigrationError =>
  new MigrationError.MigrationError({ reason: "Unexpected", detail: `unexpected ${message._tag} message ${waiting}` })

/** The message of the `TlsError` that explains a closed connection (`Tls.client` on a refused certificate), if any. */
export const tlsRefusal = (error: { readonly _tag: string }): string | undefined => {
  const cause = (error as { readonly cause?: { readonly _tag?: string; readonly message?: string } }).cause
  return cause?._tag === "TlsError" ? cause.message : undefined
}

/** The one-line message of anything thrown or failed with. */
export const messageOf = (error: unknown): string =>
  typeof error === "object" && error !== null && "message" in error && typeof error.message === "string" &&
    error.message.length > 0
    ? error.message
    : String(error)
