/**
 * Raw bytes of the migration's wire, for tests that play a stranger or a fake peer on a real socket.
 */
import * as Control from "../../src/Control.js"

/** The control magic, as a source's first bytes on the main channel. */
export const controlMagic = (): Buffer => {
  const magic = Buffer.alloc(4)
  magic.writeUInt32BE(Control.MAGIC, 0)
  return magic
}
