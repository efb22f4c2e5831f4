/**
 * The top-level records of QEMU's main stream, one parser each: the file header, CONFIGURATION, COMMAND,
 * the RAM section's SECTION_START / PART / END (whose bodies `ram` reads) with their footers, and — once the
 * RAM section has ended — the device state, end-of-stream marker and VMDESCRIPTION, drained and checked as a
 * whole. `read` runs them in stream order over one `Parser`.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import {
  badMagic,
  badVersion,
  type ByteSource,
  checkEnding,
  Command,
  commandName,
  FILE_MAGIC,
  FILE_VERSION,
  type Handler,
  hex,
  MAPPED_RAM,
  type QemuStreamError,
  RAM_SECTION,
  RAM_SECTION_VERSION,
  type ReadOptions,
  Record,
  type Summary
} from "./format.js"
import { readRamRecords } from "./ram.js"
import { fail } from "./reader.js"
import * as State from "./state.js"

type Parser<E, R> = State.Parser<E, R>

/** The file header: the magic `QEVM`, then file version 3. */
const readHeader = <E, R>({ r }: Parser<E, R>) =>
  Effect.gen(function*() {
    // (the stream's start in its source: a file QEMU wrote at an offset)
    const at = r.offset
    const magic = yield* r.u32("the file magic")
    if (magic !== FILE_MAGIC) return yield* Effect.fail(badMagic(magic, at))
    const version = yield* r.u32("the file version")
    if (version !== FILE_VERSION) return yield* Effect.fail(badVersion(version, at + 4))
  })

/** A CONFIGURATION record at `at` (vmstate "configuration": u32 length, machine name, then its subsections). */
const readConfiguration = <E, R>(p: Parser<E, R>, at: number) =>
  Effect.gen(function*() {
    const { options, r, state } = p
    if (state.records > 0) return yield* fail("Malformed", at, "a CONFIGURATION record after the first record")
    const length = yield* r.u32("the machine type's length")
    if (length > 4096) return yield* fail("Malformed", at, `machine type length ${length} is implausible`)
    const machine = (yield* r.bytes(length, "the machine type")).toString("latin1")
    let targetPageBits: number | undefined
    let uuid: Uint8Array | undefined
    const capabilities: Array<string> = []
    // each subsection once, as QEMU sends them (the capabilities again and again each added up to 256 names)
    const seen = new Set<string>()
    while ((yield* r.peekByte("a configuration subsection or the next record")) === Record.SUBSECTION) {
      const subAt = r.offset
      yield* r.u8("a subsection marker")
      const name = yield* r.shortString("a subsection name")
      if (seen.has(name)) return yield* fail("Malformed", subAt, `configuration subsection '${name}' twice`)
      seen.add(name)
      const subVersion = yield* r.u32(`the version of subsection '${name}'`)
      if (subVersion !== 1) {
        return yield* fail("Unsupported", subAt, `configuration subsection '${name}' version ${subVersion} is not supported`)
      }
      switch (name) {
        case "configuration/target-page-bits": {
          targetPageBits = yield* r.u32("the target page bits")
          if (targetPageBits < 9 || targetPageBits > 19) {
            return yield* fail("Malformed", subAt, `target page bits ${targetPageBits} are implausible`)
          }
          break
        }
        case "configuration/capabilities": {
          const count = yield* r.u32("the capability count")
          for (let i = 0; i < count && i < 256; i++) capabilities.push(yield* r.shortString("a capability name"))
          // mapped-ram is how QEMU's migrate file: lays a file out; over a socket it cannot be
          const refused = capabilities.filter((name) => !(name === MAPPED_RAM && options.mappedRam))
          if (count > 256 || refused.length > 0) {
            return yield* fail(
              "Unsupported",
              subAt,
              `the source enabled migration capabilit${refused.length === 1 ? "y" : "ies"} ${
                refused.map((n) => `'${n}'`).join(", ")
              }` +
                (refused.includes(MAPPED_RAM)
                  ? ": a mapped-ram stream is a file (QEMU's migrate file:), read it with recv file:PATH --from-qemu"
                  : refused.length === 1
                  ? ", which changes the RAM stream format; turn it off on the source"
                  : ", which change the RAM stream format; turn them off on the source"),
              refused[0]
            )
          }
          state.mappedRam = capabilities.includes(MAPPED_RAM)
          break
        }
        case "configuration/uuid": {
          uuid = Uint8Array.from(yield* r.bytes(16, "the VM uuid"))
          break
        }
        default:
          return yield* fail("UnknownSection", subAt, `unknown configuration subsection '${name}'`)
      }
    }
    if (targetPageBits !== undefined) {
      const announced = 2 ** targetPageBits
      if (options.pageSize !== undefined && options.pageSize !== announced) {
        return yield* fail(
          "Unsupported",
          at,
          `the source's target page size is ${announced} bytes, not the ${options.pageSize} asked for`
        )
      }
      state.pageSize = announced
    }
    const configuration = { machine, targetPageBits, uuid, capabilities }
    state.configuration = configuration
    if (p.handler.configuration) yield* p.handler.configuration(configuration)
  })

/** Refuses the return path QEMU asked for (`MIG_CMD_OPEN_RETURN_PATH`, at `state.returnPathAt`). */
const refuseReturnPath = (at: number) =>
  fail(
    "Unsupported",
    at,
    `command ${Command.OPEN_RETURN_PATH} (MIG_CMD_OPEN_RETURN_PATH): the source wants a return path ` +
      "(capability return-path, or switchover-ack which needs it); this destination never answers QEMU, " +
      "turn return-path off",
    "return-path"
  )

/**
 * The most commands a stream may carry: QEMU's precopy sends a few (SWITCHOVER_START once, a PING or two); each
 * is kept (`Summary.commands`, the records to send on), so a stream that sends command after command is refused
 * past this rather than kept growing.
 */
export const MAX_COMMANDS = 1024

/**
 * `MIG_CMD_POSTCOPY_ADVISE` with postcopy-ram's 16 bytes at `at` (its length read): the source's RAM page sizes
 * (every block's page size OR-ed) and its target page size, which QEMU sends at the start of every migration
 * with capability postcopy-ram (libvirt's `--postcopy` turns it on and switches only on
 * `migrate-start-postcopy`). Until the source switches, the migration is a precopy one, taken as such; the
 * sizes are checked as QEMU's destination checks them (`loadvm_postcopy_handle_advise`): the target page size
 * must be the stream's, and the blocks' page sizes one and no smaller, where QEMU's block list carries no page
 * size (a block of huge pages among others carries its own, which this reader does not take).
 */
const readAdvise = <E, R>(p: Parser<E, R>, at: number, length: number) =>
  Effect.gen(function*() {
    const { r, state } = p
    const what = `command ${Command.POSTCOPY_ADVISE} (MIG_CMD_POSTCOPY_ADVISE)`
    if (length !== 16) {
      return yield* fail("Malformed", at, `${what} with ${length} data bytes, expected 0 or 16`)
    }
    const [sizesHigh, sizesLow] = yield* r.u64("the source's RAM page sizes")
    const [targetHigh, targetLow] = yield* r.u64("the source's target page size")
    if (state.commands.includes(commandName(Command.POSTCOPY_ADVISE))) {
      return yield* fail("Malformed", at, `a second MIG_CMD_POSTCOPY_ADVISE`)
    }
    // (page sizes are far below 2^52: a larger value is no page size, and is refused below as one, said exactly)
    const ramPageSizes = sizesHigh * 2 ** 32 + sizesLow
    const targetPageSize = targetHigh * 2 ** 32 + targetLow
    const exact = (hi: number, lo: number) => (BigInt(hi) << 32n) | BigInt(lo)
    if (state.returnPathAt !== undefined) {
      // postcopy-ram opens a return path first, which only a destination can answer (a file has none)
      return yield* fail(
        "Unsupported",
        at,
        `${what}: capability postcopy-ram needs a return path, which this reader cannot answer; ` +
          "turn capability postcopy-ram off",
        "postcopy-ram"
      )
    }
    if (p.options.postcopyRam !== "precopy") {
      return yield* fail(
        "Unsupported",
        at,
        `${what}: the source has capability postcopy-ram on; turn it off, or, if the source will never switch to ` +
          "postcopy, take its precopy migration with --postcopy-ram precopy (QemuIncoming's postcopyRam: a switch is " +
          "refused then, and QEMU may leave its guest stopped, postcopy-paused)",
        "postcopy-ram"
      )
    }
    if (ramPageSizes === 0 || targetPageSize === 0) {
      return yield* fail("Malformed", at, `${what} with a page size of 0`)
    }
    if (targetPageSize !== state.pageSize) {
      return yield* fail(
        "Unsupported",
        at,
        `${what}: the source's target page size is ${exact(targetHigh, targetLow)} bytes, not the ${state.pageSize} of this stream`,
        "postcopy-ram"
      )
    }
    const single = sizesHigh < 2 ** 20 && Number.isInteger(Math.log2(ramPageSizes))
    if (!single || ramPageSizes < targetPageSize) {
      return yield* fail(
        "Unsupported",
        at,
        `${what}: the source's RAM page sizes are 0x${exact(sizesHigh, sizesLow).toString(16)} (RAM blocks of ${
          single ? "a page size smaller than the target page" : "several page sizes: huge pages?"
        }), whose block list with postcopy-ram carries page sizes, which is not supported; ` +
          "turn capability postcopy-ram off",
        "postcopy-ram"
      )
    }
    state.commands.push(commandName(Command.POSTCOPY_ADVISE))
    if (p.handler.command) yield* p.handler.command(commandName(Command.POSTCOPY_ADVISE))
  })

/** A COMMAND record at `at`: SWITCHOVER_START and PING are taken, postcopy and COLO refused by name. */
const readCommand = <E, R>(p: Parser<E, R>, at: number) =>
  Effect.gen(function*() {
    const { r, state } = p
    const command = yield* r.u16("a command number")
    const length = yield* r.u16("a command's length")
    const name = commandName(command)
    const refuse = (feature: string, why: string) =>
      fail("Unsupported", at, `command ${command} (MIG_CMD_${name}): ${why}`, feature)
    if (state.returnPathAt !== undefined && command !== Command.POSTCOPY_ADVISE) {
      yield* refuseReturnPath(state.returnPathAt)
    }
    switch (command) {
      case Command.SWITCHOVER_START:
      case Command.PING: {
        const expected = command === Command.PING ? 4 : 0
        if (length !== expected) {
          return yield* fail("Malformed", at, `command MIG_CMD_${name} with ${length} data bytes, expected ${expected}`)
        }
        const data = yield* r.bytes(length, `command MIG_CMD_${name}'s data`)
        if (state.commands.length >= MAX_COMMANDS) {
          return yield* fail("Malformed", at, `more than ${MAX_COMMANDS} commands (QEMU sends a few): not a QEMU migration`)
        }
        state.commands.push(name)
        if (command === Command.PING) {
          if (p.handler.ping) yield* p.handler.ping(data.readUInt32BE(0))
        } else {
          state.commandRecords.push({ command, data: Uint8Array.from(data) })
        }
        if (p.handler.command) yield* p.handler.command(name)
        return
      }
      case Command.OPEN_RETURN_PATH:
        if (length !== 0) return yield* fail("Malformed", at, `command MIG_CMD_${name} with ${length} data bytes`)
        if (state.returnPath) return yield* fail("Malformed", at, `a second MIG_CMD_${name}`)
        if (p.handler.openReturnPath) {
          // answered as QEMU's destination answers a precopy migration (postcopy, advised next, is refused then)
          yield* p.handler.openReturnPath
          state.returnPath = true
          state.commands.push(name)
          return
        }
        // postcopy opens the return path first and advises right after: wait for that to name the feature
        state.returnPathAt = at
        return
      case Command.POSTCOPY_ADVISE:
        // QEMU advises postcopy with its page sizes (16 bytes) for postcopy-ram, and with no data when only
        // capability dirty-bitmaps is on (block dirty bitmaps may move in a postcopy phase)
        if (length === 0) {
          return yield* refuse(
            "dirty-bitmaps",
            "the source migrates block dirty bitmaps, which is not supported; turn capability dirty-bitmaps off"
          )
        }
        return yield* readAdvise(p, at, length)
      case Command.POSTCOPY_LISTEN:
      case Command.POSTCOPY_RUN:
      case Command.POSTCOPY_RAM_DISCARD:
      case Command.PACKAGED:
        return yield* refuse(
          "postcopy-ram",
          "the source switched to postcopy (migrate-start-postcopy), which is not supported: this destination " +
            "takes a precopy migration only (QEMU, told so, fails the migration or, once switched, stays postcopy-paused)"
        )
      case Command.POSTCOPY_RESUME:
      case Command.RECV_BITMAP:
        return yield* refuse("postcopy-ram", "postcopy recovery is not supported")
      case Command.ENABLE_COLO:
        return yield* refuse("x-colo", "COLO is not supported; turn capability x-colo off")
      default:
        return yield* fail("UnknownRecord", at, `unknown command ${command} (${length} data bytes)`)
    }
  })

/** The optional section footer (0x7e + section id; machine types before 2.3 do not send it). */
const readFooter = <E, R>({ r }: Parser<E, R>, id: number) =>
  Effect.gen(function*() {
    if ((yield* r.peekByte("a section footer or the next record")) !== Record.SECTION_FOOTER) return
    const at = r.offset
    yield* r.u8("a section footer")
    const footerId = yield* r.u32("a section footer's section id")
    if (footerId !== id) {
      return yield* fail("Malformed", at, `section footer for section ${footerId} ends section ${id}`)
    }
  })

/** A SECTION_START or SECTION_FULL record at `at`: only the start of the RAM section is taken. */
const readSectionStart = <E, R>(p: Parser<E, R>, at: number, type: number) =>
  Effect.gen(function*() {
    const { r, state } = p
    const ram = state.ram
    const kind = type === Record.SECTION_START ? "SECTION_START" : "SECTION_FULL"
    const id = yield* r.u32("a section id")
    const name = yield* r.shortString("a section name")
    const instance = yield* r.u32(`the instance id of section '${name}'`)
    const sectionVersion = yield* r.u32(`the version of section '${name}'`)
    if (type === Record.SECTION_FULL) {
      return yield* fail(
        "UnknownSection",
        at,
        `device section '${name}' (SECTION_FULL, instance ${instance}) came ${
          ram.phase === "none" ? "before the RAM section" : "before the RAM section ended"
        }: device state carries no length, so it can only be skipped after the RAM section`
      )
    }
    if (name !== RAM_SECTION) {
      return yield* fail(
        "UnknownSection",
        at,
        `iterative section '${name}' (${kind}) is not supported: only the 'ram' section can be read ` +
          "(block dirty bitmaps, VFIO and other iterative device state are not)"
      )
    }
    if (ram.phase !== "none") return yield* fail("Malformed", at, "a second SECTION_START for 'ram'")
    if (sectionVersion !== RAM_SECTION_VERSION || instance !== 0) {
      return yield* fail(
        "Unsupported",
        at,
        `section 'ram' instance ${instance} version ${sectionVersion}; only instance 0 version ${RAM_SECTION_VERSION} is supported`
      )
    }
    ram.id = id
    ram.phase = "open"
    yield* readRamRecords(p, kind)
    yield* readFooter(p, id)
  })

/** A SECTION_PART or SECTION_END record at `at` of the RAM section; SECTION_END ends it. */
const readSectionPart = <E, R>(p: Parser<E, R>, at: number, type: number) =>
  Effect.gen(function*() {
    const ram = p.state.ram
    const kind = type === Record.SECTION_PART ? "SECTION_PART" : "SECTION_END"
    const id = yield* p.r.u32("a section id")
    if (ram.phase !== "open" || id !== ram.id) {
      return yield* fail(
        "UnknownSection",
        at,
        ram.phase === "open"
          ? `${kind} for section ${id}, which never started (the RAM section is ${ram.id})`
          : `${kind} for section ${id} ${ram.phase === "none" ? "before any SECTION_START" : "after the RAM section ended"}`
      )
    }
    if (type === Record.SECTION_END && p.handler.ramEnding) yield* p.handler.ramEnding
    yield* readRamRecords(p, kind)
    yield* readFooter(p, id)
    if (type === Record.SECTION_END) ram.phase = "ended"
  })

/**
 * Whether the main stream carried a record for every page of the memory (as QEMU without multifd does in its
 * first pass), each page counted once, with no return path left unanswered.
 */
const everyPageCame = (state: State.State): boolean => {
  const memory = state.ram.memory
  // distinct pages: a stream that sent a page again and again has not sent every page
  return state.returnPathAt === undefined && memory !== undefined && state.ram.distinctPages >= memory.size / memory.pageSize
}

/** The next top-level record, while the RAM section has not ended. */
const readRecord = <E, R>(p: Parser<E, R>): Effect.Effect<void, E | QemuStreamError, R> =>
  Effect.gen(function*() {
    const { r, state } = p
    const phase = state.ram.phase
    const at = r.offset
    const type = yield* r.peekByte("the next record")
    if (type === undefined) {
      return yield* fail(
        "Truncated",
        at,
        phase === "none"
          ? "the stream ended before the RAM section: QEMU closed the main channel (cancelled, failed or killed?)"
          : "the stream ended before the RAM section completed: QEMU cancelled or failed the migration, or was killed"
      )
    }
    if (type === Record.SECTION_FULL && phase === "open" && state.flushes === 0 && everyPageCame(state)) {
      // QEMU's background-snapshot (never with multifd: no flush came) sends no SECTION_END: once every page went,
      // the device state it saved when the snapshot began follows the RAM section's last part (a migration's comes
      // after its SECTION_END): the RAM section ends here, and the device state, from this record on, is drained
      // and checked as any. (An early device section, a virtio-mem's, comes before any page: refused below.)
      if (p.handler.ramEnding) yield* p.handler.ramEnding
      state.ram.phase = "ended"
      return
    }
    yield* r.u8("a record type")
    if (state.returnPathAt !== undefined && type !== Record.COMMAND) yield* refuseReturnPath(state.returnPathAt)
    switch (type) {
      case Record.CONFIGURATION:
        yield* readConfiguration(p, at)
        break
      case Record.COMMAND:
        yield* readCommand(p, at)
        break
      case Record.SECTION_START:
      case Record.SECTION_FULL:
        yield* readSectionStart(p, at, type)
        break
      case Record.SECTION_PART:
      case Record.SECTION_END:
        yield* readSectionPart(p, at, type)
        break
      case Record.EOF:
        return yield* fail(
          "Malformed",
          at,
          phase === "none" ? "end of stream marker before any RAM section" : "end of stream marker before the RAM section ended"
        )
      case Record.SUBSECTION:
      case Record.VMDESCRIPTION:
      case Record.SECTION_FOOTER:
        return yield* fail("Malformed", at, `record type ${hex(type)} where a record starts`)
      default:
        return yield* fail("UnknownRecord", at, `unknown record type ${hex(type)}`)
    }
    state.records++
  })

/** Device state, EOF marker and description after the RAM section: drained, then the ending is checked. */
const readDeviceState = <E, R>({ options, r, state }: Parser<E, R>) =>
  Effect.gen(function*() {
    const drainedAt = r.offset
    // a source with a return path waits for our answer before it closes: its stream ends where it says
    const { length, tail } = yield* r.drain({ keepAll: options.keepDeviceState, stopAtEnd: state.returnPath })
    const ending = checkEnding(tail, length)
    if (ending._tag === "Incomplete") {
      return yield* fail(
        "Incomplete",
        drainedAt,
        `the stream ended inside the device state (${length} bytes after the RAM section, no end-of-stream marker): ` +
          "QEMU cancelled or failed the migration, or was killed, after sending all RAM"
      )
    }
    return { length, devices: ending.devices, bytes: options.keepDeviceState ? tail : undefined }
  })

/**
 * Reads a QEMU main migration stream to its end. Returns what it met once the RAM section ended, the device
 * state was drained and the stream ended as a complete stream ends.
 */
export const read = <E, R = never>(
  source: ByteSource<E>,
  handler: Handler<E, R>,
  options: ReadOptions = {}
): Effect.Effect<Summary, E | QemuStreamError, R> =>
  Effect.suspend(() => {
    const p = State.make(source, handler, options)
    return Effect.gen(function*() {
      yield* readHeader(p)
      while (p.state.ram.phase !== "ended") yield* readRecord(p)
      if (handler.ramEnded) yield* handler.ramEnded
      const deviceState = yield* readDeviceState(p)
      const { state } = p
      return {
        configuration: state.configuration,
        pageSize: state.pageSize,
        blocks: state.ram.blocks,
        flushes: state.flushes,
        ramSections: state.ramSections,
        zeroPages: state.zeroPages,
        normalPages: state.normalPages,
        commands: state.commands,
        commandRecords: state.commandRecords,
        ramSectionId: state.ram.id,
        returnPath: state.returnPath,
        mappedRam: state.mappedRam,
        deviceState: deviceState.bytes,
        deviceStateBytes: deviceState.length,
        devices: deviceState.devices,
        bytes: p.r.offset - (options.startOffset ?? 0)
      } satisfies Summary
    })
  })
