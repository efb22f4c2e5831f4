/**
 * The main channel of a QEMU destination: QEMU's main stream read to its end (`QemuStream.read`), with the
 * handler that turns what it says into the migration — the block list into memory (checked against the
 * memory given or the allocation cap) and the channel set, each flush into a sync of every channel, the RAM
 * section's end into the channels' last stretch — and one inactivity watch over the main channel and every
 * multifd channel, whose timeout says what was awaited. With `channels` 0 (QEMU without multifd) there is no
 * channel set: every page comes on the main stream. When QEMU opens a return path (capability return-path),
 * it is answered as QEMU's own destination answers a precopy migration: SWITCHOVER_ACK at once (what QEMU
 * sends when no device of its own needs to approve the switch-over), a PONG for each PING; the SHUT at the
 * end is the caller's.
 *
 * @internal
 */
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Ref from "effect/Ref"
import type * as Scope from "effect/Scope"
import * as GuestRam from "../../GuestRam.js"
import * as MigrationError from "../../MigrationError.js"
import * as MultifdRecv from "../../MultifdRecv.js"
import * as Protocol from "../../Protocol.js"
import * as QemuStream from "../../QemuStream.js"
import * as Transfer from "../../Transfer.js"
import type * as Transport from "../../Transport.js"
import { unlessStalled } from "../stall.js"
import * as Writer from "./writer.js"

/** How the destination reads the main stream and builds the channel set. */
export interface Config {
  /** QEMU's `multifd-channels`, already checked; 0: QEMU migrates without multifd. */
  readonly channels: number
  readonly compression: Protocol.Compression
  /** Memory to receive into, or `undefined` to allocate QEMU's layout up to `maxRamBytes`. */
  readonly ram: GuestRam.GuestRam["Type"] | undefined
  readonly maxRamBytes: number
  /** The caller's reason to refuse blocks that passed the checks here, if it has one (`Options.admit`). */
  readonly admit: ((blocks: ReadonlyArray<QemuStream.RamBlock>) => string | undefined) | undefined
  /** The uuid the channels must carry; else the configuration record's, else the first channel's. */
  readonly uuid: Uint8Array | undefined
  readonly pageSize: number | undefined
  readonly flushAfterEachSection: boolean | undefined
  /** The inactivity timeout, for the main watch and each channel inside a packet. */
  readonly peer: Duration.DurationInput
  readonly onProgress: ((progress: Transfer.Progress) => Effect.Effect<void>) | undefined
  /** Keep the device state (`summary.deviceState`), for a whole VM. */
  readonly keepDeviceState: boolean
  /** A source with capability postcopy-ram: refused at its advise, or its precopy migration taken (`ReadOptions`). */
  readonly postcopyRam: "refuse" | "precopy" | undefined
  /** Set once QEMU's return path is open (the caller answers SHUT on it). */
  readonly returnPath: Ref.Ref<boolean>
  /** With `channels` 0: how many multifd channels were turned away (QEMU with multifd sends its pages there). */
  readonly multifdTurnedAway: Effect.Effect<number>
}

/** Everything reading the main stream can fail with. */
export type MainError =
  | QemuStream.QemuStreamError
  | MultifdRecv.ChannelFailure
  | MigrationError.MigrationError
  | MigrationError.ChannelError
  | GuestRam.GuestRamError

/** What the main stream said, and the memory its pages went to. */
export interface MainResult {
  readonly summary: QemuStream.Summary
  readonly ram: GuestRam.GuestRam["Type"]
}

/** The most of the main stream read ahead while the reader waits at a flush (QEMU's device state is a few MiB). */
const LOOK_AHEAD = 16 * 1024 * 1024

const describeLayout = (layout: ReadonlyArray<QemuStream.RamBlock>) => layout.map((b) => `${b.name}=${b.size}`).join(", ")

/** Why the memory given (or the allocation cap) cannot take QEMU's blocks, if it cannot. */
const checkLayout = (
  blocks: ReadonlyArray<QemuStream.RamBlock>,
  pageSize: number,
  config: Config
): string | undefined => {
  const ram = config.ram
  if (ram === undefined) {
    const total = blocks.reduce((n, b) => n + b.size, 0)
    const max = config.maxRamBytes
    return total > max ? `QEMU's ${total} bytes of RAM exceed this destination's limit of ${max}` : config.admit?.(blocks)
  }
  if (ram.pageSize !== pageSize) return `QEMU's page size ${pageSize} differs from the destination's ${ram.pageSize}`
  const mine = GuestRam.layoutOf(ram)
  if (mine.length !== blocks.length || mine.some((b, i) => b.name !== blocks[i]!.name || b.size !== blocks[i]!.size)) {
    return `QEMU's RAM blocks [${describeLayout(blocks)}] differ from the destination's [${describeLayout(mine)}]`
  }
  return config.admit?.(blocks)
}

/** Where the channels are, for a timeout's message: inside packets, how many connected, who was turned away. */
export const describeChannels = (
  recv: MultifdRecv.MultifdRecv["Type"],
  channels: number,
  rejected: Effect.Effect<ReadonlyArray<string>>
): Effect.Effect<string> =>
  Effect.gen(function*() {
    const s = yield* recv.stats
    const turnedAway = yield* rejected
    const inside = yield* recv.unfinished
    return (inside.length > 0 ? `${inside.map(MultifdRecv.describeUnfinished).join(", ")}; ` : "") +
      `${s.channels} of ${channels} multifd channels connected` +
      // none at all, and none turned away (whose reasons say more): QEMU migrates without multifd
      (s.channels === 0
        ? turnedAway.length === 0 ? " (is QEMU's capability multifd on?)" : ""
        : s.channels < channels
        ? ` (is QEMU's multifd-channels ${s.channels}?)`
        : "") +
      (turnedAway.length > 0 ? `; rejected: ${turnedAway.join("; ")}` : "")
  })

/**
 * Reads the main stream on `connection` to its end, creating the channel set in `channelSet` once the RAM
 * blocks are known. Fails when the stream or a flush fails, or when nothing arrives anywhere for `peer`.
 */
export const read = (
  connection: Transport.Connection,
  channelSet: Deferred.Deferred<MultifdRecv.MultifdRecv["Type"]>,
  rejected: Effect.Effect<ReadonlyArray<string>>,
  config: Config
): Effect.Effect<MainResult, MainError, Scope.Scope> =>
  Effect.gen(function*() {
    const { channels, compression, peer: timeout } = config
    // what the run learns, for progress, stall detection and the stats
    let mainBytes = 0
    let phase: Transfer.Phase = "precopy"
    let flushes = 0
    let configUuid: Uint8Array | undefined
    let memory: GuestRam.GuestRam["Type"] | undefined
    const idle = "without any data from QEMU"
    let activity = idle
    // what the reader last waited for on the main channel (a timeout says where the stream stopped)
    let awaiting: QemuStream.Awaiting | undefined
    // bytes of the main stream read ahead while the reader waits at a flush (`endedEarly`), handed to it first; the
    // last chunk handed to it (what it has not consumed yet is the end of that chunk)
    const ahead: Array<Buffer> = []
    let aheadBytes = 0
    let aheadEnded = false
    let lastChunk: Buffer = Buffer.alloc(0)
    const source: QemuStream.ByteSource<MigrationError.ChannelError | Transport.TransportError> = {
      readSome: (max, what) =>
        Effect.suspend(() => {
          const first = ahead[0]
          if (first !== undefined) {
            const piece = first.length <= max ? first : first.subarray(0, max)
            if (piece === first) ahead.shift()
            else ahead[0] = first.subarray(max)
            aheadBytes -= piece.length
            lastChunk = piece
            return Effect.succeed(piece)
          }
          if (aheadEnded) return Effect.succeed(Buffer.alloc(0))
          awaiting = what
          return Effect.tap(
            Effect.mapError(connection.readSome(max), MigrationError.onChannel("main")),
            (chunk) =>
              Effect.sync(() => {
                awaiting = undefined
                mainBytes += chunk.length
                lastChunk = chunk
              })
          )
        })
    }
    const channelBytes = Effect.flatMap(
      Deferred.poll(channelSet),
      (recv) => recv._tag === "None" ? Effect.succeed(0) : Effect.flatMap(recv.value, (r) => Effect.map(r.stats, (s) => s.bytes))
    )
    const progress = Effect.map(channelBytes, (n) => n + mainBytes)

    /**
     * Completes once the main channel is gone for good while the reader waits at a flush: QEMU closed it before its
     * stream was complete (or it failed: then this fails with that). The channels' SYNC packets for the flush may
     * then never come (a channel that never connected, or that has not sent its init packet), and the migration
     * must fail at once with the main channel's cause, not after the inactivity timeout with a channel's: the
     * stream is `doomed`, the flush returns, and the reader goes on through the rest of the stream, the handler's
     * steps left undone, to where it was cut, and fails there saying so. The rest of the stream is read ahead
     * meanwhile (up to `LOOK_AHEAD` bytes, handed to the reader after the flush): a clean end after a complete
     * stream (QEMU sent everything and closed, its channels still being read) is no failure, and waits on.
     */
    let doomed = false
    const endedEarly = Effect.gen(function*() {
      while (!aheadEnded) {
        if (aheadBytes >= LOOK_AHEAD) return yield* Effect.never
        // waits without consuming (an interruption loses nothing), then takes what is there at once
        if (yield* Effect.mapError(connection.atEnd, MigrationError.onChannel("main"))) {
          aheadEnded = true
          break
        }
        yield* Effect.uninterruptible(Effect.flatMap(
          Effect.mapError(connection.readSome(LOOK_AHEAD - aheadBytes), MigrationError.onChannel("main")),
          (chunk) =>
            Effect.sync(() => {
              if (chunk.length === 0) aheadEnded = true
              ahead.push(chunk)
              aheadBytes += chunk.length
              mainBytes += chunk.length
            })
        ))
      }
      if (QemuStream.checkEnding(Buffer.concat([lastChunk, ...ahead]), mainBytes)._tag === "Complete") {
        return yield* Effect.never
      }
      doomed = true
    })
    /** A step of the handler, left undone once the stream is doomed (the reader goes on to fail where it was cut). */
    const unlessDoomed = <A, E, R>(step: Effect.Effect<A, E, R>) => Effect.suspend(() => doomed ? Effect.void : step)

    const handler: QemuStream.Handler<MainError, Scope.Scope> = {
      blocks: (blocks, pageSize, mainPages = () => 0) =>
        Effect.gen(function*() {
          const problem = checkLayout(blocks, pageSize, config)
          if (problem !== undefined) {
            return yield* new MigrationError.MigrationError({ reason: "Rejected", detail: `refused the migration: ${problem}` })
          }
          // fresh memory, not touched up front (a guest's memory is mostly zero pages QEMU never sends): pages
          // fault in as they arrive, zero pages are never touched
          const ram = config.ram ?? (yield* GuestRam.make({
            pageSize,
            blocks: blocks.map((b) => ({ name: b.name, size: b.size })),
            prefault: false
          }))
          memory = ram
          // a write from a report into memory given while its gate is closed fails at once (WriteBlocked) rather than
          // hang this migration's end, which waits for its last report (as `Migration.incoming`)
          const onProgress = config.ram === undefined ? config.onProgress : yield* config.ram.gate.reports(config.onProgress)
          if (channels === 0) {
            // no multifd: the main stream carries every page (its pages, not its bytes: a zero page is a 9-byte
            // record, and a VM of zero pages ended at 4 %)
            yield* Transfer.reportEvery(onProgress, (rate) =>
              Effect.map(rate(mainBytes), (bandwidth) => ({
                round: flushes,
                phase,
                doneBytes: Math.min(ram.size, mainPages() * pageSize),
                totalBytes: ram.size,
                dirtyPages: 0,
                bandwidth,
                expectedDowntimeMs: 0
              })), { lastOnSuccess: true, lastWithin: config.peer })
            return ram
          }
          const recv = yield* MultifdRecv.make({
            channels,
            uuid: config.uuid ?? configUuid,
            ram,
            compression,
            stallTimeout: timeout
          })
          yield* Deferred.succeed(channelSet, recv)
          // the receive rate over the last second; a received migration's last report counts every page
          yield* Transfer.reportEvery(onProgress, (rate) =>
            Effect.gen(function*() {
              const s = yield* recv.stats
              return {
                round: flushes,
                phase,
                // (with zero-page-detection=legacy, zero pages come on the main stream)
                doneBytes: Math.min(ram.size, (s.normalPages + s.zeroPages + mainPages()) * pageSize),
                totalBytes: ram.size,
                dirtyPages: 0,
                bandwidth: yield* rate(s.bytes + mainBytes),
                expectedDowntimeMs: 0
              }
            }), { lastOnSuccess: true, lastWithin: config.peer })
          return ram
        }),
      flush: (index) =>
        unlessDoomed(Effect.gen(function*() {
          if (channels === 0) {
            return yield* new MigrationError.MigrationError({
              reason: "Rejected",
              detail: "QEMU migrates with multifd (RAM_SAVE_FLAG_MULTIFD_FLUSH), but --channels 0 expects none: " +
                "give its multifd-channels"
            })
          }
          const recv = yield* Deferred.await(channelSet)
          activity = `waiting for every multifd channel to reach sync point ${index + 1}`
          yield* Effect.raceFirst(recv.sync, Effect.raceFirst(recv.failure, endedEarly))
          activity = idle
          flushes = index + 1
        })),
      // the last flush follows: from now on a channel that QEMU closes after its last SYNC has finished. QEMU
      // with multifd flushes once at the start of the RAM section already: a RAM section that ends without one
      // came from QEMU without multifd (its pages on this stream), whose channels will never come
      ramEnding: channels === 0 ? Effect.void : unlessDoomed(Effect.gen(function*() {
        if (flushes === 0) {
          return yield* new MigrationError.MigrationError({
            reason: "Rejected",
            detail: `QEMU migrates without multifd (its RAM section ended without RAM_SAVE_FLAG_MULTIFD_FLUSH), but ` +
              `--channels ${channels} expects multifd: give --channels 0, or turn QEMU's capability multifd on`
          })
        }
        yield* Effect.flatMap(Deferred.await(channelSet), (recv) => recv.expectEnd)
      })),
      // the RAM section ended, after its last flush: the channels are sealed (a packet now is refused, not
      // written), and one that came between that flush and now fails the migration (it was written)
      ramEnded: channels === 0 ? Effect.void : unlessDoomed(Effect.gen(function*() {
        const recv = yield* Deferred.await(channelSet)
        const late = yield* recv.seal
        if (late > 0) {
          return yield* new Protocol.ProtocolError({
            reason: "AfterEnd",
            channel: "unidentified",
            field: "packet",
            detail: `${late} data packet(s) after QEMU's last flush (it sends none): not this migration's`
          })
        }
      })),
      openReturnPath: unlessDoomed(Effect.zipRight(
        Effect.mapError(connection.write([Writer.switchoverAck()]), MigrationError.onChannel("main")),
        Ref.set(config.returnPath, true)
      )),
      ping: (value) => unlessDoomed(Effect.mapError(connection.write([Writer.pong(value)]), MigrationError.onChannel("main"))),
      command: (name) => Effect.sync(() => {
        if (name === "SWITCHOVER_START") phase = "switchover"
      }),
      // QEMU's capability validate-uuid puts its -uuid in the configuration, which QEMU's own destination checks
      // against its -uuid ("UUID received is ... and local is ..."): the uuid given is checked the same, channels or
      // none (without multifd nothing else could be checked against it)
      configuration: (configuration) =>
        Effect.suspend(() => {
          configUuid = configuration.uuid
          const expected = config.uuid
          if (expected === undefined || configuration.uuid === undefined || Buffer.from(expected).equals(configuration.uuid)) {
            return Effect.void
          }
          return new MigrationError.MigrationError({
            reason: "Rejected",
            detail: `refused the migration: QEMU's configuration carries uuid ${Protocol.formatUuid(configuration.uuid)} ` +
              `(its -uuid, capability validate-uuid), not ${Protocol.formatUuid(expected)} (the uuid to expect): another VM's migration`
          })
        })
    }
    // one inactivity watch over the main channel and every multifd channel, beside each channel's own watch
    // inside a packet (MultifdRecv's stallTimeout); its message says what was awaited
    const stalled = Effect.gen(function*() {
      const recv = yield* Deferred.poll(channelSet)
      const state = recv._tag === "Some" ? [yield* describeChannels(yield* recv.value, channels, rejected)] : []
      const after = `timed out after ${Duration.format(timeout)}`
      // the reader waits on the main channel (no flush, no close of the channels awaited): where its stream stopped
      const main = activity !== idle || awaiting === undefined ? undefined : awaiting
      const detail = main === undefined
        ? `${after} ${activity}${state.length > 0 ? ` (${state[0]})` : ""}`
        // between two records: QEMU sent nothing more, as a QEMU that stopped or paused sends nothing
        : main.between
        ? `${after} ${idle} (${[`its main channel at byte ${main.at}, before ${main.what}`, ...state].join("; ")}): ` +
          "is QEMU stopped, or paused before the switch-over (capability pause-before-switchover waits for migrate-continue)?"
        : `${after} waiting for ${main.got > 0 ? "the rest of " : ""}${main.what} on QEMU's main channel (${
          [`at byte ${main.at}${main.got > 0 ? `, ${main.got} of its bytes came` : ""}`, ...state].join("; ")
        })`
      return yield* new MigrationError.MigrationError({ reason: "Timeout", detail })
    })

    // a channel stuck inside a packet has its own watch, which names it and fires within a quarter of the
    // timeout of this one: this one then watches on, rather than say less
    const insideAPacket = Effect.flatMap(Deferred.poll(channelSet), (recv) =>
      recv._tag === "None"
        ? Effect.succeed(false)
        : Effect.map(Effect.flatMap(recv.value, (r) => r.unfinished), (inside) => inside.some((u) => u.bytes > 0)))
    const watch: Effect.Effect<never, MigrationError.MigrationError> = unlessStalled(Effect.never, progress, timeout, idle).pipe(
      Effect.catchAll(() => Effect.flatMap(insideAPacket, (inside) => inside ? watch : stalled))
    )

    /**
     * With `channels` 0, why the stream is not one of QEMU without multifd, if it is not: such a QEMU sends every
     * page on this stream in its first pass (a ZERO or a PAGE record each); QEMU with multifd on a machine type of
     * QEMU 8.0 or before sends no flush word that would say so, and its pages went to channels turned away: the
     * memory would be zeros where they were.
     */
    const pagesElsewhere = (summary: QemuStream.Summary) =>
      Effect.gen(function*() {
        if (channels !== 0 || memory === undefined || memory.size === 0 || summary.normalPages > 0) return
        const turnedAway = yield* config.multifdTurnedAway
        if (summary.zeroPages > 0 && turnedAway === 0) return
        return yield* new MigrationError.MigrationError({
          reason: "Rejected",
          detail: `QEMU sent ${summary.zeroPages === 0 ? "none of its pages" : "only zero pages"} on its main channel` +
            (turnedAway > 0 ? ` (${turnedAway} multifd channel${turnedAway === 1 ? "" : "s"} turned away)` : "") +
            ": it migrates with multifd, but --channels 0 expects none: give its multifd-channels"
        })
      })

    /**
     * A stream cut while its channels were awaited, some of them turned away, says where they are too: QEMU closes
     * its main channel once its channels were refused (another VM's uuid, say), the cause the user needs, not the cut.
     */
    const withChannels = <E>(error: E): Effect.Effect<never, E> =>
      Effect.gen(function*() {
        const recv = yield* Deferred.poll(channelSet)
        const turnedAway = yield* rejected
        if (!doomed || recv._tag === "None" || turnedAway.length === 0 || !(error instanceof QemuStream.QemuStreamError)) {
          return yield* Effect.fail(error)
        }
        const state = yield* describeChannels(yield* recv.value, channels, rejected)
        return yield* Effect.fail(new QemuStream.QemuStreamError({ ...error, detail: `${error.detail} (${state})` }) as E)
      })

    const summary = yield* Effect.raceFirst(
      QemuStream.read(source, handler, {
        pageSize: config.pageSize,
        // (QEMU without multifd syncs nothing at an EOS word, whatever its machine type)
        flushAfterEachSection: channels === 0 ? false : config.flushAfterEachSection,
        keepDeviceState: config.keepDeviceState,
        postcopyRam: config.postcopyRam
      }).pipe(Effect.catchAll(withChannels)),
      watch
    )
    if (doomed) {
      // (the reader found the rest of the stream complete where the look-ahead did not: failed all the same)
      return yield* new QemuStream.QemuStreamError({
        reason: "Truncated",
        offset: mainBytes,
        detail: "the stream ended before it was complete, while its multifd channels were awaited at a sync point: " +
          "QEMU closed the main channel mid-migration (cancelled, failed or killed?)"
      })
    }
    yield* pagesElsewhere(summary)
    return { summary, ram: memory! }
  })
