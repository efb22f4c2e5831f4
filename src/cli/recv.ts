/**
 * `multifd recv <uri> --out <file>`: waits for one migration and writes the received RAM image.
 *
 * The source decides the layout, page size, channel count and compression (its hello carries them). Values
 * given on the recv command line are expectations: the destination refuses a source that uses others (the
 * source fails with the reason) and writes nothing. With `--from-qemu` the peer is an unmodified QEMU (or a
 * file QEMU wrote) and `fromQemu.ts` does the work; with a `file:` uri a snapshot file is restored.
 *
 * @since 0.1.0
 */
import * as Command from "@effect/cli/Command"
import * as Cause from "effect/Cause"
import * as Chunk from "effect/Chunk"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import * as Fs from "node:fs"
import type * as GuestRam from "../GuestRam.js"
import * as Migration from "../Migration.js"
import * as Snapshot from "../Snapshot.js"
import * as MigrationStatus from "../MigrationStatus.js"
import * as Transport from "../Transport.js"
import { oneLine, refuseGiven, UsageError } from "./errors.js"
import * as FromQemu from "./fromQemu.js"
import * as Image from "./image.js"
import * as Options from "./options.js"
import * as Progress from "./progress.js"
import * as Log from "./log.js"
import * as Report from "./report.js"
import { checkCompression, environment, timeoutsOf, tlsOf, warnUnknownVariables, warnUnverifiedQemu } from "./settings.js"
import * as Terminal from "./terminal.js"

/** The line that tells scripts (and tests) where recv listens, printed on stderr as soon as it does. */
export const listeningLine = Report.listeningLine

/** The `recv` subcommand. */
export const command = Command.make(
  "recv",
  {
    uri: Options.uri,
    output: Options.recvOutput,
    transfer: Options.recvTransfer,
    tls: Options.recvTls,
    timing: Options.recvTiming,
    reporting: Options.reporting
  },
  ({ output, reporting, timing, tls: tlsFlags, transfer, uri }) =>
    Effect.scoped(Effect.gen(function*() {
      const terminal = yield* Terminal.Terminal
      yield* warnUnknownVariables()
      const tls = yield* tlsOf(tlsFlags, "recv", uri, timing, output.fromQemu ? "qemu" : "snapshot")
      if (output.fromQemu) {
        // a file QEMU wrote says what it holds: QEMU's channel count and compression are not in it (its mapped-ram
        // file is never compressed). A flag given is refused, their environment variables ignored
        if (uri._tag === "File" && Option.isSome(output.uuid)) {
          return yield* new UsageError({ detail: "--uuid does not apply to a file QEMU wrote (file: --from-qemu): it has no channels" })
        }
        if (uri._tag === "File" && Option.isSome(output.postcopyRam)) {
          return yield* new UsageError({
            detail: "--postcopy-ram does not apply to a file QEMU wrote (file: --from-qemu): postcopy needs a destination"
          })
        }
        if (uri._tag === "File") {
          yield* refuseGiven(transfer.given, "a file QEMU wrote (file: --from-qemu)", {
            "--channels": "its pages are read whatever channels wrote them",
            "--compression": "QEMU writes its pages uncompressed"
          })
        }
        if (uri._tag !== "File" && Option.isNone(transfer.channels)) {
          return yield* new UsageError({
            detail: "--from-qemu needs --channels N (QEMU's multifd-channels; 0 for QEMU without multifd)"
          })
        }
        // without multifd every page comes uncompressed on the main channel: --compression is refused, MULTIFD_COMPRESSION
        // ignored (as send --to-qemu --channels 0)
        const withoutMultifd = uri._tag !== "File" && Option.contains(transfer.channels, 0)
        if (withoutMultifd && transfer.given.has("--compression") && Option.isSome(transfer.compression) && transfer.compression.value !== "none") {
          return yield* new UsageError({
            detail: `--compression ${transfer.compression.value} is QEMU's multifd-compression: with --channels 0 (QEMU ` +
              "without multifd) every page comes uncompressed on the main channel"
          })
        }
        const compression = uri._tag === "File" || withoutMultifd ? undefined : Option.getOrUndefined(transfer.compression)
        if (uri._tag !== "File") yield* checkCompression(compression)
        if (uri._tag !== "File" && tls !== undefined) yield* warnUnverifiedQemu(tls.settings)
        yield* FromQemu.run({
          uri,
          channels: Option.getOrElse(transfer.channels, () => 0),
          compression,
          pageSize: Option.getOrUndefined(transfer.pageSize),
          out: Option.getOrUndefined(output.out),
          outDir: Option.getOrUndefined(output.outDir),
          vm: Option.getOrUndefined(output.vm),
          uuid: Option.getOrUndefined(output.uuid),
          postcopyRam: Option.getOrUndefined(output.postcopyRam),
          tls: tls?.settings,
          timing,
          reporting
        })
        return
      }
      // a snapshot's pages are read whatever writers saved them (send file: --channels): the count is no
      // expectation of the restore. Given, it is refused; MULTIFD_CHANNELS, set for migrations, ignored
      if (uri._tag === "File") {
        yield* refuseGiven(transfer.given, "restoring a file: snapshot", {
          "--channels": "its pages are read whatever writers saved them"
        })
      }
      if (uri._tag !== "File" && Option.isSome(transfer.channels) && transfer.channels.value === 0) {
        return yield* new UsageError({ detail: `${Options.checkChannels(0)} (0 goes with --from-qemu: QEMU without multifd)` })
      }
      // a snapshot is never compressed (send file: refuses compression): another method given is refused, and
      // MULTIFD_COMPRESSION, set for migrations, ignored
      const compression = uri._tag === "File" && !transfer.given.has("--compression") ? Option.none() : transfer.compression
      if (uri._tag === "File" && Option.isSome(compression) && compression.value !== "none") {
        return yield* new UsageError({ detail: `compression ${compression.value} does not apply to a file: snapshot` })
      }
      yield* checkCompression(Option.getOrUndefined(compression))
      if (Option.isSome(output.outDir)) return yield* new UsageError({ detail: "--out-dir goes with --from-qemu; use --out FILE" })
      if (Option.isSome(output.vm)) return yield* new UsageError({ detail: "--vm goes with --from-qemu (or send --to-qemu)" })
      if (Option.isSome(output.uuid)) return yield* new UsageError({ detail: "--uuid goes with --from-qemu (QEMU's -uuid)" })
      if (Option.isSome(output.postcopyRam)) {
        return yield* new UsageError({ detail: "--postcopy-ram goes with --from-qemu (a QEMU source's capability postcopy-ram)" })
      }
      if (Option.isNone(output.out)) return yield* new UsageError({ detail: "recv needs --out FILE" })
      const out = output.out.value
      if (uri._tag === "File" && Image.sameFile(uri.path, out)) {
        return yield* new UsageError({ detail: `file:${uri.path} and --out ${out} are the same file: the image would replace the snapshot` })
      }
      // the image is stored while recv listens, and closing a Unix listener unlinks its path: stored there, the
      // image was removed after both sides reported success
      if (uri._tag === "Unix" && (yield* Image.writesAt(out, uri.path))) {
        return yield* new UsageError({
          detail: `unix:${uri.path} and --out ${out} are one path: closing the socket recv listens on would remove the image`
        })
      }
      // the temporary file first: an unwritable --out fails before anything listens (the snapshot kept whatever its
      // name: OUT.<pid>.partial is no stale temporary file of --out)
      if (uri._tag === "File") yield* Image.markInput(uri.path)
      const image = yield* Image.create(out)
      // a signal that comes once the image is in place (the source told, when there is one) still ends the
      // command with the signal's code, and a source that aborts once it is (interrupted before it heard Done)
      // fails the migration; the user hears that the image is there all the same (it replaced what was at --out)
      // (not when storing it failed, a directory that could not be synced after the rename: no durable image). When
      // the migration completed and only its --json result could not be written (`| true`), the error alone read as a
      // failed receive: the user hears that the image is there as well
      const storeFailed = (cause: Cause.Cause<unknown>) =>
        Cause.failures(cause).pipe(Chunk.some((error) => error instanceof Image.ImageError))
      const unreported = (cause: Cause.Cause<unknown>) =>
        Cause.failures(cause).pipe(Chunk.some((error) => error instanceof Terminal.OutputError))
      yield* Effect.addFinalizer((exit) =>
        Exit.isFailure(exit) && !storeFailed(exit.cause)
          ? Effect.flatMap(image.committed, (stored) =>
            stored
              ? terminal.err(oneLine(
                `multifd: ${out} holds the verified image: ${
                  unreported(exit.cause)
                    ? "it was stored; only the --json result could not be written"
                    : `it was stored before the ${Exit.isInterrupted(exit) ? "interruption" : "migration failed"}`
                }`
              ))
              : Effect.void)
          : Effect.void
      )
      const commit = (ram: GuestRam.GuestRam["Type"], around?: Migration.Commit) =>
        image.commit(ram.blocks.map((block) => block.bytes), around)
      const status = yield* MigrationStatus.make
      const received = yield* Effect.scoped(Effect.gen(function*() {
        const onProgress = yield* Progress.make("recv", reporting)
        return yield* Migration.listenAndReceive(uri, {
          timeouts: timeoutsOf(timing),
          expect: {
            channels: uri._tag === "File" ? undefined : Option.getOrUndefined(transfer.channels),
            pageSize: Option.getOrUndefined(transfer.pageSize),
            compression: Option.getOrUndefined(compression)
          },
          // memory that will not fit on the disk is refused now, not after the whole transfer
          admit: (proposal) => image.tooBig(proposal.ramBytes),
          upgrade: tls?.server,
          onListening: (address) => terminal.err(listeningLine(address)),
          onProgress,
          status,
          // from a source, the image is written before the destination confirms: the source reports success
          // only once it is in place (a snapshot file is restored, checked below, then written)
          store: uri._tag === "File" ? undefined : commit
        })
      })).pipe(Effect.provide([Transport.layer, environment(timing)]), Effect.catchTag("SnapshotError", rawImageHint))
      const { ram, stats } = received
      // a snapshot was held to the command line's settings and the free space before it was read
      if (uri._tag === "File") yield* commit(ram)
      yield* Report.print(
        {
          role: "recv",
          output: out,
          pageSize: ram.pageSize,
          stats,
          rejected: received.rejected,
          status: yield* status.get,
          read: uri._tag === "File" ? { kind: "snapshot", path: uri.path } : undefined
        },
        reporting
      )
    }).pipe(Log.withReporting(reporting)))
).pipe(
  Command.withDescription(
    "Wait at <uri> for one migration (or restore the file: snapshot) and write the received RAM image to --out."
  )
)

/** The smallest page size of a raw RAM image (every larger one is a multiple of it). */
const RAW_PAGE = 4096
/** A file that starts as no known format does (a PNG, a QEMU stream... are named already). */
const UNKNOWN_START = /\(it starts with [0-9a-f ]+\)$/

/**
 * A file given as a snapshot that is none but looks like a raw RAM image (a whole number of pages, what `recv
 * --out` writes, so the likeliest mix-up): said so, and what takes one.
 */
const rawImageHint = (error: Snapshot.SnapshotError): Effect.Effect<never, Snapshot.SnapshotError> =>
  Effect.flatMap(
    Effect.sync(() => {
      if (error.reason !== "NotASnapshot" || error.path.length === 0) return undefined
      try {
        return Fs.statSync(error.path).size
      } catch {
        return undefined
      }
    }),
    (size) =>
      Effect.fail(
        size === undefined || size === 0 || size % RAW_PAGE !== 0 || !UNKNOWN_START.test(error.detail)
          ? error
          : new Snapshot.SnapshotError({
            reason: error.reason,
            path: error.path,
            detail: `${error.detail}; it looks like a raw RAM image (as recv --out writes: ${size} bytes, a whole number ` +
              `of ${RAW_PAGE}-byte pages, no header): send --in migrates one, send file:SNAPSHOT --in IMAGE saves one as a snapshot`,
            cause: error.cause
          })
      )
  )
