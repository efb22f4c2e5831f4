/**
 * A migration's status at any moment, as QEMU's `query-migrate` gives it: status (`setup`, `active`,
 * `completed`, `failed`, `cancelled`), setup and total time, bytes transferred, remaining and total, zero
 * (`duplicate`) and normal pages, the rate in Mbit/s, the dirty-pages rate, the expected and the real downtime.
 *
 * The caller makes a handle and passes it to one migration (`Migration.MigrateOptions.status`,
 * `IncomingOptions.status`; the source and the destination both report); `get` reads it whenever it likes —
 * from another fiber, a progress callback, a health endpoint:
 *
 * ```ts
 * const status = yield* MigrationStatus.make
 * const fiber = yield* Effect.fork(Migration.migrate({ address, status }))
 * const now = yield* status.get // { status: "active", transferred: ..., remaining: ..., mbps: ... }
 * ```
 *
 * @since 0.1.0
 */
import type * as Effect from "effect/Effect"
import * as Internal from "./internal/status.js"

/**
 * Where a migration is: `setup` (connecting, handshakes, until every channel is there), `active` (pages move),
 * then `completed`, `failed` or `cancelled` (interrupted).
 *
 * @since 0.1.0
 * @category models
 */
export type Status = Internal.Status

/**
 * A migration's state at one moment (the fields of QEMU's `query-migrate`; times in milliseconds, sizes in
 * bytes, rates per second).
 *
 * @since 0.1.0
 * @category models
 */
export type Snapshot = Internal.Snapshot

/**
 * The symbol that marks a `MigrationStatus` handle.
 *
 * @since 0.1.0
 * @category symbols
 */
export const TypeId: Internal.TypeId = Internal.TypeId

/**
 * The type of `TypeId`.
 *
 * @since 0.1.0
 * @category symbols
 */
export type TypeId = Internal.TypeId

/**
 * A handle on one migration's status: `get` (the snapshot now, live counters included), `changes` (snapshots
 * as the migration publishes them, a stream that ends with the final one) and `await` (the final one). A handle follows one migration at a time: another
 * migration given it while it follows one that runs fails `Busy` at once (a `MigrationError`), and leaves it alone;
 * given to a later migration, it follows that one (`await` then waits for that one's end).
 *
 * @since 0.1.0
 * @category models
 */
export interface MigrationStatus extends Internal.MigrationStatus {}

/**
 * A new handle, status `setup` until a migration uses it.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make: Effect.Effect<MigrationStatus> = Internal.make

/**
 * Whether a status is final (`completed`, `failed` or `cancelled`).
 *
 * @since 0.1.0
 * @category predicates
 */
export const isFinal = (status: Status): boolean =>
  status === "completed" || status === "failed" || status === "cancelled"
