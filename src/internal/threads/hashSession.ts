/**
 * A digest's hashing as a session in a channel thread: a source whose channels run on the pool hashes its
 * memory there after the last round (its channels are idle then) rather than on threads of its own, which would
 * each be one more isolate in memory. Each request is answered as `hashRequest` says.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import { type Answer, answerer, type Request } from "../native/hashRequest.js"
import type * as Xxh3 from "../native/xxh3.js"
import type { SessionIo } from "./protocol.js"

/** The kind of session (`ChannelThreads` opens it by this name). */
export const KIND = "multifd-hash"

/** What a hash session is opened with. */
export interface Data {
  /** The compiled XXH3 module (compiled once, by the owner). */
  readonly module: Xxh3.WasmModule
  /** Bytes of the scratch memory for memory that is not WebAssembly memory. */
  readonly scratch: number
}

export type In = Request
export type Out = Answer

/** The session: answers request after request until it is closed. */
export const run = (data: Data, io: SessionIo<In, Out>): Effect.Effect<void, never, Scope.Scope> => {
  const answer = answerer(data.module, data.scratch)
  return Effect.forever(Effect.flatMap(io.receive, (request) => io.send(answer(request))))
}
