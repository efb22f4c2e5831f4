/**
 * A tiny key-value store whose whole table lives in guest memory (one `GuestRam` block), so that a live
 * migration moves it while it serves writes, and the destination opens it from the received bytes.
 *
 * Open addressing with linear probing over fixed-size slots. Block `kv.table`:
 *
 *   page 0      header: magic "KVS1" (u32), slot size (u32), slot count (u32), all little-endian
 *   then        slots of 128 bytes (32 a page, none crossing a page):
 *                 0  u32  key hash (FNV-1a; 0 marks an empty slot, a hash of 0 is stored as 1)
 *                 4  u32  version: writes to this key so far
 *                 8  u8   key length (1..52)    9  u8  value length (0..64)
 *                12       key bytes             64     value bytes
 *
 * Every write goes through `GuestRam.update` on exactly the slot it changes (one page dirtied, writers
 * pause while a migration switches over); reads look at memory directly. A slot is written whole in one
 * synchronous step, so a reader never sees half of it.
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as GuestRam from "../../src/GuestRam.js"

export const BLOCK = "kv.table"
export const PAGE = 4096
export const SLOT = 128
export const KEY_MAX = 52
export const VALUE_MAX = 64
const MAGIC = 0x3153564b // "KVS1" read as a little-endian u32
const KEY_AT = 12
const VALUE_AT = 64

/** Why the store refused something. */
export class KvError extends Data.TaggedError("KvError")<{ readonly detail: string }> {
  override get message(): string {
    return this.detail
  }
}

/** An open store: its memory and its slot count. */
export interface Store {
  readonly ram: GuestRam.GuestRam["Type"]
  readonly table: Buffer
  readonly slots: number
}

/** A stored value and how many times its key was written. */
export interface Entry {
  readonly value: string
  readonly version: number
}

/** The block spec of a table with `slots` slots (after the header page, rounded up to whole pages). */
export const blockSpec = (slots: number): GuestRam.BlockSpec => ({
  name: BLOCK,
  size: PAGE + Math.ceil((slots * SLOT) / PAGE) * PAGE
})

/** FNV-1a over the key's bytes, never 0. */
const hashOf = (key: Buffer): number => {
  let h = 0x811c9dc5
  for (const byte of key) h = Math.imul(h ^ byte, 0x01000193) >>> 0
  return h === 0 ? 1 : h
}

const slotOffset = (slot: number) => PAGE + slot * SLOT

/** Formats a fresh table in `ram` (through the write gate). */
export const create = (ram: GuestRam.GuestRam["Type"]): Effect.Effect<Store, KvError | GuestRam.OutOfBounds | GuestRam.WriteBlocked> =>
  Effect.gen(function*() {
    const block = ram.block(BLOCK)
    if (block === undefined) return yield* new KvError({ detail: `no block named ${BLOCK}` })
    const slots = Math.floor((block.bytes.length - PAGE) / SLOT)
    yield* GuestRam.update(ram, BLOCK, 0, 12, (view) => {
      view.writeUInt32LE(MAGIC, 0)
      view.writeUInt32LE(SLOT, 4)
      view.writeUInt32LE(slots, 8)
    })
    return { ram, table: block.bytes, slots }
  })

/** Opens the table found in `ram` (the destination: memory received by a migration). */
export const open = (ram: GuestRam.GuestRam["Type"]): Effect.Effect<Store, KvError> =>
  Effect.suspend(() => {
    const table = ram.block(BLOCK)?.bytes
    if (table === undefined) return new KvError({ detail: `no block named ${BLOCK}` })
    if (table.readUInt32LE(0) !== MAGIC || table.readUInt32LE(4) !== SLOT) {
      return new KvError({ detail: `block ${BLOCK} holds no key-value table` })
    }
    const slots = table.readUInt32LE(8)
    if (slotOffset(slots) > table.length) return new KvError({ detail: `the header's ${slots} slots overrun the block` })
    return Effect.succeed({ ram, table, slots })
  })

const keyBytes = (key: string) => Effect.suspend(() => {
  const bytes = Buffer.from(key, "utf8")
  return bytes.length === 0 || bytes.length > KEY_MAX
    ? new KvError({ detail: `key ${JSON.stringify(key)} must be 1-${KEY_MAX} bytes` })
    : Effect.succeed(bytes)
})

/** Whether `slot` holds `key` (by hash, then bytes). */
const holds = (table: Buffer, slot: number, hash: number, key: Buffer): boolean => {
  const at = slotOffset(slot)
  return table.readUInt32LE(at) === hash && table[at + 8] === key.length &&
    table.compare(key, 0, key.length, at + KEY_AT, at + KEY_AT + key.length) === 0
}

/** The slot holding `key`, or the empty slot where it would go, or -1 when the table is full. */
const probe = (store: Store, hash: number, key: Buffer): number => {
  for (let i = 0; i < store.slots; i++) {
    const slot = (hash + i) % store.slots
    const at = slotOffset(slot)
    if (store.table.readUInt32LE(at) === 0 || holds(store.table, slot, hash, key)) return slot
  }
  return -1
}

/**
 * Sets `key` to `value`; returns the key's new version. Waits while a migration holds writers paused. The
 * slot found by probing is checked again in the same step as the write: another writer may have taken it
 * in between, and then the probe starts over.
 */
export const put = (store: Store, key: string, value: string): Effect.Effect<number, KvError | GuestRam.OutOfBounds | GuestRam.WriteBlocked> =>
  Effect.gen(function*() {
    const k = yield* keyBytes(key)
    const v = Buffer.from(value, "utf8")
    if (v.length > VALUE_MAX) return yield* new KvError({ detail: `value of ${v.length} bytes exceeds ${VALUE_MAX}` })
    const hash = hashOf(k)
    while (true) {
      const slot = probe(store, hash, k)
      if (slot < 0) return yield* new KvError({ detail: `table full (${store.slots} slots)` })
      const version = yield* GuestRam.update(store.ram, BLOCK, slotOffset(slot), SLOT, (view) => {
        const fresh = view.readUInt32LE(0) === 0
        if (!fresh && !holds(store.table, slot, hash, k)) return 0 // taken meanwhile: probe again
        const version = (fresh ? 0 : view.readUInt32LE(4)) + 1
        view.writeUInt32LE(hash, 0)
        view.writeUInt32LE(version, 4)
        view[8] = k.length
        view[9] = v.length
        k.copy(view, KEY_AT)
        v.copy(view, VALUE_AT)
        return version
      })
      if (version > 0) return version
    }
  })

/** The entry of `key`, if any. */
export const get = (store: Store, key: string): Entry | undefined => {
  const k = Buffer.from(key, "utf8")
  if (k.length === 0 || k.length > KEY_MAX) return undefined
  const slot = probe(store, hashOf(k), k)
  if (slot < 0 || store.table.readUInt32LE(slotOffset(slot)) === 0) return undefined
  const at = slotOffset(slot)
  return {
    version: store.table.readUInt32LE(at + 4),
    value: store.table.toString("utf8", at + VALUE_AT, at + VALUE_AT + store.table[at + 9]!)
  }
}

/** Number of keys stored. */
export const size = (store: Store): number => {
  let n = 0
  for (let slot = 0; slot < store.slots; slot++) if (store.table.readUInt32LE(slotOffset(slot)) !== 0) n++
  return n
}
