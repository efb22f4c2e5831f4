/**
 * The inside of a channel thread: it hosts sessions, each a program of a known kind (a source channel:
 * `sendSession`) with a `MessagePort` of its own. A session runs in its own fiber and its own scope; the pool's
 * close request interrupts it, and once the fiber has ended — its scope closed, its socket destroyed — the
 * thread says so on the port (`[1, failure]`, the port's last message) and closes it. A session that fails or
 * dies ends the same way; the thread goes on hosting the others.
 *
 * `serve` is the thread's program; `channelWorker.ts`, the thread's entry point as `cli/main.ts` is the
 * process's, runs it (the one `Effect.runFork` of a thread).
 *
 * @internal
 */
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as FiberId from "effect/FiberId"
import * as FiberSet from "effect/FiberSet"
import * as Logger from "effect/Logger"
import * as LogLevel from "effect/LogLevel"
import * as Queue from "effect/Queue"
import type * as Scope from "effect/Scope"
import * as V8 from "node:v8"
import * as Vm from "node:vm"
import * as WorkerThreads from "node:worker_threads"
import * as Zstd from "../native/zstdStream.js"
import {
  encodeExit,
  type FromSession,
  type FromThread,
  type SessionIo,
  type ToSession,
  type ToThread,
  type TransferListItem,
  type WorkerData
} from "./protocol.js"

/** A kind of session: its program, given the data it was opened with and its two directions. */
export type Kind = (data: any, io: SessionIo<any, any>) => Effect.Effect<void, unknown, Scope.Scope>

/**
 * A full collection of this thread's heap. `gc` is taken once from a context made while V8's `--expose-gc` is on
 * (a thread cannot be started with it), and the flag is put back at once: contexts made later, in any thread,
 * get no `gc`. The flag is the process's: the pool's threads take their turns at it (`gcLock`, holding their
 * thread id; the pool hands back the turn of a thread terminated inside it when that thread exits). A thread that
 * waited a second for its turn, or that made its context while someone else turned the flag off (another pool's
 * thread, the application), has no `gc` this time and does not collect (it tries again after its next last
 * session) — rather than die of a ReferenceError, or wait for ever.
 */
let gc: (() => void) | undefined
const takeGc = (): (() => void) | undefined => {
  const lock = new Int32Array((WorkerThreads.workerData as WorkerData).gcLock)
  const me = WorkerThreads.threadId
  // the turn of a thread terminated inside it comes back with that thread's exit; a second is the most waited
  for (let waited = 0, holder; (holder = Atomics.compareExchange(lock, 0, 0, me)) !== 0; waited += 10) {
    if (waited >= 1000) return undefined
    Atomics.wait(lock, 0, holder, 10)
  }
  V8.setFlagsFromString("--expose-gc")
  try {
    const found: unknown = Vm.runInNewContext("typeof gc === 'function' ? gc : undefined")
    return typeof found === "function" ? found as () => void : undefined
  } finally {
    V8.setFlagsFromString("--no-expose-gc")
    Atomics.compareExchange(lock, 0, me, 0)
    Atomics.notify(lock, 0, 1)
  }
}
const collect = () => {
  if (gc === undefined) gc = takeGc()
  gc?.()
}

/**
 * `collect`, once the last session is gone, and again while this thread stays idle and still holds shared memory
 * it was given: what let go of it a turn or a timer later (a socket's last callback) was still reachable at the
 * first collection, and an idle thread never collected again, holding a whole guest's memory (about one run in six).
 * Five more tries, 10 ms to 2.6 s apart, with the `gc` the first one had; a timer that does not keep the thread alive.
 */
const collectWhileHeld = (hosted: Int32Array, tries = 0): void => {
  // (a try again never takes a turn at --expose-gc: a thread without `gc` waits for its next last session, as before)
  if (tries === 0) collect()
  else gc?.()
  if (gc !== undefined && tries < 5 && Atomics.load(hosted, 0) === 0 && sharedBuffers() > 0) {
    setTimeout(() => {
      if (Atomics.load(hosted, 0) === 0) collectWhileHeld(hosted, tries + 1)
    }, 10 * 4 ** tries).unref()
  }
}

/**
 * The shared memory given to this thread's sessions (found in what a session is opened with and sent, two
 * levels deep), held weakly: what is still referenced here is what `Inspection.sharedBuffers` counts.
 */
const given: Array<WeakRef<SharedArrayBuffer>> = []
const note = (value: unknown, depth = 2): void => {
  if (value instanceof SharedArrayBuffer) {
    if (given.length >= 64) given.splice(0, given.length, ...given.filter((ref) => ref.deref() !== undefined))
    given.push(new WeakRef(value))
  } else if (depth > 0 && typeof value === "object" && value !== null && !Array.isArray(value) && !ArrayBuffer.isView(value)) {
    for (const field of Object.values(value)) note(field, depth - 1)
  }
}
const sharedBuffers = () => new Set(given.map((ref) => ref.deref()).filter((buffer) => buffer !== undefined)).size

/**
 * One session: its program in a fiber of the host's set, with the session's port as its two directions. The
 * pool's close request interrupts it; once it has ended (its scope closed) the port's last message says how.
 */
const session = (
  kinds: Readonly<Record<string, Kind>>,
  hosted: Int32Array,
  sessions: FiberSet.FiberSet<Exit.Exit<void, unknown>, never>,
  { data, kind, port }: Extract<ToThread, { _tag: "Open" }>
): Effect.Effect<void> =>
  Effect.gen(function*() {
    Atomics.add(hosted, 0, 1)
    const inbox = yield* Queue.unbounded<unknown>()
    const post = (message: FromSession, transfer?: ReadonlyArray<TransferListItem>) =>
      port.postMessage(message, transfer as Array<TransferListItem> | undefined)
    const io: SessionIo<unknown, unknown> = {
      receive: Queue.take(inbox),
      send: (message, transfer) => Effect.sync(() => post([0, message], transfer)),
      unsafeSend: (message, transfer) => post([0, message], transfer)
    }
    const program = kinds[kind]
    // what the session logs goes to its owner, whose logger and level decide
    const forward = Logger.make(({ cause, logLevel, message }) =>
      post([2, {
        level: logLevel._tag,
        message: (Array.isArray(message) ? message.join(" ") : String(message)) +
          (Cause.isEmpty(cause) ? "" : ` ${Cause.pretty(cause)}`)
      }])
    )
    const fiber = yield* FiberSet.run(
      sessions,
      (program === undefined ? Effect.dieMessage(`no session of kind ${kind} in this thread`) : Effect.scoped(program(data, io))).pipe(
        Effect.provide(Logger.replace(Logger.defaultLogger, forward)),
        Logger.withMinimumLogLevel(LogLevel.All),
        // the program's end is the fiber's value: the fiber itself never fails
        Effect.exit
      )
    )
    // an observer, not `onExit` inside the fiber: a fiber interrupted before its first step runs nothing of
    // its own, and its owner still waits for the port's last message
    fiber.addObserver((exit) => {
      const idle = Atomics.sub(hosted, 0, 1) === 1
      post([1, encodeExit(Exit.isSuccess(exit) ? exit.value : exit)])
      // the last session gone: what the sessions were given (a guest's memory, shared: its whole size) is held
      // by this thread until it collects, which an idle thread never does; it collects once the port is closed
      // (its listener, and what that reaches, let go)
      if (idle) port.once("close", () => setImmediate(() => collectWhileHeld(hosted)))
      port.close()
    })
    note(data)
    port.on("message", (message: ToSession) => {
      if (message[0] === 0) {
        note(message[1])
        Queue.unsafeOffer(inbox, message[1])
      }
      else fiber.unsafeInterruptAsFork(FiberId.none)
    })
  })

/**
 * Serves the pool that started this thread, for as long as the thread lives: opens sessions of the given
 * kinds (each a fiber of this program's set), answers inspections, and carries out the faults tests inject
 * (`throw`: an uncaught exception; `exit`: `process.exit`, which ends this thread only; `Hold`: blocks until
 * released). Ends at once outside a worker thread.
 */
export const serve = (kinds: Readonly<Record<string, Kind>>): Effect.Effect<void> =>
  Effect.scoped(Effect.gen(function*() {
    const parent = WorkerThreads.parentPort
    if (WorkerThreads.isMainThread || parent === null) return
    const answer = (message: FromThread) => parent.postMessage(message)
    const hosted = new Int32Array((WorkerThreads.workerData as WorkerData).hosted)
    const sessions = yield* FiberSet.make<Exit.Exit<void, unknown>, never>()
    const opens = yield* Queue.unbounded<Extract<ToThread, { _tag: "Open" }>>()
    parent.on("message", (message: ToThread) => {
      switch (message._tag) {
        case "Open":
          return Queue.unsafeOffer(opens, message)
        case "Inspect":
          return answer({
            _tag: "Inspected",
            request: message.request,
            inspection: {
              resources: process.getActiveResourcesInfo(),
              zstdContexts: Zstd.openContexts(),
              sharedBuffers: sharedBuffers()
            }
          })
        case "Hold":
          Atomics.wait(new Int32Array(message.latch), 0, 0)
          return
        case "Fault":
          if (message.fault === "exit") process.exit(message.code)
          throw new Error("fault injected by a test")
      }
    })
    answer({ _tag: "Ready" })
    return yield* Effect.forever(Effect.flatMap(Queue.take(opens), (open) => session(kinds, hosted, sessions, open)))
  }))
