/**
 * A whole migration: `migrate` on the source and `incoming` on the destination drive the channel sets
 * through the control channel — hello, accept, rounds of pages each ended by a flush the destination
 * acknowledges, complete with digests, done. Everything runs in one scope: when `migrate` or `incoming`
 * returns (success, failure or interruption) every fiber has ended and every handle is closed.
 *
 * @since 0.1.0
 */
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Fiber from "effect/Fiber"
import * as Option from "effect/Option"
import * as Queue from "effect/Queue"
import * as Stream from "effect/Stream"
import * as Crypto from "node:crypto"
import * as Control from "./Control.js"
import * as GuestRam from "./GuestRam.js"
import * as Precopy from "./internal/precopy.js"
import * as Acceptor from "./internal/acceptor.js"
import { unlessStalled, within } from "./internal/stall.js"
import * as MigrationError from "./MigrationError.js"
import * as MultifdRecv from "./MultifdRecv.js"
import * as MultifdSend from "./MultifdSend.js"
import * as PageCodec from "./PageCodec.js"
import * as Protocol from "./Protocol.js"
import * as Snapshot from "./Snapshot.js"
import * as Transfer from "./Transfer.js"
import * as Transport from "./Transport.js"

/**
 * How long to wait for a peer (`Transfer.Timeouts`).
 *
 * @since 0.1.0
 * @category models
 */
export type Timeouts = Transfer.Timeouts

/**
 * Where a migration is (`Transfer.Phase`).
 *
 * @since 0.1.0
 * @category models
 */
export type Phase = Transfer.Phase

/**
 * A progress report (`Transfer.Progress`).
 *
 * @since 0.1.0
 * @category models
 */
export type Progress = Transfer.Progress

/**
 * When a live migration switches over, and what it does when it cannot (`Transfer.LiveOptions`).
 *
 * @since 0.1.0
 * @category models
 */
export type LiveOptions = Transfer.LiveOptions

/**
 * What a finished migration did (`Transfer.Stats`).
 *
 * @since 0.1.0
 * @category models
 */
export type Stats = Transfer.Stats

/**
 * Default timeouts (`Transfer.defaultTimeouts`).
 *
 * @since 0.1.0
 * @category constants
 */
export const defaultTimeouts: Timeouts = Transfer.defaultTimeouts

/**
 * Default cap on memory a source may make the destination allocate (`Transfer.DEFAULT_MAX_RAM`, 16 GiB).
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_MAX_RAM: number = Transfer.DEFAULT_MAX_RAM

/** Options of the source. */
export interface MigrateOptions {
  readonly address: Transport.Address
  /** Parallel multifd channels, 1–255 (default 2). */
  readonly channels?: number | undefined
  readonly compression?: Protocol.Compression | undefined
  readonly compressionLevel?: number | undefined
  /** `multifd` (default): zero pages travel as offsets only; `none`: as data. */
  readonly zeroPage?: "multifd" | "none" | undefined
  readonly timeouts?: Partial<Timeouts> | undefined
  /** Secures every connection (the main channel and each multifd channel) before it is used. */
  readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
  /** Called at each round's start, as its pages are sent, and at its end. */
  readonly onProgress?: ((progress: Progress) => Effect.Effect<void>) | undefined
  /** Pre-copy and switch-over policy (for memory written while it migrates). */
  readonly live?: LiveOptions | undefined
}

/** Everything a source can fail with. */
export type MigrateError =
  | MultifdSend.ChannelFailure
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | Snapshot.SnapshotError

/** Raises the control channel's messages as a queue; the reader fails on an abort, EOF or garbage. */
const controlReader = (connection: Transport.Connection, peer: string) =>
  Effect.gen(function*() {
    const inbox = yield* Queue.unbounded<Control.Message>()
    const reader = yield* Effect.forkScoped(Effect.gen(function*() {
      while (true) {
        const message = yield* Control.receive(connection)
        if (message._tag === "Abort") {
          return yield* new MigrationError.MigrationError({
            reason: "Aborted",
            detail: message.step === "store"
              ? `the ${peer} could not store the image: ${message.reason}`
              : `the ${peer} aborted the migration: ${message.reason}`
          })
        }
        yield* Queue.offer(inbox, message)
      }
    }).pipe(Effect.mapError(MigrationError.onChannel("main"))))
    return { inbox, failure: Fiber.join(reader) as Effect.Effect<never, Control.ReceiveError | MigrationError.MigrationError | MigrationError.ChannelError> }
  })

/** Tells the peer why we give up, if the control channel still works; never fails, never waits long. */
const abortPeer = (connection: Transport.Connection, reason: string, step?: "store") =>
  Control.send(connection, new Control.Abort({ reason, step })).pipe(
    Effect.timeout(Duration.seconds(1)),
    Effect.ignore
  )

/** The message of the `TlsError` that explains a closed connection (`Tls.client` on a refused certificate), if any. */
const tlsRefusal = (error: { readonly _tag: string }): string | undefined => {
  const cause = (error as { readonly cause?: { readonly _tag?: string; readonly message?: string } }).cause
  return cause?._tag === "TlsError" ? cause.message : undefined
}

const unexpected = (message: Control.Message, waiting: string) =>
  new MigrationError.MigrationError({ reason: "Unexpected", detail: `unexpected ${message._tag} message ${waiting}` })

/**
 * Migrates the `GuestRam` in context to a destination listening at `options.address`, and returns once the
 * destination confirmed that its memory has the same digests. To a `file:` address it saves a snapshot file
 * (`Snapshot.save`; compression and TLS do not apply).
 */
export const migrate = (
  options: MigrateOptions
): Effect.Effect<Stats, MigrateError, Transport.Transport | GuestRam.GuestRam> =>
  // a file: address saves a snapshot instead (Snapshot: parallel writers at fixed offsets)
  options.address._tag === "File" ? Snapshot.migrateToFile(options.address.path, options) :
  Effect.scoped(Effect.gen(function*() {
    const ram = yield* GuestRam.GuestRam
    const transport = yield* Transport.Transport
    const timeouts = Transfer.resolveTimeouts(options.timeouts)
    const channels = options.channels ?? 2
    const compression = options.compression ?? "none"
    const uuidText = Crypto.randomUUID()
    const uuid = Protocol.parseUuid(uuidText)!
    const started = yield* Clock.currentTimeMillis
    // a bad level or a missing codec is known before anything connects
    yield* PageCodec.checkLevel(compression, options.compressionLevel)
    yield* PageCodec.checkAvailable(compression)

    const control = yield* transport.connect(options.address, { timeout: timeouts.connect }).pipe(
      Effect.flatMap((raw) => options.upgrade ? options.upgrade(raw, "main") : Effect.succeed(raw)),
      Effect.mapError(MigrationError.onChannel("main"))
    )
    const { inbox, failure: readerFailure } = yield* controlReader(control, "destination")
    const answered = yield* Deferred.make<void>()
    // the main channel closing before any answer most likely means this source was refused
    const controlFailure = Effect.catchAll(readerFailure, (error) =>
      Effect.flatMap(Deferred.isDone(answered), (isAnswered) =>
        !isAnswered && error._tag === "ChannelError" && error.cause._tag === "TransportError"
          ? new MigrationError.MigrationError({
            reason: "Rejected",
            // a TLS source that presented a certificate explains such a close itself (Tls.client)
            detail: tlsRefusal(error.cause) ??
              `the destination closed the main channel before answering (${error.cause.message}); ` +
                "it may have refused this source (TLS authorization) or not be a multifd destination"
          })
          : Effect.fail(error)))
    const next = (waiting: string) =>
      Effect.raceFirst(Queue.take(inbox), controlFailure).pipe(within(timeouts.peer, waiting))
    // writes on the control connection name it, as the reader's failures do
    const tell = (message: Control.Message) =>
      Effect.mapError(Control.send(control, message), MigrationError.onChannel("main"))

    const run = Effect.gen(function*() {
      yield* Effect.mapError(Control.writeMagic(control), MigrationError.onChannel("main"))
      yield* tell(
        new Control.Hello({
          version: Control.VERSION,
          uuid: uuidText,
          pageSize: ram.pageSize,
          channels,
          compression,
          zeroPage: options.zeroPage ?? "multifd",
          blocks: GuestRam.layoutOf(ram)
        })
      )
      const answer = yield* next("waiting for the destination to accept the migration")
      yield* Deferred.succeed(answered, undefined)
      if (answer._tag === "Reject") {
        return yield* new MigrationError.MigrationError({
          reason: "Rejected",
          detail: `the destination refused the migration: ${answer.reason}`
        })
      }
      if (answer._tag !== "Accept") return yield* unexpected(answer, "instead of Accept")

      const send = yield* MultifdSend.make({
        address: options.address,
        channels,
        uuid,
        pageSize: ram.pageSize,
        compression,
        compressionLevel: options.compressionLevel,
        zeroPage: options.zeroPage ?? "multifd",
        connectTimeout: timeouts.connect,
        upgrade: options.upgrade
      })
      // the hashing threads start while the channels connect, rather than in the downtime
      const digest = yield* GuestRam.digester(ram)
      // every channel idle before the first page: a small round is spread over all of them
      yield* send.established
      const { pagesPerRound, pausedAt } = yield* Precopy.run(ram, {
        sink: {
          slots: send.batchPages,
          spread: { workers: channels, unit: send.slots },
          send: send.send,
          sync: send.sync,
          failure: send.failure,
          progress: Effect.map(send.stats, (s) => s.sentBytes),
          pagesSent: Effect.map(send.stats, (s) => s.sentPages)
        },
        started,
        live: options.live,
        stallTimeout: timeouts.peer,
        onProgress: options.onProgress,
        // the destination acknowledges a round once every channel reached its barrier
        flush: (round, final) =>
          Effect.gen(function*() {
            yield* tell(new Control.Flush({ round, final }))
            const ack = yield* Effect.raceFirst(next("waiting for the destination to acknowledge the flush"), send.failure)
            if (ack._tag !== "FlushAck" || ack.round !== round) return yield* unexpected(ack, "instead of FlushAck")
          })
      })
      const digests = yield* digest
      yield* tell(new Control.Complete({ digests }))
      // Done comes once the destination verified and stored the memory; while it stores (a big image on a slow
      // disk may take longer than the peer timeout) it says so about every second, and the peer timeout
      // bounds the silence between two messages rather than the whole store
      const confirmed = (waiting: string): Effect.Effect<void, MigrateError> =>
        Effect.flatMap(next(waiting), (message) =>
          message._tag === "Done"
            ? Effect.void
            : message._tag === "Storing"
            ? confirmed("waiting for the destination to store the image")
            : unexpected(message, "instead of Done"))
      yield* Effect.raceFirst(confirmed("waiting for the destination to verify the digests"), send.failure)
      const downtimeMs = (yield* Clock.currentTimeMillis) - pausedAt

      yield* Effect.raceFirst(send.finish, send.failure)
      yield* Effect.mapError(control.end, MigrationError.onChannel("main"))
      const s = yield* send.stats
      const durationMs = (yield* Clock.currentTimeMillis) - started
      return {
        uuid: uuidText,
        channels,
        compression,
        ramBytes: ram.size,
        rounds: pagesPerRound.length,
        pagesPerRound,
        downtimeMs,
        packets: s.packets,
        syncs: s.syncs,
        normalPages: s.normalPages,
        zeroPages: s.zeroPages,
        wireBytes: s.bytes,
        durationMs,
        gibPerSecond: Transfer.gibPerSecond(ram.size, durationMs)
      } satisfies Stats
    })

    return yield* Effect.raceFirst(run, controlFailure).pipe(
      Effect.tapError((error) => abortPeer(control, error.message)),
      Effect.onInterrupt(() => abortPeer(control, "cancelled by source"))
    )
  }))

// ---------------------------------------------------------------------------------------------------------
// Destination

/** Options of the destination; `E` is what its `store` step can fail with. */
export interface IncomingOptions<E = never> {
  /**
   * Memory to receive into: its layout must equal the source's. Without it, memory of the source's layout
   * is allocated, up to `maxRamBytes`.
   */
  readonly ram?: GuestRam.GuestRam["Type"] | undefined
  /** Largest total memory a source may ask for when `ram` is not given (default 16 GiB). */
  readonly maxRamBytes?: number | undefined
  readonly timeouts?: Partial<Timeouts> | undefined
  /** How long to wait for a source to connect at all (default: for ever). */
  readonly acceptTimeout?: Duration.DurationInput | undefined
  /** Secures every accepted connection (TLS server side) before it is classified. */
  readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
  /**
   * Settings the source must use, else its hello is refused with the reason (the source fails with
   * `Rejected`, nothing is written here). Unset fields follow the source.
   */
  readonly expect?: Expectations | undefined
  /** Called about ten times a second while pages arrive (`doneBytes` counts pages received). */
  readonly onProgress?: ((progress: Progress) => Effect.Effect<void>) | undefined
  /**
   * Puts the received memory durably where it belongs (writes, syncs and renames an image file, say). It runs
   * once the digests matched and before the destination confirms (`Done`), so the source reports success
   * only once it succeeded; meanwhile the destination tells the source about every second that it is still
   * storing. If it fails, the source is told the reason (it fails with "the destination could not store the
   * image: ...") and `incoming` fails with its error. Without it, `Done` means "verified in memory".
   */
  readonly store?: ((ram: GuestRam.GuestRam["Type"]) => Effect.Effect<void, E>) | undefined
}

/** What the destination received. */
export interface Incoming {
  readonly ram: GuestRam.GuestRam["Type"]
  readonly stats: Stats
  /** Connections that were turned away (strangers, foreign uuids), each with the reason. */
  readonly rejected: ReadonlyArray<string>
}

/** Everything a destination can fail with. */
export type IncomingError =
  | MultifdRecv.ChannelFailure
  | Transport.UpgradeError
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | GuestRam.GuestRamError
  | Snapshot.SnapshotError

/** Transfer settings a destination may insist on (see `IncomingOptions.expect`). */
export interface Expectations {
  readonly channels?: number | undefined
  readonly pageSize?: number | undefined
  readonly compression?: Protocol.Compression | undefined
  readonly zeroPage?: "multifd" | "none" | undefined
}

/** The first expectation the hello does not meet, described. */
const unmet = (hello: Control.Hello, expect: Expectations): string | undefined => {
  const keys = ["channels", "pageSize", "compression", "zeroPage"] as const
  const names = { channels: "channels", pageSize: "page size", compression: "compression", zeroPage: "zero-page mode" }
  for (const key of keys) {
    const wanted = expect[key]
    if (wanted !== undefined && wanted !== hello[key]) {
      return `the source uses ${names[key]} ${hello[key]}, the destination expects ${wanted}`
    }
  }
  return undefined
}

const checkHello = (hello: Control.Hello, options: IncomingOptions<unknown>): string | undefined => {
  if (hello.version !== Control.VERSION) return `control protocol version ${hello.version} is not ${Control.VERSION}`
  const expected = options.expect === undefined ? undefined : unmet(hello, options.expect)
  if (expected !== undefined) return expected
  const layoutProblem = GuestRam.checkLayout(hello.pageSize, hello.blocks)
  if (layoutProblem) return layoutProblem.message
  const total = hello.blocks.reduce((n, b) => n + b.size, 0)
  if (Protocol.parseUuid(hello.uuid) === undefined) return `uuid ${JSON.stringify(hello.uuid)} is malformed`
  const codec = PageCodec.checkAvailable(hello.compression)
  if (Either.isLeft(codec)) return codec.left.message
  const ram = options.ram
  if (ram === undefined) {
    const max = options.maxRamBytes ?? DEFAULT_MAX_RAM
    return total > max ? `${total} bytes of memory exceed this destination's limit of ${max}` : undefined
  }
  if (ram.pageSize !== hello.pageSize) return `page size ${hello.pageSize} differs from the destination's ${ram.pageSize}`
  const mine = GuestRam.layoutOf(ram)
  const describe = (layout: ReadonlyArray<GuestRam.BlockLayout>) =>
    layout.map((b) => `${b.name}=${b.size}`).join(", ")
  if (
    mine.length !== hello.blocks.length ||
    mine.some((b, i) => b.name !== hello.blocks[i]!.name || b.size !== hello.blocks[i]!.size)
  ) {
    return `block layout [${describe(hello.blocks)}] differs from the destination's [${describe(mine)}]`
  }
  return undefined
}

/** A store step's failure, kept apart from the migration's own errors until `incoming` fails with it. */
class StoreFailed<E> {
  readonly _tag = "StoreFailed"
  constructor(readonly error: E) {}
}

const messageOf = (error: unknown): string =>
  typeof error === "object" && error !== null && "message" in error && typeof error.message === "string" &&
    error.message.length > 0
    ? error.message
    : String(error)

/** Why a candidate connection failed, without its address (the rejection names it). */
const candidateProblem = (error: Control.ReceiveError | MigrationError.MigrationError): string =>
  error._tag === "TransportError"
    ? error.detail
    : error._tag === "ProtocolError"
    ? `bad ${error.field}: ${error.detail}`
    : error.message

/** The main channel of a migration: the first connection that sent the control magic and a complete hello. */
interface MainChannel {
  readonly connection: Transport.Connection
  readonly hello: Control.Hello
}

/**
 * Receives one migration on `listener`. Every accepted connection is a candidate until it proves itself
 * within the handshake timeout: a main channel by the control magic and a complete hello (the first one
 * wins; a later one is refused, "a migration is already in progress"), a multifd channel by a complete init
 * packet of this migration. Candidates that do not — strangers, connections that stall, close half-way or
 * send garbage, channels of other migrations — are closed, logged and reported in `rejected`, without
 * disturbing the migration. Returns once every page is in memory, the digests matched, `store` (if given)
 * succeeded and every channel ended.
 */
export const incoming = <E = never>(
  listener: Transport.Listener,
  options: IncomingOptions<E> = {}
): Effect.Effect<Incoming, IncomingError | E, never> =>
  Effect.scoped(Effect.gen(function*() {
    const timeouts = Transfer.resolveTimeouts(options.timeouts)
    const handshakeMs = Duration.toMillis(Duration.decode(timeouts.handshake))
    const main = yield* Deferred.make<MainChannel>()
    const channelSet = yield* Deferred.make<MultifdRecv.MultifdRecv["Type"]>()
    /** Tells a complete but unwanted hello why (best effort: the connection is closed right after). */
    const refuse = (connection: Transport.Connection, reason: string) =>
      Control.send(connection, new Control.Reject({ reason })).pipe(Effect.timeout(Duration.seconds(1)), Effect.ignore)
    const acceptor = yield* Acceptor.start<IncomingError>(listener, {
      upgrade: options.upgrade,
      firstBytesTimeout: timeouts.handshake,
      classify: (connection, first, reject, since) =>
        Effect.gen(function*() {
          // one deadline for the whole handshake, first bytes included: a candidate cannot stretch it by
          // trickling bytes
          const deadline = (what: string) => <A, E2>(self: Effect.Effect<A, E2>) =>
            Effect.flatMap(Clock.currentTimeMillis, (now) =>
              Effect.timeoutFail(self, {
                duration: Duration.millis(Math.max(0, handshakeMs - (now - since))),
                onTimeout: () => MigrationError.timeout(what, timeouts.handshake)
              }))
          const magic = first.readUInt32BE(0)
          if (magic === Control.MAGIC) {
            const message = yield* Effect.either(
              Effect.zipRight(connection.read(4), Control.receive(connection)).pipe(
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
            if (Either.isLeft(recv)) return yield* reject(connection, `a multifd channel without a migration: ${recv.left.message}`)
            return yield* recv.right.adopt(connection, init.right).pipe(
              Effect.catchIf(MultifdRecv.isStranger, (e) => reject(connection, e.message))
            )
          }
          return yield* reject(connection, `not a migration stream (first bytes ${first.toString("hex")})`)
        })
    })
    const connectionFailure = acceptor.failure

    const waitMain = options.acceptTimeout === undefined
      ? Deferred.await(main)
      : Deferred.await(main).pipe(within(options.acceptTimeout, "waiting for a source to connect"))
    const { connection: ctl, hello } = yield* Effect.raceFirst(waitMain, connectionFailure)
    const { inbox, failure: controlFailure } = yield* controlReader(ctl, "source")
    // once Done is sent the source ends its main channel, and that end may be seen before the channels' ends:
    // it is no failure then (an Abort still is)
    const doneSent = yield* Deferred.make<void>()
    const isEnd = (error: IncomingError) =>
      error._tag === "ChannelError" && error.cause._tag === "TransportError" &&
      (error.cause as Transport.TransportError).reason === "Closed"
    const failures = Effect.raceFirst(
      Effect.catchIf(controlFailure, isEnd, (error) =>
        Effect.flatMap(Deferred.isDone(doneSent), (done) => done ? Effect.never : Effect.fail(error))),
      connectionFailure
    )
    const next = Effect.raceFirst(Queue.take(inbox), failures)
    const tell = (message: Control.Message) =>
      Effect.mapError(Control.send(ctl, message), MigrationError.onChannel("main"))

    /**
     * Runs the store step, telling the source meanwhile that the destination is alive and storing; if it fails,
     * tells the source why.
     */
    const store = (ram: GuestRam.GuestRam["Type"]) =>
      Effect.gen(function*() {
        if (options.store === undefined) return
        const interval = Duration.min(Duration.seconds(1), Duration.times(Duration.decode(timeouts.peer), 0.25))
        // a write that fails means the source is gone, which the control reader reports
        const heartbeat = Effect.forever(Effect.zipRight(Effect.ignore(tell(new Control.Storing())), Effect.sleep(interval)))
        const stored = yield* Effect.either(Effect.raceFirst(options.store(ram), heartbeat))
        if (Either.isLeft(stored)) {
          yield* abortPeer(ctl, messageOf(stored.left), "store")
          return yield* Effect.fail(new StoreFailed(stored.left))
        }
      })

    const run = Effect.gen(function*() {
      // the destination's duration starts with the source's hello, not with the wait for a source
      const started = yield* Clock.currentTimeMillis
      const problem = checkHello(hello, options)
      if (problem !== undefined) {
        yield* tell(new Control.Reject({ reason: problem }))
        return yield* new MigrationError.MigrationError({ reason: "Rejected", detail: `refused the migration: ${problem}` })
      }
      const ram = options.ram ?? (yield* GuestRam.make({ pageSize: hello.pageSize, blocks: hello.blocks }))
      const recv = yield* MultifdRecv.make({
        channels: hello.channels,
        uuid: Protocol.parseUuid(hello.uuid),
        ram,
        compression: hello.compression
      })
      yield* Deferred.succeed(channelSet, recv)
      yield* tell(new Control.Accept())
      // the hashing threads start while the source connects its channels, rather than in the downtime
      const digest = yield* GuestRam.digester(ram)
      // the receive rate over the last second; a received migration's last report counts every page
      yield* Transfer.reportEvery(options.onProgress, (rate) =>
        Effect.gen(function*() {
          const s = yield* recv.stats
          return {
            round: s.syncs / hello.channels,
            phase: "precopy",
            doneBytes: (s.normalPages + s.zeroPages) * ram.pageSize,
            totalBytes: ram.size,
            // the destination does not see the source's memory
            dirtyPages: 0,
            bandwidth: yield* rate(s.bytes),
            expectedDowntimeMs: 0
          }
        }), { lastOnSuccess: true })
      const progress = Effect.map(recv.stats, (s) => s.bytes)
      const describeMissing = Effect.gen(function*() {
        const s = yield* recv.stats
        const turnedAway = yield* acceptor.rejected
        return `${s.channels} of ${hello.channels} multifd channels connected` +
          (turnedAway.length > 0 ? `; rejected: ${turnedAway.join("; ")}` : "")
      })

      let rounds = 0
      let speculative: { readonly writes: number; readonly digest: Fiber.RuntimeFiber<ReadonlyArray<GuestRam.BlockDigest>> } | undefined
      while (true) {
        const message = yield* unlessStalled(
          Effect.raceFirst(next, recv.failure),
          progress,
          timeouts.peer,
          "without any data from the source"
        )
        if (message._tag === "Flush") {
          yield* Effect.raceFirst(recv.sync, recv.failure).pipe(
            within(timeouts.peer, "waiting for every multifd channel to reach the sync point"),
            Effect.catchTag("MigrationError", (e) =>
              Effect.flatMap(describeMissing, (missing) =>
                Effect.fail(new MigrationError.MigrationError({ reason: e.reason, detail: `${e.detail} (${missing})` }))))
          )
          rounds = Math.max(rounds, message.round + 1)
          yield* tell(new Control.FlushAck({ round: message.round }))
          // after the last round's barrier the memory is final: hash it while the source hashes its own
          if (message.final && speculative === undefined) {
            speculative = { writes: yield* recv.writesBegun, digest: yield* Effect.forkScoped(digest) }
          }
          continue
        }
        if (message._tag !== "Complete") return yield* unexpected(message, "during the transfer")
        yield* recv.expectEnd
        // the early digest holds only if no packet began writing memory since it started
        const early = speculative !== undefined && (yield* recv.writesBegun) === speculative.writes
          ? speculative.digest
          : undefined
        const mine = early !== undefined ? yield* Fiber.join(early) : yield* digest
        const theirs = new Map(message.digests.map((d) => [d.name, d.digest]))
        const bad = mine.filter((d) => theirs.get(d.name) !== d.digest).map((d) => d.name)
        if (bad.length > 0 || theirs.size !== mine.length) {
          const reason = `memory digest mismatch in block ${bad.map((n) => JSON.stringify(n)).join(", ")}`
          yield* tell(new Control.Abort({ reason }))
          return yield* new MigrationError.MigrationError({ reason: "DigestMismatch", detail: reason })
        }
        // Done promises the memory is verified and, with a store step, stored: the source reports success on it
        yield* store(ram)
        yield* Deferred.succeed(doneSent, undefined)
        yield* tell(new Control.Done())
        yield* Effect.raceFirst(recv.finished, failures).pipe(
          within(timeouts.peer, "waiting for the source to close its multifd channels")
        )
        const s = yield* recv.stats
        const durationMs = (yield* Clock.currentTimeMillis) - started
        return {
          ram,
          rejected: yield* acceptor.rejected,
          stats: {
            uuid: hello.uuid,
            channels: hello.channels,
            compression: hello.compression,
            ramBytes: ram.size,
            rounds,
            pagesPerRound: [],
            downtimeMs: 0,
            packets: s.packets,
            syncs: s.syncs,
            normalPages: s.normalPages,
            zeroPages: s.zeroPages,
            wireBytes: s.bytes,
            durationMs,
            gibPerSecond: Transfer.gibPerSecond(ram.size, durationMs)
          }
        } satisfies Incoming
      }
    })

    const isAbort = (error: IncomingError) => error._tag === "MigrationError" && error.reason === "Aborted"
    const isHangUp = (error: IncomingError | StoreFailed<E>) =>
      (error._tag === "MigrationError" && error.reason === "ChannelClosed") ||
      (error._tag === "ChannelError" && error.cause._tag === "TransportError")
    return yield* Effect.raceFirst(run, failures).pipe(
      // a failing source sends Abort, then closes its channels: a channel's end may overtake the Abort, so
      // give the main channel a moment to tell the real cause
      Effect.catchIf(isHangUp, (error) =>
        Effect.flatMap(
          Effect.flip(controlFailure).pipe(Effect.timeoutTo({
            duration: Duration.millis(500),
            onSuccess: Option.some,
            onTimeout: Option.none
          })),
          (told) => Effect.fail(Option.isSome(told) && isAbort(told.value) ? told.value : error)
        )),
      Effect.tapError((error) =>
        error instanceof StoreFailed ||
          (error._tag === "MigrationError" && (error.reason === "Aborted" || error.reason === "Rejected" ||
            error.reason === "DigestMismatch"))
          ? Effect.void
          : abortPeer(ctl, error.message)
      ),
      Effect.mapError((error): IncomingError | E => error instanceof StoreFailed ? error.error : error)
    )
  }))

/**
 * Listens at `address` and receives one migration there (a convenience over `Transport.listen` + `incoming`).
 * A `file:` address restores that snapshot file instead (`Snapshot.restore`; `onListening` is not called),
 * then runs `store`.
 */
export const listenAndReceive = <E = never>(
  address: Transport.Address,
  options: IncomingOptions<E> & { readonly onListening?: ((address: Transport.Address) => Effect.Effect<void>) | undefined } = {}
): Effect.Effect<Incoming, IncomingError | Transport.TransportError | E, Transport.Transport> =>
  address._tag === "File"
    ? Effect.tap(
      Snapshot.receiveFromFile(address.path, { ...options, store: undefined }),
      (received) => options.store === undefined ? Effect.void : options.store(received.ram)
    ) :
  Effect.scoped(Effect.gen(function*() {
    const transport = yield* Transport.Transport
    const listener = yield* transport.listen(address)
    if (options.onListening) yield* options.onListening(listener.address)
    return yield* incoming(listener, options)
  }))

/** What `migrateStream` emits: progress while the migration runs, then its stats. */
export type Event =
  | ({ readonly _tag: "Progress" } & Progress)
  | { readonly _tag: "Completed"; readonly stats: Stats }

/**
 * `migrate` as a stream of events: `Progress` reports (the latest 64 are kept for a slow consumer), then
 * `Completed` with the stats; the stream fails with the migration's error. Interrupting the stream cancels
 * the migration.
 */
export const migrateStream = (
  options: Omit<MigrateOptions, "onProgress">
): Stream.Stream<Event, MigrateError, Transport.Transport | GuestRam.GuestRam> =>
  Stream.asyncScoped<Event, MigrateError, Transport.Transport | GuestRam.GuestRam>(
    (emit) =>
      migrate({
        ...options,
        onProgress: (progress) => Effect.promise(() => emit.single({ _tag: "Progress", ...progress }))
      }).pipe(
        Effect.matchCauseEffect({
          onSuccess: (stats) => Effect.promise(() => emit.single({ _tag: "Completed", stats }).then(() => emit.end())),
          onFailure: (cause) => Effect.promise(() => emit.halt(cause))
        }),
        Effect.forkScoped
      ),
    { bufferSize: 64, strategy: "sliding" }
  )
