/**
 * One side of a benchmark migration, run as its own process by `bench.ts`. Prints one JSON line with the
 * migration's stats, the CPU seconds it used and the process's peak RSS.
 *
 *   peer.ts recv <uri> <bytes> <mode: prefault|fresh>   (prints `listening <uri>` first)
 *   peer.ts send <uri> <bytes> <channels> <compression> <image: random|halfzero>
 */
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import type * as Protocol from "../src/Protocol.js"
import * as Transport from "../src/Transport.js"

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

const main = role === "recv"
  ? Effect.gen(function*() {
    const memory = Buffer.from(new SharedArrayBuffer(size))
    if (rest[0] !== "fresh") memory.fill(0) // fault every page in before the migration, like QEMU's prealloc=on
    const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: memory }] })
    const cpu = process.cpuUsage()
    const result = yield* Migration.listenAndReceive(address, {
      ram,
      onListening: (a) => Effect.sync(() => console.log(`listening ${Transport.formatAddress(a)}`))
    })
    report(result.stats, process.cpuUsage(cpu))
  })
  : Effect.gen(function*() {
    const memory = Buffer.from(new SharedArrayBuffer(size))
    randomImage(memory, rest[2] === "halfzero")
    const cpu = process.cpuUsage()
    const stats = yield* Migration.migrate({
      address,
      channels: Number(rest[0]),
      compression: rest[1] as Protocol.Compression
    }).pipe(Effect.provideServiceEffect(GuestRam.GuestRam, GuestRam.make({ blocks: [{ name: "mem", bytes: memory }] })))
    report(stats, process.cpuUsage(cpu))
  })

Effect.runPromise(main.pipe(Effect.provide(Transport.layer))).catch((error) => {
  console.error(`bench peer ${role}: ${error?.message ?? error}`)
  process.exit(1)
})
