/**
 * Writing QEMU's main stream: the records a QEMU 10 source writes, byte for byte as `migration/savevm.c` and
 * `migration/ram.c` write them (big-endian integers, `idstr` strings), for the two writers of a VM — the
 * mapped-ram file (`MappedRam`) and a migration to QEMU (`QemuOutgoing`). Pure: every function returns the
 * record's bytes.
 *
 * @internal
 */
import {
  Command,
  type CommandRecord,
  type Configuration,
  FILE_MAGIC,
  FILE_VERSION,
  MAPPED_RAM_HEADER_SIZE,
  MAPPED_RAM_VERSION,
  type MappedRamHeader,
  RAM_SECTION,
  RAM_SECTION_VERSION,
  RamFlag,
  type RamBlock,
  Record,
  ReturnPath
} from "./format.js"

const u32 = (n: number): Buffer => {
  const b = Buffer.allocUnsafe(4)
  b.writeUInt32BE(n)
  return b
}

const u64 = (n: number): Buffer => {
  const b = Buffer.allocUnsafe(8)
  b.writeUInt32BE(Math.floor(n / 2 ** 32), 0)
  b.writeUInt32BE(n % 2 ** 32, 4)
  return b
}

/** A u8 length and the text (QEMU's `idstr` fields: at most 255 bytes). */
const shortString = (text: string): Buffer => {
  const bytes = Buffer.from(text, "latin1")
  return Buffer.concat([Buffer.from([bytes.length]), bytes])
}

/** The file header: `QEVM`, file version 3. */
export const header = (): Buffer => Buffer.concat([u32(FILE_MAGIC), u32(FILE_VERSION)])

const subsection = (name: string, body: Buffer) =>
  Buffer.concat([Buffer.from([Record.SUBSECTION]), shortString(name), u32(1), body])

/**
 * The CONFIGURATION record (vmstate "configuration"): the machine type, then the subsections QEMU sends
 * in its order — target page bits, the capabilities the destination must share, the uuid.
 */
export const configuration = (configuration: Configuration, capabilities: ReadonlyArray<string>): Buffer => {
  const machine = Buffer.from(configuration.machine, "latin1")
  const parts = [Buffer.from([Record.CONFIGURATION]), u32(machine.length), machine]
  if (configuration.targetPageBits !== undefined) {
    parts.push(subsection("configuration/target-page-bits", u32(configuration.targetPageBits)))
  }
  if (capabilities.length > 0) {
    const list = Buffer.concat([u32(capabilities.length), ...capabilities.map(shortString)])
    parts.push(subsection("configuration/capabilities", list))
  }
  if (configuration.uuid !== undefined) parts.push(subsection("configuration/uuid", Buffer.from(configuration.uuid)))
  return Buffer.concat(parts)
}

/** A COMMAND record. */
export const command = (record: CommandRecord): Buffer => {
  const b = Buffer.allocUnsafe(5)
  b[0] = Record.COMMAND
  b.writeUInt16BE(record.command, 1)
  b.writeUInt16BE(record.data.length, 3)
  return Buffer.concat([b, record.data])
}

/** SECTION_START of the RAM section (instance 0, version 4). */
export const ramStart = (id: number): Buffer =>
  Buffer.concat([Buffer.from([Record.SECTION_START]), u32(id), shortString(RAM_SECTION), u32(0), u32(RAM_SECTION_VERSION)])

/** SECTION_PART or SECTION_END of the RAM section. */
export const ramPart = (id: number, end: boolean): Buffer =>
  Buffer.concat([Buffer.from([end ? Record.SECTION_END : Record.SECTION_PART]), u32(id)])

/** A section's footer. */
export const footer = (id: number): Buffer => Buffer.concat([Buffer.from([Record.SECTION_FOOTER]), u32(id)])

/** A RAM word: an address (or size) with flags in its low bits. */
export const ramWord = (value: number, flags: number): Buffer => u64(value + flags)

/** `RAM_SAVE_FLAG_EOS`: the end of one RAM section record. */
export const EOS: Buffer = ramWord(0, RamFlag.EOS)
/** `RAM_SAVE_FLAG_MULTIFD_FLUSH`: every multifd channel has sent its SYNC packet. */
export const MULTIFD_FLUSH: Buffer = ramWord(0, RamFlag.MULTIFD_FLUSH)

/** `RAM_SAVE_FLAG_MEM_SIZE` with the total of the blocks. */
export const memSize = (blocks: ReadonlyArray<RamBlock>): Buffer =>
  ramWord(blocks.reduce((n, b) => n + b.size, 0), RamFlag.MEM_SIZE)

/** One entry of the block list: the block's id and used length. */
export const blockEntry = (block: RamBlock): Buffer => Buffer.concat([shortString(block.name), u64(block.size)])

/** The mapped-ram header that follows a block's entry in a mapped-ram file. */
export const mappedRamHeader = (header: Omit<MappedRamHeader, "version">): Buffer => {
  const b = Buffer.allocUnsafe(MAPPED_RAM_HEADER_SIZE)
  b.writeUInt32BE(MAPPED_RAM_VERSION, 0)
  u64(header.pageSize).copy(b, 4)
  u64(header.bitmapOffset).copy(b, 12)
  u64(header.pagesOffset).copy(b, 20)
  return b
}

/** A page on the main stream (legacy precopy): its word, its block's name unless it continues the last one. */
export const pageRecord = (offset: number, flags: number, block: string | undefined): Buffer =>
  block === undefined ? ramWord(offset, flags | RamFlag.CONTINUE) : Buffer.concat([ramWord(offset, flags), shortString(block)])

/** A message on the return path: u16 type, u16 length, the data. */
export const returnPathMessage = (type: number, data: Uint8Array = new Uint8Array(0)): Buffer => {
  const b = Buffer.allocUnsafe(4)
  b.writeUInt16BE(type, 0)
  b.writeUInt16BE(data.length, 2)
  return Buffer.concat([b, data])
}

/** `MIG_RP_MSG_PONG` answering a PING of `value`. */
export const pong = (value: number): Buffer => returnPathMessage(ReturnPath.PONG, u32(value))

/** `MIG_RP_MSG_SHUT`: 0 the migration was loaded, 1 it failed. */
export const shut = (status: number): Buffer => returnPathMessage(ReturnPath.SHUT, u32(status))

/** `MIG_RP_MSG_SWITCHOVER_ACK`: the source may switch over. */
export const switchoverAck = (): Buffer => returnPathMessage(ReturnPath.SWITCHOVER_ACK)

/** `MIG_CMD_PING` with `value`. */
export const ping = (value: number): Buffer => command({ command: Command.PING, data: u32(value) })

/** `MIG_CMD_OPEN_RETURN_PATH`. */
export const openReturnPath = (): Buffer => command({ command: Command.OPEN_RETURN_PATH, data: new Uint8Array(0) })
