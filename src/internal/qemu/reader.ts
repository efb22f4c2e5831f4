/**
 * Buffered reading of QEMU's main stream: bytes pulled from a `ByteSource`, QEMU's field encodings on top
 * (big-endian integers, `idstr` strings), every field named so that a stream ending inside it is a `Truncated`
 * error saying what was cut, and the drain of the device state to the end of the stream.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import { type ByteSource, checkEnding, QemuStreamError, Record } from "./format.js"

const CHUNK = 64 * 1024
/** How much of the drained device state is kept to check the end of the stream. */
const TAIL_LIMIT = 16 * 1024 * 1024

/**
 * The most device state kept whole (`drain`'s `keepAll`, for a VM file): a VM's devices describe themselves in
 * kilobytes to a few megabytes (its memory travels in the RAM section), so a stream that goes on beyond this is
 * refused rather than held in memory without bound.
 */
export const MAX_DEVICE_STATE = 256 * 1024 * 1024

/** Possible description records kept by `endWatch` (a real one comes last: nothing can follow it). */
const MAX_CANDIDATES = 1024
/** Matches `endWatch` confirms at most: a stream that planted more is not ended by one. */
const MAX_CONFIRMATIONS = 64

/**
 * Watches drained bytes for the end of a complete stream with a description (`checkEnding`: `EOF,
 * VMDESCRIPTION, u32 length, '{'` and that many bytes of JSON) without rescanning them: each such header seen
 * gives the length at which the stream would end, and only there is the tail parsed (a peer that ended every
 * read with '}' made each check copy and rescan the whole kept tail: quadratic time, and the tail grew past
 * its limit).
 */
const endWatch = (limit: number) => {
  /** Where the stream would end → where that description record starts. */
  const ends = new Map<number, number>()
  /** The last six bytes so far. */
  let recent = Buffer.alloc(0)
  let confirmations = 0
  return {
    /** Takes `piece`, which starts at byte `at` of the drain. */
    add: (piece: Buffer, at: number): void => {
      const window = recent.length === 0 ? piece : Buffer.concat([recent, piece])
      const origin = at - recent.length
      for (let i = window.indexOf(Record.EOF); i >= 0 && i + 7 <= window.length; i = window.indexOf(Record.EOF, i + 1)) {
        if (window[i + 1] !== Record.VMDESCRIPTION || window[i + 6] !== 0x7b /* { */) continue
        const size = 6 + window.readUInt32BE(i + 2)
        if (size > limit) continue
        ends.set(origin + i + size, origin + i)
        if (ends.size > MAX_CANDIDATES) ends.delete(ends.keys().next().value!)
      }
      recent = Buffer.from(window.subarray(Math.max(0, window.length - 6)))
    },
    /** Whether the `length` bytes so far end a stream; `last(n)` gives their last `n`. */
    ended: (length: number, last: (n: number) => Buffer): boolean => {
      // only a description's '}' ends it here: a source that opened a return path waits for the answer, and
      // the EOF marker alone could be a device's byte
      if (recent[recent.length - 1] !== 0x7d /* } */) return false
      const start = ends.get(length)
      if (start === undefined || confirmations >= MAX_CONFIRMATIONS) return false
      ends.delete(length)
      confirmations++
      return checkEnding(last(length - start), length)._tag === "Complete"
    }
  }
}

/** Fails with a `QemuStreamError`. */
export const fail = (
  reason: QemuStreamError["reason"],
  offset: number,
  detail: string,
  feature?: string
): Effect.Effect<never, QemuStreamError> => Effect.fail(new QemuStreamError({ reason, offset, detail, feature }))

const truncated = (what: string, at: number) => (got: number) =>
  new QemuStreamError({
    reason: "Truncated",
    offset: at,
    detail: `the stream ended inside ${what} (${got} of its bytes received): ` +
      "QEMU closed the main channel mid-migration (cancelled, failed or killed?)"
  })

/** The main stream, consumed in order. `what` names the field being read, for a stream that ends inside it. */
export class Reader<E> {
  private buf: Buffer = Buffer.alloc(0)
  private pos = 0
  /** Bytes consumed so far: the offset of the next byte. */
  offset = 0
  /** Bytes received from the source so far (consumed or buffered). */
  received = 0

  /** `start`: where the stream starts in its source (a file QEMU wrote at an offset). */
  constructor(private readonly source: ByteSource<E>, start = 0) {
    this.offset = start
  }

  get buffered(): number {
    return this.buf.length - this.pos
  }

  /**
   * Makes `n` bytes available; a clean end of stream before them fails with `onEnd`. The pieces are joined once
   * they are all there: a field that arrives a byte at a time (a page, up to 512 KiB) is copied once, not once
   * a piece (joining as they came copied what had arrived again for every byte: a source that trickled a 512 KiB
   * page made this side copy 128 GiB).
   */
  ensure(n: number, what: string): Effect.Effect<void, E | QemuStreamError> {
    if (this.buffered >= n) return Effect.void
    const self = this
    return Effect.gen(function*() {
      const pieces = [self.buf.subarray(self.pos)]
      let have = self.buffered
      const join = () => {
        self.buf = pieces.length === 2 && pieces[0]!.length === 0 ? pieces[1]! : Buffer.concat(pieces)
        self.pos = 0
      }
      while (have < n) {
        const chunk = yield* self.source.readSome(Math.max(CHUNK, n - have), { what, at: self.offset, got: have, between: false })
        if (chunk.length === 0) {
          join()
          return yield* Effect.fail(truncated(what, self.offset)(have))
        }
        self.received += chunk.length
        pieces.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length))
        have += chunk.length
      }
      join()
    })
  }

  take(n: number): Buffer {
    const out = this.buf.subarray(this.pos, this.pos + n)
    this.pos += n
    this.offset += n
    return out
  }

  /** The next byte without consuming it (`what` it starts), or `undefined` at a clean end of stream. */
  peekByte(what: string): Effect.Effect<number | undefined, E> {
    if (this.buffered > 0) return Effect.succeed(this.buf[this.pos]!)
    const self = this
    return Effect.gen(function*() {
      const chunk = yield* self.source.readSome(CHUNK, { what, at: self.offset, got: 0, between: true })
      if (chunk.length === 0) return undefined
      self.received += chunk.length
      self.buf = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length)
      self.pos = 0
      return self.buf[0]!
    })
  }

  /** `n` bytes (a view: valid until the next read). */
  bytes(n: number, what: string): Effect.Effect<Buffer, E | QemuStreamError> {
    return Effect.map(this.ensure(n, what), () => this.take(n))
  }

  u8(what: string): Effect.Effect<number, E | QemuStreamError> {
    return Effect.map(this.bytes(1, what), (b) => b[0]!)
  }

  u16(what: string): Effect.Effect<number, E | QemuStreamError> {
    return Effect.map(this.bytes(2, what), (b) => b.readUInt16BE(0))
  }

  u32(what: string): Effect.Effect<number, E | QemuStreamError> {
    return Effect.map(this.bytes(4, what), (b) => b.readUInt32BE(0))
  }

  /** A big-endian u64 as [high, low] u32 halves. */
  u64(what: string): Effect.Effect<readonly [number, number], E | QemuStreamError> {
    return Effect.map(this.bytes(8, what), (b) => [b.readUInt32BE(0), b.readUInt32BE(4)] as const)
  }

  /** A u8 length and that many bytes of text (QEMU's idstr fields). */
  shortString(what: string): Effect.Effect<string, E | QemuStreamError> {
    return Effect.flatMap(this.u8(`the length of ${what}`), (n) => Effect.map(this.bytes(n, what), (b) => b.toString("latin1")))
  }

  /**
   * Goes on at `position` of the source (`ByteSource.seek`): what is buffered is dropped. A source that
   * cannot seek is a defect of the caller (only mapped-ram streams seek, and only files carry them).
   */
  seek(position: number): Effect.Effect<void, E> {
    const seek = this.source.seek
    if (seek === undefined) return Effect.dieMessage("QemuStream: this byte source cannot seek")
    this.buf = Buffer.alloc(0)
    this.pos = 0
    this.offset = position
    return seek(position)
  }

  /**
   * Everything up to the end of the stream: its length, and its last `TAIL_LIMIT` bytes at most (all of it
   * with `keepAll`, up to `MAX_DEVICE_STATE`: beyond it a `Malformed` error). With `stopAtEnd` it stops as soon
   * as what it has ends as a complete stream ends (the description after the EOF marker): a source waiting on
   * its return path does not close first.
   */
  drain(options: {
    readonly keepAll?: boolean | undefined
    readonly stopAtEnd?: boolean | undefined
    /** With `keepAll`: the most kept (default `MAX_DEVICE_STATE`). */
    readonly maxAll?: number | undefined
  } = {}): Effect.Effect<
    { readonly length: number; readonly tail: Buffer },
    E | QemuStreamError
  > {
    const self = this
    const limit = options.keepAll ? Infinity : TAIL_LIMIT
    return Effect.gen(function*() {
      const pieces: Array<Buffer> = []
      let kept = 0
      let length = 0
      const watch = options.stopAtEnd ? endWatch(limit) : undefined
      const keep = (piece: Buffer) => {
        if (piece.length === 0) return
        // a copy: the source may reuse its buffers, and a view would pin the whole chunk
        pieces.push(Buffer.from(piece))
        watch?.add(piece, length)
        kept += piece.length
        length += piece.length
        while (pieces.length > 1 && kept - pieces[0]!.length >= limit) kept -= pieces.shift()!.length
      }
      /** The last `n` bytes kept (`n` ≤ kept). */
      const last = (n: number): Buffer => {
        const parts: Array<Buffer> = []
        for (let i = pieces.length - 1, need = n; i >= 0 && need > 0; i--) {
          const piece = pieces[i]!
          parts.unshift(piece.length <= need ? piece : piece.subarray(piece.length - need))
          need -= piece.length
        }
        return Buffer.concat(parts)
      }
      /** Whether the bytes so far end as a complete stream does: checked in constant time, but for a match. */
      const ended = () => watch !== undefined && watch.ended(length, last)
      const drainedAt = self.offset
      keep(self.take(self.buffered))
      while (!ended()) {
        const chunk = yield* self.source.readSome(1024 * 1024, { what: "the device state", at: drainedAt, got: length, between: false })
        if (chunk.length === 0) break
        self.received += chunk.length
        self.offset += chunk.length
        keep(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length))
        const maxAll = options.maxAll ?? MAX_DEVICE_STATE
        if (options.keepAll && length > maxAll) {
          return yield* fail(
            "Malformed",
            self.offset - length,
            `more than ${maxAll} bytes of device state after the RAM section, and no end yet: not a VM's devices`
          )
        }
      }
      const all = Buffer.concat(pieces)
      return { length, tail: all.length > limit ? all.subarray(all.length - limit) : all }
    })
  }
}
