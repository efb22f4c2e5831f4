/**
 * The candidates of `Migration.incoming`: which accepted connection is the migration's main channel (the
 * control magic and a complete hello, the first one wins) and which a multifd channel of it (a complete
 * init packet of this migration, from the main channel's peer, adopted by the channel set), each proved within
 * one handshake deadline.
 * Anything else is rejected, without disturbing the migration.
 *
 * @internal
 */
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Control from "../Control.js"
import * as MigrationError from "../MigrationError.js"
import * as MultifdRecv from "../MultifdRecv.js"
import * as Protocol from "../Protocol.js"
import type * as Transport from "../Transport.js"
import type * as Acceptor from "./acceptor.js"
import { FIRST_HIGH_WATER } from "./native/readQueue.js"
import * as PeerText from "./peerText.js"
import * as QemuFormat from "./qemu/format.js"

/** The main channel of a migration: the first connection that sent the control magic and a complete hello. */
export interface MainChannel {
  readonly connection: Transport.Connection
  readonly hello: Control.Hello
}

/** Why a candidate connection failed, without its address (the rejection names it). */
const candidateProblem = (error: Control.ReceiveError | MigrationError.MigrationError): string =>
  error._tag === "TransportError"
    ? error.detail
    : error._tag === "ProtocolError"
    ? `bad ${error.field}: ${error.detail}`
    : error.message

/** What first bytes of a TLS handshake record (0x16 0x03) mean to a destination that does not use TLS. */
export const tlsHint = (first: Buffer): string =>
  first[0] === 0x16 && first[1] === 0x03 ? ": a TLS handshake, and this destination does not use TLS" : ""

/**
 * What first bytes of the other kind of migration mean: QEMU migrating to a destination of this library's sources
 * (recv without --from-qemu), or a source of this library to one of QEMU's (recv --from-qemu, QemuIncoming). The
 * connection was turned away as "not a migration stream (first bytes 5145564d)", and the destination went on
 * waiting while QEMU failed, its user left to read hex.
 */
export const otherKindHint = (first: Buffer, expects: "ours" | "qemu"): string => {
  const magic = first.length >= 4 ? first.readUInt32BE(0) : undefined
  return expects === "ours" && magic === QemuFormat.FILE_MAGIC
    ? ": QEMU's migration stream (QEVM), which this destination does not take (a QEMU destination does: recv --from-qemu)"
    : expects === "qemu" && magic === Control.MAGIC
    ? ": a migration of this library's source (multifd send), which a QEMU destination does not take (recv without --from-qemu does)"
    : ""
}

/**
 * Why `channel` is no channel of the migration whose main channel is `main`, if it is not: another peer's (the
 * identity its TLS handshake proved, `Connection.peerIdentity`). The uuid of an init packet says which
 * migration a channel claims, not who sends it: another peer the destination admits (a second client certificate
 * of the CA, another PSK identity) that learnt it would have written pages of its own into the migration.
 */
export const otherPeer = (main: Transport.Connection, channel: Transport.Connection): string | undefined =>
  channel.peerIdentity === main.peerIdentity
    ? undefined
    : "a multifd channel of another peer than the main channel's: " +
      `${PeerText.fromPeer(channel.peerIdentity ?? "one that proved no identity")} ` +
      `(the main channel's: ${PeerText.fromPeer(main.peerIdentity ?? "one that proved no identity")})`

/**
 * Bytes of hello frames longer than `FIRST_HIGH_WATER` that a destination's candidates read at once, together: four
 * of the largest (`Control.MAX_FRAME`). A frame is read into a buffer of its announced length, held until it is
 * complete or the candidate's deadline: strangers that each announced a megabyte and sent all of it but its last
 * byte made the destination hold a megabyte apiece for the handshake timeout (300 of them, 300 MiB), as many as
 * the open-files limit let connect. A longer frame waits (within its deadline) until it fits; a shorter one, every
 * real hello but that of hundreds of blocks, costs no more than a candidate's read-ahead and is read at once.
 */
export const HELLO_BUDGET = 4 * Control.MAX_FRAME

/**
 * Reads a candidate's hello after its control magic: a frame longer than `FIRST_HIGH_WATER` once `budget` has room
 * for it (see `HELLO_BUDGET`); one longer than `Control.MAX_FRAME` is refused by `Control.receive` as before.
 */
const receiveHello = (connection: Transport.Connection, budget: Effect.Semaphore) =>
  Effect.gen(function*() {
    yield* connection.read(4)
    const length = (yield* connection.peek(4)).readUInt32BE(0)
    const receive = Control.receive(connection)
    return yield* (length > FIRST_HIGH_WATER && length <= Control.MAX_FRAME ? budget.withPermits(length)(receive) : receive)
  })

/** Tells a complete but unwanted hello why (best effort: the connection is closed right after). */
const refuse = (connection: Transport.Connection, reason: string) =>
  Control.send(connection, new Control.Reject({ reason })).pipe(Effect.timeout(Duration.seconds(1)), Effect.ignore)

/**
 * Sorts accepted connections: a main channel by the control magic and a complete hello (the first one wins;
 * a later one is refused, "a migration is already in progress"), a multifd channel by a complete init packet
 * of this migration, both within one handshake deadline that counts from the accept (its TLS handshake included) (a candidate
 * cannot stretch it by trickling bytes). Anything else is rejected.
 */
export const classifier = (
  main: Deferred.Deferred<MainChannel>,
  channelSet: Deferred.Deferred<MultifdRecv.MultifdRecv["Type"]>,
  handshake: Duration.DurationInput
): Acceptor.Classify<MultifdRecv.ChannelFailure> => {
  const handshakeMs = Duration.toMillis(Duration.decode(handshake))
  const helloBudget = Effect.unsafeMakeSemaphore(HELLO_BUDGET)
  return (connection, first, reject, since, proved) =>
    Effect.gen(function*() {
      const deadline = (what: string) => <A, E2>(self: Effect.Effect<A, E2>) =>
        Effect.flatMap(Clock.currentTimeMillis, (now) =>
          Effect.timeoutFail(self, {
            duration: Duration.millis(Math.max(0, handshakeMs - (now - since))),
            onTimeout: () => MigrationError.timeout(what, handshake)
          }))
      const magic = first.readUInt32BE(0)
      if (magic === Control.MAGIC) {
        const message = yield* Effect.either(
          receiveHello(connection, helloBudget).pipe(
            deadline("waiting for a complete hello")
          )
        )
        if (Either.isLeft(message)) return yield* reject(connection, `no valid hello: ${candidateProblem(message.left)}`)
        const hello = message.right
        if (hello._tag !== "Hello") return yield* reject(connection, `no valid hello: a ${hello._tag} message came first`)
        if (!(yield* Deferred.succeed(main, { connection, hello }))) {
          yield* refuse(connection, "a migration is already in progress")
          return yield* reject(connection, "a migration is already in progress")
        }
        yield* proved
        // the migration's main channel: it stays open while the migration runs
        return yield* Effect.never
      }
      if (magic === Protocol.MAGIC) {
        const init = yield* Effect.either(
          connection.read(Protocol.INIT_PACKET_SIZE).pipe(deadline("waiting for a complete multifd init packet"))
        )
        if (Either.isLeft(init)) return yield* reject(connection, `no valid init packet: ${candidateProblem(init.left)}`)
        // a real source connects its channels only after Accept, when the channel set exists
        const recv = yield* Effect.either(
          Deferred.await(channelSet).pipe(deadline("waiting for a migration to join"))
        )
        if (Either.isLeft(recv)) {
          return yield* reject(connection, `a multifd channel without a migration: ${recv.left.message}`)
        }
        // (the channel set exists once the main channel is known)
        const other = otherPeer((yield* Deferred.await(main)).connection, connection)
        if (other !== undefined) return yield* reject(connection, other)
        // (the init packet's checks are adopt's own, at once: a stranger's uuid is turned away there)
        yield* proved
        return yield* recv.right.adopt(connection, init.right).pipe(
          Effect.catchIf(MultifdRecv.isStranger, (e) => reject(connection, e.message))
        )
      }
      return yield* reject(connection, `not a migration stream (first bytes ${first.toString("hex")})${tlsHint(first)}${otherKindHint(first, "ours")}`)
    })
}
