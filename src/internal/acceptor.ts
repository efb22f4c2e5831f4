/**
 * The destination's front door, shared by `Migration.incoming` and `QemuIncoming.incoming`: connections are
 * accepted by one loop, which forks a fiber for each (forks from one fiber: a chain of fibers each forking the
 * next made every fork dearer than the last, their inherited state growing with the chain), secured (TLS) and
 * peeked at; the caller's `classify` sees each connection with its first four bytes (and when it was accepted,
 * so that it can bound the rest of a handshake by the same deadline as its TLS handshake and first bytes). A connection whose
 * upgrade or first bytes fail, or that `classify` turns away, is closed and recorded with the reason; only
 * a failure of `classify` fails the set. Accepting stops when `until` completes, so that a listener serving one
 * migration after another hands each connection to the migration it belongs to. A listener that is closed (its
 * accept fails) fails the set with that error.
 *
 * @internal
 */
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as FiberSet from "effect/FiberSet"
import * as Option from "effect/Option"
import type * as Scope from "effect/Scope"
import * as MigrationError from "../MigrationError.js"
import * as Transport from "../Transport.js"
import * as Requeue from "./requeue.js"

/** The running acceptors. */
export interface Acceptor<E> {
  /** Connections turned away, each with the reason. */
  readonly rejected: Effect.Effect<ReadonlyArray<string>>
  /** Fails with the first failure of a `classify`; never succeeds. */
  readonly failure: Effect.Effect<never, E>
  /**
   * Accepts again (after `until` stopped it, or beside the acceptors running) until `until` completes: a
   * lost channel's new connection comes after the migration had all its channels.
   */
  readonly resume: (until: Effect.Effect<void>) => Effect.Effect<void>
}

/** Turns a connection away: it is closed when its acceptor's scope ends. */
export type Reject = (connection: Transport.Connection, why: string) => Effect.Effect<void>

/**
 * Handles a connection with its first four bytes; it stays open while this runs (a main channel's `classify`
 * never returns). `since`: the clock's time (ms) when the connection was accepted, before any upgrade (TLS).
 * `proved`: the connection proved itself (a complete hello that became the main channel, an init packet of the
 * migration being adopted): it no longer counts among the candidates (`MAX_CANDIDATES`).
 */
export type Classify<E> = (
  connection: Transport.Connection,
  first: Buffer,
  reject: Reject,
  since: number,
  proved: Effect.Effect<void>
) => Effect.Effect<void, E, Scope.Scope>

/** Rejected connections listed with their reasons (`Acceptor.rejected`); later ones are counted. */
export const MAX_LISTED = 256

/**
 * Connections being proved at once (accepted, and neither proved, `Classify`'s `proved`, nor turned away yet): with
 * this many, the next is accepted only once one of them is done, and later ones wait in the listener's queue
 * (`Transport.MAX_QUEUED`, beyond which they are closed as they come). Each held a descriptor, its socket and its
 * read-ahead until its handshake deadline: strangers that connected faster than the deadline closed them piled up
 * to the open-files limit (and the migration's own files and channels could not be opened). Twice what one
 * migration opens at once (its main channel and at most `Protocol.MAX_CHANNELS` channels).
 */
export const MAX_CANDIDATES = 512

/** The listeners a migration is being received on now (`claim`). */
const claimed = new WeakSet<Transport.Listener>()

/**
 * Makes `listener` this migration's, in the caller's scope: a listener serves one migration at a time, since two
 * destinations accepting on it would take each other's connections (the second turned the first one's multifd
 * channels away, and the migration timed out). A second one fails `Busy`; after the first, the next may
 * use it (the connections it left queued are the next migration's).
 */
export const claim = (listener: Transport.Listener): Effect.Effect<void, MigrationError.MigrationError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.suspend(() => {
      if (claimed.has(listener)) {
        return new MigrationError.MigrationError({
          reason: "Busy",
          detail: "a migration is already being received on this listener (one at a time: they would take each " +
            "other's connections)"
        })
      }
      claimed.add(listener)
      return Effect.void
    }),
    () => Effect.sync(() => claimed.delete(listener))
  )

/** Starts accepting on `listener` in the current scope. */
export const start = <E>(
  listener: Transport.Listener,
  options: {
    readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
    /** How long a connection may take to send its first bytes. */
    readonly firstBytesTimeout: Duration.DurationInput
    readonly classify: Classify<E>
    /**
     * Completes when no more connections are wanted (the migration has all its channels): later ones stay in
     * the listener's queue for whoever accepts next (the next migration on the same listener) instead of being
     * taken and closed with this one. By default the acceptors accept until their scope closes.
     */
    readonly until?: Effect.Effect<void> | undefined
    /**
     * Whether a connection's first bytes make it a main channel, which only a migration that does not have one can
     * use: one that comes while the acceptors accept again (`resume`: for a lost channel's new connection) is the
     * next migration's, queued behind the running one, and is given back to the listener (unread but for the
     * peeked bytes) once they stop, rather than taken and refused. (A secured one cannot be given back: the
     * upgrade has read it; it is classified as before.)
     */
    readonly queueMains?: {
      /** The listener as `Transport.listen` made it (the one above may be a wrapper of it). */
      readonly listener: Transport.Listener
      readonly isMain: (first: Buffer) => boolean
    } | undefined
  }
): Effect.Effect<Acceptor<E | Transport.TransportError>, never, Scope.Scope> =>
  Effect.gen(function*() {
    // the first MAX_LISTED rejections with their reasons, the rest counted (a stranger that connects again and
    // again must not grow the list, or the log, without bound)
    const listed: Array<string> = []
    let unlisted = 0
    // a listener whose scope closed fails its accepts: the set fails with that too
    const connections = yield* FiberSet.make<void, E | Transport.TransportError>()

    const reject: Reject = (connection, why) =>
      Effect.suspend(() => {
        if (listed.length < MAX_LISTED) {
          listed.push(`${connection.peer}: ${why}`)
          return Effect.logWarning(`rejected a connection from ${connection.peer}: ${why}`)
        }
        return ++unlisted === 1
          ? Effect.logWarning(`more than ${MAX_LISTED} connections rejected: the next ones are counted, not listed`)
          : Effect.void
      })

    /**
     * `ended`: the resumed acceptors' end, when `raw` was accepted by them: a main channel then waits for it and is
     * given back to the listener (whatever ends the wait, this migration's end included), once no accept of theirs
     * can take it again.
     */
    const handle = (
      raw: Transport.Connection,
      proved: Effect.Effect<void>,
      ended?: Effect.Effect<void>
    ): Effect.Effect<void, E, Scope.Scope> =>
      Effect.gen(function*() {
        // one deadline from here for the handshake (TLS), the first bytes and what classify reads: a TLS handshake
        // done just in time left the candidate as long again to send nothing, and as long to send its hello
        const since = yield* Clock.currentTimeMillis
        const secured = options.upgrade
          ? yield* Effect.either(options.upgrade(raw, "main"))
          : { _tag: "Right" as const, right: raw }
        if (secured._tag === "Left") return yield* reject(raw, secured.left.message)
        const connection = secured.right
        const spent = (yield* Clock.currentTimeMillis) - since
        const first = yield* Effect.either(
          connection.peek(4).pipe(
            Effect.timeoutFail({
              duration: Duration.millis(Math.max(0, Duration.toMillis(Duration.decode(options.firstBytesTimeout)) - spent)),
              onTimeout: () => MigrationError.timeout("waiting for the first bytes", options.firstBytesTimeout)
            })
          )
        )
        if (first._tag === "Left") {
          // a transport error's message names the peer, which the rejection names already
          const error = first.left
          return yield* reject(connection, error._tag === "TransportError" ? error.detail : error.message)
        }
        const mains = options.queueMains
        if (ended !== undefined && options.upgrade === undefined && mains !== undefined && mains.isMain(first.right)) {
          return yield* Effect.ensuring(
            ended,
            Effect.flatMap(Requeue.requeue(mains.listener, connection), (requeued) =>
              requeued
                ? Effect.logDebug(`a main channel from ${connection.peer} waits for the listener's next migration`)
                : Effect.void)
          )
        }
        return yield* options.classify(connection, first.right, reject, since, proved)
      })

    // a place among the candidates for each connection accepted (`MAX_CANDIDATES`), shared by the acceptors
    const places = yield* Effect.makeSemaphore(MAX_CANDIDATES)

    // the loop takes a place, then forks each connection's fiber, which accepts (the connection lives in its scope)
    // and handles it, and gives the place back once the connection proved itself or its fiber ended; the loop goes
    // on once it accepted
    const acceptor = (stop: Effect.Effect<void>, resumed: boolean): Effect.Effect<void, E | Transport.TransportError> =>
      Effect.gen(function*() {
        // (resumed: the main channels it takes wait for its end)
        const ended = yield* Deferred.make<void>()
        yield* Effect.addFinalizer(() => Deferred.succeed(ended, undefined))
        while (true) {
          let held = false
          const giveBack = Effect.suspend(() => {
            if (!held) return Effect.void
            held = false
            return places.release(1)
          })
          // no place while as many are being proved: the next connection waits in the listener's queue (a place
          // taken just as the wait stopped is given back)
          const take = Effect.uninterruptibleMask((restore) => Effect.tap(restore(places.take(1)), () => (held = true)))
          if (!(yield* Effect.raceFirst(Effect.as(take, true), Effect.as(stop, false)))) return yield* giveBack
          const accepted = yield* Deferred.make<boolean>()
          yield* FiberSet.run(
            connections,
            Effect.scoped(Effect.gen(function*() {
              const next = yield* Effect.raceFirst(Effect.map(listener.accept, Option.some), Effect.as(stop, Option.none()))
              yield* Deferred.succeed(accepted, Option.isSome(next))
              if (Option.isSome(next)) yield* handle(next.value, giveBack, resumed ? Deferred.await(ended) : undefined)
            })).pipe(Effect.ensuring(Effect.zipRight(giveBack, Deferred.succeed(accepted, false))))
          )
          if (!(yield* Deferred.await(accepted))) return
        }
      }).pipe(Effect.scoped)
    yield* FiberSet.run(connections, acceptor(options.until ?? Effect.never, false))
    return {
      rejected: Effect.sync(() => unlisted === 0 ? [...listed] : [...listed, `… and ${unlisted} more connections`]),
      failure: Effect.zipRight(FiberSet.join(connections), Effect.never),
      resume: (until) => Effect.asVoid(FiberSet.run(connections, acceptor(until, true)))
    }
  })
