/**
 * The pool behind `ChannelThreads`: worker threads started once, each hosting any number of sessions
 * (`host`). A session is a lease: opened on the thread with the fewest sessions, closed when its scope
 * closes, and its close waits for the thread's word that everything the session held is released. A thread
 * is watched from its start to its end: once it has exited (its sockets are gone with it), after an exception
 * or not, every session on it fails with a `ThreadError`, and the next session opened in the pool gets a new
 * thread in its place. Closing the pool's scope terminates every thread and waits until each has exited.
 *
 * The thread's module is found beside this one: `channelWorker.js` (the compiled library, where the build
 * puts one bundled file in place of tsc's; the bundled command and the benchmark peers, whose builds put it
 * beside them), or, from the TypeScript sources (tests, `npm run multifd`), `channelWorkerSource.mjs`, which
 * loads `channelWorker.ts` through tsx.
 *
 * @internal
 */
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as ExecutionStrategy from "effect/ExecutionStrategy"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as LogLevel from "effect/LogLevel"
import * as Queue from "effect/Queue"
import * as Scope from "effect/Scope"
import * as Os from "node:os"
import * as Path from "node:path"
import * as WorkerThreads from "node:worker_threads"
import * as Transfer from "../../Transfer.js"
import { ownFibers } from "../native/ownFibers.js"
import * as Inputs from "../inputs.js"
import {
  type EncodedFailure,
  type FromSession,
  type FromThread,
  type Inspection,
  type LogLine,
  ThreadError,
  type WorkerData,
  type ToSession,
  type ToThread,
  type TransferListItem
} from "./protocol.js"

/** How a pool is sized. */
export interface Options {
  /**
   * At most this many threads: a whole number of 1 or more, or `Infinity` (the default: no cap); anything else fails
   * `make` (`ThreadError`, `Start`). The pool starts one per core (`os.availableParallelism()`).
   */
  readonly maxThreads?: number | undefined
  /**
   * The threads' module: by default `channelWorker.js` beside this library (its build bundles it into one
   * file). A bundler that moves the library must copy that file along, or say here where it is.
   */
  readonly module?: string | URL | undefined
  /**
   * How long a session's close waits for its thread's word that the session is gone (10 seconds by default):
   * a thread that has not answered by then is taken for hung (a loop, a long synchronous task) and terminated,
   * failing every session on it (`ThreadError`, `Hung`); the next session opened gets a new thread in its place.
   * A hash session's answer to a chunk is bounded the same (a source's digest on the threads, `hashPool`).
   * It must be a duration of more than 0 and finite, at most 24 days (`Infinity` waited for a hung thread for ever);
   * anything else fails `make` (`ThreadError`, `Start`).
   */
  readonly closeTimeout?: Duration.DurationInput | undefined
}

/** What a session says: one of its messages, or its end (`failure` undefined: it ended by itself, or was closed). */
export type Event<Out> =
  | { readonly _tag: "Message"; readonly message: Out }
  | { readonly _tag: "Ended"; readonly failure: EncodedFailure | undefined }

export type { Inspection }

/** A session in a thread, as its owner sees it. */
export interface Session<In, Out> {
  /** The thread it runs on (its slot in the pool, 0-based). */
  readonly thread: number
  /** Posts a message to the session (structured clone; `transfer` moves buffers instead of copying them). */
  readonly send: (message: In, transfer?: ReadonlyArray<TransferListItem>) => Effect.Effect<void>
  /** `send`, for a synchronous caller (a socket's read callback: a destination channel's decoding). */
  readonly unsafeSend: (message: In, transfer?: ReadonlyArray<TransferListItem>) => void
  /** The session's next message, then its end; fails once the thread has failed. */
  readonly receive: Effect.Effect<Event<Out>, ThreadError>
  /** Fails once the session's thread has failed (never succeeds): for an owner that is not receiving. */
  readonly failed: Effect.Effect<never, ThreadError>
  /**
   * A round trip to the session's thread (its event loop, not the session): completes once the thread
   * answered, fails if it failed first — what happened to a session whose thread may have died is known after it.
   */
  readonly alive: Effect.Effect<void, ThreadError>
}

/** Counts of a pool. */
export interface PoolStats {
  /** Threads running now. */
  readonly threads: number
  /** Sessions open now (leases held on this thread). */
  readonly sessions: number
  /**
   * Sessions the running threads still host, as they count them (in shared memory): a closed lease's session
   * is gone from its thread before the lease is given back, so this is never more than `sessions`.
   */
  readonly hosted: number
  /** Sessions opened since the pool started. */
  readonly opened: number
  /** Threads started in place of one that failed. */
  readonly replaced: number
}

/** A pool of channel threads. */
export interface Pool {
  /** Threads in the pool. */
  readonly size: number
  /**
   * Opens a session of `kind` with `data` on the least busy thread (a new one in place of a thread that
   * failed); the session is closed — and the close acknowledged by the thread — when the scope closes.
   */
  readonly open: <In, Out>(
    kind: string,
    data: unknown,
    transfer?: ReadonlyArray<TransferListItem>
  ) => Effect.Effect<Session<In, Out>, never, Scope.Scope>
  readonly stats: Effect.Effect<PoolStats>
  /**
   * What each running thread holds now: its active resources (`process.getActiveResourcesInfo()` in that
   * thread: sockets, timers, ports) and its zstd contexts (a leak check).
   */
  readonly inspect: Effect.Effect<ReadonlyArray<Inspection>, ThreadError>
  /**
   * How long a thread may leave a question unanswered before it is taken for hung (`Options.closeTimeout`): a
   * session close, and a hash session's answer to a chunk (`hashPool`).
   */
  readonly closeTimeout: Duration.Duration
}

/** What a session's port delivers, and its thread's failure. */
type Delivery<Out> =
  | Event<Out>
  | { readonly _tag: "Log"; readonly line: LogLine }
  | { readonly _tag: "Failed"; readonly error: ThreadError }

/** A session's side in this thread: what its port delivered, and whether it is gone. */
interface Lease<Out> {
  /** Its messages (and what it logged), then its end; or its thread's failure. */
  readonly inbox: Queue.Queue<Delivery<Out>>
  /** Completes once the session ended in its thread, or its thread failed. */
  readonly gone: Deferred.Deferred<void>
}

interface Thread {
  readonly slot: number
  readonly worker: WorkerThreads.Worker
  /** Completes once the thread's module has loaded; fails if it failed first. */
  readonly ready: Deferred.Deferred<void, ThreadError>
  /** Fails once the thread threw or exited (never succeeds). */
  readonly failed: Deferred.Deferred<never, ThreadError>
  readonly inspections: Map<number, (inspection: Inspection) => void>
  /** The scope that terminates it: closed with the pool's, or when it is replaced. */
  readonly scope: Scope.CloseableScope
  /** The sessions open on it: a failure of the thread reaches each through its inbox. */
  readonly sessions: Set<Lease<unknown>>
  /** The sessions the thread hosts, as it counts them (`host`). */
  readonly hosted: Int32Array
  /** Fails the thread and its sessions with `reason` (once: the first call wins). */
  readonly fail: (reason: "Failed" | "Exited" | "Closed" | "Hung", detail: string) => void
}

/**
 * The turn every channel thread of this process takes to turn V8's `--expose-gc` on and off (`host`): 0, or the
 * thread id of the thread that has it. A thread terminated inside its turn never hands it back: its exit does.
 */
const gcLock = new SharedArrayBuffer(4)
const gcTurn = new Int32Array(gcLock)

/** Channel threads started in this process and not yet exited (every pool's). */
let live = 0

/** Channel threads running in this process, over all pools (for leak checks). */
export const liveThreads = (): number => live

const workerUrl = (): URL =>
  new URL(import.meta.url.endsWith(".ts") ? "./channelWorkerSource.mjs" : "./channelWorker.js", import.meta.url)

/**
 * Starts a thread in a scope of its own inside `parent`; terminated (and its exit awaited) when that closes. Once
 * `closing` (the pool's scope is closing) it fails as `Closed` before it is terminated, rather than "exited".
 */
const start = (
  slot: number,
  parent: Scope.Scope,
  module: string | URL,
  closing: Deferred.Deferred<void>
): Effect.Effect<Thread> =>
  Effect.gen(function*() {
    const scope = yield* Scope.fork(parent, ExecutionStrategy.sequential)
    const ready = yield* Deferred.make<void, ThreadError>()
    const failed = yield* Deferred.make<never, ThreadError>()
    return yield* Effect.acquireRelease(
      Effect.sync((): Thread => {
        const hosted = new Int32Array(new SharedArrayBuffer(4))
        const workerData: WorkerData = { hosted: hosted.buffer as SharedArrayBuffer, gcLock }
        // a small young generation: a busy channel thread grows its own to 16-48 MiB otherwise, which the
        // source's peak RSS pays for each thread (12-15 MiB less over two threads, at the same speed)
        const worker = new WorkerThreads.Worker(module, { workerData, resourceLimits: { maxYoungGenerationSizeMb: 2 } })
        live++
        const threadId = worker.threadId
        const inspections = new Map<number, (inspection: Inspection) => void>()
        const sessions = new Set<Lease<unknown>>()
        const fail = (reason: "Failed" | "Exited" | "Closed" | "Hung", detail: string) => {
          const error = new ThreadError({ reason, detail })
          Deferred.unsafeDone(ready, Exit.fail(new ThreadError({ reason: "Start", detail: `${detail} before it was ready` })))
          Deferred.unsafeDone(failed, Exit.fail(error))
          for (const session of sessions) {
            Queue.unsafeOffer(session.inbox, { _tag: "Failed", error })
            Deferred.unsafeDone(session.gone, Exit.void)
          }
          // told once: a later call (the exit after a pool's closing failed it) finds no session to tell again
          sessions.clear()
        }
        worker.on("message", (message: FromThread) => {
          if (message._tag === "Ready") Deferred.unsafeDone(ready, Exit.void)
          else inspections.get(message.request)?.(message.inspection)
        })
        // the thread's sessions fail once it is gone (its sockets with it), with the exception it threw if any
        let thrown: Error | undefined
        worker.on("error", (error) => {
          thrown ??= error
        })
        worker.on("exit", (code) => {
          live--
          Atomics.compareExchange(gcTurn, 0, threadId, 0)
          if (thrown !== undefined) fail("Failed", `its thread failed: ${thrown.message}`)
          else fail("Exited", `its thread exited (code ${code})`)
        })
        return { slot, worker, ready, failed, inspections, scope, sessions, hosted, fail }
      }),
      (thread) =>
        Effect.zipRight(
          // terminated because its pool is closing: said so, rather than "exited (code 1)"
          Effect.whenEffect(Effect.sync(() => thread.fail("Closed", POOL_CLOSED)), Deferred.isDone(closing)),
          Effect.promise(() => thread.worker.terminate())
        )
    ).pipe(Scope.extend(scope))
  })

let inspections = 0

const POOL_CLOSED = "its thread's pool (ChannelThreads) is closed: its scope has ended"

/** What a session opened in a pool that is closed gets: the pool's end, and no thread. */
const closedError = () => new ThreadError({ reason: "Closed", detail: POOL_CLOSED })

/**
 * Asks a thread what it holds; fails if the thread fails first. Each side of the race is interruptible: asked
 * uninterruptibly (a finalizer's leak check), a race waits for its loser's end, and the thread's failure that
 * loses never comes while it runs. The race runs in a fiber of its own (`ownFibers`): its sides, children of the
 * asking fiber, heard of a second interruption of it at once, and a leak check in a finalizer ended interrupted.
 */
const inspectOne = (thread: Thread): Effect.Effect<Inspection, ThreadError> =>
  ownFibers(Effect.raceFirst(
    Effect.interruptible(Deferred.await(thread.failed)),
    Effect.interruptible(Effect.async<Inspection>((resume) => {
      const request = ++inspections
      thread.inspections.set(request, (inspection) => {
        thread.inspections.delete(request)
        resume(Effect.succeed(inspection))
      })
      thread.worker.postMessage({ _tag: "Inspect", request } satisfies ToThread)
      return Effect.sync(() => thread.inspections.delete(request))
    }))
  ))

/** What tests reach into: the pool's threads as they are now. */
const threadsOfPool = new WeakMap<Pool, () => ReadonlyArray<Thread>>()

/**
 * The worker threads of a pool, for tests that make one fail from outside (`terminate`), or from inside
 * (`fault`: an uncaught exception, or `process.exit` with `code`), or hold one up (`hold`).
 */
export const unsafeThreads = (pool: Pool): ReadonlyArray<{
  readonly worker: WorkerThreads.Worker
  readonly fault: (fault: "throw" | "exit", code?: number) => void
  /** Blocks the thread (as a long synchronous task would) until the function returned is called. */
  readonly hold: () => () => void
}> =>
  (threadsOfPool.get(pool)?.() ?? []).map((thread) => ({
    worker: thread.worker,
    fault: (fault, code = 1) => thread.worker.postMessage({ _tag: "Fault", fault, code } satisfies ToThread),
    hold: () => {
      const latch = new Int32Array(new SharedArrayBuffer(4))
      thread.worker.postMessage({ _tag: "Hold", latch: latch.buffer as SharedArrayBuffer } satisfies ToThread)
      return () => {
        Atomics.store(latch, 0, 1)
        Atomics.notify(latch, 0)
      }
    }
  }))

/** The process's turn at `--expose-gc` (0, or the id of the thread that has it), for tests that fake a holder. */
export const unsafeGcTurn = (): Int32Array => gcTurn

/** Whether Node's `Worker` takes `module` as a module to run: an absolute or `./`-relative path, or a file: URL. */
const isWorkerModule = (module: unknown): boolean =>
  module instanceof URL
    ? module.protocol === "file:"
    : typeof module === "string" && (Path.isAbsolute(module) || /^\.\.?[\\/]/.test(module))

/** The pool's size: a thread per core, capped by `maxThreads`, at least one. */
export const sizeOf = (options?: Options): number =>
  Math.max(1, Math.min(Os.availableParallelism(), options?.maxThreads ?? Infinity))

/**
 * Starts the pool's threads and waits until each has loaded its module (a thread that fails to start fails
 * this with its `ThreadError`). Everything is released when the scope closes.
 */
export const make = (options?: Options): Effect.Effect<Pool, ThreadError, Scope.Scope> =>
  Effect.gen(function*() {
    // options that are no object (plain JavaScript: `layer("4")`) were read as none, the defaults taken in silence
    const notOptions = Inputs.checkOptions(options, true)
    if (notOptions !== undefined) {
      return yield* new ThreadError({ reason: "Start", detail: `the channel threads' pool: ${notOptions}` })
    }
    // NaN (a Number(process.env.X) unset) made a pool of no threads whose first session died on a TypeError
    const max = options?.maxThreads
    if (max !== undefined && !(max === Infinity || (Number.isInteger(max) && max >= 1))) {
      return yield* new ThreadError({
        reason: "Start",
        detail: `the channel threads' pool: maxThreads ${max} is not a whole number of 1 or more`
      })
    }
    // a closeTimeout of 0 took every thread for hung at its first close; one Duration could not read was a defect
    const badClose = options?.closeTimeout === undefined
      ? undefined
      : Transfer.checkTimeout("closeTimeout", options.closeTimeout)
    if (badClose !== undefined) {
      return yield* new ThreadError({ reason: "Start", detail: `the channel threads' pool: ${badClose}` })
    }
    // a module Node's Worker cannot take (a path that is neither absolute nor ./relative, a number, null) was a defect,
    // thrown as the first thread was made
    const given = options?.module
    if (given !== undefined && !isWorkerModule(given)) {
      return yield* new ThreadError({
        reason: "Start",
        detail: `the channel threads' pool: module ${Inputs.describeInput(given instanceof URL ? given.href : given)} ` +
          "is not an absolute path, a ./relative one or a file: URL"
      })
    }
    const size = sizeOf(options)
    const module = given ?? workerUrl()
    const closeTimeout = Duration.decode(options?.closeTimeout ?? Duration.seconds(10))
    const scope = yield* Effect.scope
    // completed as the scope starts closing, before the threads are terminated (finalizers run in reverse): a
    // thread that ends then ends because the pool closes, and no thread is started in place of one any more
    const closing = yield* Deferred.make<void>()
    const slots: Array<Thread> = []
    for (let slot = 0; slot < size; slot++) slots.push(yield* start(slot, scope, module, closing))
    yield* Effect.addFinalizer(() => Deferred.succeed(closing, undefined))
    yield* Effect.forEach(slots, (thread) => Deferred.await(thread.ready), { concurrency: "unbounded", discard: true })
    let opened = 0
    let replaced = 0
    const lock = yield* Effect.makeSemaphore(1)

    /** The least busy thread, after a new thread took the place of each one that failed. */
    const choose = lock.withPermits(1)(Effect.gen(function*() {
      if (yield* Deferred.isDone(closing)) return undefined
      for (const thread of slots) {
        if (!(yield* Deferred.isDone(thread.failed))) continue
        yield* Scope.close(thread.scope, Exit.void)
        slots[thread.slot] = yield* start(thread.slot, scope, module, closing)
        replaced++
      }
      let best = slots[0]!
      for (const thread of slots) if (thread.sessions.size < best.sessions.size) best = thread
      return best
    }))

    const open = <In, Out>(kind: string, data: unknown, transfer: ReadonlyArray<TransferListItem> = []) =>
      Effect.map(
        Effect.acquireRelease(
          Effect.gen(function*() {
            const thread = yield* choose
            const lease: Lease<Out> = {
              inbox: yield* Queue.unbounded<Delivery<Out>>(),
              gone: yield* Deferred.make<void>()
            }
            const { port1: port, port2 } = new WorkerThreads.MessageChannel()
            if (thread === undefined) {
              // the pool is closed: no thread starts for the session, which fails saying so
              Queue.unsafeOffer(lease.inbox, { _tag: "Failed", error: closedError() })
              Deferred.unsafeDone(lease.gone, Exit.void)
              port2.close()
              return { thread, port, lease }
            }
            port.on("message", (message: FromSession) => {
              if (message[0] === 0) return Queue.unsafeOffer(lease.inbox, { _tag: "Message", message: message[1] as Out })
              if (message[0] === 2) return Queue.unsafeOffer(lease.inbox, { _tag: "Log", line: message[1] })
              Queue.unsafeOffer(lease.inbox, { _tag: "Ended", failure: message[1] })
              Deferred.unsafeDone(lease.gone, Exit.void)
            })
            thread.sessions.add(lease as Lease<unknown>)
            // a thread that failed before this session was added has told the others only
            if (yield* Deferred.isDone(thread.failed)) {
              const error = yield* Effect.flip(Deferred.await(thread.failed))
              Queue.unsafeOffer(lease.inbox, { _tag: "Failed", error })
              Deferred.unsafeDone(lease.gone, Exit.void)
            }
            const open: ToThread = { _tag: "Open", kind, data, port: port2 }
            thread.worker.postMessage(open, [port2, ...transfer])
            opened++
            return { thread, port, lease }
          }),
          // the session closes in its thread (its socket destroyed) before the lease is given back; a thread
          // that failed has taken its sessions with it. A thread that does not answer in time is hung: waiting
          // for it would hang its owner's close for ever (a migration whose error was known never returned), so
          // it is terminated, its sockets with it, and its sessions fail saying so
          ({ lease, port, thread }) =>
            Effect.gen(function*() {
              if (!(yield* Deferred.isDone(lease.gone))) port.postMessage([1] satisfies ToSession)
              // each side interruptible (a release is not, and a race waits for its loser's end otherwise), and
              // the race in a fiber of its own, joined: a race's sides are children of the fiber that runs it, and
              // an interruption of that fiber (a second one, while it closes this session) reached them at once,
              // ending the race — and with it this release, the lease never given back, the port never closed
              const answered = yield* Fiber.join(yield* Effect.forkDaemon(Effect.raceFirst(
                Effect.interruptible(Effect.as(Deferred.await(lease.gone), true)),
                Effect.interruptible(Effect.as(Effect.sleep(closeTimeout), false))
              )))
              if (!answered && thread !== undefined) {
                thread.fail(
                  "Hung",
                  `its thread stopped answering: a session's close had no answer after ${Duration.format(closeTimeout)}`
                )
                yield* Effect.promise(() => thread.worker.terminate())
              }
              port.close()
              thread?.sessions.delete(lease as Lease<unknown>)
            })
        ),
        ({ lease, port, thread }): Session<In, Out> => {
          /** The next message or end; what the session logged meanwhile is logged here, by the receiving fiber. */
          const receive: Effect.Effect<Event<Out>, ThreadError> = Effect.flatMap(Queue.take(lease.inbox), (event) => {
            if (event._tag === "Log") {
              return Effect.zipRight(Effect.logWithLevel(LogLevel.fromLiteral(event.line.level), event.line.message), receive)
            }
            if (event._tag !== "Failed") return Effect.succeed(event)
            // a thread's failure stays: every later receive fails the same way
            Queue.unsafeOffer(lease.inbox, event)
            return Effect.fail(event.error)
          })
          const unsafeSend = (message: In, transfer?: ReadonlyArray<TransferListItem>) =>
            port.postMessage([0, message] satisfies ToSession, transfer as Array<TransferListItem>)
          return {
          thread: thread?.slot ?? 0,
          send: (message, transfer) => Effect.sync(() => unsafeSend(message, transfer)),
          unsafeSend,
          receive,
          failed: thread === undefined ? Effect.fail(closedError()) : Deferred.await(thread.failed),
          alive: thread === undefined ? Effect.fail(closedError()) : Effect.asVoid(inspectOne(thread))
          }
        }
      )

    /** The threads that have not failed. */
    const running = Effect.suspend(() =>
      Effect.filter(slots, (thread) => Effect.map(Deferred.isDone(thread.failed), (done) => !done))
    )

    const pool: Pool = {
      size,
      open,
      stats: Effect.map(running, (threads) => ({
        threads: threads.length,
        sessions: slots.reduce((n, thread) => n + thread.sessions.size, 0),
        hosted: threads.reduce((n, thread) => n + Atomics.load(thread.hosted, 0), 0),
        opened,
        replaced
      })),
      inspect: Effect.flatMap(running, (threads) => Effect.forEach(threads, inspectOne, { concurrency: "unbounded" })),
      closeTimeout
    }
    threadsOfPool.set(pool, () => slots)
    return pool
  })
