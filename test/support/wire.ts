/**
 * Raw bytes of the migration's wire, for tests that play a stranger or a fake peer on a real socket.
 */
import * as Crypto from "node:crypto"
import * as Control from "../../src/Control.js"

/** The control magic, as a source's first bytes on the main channel. */
export const controlMagic = (): Buffer => {
  const magic = Buffer.alloc(4)
  magic.writeUInt32BE(Control.MAGIC, 0)
  return magic
}

/** A valid hello of a small migration (one channel, one block of 16 pages of 4 KiB), with `extra` fields. */
export const smallHello = (extra: Partial<{ readonly heartbeats: boolean }> = {}): Control.Hello =>
  new Control.Hello({
    version: Control.VERSION,
    uuid: Crypto.randomUUID(),
    pageSize: 4096,
    channels: 1,
    compression: "none",
    zeroPage: "multifd",
    blocks: [{ name: "ram", size: 16 * 4096 }],
    ...extra
  })
