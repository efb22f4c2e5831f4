/**
 * `multifd send <uri> --to-qemu --vm FILE --channels N [--compression none|zlib|zstd] [TLS flags]`: migrates a
 * whole VM — a QEMU mapped-ram migration file, written by `recv --from-qemu --vm` or by QEMU's own `migrate
 * file:` with capability mapped-ram — into an unmodified QEMU 10 listening at <uri> (`-incoming`, capability
 * multifd, the same `multifd-channels` and `multifd-compression`, and the VM's machine options; `--channels 0`:
 * a QEMU without capability multifd, every page on the main channel). It succeeds once QEMU said it loaded the
 * VM; QEMU then runs it.
 *
 * This module is the command's body, independent of option parsing: `send.ts` calls `run` when `--to-qemu`
 * is given.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"
import * as Bandwidth from "../Bandwidth.js"
import * as MappedRam from "../MappedRam.js"
import * as MigrationConfig from "../MigrationConfig.js"
import type * as Protocol from "../Protocol.js"
import * as QemuOutgoing from "../QemuOutgoing.js"
import type * as Tls from "../Tls.js"
import * as Transport from "../Transport.js"
import { UsageError } from "./errors.js"
import * as FromQemu from "./fromQemu.js"
import type * as Options from "./options.js"
import * as Progress from "./progress.js"
import * as Report from "./report.js"
import { channelThreads, environment, timeoutsOf } from "./settings.js"

/** What `send --to-qemu` is asked to do. */
export interface Args {
  readonly uri: Transport.Address
  /** The VM file: `PATH`, or `PATH,offset=N` for one QEMU's `migrate file:PATH,offset=N` wrote at N. */
  readonly vm: string
  /** QEMU's `multifd-channels`; 0: a QEMU without multifd (every page on the main channel). */
  readonly channels: number
  /** QEMU's `multifd-compression`. */
  readonly compression: Protocol.Compression
  readonly compressionLevel?: number | undefined
  /** The channels' bandwidth limit in bytes per second (0 or none: no limit). */
  readonly maxBandwidth?: number | undefined
  /** QEMU's `-uuid` (default: the VM file's, else zeros). */
  readonly uuid?: Uint8Array | undefined
  /** TLS as QEMU's `tls-creds` on the destination (client side). */
  readonly tls?: Tls.Tls["Type"] | undefined
  readonly timing: Options.Timing
  readonly reporting: Options.Reporting
}

/** Why `send --to-qemu` refuses a `file:` uri. */
export const NEEDS_SOCKET = "--to-qemu needs a tcp: or unix: uri (where QEMU listens: -incoming)"

/** Runs `send --to-qemu`. */
export const run = (args: Args) =>
  Effect.gen(function*() {
    const uri = args.uri
    if (uri._tag === "File") {
      return yield* new UsageError({ detail: NEEDS_SOCKET })
    }
    const { stats, vm } = yield* Effect.scoped(Effect.gen(function*() {
      // the pages are read batch by batch into a small window as the channels send the previous ones
      // PATH,offset=N: a file QEMU's migrate file:PATH,offset=N wrote at N, named as recv file: --from-qemu names it
      const file = yield* FromQemu.qemuFileSpec(args.vm, `--vm ${args.vm}`)
      const { readPages, vm } = yield* MappedRam.open(file.path, { offset: file.offset }).pipe(
        Effect.mapError(FromQemu.streamElsewhere((at) => at === 0 ? `--vm ${file.path}, without an offset` : `--vm ${file.path},offset=${at}`))
      )
      const onProgress = yield* Progress.make("send", args.reporting)
      const maxBandwidth = args.maxBandwidth === undefined || args.maxBandwidth === 0
        ? undefined
        : yield* Bandwidth.make(args.maxBandwidth).pipe(Effect.mapError((error) => new UsageError({ detail: error.message })))
      const stats = yield* QemuOutgoing.migrate({
        address: uri,
        vm,
        readPages,
        channels: args.channels,
        compression: args.compression,
        compressionLevel: args.compressionLevel,
        maxBandwidth,
        uuid: args.uuid,
        // (its settings, not an upgrade: a refusal's message can then say what the credentials lack)
        tls: args.tls?.settings,
        // without --timeout, MULTIFD_TIMEOUT, MULTIFD_CONNECT_TIMEOUT and MULTIFD_HANDSHAKE_TIMEOUT, as plain send
        // has them (they were ignored here, a bad one unnoticed)
        timeouts: Option.isSome(args.timing.timeout)
          ? timeoutsOf(args.timing)
          : (yield* MigrationConfig.MigrationConfig).timeouts ?? {},
        onProgress
      })
      return { stats, vm }
    })).pipe(Effect.provide([Transport.layer, environment(args.timing), channelThreads(uri, args.compression)]))
    yield* Report.print({ role: "send", input: args.vm, pageSize: vm.ram.pageSize, stats }, args.reporting)
    return stats
  })
