/**
 * Guest memory: named blocks of fixed-size pages, the zero-page test, digests and views for sending
 * without copying.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import type * as Scope from "effect/Scope"
import * as Buffer from "node:buffer"
import * as Digest from "./internal/native/digest.js"
import { DirtyLog } from "./internal/native/dirtyLog.js"
import * as Prefault from "./internal/native/prefault.js"
import { WriteGate } from "./internal/native/writeGate.js"
import * as Memory from "./internal/memory.js"
import * as PeerText from "./internal/peerText.js"
import * as Protocol from "./Protocol.js"

/**
 * Default page size: 4 KiB, as QEMU's target page on x86.
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_PAGE_SIZE = 4096

/**
 * Longest block name that fits QEMU's 256-byte NUL-terminated ramblock field.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_BLOCK_NAME_BYTES = 255

export type {
  /**
   * A block's dirty log (`Block["dirty"]`): a bit a page, set by every write through this module (`write`, `update`)
   * and taken (read and cleared at once) by a migration's or a save's round.
   *
   * @since 0.1.0
   * @category models
   */
  DirtyLog,
  /**
   * The memory's write gate (`GuestRam["Type"]["gate"]`): writers (`write`, `update`) wait at it while it is closed —
   * a live migration's switch-over, a migration or restore into this memory; after a successful migration it stays
   * closed until the application opens it (`open`), to keep serving from this copy.
   *
   * @since 0.1.0
   * @category models
   */
  WriteGate
}

/**
 * A named, page-aligned region of guest memory.
 *
 * @since 0.1.0
 * @category models
 */
export interface Block {
  readonly name: string
  /** The block's memory: written in place by the destination, viewed (not copied) by the source. */
  readonly bytes: Buffer
  /** Number of pages in the block. */
  readonly pages: number
  /** Pages written since the last round took them. */
  readonly dirty: DirtyLog
}

/**
 * How a block is described: by size (memory from `allocate`, touched up front on worker threads so that
 * receiving pages never waits on page faults) or by existing bytes (used in place, not copied; `allocate`
 * them for the fastest digests).
 *
 * @since 0.1.0
 * @category models
 */
export type BlockSpec =
  | { readonly name: string; readonly size: number }
  | { readonly name: string; readonly bytes: Uint8Array }

/**
 * A block's name and size, as the control channel announces it.
 *
 * @since 0.1.0
 * @category models
 */
export interface BlockLayout {
  readonly name: string
  readonly size: number
}

/**
 * An invalid memory layout.
 *
 * @since 0.1.0
 * @category errors
 */
export class GuestRamError extends Data.TaggedError("GuestRamError")<{
  readonly reason:
    | "BadPageSize"
    | "BadBlockName"
    | "BadBlockSize"
    | "DuplicateBlock"
    | "NoBlocks"
    | "TooManyBlocks"
    /** The memory could not be allocated (`allocateOrFail`). */
    | "OutOfMemory"
    /** Bytes given to `make` whose `ArrayBuffer` was detached (transferred) or shrunk since: a digest of what is left. */
    | "Detached"
    /** From plain JavaScript: memory given to `digest` / `digester` that no `make` built (`null`). */
    | "NotGuestRam"
  readonly detail: string
}> {
  override get message(): string {
    return this.reason === "OutOfMemory" || this.reason === "Detached" || this.reason === "NotGuestRam"
      ? this.detail
      : `invalid memory layout: ${this.detail}`
  }
}

/**
 * Guest memory: a page size and the named blocks.
 *
 * @since 0.1.0
 * @category tags
 */
export class GuestRam extends Context.Tag("effect-multifd/GuestRam")<
  GuestRam,
  {
    readonly pageSize: number
    readonly blocks: ReadonlyArray<Block>
    /** Total bytes over all blocks. */
    readonly size: number
    /** Looks a block up by name. */
    readonly block: (name: string) => Block | undefined
    /** The gate writers go through; a live migration closes it for the switch-over. */
    readonly gate: WriteGate
    /**
     * One permit, held by the migration or save of this memory under way (its rounds take the blocks' dirty logs,
     * so a second one at the same time would find clean every page the first took, and never send it again), or
     * by a restore or an incoming migration into it (whose writes go past the gate and the dirty log).
     */
    readonly transfer: Effect.Semaphore
  }
>() {}

/**
 * Zero-filled shared memory for a block, laid out so that digests read it in place (inside a
 * `WebAssembly.Memory`, up to 4 GiB; larger sizes get a plain `SharedArrayBuffer`, hashed through a copy).
 * Memory from here makes `digest` about twice as fast as other memory. Pages are not touched.
 *
 * @since 0.1.0
 * @category utils
 */
export const allocate = (size: number): Buffer => Digest.allocate(size)

/**
 * `allocate`, with memory that cannot be had (an address-space limit, `ulimit -v`, an exhausted heap) a
 * `GuestRamError` (`OutOfMemory`) naming `what` and the size, rather than a defect.
 *
 * @since 0.1.0
 * @category utils
 */
export const allocateOrFail = (size: number, what: string): Effect.Effect<Buffer, GuestRamError> =>
  Effect.try({
    try: () => allocate(size),
    catch: (cause) =>
      new GuestRamError({
        reason: "OutOfMemory",
        detail: `cannot allocate ${size} bytes for ${what}: ${cause instanceof Error ? cause.message : String(cause)}`
      })
  })

/** Bytes in GiB with two decimals, for messages. */
const gib = (bytes: number): string => (bytes / 2 ** 30).toFixed(2)

/**
 * Most blocks a memory may have. A VM has a few dozen (RAM, ROMs, video memory, a DIMM per hot-plug slot: QEMU
 * offers at most 256 slots); each block is a memory of its own here, which reserves address space, so a layout
 * of thousands of tiny blocks (a hostile hello) is refused before anything is allocated.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_BLOCKS = 1024

/**
 * Largest single block a Node Buffer can hold.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_BLOCK_SIZE = Buffer.constants.MAX_LENGTH

/**
 * Builds guest memory from block specs, validating page size (a power of two, 512 B–512 KiB), names
 * (1–255 UTF-8 bytes, no NUL, unique) and sizes (a positive multiple of the page size). A `{ name, size }`
 * block is fresh memory (`allocateOrFail`), touched up front on worker threads unless `prefault` is `false`
 * (memory most of which is never written: a QEMU guest's zero pages, which QEMU never sends). Fresh memory to be
 * touched that is more than the machine has available (`process.availableMemory()`, which heeds a container's
 * limit; on a Node 20 before 20.13, which lacks it, the machine's memory) fails `OutOfMemory` before anything
 * is allocated.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (options: {
  readonly pageSize?: number | undefined
  readonly blocks: ReadonlyArray<BlockSpec>
  readonly prefault?: boolean | undefined
}): Effect.Effect<GuestRam["Type"], GuestRamError> =>
  Effect.suspend(() => {
    // from plain JavaScript: options or blocks that are none, a block that is no spec, bytes that are no Uint8Array
    // (a string's length was taken for a size) were defects or misleading ("size 4096 is not a multiple of 4096")
    const shape = shapeProblem(options)
    if (shape !== undefined) return shape
    // (null, from plain JavaScript, is no page size: it took the default in silence)
    const pageSize = options.pageSize === undefined ? DEFAULT_PAGE_SIZE : options.pageSize
    if (!Protocol.isPageSize(pageSize)) {
      return new GuestRamError({
        reason: "BadPageSize",
        detail: `page size ${quoted(pageSize)} is not a power of two between ${Protocol.MIN_PAGE_SIZE} and ${Protocol.MAX_PAGE_SIZE}`
      })
    }
    const problem = checkLayout(
      pageSize,
      options.blocks.map((b) => ({ name: b.name, size: "size" in b ? b.size : b.bytes.length }))
    )
    if (problem) return problem
    const freshBytes = options.blocks.reduce((sum, b) => sum + ("size" in b ? b.size : 0), 0)
    const available = options.prefault === false ? Infinity : Prefault.availableMemory()
    if (freshBytes > available) {
      // touching every page of more than the machine has ends in its out-of-memory killer (or in swap), not in
      // an error: a hello or a snapshot header asking for it is refused instead, saying so
      return new GuestRamError({
        reason: "OutOfMemory",
        detail: `${freshBytes} bytes (${gib(freshBytes)} GiB) of memory are more than this machine has available ` +
          `(${gib(available)} GiB)`
      })
    }
    return Effect.gen(function*() {
      const fresh: Array<Uint8Array> = []
      const blocks: Array<Block> = []
      for (const spec of options.blocks) {
        const bytes = "bytes" in spec
          ? globalThis.Buffer.from(spec.bytes.buffer, spec.bytes.byteOffset, spec.bytes.byteLength)
          : yield* allocateOrFail(spec.size, `block ${JSON.stringify(spec.name)}`)
        if (!("bytes" in spec)) fresh.push(bytes)
        const pages = bytes.length / pageSize
        blocks.push({ name: spec.name, bytes, pages, dirty: new DirtyLog(pages) })
      }
      // fresh memory is touched now, on worker threads, rather than faulted in page by page as pages arrive
      if (options.prefault !== false) yield* Effect.forEach(fresh, (bytes) => Prefault.prefault(bytes), { discard: true })
      return fromBlocks(pageSize, blocks)
    })
  })

/** A number for a message, a string (plain JavaScript) quoted: a size "4096" read "size 4096". */
const quoted = (n: unknown): string => typeof n === "string" ? JSON.stringify(n) : String(n)

/** What is wrong with the shape of `make`'s options, if anything (no compiler checked them). */
const shapeProblem = (options: unknown): GuestRamError | undefined => {
  const o = options as { readonly blocks?: unknown } | null
  if (typeof o !== "object" || o === null || !Array.isArray(o.blocks)) {
    return new GuestRamError({ reason: "NoBlocks", detail: "the options must be { pageSize?, blocks: [...] }, with blocks an array" })
  }
  for (const [i, b] of (o.blocks as ReadonlyArray<unknown>).entries()) {
    const spec = b as { readonly name?: unknown; readonly size?: unknown; readonly bytes?: unknown } | null
    if (typeof spec !== "object" || spec === null || typeof spec.name !== "string") {
      return new GuestRamError({ reason: "BadBlockName", detail: `block ${i} is not { name, size } or { name, bytes } with a string name` })
    }
    if ("bytes" in spec ? !(spec.bytes instanceof Uint8Array) : typeof spec.size !== "number") {
      return new GuestRamError({
        reason: "BadBlockSize",
        detail: "bytes" in spec
          ? `block ${PeerText.quoted(spec.name)}: bytes must be a Uint8Array, not ${spec.bytes === null ? "null" : typeof spec.bytes}`
          : `block ${PeerText.quoted(spec.name)}: size ${quoted(spec.size)} is not a number`
      })
    }
  }
  return undefined
}

/**
 * Checks a layout without allocating anything; the first problem found, if any.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkLayout = (
  pageSize: number,
  layout: ReadonlyArray<BlockLayout>
): GuestRamError | undefined => {
  if (layout.length === 0) return new GuestRamError({ reason: "NoBlocks", detail: "no blocks" })
  if (layout.length > MAX_BLOCKS) {
    return new GuestRamError({ reason: "TooManyBlocks", detail: `${layout.length} blocks, more than ${MAX_BLOCKS}` })
  }
  const seen = new Set<string>()
  for (const { name, size } of layout) {
    const nameBytes = globalThis.Buffer.byteLength(name, "utf8")
    // what is wrong with it, said (a name cut inside an emoji, 9 bytes and no NUL, was told only the rule)
    const wrong = nameBytes === 0
      ? "is empty"
      : nameBytes > MAX_BLOCK_NAME_BYTES
      ? `is ${nameBytes} bytes long`
      : name.includes("\0")
      ? "contains a NUL"
      : /\p{Cs}/u.test(name)
      // (UTF-8 has no form for it: on the wire it would be U+FFFD, another name)
      ? "contains half of a character (a lone UTF-16 surrogate: a string cut inside an emoji?), which UTF-8 cannot carry"
      : undefined
    if (wrong !== undefined) {
      return new GuestRamError({
        reason: "BadBlockName",
        detail: `block name ${PeerText.quoted(name)} ${wrong}: a name is 1-${MAX_BLOCK_NAME_BYTES} UTF-8 bytes without NUL`
      })
    }
    if (seen.has(name)) {
      return new GuestRamError({ reason: "DuplicateBlock", detail: `block ${PeerText.quoted(name)} appears twice` })
    }
    seen.add(name)
    if (!Number.isSafeInteger(size) || size <= 0 || size % pageSize !== 0 || size > MAX_BLOCK_SIZE) {
      return new GuestRamError({
        reason: "BadBlockSize",
        detail: `block ${PeerText.quoted(name)} size ${size} is not a positive multiple of the page size ${pageSize}` +
          ` up to ${MAX_BLOCK_SIZE} bytes`
      })
    }
  }
  return undefined
}

const fromBlocks = (pageSize: number, blocks: ReadonlyArray<Block>): GuestRam["Type"] => {
  const byName = new Map(blocks.map((b) => [b.name, b]))
  return {
    pageSize,
    blocks,
    size: blocks.reduce((n, b) => n + b.bytes.length, 0),
    block: (name) => byName.get(name),
    gate: new WriteGate(),
    transfer: Effect.unsafeMakeSemaphore(1)
  }
}

/**
 * A layer providing guest memory built from block specs. Each build is a memory of its own (its own write gate,
 * dirty logs and one-transfer-at-a-time turn), even over bytes given: provide it once to the whole program (or
 * `Layer.memoize` it) so that writers and transfers share one `GuestRam`.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (options: {
  readonly pageSize?: number | undefined
  readonly blocks: ReadonlyArray<BlockSpec>
}): Layer.Layer<GuestRam, GuestRamError> => Layer.effect(GuestRam, make(options))

/**
 * The layout (names and sizes) of guest memory.
 *
 * @since 0.1.0
 * @category utils
 */
export const layoutOf = (ram: GuestRam["Type"]): ReadonlyArray<BlockLayout> =>
  ram.blocks.map((b) => ({ name: b.name, size: b.bytes.length }))

const zeroPages = new Map<number, Buffer>()

/**
 * A shared, read-only page of zeros for comparisons.
 *
 * @since 0.1.0
 * @category utils
 */
export const zeroPage = (pageSize: number): Buffer => {
  let page = zeroPages.get(pageSize)
  if (page === undefined) {
    page = globalThis.Buffer.alloc(pageSize)
    zeroPages.set(pageSize, page)
  }
  return page
}

/**
 * Whether the page at `offset` of `bytes` is all zeros (one native compare, no allocation).
 *
 * @since 0.1.0
 * @category guards
 */
export const isZeroPage = (bytes: Buffer, offset: number, pageSize: number): boolean =>
  // most pages that are not zero say so in their first or last byte: no native call for them
  bytes[offset] === 0 && bytes[offset + pageSize - 1] === 0 &&
  bytes.compare(zeroPage(pageSize), 0, pageSize, offset, offset + pageSize) === 0

/**
 * Makes the page at `offset` of `bytes` all zeros, writing it only if it is not already (QEMU's destination
 * skips the same write): a page never written stays untouched (no fault, nothing dirtied), and reading a page
 * costs less than writing it. The write is a copy of `zeroPage` (on shared memory `fill` stores byte by byte,
 * several times slower).
 *
 * @since 0.1.0
 * @category utils
 */
export const clearPage = (bytes: Buffer, offset: number, pageSize: number): void => {
  if (!isZeroPage(bytes, offset, pageSize)) bytes.set(zeroPage(pageSize), offset)
}

/**
 * Chunk size of the digest tree: each 64 MiB chunk is hashed on its own (in parallel where possible).
 *
 * @since 0.1.0
 * @category constants
 */
export const DIGEST_CHUNK = Digest.CHUNK

/**
 * A block's digest: SHA-256 over the XXH3-128 of each 64 MiB chunk, hex-encoded.
 *
 * @since 0.1.0
 * @category models
 */
export interface BlockDigest {
  readonly name: string
  readonly digest: string
}

/**
 * Digests every block. Shared memory (from `allocate` or any `SharedArrayBuffer`) is hashed by worker
 * threads and this thread in parallel, memory from `allocate` without a copy; other memory is hashed on
 * this thread, yielding every 4 MiB. Memory given to `make` whose `ArrayBuffer` was detached since (transferred
 * to another thread) fails `Detached`: its digest was that of no bytes, for a block of its size.
 *
 * @since 0.1.0
 * @category utils
 */
export const digest = (ram: GuestRam["Type"]): Effect.Effect<ReadonlyArray<BlockDigest>, GuestRamError> =>
  Effect.suspend(() => {
    const bad = notGuestRam(ram, "digest")
    return bad === undefined ? Memory.digestOn(ram, undefined, detached) : Effect.fail(bad)
  })

/**
 * Starts the worker threads of `digest` now and returns a digest that hashes on them: a thread takes tens
 * of milliseconds to start, which a migration would otherwise spend paused. The threads stop with the scope; the
 * digest, run after that, hashes on the calling thread (it waited for ever for the threads' answers), with a warning.
 *
 * @since 0.1.0
 * @category constructors
 */
export const digester = (
  ram: GuestRam["Type"]
): Effect.Effect<Effect.Effect<ReadonlyArray<BlockDigest>, GuestRamError>, never, Scope.Scope> =>
  Effect.suspend(() => {
    // no memory, no threads: the digest it gives fails as `digest` of it would
    const bad = notGuestRam(ram, "digester")
    if (bad !== undefined) return Effect.succeed(Effect.fail(bad))
    return Effect.map(Digest.pool(Digest.threadsFor(ram.blocks.map((b) => b.bytes))), (pool) =>
      Memory.hereIfStopped(Memory.digestOn(ram, pool, detached), digest(ram)))
  })

/** Why `ram`, given to `what` (`digest`), is no `GuestRam` (from plain JavaScript: `null` threw or died), if it is not. */
const notGuestRam = (ram: unknown, what: string): GuestRamError | undefined => {
  const problem = Memory.notGuestRam(ram, `GuestRam.${what}: the memory ${ram === null ? "null" : typeof ram}`)
  return problem === undefined ? undefined : new GuestRamError({ reason: "NotGuestRam", detail: problem })
}

/** A digest failure: the memory given to `make` is no longer all there (its `ArrayBuffer` detached or shrunk). */
const detached = (detail: string) => new GuestRamError({ reason: "Detached", detail })

/** A byte offset or length: a whole number of 0 or more. */
const isWhole = (n: number): boolean => Number.isSafeInteger(n) && n >= 0

/**
 * A write outside a block's bounds.
 *
 * @since 0.1.0
 * @category errors
 */
export class OutOfBounds extends Data.TaggedError("OutOfBounds")<{
  readonly block: string
  readonly offset: number
  readonly length: number
  readonly size: number | undefined
}> {
  override get message(): string {
    if (this.size === undefined) return `no block named ${JSON.stringify(this.block)}`
    if (!isWhole(this.offset) || !isWhole(this.length)) {
      return `a write of ${this.length} bytes at ${this.offset} to block ${JSON.stringify(this.block)}: offset and ` +
        `length must be whole numbers of 0 or more (the block has ${this.size} bytes)`
    }
    return `write of ${this.length} bytes at ${this.offset} is outside block ${JSON.stringify(this.block)} (${this.size} bytes)`
  }
}

/**
 * A write that cannot wait for writers to go on: it comes from inside a progress report (`onProgress`) of the
 * migration or save of this memory while that one holds writers paused for its switch-over, or of a restore or an
 * incoming migration into this memory while its gate is closed (`Deadlock`). The transfer waits for its report, and
 * the write would wait for the transfer: rather than hang, the write fails at once, having written nothing.
 *
 * @since 0.1.0
 * @category errors
 */
export class WriteBlocked extends Data.TaggedError("WriteBlocked")<{
  /**
   * `Deadlock`: see above. From plain JavaScript (no compiler checked the call), the write is refused too, having
   * written nothing: `NotBytes`, `write` given data that is no `Uint8Array` (a string wrote zeros, and succeeded);
   * `BadCallback`, `update` given a callback that is no function, or one that returned a Promise (an `async` one:
   * what it writes after an `await` goes past the gate and the dirty log, unseen by a migration, so it fails at once
   * — its pages are marked dirty all the same); `Detached`, memory given as bytes whose `ArrayBuffer` was detached
   * or shrunk since `make` (it said "outside block (0 bytes)"); `NotGuestRam`, memory that no `make` built (`null`).
   */
  readonly reason: "Deadlock" | "NotBytes" | "BadCallback" | "Detached" | "NotGuestRam"
  readonly block: string
  readonly detail: string
}> {
  override get message(): string {
    return this.detail
  }
}

const deadlock = (name: string) => () =>
  new WriteBlocked({
    reason: "Deadlock",
    block: name,
    detail: `a write to block ${JSON.stringify(name)} from inside the progress report of the migration or save of ` +
      "this memory, during its switch-over: writers are paused until it ends, and it waits for the report (write " +
      "in phase precopy only, or after the migration)"
  })

const touch = (ram: GuestRam["Type"], name: string, offset: number, length: number) => {
  // memory from plain JavaScript that no `make` built (`null`): the write died ("Cannot read properties of null")
  const notRam = Memory.notGuestRam(ram, `a write to block ${JSON.stringify(name)}: the memory ${ram === null ? "null" : typeof ram}`)
  if (notRam !== undefined) return new WriteBlocked({ reason: "NotGuestRam", block: name, detail: notRam })
  const block = ram.block(name)
  // memory given as bytes whose buffer is gone (transferred to a thread, shrunk): every write was "outside block
  // (0 bytes)", as if the caller had the offset wrong
  if (block !== undefined && block.bytes.length !== block.pages * ram.pageSize) {
    return new WriteBlocked({ reason: "Detached", block: name, detail: Memory.missing(ram)! })
  }
  // a length that is not a whole number (NaN, computed from something undefined) ran `f` on an empty view, or on
  // a view of its whole part, and the write meant was dropped in silence
  if (block === undefined || !isWhole(offset) || !isWhole(length) || offset + length > block.bytes.length) {
    return new OutOfBounds({ block: name, offset, length, size: block?.bytes.length })
  }
  return block
}

/**
 * Updates `length` bytes of a block in place: waits while a migration holds writers paused, then marks the
 * pages the range covers dirty and runs `f` on a view of it (synchronously; an `f` that throws leaves them dirty).
 * A block that does not exist, an offset or length that is not a whole number of 0 or more, or a range past the
 * block's end fails `OutOfBounds` before `f` runs.
 * From inside a progress report of the migration or save of this memory that holds writers paused (its
 * switch-over), it fails at once with `WriteBlocked` instead of waiting for a migration that waits for it.
 *
 * @since 0.1.0
 * @category utils
 */
export const update = <A>(
  ram: GuestRam["Type"],
  name: string,
  offset: number,
  length: number,
  f: (view: Buffer) => A
): Effect.Effect<A, OutOfBounds | WriteBlocked> =>
  Effect.suspend((): Effect.Effect<A, OutOfBounds | WriteBlocked> => {
    const block = touch(ram, name, offset, length)
    if (block instanceof OutOfBounds || block instanceof WriteBlocked) return Effect.fail(block)
    if (typeof f !== "function") {
      return Effect.fail(
        new WriteBlocked({ reason: "BadCallback", block: name, detail: `the callback of an update of block ${JSON.stringify(name)} is not a function` })
      )
    }
    return Effect.flatMap(
      ram.gate.pass(() => {
        // marked before `f` runs (nothing runs between the two): bytes an `f` that throws wrote before it threw are
        // dirty all the same, and a later round sends them (a live save had reported success with the old bytes)
        if (length > 0) block.dirty.mark(Math.floor(offset / ram.pageSize), Math.floor((offset + length - 1) / ram.pageSize))
        return f(block.bytes.subarray(offset, offset + length))
      }, deadlock(name)),
      (result): Effect.Effect<A, WriteBlocked> =>
        // an async callback returned at its first await: the rest of it writes later, past the gate
        isThenable(result)
          ? Effect.fail(
            new WriteBlocked({
              reason: "BadCallback",
              block: name,
              detail: `the callback of an update of block ${JSON.stringify(name)} returned a Promise: it must write ` +
                "synchronously (what an async callback writes after an await goes past the write gate and the dirty " +
                "log, unseen by a migration)"
            })
          )
          : Effect.succeed(result)
    )
  })

/**
 * Writes `data` into a block at `offset` (see `update`).
 *
 * @since 0.1.0
 * @category utils
 */
export const write = (
  ram: GuestRam["Type"],
  name: string,
  offset: number,
  data: Uint8Array
): Effect.Effect<void, OutOfBounds | WriteBlocked> =>
  // data that is no bytes, from plain JavaScript: a string was "set" as zeros (and the write succeeded), null threw
  // as the call was made
  data instanceof Uint8Array
    ? update(ram, name, offset, data.length, (view) => view.set(data))
    : Effect.fail(
      new WriteBlocked({
        reason: "NotBytes",
        block: name,
        detail: `a write to block ${JSON.stringify(name)} of data that is not a Uint8Array (${
          data === null ? "null" : typeof data
        })`
      })
    )

const isThenable = (u: unknown): boolean =>
  (typeof u === "object" || typeof u === "function") && u !== null && typeof (u as PromiseLike<unknown>).then === "function"

/**
 * Number of dirty pages over all blocks.
 *
 * @since 0.1.0
 * @category utils
 */
export const dirtyPages = (ram: GuestRam["Type"]): number => ram.blocks.reduce((n, b) => n + b.dirty.count(), 0)
