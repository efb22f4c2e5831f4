/**
 * A channel thread's module (`pool` starts threads on it): the session host with the kinds of session it
 * runs — a source channel (`sendSession`), a destination channel's decoding (`decodeSession`), a digest's
 * hashing (`hashSession`). Bundled into
 * one file for the compiled library, the command and the benchmarks (a thread that loads effect as a few
 * hundred module files takes several times longer to start).
 *
 * The module does nothing when imported on the main thread: only a worker started on it serves a pool.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as Host from "./host.js"
import * as DecodeSession from "./decodeSession.js"
import * as HashSession from "./hashSession.js"
import * as SendSession from "./sendSession.js"

// the thread's entry point, as cli/main.ts is the process's: its one run of an effect
Effect.runFork(Host.serve({
  [SendSession.KIND]: SendSession.run,
  [DecodeSession.KIND]: DecodeSession.run,
  [HashSession.KIND]: HashSession.run
}))
