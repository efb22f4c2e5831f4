/**
 * Comparing guest memories: whether a destination received exactly the source's blocks.
 */
import type * as GuestRam from "../../src/GuestRam.js"

/** Whether two memories have the same blocks, byte for byte. */
export const sameMemory = (a: GuestRam.GuestRam["Type"], b: GuestRam.GuestRam["Type"]): boolean =>
  a.blocks.length === b.blocks.length && a.blocks.every((block, i) => block.bytes.equals(b.blocks[i]!.bytes))
