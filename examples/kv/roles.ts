/**
 * The two ends of the key-value store's live migration, as effects: the source serves writes from a load
 * generator and migrates the store's memory while they go on; the destination receives the memory and
 * opens the store in it. `examples/kv-store.ts` runs them in two processes; the tests in one.
 */
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as GuestRam from "../../src/GuestRam.js"
import * as Migration from "../../src/Migration.js"
import * as Transport from "../../src/Transport.js"
import * as Load from "./load.js"
import * as Store from "./store.js"

export interface SourceOptions {
  readonly address: Transport.Address
  /** Slots of the table (default 65536: an 8 MiB table). */
  readonly slots?: number | undefined
  /** Concurrent clients (default 4), each writing its own keys. */
  readonly clients?: number | undefined
  /** Keys per client (default 4000). */
  readonly keysPerClient?: number | undefined
  /** Puts acknowledged before the migration starts (default 20000). */
  readonly warmup?: number | undefined
  readonly channels?: number | undefined
  readonly live?: Migration.LiveOptions | undefined
  readonly onProgress?: ((progress: Migration.Progress) => Effect.Effect<void>) | undefined
}

/** What the source did. */
export interface SourceReport {
  readonly stats: Migration.Stats
  /** Per key, the last acknowledged write: everything the clients were told before the switch-over. */
  readonly ledger: Load.Ledger
  readonly clients: number
  /** Puts acknowledged in all, and while the migration ran. */
  readonly acknowledged: number
  readonly acknowledgedDuringMigration: number
  readonly keys: number
  /** The store's memory, frozen since the switch-over (its writers wait at the closed gate). */
  readonly ram: GuestRam.GuestRam["Type"]
}

/**
 * Creates the store, starts the load, and once it is warm migrates the store's memory to `address` while the
 * clients keep writing. After the switch-over the clients wait at the write gate, which stays closed: the
 * destination owns the store now, and the clients are stopped (their last puts never acknowledged).
 */
export const runSource = (
  options: SourceOptions
): Effect.Effect<SourceReport, Migration.MigrateError | Store.KvError | GuestRam.OutOfBounds | GuestRam.WriteBlocked | GuestRam.GuestRamError, Transport.Transport> =>
  Effect.scoped(Effect.gen(function*() {
    const clients = options.clients ?? 4
    const ram = yield* GuestRam.make({ blocks: [Store.blockSpec(options.slots ?? 65536)] })
    const store = yield* Store.create(ram)
    const load = yield* Load.start(store, {
      clients,
      keysPerClient: options.keysPerClient ?? 4000,
      warmup: options.warmup ?? 20000
    })
    yield* Effect.raceFirst(load.warm, Fiber.join(load.fiber))
    const before = load.acknowledged()
    const stats = yield* Migration.migrate({
      address: options.address,
      channels: options.channels ?? 4,
      live: options.live,
      onProgress: options.onProgress
    }).pipe(
      Effect.provideService(GuestRam.GuestRam, ram),
      Effect.raceFirst(Effect.zipRight(Fiber.join(load.fiber), Effect.never))
    )
    // the gate is closed: the clients are waiting at it; their pending puts were never acknowledged
    yield* Fiber.interrupt(load.fiber)
    const acknowledged = load.acknowledged()
    return {
      stats,
      ledger: load.ledger,
      clients,
      acknowledged,
      acknowledgedDuringMigration: acknowledged - before,
      keys: Store.size(store),
      ram
    }
  }))

/** Receives one migration on `listener` and opens the store in the received memory. */
export const runDestination = (
  listener: Transport.Listener,
  options: Migration.IncomingOptions = {}
): Effect.Effect<{ readonly store: Store.Store; readonly incoming: Migration.Incoming }, Migration.IncomingError | Store.KvError> =>
  Effect.gen(function*() {
    const incoming = yield* Migration.incoming(listener, options)
    const store = yield* Store.open(incoming.ram)
    return { store, incoming }
  })

/** The destination goes on serving: `n` puts of new keys, read back. */
export const resume = (store: Store.Store, n: number): Effect.Effect<boolean, Store.KvError | GuestRam.OutOfBounds | GuestRam.WriteBlocked> =>
  Effect.gen(function*() {
    for (let i = 0; i < n; i++) yield* Store.put(store, `resumed:${i}`, `after the migration ${i}`)
    for (let i = 0; i < n; i++) {
      if (Store.get(store, `resumed:${i}`)?.value !== `after the migration ${i}`) return false
    }
    return true
  })
