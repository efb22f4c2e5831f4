/**
 * `multifd recv <uri> --from-qemu --channels N [--compression none|zlib|zstd] (--out FILE | --out-dir DIR)`:
 * waits for one migration from an unmodified QEMU (capability multifd, `multifd-channels` N) and writes the
 * guest's RAM: the blocks concatenated in QEMU's order (`--out`), or one file per block (`--out-dir`, named by
 * `QemuIncoming.blockFileName`). Nothing is written unless the migration completed; each file goes through a
 * temporary file renamed into place.
 *
 * QEMU announces neither its channel count nor its compression, so `--channels` and `--compression` are what
 * QEMU was told (`migrate-set-parameters multifd-channels / multifd-compression`).
 *
 * This module is the command's body, independent of option parsing: `recv.ts` calls `run` when `--from-qemu`
 * is given.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Fs from "node:fs/promises"
import * as Path from "node:path"
import type * as Protocol from "../Protocol.js"
import * as QemuIncoming from "../QemuIncoming.js"
import * as Transport from "../Transport.js"
import { UsageError } from "./errors.js"
import * as Image from "./image.js"
import type * as Options from "./options.js"
import * as Progress from "./progress.js"
import * as Report from "./report.js"
import * as Terminal from "./terminal.js"

/** What `recv --from-qemu` is asked to do. */
export interface Args {
  readonly uri: Transport.Address
  /** QEMU's `multifd-channels`. */
  readonly channels: number
  /** QEMU's `multifd-compression` (default none). */
  readonly compression?: Protocol.Compression | undefined
  /** Target page size when QEMU's stream does not say (default 4096). */
  readonly pageSize?: number | undefined
  /** One file: the blocks concatenated in order. */
  readonly out?: string | undefined
  /** One file per block in this directory (created if missing). */
  readonly outDir?: string | undefined
  /** TLS on QEMU's connections (server side, as QEMU's `tls-creds` on the source). */
  readonly tls?: QemuIncoming.Options["tls"]
  readonly timing: Options.Timing
  readonly reporting: Options.Reporting
  /** Where the "listening" line goes (default: stderr, as plain `recv`). */
  readonly onListening?: ((address: Transport.Address) => Effect.Effect<void>) | undefined
}


/** Runs `recv --from-qemu`. Usage problems (no output, both outputs) fail with `UsageError` before listening. */
export const run = (args: Args) =>
  Effect.scoped(Effect.gen(function*() {
    if ((args.out === undefined) === (args.outDir === undefined)) {
      return yield* new UsageError({ detail: "--from-qemu needs exactly one of --out FILE or --out-dir DIR" })
    }
    // --out: its temporary file first, so an unwritable destination fails before anything listens
    const single = args.out === undefined ? undefined : yield* Image.create(args.out)
    if (args.outDir !== undefined) {
      const dir = args.outDir
      yield* Effect.tryPromise({
        try: () => Fs.mkdir(dir, { recursive: true }),
        catch: (cause) =>
          new Image.ImageError({ reason: "Unusable", path: dir, detail: `cannot create the directory: ${String(cause)}`, cause })
      })
    }
    const terminal = yield* Terminal.Terminal
    const timeout = args.timing.timeout
    const received = yield* Effect.scoped(Effect.gen(function*() {
      const onProgress = yield* Progress.make("recv", args.reporting)
      return yield* QemuIncoming.listenAndReceive(args.uri, {
        channels: args.channels,
        compression: args.compression,
        pageSize: args.pageSize,
        // --timeout also bounds how long a new connection has to prove itself QEMU's (as plain recv)
        timeouts: timeout._tag === "Some" ? { peer: timeout.value, connect: timeout.value, handshake: timeout.value } : {},
        onListening: args.onListening ??
          ((address) => terminal.err(`multifd: listening on ${Transport.formatAddress(address)}`)),
        tls: args.tls,
        onProgress
      })
    })).pipe(Effect.provide(Transport.layer))
    const { ram, stats } = received
    let output: string
    if (single !== undefined) {
      yield* single.commit(ram.blocks.map((block) => block.bytes))
      output = single.path
    } else {
      const dir = args.outDir!
      for (const block of ram.blocks) {
        const file = yield* Image.create(Path.join(dir, QemuIncoming.blockFileName(block.name)))
        yield* file.commit([block.bytes])
      }
      output = dir
    }
    yield* Report.print({ role: "recv", output, pageSize: ram.pageSize, stats, rejected: received.rejected }, args.reporting)
    return received
  }))
