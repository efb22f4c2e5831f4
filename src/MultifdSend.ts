/**
 * The source's channel set. Each channel has an owner, a fiber of the set: it connects, secures and announces
 * the channel (init packet), holding the connection in its own scope, and only then forks the channel's worker
 * into that scope and waits for it. Batches of pages go to whichever channel is idle; `sync` makes every
 * channel send a SYNC packet after its pending pages. The first failure of any channel is the set's failure;
 * closing the scope interrupts and awaits every owner, and each owner's scope its worker before the
 * connection closes. There is no liveness flag: a worker exists only while its owner holds the connection.
 *
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import type * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as FiberSet from "effect/FiberSet"
import * as Layer from "effect/Layer"
import * as Queue from "effect/Queue"
import * as Ref from "effect/Ref"
import type * as Scope from "effect/Scope"
import type { Writable } from "node:stream"
import * as EventLoop from "./internal/native/eventLoop.js"
import * as GuestRam from "./GuestRam.js"
import * as MigrationError from "./MigrationError.js"
import * as PageCodec from "./PageCodec.js"
import * as Protocol from "./Protocol.js"
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
}

/**
 * What can end a channel.
 *
 * @since 0.1.0
 * @category errors
 */
export type ChannelFailure =
  | Transport.TransportError
  | Protocol.ProtocolError
  | MigrationError.ChannelError
  | PageCodec.CodecError
  | Transport.UpgradeError

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

const emptyStats = { packets: 0, syncs: 0, normalPages: 0, zeroPages: 0, bytes: 0 }

/**
 * What one channel's socket has accepted: the bytes handed to the kernel (`bytesWritten - writableLength` of
 * a Node socket, TLS included: both count what the caller wrote), and the pages of the packets that lie
 * entirely within them.
 */
class Accepted {
  /** Bytes given to the connection since the worker started (the position after the last packet). */
  position = 0
  /** Accepted bytes and pages (updated by `update`). */
  bytes = 0
  pages = 0
  // packets with pages not yet accepted: where each ends on the wire, and its pages
  private readonly ends: Array<number> = []
  private readonly counts: Array<number> = []
  private head = 0
  private readonly base: number

  constructor(private readonly stream: Writable) {
    // what was written before the worker (the init packet) is not the channel's traffic
    this.base = this.written() ?? 0
  }

  /** Total bytes written to the stream, accepted or buffered (`undefined` for a stream that does not say). */
  private written(): number | undefined {
    const n = (this.stream as { readonly bytesWritten?: unknown }).bytesWritten
    return typeof n === "number" ? n : undefined
  }

  /** Records a packet of `pages` pages that ends at `position`. */
  packet(pages: number): void {
    if (pages === 0) return
    this.ends.push(this.position)
    this.counts.push(pages)
    // a channel that nobody asks about still keeps only what is in flight
    if (this.ends.length - this.head > 1024) this.update()
  }

  /** Catches up with the socket. */
  update(): void {
    const written = this.written()
    const given = written === undefined ? this.position : written - this.base
    const accepted = Math.min(this.position, given - this.stream.writableLength)
    if (accepted > this.bytes) this.bytes = accepted
    while (this.head < this.ends.length && this.ends[this.head]! <= this.bytes) {
      this.pages += this.counts[this.head]!
      this.head++
    }
    if (this.head > 256 && this.head * 2 > this.ends.length) {
      this.ends.splice(0, this.head)
      this.counts.splice(0, this.head)
      this.head = 0
    }
  }
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

type Job =
  | { readonly _tag: "Pages"; readonly block: GuestRam.Block; readonly pages: Uint32Array; readonly count: number }
  | { readonly _tag: "Sync"; readonly done: Deferred.Deferred<void> }
  | { readonly _tag: "Finish" }

interface Channel {
  readonly id: number
  readonly mailbox: Queue.Queue<Job>
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
    // counters, updated in synchronous steps (one thread): no Ref round trip per packet
    let packetNum = 0n
    const counters = { ...emptyStats }
    const channelBytes = new Array<number>(channels).fill(0)
    // every channel's socket, for the bytes and pages really sent
    const accepted: Array<Accepted> = []
    const fibers = yield* FiberSet.make<void, ChannelFailure>()
    const failure = Effect.zipRight(FiberSet.join(fibers), Effect.never)

    const worker = (channel: Channel, connection: Transport.Connection, codec: PageCodec.Encoder) =>
      Effect.gen(function*() {
        const headerSize = Protocol.headerSize(pageSize)
        const offsets = new Float64Array(slots)
        const zeros = new Float64Array(slots)
        const chunks: Array<Uint8Array> = []
        const detectZeros = config.zeroPage === "multifd"
        const sent = new Accepted(connection.stream)
        accepted.push(sent)
        /**
         * Appends one RAM packet of at most `slots` pages (zero pages as offsets only, with zeroPage
         * multifd) to `chunks`: its header, then the payload.
         */
        const packet = (block: GuestRam.Block, pages: Uint32Array) =>
          Effect.gen(function*() {
            let normal = 0
            let zero = 0
            for (let i = 0; i < pages.length; i++) {
              const offset = pages[i]! * pageSize
              if (detectZeros && GuestRam.isZeroPage(block.bytes, offset, pageSize)) zeros[zero++] = offset
              else offsets[normal++] = offset
            }
            for (let i = 0; i < zero; i++) offsets[normal + i] = zeros[i]!
            // a header per packet: the connection may still hold the previous ones (writes do not copy)
            const header = Buffer.allocUnsafe(headerSize)
            chunks.push(header)
            const payloadSize = yield* codec.encode(block.bytes, offsets, normal, pageSize, chunks)
            Protocol.writeHeader(header, pageSize, {
              flags: Protocol.compressionFlags(config.compression),
              pagesAlloc: slots,
              normalPages: normal,
              zeroPages: zero,
              nextPacketSize: payloadSize,
              packetNum: packetNum++,
              block: block.name,
              offsets
            })
            counters.packets++
            counters.normalPages += normal
            counters.zeroPages += zero
            counters.bytes += headerSize + payloadSize
            channelBytes[channel.id]! += headerSize + payloadSize
            sent.position += headerSize + payloadSize
            sent.packet(normal + zero)
          })
        /**
         * The packets of one hand-off: views of guest memory are written together (one vectored write);
         * compressed packets one by one as they are made (their buffers cost memory), and a codec that reuses
         * its output buffer waits until each has left.
         */
        const sendBatch = (block: GuestRam.Block, pages: Uint32Array, count: number) =>
          Effect.gen(function*() {
            chunks.length = 0
            for (let first = 0; first < count; first += slots) {
              yield* packet(block, pages.subarray(first, Math.min(count, first + slots)))
              if (codec.output !== "views") {
                yield* connection.write(chunks)
                if (codec.output === "reused") yield* connection.drained
                chunks.length = 0
              }
              // writes that the kernel takes at once never wait for the event loop: give it its turn
              yield* EventLoop.cooperate
            }
            if (chunks.length > 0) yield* connection.write(chunks)
          })
        yield* Queue.offer(idle, channel)
        while (true) {
          const job = yield* Queue.take(channel.mailbox)
          if (job._tag === "Finish") {
            yield* connection.end
            return yield* Effect.logDebug(`channel ${channel.id}: closed`)
          }
          if (job._tag === "Sync") {
            // a header per packet: the connection may still hold the previous one (writes do not copy);
            // writeSync / writeHeader set every byte of it
            const header = Buffer.allocUnsafe(headerSize)
            Protocol.writeSync(header, pageSize, packetNum++)
            yield* connection.write([header])
            counters.packets++
            counters.syncs++
            counters.bytes += headerSize
            channelBytes[channel.id]! += headerSize
            sent.position += headerSize
            yield* Effect.logDebug(`channel ${channel.id}: sync packet sent`)
            yield* Deferred.succeed(job.done, undefined)
            continue
          }
          // one hand-off carries several packets: the channel sends them in a row
          yield* sendBatch(job.block, job.pages, job.count)
          yield* Queue.offer(idle, channel)
        }
      })

    /**
     * A channel's owner: connect → upgrade (TLS) → init packet, then the worker, forked into the owner's scope
     * (which holds the connection) and joined. The owner's scope closes after its worker has ended, and when
     * the owner is interrupted it interrupts and awaits the worker before the connection closes.
     */
    const establish = (id: number) =>
      Effect.gen(function*() {
        const attributes = { "multifd.channel": id }
        const raw = yield* transport.connect(config.address, { timeout: config.connectTimeout }).pipe(
          Effect.withSpan("multifd.channel.connect", { attributes })
        )
        yield* Effect.logDebug(`channel ${id}: connected to ${Transport.formatAddress(config.address)}`)
        const connection = config.upgrade === undefined ? raw : yield* config.upgrade(raw, id).pipe(
          Effect.withSpan("multifd.channel.handshake", { attributes }),
          Effect.tap(() => Effect.logDebug(`channel ${id}: TLS handshake done`))
        )
        yield* connection.write([Protocol.encodeInit({ uuid: config.uuid, id })]).pipe(
          Effect.withSpan("multifd.channel.init", { attributes })
        )
        yield* Effect.logDebug(`channel ${id}: init packet sent`)
        return connection
      }).pipe(Effect.withSpan("multifd.channel.establish", { attributes: { "multifd.channel": id } }))

    const owner = (id: number) =>
      Effect.gen(function*() {
        const connection = yield* establish(id)
        const codec = yield* PageCodec.encoder(config.compression, config.compressionLevel)
        const channel: Channel = { id, mailbox: yield* Queue.unbounded<Job>() }
        const ready = yield* Ref.updateAndGet(established, (all) => [...all, channel])
        if (ready.length === channels) yield* Deferred.succeed(mailboxes, ready)
        const work = yield* Effect.forkScoped(worker(channel, connection, codec))
        yield* Fiber.join(work)
      }).pipe(Effect.mapError(nameChannel(id)), Effect.scoped, Effect.annotateLogs("channel", id))

    for (let id = 0; id < channels; id++) yield* FiberSet.run(fibers, owner(id))

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
          Effect.tap(Deferred.make<void>(), (done) => Queue.offer(channel.mailbox, { _tag: "Sync", done })))
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
        let sentBytes = 0
        let sentPages = 0
        for (const channel of accepted) {
          channel.update()
          sentBytes += channel.bytes
          sentPages += channel.pages
        }
        return { ...counters, sentBytes, sentPages, channelBytes: [...channelBytes] }
      })
    }
  })

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
