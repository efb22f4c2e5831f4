/**
 * `multifd send <uri> --in <file>`: migrates an image file to a destination; with `--to-qemu --vm FILE`, a
 * whole VM into an unmodified QEMU (`toQemu.ts`).
 *
 * @since 0.1.0
 */
import * as Command from "@effect/cli/Command"
import * as Cause from "effect/Cause"
import * as Chunk from "effect/Chunk"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import * as GuestRam from "../GuestRam.js"
import * as SnapshotFile from "../internal/snapshotFile.js"
import * as Migration from "../Migration.js"
import * as MigrationStatus from "../MigrationStatus.js"
import * as Transport from "../Transport.js"
import * as Protocol from "../Protocol.js"
import { oneLine, refuseGiven, UsageError } from "./errors.js"
import * as Image from "./image.js"
import * as Options from "./options.js"
import * as Progress from "./progress.js"
import * as Log from "./log.js"
import * as Report from "./report.js"
import { channelThreads, checkCompression, environment, timeoutsOf, tlsOf, warnUnknownVariables } from "./settings.js"
import * as Terminal from "./terminal.js"
import * as ToQemu from "./toQemu.js"

/** The name of the one block an image file becomes. */
export const BLOCK_NAME = "ram"

/** The host a source's TLS checks the destination's certificate against by default. */
const hostOf = (uri: Transport.Address): string | undefined => uri._tag === "Tcp" ? uri.host : undefined

/** The `send` subcommand. */
export const command = Command.make(
  "send",
  {
    uri: Options.uri,
    input: Options.input,
    qemu: Options.sendQemu,
    transfer: Options.sendTransfer,
    tls: Options.sendTls,
    timing: Options.sendTiming,
    resilience: Options.sendResilience,
    reporting: Options.reporting
  },
  ({ input: inputFlag, qemu, reporting, resilience, timing, tls: tlsFlags, transfer, uri }) =>
    Effect.scoped(Effect.gen(function*() {
      yield* warnUnknownVariables()
      // the flags the command line gave (their variables are no reason to refuse a command they do not fit)
      const given = resilience.given ? new Set([...transfer.given, "--reconnect"]) : transfer.given
      // with a method, the migration checks the level against it; without one, only that some method has it
      const level = transfer.compressionLevel
      const noLevel = transfer.compression === "none" && Option.isSome(level) ? Options.checkAnyLevel(level.value) : undefined
      if (noLevel !== undefined) return yield* new UsageError({ detail: noLevel })
      // a level the method does not have, named as given ("compression: zlib level 12 is out of range 0-9" named
      // neither the flag nor the variable)
      const badLevel = transfer.compression !== "none" && Option.isSome(level)
        ? Protocol.checkCompressionLevel(transfer.compression, level.value)
        : undefined
      if (badLevel !== undefined) {
        const name = transfer.given.has("--compression-level") ? "--compression-level" : "MULTIFD_COMPRESSION_LEVEL"
        return yield* new UsageError({ detail: `${name}: ${badLevel}` })
      }
      // port 0 is recv's "any free port": connecting to it is refused, which read like a destination that is down
      if (uri._tag === "Tcp" && uri.port === 0) {
        return yield* new UsageError({ detail: "send needs the destination's port: port 0 is for recv (a free port)" })
      }
      if (qemu.toQemu) {
        if (Option.isSome(inputFlag)) return yield* new UsageError({ detail: "--to-qemu takes the VM as --vm FILE, not --in" })
        if (Option.isNone(qemu.vm)) return yield* new UsageError({ detail: "--to-qemu needs --vm FILE (a QEMU mapped-ram migration file)" })
        // the VM file sets them: a flag given is refused, their environment variables are ignored
        yield* refuseGiven(given, "--to-qemu", {
          "--page-size": "the VM file sets the page size",
          "--zero-page": "zero pages travel as offsets, as QEMU sends them",
          "--reconnect": "QEMU does not take a lost channel back"
        })
        // before TLS, which would call a file: uri a snapshot
        if (uri._tag === "File") return yield* new UsageError({ detail: ToQemu.NEEDS_SOCKET })
        // without multifd every page goes uncompressed on the main channel: --compression is refused, MULTIFD_COMPRESSION
        // ignored
        const withoutMultifd = transfer.channels === 0
        if (withoutMultifd && transfer.given.has("--compression") && transfer.compression !== "none") {
          return yield* new UsageError({
            detail: `--compression ${transfer.compression} is QEMU's multifd-compression: with --channels 0 (a QEMU without ` +
              "multifd) every page goes uncompressed on the main channel"
          })
        }
        const compression = withoutMultifd ? "none" : transfer.compression
        const tls = yield* tlsOf(tlsFlags, "send", uri, timing)
        yield* checkCompression(compression)
        yield* ToQemu.run({
          uri,
          vm: qemu.vm.value,
          channels: transfer.channels,
          compression,
          compressionLevel: Option.getOrUndefined(transfer.compressionLevel),
          maxBandwidth: Option.getOrUndefined(transfer.maxBandwidth),
          uuid: Option.getOrUndefined(qemu.uuid),
          tls,
          timing,
          reporting
        })
        return
      }
      if (transfer.channels === 0) {
        return yield* new UsageError({ detail: `${Options.checkChannels(0)} (0 goes with --to-qemu: a QEMU without multifd)` })
      }
      if (Option.isSome(qemu.vm)) return yield* new UsageError({ detail: "--vm goes with --to-qemu (or recv --from-qemu)" })
      if (Option.isSome(qemu.uuid)) return yield* new UsageError({ detail: "--uuid goes with --to-qemu (QEMU's -uuid)" })
      if (Option.isNone(inputFlag)) return yield* new UsageError({ detail: "send needs --in FILE (or --to-qemu --vm FILE)" })
      const input = inputFlag.value
      if (uri._tag === "File" && Image.sameFile(input, uri.path)) {
        return yield* new UsageError({ detail: `--in ${input} and file:${uri.path} are the same file: the snapshot would replace the image` })
      }
      const tls = yield* tlsOf(tlsFlags, "send", uri, timing)
      // a snapshot is neither compressed nor limited: the flags are refused (Migration), while MULTIFD_COMPRESSION
      // and MULTIFD_MAX_BANDWIDTH, set for migrations, are ignored
      const toFile = uri._tag === "File"
      if (toFile) yield* refuseGiven(given, "a file: snapshot", { "--reconnect": "it has no connections" })
      const compression = toFile && !transfer.given.has("--compression") ? "none" : transfer.compression
      const maxBandwidth = toFile && !transfer.given.has("--max-bandwidth") ? Option.none() : transfer.maxBandwidth
      yield* checkCompression(compression)
      // the snapshot's temporary file made (and removed) first: an unwritable destination fails before the image is
      // read (minutes for a big one), as recv's --out does before it listens
      // (the image kept whatever its name: SNAP.<pid>.partial is no stale temporary file of the snapshot)
      if (toFile) {
        yield* Image.markInput(input)
        yield* Effect.scoped(SnapshotFile.createTemporary(uri.path, 0))
        // a save much larger than the disk read the whole image first (minutes for a big one), then failed part-way:
        // refused now, as recv --out refuses memory that will not fit before it listens
        const wontFit = Image.snapshotWontFit(input, uri.path, transfer.pageSize)
        if (wontFit !== undefined) {
          return yield* new SnapshotFile.SnapshotError({ reason: "Refused", path: uri.path, detail: wontFit })
        }
      }
      const bytes = yield* Image.read(input, transfer.pageSize)
      // a signal that comes as the snapshot is renamed into place lets the rename finish: the command ends as it would
      // have, but the user hears that the snapshot is there, the older file gone (a directory that could not be synced
      // after the rename says so itself); nor does one whose --json result stdout did not take (`| true`), which the
      // error alone made read as a failed save
      if (toFile) {
        const published = yield* Image.publishedFromNow(uri.path)
        const unreported = (exit: Exit.Exit<unknown, unknown>) =>
          Exit.isFailure(exit) && Cause.failures(exit.cause).pipe(Chunk.some((error) => error instanceof Terminal.OutputError))
        yield* Effect.addFinalizer((exit) =>
          Exit.isInterrupted(exit) || unreported(exit)
            ? Effect.flatMap(published, (done) =>
              done
                ? Effect.flatMap(Terminal.Terminal, (terminal) =>
                  terminal.err(oneLine(`multifd: ${uri.path} holds the snapshot: ${
                    unreported(exit)
                      ? "it was saved; only the --json result could not be written"
                      : "it was saved before the interruption"
                  }`)))
                : Effect.void)
            : Effect.void
        )
      }
      const ram = yield* GuestRam.make({ pageSize: transfer.pageSize, blocks: [{ name: BLOCK_NAME, bytes }] }).pipe(
        Effect.mapError((error) => new UsageError({ detail: error.message }))
      )
      const status = yield* MigrationStatus.make
      const stats = yield* Effect.scoped(Effect.gen(function*() {
        const onProgress = yield* Progress.make("send", reporting)
        return yield* Migration.migrate({
          address: uri,
          channels: transfer.channels,
          compression,
          compressionLevel: Option.getOrUndefined(transfer.compressionLevel),
          zeroPage: transfer.zeroPage,
          maxBandwidth: Option.getOrUndefined(maxBandwidth),
          timeouts: timeoutsOf(timing),
          upgrade: tls?.client(hostOf(uri)),
          onProgress,
          status,
          reconnect: resilience.reconnect
        })
      })).pipe(
        Effect.provideService(GuestRam.GuestRam, ram),
        Effect.provide([Transport.layer, environment(timing), channelThreads(uri, compression)])
      )
      yield* Report.print({ role: "send", input, pageSize: ram.pageSize, stats, status: yield* status.get }, reporting)
    })).pipe(Log.withReporting(reporting))
).pipe(
  Command.withDescription(
    "Migrate the RAM image in --in to a destination listening at <uri>, or with --to-qemu the VM in --vm into QEMU."
  )
)
