/**
 * The front door of a QEMU destination: every accepted connection is a candidate until it proves itself,
 * all within one handshake deadline counted from when the wait for its first bytes began (after any TLS
 * handshake). The main channel proves itself by QEMU's complete file header (`QEVM`, file version 3: what
 * QEMU's own loader checks first, and all that QEMU sends before its setup is done); a multifd channel by its
 * complete 64-byte init packet, which is then adopted into the channel set once the main stream has announced
 * the RAM blocks (QEMU may connect its channels before the main stream gets that far), if the main channel's
 * peer sent it (TLS: the same PSK identity or client certificate; QEMU's uuid, zeros by default, proves nothing). Candidates that do not
 * prove themselves — strangers, connections that close or stall half-way, garbage, a second main channel,
 * channels of another VM or of another peer — are closed, logged and listed in `rejected`, and the destination keeps waiting.
 *
 * @internal
 */
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import * as Ref from "effect/Ref"
import type * as Scope from "effect/Scope"
import * as MigrationError from "../../MigrationError.js"
import * as MultifdRecv from "../../MultifdRecv.js"
import * as Protocol from "../../Protocol.js"
import * as QemuStream from "../../QemuStream.js"
import type * as Transport from "../../Transport.js"
import * as Acceptor from "../acceptor.js"
import { otherKindHint, otherPeer, tlsHint } from "../candidates.js"

/** The candidates being accepted. */
export interface Candidates {
  /** The main channel: the first candidate that sent a complete, valid QEMU file header. */
  readonly main: Effect.Effect<Transport.Connection>
  /** Connections turned away, each with the reason. */
  readonly rejected: Effect.Effect<ReadonlyArray<string>>
  /** Fails when adopting a channel fails the migration (a broken channel of QEMU's, not a stranger). */
  readonly failure: Effect.Effect<never, MultifdRecv.ChannelFailure>
  /** When (the clock's ms) the first candidate proved itself: QEMU's migration runs from there. */
  readonly started: Effect.Effect<number | undefined>
  /**
   * Fails with a `Timeout` once a multifd channel that proved itself (QEMU connects its channels before its main
   * stream's header arrives) has waited `peer` for the main channel and still waits; never succeeds. A channel
   * turned away meanwhile (closed after its init packet: a migration QEMU gave up) waits no more: it kept the wait
   * running, and a destination that had turned every such channel away failed after the peer timeout, its QEMU's
   * next migration then finding nobody. The caller races it with `main` only.
   */
  readonly orphaned: Effect.Effect<never, MigrationError.MigrationError>
  /** Multifd channels turned away because this destination expects QEMU without multifd (channels 0). */
  readonly multifdTurnedAway: Effect.Effect<number>
}

/** A SYNC packet's header size for each page size QEMU may have (512 bytes to 512 KiB), smallest first. */
const SYNC_SIZES = Array.from({ length: 11 }, (_, i) => Protocol.headerSize(2 ** (19 - i)))

/** Whether `header` (its fixed part at least) is a SYNC packet's: no pages, no payload. */
const isSync = (header: Buffer): boolean =>
  header.readUInt32BE(0) === Protocol.MAGIC && (header.readUInt32BE(8) & Protocol.FLAG_SYNC) !== 0 &&
  header.readUInt32BE(16) === 0 && header.readUInt32BE(20) === 0 && header.readUInt32BE(32) === 0

/** Why a candidate failed, without its address (the rejection names it). */
const problemOf = (error: Transport.TransportError | MigrationError.MigrationError): string =>
  error._tag === "TransportError" ? error.detail : error.message

/** Starts accepting candidates on `listener` in the current scope. */
export const start = (
  listener: Transport.Listener,
  options: {
    readonly upgrade: Transport.Upgrade<Transport.UpgradeError> | undefined
    /** One deadline for a candidate's first bytes and the rest of its header or init packet. */
    readonly handshake: Duration.DurationInput
    /** The channel set, once the main stream announced the RAM blocks: channels are adopted into it. */
    readonly channelSet: Deferred.Deferred<MultifdRecv.MultifdRecv["Type"]>
    /** Whether QEMU migrates with multifd: without, a multifd channel is a stranger. */
    readonly multifd: boolean
    /** The multifd channels this destination expects (QEMU's multifd-channels). */
    readonly channels: number
    /** How long channels that proved themselves wait for the main channel (`orphaned`). */
    readonly peer: Duration.DurationInput
    /**
     * The uuid QEMU's channels carry, when the destination was told it (`QemuIncoming.Options.uuid`): a channel of
     * another is turned away as soon as its init packet came, rather than wait for the main stream among the channels.
     */
    readonly uuid?: Uint8Array | undefined
  }
): Effect.Effect<Candidates, never, Scope.Scope> =>
  Effect.gen(function*() {
    const handshakeMs = Duration.toMillis(Duration.decode(options.handshake))
    const main = yield* Deferred.make<Transport.Connection>()
    const started = yield* Ref.make<number | undefined>(undefined)
    const proved = Effect.flatMap(Clock.currentTimeMillis, (now) => Ref.update(started, (t) => t ?? now))
    // the multifd channels that proved themselves and wait for the channel set (the main channel's RAM blocks), and
    // the wait for the main channel that one of them gave up on (`orphaned`)
    const waiting = yield* Ref.make(0)
    const orphan = yield* Deferred.make<never, MigrationError.MigrationError>()
    const multifdTurnedAway = yield* Ref.make(0)

    /** The rest of a candidate's handshake, by the deadline that began at `since`. */
    const byDeadline = (since: number, what: string) => <A, E>(self: Effect.Effect<A, E>) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) =>
        Effect.timeoutFail(self, {
          duration: Duration.millis(Math.max(0, handshakeMs - (now - since))),
          onTimeout: () => MigrationError.timeout(what, options.handshake)
        }))

    /** A candidate that began with `QEVM`: the main channel once its header is complete and valid. */
    const mainCandidate = (
      connection: Transport.Connection,
      reject: Acceptor.Reject,
      since: number,
      isProved: Effect.Effect<void>
    ) =>
      Effect.gen(function*() {
        // peeked, not read: the stream reader reads the header again, so that its offsets are the stream's
        const header = yield* Effect.either(
          connection.peek(QemuStream.HEADER_SIZE).pipe(byDeadline(since, "waiting for a complete QEMU file header"))
        )
        if (Either.isLeft(header)) return yield* reject(connection, `no valid QEMU file header: ${problemOf(header.left)}`)
        const bad = QemuStream.checkHeader(header.right)
        if (bad !== undefined) return yield* reject(connection, `no valid QEMU file header: ${bad.detail}`)
        yield* proved
        if (!(yield* Deferred.succeed(main, connection))) return yield* reject(connection, "a second QEMU main channel")
        yield* isProved
        // the migration's main channel: it stays open while the migration runs
        return yield* Effect.never
      })

    /** A candidate that began with the multifd magic: a channel once its init packet is complete. */
    const channelCandidate = (
      connection: Transport.Connection,
      reject: Acceptor.Reject,
      since: number,
      isProved: Effect.Effect<void>
    ) =>
      Effect.gen(function*() {
        const init = yield* Effect.either(
          connection.read(Protocol.INIT_PACKET_SIZE).pipe(byDeadline(since, "waiting for a complete multifd init packet"))
        )
        if (Either.isLeft(init)) return yield* reject(connection, `no valid init packet: ${problemOf(init.left)}`)
        // a uuid known up front turns another's channel away now: it held a place, and the wait for the main channel
        // failed the destination (`orphaned`) while it stayed, before QEMU came (its id is adopt's to judge)
        const foreign = options.uuid === undefined
          ? undefined
          : Either.getLeft(Protocol.decodeInit(init.right, { channels: 256, uuid: options.uuid }))
        if (foreign !== undefined && Option.isSome(foreign) && MultifdRecv.isStranger(foreign.value)) {
          return yield* reject(connection, foreign.value.message)
        }
        yield* proved
        return yield* adopt(connection, init.right, reject, isProved)
      })

    /**
     * Adopts a channel whose init packet arrived: once the channel set exists (QEMU connects its channels
     * while the main stream has not yet announced the RAM blocks: no deadline here; `orphaned` bounds the wait
     * for the main channel, the main stream's watch the rest), into it; a channel of another VM or of no multifd stream at all
     * (uuid, magic, version) is turned away, any other bad init packet fails the migration.
     */
    const adopt = (
      connection: Transport.Connection,
      init: Buffer,
      reject: Acceptor.Reject,
      isProved: Effect.Effect<void>
    ) =>
      Effect.flatMap(
        // a channel closed before the RAM blocks were announced is no channel of this migration: a QEMU that gave up
        // (cancelled, failed, killed) after it connected its channels, and whose next migration comes with its own
        Effect.acquireUseRelease(
          Ref.update(waiting, (n) => n + 1),
          () =>
            Effect.raceFirst(
              Effect.raceFirst(
                Effect.asSome(Deferred.await(options.channelSet)),
                Effect.as(closed(connection), Option.none<MultifdRecv.MultifdRecv["Type"]>())
              ),
              waitsForMain
            ),
          () => Ref.update(waiting, (n) => n - 1)
        ),
        Option.match({
          onNone: () =>
            reject(connection, "closed before QEMU's main stream announced its RAM blocks (a migration QEMU gave up?)"),
          // it counts among the candidates until then (`Acceptor.MAX_CANDIDATES`): connections that sent an init
          // packet each, waiting for a main stream, are as many as the places, not as many as the open-files limit
          onSome: (recv) => Effect.zipRight(isProved, adoptInto(recv, connection, init, reject))
        })
      )

    /**
     * Completes once `connection` ended (closed or reset) with nothing after its init packet but SYNC packets; never
     * once a data packet came. QEMU sends its setup SYNC on every channel at once, before the main stream's block list
     * leaves its buffer: a migration cancelled then leaves channels that sent it and closed (which, taken as this
     * migration's, failed the next one: 'the source closed the channel'). Peeked, not read: a channel of this
     * migration is adopted with every byte it sent.
     */
    const closed = (connection: Transport.Connection): Effect.Effect<void> =>
      Effect.gen(function*() {
        // bytes after the init packet that are whole SYNC packets
        let at = 0
        while (true) {
          if (Either.isLeft(yield* Effect.either(connection.peek(at + 1)))) return
          const fixed = yield* Effect.either(connection.peek(at + Protocol.HEADER_FIXED_SIZE))
          // ended (or failed) inside a packet's header: nothing of it could be used
          if (Either.isLeft(fixed)) return
          if (!isSync(fixed.right.subarray(at))) return yield* Effect.never
          // its offset array (zeros) has as many slots as the page size gives, not known yet: it ends where the stream
          // ends or another packet begins
          const next = yield* syncEnd(connection, at)
          if (next === undefined) return
          at = next
        }
      })

    /** Where the SYNC packet at `at` ends: the stream's end there (`undefined`), or the next packet's magic. */
    const syncEnd = (connection: Transport.Connection, at: number): Effect.Effect<number | undefined> =>
      Effect.gen(function*() {
        for (const size of SYNC_SIZES) {
          const after = yield* Effect.either(connection.peek(at + size + 4))
          if (Either.isRight(after)) {
            if (after.right.readUInt32BE(at + size) === Protocol.MAGIC) return at + size
            continue
          }
          // ended before the next packet's magic: right after this size (nothing more), or inside it
          const exact = yield* Effect.either(connection.peek(at + size))
          if (Either.isLeft(exact)) return undefined
          if (Either.isLeft(yield* Effect.either(connection.peek(at + size + 1)))) return undefined
        }
        // no page size gives a packet that ends there: not QEMU's
        return yield* Effect.never
      })

    /** Adopts a channel into the channel set, once the main channel is known. */
    const adoptInto = (
      recv: MultifdRecv.MultifdRecv["Type"],
      connection: Transport.Connection,
      init: Buffer,
      reject: Acceptor.Reject
    ) =>
      // (the main stream announced the blocks: the main channel is known)
      Effect.flatMap(Deferred.await(main), (owner) => {
        const other = otherPeer(owner, connection)
        return other !== undefined ? reject(connection, other) : recv.adopt(connection, init).pipe(
          Effect.catchIf(MultifdRecv.isStranger, (e) => reject(connection, e.message)),
          // QEMU numbers its channels 0 to multifd-channels - 1: one beyond this destination's count says QEMU has more
          Effect.mapError((e) =>
            e._tag === "ProtocolError" && e.reason === "BadChannelId" && typeof e.channel === "number" && e.channel >= options.channels
              ? new Protocol.ProtocolError({
                ...e,
                detail: `${e.detail} (QEMU's multifd-channels is more than ${options.channels}: give the same channel count on both sides)`
              })
              : e
          )
        )
      })

    /**
     * A waiting channel's watch: once it waited `peer` and no main channel came, the wait for the main channel is given
     * up (`orphaned`, naming the channels that wait now); never completes.
     */
    const waitsForMain: Effect.Effect<never> = Effect.zipRight(
      Effect.raceFirst(
        Effect.flatMap(Effect.zipRight(Effect.sleep(options.peer), Ref.get(waiting)), (n) =>
          Deferred.fail(
            orphan,
            MigrationError.timeout(
              `waiting for QEMU's main channel (${n} multifd channel${n === 1 ? "" : "s"} connected without it: did ` +
                "QEMU fail or was its main connection lost?)",
              options.peer
            )
          )),
        Deferred.await(main)
      ),
      Effect.never
    )

    const acceptor = yield* Acceptor.start<MultifdRecv.ChannelFailure>(listener, {
      upgrade: options.upgrade,
      firstBytesTimeout: options.handshake,
      classify: (connection, first, reject, since, isProved) =>
        QemuStream.isMainStream(first)
          ? mainCandidate(connection, reject, since, isProved)
          : QemuStream.isMultifdChannel(first)
          ? options.multifd
            ? channelCandidate(connection, reject, since, isProved)
            : Effect.zipRight(
              Ref.update(multifdTurnedAway, (n) => n + 1),
              reject(connection, "a multifd channel, but this destination expects QEMU without multifd (channels 0)")
            )
          : reject(connection, `not a QEMU migration stream (first bytes ${first.toString("hex")})${tlsHint(first)}${otherKindHint(first, "qemu")}`)
    })
    return {
      main: Deferred.await(main),
      rejected: acceptor.rejected,
      failure: acceptor.failure,
      started: Ref.get(started),
      orphaned: Deferred.await(orphan),
      multifdTurnedAway: Ref.get(multifdTurnedAway)
    }
  })
