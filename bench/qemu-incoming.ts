/**
 * QEMU → effect-multifd against QEMU → QEMU, in one run, on the same image and channel count
 * (`npx tsx bench/qemu-incoming.ts`; env SIZE=1G CHANNELS=4 COMPRESSION=none REPS=1).
 *
 * As bench/qemu-multifd-bench.sh: loopback TCP, paused `-machine none` guests, the source maps a
 * random image privately and pre-faulted (`share=off,prealloc=on`), `max-bandwidth` 1 TiB/s and
 * `downtime-limit` 60 s. The QEMU destination receives into a fresh sparse file on tmpfs (`prealloc=off`, its
 * "fresh" mode); ours allocates its memory when QEMU announces the blocks (inside the measured time).
 *
 * Times: `e2e` = QMP `migrate` sent → the destination has everything (QEMU: its MIGRATION `completed` event;
 * ours: `incoming` returned, i.e. main stream ended and every channel closed); `src` = the source's own
 * `total-time`. Both destinations' results are compared with the image.
 */
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as QemuIncoming from "../src/QemuIncoming.js"
import * as Transport from "../src/Transport.js"
import * as Qemu from "../test/support/qemu.js"
import { randomImage, scratchDir } from "./scratch.js"
import { parseSize } from "./size.js"

const SIZE = parseSize(process.env["SIZE"] ?? "1G")
const CHANNELS = Number(process.env["CHANNELS"] ?? "4")
const COMPRESSION = (process.env["COMPRESSION"] ?? "none") as "none" | "zlib" | "zstd"
const REPS = Number(process.env["REPS"] ?? "1")
/** `qemu` or `us` runs only that destination (for profiling). */
const ONLY = process.env["ONLY"]
const GIB = 1024 ** 3

const probe = Qemu.probe()
if ("missing" in probe) {
  console.error(probe.missing)
  process.exit(1)
}

const dir = scratchDir(3 * SIZE)
const imagePath = randomImage(dir, SIZE)

const settings = (uri: string): Qemu.MigrateSettings => ({ uri, channels: CHANNELS, compression: COMPRESSION })

const totalTime = (qmp: Qemu.Qmp) =>
  Effect.map(qmp.execute("query-migrate"), (info) => Number((info as { "total-time"?: number })["total-time"] ?? NaN) / 1000)

const sameAsImage = (bytes: Uint8Array) => {
  const img = Fs.readFileSync(imagePath)
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).equals(img)
}

/** QEMU → QEMU. */
const qemuToQemu = Effect.scoped(Effect.gen(function*() {
  const dstImage = Path.join(dir, "dst.img")
  Fs.rmSync(dstImage, { force: true })
  Fs.closeSync(Fs.openSync(dstImage, "w"))
  Fs.truncateSync(dstImage, SIZE)
  const dst = yield* Qemu.startDestination(dstImage, SIZE)
  const src = yield* Qemu.startSource(imagePath, SIZE)
  const port = 20000 + Math.floor(Math.random() * 20000)
  for (const q of [src.qmp, dst.qmp]) {
    yield* q.execute("migrate-set-capabilities", {
      capabilities: [{ capability: "events", state: true }, { capability: "multifd", state: true }]
    })
    yield* q.execute("migrate-set-parameters", { "multifd-channels": CHANNELS, "multifd-compression": COMPRESSION })
  }
  yield* dst.qmp.execute("migrate-incoming", { uri: `tcp:127.0.0.1:${port}` })
  const t0 = performance.now()
  yield* Qemu.migrate(src.qmp, settings(`tcp:127.0.0.1:${port}`))
  const srcStatus = yield* Qemu.waitDone(src.qmp, "300 seconds")
  const dstStatus = yield* Qemu.waitDone(dst.qmp, "300 seconds")
  const e2e = (performance.now() - t0) / 1000
  const src_s = yield* totalTime(src.qmp)
  return { e2e, src_s, ok: srcStatus === "completed" && dstStatus === "completed", dstImage }
})).pipe(Effect.map((r) => ({ ...r, same: r.ok && sameAsImage(Fs.readFileSync(r.dstImage)) })))

/** QEMU → effect-multifd (this process). */
const qemuToUs = Effect.scoped(Effect.gen(function*() {
  const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
  const port = listener.address._tag === "Tcp" ? listener.address.port : 0
  const incoming = yield* Effect.forkScoped(
    QemuIncoming.incoming(listener, { channels: CHANNELS, compression: COMPRESSION, maxRamBytes: 64 * GIB })
  )
  const src = yield* Qemu.startSource(imagePath, SIZE)
  const t0 = performance.now()
  yield* Qemu.migrate(src.qmp, settings(`tcp:127.0.0.1:${port}`))
  const result = yield* Fiber.join(incoming)
  const e2e = (performance.now() - t0) / 1000
  const srcStatus = yield* Qemu.waitDone(src.qmp, "60 seconds")
  const src_s = yield* totalTime(src.qmp)
  return { e2e, src_s, ok: srcStatus === "completed", same: sameAsImage(result.ram.blocks[0]!.bytes), stats: result.stats }
}))

const line = (label: string, r: { e2e: number; src_s: number; ok: boolean; same: boolean }) =>
  `${label.padEnd(22)} e2e ${r.e2e.toFixed(3)} s = ${(SIZE / GIB / r.e2e).toFixed(3)} GiB/s | source total-time ${
    r.src_s.toFixed(3)
  } s = ${(SIZE / GIB / r.src_s).toFixed(3)} GiB/s | ${r.ok ? "completed" : "FAILED"}, ${r.same ? "equal to the image" : "DIFFERS"}`

const main = Effect.gen(function*() {
  console.log(`${probe.version}; node ${process.version}; image ${SIZE} bytes random; ${CHANNELS} channels; ${COMPRESSION}`)
  for (let rep = 1; rep <= REPS; rep++) {
    const q = ONLY === "us" ? undefined : yield* qemuToQemu
    if (q) console.log(line(`QEMU -> QEMU`, q))
    const u = ONLY === "qemu" ? undefined : yield* qemuToUs
    if (u) console.log(line(`QEMU -> effect-multifd`, u))
    if (q && u) console.log(`ratio (effect-multifd / QEMU throughput, e2e): ${(q.e2e / u.e2e).toFixed(2)}`)
  }
}).pipe(Effect.provide(Logger.replace(Logger.defaultLogger, Logger.none)))

Effect.runPromise(main).then(
  () => process.exit(0),
  (e) => {
    console.error(e)
    process.exit(1)
  }
)
