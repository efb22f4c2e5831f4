/**
 * A block's dirty log: one bit a page, set by writes and taken (read and cleared at once) by a migration
 * round, as KVM's dirty log sync does. No allocation per write.
 *
 * @internal
 */
export class DirtyLog {
  private bits: Uint32Array

  constructor(readonly pages: number) {
    this.bits = new Uint32Array(Math.ceil(pages / 32))
  }

  /** Marks pages `first` to `last` (inclusive) dirty. */
  mark(first: number, last: number): void {
    const bits = this.bits
    for (let page = first; page <= last; page++) {
      if ((page & 31) === 0 && page + 31 <= last) {
        bits[page >>> 5] = 0xffffffff
        page += 31
      } else {
        bits[page >>> 5]! |= 1 << (page & 31)
      }
    }
  }

  /** Number of dirty pages. */
  count(): number {
    let n = 0
    for (const word of this.bits) {
      let w = word - ((word >>> 1) & 0x55555555)
      w = (w & 0x33333333) + ((w >>> 2) & 0x33333333)
      n += (((w + (w >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24
    }
    return n
  }

  /** Returns the dirty pages' bitmap and starts a clean one, in one step. */
  take(): Uint32Array {
    const taken = this.bits
    this.bits = new Uint32Array(taken.length)
    return taken
  }
}

/** Calls `f` for every page whose bit is set, in increasing order. */
export const forEachPage = (bits: Uint32Array, f: (page: number) => void): void => {
  for (let word = 0; word < bits.length; word++) {
    let w = bits[word]!
    while (w !== 0) {
      const bit = 31 - Math.clz32(w & -w)
      f(word * 32 + bit)
      w &= w - 1
    }
  }
}
