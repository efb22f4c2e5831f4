/**
 * A wider leak check than `handles.ts` (which counts socket handles): everything a failure could leave behind in
 * this process, before and after an effect —
 *
 * - descriptors (`/proc/self/fd`), by kind: sockets, pipes, event fds / epolls (a worker thread holds two pipes,
 *   an eventfd and an epoll of its own, so a thread left running shows here too), files (by path);
 * - every kind of active resource Node reports (`process.getActiveResourcesInfo()`: sockets, servers, timers,
 *   requests in flight), not only sockets;
 * - channel threads running (`ChannelThreads.liveThreads()`), and, given a pool, what its threads still hold
 *   (sockets, timers, zstd contexts, sessions);
 * - entries of watched directories (a socket file, a `.partial` left beside an output).
 *
 * Process-wide, as `handles.ts`: the tests of a file run one after another in their own worker.
 */
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fs from "node:fs"
import * as ChannelThreads from "../../src/ChannelThreads.js"
import { nextTurn } from "./handles.js"

export interface Snapshot {
  /** Counts of descriptor kinds (`socket`, `pipe`, `anon_inode:[eventfd]`, ...; a file is `file:<path>`). */
  readonly fds: Record<string, number>
  /** Counts of the active resources' kinds. */
  readonly resources: Record<string, number>
  readonly threads: number
  /** What the pool's threads hold, as `thread <i>: <kind>` counts (empty without a pool). */
  readonly inThreads: Record<string, number>
  /** Entries of the watched directories (`dir/name`). */
  readonly entries: ReadonlyArray<string>
}

const count = (items: Iterable<string>): Record<string, number> => {
  const counts: Record<string, number> = {}
  for (const item of items) counts[item] = (counts[item] ?? 0) + 1
  return counts
}

/**
 * Module files a worker thread's loader reads while it starts (tsx, esbuild, the sources, a package.json for its
 * module type): not the library's
 * handles. A thread terminated while it loads may leave them to its loader's own close.
 */
const isModule = (target: string) => /\/node_modules\/|\.(m?js|ts)$|\/package\.json$/.test(target)

const fdKind = (target: string): string => {
  if (isModule(target)) return "module file"
  // libuv reserves a descriptor on /dev/null at an event loop's first listen (its EMFILE trick), kept for the loop's life
  if (target === "/dev/null") return "reserve"
  if (target.startsWith("socket:")) return "socket"
  if (target.startsWith("pipe:")) return "pipe"
  if (target.startsWith("anon_inode:")) return target
  return `file:${target}`
}

/** Descriptors open now, by kind. */
export const openFds = (): Record<string, number> => {
  if (!Fs.existsSync("/proc/self/fd")) return {}
  const kinds: Array<string> = []
  for (const fd of Fs.readdirSync("/proc/self/fd")) {
    try {
      kinds.push(fdKind(Fs.readlinkSync(`/proc/self/fd/${fd}`)))
    } catch {
      // the descriptor readdir itself used, closed meanwhile
    }
  }
  return count(kinds)
}

const listEntries = (dirs: ReadonlyArray<string>): ReadonlyArray<string> =>
  dirs.flatMap((dir) => {
    try {
      return Fs.readdirSync(dir).map((name) => `${dir}/${name}`)
    } catch {
      return []
    }
  })

export interface ProbeOptions {
  /** Directories whose entries must be the same after (a socket file, a temporary file). */
  readonly dirs?: ReadonlyArray<string> | undefined
  /** A pool whose threads must hold no more after than before. */
  readonly pool?: ChannelThreads.ChannelThreads["Type"] | undefined
  /** Event-loop turns to wait for things to settle (not a timer). */
  readonly turns?: number | undefined
  /** Resource kinds not to compare (a kind the test itself keeps, e.g. its guard's `Timeout`). */
  readonly ignoreResources?: ReadonlyArray<string> | undefined
}

const inThreads = (pool: ChannelThreads.ChannelThreads["Type"] | undefined) =>
  pool === undefined
    ? Effect.succeed({})
    : Effect.map(Effect.orDie(pool.inspect), (inspections) =>
      count(inspections.flatMap((inspection, thread) => [
        ...inspection.resources.map((kind) => `thread ${thread}: ${kind}`),
        ...Array.from({ length: inspection.zstdContexts }, () => `thread ${thread}: zstd context`)
      ])))

export const snapshot = (options: ProbeOptions = {}): Effect.Effect<Snapshot> =>
  Effect.map(inThreads(options.pool), (held) => ({
    fds: openFds(),
    resources: count(process.getActiveResourcesInfo()),
    threads: ChannelThreads.liveThreads(),
    inThreads: held,
    entries: listEntries(options.dirs ?? [])
  }))

const grown = (what: string, before: Record<string, number>, after: Record<string, number>, ignore: ReadonlyArray<string> = []) =>
  Object.entries(after)
    .filter(([kind, n]) => n > (before[kind] ?? 0) && !ignore.includes(kind))
    .map(([kind, n]) => `${what} ${kind} +${n - (before[kind] ?? 0)}`)

/** What `after` holds more of than `before`. */
export const compare = (before: Snapshot, after: Snapshot, options: ProbeOptions = {}): ReadonlyArray<string> => [
  ...grown("fd", before.fds, after.fds, ["module file", "reserve"]),
  ...grown("resource", before.resources, after.resources, options.ignoreResources),
  ...(after.threads > before.threads ? [`channel threads +${after.threads - before.threads}`] : []),
  ...grown("in", before.inThreads, after.inThreads),
  ...after.entries.filter((e) => !before.entries.includes(e)).map((e) => `left ${e}`)
]

/** Waits (event-loop turns, then short real pauses) until nothing is held beyond `before`; what still is. */
export const settle = (before: Snapshot, options: ProbeOptions = {}): Effect.Effect<ReadonlyArray<string>> =>
  Effect.gen(function*() {
    const turns = options.turns ?? 200
    let left: ReadonlyArray<string> = []
    for (let i = 0; i <= turns; i++) {
      left = compare(before, yield* snapshot(options), options)
      if (left.length === 0) return left
      yield* nextTurn
    }
    return left
  })

/**
 * Runs `effect`; whatever its outcome, proves that nothing it opened is left (see the module's doc): a leak is a
 * defect listing what is left, added to the effect's own failure.
 */
export const expectNothingLeft = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  options: ProbeOptions = {}
): Effect.Effect<A, E, R> =>
  Effect.uninterruptibleMask((restore) =>
    Effect.gen(function*() {
      const before = yield* snapshot(options)
      const exit = yield* Effect.exit(restore(effect))
      const left = yield* settle(before, options)
      if (left.length === 0) return yield* exit
      const defect = new Error(`left behind: ${left.join(", ")}`)
      return yield* Exit.isFailure(exit) ? Effect.failCause(Cause.sequential(exit.cause, Cause.die(defect))) : Effect.die(defect)
    })
  )
