/**
 * `multifd recv <uri> --from-qemu --channels N [--compression none|zlib|zstd] (--out FILE | --out-dir DIR | --vm FILE)`:
 * waits for one migration from an unmodified QEMU (capability multifd, `multifd-channels` N; N = 0 for QEMU
 * without multifd) and writes the guest's RAM: the blocks concatenated in QEMU's order (`--out`), one file per
 * block (`--out-dir`, named by `QemuIncoming.blockFileName`), or the whole VM — RAM, configuration and device
 * state — as a QEMU 10 mapped-ram migration file (`--vm`, `MappedRam.write`), which QEMU resumes from and
 * `send --to-qemu` migrates into QEMU. With a `file:PATH` uri it reads a file QEMU's `migrate file:` wrote
 * (mapped-ram, or a plain stream) instead of listening. Nothing is written unless the migration completed; each
 * file goes through a temporary file renamed into place. A QEMU with capability return-path is told that the
 * migration succeeded only once the output is written (`QemuIncoming.Options.persist`): a write that fails
 * (a full disk) fails QEMU's migration too, and its source keeps the VM.
 *
 * QEMU announces neither its channel count nor its compression, so `--channels` and `--compression` are what
 * QEMU was told (`migrate-set-parameters multifd-channels / multifd-compression`).
 *
 * This module is the command's body, independent of option parsing: `recv.ts` calls `run` when `--from-qemu`
 * is given.
 *
 * @since 0.1.0
 */
import * as Cause from "effect/Cause"
import * as Chunk from "effect/Chunk"
import * as Clock from "effect/Clock"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import type * as Scope from "effect/Scope"
import * as FsSync from "node:fs"
import * as Fs from "node:fs/promises"
import * as Path from "node:path"
import type * as GuestRam from "../GuestRam.js"
import * as FileIo from "../internal/native/fileIo.js"
import * as MappedRam from "../MappedRam.js"
import * as MigrationConfig from "../MigrationConfig.js"
import * as Protocol from "../Protocol.js"
import * as QemuIncoming from "../QemuIncoming.js"
import * as QemuVm from "../QemuVm.js"
import * as Transfer from "../Transfer.js"
import * as Transport from "../Transport.js"
import { oneLine, UsageError } from "./errors.js"
import * as Image from "./image.js"
import type * as Options from "./options.js"
import * as Progress from "./progress.js"
import * as Report from "./report.js"
import { environment } from "./settings.js"
import * as Terminal from "./terminal.js"

/** What `recv --from-qemu` is asked to do. */
export interface Args {
  readonly uri: Transport.Address
  /** QEMU's `multifd-channels` (0: QEMU without multifd; ignored for a file). */
  readonly channels: number
  /** QEMU's `multifd-compression` (default none). */
  readonly compression?: Protocol.Compression | undefined
  /** Target page size when QEMU's stream does not say (default 4096). */
  readonly pageSize?: number | undefined
  /** One file: the blocks concatenated in order. */
  readonly out?: string | undefined
  /** One file per block in this directory (created if missing). */
  readonly outDir?: string | undefined
  /** The whole VM, as a QEMU mapped-ram migration file. */
  readonly vm?: string | undefined
  /** QEMU's `-uuid`: channels of another are turned away (default: the configuration's, else the first channel's). */
  readonly uuid?: Uint8Array | undefined
  /** A QEMU source with capability postcopy-ram: refused (default), or its precopy migration taken (`QemuIncoming`). */
  readonly postcopyRam?: "refuse" | "precopy" | undefined
  /** TLS on QEMU's connections (server side, as QEMU's `tls-creds` on the source). */
  readonly tls?: QemuIncoming.Options["tls"]
  readonly timing: Options.Timing
  readonly reporting: Options.Reporting
  /** Where the "listening" line goes (default: stderr, as plain `recv`). */
  readonly onListening?: ((address: Transport.Address) => Effect.Effect<void>) | undefined
}


/** What was received, from QEMU or from a file QEMU wrote. */
interface Received {
  readonly incoming: QemuIncoming.Incoming
  /** The VM, when asked for. */
  readonly vm: QemuVm.QemuVm | undefined
}

/** The stats of a file read (no channels, no wire): what `--json` reports for `recv file:PATH --from-qemu`. */
const fileStats = (read: MappedRam.Read, durationMs: number): QemuIncoming.Stats => {
  const { summary, vm } = read
  const pages = vm.ram.size / vm.ram.pageSize
  // (QEMU's -uuid, when its capability validate-uuid put it in the configuration: the file has no channels)
  const uuid = summary.configuration?.uuid === undefined ? undefined : Protocol.formatUuid(summary.configuration.uuid)
  return {
    uuid: uuid ?? "",
    channels: 0,
    compression: "none",
    ramBytes: vm.ram.size,
    rounds: 0,
    pagesPerRound: [],
    downtimeMs: 0,
    packets: 0,
    syncs: 0,
    normalPages: read.pages,
    zeroPages: pages - read.pages,
    wireBytes: summary.bytes,
    durationMs,
    gibPerSecond: Transfer.gibPerSecond(vm.ram.size, durationMs),
    qemu: {
      machine: summary.configuration?.machine,
      configurationUuid: uuid,
      blocks: summary.blocks,
      flushes: summary.flushes,
      mainZeroPages: summary.zeroPages,
      mainNormalPages: summary.normalPages,
      commands: summary.commands,
      returnPath: false,
      mainBytes: summary.bytes,
      deviceStateBytes: summary.deviceStateBytes,
      devices: summary.devices
    }
  }
}

/**
 * The directories each `outputDirectory` created and will remove unless the command succeeds (top first), for
 * `removeDirectoriesNow`.
 */
const createdDirectories = new Set<Array<string>>()

/** Removes the directories created (top first), deepest first, each only if empty: one that is not stays, with its parents. */
const removeCreated = (made: ReadonlyArray<string>): void => {
  for (const d of [...made].reverse()) {
    try {
      FsSync.rmdirSync(d)
    } catch {
      return // not empty (or gone): it and its parents stay
    }
  }
}

/**
 * Removes, synchronously, the `--out-dir` directories created and not yet kept, each only if empty: for a process
 * about to exit without closing its scopes (a second signal, `signals.ts`), after its temporary files are gone.
 */
export const removeDirectoriesNow = (): void => {
  for (const made of createdDirectories) removeCreated(made)
  createdDirectories.clear()
}

/**
 * Creates `dir` for `--out-dir` if it is missing (with its missing parents), and fsyncs the parent of every
 * directory it created: a new directory's entry is in its parent, and only the parent's fsync makes it survive a
 * crash (syncing `dir` after the blocks' renames keeps the files' entries, not `dir`'s own). When the scope closes
 * without success, the directories it created are removed again, deepest first, each only if empty (`rmdir`):
 * nothing that existed before is touched, nor anything that came into them.
 *
 * @internal
 */
export const outputDirectory = (dir: string): Effect.Effect<void, Image.ImageError, Scope.Scope> =>
  Effect.gen(function*() {
    const made: Array<string> = []
    yield* Effect.acquireRelease(
      Effect.sync(() => createdDirectories.add(made)),
      (_, exit) =>
        Effect.sync(() => {
          createdDirectories.delete(made)
          if (Exit.isFailure(exit)) removeCreated(made)
        })
    )
    yield* Effect.tryPromise({
      try: () => makeDirectories(dir, made),
      catch: (cause) =>
        new Image.ImageError({ reason: "Unusable", path: dir, detail: `cannot create the directory: ${FileIo.describe(cause)}`, cause })
    })
    yield* Effect.forEach(made, (d) => Image.syncDirectory(Path.dirname(d)), { discard: true })
  })

/**
 * Says which block files in `dir` are not this migration's (`NAME.img` left by a migration of another VM, whose
 * blocks had other names): the directory holds a mix of two VMs' blocks, and nothing else would tell. They are
 * left as they are: they are the user's files.
 */
const warnOtherBlocks = (dir: string, paths: ReadonlyArray<string>): Effect.Effect<void> =>
  Effect.promise(() => Fs.readdir(dir).catch(() => [] as Array<string>)).pipe(
    Effect.flatMap((names) => {
      const ours = new Set(paths.map((path) => Path.basename(path)))
      const others = names.filter((name) => name.endsWith(".img") && !ours.has(name)).sort()
      return others.length === 0 ? Effect.void : Effect.logWarning(
        `--out-dir ${dir}: ${others.join(", ")} ${others.length === 1 ? "is no block" : "are no blocks"} of this ` +
          `migration (left by an earlier one?); ${others.length === 1 ? "it was" : "they were"} left as ${others.length === 1 ? "it was" : "they were"}`
      )
    })
  )

/**
 * Whether this process may create files in `dir` (its permissions, a read-only file system), and open it for the
 * fsync that makes their renames durable (a drop box, written in but not read, cannot be synced).
 */
const writableDirectory = (dir: string): Effect.Effect<void, Image.ImageError> =>
  Effect.zipRight(
    Effect.tryPromise({
      try: () => Fs.access(dir, Fs.constants.W_OK | Fs.constants.X_OK),
      catch: (cause) =>
        new Image.ImageError({ reason: "Unusable", path: dir, detail: `cannot write in the directory: ${FileIo.describe(cause)}`, cause })
    }),
    Effect.tryPromise({
      try: () => Fs.access(dir, Fs.constants.R_OK),
      catch: (cause) =>
        new Image.ImageError({
          reason: "Unusable",
          path: dir,
          detail: `cannot open the directory to sync it (which makes the files durable): ${FileIo.describe(cause)}`,
          cause
        })
    })
  )

/**
 * Why the file in `dir` of one of the blocks `names` (the block files of `--out-dir`, known once QEMU announced its
 * blocks) cannot be written, if one exists and is not a regular file (a directory, a FIFO) or cannot be replaced by a
 * rename (`FileIo.unreplaceable`: a mount point, an immutable file...), or its name is longer than the file system
 * takes: as `--out`'s, refused before QEMU sends a page, not once it sent them all (`Image.create`, when the blocks
 * are stored, refuses it too).
 */
const notAFile = (dir: string, names: ReadonlyArray<string>): string | undefined => {
  for (const name of names) {
    const file = QemuIncoming.blockFileName(name)
    const path = Path.join(dir, file)
    let stat: FsSync.Stats | undefined
    try {
      stat = FsSync.statSync(path, { throwIfNoEntry: false })
    } catch (error) {
      // a name longer than the file system takes (its bytes outside [A-Za-z0-9._@+-] three each): its file could
      // not be renamed into place once QEMU had sent everything
      if (FileIo.errorCode(error) === "ENAMETOOLONG") {
        return `${dir}: the file of block ${JSON.stringify(name)} would be named with ${Buffer.byteLength(file)} bytes ` +
          `(${file.length > 40 ? `${file.slice(0, 40)}...` : file}), longer than a file name may be here`
      }
      continue // a link loop, a path it may not look at: the create says so
    }
    if (stat !== undefined && !stat.isFile()) return `${path}: exists and is not a regular file`
    // nor one that no rename can replace (a mount point, an immutable file, another user's in a sticky directory)
    const refused = stat === undefined ? undefined : FileIo.unreplaceable(path, stat)
    if (refused !== undefined) return `${path}: ${FileIo.describeUnsafe(path, refused)}`
  }
  return undefined
}

/**
 * `mkdir -p dir`, one directory at a time (mode 0775 before the umask: never writable by others), pushing each it
 * made onto `made` (top first). Node's recursive mkdir
 * turns most errors into ENOENT (a read-only file system, one out of inodes: "no such file or directory" of a
 * parent that exists); a plain mkdir says what went wrong.
 */
const makeDirectories = async (dir: string, made: Array<string>): Promise<void> => {
  const missing: Array<string> = []
  for (let d = Path.resolve(dir); ; d = Path.dirname(d)) {
    const stat = await Fs.stat(d).catch((error: unknown) => {
      if (FileIo.errorCode(error) === "ENOENT") return undefined
      throw error
    })
    if (stat !== undefined) {
      if (stat.isDirectory()) break
      throw Object.assign(new Error(`${d}: not a directory`), { code: "ENOTDIR" })
    }
    missing.push(d)
    if (Path.dirname(d) === d) break
  }
  for (const d of missing.reverse()) {
    try {
      // never writable by others, whatever the umask (under umask 000, any local user could remove or replace a block's
      // file there, as the Unix socket recv listens on never lets them): owner and group get what the umask gives
      await Fs.mkdir(d, { mode: 0o775 })
      made.push(d)
    } catch (error) {
      // made meanwhile by another process: fine if it is a directory
      if (FileIo.errorCode(error) !== "EEXIST" || !(await Fs.stat(d).then((s) => s.isDirectory(), () => false))) throw error
    }
  }
}

/**
 * A failure to store what arrived, as a failed migration (exit 1) whatever step it came at. The outputs were checked
 * before anything was received (`--out-dir` made and writable, `--vm`'s temporary file made and removed); a block's
 * or the VM's file that cannot be created once all arrived is the disk's doing (its file system remounted read-only
 * after an error, the directory removed meanwhile), not the command line's: it exited 2, bad usage, with QEMU's
 * migration over.
 */
const storeFailure = <E extends Image.ImageError | MappedRam.MappedRamError>(error: E): Image.ImageError | MappedRam.MappedRamError =>
  error.reason === "Io" || (error._tag === "MappedRamError" && error.reason !== "Unusable")
    ? error
    : error._tag === "ImageError"
    ? new Image.ImageError({ reason: "Io", path: error.path, detail: error.detail, cause: error.cause })
    : new MappedRam.MappedRamError({ reason: "Io", path: error.path, detail: error.detail, cause: error.cause })

/** qemu_strtosz's units: a size may end in one letter (`1M`, `1m`). */
const UNITS: Readonly<Record<string, number>> = { b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 }

/**
 * A `file:` uri's path as QEMU's `migrate file:` reads it (`file_parse_offset`): `PATH[,offset=N]`, N a size as
 * QEMU takes it (decimal or 0x hex, an optional unit letter B K M G T P E), where QEMU wrote its stream.
 */
export const qemuFileSpec = (
  spec: string,
  /** How the command's user gave it, in the error (default `file:SPEC`). */
  named = `file:${spec}`
): Effect.Effect<{ readonly path: string; readonly offset: number | undefined }, UsageError> => {
  const at = spec.indexOf(",offset=")
  // (no offset: at the start, or after a libvirt save image's header, `MappedRam.open` finds where)
  if (at < 0) return Effect.succeed({ path: spec, offset: undefined })
  const text = spec.slice(at + ",offset=".length)
  const m = /^(0x[0-9a-f]+|[0-9]+)([bkmgtpe])?$/i.exec(text)
  const offset = m === null ? Number.NaN : Number(m[1]!) * UNITS[(m[2] ?? "b").toLowerCase()]!
  if (m !== null && !Number.isSafeInteger(offset)) {
    // a size QEMU takes (`1E`, a u64), which no file reaches: said exactly, as what is wrong with it
    const exact = BigInt(m[1]!) * BigInt(UNITS[(m[2] ?? "b").toLowerCase()]!)
    return Effect.fail(
      new UsageError({
        detail: `file:${spec}: file offset '${text}' is ${exact} bytes, past the end of any file (at most ` +
          `${Number.MAX_SAFE_INTEGER})`
      })
    )
  }
  if (!Number.isSafeInteger(offset)) {
    return Effect.fail(
      new UsageError({
        detail: `${named}: invalid file offset '${text}' (QEMU's migrate file:PATH,offset=N: N in bytes, ` +
          "decimal or 0x hex, or with a unit: 1M)"
      })
    )
  }
  return Effect.succeed({ path: spec.slice(0, at), offset })
}

/**
 * A file without QEMU's stream where it was looked for, but with one further on (`MappedRamError.streamAt`): the
 * error says how to name the file so that it is read from there (`give(N)`: `file:PATH,offset=N`).
 */
export const streamElsewhere = (give: (at: number) => string) => (error: MappedRam.MappedRamError): MappedRam.MappedRamError =>
  error.streamAt === undefined
    ? error
    : new MappedRam.MappedRamError({
      reason: error.reason,
      path: error.path,
      detail: `${error.detail}: give ${give(error.streamAt)}`,
      cause: error.cause,
      streamAt: error.streamAt
    })

/**
 * Runs `recv --from-qemu`. Usage problems (no output, two outputs, an unwritable one) fail with `UsageError` or
 * `ImageError` before anything listens.
 */
export const run = (args: Args) =>
  Effect.scoped(Effect.gen(function*() {
    const outputs = [args.out, args.outDir, args.vm].filter((o) => o !== undefined).length
    if (outputs !== 1) {
      return yield* new UsageError({ detail: "--from-qemu needs exactly one of --out FILE, --out-dir DIR or --vm FILE" })
    }
    // a file QEMU wrote, as QEMU names it: file:PATH or file:PATH,offset=N (migrate file: wrote its stream at N)
    const fileSpec = args.uri._tag === "File" ? yield* qemuFileSpec(args.uri.path) : undefined
    const uri: Transport.Address = fileSpec === undefined ? args.uri : { _tag: "File", path: fileSpec.path }
    if (uri._tag === "File") {
      for (const [flag, path] of [["--out", args.out], ["--vm", args.vm]] as const) {
        if (path !== undefined && Image.sameFile(uri.path, path)) {
          return yield* new UsageError({ detail: `file:${uri.path} and ${flag} ${path} are the same file: the output would replace QEMU's` })
        }
      }
    }
    // the file read kept whatever its name (OUT.<pid>.partial is no stale temporary file of the output)
    if (uri._tag === "File") yield* Image.markInput(uri.path)
    // --out: its temporary file first, so an unwritable destination fails before anything listens
    const single = args.out === undefined ? undefined : yield* Image.create(args.out)
    // --vm: the same check, its temporary file removed at once (MappedRam.write makes its own); whether that one is
    // renamed into place, which the command says if it is interrupted once it was
    if (args.vm !== undefined) yield* Effect.scoped(Image.create(args.vm))
    const vmPublished = args.vm === undefined ? undefined : yield* Image.publishedFromNow(args.vm)
    // --out-dir: the blocks' files, as they are written
    const blockFiles: Array<Image.Output> = []
    if (args.outDir !== undefined) {
      yield* outputDirectory(args.outDir)
      // as --out's temporary file: a directory that cannot take the blocks' files fails now, not after QEMU sent
      // them all (and stopped its VM for good)
      yield* writableDirectory(args.outDir)
    }
    const terminal = yield* Terminal.Terminal
    const timeout = args.timing.timeout
    const output = single !== undefined ? single.path : args.vm !== undefined ? args.vm : args.outDir!
    // a signal that comes once the output is in place (its rename lets it finish), or a failure after it (QEMU gone
    // before it heard), still ends the command as it would have; but the user hears that the output is there, the
    // older one gone, as plain recv says it (not when storing it failed, a directory that could not be synced after
    // the rename: that error says so). When only the --json result could not be written (`| true`), the error alone
    // read as a failed receive: the user hears that the output is there as well
    const stored: Effect.Effect<boolean> = single !== undefined
      ? single.committed
      : vmPublished !== undefined
      ? vmPublished
      : Effect.map(Effect.forEach(blockFiles, (file) => file.committed), (all) => all.length > 0 && all.every(Boolean))
    const storedWhat = single !== undefined ? "image" : args.vm !== undefined ? "VM" : "blocks"
    yield* Effect.addFinalizer((exit) =>
      Exit.isFailure(exit) && !Cause.failures(exit.cause).pipe(Chunk.some((error) =>
          error instanceof Image.ImageError || error instanceof MappedRam.MappedRamError
        ))
        ? Effect.flatMap(stored, (done) =>
          done
            ? terminal.err(oneLine(
              `multifd: ${output} holds the received ${storedWhat}: ${
                Cause.failures(exit.cause).pipe(Chunk.some((error) => error instanceof Terminal.OutputError))
                  ? "it was stored; only the --json result could not be written"
                  : `it was stored before the ${Exit.isInterrupted(exit) ? "interruption" : "migration failed"}`
              }`
            ))
            : Effect.void)
        : Effect.void
    )
    // how long --out-dir waits for another command publishing its blocks in that directory
    const publishPatience = Duration.toMillis(Option.getOrElse(timeout, () => Duration.decode(Transfer.defaultTimeouts.peer)))
    /** Writes what arrived where the user asked (for QEMU: before it is told that this side has the VM). */
    const persist = (ram: GuestRam.GuestRam["Type"], vm: QemuVm.QemuVm | undefined) =>
      Effect.gen(function*() {
        if (single !== undefined) return yield* single.commit(ram.blocks.map((block) => block.bytes))
        // its warnings heard: a temporary file it could not remove is named (a hard link's, said by the check before
        // anything was read, is said once of a file; a killed process's temporary file the check removed already)
        if (args.vm !== undefined) {
          return yield* Effect.asVoid(MappedRam.write(args.vm, vm!).pipe(Effect.mapError(storeFailure)))
        }
        // every block written and flushed first, then all renamed at once: never a directory of this migration's
        // blocks beside another's (an interruption or a full disk at one block leaves the older files as they were)
        const dir = args.outDir!
        // a block's file may be the very file read (file:DIR/pc.ram.img --out-dir DIR): it would replace QEMU's
        const paths = ram.blocks.map((block) => Path.join(dir, QemuIncoming.blockFileName(block.name)))
        const input = uri._tag === "File" ? uri.path : undefined
        const clash = input === undefined ? undefined : paths.find((path) => Image.sameFile(input, path))
        if (clash !== undefined) {
          return yield* new UsageError({
            detail: `file:${input} and --out-dir ${dir}: a block's file ${clash} is the same file: the output would replace QEMU's`
          })
        }
        yield* Effect.scoped(Effect.gen(function*() {
          const files = blockFiles
          for (const [i, path] of paths.entries()) {
            const file = yield* Image.create(path)
            yield* file.write([ram.blocks[i]!.bytes])
            files.push(file)
          }
          // never while another command renames its blocks into this directory: all of one's, or all of the other's
          yield* Image.lockForPublish(dir, publishPatience)
          // all or none: a block that cannot be renamed into place puts back the ones renamed before it
          yield* Image.publishAll(files)
        }).pipe(Effect.mapError(storeFailure)))
        yield* warnOtherBlocks(dir, paths)
      })
    /**
     * Why the blocks will not go where they are to be written, if they will not: --out and --out-dir write every byte
     * of them, refused now if they will not fit, not after the whole migration (or the whole file's read). --vm writes
     * a sparse file, whose disk space the blocks do not tell; but each block has its place in it, so the file is at
     * least as long as they are, which a file size limit (ulimit -f) caps.
     */
    const admit = (blocks: ReadonlyArray<{ readonly name: string; readonly size: number }>) => {
      const bytes = blocks.reduce((n, block) => n + block.size, 0)
      return single !== undefined
        ? single.tooBig(bytes)
        : args.outDir !== undefined
        ? notAFile(args.outDir, blocks.map((block) => block.name)) ??
          Image.beyondFileSizeLimit(args.outDir, Math.max(...blocks.map((b) => b.size)), "a block's file") ??
          Image.wontFit(args.outDir, args.outDir, bytes)
        : Image.beyondFileSizeLimit(args.vm!, bytes, "the VM's file")
    }
    const received: Received = uri._tag === "File"
      ? yield* Effect.gen(function*() {
        const start = yield* Clock.currentTimeMillis
        // MULTIFD_MAX_RAM bounds the memory a file makes this process allocate, as it bounds a source's (and a
        // snapshot's); the outputs are held to the blocks as a QEMU source's are when it announces them, before a page
        // is read
        const settings = yield* MigrationConfig.MigrationConfig
        const read = yield* Effect.scoped(Effect.gen(function*() {
          const opened = yield* MappedRam.open(uri.path, {
            pageSize: args.pageSize,
            offset: fileSpec?.offset,
            maxRamBytes: settings.maxRamBytes
          }).pipe(Effect.mapError(streamElsewhere((at) => at === 0 ? `file:${uri.path}, without an offset` : `file:${uri.path},offset=${at}`)))
          const refused = admit(opened.vm.ram.blocks.map((block) => ({ name: block.name, size: block.bytes.length })))
          if (refused !== undefined) {
            return yield* new MappedRam.MappedRamError({ reason: "TooLarge", path: uri.path, detail: `not stored: ${refused}` })
          }
          for (const block of opened.vm.ram.blocks) yield* opened.load(block, 0, block.pages)
          return { vm: opened.vm, summary: opened.summary, pages: opened.pages }
        }))
        const stats = fileStats(read, (yield* Clock.currentTimeMillis) - start)
        yield* persist(read.vm.ram, read.vm)
        return { incoming: { ram: read.vm.ram, vm: read.vm, stats, rejected: [] }, vm: read.vm }
      }).pipe(Effect.provide(environment(args.timing)))
      : yield* Effect.scoped(Effect.gen(function*() {
        const onProgress = yield* Progress.make("recv", args.reporting)
        // the settings without a flag from the environment, as plain recv has them (MULTIFD_ACCEPT_TIMEOUT,
        // MULTIFD_MAX_RAM, MULTIFD_TIMEOUT...): ignored here, a script's MULTIFD_ACCEPT_TIMEOUT=1m waited for QEMU for
        // ever, and a bad value went unnoticed
        const settings = yield* MigrationConfig.MigrationConfig
        const incoming = yield* QemuIncoming.listenAndReceive(uri, {
          channels: args.channels,
          compression: args.compression,
          pageSize: args.pageSize,
          uuid: args.uuid,
          postcopyRam: args.postcopyRam,
          // --timeout also bounds how long a new connection has to prove itself QEMU's (as plain recv)
          timeouts: timeout._tag === "Some"
            ? { peer: timeout.value, connect: timeout.value, handshake: timeout.value }
            : settings.timeouts ?? {},
          onListening: args.onListening ??
            ((address) => terminal.err(Report.listeningLine(address))),
          tls: args.tls,
          onProgress,
          vm: args.vm !== undefined,
          admit,
          // written before QEMU is told that this side has the VM: a full disk then fails QEMU's migration too
          persist: ({ ram, vm }) => persist(ram, vm),
          acceptTimeout: settings.acceptTimeout,
          maxRamBytes: settings.maxRamBytes
        })
        return { incoming, vm: incoming.vm }
      })).pipe(Effect.provide([Transport.layer, environment(args.timing)]))
    const { ram, stats } = received.incoming
    yield* Report.print(
      {
        role: "recv",
        output,
        pageSize: ram.pageSize,
        stats,
        rejected: received.incoming.rejected,
        read: uri._tag === "File" ? { kind: "qemu", path: uri.path } : undefined
      },
      args.reporting
    )
    return received.incoming
  }))
