/**
 * Leak checks for tests: counts the socket and server handles (and their in-flight connect/shutdown/write
 * requests) that Node reports as active, and asserts an effect leaves none behind (DESIGN §2.6).
 *
 * Counting is process-wide: vitest runs each test file in its own worker, and the tests of one file run one
 * after another, so a baseline taken before an effect is exact for that effect. Handles that exist before
 * (the worker's IPC pipe, stdout) are part of the baseline.
 */
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import type * as Scope from "effect/Scope"
import * as Os from "node:os"
import * as Path from "node:path"

/**
 * The resource kinds that belong to sockets, as `process.getActiveResourcesInfo()` names them on Node 20:
 * handles (a Unix socket and a Unix server are both `PipeWrap`; a TLS socket shows its underlying TCP or pipe
 * handle) and the requests a socket keeps in flight.
 */
export const SOCKET_KINDS: ReadonlySet<string> = new Set([
  "TCPSocketWrap",
  "TCPServerWrap",
  "PipeWrap",
  "PipeServerWrap",
  "TLSWrap",
  "UDPWrap",
  "ConnectWrap",
  "PipeConnectWrap",
  "TCPConnectWrap",
  "ShutdownWrap",
  "SimpleShutdownWrap",
  "WriteWrap",
  "SimpleWriteWrap"
])

/** How many socket-like resources of each kind are open now. */
export const openHandles = (): Record<string, number> => {
  const counts: Record<string, number> = {}
  for (const kind of process.getActiveResourcesInfo()) {
    if (SOCKET_KINDS.has(kind)) counts[kind] = (counts[kind] ?? 0) + 1
  }
  return counts
}

/** Kinds with more open now than in `baseline`, as `Kind +n (was b, now c)`. */
export const leaksSince = (baseline: Record<string, number>, now: Record<string, number> = openHandles()) =>
  Object.entries(now)
    .filter(([kind, n]) => n > (baseline[kind] ?? 0))
    .map(([kind, n]) => `${kind} +${n - (baseline[kind] ?? 0)} (was ${baseline[kind] ?? 0}, now ${n})`)

/** One turn of the event loop (a handle's close callback runs in the loop's close phase). */
export const nextTurn: Effect.Effect<void> = Effect.promise(() => new Promise<void>((resolve) => setImmediate(resolve)))

/**
 * Waits, up to `turns` event-loop turns (not a timer), until no socket-like resource is open beyond
 * `baseline`; returns what is still open beyond it (empty when clean).
 */
export const settle = (baseline: Record<string, number>, turns = 50): Effect.Effect<ReadonlyArray<string>> =>
  Effect.suspend(() => {
    const loop = (left: number): Effect.Effect<ReadonlyArray<string>> => {
      const leaks = leaksSince(baseline)
      return leaks.length === 0 || left === 0 ? Effect.succeed(leaks) : Effect.flatMap(nextTurn, () => loop(left - 1))
    }
    return loop(turns)
  })

/**
 * Runs `effect` and then, whatever its outcome (success, failure, interruption), checks that every socket
 * and server handle opened meanwhile has been closed: the counts must return to at most the baseline taken
 * just before. A leak makes the result a defect listing what is left (added to the effect's own failure).
 *
 * No scope is added: wrap the part that opens handles in `Effect.scoped` yourself, inside this call.
 */
export const expectNoLeaks = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  options?: { readonly turns?: number | undefined }
): Effect.Effect<A, E, R> =>
  Effect.uninterruptibleMask((restore) =>
    Effect.suspend(() => {
      const baseline = openHandles()
      return Effect.flatMap(Effect.exit(restore(effect)), (exit) =>
        Effect.flatMap(settle(baseline, options?.turns ?? 50), (leaks): Effect.Effect<A, E> => {
          if (leaks.length === 0) return exit
          const defect = new Error(
            `expectNoLeaks: ${leaks.length} kind(s) of socket handle left open: ${leaks.join(", ")}` +
              ` (active resources: ${process.getActiveResourcesInfo().join(", ")})`
          )
          return Exit.isFailure(exit)
            ? Effect.failCause(Cause.sequential(exit.cause, Cause.die(defect)))
            : Effect.die(defect)
        }))
    })
  )

/** Runs the body in a scope and proves, once the scope closed, that no socket handle is left open. */
export const leakFree = <A, E, R = never>(
  body: Effect.Effect<A, E, R | Scope.Scope>
): Effect.Effect<A, E, Exclude<R, Scope.Scope>> => expectNoLeaks(Effect.scoped(body))

let socketCounter = 0

/**
 * A fresh Unix socket path under the OS temp directory, unique in this process and across processes
 * (short enough for the ~104-byte `sun_path` limit). Nothing is created; the listener unlinks it on close.
 */
export const tempSocketPath = (name: string): string => {
  const safe = name.replace(/[^A-Za-z0-9_-]/g, "_").slice(0, 24)
  const unique = `${process.pid}-${++socketCounter}-${Math.random().toString(36).slice(2, 8)}`
  return Path.join(Os.tmpdir(), `emfd-${safe}-${unique}.sock`)
}
