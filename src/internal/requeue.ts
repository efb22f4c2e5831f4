/**
 * Connections given back to the listener that handed them out (`requeue`): the destination's acceptor peeks at a
 * connection, finds it belongs to the next migration, and leaves it for whoever accepts next. Each listener that
 * `Transport.listen` makes registers how it takes one back (`register`).
 */
import * as Effect from "effect/Effect"
import type { Connection } from "./native/connection.js"

/** How each listener `Transport.listen` made takes a connection back, by listener. */
const requeues = new WeakMap<object, (connection: Connection) => Effect.Effect<boolean>>()

/** Makes `requeue` of `listener` run `takeBack` (called by `Transport.listen` for each listener it makes). */
export const register = (listener: object, takeBack: (connection: Connection) => Effect.Effect<boolean>): void => {
  requeues.set(listener, takeBack)
}

/**
 * Gives `connection`, which `listener` handed out and of which nothing was read but what was peeked, back to the
 * listener for whoever accepts next (at the end of its queue): it is no longer closed with the scope it was
 * accepted in (the listener closes it, if nobody accepts it again). `false`, and nothing done, for a connection
 * the listener did not hand out (a wrapped listener's, one given back already), or once either is closed.
 */
export const requeue = (listener: object, connection: Connection): Effect.Effect<boolean> =>
  Effect.suspend(() => requeues.get(listener)?.(connection) ?? Effect.succeed(false))
