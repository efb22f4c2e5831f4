/**
 * A destination that an unmodified QEMU (10.x) can migrate to: `migrate` with capability `multifd` on and
 * `multifd-channels` N, to our listener. It accepts QEMU's main channel (first bytes `QEVM`) and its N
 * multifd channels (told apart by their first 4 bytes, as QEMU 8.1+ does), learns the RAM blocks from the main
 * stream, applies the multifd packets into guest memory, follows every `MULTIFD_FLUSH` with a sync of the
 * channels (QEMU sends one SYNC packet per channel per flush), drains the device state after the RAM section,
 * and returns the memory once the main stream ended as a complete stream ends and QEMU closed its channels.
 *
 * QEMU announces neither its channel count nor its compression: both must be given (`multifd-channels`,
 * `multifd-compression`); `channels` 0 is QEMU without multifd (every page on the main stream). QEMU's
 * precopy has no acknowledgement without a return path, so QEMU reports `completed` as soon as it sent
 * everything; this side fails (and QEMU never learns) when anything is wrong. With a return path (capability
 * return-path, which libvirt turns on) this side answers as QEMU's own destination answers a precopy
 * migration: SWITCHOVER_ACK when it opens, a PONG for each PING, and once the main stream has ended — every
 * page arrived, the device state complete, what arrived made durable (`persist`) — `MIG_RP_MSG_SHUT` 0 (1 when
 * it fails), which QEMU waits for before it reports `completed` and closes its channels. (Such a stream's end
 * is known by its description after the EOF marker, which every x86 machine type sends; a machine that
 * suppresses it would time out.)
 *
 * A packet's `packet_num` is not checked, as QEMU's destination does not (it keeps it for its traces): QEMU numbers the
 * packets of all channels from one counter, sends a page at most once between two flushes (it sends a page again only
 * in the next round of memory, and flushes once a round) and the flush orders the rounds, so neither the order of
 * packets across channels nor their numbers decide what a page holds. (A source that sends a page twice in one round
 * could only be one that writes what it likes into the memory anyway.)
 *
 * With `vm: true` the rest of the main stream is kept too (`Incoming.vm`): the configuration, the commands
 * and the device state, verbatim — the whole VM, which `MappedRam.write` stores and `QemuOutgoing` resumes.
 *
 * Strangers are candidates, never owners: an accepted connection becomes the main channel only once QEMU's
 * complete file header arrived (`QEVM`, version 3), a multifd channel counts only once its complete 64-byte init
 * packet arrived, both within one handshake deadline (`timeouts.handshake`, the first bytes included). A
 * candidate that closes, stalls or sends garbage is closed, logged and listed in `rejected`; the destination
 * keeps waiting for QEMU.
 *
 * No wait outlasts `timeouts.peer` of silence: the main channel and the channels between packets share one
 * inactivity watch (any byte anywhere is progress: QEMU may legitimately leave one of them quiet while it feeds
 * the others), a channel inside a packet has its own (QEMU writes a packet whole), the TLS handshake of a
 * connection has its timeout, multifd channels that came first (as QEMU 9+ connects them) wait for the main
 * channel no longer than `timeouts.peer`, and so does QEMU closing its channels after the main stream ended. A stall ends
 * in a `Timeout` that names what was awaited, never in a wait for QEMU to close. A main channel that QEMU closes before
 * its stream is complete, or that fails, ends the migration at once with its cause (where the stream was cut), even
 * while a flush waits for channels that never connected or never sent their init packet (QEMU's own destination
 * waits for them for ever).
 *
 * Everything runs in one scope, as `Migration.incoming`: when `incoming` returns (success, failure or
 * interruption) every fiber has ended and every connection is closed. The seams: the candidates
 * (`internal/qemu/candidates.ts`: accepting, classifying, adopting channels), the main stream
 * (`internal/qemu/mainChannel.ts`: the reader's handler, the channel set, the inactivity watch), and the
 * completion here (QEMU closing its channels, the stats).
 *
 * @since 0.1.0
 */
import * as Clock from "effect/Clock"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Ref from "effect/Ref"
import * as GuestRam from "./GuestRam.js"
import * as Acceptor from "./internal/acceptor.js"
import * as OpenFiles from "./internal/native/openFiles.js"
import * as Precopy from "./internal/precopy.js"
import * as Candidates from "./internal/qemu/candidates.js"
import * as MainChannel from "./internal/qemu/mainChannel.js"
import * as Writer from "./internal/qemu/writer.js"
import { within } from "./internal/stall.js"
import * as Handshake from "./internal/tls/handshake.js"
import * as MigrationError from "./MigrationError.js"
import type * as MultifdRecv from "./MultifdRecv.js"
import * as Protocol from "./Protocol.js"
import type * as QemuStream from "./QemuStream.js"
import * as QemuVm from "./QemuVm.js"
import * as Tls from "./Tls.js"
import * as Transfer from "./Transfer.js"
import * as Transport from "./Transport.js"
import { ownFibers } from "./internal/native/ownFibers.js"
import * as Inputs from "./internal/inputs.js"
import * as Memory from "./internal/memory.js"

/**
 * How the destination expects QEMU to migrate.
 *
 * @since 0.1.0
 * @category models
 */
export interface Options<E = never> {
  /** QEMU's `multifd-channels` (1–255), or 0 for QEMU without capability multifd (pages on the main stream). */
  readonly channels: number
  /** QEMU's `multifd-compression` (default `none`); QEMU does not announce it. With `channels` 0 only `none`. */
  readonly compression?: Protocol.Compression | undefined
  /**
   * Memory to receive into: its layout must equal the RAM blocks QEMU announces (names, sizes, page size).
   * Without it, memory of QEMU's layout is allocated, up to `maxRamBytes`. Pages are written past its gate and
   * dirty log: memory that a migration, save or restore is using is refused (`Busy`) before anything is accepted,
   * and everyone else finds it `Busy` until `incoming` returns (`persist` may save or migrate it, one at a time).
   * Its writers (`GuestRam.write` / `update`) wait from QEMU's connection until its last page arrived (its gate
   * closed, unless it was already), and go on after it, on the received memory, before `persist`.
   */
  readonly ram?: GuestRam.GuestRam["Type"] | undefined
  /** Largest total memory QEMU may make this destination allocate when `ram` is not given (default 16 GiB). */
  readonly maxRamBytes?: number | undefined
  /**
   * The destination's last word on QEMU's RAM blocks, once they are announced and passed the checks here: a
   * reason refuses the migration (`Rejected`, saying it) before anything is allocated or a page read — e.g. that
   * the blocks will not fit where they are to be written.
   */
  readonly admit?: ((blocks: ReadonlyArray<QemuStream.RamBlock>) => string | undefined) | undefined
  /** Target page size when the stream does not say (default 4096, as x86): a power of two, 512 B to 512 KiB. */
  readonly pageSize?: number | undefined
  /**
   * The uuid the multifd channels must carry (QEMU's `-uuid`, zeros by default), and the configuration record when
   * it carries one (QEMU's capability validate-uuid: another refuses the migration, as QEMU's destination does, with
   * or without multifd). Without it the first channel's is adopted (or the one the configuration record carries)
   * and the others must match.
   */
  readonly uuid?: Uint8Array | undefined
  /**
   * QEMU's `multifd-flush-after-each-section`: every EOS word is a flush too. Default: as QEMU's machine type
   * has it (on for machine types of QEMU 8.0 and before, `pc-i440fx-8.0`, `pc-q35-7.1`, ...), off once QEMU
   * sends a `RAM_SAVE_FLAG_MULTIFD_FLUSH`; give it for a QEMU that sets it otherwise (`-global
   * migration.multifd-flush-after-each-section=on`).
   */
  readonly flushAfterEachSection?: boolean | undefined
  /**
   * A QEMU source with capability `postcopy-ram` (libvirt's `--postcopy`; QEMU 10.0 takes it without multifd
   * only, `channels` 0): `"refuse"` (the default) fails at its first command, the source's migration failing with its
   * guest running; `"precopy"` takes its precopy migration, which completes unless the source switches to postcopy
   * (`migrate-start-postcopy`, libvirt's `--postcopy-after-precopy`): the switch is refused, and QEMU 10.0, which
   * may have handed its VM over by then, stays `postcopy-paused`, its guest stopped until recovered elsewhere or killed.
   */
  readonly postcopyRam?: "refuse" | "precopy" | undefined
  /**
   * `handshake`: how long a new connection has to prove itself (its first bytes, then QEMU's file header or a
   * multifd init packet; default 10 s); `peer`: the inactivity timeout (default 30 s).
   */
  readonly timeouts?: Partial<Transfer.Timeouts> | undefined
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
  readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
  /**
   * Called about ten times a second once the RAM blocks are known (`doneBytes` counts pages received), in a fiber
   * of its own, and once more after a success. A callback that fails or dies does not fail the migration: it is
   * logged as a warning (`Transfer.tolerated`).
   */
  readonly onProgress?: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
  /** Keep the whole VM (`Incoming.vm`): the configuration, commands and device state besides the RAM. */
  readonly vm?: boolean | undefined
  /**
   * Makes what arrived durable (writes it where the user asked) before QEMU is told, on its return path, that
   * this destination has the VM (`MIG_RP_MSG_SHUT` 0, what QEMU's own destination says once it loaded it, and
   * the word a QEMU source with capability return-path completes on, after which libvirt discards the
   * source's VM): runs once every page arrived and the device state is complete (the VM given with `vm: true`),
   * and its failure fails the migration, QEMU told it failed (SHUT 1), so that it keeps the VM. Without a
   * return path (QEMU reported completed already), it runs once QEMU closed its channels and every connection
   * is closed.
   */
  readonly persist?:
    | ((received: { readonly ram: GuestRam.GuestRam["Type"]; readonly vm: QemuVm.QemuVm | undefined }) => Effect.Effect<void, E>)
    | undefined
}

/**
 * What QEMU's main stream said, beside the generic migration stats.
 *
 * @since 0.1.0
 * @category models
 */
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
  /** Whether QEMU opened a return path (and was answered on it). */
  readonly returnPath: boolean
  /** Bytes of the main stream in all, and of the device state drained after the RAM section. */
  readonly mainBytes: number
  readonly deviceStateBytes: number
  /** Devices in the stream's trailing description, when QEMU sent one. */
  readonly devices: number | undefined
}

/**
 * What a received QEMU migration did.
 *
 * @since 0.1.0
 * @category models
 */
export interface Stats extends Transfer.Stats {
  readonly qemu: QemuDetails
}

/**
 * What the destination received.
 *
 * @since 0.1.0
 * @category models
 */
export interface Incoming {
  readonly ram: GuestRam.GuestRam["Type"]
  /** The whole VM, with `vm: true`. */
  readonly vm: QemuVm.QemuVm | undefined
  readonly stats: Stats
  /**
   * Connections that were turned away (strangers, candidates that closed or stalled before proving
   * themselves, foreign uuids, a second main channel), each with the reason.
   */
  readonly rejected: ReadonlyArray<string>
}

/**
 * Everything the destination can fail with.
 *
 * @since 0.1.0
 * @category errors
 */
export type IncomingError =
  | QemuStream.QemuStreamError
  | MultifdRecv.ChannelFailure
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | GuestRam.GuestRamError

/**
 * Default cap on memory QEMU may make the destination allocate.
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_MAX_RAM: number = Transfer.DEFAULT_MAX_RAM

/** The channels' end and what the migration did, once the main stream has ended. */
const complete = (
  recv: MultifdRecv.MultifdRecv["Type"] | undefined,
  main: MainChannel.MainResult,
  candidates: Candidates.Candidates,
  settings: {
    readonly channels: number
    readonly compression: Protocol.Compression
    readonly peer: Duration.DurationInput
    readonly vm: QemuVm.QemuVm | undefined
  }
): Effect.Effect<Incoming, MultifdRecv.ChannelFailure | MigrationError.MigrationError> =>
  Effect.gen(function*() {
    const { summary, ram } = main
    const { channels, compression } = settings
    if (recv !== undefined) {
      yield* Effect.raceFirst(recv.finished, recv.failure).pipe(
        within(settings.peer, "waiting for QEMU to close its multifd channels"),
        Effect.catchTag("MigrationError", (e) =>
          Effect.flatMap(MainChannel.describeChannels(recv, channels, candidates.rejected), (missing) =>
            Effect.fail(new MigrationError.MigrationError({ reason: e.reason, detail: `${e.detail} (${missing})` }))))
      )
    }
    const s = recv === undefined ? { packets: 0, syncs: 0, normalPages: 0, zeroPages: 0, bytes: 0 } : yield* recv.stats
    const uuid = recv === undefined ? undefined : yield* recv.uuid
    const end = yield* Clock.currentTimeMillis
    const durationMs = end - ((yield* candidates.started) ?? end)
    const ramBytes = summary.blocks.reduce((n, b) => n + b.size, 0)
    return {
      ram,
      vm: settings.vm,
      rejected: yield* candidates.rejected,
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
        gibPerSecond: Transfer.gibPerSecond(ramBytes, durationMs),
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
          returnPath: summary.returnPath,
          mainBytes: summary.bytes,
          deviceStateBytes: summary.deviceStateBytes,
          devices: summary.devices
        }
      }
    } satisfies Incoming
  })

/**
 * Receives one QEMU migration on `listener`. Every accepted connection is a candidate until it proves itself
 * within the handshake timeout: the main channel by QEMU's complete file header (the first one wins; a later
 * one is turned away), a multifd channel by its complete init packet, adopted once the main stream announced
 * the RAM blocks. Candidates that do not — strangers, connections that close or stall half-way, garbage,
 * channels of another VM (uuid) — are closed, logged and reported in `rejected` without failing the
 * migration.
 *
 * @since 0.1.0
 * @category receiving
 */
export const incoming = <E = never>(
  listener: Transport.Listener,
  options: Options<E>
): Effect.Effect<Incoming, IncomingError | E> =>
  ownFibers(Effect.suspend(() => {
    const notListener = Inputs.checkListener(listener)
    const bad = notListener === undefined ? check(options) : new MigrationError.MigrationError({ reason: "BadOptions", detail: notListener })
    if (bad !== undefined) return Effect.fail(bad)
    // its pages are written past the memory's gate and dirty log: no migration, save or restore of memory given may
    // run meanwhile (`Busy`), and this one waits for none, as `Migration.incoming` into memory given
    return options.ram === undefined ? receive(listener, options) : Precopy.exclusive(options.ram, receive(listener, options))
  }))

/** Why the options cannot be used, before anything is accepted. */
const check = <E>(options: Options<E>): MigrationError.MigrationError | undefined => {
  const notOptions = Inputs.checkOptions(options, false)
  if (notOptions !== undefined) return new MigrationError.MigrationError({ reason: "BadOptions", detail: notOptions })
  const channels = options.channels
  // (null, from plain JavaScript, is no method: it took none in silence)
  const compression = options.compression === undefined ? "none" : options.compression
  // an option it cannot use, as every other (it was Rejected, as if QEMU had been refused)
  const badChannels = channels === 0 ? undefined : Protocol.checkChannels(channels, "multifd channels")
  if (badChannels !== undefined) return new MigrationError.MigrationError({ reason: "BadOptions", detail: badChannels })
  if (channels === 0 && compression !== "none" && Protocol.checkCompression(compression) === undefined) {
    return new MigrationError.MigrationError({
      reason: "BadOptions",
      detail: `compression ${compression} is that of QEMU's multifd channels (multifd-compression): with channels 0 ` +
        "(QEMU without multifd) every page comes on the main channel uncompressed"
    })
  }
  // out of descriptors, QEMU's channels would be dropped without a word (QEMU is told nothing either way)
  const tooFew = channels === 0 ? undefined : OpenFiles.tooFewFor(channels, "destination")
  const problem = tooFew ?? Transfer.checkTimeouts(options.timeouts) ?? Transfer.checkMaxRam(options.maxRamBytes) ??
    Transfer.checkAcceptTimeout(options.acceptTimeout) ??
    (options.pageSize === undefined ? undefined : Protocol.checkPageSize(options.pageSize, "pageSize")) ??
    Protocol.checkCompression(compression) ?? (options.uuid === undefined ? undefined : Protocol.checkUuid(options.uuid)) ??
    checkTypes(options)
  return problem === undefined ? undefined : new MigrationError.MigrationError({ reason: "BadOptions", detail: problem })
}

/**
 * Why options that plain JavaScript may get wrong are unusable, if they are (as `Migration.incoming` checks its own):
 * memory given that is no GuestRam (`null` was a defect before anything listened), callbacks that are no functions
 * (an `onListening` of a string was a defect once listening, the others once QEMU connected), TLS settings that are
 * none, and switches or a postcopy policy of the wrong type (`vm: "yes"` received no VM, `null` or `"no"` was read
 * as false or true, a misspelt policy as `refuse`), in silence.
 */
const checkTypes = (options: Options<unknown>): string | undefined =>
  (options.ram === undefined ? undefined : Memory.notGuestRam(options.ram, "ram")) ??
    Inputs.checkCallback("admit", options.admit) ?? Inputs.checkCallback("onProgress", options.onProgress) ??
    Inputs.checkCallback("persist", options.persist) ?? Inputs.checkCallback("upgrade", options.upgrade) ??
    Inputs.checkCallback("onListening", (options as { readonly onListening?: unknown }).onListening) ??
    Inputs.checkObject("tls", options.tls) ??
    Inputs.checkFlag("vm", options.vm) ?? Inputs.checkFlag("flushAfterEachSection", options.flushAfterEachSection) ??
    (options.postcopyRam === undefined || options.postcopyRam === "refuse" || options.postcopyRam === "precopy"
      ? undefined
      : `postcopyRam ${Inputs.describeInput(options.postcopyRam)} is not refuse or precopy`)

/** `incoming` with its options checked. */
const receive = <E>(listener: Transport.Listener, options: Options<E>): Effect.Effect<Incoming, IncomingError | E> =>
  Effect.scoped(Effect.gen(function*() {
    const timeouts = Transfer.resolveTimeouts(options.timeouts)
    const channels = options.channels
    const compression = options.compression ?? "none"
    yield* Acceptor.claim(listener)
    const channelSet = yield* Deferred.make<MultifdRecv.MultifdRecv["Type"]>()
    const upgrade = options.tls === undefined ? options.upgrade : Tls.server(options.tls, { writeOnlyPeers: true })
    // (TLS settings that verify no client though they have a CA file: said once, as `Migration.incoming` says it)
    const note = Handshake.serverNote(upgrade)
    if (note !== undefined) yield* Effect.logWarning(note)
    const candidates = yield* Candidates.start(listener, {
      upgrade: upgrade === undefined ? undefined : Handshake.bounded(upgrade, timeouts.handshake),
      handshake: timeouts.handshake,
      channelSet,
      multifd: channels > 0,
      channels,
      peer: timeouts.peer,
      uuid: options.uuid
    })
    const channelFailure = Effect.flatMap(Deferred.await(channelSet), (recv) => recv.failure)
    const failures = Effect.raceFirst(candidates.failure, channelFailure)

    const waitMain = options.acceptTimeout === undefined
      ? candidates.main
      : candidates.main.pipe(within(options.acceptTimeout, "waiting for QEMU to connect"))
    // channels that came first wait for the main channel no longer than the peer timeout
    const connection = yield* Effect.raceFirst(waitMain, Effect.raceFirst(candidates.failure, candidates.orphaned))

    const returnPath = yield* Ref.make(false)
    /** An answer on QEMU's return path, if QEMU opened one. */
    const answer = (status: number) =>
      Effect.flatMap(Ref.get(returnPath), (open) =>
        open
          ? Effect.mapError(connection.write([Writer.shut(status)]), MigrationError.onChannel("main"))
          : Effect.void)
    const run = Effect.gen(function*() {
      // the application's writers of memory given wait while QEMU's pages are written into it, and go on after the
      // last one, on the received memory, before `persist` (a write went through meanwhile, and was lost under a page
      // that came after it, in silence), as `Migration.incoming`'s and a restore's do; a gate closed already (by the
      // application, or kept closed by a migration's success) stays as it was found
      const given = options.ram
      const writersResume = given === undefined ? Effect.void : yield* given.gate.closedForScope
      const main = yield* MainChannel.read(connection, channelSet, candidates.rejected, {
        channels,
        compression,
        ram: options.ram,
        maxRamBytes: options.maxRamBytes ?? DEFAULT_MAX_RAM,
        admit: options.admit,
        uuid: options.uuid,
        pageSize: options.pageSize,
        flushAfterEachSection: options.flushAfterEachSection,
        peer: timeouts.peer,
        onProgress: options.onProgress,
        keepDeviceState: options.vm === true,
        postcopyRam: options.postcopyRam,
        returnPath,
        multifdTurnedAway: candidates.multifdTurnedAway
      })
      // every page arrived (the last flush synced every channel) and the device state is complete
      yield* writersResume
      const vm = options.vm === true ? QemuVm.fromSummary(main.summary, main.ram) : undefined
      // the step may save or migrate the memory it persists, even memory given, which everyone else finds `Busy`
      const persist = options.persist === undefined
        ? Effect.void
        : Memory.lending(main.ram, Effect.suspend(() => options.persist!({ ram: main.ram, vm })))
      const recv = channels === 0 ? undefined : yield* Deferred.await(channelSet)
      const completed = complete(recv, main, candidates, { channels, compression, peer: timeouts.peer, vm })
      if (!(yield* Ref.get(returnPath))) return { received: yield* completed, persist }
      // QEMU waits for the SHUT, then reports completed and closes its channels: what arrived is where the user
      // wants it first
      yield* persist
      yield* answer(0)
      return { received: yield* completed, persist: Effect.void }
    })

    // a failure is said on the return path too, as QEMU's destination says it (best effort: QEMU may be gone)
    return yield* Effect.raceFirst(run, failures).pipe(
      Effect.tapError(() => Effect.ignore(answer(1).pipe(Effect.timeout(timeouts.handshake))))
    )
  })).pipe(
    // without a return path QEMU reported completed already: the output is made once every connection is closed
    Effect.flatMap(({ persist, received }) => Effect.as(persist, received))
  )

/**
 * Listens at `address` and receives one QEMU migration there (`Transport.listen` + `incoming`).
 *
 * @since 0.1.0
 * @category receiving
 */
export const listenAndReceive = <E = never>(
  address: Transport.Address,
  options: Options<E> & { readonly onListening?: ((address: Transport.Address) => Effect.Effect<void>) | undefined }
): Effect.Effect<Incoming, IncomingError | Transport.TransportError | E, Transport.Transport> =>
  ownFibers(Effect.suspend(() => {
    // options it cannot use, and memory given that another migration, save or restore holds (Busy), fail before
    // anything listens (a listener made, and `onListening` told, for a receive that cannot happen)
    const bad = check(options)
    if (bad !== undefined) return Effect.fail(bad)
    const run = Effect.scoped(Effect.gen(function*() {
      const transport = yield* Transport.Transport
      const listener = yield* transport.listen(address)
      // (one that returns no Effect, an async function's Promise, fails CallbackFailed saying so: it was a defect)
      const onListening = options.onListening
      if (onListening) yield* Inputs.callback("onListening", () => onListening(listener.address), false)
      return yield* receive(listener, options)
    }))
    return options.ram === undefined ? run : Precopy.exclusive(options.ram, run)
  }))

/**
 * A file name for a RAM block, for `--out-dir`: QEMU's block ids contain `/` and `:` (`0000:00:02.0/vga.vram`,
 * `/rom@etc/acpi/tables`); every byte outside `[A-Za-z0-9._@+-]` becomes `%XX`, so names stay distinct and
 * reversible with `decodeURIComponent`, and a name can never climb out of the directory.
 *
 * @since 0.1.0
 * @category utils
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
