/**
 * A QEMU virtual machine as its migration carries it: the guest's RAM, and every other part of QEMU's main
 * stream kept verbatim — the configuration (machine type, target page bits, uuid), the RAM section's id,
 * the commands of the RAM phase (`SWITCHOVER_START`), and the device state (every device section, the
 * end-of-stream marker and the JSON description), which only QEMU's device code can interpret.
 *
 * `QemuIncoming` receives one (`vm: true`), `MappedRam` writes one to a QEMU mapped-ram file and reads one
 * from such a file (QEMU's or ours), `QemuOutgoing` migrates one into an unmodified QEMU. Only the
 * configuration's capabilities are not kept: they describe how a stream was sent (`mapped-ram` for a file),
 * and each writer sends the ones its stream needs.
 *
 * @since 0.1.0
 */
import type * as GuestRam from "./GuestRam.js"
import * as QemuStream from "./QemuStream.js"

/**
 * A VM: its RAM and, verbatim, the rest of its main stream.
 *
 * @since 0.1.0
 * @category models
 */
export interface QemuVm {
  /** The CONFIGURATION record (absent when the source ran with `send-configuration` off). */
  readonly configuration: QemuStream.Configuration | undefined
  /** The RAM section's id in the source's stream (its device sections number around it). */
  readonly ramSectionId: number
  /** The RAM blocks, in QEMU's order, with the page size. */
  readonly ram: GuestRam.GuestRam["Type"]
  /** The COMMAND records of the RAM phase, in order (`SWITCHOVER_START`). */
  readonly commands: ReadonlyArray<QemuStream.CommandRecord>
  /** Everything after the RAM section: device sections, the EOF marker and the description. */
  readonly deviceState: Uint8Array
}

/**
 * The VM a read stream described, given the memory its pages went to; `undefined` when the stream kept no
 * device state (`keepDeviceState` off) or had no RAM section.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fromSummary = (summary: QemuStream.Summary, ram: GuestRam.GuestRam["Type"]): QemuVm | undefined =>
  summary.deviceState === undefined || summary.ramSectionId === undefined ? undefined : {
    configuration: summary.configuration === undefined ? undefined : { ...summary.configuration, capabilities: [] },
    ramSectionId: summary.ramSectionId,
    ram,
    commands: summary.commandRecords,
    deviceState: summary.deviceState
  }

/**
 * How many devices the VM's description lists, when it has one.
 *
 * @since 0.1.0
 * @category utils
 */
export const devices = (vm: QemuVm): number | undefined => {
  const bytes = Buffer.from(vm.deviceState.buffer, vm.deviceState.byteOffset, vm.deviceState.length)
  const ending = QemuStream.checkEnding(bytes, bytes.length)
  return ending._tag === "Complete" ? ending.devices : undefined
}

/**
 * Whether the device state ends as a complete stream does (the EOF marker, then the description unless the
 * machine suppresses it): a VM whose source stopped half-way through its devices is not one.
 *
 * @since 0.1.0
 * @category predicates
 */
export const isComplete = (vm: QemuVm): boolean => {
  const bytes = Buffer.from(vm.deviceState.buffer, vm.deviceState.byteOffset, vm.deviceState.length)
  return QemuStream.checkEnding(bytes, bytes.length)._tag === "Complete"
}

/**
 * `pc-i440fx-10.0, 6 RAM blocks (33890304 bytes), 31 devices`: a VM in one line.
 *
 * @since 0.1.0
 * @category utils
 */
export const describe = (vm: QemuVm): string => {
  const n = devices(vm)
  return `${vm.configuration?.machine ?? "no machine type"}, ${vm.ram.blocks.length} RAM block${
    vm.ram.blocks.length === 1 ? "" : "s"
  } (${vm.ram.size} bytes)${n === undefined ? "" : `, ${n} devices`}`
}
