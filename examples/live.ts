/**
 * A live migration from the command line: a workload keeps writing its memory while the library migrates it,
 * round after round, until the rest fits the downtime limit; then the writers pause for the switch-over.
 * It prints each round (pages sent, dirty pages, the dirty rate, the bandwidth and the expected downtime) and
 * the outcome (rounds, downtime), or the same numbers as one JSON object with `--json`.
 *
 *   npx tsx examples/live.ts                               # to a destination in this process
 *   npx tsx examples/live.ts tcp:127.0.0.1:4444            # to `multifd recv tcp:127.0.0.1:4444 --out r.img`
 *   npx tsx examples/live.ts --size 256M --rate 32M --channels 4 --downtime 300ms --json
 *
 * --rate is how many bytes a second the workload writes (random 4 KiB pages); the migration converges when
 * the link is faster than that. The destination's memory is checked against the source's (the digests).
 */
import * as Clock from "effect/Clock"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Fiber from "effect/Fiber"
import * as Crypto from "node:crypto"
import { GuestRam, Migration, MigrationConfig, Transport } from "effect-multifd"

const PAGE = 4096

const argv = process.argv.slice(2)
const flag = (name: string): string | undefined => {
  const at = argv.indexOf(name)
  return at >= 0 ? argv[at + 1] : undefined
}
/** A bad argument: one line and exit 2, as the `multifd` command does. */
const usage = (why: string): never => {
  console.error(`live: ${why}`)
  process.exit(2)
}
const bytes = (name: string, text: string): number => {
  const m = /^(\d+(?:\.\d+)?)([KMG]?)$/i.exec(text)
  if (m === null) return usage(`${name}: not a size: ${text} (like 256M)`)
  return Math.round(Number(m[1]) * ({ "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 } as const)[m[2]!.toUpperCase() as "" | "K" | "M" | "G"])
}
const uri = argv[0] !== undefined && !argv[0].startsWith("--") ? argv[0] : undefined
const size = bytes("--size", flag("--size") ?? "128M")
const rate = bytes("--rate", flag("--rate") ?? "16M")
const channels = Number(flag("--channels") ?? 4)
// 300ms, 1s, 2m, or a plain number of seconds (`MigrationConfig.parseDuration`, as the command's --timeout)
const downtime = Either.getOrElse(
  MigrationConfig.parseDuration(flag("--downtime") ?? "300ms"),
  (why) => usage(`--downtime: ${why}`)
)
const json = argv.includes("--json")

/** One round's line. */
interface Round {
  readonly round: number
  readonly pages: number
  readonly dirtyPages: number
  readonly bandwidthMiBps: number
  readonly expectedDowntimeMs: number
}

/** Pages one write of the workload covers (a record of 64 KiB at a random place). */
const RUN = 16

/** Writes random 64 KiB records at `rate` bytes a second, in 10 ms slices; counts the pages. */
const workload = (ram: GuestRam.GuestRam["Type"], written: { pages: number }) =>
  Effect.gen(function*() {
    const block = ram.blocks[0]!
    const runs = block.bytes.length / PAGE / RUN
    const record = Buffer.alloc(RUN * PAGE)
    const perSlice = Math.max(1, Math.round(rate / (RUN * PAGE) / 100))
    while (true) {
      const sliceStart = yield* Clock.currentTimeMillis
      for (let i = 0; i < perSlice; i++) {
        Crypto.randomFillSync(record, 0, 256)
        // each write passes the write gate (it waits during the switch-over) and marks its pages dirty
        yield* GuestRam.write(ram, block.name, Crypto.randomInt(runs) * RUN * PAGE, record)
        written.pages += RUN
      }
      const spent = (yield* Clock.currentTimeMillis) - sliceStart
      yield* Effect.sleep(Duration.millis(Math.max(0, 10 - spent)))
    }
  })

const program = Effect.gen(function*() {
  const ram = yield* GuestRam.GuestRam
  const transport = yield* Transport.Transport
  const started = yield* Clock.currentTimeMillis
  const rounds: Array<Round> = []
  const written = { pages: 0 }
  const say = (line: string) => (json ? Effect.void : Effect.sync(() => console.error(line)))

  // where to: a `multifd recv` at the uri, or a destination in this process
  const listener = uri === undefined ? yield* transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 }) : undefined
  const address = listener?.address ?? (yield* Transport.parseAddress(uri!))
  const destination = listener === undefined ? undefined : yield* Effect.fork(Migration.incoming(listener))

  // the workload's memory before the migration starts: random, as a busy guest's (round 0 sends all of it)
  for (const block of ram.blocks) Crypto.randomFillSync(block.bytes)
  const writer = yield* Effect.fork(workload(ram, written))
  yield* say(`live: ${(size / 1024 ** 2).toFixed(0)} MiB, a workload writing ${(rate / 1024 ** 2).toFixed(1)} MiB/s, ` +
    `${channels} channels to ${Transport.formatAddress(address)}`)
  const stats = yield* Migration.migrate({
    address,
    channels,
    live: { downtimeLimit: downtime, maxRounds: 30, onNoConvergence: "switchover" },
    onProgress: (progress) => {
      // a round's first report (nothing sent yet) says what the round is about to send
      if (progress.doneBytes !== 0) return Effect.void
      const round: Round = {
        round: progress.round,
        pages: progress.totalBytes / PAGE,
        dirtyPages: progress.dirtyPages,
        bandwidthMiBps: progress.bandwidth / 1024 ** 2,
        expectedDowntimeMs: progress.expectedDowntimeMs
      }
      rounds.push(round)
      return say(`round ${round.round} (${progress.phase}): ${round.pages} pages to send, ` +
        `bandwidth ${round.round === 0 ? "-" : `${round.bandwidthMiBps.toFixed(0)} MiB/s`}, ` +
        `expected downtime ${Number.isFinite(round.expectedDowntimeMs) ? `${round.expectedDowntimeMs.toFixed(0)} ms` : "-"}`)
    }
  })
  yield* Fiber.interrupt(writer)
  const elapsed = ((yield* Clock.currentTimeMillis) - started) / 1000
  if (destination !== undefined) yield* Fiber.join(destination)
  const dirtyRate = written.pages * PAGE / elapsed
  const result = {
    ramBytes: stats.ramBytes,
    channels: stats.channels,
    rounds: stats.rounds,
    pagesPerRound: stats.pagesPerRound,
    dirtyRateBytesPerSecond: Math.round(dirtyRate),
    pagesWritten: written.pages,
    downtimeMs: stats.downtimeMs,
    durationMs: stats.durationMs,
    wireBytes: stats.wireBytes,
    verified: true
  }
  if (json) console.log(JSON.stringify(result))
  else {
    console.error(`live: migrated in ${stats.rounds} rounds (${stats.pagesPerRound.join(", ")} pages), ` +
      `dirty rate ${(dirtyRate / 1024 ** 2).toFixed(1)} MiB/s, downtime ${stats.downtimeMs} ms, ` +
      `${(stats.durationMs / 1000).toFixed(2)} s in all; the destination's digests matched`)
  }
})

const memory = GuestRam.layer({ blocks: [{ name: "pc.ram", size }] })
Effect.runPromise(program.pipe(Effect.scoped, Effect.provide([Transport.layer, memory]))).catch((error) => {
  console.error(`live: ${error?.message ?? error}`)
  process.exit(1)
})
