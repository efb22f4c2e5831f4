/**
 * The destination's side of `Migration.incoming`, in its steps: candidates (`internal/candidates`: which
 * accepted connection is the main channel, which a multifd channel of this migration), the hello (what a source
 * may ask for), the rounds (flush after flush until the source completes), verification (digests) and the store
 * step, then done.
 * `Migration` resolves the options; everything here runs in one scope.
 *
 * @internal
 */
import * as Cause from "effect/Cause"
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Option from "effect/Option"
import * as Queue from "effect/Queue"
import * as ChannelThreads from "../ChannelThreads.js"
import * as Control from "../Control.js"
import * as GuestRam from "../GuestRam.js"
import * as MigrationError from "../MigrationError.js"
import * as MultifdRecv from "../MultifdRecv.js"
import * as PageCodec from "../PageCodec.js"
import * as Protocol from "../Protocol.js"
import * as Transfer from "../Transfer.js"
import type * as Transport from "../Transport.js"
import * as Acceptor from "./acceptor.js"
import * as Candidates from "./candidates.js"
import * as Conversation from "./conversation.js"
import * as OpenFiles from "./native/openFiles.js"
import * as Zstd from "./native/zstdStream.js"
import * as PeerText from "./peerText.js"
import * as Recorder from "./recorder.js"
import { unlessStalled, within } from "./stall.js"
import type * as Status from "./status.js"
import * as Handshake from "./tls/handshake.js"
import * as Inputs from "./inputs.js"
import * as Memory from "./memory.js"

type Ram = GuestRam.GuestRam["Type"]

/** Transfer settings a destination may insist on (`Migration.Expectations`). */
export interface Expectations {
  readonly channels?: number | undefined
  readonly pageSize?: number | undefined
  readonly compression?: Protocol.Compression | undefined
  readonly zeroPage?: "multifd" | "none" | undefined
}

/** What a source proposes in its hello (`Migration.Proposal`). */
export interface Proposal {
  readonly ramBytes: number
  readonly blocks: ReadonlyArray<GuestRam.BlockLayout>
  readonly pageSize: number
  readonly channels: number
  readonly compression: Protocol.Compression
}

/** The destination's options, with their defaults (`Migration.IncomingOptions`). */
export interface Settings<E> {
  readonly ram: Ram | undefined
  readonly maxRamBytes: number
  readonly timeouts: Transfer.Timeouts
  readonly acceptTimeout: Duration.DurationInput | undefined
  readonly upgrade: Transport.Upgrade<Transport.UpgradeError> | undefined
  readonly expect: Expectations | undefined
  /** A reason to refuse a proposal that passed the checks here, if the caller has one (`IncomingOptions.admit`). */
  readonly admit?: ((proposal: Proposal) => string | undefined) | undefined
  readonly onProgress: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
  readonly store: ((ram: Ram, commit: Commit) => Effect.Effect<void, E>) | undefined
  /** Keeps the caller's `MigrationStatus`, if any. */
  readonly tracker: Status.Tracker
  /**
   * The listener serves this migration alone (`listenAndReceive`): connections are accepted to the end, and a
   * later source is refused at once ("a migration is already in progress") rather than left in the listener's
   * queue for a next migration that will never come.
   */
  readonly exclusive?: boolean | undefined
}

/** What the destination received (`Migration.Incoming`). */
export interface Received {
  readonly ram: Ram
  readonly stats: Transfer.Stats
  readonly rejected: ReadonlyArray<string>
}

/** What the destination can fail with (besides its store step's errors). */
export type Failure =
  | MultifdRecv.ChannelFailure
  | Transport.UpgradeError
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | GuestRam.GuestRamError

// ---------------------------------------------------------------------------------------------------------
// The hello

/** The memory a hello proposes: every block's bytes. */
const ramBytesOf = (hello: Control.Hello): number => hello.blocks.reduce((n, b) => n + b.size, 0)

/**
 * The memory a hello's channels may make this destination keep besides its blocks: with zstd, each channel's
 * decompression window, up to 2^`Zstd.MAX_WINDOW_LOG` bytes (32 MiB: what level 20 uses), as large as the
 * source's frames ask for and filled as packets go by — 255 channels' worth is 8 GiB, whatever the blocks.
 */
const windowBytesOf = (hello: Control.Hello): number =>
  hello.compression === "zstd" ? hello.channels * 2 ** Zstd.MAX_WINDOW_LOG : 0

/**
 * The first expectation `actual` does not meet, described as `${uses} channels 3, the destination expects 4`
 * (a setting `actual` does not have is not held to one: a snapshot has no zero-page mode).
 */
export const unmet = (
  actual: Partial<Record<keyof Expectations, string | number>>,
  expect: Expectations,
  uses = "the source uses"
): string | undefined => {
  const keys = ["channels", "pageSize", "compression", "zeroPage"] as const
  const names = { channels: "channels", pageSize: "page size", compression: "compression", zeroPage: "zero-page mode" }
  for (const key of keys) {
    const wanted = expect[key]
    if (wanted !== undefined && actual[key] !== undefined && wanted !== actual[key]) {
      return `${uses} ${names[key]} ${actual[key]}, the destination expects ${wanted}`
    }
  }
  return undefined
}

/** Why this destination refuses the hello, if it does. */
export const checkHello = (
  hello: Control.Hello,
  settings: Pick<Settings<unknown>, "expect" | "ram" | "maxRamBytes">
): string | undefined => {
  if (hello.version !== Control.VERSION) return `control protocol version ${hello.version} is not ${Control.VERSION}`
  const expected = settings.expect === undefined ? undefined : unmet(hello, settings.expect)
  if (expected !== undefined) return expected
  const layoutProblem = GuestRam.checkLayout(hello.pageSize, hello.blocks)
  if (layoutProblem) return layoutProblem.message
  const total = ramBytesOf(hello)
  if (Protocol.parseUuid(hello.uuid) === undefined) return `uuid ${PeerText.quoted(hello.uuid)} is malformed`
  const codec = PageCodec.checkAvailable(hello.compression)
  if (Either.isLeft(codec)) return codec.left.message
  const ram = settings.ram
  if (ram === undefined) {
    const max = settings.maxRamBytes
    const windows = windowBytesOf(hello)
    return total > max
      ? `${total} bytes of memory exceed this destination's limit of ${max}`
      : total + windows > max
      ? `${total} bytes of memory and the zstd decompression windows of ${hello.channels} channels (up to ${windows} ` +
        `bytes, ${2 ** Zstd.MAX_WINDOW_LOG} a channel) exceed this destination's limit of ${max}`
      : undefined
  }
  if (ram.pageSize !== hello.pageSize) return `page size ${hello.pageSize} differs from the destination's ${ram.pageSize}`
  const mine = GuestRam.layoutOf(ram)
  // the source's names are its own: shown, never acted on (this reason goes back to it, and to a terminal)
  const describe = (layout: ReadonlyArray<GuestRam.BlockLayout>) =>
    PeerText.fromPeer(layout.map((b) => `${b.name}=${b.size}`).join(", "))
  if (
    mine.length !== hello.blocks.length ||
    mine.some((b, i) => b.name !== hello.blocks[i]!.name || b.size !== hello.blocks[i]!.size)
  ) {
    return `block layout [${describe(hello.blocks)}] differs from the destination's [${describe(mine)}]`
  }
  return undefined
}

// ---------------------------------------------------------------------------------------------------------
// Rounds, verification, store

/** What telling the source something may fail with: the main channel broke, or the source stopped reading it. */
type Told = MigrationError.ChannelError | Transport.TransportError | MigrationError.MigrationError

/**
 * Acknowledges flush after flush (each once every channel reached its barrier) until the source completes;
 * the rounds seen, the `Complete` message and the digest started at the final round's barrier. A round's
 * last bytes may take long on a slow link (the kernels' buffers drain at the link's rate): the wait for the
 * barrier fails only after the peer timeout without any byte, and a source that asked for heartbeats hears
 * `Receiving` about every second while bytes arrive, all through the rounds (bytes reaching this side are
 * its progress too). The source's `Hashing` (a large memory takes longer to hash than the peer timeout)
 * restarts the wait for its next message.
 */
const receiveRounds = (
  recv: MultifdRecv.MultifdRecv["Type"],
  conversation: {
    readonly next: Effect.Effect<Control.Message, Failure>
    /** The control message being received now, if any (`Conversation.Reader.inside`). */
    readonly inside: () => string | undefined
    readonly tell: (message: Control.Message) => Effect.Effect<void, Told>
  },
  digest: Effect.Effect<ReadonlyArray<GuestRam.BlockDigest>, MigrationError.MigrationError>,
  peer: Duration.DurationInput,
  describeMissing: Effect.Effect<string>,
  recorder: Recorder.Recorder,
  tracker: Status.Tracker,
  heartbeats: boolean
) =>
  Effect.gen(function*() {
    // bytes arrived, to the byte (a packet's part included): on a slow link a packet takes seconds to arrive
    const progress = Effect.map(
      Effect.zip(recv.stats, recv.unfinished),
      ([stats, unfinished]) => unfinished.reduce((n, u) => n + u.bytes, stats.bytes)
    )
    const interval = Conversation.heartbeatInterval(peer)
    let rounds = 0
    /** Tells the source about every `interval` how many bytes arrived, whenever more did (never else). */
    const receiving = Effect.gen(function*() {
      let last = yield* progress
      while (true) {
        yield* Effect.sleep(interval)
        const now = yield* progress
        if (now === last) continue
        last = now
        // a write that fails means the source is gone, which the control reader reports
        yield* Effect.ignore(conversation.tell(new Control.Receiving({ round: rounds, bytes: now })))
      }
    })
    // the memory's digest, started once the final round's barrier sealed the channels (the memory is final
    // then), while the source hashes its own
    let final: Fiber.RuntimeFiber<ReadonlyArray<GuestRam.BlockDigest>, MigrationError.MigrationError> | undefined
    const loop = Effect.gen(function*() {
      while (true) {
        const message = yield* unlessStalled(
          Effect.raceFirst(conversation.next, recv.failure),
          progress,
          peer,
          // a frame whose length was corrupted on the way waits for bytes the source never sends (it waits for the
          // answer): data did come, and where it stopped is what a user needs to know
          () => {
            const frame = conversation.inside()
            return frame === undefined ? "without any data from the source" : `waiting for the rest of ${frame}`
          }
        ).pipe(
          // where the silence began: the channels stuck inside a packet, if any
          Effect.catchTag("MigrationError", (e) =>
            e.reason !== "Timeout" ? Effect.fail(e) : Effect.flatMap(recv.unfinished, (unfinished) =>
              Effect.fail(
                unfinished.length === 0 ? e : new MigrationError.MigrationError({
                  reason: e.reason,
                  detail: `${e.detail} (${unfinished.map(MultifdRecv.describeUnfinished).join(", ")})`
                })
              )))
        )
        // the transfer ends with the final round's flush, acknowledged: before it, Complete (whose digests would
        // be compared with memory still being written) and Hashing (which would keep a destination waiting
        // with no channel ever connected) are out of turn, as is a flush after it
        if (final !== undefined) {
          if (message._tag === "Complete") return { rounds, complete: message, digest: final }
          // the source hashes its memory (after its last round): each of its heartbeats restarts the wait
          if (message._tag === "Hashing") continue
          return yield* Conversation.unexpected(message, "after the final round")
        }
        if (message._tag !== "Flush") return yield* Conversation.unexpected(message, "before the final round's flush")
        // the source's writers are paused for its final round
        if (message.final) yield* tracker.update({ phase: "switchover" })
        // the final round's barrier seals the channels: a packet after it is refused, the memory final
        const reached = Effect.raceFirst(message.final ? recv.finalSync : recv.sync, recv.failure)
        yield* unlessStalled(
          reached,
          progress,
          peer,
          "waiting for every multifd channel to reach the sync point"
        ).pipe(
          Effect.catchTag("MigrationError", (e) =>
            Effect.flatMap(describeMissing, (missing) =>
              Effect.fail(new MigrationError.MigrationError({ reason: e.reason, detail: `${e.detail} (${missing})` }))))
        )
        rounds = Math.max(rounds, message.round + 1)
        yield* conversation.tell(new Control.FlushAck({ round: message.round }))
        yield* Effect.logDebug(`main channel: round ${message.round} acknowledged`)
        yield* recorder.record(yield* recv.stats)
        yield* recorder.round()
        if (message.final) final = yield* Effect.forkScoped(digest)
      }
    })
    return yield* (heartbeats ? Effect.raceFirst(loop, receiving) : loop)
  })

/**
 * Compares the memory's digests (`digest`, under way since the final round's barrier) with the source's; on a
 * mismatch tells the source and fails. A source that asked for heartbeats hears `Hashing` about every second
 * until this side's digest is done.
 */
const verify = (
  complete: Control.Complete,
  digest: Fiber.RuntimeFiber<ReadonlyArray<GuestRam.BlockDigest>, MigrationError.MigrationError>,
  tell: (message: Control.Message) => Effect.Effect<void, Told>,
  heartbeats: { readonly peer: Duration.DurationInput } | undefined
) =>
  Effect.gen(function*() {
    const computing = Fiber.join(digest)
    const mine = yield* (heartbeats === undefined
      ? computing
      : Effect.raceFirst(computing, Conversation.heartbeat(tell, new Control.Hashing(), heartbeats.peer)))
    yield* Effect.logDebug("digests computed")
    const theirs = new Map(complete.digests.map((d) => [d.name, d.digest]))
    const bad = mine.filter((d) => theirs.get(d.name) !== d.digest).map((d) => d.name)
    // every block matched, and the source's list has more (a block this side does not have, or one twice): its
    // names said, not an empty list ("memory digest mismatch in block ")
    const ours = new Set(mine.map((d) => d.name))
    const seen = new Set<string>()
    const other = complete.digests.find((d) => !ours.has(d.name) || seen.size === seen.add(d.name).size)
    if (bad.length > 0 || other !== undefined) {
      const reason = bad.length > 0
        ? `memory digest mismatch in block ${bad.map((n) => JSON.stringify(n)).join(", ")}`
        : `memory digest mismatch: the source's digests name block ${PeerText.quoted(other!.name)} ` +
          (ours.has(other!.name) ? "twice" : "which this destination's memory does not have")
      yield* tell(new Control.Abort({ reason, found: "DigestMismatch" }))
      return yield* new MigrationError.MigrationError({ reason: "DigestMismatch", detail: reason })
    }
    yield* Effect.logDebug("digests verified")
  }).pipe(Effect.withSpan("multifd.digest"))

/** A store step's failure, kept apart from the migration's own errors until `incoming` fails with it. */
class StoreFailed<E> {
  readonly _tag = "StoreFailed"
  constructor(readonly error: E) {}
}

/** A store step's point of no return (`Migration.Commit`). */
export type Commit = <A, E2, R>(effect: Effect.Effect<A, E2, R>) => Effect.Effect<A, E2, R>

/**
 * The caller's word on a proposal (`admit`). One that throws (a free-space check whose `statfs` failed) ends this
 * side with that defect, as a store step that throws; the source is refused saying why first (it heard only that
 * the main channel closed before an answer: "it may use TLS, or not be a multifd destination").
 */
const admitting = (
  admit: Settings<unknown>["admit"],
  proposal: Proposal,
  tell: (message: Control.Message) => Effect.Effect<void, unknown>
): Effect.Effect<string | undefined> =>
  admit === undefined ? Effect.succeed(undefined) : Effect.catchAllDefect(
    Effect.sync(() => {
      const answer: unknown = admit(proposal)
      // from plain JavaScript, an answer that is neither (a number, an Effect, a Promise) was a defect that closed the
      // main channel unanswered: the source is refused saying what the check returned
      return answer === undefined || typeof answer === "string"
        ? answer
        : `its admit check returned ${Inputs.describeInput(answer)}, not a reason (a string) or undefined`
    }),
    (defect) =>
      Effect.zipRight(
        Effect.ignore(tell(new Control.Reject({ reason: `its admit check failed: ${Conversation.messageOf(defect)}` }))),
        Effect.die(defect)
      )
  )

/**
 * Runs the store step, telling the source meanwhile that the destination is alive and storing, then `done`
 * (which tells the source `Done`); if the step fails, tells the source why. Interrupted while the step runs,
 * the step is interrupted and awaited: if it had passed its `commit` (the memory is stored), `done` still runs
 * before the interruption goes on, so that the source never hears "cancelled" about stored memory.
 */
const storeThen = <E, E2>(
  ram: Ram,
  step: ((ram: Ram, commit: Commit) => Effect.Effect<void, E>) | undefined,
  control: Transport.Connection,
  peer: Duration.DurationInput,
  done: Effect.Effect<void, E2>
) =>
  Effect.uninterruptibleMask((restore) =>
    Effect.gen(function*() {
      if (step === undefined) return yield* restore(done)
      let committed = false
      const commit: Commit = (effect) => Effect.uninterruptible(Effect.tap(effect, () => (committed = true)))
      const storing = Conversation.heartbeat((message) => Conversation.tell(control, message), new Control.Storing(), peer, true)
      // the step may save or pass on the memory it stores (Snapshot.save, migrate): the permit this migration holds
      // on memory given to it is lent to the step, which would otherwise find its own memory Busy
      // (called inside the fiber: a step that throws rather than return an effect dies there, and the source hears it)
      // (one that returns no Effect, an async function's Promise, fails CallbackFailed saying so: it was a defect, "Not
      // a valid effect: {}")
      // (its MigrationError is one `incoming` fails with anyway: typed as the step's own)
      const stepRun = Inputs.callback("the store step (store)", () => step(ram, commit), false) as Effect.Effect<void, E>
      const fiber = yield* Effect.fork(restore(Effect.raceFirst(Memory.lending(ram, stepRun), storing)))
      const stored = yield* Effect.exit(restore(Fiber.join(fiber)))
      if (Exit.isSuccess(stored)) {
        yield* Effect.logDebug("memory stored")
        // past a commit, Done goes out even if an interruption comes meanwhile (within the peer timeout: a
        // source that stopped reading cannot hold the interruption up); otherwise it may be interrupted
        return yield* (committed ? within(peer, "telling the source Done")(done) : restore(done))
      }
      if (Exit.isInterrupted(stored)) {
        yield* Fiber.interrupt(fiber)
        if (committed) {
          yield* Effect.logDebug("memory stored (the destination is being interrupted)")
          // (bounded: a source that stopped reading cannot hold the interruption up)
          yield* Effect.ignore(Effect.timeout(done, peer))
        }
        return yield* Effect.interrupt
      }
      const failure = Cause.failureOption(stored.cause)
      if (Option.isNone(failure)) {
        // a step that threw: the source still hears that the store failed, and why
        const defect = Cause.squash(stored.cause)
        yield* Conversation.abortPeer(control, Conversation.messageOf(defect), "store")
        return yield* Effect.die(defect)
      }
      const error = failure.value
      yield* Conversation.abortPeer(control, Conversation.messageOf(error), "store")
      return yield* Effect.fail(new StoreFailed(error))
    })
  ).pipe(Effect.withSpan("multifd.store"))

// ---------------------------------------------------------------------------------------------------------
// The whole

/** The listener, each accepted connection logged (Debug). */
const traced = (listener: Transport.Listener): Transport.Listener => ({
  ...listener,
  accept: Effect.tap(listener.accept, (connection) => Effect.logDebug(`accepted a connection from ${connection.peer}`))
})

/** The upgrade (TLS) as a span, its success logged (Debug): which channel it secures is known only after it. */
const tracedUpgrade = (upgrade: Transport.Upgrade<Transport.UpgradeError>): Transport.Upgrade<Transport.UpgradeError> =>
(connection, channel) =>
  upgrade(connection, channel).pipe(
    Effect.tap(() => Effect.logDebug(`TLS handshake done with ${connection.peer}`)),
    Effect.withSpan("multifd.channel.handshake", { attributes: { "multifd.peer": connection.peer } })
  )

/** Receives one migration on `listener` (see `Migration.incoming`). */
export const run = <E>(listener: Transport.Listener, settings: Settings<E>): Effect.Effect<Received, Failure | E> =>
  Effect.scoped(Effect.gen(function*() {
    const { timeouts, tracker } = settings
    const recorder = Recorder.make("destination")
    yield* Acceptor.claim(listener)
    // (TLS settings that verify no client though they have a CA file: said once, as this destination starts)
    const note = Handshake.serverNote(settings.upgrade)
    if (note !== undefined) yield* Effect.logWarning(note)
    const main = yield* Deferred.make<Candidates.MainChannel>()
    const channelSet = yield* Deferred.make<MultifdRecv.MultifdRecv["Type"]>()
    const acceptor = yield* Acceptor.start<Failure>(traced(listener), {
      upgrade: settings.upgrade === undefined
        ? undefined
        : tracedUpgrade(Handshake.bounded(settings.upgrade, timeouts.handshake)),
      firstBytesTimeout: timeouts.handshake,
      classify: Candidates.classifier(main, channelSet, timeouts.handshake),
      // with every channel adopted, later connections are the next migration's (on a reused listener)
      until: settings.exclusive === true
        ? undefined
        : Effect.ignore(Effect.flatMap(Deferred.await(channelSet), (recv) => recv.adopted)),
      // a source that comes while a lost channel's new connection is awaited is the next migration's, as one that
      // comes while nothing is accepted (the listener being this migration's alone, it is refused)
      queueMains: settings.exclusive === true
        ? undefined
        : { listener, isMain: (first) => first.readUInt32BE(0) === Control.MAGIC }
    })
    const connectionFailure = acceptor.failure

    const waitMain = settings.acceptTimeout === undefined
      ? Deferred.await(main)
      : Deferred.await(main).pipe(within(settings.acceptTimeout, "waiting for a source to connect"))
    const { connection: ctl, hello } = yield* Effect.raceFirst(waitMain, connectionFailure)
    /** How long a lost channel keeps its place: the source's reconnect window and a handshake. */
    const reconnectWindow = (hello: Control.Hello) =>
      Duration.sum(Duration.millis(hello.reconnectMs ?? 0), Duration.decode(timeouts.handshake))
    // once Done is sent the source ends its main channel, and that end may be seen before the channels' ends:
    // it is no failure then (an Abort still is), and the reader just stops
    const doneSent = yield* Deferred.make<void>()
    // and a source that says Bye (its hello says so) ends it only after Bye: an end without it came from a path
    // that broke (a tunnel or proxy ends a connection gracefully when its other side broke, Done perhaps lost on
    // the way), and the source may not have heard Done: it may resume its guest, and this copy is not the result
    const byeDue = hello.bye === true
    const { closed: controlClosed, failure: controlFailure, inbox: received, inside } = yield* Conversation.reader(
      ctl,
      "source",
      (last) => Effect.map(Deferred.isDone(doneSent), (done) => done && (!byeDue || last?._tag === "Bye")),
      (last, error) =>
        Effect.map(Deferred.isDone(doneSent), (done) =>
          done && byeDue && last?._tag !== "Bye"
            ? new MigrationError.MigrationError({
              reason: "ChannelClosed",
              detail: `main channel: ${error.message}, after Done and before the source said it heard Done (Bye): ` +
                "the source may not have, and may go on with its memory"
            })
            : undefined)
    )
    // a write waits only while the source reads: a source that reads nothing more (its buffers and this side's
    // full: a source sending flush after flush, or Reattach after Reattach, without reading the answers) is silent
    const tell = (message: Control.Message) =>
      Conversation.tell(ctl, message).pipe(
        within(timeouts.peer, `waiting for the source to read the main channel (to tell it ${message._tag})`)
      )
    // a lost channel's Reattach is served at once (the rounds may be waiting for that channel); the rest in order
    // (bounded as the reader's queue: a source that floods is held back by its socket, not kept)
    const inbox = yield* Queue.bounded<Control.Message>(Conversation.INBOX)
    const reattachFailure = yield* Deferred.make<never, Failure>()
    const reattach = (message: Control.Reattach) =>
      Effect.gen(function*() {
        const recv = yield* Deferred.await(channelSet)
        const { adopted, syncs } = yield* recv.authorize(message.channel, Buffer.from(message.nonce, "hex"))
        // the set had all its channels (the acceptors stopped): accept the new connection
        yield* acceptor.resume(Effect.ignore(Effect.timeout(adopted, reconnectWindow(hello))))
        yield* tell(new Control.Reattached({ channel: message.channel, syncs }))
      }).pipe(Effect.catchAll((error) => Deferred.fail(reattachFailure, error)))
    yield* Effect.forkScoped(Effect.forever(Effect.flatMap(Queue.take(received), (message) =>
      message._tag === "Reattach" ? reattach(message) : Queue.offer(inbox, message))))
    const failures = Effect.raceFirst(controlFailure, Effect.raceFirst(connectionFailure, Deferred.await(reattachFailure)))
    const next = Effect.raceFirst(Queue.take(inbox), failures)

    const migration = Effect.gen(function*() {
      // the destination's duration starts with the source's hello, not with the wait for a source
      const started = yield* Clock.currentTimeMillis
      yield* Effect.logDebug(
        `main channel: hello from ${ctl.peer}: migration ${hello.uuid}, ${hello.channels} channels, ` +
          `page size ${hello.pageSize}, compression ${hello.compression}`
      )
      // then what this process can hold (a listener short of descriptors drops the channels' connections
      // silently), then the caller's own word (`admit`): refused now, saying why, nothing allocated
      const problem = checkHello(hello, settings) ?? OpenFiles.tooFewFor(hello.channels, "destination") ??
        (yield* admitting(settings.admit, {
          ramBytes: ramBytesOf(hello),
          blocks: hello.blocks,
          pageSize: hello.pageSize,
          channels: hello.channels,
          compression: hello.compression
        }, tell))
      if (problem !== undefined) {
        yield* tell(new Control.Reject({ reason: problem }))
        return yield* new MigrationError.MigrationError({ reason: "Rejected", detail: `refused the migration: ${problem}` })
      }
      // memory this process cannot have (an address-space limit) is a refusal, said to the source
      const ram = settings.ram ?? (yield* GuestRam.make({ pageSize: hello.pageSize, blocks: hello.blocks }).pipe(
        Effect.catchAll((error) =>
          Effect.zipRight(
            tell(new Control.Reject({ reason: error.message })),
            new MigrationError.MigrationError({ reason: "Rejected", detail: `refused the migration: ${error.message}` })
          )
        )
      ))
      // a write from inside a report into memory given, while its gate is closed (left closed by a migration or
      // save of it, or by the application), would wait for writers to go on, and this migration's end waits for its
      // last report: it hung after the source had succeeded. Such a write fails at once (WriteBlocked) instead; with
      // the gate open it goes through as before (the mark released after the last report)
      const onProgress = settings.ram === undefined ? settings.onProgress : yield* settings.ram.gate.reports(settings.onProgress)
      // the application's writers of memory given wait while the source's pages are written and verified, and go on
      // after it, on the received memory (a write went through meanwhile: lost under a page that came after it, or,
      // landing after its page, failing the migration DigestMismatch on both sides, blaming the transfer); as a
      // restore's do. A gate closed already (by the application, or kept closed by a migration's success) stays as
      // it was found. Opened again before the store step, which may write or pass on the memory (or on any end)
      const given = settings.ram
      const writersResume = given === undefined ? Effect.void : yield* given.gate.closedForScope
      const recv = yield* MultifdRecv.make({
        channels: hello.channels,
        uuid: Protocol.parseUuid(hello.uuid),
        ram,
        compression: hello.compression,
        // with reconnecting, a connection stuck inside a packet (a path gone silent) is given up after half the
        // peer timeout: it is re-attached before the migration's own inactivity watch (the whole peer timeout)
        // would give up on it
        stallTimeout: hello.reconnectMs === undefined ? timeouts.peer : Duration.millis(Duration.toMillis(timeouts.peer) / 2),
        handshakeTimeout: timeouts.handshake,
        reconnect: hello.reconnectMs === undefined ? undefined : reconnectWindow(hello),
        paced: hello.paced === true,
        onLost: (channel, nonce) =>
          Effect.ignore(tell(new Control.Lost({
            channel,
            ...(nonce === undefined ? {} : { nonce: Buffer.from(nonce).toString("hex") })
          }))),
        // compressed payloads are decoded on the channel threads, when there are some
        threads: Option.getOrUndefined(yield* Effect.serviceOption(ChannelThreads.ChannelThreads))
      })
      yield* Deferred.succeed(channelSet, recv)
      yield* tracker.begin(ram.size)
      yield* tracker.probe(Effect.gen(function*() {
        const s = yield* recv.stats
        const elapsed = (yield* Clock.currentTimeMillis) - started
        return {
          transferred: s.bytes,
          normal: s.normalPages,
          duplicate: s.zeroPages,
          // memory not received once yet
          remaining: Math.max(0, ram.size - (s.normalPages + s.zeroPages) * ram.pageSize),
          rounds: Math.floor(s.syncs / hello.channels),
          mbps: elapsed > 0 ? s.bytes * 8 / 1e3 / elapsed : 0
        }
      }))
      // the metrics follow the channels' counters to the end, whatever the end
      yield* Effect.addFinalizer(() => Effect.flatMap(recv.stats, recorder.record))
      // active once every channel is there (a failure is the migration's, reported below)
      yield* Effect.forkScoped(Effect.ignore(Effect.gen(function*() {
        yield* recv.adopted
        yield* tracker.active
        yield* Effect.logDebug(`every multifd channel adopted (${hello.channels})`)
      })))
      yield* tell(new Control.Accept({ heartbeats: true, bye: true }))
      // the hashing threads start while the source connects its channels, rather than in the downtime
      // memory given whose ArrayBuffer was detached meanwhile (transferred to another thread): refused as up front
      const digest = Effect.mapError(
        yield* GuestRam.digester(ram),
        (error) => new MigrationError.MigrationError({ reason: "BadOptions", detail: error.detail })
      )
      // the receive rate over the last second; a received migration's last report counts every page
      yield* Transfer.reportEvery(onProgress, (rate) =>
        Effect.gen(function*() {
          const s = yield* recv.stats
          return {
            // rounds every channel finished (a round some channels synced is still under way)
            round: Math.floor(s.syncs / hello.channels),
            phase: "precopy",
            doneBytes: (s.normalPages + s.zeroPages) * ram.pageSize,
            totalBytes: ram.size,
            // the destination does not see the source's memory
            dirtyPages: 0,
            bandwidth: yield* rate(s.bytes),
            expectedDowntimeMs: 0
          }
        }), { lastOnSuccess: true, lastWithin: timeouts.peer })
      const describeMissing = Effect.gen(function*() {
        const turnedAway = yield* acceptor.rejected
        // a lost channel is not connected: it waits for its new connection (one announced to re-attach before any of
        // its connections was adopted was never counted: "0 of 2 connected" with the other channel there)
        const lost = yield* recv.lost
        return `${yield* recv.connected} of ${hello.channels} multifd channels connected` +
          (lost.length > 0
            ? `; lost, not re-attached: ${lost.map((channel) => `multifd channel ${channel}`).join(", ")}`
            : "") +
          (turnedAway.length > 0 ? `; rejected: ${turnedAway.join("; ")}` : "")
      })

      const { complete, rounds, digest: computing } = yield* receiveRounds(
        recv,
        { next, tell, inside },
        digest,
        timeouts.peer,
        describeMissing,
        recorder,
        tracker,
        hello.heartbeats === true
      )
      yield* recv.expectEnd
      yield* verify(
        complete,
        computing,
        tell,
        hello.heartbeats === true ? { peer: timeouts.peer } : undefined
      )
      yield* writersResume
      // Done promises the memory is verified and, with a store step, stored: the source reports success on it
      yield* storeThen(
        ram,
        settings.store,
        ctl,
        timeouts.peer,
        Effect.zipRight(Deferred.succeed(doneSent, undefined), tell(new Control.Done()))
      )
      yield* Effect.raceFirst(recv.finished, failures).pipe(
        within(timeouts.peer, "waiting for the source to close its multifd channels")
      )
      yield* Effect.logDebug("every multifd channel closed")
      // the source ends its main channel once it heard Done and ended its channels: until then it may still fail
      // (Done lost on the way, its wait for it timed out) and let its writers resume, and a destination that
      // succeeded then would hold a copy the source has moved on from. A source that fails says Abort before it
      // closes; one that never closes (the path went silent) is given up on
      yield* Effect.raceFirst(controlClosed, failures).pipe(
        within(timeouts.peer, "waiting for the source to close the main channel")
      )
      yield* Effect.logDebug("main channel: closed")
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
          ...(s.reattached > 0 ? { reconnects: s.reattached } : {}),
          durationMs,
          gibPerSecond: Transfer.gibPerSecond(ram.size, durationMs)
        }
      } satisfies Received
    })

    const isAbort = (error: Failure) => error._tag === "MigrationError" && error.reason === "Aborted"
    const isHangUp = (error: Failure | StoreFailed<E>) =>
      (error._tag === "MigrationError" && error.reason === "ChannelClosed") ||
      (error._tag === "ChannelError" && error.cause._tag === "TransportError")
    // `settled` says when the migration's fiber ended (raceFirst already awaits the side it interrupts; the
    // check below must not depend on that)
    const settled = yield* Deferred.make<void>()
    return yield* Effect.raceFirst(Effect.ensuring(migration, Deferred.succeed(settled, undefined)), failures).pipe(
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
          : Conversation.abortPeer(ctl, error.message)
      ),
      // cancelled (the receiving fiber interrupted, `multifd recv` given a signal): the source hears why, as
      // this side hears "cancelled by source"; after Done it has what it came for, and hears nothing more
      // (once the migration's own fiber ended: a store step inside its commit finishes it, and sends Done)
      Effect.onInterrupt(() =>
        Effect.flatMap(
          Effect.zipRight(Deferred.await(settled), Deferred.isDone(doneSent)),
          (done) => done ? Effect.void : Conversation.abortPeer(ctl, "cancelled by destination")
        )
      ),
      Effect.mapError((error): Failure | E => error instanceof StoreFailed ? error.error : error)
    )
  }))
