/**
 * A source that an unmodified QEMU (10.x) takes a migration from: QEMU started with `-incoming <uri>` (or
 * `-incoming defer` and `migrate-incoming`), capability `multifd` on and `multifd-channels` N, receives a
 * whole VM (`QemuVm`: RAM, configuration, device state) and resumes it.
 *
 * What QEMU 10's destination expects, in its order:
 *
 * 1. the main channel first (with TLS its handshake completes first: QEMU takes the first TLS channel as the
 *    main one), and on it at once QEMU's file header (QEMU tells a channel by its first 4 bytes), the
 *    configuration (capabilities as a multifd socket migration has them: none), `MIG_CMD_OPEN_RETURN_PATH`
 *    and a PING;
 * 2. the N multifd channels (each: its init packet, uuid = QEMU's `-uuid`); QEMU reads the main stream only
 *    once all of them are there, and its PONG says it took the configuration;
 * 3. the RAM section's SECTION_START with the block list, then a SYNC packet on every channel and
 *    `RAM_SAVE_FLAG_MULTIFD_FLUSH` (QEMU's channels wait for its loader to take the block list before any
 *    page), EOS;
 * 4. every page of every block on the channels (zero pages as offsets only), a SYNC on every channel,
 *    SECTION_PART with MULTIFD_FLUSH, EOS; the commands of the RAM phase; SECTION_END after one more sync;
 *    then the device state, end marker and description, verbatim (into a QEMU whose machine type is of QEMU 8.0
 *    or before, multifd-flush-after-each-section on, each sync is followed by EOS alone, as its source sends it);
 * 5. the channels closed (TLS close_notify, FIN) while QEMU's `MIG_RP_MSG_SHUT` is awaited on the return path:
 *    0 once it loaded everything and started the VM. Only then does `migrate` succeed.
 *
 * With `channels` 0, into a QEMU without capability multifd (needed for a destination with capability postcopy-ram,
 * which QEMU 10.0 takes only without multifd): no channel connects, QEMU reads the main stream at once, and every
 * page goes on it as QEMU's precopy without multifd sends it — a SECTION_PART a batch of pages, each page a
 * `RAM_SAVE_FLAG_PAGE` record or, all zero, a `RAM_SAVE_FLAG_ZERO` one — with no flush words; the rest as above.
 *
 * QEMU that refuses the migration (another machine type, a missing RAM block, another channel count, a device
 * it cannot load) closes its connections, and with its default `exit-on-error` exits: `migrate` fails with one
 * line saying how far QEMU got. Everything runs in one scope: when `migrate` returns every fiber has ended and
 * every connection is closed.
 *
 * @since 0.1.0
 */
import * as Clock from "effect/Clock"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Option from "effect/Option"
import * as Bandwidth from "./Bandwidth.js"
import * as RateLimits from "./internal/native/rateLimit.js"
import * as ChannelThreads from "./ChannelThreads.js"
import * as OpenFiles from "./internal/native/openFiles.js"
import * as Precopy from "./internal/precopy.js"
import * as Format from "./internal/qemu/format.js"
import * as PageWindow from "./internal/qemu/pageWindow.js"
import * as Writer from "./internal/qemu/writer.js"
import * as ReturnPath from "./internal/qemu/returnPath.js"
import * as Unloaded from "./internal/qemu/unloaded.js"
import { unlessStalled, within } from "./internal/stall.js"
import * as Handshake from "./internal/tls/handshake.js"
import * as GuestRam from "./GuestRam.js"
import * as MigrationError from "./MigrationError.js"
import * as MultifdSend from "./MultifdSend.js"
import * as PageCodec from "./PageCodec.js"
import * as Protocol from "./Protocol.js"
import * as QemuVm from "./QemuVm.js"
import * as Tls from "./Tls.js"
import * as Transfer from "./Transfer.js"
import * as Transport from "./Transport.js"
import { ownFibers } from "./internal/native/ownFibers.js"
import * as Inputs from "./internal/inputs.js"
import * as Memory from "./internal/memory.js"

/**
 * How to migrate a VM into QEMU.
 *
 * @since 0.1.0
 * @category models
 */
export interface Options<E = never> {
  /** Where QEMU listens (`-incoming tcp:HOST:PORT` or `unix:PATH`). */
  readonly address: Transport.Address
  readonly vm: QemuVm.QemuVm
  /**
   * Reads pages `first` to `first + count - 1` of `block` into `into` (`MappedRam.open`'s `readPages`): the
   * pages are then sent from a small window of memory, batch by batch, each read while the channels send the
   * previous ones, and the VM's own memory is never touched: the window is (channels + 2) batches of 16 MiB
   * (at most 16 batches) whatever the VM's size.
   */
  readonly readPages?:
    | ((block: GuestRam.Block, first: number, count: number, into: Uint8Array) => Effect.Effect<void, E>)
    | undefined
  /**
   * Without `readPages`: fills pages `first` to `first + count - 1` of `block` in the VM's own memory just
   * before they are sent (`MappedRam.open`'s `load`). Without either, the VM's memory must be complete: the VM of
   * `MappedRam.open` whose pages were not all loaded is refused (`BadOptions`), not sent as zeros.
   */
  readonly load?: ((block: GuestRam.Block, first: number, count: number) => Effect.Effect<void, E>) | undefined
  /**
   * QEMU's `multifd-channels` (1–255): QEMU waits for exactly this many. 0: into a QEMU without capability multifd
   * (needed with capability postcopy-ram on the destination, which QEMU 10.0 takes only without multifd): every page
   * on the main channel, as QEMU's own precopy without multifd sends it (zero pages as ZERO records), uncompressed.
   */
  readonly channels: number
  /** QEMU's `multifd-compression` (default `none`). */
  readonly compression?: Protocol.Compression | undefined
  readonly compressionLevel?: number | undefined
  /**
   * The uuid the channels announce, and the configuration when it carries one (a source with capability
   * validate-uuid): QEMU's `-uuid`, which QEMU checks both against (default: the configuration's, else zeros, as
   * QEMU's).
   */
  readonly uuid?: Uint8Array | undefined
  /** TLS as QEMU's `tls-creds` on the destination (client side); `hostname` is checked against x509. */
  readonly tls?: Tls.Settings | undefined
  /** Secures each connection when `tls` is not given (tests inject faults here). */
  readonly upgrade?: Transport.Upgrade<Transport.UpgradeError> | undefined
  /** `connect`, `handshake`, and `peer`: how long QEMU may stay silent or take anything (default 30 s). */
  readonly timeouts?: Partial<Transfer.Timeouts> | undefined
  /**
   * Called about ten times a second (`doneBytes`: pages the sockets accepted), in a fiber of its own. A callback
   * that fails or dies does not fail the migration: it is logged as a warning (`Transfer.tolerated`).
   */
  readonly onProgress?: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
  /**
   * One bandwidth limit for the multifd channels (`Bandwidth.make`), or for the main channel's pages with `channels`
   * 0, as QEMU's `max-bandwidth`; none by default.
   */
  readonly maxBandwidth?: Bandwidth.Limit | undefined
  /**
   * QEMU's `multifd-flush-after-each-section` on the destination: it syncs the channels at every EOS word (and at
   * each `RAM_SAVE_FLAG_MULTIFD_FLUSH`), so that the sections end without a flush word. Default: as the VM's
   * machine type has it (on for machine types of QEMU 8.0 and before, `pc-i440fx-8.0`, `pc-q35-7.1`, ...).
   */
  readonly flushAfterEachSection?: boolean | undefined
}

/**
 * What a migration into QEMU did.
 *
 * @since 0.1.0
 * @category models
 */
export interface Stats extends Transfer.Stats {
  readonly qemu: {
    readonly machine: string | undefined
    /** Bytes of the main stream, device state included. */
    readonly mainBytes: number
    readonly deviceStateBytes: number
    readonly devices: number | undefined
    /** QEMU's messages on the return path, by name (the first 64: QEMU sends a few). */
    readonly returnPath: ReadonlyArray<string>
  }
}

/**
 * Everything a migration into QEMU can fail with.
 *
 * @since 0.1.0
 * @category errors
 */
export type OutgoingError =
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | MultifdSend.ChannelFailure
  | PageCodec.CodecError

const badOptions = (detail: string) => new MigrationError.MigrationError({ reason: "BadOptions", detail })

/** Why the options cannot be used, before anything connects. */
const check = <E>(options: Options<E>): MigrationError.MigrationError | undefined => {
  const notOptions = Inputs.checkOptions(options, false)
  if (notOptions !== undefined) return badOptions(notOptions)
  const channels = options.channels === 0 ? undefined : Protocol.checkChannels(options.channels, "multifd channels")
  if (channels !== undefined) return badOptions(channels)
  if (options.channels === 0 && (options.compression ?? "none") !== "none") {
    return badOptions(
      `compression ${options.compression} is that of QEMU's multifd channels (multifd-compression): with channels 0 ` +
        "(QEMU without multifd) every page goes on the main channel uncompressed"
    )
  }
  // from plain JavaScript, an address or a VM that is none, and callbacks or switches of the wrong type, were defects
  // (before anything connected, or once it had) or read in silence
  const types = Transport.addressProblem(options.address) ?? checkVm(options.vm) ??
    Inputs.checkCallback("readPages", options.readPages) ?? Inputs.checkCallback("load", options.load) ??
    Inputs.checkCallback("onProgress", options.onProgress) ?? Inputs.checkCallback("upgrade", options.upgrade) ??
    Inputs.checkObject("tls", options.tls) ?? Inputs.checkFlag("flushAfterEachSection", options.flushAfterEachSection) ??
    (options.maxBandwidth === undefined || Bandwidth.isLimit(options.maxBandwidth)
      ? undefined
      : `maxBandwidth ${Inputs.describeInput(options.maxBandwidth)} is not a Bandwidth.Limit (Bandwidth.make)`)
  if (types !== undefined) return badOptions(types)
  if (options.address._tag === "File") return badOptions("QEMU listens on a tcp: or unix: address, not a file")
  const timeouts = Transfer.checkTimeouts(options.timeouts)
  if (timeouts !== undefined) return badOptions(timeouts)
  const settings = (options.compression === undefined ? undefined : Protocol.checkCompression(options.compression)) ??
    (options.uuid === undefined ? undefined : Protocol.checkUuid(options.uuid))
  if (settings !== undefined) return badOptions(settings)
  const level = options.compressionLevel
  if (level !== undefined && options.compression !== undefined && options.compression !== "none") {
    const problem = Protocol.checkCompressionLevel(options.compression, level)
    if (problem !== undefined) return badOptions(problem)
  }
  // the VM of `MappedRam.open` whose pages were not read into its memory: QEMU would resume a guest of zeros
  const notLoaded = options.readPages === undefined && options.load === undefined
    ? Unloaded.problem(options.vm.ram, "give readPages or load, or read it whole with MappedRam.read")
    : undefined
  if (notLoaded !== undefined) return badOptions(notLoaded)
  if (!QemuVm.isComplete(options.vm)) {
    return badOptions("the VM's device state does not end as a complete migration stream ends (cut short?)")
  }
  // out of descriptors, the channels would fail one by one as they connect
  const tooFew = options.channels === 0 ? undefined : OpenFiles.tooFewFor(options.channels, "source")
  return tooFew === undefined ? undefined : badOptions(tooFew)
}

/** Why `vm` is no `QemuVm` (its memory, device state and commands), if it is not. */
const checkVm = (vm: unknown): string | undefined => {
  const v = vm as Partial<QemuVm.QemuVm> | null | undefined
  return typeof vm === "object" && vm !== null && Memory.notGuestRam(v!.ram, "vm.ram") === undefined &&
      v!.deviceState instanceof Uint8Array && Array.isArray(v!.commands)
    ? undefined
    : `vm ${Inputs.describeInput(vm)} is not a QEMU VM (QemuIncoming's vm, MappedRam.read or MappedRam.open)`
}

/** A multifd channel's failure (`MultifdSend` names each by its channel). */
const onChannel = (error: unknown): error is MigrationError.ChannelError =>
  (error as { readonly _tag?: unknown } | undefined)?._tag === "ChannelError" &&
  typeof (error as MigrationError.ChannelError).channel === "number"

/** Pages of `block` from `first`, `count` of them, as the indices `MultifdSend.send` takes. */
const indices = (first: number, count: number): Uint32Array => {
  const pages = new Uint32Array(count)
  for (let i = 0; i < count; i++) pages[i] = first + i
  return pages
}

/**
 * Most batches in the window (`MultifdSend`'s `batchPages` each: 16 MiB of 4 KiB pages): one for each busy
 * channel and two being read, up to this many (with more channels, some wait for a slot).
 */
const MAX_WINDOW_SLOTS = 16

/** Without multifd: the pages read at a time (one SECTION_PART each), and written (and paced) at a time. */
const MAIN_BATCH_BYTES = 16 * 1024 * 1024
const MAIN_PIECE_BYTES = 256 * 1024

/**
 * Migrates `options.vm` into the QEMU listening at `options.address`. Succeeds once QEMU said on the return
 * path that it loaded the whole migration (`MIG_RP_MSG_SHUT` 0). Sent from the VM's own memory (no `readPages`),
 * it is a migration of that memory: one at a time with every other migration, save or restore of it (`Busy`).
 *
 * @since 0.1.0
 * @category migrating
 */
export const migrate = <E = never>(options: Options<E>): Effect.Effect<Stats, OutgoingError | E, Transport.Transport> =>
  ownFibers(Effect.suspend(() => {
    const bad = check(options)
    if (bad !== undefined) return Effect.fail(bad)
    // the VM's own memory sent (and filled by `load`, past its gate and dirty log) as a migration of it: no restore or
    // migration into it, no save or other migration of it meanwhile (`Busy`); `readPages` leaves it untouched
    return options.readPages === undefined ? Precopy.exclusive(options.vm.ram, send(options)) : send(options)
  }))

/** `migrate` with its options checked. */
const send = <E>(options: Options<E>): Effect.Effect<Stats, OutgoingError | E, Transport.Transport> =>
  Effect.scoped(Effect.gen(function*() {
    const transport = yield* Transport.Transport
    const timeouts = Transfer.resolveTimeouts(options.timeouts)
    const { vm, channels } = options
    const compression = options.compression ?? "none"
    const pageSize = vm.ram.pageSize
    const address = options.address
    // QEMU as the messages name it: by its address, as the other commands name their peer
    const qemu = `QEMU at ${Transport.formatAddress(address)}`
    const upgrade = options.tls === undefined
      ? options.upgrade
      : Tls.client(options.tls, address._tag === "Tcp" ? address.host : undefined)
    const uuid = options.uuid ?? vm.configuration?.uuid ?? new Uint8Array(16)
    // the channels run on the pool of channel threads when there is one and they can read the memory there
    const threads = vm.ram.blocks.every((block) => block.bytes.buffer instanceof SharedArrayBuffer)
      ? Option.getOrUndefined(yield* Effect.serviceOption(ChannelThreads.ChannelThreads))
      : undefined
    const start = yield* Clock.currentTimeMillis
    const peer = (what: string) => within(timeouts.peer, what)
    // a destination with multifd-flush-after-each-section on syncs its channels at the EOS word, and again at a
    // flush word: a section then ends without one, as QEMU's own source ends it
    // (without multifd, no flush at all)
    const flushWord = channels === 0 || (options.flushAfterEachSection ?? Format.flushesAfterEachSection(vm.configuration?.machine))
      ? []
      : [Writer.MULTIFD_FLUSH]

    // 1. the main channel, its header and configuration, and the return path
    const main = yield* Effect.gen(function*() {
      const raw = yield* transport.connect(address, { timeout: timeouts.connect })
      return upgrade ? yield* Handshake.bounded(upgrade, timeouts.handshake)(raw, "main") : raw
    }).pipe(Effect.mapError(MigrationError.onChannel("main")))
    let mainBytes = 0
    const writeRaw = (chunks: ReadonlyArray<Buffer>) =>
      Effect.tap(
        Effect.mapError(main.write(chunks), MigrationError.onChannel("main")),
        () => Effect.sync(() => (mainBytes += chunks.reduce((n, c) => n + c.length, 0)))
      )
    // the uuid the configuration carries (QEMU's validate-uuid) is the one the channels carry: QEMU checks both
    // against its -uuid
    const configuration = vm.configuration === undefined
      ? []
      : [Writer.configuration({ ...vm.configuration, uuid: vm.configuration.uuid === undefined ? undefined : uuid }, [])]
    yield* writeRaw([Writer.header(), ...configuration, Writer.openReturnPath(), Writer.ping(1)])
    const first = "before it took the configuration"
    let whyClosed = first
    // QEMU's tls-creds-x509 (endpoint=server) asks for the client's certificate unless verify-peer=off, and closes
    // the connection after the handshake when none came ('No certificate was found'): the likeliest cause, named first
    const noCertificate = options.tls?.credentials._tag === "X509" && options.tls.credentials.cert === undefined
    const returnPath = yield* ReturnPath.start(
      main,
      () =>
        whyClosed === first && noCertificate
          ? `${qemu} ended the migration ${whyClosed}: this side presented no TLS client certificate, which QEMU's ` +
            "tls-creds-x509 asks for unless verify-peer=off (give --tls-cert and --tls-key); else its log says why"
          : `${qemu} ended the migration ${whyClosed}: it refused it (another machine type or machine options, ` +
            // (QEMU compares the capabilities it validates with the configuration's: x-ignore-shared on there, which
            // a migration of every page never has, "Capability x-ignore-shared is on, but received capability is off")
            (whyClosed === first ? "capability x-ignore-shared on, " : "") +
            (channels === 0 ? "" : "another multifd-channels or multifd-compression, ") +
            // (QEMU checks the channels' uuid as they connect, before it reads the configuration, and the
            // configuration's when it carries one; without multifd there are no channels)
            (whyClosed !== first
              ? ""
              : channels > 0
              ? `a -uuid other than the channels' ${Protocol.formatUuid(uuid)} (--uuid), `
              : configuration.length > 0 && vm.configuration?.uuid !== undefined
              ? `a -uuid other than the configuration's ${Protocol.formatUuid(uuid)} (--uuid), `
              : "") +
            "TLS, a device it cannot load? its log says) or it stopped",
      Transport.formatAddress(address)
    )

    // 2. the channels; QEMU reads the main stream once all are there, and answers the PING (at once without multifd)
    const send = channels === 0 ? undefined : yield* MultifdSend.make({
      address,
      channels,
      uuid,
      pageSize,
      compression,
      compressionLevel: options.compressionLevel,
      zeroPage: "multifd",
      connectTimeout: timeouts.connect,
      handshakeTimeout: timeouts.handshake,
      upgrade,
      destination: main.peerIdentity,
      maxBandwidth: options.maxBandwidth,
      threads
    })
    // QEMU's verdict before the end: it gave up (SHUT 1), or says it is done with a migration not yet sent
    const verdictBeforeEnd = (status: number) =>
      new MigrationError.MigrationError(
        status === 0
          ? { reason: "Unexpected", detail: `${qemu} said it loaded the VM (MIG_RP_MSG_SHUT 0) before it was all sent` }
          : { reason: "Rejected", detail: `${qemu} failed to load the migration (MIG_RP_MSG_SHUT ${status}): its log says why` }
      )
    const early = Effect.flatMap(returnPath.shut, (status) => Effect.fail(verdictBeforeEnd(status)))
    // a connection QEMU closed: QEMU ends the main channel too, whose end says more (how far QEMU got); a QEMU
    // that failed to load what it took (another RAM size: its channels closed) says SHUT 1 first, which says it;
    // a QEMU that refused what came on a multifd channel (another multifd-compression) or a channel beyond its
    // multifd-channels closes that channel only, and waits on the main one, and a QEMU without capability
    // multifd takes the main channel and closes every other ("Extra incoming migration connection"): the
    // channel's end says it refused
    const explained = (error: MultifdSend.ChannelFailure): Effect.Effect<never, OutgoingError> =>
      Effect.flatMap(Effect.either(Effect.timeout(returnPath.shut, "1 second")), (verdict) => {
        const why: OutgoingError = verdict._tag === "Left" && verdict.left._tag === "MigrationError"
          ? new MigrationError.MigrationError({ reason: verdict.left.reason, detail: `${verdict.left.detail}; ${error.message}` })
          : verdict._tag === "Left"
          ? closedByQemu(error) ?? error
          : verdict.right !== 0
          ? verdictBeforeEnd(verdict.right)
          : error
        return Effect.fail(why)
      })
    const closedByQemu = (error: MultifdSend.ChannelFailure): MigrationError.MigrationError | undefined => {
      if (!onChannel(error)) return undefined
      const cause = error.cause as { readonly _tag: string; readonly reason?: string }
      if (cause._tag !== "TransportError" || !["Closed", "Reset", "Write"].includes(cause.reason ?? "")) return undefined
      return new MigrationError.MigrationError({
        reason: "Rejected",
        detail: `QEMU closed multifd channel ${error.channel} ${whyClosed} (${error.cause.message}): it refused it (capability ` +
          "multifd off, another multifd-compression, more channels than its multifd-channels, TLS? its log says) or it stopped"
      })
    }
    // (a wait on the channels fails with their failure as `send.failure` does: explained the same way)
    const guarded = <A, E>(self: Effect.Effect<A, E>) =>
      Effect.raceFirst(
        Effect.catchAll(self, (error): Effect.Effect<never, E | OutgoingError> => onChannel(error) ? explained(error) : Effect.fail(error)),
        send === undefined ? early : Effect.raceFirst(Effect.catchAll(send.failure, explained), early)
      )
    const writeMain = (chunks: ReadonlyArray<Buffer>) => guarded(Effect.catchAll(writeRaw(chunks), explained))

    /**
     * Without multifd: every page on the main channel, as QEMU's precopy without multifd sends it — a SECTION_PART
     * a batch, each page a `RAM_SAVE_FLAG_PAGE` record with its bytes, or a `RAM_SAVE_FLAG_ZERO` record when it is
     * all zero, the block named on a part's first page and continued after it; EOS and the footer. Read batch by
     * batch (`readPages` into one buffer, reused once the socket took its pages; `load` into the VM's memory), at
     * `maxBandwidth` when given.
     */
    const onMain = { normal: 0, zero: 0 }
    const pagesOnMain = (
      id: number,
      readPages: Options<E>["readPages"]
    ): Effect.Effect<void, OutgoingError | E> =>
      Effect.gen(function*() {
        const batch = Math.max(1, Math.floor(MAIN_BATCH_BYTES / pageSize))
        const buffer = readPages === undefined ? undefined : Buffer.alloc(batch * pageSize)
        const zeroPage = Buffer.alloc(pageSize)
        const zeroFill = Buffer.from([0])
        const limit = options.maxBandwidth === undefined
          ? undefined
          : RateLimits.RateLimit.attach(RateLimits.sharedOf(options.maxBandwidth)!)
        const paced = (chunks: Array<Buffer>, bytes: number) => {
          const wait = limit === undefined ? 0 : limit.reserve(bytes)
          return wait > 0 ? Effect.zipRight(Effect.sleep(Duration.millis(wait)), writeMain(chunks)) : writeMain(chunks)
        }
        for (const block of vm.ram.blocks) {
          for (let first = 0; first < block.pages; first += batch) {
            const count = Math.min(batch, block.pages - first)
            let bytes: Buffer
            let at: number
            if (buffer === undefined) {
              if (options.load !== undefined) yield* options.load(block, first, count)
              bytes = Buffer.from(block.bytes.buffer, block.bytes.byteOffset, block.bytes.length)
              at = first * pageSize
            } else {
              yield* readPages!(block, first, count, buffer)
              bytes = buffer
              at = 0
            }
            let chunks: Array<Buffer> = [Writer.ramPart(id, false)]
            let pending = 5
            for (let i = 0; i < count; i++) {
              const offset = (first + i) * pageSize
              const page = bytes.subarray(at + i * pageSize, at + (i + 1) * pageSize)
              const zero = page.equals(zeroPage)
              chunks.push(Writer.pageRecord(offset, zero ? Format.RamFlag.ZERO : Format.RamFlag.PAGE, i === 0 ? block.name : undefined))
              chunks.push(zero ? zeroFill : page)
              pending += 8 + (i === 0 ? 1 + block.name.length : 0) + (zero ? 1 : pageSize)
              if (zero) onMain.zero++
              else onMain.normal++
              // (at a limit, pieces of a twentieth of a second: a slow link moves bytes often, and is not taken for a dead one)
              if (pending >= (limit === undefined || limit.rate === 0 ? MAIN_PIECE_BYTES : Math.min(MAIN_PIECE_BYTES, limit.rate / 20))) {
                yield* paced(chunks, pending)
                chunks = []
                pending = 0
              }
            }
            chunks.push(Writer.EOS, Writer.footer(id))
            yield* paced(chunks, pending + 13)
            // the socket holds views of the buffer until it took them: the next batch is read into it after that
            if (buffer !== undefined) yield* guarded(Effect.catchAll(Effect.mapError(main.drained, MigrationError.onChannel("main")), explained))
          }
        }
      })
    if (send !== undefined) yield* guarded(send.established)
    yield* guarded(returnPath.firstPong).pipe(
      // (QEMU with multifd reads the main channel only once all its channels came)
      peer(
        `waiting for ${qemu} to answer on the main channel (${
          send === undefined ? "is its capability multifd off, as channels 0 expects?" : `is its multifd-channels ${channels}?`
        } is it stopped?)`
      )
    )

    // 3.–5., with an inactivity watch: bytes the sockets accepted, on the channels or the main channel
    const progress = send === undefined ? Effect.sync(() => mainBytes) : Effect.map(send.stats, (s) => s.sentBytes + mainBytes)
    const deviceState = Buffer.from(vm.deviceState.buffer, vm.deviceState.byteOffset, vm.deviceState.length)
    let queued = 0
    // what the inactivity watch says it waited for when it fires (QEMU read nothing meanwhile, on any connection: a
    // QEMU stopped, SIGSTOP or a debugger, looks so)
    const taking = `while ${qemu} took nothing more of the migration (is it stopped?)`
    let activity = taking
    const transfer = Effect.gen(function*() {
      // 3. the RAM section: the block list, then the setup sync
      whyClosed = "while it took the RAM blocks"
      const id = vm.ramSectionId
      const layout = vm.ram.blocks.map((b) => ({ name: b.name, size: b.bytes.length }))
      yield* writeMain([Writer.ramStart(id), Writer.memSize(layout), ...layout.map(Writer.blockEntry)])
      // the sync waits for the channels' last batches to go first, which at a bandwidth limit may take longer than
      // the peer timeout: bounded by the inactivity watch (bytes still moving), not a deadline of its own
      const flush = (record: ReadonlyArray<Buffer>) =>
        Effect.gen(function*() {
          if (send !== undefined) {
            activity = `waiting for the multifd channels to send their SYNC packets, ${qemu} taking nothing more (is it stopped?)`
            yield* guarded(send.sync).pipe(Effect.ensuring(Effect.sync(() => (activity = taking))))
          }
          yield* writeMain(record)
        })
      yield* flush([...flushWord, Writer.EOS, Writer.footer(id)])

      // 4. every page, on whichever channel is idle
      whyClosed = "while it received the RAM"
      const totalPages = vm.ram.blocks.reduce((n, b) => n + b.pages, 0)
      yield* Transfer.reportEvery(options.onProgress, (rate) =>
        Effect.gen(function*() {
          const s = send === undefined ? { sentPages: onMain.normal + onMain.zero, sentBytes: mainBytes } : yield* send.stats
          const doneBytes = s.sentPages * pageSize
          return {
            round: 1,
            phase: "precopy",
            doneBytes,
            totalBytes: totalPages * pageSize,
            dirtyPages: totalPages - s.sentPages,
            bandwidth: yield* rate(s.sentBytes),
            expectedDowntimeMs: 0
          } satisfies Transfer.Progress
        }))
      // one race against the channels' failure and QEMU's verdict for the whole loop (not one a batch)
      const readPages = options.readPages
      if (send === undefined) {
        yield* guarded(pagesOnMain(id, readPages))
        queued = onMain.normal + onMain.zero
      } else yield* guarded(Effect.gen(function*() {
        if (readPages === undefined) {
          for (const block of vm.ram.blocks) {
            for (let first = 0; first < block.pages; first += send.batchPages) {
              const count = Math.min(send.batchPages, block.pages - first)
              if (options.load !== undefined) yield* options.load(block, first, count)
              yield* send.send(block, indices(first, count), count)
              queued += count
            }
          }
          return
        }
        const batch = send.batchPages
        const window = yield* PageWindow.make(Math.min(channels + 2, MAX_WINDOW_SLOTS), batch * pageSize)
        const local = indices(0, batch)
        for (const block of vm.ram.blocks) {
          for (let first = 0; first < block.pages; first += batch) {
            const count = Math.min(batch, block.pages - first)
            const slot = yield* window.take
            yield* readPages(block, first, count, slot.bytes)
            yield* send.send(slot.view(block.name), local, count, { origin: first * pageSize, sent: slot.release })
            queued += count
          }
        }
      }))
      yield* flush([Writer.ramPart(id, false), ...flushWord, Writer.EOS, Writer.footer(id)])

      // 5. the commands, the RAM section's end, the device state
      whyClosed = "while it loaded the device state"
      yield* writeMain(vm.commands.map(Writer.command))
      yield* flush([Writer.ramPart(id, true), ...flushWord, Writer.EOS, Writer.footer(id)])
      yield* writeMain([deviceState])
    })
    yield* unlessStalled(transfer, progress, timeouts.peer, () => activity)

    // 6. the channels closed while QEMU loads the device state, and QEMU's verdict (it may come first: QEMU
    // has every page once it read the last flush, and closes the channels itself once it is done)
    const closing = yield* Effect.fork(send === undefined ? Effect.void : send.finish)
    const status = yield* Effect.raceFirst(
      returnPath.shut,
      Effect.zipRight(Effect.catchAll(Fiber.join(closing), explained), Effect.never)
    ).pipe(peer(`waiting for ${qemu} to load the VM and say so on the return path`))
    if (status !== 0) {
      return yield* new MigrationError.MigrationError({
        reason: "Rejected",
        detail: `${qemu} failed to load the migration (MIG_RP_MSG_SHUT ${status}): its log says why`
      })
    }
    yield* Effect.ignore(Effect.zipRight(Fiber.join(closing), main.end).pipe(Effect.timeout(timeouts.handshake)))
    const s = send === undefined
      ? { packets: 0, syncs: 0, normalPages: onMain.normal, zeroPages: onMain.zero, bytes: 0 }
      : yield* send.stats
    const end = yield* Clock.currentTimeMillis
    const durationMs = end - start
    return {
      uuid: Protocol.formatUuid(uuid),
      channels,
      compression,
      ramBytes: vm.ram.size,
      rounds: 1,
      pagesPerRound: [queued],
      downtimeMs: 0,
      packets: s.packets,
      syncs: s.syncs,
      normalPages: s.normalPages,
      zeroPages: s.zeroPages,
      wireBytes: s.bytes + mainBytes,
      durationMs,
      gibPerSecond: Transfer.gibPerSecond(vm.ram.size, durationMs),
      qemu: {
        machine: vm.configuration?.machine,
        mainBytes,
        deviceStateBytes: deviceState.length,
        devices: QemuVm.devices(vm),
        returnPath: returnPath.received()
      }
    } satisfies Stats
  }))
