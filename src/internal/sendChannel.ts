/**
 * One source channel's work, wherever it runs: `establish` (connect → upgrade (TLS) → init packet → codec)
 * and `serve` (packets of the pages it is handed, SYNC packets, the graceful end). `MultifdSend` runs them in
 * this thread (its in-process path) or has a channel thread run them (`internal/threads/sendSession`), with the
 * same code: the counters they update live in shared memory (`Counters`), so that the channels of one set
 * share the packet number and the set reads its stats the same way on both paths.
 *
 * @internal
 */
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Schedule from "effect/Schedule"
import type * as Scope from "effect/Scope"
import type { Writable } from "node:stream"
import * as GuestRam from "../GuestRam.js"
import type * as MigrationError from "../MigrationError.js"
import * as PageCodec from "../PageCodec.js"
import * as Protocol from "../Protocol.js"
import type * as Transport from "../Transport.js"
import { TransportError } from "./native/connection.js"
import * as EventLoop from "./native/eventLoop.js"
import { RateLimit } from "./native/rateLimit.js"
import { unsent } from "./native/unsent.js"
import * as PeerText from "./peerText.js"
import { TlsError } from "./tls/model.js"

/** What can end a channel. */
export type Failure =
  | Transport.TransportError
  | Protocol.ProtocolError
  | MigrationError.ChannelError
  | PageCodec.CodecError
  | Transport.UpgradeError

/** How often a wait for the bandwidth limit looks whether the rate changed. */
const RECHECK_MS = 100

/**
 * Under a bandwidth limit a packet is written in pieces of this long's worth of bytes at the rate, each in its
 * own slot: the bytes flow steadily instead of a packet at once and then silence for the packet's time (at
 * 64 KiB/s a 512 KiB packet would leave the link quiet for 8 s, which a peer takes for a source gone silent).
 */
const PIECE_MS = 100

/** The smallest piece of a paced packet (a very low rate would otherwise write a few bytes at a time). */
const MIN_PIECE = 1024

/** What one channel needs to know (plain data: it crosses to a channel thread as is). */
export interface Settings {
  readonly id: number
  /** The migration's uuid (16 bytes), sent in the init packet. */
  readonly uuid: Uint8Array
  readonly pageSize: number
  readonly compression: Protocol.Compression
  readonly compressionLevel: number | undefined
  readonly zeroPage: "multifd" | "none"
  /**
   * Who the main channel's destination proved to be (`Connection.peerIdentity` of its TLS handshake: its certificate),
   * if it proved anyone: a channel whose handshake proves another is refused before its init packet, as a destination
   * refuses a channel of another peer than its main channel's.
   */
  readonly destination?: string | undefined
  /** A channel re-attaching after a lost connection: the nonce its init packet carries (`Control.Reattach`). */
  readonly nonce?: Uint8Array | undefined
  /** The migration's bandwidth limit (`RateLimit`'s shared memory), if any: every packet waits its turn. */
  readonly rateLimit?: SharedArrayBuffer | undefined
  /**
   * The destination's end of the connection is watched, and the connection is lost once the destination closed or
   * reset it (it never writes on a multifd channel), even while this side has nothing to write — a re-attaching
   * connection turned away before it was adopted, which no `Lost` message reports, went unnoticed until the peer
   * timeout; and so did, without re-attaching, a connection reset before its init packet arrived (the destination
   * took it for a stranger's and waited for the channel, the source for the flush's answer).
   */
  readonly watchEnd?: boolean | undefined
}

// ---------------------------------------------------------------------------------------------------------
// Counters in shared memory

/** The fields of a channel's counters, in order. */
const PACKETS = 0
const SYNCS = 1
const NORMAL_PAGES = 2
const ZERO_PAGES = 3
const BYTES = 4
const SENT_BYTES = 5
const SENT_PAGES = 6
const FIELDS = 7

/**
 * The counters of a channel set, in shared memory: the packet number all channels share (QEMU's packet_num,
 * taken with `Atomics.add`), and per channel its packets, pages and bytes, each written by its channel alone
 * (with `Atomics`, so that a reader in another thread never sees half a value).
 */
export interface Counters {
  readonly packetNum: BigInt64Array
  readonly stats: BigInt64Array
}

/** Zeroed counters for `channels` channels. */
export const makeCounters = (channels: number): Counters => ({
  packetNum: new BigInt64Array(new SharedArrayBuffer(8)),
  stats: new BigInt64Array(new SharedArrayBuffer(8 * FIELDS * channels))
})

/** The same counters seen from another thread (their memory as it crossed). */
export const countersOf = (packetNum: SharedArrayBuffer, stats: SharedArrayBuffer): Counters => ({
  packetNum: new BigInt64Array(packetNum),
  stats: new BigInt64Array(stats)
})

/** The set's totals. */
export const totals = (counters: Counters) => {
  const { stats } = counters
  const sum = (field: number) => {
    let n = 0
    for (let at = field; at < stats.length; at += FIELDS) n += Number(Atomics.load(stats, at))
    return n
  }
  const channelBytes: Array<number> = []
  for (let at = BYTES; at < stats.length; at += FIELDS) channelBytes.push(Number(Atomics.load(stats, at)))
  return {
    packets: sum(PACKETS),
    syncs: sum(SYNCS),
    normalPages: sum(NORMAL_PAGES),
    zeroPages: sum(ZERO_PAGES),
    bytes: sum(BYTES),
    sentBytes: sum(SENT_BYTES),
    sentPages: sum(SENT_PAGES),
    channelBytes
  }
}

/**
 * What one channel's socket has accepted: the bytes handed to the kernel (`bytesWritten` less what is not sent
 * yet, `native/unsent`: TLS included, both count what the caller wrote), and the pages of the packets that lie
 * entirely within them. `update` publishes them in the channel's counters.
 */
export class Accepted {
  /** Bytes given to the connection since the channel's work started (the position after the last packet). */
  position = 0
  /** Accepted bytes and pages (updated by `update`). */
  bytes = 0
  pages = 0
  // packets with pages not yet accepted: where each ends on the wire, and its pages
  private readonly ends: Array<number> = []
  private readonly counts: Array<number> = []
  private head = 0
  private readonly base: number
  // what the channel's earlier connections had accepted (a re-attached channel counts on from there)
  private readonly bytesBefore: bigint
  private readonly pagesBefore: bigint

  constructor(
    private readonly stream: Writable,
    private readonly stats: BigInt64Array,
    private readonly at: number
  ) {
    // what was written before the channel's work (the init packet) is not the channel's traffic
    this.base = this.written() ?? 0
    this.bytesBefore = Atomics.load(stats, at + SENT_BYTES)
    this.pagesBefore = Atomics.load(stats, at + SENT_PAGES)
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

  /** Catches up with the socket, and publishes what it accepted. */
  update(): void {
    // a stream destroyed before it finished discarded what it held: that was never accepted
    if (this.stream.destroyed && !this.stream.writableFinished) return
    const written = this.written()
    const given = written === undefined ? this.position : written - this.base
    // to the byte: a long write's progress counts before all of it has left (a slow link)
    const accepted = Math.min(this.position, given - unsent(this.stream))
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
    Atomics.store(this.stats, this.at + SENT_BYTES, this.bytesBefore + BigInt(this.bytes))
    Atomics.store(this.stats, this.at + SENT_PAGES, this.pagesBefore + BigInt(this.pages))
  }
}

// ---------------------------------------------------------------------------------------------------------
// The channel

/** Guest memory as a channel reads it: a block's name and bytes (a `GuestRam.Block` is one). */
export interface Memory {
  readonly name: string
  readonly bytes: Buffer
}

/** What a channel is asked to do. */
export type Job =
  | {
    readonly _tag: "Pages"
    readonly block: Memory
    readonly pages: Uint32Array
    readonly count: number
    /**
     * Where `block.bytes` starts in the block, in bytes (default 0): the memory is a window of the block (a
     * batch read from a file), and a page's offset on the wire is `origin + index × pageSize`.
     */
    readonly origin?: number | undefined
    /**
     * Runs once every byte of the hand-off has been handed to the kernel, before the channel is idle: the
     * memory may then be reused (a window's slot). Without it the memory must stay unchanged.
     */
    readonly sent?: Effect.Effect<void> | undefined
  }
  /** A SYNC packet after the pages before it; `done` runs once it was written. */
  | { readonly _tag: "Sync"; readonly done: Effect.Effect<void> }
  /** The graceful end: flush, TLS close_notify, FIN. */
  | { readonly _tag: "Finish" }

/** An established channel: its connection (secured, init packet written) and its encoder. */
export interface Established {
  readonly connection: Transport.Connection
  readonly codec: PageCodec.Encoder
}

/**
 * Connect → upgrade (TLS) → init packet → the codec, in the caller's scope (which holds the connection and
 * the codec's stream).
 */
export const establish = <E>(
  settings: Settings,
  connect: Effect.Effect<Transport.Connection, E, Scope.Scope>,
  upgrade: Transport.Upgrade<Transport.UpgradeError> | undefined
): Effect.Effect<Established, E | Transport.UpgradeError | Transport.TransportError | PageCodec.CodecError, Scope.Scope> =>
  Effect.gen(function*() {
    const id = settings.id
    const attributes = { "multifd.channel": id }
    const raw = yield* connect.pipe(Effect.withSpan("multifd.channel.connect", { attributes }))
    yield* Effect.logDebug(`channel ${id}: connected to ${raw.peer}`)
    const connection = upgrade === undefined ? raw : yield* upgrade(raw, id).pipe(
      Effect.withSpan("multifd.channel.handshake", { attributes }),
      Effect.tap(() => Effect.logDebug(`channel ${id}: TLS handshake done`))
    )
    // a name that resolves to several hosts, or a path that sends some connections elsewhere, reached another
    // destination the CA vouches for: it would have got this channel's pages, and the migration's uuid
    if (settings.destination !== undefined && connection.peerIdentity !== settings.destination) {
      return yield* new TlsError({
        reason: "Unauthorized",
        detail: `handshake with ${raw.peer}: another destination than the main channel's: ` +
          `${PeerText.fromPeer(connection.peerIdentity ?? "one that proved no identity")} ` +
          `(the main channel's: ${PeerText.fromPeer(settings.destination)})`
      })
    }
    yield* connection.write([Protocol.encodeInit({ uuid: settings.uuid, id, nonce: settings.nonce })]).pipe(
      Effect.withSpan("multifd.channel.init", { attributes })
    )
    yield* Effect.logDebug(`channel ${id}: init packet sent`)
    const codec = yield* PageCodec.encoder(settings.compression, settings.compressionLevel)
    return { connection, codec }
  })

/**
 * The channel's work: takes jobs from `next` until `Finish`, running `idle` after the packets of each hand-off
 * were given to the connection. What the socket accepted is published on every `update` of the returned
 * `Accepted` (`started` gets it first), at each hand-off's end, at each SYNC, at the end, and every
 * `publishEvery` if given (a channel in another thread, whose stats nobody can ask for synchronously).
 */
export const serve = (
  settings: Settings,
  { codec, connection }: Established,
  counters: Counters,
  jobs: {
    readonly next: Effect.Effect<Job, Failure>
    readonly idle: Effect.Effect<void>
    readonly started?: ((accepted: Accepted) => void) | undefined
    readonly publishEvery?: Duration.DurationInput | undefined
  }
): Effect.Effect<void, Failure> =>
  Effect.scoped(Effect.gen(function*() {
    const { pageSize } = settings
    const slots = Protocol.slotsFor(pageSize)
    const headerSize = Protocol.headerSize(pageSize)
    const flags = Protocol.compressionFlags(settings.compression)
    const offsets = new Float64Array(slots)
    const zeros = new Float64Array(slots)
    const chunks: Array<Uint8Array> = []
    const detectZeros = settings.zeroPage === "multifd"
    const { packetNum, stats } = counters
    const at = settings.id * FIELDS
    const sent = new Accepted(connection.stream, stats, at)
    jobs.started?.(sent)
    if (jobs.publishEvery !== undefined) {
      yield* Effect.forkScoped(Effect.repeat(Effect.sync(() => sent.update()), Schedule.spaced(jobs.publishEvery)))
    }
    const limit = settings.rateLimit === undefined ? undefined : RateLimit.attach(settings.rateLimit)
    /**
     * Reserves the limit's slot for `bytes` and gives the wait until it ends (`undefined`: go on at once).
     * The wait sleeps in short pieces, so that a change of the rate (a new generation) re-reserves at once.
     */
    const reserve = (bytes: number): Effect.Effect<void> | undefined => {
      if (limit === undefined) return undefined
      // the slot is timed from its reservation (not from when the wait starts, after the write), under the
      // rate in force when it was made
      let generation = limit.generation
      const first = limit.reserve(bytes)
      if (first <= 0) return undefined
      let deadline = performance.now() + first
      const step: Effect.Effect<void> = Effect.suspend(() => {
        if (limit.generation !== generation) {
          generation = limit.generation
          deadline = performance.now() + limit.reserve(bytes)
        }
        const left = deadline - performance.now()
        return left <= 0 ? Effect.void : Effect.zipRight(Effect.sleep(Duration.millis(Math.min(left, RECHECK_MS))), step)
      })
      return step
    }
    /**
     * Writes `views` (one packet) in pieces of `PIECE_MS` at the limit's rate, each written at the start of its
     * slot, the next waiting for the end of it; what is left goes at once if the limit is lifted meanwhile.
     */
    const writePaced = (views: ReadonlyArray<Uint8Array>) =>
      Effect.gen(function*() {
        let view = 0
        let offset = 0
        while (view < views.length) {
          const rate = limit!.rate
          const size = rate > 0 ? Math.max(MIN_PIECE, Math.floor(rate * PIECE_MS / 1000)) : Infinity
          // a new array a piece: a write may keep the one it was given until the bytes are out
          const piece: Array<Uint8Array> = []
          let bytes = 0
          while (view < views.length && bytes < size) {
            const v = views[view]!
            const take = Math.min(v.length - offset, size - bytes)
            piece.push(offset === 0 && take === v.length ? v : v.subarray(offset, offset + take))
            bytes += take
            offset += take
            if (offset === v.length) {
              view++
              offset = 0
            }
          }
          const wait = reserve(bytes)
          yield* connection.write(piece)
          if (wait !== undefined) yield* wait
        }
      })
    const count = (packets: number, normal: number, zero: number, bytes: number) => {
      Atomics.add(stats, at + PACKETS, BigInt(packets))
      if (normal > 0) Atomics.add(stats, at + NORMAL_PAGES, BigInt(normal))
      if (zero > 0) Atomics.add(stats, at + ZERO_PAGES, BigInt(zero))
      Atomics.add(stats, at + BYTES, BigInt(bytes))
    }
    /**
     * Appends one RAM packet of at most `slots` pages (zero pages as offsets only, with zeroPage multifd) to
     * `chunks`: its header, then the payload.
     */
    // the packet being made: its normal and zero pages (`offsets` holds the normal ones, then the zero ones)
    let normal = 0
    let zero = 0
    /** Sorts a packet's pages into normal and zero ones (`offsets`), and appends its header's buffer to `chunks`. */
    const start = (block: Memory, pages: Uint32Array): Buffer => {
      normal = 0
      zero = 0
      for (let i = 0; i < pages.length; i++) {
        const offset = pages[i]! * pageSize
        if (detectZeros && GuestRam.isZeroPage(block.bytes, offset, pageSize)) zeros[zero++] = offset
        else offsets[normal++] = offset
      }
      for (let i = 0; i < zero; i++) offsets[normal + i] = zeros[i]!
      // a header per packet: the connection may still hold the previous ones (writes do not copy)
      const header = Buffer.allocUnsafe(headerSize)
      chunks.push(header)
      return header
    }
    /** Writes the header of the packet `start` began, once its payload (`payloadSize` bytes) is in `chunks`. */
    const end = (block: Memory, origin: number, header: Buffer, payloadSize: number): void => {
      // the data was read from the window; the header says where the pages are in the block
      if (origin !== 0) for (let i = 0; i < normal + zero; i++) offsets[i] += origin
      Protocol.writeHeader(header, pageSize, {
        flags,
        pagesAlloc: slots,
        normalPages: normal,
        zeroPages: zero,
        nextPacketSize: payloadSize,
        packetNum: Atomics.add(packetNum, 0, 1n),
        block: block.name,
        offsets
      })
      count(1, normal, zero, headerSize + payloadSize)
      sent.position += headerSize + payloadSize
      sent.packet(normal + zero)
    }
    const encodeNow = codec.encodeNow
    // the packet is made when the effect runs, not when it is built: one suspension a packet, no generator
    const packet = (block: Memory, pages: Uint32Array, origin: number): Effect.Effect<void, PageCodec.CodecError> =>
      Effect.suspend(() => {
        const header = start(block, pages)
        if (encodeNow === undefined) {
          return Effect.map(
            codec.encode(block.bytes, offsets, normal, pageSize, chunks),
            (payloadSize) => end(block, origin, header, payloadSize)
          )
        }
        // a codec that encodes synchronously: the whole packet in one step
        const payloadSize = encodeNow(block.bytes, offsets, normal, pageSize, chunks)
        if (typeof payloadSize !== "number") return Effect.fail(payloadSize)
        end(block, origin, header, payloadSize)
        return Effect.void
      })
    /**
     * The packets of one hand-off: views of guest memory are written together (one vectored write);
     * compressed packets one by one as they are made (their buffers cost memory), and a codec that reuses
     * its output buffer waits until each has left.
     */
    const sendBatch = (block: Memory, pages: Uint32Array, total: number, origin: number) =>
      Effect.gen(function*() {
        chunks.length = 0
        for (let first = 0; first < total; first += slots) {
          const before = sent.position
          yield* packet(block, pages.subarray(first, Math.min(total, first + slots)), origin)
          if (limit !== undefined && limit.rate > 0) {
            // under a bandwidth limit: this packet alone, piece by piece at the rate
            yield* writePaced(chunks)
            if (codec.output === "reused") yield* connection.drained
            chunks.length = 0
            yield* EventLoop.cooperate
            continue
          }
          const wait = reserve(sent.position - before)
          if (codec.output !== "views" || wait !== undefined) {
            yield* connection.write(chunks)
            if (codec.output === "reused") yield* connection.drained
            chunks.length = 0
          }
          if (wait !== undefined) yield* wait
          // writes that the kernel takes at once never wait for the event loop: give it its turn
          yield* EventLoop.cooperate
        }
        if (chunks.length > 0) yield* connection.write(chunks)
      })
    // the destination's end of the connection, read (it writes nothing on it): its close (FIN) or reset fails the
    // channel; anything else that ends the reading (this side destroyed the stream) is the writes' to report
    const explainEnd = connection.explainEnd ?? ((error: TransportError) => error)
    const closedByPeer: Effect.Effect<never, TransportError> = Effect.matchEffect(connection.readSome(64 * 1024), {
      onFailure: (error) => error.reason === "Reset" ? Effect.fail(error) : Effect.never,
      onSuccess: (bytes) =>
        bytes.length > 0 ? closedByPeer : Effect.fail(
          explainEnd(new TransportError({ reason: "Closed", address: connection.peer, detail: "the destination closed the connection" }))
        )
    })
    const work = Effect.gen(function*() {
      while (true) {
        const job = yield* jobs.next
        if (job._tag === "Finish") {
          yield* connection.end
          sent.update()
          return
        }
        if (job._tag === "Sync") {
          // a header per packet: the connection may still hold the previous one (writes do not copy);
          // writeSync / writeHeader set every byte of it
          const header = Buffer.allocUnsafe(headerSize)
          Protocol.writeSync(header, pageSize, Atomics.add(packetNum, 0, 1n))
          yield* connection.write([header])
          Atomics.add(stats, at + SYNCS, 1n)
          count(1, 0, 0, headerSize)
          sent.position += headerSize
          sent.update()
          const wait = reserve(headerSize)
          if (wait !== undefined) yield* wait
          yield* job.done
          continue
        }
        // one hand-off carries several packets: the channel sends them in a row
        yield* sendBatch(job.block, job.pages, job.count, job.origin ?? 0)
        if (job.sent !== undefined) yield* Effect.zipRight(connection.drained, job.sent)
        sent.update()
        yield* jobs.idle
      }
    })
    return yield* (settings.watchEnd === true ? Effect.raceFirst(work, closedByPeer) : work)
  }))
