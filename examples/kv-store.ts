/**
 * A key-value store served live while it migrates to a second process.
 *
 * The store's table lives in guest memory (examples/kv/store.ts). This process is the source: it starts a
 * destination process (this file, role `destination`), fills the store from a load generator of four
 * clients, then migrates the store's memory while the clients keep writing. At the switch-over the clients
 * pause at the write gate; the destination receives the memory, opens the same store in it and checks
 * every key whose write the source acknowledged (the source sends it that ledger on stdin), then resumes
 * serving writes itself.
 *
 *   npx tsx examples/kv-store.ts                      # both roles, two processes; exit 0 on OK, 1 on FAIL
 *   npx tsx examples/kv-store.ts destination [PORT]   # the destination alone (prints LISTENING <port>)
 */
import * as Effect from "effect/Effect"
import * as ChildProcess from "node:child_process"
import * as Path from "node:path"
import * as Readline from "node:readline"
import * as Url from "node:url"
import * as Migration from "../src/Migration.js"
import * as Transport from "../src/Transport.js"
import * as Load from "./kv/load.js"
import * as Roles from "./kv/roles.js"

const MIB = 1024 * 1024
const here = Url.fileURLToPath(import.meta.url)
const root = Path.resolve(Path.dirname(here), "..")

// ---------------------------------------------------------------------------------------------------------
// destination process

const readStdin = Effect.promise(async () => {
  const chunks: Array<Buffer> = []
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks).toString("utf8")
})

const destination = (port: number) =>
  Effect.scoped(Effect.gen(function*() {
    const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port })
    if (listener.address._tag === "Tcp") console.log(`LISTENING ${listener.address.port}`)
    const { incoming, store } = yield* Roles.runDestination(listener)
    console.log(`received ${(incoming.stats.ramBytes / MIB).toFixed(1)} MiB in ${incoming.stats.rounds} rounds ` +
      `over ${incoming.stats.channels} channels; the store is open`)
    // the source sends what it acknowledged once the migration is over
    const text = yield* readStdin
    const firstLine = text.indexOf("\n")
    const { clients } = JSON.parse(text.slice(0, firstLine)) as { clients: number }
    const verdict = Load.verify(store, Load.decodeLedger(text.slice(firstLine + 1)), clients)
    console.log(Load.describe(verdict))
    const resumed = yield* Roles.resume(store, 1000)
    console.log(resumed ? "resumed: 1000 new keys written and read back on the destination" : "resumed: FAILED")
    const ok = verdict.ok && resumed
    console.log(ok ? "OK" : "FAIL")
    return ok
  }))

// ---------------------------------------------------------------------------------------------------------
// source process

/** The destination process, killed if still running when the scope closes. */
const spawnDestination = Effect.acquireRelease(
  Effect.sync(() =>
    ChildProcess.spawn(process.execPath, ["--import", "tsx", here, "destination", "0"], {
      cwd: root,
      stdio: ["pipe", "pipe", "inherit"]
    })
  ),
  (child) => Effect.sync(() => child.exitCode === null && child.signalCode === null && child.kill())
)

const source = Effect.scoped(Effect.gen(function*() {
  const child = yield* spawnDestination
  const exited = Effect.async<number>((resume) => {
    if (child.exitCode !== null) return resume(Effect.succeed(child.exitCode))
    child.once("exit", (code) => resume(Effect.succeed(code ?? 1)))
  })
  // the destination's lines: the first one says where it listens, the others are shown
  const port = yield* Effect.async<number, Error>((resume) => {
    const lines = Readline.createInterface({ input: child.stdout })
    let told = false
    lines.on("line", (line) => {
      const m = /^LISTENING (\d+)$/.exec(line)
      if (!told && m) {
        told = true
        resume(Effect.succeed(Number(m[1])))
      } else {
        console.log(`  [destination] ${line}`)
      }
    })
    child.once("exit", (code) => {
      if (!told) resume(Effect.fail(new Error(`the destination process exited (${code}) before listening`)))
    })
  })
  const address: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port }
  console.log(`source: pid ${process.pid}; destination: pid ${child.pid}, listening on ${Transport.formatAddress(address)}`)

  let lastRound = -1
  const report = yield* Roles.runSource({
    address,
    // a tighter limit than QEMU's 300 ms, to show a few rounds; a store this busy could otherwise keep the
    // pre-copy going, so after 10 rounds it switches over anyway
    live: { downtimeLimit: "100 millis", maxRounds: 10, onNoConvergence: "switchover" },
    onProgress: (p: Migration.Progress) =>
      Effect.sync(() => {
        if (p.phase === "precopy" && p.round !== lastRound) {
          lastRound = p.round
          console.log(`source: round ${p.round}: ${p.dirtyPages} dirty pages` +
            (p.round > 0 ? `, ${(p.bandwidth / MIB).toFixed(0)} MiB/s, ~${p.expectedDowntimeMs.toFixed(1)} ms if switched now` : ""))
        }
      })
  }).pipe(Effect.provide(Transport.layer))
  const { stats } = report
  console.log(`source: switched over after ${stats.rounds} rounds (pages per round: ${stats.pagesPerRound.join(", ")}); ` +
    `downtime ${stats.downtimeMs} ms; ${report.keys} keys, ${report.acknowledged} puts acknowledged, ` +
    `${report.acknowledgedDuringMigration} of them while the migration ran`)

  // hand the checker the ledger of everything acknowledged before the switch-over
  child.stdin.end(JSON.stringify({ clients: report.clients }) + "\n" + Load.encodeLedger(report.ledger))
  const code = yield* exited
  const ok = code === 0
  console.log(ok ? "OK" : `FAIL (the destination exited with ${code})`)
  return ok
}))

// ---------------------------------------------------------------------------------------------------------

const [role, portArg] = process.argv.slice(2)
const program = role === "destination" ? destination(Number(portArg ?? 0)) : source

Effect.runPromise(program).then(
  (ok) => process.exit(ok ? 0 : 1),
  (error: unknown) => {
    console.error(`FAIL: ${error instanceof Error ? error.message : String(error)}`)
    process.exit(1)
  }
)
