/**
 * A digest's worker thread (`native/digest` starts it on this file): answers each request as `hashRequest`
 * says (a chunk's full blocks through the XXH3 module; the calling thread finishes the hash).
 *
 * The module does nothing when imported on the main thread: only a worker started on it serves requests.
 *
 * @internal
 */
import * as WorkerThreads from "node:worker_threads"
import { type Answer, answerer, type Request } from "./hashRequest.js"
import type * as Xxh3 from "./xxh3.js"

export type { Answer, Request }

/** What a worker starts with: the compiled module (compiled once, by the thread that starts workers). */
export interface WorkerData {
  readonly module: Xxh3.WasmModule
  /** Bytes of the scratch memory that other memory is copied into, a multiple of a WebAssembly page. */
  readonly scratch: number
}

const serve = (port: WorkerThreads.MessagePort, { module, scratch }: WorkerData): void => {
  const answer = answerer(module, scratch)
  port.on("message", (request: Request) => port.postMessage(answer(request)))
}

if (!WorkerThreads.isMainThread && WorkerThreads.parentPort !== null) {
  serve(WorkerThreads.parentPort, WorkerThreads.workerData as WorkerData)
}
