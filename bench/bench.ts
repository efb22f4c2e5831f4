/**
 * `npm run bench`: migrates SIZE of RAM between two processes over loopback TCP with each channel count and
 * prints GiB/s, CPU seconds and peak RSS of each side; then saves and restores a snapshot file
 * (`bench/snapshot.ts`). Knobs (environment): SIZE (default 1G), CHANNELS (default "1 2 4 8"), REPS
 * (default 1; the table shows the median), COMPRESSIONS (default "none zlib zstd"; rows for zlib/zstd use a
 * 50%-zero image and COMP_CHANNELS, default "2", as QEMU's bench script, at COMPRESSION_LEVEL, default the
 * method's; COMP_IMAGES, default "halfzero", "halfzero program" adds rows on an image of this machine's
 * programs and libraries, `bench/program-image.sh`, which compresses as code and data do), THREADS (default "1": the source's channels on worker threads; "0": on its main thread; "0 1":
 * both, alternating rep by rep), DST_THREADS (default "0": the destination decodes compressed payloads on
 * its main thread, as `multifd recv` does; "1": on worker threads; "0 1": both, alternating as THREADS), TLS (default "psk": a PSK TLS row at
 * TLS_CHANNELS, default 4; TLS= skips it), DST (prefault | fresh, default prefault), FILE (default 1: the
 * snapshot rows at 4 channels; FILE=0 skips them), BANDWIDTH (the --max-bandwidth row: default 64M, BANDWIDTH_SIZE
 * 256M over BANDWIDTH_CHANNELS 4; BANDWIDTH= skips it), PEER_NODE_ARGS (node options for both peers, e.g.
 * `--cpu-prof --cpu-prof-dir=DIR` to profile them).
 */
import * as Either from "effect/Either"
import * as Esbuild from "esbuild"
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Readline from "node:readline"
import * as Url from "node:url"
import * as Bandwidth from "../src/Bandwidth.js"
import { bundleOptions } from "../scripts/bundle.mjs"
import { parseSize } from "./size.js"

const here = Path.dirname(Url.fileURLToPath(import.meta.url))
/**
 * The peers run as plain JavaScript bundled as the `multifd` command is (`scripts/bundle.mjs`: one file with
 * effect inside, the native zstd binding loaded at run time), their digest and channel workers beside them:
 * the numbers are those of the command users run, not those of a TypeScript loader (tsx adds about 40 MiB of
 * RSS and its start-up to each side) or of effect loaded as a few hundred module files (about 24 MiB more
 * RSS and 20 MiB more heap in each process).
 */
const peer = Path.join(here, ".build", "peer.js")
Esbuild.buildSync({
  ...bundleOptions,
  entryPoints: {
    peer: Path.join(here, "peer.ts"),
    digestWorker: Path.join(here, "..", "src", "internal", "native", "digestWorker.ts"),
    channelWorker: Path.join(here, "..", "src", "internal", "threads", "channelWorker.ts")
  },
  outdir: Path.join(here, ".build")
})

const size = parseSize(process.env.SIZE ?? "1G")
/** A rate as --max-bandwidth takes it, in bytes per second. */
const parseRate = (text: string): number => Either.getOrThrowWith(Bandwidth.parse(text), (why) => new Error(why))
const channelCounts = (process.env.CHANNELS ?? "1 2 4 8").split(/\s+/).filter(Boolean).map(Number)
const reps = Number(process.env.REPS ?? 1)
const compressions = (process.env.COMPRESSIONS ?? "none zlib zstd").split(/\s+/).filter(Boolean)
const compChannels = (process.env.COMP_CHANNELS ?? "2").split(/\s+/).filter(Boolean).map(Number)
const compressionLevel = process.env.COMPRESSION_LEVEL
const compImages = (process.env.COMP_IMAGES ?? "halfzero").split(/\s+/).filter(Boolean)
/** Where the program image is built (once a run, when a row needs it). */
const programImage = Path.join(Os.tmpdir(), `multifd-bench-program-${process.pid}.img`)
/** 1: the source's channels on worker threads (ChannelThreads), 0: on its main thread; "0 1" runs both, alternating. */
const threadModes = (process.env.THREADS ?? "1").split(/\s+/).filter(Boolean)
/** 1: the destination's compressed channels decoded on worker threads (ChannelThreads), 0: on its main thread. */
const dstThreadModes = (process.env.DST_THREADS ?? "0").split(/\s+/).filter(Boolean)
const tlsModes = (process.env.TLS ?? "psk").split(/\s+/).filter(Boolean)
const tlsChannels = Number(process.env.TLS_CHANNELS ?? 4)
const dstMode = process.env.DST ?? "prefault"
const withFile = process.env.FILE !== "0"

/** The bandwidth row: BANDWIDTH (default 64M; BANDWIDTH= skips it) over BANDWIDTH_CHANNELS (4), BANDWIDTH_SIZE (256M). */
const bandwidth = process.env.BANDWIDTH ?? "64M"
const bandwidthSize = parseSize(process.env.BANDWIDTH_SIZE ?? "256M")
const bandwidthChannels = Number(process.env.BANDWIDTH_CHANNELS ?? 4)

interface Result {
  readonly durationMs: number
  readonly cpuSeconds: number
  readonly peakRssMiB: number
  readonly wireBytes: number
  readonly channelWireBytes?: ReadonlyArray<number>
}

/** PEER_NODE_ARGS: node options for both peers (e.g. `--cpu-prof --cpu-prof-dir=/tmp/prof` to profile them). */
const peerNodeArgs = (process.env.PEER_NODE_ARGS ?? "").split(/\s+/).filter(Boolean)

const spawnPeer = (args: ReadonlyArray<string>) =>
  ChildProcess.spawn(process.execPath, [...peerNodeArgs, peer, ...args], {
    stdio: ["ignore", "pipe", "inherit"],
    env: {
      ...process.env,
      BENCH_PSK_FILE: Path.join(here, "..", "test", "fixtures", "tls", "keys.psk"),
      BENCH_PROGRAM_IMAGE: programImage
    }
  })

const lastJson = (child: ChildProcess.ChildProcess, onLine?: (line: string) => void) =>
  new Promise<Result>((resolve, reject) => {
    let result: Result | undefined
    Readline.createInterface({ input: child.stdout! }).on("line", (line) => {
      if (line.startsWith("{")) result = JSON.parse(line)
      else onLine?.(line)
    })
    child.once("exit", (code) => (code === 0 && result ? resolve(result) : reject(new Error(`peer exited with ${code}`))))
  })

const runOnce = async (
  channels: number,
  compression: string,
  tls: string,
  threads: string,
  bytes = size,
  maxBandwidth = 0,
  image = "random"
): Promise<{ src: Result; dst: Result }> => {
  const [srcThreads, dstThreads = "1"] = threads.split("/")
  const recv = spawnPeer(["recv", "tcp:127.0.0.1:0", String(bytes), dstMode, tls, dstThreads!])
  let started: (uri: string) => void
  const listening = new Promise<string>((resolve) => (started = resolve))
  const dst = lastJson(recv, (line) => line.startsWith("listening ") && started(line.slice(10)))
  const uri = await Promise.race([listening, dst.then(() => "")])
  const src = lastJson(spawnPeer(
    ["send", uri, String(bytes), String(channels), compression, image, tls, compressionLevel ?? "default", srcThreads!, String(maxBandwidth)]
  ))
  return { src: await src, dst: await dst }
}

const median = (xs: ReadonlyArray<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
const fmt = (n: number, width: number, digits = 2) => n.toFixed(digits).padStart(width)

const main = async () => {
  const gib = size / 1024 ** 3
  console.log(`effect-multifd bench: ${(size / 1024 ** 2).toFixed(0)} MiB, loopback TCP, destination ${dstMode}, ` +
    `${reps} rep(s), node ${process.version}`)
  console.log("comp    image    tls  ch thr |  total_s    GiB/s | srcCPU_s dstCPU_s | srcRSS_MiB dstRSS_MiB | wire_GiB")
  console.log("-".repeat(104))
  const rowsToRun: Array<{ compression: string; tls: string; channels: number; image: string }> = []
  for (const compression of compressions) {
    if (compression === "none") {
      for (const channels of channelCounts) rowsToRun.push({ compression, tls: "none", channels, image: "random" })
    } else {
      for (const image of compImages) {
        for (const channels of compChannels) rowsToRun.push({ compression, tls: "none", channels, image })
      }
    }
  }
  for (const tls of tlsModes) rowsToRun.push({ compression: "none", tls, channels: tlsChannels, image: "random" })
  if (rowsToRun.some((row) => row.image === "program")) {
    ChildProcess.execFileSync("bash", [Path.join(here, "program-image.sh"), programImage, String(size)], { stdio: "inherit" })
  }
  for (const { channels, compression, image, tls } of rowsToRun) {
    // the thread modes alternate rep by rep: a machine whose load changes meanwhile weighs on both alike
    const modes = threadModes.flatMap((src) => dstThreadModes.map((dst) => `${src}/${dst}`))
    const runs = new Map(modes.map((threads) => [threads, [] as Array<{ src: Result; dst: Result }>]))
    for (let r = 0; r < reps; r++) {
      for (const threads of modes) runs.get(threads)!.push(await runOnce(channels, compression, tls, threads, size, 0, image))
    }
    for (const [threads, done] of runs) {
      const total = median(done.map((x) => x.src.durationMs)) / 1000
      const pick = (f: (x: { src: Result; dst: Result }) => number) => median(done.map(f))
      const comp = compression === "none" || compressionLevel === undefined ? compression : `${compression}:${compressionLevel}`
      console.log(
        `${comp.padEnd(7)} ${image.padEnd(8)} ${tls.padEnd(4)} ${String(channels).padStart(2)} ${threads.padStart(3)} | ` +
          `${fmt(total, 8, 3)} ${fmt(gib / total, 8)} | ` +
          `${fmt(pick((x) => x.src.cpuSeconds), 8)} ${fmt(pick((x) => x.dst.cpuSeconds), 8)} | ` +
          `${fmt(pick((x) => x.src.peakRssMiB), 10, 0)} ${fmt(pick((x) => x.dst.peakRssMiB), 10, 0)} | ` +
          `${fmt(pick((x) => x.src.wireBytes) / 1024 ** 3, 8, 3)}`
      )
    }
  }
  console.log("\ntotal_s: source's migration time (connect to verified done), GiB/s = RAM size / total_s;")
  console.log("thr src/dst: src 1: the source's channels on worker threads (ChannelThreads, started before the")
  console.log("migration: outside total_s and the CPU seconds), 0: on its main thread; dst 1: the destination's")
  console.log("compressed payloads decoded on worker threads (started before it listens), 0: on its main thread.")
  console.log("CPU seconds and peak RSS per process; wire_GiB = bytes on the multifd channels.")
  console.log("images: random; halfzero, every other page zero and random data in the rest, as QEMU's bench;")
  console.log("program, this machine's programs and libraries one after the other (bench/program-image.sh).")
  if (bandwidth !== "" && bandwidth !== "0") {
    const rate = parseRate(bandwidth)
    const { src } = await runOnce(bandwidthChannels, "none", "none", threadModes.at(-1)!, bandwidthSize, rate)
    const seconds = src.durationMs / 1000
    const expected = src.wireBytes / rate
    const shares = (src.channelWireBytes ?? []).map((b) => `${(b / src.wireBytes * 100).toFixed(1)}%`).join(" ")
    console.log(
      `\n--max-bandwidth ${bandwidth}: ${(bandwidthSize / 1024 ** 2).toFixed(0)} MiB random over ${bandwidthChannels} channels ` +
        `in ${seconds.toFixed(2)} s (wire ${(src.wireBytes / 1024 ** 2).toFixed(1)} MiB / rate = ${expected.toFixed(2)} s: ` +
        `${((seconds / expected - 1) * 100).toFixed(1)}%); channel shares ${shares}`
    )
  }
  if (withFile) {
    console.log("")
    await new Promise<void>((resolve, reject) => {
      const child = ChildProcess.spawn(process.execPath, ["--import", "tsx", Path.join(here, "snapshot.ts")], {
        stdio: "inherit",
        env: { ...process.env, CHANNELS: process.env.FILE_CHANNELS ?? "4", IMAGES: "random", SIZE: String(size) }
      })
      child.once("exit", (code) => (code === 0 ? resolve() : reject(new Error(`snapshot bench exited with ${code}`))))
    })
  }
}

main().finally(() => Fs.rmSync(programImage, { force: true })).catch((error) => {
  console.error(`bench: ${error.message}`)
  process.exit(1)
})
