/**
 * A fault-injecting `Transport` for lifecycle tests (DESIGN §7): it wraps the real Node transport
 * (`Transport.layer`'s `connect` / `listen`), numbers every connect, and can
 *
 * - fail the k-th connect (connect #0 is a source's main channel, then its multifd channels in the order they
 *   call `connect` — they connect concurrently, so "connect #k" is not "channel k-1"; target a channel id with
 *   `cut.channel` or with the `upgrade` factories below, which see the channel id);
 * - stall a connect before it connects (interruptibly) until `release` (all) or `releaseOne(k)` is called;
 * - cut a connection after N written bytes: the first N bytes are handed to the kernel, then the socket is
 *   destroyed (mid-packet) and the write fails;
 * - record every connection opened (connected or accepted), its role (read off its first bytes: control
 *   magic, or the channel id of the multifd init packet), the bytes written and read, and whether it is closed.
 *
 * Tests wait on what is recorded with `until` (woken on every change: no sleeps, no polling timers).
 */
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as FiberId from "effect/FiberId"
import * as Layer from "effect/Layer"
import type * as Stream from "node:stream"
import * as Control from "../../src/Control.js"
import * as Protocol from "../../src/Protocol.js"
import * as Transport from "../../src/Transport.js"

/** What a connection turned out to be, from its first bytes. */
export type Role = "main" | "multifd" | number | "other"

/** One connection this transport opened (`connect`) or handed out (`accept`). */
export interface ConnectionRecord {
  readonly side: "connect" | "accept"
  /** Connect number (0 = the first connect of this transport) or accept number. */
  readonly index: number
  readonly peer: string
  readonly stream: Stream.Duplex
  /** `main` (control magic), a multifd channel id (`multifd` until the init packet was read), `other`. */
  readonly role: Role | undefined
  readonly bytesWritten: number
  readonly bytesRead: number
  /** Accepted side: whether the first `peek` has completed (either way). */
  readonly classified: boolean
  /** Whether this connection was cut by the fault plan. */
  readonly cut: boolean
  /** Whether the socket handle has been closed. */
  readonly closed: boolean
}

/** What happened to one `connect` call. */
export interface ConnectAttempt {
  readonly index: number
  readonly state: "connecting" | "stalled" | "failed" | "interrupted" | "connected"
}

/** Which faults to inject. */
export interface FaultPlan {
  /** Fails connect #k (before connecting) with the returned error. */
  readonly failConnect?: ((index: number) => Transport.TransportError | undefined) | undefined
  /** Stalls connect #k before it connects until `release` (interruptible). */
  readonly stallConnect?: ((index: number) => boolean) | undefined
  /**
   * Cuts one multifd channel after `afterBytes` written bytes (the 64-byte init packet included): the given
   * channel id, or without `channel` the first multifd channel whose writes cross `afterBytes`.
   */
  readonly cut?: { readonly channel?: number | undefined; readonly afterBytes: number } | undefined
  /**
   * Decides, write by write, whether to cut a multifd channel's connection (any number of times, each
   * connection at most once): the bytes of this write handed to the kernel before the cut (0 … `bytes`; all
   * of them: the write completes, then the connection is cut and the write fails), or `undefined` to let it
   * through. `connection`: how many connections of that channel came before; `packets`: the write's chunks
   * that begin a multifd packet (data or SYNC), each with where it starts in the write.
   */
  readonly cutWrite?: ((write: CutWrite) => number | undefined) | undefined
  /** Accepted connections read through the fiber (as TLS ones do): their `readChain` is hidden. */
  readonly noReadChain?: boolean | undefined
}

/** A write on a multifd channel's connection, for `FaultPlan.cutWrite`. */
export interface CutWrite {
  readonly channel: number
  readonly connection: number
  readonly bytesWritten: number
  readonly bytes: number
  readonly packets: ReadonlyArray<{ readonly at: number; readonly sync: boolean }>
}

/** The packets beginning in a write's chunks: a chunk that starts with the multifd magic (not the init packet). */
const packetsOf = (chunks: ReadonlyArray<Uint8Array>) => {
  const packets: Array<{ at: number; sync: boolean }> = []
  let at = 0
  for (const chunk of chunks) {
    if (chunk.length >= 12 && chunk.length !== Protocol.INIT_PACKET_SIZE) {
      const view = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength)
      if (view.readUInt32BE(0) === Protocol.MAGIC) packets.push({ at, sync: (view.readUInt32BE(8) & 1) === 1 })
    }
    at += chunk.length
  }
  return packets
}

export interface Faulty {
  /** The wrapped transport as a layer, for `migrate`. */
  readonly layer: Layer.Layer<Transport.Transport>
  /** The wrapped transport itself (its `listen` records accepted connections). */
  readonly transport: Transport.Transport["Type"]
  readonly attempts: ReadonlyArray<ConnectAttempt>
  readonly records: ReadonlyArray<ConnectionRecord>
  /** The record of a connection handed out by this transport. */
  readonly recordOf: (connection: Transport.Connection) => ConnectionRecord | undefined
  /** Lets every stalled (and future stalled) connect go on. */
  readonly release: Effect.Effect<void>
  /** Lets stalled connect #k go on (whether it is stalled yet or not). */
  readonly releaseOne: (index: number) => Effect.Effect<void>
  /** The channel id that was cut, once it was. */
  readonly cutChannel: Deferred.Deferred<number>
  /** Waits until `predicate` holds (checked now and after every recorded change). */
  readonly until: (predicate: (self: Faulty) => boolean) => Effect.Effect<void>
  /** Bytes read by accepted connections, all together. */
  readonly bytesAccepted: () => number
}

class Record implements ConnectionRecord {
  role: Role | undefined = undefined
  bytesWritten = 0
  bytesRead = 0
  classified = false
  cut = false
  /** Of the connections of its channel, which (0 = the first). */
  nth = 0
  constructor(
    readonly side: "connect" | "accept",
    readonly index: number,
    readonly peer: string,
    readonly stream: Stream.Duplex
  ) {}
  get closed(): boolean {
    return this.stream.closed
  }
}

const roleOfFirstWrite = (chunk: Uint8Array | undefined): Role => {
  if (chunk === undefined || chunk.length < 4) return "other"
  const magic = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength).readUInt32BE(0)
  if (magic === Control.MAGIC) return "main"
  if (magic === Protocol.MAGIC && chunk.length >= Protocol.INIT_PACKET_SIZE) return chunk[24]!
  return "other"
}

/** Builds a fault-injecting transport over the real one. */
export const make = (plan: FaultPlan = {}): Effect.Effect<Faulty> =>
  Effect.gen(function*() {
    const release = yield* Deferred.make<void>()
    const cutChannel = yield* Deferred.make<number>()
    const attempts: Array<{ index: number; state: ConnectAttempt["state"] }> = []
    const records: Array<Record> = []
    const byConnection = new WeakMap<Transport.Connection, Record>()
    const waiters = new Set<() => void>()
    const notify = () => {
      for (const w of Array.from(waiters)) w()
    }
    let connects = 0
    let accepts = 0
    let cutClaimed = false
    const perChannel = new Map<number, number>()
    const gates = new Map<number, Deferred.Deferred<void>>()
    const gate = (index: number) => {
      let g = gates.get(index)
      if (g === undefined) {
        g = Deferred.unsafeMake<void>(FiberId.none)
        gates.set(index, g)
      }
      return g
    }

    const wrap = (connection: Transport.Connection, record: Record): Transport.Connection => {
      records.push(record)
      connection.stream.once("close", notify)
      const counted = <A>(effect: Effect.Effect<A, Transport.TransportError>, n: number, after?: (a: A) => void) =>
        Effect.tap(effect, (a) =>
          Effect.sync(() => {
            record.bytesRead += n
            after?.(a)
            notify()
          }))
      const cutError = (at: number) =>
        new Transport.TransportError({
          reason: "Closed",
          address: connection.peer,
          detail: `connection cut after ${at} bytes (fault injection)`
        })
      const write = (chunks: ReadonlyArray<Uint8Array>): Effect.Effect<void, Transport.TransportError> =>
        Effect.suspend(() => {
          if (record.role === undefined) {
            record.role = roleOfFirstWrite(chunks[0])
            if (typeof record.role === "number") {
              record.nth = perChannel.get(record.role) ?? 0
              perChannel.set(record.role, record.nth + 1)
            }
          }
          const total = chunks.reduce((n, c) => n + c.length, 0)
          const keepOf = plan.cutWrite === undefined || typeof record.role !== "number" || record.cut
            ? undefined
            : plan.cutWrite({
              channel: record.role,
              connection: record.nth,
              bytesWritten: record.bytesWritten,
              bytes: total,
              packets: packetsOf(chunks)
            })
          const cut = keepOf !== undefined ? { afterBytes: record.bytesWritten + keepOf } : plan.cut
          const targeted = keepOf !== undefined || (cut !== undefined && typeof record.role === "number" && !cutClaimed &&
            (plan.cut?.channel === undefined || plan.cut.channel === record.role) &&
            record.bytesWritten + total > cut.afterBytes)
          if (!targeted) {
            return Effect.tap(connection.write(chunks), () =>
              Effect.sync(() => {
                record.bytesWritten += total
                notify()
              }))
          }
          if (keepOf === undefined) cutClaimed = true
          let keep = cut!.afterBytes - record.bytesWritten
          const prefix: Array<Uint8Array> = []
          for (const chunk of chunks) {
            if (keep <= 0) break
            prefix.push(chunk.length <= keep ? chunk : chunk.subarray(0, keep))
            keep -= Math.min(keep, chunk.length)
          }
          const channel = record.role as number
          return Effect.gen(function*() {
            if (prefix.length > 0) yield* connection.write(prefix)
            record.bytesWritten = cut!.afterBytes
            record.cut = true
            yield* Transport.destroy(connection.stream)
            yield* Deferred.succeed(cutChannel, channel)
            notify()
            return yield* cutError(cut!.afterBytes)
          })
        })
      const wrapped: Transport.Connection = {
        ...connection,
        write,
        read: (length) =>
          counted(connection.read(length), length, (bytes) => {
            if (record.role === "multifd" && length === Protocol.INIT_PACKET_SIZE) record.role = bytes[24]!
          }),
        readInto: (target, at, length) => counted(connection.readInto(target, at, length), length),
        readScatter: (target, offsets, count, length) =>
          counted(connection.readScatter(target, offsets, count, length), count * length),
        // every view filled counts as it is filled
        readChain: connection.readChain === undefined || (plan.noReadChain && record.side === "accept")
          ? undefined
          : (first, next) =>
          connection.readChain!(first, (full) => {
            record.bytesRead += full.length
            notify()
            return next(full)
          }),
        peek: (length) =>
          connection.peek(length).pipe(
            Effect.tap((bytes) =>
              Effect.sync(() => {
                if (!record.classified && record.role === undefined && length >= 4) {
                  const magic = bytes.readUInt32BE(0)
                  record.role = magic === Control.MAGIC ? "main" : magic === Protocol.MAGIC ? "multifd" : "other"
                }
              })
            ),
            Effect.ensuring(Effect.sync(() => {
              record.classified = true
              notify()
            }))
          )
      }
      byConnection.set(wrapped, record)
      notify()
      return wrapped
    }

    const connect: Transport.Transport["Type"]["connect"] = (address, options) =>
      Effect.suspend(() => {
        const index = connects++
        const attempt = { index, state: "connecting" as ConnectAttempt["state"] }
        attempts.push(attempt)
        const set = (state: ConnectAttempt["state"]) =>
          Effect.sync(() => {
            attempt.state = state
            notify()
          })
        const failure = plan.failConnect?.(index)
        const stall = plan.stallConnect?.(index) ?? false
        return Effect.gen(function*() {
          if (stall) {
            yield* set("stalled")
            yield* Effect.raceFirst(Deferred.await(release), Deferred.await(gate(index)))
            yield* set("connecting")
          }
          if (failure !== undefined) {
            yield* set("failed")
            return yield* failure
          }
          const connection = yield* Transport.connect(address, options)
          yield* set("connected")
          return wrap(connection, new Record("connect", index, connection.peer, connection.stream))
        }).pipe(
          Effect.onInterrupt(() => set("interrupted")),
          Effect.tapError(() => attempt.state === "failed" ? Effect.void : set("failed"))
        )
      })

    const listen: Transport.Transport["Type"]["listen"] = (address) =>
      Effect.map(Transport.listen(address), (listener) => ({
        address: listener.address,
        accept: Effect.map(
          listener.accept,
          (connection) => wrap(connection, new Record("accept", accepts++, connection.peer, connection.stream))
        )
      }))

    const transport: Transport.Transport["Type"] = { connect, listen }
    const self: Faulty = {
      layer: Layer.succeed(Transport.Transport, transport),
      transport,
      attempts,
      records,
      recordOf: (connection) => byConnection.get(connection),
      release: Effect.asVoid(Deferred.succeed(release, undefined)),
      releaseOne: (index) => Effect.asVoid(Deferred.succeed(gate(index), undefined)),
      cutChannel,
      until: (predicate) =>
        Effect.async<void>((resume) => {
          if (predicate(self)) return resume(Effect.void)
          const check = () => {
            if (predicate(self)) {
              waiters.delete(check)
              resume(Effect.void)
            }
          }
          waiters.add(check)
          return Effect.sync(() => waiters.delete(check))
        }),
      bytesAccepted: () => records.reduce((n, r) => (r.side === "accept" ? n + r.bytesRead : n), 0)
    }
    return self
  })

// ---------------------------------------------------------------------------------------------------------
// Upgrade hooks (the TLS hook of `migrate` / `incoming`), for handshake faults

type Upgrade = Transport.Upgrade<Transport.UpgradeError>

/** An upgrade hook that also remembers which connection it was called with for each channel. */
export type RecordingUpgrade = Upgrade & {
  /** Every call, in order: the channel id (or `main`), the connection it was given, when (`performance.now()`). */
  readonly calls: ReadonlyArray<{
    readonly channel: number | "main"
    readonly connection: Transport.Connection
    readonly at: number
  }>
}

const recording = (
  body: (connection: Transport.Connection, channel: number | "main", call: number) => ReturnType<Upgrade>
): RecordingUpgrade => {
  const calls: Array<{ channel: number | "main"; connection: Transport.Connection; at: number }> = []
  const upgrade: Upgrade = (connection, channel) =>
    Effect.suspend(() => {
      calls.push({ channel, connection, at: performance.now() })
      return body(connection, channel, calls.length - 1)
    })
  return Object.assign(upgrade, { calls })
}

/** The error `failHandshakeOn` fails with by default (shaped like a TLS error). */
export const handshakeError = (channel: number | "main"): Transport.UpgradeError => ({
  _tag: "TlsError",
  message: `TLS handshake failed on ${channel === "main" ? "the main channel" : `channel ${channel}`} (fault injection)`
})

/** Fails the handshake of the given channel (the others pass unchanged). */
export const failHandshakeOn = (
  channel: number | "main",
  error: Transport.UpgradeError = handshakeError(channel)
): RecordingUpgrade =>
  recording((connection, ch) => (ch === channel ? Effect.fail(error) : Effect.succeed(connection)))

/**
 * Drops the connection in the middle of the handshake of the matching channel: writes the first bytes of a
 * TLS ClientHello record, destroys the socket and fails with a `Reset` transport error. `which` is a channel
 * id, `main`, or a predicate over the channel and the call number (a destination calls the hook with `main`
 * for every accepted connection).
 */
export const dropMidHandshake = (
  which: number | "main" | ((channel: number | "main", call: number) => boolean)
): RecordingUpgrade =>
  recording((connection, channel, call) => {
    const hit = typeof which === "function" ? which(channel, call) : which === channel
    if (!hit) return Effect.succeed(connection)
    return Effect.gen(function*() {
      yield* Effect.ignore(connection.write([Buffer.from([0x16, 0x03, 0x01, 0x02])]))
      yield* Transport.destroy(connection.stream)
      return yield* new Transport.TransportError({
        reason: "Reset",
        address: connection.peer,
        detail: "connection dropped during the TLS handshake (fault injection)"
      })
    })
  })
