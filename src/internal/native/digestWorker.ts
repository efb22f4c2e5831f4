/**
 * A digest's worker thread (`native/digest` starts it on this file): runs each chunk's full blocks through
 * the XXH3 module, in place when the chunk comes with its WebAssembly memory, through a scratch memory
 * otherwise, and answers with the accumulators (the calling thread finishes the hash).
 *
 * The module does nothing when imported on the main thread: only a worker started on it serves requests.
 *
 * @internal
 */
import * as WorkerThreads from "node:worker_threads"
import * as Xxh3 from "./xxh3.js"

/** What a worker starts with: the compiled module (compiled once, by the thread that starts workers). */
export interface WorkerData {
  readonly module: Xxh3.WasmModule
  /** Bytes of the scratch memory that other memory is copied into, a multiple of a WebAssembly page. */
  readonly scratch: number
}

/**
 * Hash `blocks` full XXH3 blocks: `offset` bytes into `memory` (WebAssembly memory, read in place), or the
 * first ones of `bytes` (any other memory, copied in).
 */
export type Request =
  | { readonly id: number; readonly memory: Xxh3.WasmMemory; readonly offset: number; readonly blocks: number }
  | { readonly id: number; readonly bytes: Uint8Array; readonly blocks: number }

/** The accumulators after the blocks of request `id`. */
export interface Answer {
  readonly id: number
  readonly accumulators: ReadonlyArray<bigint>
}

const serve = (port: WorkerThreads.MessagePort, { module, scratch }: WorkerData): void => {
  let own: { readonly view: Uint8Array; readonly exports: Xxh3.Exports } | undefined
  const scratchBlocks = scratch / Xxh3.BLOCK
  port.on("message", (request: Request) => {
    let exports: Xxh3.Exports
    if ("memory" in request) {
      exports = Xxh3.instantiate(request.memory, module)
      Xxh3.setAccumulators(exports, Xxh3.INITIAL_ACCUMULATORS)
      exports.blocks(request.offset, request.blocks)
    } else {
      if (own === undefined) {
        const pages = scratch / Xxh3.WASM_PAGE
        const memory = new Xxh3.Wasm.Memory({ initial: pages, maximum: pages, shared: true })
        own = { view: new Uint8Array(memory.buffer), exports: Xxh3.instantiate(memory, module) }
      }
      exports = own.exports
      Xxh3.setAccumulators(exports, Xxh3.INITIAL_ACCUMULATORS)
      for (let done = 0; done < request.blocks; done += scratchBlocks) {
        const n = Math.min(request.blocks - done, scratchBlocks)
        own.view.set(request.bytes.subarray(done * Xxh3.BLOCK, (done + n) * Xxh3.BLOCK))
        exports.blocks(0, n)
      }
    }
    const answer: Answer = { id: request.id, accumulators: Xxh3.accumulators(exports) }
    port.postMessage(answer)
  })
}

if (!WorkerThreads.isMainThread && WorkerThreads.parentPort !== null) {
  serve(WorkerThreads.parentPort, WorkerThreads.workerData as WorkerData)
}
