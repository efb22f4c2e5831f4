/**
 * The body of QEMU's RAM section (migration/ram.c): the 64-bit words of one SECTION_START / PART / END up to
 * its `RAM_SAVE_FLAG_EOS` — the block list after `RAM_SAVE_FLAG_MEM_SIZE`, `RAM_SAVE_FLAG_MULTIFD_FLUSH`, and
 * the zero and whole pages the main channel carries itself (`zero-page-detection=legacy`). Every record is
 * validated before it writes memory; what QEMU can send but this reader cannot take (XBZRLE, compressed
 * pages, RDMA hooks) is refused naming the feature.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as GuestRam from "../../GuestRam.js"
import {
  describeFlags,
  flushesAfterEachSection,
  MAPPED_RAM_HEADER_SIZE,
  MAPPED_RAM_VERSION,
  type MappedRamHeader,
  type QemuStreamError,
  RamFlag,
  type RamBlock
} from "./format.js"
import { fail } from "./reader.js"
import type { Parser, RamState } from "./state.js"

/**
 * A u64 of the stream from its halves (`Reader.u64`), as a bigint: a length or an address past 2^53 is judged and
 * said exactly (as a number, 2^60 + 1 passed for a multiple of the page size and 2^60 + 2048 printed as ...849000).
 */
const u64Of = (hi: number, lo: number): bigint => (BigInt(hi) << 32n) | BigInt(lo)

/** A RAM word's address (its halves, the flags taken out of `low`) as the stream says it: exact past 2^53. */
const addressText = (hi: number, low: number): string => String(u64Of(hi, low))

/** The block list (after a `RAM_SAVE_FLAG_MEM_SIZE` word at `at` carrying the `total`), handed to the handler. */
const readBlocks = <E, R>(p: Parser<E, R>, at: number, total: bigint) =>
  Effect.gen(function*() {
    const { r, state } = p
    const pageSize = state.pageSize
    if (state.ram.memory !== undefined) return yield* fail("Malformed", at, "a second RAM block list (RAM_SAVE_FLAG_MEM_SIZE)")
    const list: Array<RamBlock> = []
    const headers: Array<MappedRamHeader> = []
    const names = new Set<string>()
    let left = total
    while (left > 0n) {
      const blockAt = r.offset
      const name = yield* r.shortString("a RAM block name")
      const [hi, lo] = yield* r.u64(`the used length of RAM block '${name}'`)
      const exact = u64Of(hi, lo)
      if (name.length === 0) return yield* fail("Malformed", blockAt, "a RAM block with an empty name")
      if (names.has(name)) return yield* fail("Malformed", blockAt, `RAM block '${name}' is listed twice`)
      if (exact === 0n || exact % BigInt(pageSize) !== 0n || exact > left) {
        return yield* fail(
          "Malformed",
          blockAt,
          `RAM block '${name}' used length ${exact} is not a positive multiple of the page size ${pageSize}` +
            ` within the announced total of ${total} bytes (${left} left)`
        )
      }
      // a multiple of the page size below 2^64 is a double exactly (checkLayout refuses one past memory's limit)
      const size = Number(exact)
      names.add(name)
      list.push({ name, size })
      // a list that goes on is refused as it passes the most blocks a memory may have, not kept while it grows
      // (a total that says petabytes would let a peer list blocks as long as it likes)
      if (list.length > GuestRam.MAX_BLOCKS) {
        return yield* fail("Malformed", at, `more than ${GuestRam.MAX_BLOCKS} RAM blocks in the block list`)
      }
      left -= exact
      if (state.mappedRam) {
        // the block's pages follow its header in the file; the list goes on after them
        const header = yield* readMappedRamHeader(p, name)
        headers.push(header)
        yield* r.seek(header.pagesOffset + size)
      }
    }
    if (list.length === 0) return yield* fail("Malformed", at, "the RAM section announces no RAM at all")
    const problem = GuestRam.checkLayout(pageSize, list)
    if (problem) return yield* fail("Malformed", at, problem.detail)
    state.ram.blocks = list
    const memory = yield* p.handler.blocks(list, pageSize, () => state.ram.distinctPages)
    for (const b of list) {
      if (memory.block(b.name)?.bytes.length !== b.size || memory.pageSize !== pageSize) {
        return yield* Effect.dieMessage(`QemuStream: the handler's memory does not have block ${b.name} of ${b.size} bytes`)
      }
    }
    state.ram.memory = memory
    if (state.mappedRam) {
      const load = p.handler.mappedRam
      if (load === undefined) return yield* Effect.dieMessage("QemuStream: a mapped-ram stream without a mappedRam handler")
      for (let i = 0; i < list.length; i++) yield* load(list[i]!, headers[i]!, memory.block(list[i]!.name)!)
    }
  })

/** The mapped-ram header after block `name` in a mapped-ram file's block list, validated. */
const readMappedRamHeader = <E, R>({ r, state }: Parser<E, R>, name: string) =>
  Effect.gen(function*() {
    const at = r.offset
    const bytes = yield* r.bytes(MAPPED_RAM_HEADER_SIZE, `the mapped-ram header of RAM block '${name}'`)
    const u64 = (offset: number) => bytes.readUInt32BE(offset) * 2 ** 32 + bytes.readUInt32BE(offset + 4)
    const exact = (offset: number) => String(bytes.readBigUInt64BE(offset))
    const header: MappedRamHeader = {
      version: bytes.readUInt32BE(0),
      pageSize: u64(4),
      bitmapOffset: u64(12),
      pagesOffset: u64(20)
    }
    const bad = (detail: string) => fail("Malformed", at, `the mapped-ram header of RAM block '${name}': ${detail}`)
    if (header.version === 0 || header.version > MAPPED_RAM_VERSION) {
      return yield* fail(
        "Unsupported",
        at,
        `the mapped-ram header of RAM block '${name}' has version ${header.version}; ` +
          `only version ${MAPPED_RAM_VERSION} is supported`,
        "mapped-ram"
      )
    }
    if (header.pageSize !== state.pageSize) return yield* bad(`page size ${exact(4)}, where ${state.pageSize} was expected`)
    if (header.bitmapOffset === 0 || !Number.isSafeInteger(header.pagesOffset) || !Number.isSafeInteger(header.bitmapOffset)) {
      return yield* bad(`bitmap at ${exact(12)}, pages at ${exact(20)}`)
    }
    if (header.pagesOffset === 0 || header.pagesOffset % state.pageSize !== 0) {
      return yield* bad(`its pages at ${header.pagesOffset} are not at a positive multiple of the page size`)
    }
    return header
  })

/** The block a page record at `at` refers to: its name, unless `RAM_SAVE_FLAG_CONTINUE` (the last one). */
const pageBlock = <E, R>(p: Parser<E, R>, at: number, flags: number) =>
  Effect.gen(function*() {
    const ram = p.state.ram
    if ((flags & RamFlag.CONTINUE) !== 0) {
      if (ram.lastBlock === undefined) {
        return yield* fail("Malformed", at, "RAM_SAVE_FLAG_CONTINUE on the first page record: no block to continue")
      }
      return ram.lastBlock
    }
    const name = yield* p.r.shortString("a page record's block name")
    const block = ram.memory?.block(name)
    if (block === undefined) {
      return yield* fail("UnknownBlock", at, `a page record names RAM block '${name}', which the block list did not announce`)
    }
    ram.lastBlock = block
    return block
  })

/** A zero or whole page record at `at` for the address of halves `hi` and `low`: validated, then written. */
const readPage = <E, R>(p: Parser<E, R>, at: number, flags: number, hi: number, low: number) =>
  Effect.gen(function*() {
    const { r, state } = p
    const address = hi * 2 ** 32 + low
    const pageSize = state.pageSize
    // zero-page-detection=legacy sends zero pages here; QEMU's own loader takes whole pages here too
    if (state.ram.memory === undefined) return yield* fail("Malformed", at, "a page record before the RAM block list")
    const block = yield* pageBlock(p, at, flags)
    if (address + pageSize > block.bytes.length) {
      return yield* fail(
        "BadOffset",
        at,
        `page offset ${addressText(hi, low)} is outside RAM block '${block.name}' (${block.bytes.length} bytes)`
      )
    }
    if ((flags & RamFlag.ZERO) !== 0) {
      const fill = yield* r.u8("a zero page's fill byte")
      if (fill !== 0) return yield* fail("Malformed", at, `a zero page record with fill byte ${fill}`)
      GuestRam.clearPage(block.bytes, address, pageSize)
      state.zeroPages++
    } else {
      const page = yield* r.bytes(pageSize, "a page's data")
      page.copy(block.bytes, address)
      state.normalPages++
    }
    markWritten(state.ram, block, address / pageSize, block.bytes.length / pageSize)
  })

/** Marks page `index` of `block` (of `pages`) written by the main stream, counting it once however often it came. */
const markWritten = (ram: RamState, block: GuestRam.Block, index: number, pages: number): void => {
  let bits = ram.written.get(block)
  if (bits === undefined) {
    bits = new Uint8Array(Math.ceil(pages / 8))
    ram.written.set(block, bits)
  }
  const mask = 1 << (index & 7)
  if ((bits[index >>> 3]! & mask) === 0) {
    bits[index >>> 3]! |= mask
    ram.distinctPages++
  }
}

/** What a RAM word does: go on with the next word, or end the section (EOS). */
type Next = "more" | "end"

/**
 * One RAM word at `at` (its flags split from its address, whose halves are `hi` and `low`) and what it carries, in a
 * section of `kind`.
 */
const readRamRecord = <E, R>(
  p: Parser<E, R>,
  kind: string,
  at: number,
  flags: number,
  hi: number,
  low: number
): Effect.Effect<Next, E | QemuStreamError, R> =>
  Effect.gen(function*() {
    const { handler, state } = p
    switch (flags & ~RamFlag.CONTINUE) {
      case RamFlag.MEM_SIZE: {
        if (kind !== "SECTION_START" || (flags & RamFlag.CONTINUE) !== 0) {
          return yield* fail("Malformed", at, `${describeFlags(flags)} outside the RAM section's start`)
        }
        yield* readBlocks(p, at, u64Of(hi, low))
        return "more"
      }
      case RamFlag.MULTIFD_FLUSH: {
        if (state.ram.memory === undefined) {
          return yield* fail("Malformed", at, "RAM_SAVE_FLAG_MULTIFD_FLUSH before the RAM block list")
        }
        if (flags !== RamFlag.MULTIFD_FLUSH || hi !== 0 || low !== 0) {
          return yield* fail("Malformed", at, `${describeFlags(flags)} with address ${addressText(hi, low)}`)
        }
        state.flushWords = true
        yield* handler.flush(state.flushes++)
        return "more"
      }
      case RamFlag.EOS: {
        if (flags !== RamFlag.EOS || hi !== 0 || low !== 0) {
          return yield* fail("Malformed", at, `${describeFlags(flags)} with address ${addressText(hi, low)}`)
        }
        if (state.ram.memory === undefined) return yield* fail("Malformed", at, "the RAM section started without its block list")
        if (flushesAtEos(p)) yield* handler.flush(state.flushes++)
        return "end"
      }
      case RamFlag.ZERO:
      case RamFlag.PAGE:
        yield* readPage(p, at, flags, hi, low)
        return "more"
      case RamFlag.XBZRLE:
        return yield* fail(
          "Unsupported",
          at,
          `${describeFlags(flags)}: XBZRLE-compressed pages are not supported; turn capability xbzrle off`,
          "xbzrle"
        )
      case RamFlag.COMPRESS_PAGE:
        return yield* fail(
          "Unsupported",
          at,
          `${describeFlags(flags)}: multi-thread compressed pages (capability compress, removed in QEMU 9.1) are not supported`,
          "compress"
        )
      case RamFlag.HOOK:
        return yield* fail("Unsupported", at, `${describeFlags(flags)}: RDMA migration is not supported`, "rdma")
      default:
        return yield* fail("UnknownRecord", at, `unknown RAM record ${describeFlags(flags)} in the RAM section`)
    }
  })

/**
 * Whether an EOS word is a flush too (QEMU's `multifd-flush-after-each-section`): as the option says, else as the
 * machine type has it, unless the stream is a mapped-ram file (QEMU flushes it once after the block list) or a
 * flush word came (QEMU sends none with it on).
 */
const flushesAtEos = <E, R>({ options, state }: Parser<E, R>): boolean =>
  options.flushAfterEachSection ??
    (!state.mappedRam && !state.flushWords && flushesAfterEachSection(state.configuration?.machine))

/** The records of one RAM section record of `kind` (`SECTION_START`, `SECTION_PART`, `SECTION_END`), up to its EOS word. */
export const readRamRecords = <E, R>(p: Parser<E, R>, kind: string): Effect.Effect<void, E | QemuStreamError, R> =>
  Effect.gen(function*() {
    p.state.ramSections++
    while (true) {
      const at = p.r.offset
      const [hi, lo] = yield* p.r.u64("a RAM record")
      const flags = lo & (p.state.pageSize - 1)
      if ((yield* readRamRecord(p, kind, at, flags, hi, lo - flags)) === "end") return
    }
  })
