/**
 * A channel thread's module (`pool` starts threads on it): the session host with the kinds of session it
 * runs — a source channel (`sendSession`), a destination channel's decoding (`decodeSession`). Bundled into
 * one file for the compiled library, the command and the benchmarks (a thread that loads effect as a few
 * hundred module files takes several times longer to start).
 *
 * The module does nothing when imported on the main thread: only a worker started on it serves a pool.
 *
 * @internal
 */
import * as Host from "./host.js"
import * as DecodeSession from "./decodeSession.js"
import * as SendSession from "./sendSession.js"

Host.serve({ [SendSession.KIND]: SendSession.run, [DecodeSession.KIND]: DecodeSession.run })
