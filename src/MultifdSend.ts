/**
 * The source's channel set. Each channel has an owner, a fiber of the set: it connects, secures and announces
 * the channel (init packet), holding the connection in its own scope, and only then forks the channel's worker
 * into that scope and waits for it. Batches of pages go to whichever channel is idle; `sync` makes every
 * channel send a SYNC packet after its pending pages. The first failure of any channel is the set's failure;
 * closing the scope interrupts and awaits every owner, and each owner's scope its worker before the
 * connection closes. There is no liveness flag: a worker exists only while its owner holds the connection.
 *
 * Given `ChannelThreads` (and shared memory, Node's transport, no upgrade or `Tls.client`'s), each channel runs
 * in a thread of the pool instead: its owner holds a lease on the thread (the channel's session there),
 * awaits the thread's word that the channel is established, and only then forks the worker, which forwards
 * the channel's jobs to the thread and waits for its answers. The channel's work itself is the same code on
 * both paths (`internal/sendChannel`).
 *
 * A channel whose connection breaks after it was established is re-attached (`Config.reconnect`): its owner
 * runs one connection after another (on a thread: one session after another), each new one announced on the
 * control channel, and resends from a journal of the channel's jobs kept until the round is acknowledged.
 * Longer than 400 lines on purpose: the two paths share the journal, the re-attach loop and the idle queue.
 *
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Clock from "effect/Clock"
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as FiberSet from "effect/FiberSet"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Queue from "effect/Queue"
import * as Ref from "effect/Ref"
import type * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Bandwidth from "./Bandwidth.js"
import * as RateLimits from "./internal/native/rateLimit.js"
import type * as ChannelThreads from "./ChannelThreads.js"
import type * as GuestRam from "./GuestRam.js"
import { ownFibers } from "./internal/native/ownFibers.js"
import * as SendChannel from "./internal/sendChannel.js"
import * as SendSession from "./internal/threads/sendSession.js"
import { type EncodedFailure, ThreadError } from "./internal/threads/protocol.js"
import * as Handshake from "./internal/tls/handshake.js"
import * as MigrationError from "./MigrationError.js"
import * as PageCodec from "./PageCodec.js"
import * as Protocol from "./Protocol.js"
import * as Tls from "./Tls.js"
import * as Transport from "./Transport.js"

/**
 * How the source's channels are set up.
 *
 * @since 0.1.0
 * @category models
 */
export interface Config {
  readonly address: Transport.Address
  readonly channels: number
  /** The migration's uuid (16 bytes), sent in every init packet. */
  readonly uuid: Uint8Array
  readonly pageSize: number
  readonly compression: Protocol.Compression
  readonly compressionLevel?: number | undefined
  /** `multifd`: zero pages travel as offsets only; `none`: as data. */
  readonly zeroPage: "multifd" | "none"
  readonly connectTimeout?: Duration.DurationInput | undefined
  /** Bounds each channel's upgrade (its TLS handshake), whatever the TLS settings' own timeout; none by default. */
  readonly handshakeTimeout?: Duration.DurationInput | undefined
  /** Secures each channel (TLS) before its init packet; identity by default. */
  readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
  /**
   * Who the main channel's destination proved to be in its upgrade (its `Connection.peerIdentity`: `Tls.client` sets
   * the destination's certificate): a channel whose upgrade proves another is refused before its init packet.
   */
  readonly destination?: string | undefined
  /**
   * Runs each channel in a thread of this pool: every block sent must then lie in shared memory
   * (`GuestRam.allocate`; another block is a defect). Used only with Node's transport (`Transport.layer`) and
   * an upgrade that is none or `Tls.client`'s (it carries its settings as data); with any other the channels
   * run in this thread, where a wrapped transport or upgrade sees them.
   */
  readonly threads?: ChannelThreads.ChannelThreads["Type"] | undefined
  /** One bandwidth limit for every channel (`Bandwidth.make`); none by default. */
  readonly maxBandwidth?: Bandwidth.Limit | undefined
  /**
   * Re-attaches a channel whose connection broke after it was established (reset, EOF, a failed write):
   * up to `attempts` new connections within `within` of the loss (backoff between them), each announced by
   * `reattach` and resending every page of the channel the destination has not got before a SYNC. Absent
   * (or 0 attempts): a lost channel fails the set, as QEMU does.
   */
  readonly reconnect?: Reconnect | undefined
}

/**
 * A hand-off of pages read into a window of a block (a batch of a file) rather than the block's own memory:
 * `origin` is where the window starts in the block (bytes; the packets carry the block's offsets), and `sent`
 * runs once the channel handed every byte of it to the kernel — then, and not before, the window may be
 * reused. Such a hand-off is not kept for a re-attach: a set with `reconnect` refuses it.
 *
 * @since 0.1.0
 * @category models
 */
export interface Window {
  readonly origin: number
  readonly sent: Effect.Effect<void>
}

/**
 * How a lost channel comes back: `attempts` within `within`, each announced by `reattach` (the control
 * channel's `Reattach` with `nonce`, answered once the destination dropped the lost connection with the count
 * of the channel's SYNC packets it received).
 *
 * @since 0.1.0
 * @category models
 */
export interface Reconnect {
  readonly attempts: number
  readonly within: Duration.DurationInput
  readonly reattach: (
    channel: number,
    nonce: Uint8Array
  ) => Effect.Effect<number, ChannelFailure>
  /** Completes when the destination says that the channel's connection with `nonce` (or its first) broke. */
  readonly lost: (channel: number, nonce: Uint8Array | undefined) => Effect.Effect<void>
}

/**
 * What can end a channel.
 *
 * @since 0.1.0
 * @category errors
 */
export type ChannelFailure = SendChannel.Failure | MigrationError.MigrationError

/**
 * Counters of what the channels sent.
 *
 * @since 0.1.0
 * @category models
 */
export interface Stats {
  readonly packets: number
  readonly syncs: number
  readonly normalPages: number
  readonly zeroPages: number
  /** Bytes written on the multifd channels (headers and payload). */
  readonly bytes: number
  /** Of `bytes`, those the sockets accepted (handed to the kernel): what has really left. */
  readonly sentBytes: number
  /** Pages (normal and zero) of the packets the sockets accepted entirely. */
  readonly sentPages: number
  /** Of `bytes`, those of each channel, by channel id. */
  readonly channelBytes: ReadonlyArray<number>
  /** Channels re-attached after a lost connection. */
  readonly reconnects: number
  /** Pages sent again on a re-attached channel. */
  readonly resentPages: number
}

/**
 * The source's established channel set.
 *
 * @since 0.1.0
 * @category tags
 */
export class MultifdSend extends Context.Tag("effect-multifd/MultifdSend")<MultifdSend, {
  /** Pages per packet (the offset array's slots). */
  readonly slots: number
  /** Most pages one `send` takes: `PACKETS_PER_BATCH` packets, which one channel sends in a row. */
  readonly batchPages: number
  /**
   * Queues `count` pages (indices in `pages`, at most `batchPages`) of `block` on the next idle channel, which
   * sends them as packets of up to `slots` pages; waits for an idle channel. With `window`, `block.bytes` is a
   * window of the block's pages (see `Window`).
   */
  readonly send: (
    block: Pick<GuestRam.Block, "name" | "bytes">,
    pages: Uint32Array,
    count: number,
    window?: Window
  ) => Effect.Effect<void, ChannelFailure>
  /** Every channel sends a SYNC packet after its pending pages; completes when all have. */
  readonly sync: Effect.Effect<void, ChannelFailure>
  /**
   * Ends every channel gracefully (flush, TLS close_notify, FIN) and waits for their fibers. It waits as long
   * as the sockets take to hand their last bytes to the kernel: a caller bounds it (`Migration` by the peer
   * timeout).
   */
  readonly finish: Effect.Effect<void, ChannelFailure>
  /** Completes once every channel is established (as QEMU, the transfer starts with all of them idle). */
  readonly established: Effect.Effect<void, ChannelFailure>
  /** Fails with the first failure of any channel; never succeeds while the set is open. */
  readonly failure: Effect.Effect<never, ChannelFailure>
  readonly stats: Effect.Effect<Stats>
  /**
   * The destination acknowledged every SYNC sent so far (the round's flush): no page before them is sent
   * again if a channel re-attaches.
   */
  readonly acknowledged: Effect.Effect<void>
}>() {}

interface Channel {
  readonly id: number
  readonly mailbox: Queue.Queue<SendChannel.Job>
}

/** What a channel's worker takes jobs from, and tells when a hand-off ended. */
interface Jobs {
  readonly next: Effect.Effect<SendChannel.Job>
  readonly idle: Effect.Effect<void>
}

/** A failure of an established channel that a new connection may get past: the network's or TLS's. */
/** The wait before a lost channel's second reconnect attempt; each later one waits twice the one before. */
const RECONNECT_BACKOFF_MS = 1000

const recoverable = (error: unknown): boolean => {
  const original = Cause.originalError(error)
  return (Transport.isLostConnection(original) || (original as { readonly _tag?: string })._tag === "TlsError") &&
    !refusal(original)
}

/**
 * A TLS refusal no new connection changes (the error, or what caused it): a configuration problem, or credentials
 * refused ("Unauthorized": this source's certificate, expired since it was loaded, refused by the destination; a
 * destination other than the main channel's). Re-attaching burnt every attempt, seconds apart, and then failed the same.
 */
const refusal = (error: unknown): boolean => {
  for (let e = error, depth = 0; typeof e === "object" && e !== null && depth < 4; depth++) {
    const { _tag, cause, reason } = e as { readonly _tag?: unknown; readonly reason?: unknown; readonly cause?: unknown }
    if (_tag === "TlsError") return reason === "Unauthorized" || reason === "Config"
    e = cause
  }
  return false
}

/** A job a channel took, kept until acknowledged: `finished` once its hand-off ended (idle, or SYNC done). */
interface Entry {
  readonly job: SendChannel.Job
  /** For a SYNC: how many the channel had taken with it. */
  readonly sync: number
  finished: boolean
}

/**
 * The jobs of one channel since the last acknowledged round (with reconnecting on), and the ones to send
 * again on its next connection.
 */
class Journal {
  entries: Array<Entry> = []
  replay: Array<Entry> = []
  current: Entry | undefined = undefined
  syncs = 0
  constructor(readonly keep: boolean) {}

  /**
   * The destination has `syncs` SYNC packets of this channel: the entries up to the last of them are
   * skipped (their bookkeeping returned), the rest sent again.
   */
  resume(syncs: number): ReadonlyArray<Entry> {
    let from = 0
    this.entries.forEach((entry, i) => {
      if (entry.job._tag === "Sync" && entry.sync <= syncs) from = i + 1
    })
    this.replay = this.entries.slice(from)
    this.current = undefined
    return this.entries.slice(0, from).filter((entry) => !entry.finished)
  }
}

/**
 * Packets a channel takes at each hand-off (fewer hand-offs; QEMU's packets stay 512 KiB of 4 KiB pages).
 *
 * @since 0.1.0
 * @category constants
 */
export const PACKETS_PER_BATCH = 32

/**
 * Establishes the channel set in the current scope. Channels connect concurrently; `send` waits for one.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (
  config: Config
): Effect.Effect<MultifdSend["Type"], never, Scope.Scope | Transport.Transport> =>
  Effect.gen(function*() {
    const transport = yield* Transport.Transport
    const { channels, pageSize } = config
    const slots = Protocol.slotsFor(pageSize)
    // shared state first: it is released only after every fiber below has ended
    const idle = yield* Queue.bounded<Channel>(channels)
    const established = yield* Ref.make<ReadonlyArray<Channel>>([])
    const mailboxes = yield* Deferred.make<ReadonlyArray<Channel>>()
    // the packet number and the counters, in shared memory (a channel in a thread updates them there)
    const counters = SendChannel.makeCounters(channels)
    // the sockets of the channels in this thread (each channel's current one), asked for what they accepted
    // when the stats are read
    const accepted = new Map<number, SendChannel.Accepted>()
    const fibers = yield* FiberSet.make<void, ChannelFailure>()
    const failure = Effect.zipRight(FiberSet.join(fibers), Effect.never)
    const settingsOf = (id: number): SendChannel.Settings => ({
      id,
      uuid: config.uuid,
      pageSize,
      compression: config.compression,
      compressionLevel: config.compressionLevel,
      zeroPage: config.zeroPage,
      destination: config.destination,
      rateLimit: RateLimits.sharedOf(config.maxBandwidth),
      // a connection the destination closed or reset is lost even with nothing to write: re-attached, or (reconnect
      // 0) the migration's failure at once, not at the peer timeout
      watchEnd: true
    })
    const reconnect = config.reconnect !== undefined && config.reconnect.attempts > 0 ? config.reconnect : undefined
    const journals = Array.from({ length: channels }, () => new Journal(reconnect !== undefined))
    let reconnects = 0
    let resentPages = 0
    let acknowledgedRounds = 0
    // from `finish` on, a lost channel is not re-attached (the destination has everything)
    let finishing = false

    /** A channel is established: it joins the set (the set is complete once every channel has). */
    const join = (id: number) =>
      Effect.gen(function*() {
        const channel: Channel = { id, mailbox: yield* Queue.unbounded<SendChannel.Job>() }
        const ready = yield* Ref.updateAndGet(established, (all) => [...all, channel])
        if (ready.length === channels) yield* Deferred.succeed(mailboxes, ready)
        return channel
      })

    /** An entry's hand-off ends: its channel is idle again, or its SYNC is done (once). */
    const settle = (channel: Channel, entry: Entry): Effect.Effect<void> =>
      Effect.suspend(() => {
        if (entry.finished) return Effect.void
        entry.finished = true
        return entry.job._tag === "Sync" ? entry.job.done : Queue.offer(idle, channel)
      })

    /** What a channel's worker takes: first what it sends again after a re-attach, then its mailbox. */
    const jobsOf = (channel: Channel, journal: Journal): Jobs => {
      const wrap = (entry: Entry): SendChannel.Job => {
        journal.current = entry
        return entry.job._tag === "Sync" ? { _tag: "Sync", done: settle(channel, entry) } : entry.job
      }
      return {
        next: Effect.suspend(() => {
          const again = journal.replay.shift()
          if (again !== undefined) {
            if (again.job._tag === "Pages") resentPages += again.job.count
            return Effect.succeed(wrap(again))
          }
          // a job taken is journaled before anything can interrupt the taker (a loss, a failure): it is never
          // dropped between the two
          return Effect.uninterruptibleMask((restore) =>
            Effect.map(restore(Queue.take(channel.mailbox)), (job) => {
              // kept until acknowledged: its page numbers copied (the caller may reuse its array)
              const kept = journal.keep && job._tag === "Pages" ? { ...job, pages: job.pages.slice(0, job.count) } : job
              const entry: Entry = { job: kept, sync: job._tag === "Sync" ? ++journal.syncs : 0, finished: false }
              if (journal.keep && job._tag !== "Finish") journal.entries.push(entry)
              return wrap(entry)
            })
          )
        }),
        idle: Effect.suspend(() => journal.current === undefined ? Effect.void : settle(channel, journal.current))
      }
    }

    /**
     * Runs a channel's connections one after another: the first one (`enter` joins the set), and after a
     * loss (a transport or TLS failure of an established channel, before `finish`) new ones, each announced
     * on the control channel, within the reconnect budget; past it the last failure is the channel's.
     */
    const resilient = <E>(
      id: number,
      attempt: (nonce: Uint8Array | undefined, enter: Effect.Effect<Jobs>, lost: Effect.Effect<void>) => Effect.Effect<void, E>
    ): Effect.Effect<void, E | ChannelFailure> =>
      Effect.gen(function*() {
        const journal = journals[id]!
        let channel: Channel | undefined
        let lostAt: number | undefined
        let tries = 0
        // attempts of this loss that re-attached and broke again (a path that flaps): said when the attempts run out
        let reattached = 0
        // the round acknowledged when the channel was lost: a loss ends once a later round is (its budget with it)
        let lostInRound = 0
        // whether the last attempt's connection was established (a re-attach that came through)
        let established = false
        const enter = Effect.gen(function*() {
          established = true
          if (lostAt !== undefined) {
            reconnects++
            yield* Effect.logInfo(`channel ${id}: re-attached (attempt ${tries}), resending ${journal.replay.length} jobs`)
          }
          if (channel === undefined) {
            channel = yield* join(id)
            yield* Queue.offer(idle, channel)
          }
          return jobsOf(channel, journal)
        })
        let nonce: Uint8Array | undefined
        while (true) {
          // the destination may see the connection break while this side has nothing to write
          const lost = reconnect === undefined ? Effect.never : reconnect.lost(id, nonce)
          const exit = yield* Effect.exit(attempt(nonce, enter, lost))
          if (Exit.isSuccess(exit)) return
          const error = Cause.failureOption(exit.cause)
          // lost as it ends (`finish`: the destination said it has every page): nothing is left to send on it,
          // and a destination that re-attaches channels takes the loss as the channel's end
          if (reconnect !== undefined && finishing && Option.isSome(error) && recoverable(error.value)) {
            const why = Cause.originalError(error.value) as { readonly message?: string }
            return yield* Effect.logWarning(`channel ${id}: connection lost as it ended (${why.message}): it has ended`)
          }
          if (
            reconnect === undefined || channel === undefined || finishing || Option.isNone(error) ||
            !recoverable(error.value)
          ) return yield* exit
          const now = yield* Clock.currentTimeMillis
          // a new loss: the first, one in a later round, or a re-attached connection (established) that breaks later
          // than `within` after the loss began: the channel had come back, and this break is another one, with
          // attempts of its own (it was counted in the earlier one's window, run out by then: a long round failed at
          // its second break, its attempts unused)
          const windowMs = Duration.toMillis(Duration.decode(reconnect.within))
          if (
            lostAt === undefined || lostInRound !== acknowledgedRounds || (established && now - lostAt > windowMs)
          ) {
            lostAt = now
            lostInRound = acknowledgedRounds
            tries = 0
            reattached = 0
          }
          if (established && tries > 0) reattached++
          established = false
          const left = windowMs - (now - lostAt)
          const why = Cause.originalError(error.value) as { readonly message?: string }
          if (tries >= reconnect.attempts || left <= 0) {
            yield* Effect.logWarning(`channel ${id}: giving up after ${tries} reconnect attempts: ${why.message}`)
            // the last attempt's failure, saying that the channel was lost and how long it was tried (a first
            // loss is the error itself: nothing was tried)
            if (tries === 0) return yield* exit
            return yield* Effect.fail(
              new MigrationError.ChannelError({
                channel: id,
                cause: why as { readonly message: string; readonly _tag: string },
                reconnects: { attempts: tries, afterMs: now - lostAt, withinMs: windowMs, reattached }
              })
            )
          }
          // at once the first time, then 1 s, 2 s, 4 s... apart (within the window): a path that refuses new
          // connections for a few seconds (a firewall reloading, a route flapping) gets a chance, where attempts
          // 0.1 and 0.2 s apart spent the budget in a third of a second, its window unused
          if (tries > 0) yield* Effect.sleep(Duration.millis(Math.min(left, RECONNECT_BACKOFF_MS * 2 ** (tries - 1))))
          tries++
          yield* Effect.logWarning(
            `channel ${id}: connection lost (${why.message}); re-attaching (attempt ${tries} of ${reconnect.attempts})`
          )
          nonce = Crypto.randomBytes(16)
          const syncs = yield* reconnect.reattach(id, nonce)
          for (const entry of journal.resume(syncs)) yield* settle(channel, entry)
        }
      })

    /**
     * A channel's connection in this thread: connect → upgrade (TLS) → init packet, then the worker, forked
     * into the attempt's scope (which holds the connection) and joined. The scope closes after its worker has
     * ended, and when the owner is interrupted it interrupts and awaits the worker before the connection
     * closes.
     */
    const attempt = (id: number) => (nonce: Uint8Array | undefined, enter: Effect.Effect<Jobs>, lost: Effect.Effect<void>) =>
      Effect.gen(function*() {
        const settings = { ...settingsOf(id), nonce }
        const channel = yield* SendChannel.establish(
          settings,
          transport.connect(config.address, { timeout: config.connectTimeout }),
          config.upgrade === undefined || config.handshakeTimeout === undefined
            ? config.upgrade
            : Handshake.bounded(config.upgrade, config.handshakeTimeout)
        ).pipe(Effect.withSpan("multifd.channel.establish", { attributes: { "multifd.channel": id } }))
        const jobs = yield* enter
        const work = yield* Effect.forkScoped(
          SendChannel.serve(settings, channel, counters, { ...jobs, started: (sent) => accepted.set(id, sent) })
        )
        yield* Effect.raceFirst(Fiber.join(work), Effect.zipRight(lost, Effect.fail(lostError(config.address))))
        yield* Effect.logDebug(`channel ${id}: closed`)
      }).pipe(Effect.scoped)

    const threads = config.threads !== undefined && onThreads(transport, config.upgrade) ? config.threads : undefined
    const ownerOf = (id: number): Effect.Effect<void, ChannelFailure> =>
      threads === undefined
        ? resilient(id, attempt(id)).pipe(Effect.mapError(nameChannel(id)), Effect.annotateLogs("channel", id))
        : resilient(id, threadAttempt(threads, config, settingsOf, counters, id)).pipe(
          Effect.mapError((error) =>
            error._tag === "ThreadError"
              ? new MigrationError.ChannelError({ channel: id, cause: error })
              : nameChannel(id)(error)
          ),
          Effect.annotateLogs("channel", id)
        )
    for (let id = 0; id < channels; id++) yield* FiberSet.run(fibers, ownerOf(id))

    // in a fiber of its own, interruptible inside (`ownFibers`): run uninterruptibly (a finalizer, a store step's
    // commit), the set's failure that loses inherited that and never came, and the race waited for it for ever
    const guarded = <A, E>(effect: Effect.Effect<A, E>) => ownFibers(Effect.raceFirst(effect, failure))
    const all = guarded(Deferred.await(mailboxes))
    // the first failure shuts the idle queue: a `send` waiting for a channel then reports that failure
    // (cheaper than racing every batch against `failure`)
    yield* Effect.forkScoped(Effect.catchAllCause(FiberSet.join(fibers), () => Queue.shutdown(idle)))
    const takeIdle = Effect.catchAllCause(
      Queue.take(idle),
      (cause) => Cause.isInterruptedOnly(cause) ? failure : Effect.failCause(cause)
    )

    return {
      slots,
      batchPages: slots * PACKETS_PER_BATCH,
      send: (block, pages, count, window) => {
        if (window !== undefined && reconnect !== undefined) {
          return Effect.dieMessage("MultifdSend: a window's hand-off cannot be sent again after a re-attach (reconnect is on)")
        }
        const job: SendChannel.Job = { _tag: "Pages", block, pages, count, origin: window?.origin, sent: window?.sent }
        return Effect.flatMap(takeIdle, (channel) => Queue.offer(channel.mailbox, job))
      },
      sync: Effect.gen(function*() {
        const chans = yield* all
        const done = yield* Effect.forEach(chans, (channel) =>
          Effect.tap(Deferred.make<void>(), (done) =>
            Queue.offer(channel.mailbox, {
              _tag: "Sync",
              done: Effect.zipRight(
                Effect.logDebug(`channel ${channel.id}: sync packet sent`),
                Deferred.succeed(done, undefined)
              )
            })))
        yield* guarded(Effect.forEach(done, Deferred.await, { discard: true }))
      }).pipe(Effect.withSpan("multifd.sync")),
      finish: Effect.gen(function*() {
        const chans = yield* all
        finishing = true
        yield* Effect.forEach(chans, (channel) => Queue.offer(channel.mailbox, { _tag: "Finish" }), { discard: true })
        yield* guarded(FiberSet.awaitEmpty(fibers))
      }).pipe(Effect.withSpan("multifd.finish")),
      established: Effect.asVoid(all),
      failure,
      stats: Effect.sync(() => {
        for (const channel of accepted.values()) channel.update()
        return { ...SendChannel.totals(counters), reconnects, resentPages }
      }),
      acknowledged: Effect.sync(() => {
        acknowledgedRounds++
        for (const journal of journals) journal.entries = []
      })
    }
  })

/**
 * Whether channels can run in threads with this transport and upgrade: Node's transport (a wrapped one would
 * not see connections made in another thread) and no upgrade or `Tls.client`'s (which carries its data).
 */
const onThreads = (transport: Transport.Transport["Type"], upgrade: Config["upgrade"]): boolean =>
  transport.connect === Transport.connect && (upgrade === undefined || Tls.clientData(upgrade) !== undefined)

/**
 * A channel's connection in a thread of `threads`: the attempt holds the lease (the channel's session in the
 * thread, closed — its socket destroyed — when the attempt's scope closes), waits until the thread has
 * established the channel (connect, TLS, init packet), and only then enters the set and forks the worker,
 * which forwards the channel's jobs to the thread and waits for each answer. A re-attached channel leases a
 * new session for the same id. A thread that fails fails the channel.
 */
const threadAttempt = (
  threads: ChannelThreads.ChannelThreads["Type"],
  config: Config,
  settingsOf: (id: number) => SendChannel.Settings,
  counters: SendChannel.Counters,
  id: number
) => {
  const data = config.upgrade === undefined ? undefined : Tls.clientData(config.upgrade)
  // the thread's handshake gets the shorter of the TLS settings' timeout and the migration's
  const tls = data === undefined || config.handshakeTimeout === undefined
    ? data
    : {
      ...data,
      handshakeTimeoutMs: Math.min(data.handshakeTimeoutMs, Duration.toMillis(Duration.decode(config.handshakeTimeout)))
    }
  const connectTimeoutMs = config.connectTimeout === undefined
    ? undefined
    : Duration.toMillis(Duration.decode(config.connectTimeout))
  // every block handed to a thread, numbered in the order they came (a session gets each one's memory once)
  const blocks = new Map<Buffer, number>()
  const blockNumber = (block: SendChannel.Memory): number => {
    let n = blocks.get(block.bytes)
    if (n === undefined) {
      if (!(block.bytes.buffer instanceof SharedArrayBuffer)) {
        throw new Error(`MultifdSend on threads: block ${block.name} is not in shared memory (GuestRam.allocate)`)
      }
      n = blocks.size
      blocks.set(block.bytes, n)
    }
    return n
  }
  return (nonce: Uint8Array | undefined, enter: Effect.Effect<Jobs>, lost: Effect.Effect<void>) =>
    Effect.gen(function*() {
      const settings = { ...settingsOf(id), nonce }
      const data: SendSession.Data = {
        settings,
        address: config.address,
        connectTimeoutMs,
        tls,
        packetNum: counters.packetNum.buffer as SharedArrayBuffer,
        stats: counters.stats.buffer as SharedArrayBuffer
      }
      const session = yield* threads.open<SendSession.In, SendSession.Out>(SendSession.KIND, data)
      yield* Effect.logDebug(`channel ${id}: on channel thread ${session.thread}`)
      // the session's messages, read all along by one fiber: its end is heard whenever it comes — also while the
      // channel waits for a job (the destination closed the connection, `watchEnd`, with nothing left to write),
      // which no answer awaited, so that it was heard only at the next job, or never
      const answers = yield* Queue.unbounded<SendSession.Out>()
      const ended = yield* Deferred.make<void, ChannelFailure | ThreadError>()
      yield* Effect.forkScoped(Effect.gen(function*() {
        while (true) {
          const event = yield* session.receive
          if (event._tag === "Ended") {
            return yield* (event.failure === undefined
              ? Deferred.succeed(ended, undefined)
              : Deferred.fail(ended, failureOf(event.failure)))
          }
          yield* Queue.offer(answers, event.message)
        }
      }).pipe(Effect.catchAll((error) => Deferred.fail(ended, error))))
      /** The session's end before an answer: its failure (an end without one is the thread's defect). */
      const endedInstead = Effect.zipRight(Deferred.await(ended), Effect.fail(failureOf(undefined)))
      /** The session's next answer, which must be `tag`; its end instead is its failure. */
      const answer = (tag: SendSession.Out["_tag"]) =>
        Effect.flatMap(
          // (an answer that came before the end is taken first)
          Effect.flatMap(Queue.poll(answers), (ready) =>
            Option.isSome(ready) ? Effect.succeed(ready.value) : Effect.raceFirst(Queue.take(answers), endedInstead)),
          (message) =>
            message._tag === tag
              ? Effect.void
              : Effect.die(new Error(`multifd channel ${id}: its thread said ${message._tag}, not ${tag}`))
        )
      yield* answer("Established").pipe(
        Effect.withSpan("multifd.channel.establish", { attributes: { "multifd.channel": id, "multifd.thread": session.thread } })
      )
      const jobs = yield* enter
      // a new session gets each block's memory again
      const given = new Set<number>()
      const forward = Effect.gen(function*() {
        while (true) {
          const job = yield* jobs.next
          if (job._tag === "Finish") {
            yield* session.send({ _tag: "Finish" })
            yield* Deferred.await(ended)
            const extra = yield* Queue.poll(answers)
            if (Option.isSome(extra)) {
              return yield* Effect.die(new Error(`multifd channel ${id}: its thread said ${extra.value._tag} after Finish`))
            }
            return
          }
          if (job._tag === "Sync") {
            yield* session.send({ _tag: "Sync" })
            yield* answer("Synced")
            yield* job.done
            continue
          }
          const block = blockNumber(job.block)
          const first = !given.has(block)
          given.add(block)
          // the page numbers are copied (the caller may reuse its array), and the copy moved to the thread
          const pages = job.pages.slice(0, job.count)
          yield* session.send({
            _tag: "Pages",
            block,
            memory: first ? sharedBlock(job.block) : undefined,
            pages,
            origin: job.origin ?? 0,
            drain: job.sent !== undefined
          }, [pages.buffer])
          yield* answer("Idle")
          if (job.sent !== undefined) yield* job.sent
          yield* jobs.idle
        }
      })
      const work = yield* Effect.forkScoped(forward)

      // the thread may fail while the channel waits for a job: the owner hears it then too. The destination may
      // lose the connection whenever — also while the thread is blocked in a write on a path that silently drops
      // everything: the attempt ends, and closing its lease destroys the socket in the thread. A thread that died
      // meanwhile (closing its socket: the destination's loss) says so instead, once it did not answer: its
      // death is no lost connection
      const lostHere = Effect.zipRight(lost, Effect.zipRight(session.alive, Effect.fail(lostError(config.address))))
      // (its session's end with a failure while the channel waits for a job ends it too)
      const failedEnd = Effect.zipRight(Deferred.await(ended), Effect.never)
      yield* Effect.raceFirst(Fiber.join(work), Effect.raceFirst(Effect.raceFirst(session.failed, lostHere), failedEnd))
      yield* Effect.logDebug(`channel ${id}: closed`)
    }).pipe(Effect.scoped)
}

/** The destination said that the channel's connection broke. */
const lostError = (address: Transport.Address) =>
  new Transport.TransportError({
    reason: "Closed",
    address: Transport.formatAddress(address),
    detail: "the destination lost the connection"
  })

const sharedBlock = (block: SendChannel.Memory): SendSession.SharedBlock => ({
  name: block.name,
  buffer: block.bytes.buffer as SharedArrayBuffer,
  byteOffset: block.bytes.byteOffset,
  length: block.bytes.length
})

/** The error a channel's session in a thread ended with, rebuilt (it crossed as data). */
const failureOf = (failure: EncodedFailure | undefined): ChannelFailure | ThreadError => {
  if (failure === undefined || failure._tag === "Interrupted") {
    return new ThreadError({ reason: "Defect", detail: "its session in its thread ended before the channel did" })
  }
  if (failure._tag === "Defect") return new ThreadError({ reason: "Defect", detail: `its thread failed: ${failure.message}` })
  return decodeError(failure) ?? new ThreadError({ reason: "Defect", detail: `its thread failed: ${failure.message}` })
}

/** The errors a channel can fail with, from their data; `undefined` for another tag. */
const decodeError = (failure: Extract<EncodedFailure, { _tag: "Error" }>): ChannelFailure | undefined => {
  // the fields crossed as they were: each class gets back what it was made with
  const fields = failure.fields as never
  const cause = failure.cause?._tag === "Error" ? decodeError(failure.cause) : undefined
  switch (failure.tag) {
    case "TransportError":
      return new Transport.TransportError({ ...(fields as object), ...(cause ? { cause } : {}) } as never)
    case "TlsError":
      return new Tls.TlsError({ ...(fields as object), ...(cause ? { cause } : {}) } as never)
    case "CodecError":
      return new PageCodec.CodecError(fields)
    case "ProtocolError":
      return new Protocol.ProtocolError(fields)
    case "ChannelError":
      return cause === undefined ? undefined : new MigrationError.ChannelError({ ...(fields as object), cause } as never)
  }
  return undefined
}

/**
 * Names the channel an error came from (codec errors carry it themselves). The error wrapped is the one that was
 * failed with, not Effect's stand-in that carries the span it failed in.
 */
const nameChannel = (id: number) => (error: ChannelFailure): ChannelFailure =>
  error._tag === "CodecError" && error.channel === undefined
    ? new PageCodec.CodecError({ ...error, channel: id })
    : MigrationError.onChannel(id)(Cause.originalError(error))

/**
 * A layer with the source's channel set, established in the layer's scope.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (config: Config): Layer.Layer<MultifdSend, never, Transport.Transport> =>
  Layer.scoped(MultifdSend, make(config))
