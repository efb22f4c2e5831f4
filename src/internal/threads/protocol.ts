/**
 * What a channel thread and the pool that runs it say to each other, and how a session's failure crosses
 * (structured clone keeps no class: an error goes as its tag, its fields and its message, rebuilt on the other
 * side by whoever knows the classes).
 *
 * - the pool to a thread (its `parentPort`): `Open` a session (a `MessagePort` of its own, transferred),
 *   `Inspect` (the thread's active resources, for leak checks), `Fault` (tests: make the thread throw or exit),
 *   `Hold` (tests: block the thread until released);
 * - a thread to the pool: `Ready` once its module is loaded, `Inspected`;
 * - on a session's port, both ways: `[0, message]`; the pool's `[1]` asks the thread to close the session
 *   (interrupt it: its scope closes its socket), and the thread's `[1, failure]` says the session ended — it
 *   is the last message of the port, sent once everything the session held is released; the thread's
 *   `[2, line]` carries what the session logged (every level: the owner's logger decides).
 *
 * @internal
 */
import * as Cause from "effect/Cause"
import * as Data from "effect/Data"
import type * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import type * as LogLevel from "effect/LogLevel"
import * as Option from "effect/Option"
import type { MessagePort } from "node:worker_threads"

/**
 * What a message transfers rather than copies: buffers and message ports (which every @types/node's transfer list
 * takes). Our own rather than @types/node's by name: it renamed `TransferListItem` to `Transferable`, kept the old
 * name for a while and no longer has it (26), so the published declarations, which named the type, failed to
 * type-check in a project with the newest @types/node, what a fresh project installs ("Module 'node:worker_threads'
 * has no exported member 'TransferListItem'").
 */
export type TransferListItem = ArrayBuffer | MessagePort

/**
 * A channel thread failed: it could not start, it threw, or it exited; or a session's program died in it; or the
 * pool it belongs to was closed (used after its scope ended, or closed under a migration using it). The
 * message reads after a channel's name: "multifd channel 2: its thread exited (code 1)".
 */
export class ThreadError extends Data.TaggedError("ThreadError")<{
  /**
   * `Closed`: the pool's scope has closed (its layer's), its threads stopped with it. `Hung`: the thread did not
   * answer a session's close in time (a long synchronous task, a loop), and was terminated.
   */
  readonly reason: "Start" | "Failed" | "Exited" | "Defect" | "Closed" | "Hung"
  readonly detail: string
}> {
  override get message(): string {
    return this.detail
  }
}

/** A session's failure as it crosses: an error's tag, fields and message, a defect or an interruption. */
export type EncodedFailure =
  | {
    readonly _tag: "Error"
    readonly tag: string
    readonly message: string
    readonly fields: Readonly<Record<string, unknown>>
    readonly cause: EncodedFailure | undefined
  }
  | { readonly _tag: "Defect"; readonly message: string }
  | { readonly _tag: "Interrupted" }

/** What a thread starts with: its count of the sessions it hosts, in memory the pool reads. */
export interface WorkerData {
  readonly hosted: SharedArrayBuffer
  /** Held (the thread's id) by a thread while it turns V8's process-wide `--expose-gc` on and off: every pool's threads share it. */
  readonly gcLock: SharedArrayBuffer
}

/** The pool to a thread. */
export type ToThread =
  | {
    readonly _tag: "Open"
    readonly kind: string
    readonly data: unknown
    readonly port: MessagePort
  }
  | { readonly _tag: "Inspect"; readonly request: number }
  | { readonly _tag: "Fault"; readonly fault: "throw" | "exit"; readonly code: number }
  /** Tests: the thread blocks (its event loop with it) until the word of `latch` is set. */
  | { readonly _tag: "Hold"; readonly latch: SharedArrayBuffer }

/** A thread to the pool. */
export type FromThread =
  | { readonly _tag: "Ready" }
  | { readonly _tag: "Inspected"; readonly request: number; readonly inspection: Inspection }

/**
 * What a thread holds now: its active resources (`process.getActiveResourcesInfo()`), zstd contexts, and the
 * shared buffers given to its sessions (a guest's memory) it still references.
 */
export interface Inspection {
  readonly resources: ReadonlyArray<string>
  readonly zstdContexts: number
  readonly sharedBuffers: number
}

/** On a session's port: a message, the pool's close request, the thread's end of the session, a log line. */
export type ToSession = readonly [0, unknown] | readonly [1]
export type FromSession =
  | readonly [0, unknown]
  | readonly [1, EncodedFailure | undefined]
  | readonly [2, LogLine]

/** A line the session logged in its thread, logged again by its owner (with the owner's logger and level). */
export interface LogLine {
  readonly level: LogLevel.Literal
  readonly message: string
}

/** A session's two directions, as the program running in the thread sees them. */
export interface SessionIo<In, Out> {
  readonly receive: Effect.Effect<In>
  readonly send: (message: Out, transfer?: ReadonlyArray<TransferListItem>) => Effect.Effect<void>
  /** `send`, for a synchronous caller. */
  readonly unsafeSend: (message: Out, transfer?: ReadonlyArray<TransferListItem>) => void
}

/** Values that cross as they are (structured clone), and arrays of them. */
const plain = (value: unknown): boolean =>
  value === null || value === undefined || typeof value === "string" || typeof value === "number" ||
  typeof value === "boolean" || typeof value === "bigint" || value instanceof Uint8Array ||
  (Array.isArray(value) && value.every(plain))

/**
 * An error as it crosses: a tagged error (`_tag`) with its plain fields, and its cause when that is tagged too
 * (a `TransportError` inside a `ChannelError`); anything else by its message.
 */
export const encodeError = (error: unknown): EncodedFailure => {
  if (typeof error !== "object" || error === null || typeof (error as { _tag?: unknown })._tag !== "string") {
    return { _tag: "Defect", message: error instanceof Error ? error.message : String(error) }
  }
  const fields: Record<string, unknown> = {}
  for (const key of Object.keys(error)) {
    const value = (error as Record<string, unknown>)[key]
    if (key !== "_tag" && key !== "cause" && plain(value)) fields[key] = value
  }
  const cause = (error as { cause?: unknown }).cause
  const tagged = typeof cause === "object" && cause !== null && typeof (cause as { _tag?: unknown })._tag === "string"
  return {
    _tag: "Error",
    tag: (error as { _tag: string })._tag,
    message: String((error as { message?: unknown }).message),
    fields,
    cause: tagged ? encodeError(cause) : undefined
  }
}

/** How a session's program ended, as it crosses: `undefined` for success. */
export const encodeExit = (exit: Exit.Exit<unknown, unknown>): EncodedFailure | undefined => {
  if (Exit.isSuccess(exit)) return undefined
  const failure = Cause.failureOption(exit.cause)
  if (Option.isSome(failure)) return encodeError(failure.value)
  const defect = Cause.dieOption(exit.cause)
  if (Option.isSome(defect)) {
    const d = defect.value
    return { _tag: "Defect", message: d instanceof Error ? d.message : String(d) }
  }
  return { _tag: "Interrupted" }
}
