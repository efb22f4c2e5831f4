/**
 * What the record parsers of QEMU's main stream share while one stream is read: the reader, the handler, the
 * options, and one state object that the parsers update in stream order (one fiber reads a stream, so
 * nothing else touches it).
 *
 * @internal
 */
import * as GuestRam from "../../GuestRam.js"
import type { ByteSource, CommandRecord, Configuration, Handler, RamBlock, ReadOptions } from "./format.js"
import { Reader } from "./reader.js"

/** The RAM section as far as the stream went. */
export interface RamState {
  /** Not started yet, open (SECTION_START read, SECTION_END not), or ended. */
  phase: "none" | "open" | "ended"
  /** The section id QEMU gave it in its SECTION_START. */
  id: number | undefined
  /** The block list, once announced. */
  blocks: ReadonlyArray<RamBlock>
  /** The memory the handler gave for the block list: pages go there. */
  memory: GuestRam.GuestRam["Type"] | undefined
  /** The block of the last page record, which `RAM_SAVE_FLAG_CONTINUE` refers to. */
  lastBlock: GuestRam.Block | undefined
  /** The pages of each block that a page record of the main stream wrote (a bit a page), once one came. */
  readonly written: Map<GuestRam.Block, Uint8Array>
  /** How many distinct pages those are (a page sent again counts once). */
  distinctPages: number
}

/** Everything the parsers learn and count. */
export interface State {
  /** The target page size: the option's (default 4096), or what the configuration's target-page-bits say. */
  pageSize: number
  configuration: Configuration | undefined
  /** Top-level records read so far (a CONFIGURATION record must be the first). */
  records: number
  /**
   * Where QEMU asked for a return path (`MIG_CMD_OPEN_RETURN_PATH`) that the handler cannot open: refused at
   * the next record (unless that one names postcopy).
   */
  returnPathAt: number | undefined
  /** Whether the handler opened the return path QEMU asked for. */
  returnPath: boolean
  /** Whether the configuration announced capability mapped-ram (a mapped-ram file). */
  mappedRam: boolean
  readonly ram: RamState
  /** Flushes followed, and RAM section records read. */
  flushes: number
  /** Whether a `RAM_SAVE_FLAG_MULTIFD_FLUSH` word came (QEMU sends none with flush-after-each-section on). */
  flushWords: boolean
  ramSections: number
  /** Pages the main channel carried itself. */
  zeroPages: number
  normalPages: number
  /** Commands accepted, by name, in order. */
  readonly commands: Array<string>
  /** The migration's own commands, verbatim (`SWITCHOVER_START`). */
  readonly commandRecords: Array<CommandRecord>
}

/** A stream being read: where its bytes come from, whom to tell, how, and the state so far. */
export interface Parser<E, R> {
  readonly r: Reader<E>
  readonly handler: Handler<E, R>
  readonly options: ReadOptions
  readonly state: State
}

/** A parser at the start of `source`. */
export const make = <E, R>(source: ByteSource<E>, handler: Handler<E, R>, options: ReadOptions): Parser<E, R> => ({
  r: new Reader(source, options.startOffset ?? 0),
  handler,
  options,
  state: {
    pageSize: options.pageSize ?? GuestRam.DEFAULT_PAGE_SIZE,
    configuration: undefined,
    records: 0,
    returnPathAt: undefined,
    returnPath: false,
    mappedRam: false,
    ram: { phase: "none", id: undefined, blocks: [], memory: undefined, lastBlock: undefined, written: new Map(), distinctPages: 0 },
    flushes: 0,
    flushWords: false,
    ramSections: 0,
    zeroPages: 0,
    normalPages: 0,
    commands: [],
    commandRecords: []
  }
})
