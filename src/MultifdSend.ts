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
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as FiberSet from "effect/FiberSet"
import * as Layer from "effect/Layer"
import * as Queue from "effect/Queue"
import * as Ref from "effect/Ref"
import type * as Scope from "effect/Scope"
import * as Bandwidth from "./Bandwidth.js"
import type * as ChannelThreads from "./ChannelThreads.js"
import type * as GuestRam from "./GuestRam.js"
import * as SendChannel from "./internal/sendChannel.js"
import * as SendSession from "./internal/threads/sendSession.js"
import { type EncodedFailure, ThreadError } from "./internal/threads/protocol.js"
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
  /** Secures each channel (TLS) before its init packet; identity by default. */
  readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
  /**
   * Runs each channel in a thread of this pool: every block sent must then lie in shared memory
   * (`GuestRam.allocate`; another block is a defect). Used only with Node's transport (`Transport.layer`) and
   * an upgrade that is none or `Tls.client`'s (it carries its settings as data); with any other the channels
   * run in this thread, where a wrapped transport or upgrade sees them.
   */
  readonly threads?: ChannelThreads.ChannelThreads["Type"] | undefined
  /** One bandwidth limit for every channel (`Bandwidth.make`); none by default. */
  readonly maxBandwidth?: Bandwidth.Limit | undefined
}

/**
 * What can end a channel.
 *
 * @since 0.1.0
 * @category errors
 */
export type ChannelFailure = SendChannel.Failure

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
   * sends them as packets of up to `slots` pages; waits for an idle channel.
   */
  readonly send: (
    block: GuestRam.Block,
    pages: Uint32Array,
    count: number
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
}>() {}

interface Channel {
  readonly id: number
  readonly mailbox: Queue.Queue<SendChannel.Job>
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
    // the sockets of the channels in this thread, asked for what they accepted when the stats are read
    const accepted: Array<SendChannel.Accepted> = []
    const fibers = yield* FiberSet.make<void, ChannelFailure>()
    const failure = Effect.zipRight(FiberSet.join(fibers), Effect.never)
    const settingsOf = (id: number): SendChannel.Settings => ({
      id,
      uuid: config.uuid,
      pageSize,
      compression: config.compression,
      compressionLevel: config.compressionLevel,
      zeroPage: config.zeroPage,
      rateLimit: Bandwidth.sharedOf(config.maxBandwidth)
    })

    /** A channel is established: it joins the set (the set is complete once every channel has). */
    const join = (id: number) =>
      Effect.gen(function*() {
        const channel: Channel = { id, mailbox: yield* Queue.unbounded<SendChannel.Job>() }
        const ready = yield* Ref.updateAndGet(established, (all) => [...all, channel])
        if (ready.length === channels) yield* Deferred.succeed(mailboxes, ready)
        return channel
      })

    /**
     * A channel's owner in this thread: connect → upgrade (TLS) → init packet, then the worker, forked into
     * the owner's scope (which holds the connection) and joined. The owner's scope closes after its worker
     * has ended, and when the owner is interrupted it interrupts and awaits the worker before the connection
     * closes.
     */
    const owner = (id: number) =>
      Effect.gen(function*() {
        const settings = settingsOf(id)
        const channel = yield* SendChannel.establish(
          settings,
          transport.connect(config.address, { timeout: config.connectTimeout }),
          config.upgrade
        ).pipe(Effect.withSpan("multifd.channel.establish", { attributes: { "multifd.channel": id } }))
        const joined = yield* join(id)
        const work = yield* Effect.forkScoped(Effect.zipRight(
          Queue.offer(idle, joined),
          SendChannel.serve(settings, channel, counters, {
            next: Queue.take(joined.mailbox),
            idle: Queue.offer(idle, joined),
            started: (sent) => accepted.push(sent)
          })
        ))
        yield* Fiber.join(work)
        yield* Effect.logDebug(`channel ${id}: closed`)
      }).pipe(Effect.mapError(nameChannel(id)), Effect.scoped, Effect.annotateLogs("channel", id))

    const threads = config.threads !== undefined && onThreads(transport, config.upgrade) ? config.threads : undefined
    const ownerOf = threads === undefined ? owner : threadOwner(threads, config, settingsOf, counters, join, idle)
    for (let id = 0; id < channels; id++) yield* FiberSet.run(fibers, ownerOf(id))

    const guarded = <A, E>(effect: Effect.Effect<A, E>) => Effect.raceFirst(effect, failure)
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
      send: (block, pages, count) =>
        Effect.flatMap(takeIdle, (channel) => Queue.offer(channel.mailbox, { _tag: "Pages", block, pages, count })),
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
        yield* Effect.forEach(chans, (channel) => Queue.offer(channel.mailbox, { _tag: "Finish" }), { discard: true })
        yield* guarded(FiberSet.awaitEmpty(fibers))
      }).pipe(Effect.withSpan("multifd.finish")),
      established: Effect.asVoid(all),
      failure,
      stats: Effect.sync(() => {
        for (const channel of accepted) channel.update()
        return SendChannel.totals(counters)
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
 * The owner of a channel in a thread of `threads`: it holds the lease (the channel's session in the thread,
 * closed — its socket destroyed — when the owner's scope closes), waits until the thread has established the
 * channel (connect, TLS, init packet), and only then joins the set and forks the worker, which forwards the
 * channel's jobs to the thread and waits for each answer. A thread that fails fails the channel, naming it.
 */
const threadOwner = (
  threads: ChannelThreads.ChannelThreads["Type"],
  config: Config,
  settingsOf: (id: number) => SendChannel.Settings,
  counters: SendChannel.Counters,
  join: (id: number) => Effect.Effect<Channel>,
  idle: Queue.Queue<Channel>
) => {
  const tls = config.upgrade === undefined ? undefined : Tls.clientData(config.upgrade)
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
  return (id: number) =>
    Effect.gen(function*() {
      const settings = settingsOf(id)
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
      /** The session's next answer, which must be `tag`; its end instead is its failure. */
      const answer = (tag: SendSession.Out["_tag"]) =>
        Effect.flatMap(session.receive, (event) =>
          event._tag === "Ended"
            ? Effect.fail(failureOf(event.failure))
            : event.message._tag === tag
            ? Effect.void
            : Effect.die(new Error(`multifd channel ${id}: its thread said ${event.message._tag}, not ${tag}`)))
      yield* answer("Established").pipe(
        Effect.withSpan("multifd.channel.establish", { attributes: { "multifd.channel": id, "multifd.thread": session.thread } })
      )
      const channel = yield* join(id)
      const given = new Set<number>()
      const forward = Effect.gen(function*() {
        yield* Queue.offer(idle, channel)
        while (true) {
          const job = yield* Queue.take(channel.mailbox)
          if (job._tag === "Finish") {
            yield* session.send({ _tag: "Finish" })
            const end = yield* session.receive
            if (end._tag === "Ended" && end.failure === undefined) return
            return yield* end._tag === "Ended"
              ? Effect.fail(failureOf(end.failure))
              : Effect.die(new Error(`multifd channel ${id}: its thread said ${end.message._tag} after Finish`))
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
            pages
          }, [pages.buffer])
          yield* answer("Idle")
          yield* Queue.offer(idle, channel)
        }
      })
      const work = yield* Effect.forkScoped(forward)
      // the thread may fail while the channel waits for a job: the owner hears it then too
      yield* Effect.raceFirst(Fiber.join(work), session.failed)
      yield* Effect.logDebug(`channel ${id}: closed`)
    }).pipe(
      Effect.mapError((error) =>
        error._tag === "ThreadError" ? new MigrationError.ChannelError({ channel: id, cause: error }) : nameChannel(id)(error)
      ),
      Effect.scoped,
      Effect.annotateLogs("channel", id)
    )
}

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
