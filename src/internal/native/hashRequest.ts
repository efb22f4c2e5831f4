/**
 * A hashing thread's work, wherever it runs (a digest's worker thread, `digestWorker`; a channel thread's hash
 * session, `threads/hashSession`): each request's full XXH3 blocks through the module, in place when the chunk
 * comes with its WebAssembly memory, through a scratch memory otherwise; the answer is the accumulators (the
 * calling thread finishes the hash). A digest's own threads also prefault guest memory (`Touch`: `GuestRam.make`'s
 * fresh blocks), since first-touch page faults cost as much as hashing and scale with threads the same way.
 *
 * @internal
 */
import * as Xxh3 from "./xxh3.js"

/**
 * Hash `blocks` full XXH3 blocks: `offset` bytes into `memory` (WebAssembly memory, read in place), or the
 * first ones of `bytes` (any other memory, copied in); or touch `length` bytes of shared memory `touch` from
 * `offset`, one byte every `step` (`touchPages`).
 */
export type Request =
  | { readonly id: number; readonly memory: Xxh3.WasmMemory; readonly offset: number; readonly blocks: number }
  | { readonly id: number; readonly bytes: Uint8Array; readonly blocks: number }
  | {
    readonly id: number
    readonly touch: SharedArrayBuffer
    readonly offset: number
    readonly length: number
    readonly step: number
  }

/**
 * Has the kernel back every `step` bytes of `bytes` with memory now, so that later writes do not fault, by
 * writing a zero byte in each: for fresh, zero-filled memory that nothing else uses yet. (A write that keeps
 * any contents, a read then a write or an `Atomics.or`, faults twice: 4× slower here.)
 */
export const touchPages = (bytes: Uint8Array, step: number): void => {
  for (let at = 0; at < bytes.length; at += step) bytes[at] = 0
}

/** The accumulators after the blocks of request `id` (none for a touch). */
export interface Answer {
  readonly id: number
  readonly accumulators: ReadonlyArray<bigint>
}

/**
 * What answers requests with `module` (compiled once, by the thread that starts the hashers) and a scratch
 * memory of `scratch` bytes (a multiple of a WebAssembly page, made at the first request that needs it).
 */
export const answerer = (module: Xxh3.WasmModule, scratch: number): (request: Request) => Answer => {
  let own: { readonly view: Uint8Array; readonly exports: Xxh3.Exports } | undefined
  const scratchBlocks = scratch / Xxh3.BLOCK
  return (request) => {
    let exports: Xxh3.Exports
    if ("touch" in request) {
      touchPages(new Uint8Array(request.touch, request.offset, request.length), request.step)
      return { id: request.id, accumulators: [] }
    }
    if ("memory" in request) {
      exports = Xxh3.instantiate(request.memory, module)
      Xxh3.setAccumulators(exports, Xxh3.INITIAL_ACCUMULATORS)
      for (let done = 0; done < request.blocks; done += scratchBlocks) {
        exports.blocks(request.offset + done * Xxh3.BLOCK, Math.min(request.blocks - done, scratchBlocks))
      }
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
    return { id: request.id, accumulators: Xxh3.accumulators(exports) }
  }
}
