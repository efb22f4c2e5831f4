/**
 * zstd streaming contexts from `zstd-napi` (libzstd bundled and built by node-gyp at install): one
 * compression context per sending channel, whose frame is flushed (`ZSTD_e_flush`) at the end of every
 * packet and never ended, and one decompression context per receiving channel, fed packet by packet —
 * QEMU's multifd-zstd. Calls are synchronous: compression goes a piece at a time, so that its caller can let
 * the event loop run between pieces (level 19 takes 100–400 ms a 512 KiB packet here); decompression is
 * fast at every level. The binding is loaded on first use, so that a machine without it still runs `none`
 * and `zlib`.
 *
 * @internal
 */
import { createRequire } from "node:module"
import type * as Binding from "zstd-napi/binding.js"

type ZstdBinding = typeof Binding

let loaded: { readonly binding: ZstdBinding } | { readonly error: unknown } | undefined

/** The binding, or the reason it cannot be loaded. */
export const load = (): ZstdBinding | string => {
  if (loaded === undefined) {
    try {
      loaded = { binding: createRequire(import.meta.url)("zstd-napi/binding") as ZstdBinding }
    } catch (error) {
      loaded = { error }
    }
  }
  if ("binding" in loaded) return loaded.binding
  // Node's "Cannot find module" goes on with its require stack, a line a module: the first line says it
  const e = loaded.error as { readonly message?: string } | undefined
  const why = (e?.message ?? String(loaded.error)).split("\n")[0]!.trim()
  return `the zstd binding (npm package zstd-napi) cannot be loaded: ${why} (it is built when the package is installed, ` +
    "not with --ignore-scripts: npm rebuild zstd-napi builds it)"
}

let open = 0

/** zstd contexts created and not yet released (for leak tests). */
export const openContexts = (): number => open

/** Turns a libzstd failure (thrown by the binding) into its message. */
export const describe = (error: unknown): string =>
  error instanceof Error ? error.message : String(error)

/**
 * Runs shorter than this (pages scattered in memory) are first copied together: one libzstd call for many
 * pages, where feeding each page costs a call through the binding (about as much as compressing it at level 1).
 */
export const GATHER_BELOW = 64 * 1024

/**
 * A compression context whose single frame spans the channel's life. A packet is compressed in pieces
 * (`begin`, `step` until it says done, `finish`), so that a caller can let other work run between pieces:
 * at high levels a packet takes hundreds of milliseconds. Long runs of contiguous pages are read in place,
 * short ones copied together into a scratch buffer first (`GATHER_BELOW`). libzstd copies what it is fed
 * into its own window, so the pages may change between pieces (a page written meanwhile is dirty, sent again
 * later). The output buffer is reused: the views `finish` returns stay valid until the next `begin`.
 */
export class ZstdCompressor {
  private cctx: Binding.CCtx | undefined
  private out: Buffer
  private scratch: Buffer = Buffer.alloc(0)
  // the packet in progress: what to feed (views of memory or of the scratch), and the output so far
  private readonly segments: Array<Uint8Array> = []
  private segment = 0
  private run: Uint8Array = new Uint8Array(0)
  private last = false
  private at = 0
  private pageSize = 0
  private readonly full: Array<Buffer> = []

  constructor(private readonly zstd: ZstdBinding, level: number, packetBytes: number) {
    const cctx = new zstd.CCtx()
    cctx.setParameter(zstd.CParameter.compressionLevel, level)
    this.cctx = cctx
    this.out = Buffer.allocUnsafe(this.capacity(packetBytes))
    open++
  }

  private capacity(bytes: number): number {
    return this.zstd.compressBound(bytes) + 1024
  }

  /** Starts a packet of `count` pages (`offsets[i]`, `pageSize` bytes each) of `memory`. */
  begin(memory: Uint8Array, offsets: ArrayLike<number>, count: number, pageSize: number): void {
    if (this.cctx === undefined) throw new Error("zstd compression context already released")
    const bytes = count * pageSize
    if (this.out.length < this.capacity(bytes)) this.out = Buffer.allocUnsafe(this.capacity(bytes))
    this.pageSize = pageSize
    this.segments.length = 0
    this.segment = 0
    this.run = memory.subarray(0, 0)
    this.last = false
    this.at = 0
    this.full.length = 0
    // runs of contiguous pages; short ones copied one after the other into the scratch (one segment until
    // the next long run)
    let gathered = 0
    let from = 0
    for (let i = 0; i < count;) {
      const start = offsets[i]!
      let end = start + pageSize
      for (i++; i < count && offsets[i] === end; i++) end += pageSize
      if (end - start >= GATHER_BELOW) {
        if (gathered > from) this.segments.push(this.scratch.subarray(from, gathered))
        from = gathered
        this.segments.push(memory.subarray(start, end))
      } else {
        if (this.scratch.length < bytes) this.scratch = Buffer.allocUnsafe(bytes)
        this.scratch.set(memory.subarray(start, end), gathered)
        gathered += end - start
      }
    }
    if (gathered > from) this.segments.push(this.scratch.subarray(from, gathered))
  }

  /**
   * Feeds at most `bytes` more of the packet (a long segment in pieces) and, after the last, flushes the
   * frame. Returns whether the packet is complete. Throws on a libzstd failure.
   */
  step(bytes: number): boolean {
    const cctx = this.cctx
    if (cctx === undefined) throw new Error("zstd compression context already released")
    const { flush, continue: more } = this.zstd.EndDirective
    // a packet without pages: nothing to feed, nothing to flush
    if (this.segments.length === 0) return true
    let budget = bytes
    while (true) {
      if (this.run.length === 0) {
        if (this.segment === this.segments.length) return this.last
        this.run = this.segments[this.segment++]!
      }
      if (budget <= 0) return false
      const piece = this.run.length <= budget ? this.run : this.run.subarray(0, budget)
      this.run = piece === this.run ? this.run.subarray(this.run.length) : this.run.subarray(piece.length)
      budget -= piece.length
      this.last = this.run.length === 0 && this.segment === this.segments.length
      this.feed(cctx, piece, this.last ? flush : more)
      if (this.last) return true
    }
  }

  private feed(cctx: Binding.CCtx, input: Uint8Array, directive: Binding.EndDirective): void {
    let src = input
    while (true) {
      if (this.at === this.out.length) {
        // only when the output bound was wrong: go on in a fresh buffer
        this.full.push(this.out)
        this.out = Buffer.allocUnsafe(this.capacity(this.pageSize))
        this.at = 0
      }
      const [remaining, produced, consumed] = cctx.compressStream2(this.out.subarray(this.at), src, directive)
      this.at += produced
      if (consumed > 0) src = src.subarray(consumed)
      if (src.length === 0 && (directive !== this.zstd.EndDirective.flush || remaining === 0)) break
    }
  }

  /** Appends the packet's output views to `chunks` (after `step` said done) and returns their size. */
  finish(chunks: Array<Uint8Array>): number {
    let total = 0
    for (const buffer of this.full) {
      chunks.push(buffer)
      total += buffer.length
    }
    this.full.length = 0
    if (this.at > 0) chunks.push(this.out.subarray(0, this.at))
    // the pages are not kept past the packet
    this.segments.length = 0
    this.run = this.scratch.subarray(0, 0)
    return total + this.at
  }

  /**
   * Compresses `count` pages of `memory` into the frame at once and flushes it; appends the output views to
   * `chunks`, returns their size. Throws on a libzstd failure.
   */
  compress(
    memory: Uint8Array,
    offsets: ArrayLike<number>,
    count: number,
    pageSize: number,
    chunks: Array<Uint8Array>
  ): number {
    this.begin(memory, offsets, count, pageSize)
    while (!this.step(Number.POSITIVE_INFINITY));
    return this.finish(chunks)
  }

  /** Drops the context (libzstd memory is freed by the binding's finalizer: it has no explicit free). */
  release(): void {
    if (this.cctx === undefined) return
    this.cctx = undefined
    this.segments.length = 0
    this.run = this.scratch.subarray(0, 0)
    open--
  }
}

/** The result of feeding one packet's payload to a decompressor. */
export interface Decompressed {
  /** Bytes written to the output (at most its length: a full output means "this much or more"). */
  readonly produced: number
  /** Input bytes the decoder did not take (it stopped early: the output was full). */
  readonly leftover: number
}

/**
 * The largest window (log2 of its bytes) a decompressor keeps: what a compressor at the highest level accepted
 * (20, QEMU's multifd-zstd-level limit too) uses on a stream of unknown size, 32 MiB. A frame asking for more
 * fails ("Frame requires too much memory for decoding"): libzstd's own limit, 2^27, let a few hundred KiB of
 * packets (RLE blocks of the same byte) make each channel keep 128 MiB, whatever memory the destination had
 * agreed to receive.
 */
export const MAX_WINDOW_LOG = 25

/** A decompression context fed packet by packet; its window is at most 2^`MAX_WINDOW_LOG` bytes. */
export class ZstdDecompressor {
  private dctx: Binding.DCtx | undefined

  constructor(zstd: ZstdBinding) {
    const dctx = new zstd.DCtx()
    dctx.setParameter(zstd.DParameter.windowLogMax, MAX_WINDOW_LOG)
    this.dctx = dctx
    open++
  }

  /**
   * Decodes `input` into `output`, never writing past its end, and stops as soon as `output` is full (so a
   * caller that wants at most `n` bytes passes `n + 1` to see an excess). Throws on corrupt data.
   */
  decompress(input: Uint8Array, output: Uint8Array): Decompressed {
    const dctx = this.dctx
    if (dctx === undefined) throw new Error("zstd decompression context already released")
    let at = 0
    let src = input
    while (at < output.length) {
      const [, produced, consumed] = dctx.decompressStream(output.subarray(at), src)
      at += produced
      src = src.subarray(consumed)
      // no progress with room left: everything decodable has been written
      if (produced === 0 && consumed === 0) break
    }
    return { produced: at, leftover: src.length }
  }

  /** Drops the context (freed by the binding's finalizer). */
  release(): void {
    if (this.dctx === undefined) return
    this.dctx = undefined
    open--
  }
}
