/**
 * XXH3-128 (xxHash 0.8, default secret, no seed) of inputs longer than 240 bytes, the only ones a digest
 * chunk can be (a chunk is at least one page). The stripe loop runs in a small WebAssembly SIMD module
 * that works on whatever memory it is instantiated with: guest memory that lives in a `WebAssembly.Memory`
 * is hashed where it lies, without the copy into a hasher's own memory that cost more than the hash itself
 * (`internal/digest` decides). The last partial block and the final mix run here, in BigInt arithmetic (a
 * few hundred operations per input).
 *
 * @internal
 */

/** Bytes of one XXH3 block: 16 stripes of 64 bytes, then the accumulators are scrambled. */
export const BLOCK = 1024
/** The shortest input this module hashes (shorter ones take XXH3's other paths, not written here). */
export const MIN_LENGTH = 241
/**
 * The part of the WebAssembly JavaScript API used here. Node has all of it; `@types/node` leaves its
 * types to the DOM library, which this project does not load (and a global declaration here would clash
 * with it in a program that does).
 */
export interface WasmMemory {
  readonly buffer: ArrayBuffer | SharedArrayBuffer
}
/** A compiled module (opaque here). */
export interface WasmModule {
  readonly _wasmModule?: never
}
/** A global's box. */
export interface WasmGlobal {
  value: unknown
}
interface WasmApi {
  readonly Module: new(bytes: Uint8Array) => WasmModule
  readonly Instance: new(
    module: WasmModule,
    imports: Record<string, Record<string, unknown>>
  ) => { readonly exports: Record<string, unknown> }
  readonly Memory: new(descriptor: { readonly initial: number; readonly maximum: number; readonly shared: boolean }) => WasmMemory
}
/** `globalThis.WebAssembly`, typed as above. */
export const Wasm: WasmApi = (globalThis as unknown as { readonly WebAssembly: WasmApi }).WebAssembly

/** One WebAssembly page. */
export const WASM_PAGE = 65536
/** Largest memory a 32-bit WebAssembly module addresses, in pages. */
export const MAX_WASM_PAGES = 65536

/** XXH3's default secret (`XXH3_kSecret`). */
const SECRET = Uint8Array.from([
  0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
  0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
  0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
  0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
  0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
  0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
  0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
  0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
  0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
  0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
  0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
  0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e
])
const SECRET_VIEW = new DataView(SECRET.buffer)
const STRIPE = 64
const STRIPES_PER_BLOCK = (SECRET.length - STRIPE) / 8
/** Secret offset of the scramble, the last stripe and the two merges (`XXH_SECRET_*_START`). */
const SCRAMBLE_AT = SECRET.length - STRIPE
const LAST_STRIPE_AT = SECRET.length - STRIPE - 7
const MERGE_LOW_AT = 11
const MERGE_HIGH_AT = SECRET.length - STRIPE - 11

const PRIME32_1 = 0x9E3779B1n
const PRIME32_2 = 0x85EBCA77n
const PRIME32_3 = 0xC2B2AE3Dn
const PRIME64_1 = 0x9E3779B185EBCA87n
const PRIME64_2 = 0xC2B2AE3D27D4EB4Fn
const PRIME64_3 = 0x165667B19E3779F9n
const PRIME64_4 = 0x85EBCA77C2B2AE63n
const PRIME64_5 = 0x27D4EB2F165667C5n
const PRIME_MX1 = 0x165667919E3779F9n
const MASK64 = (1n << 64n) - 1n
const MASK32 = (1n << 32n) - 1n

/** The accumulators' starting values (`XXH3_INIT_ACC`). */
export const INITIAL_ACCUMULATORS: ReadonlyArray<bigint> = [
  PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1
]

// ---------------------------------------------------------------------------------------------------------
// The WebAssembly module, written out instruction by instruction (no compiler needed to build it).
//
//   (import "env" "memory" (memory 0 65536 shared))
//   (global $a0 … $a7 (mut i64))   ;; the eight accumulators, exported as a0 … a7
//   (func (export "blocks") (param $ptr i32) (param $count i32)
//     ;; for each of $count blocks at $ptr: 16 stripes of XXH3_accumulate_512, then XXH3_scrambleAcc,
//     ;; four v128 registers holding the accumulators, the secret inlined as v128 constants
// ---------------------------------------------------------------------------------------------------------

const uleb = (value: number): Array<number> => {
  const out: Array<number> = []
  do {
    let byte = value & 0x7f
    value = Math.floor(value / 128)
    if (value !== 0) byte |= 0x80
    out.push(byte)
  } while (value !== 0)
  return out
}
/** Signed LEB128 of a small non-negative integer (`i32.const` immediates). */
const sleb = (value: number): Array<number> => {
  const out: Array<number> = []
  for (;;) {
    const byte = value & 0x7f
    value >>= 7
    if (value === 0 && (byte & 0x40) === 0) return [...out, byte]
    out.push(byte | 0x80)
  }
}
const ascii = (text: string) => [...uleb(text.length), ...Buffer.from(text, "latin1")]
const section = (id: number, body: ReadonlyArray<number>) => [id, ...uleb(body.length), ...body]
const vector = (items: ReadonlyArray<ReadonlyArray<number>>) => [...uleb(items.length), ...items.flat()]

const op = {
  block: [0x02, 0x40],
  loop: [0x03, 0x40],
  end: [0x0b],
  br: (depth: number) => [0x0c, ...uleb(depth)],
  brIf: (depth: number) => [0x0d, ...uleb(depth)],
  localGet: (i: number) => [0x20, ...uleb(i)],
  localSet: (i: number) => [0x21, ...uleb(i)],
  localTee: (i: number) => [0x22, ...uleb(i)],
  globalGet: (i: number) => [0x23, ...uleb(i)],
  globalSet: (i: number) => [0x24, ...uleb(i)],
  i32Const: (n: number) => [0x41, ...sleb(n)],
  i32Eqz: [0x45],
  i32Add: [0x6a],
  i32Sub: [0x6b],
  simd: (code: number, ...immediates: Array<number>) => [0xfd, ...uleb(code), ...immediates],
  v128Load: (offset: number) => [0xfd, 0x00, 4, ...uleb(offset)],
  v128Const: (bytes: ArrayLike<number>) => [0xfd, 0x0c, ...Array.from(bytes)],
  i8x16Shuffle: (lanes: ReadonlyArray<number>) => [0xfd, 0x0d, ...lanes],
  i64x2Splat: [0xfd, 0x12],
  i64x2ExtractLane: (lane: number) => [0xfd, 0x1d, lane],
  i64x2ReplaceLane: (lane: number) => [0xfd, 0x1e, lane],
  v128Xor: [0xfd, 0x51],
  i64x2ShrU: [0xfd, ...uleb(0xcd)],
  i64x2Add: [0xfd, ...uleb(0xce)],
  i64x2Mul: [0xfd, ...uleb(0xd5)],
  i64x2ExtmulLowI32x4U: [0xfd, ...uleb(0xde)],
  i64x2ExtmulHighI32x4U: [0xfd, ...uleb(0xdf)]
}

/**
 * The secret windows the loop reads (every 8 bytes from 0 to 176) live in v128 globals: a `v128.const`
 * costs V8 several instructions to build, a global one load.
 */
const SECRET_WINDOWS = (SECRET.length - 16) / 8 + 1
/** Index of the global holding the 16 secret bytes at `at` (the eight accumulators come first). */
const secretGlobal = (at: number) => 8 + at / 8
const bytesLE64 = (value: bigint) => {
  const out = Buffer.alloc(16)
  out.writeBigUInt64LE(value, 0)
  out.writeBigUInt64LE(value, 8)
  return out
}
/** The low 32-bit halves of the two 64-bit lanes (twice), and the high ones. */
const LOW_HALVES = [0, 1, 2, 3, 8, 9, 10, 11, 0, 1, 2, 3, 8, 9, 10, 11]
const HIGH_HALVES = [4, 5, 6, 7, 12, 13, 14, 15, 4, 5, 6, 7, 12, 13, 14, 15]
const SWAP_LANES = [8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7]

const blocksBody = (): Array<number> => {
  const ptr = 0, count = 1, acc = (i: number) => 2 + i, data = (i: number) => 6 + i, key = (i: number) => 10 + i
  const code: Array<number> = []
  const emit = (...parts: ReadonlyArray<ReadonlyArray<number>>) => parts.forEach((p) => code.push(...p))
  for (let i = 0; i < 4; i++) {
    emit(op.globalGet(2 * i), op.i64x2Splat, op.globalGet(2 * i + 1), op.i64x2ReplaceLane(1), op.localSet(acc(i)))
  }
  emit(op.block, op.loop, op.localGet(count), op.i32Eqz, op.brIf(1))
  for (let stripe = 0; stripe < STRIPES_PER_BLOCK; stripe++) {
    for (let i = 0; i < 4; i++) {
      // data = load; key = data ^ secret
      emit(
        op.localGet(ptr), op.v128Load(stripe * STRIPE + 16 * i), op.localTee(data(i)),
        op.globalGet(secretGlobal(stripe * 8 + 16 * i)), op.v128Xor, op.localSet(key(i))
      )
    }
    for (let i = 0; i < 4; i++) {
      emit(
        op.localGet(key(i)), op.localGet(key(i)), op.i8x16Shuffle(LOW_HALVES),
        op.localGet(key(i)), op.localGet(key(i)), op.i8x16Shuffle(HIGH_HALVES),
        op.i64x2ExtmulLowI32x4U, op.localGet(acc(i)), op.i64x2Add,
        op.localGet(data(i)), op.localGet(data(i)), op.i8x16Shuffle(SWAP_LANES), op.i64x2Add,
        op.localSet(acc(i))
      )
    }
  }
  for (let i = 0; i < 4; i++) {
    // acc = ((acc ^ (acc >> 47)) ^ secret) * PRIME32_1
    emit(
      op.localGet(acc(i)), op.localGet(acc(i)), op.i32Const(47), op.i64x2ShrU, op.v128Xor,
      op.globalGet(secretGlobal(SCRAMBLE_AT + 16 * i)), op.v128Xor, op.v128Const(bytesLE64(PRIME32_1)),
      op.i64x2Mul, op.localSet(acc(i))
    )
  }
  emit(
    op.localGet(ptr), op.i32Const(BLOCK), op.i32Add, op.localSet(ptr),
    op.localGet(count), op.i32Const(1), op.i32Sub, op.localSet(count),
    op.br(0), op.end, op.end
  )
  for (let i = 0; i < 4; i++) {
    emit(
      op.localGet(acc(i)), op.i64x2ExtractLane(0), op.globalSet(2 * i),
      op.localGet(acc(i)), op.i64x2ExtractLane(1), op.globalSet(2 * i + 1)
    )
  }
  emit(op.end)
  const locals = vector([[12, 0x7b]]) // v128 locals: four accumulators, four data, four keys
  return [...uleb(locals.length + code.length), ...locals, ...code]
}

const moduleBytes = (): Uint8Array => {
  const I32 = 0x7f, I64 = 0x7e
  const V128 = 0x7b
  const globals = [
    ...Array.from({ length: 8 }, () => [I64, 1, 0x42, 0, 0x0b]), // (mut i64) (i64.const 0)
    ...Array.from({ length: SECRET_WINDOWS }, (_, w) => [V128, 1, ...op.v128Const(SECRET.subarray(8 * w, 8 * w + 16)), 0x0b])
  ]
  const exports = [
    [...ascii("blocks"), 0x00, 0],
    ...Array.from({ length: 8 }, (_, i) => [...ascii(`a${i}`), 0x03, i])
  ]
  return Uint8Array.from([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, vector([[0x60, ...vector([[I32], [I32]]), 0]])),
    ...section(2, vector([[...ascii("env"), ...ascii("memory"), 0x02, 0x03, ...uleb(0), ...uleb(MAX_WASM_PAGES)]])),
    ...section(3, vector([[0]])),
    ...section(6, vector(globals)),
    ...section(7, vector(exports)),
    ...section(10, vector([blocksBody()]))
  ])
}

let compiled: WasmModule | undefined
/** The compiled module (compiled once, on first use; a worker gets it through `workerData`). */
export const module = (): WasmModule => (compiled ??= new Wasm.Module(moduleBytes()))

/** What an instance exports: `blocks(ptr, count)` and the accumulators. */
export interface Exports {
  readonly blocks: (ptr: number, count: number) => void
  readonly [accumulator: `a${number}`]: WasmGlobal
}

/** An instance of the module working on `memory`. */
export const instantiate = (memory: WasmMemory, compiledModule: WasmModule = module()): Exports =>
  new Wasm.Instance(compiledModule, { env: { memory } }).exports as unknown as Exports

/** Sets an instance's accumulators. */
export const setAccumulators = (exports: Exports, values: ReadonlyArray<bigint>): void => {
  for (let i = 0; i < 8; i++) exports[`a${i}`]!.value = values[i]!
}

/** Reads an instance's accumulators. */
export const accumulators = (exports: Exports): Array<bigint> =>
  Array.from({ length: 8 }, (_, i) => BigInt.asUintN(64, exports[`a${i}`]!.value as bigint))

// ---------------------------------------------------------------------------------------------------------
// The parts of XXH3 that run once per input: the last partial block, the last stripe, the merge.
// ---------------------------------------------------------------------------------------------------------

/** Full blocks the module processes for an input of `length` bytes (`(length - 1) / BLOCK`). */
export const fullBlocks = (length: number): number => Math.floor((length - 1) / BLOCK)

const accumulate512 = (acc: Array<bigint>, input: DataView, at: number, secretAt: number) => {
  for (let i = 0; i < 8; i++) {
    const value = input.getBigUint64(at + 8 * i, true)
    const key = value ^ SECRET_VIEW.getBigUint64(secretAt + 8 * i, true)
    acc[i ^ 1] = (acc[i ^ 1]! + value) & MASK64
    acc[i] = (acc[i]! + (key & MASK32) * (key >> 32n)) & MASK64
  }
}

const mul128Fold64 = (a: bigint, b: bigint) => {
  const product = a * b
  return (product & MASK64) ^ (product >> 64n)
}

const avalanche = (h: bigint) => {
  h ^= h >> 37n
  h = (h * PRIME_MX1) & MASK64
  return h ^ (h >> 32n)
}

const mergeAccumulators = (acc: ReadonlyArray<bigint>, secretAt: number, start: bigint) => {
  let result = start
  for (let i = 0; i < 4; i++) {
    result += mul128Fold64(
      acc[2 * i]! ^ SECRET_VIEW.getBigUint64(secretAt + 16 * i, true),
      acc[2 * i + 1]! ^ SECRET_VIEW.getBigUint64(secretAt + 16 * i + 8, true)
    )
  }
  return avalanche(result & MASK64)
}

/**
 * Finishes the hash of `input` from the accumulators after its `fullBlocks`: returns the 16 bytes of
 * XXH3-128's canonical form (high half, then low half, both big-endian).
 */
export const finish = (accumulated: ReadonlyArray<bigint>, input: Uint8Array): Buffer => {
  const length = input.length
  if (length < MIN_LENGTH) throw new RangeError(`XXH3 here takes at least ${MIN_LENGTH} bytes, not ${length}`)
  const acc = accumulated.map((value) => BigInt.asUintN(64, value))
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength)
  const tail = fullBlocks(length) * BLOCK
  const stripes = Math.floor((length - 1 - tail) / STRIPE)
  for (let s = 0; s < stripes; s++) accumulate512(acc, view, tail + s * STRIPE, s * 8)
  accumulate512(acc, view, length - STRIPE, LAST_STRIPE_AT)
  const bits = BigInt(length)
  const low = mergeAccumulators(acc, MERGE_LOW_AT, (bits * PRIME64_1) & MASK64)
  const high = mergeAccumulators(acc, MERGE_HIGH_AT, ~(bits * PRIME64_2) & MASK64)
  const out = Buffer.alloc(16)
  out.writeBigUInt64BE(high, 0)
  out.writeBigUInt64BE(low, 8)
  return out
}
