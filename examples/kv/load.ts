/**
 * A load generator for the key-value store, the ledger of what it was told, and the check of a store
 * against that ledger.
 *
 * Each client owns its keys and writes them one put at a time, so for every key the order of
 * acknowledgements is the order of writes: the ledger holds, per key, the last value and version a client
 * was acknowledged. A store that kept every acknowledged write has, for every key of the ledger, that
 * version and value — or one newer version, when a client's last write had landed but its
 * acknowledgement had not been recorded when the clients stopped.
 */
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import type * as Fiber from "effect/Fiber"
import type * as Scope from "effect/Scope"
import type * as GuestRam from "../../src/GuestRam.js"
import * as Store from "./store.js"

/**
 * Waits for the event loop's next turn, as a server waits for its next requests. Not `Effect.yieldNow`:
 * that only lets other fibers run, and Effect's scheduler gives the event loop a turn only every 2048 of
 * those, so busy clients yielding that way would starve every socket of the process — the migration's too.
 */
const nextRequest: Effect.Effect<void> = Effect.async<void>((resume) => {
  const immediate = setImmediate(() => resume(Effect.void))
  return Effect.sync(() => clearImmediate(immediate))
})

/** Per key, what the last acknowledged put wrote. */
export type Ledger = Map<string, Store.Entry>

/** A running load. */
export interface Load {
  readonly ledger: Ledger
  /** Puts acknowledged so far. */
  readonly acknowledged: () => number
  /** Completes once `warmup` puts were acknowledged. */
  readonly warm: Effect.Effect<void>
  /** The clients (ended by interrupting it). */
  readonly fiber: Fiber.RuntimeFiber<void, Store.KvError | GuestRam.OutOfBounds | GuestRam.WriteBlocked>
}

/**
 * Starts `clients` fibers in the caller's scope, each putting its own `keysPerClient` keys in a scattered
 * order, for ever. A put is acknowledged — recorded in the ledger — once it returned.
 */
export const start = (
  store: Store.Store,
  options: { readonly clients: number; readonly keysPerClient: number; readonly warmup: number }
): Effect.Effect<Load, never, Scope.Scope> =>
  Effect.gen(function*() {
    const ledger: Ledger = new Map()
    let acknowledged = 0
    const warm = yield* Deferred.make<void>()
    const client = (c: number) =>
      Effect.gen(function*() {
        for (let i = 0;; i++) {
          const key = `user:${c}:${(i * 7919) % options.keysPerClient}`
          const value = `${c}.${i}.${Math.random().toString(36).slice(2, 12)}`
          const version = yield* Store.put(store, key, value)
          ledger.set(key, { value, version })
          if (++acknowledged === options.warmup) yield* Deferred.succeed(warm, undefined)
          if (i % 8 === 7) yield* nextRequest
        }
      })
    const fiber = yield* Effect.forkScoped(
      Effect.asVoid(Effect.all(Array.from({ length: options.clients }, (_, c) => client(c)), { concurrency: "unbounded" }))
    )
    return { ledger, acknowledged: () => acknowledged, warm: Deferred.await(warm), fiber }
  })

/** What checking a store against a ledger found. */
export interface Verdict {
  readonly checked: number
  /** Keys with exactly the acknowledged version and value. */
  readonly exact: number
  /** Keys one version further: a write that landed before the switch-over, its acknowledgement not recorded. */
  readonly newer: number
  readonly missing: ReadonlyArray<string>
  /** Keys with an older version, a different value for the same version, or versions beyond one more. */
  readonly wrong: ReadonlyArray<string>
  readonly ok: boolean
}

/** Checks every key of the ledger in `store`; at most `clients` keys may be one version newer. */
export const verify = (
  store: Store.Store,
  ledger: Iterable<readonly [string, Store.Entry]>,
  clients: number
): Verdict => {
  let checked = 0
  let exact = 0
  let newer = 0
  const missing: Array<string> = []
  const wrong: Array<string> = []
  for (const [key, acked] of ledger) {
    checked++
    const found = Store.get(store, key)
    if (found === undefined) missing.push(key)
    else if (found.version === acked.version && found.value === acked.value) exact++
    else if (found.version === acked.version + 1) newer++
    else wrong.push(key)
  }
  return { checked, exact, newer, missing, wrong, ok: missing.length === 0 && wrong.length === 0 && newer <= clients }
}

/** One line per verdict, for people. */
export const describe = (v: Verdict): string =>
  `checked ${v.checked} acknowledged keys: ${v.exact} exact, ${v.newer} one write newer, ` +
  `${v.missing.length} missing, ${v.wrong.length} wrong` +
  (v.missing.length + v.wrong.length > 0 ? ` (e.g. ${[...v.missing, ...v.wrong].slice(0, 3).join(", ")})` : "")

/** The ledger as text, one JSON array `[key, version, value]` a line (what the source sends the checker). */
export const encodeLedger = (ledger: Ledger): string => {
  const lines: Array<string> = []
  for (const [key, { value, version }] of ledger) lines.push(JSON.stringify([key, version, value]))
  return lines.join("\n") + "\n"
}

/** Reads `encodeLedger`'s text back. */
export const decodeLedger = (text: string): Ledger => {
  const ledger: Ledger = new Map()
  for (const line of text.split("\n")) {
    if (line.length === 0) continue
    const [key, version, value] = JSON.parse(line) as [string, number, string]
    ledger.set(key, { value, version })
  }
  return ledger
}
