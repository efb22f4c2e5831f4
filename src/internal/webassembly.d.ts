/**
 * The part of the WebAssembly JavaScript API that `internal/xxh3` and `internal/digest` use (Node has it;
 * `@types/node` leaves it to the DOM library, which this project does not load).
 *
 * @internal
 */
declare namespace WebAssembly {
  class Module {
    constructor(bytes: Uint8Array)
  }
  class Instance {
    constructor(module: Module, imports: Record<string, Record<string, unknown>>)
    readonly exports: Record<string, unknown>
  }
  class Memory {
    constructor(descriptor: { readonly initial: number; readonly maximum?: number; readonly shared?: boolean })
    readonly buffer: ArrayBuffer | SharedArrayBuffer
  }
  class Global {
    value: unknown
  }
}
