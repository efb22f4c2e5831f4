/**
 * zstd streaming contexts from `zstd-napi` (libzstd bundled and built by node-gyp at install): one
 * compression context per sending channel, whose frame is flushed (`ZSTD_e_flush`) at the end of every
 * packet and never ended, and one decompression context per receiving channel, fed packet by packet —
 * QEMU's multifd-zstd. Calls are synchronous (libzstd is fast enough at QEMU's levels: see the report in
 * PageCodec); the binding is loaded on first use, so that a machine without it still runs `none` and
 * `zlib`.
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
  const e = loaded.error as { readonly message?: string } | undefined
  return `the zstd binding (npm package zstd-napi) cannot be loaded: ${e?.message ?? String(loaded.error)}`
}

let open = 0

/** zstd contexts created and not yet released (for leak tests). */
export const openContexts = (): number => open

/** Turns a libzstd failure (thrown by the binding) into its message. */
export const describe = (error: unknown): string =>
  error instanceof Error ? error.message : String(error)

/**
 * A compression context whose single frame spans the channel's life. The output buffer is reused: the
 * views `compress` returns stay valid until its next call.
 */
export class ZstdCompressor {
  private cctx: Binding.CCtx | undefined
  private out: Buffer

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

  /**
   * Compresses `count` pages (`offsets[i]`, `pageSize` bytes each, contiguous runs fed at once) of
   * `memory` into the frame and flushes it; appends the output views to `chunks`, returns their size.
   * Throws on a libzstd failure.
   */
  compress(
    memory: Uint8Array,
    offsets: ArrayLike<number>,
    count: number,
    pageSize: number,
    chunks: Array<Uint8Array>
  ): number {
    const cctx = this.cctx
    if (cctx === undefined) throw new Error("zstd compression context already released")
    const { flush, continue: more } = this.zstd.EndDirective
    if (this.out.length < this.capacity(count * pageSize)) this.out = Buffer.allocUnsafe(this.capacity(count * pageSize))
    let out = this.out
    let at = 0
    let total = 0
    let i = 0
    while (i < count) {
      const start = offsets[i]!
      let end = start + pageSize
      i++
      while (i < count && offsets[i] === end) {
        end += pageSize
        i++
      }
      const directive = i === count ? flush : more
      let src = memory.subarray(start, end)
      while (true) {
        if (at === out.length) {
          // only when the output bound was wrong: go on in a fresh buffer
          chunks.push(out)
          total += at
          out = Buffer.allocUnsafe(this.capacity(pageSize))
          at = 0
        }
        const [remaining, produced, consumed] = cctx.compressStream2(out.subarray(at), src, directive)
        at += produced
        src = src.subarray(consumed)
        if (src.length === 0 && (directive === more || remaining === 0)) break
      }
    }
    if (at > 0) chunks.push(out.subarray(0, at))
    return total + at
  }

  /** Drops the context (libzstd memory is freed by the binding's finalizer: it has no explicit free). */
  release(): void {
    if (this.cctx === undefined) return
    this.cctx = undefined
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

/** A decompression context fed packet by packet. */
export class ZstdDecompressor {
  private dctx: Binding.DCtx | undefined

  constructor(zstd: ZstdBinding) {
    this.dctx = new zstd.DCtx()
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
