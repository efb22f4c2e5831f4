/**
 * `npm start`: the demo migration. A source and a destination, composed from layers in one process, move
 * 256 MiB of mixed guest memory (random, repetitive and zero pages) over 4 multifd channels on loopback TCP;
 * the destination's memory is compared with the source's and a summary is printed.
 *
 * Knobs (environment): DEMO_SIZE_MIB (default 256), DEMO_CHANNELS (default 4).
 */
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import * as Cause from "effect/Cause"
import * as Console from "effect/Console"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Layer from "effect/Layer"
import * as Crypto from "node:crypto"
import * as Os from "node:os"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as Transport from "../src/Transport.js"
import { progressBar } from "./support/progressBar.js"

/** A knob's whole number from `min` to `max`, or one line and exit 2. */
const knob = (name: string, fallback: number, min: number, max: number): number => {
  const text = process.env[name]
  const value = text === undefined || text === "" ? fallback : /^\d+$/.test(text.trim()) ? Number(text) : NaN
  if (!(value >= min && value <= max)) {
    console.error(`demo: ${name} must be a whole number from ${min} to ${max}, not ${JSON.stringify(text)}`)
    process.exit(2)
  }
  return value
}
const sizeMiB = knob("DEMO_SIZE_MIB", 256, 1, 1024 * 1024)
const channels = knob("DEMO_CHANNELS", 4, 1, 255)
const PAGE = 4096

/** Fills memory like a guest's: a quarter zero pages, a quarter repetitive, the rest random. */
const mixedMemory = (bytes: number): Effect.Effect<Buffer, GuestRam.GuestRamError> =>
  Effect.map(GuestRam.allocateOrFail(bytes, "the demo's memory"), (memory) => {
    Crypto.randomFillSync(memory)
    for (let page = 0; page < bytes / PAGE; page++) {
      if (page % 4 === 0) memory.fill(0, page * PAGE, (page + 1) * PAGE)
      else if (page % 4 === 1) memory.fill(page & 0xff, page * PAGE, (page + 1) * PAGE)
    }
    return memory
  })

const source = (address: Transport.Address) =>
  Effect.scoped(Effect.gen(function*() {
    const bar = yield* progressBar("migrating")
    return yield* Migration.migrate({ address, channels, onProgress: bar.update })
  }))

const program = Effect.gen(function*() {
  yield* Console.log(`effect-multifd demo: ${sizeMiB} MiB of guest memory over ${channels} channels on loopback TCP`)
  const transport = yield* Transport.Transport
  const listener = yield* transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
  yield* Console.log(`destination listening on ${Transport.formatAddress(listener.address)}`)

  const [sent, received] = yield* Effect.all([
    source(listener.address),
    Migration.incoming(listener)
  ], { concurrency: "unbounded" })

  const original = (yield* GuestRam.GuestRam).blocks[0]!.bytes
  const copy = received.ram.blocks[0]!.bytes
  if (!copy.equals(original)) return yield* Effect.dieMessage("destination memory differs from the source")
  const zeroShare = (100 * sent.zeroPages / (sent.normalPages + sent.zeroPages)).toFixed(0)
  yield* Console.log(
    `verified: destination memory is byte-identical (digests matched, then compared in full)\n` +
      `  ${(sent.ramBytes / 2 ** 30).toFixed(2)} GiB in ${(sent.durationMs / 1000).toFixed(2)} s = ` +
      `${sent.gibPerSecond.toFixed(2)} GiB/s over ${sent.channels} channels\n` +
      `  ${sent.normalPages + sent.zeroPages} pages (${sent.zeroPages} zero pages, ${zeroShare}%, sent as offsets only), ` +
      `${sent.packets} packets (${sent.syncs} SYNC), ${(sent.wireBytes / 2 ** 20).toFixed(1)} MiB on the wire`
  )
})

const SourceMemory = Layer.unwrapEffect(Effect.map(
  mixedMemory(sizeMiB * 1024 * 1024),
  (bytes) => GuestRam.layer({ blocks: [{ name: "pc.ram", bytes }] })
))

// Ctrl-C (or SIGTERM) interrupts the demo, whose scopes close: the progress bar gives the terminal its cursor back
// (killed where it stood, the demo left the cursor hidden and line wrapping off), then exit 128 + the signal
let signalled: "SIGINT" | "SIGTERM" = "SIGINT"
for (const name of ["SIGINT", "SIGTERM"] as const) process.once(name, () => (signalled = name))

NodeRuntime.runMain(program.pipe(Effect.scoped, Effect.provide(Layer.merge(Transport.layer, SourceMemory))), {
  disableErrorReporting: true,
  disablePrettyLogger: true,
  teardown: (exit, onExit) => {
    if (Exit.isSuccess(exit)) return onExit(0)
    if (Cause.isInterruptedOnly(exit.cause)) {
      console.error(`demo: interrupted by ${signalled}`)
      return onExit(128 + Os.constants.signals[signalled])
    }
    const error = Cause.squash(exit.cause) as { readonly message?: string } | undefined
    console.error(`demo failed: ${error?.message ?? String(error)}`)
    onExit(1)
  }
})
