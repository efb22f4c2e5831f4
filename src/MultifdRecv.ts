/**
 * The destination's channel set. Connections classified as multifd are adopted: their init packet is
 * validated (uuid of this migration, id below the channel count, no duplicate) and only then is a worker
 * forked into the set. Workers validate every packet header before touching memory, write pages in place,
 * and stop at each SYNC until `sync` has seen all channels arrive. The first failure of any fiber is the
 * set's failure; closing the scope interrupts and awaits every fiber. Given `threads` and shared memory, a
 * compressed channel's payloads are decoded and written by its decode session there (`internal/recvDecode`).
 *
 * Longer than 400 lines on purpose: the worker's two read paths (the `readChain` pump, which reads and
 * decodes packets in the socket's read callback, and the fiber's loop for connections without it: wrapped
 * streams, test transports), the barrier and the stall watch share the set's counters and per-channel state,
 * and read best side by side.
 *
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as FiberSet from "effect/FiberSet"
import * as Layer from "effect/Layer"
import * as Queue from "effect/Queue"
import * as Ref from "effect/Ref"
import type * as Scope from "effect/Scope"
import type * as ChannelThreads from "./ChannelThreads.js"
import * as GuestRam from "./GuestRam.js"
import { ownFibers } from "./internal/native/ownFibers.js"
import * as RecvDecode from "./internal/recvDecode.js"
import * as MigrationError from "./MigrationError.js"
import * as PageCodec from "./PageCodec.js"
import * as Protocol from "./Protocol.js"
import * as Transfer from "./Transfer.js"
import * as Transport from "./Transport.js"

/**
 * How the destination's channels are checked.
 *
 * @since 0.1.0
 * @category models
 */
export interface Config {
  readonly channels: number
  /** The migration's uuid; `undefined` adopts the first channel's and requires the others to match (QEMU). */
  readonly uuid: Uint8Array | undefined
  readonly ram: GuestRam.GuestRam["Type"]
  readonly compression: Protocol.Compression
  /**
   * A channel that received part of a packet and then nothing for this long fails with a `Timeout` naming it
   * (default: no limit). With `reconnect`, so does a channel between packets that owes the round's SYNC and
   * receives nothing for this long (the source wrote its SYNCs and said Flush, or — unless `paced` — another
   * channel is at the barrier already): a path gone silent right after a whole packet, re-attached. Otherwise,
   * between packets and at a sync a channel may wait any time: the caller's own inactivity watch covers those.
   */
  readonly stallTimeout?: Duration.DurationInput | undefined
  /**
   * How long `adopt` waits for the init packet of a connection given without it (default 10 s, as
   * `Transfer.defaultTimeouts.handshake`): a connection that has not sent all 64 bytes by then fails `adopt`
   * with a `Timeout`.
   */
  readonly handshakeTimeout?: Duration.DurationInput | undefined
  /**
   * The source re-attaches lost channels (`authorize`): a channel whose connection breaks (reset, end, a
   * stall inside a packet) keeps its place this long instead of failing the set. Absent: it fails the set.
   */
  readonly reconnect?: Duration.DurationInput | undefined
  /** Told when an adopted channel's connection (the one with `nonce`, or the first) is lost (with `reconnect`). */
  readonly onLost?: ((channel: number, nonce: Uint8Array | undefined) => Effect.Effect<void>) | undefined
  /**
   * The source's channels wait for a bandwidth limit between packets (`Hello.paced`): a channel quiet between
   * packets while another is at the round's barrier is then no sign of a silent path (see `stallTimeout`).
   */
  readonly paced?: boolean | undefined
  /**
   * Channel threads that decompress the channels' compressed payloads and write their pages (and clear their
   * zero pages) in guest memory, when every block of `ram` is shared memory (`GuestRam.allocate`); the
   * sockets are still read here. Without them, or with other memory, this thread decodes.
   */
  readonly threads?: ChannelThreads.ChannelThreads["Type"] | undefined
}

/**
 * A channel inside a packet, and how many bytes of it arrived.
 *
 * @since 0.1.0
 * @category models
 */
export interface Unfinished {
  readonly channel: number
  readonly bytes: number
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
  | PageCodec.CodecError
  | MigrationError.ChannelError
  | MigrationError.MigrationError
  | RecvDecode.Failure

/**
 * Counters of what the channels received.
 *
 * @since 0.1.0
 * @category models
 */
export interface Stats {
  readonly channels: number
  readonly packets: number
  readonly syncs: number
  readonly normalPages: number
  readonly zeroPages: number
  /** Bytes read on the multifd channels (headers and payload). */
  readonly bytes: number
  /** Of `bytes`, those of each channel, by channel id. */
  readonly channelBytes: ReadonlyArray<number>
  /** Channels re-attached on a new connection. */
  readonly reattached: number
}

/**
 * The destination's channel set.
 *
 * @since 0.1.0
 * @category tags
 */
export class MultifdRecv extends Context.Tag("effect-multifd/MultifdRecv")<MultifdRecv, {
  /**
   * Reads (unless given: `init`, the 64 bytes already read; within `handshakeTimeout`) and validates a
   * connection's init packet, forks its worker and waits for it to end. Fails with a `ProtocolError` (the
   * connection is not adopted) when the init packet is not one of this migration's, with a `Timeout` when it
   * does not arrive in time.
   */
  readonly adopt: (connection: Transport.Connection, init?: Buffer) => Effect.Effect<void, ChannelFailure>
  /** Completes once every channel has been adopted. */
  readonly adopted: Effect.Effect<void, ChannelFailure>
  /** Waits until every channel has reached its next SYNC, then lets them all go on. */
  readonly sync: Effect.Effect<void, ChannelFailure>
  /**
   * The final round's `sync`: once every channel reached its SYNC the set is sealed before they go on, and any
   * later packet on any channel is a `ProtocolError` (`AfterEnd`) that writes nothing. The memory is then final:
   * what the digests see is what stays.
   */
  readonly finalSync: Effect.Effect<void, ChannelFailure>
  /**
   * Seals the set now against data packets (a SYNC may still come), for a source whose last flush is known only
   * after it (QEMU's RAM section ends after it). Yields the data packets that began writing since the last
   * barrier let the channels go (none, from a source whose last flush that was).
   */
  readonly seal: Effect.Effect<number>
  /** From now on, a channel that ends at a packet boundary has finished instead of failed. */
  readonly expectEnd: Effect.Effect<void>
  /** Waits until every channel has been adopted and has ended. */
  readonly finished: Effect.Effect<void, ChannelFailure>
  /** Fails with the first failure of any channel; never succeeds while the set is open. */
  readonly failure: Effect.Effect<never, ChannelFailure>
  readonly stats: Effect.Effect<Stats>
  /** Data packets that began writing memory (counted before their first byte is written). */
  readonly writesBegun: Effect.Effect<number>
  /** The uuid the channels carry (the first channel's, when the config left it open). */
  readonly uuid: Effect.Effect<Uint8Array | undefined>
  /** The channels that are inside a packet now (part of it arrived), for messages about a stall. */
  readonly unfinished: Effect.Effect<ReadonlyArray<Unfinished>>
  /**
   * The channels whose connection was lost and that have no new one yet (waiting for it to re-attach), in order,
   * for messages about a wait: such a channel carries nothing. One adopted counts in `Stats.channels`; one the source
   * announced to re-attach before any connection of it was adopted (its first turned away) does not.
   */
  readonly lost: Effect.Effect<ReadonlyArray<number>>
  /** How many channels have a connection now: adopted, and not lost (`lost`), for messages about a wait. */
  readonly connected: Effect.Effect<number>
  /**
   * The control channel announced that `channel` re-attaches with `nonce`: stops and awaits the channel's
   * current connection's worker (what it was inside of is dropped), and lets one connection whose init packet
   * carries `nonce` take its place. Yields the SYNC packets of the channel received so far, and an effect that
   * completes once the new connection is adopted, or once a later `authorize` of the channel superseded this one.
   * Fails with `Unauthorized` when the set does not re-attach.
   */
  readonly authorize: (
    channel: number,
    nonce: Uint8Array
  ) => Effect.Effect<{ readonly syncs: number; readonly adopted: Effect.Effect<void> }, Protocol.ProtocolError>
}>() {}

/** Where an adopted channel is in its stream, for the stall watch. */
interface ChannelState {
  readonly id: number
  readonly connection: Transport.Connection
  /** Bytes of the init packet and of every packet handled whole. */
  consumed: number
  /** Waiting at a SYNC for the other channels (its next packets may arrive meanwhile). */
  atSync: boolean
}

/** Bytes of a packet the channel has received but not finished: 0 between packets and at a sync. */
const unfinishedBytes = (state: ChannelState): number =>
  state.atSync ? 0 : Math.max(0, state.connection.received() - state.consumed)

/**
 * How the stall watch and the caller's messages describe a channel stuck inside a packet.
 *
 * @since 0.1.0
 * @category utils
 */
export const describeUnfinished = (u: Unfinished): string =>
  `multifd channel ${u.channel} is ${u.bytes} bytes into a packet`

/**
 * Fails once `state`'s channel has been inside a packet with nothing arriving and nothing handled for `after`
 * (sampled every quarter of it); never succeeds. With `owing` (a set whose lost channels re-attach), also once
 * it has been between packets that long while `owing` says a SYNC is owed (the source wrote every channel's
 * SYNC and the round's barrier waits): a path that went silent right after a whole packet, with nothing inside
 * one to notice. (A source held back by its bandwidth limit has written its SYNCs before it says Flush.)
 */
const watchStall = (state: ChannelState, after: Duration.Duration, owing?: () => boolean) =>
  Effect.gen(function*() {
    const step = Duration.unsafeDivide(after, 4)
    let last = { received: -1, consumed: -1 }
    let quiet = 0
    while (true) {
      yield* Effect.sleep(step)
      const now = { received: state.connection.received(), consumed: state.consumed }
      const bytes = unfinishedBytes(state)
      const waited = bytes > 0 || (owing !== undefined && !state.atSync && owing())
      quiet = waited && now.received === last.received && now.consumed === last.consumed ? quiet + 1 : 0
      last = now
      if (quiet === 4) {
        return yield* new MigrationError.MigrationError({
          reason: "Timeout",
          detail: `multifd channel ${state.id}: nothing arrived for ${Duration.format(after)}, ` +
            (bytes > 0 ? `${bytes} bytes into a packet` : "while the round waits for its sync packet")
        })
      }
    }
  })

/**
 * Builds the channel set in the current scope.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (config: Config): Effect.Effect<MultifdRecv["Type"], never, Scope.Scope> =>
  Effect.gen(function*() {
    const { channels, ram, compression } = config
    const stallTimeout = config.stallTimeout === undefined ? undefined : Duration.decode(config.stallTimeout)
    const handshakeTimeout = Duration.decode(config.handshakeTimeout ?? Transfer.defaultTimeouts.handshake)
    const pageSize = ram.pageSize
    const slots = Protocol.slotsFor(pageSize)
    const hsize = Protocol.headerSize(pageSize)
    // shared state first: released only after every fiber below has ended
    const uuid = yield* Ref.make(config.uuid)
    const claimed = yield* Ref.make<ReadonlySet<number>>(new Set())
    const arrivals = yield* Queue.unbounded<Deferred.Deferred<void>>()
    const ending = yield* Deferred.make<void>()
    const allAdopted = yield* Deferred.make<void>()
    const reconnect = config.reconnect === undefined ? undefined : Duration.decode(config.reconnect)
    // per channel: its worker's fiber now, the SYNC packets it received, the nonce a re-attaching connection
    // must carry (and who waits for it)
    const current = new Map<number, Fiber.RuntimeFiber<void, ChannelFailure>>()
    const syncsSeen = new Array<number>(channels).fill(0)
    const pending = new Map<number, { readonly nonce: Buffer; readonly adopted: Deferred.Deferred<void> }>()
    let reattached = 0
    // channels a re-attach was announced for (a connection for them without its nonce is turned away), and
    // the channels counted as adopted
    const replaced = new Set<number>()
    const counted = new Set<number>()
    // channels whose connection was lost (or announced to re-attach) and not replaced yet
    const lostNow = new Set<number>()
    // workers stopped for a re-attaching connection (their end is no failure)
    const stopped = new WeakSet<Fiber.RuntimeFiber<void, ChannelFailure>>()
    // counters, updated in synchronous steps (one thread): no Ref round trip per packet
    let writesBegun = 0
    // the final round's barrier passed (`finalSync`): a channel may only end now ("all"); or the source's
    // last flush is past (`seal`): no more data packets ("data")
    let sealed: "all" | "data" | undefined
    // `writesBegun` when the last barrier let the channels go
    let writesAtBarrier = 0
    const afterEnd = (channel: number) =>
      new Protocol.ProtocolError({
        reason: "AfterEnd",
        channel,
        field: "packet",
        detail: "a packet after the final round's sync packet (the transfer was complete; nothing was written)"
      })
    const counters: { -readonly [K in Exclude<keyof Stats, "channelBytes" | "reattached">]: Stats[K] } = {
      channels: 0,
      packets: 0,
      syncs: 0,
      normalPages: 0,
      zeroPages: 0,
      bytes: 0
    }
    const channelBytes = new Array<number>(channels).fill(0)
    const fibers = yield* FiberSet.make<void, ChannelFailure>()
    const failure = Effect.zipRight(FiberSet.join(fibers), Effect.never)
    // in a fiber of its own, interruptible inside (`ownFibers`): run uninterruptibly (a finalizer, a store step's
    // commit), the set's failure that loses inherited that and never came, and the race waited for it for ever
    const guarded = <A, E>(effect: Effect.Effect<A, E>) => ownFibers(Effect.raceFirst(effect, failure))
    const blockSize = (name: string) => ram.block(name)?.bytes.length
    // a compressed payload may exceed its pages a little (incompressible data); nothing legitimate is larger
    const maxPayload = slots * pageSize + 64 * 1024
    const states = new Set<ChannelState>()
    /**
     * Whether a channel not at the round's barrier owes its SYNC: the barrier is being waited for (`sync` runs,
     * counted in `barrierWaits`: the control channel's Flush came, which the source sends once every channel's
     * SYNC packet was written), or, from a source not held back by a bandwidth limit (`paced`), another channel
     * is at the barrier already.
     */
    let barrierWaits = 0
    const owesSync = (): boolean => {
      if (barrierWaits > 0) return true
      if (config.paced === true) return false
      for (const state of states) if (state.atSync) return true
      return false
    }
    // compressed payloads decoded on channel threads, which write the shared memory
    const offloaded = config.threads !== undefined && compression !== "none" && RecvDecode.canWrite(ram)
    /** A data packet's pages are in (or handed to its thread: `offload`): clears its zero pages and counts it. */
    const applied = (
      state: ChannelState,
      memory: Buffer,
      offsets: Float64Array,
      normal: number,
      zero: number,
      payload: number,
      offload: RecvDecode.Offload | undefined
    ) => {
      if (offload === undefined) for (let i = normal; i < normal + zero; i++) GuestRam.clearPage(memory, offsets[i]!, pageSize)
      state.consumed += hsize + payload
      counters.packets++
      counters.normalPages += normal
      counters.zeroPages += zero
      counters.bytes += hsize + payload
      channelBytes[state.id]! += hsize + payload
    }

    /** A SYNC packet arrived: waits at the barrier until every channel has one. */
    const atSync = (state: ChannelState) =>
      Effect.gen(function*() {
        const go = yield* Deferred.make<void>()
        // counted and at the barrier in one step (a re-attach reports the SYNCs that reached the barrier)
        yield* Effect.uninterruptible(Effect.suspend(() => {
          counters.packets++
          counters.syncs++
          counters.bytes += hsize
          channelBytes[state.id]! += hsize
          syncsSeen[state.id]!++
          state.consumed += hsize
          state.atSync = true
          return Queue.offer(arrivals, go)
        }))
        yield* Effect.logDebug(`channel ${state.id}: sync packet received`)
        yield* Deferred.await(go)
        state.atSync = false
      })

    /**
     * What ended a pump: a SYNC packet, the end of the stream (at a packet boundary, or inside a packet), a
     * header that failed validation, a payload that failed to decode.
     */
    type PumpStop =
      | { readonly _tag: "Sync" }
      | { readonly _tag: "End" }
      | { readonly _tag: "Cut" }
      | { readonly _tag: "Full" }
      | Protocol.ProtocolError
      | PageCodec.CodecError

    /**
     * Packets on a connection that reads straight into memory: one `readChain` reads header, payload, header,
     * … (the next view chosen as each one fills, in the read callback) with no trip through the fiber per
     * packet. Pages are written only after their header validated. Uncompressed: long runs of pages are read
     * in place; a packet of short runs (scattered pages) is read whole into `scratch` and copied out, one read
     * rather than one per run. Compressed: the payload is read into `scratch` and decoded there and then (a
     * millisecond or so a packet), by `payload`; or, given `offload`, read into the channel's ring and handed to
     * its thread, the pump stopping (`Full`) when the ring is.
     */
    const pump = (
      state: ChannelState,
      readChain: NonNullable<Transport.Connection["readChain"]>,
      header: Buffer,
      offsets: Float64Array,
      limits: Protocol.HeaderLimits,
      /** The channel's buffer for a packet's pages or payload (a packet's worth). */
      scratch: Buffer,
      payload: PageCodec.PayloadDecoder | undefined,
      offload: RecvDecode.Offload | undefined
    ): Effect.Effect<PumpStop, Transport.TransportError> =>
      Effect.suspend(() => {
        let stop: PumpStop | undefined
        let inPacket = false
        let memory: Buffer = header
        let block = ""
        let normal = 0
        let zero = 0
        let size = 0
        const views: Array<Uint8Array> = []
        let view = 0
        let staged: Buffer | undefined
        const endPacket = (): Buffer | undefined => {
          offload?.submit(block, offsets, normal, zero, size)
          applied(state, memory, offsets, normal, zero, size, offload)
          inPacket = false
          if (offload === undefined || offload.ready()) return header
          stop = { _tag: "Full" }
          return undefined
        }
        const next = (full: Uint8Array): Uint8Array | undefined => {
          if (full === header) {
            const decoded = sealed === "all" ? undefined : Protocol.decodeHeader(header, limits, offsets)
            if (decoded === undefined) {
              stop = afterEnd(state.id)
              return undefined
            }
            if (decoded._tag === "Left") {
              stop = decoded.left
              return undefined
            }
            const packet = decoded.right
            if (packet.sync) {
              stop = { _tag: "Sync" }
              return undefined
            }
            if (sealed !== undefined) {
              stop = afterEnd(state.id)
              return undefined
            }
            block = packet.block
            memory = ram.block(block)!.bytes
            normal = packet.normalPages
            zero = packet.zeroPages
            size = packet.nextPacketSize
            if (payload !== undefined) {
              const wrong = size > maxPayload ? tooLarge(state.id, size) : payload.check(size, normal, pageSize)
              if (wrong !== undefined) {
                stop = wrong
                return undefined
              }
            }
            writesBegun++
            if (normal === 0) return endPacket()
            inPacket = true
            staged = undefined
            if (payload !== undefined) {
              staged = (offload?.slot() ?? scratch).subarray(0, size)
              return staged
            }
            views.length = 0
            view = 0
            for (let i = 0; i < normal;) {
              const start = offsets[i]!
              let end = start + pageSize
              for (i++; i < normal && offsets[i] === end; i++) end += pageSize
              views.push(memory.subarray(start, end))
            }
            if (normal * pageSize / views.length < Transport.DIRECT_MIN) {
              staged = scratch.subarray(0, normal * pageSize)
              return staged
            }
            return views[view++]
          }
          if (staged !== undefined) {
            if (offload !== undefined) return endPacket()
            if (payload !== undefined) {
              const wrong = payload.decode(staged, memory, offsets, normal, pageSize)
              if (wrong !== undefined) {
                stop = wrong
                return undefined
              }
              return endPacket()
            }
            let at = 0
            for (const v of views) {
              v.set(staged.subarray(at, at + v.length))
              at += v.length
            }
            return endPacket()
          }
          return view < views.length ? views[view++] : endPacket()
        }
        return Effect.map(readChain(header, next), (completed): PumpStop => {
          if (completed) return stop!
          return inPacket ? { _tag: "Cut" } : { _tag: "End" }
        })
      })

    /** A payload larger than any packet's: refused before it is read. */
    const tooLarge = (channel: number, size: number) =>
      new Protocol.ProtocolError({
        reason: "BadPayload",
        channel,
        field: "next_packet_size",
        detail: `${size} exceeds the largest possible payload ${maxPayload}`
      })

    const worker = (state: ChannelState, payload: PageCodec.PayloadDecoder | undefined) =>
      Effect.gen(function*() {
        const { connection, id } = state
        const header = Buffer.alloc(hsize)
        const offsets = new Float64Array(slots)
        const limits: Protocol.HeaderLimits = { channel: id, pageSize, compression, blockSize }
        const offload = offloaded
          ? yield* RecvDecode.make(config.threads!, { ram, compression, channel: id, maxPayload, slots })
          : undefined
        const guard = <A, E>(effect: Effect.Effect<A, E>) => offload === undefined ? effect : offload.during(effect)
        // the channel's packets are all in memory (its thread has written them)
        const drained = offload === undefined ? Effect.void : offload.drained
        // a packet's pages (uncompressed, scattered) or its payload (compressed, decoded here)
        const scratch = Buffer.allocUnsafe(payload === undefined ? slots * pageSize : offload ? 0 : maxPayload)
        const channelEnded = Effect.gen(function*() {
          yield* drained
          if (yield* Deferred.isDone(ending)) return yield* Effect.logDebug(`channel ${id}: closed`)
          return yield* new MigrationError.MigrationError({
            reason: "ChannelClosed",
            detail: `multifd channel ${id}: the source closed the channel before the migration completed`
          })
        })
        const readChain = connection.readChain
        if (readChain !== undefined) {
          while (true) {
            const stop = yield* guard(pump(state, readChain, header, offsets, limits, scratch, payload, offload))
            if (stop._tag === "Full") yield* offload!.room
            else if (stop._tag === "Sync") yield* Effect.zipRight(drained, atSync(state))
            else if (stop._tag === "End") return yield* channelEnded
            else if (stop._tag === "Cut") {
              return yield* new Transport.TransportError({
                reason: "Closed",
                address: connection.peer,
                detail: "peer closed the connection inside a packet"
              })
            } else return yield* stop
          }
        }
        while (true) {
          if (yield* guard(connection.atEnd)) return yield* channelEnded
          yield* guard(connection.readInto(header, 0, hsize))
          if (sealed === "all") return yield* afterEnd(id)
          const packet = yield* Protocol.decodeHeader(header, limits, offsets)
          if (packet.sync) {
            yield* drained
            yield* atSync(state)
            continue
          }
          if (sealed !== undefined) return yield* afterEnd(id)
          const { nextPacketSize: size, normalPages: normal, zeroPages: zero } = packet
          if (size > maxPayload) return yield* tooLarge(id, size)
          const memory = ram.block(packet.block)!.bytes
          if (payload === undefined) {
            writesBegun++
            yield* connection.readScatter(memory, offsets, normal, pageSize)
          } else {
            const wrong = payload.check(size, normal, pageSize)
            if (wrong !== undefined) return yield* wrong
            writesBegun++
            if (offload !== undefined) {
              yield* offload.room
              if (normal > 0) yield* guard(connection.readInto(offload.slot(), 0, size))
              offload.submit(packet.block, offsets, normal, zero, size)
            } else if (normal > 0) {
              yield* connection.readInto(scratch, 0, size)
              const error = payload.decode(scratch.subarray(0, size), memory, offsets, normal, pageSize)
              if (error !== undefined) return yield* error
            }
          }
          applied(state, memory, offsets, normal, zero, size, offload)
        }
      }).pipe(Effect.scoped)

    const checkInit = (
      bytes: Buffer
    ): Effect.Effect<
      {
        readonly id: number
        readonly reattaching: Deferred.Deferred<void> | undefined
        readonly nonce?: Uint8Array | undefined
      },
      Protocol.ProtocolError
    > =>
      Effect.gen(function*() {
        const expected = yield* Ref.get(uuid)
        // an adopted uuid says only which channel came first, not whose channels are the migration's: another
        // uuid then is a conflict that fails the set (QEMU's own destination fails on a uuid not its -uuid),
        // never a stranger quietly turned away, or a stranger first would have QEMU's channels turned away
        const conflict = (e: Protocol.ProtocolError) =>
          config.uuid === undefined && e.reason === "BadUuid"
            ? new Protocol.ProtocolError({
              reason: "UuidConflict",
              channel: e.channel,
              field: "uuid",
              detail: `${e.detail} (adopted from the first channel): two sources' channels; give the uuid to expect ` +
                "(QEMU's -uuid: recv --uuid) to turn the other away"
            })
            : e
        const init = yield* Effect.mapError(Protocol.decodeInit(bytes, { channels, uuid: expected }), conflict)
        if (expected === undefined) {
          // adopt the first channel's uuid; a concurrent adopter may have set it first
          const settled = yield* Ref.modify(uuid, (u) => [u ?? init.uuid, u ?? init.uuid])
          yield* Effect.mapError(Protocol.decodeInit(bytes, { channels, uuid: settled }), conflict)
        }
        const allowed = pending.get(init.id)
        if (init.nonce !== undefined || allowed !== undefined || replaced.has(init.id)) {
          // a re-attaching connection: only with the nonce the main channel announced (a lost connection
          // that comes late, after its channel was re-attached or announced, is turned away too)
          if (allowed === undefined || init.nonce === undefined || !allowed.nonce.equals(init.nonce)) {
            return yield* new Protocol.ProtocolError({
              reason: "Unauthorized",
              channel: init.id,
              field: "nonce",
              detail: `a connection for channel ${init.id} without the main channel's authorization to re-attach it`
            })
          }
          pending.delete(init.id)
          yield* Ref.update(claimed, (set) => new Set([...set, init.id]))
          return { id: init.id, reattaching: allowed.adopted, nonce: init.nonce }
        }
        const fresh = yield* Ref.modify(claimed, (set) =>
          set.has(init.id) ? [false, set] : [true, new Set([...set, init.id])])
        if (!fresh) {
          return yield* new Protocol.ProtocolError({
            reason: "DuplicateChannel",
            channel: init.id,
            field: "channel id",
            detail: `a second connection claims channel ${init.id}`
          })
        }
        return { id: init.id, reattaching: undefined }
      })

    /** A lost connection (reset, end, a stall inside a packet): with reconnecting, the channel waits for its new one. */
    // (a TLS record that failed authentication is no loss: somebody tampers with the path, and it fails the set)
    const isLoss = (error: ChannelFailure): boolean =>
      Transport.isLostConnection(error) ||
      (error._tag === "MigrationError" && (error.reason === "ChannelClosed" || error.reason === "Timeout")) ||
      (error._tag === "ChannelError" && Transport.isLostConnection(error.cause))

    const adopt = (connection: Transport.Connection, init?: Buffer) =>
      Effect.gen(function*() {
        const { id, nonce, reattaching } = yield* Effect.gen(function*() {
          const checked = yield* checkInit(
            init ?? (yield* connection.read(Protocol.INIT_PACKET_SIZE).pipe(
              Effect.timeoutFail({
                duration: handshakeTimeout,
                onTimeout: () =>
                  MigrationError.timeout(`waiting for the multifd init packet of ${connection.peer}`, handshakeTimeout)
              })
            ))
          )
          const id = checked.id
          yield* Effect.annotateCurrentSpan("multifd.channel", id)
          yield* Effect.logDebug(
            `channel ${id}: init packet received from ${connection.peer}${checked.reattaching ? " (re-attaching)" : ""}`
          ).pipe(Effect.annotateLogs("channel", id))
          return checked
        }).pipe(Effect.withSpan("multifd.channel.init", { attributes: { "multifd.peer": connection.peer } }))
        const payload = compression === "none"
          ? undefined
          : offloaded
          ? RecvDecode.checkOnly(compression, id)
          : yield* PageCodec.payloadDecoder(compression, id)
        if (!counted.has(id)) {
          counted.add(id)
          if (++counters.channels === channels) yield* Deferred.succeed(allAdopted, undefined)
        }
        if (reattaching !== undefined) {
          // the lost connection's worker is stopped before this one reads anything
          yield* stop(id)
          reattached++
          lostNow.delete(id)
        }
        const state: ChannelState = { id, connection, consumed: Protocol.INIT_PACKET_SIZE, atSync: false }
        const watched = stallTimeout === undefined
          ? worker(state, payload)
          : Effect.raceFirst(worker(state, payload), watchStall(state, stallTimeout, reconnect === undefined ? undefined : owesSync))
        // a lost connection, with reconnecting: the channel keeps its place for the source's new connection
        // (`authorize` interrupts this wait), and fails as it would have if none comes in time. Once the end is
        // expected (the memory final, sealed by the last round's barrier) it carries nothing more: the channel
        // has ended, re-attaching or not (the main channel says how the migration ends: a source that fails says
        // Abort, one that heard Done says Bye). Without re-attaching, a reset there (a source's FIN or TLS
        // close_notify after Done turned into a RST on the way) failed this side while its source had succeeded
        const work = Effect.catchIf(
          watched,
          isLoss,
          (error) =>
            Effect.flatMap(Deferred.isDone(ending), (ended) =>
              ended
                ? Effect.logWarning(`channel ${id}: connection lost (${error.message}) after the last round: it has ended`)
                : reconnect === undefined
                ? Effect.fail(error)
                : Effect.gen(function*() {
                  yield* Effect.logWarning(`channel ${id}: connection lost (${error.message}); waiting for it to re-attach`)
                  lostNow.add(id)
                  // the source may have nothing to write, and not notice
                  if (config.onLost !== undefined) yield* config.onLost(id, nonce)
                  yield* Effect.sleep(reconnect)
                  return yield* Effect.fail(error)
                }))
        )
        const fiber = yield* FiberSet.run(
          fibers,
          Effect.acquireUseRelease(
            Effect.sync(() => states.add(state)),
            () => work.pipe(Effect.mapError(MigrationError.onChannel(id)), Effect.annotateLogs("channel", id)),
            () => Effect.sync(() => states.delete(state))
          )
        )
        current.set(id, fiber)
        if (reattaching !== undefined) yield* Deferred.succeed(reattaching, undefined)
        const exit = yield* Fiber.await(fiber)
        if (current.get(id) === fiber) current.delete(id)
        // a worker stopped for a re-attaching connection ended as it should
        if (Exit.isFailure(exit) && Cause.isInterruptedOnly(exit.cause) && stopped.has(fiber)) return
        yield* exit
      }).pipe(Effect.scoped)

    /** Interrupts and awaits the worker of `channel`'s current connection, if any (for its new one). */
    const stop = (channel: number) =>
      Effect.suspend(() => {
        const old = current.get(channel)
        if (old === undefined) return Effect.void
        stopped.add(old)
        return Fiber.interrupt(old)
      })

    const authorize = (channel: number, nonce: Uint8Array) =>
      Effect.gen(function*() {
        if (reconnect === undefined || channel >= channels) {
          return yield* new Protocol.ProtocolError({
            reason: "Unauthorized",
            channel,
            field: "Reattach",
            detail: reconnect === undefined
              ? "the source re-attaches a channel, but did not say it would in its hello"
              : `there is no channel ${channel}`
          })
        }
        const adopted = yield* Deferred.make<void>()
        // announced again before its connection came (the source's next attempt, with a new nonce): the earlier
        // one is superseded, and whoever waits for its connection stops (a source that announced re-attach after
        // re-attach had the destination wait for each one's connection, the whole re-attach window)
        const superseded = pending.get(channel)
        if (superseded !== undefined) yield* Deferred.succeed(superseded.adopted, undefined)
        pending.set(channel, { nonce: Buffer.from(nonce), adopted })
        replaced.add(channel)
        lostNow.add(channel)
        yield* stop(channel)
        yield* Effect.logInfo(`channel ${channel}: re-attaching after ${syncsSeen[channel]} sync packets`)
        return { syncs: syncsSeen[channel]!, adopted: Deferred.await(adopted) }
      })

    /** Every channel at its SYNC, then (`final`: sealed first) all let go on. */
    const barrier = (final: boolean) =>
      guarded(Effect.acquireUseRelease(
        Effect.sync(() => barrierWaits++),
        () =>
          Effect.gen(function*() {
            const waiting = yield* Effect.replicateEffect(Queue.take(arrivals), channels)
            writesAtBarrier = writesBegun
            if (final) sealed = "all"
            yield* Effect.forEach(waiting, (go) => Deferred.succeed(go, undefined), { discard: true })
          }),
        () => Effect.sync(() => barrierWaits--)
      )).pipe(Effect.withSpan("multifd.sync"))

    return {
      adopt,
      adopted: guarded(Deferred.await(allAdopted)),
      sync: barrier(false),
      finalSync: barrier(true),
      seal: Effect.sync(() => {
        sealed ??= "data"
        return writesBegun - writesAtBarrier
      }),
      expectEnd: Deferred.succeed(ending, undefined),
      finished: guarded(Effect.zipRight(Deferred.await(allAdopted), FiberSet.awaitEmpty(fibers))),
      failure,
      stats: Effect.sync(() => ({ ...counters, channelBytes: [...channelBytes], reattached })),
      authorize,
      writesBegun: Effect.sync(() => writesBegun),
      uuid: Ref.get(uuid),
      unfinished: Effect.sync(() =>
        Array.from(states, (state) => ({ channel: state.id, bytes: unfinishedBytes(state) }))
          .filter((u) => u.bytes > 0)
          .sort((a, b) => a.channel - b.channel)
      ),
      lost: Effect.sync(() => [...lostNow].sort((a, b) => a - b)),
      connected: Effect.sync(() => {
        let n = 0
        for (const id of counted) if (!lostNow.has(id)) n++
        return n
      })
    }
  })

/**
 * A layer with the destination's channel set.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (config: Config): Layer.Layer<MultifdRecv> => Layer.scoped(MultifdRecv, make(config))

/**
 * Whether an init-packet failure means "not part of this migration" (a stranger) rather than a broken source.
 *
 * @since 0.1.0
 * @category guards
 */
export const isStranger = (error: ChannelFailure): boolean =>
  error._tag === "ProtocolError" && (error.reason === "BadUuid" || error.reason === "Unauthorized" ||
    // an init packet's bad magic or version; the same reasons from an adopted channel's worker name its id
    (error.channel === "unidentified" && (error.reason === "BadMagic" || error.reason === "BadVersion")))

