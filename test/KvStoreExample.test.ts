/**
 * The key-value store example (examples/kv-store.ts, examples/kv/): the store itself, its live migration
 * in one process (source and destination roles over loopback TCP), and the example as users run it — two
 * processes — asserting it prints OK and exits 0.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as ChildProcess from "node:child_process"
import * as Path from "node:path"
import * as Url from "node:url"
import * as Load from "../examples/kv/load.js"
import * as Roles from "../examples/kv/roles.js"
import * as Store from "../examples/kv/store.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Transport from "../src/Transport.js"
import { expectNoLeaks } from "./support/handles.js"

const root = Path.resolve(Path.dirname(Url.fileURLToPath(import.meta.url)), "..")

const noHang = <A, E, R>(self: Effect.Effect<A, E, R>, what: string, seconds = 20): Effect.Effect<A, E | Error, R> =>
  Effect.raceFirst(
    self,
    Effect.async<never, Error>((resume) => {
      const timer = setTimeout(() => resume(Effect.fail(new Error(`hung: ${what}`))), seconds * 1000)
      return Effect.sync(() => clearTimeout(timer))
    })
  )

const newStore = (slots: number) =>
  Effect.flatMap(GuestRam.make({ blocks: [Store.blockSpec(slots)] }), Store.create)

describe("the store", () => {
  it.effect("put / get with versions; colliding keys probe; a full table refuses; open finds the table", () =>
    Effect.gen(function*() {
      const store = yield* newStore(64) // 64 slots: every key collides with some other
      for (let i = 0; i < 64; i++) expect(yield* Store.put(store, `k${i}`, `v${i}`)).toBe(1)
      expect(yield* Store.put(store, "k7", "again")).toBe(2)
      expect(Store.get(store, "k7")).toEqual({ value: "again", version: 2 })
      for (let i = 0; i < 64; i++) if (i !== 7) expect(Store.get(store, `k${i}`)).toEqual({ value: `v${i}`, version: 1 })
      expect(Store.get(store, "absent")).toBeUndefined()
      expect(Store.size(store)).toBe(64)
      const full = yield* Effect.flip(Store.put(store, "one too many", "x"))
      expect(full.message).toBe("table full (64 slots)")
      // the same memory, opened again (as the destination does with what it received)
      const reopened = yield* Store.open(store.ram)
      expect(Store.get(reopened, "k63")).toEqual({ value: "v63", version: 1 })
      const bare = yield* GuestRam.make({ blocks: [Store.blockSpec(64)] })
      expect((yield* Effect.flip(Store.open(bare))).message).toBe("block kv.table holds no key-value table")
      expect((yield* Effect.flip(Store.put(store, "", "x")))._tag).toBe("KvError")
      expect((yield* Effect.flip(Store.put(store, "k1", "x".repeat(65)))).message).toContain("exceeds 64")
    }))

  it.effect("every put dirties exactly the page of its slot, and waits while the gate is closed", () =>
    Effect.gen(function*() {
      const store = yield* newStore(1024)
      store.ram.blocks[0]!.dirty.take()
      yield* Store.put(store, "a", "1")
      expect(GuestRam.dirtyPages(store.ram)).toBe(1)
      yield* store.ram.gate.close
      const pending = yield* Effect.fork(Store.put(store, "b", "2"))
      yield* Effect.yieldNow()
      expect(Store.get(store, "b")).toBeUndefined()
      yield* store.ram.gate.open
      expect(yield* Fiber.join(pending)).toBe(1)
      expect(Store.get(store, "b")).toEqual({ value: "2", version: 1 })
    }))

  it.effect("concurrent writers racing for the same empty slots lose no key, wherever they are preempted", () =>
    Effect.gen(function*() {
      // the runtime preempts each writer every k operations: somewhere between its probe and its write
      for (let k = 12; k <= 40; k++) {
        const store = yield* newStore(512)
        yield* Effect.forEach(
          Array.from({ length: 8 }, (_, c) => c),
          (c) =>
            Effect.forEach(
              Array.from({ length: 40 }, (_, i) => i),
              (i) => Store.put(store, `c${c}:${i}`, `${c}/${i}`),
              { discard: true }
            ).pipe(Effect.withMaxOpsBeforeYield(k + c)),
          { concurrency: "unbounded", discard: true }
        )
        expect(Store.size(store)).toBe(320)
        for (let c = 0; c < 8; c++) {
          for (let i = 0; i < 40; i++) expect(Store.get(store, `c${c}:${i}`)).toEqual({ value: `${c}/${i}`, version: 1 })
        }
      }
    }))

  it("the ledger survives its text form; verify tells exact, one-newer, missing and wrong keys apart", () => {
    const ledger: Load.Ledger = new Map([["a", { value: "x\ny\"", version: 3 }], ["b", { value: "", version: 1 }]])
    expect(Load.decodeLedger(Load.encodeLedger(ledger))).toEqual(ledger)
    return Effect.runPromise(Effect.gen(function*() {
      const store = yield* newStore(64)
      yield* Store.put(store, "exact", "1")
      yield* Store.put(store, "newer", "1")
      yield* Store.put(store, "newer", "2")
      yield* Store.put(store, "wrong", "other")
      const verdict = Load.verify(store, [
        ["exact", { value: "1", version: 1 }],
        ["newer", { value: "1", version: 1 }],
        ["wrong", { value: "mine", version: 1 }],
        ["missing", { value: "1", version: 1 }]
      ], 1)
      expect({ ...verdict, ok: undefined }).toEqual({
        checked: 4, exact: 1, newer: 1, missing: ["missing"], wrong: ["wrong"], ok: undefined
      })
      expect(verdict.ok).toBe(false)
      expect(Load.describe(verdict)).toContain("1 exact, 1 one write newer, 1 missing, 1 wrong")
    }))
  })
})

describe("live migration of the store (both roles in this process)", () => {
  it.live("every acknowledged key arrives; writes went on during the migration; the destination resumes", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
      const destination = yield* Effect.forkScoped(
        Roles.runDestination(listener).pipe(Effect.provide(Logger.replace(Logger.defaultLogger, Logger.none)))
      )
      const report = yield* noHang(
        Roles.runSource({
          address: listener.address,
          slots: 16384, // a 2 MiB table
          keysPerClient: 1000,
          warmup: 5000,
          live: { downtimeLimit: "100 millis", maxRounds: 10, onNoConvergence: "switchover" }
        }).pipe(Effect.provide(Transport.layer)),
        "the source"
      )
      const { incoming, store } = yield* noHang(Fiber.join(destination), "the destination")
      expect(report.stats.rounds).toBeGreaterThanOrEqual(2)
      expect(report.acknowledgedDuringMigration).toBeGreaterThan(0)
      expect(report.ledger.size).toBe(4000)
      expect(report.keys).toBe(4000)
      // the source's memory is frozen since the switch-over, and the destination's is the same
      expect(incoming.ram.blocks[0]!.bytes.equals(report.ram.blocks[0]!.bytes)).toBe(true)
      const verdict = Load.verify(store, report.ledger, report.clients)
      expect(verdict.missing).toEqual([])
      expect(verdict.wrong).toEqual([])
      expect(verdict.ok).toBe(true)
      expect(verdict.checked).toBe(4000)
      expect(verdict.exact + verdict.newer).toBe(4000)
      expect(yield* Roles.resume(store, 500)).toBe(true)
      expect(Store.size(store)).toBe(4500)
    }))))
})

describe("npx tsx examples/kv-store.ts", () => {
  it.live("runs the two processes, prints OK and exits 0", () =>
    expectNoLeaks(Effect.gen(function*() {
      const run = Effect.async<{ code: number | null; out: string }>((resume) => {
        const child = ChildProcess.spawn(process.execPath, ["--import", "tsx", "examples/kv-store.ts"], {
          cwd: root,
          stdio: ["ignore", "pipe", "pipe"]
        })
        let out = ""
        child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()))
        child.stderr.on("data", (chunk: Buffer) => (out += chunk.toString()))
        // 'close': the process exited and its stdio pipes are closed
        child.once("close", (code) => resume(Effect.succeed({ code, out })))
        return Effect.sync(() => child.kill())
      })
      const { code, out } = yield* noHang(run, "the example", 30)
      expect(out).toMatch(/source: switched over after \d+ rounds/)
      expect(out).toMatch(/\[destination\] checked 16000 acknowledged keys: \d+ exact, \d+ one write newer, 0 missing, 0 wrong/)
      expect(out).toContain("[destination] OK")
      expect(out.trimEnd().split("\n").at(-1)).toBe("OK")
      expect(code, out).toBe(0)
    })))
})
