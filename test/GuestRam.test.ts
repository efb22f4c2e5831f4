import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as FastCheck from "effect/FastCheck"
import * as Fiber from "effect/Fiber"
import * as HashWasm from "hash-wasm"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as GuestRam from "../src/GuestRam.js"
import * as Prefault from "../src/internal/native/prefault.js"
import * as Migration from "../src/Migration.js"
import * as Snapshot from "../src/Snapshot.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { tempDirectory } from "./support/files.js"
import { noHang } from "./support/guards.js"

const sha256 = (data: Uint8Array): Buffer => Crypto.createHash("sha256").update(data).digest()

/** The documented digest: SHA-256 over the XXH3-128 of each 64 MiB chunk (hash-wasm's one-shot xxhash128). */
const referenceDigest = (bytes: Uint8Array): Effect.Effect<string> =>
  Effect.promise(async () => {
    const tree = Crypto.createHash("sha256")
    for (let at = 0; at < bytes.length; at += GuestRam.DIGEST_CHUNK) {
      const chunk = bytes.subarray(at, Math.min(bytes.length, at + GuestRam.DIGEST_CHUNK))
      tree.update(Buffer.from(await HashWasm.xxhash128(chunk), "hex"))
    }
    return tree.digest("hex")
  })

describe("GuestRam.make validation", () => {
  const failsWith = (
    options: Parameters<typeof GuestRam.make>[0],
    reason: GuestRam.GuestRamError["reason"]
  ) =>
    Effect.gen(function*() {
      const error = yield* Effect.flip(GuestRam.make(options))
      expect(error).toBeInstanceOf(GuestRam.GuestRamError)
      expect(error._tag).toBe("GuestRamError")
      expect(error.reason).toBe(reason)
      expect(error.message.startsWith("invalid memory layout: ")).toBe(true)
      expect(error.message).not.toMatch(/[\r\n]/)
      return error
    })

  it.scoped("on a Node 20 before 20.13 (no process.availableMemory, engines >=20): fresh memory is made, more than the machine has is refused", () =>
    Effect.gen(function*() {
      // as such a Node has it: the property absent (a call of it was a TypeError, a defect of every make)
      const own = Object.getOwnPropertyDescriptor(process, "availableMemory")
      yield* Effect.acquireRelease(
        Effect.sync(() => Object.defineProperty(process, "availableMemory", { value: undefined, configurable: true, writable: true })),
        () => Effect.sync(() => (own === undefined ? delete (process as { availableMemory?: unknown }).availableMemory : Object.defineProperty(process, "availableMemory", own)))
      )
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", size: 16 * 4096 }] })
      expect(ram.blocks[0]!.bytes.length).toBe(16 * 4096)
      const tooMuch = Math.ceil((Os.totalmem() + 1) / GuestRam.MAX_BLOCK_SIZE)
      const error = yield* Effect.flip(GuestRam.make({
        blocks: Array.from({ length: tooMuch }, (_, i) => ({ name: `b${i}`, size: GuestRam.MAX_BLOCK_SIZE }))
      }))
      expect(error.reason).toBe("OutOfMemory")
    }))

  it.effect("rejects bad page sizes", () =>
    Effect.gen(function*() {
      for (const pageSize of [0, -4096, 1, 256, 1000, 4097, 3 * 4096, 1024 * 1024, 4096.5, Number.NaN]) {
        yield* failsWith({ pageSize, blocks: [{ name: "mem", size: 1024 * 1024 }] }, "BadPageSize")
      }
    }))

  it.effect("accepts every power of two from 512 B to 512 KiB, defaulting to 4 KiB", () =>
    Effect.gen(function*() {
      for (let pageSize = 512; pageSize <= 512 * 1024; pageSize *= 2) {
        const ram = yield* GuestRam.make({ pageSize, blocks: [{ name: "mem", size: 1024 * 1024 }] })
        expect(ram.pageSize).toBe(pageSize)
        expect(ram.blocks[0]!.pages).toBe((1024 * 1024) / pageSize)
      }
      const ram = yield* GuestRam.make({ blocks: [{ name: "mem", size: 8192 }] })
      expect(ram.pageSize).toBe(GuestRam.DEFAULT_PAGE_SIZE)
      expect(ram.pageSize).toBe(4096)
      const explicit = yield* GuestRam.make({ pageSize: undefined, blocks: [{ name: "mem", size: 8192 }] })
      expect(explicit.pageSize).toBe(4096)
    }))

  it.effect("rejects bad block names", () =>
    Effect.gen(function*() {
      yield* failsWith({ blocks: [{ name: "", size: 4096 }] }, "BadBlockName")
      yield* failsWith({ blocks: [{ name: "a".repeat(256), size: 4096 }] }, "BadBlockName")
      // 128 two-byte characters = 256 UTF-8 bytes
      yield* failsWith({ blocks: [{ name: "é".repeat(128), size: 4096 }] }, "BadBlockName")
      yield* failsWith({ blocks: [{ name: "m\0em", size: 4096 }] }, "BadBlockName")
      yield* failsWith({ blocks: [{ name: "mem\0", size: 4096 }] }, "BadBlockName")
      // a name with a line break is reported on one line
      const error = yield* failsWith({ blocks: [{ name: "a\nb\r\0", size: 4096 }] }, "BadBlockName")
      expect(error.message).toContain("\\n")
      // a lone surrogate has no UTF-8 encoding: on the wire it would become U+FFFD, another name
      yield* failsWith({ blocks: [{ name: "mem\ud800", size: 4096 }] }, "BadBlockName")
      yield* failsWith({ blocks: [{ name: "\ude00mem", size: 4096 }] }, "BadBlockName")
      // the second block is checked too
      yield* failsWith({ blocks: [{ name: "ok", size: 4096 }, { name: "", size: 4096 }] }, "BadBlockName")
    }))

  it.effect("a bad block name's error says what is wrong with it, not only the rule (a name cut inside an emoji has no NUL and is short)", () =>
    Effect.gen(function*() {
      const said = (name: string) => Effect.map(failsWith({ blocks: [{ name, size: 4096 }] }, "BadBlockName"), (e) => e.message)
      const rule = "a name is 1-255 UTF-8 bytes without NUL"
      expect(yield* said("")).toBe(`invalid memory layout: block name "" is empty: ${rule}`)
      expect(yield* said("é".repeat(128))).toBe(`invalid memory layout: block name "${"é".repeat(100)}"… (28 more characters) is 256 bytes long: ${rule}`)
      expect(yield* said("m\0em")).toBe(`invalid memory layout: block name "m\\u0000em" contains a NUL: ${rule}`)
      // "cache-😀" cut after 7 UTF-16 code units: half of the emoji
      expect(yield* said("cache-😀".slice(0, 7))).toBe(
        "invalid memory layout: block name \"cache-\\ud83d\" contains half of a character (a lone UTF-16 surrogate: a " +
          `string cut inside an emoji?), which UTF-8 cannot carry: ${rule}`
      )
    }))

  it.effect("accepts names of exactly 255 UTF-8 bytes", () =>
    Effect.gen(function*() {
      const names = ["a".repeat(255), "é".repeat(127) + "a", "😀".repeat(63) + "abc"]
      for (const name of names) expect(Buffer.byteLength(name)).toBe(255)
      const ram = yield* GuestRam.make({ blocks: names.map((name) => ({ name, size: 4096 })) })
      expect(ram.blocks.map((b) => b.name)).toEqual(names)
    }))

  it.effect("rejects duplicate names", () =>
    Effect.gen(function*() {
      const error = yield* failsWith(
        { blocks: [{ name: "mem", size: 4096 }, { name: "rom", size: 4096 }, { name: "mem", bytes: new Uint8Array(4096) }] },
        "DuplicateBlock"
      )
      expect(error.message).toContain("\"mem\"")
    }))

  it.effect("rejects sizes that are not a positive multiple of the page size", () =>
    Effect.gen(function*() {
      for (const size of [0, -4096, 4095, 4097, 6144, 4096.5, Number.NaN, Number.POSITIVE_INFINITY]) {
        yield* failsWith({ blocks: [{ name: "mem", size }] }, "BadBlockSize")
      }
      yield* failsWith({ pageSize: 8192, blocks: [{ name: "mem", size: 4096 }] }, "BadBlockSize")
      yield* failsWith({ blocks: [{ name: "mem", bytes: new Uint8Array(4096 + 1) }] }, "BadBlockSize")
      yield* failsWith({ blocks: [{ name: "mem", bytes: new Uint8Array(0) }] }, "BadBlockSize")
      yield* failsWith({ blocks: [{ name: "mem", size: GuestRam.MAX_BLOCK_SIZE + 4096 }] }, "BadBlockSize")
    }))

  it.effect("rejects an empty layout", () =>
    Effect.gen(function*() {
      yield* failsWith({ blocks: [] }, "NoBlocks")
    }))

  it("every accepted name survives UTF-8 encoding as 1-255 bytes without NUL", () => {
    FastCheck.assert(
      FastCheck.property(
        FastCheck.oneof(
          FastCheck.array(FastCheck.integer({ min: 0, max: 0x10ffff }), { maxLength: 140 }).map((cps) =>
            String.fromCodePoint(...cps)
          ),
          FastCheck.string({ unit: "binary-ascii", maxLength: 300 }),
          FastCheck.array(FastCheck.integer({ min: 0, max: 0xffff }), { maxLength: 140 }).map((units) =>
            String.fromCharCode(...units)
          )
        ),
        (name) => {
          const problem = GuestRam.checkLayout(4096, [{ name, size: 4096 }])
          const bytes = Buffer.from(name, "utf8")
          const valid = bytes.length >= 1 && bytes.length <= 255 && !bytes.includes(0) &&
            bytes.toString("utf8") === name
          expect(problem?.reason).toBe(valid ? undefined : "BadBlockName")
        }
      ),
      { numRuns: 300 }
    )
  })

  it("checkLayout reports the first problem without allocating, or undefined", () => {
    expect(GuestRam.checkLayout(4096, [])?.reason).toBe("NoBlocks")
    const many = (n: number) => Array.from({ length: n }, (_, i) => ({ name: `b${i}`, size: 4096 }))
    expect(GuestRam.checkLayout(4096, many(GuestRam.MAX_BLOCKS))).toBeUndefined()
    expect(GuestRam.checkLayout(4096, many(GuestRam.MAX_BLOCKS + 1))?.reason).toBe("TooManyBlocks")
    expect(GuestRam.checkLayout(4096, [{ name: "a", size: 4096 }, { name: "a", size: 1 }])?.reason).toBe(
      "DuplicateBlock"
    )
    expect(GuestRam.checkLayout(4096, [{ name: "a", size: 1 }, { name: "", size: 4096 }])?.reason).toBe(
      "BadBlockSize"
    )
    // a layout far larger than this machine's memory is checked without allocating it
    expect(GuestRam.checkLayout(4096, [{ name: "a", size: 2 ** 30 }, { name: "b", size: 2 ** 30 }])).toBeUndefined()
  })
})

describe("GuestRam blocks", () => {
  it.effect("size specs are zero-filled; the service looks blocks up and sums sizes", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({
        blocks: [{ name: "mem", size: 4 * 4096 }, { name: "vga.vram", size: 2 * 4096 }]
      })
      expect(ram.size).toBe(6 * 4096)
      expect(ram.blocks.map((b) => [b.name, b.bytes.length, b.pages])).toEqual([
        ["mem", 4 * 4096, 4],
        ["vga.vram", 2 * 4096, 2]
      ])
      expect(ram.blocks.every((b) => b.bytes.every((x) => x === 0))).toBe(true)
      expect(ram.block("vga.vram")).toBe(ram.blocks[1])
      expect(ram.block("nope")).toBeUndefined()
      expect(GuestRam.layoutOf(ram)).toEqual([
        { name: "mem", size: 4 * 4096 },
        { name: "vga.vram", size: 2 * 4096 }
      ])
    }))

  /**
   * The gate (`ram.gate.open`, as the README has an application open it after a migration) and the dirty log were
   * typed with classes of `src/internal/`, which a TypeScript caller could not name: keeping the gate in a field of
   * its own, or passing it to a function, took `GuestRam.GuestRam["Type"]["gate"]`. Both have names of this module.
   */
  it.effect("the gate and the dirty log have public type names (GuestRam.WriteGate, GuestRam.DirtyLog)", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "mem", size: 4 * 4096 }] })
      const reopen = (gate: GuestRam.WriteGate) => gate.open
      const dirtyCount = (log: GuestRam.DirtyLog) => log.count()
      yield* GuestRam.write(ram, "mem", 4096, Buffer.from([1]))
      expect(dirtyCount(ram.blocks[0]!.dirty)).toBe(1)
      yield* ram.gate.close
      yield* reopen(ram.gate)
      yield* GuestRam.write(ram, "mem", 0, Buffer.from([1]))
      expect(dirtyCount(ram.blocks[0]!.dirty)).toBe(2)
    }))

  it.effect("bytes specs are used in place, not copied", () =>
    Effect.gen(function*() {
      const mem = new Uint8Array(2 * 4096)
      mem[10] = 1
      const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: mem }] })
      const block = ram.block("mem")!
      expect(block.bytes.buffer).toBe(mem.buffer)
      expect(block.bytes[10]).toBe(1)
      mem[4096 + 7] = 0x5a
      expect(block.bytes[4096 + 7]).toBe(0x5a)
      block.bytes[0] = 0x42
      expect(mem[0]).toBe(0x42)
    }))

  it.effect("a bytes spec that is a view into a larger buffer covers exactly that view", () =>
    Effect.gen(function*() {
      const backing = new Uint8Array(5 * 4096)
      const view = backing.subarray(4096, 3 * 4096)
      const ram = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: view }] })
      const block = ram.blocks[0]!
      expect(block.bytes.length).toBe(2 * 4096)
      expect(block.pages).toBe(2)
      backing[4096] = 9
      backing[3 * 4096 - 1] = 8
      backing[3 * 4096] = 7 // outside the view
      expect(block.bytes[0]).toBe(9)
      expect(block.bytes[2 * 4096 - 1]).toBe(8)
      block.bytes[4096] = 6
      expect(backing[2 * 4096]).toBe(6)
      expect(backing[0]).toBe(0)
      expect(backing[4 * 4096]).toBe(0)
    }))

  it.effect("the layer provides the GuestRam service", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.GuestRam
      expect(ram.blocks.map((b) => b.name)).toEqual(["mem"])
    }).pipe(Effect.provide(GuestRam.layer({ blocks: [{ name: "mem", size: 4096 }] }))))
})

describe("GuestRam.update outside a block", () => {
  const cases: ReadonlyArray<readonly [string, number, number, RegExp]> = [
    // a length computed from something undefined (NaN) ran the callback on an empty view, and the write it meant
    // was dropped in silence; a fractional one ran it on a view of its whole part
    ["a", 0, NaN, /^a write of NaN bytes at 0 to block "a": offset and length must be whole numbers of 0 or more \(the block has 8192 bytes\)$/],
    ["a", 0, 1.5, /whole numbers/],
    ["a", 4096, -1, /whole numbers/],
    ["a", NaN, 1, /whole numbers/],
    ["a", 0.5, 1, /whole numbers/],
    ["a", -1, 1, /whole numbers/],
    ["a", 0, Infinity, /whole numbers/],
    ["a", 8191, 2, /^write of 2 bytes at 8191 is outside block "a" \(8192 bytes\)$/],
    ["a", 2 ** 53, 1, /whole numbers/],
    ["b", 0, 1, /^no block named "b"$/]
  ]
  for (const [name, offset, length, message] of cases) {
    it.effect(`update(${JSON.stringify(name)}, ${offset}, ${length}): OutOfBounds, the callback never runs, nothing dirty`, () =>
      Effect.gen(function*() {
        const ram = yield* GuestRam.make({ blocks: [{ name: "a", size: 2 * 4096 }] })
        let ran = false
        const error = yield* Effect.flip(GuestRam.update(ram, name, offset, length, (view) => {
          ran = true
          view.fill(1)
        }))
        expect(error._tag).toBe("OutOfBounds")
        expectOneLine(error)
        expect(error.message).toMatch(message)
        expect(ran).toBe(false)
        expect(GuestRam.dirtyPages(ram)).toBe(0)
        expect(ram.blocks[0]!.bytes.every((b) => b === 0)).toBe(true)
      }))
  }

  it.effect("a write of nothing at the block's end is no error, and dirties nothing", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "a", size: 2 * 4096 }] })
      expect(yield* GuestRam.update(ram, "a", 2 * 4096, 0, (view) => view.length)).toBe(0)
      expect(GuestRam.dirtyPages(ram)).toBe(0)
    }))
})

describe("memory given as bytes that is no longer there (its ArrayBuffer detached or shrunk since make)", () => {
  const gone = {
    detached: () => {
      const buffer = new ArrayBuffer(4 * 4096)
      return { bytes: new Uint8Array(buffer), lose: () => void structuredClone(buffer, { transfer: [buffer] }) }
    },
    shrunk: () => {
      // (a resizable ArrayBuffer: Node 20 has them, this project's TypeScript lib does not)
      const Resizable = ArrayBuffer as unknown as new(size: number, options: { maxByteLength: number }) => ArrayBuffer & {
        resize: (size: number) => void
      }
      const buffer = new Resizable(4 * 4096, { maxByteLength: 8 * 4096 })
      return { bytes: new Uint8Array(buffer, 0, 4 * 4096), lose: () => buffer.resize(4096) }
    }
  }
  for (const [how, make] of Object.entries(gone)) {
    it.scoped(`${how}: a save, migration, restore or incoming of it fails BadOptions (Layout) naming the block, nothing made`, () =>
      Effect.gen(function*() {
        const dir = yield* tempDirectory("emfd-gone-")
        const path = Path.join(dir, "ram.snap")
        // a snapshot of the same layout, to restore
        const other = yield* GuestRam.make({ blocks: [{ name: "ram", size: 4 * 4096 }] })
        yield* Snapshot.save(path).pipe(Effect.provideService(GuestRam.GuestRam, other))
        const { bytes, lose } = make()
        const ram = yield* GuestRam.make({ blocks: [{ name: "ram", bytes }] })
        lose()
        const expectGone = (error: { readonly _tag: string; readonly message: string }, tag: string, reason: string) => {
          expect(error).toMatchObject({ _tag: tag, reason })
          expectOneLine(error)
          expect(error.message).toContain("the memory of block \"ram\" is no longer there (0 of its 16384 bytes)")
        }
        // a save died on a RangeError half-way, with a stack trace
        const saved = yield* Effect.flip(Snapshot.save(Path.join(dir, "gone.snap")).pipe(Effect.provideService(GuestRam.GuestRam, ram)))
        expectGone(saved, "MigrationError", "BadOptions")
        expect(Fs.readdirSync(dir)).toEqual(["ram.snap"])
        const migrated = yield* Effect.flip(
          Migration.migrate({ address: { _tag: "Tcp", host: "127.0.0.1", port: 1 } }).pipe(
            Effect.provideService(GuestRam.GuestRam, ram),
            Effect.provide(Transport.layer)
          )
        )
        expectGone(migrated, "MigrationError", "BadOptions")
        expectGone(yield* Effect.flip(Snapshot.restore(path, { ram })), "SnapshotError", "Layout")
        const received = yield* Effect.flip(
          Migration.listenAndReceive({ _tag: "Tcp", host: "127.0.0.1", port: 0 }, { ram }).pipe(Effect.provide(Transport.layer))
        )
        expectGone(received, "MigrationError", "BadOptions")
      }))

    // lost while the transfer runs (at its first progress report): a save died on a RangeError ("The value of
    // \"length\" is out of range") in a writer, a migration on "Cannot perform Construct on a detached ArrayBuffer"
    it.scopedLive(`${how} while a save, a migration or a restore into it runs: fails as up front, naming the block, no defect`, () =>
      Effect.gen(function*() {
        const dir = yield* tempDirectory("emfd-gone-midway-")
        // (shrunk, the pages read as none: the peer times out waiting for their bytes)
        const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "1 second" } as const
        const expectGone = (exit: Exit.Exit<unknown, unknown>, tag: string, reason: string) => {
          const error = failureOf(exit) as { readonly _tag: string; readonly message: string }
          expect(error).toMatchObject({ _tag: tag, reason })
          expectOneLine(error)
          expect(error.message).toContain("the memory of block \"ram\" is no longer there (0 of its 16384 bytes)")
        }
        /** Memory that is lost at the first progress report of what it is given to. */
        const losing = Effect.gen(function*() {
          const { bytes, lose } = make()
          bytes.fill(7)
          const ram = yield* GuestRam.make({ blocks: [{ name: "ram", bytes }] })
          let lost = false
          const onProgress = () => Effect.sync(() => (lost ? undefined : (lost = true, lose())))
          return { ram, onProgress }
        })
        const saving = yield* losing
        expectGone(
          yield* Effect.exit(Snapshot.save(Path.join(dir, "lost.snap"), { onProgress: saving.onProgress }).pipe(
            Effect.provideService(GuestRam.GuestRam, saving.ram)
          )),
          "MigrationError",
          "BadOptions"
        )
        expect(Fs.readdirSync(dir)).toEqual([])
        const migrating = yield* losing
        const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
        const receiving = yield* Effect.fork(Migration.incoming(listener, { timeouts: TIMEOUTS }))
        expectGone(
          yield* noHang(Effect.exit(Migration.migrate({ address: listener.address, timeouts: TIMEOUTS, onProgress: migrating.onProgress }).pipe(
            Effect.provideService(GuestRam.GuestRam, migrating.ram),
            Effect.provide(Transport.layer)
          )), "migrate"),
          "MigrationError",
          "BadOptions"
        )
        expect(Exit.isFailure(yield* noHang(Fiber.await(receiving), "incoming"))).toBe(true)
        // a restore into memory given, lost at the restore's first report
        const whole = yield* GuestRam.make({ blocks: [{ name: "ram", bytes: Buffer.alloc(4 * 4096, 9) }] })
        yield* Snapshot.save(Path.join(dir, "whole.snap")).pipe(Effect.provideService(GuestRam.GuestRam, whole))
        const restoring = yield* losing
        expectGone(
          yield* Effect.exit(Snapshot.restore(Path.join(dir, "whole.snap"), { ram: restoring.ram, onProgress: restoring.onProgress })),
          "SnapshotError",
          "Layout"
        )
      }))

    // the digest of what was left, no bytes: SHA-256 of nothing (e3b0c442...), given as the block's, as if it held that
    it.scoped(`${how}: GuestRam.digest (and a digester's digest) fails Detached naming the block, not the digest of no bytes`, () =>
      Effect.gen(function*() {
        const { bytes, lose } = make()
        const ram = yield* GuestRam.make({ blocks: [{ name: "ram", bytes }] })
        const digest = yield* GuestRam.digester(ram)
        lose()
        for (const attempt of [GuestRam.digest(ram), digest]) {
          const error = failureOf(yield* Effect.exit(attempt))
          expect(error).toMatchObject({
            _tag: "GuestRamError",
            reason: "Detached",
            message: `the memory of block "ram" is no longer there (0 of its 16384 bytes): its ArrayBuffer was detached ` +
              "(transferred) or resized since GuestRam.make"
          })
        }
      }))
  }
})

/** This process's mappings (Linux, /proc/self/smaps): each one's size and resident bytes, by its address range. */
const mappings = (): ReadonlyMap<string, { readonly size: number; readonly resident: number }> => {
  const found = new Map<string, { size: number; resident: number }>()
  let current: { size: number; resident: number } | undefined
  for (const line of Fs.readFileSync("/proc/self/smaps", "utf8").split("\n")) {
    const range = /^([0-9a-f]+-[0-9a-f]+) /.exec(line)
    if (range !== null) found.set(range[1]!, current = { size: 0, resident: 0 })
    const field = /^(Size|Rss):\s+(\d+) kB/.exec(line)
    if (field !== null && current !== undefined) current[field[1] === "Size" ? "size" : "resident"] = Number(field[2]) * 1024
  }
  return found
}

/**
 * The bytes made resident between `before` and now in one mapping of at least `size` bytes (the largest such
 * gain): the memory of one allocation, whatever the garbage collector freed elsewhere meanwhile (the process's
 * VmRSS went down as often as up while a previous test's memory was collected).
 */
const residentGain = (before: ReturnType<typeof mappings>, size: number) => {
  let gain = 0
  for (const [range, now] of mappings()) {
    if (now.size >= size) gain = Math.max(gain, now.resident - (before.get(range)?.resident ?? 0))
  }
  return gain
}

/** Whether every byte is zero (a 64 KiB compare at a time). */
const allZero = (bytes: Uint8Array) => {
  const zero = Buffer.alloc(65536)
  for (let at = 0; at < bytes.length; at += zero.length) {
    const part = bytes.subarray(at, at + zero.length)
    if (Buffer.compare(part, zero.subarray(0, part.length)) !== 0) return false
  }
  return true
}

describe("fresh blocks are backed by memory before pages arrive (internal/native/prefault)", () => {
  it.effect("GuestRam.make touches every page of a block larger than a chunk on worker threads; it stays zero", () =>
    Effect.gen(function*() {
      // three chunks of 64 MiB and a bit: the last request is short
      const size = 3 * 64 * 1024 * 1024 + 3 * 4096
      const before = mappings()
      const ram = yield* GuestRam.make({ blocks: [{ name: "mem", size }] })
      // untouched, the block would add nothing resident (fresh memory maps no pages until written)
      expect(residentGain(before, size)).toBeGreaterThan(size * 0.95)
      expect(ram.blocks[0]!.bytes.length).toBe(size)
      expect(allZero(ram.blocks[0]!.bytes)).toBe(true)
    }))

  it.effect("on this thread too (one thread asked, or memory that is not shared), a slice at a time", () =>
    Effect.gen(function*() {
      const shared = GuestRam.allocate(2 * 64 * 1024 * 1024)
      const before = mappings()
      yield* Prefault.prefault(shared, 1)
      expect(residentGain(before, shared.length)).toBeGreaterThan(shared.length * 0.95)
      const plain = new Uint8Array(3 * 4096 + 100)
      yield* Prefault.prefault(plain)
      expect(allZero(shared) && allZero(plain)).toBe(true)
    }))

  for (const threads of [2, 1]) {
    it.effect(`an interrupted prefault stops waiting at once (${threads === 1 ? "on this thread" : "on worker threads"})`, () =>
      Effect.gen(function*() {
        // 1 GiB: far more than can be touched before the interruption below
        const bytes = GuestRam.allocate(1024 * 1024 * 1024)
        const fiber = yield* Effect.fork(Prefault.prefault(bytes, threads))
        yield* Effect.yieldNow()
        const exit = yield* Fiber.interrupt(fiber)
        expect(Exit.isInterrupted(exit)).toBe(true)
      }))
  }
})

describe("clearPage", () => {
  it("zeroes a page with any non-zero byte, on plain and shared memory, and nothing around it", () => {
    for (const bytes of [Buffer.alloc(3 * 4096, 0x11), GuestRam.allocate(3 * 4096).fill(0x11)]) {
      for (const at of [0, 1, 2047, 4094, 4095]) {
        bytes.fill(0, 4096, 8192)
        bytes[4096 + at] = 0xa5
        GuestRam.clearPage(bytes, 4096, 4096)
        expect(GuestRam.isZeroPage(bytes, 4096, 4096)).toBe(true)
        expect(bytes.subarray(0, 4096).every((b) => b === 0x11)).toBe(true)
        expect(bytes.subarray(8192).every((b) => b === 0x11)).toBe(true)
      }
      // a page that is zero already stays zero
      GuestRam.clearPage(bytes, 4096, 4096)
      expect(GuestRam.isZeroPage(bytes, 4096, 4096)).toBe(true)
    }
  })
})

describe("isZeroPage", () => {
  it("tells zero pages from non-zero ones, including a lone last or first byte", () => {
    for (const pageSize of [512, 4096, 65536]) {
      const bytes = Buffer.alloc(4 * pageSize)
      for (let p = 0; p < 4; p++) expect(GuestRam.isZeroPage(bytes, p * pageSize, pageSize)).toBe(true)
      bytes[2 * pageSize - 1] = 1 // last byte of page 1
      bytes[2 * pageSize] = 0x80 // first byte of page 2
      bytes[3 * pageSize + (pageSize >> 1)] = 0xff // middle of page 3
      expect(GuestRam.isZeroPage(bytes, 0, pageSize)).toBe(true)
      expect(GuestRam.isZeroPage(bytes, pageSize, pageSize)).toBe(false)
      expect(GuestRam.isZeroPage(bytes, 2 * pageSize, pageSize)).toBe(false)
      expect(GuestRam.isZeroPage(bytes, 3 * pageSize, pageSize)).toBe(false)
    }
  })

  it("checks every byte position of a page", () => {
    const pageSize = 4096
    const bytes = Buffer.alloc(3 * pageSize)
    const missed: Array<number> = []
    for (let i = 0; i < pageSize; i++) {
      bytes[pageSize + i] = 1 + (i % 255)
      // the page is seen as non-zero; its neighbours are unaffected
      if (
        GuestRam.isZeroPage(bytes, pageSize, pageSize) ||
        !GuestRam.isZeroPage(bytes, 0, pageSize) ||
        !GuestRam.isZeroPage(bytes, 2 * pageSize, pageSize)
      ) missed.push(i)
      bytes[pageSize + i] = 0
    }
    expect(missed).toEqual([])
    expect(GuestRam.isZeroPage(bytes, pageSize, pageSize)).toBe(true)
  })

  it("the shared zero page stays zero", () => {
    const z = GuestRam.zeroPage(4096)
    expect(z.length).toBe(4096)
    expect(z.every((b) => b === 0)).toBe(true)
    expect(GuestRam.zeroPage(4096)).toBe(z)
  })
})

describe("digest", () => {
  it.effect("equal contents give equal digests; one differing byte changes it", () =>
    Effect.gen(function*() {
      const a = new Uint8Array(16 * 4096)
      Crypto.randomFillSync(a)
      const b = Uint8Array.from(a)
      const ramA = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: a }, { name: "zero", size: 4096 }] })
      const ramB = yield* GuestRam.make({ blocks: [{ name: "mem", bytes: b }, { name: "zero", size: 4096 }] })
      const da = yield* GuestRam.digest(ramA)
      const db = yield* GuestRam.digest(ramB)
      expect(da).toEqual(db)
      expect(da.map((d) => d.name)).toEqual(["mem", "zero"])
      expect(da[0]!.digest).toMatch(/^[0-9a-f]{64}$/)
      expect(da[0]!.digest).toBe(yield* referenceDigest(a))
      expect(da[1]!.digest).toBe(yield* referenceDigest(new Uint8Array(4096)))
      for (const at of [0, 12345, b.length - 1]) {
        b[at] = b[at]! ^ 1
        const changed = yield* GuestRam.digest(ramB)
        expect(changed[0]!.digest).not.toBe(da[0]!.digest)
        expect(changed[1]!.digest).toBe(da[1]!.digest)
        b[at] = b[at]! ^ 1
      }
      expect(yield* GuestRam.digest(ramB)).toEqual(da)
    }))

  it.effect("digests a block larger than one 64 MiB chunk", () =>
    Effect.gen(function*() {
      const size = 65 * 1024 * 1024 + 3 * 4096
      expect(size).toBeGreaterThan(GuestRam.DIGEST_CHUNK)
      const bytes = new Uint8Array(size)
      for (let i = 0; i < size; i += 4093) bytes[i] = i & 0xff
      const ram = yield* GuestRam.make({ blocks: [{ name: "big", bytes }] })
      const [first] = yield* GuestRam.digest(ram)
      expect(first!.digest).toBe(yield* referenceDigest(bytes))
      // not simply the flat SHA-256 of the block
      expect(first!.digest).not.toBe(sha256(bytes).toString("hex"))
      // a change in the second chunk only is seen
      bytes[size - 1] = bytes[size - 1]! ^ 0xff
      const [second] = yield* GuestRam.digest(ram)
      expect(second!.digest).not.toBe(first!.digest)
      expect(second!.digest).toBe(yield* referenceDigest(bytes))
    }))
})

describe("writes from plain JavaScript that no compiler checked", () => {
  /** 4 pages of a given buffer, each page's first byte its number. */
  const fourPages = () => {
    const bytes = new Uint8Array(new ArrayBuffer(4 * 4096))
    for (let page = 0; page < 4; page++) bytes[page * 4096] = page + 1
    return bytes
  }

  it.effect("write of data that is no Uint8Array (a string, null): WriteBlocked NotBytes, nothing written, nothing dirty", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "ram", bytes: fourPages() }] })
      for (const [data, shown] of [["hello", "string"], [null, "null"], [[1, 2, 3], "object"]] as const) {
        const exit = yield* Effect.exit(Effect.suspend(() => GuestRam.write(ram, "ram", 0, data as unknown as Uint8Array)))
        const error = failureOf(exit)
        expect(error).toMatchObject({
          _tag: "WriteBlocked",
          reason: "NotBytes",
          message: `a write to block "ram" of data that is not a Uint8Array (${shown})`
        })
      }
      expect(ram.blocks[0]!.bytes[0]).toBe(1)
      expect(GuestRam.dirtyPages(ram)).toBe(0)
    }))

  it.effect("update with a callback that is no function: WriteBlocked BadCallback, not a defect", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "ram", bytes: fourPages() }] })
      const error = failureOf(yield* Effect.exit(GuestRam.update(ram, "ram", 0, 8, "fill" as unknown as (view: Buffer) => void)))
      expect(error).toMatchObject({ reason: "BadCallback", message: `the callback of an update of block "ram" is not a function` })
    }))

  it.effect("update with an async callback: WriteBlocked BadCallback at once (its later writes would go past the gate); the pages are dirty", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "ram", bytes: fourPages() }] })
      const error = failureOf(yield* Effect.exit(GuestRam.update(ram, "ram", 4096, 8, async (view) => {
        view[0] = 9
      })))
      expect(error).toMatchObject({ _tag: "WriteBlocked", reason: "BadCallback" })
      expect(error.message).toContain(`the callback of an update of block "ram" returned a Promise: it must write synchronously`)
      expect(GuestRam.dirtyPages(ram)).toBe(1)
    }))

  it.effect("a write to memory whose ArrayBuffer was transferred away: WriteBlocked Detached, saying so (not 'outside block (0 bytes)')", () =>
    Effect.gen(function*() {
      const bytes = fourPages()
      const ram = yield* GuestRam.make({ blocks: [{ name: "ram", bytes }] })
      structuredClone(bytes.buffer, { transfer: [bytes.buffer] })
      const error = failureOf(yield* Effect.exit(GuestRam.write(ram, "ram", 0, new Uint8Array(2))))
      expect(error).toMatchObject({
        _tag: "WriteBlocked",
        reason: "Detached",
        message: `the memory of block "ram" is no longer there (0 of its 16384 bytes): its ArrayBuffer was detached (transferred) or resized since GuestRam.make`
      })
    }))
})

describe("GuestRam.make from plain JavaScript", () => {
  const cases: ReadonlyArray<readonly [string, unknown, string, string]> = [
    ["options of null", null, "NoBlocks", "the options must be { pageSize?, blocks: [...] }, with blocks an array"],
    ["blocks of null", { blocks: null }, "NoBlocks", "the options must be { pageSize?, blocks: [...] }, with blocks an array"],
    ["a block name that is a number", { blocks: [{ name: 5, size: 4096 }] }, "BadBlockName", "block 0 is not { name, size } or { name, bytes } with a string name"],
    ["a block that is null", { blocks: [null] }, "BadBlockName", "block 0 is not { name, size } or { name, bytes } with a string name"],
    ["a size that is a string", { blocks: [{ name: "a", size: "4096" }] }, "BadBlockSize", `block "a": size "4096" is not a number`],
    ["bytes that are a string", { blocks: [{ name: "a", bytes: "x" }] }, "BadBlockSize", `block "a": bytes must be a Uint8Array, not string`],
    [
      "a page size that is a string",
      { pageSize: "4096", blocks: [{ name: "a", size: 4096 }] },
      "BadPageSize",
      `page size "4096" is not a power of two between 512 and 524288`
    ]
  ]
  for (const [name, options, reason, detail] of cases) {
    it.effect(`${name}: GuestRamError ${reason} saying so, not a defect`, () =>
      Effect.gen(function*() {
        const error = failureOf(yield* Effect.exit(Effect.suspend(() => GuestRam.make(options as Parameters<typeof GuestRam.make>[0]))))
        expect(error).toMatchObject({ _tag: "GuestRamError", reason, message: `invalid memory layout: ${detail}` })
      }))
  }
})

describe("a digester kept past its scope", () => {
  /**
   * `GuestRam.digester` starts threads that stop with its scope; a digest it returned, run after that (kept past the
   * scope: `Effect.scoped(GuestRam.digester(ram))`), waited for ever for the answers of threads that were gone. It
   * now hashes on the calling thread, with a warning, and gives the digest `GuestRam.digest` gives.
   */
  it.live("its digest, run after the scope closed, hashes here and equals GuestRam.digest (no hang)", () =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "a", size: 2 * GuestRam.DIGEST_CHUNK }], prefault: false })
      ram.blocks[0]!.bytes[GuestRam.DIGEST_CHUNK + 5] = 7
      const digest = yield* Effect.scoped(GuestRam.digester(ram))
      const late = yield* noHang(digest, "the digest of a digester whose scope closed")
      expect(late).toEqual(yield* GuestRam.digest(ram))
    }))
})
