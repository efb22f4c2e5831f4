/**
 * The library in a few lines: a destination and a source composed from layers in one program.
 * Run: npx tsx examples/library.ts
 */
import * as Effect from "effect/Effect"
import { GuestRam, Migration, Transport } from "effect-multifd"

const program = Effect.gen(function*() {
  const transport = yield* Transport.Transport
  // the destination listens (port 0: any free port) and receives into memory of the source's layout
  const listener = yield* transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
  const [stats, received] = yield* Effect.all([
    Migration.migrate({ address: listener.address, channels: 4 }), // the source: GuestRam from context
    Migration.incoming(listener)
  ], { concurrency: "unbounded" })
  yield* Effect.log(`migrated ${stats.ramBytes} bytes in ${stats.durationMs} ms; ` +
    `destination has blocks ${received.ram.blocks.map((b) => b.name).join(", ")}`)
})

// the source's memory: two blocks, filled by the application
const SourceMemory = GuestRam.layer({
  blocks: [{ name: "pc.ram", size: 64 * 1024 * 1024 }, { name: "vga.vram", size: 16 * 1024 * 1024 }]
})

Effect.runPromise(program.pipe(Effect.scoped, Effect.provide([Transport.layer, SourceMemory])))
