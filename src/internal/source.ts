/**
 * The source's side of `Migration.migrate`, in its steps: open the main channel, propose (hello → accept),
 * transfer (the channel set and the pre-copy rounds, each ended by a flush the destination acknowledges),
 * complete (digests → done) and finish (every channel ended gracefully). `Migration` checks and resolves the
 * options first; everything here runs in one scope.
 *
 * @internal
 */
import * as Cause from "effect/Cause"
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as FiberId from "effect/FiberId"
import * as Option from "effect/Option"
import * as Queue from "effect/Queue"
import * as Crypto from "node:crypto"
import type * as Bandwidth from "../Bandwidth.js"
import * as ChannelThreads from "../ChannelThreads.js"
import * as Control from "../Control.js"
import * as GuestRam from "../GuestRam.js"
import * as MigrationError from "../MigrationError.js"
import * as MultifdSend from "../MultifdSend.js"
import * as Protocol from "../Protocol.js"
import * as Transfer from "../Transfer.js"
import * as Transport from "../Transport.js"
import * as Handshake from "./tls/handshake.js"
import * as Conversation from "./conversation.js"
import * as OpenFiles from "./native/openFiles.js"
import * as Precopy from "./precopy.js"
import * as PeerText from "./peerText.js"
import * as Recorder from "./recorder.js"
import { unlessStalled, within } from "./stall.js"
import * as Status from "./status.js"
import * as Memory from "./memory.js"

/** The source's options, checked and with their defaults. */
export interface Settings {
  readonly address: Transport.Address
  readonly channels: number
  readonly compression: Protocol.Compression
  readonly compressionLevel: number | undefined
  readonly zeroPage: "multifd" | "none"
  readonly timeouts: Transfer.Timeouts
  readonly upgrade: Transport.Upgrade<Transport.UpgradeError> | undefined
  readonly onProgress: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
  readonly live: Transfer.LiveOptions | undefined
  /** The channels' bandwidth limit, if any. */
  readonly maxBandwidth: Bandwidth.Limit | undefined
  /** Keeps the caller's `MigrationStatus`, if any. */
  readonly tracker: Status.Tracker
  /** Lost channels re-attach (`attempts` 0: they fail the migration). */
  readonly reconnect: { readonly attempts: number; readonly within: Duration.DurationInput }
}

/** What the source can fail with. */
export type Failure = MultifdSend.ChannelFailure | MigrationError.MigrationError | MigrationError.ChannelError

/** Runs the migration of the `GuestRam` in context; returns once the destination confirmed it. */
export const run = (
  settings: Settings
): Effect.Effect<Transfer.Stats, Failure, Transport.Transport | GuestRam.GuestRam> =>
  // one migration or save of a memory at a time: before anything connects
  Effect.flatMap(GuestRam.GuestRam, (ram) => Precopy.exclusive(ram, Effect.scoped(Effect.gen(function*() {
    const transport = yield* Transport.Transport
    const { channels, compression, timeouts, tracker } = settings
    const recorder = Recorder.make("source")
    const uuidText = Crypto.randomUUID()
    const uuid = Protocol.parseUuid(uuidText)!
    const started = yield* Clock.currentTimeMillis
    // the channels run on the pool of channel threads when there is one and they can read the memory there
    const threads = ram.blocks.every((block) => block.bytes.buffer instanceof SharedArrayBuffer)
      ? Option.getOrUndefined(yield* Effect.serviceOption(ChannelThreads.ChannelThreads))
      : undefined

    // out of descriptors, channels would fail one by one as they connect: say so before connecting any
    const tooFew = OpenFiles.tooFewFor(channels, "source")
    if (tooFew !== undefined) return yield* new MigrationError.MigrationError({ reason: "BadOptions", detail: tooFew })

    // the main channel
    const attributes = { "multifd.channel": "main" }
    const control = yield* Effect.gen(function*() {
      const raw = yield* transport.connect(settings.address, { timeout: timeouts.connect }).pipe(
        Effect.withSpan("multifd.channel.connect", { attributes })
      )
      yield* Effect.logDebug(`main channel: connected to ${Transport.formatAddress(settings.address)}`)
      if (settings.upgrade === undefined) return raw
      const secured = yield* Handshake.bounded(settings.upgrade, timeouts.handshake)(raw, "main").pipe(Effect.withSpan("multifd.channel.handshake", { attributes }))
      yield* Effect.logDebug("main channel: TLS handshake done")
      return secured
    }).pipe(Effect.mapError(MigrationError.onChannel("main")))
    // once Done came the destination has everything and closes the main channel when it saw the multifd
    // channels end, which may come before this side is done ending them: that close is the conversation's end
    const doneReceived = yield* Deferred.make<void>()
    const { failure: readerFailure, inbox: received, inside } = yield* Conversation.reader(
      control,
      "destination",
      () => Deferred.isDone(doneReceived)
    )
    // the destination's word that a lost channel may re-attach goes to that channel; the rest in order (bounded
    // as the reader's: a peer that floods is held back by its socket, not kept)
    const reattached = new Map<number, Deferred.Deferred<number>>()
    const inbox = yield* Queue.bounded<Control.Message>(Conversation.INBOX)
    // the destination's word that a channel's connection broke, by channel and nonce (it may come first); only
    // about a connection this source made (a channel's first, or one announced by `reattach`): any other is out of
    // turn (each was kept, and a destination naming nonce after nonce grew this map without bound)
    const losses = new Map<string, Deferred.Deferred<void>>()
    const lossKey = (channel: number, nonce: string | undefined) => `${channel}/${nonce ?? ""}`
    const made = new Set(Array.from({ length: channels }, (_, channel) => lossKey(channel, undefined)))
    const lossOf = (channel: number, nonce: string | undefined) => {
      const key = lossKey(channel, nonce)
      let loss = losses.get(key)
      if (loss === undefined) {
        loss = Deferred.unsafeMake<void>(FiberId.none)
        losses.set(key, loss)
      }
      return loss
    }
    // what the destination says arrived so far (`Receiving`): bytes reaching it are progress, whatever the
    // kernels' buffers let this side see of its own writes
    let arrived = 0
    // (never more than this side sent: a destination that claims more is not believed past that)
    const heardOf = (send: MultifdSend.MultifdSend["Type"]) => Effect.map(send.stats, (s) => Math.min(arrived, s.sentBytes))
    yield* Effect.forkScoped(Effect.forever(Effect.flatMap(Queue.take(received), (message) => {
      if (message._tag === "Lost") {
        return made.has(lossKey(message.channel, message.nonce))
          ? Deferred.succeed(lossOf(message.channel, message.nonce), undefined)
          : Queue.offer(inbox, message)
      }
      if (message._tag === "Receiving") {
        arrived = Math.max(arrived, message.bytes)
        return Effect.void
      }
      if (message._tag !== "Reattached") return Queue.offer(inbox, message)
      const waiting = reattached.get(message.channel)
      return waiting === undefined ? Queue.offer(inbox, message) : Deferred.succeed(waiting, message.syncs)
    })))
    const answered = yield* Deferred.make<void>()
    // the main channel closing before any answer most likely means this source was refused (a TLS record that
    // failed authentication here means no such thing: it says so itself)
    const controlFailure = Effect.catchAll(readerFailure, (error) =>
      Effect.flatMap(Deferred.isDone(answered), (isAnswered) =>
        // an answer that is no control message at all: a server of another protocol (SSH's banner, HTTP's
        // answer) read as a frame "of 1397966893 bytes", which named neither the peer nor what it was
        !isAnswered && error._tag === "ProtocolError"
          ? new MigrationError.MigrationError({
            reason: "Rejected",
            detail: `${Transport.formatAddress(settings.address)} is not a multifd destination: its answer is no ` +
              `control message (${error.detail})`
          })
          : !isAnswered && error._tag === "ChannelError" && Transport.isLostConnection(error.cause)
          ? new MigrationError.MigrationError({
            reason: "Rejected",
            // a TLS source that presented a certificate explains such a close itself (Tls.client)
            detail: Conversation.tlsRefusal(error.cause) ??
              // TLS 1.3: a client learns that its missing certificate was refused only after its handshake
              (/alert certificate required/.test(error.cause.message)
                ? "the destination requires a client certificate (TLS alert: certificate required) and this source " +
                  "presented none: give it a certificate and key its CA issued (TlsConfig cert and key; multifd send --tls-cert " +
                  "and --tls-key)"
                : undefined) ??
              `the destination closed the main channel before answering (${error.cause.message}); ` +
                (settings.upgrade === undefined
                  ? "it may use TLS (this source does not), or not be a multifd destination"
                  : "it may have refused this source (TLS authorization) or not be a multifd destination")
          })
          : Effect.fail(error)))
    /**
     * What a wait for the destination's word waited for, and where that word stopped if it stopped inside a message
     * (its frame's length corrupted on the way: the rest never comes, and the destination waits too).
     */
    const waitingFor = (waiting: string) => () => {
      const frame = inside()
      return frame === undefined ? waiting : `${waiting} (its answer stopped inside ${frame})`
    }
    const next = (waiting: string) =>
      Effect.raceFirst(Queue.take(inbox), controlFailure).pipe(within(timeouts.peer, waitingFor(waiting)))
    const tell = (message: Control.Message) => Conversation.tell(control, message)

    const withinMs = Duration.toMillis(Duration.decode(settings.reconnect.within))
    const reconnecting = settings.reconnect.attempts > 0
    /**
     * Announces that `channel` re-attaches with `nonce`; the SYNC packets of the channel the destination
     * received, once it dropped the lost connection.
     */
    const reattach = (channel: number, nonce: Uint8Array) =>
      Effect.gen(function*() {
        const answer = yield* Deferred.make<number>()
        reattached.set(channel, answer)
        const hex = Buffer.from(nonce).toString("hex")
        made.add(lossKey(channel, hex))
        yield* tell(new Control.Reattach({ channel, nonce: hex }))
        return yield* Effect.raceFirst(Deferred.await(answer), controlFailure).pipe(
          within(timeouts.peer, waitingFor(`waiting for the destination to let multifd channel ${channel} re-attach`))
        )
      }).pipe(Effect.ensuring(Effect.sync(() => reattached.delete(channel))))

    /** Hello → Accept: the destination takes this migration, or says why not. */
    const propose = Effect.gen(function*() {
      yield* Effect.mapError(Control.writeMagic(control), MigrationError.onChannel("main"))
      yield* tell(
        new Control.Hello({
          version: Control.VERSION,
          uuid: uuidText,
          pageSize: ram.pageSize,
          channels,
          compression,
          zeroPage: settings.zeroPage,
          blocks: GuestRam.layoutOf(ram),
          ...(reconnecting ? { reconnectMs: withinMs } : {}),
          ...(settings.maxBandwidth === undefined ? {} : { paced: true }),
          heartbeats: true,
          // this side says Bye once it heard Done and ended its channels: the destination succeeds on that, not on
          // the main channel's end alone (which a broken path delivers too)
          bye: true
        })
      )
      const answer = yield* next(
        `waiting for the destination (${Transport.formatAddress(settings.address)}) to accept the migration`
      )
      yield* Deferred.succeed(answered, undefined)
      if (answer._tag === "Reject") {
        return yield* new MigrationError.MigrationError({
          reason: "Rejected",
          detail: `the destination refused the migration: ${PeerText.fromPeer(answer.reason)}`
        })
      }
      if (answer._tag !== "Accept") return yield* Conversation.unexpected(answer, "instead of Accept")
      yield* Effect.logDebug(`main channel: the destination accepted migration ${uuidText}`)
      // whether the destination understands this side's heartbeats (`Hashing`), and its Bye
      return { heartbeats: answer.heartbeats === true, bye: answer.bye === true }
    }).pipe(Effect.withSpan("multifd.propose"))

    /** The channel set, then every round of pages; the last one with writers paused. */
    const statusRounds = Status.rounds(tracker)
    const transfer = (send: MultifdSend.MultifdSend["Type"]) =>
      Precopy.run(ram, {
        sink: {
          slots: send.batchPages,
          spread: { workers: channels, unit: send.slots },
          send: send.send,
          sync: send.sync,
          failure: send.failure,
          progress: Effect.map(send.stats, (s) => s.sentBytes),
          heard: heardOf(send),
          pagesSent: Effect.map(send.stats, (s) => s.sentPages),
          // bytes the channels wrote that their sockets could not hand to the kernel: the destination's buffers and
          // this side's are full (it reads nothing, or the path to it is dead)
          stalled: Effect.map(send.stats, (s) =>
            s.bytes > s.sentBytes
              ? `${s.bytes - s.sentBytes} bytes written on the multifd channels are not taken by ` +
                `${Transport.formatAddress(settings.address)}: it reads nothing, or the path to it is dead`
              : undefined)
        },
        started,
        live: settings.live,
        stallTimeout: timeouts.peer,
        onProgress: tracker.withProgress(settings.onProgress, ram.pageSize),
        observe: {
          started: (round) =>
            Effect.gen(function*() {
              yield* recorder.dirty(round.pages)
              yield* statusRounds.started(round)
              yield* Effect.logDebug(`round ${round.round} (${round.phase}): ${round.pages} pages`)
            }),
          ended: (round) =>
            Effect.gen(function*() {
              yield* recorder.record(yield* send.stats)
              yield* recorder.round(round.bandwidth)
              yield* statusRounds.ended(round)
            })
        },
        // the destination acknowledges a round once every channel reached its barrier; until then, on a slow
        // link, it says about every second how many bytes arrived: the peer timeout runs from the last growth
        // of that count (a destination repeating the same count, or saying nothing, times out as before)
        flush: (round, final) =>
          Effect.gen(function*() {
            yield* tell(new Control.Flush({ round, final }))
            const ack = yield* unlessStalled(
              Effect.raceFirst(Effect.raceFirst(Queue.take(inbox), controlFailure), send.failure),
              heardOf(send),
              timeouts.peer,
              waitingFor("waiting for the destination to acknowledge the flush")
            )
            if (ack._tag !== "FlushAck") return yield* Conversation.unexpected(ack, `instead of FlushAck for round ${round}`)
            if (ack.round !== round) {
              return yield* Conversation.unexpected(ack, `for round ${ack.round} instead of round ${round}`)
            }
            yield* send.acknowledged
            yield* Effect.logDebug(`main channel: the destination acknowledged round ${round}`)
          })
      })

    /**
     * Done comes once the destination verified and stored the memory; while it hashes (a large memory) and while
     * it stores (a big image on a slow disk) it says so about every second, and the peer timeout bounds the
     * silence between two messages rather than the whole digest or store.
     */
    const confirmed = (
      waiting: string,
      report: (wait: Transfer.DestinationWait) => Effect.Effect<void, Failure>,
      since?: { readonly state: Transfer.DestinationWait["state"]; readonly at: number }
    ): Effect.Effect<void, Failure> =>
      Effect.flatMap(next(waiting), (message) => {
        if (message._tag === "Done") return Effect.asVoid(Deferred.succeed(doneReceived, undefined))
        if (message._tag !== "Storing" && message._tag !== "Hashing") {
          return Conversation.unexpected(message, "instead of Done")
        }
        // each heartbeat is a progress report saying what the destination does, and since when: the last round's
        // report stood still, for the whole of a store on a slow disk
        const state: Transfer.DestinationWait["state"] = message._tag === "Storing" ? "storing" : "verifying"
        return Effect.flatMap(Clock.currentTimeMillis, (now) => {
          const from = since?.state === state ? since : { state, at: now }
          return Effect.zipRight(
            report({ state, forMs: now - from.at }),
            confirmed(state === "storing" ? "waiting for the destination to store the image" : waiting, report, from)
          )
        })
      })

    /**
     * Every connection ended gracefully: the peer takes the last bytes within the peer timeout. A destination that
     * understands it is told Bye first.
     */
    const finish = (send: MultifdSend.MultifdSend["Type"], bye: boolean) =>
      Effect.gen(function*() {
        yield* Effect.raceFirst(send.finish, send.failure).pipe(
          within(timeouts.peer, "waiting for the multifd channels to send their last bytes and close")
        )
        // Bye, then the end (a destination that already closed the main channel, after Done, has all it needs)
        const end = Effect.catchIf(
          bye ? Effect.zipRight(Control.send(control, new Control.Bye()), control.end) : control.end,
          (error) => error.reason === "Closed",
          () => Effect.void
        )
        yield* Effect.mapError(end, MigrationError.onChannel("main")).pipe(
          within(timeouts.peer, "waiting for the main channel to send its last bytes and close")
        )
        yield* Effect.logDebug("main channel: closed")
      }).pipe(Effect.withSpan("multifd.close"))

    const migration = Effect.gen(function*() {
      const { bye, heartbeats } = yield* propose
      const send = yield* MultifdSend.make({
        address: settings.address,
        channels,
        uuid,
        pageSize: ram.pageSize,
        compression,
        compressionLevel: settings.compressionLevel,
        zeroPage: settings.zeroPage,
        connectTimeout: timeouts.connect,
        handshakeTimeout: timeouts.handshake,
        upgrade: settings.upgrade,
        destination: control.peerIdentity,
        threads,
        reconnect: reconnecting
          ? {
            attempts: settings.reconnect.attempts,
            within: withinMs,
            reattach,
            lost: (channel, nonce) =>
              Deferred.await(lossOf(channel, nonce === undefined ? undefined : Buffer.from(nonce).toString("hex")))
          }
          : undefined,
        maxBandwidth: settings.maxBandwidth
      })
      // the metrics follow the channels' counters to the end, whatever the end
      yield* Effect.addFinalizer(() => Effect.flatMap(send.stats, recorder.record))
      yield* tracker.probe(Effect.map(send.stats, (s) => ({
        transferred: s.sentBytes,
        normal: s.normalPages,
        duplicate: s.zeroPages
      })))
      // the hashing threads start while the channels connect, rather than in the downtime; with channel threads
      // the digest hashes on them (idle by then) rather than on threads of its own
      const digest = Effect.mapError(
        threads === undefined ? yield* GuestRam.digester(ram) : Memory.digestOnThreads(ram, threads, (detail) => new GuestRam.GuestRamError({ reason: "Detached", detail })),
        // its ArrayBuffer detached meanwhile (transferred to another thread): refused as up front
        (error) => new MigrationError.MigrationError({ reason: "BadOptions", detail: error.detail })
      )
      // every channel idle before the first page: a small round is spread over all of them
      yield* send.established.pipe(Effect.withSpan("multifd.establish"))
      yield* tracker.active
      yield* Effect.logDebug(`every multifd channel established (${channels})`)
      const { pagesPerRound, pausedAt, waiting } = yield* transfer(send)
      // a large memory takes longer to hash than the peer timeout: the destination hears that this side hashes
      const hashing = Conversation.heartbeat(tell, new Control.Hashing(), timeouts.peer)
      // (a channel that fails meanwhile, its thread gone with the pool, ends it: its error is the migration's)
      const digests = yield* Effect.raceFirst(heartbeats ? Effect.raceFirst(digest, hashing) : digest, send.failure).pipe(
        Effect.withSpan("multifd.digest")
      )
      yield* Effect.logDebug("digests computed")
      yield* tell(new Control.Complete({ digests }))
      yield* Effect.raceFirst(confirmed("waiting for the destination to verify the digests", waiting), send.failure).pipe(
        Effect.withSpan("multifd.verify")
      )
      yield* Effect.logDebug("main channel: the destination verified the digests")
      const downtimeMs = (yield* Clock.currentTimeMillis) - pausedAt
      yield* finish(send, bye)
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
        reconnects: s.reconnects,
        resentPages: s.resentPages,
        channelWireBytes: s.channelBytes,
        durationMs,
        gibPerSecond: Transfer.gibPerSecond(ram.size, durationMs)
      } satisfies Transfer.Stats
    })

    return yield* Effect.raceFirst(migration, controlFailure).pipe(
      Effect.tapError((error) => Conversation.abortPeer(control, error.message)),
      // a defect (an onProgress that died) ends the migration too: the destination hears why, not just a close
      Effect.tapDefect((defect) =>
        Cause.isInterruptedOnly(defect) ? Effect.void : Conversation.abortPeer(control, Conversation.messageOf(Cause.squash(defect)))
      ),
      Effect.onInterrupt(() => Conversation.abortPeer(control, "cancelled by source"))
    )
  }))))
