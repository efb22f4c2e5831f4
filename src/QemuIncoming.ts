/**
 * A destination that an unmodified QEMU (10.x) can migrate to: `migrate` with capability `multifd` on and
 * `multifd-channels` N, to our listener. It accepts QEMU's main channel (first bytes `QEVM`) and its N
 * multifd channels (told apart by their first 4 bytes, as QEMU 8.1+ does), learns the RAM blocks from the main
 * stream, applies the multifd packets into guest memory, follows every `MULTIFD_FLUSH` with a sync of the
 * channels (QEMU sends one SYNC packet per channel per flush), drains the device state after the RAM section,
 * and returns the memory once the main stream ended as a complete stream ends and QEMU closed its channels.
 *
 * QEMU announces neither its channel count nor its compression: both must be given (`multifd-channels`,
 * `multifd-compression`). QEMU's precopy has no acknowledgement without a return path, so QEMU reports
 * `completed` as soon as it sent everything; this side fails (and QEMU never learns) when anything is wrong.
 *
 * No wait outlasts `timeouts.peer` of silence: the main channel and the channels between packets share one
 * inactivity watch (any byte anywhere is progress: QEMU may legitimately leave one of them quiet while it feeds
 * the others), a channel inside a packet has its own (QEMU writes a packet whole), the first bytes and the TLS
 * handshake of a connection have their timeouts, and so does QEMU closing its channels after the main stream
 * ended. A stall ends in a `Timeout` that names what was awaited, never in a wait for QEMU to close.
 *
 * Everything runs in one scope, as `Migration.incoming`: when `incoming` returns (success, failure or
 * interruption) every fiber has ended and every connection is closed.
 *
 * @since 0.1.0
 */
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Schedule from "effect/Schedule"
import type * as Scope from "effect/Scope"
import * as GuestRam from "./GuestRam.js"
import * as Acceptor from "./internal/acceptor.js"
import { RecentRate } from "./internal/rate.js"
import { unlessStalled, within } from "./internal/stall.js"
import type * as Migration from "./Migration.js"
import * as MigrationError from "./MigrationError.js"
import * as MultifdRecv from "./MultifdRecv.js"
import type * as MultifdSend from "./MultifdSend.js"
import * as Protocol from "./Protocol.js"
import * as QemuStream from "./QemuStream.js"
import * as Tls from "./Tls.js"
import * as Transport from "./Transport.js"

/** How the destination expects QEMU to migrate. */
export interface Options {
  /** QEMU's `multifd-channels` (1–255). */
  readonly channels: number
  /** QEMU's `multifd-compression` (default `none`); QEMU does not announce it. */
  readonly compression?: Protocol.Compression | undefined
  /**
   * Memory to receive into: its layout must equal the RAM blocks QEMU announces (names, sizes, page size).
   * Without it, memory of QEMU's layout is allocated, up to `maxRamBytes`.
   */
  readonly ram?: GuestRam.GuestRam["Type"] | undefined
  /** Largest total memory QEMU may make this destination allocate when `ram` is not given (default 16 GiB). */
  readonly maxRamBytes?: number | undefined
  /** Target page size when the stream does not say (default 4096, as x86). */
  readonly pageSize?: number | undefined
  /**
   * The uuid the multifd channels must carry (QEMU's `-uuid`, zeros by default). Without it the first
   * channel's is adopted (or the one the configuration record carries) and the others must match.
   */
  readonly uuid?: Uint8Array | undefined
  /** QEMU's `multifd-flush-after-each-section` (machine types before 7.2): every EOS word is a flush too. */
  readonly flushAfterEachSection?: boolean | undefined
  readonly timeouts?: Partial<Migration.Timeouts> | undefined
  /** How long to wait for QEMU to connect at all (default: for ever). */
  readonly acceptTimeout?: Duration.DurationInput | undefined
  /**
   * TLS as QEMU's `tls-creds` on the source: every accepted connection is secured (TLS server side) before it
   * is classified, with handshakes that send QEMU nothing it would leave unread (`Tls.ServerOptions`).
   */
  readonly tls?: Tls.Settings | undefined
  /**
   * Secures every accepted connection before it is classified, when `tls` is not given (tests inject faults
   * here). It must send nothing after its handshake: QEMU never reads its migration channels, and a peer that
   * closes with unread bytes resets the connection, losing the end of what it sent.
   */
  readonly upgrade?: Transport.Upgrade<MultifdSend.ChannelFailure> | undefined
  /** Called about ten times a second once the RAM blocks are known (`doneBytes` counts pages received). */
  readonly onProgress?: ((progress: Migration.Progress) => Effect.Effect<void>) | undefined
}

/** What QEMU's main stream said, beside the generic migration stats. */
export interface QemuDetails {
  /** QEMU's machine type, from the configuration record. */
  readonly machine: string | undefined
  /** QEMU's `-uuid` as the configuration record carries it (only with `x-validate-uuid`). */
  readonly configurationUuid: string | undefined
  readonly blocks: ReadonlyArray<QemuStream.RamBlock>
  /** `MULTIFD_FLUSH` words followed (each one a sync of every channel). */
  readonly flushes: number
  /** Pages the main channel carried itself (`zero-page-detection=legacy`). */
  readonly mainZeroPages: number
  readonly mainNormalPages: number
  readonly commands: ReadonlyArray<string>
  /** Bytes of the main stream in all, and of the device state drained after the RAM section. */
  readonly mainBytes: number
  readonly deviceStateBytes: number
  /** Devices in the stream's trailing description, when QEMU sent one. */
  readonly devices: number | undefined
}

/** What a received QEMU migration did. */
export interface Stats extends Migration.Stats {
  readonly qemu: QemuDetails
}

/** What the destination received. */
export interface Incoming {
  readonly ram: GuestRam.GuestRam["Type"]
  readonly stats: Stats
  /** Connections that were turned away (strangers, foreign uuids, a second main channel), each with the reason. */
  readonly rejected: ReadonlyArray<string>
}

/** Everything the destination can fail with. */
export type IncomingError =
  | QemuStream.QemuStreamError
  | MultifdRecv.ChannelFailure
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | GuestRam.GuestRamError

/** Default cap on memory QEMU may make the destination allocate. */
export const DEFAULT_MAX_RAM = 16 * 1024 * 1024 * 1024

const GIB = 1024 * 1024 * 1024

const defaultTimeouts: Migration.Timeouts = {
  connect: Duration.seconds(10),
  handshake: Duration.seconds(10),
  peer: Duration.seconds(30)
}

const describeLayout = (layout: ReadonlyArray<QemuStream.RamBlock>) => layout.map((b) => `${b.name}=${b.size}`).join(", ")

/** Why the memory given (or the allocation cap) cannot take QEMU's blocks, if it cannot. */
const checkLayout = (
  blocks: ReadonlyArray<QemuStream.RamBlock>,
  pageSize: number,
  options: Options
): string | undefined => {
  const ram = options.ram
  if (ram === undefined) {
    const total = blocks.reduce((n, b) => n + b.size, 0)
    const max = options.maxRamBytes ?? DEFAULT_MAX_RAM
    return total > max ? `QEMU's ${total} bytes of RAM exceed this destination's limit of ${max}` : undefined
  }
  if (ram.pageSize !== pageSize) return `QEMU's page size ${pageSize} differs from the destination's ${ram.pageSize}`
  const mine = GuestRam.layoutOf(ram)
  if (mine.length !== blocks.length || mine.some((b, i) => b.name !== blocks[i]!.name || b.size !== blocks[i]!.size)) {
    return `QEMU's RAM blocks [${describeLayout(blocks)}] differ from the destination's [${describeLayout(mine)}]`
  }
  return undefined
}

/**
 * Receives one QEMU migration on `listener`. Connections that are not part of it (strangers, channels with
 * another uuid, a second main channel) are closed and reported in `rejected` without failing the migration.
 */
export const incoming = (
  listener: Transport.Listener,
  options: Options
): Effect.Effect<Incoming, IncomingError> =>
  Effect.scoped(Effect.gen(function*() {
    const timeouts: Migration.Timeouts = { ...defaultTimeouts, ...options.timeouts }
    const channels = options.channels
    const compression = options.compression ?? "none"
    if (!Number.isInteger(channels) || channels < 1 || channels > 255) {
      return yield* new MigrationError.MigrationError({
        reason: "Rejected",
        detail: `multifd channels must be between 1 and 255, not ${channels}`
      })
    }
    // the duration runs from QEMU's first connection (main or channel), not from the wait for QEMU
    let started: number | undefined
    const connected = Effect.flatMap(Clock.currentTimeMillis, (now) => Effect.sync(() => void (started ??= now)))
    const main = yield* Deferred.make<Transport.Connection>()
    const channelSet = yield* Deferred.make<MultifdRecv.MultifdRecv["Type"]>()
    const acceptor = yield* Acceptor.start<IncomingError>(listener, {
      upgrade: options.tls === undefined ? options.upgrade : Tls.server(options.tls, { writeOnlyPeers: true }),
      firstBytesTimeout: timeouts.peer,
      classify: (connection, first, reject) =>
        Effect.gen(function*() {
          if (QemuStream.isMainStream(first) || QemuStream.isMultifdChannel(first)) yield* connected
          if (QemuStream.isMainStream(first)) {
            if (!(yield* Deferred.succeed(main, connection))) return yield* reject(connection, "a second QEMU main channel")
            return yield* Effect.never
          }
          if (QemuStream.isMultifdChannel(first)) {
            const recv = yield* Deferred.await(channelSet)
            return yield* recv.adopt(connection).pipe(
              Effect.catchIf(MultifdRecv.isStranger, (e) => reject(connection, e.message))
            )
          }
          return yield* reject(connection, `not a QEMU migration stream (first bytes ${first.toString("hex")})`)
        })
    })
    const connectionFailure = acceptor.failure
    const channelFailure = Effect.flatMap(Deferred.await(channelSet), (recv) => recv.failure)
    const failures = Effect.raceFirst(connectionFailure, channelFailure)

    const waitMain = options.acceptTimeout === undefined
      ? Deferred.await(main)
      : Deferred.await(main).pipe(within(options.acceptTimeout, "waiting for QEMU to connect"))
    const connection = yield* Effect.raceFirst(waitMain, connectionFailure)

    // what the run learns, for progress, stall detection and the stats
    let mainBytes = 0
    let phase: Migration.Phase = "precopy"
    let flushes = 0
    let configUuid: Uint8Array | undefined
    let memory: GuestRam.GuestRam["Type"] | undefined
    const idle = "without any data from QEMU"
    let activity = idle
    const source: QemuStream.ByteSource<MigrationError.ChannelError | Transport.TransportError> = {
      readSome: (max) =>
        Effect.tap(
          Effect.mapError(connection.readSome(max), MigrationError.onChannel("main")),
          (chunk) => Effect.sync(() => (mainBytes += chunk.length))
        )
    }
    const channelBytes = Effect.flatMap(
      Deferred.poll(channelSet),
      (recv) => recv._tag === "None" ? Effect.succeed(0) : Effect.flatMap(recv.value, (r) => Effect.map(r.stats, (s) => s.bytes))
    )
    const progress = Effect.map(channelBytes, (n) => n + mainBytes)
    const describeChannels = (recv: MultifdRecv.MultifdRecv["Type"]) =>
      Effect.gen(function*() {
        const s = yield* recv.stats
        const turnedAway = yield* acceptor.rejected
        const inside = yield* recv.unfinished
        return (inside.length > 0 ? `${inside.map(MultifdRecv.describeUnfinished).join(", ")}; ` : "") +
          `${s.channels} of ${channels} multifd channels connected` +
          (s.channels < channels ? ` (is QEMU's multifd-channels ${s.channels}?)` : "") +
          (turnedAway.length > 0 ? `; rejected: ${turnedAway.join("; ")}` : "")
      })

    const handler: QemuStream.Handler<IncomingError, Scope.Scope> = {
      blocks: (blocks, pageSize) =>
        Effect.gen(function*() {
          const problem = checkLayout(blocks, pageSize, options)
          if (problem !== undefined) {
            return yield* new MigrationError.MigrationError({ reason: "Rejected", detail: `refused the migration: ${problem}` })
          }
          // fresh memory, not touched up front (GuestRam.make's size spec pre-faults every page, which costs as
          // much as the transfer itself here): pages fault in as they arrive, zero pages are never touched
          const ram = options.ram ?? (yield* GuestRam.make({
            pageSize,
            blocks: blocks.map((b) => ({ name: b.name, bytes: GuestRam.allocate(b.size) }))
          }))
          memory = ram
          const recv = yield* MultifdRecv.make({
            channels,
            uuid: options.uuid ?? configUuid,
            ram,
            compression,
            stallTimeout: timeouts.peer
          })
          yield* Deferred.succeed(channelSet, recv)
          const onProgress = options.onProgress
          if (onProgress) {
            // the receive rate over the last second (reports are 100 ms apart)
            const rate = new RecentRate()
            const report = Effect.gen(function*() {
              const s = yield* recv.stats
              yield* onProgress({
                round: flushes,
                phase,
                doneBytes: Math.min(ram.size, (s.normalPages + s.zeroPages) * pageSize),
                totalBytes: ram.size,
                dirtyPages: 0,
                bandwidth: rate.sample(yield* Clock.currentTimeMillis, s.bytes + mainBytes),
                expectedDowntimeMs: 0
              })
            })
            yield* Effect.forkScoped(Effect.repeat(report, Schedule.spaced(Duration.millis(100))))
            // a received migration's last report counts every page
            yield* Effect.addFinalizer((exit) => Exit.isSuccess(exit) ? report : Effect.void)
          }
          return ram
        }),
      flush: (index) =>
        Effect.gen(function*() {
          const recv = yield* Deferred.await(channelSet)
          activity = `waiting for every multifd channel to reach sync point ${index + 1}`
          yield* Effect.raceFirst(recv.sync, recv.failure)
          activity = idle
          flushes = index + 1
        }),
      // the last flush follows: from now on a channel that QEMU closes after its last SYNC has finished
      ramEnding: Effect.flatMap(Deferred.await(channelSet), (recv) => recv.expectEnd),
      command: (name) => Effect.sync(() => {
        if (name === "SWITCHOVER_START") phase = "switchover"
      }),
      configuration: (configuration) => Effect.sync(() => (configUuid = configuration.uuid))
    }
    // one inactivity watch over the main channel and every multifd channel, beside each channel's own watch
    // inside a packet (MultifdRecv's stallTimeout); its message says what was awaited
    const stalled = Effect.gen(function*() {
      const recv = yield* Deferred.poll(channelSet)
      const channelsState = recv._tag === "Some" ? ` (${yield* describeChannels(yield* recv.value)})` : ""
      return yield* new MigrationError.MigrationError({
        reason: "Timeout",
        detail: `timed out after ${Duration.format(timeouts.peer)} ${activity}${channelsState}`
      })
    })

    // a channel stuck inside a packet has its own watch, which names it and fires within a quarter of the
    // timeout of this one: this one then watches on, rather than say less
    const insideAPacket = Effect.flatMap(Deferred.poll(channelSet), (recv) =>
      recv._tag === "None"
        ? Effect.succeed(false)
        : Effect.map(Effect.flatMap(recv.value, (r) => r.unfinished), (inside) => inside.some((u) => u.bytes > 0)))
    const watch: Effect.Effect<never, MigrationError.MigrationError> = unlessStalled(Effect.never, progress, timeouts.peer, idle).pipe(
      Effect.catchAll(() => Effect.flatMap(insideAPacket, (inside) => inside ? watch : stalled))
    )

    const run = Effect.gen(function*() {
      const summary = yield* Effect.raceFirst(
        QemuStream.read(source, handler, { pageSize: options.pageSize, flushAfterEachSection: options.flushAfterEachSection }),
        watch
      )
      const recv = yield* Deferred.await(channelSet)
      yield* Effect.raceFirst(recv.finished, recv.failure).pipe(
        within(timeouts.peer, "waiting for QEMU to close its multifd channels"),
        Effect.catchTag("MigrationError", (e) =>
          Effect.flatMap(describeChannels(recv), (missing) =>
            Effect.fail(new MigrationError.MigrationError({ reason: e.reason, detail: `${e.detail} (${missing})` }))))
      )
      const s = yield* recv.stats
      const ram = memory!
      const uuid = yield* recv.uuid
      const end = yield* Clock.currentTimeMillis
      const durationMs = end - (started ?? end)
      const ramBytes = summary.blocks.reduce((n, b) => n + b.size, 0)
      return {
        ram,
        rejected: yield* acceptor.rejected,
        stats: {
          uuid: uuid === undefined ? "" : Protocol.formatUuid(uuid),
          channels,
          compression,
          ramBytes,
          rounds: summary.flushes,
          pagesPerRound: [],
          downtimeMs: 0,
          packets: s.packets,
          syncs: s.syncs,
          normalPages: s.normalPages + summary.normalPages,
          zeroPages: s.zeroPages + summary.zeroPages,
          wireBytes: s.bytes + summary.bytes,
          durationMs,
          gibPerSecond: ramBytes / GIB / Math.max(durationMs, 1) * 1000,
          qemu: {
            machine: summary.configuration?.machine,
            configurationUuid: summary.configuration?.uuid === undefined
              ? undefined
              : Protocol.formatUuid(summary.configuration.uuid),
            blocks: summary.blocks,
            flushes: summary.flushes,
            mainZeroPages: summary.zeroPages,
            mainNormalPages: summary.normalPages,
            commands: summary.commands,
            mainBytes: summary.bytes,
            deviceStateBytes: summary.deviceStateBytes,
            devices: summary.devices
          }
        }
      } satisfies Incoming
    })

    return yield* Effect.raceFirst(run, failures)
  }))

/** Listens at `address` and receives one QEMU migration there (`Transport.listen` + `incoming`). */
export const listenAndReceive = (
  address: Transport.Address,
  options: Options & { readonly onListening?: ((address: Transport.Address) => Effect.Effect<void>) | undefined }
): Effect.Effect<Incoming, IncomingError | Transport.TransportError, Transport.Transport> =>
  Effect.scoped(Effect.gen(function*() {
    const transport = yield* Transport.Transport
    const listener = yield* transport.listen(address)
    if (options.onListening) yield* options.onListening(listener.address)
    return yield* incoming(listener, options)
  }))

/**
 * A file name for a RAM block, for `--out-dir`: QEMU's block ids contain `/` and `:` (`0000:00:02.0/vga.vram`,
 * `/rom@etc/acpi/tables`); every byte outside `[A-Za-z0-9._@+-]` becomes `%XX`, so names stay distinct and
 * reversible with `decodeURIComponent`, and a name can never climb out of the directory.
 */
export const blockFileName = (name: string): string => {
  const encoded = Array.from(Buffer.from(name, "utf8"))
    .map((b) => {
      const c = String.fromCharCode(b)
      return /[A-Za-z0-9._@+-]/.test(c) ? c : "%" + b.toString(16).toUpperCase().padStart(2, "0")
    })
    .join("")
  // "." and ".." are not files
  return (encoded === "." || encoded === ".." ? encoded.replace(/\./g, "%2E") : encoded) + ".img"
}
