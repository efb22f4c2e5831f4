/**
 * A guest that keeps running, for whole-VM migration tests: a tiny BIOS for `-machine pc` whose code loops
 * incrementing a 32-bit counter in guest RAM, hand-assembled below (16-bit real mode; no assembler needed).
 *
 * QEMU maps a 64 KiB `-bios` file just below 4 GiB and its last 64 KiB again below 1 MiB; the CPU starts in
 * real mode at CS:IP = F000:FFF0 (physical 0xFFFFFFF0), i.e. at offset 0xFFF0 of the file, with 16 bytes to
 * the end of the ROM: the whole program fits there.
 */
import * as Fs from "node:fs"

/** Where the guest keeps its counter: physical address 0x1000 (in the first RAM block, `pc.ram` / `mem`). */
export const COUNTER_ADDRESS = 0x1000

/** The size QEMU requires of a BIOS file for `-machine pc` (a multiple of 64 KiB). */
const BIOS_SIZE = 64 * 1024

/** Where the reset vector lies in the file. */
const RESET_VECTOR = 0xfff0

/**
 * The program, at the reset vector:
 *
 * ```
 * fff0: fa                cli                    ; no interrupts (there is no IDT)
 * fff1: 31 c0             xor  ax, ax
 * fff3: 8e d8             mov  ds, ax            ; DS = 0: data addresses are physical below 64 KiB
 * fff5: 66 ff 06 00 10    inc  dword [0x1000]    ; the counter (operand-size prefix 66: 32 bits)
 * fffa: eb f9             jmp  short 0xfff5      ; -7: back to the increment, for ever
 * ```
 */
const PROGRAM = Buffer.from([
  0xfa,
  0x31, 0xc0,
  0x8e, 0xd8,
  0x66, 0xff, 0x06, COUNTER_ADDRESS & 0xff, COUNTER_ADDRESS >> 8,
  0xeb, 0xf9
])

/** The BIOS image: 0xff everywhere (erased flash), the program at the reset vector. */
export const counterBios = (): Buffer => {
  const bios = Buffer.alloc(BIOS_SIZE, 0xff)
  PROGRAM.copy(bios, RESET_VECTOR)
  return bios
}

/** Writes the BIOS to `path` (once per test file). */
export const writeCounterBios = (path: string): string => {
  Fs.writeFileSync(path, counterBios())
  return path
}

/** The page the guest writes (the only one of its RAM whose content it changes). */
export const counterPage = (pageSize = 4096): number => Math.floor(COUNTER_ADDRESS / pageSize)
