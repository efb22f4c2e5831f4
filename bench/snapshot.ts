/**
 * `npx tsx bench/snapshot.ts`: saves SIZE of RAM to a snapshot file and restores it, for each image kind and
 * channel count, and prints GiB/s, the file's apparent and allocated size. Knobs (environment): SIZE (default
 * 1G), CHANNELS (default "1 2 4"), IMAGES (default "random halfzero"; halfzero = every other page zero, the
 * worst case for runs), REPS (default 1; the table shows the median), DIR (default /dev/shm when it exists,
 * else the OS temp directory).
 */
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as GuestRam from "../src/GuestRam.js"
import * as Snapshot from "../src/Snapshot.js"
import { parseSize } from "./size.js"


const size = parseSize(process.env.SIZE ?? "1G")
const channelCounts = (process.env.CHANNELS ?? "1 2 4").split(/\s+/).filter(Boolean).map(Number)
const images = (process.env.IMAGES ?? "random halfzero").split(/\s+/).filter(Boolean)
const reps = Number(process.env.REPS ?? 1)
const dir = process.env.DIR ?? (Fs.existsSync("/dev/shm") ? "/dev/shm" : Os.tmpdir())
const path = Path.join(dir, `multifd-bench-${process.pid}.snap`)
const GIB = 1024 ** 3

const median = (xs: ReadonlyArray<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
const fmt = (n: number, width: number, digits = 2) => n.toFixed(digits).padStart(width)

const main = Effect.gen(function*() {
  console.log(`effect-multifd snapshot bench: ${(size / 1024 ** 2).toFixed(0)} MiB, file in ${dir}, ${reps} rep(s), ` +
    `node ${process.version}, ${Os.availableParallelism()} CPUs, UV_THREADPOOL_SIZE ${process.env.UV_THREADPOOL_SIZE ?? 4}`)
  console.log("image     ch | save_s  save_GiB/s | restore_s restore_GiB/s | file_GiB alloc_GiB | digest_s")
  console.log("-".repeat(92))
  const ram = yield* GuestRam.make({ blocks: [{ name: "ram", size }] })
  const bytes = ram.blocks[0]!.bytes
  for (const image of images) {
    Crypto.randomFillSync(bytes)
    if (image === "halfzero") for (let at = 0; at < size; at += 8192) bytes.fill(0, at + 4096, at + 8192)
    const digestStart = performance.now()
    yield* GuestRam.digest(ram)
    const digestS = (performance.now() - digestStart) / 1000
    for (const channels of channelCounts) {
      const saves: Array<number> = []
      const restores: Array<number> = []
      let file = 0
      let alloc = 0
      for (let r = 0; r < reps; r++) {
        const saved = yield* Snapshot.save(path, { channels }).pipe(Effect.provideService(GuestRam.GuestRam, ram))
        yield* ram.gate.open
        saves.push(saved.durationMs / 1000)
        const stat = Fs.statSync(path)
        file = stat.size
        alloc = stat.blocks * 512
        const restored = yield* Snapshot.restore(path, { readers: channels })
        restores.push(restored.stats.durationMs / 1000)
        if (!restored.ram.blocks[0]!.bytes.equals(bytes)) throw new Error("restored memory differs")
        Fs.rmSync(path)
      }
      const save = median(saves)
      const restore = median(restores)
      console.log(
        `${image.padEnd(9)} ${String(channels).padStart(2)} | ${fmt(save, 6, 3)} ${fmt(size / GIB / save, 11)} | ` +
          `${fmt(restore, 9, 3)} ${fmt(size / GIB / restore, 14)} | ${fmt(file / GIB, 8, 3)} ${fmt(alloc / GIB, 9, 3)} | ` +
          `${fmt(digestS, 8, 3)}`
      )
    }
  }
  console.log("\nsave_s: Snapshot.save (create, write pages, digest, bitmaps + header, fsync, rename);")
  console.log("restore_s: Snapshot.restore into fresh memory (validate, allocate, read, digest check);")
  console.log("digest_s: GuestRam.digest of the image alone (part of both).")
})

Effect.runPromise(main).catch((error) => {
  Fs.rmSync(path, { force: true })
  console.error(`bench: ${error?.message ?? error}`)
  process.exit(1)
})
