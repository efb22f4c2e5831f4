/**
 * One side of a benchmark migration, run as its own process by `bench.ts`. Prints one JSON line with the
 * migration's stats, the CPU seconds it used and the process's peak RSS.
 *
 *   peer.ts recv <uri> <bytes> <mode: prefault|fresh> [tls: none|psk] [threads: 0|1]   (prints `listening <uri>` first)
 *   peer.ts send <uri> <bytes> <channels> <compression> <image: random|halfzero|program> [tls: none|psk] [level|default]
 *     [threads: 1|0] [max-bandwidth: bytes per second, 0 none]
 *
 * With threads 1 (the default) the source's channels run on worker threads (ChannelThreads), started before
 * the migration, outside the time and the CPU seconds measured (the migration is measured from its connect);
 * with threads 1 (default 0) the destination's compressed channels are decoded on them (the pool started
 * before it listens).
 *
 * TLS psk uses the test keys in test/fixtures/tls/keys.psk; the program image is the file BENCH_PROGRAM_IMAGE
 * (`bench/program-image.sh`).
 */
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as Url from "node:url"
import * as ChannelThreads from "../src/ChannelThreads.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import type * as Protocol from "../src/Protocol.js"
import * as Tls from "../src/Tls.js"
import * as Transport from "../src/Transport.js"

/** The test keys (bench.ts passes their path: this file also runs bundled from another directory). */
const pskFile = process.env["BENCH_PSK_FILE"] ??
  Path.join(Path.dirname(Url.fileURLToPath(import.meta.url)), "..", "test", "fixtures", "tls", "keys.psk")
/** The TLS service when `mode` is psk. */
const tlsOf = (mode: string | undefined) =>
  mode === "psk" ? Effect.map(Tls.make({ psk: pskFile }), (tls) => tls as Tls.Tls["Type"] | undefined) : Effect.succeed(undefined)

const [role, uri, sizeText, ...rest] = process.argv.slice(2)
const size = Number(sizeText)
const address = Effect.runSync(Transport.parseAddress(uri!))

const report = (stats: Migration.Stats, cpu: NodeJS.CpuUsage) => {
  console.log(JSON.stringify({
    role,
    ...stats,
    cpuSeconds: (cpu.user + cpu.system) / 1e6,
    peakRssMiB: process.resourceUsage().maxRSS / 1024
  }))
}

const randomImage = (bytes: Buffer, halfZero: boolean) => {
  const page = 4096
  Crypto.randomFillSync(bytes)
  if (halfZero) for (let at = 0; at < bytes.length; at += 2 * page) bytes.fill(0, at + page, at + 2 * page)
}

/** Reads the program image into `bytes` in place (no second copy of it in this process's peak RSS). */
const programImage = (bytes: Buffer) => {
  const fd = Fs.openSync(process.env["BENCH_PROGRAM_IMAGE"]!, "r")
  try {
    for (let at = 0; at < bytes.length;) {
      const n = Fs.readSync(fd, bytes, at, Math.min(bytes.length - at, 8 << 20), at)
      if (n === 0) throw new Error("the program image is shorter than the RAM")
      at += n
    }
  } finally {
    Fs.closeSync(fd)
  }
}

const main = role === "recv"
  ? Effect.gen(function*() {
    const memory = GuestRam.allocate(size)
    if (rest[0] !== "fresh") memory.fill(0) // fault every page in before the migration, like QEMU's prealloc=on
    const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: memory }] })
    const tls = yield* tlsOf(rest[1])
    const cpu = process.cpuUsage()
    const result = yield* Migration.listenAndReceive(address, {
      ram,
      upgrade: tls?.server,
      onListening: (a) => Effect.sync(() => console.log(`listening ${Transport.formatAddress(a)}`))
    })
    report(result.stats, process.cpuUsage(cpu))
  })
  : Effect.gen(function*() {
    const memory = GuestRam.allocate(size)
    if (rest[2] === "program") programImage(memory)
    else randomImage(memory, rest[2] === "halfzero")
    const tls = yield* tlsOf(rest[3])
    const cpu = process.cpuUsage()
    const stats = yield* Migration.migrate({
      address,
      upgrade: tls?.client("127.0.0.1"),
      channels: Number(rest[0]),
      compression: rest[1] as Protocol.Compression,
      compressionLevel: rest[4] === undefined || rest[4] === "default" ? undefined : Number(rest[4]),
      maxBandwidth: rest[6] === undefined ? undefined : Number(rest[6])
    }).pipe(Effect.provideServiceEffect(GuestRam.GuestRam, GuestRam.make({ blocks: [{ name: "mem", bytes: memory }] })))
    report(stats, process.cpuUsage(cpu))
  })

// the channel threads start before the migration (with the process), as the CLI starts them
const threads = (role === "send" ? rest[5] !== "0" : rest[2] === "1") ? ChannelThreads.layer() : Layer.empty

Effect.runPromise(main.pipe(Effect.provide(Layer.merge(Transport.layer, threads)))).catch((error) => {
  console.error(`bench peer ${role}: ${error?.message ?? error}`)
  process.exit(1)
})
