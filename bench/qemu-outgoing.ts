/**
 * effect-multifd → QEMU against QEMU → QEMU, in one run, on the same guest RAM and channel count
 * (`npx tsx bench/qemu-outgoing.ts`; env SIZE=1G CHANNELS=4 COMPRESSION=none REPS=1).
 *
 * As bench/qemu-incoming.ts: loopback TCP, paused `-machine none` guests, the source maps a random image
 * privately and pre-faulted (`share=off,prealloc=on`), `max-bandwidth` 1 TiB/s, `downtime-limit` 60 s; every
 * destination is a QEMU receiving into a fresh sparse file on tmpfs (`prealloc=off`). The VM file that
 * `send --to-qemu` migrates is QEMU's own mapped-ram file of that guest (`migrate file:` with mapped-ram), on
 * tmpfs, read as `send --to-qemu` reads it: `MappedRam.open`, then each batch of pages into a small window just
 * before it is sent.
 *
 * Times: `e2e` = the migration starts (QEMU: QMP `migrate` sent; ours: the VM file is opened, before anything
 * connects) → the destination QEMU has loaded everything (QEMU → QEMU: its MIGRATION `completed` event; ours:
 * QEMU's SHUT 0 on the return path, which it sends after that). With CLI=1 also the command itself, as a child
 * process (`node dist/bin/multifd.js send ... --to-qemu`, built by `npm run build`): from spawning it to its
 * exit. PRELOAD=1 reads the whole VM file first instead (`MappedRam.read`, the time printed) and then
 * migrates. Every destination's RAM is compared with the image.
 */
import * as Effect from "effect/Effect"
import * as Logger from "effect/Logger"
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as MappedRam from "../src/MappedRam.js"
import * as Protocol from "../src/Protocol.js"
import * as QemuOutgoing from "../src/QemuOutgoing.js"
import * as Transport from "../src/Transport.js"
import * as Qemu from "../test/support/qemu.js"
import { randomImage, scratchDir } from "./scratch.js"
import { parseSize } from "./size.js"

const SIZE = parseSize(process.env["SIZE"] ?? "1G")
const CHANNELS = Number(process.env["CHANNELS"] ?? "4")
const COMPRESSION = (process.env["COMPRESSION"] ?? "none") as Protocol.Compression
const REPS = Number(process.env["REPS"] ?? "1")
/** `qemu` or `us` runs only that source (for profiling). */
const ONLY = process.env["ONLY"]
const GIB = 1024 ** 3

const probe = Qemu.probe()
if ("missing" in probe) {
  console.error(probe.missing)
  process.exit(1)
}

const dir = scratchDir(4 * SIZE)
const imagePath = randomImage(dir, SIZE)
const image = Fs.readFileSync(imagePath)

const freshFile = (name: string) => {
  const path = Path.join(dir, name)
  Fs.rmSync(path, { force: true })
  Fs.closeSync(Fs.openSync(path, "w"))
  Fs.truncateSync(path, SIZE)
  return path
}

/** A destination QEMU listening on a free port with multifd: its uri. */
const destination = Effect.gen(function*() {
  const dstImage = freshFile("dst.img")
  const dst = yield* Qemu.startDestination(dstImage, SIZE)
  const uri = yield* Qemu.incoming(dst.qmp, { uri: "tcp:127.0.0.1:0", channels: CHANNELS, compression: COMPRESSION })
  return { dst, uri, dstImage }
})

const same = (path: string) => Fs.readFileSync(path).equals(image)

/** QEMU → QEMU. */
const qemuToQemu = Effect.scoped(Effect.gen(function*() {
  const { dst, dstImage, uri } = yield* destination
  const src = yield* Qemu.startSource(imagePath, SIZE)
  const t0 = performance.now()
  yield* Qemu.migrate(src.qmp, { uri, channels: CHANNELS, compression: COMPRESSION })
  const dstStatus = yield* Qemu.waitDone(dst.qmp, "300 seconds")
  const e2e = (performance.now() - t0) / 1000
  const srcStatus = yield* Qemu.waitDone(src.qmp, "300 seconds")
  return { e2e, ok: srcStatus === "completed" && dstStatus === "completed", same: same(dstImage) }
}))

/** The VM file: QEMU's own mapped-ram file of the guest. */
const vmFile = Effect.scoped(Effect.gen(function*() {
  const path = Path.join(dir, "guest.vm")
  const src = yield* Qemu.startSource(imagePath, SIZE)
  yield* Qemu.migrate(src.qmp, { uri: `file:${path}`, channels: CHANNELS, compression: "none", extraCapabilities: ["mapped-ram"] })
  const status = yield* Qemu.waitDone(src.qmp, "300 seconds")
  if (status !== "completed") throw new Error(`QEMU's migrate file: ${status}`)
  return path
}))

/** effect-multifd (this process) → QEMU. */
const usToQemu = (path: string) =>
  Effect.scoped(Effect.gen(function*() {
    const { dst, dstImage, uri } = yield* destination
    const address = Transport.parseAddress(uri)
    if (address._tag === "Left") throw address.left
    const t0 = performance.now()
    yield* Effect.scoped(Effect.gen(function*() {
      if (process.env["PRELOAD"] === "1") {
        const { vm } = yield* MappedRam.read(path, { maxRamBytes: 64 * GIB })
        console.log(`  (read ${((performance.now() - t0) / 1000).toFixed(3)} s)`)
        return yield* QemuOutgoing.migrate({ address: address.right, vm, channels: CHANNELS, compression: COMPRESSION })
      }
      const { readPages, vm } = yield* MappedRam.open(path, { maxRamBytes: 64 * GIB })
      yield* QemuOutgoing.migrate({ address: address.right, vm, readPages, channels: CHANNELS, compression: COMPRESSION })
    }))
    const e2e = (performance.now() - t0) / 1000
    const dstStatus = yield* Qemu.waitDone(dst.qmp, "60 seconds")
    return { e2e, ok: dstStatus === "completed", same: same(dstImage) }
  })).pipe(Effect.provide(Transport.layer))

/** `multifd send --to-qemu` (the bundle, a child process) → QEMU. */
const cliToQemu = (path: string) =>
  Effect.scoped(Effect.gen(function*() {
    const { dst, dstImage, uri } = yield* destination
    const t0 = performance.now()
    const code = yield* Effect.async<number | null>((resume) => {
      const child = ChildProcess.spawn(process.execPath, [
        Path.join(import.meta.dirname, "..", "dist", "bin", "multifd.js"),
        "send", uri, "--to-qemu", "--vm", path, "--channels", String(CHANNELS), "--compression", COMPRESSION, "--quiet"
      ], { stdio: ["ignore", "ignore", "inherit"] })
      child.on("exit", (c) => resume(Effect.succeed(c)))
      return Effect.sync(() => void child.kill("SIGKILL"))
    })
    const e2e = (performance.now() - t0) / 1000
    const dstStatus = yield* Qemu.waitDone(dst.qmp, "60 seconds")
    return { e2e, ok: code === 0 && dstStatus === "completed", same: same(dstImage) }
  }))

const line = (label: string, r: { e2e: number; ok: boolean; same: boolean }) =>
  `${label.padEnd(30)} e2e ${r.e2e.toFixed(3)} s = ${(SIZE / GIB / r.e2e).toFixed(3)} GiB/s | ` +
  `${r.ok ? "completed" : "FAILED"}, ${r.same ? "equal to the image" : "DIFFERS"}`

const main = Effect.gen(function*() {
  console.log(`${probe.version}; node ${process.version}; image ${SIZE} bytes random; ${CHANNELS} channels; ${COMPRESSION}`)
  const path = ONLY === "qemu" ? "" : yield* vmFile
  for (let rep = 1; rep <= REPS; rep++) {
    const q = ONLY === "us" ? undefined : yield* qemuToQemu
    if (q) console.log(line("QEMU -> QEMU", q))
    const u = ONLY === "qemu" ? undefined : yield* usToQemu(path)
    if (u) console.log(line("QemuOutgoing (VM file) -> QEMU", u))
    if (q && u) console.log(`ratio (effect-multifd / QEMU throughput, e2e): ${(q.e2e / u.e2e).toFixed(2)}`)
    const c = ONLY === "qemu" || process.env["CLI"] !== "1" ? undefined : yield* cliToQemu(path)
    if (c) console.log(line("multifd send --to-qemu -> QEMU", c))
    if (q && c) console.log(`ratio (the command, process start included / QEMU): ${(q.e2e / c.e2e).toFixed(2)}`)
  }
}).pipe(Effect.provide(Logger.replace(Logger.defaultLogger, Logger.none)))

Effect.runPromise(main).then(
  () => process.exit(0),
  (e) => {
    console.error(e)
    process.exit(1)
  }
)
