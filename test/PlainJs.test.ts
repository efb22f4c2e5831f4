/**
 * A careless library user: a caller from plain JavaScript, with no compiler to check what it passes, gives options of
 * the wrong type or shape (an address object of another `_tag`, a URI string, an empty host, `null` where an object
 * goes, a string where a number goes, something that is no function where a callback goes). Each is a typed error
 * (`BadOptions`, a one-line message naming the option) before anything connects, listens or writes: never a defect
 * with a stack trace, never a connection to an address it guessed.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Logger from "effect/Logger"
import type * as Scope from "effect/Scope"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Bandwidth from "../src/Bandwidth.js"
import * as GuestRam from "../src/GuestRam.js"
import * as MappedRam from "../src/MappedRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationConfig from "../src/MigrationConfig.js"
import * as MigrationError from "../src/MigrationError.js"
import * as QemuIncoming from "../src/QemuIncoming.js"
import * as QemuOutgoing from "../src/QemuOutgoing.js"
import * as Snapshot from "../src/Snapshot.js"
import * as Tls from "../src/Tls.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { noHang } from "./support/guards.js"
import { leakFree } from "./support/handles.js"
import { mixedImage } from "./support/images.js"

const PAGE = 4096

/** 64 KiB of mixed random and zero pages. */
const sourceRam = () => GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(16, 0.6, PAGE) }] })

/** The real transport, counting the connects and listens asked of it. */
const counting = () => {
  const asked = { connects: 0, listens: 0 }
  const layer = Layer.succeed(Transport.Transport, {
    connect: (address, options) => Effect.suspend(() => (asked.connects++, Transport.connect(address, options))),
    listen: (address) => Effect.suspend(() => (asked.listens++, Transport.listen(address)))
  })
  return { asked, layer }
}

/** What a plain-JavaScript caller may pass as an address, and what it is told. */
const badAddresses: ReadonlyArray<readonly [string, unknown, string]> = [
  [
    "null",
    null,
    `the address null is not an address object ({ _tag: "Tcp", host, port }, { _tag: "Unix", path } or { _tag: "File", path }; Transport.parseAddress reads tcp:HOST:PORT)`
  ],
  [
    "a URI string",
    "tcp:127.0.0.1:1",
    `the address "tcp:127.0.0.1:1" is not an address object ({ _tag: "Tcp", host, port }, { _tag: "Unix", path } or { _tag: "File", path }; Transport.parseAddress reads tcp:HOST:PORT)`
  ],
  ["a _tag in lower case", { _tag: "tcp", host: "127.0.0.1", port: 1 }, `the address's _tag "tcp" is not Tcp, Unix or File`],
  ["no _tag", { host: "127.0.0.1", port: 1 }, `the address's _tag undefined is not Tcp, Unix or File`],
  ["an empty host", { _tag: "Tcp", host: "", port: 1 }, `the address's host "" is not a host name or IP address`],
  ["a host with a blank", { _tag: "Tcp", host: " 127.0.0.1", port: 1 }, `the address's host " 127.0.0.1" is not a host name or IP address`],
  ["a host of null", { _tag: "Tcp", host: null, port: 1 }, `the address's host null is not a host name or IP address`],
  ["a port that is a string", { _tag: "Tcp", host: "127.0.0.1", port: "1" }, `the address's port "1" is not a number`],
  ["no port", { _tag: "Tcp", host: "127.0.0.1" }, `the address's port undefined is not a number`],
  ["a Unix path of null", { _tag: "Unix", path: null }, `the address's path null is not a string`],
  ["a Unix path that is a number", { _tag: "Unix", path: 5 }, `the address's path 5 is not a string`],
  ["a file path of null", { _tag: "File", path: null }, `the address's path null is not a string`]
]

describe("an address that is none", () => {
  for (const [name, address, message] of badAddresses) {
    it.effect(`migrate to ${name}: BadOptions naming it, and no connect`, () =>
      Effect.gen(function*() {
        const ram = yield* sourceRam()
        const transport = counting()
        const exit = yield* Migration.migrate({ address: address as Transport.Address }).pipe(
          Effect.provide(transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram),
          Effect.exit
        )
        const error = failureOf(exit)
        expect(error).toBeInstanceOf(MigrationError.MigrationError)
        expect(error).toMatchObject({ reason: "BadOptions", message })
        expectOneLine(error)
        expect(transport.asked).toEqual({ connects: 0, listens: 0 })
      }))

    it.effect(`listenAndReceive at ${name}: BadOptions naming it, nothing listens, onListening never called`, () =>
      Effect.gen(function*() {
        const transport = counting()
        let told = false
        const exit = yield* Migration.listenAndReceive(address as Transport.Address, {
          onListening: () => Effect.sync(() => (told = true))
        }).pipe(Effect.provide(transport.layer), Effect.exit)
        expect(failureOf(exit)).toMatchObject({ _tag: "MigrationError", reason: "BadOptions", message })
        expect(transport.asked).toEqual({ connects: 0, listens: 0 })
        expect(told).toBe(false)
      }))

    it.scoped(`Transport.connect and listen of ${name}: a TransportError BadAddress, not a defect`, () =>
      Effect.gen(function*() {
        const attempts: ReadonlyArray<Effect.Effect<unknown, Transport.TransportError, Scope.Scope>> = [
          Transport.connect(address as Transport.Address),
          Transport.listen(address as Transport.Address)
        ]
        for (const attempt of attempts) {
          const error = failureOf(yield* Effect.exit(attempt))
          expect(error).toMatchObject({ _tag: "TransportError", reason: "BadAddress" })
          expect(error.message).toContain(message)
          expectOneLine(error)
        }
      }))
  }
})

describe("options of the wrong type", () => {
  const migrateCases: ReadonlyArray<readonly [string, Record<string, unknown>, string]> = [
    ["live: null", { live: null }, "live must be an object, not null"],
    ["reconnect: null", { reconnect: null }, "reconnect must be a number of attempts or { attempts, within }, not null"],
    ["reconnect: \"3\"", { reconnect: "3" }, `reconnect must be a number of attempts or { attempts, within }, not "3"`],
    ["timeouts: 5", { timeouts: 5 }, "timeouts must be an object, not 5"],
    [
      "maxBandwidth: \"100\"",
      { maxBandwidth: "100" },
      `a bandwidth limit must be a number of bytes per second >= 0 (0: none; else from 1 to 9007199254740991), not "100"`
    ],
    ["channels: \"4\"", { channels: "4" }, `channels must be between 1 and 255, not "4"`],
    ["live.maxRounds: \"3\"", { live: { maxRounds: "3" } }, `live.maxRounds must be a whole number of 0 or more, not "3"`],
    ["onProgress: a string", { onProgress: "log" }, `onProgress must be a function, not "log"`],
    ["upgrade: an object", { upgrade: {} }, "upgrade must be a function, not (an object)"],
    ["status: an object", { status: {} }, "status (an object) is not a MigrationStatus handle (MigrationStatus.make)"]
  ]
  for (const [name, options, message] of migrateCases) {
    it.effect(`migrate { ${name} }: BadOptions naming it, and no connect`, () =>
      Effect.gen(function*() {
        const ram = yield* sourceRam()
        const transport = counting()
        const exit = yield* Migration.migrate({ address: { _tag: "Tcp", host: "127.0.0.1", port: 1 }, ...options }).pipe(
          Effect.provide(transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram),
          Effect.exit
        )
        const error = failureOf(exit)
        expect(error).toMatchObject({ _tag: "MigrationError", reason: "BadOptions", message })
        expectOneLine(error)
        expect(transport.asked).toEqual({ connects: 0, listens: 0 })
      }))
  }

  it.effect("migrate of memory in context that is no GuestRam: BadOptions, and no connect", () =>
    Effect.gen(function*() {
      const transport = counting()
      const exit = yield* Migration.migrate({ address: { _tag: "Tcp", host: "127.0.0.1", port: 1 } }).pipe(
        Effect.provide(transport.layer),
        Effect.provideService(GuestRam.GuestRam, { blocks: [] } as unknown as GuestRam.GuestRam["Type"]),
        Effect.exit
      )
      expect(failureOf(exit)).toMatchObject({
        reason: "BadOptions",
        message: "the GuestRam in context is not a GuestRam (memory that GuestRam.make built)"
      })
      expect(transport.asked).toEqual({ connects: 0, listens: 0 })
    }))

  const incomingCases: ReadonlyArray<readonly [string, Record<string, unknown>, string]> = [
    ["expect: null", { expect: null }, "expect must be an object, not null"],
    ["ram: null", { ram: null }, "ram is not a GuestRam (memory that GuestRam.make built)"],
    ["ram: an object", { ram: { blocks: [] } }, "ram is not a GuestRam (memory that GuestRam.make built)"],
    ["admit: a string", { admit: "yes" }, `admit must be a function, not "yes"`],
    ["store: a string", { store: "/tmp/out" }, `store must be a function, not "/tmp/out"`],
    ["status: an object", { status: {} }, "status (an object) is not a MigrationStatus handle (MigrationStatus.make)"],
    ["maxRamBytes: \"100\"", { maxRamBytes: "100" }, `the memory limit maxRamBytes must be a number of bytes >= 0, not "100"`],
    ["timeouts: null", { timeouts: null }, "timeouts must be an object, not null"],
    ["onListening: a string", { onListening: "ready" }, `onListening must be a function, not "ready"`]
  ]
  for (const [name, options, message] of incomingCases) {
    it.effect(`listenAndReceive { ${name} }: BadOptions naming it before anything listens; from a file: too`, () =>
      Effect.gen(function*() {
        const transport = counting()
        const exit = yield* Migration.listenAndReceive({ _tag: "Tcp", host: "127.0.0.1", port: 0 }, options).pipe(
          Effect.provide(transport.layer),
          Effect.exit
        )
        const error = failureOf(exit)
        expect(error).toMatchObject({ _tag: "MigrationError", reason: "BadOptions", message })
        expectOneLine(error)
        expect(transport.asked).toEqual({ connects: 0, listens: 0 })
        if (name.startsWith("timeouts") || name.startsWith("onListening")) return // (a restore has no peer, nor listener)
        const fromFile = failureOf(yield* Effect.exit(Migration.listenAndReceive({ _tag: "File", path: "/nonexistent/snap" }, options).pipe(
          Effect.provide(transport.layer)
        )))
        expect(fromFile).toMatchObject({ message: expect.stringContaining(message.split(" (")[0]!) })
      }))
  }
})

describe("QEMU's side: options of the wrong type", () => {
  /**
   * QemuIncoming and QemuOutgoing checked their numbers and names but not the rest: memory given as `null` was a
   * defect ("Cannot read properties of null (reading 'blocks')") before anything listened, an `onListening` of a
   * string a defect once listening, callbacks that are no functions waited for QEMU to die on them, a VM or an
   * address of `null` a defect; `vm: "yes"` received no VM, a misspelt postcopy policy refused, in silence; a channel
   * count out of range was `Rejected`, as if QEMU had been refused. Each is now BadOptions naming it, before
   * anything listens or connects.
   */
  const incomingCases: ReadonlyArray<readonly [string, Record<string, unknown>, string]> = [
    ["channels: 256", { channels: 256 }, "multifd channels must be between 1 and 255, not 256"],
    ["ram: null", { ram: null }, "ram is not a GuestRam (memory that GuestRam.make built)"],
    ["admit: 5", { admit: 5 }, "admit must be a function, not 5"],
    ["onProgress: a string", { onProgress: "log" }, `onProgress must be a function, not "log"`],
    ["persist: a string", { persist: "/tmp/out" }, `persist must be a function, not "/tmp/out"`],
    ["upgrade: an object", { upgrade: {} }, "upgrade must be a function, not (an object)"],
    ["onListening: a string", { onListening: "ready" }, `onListening must be a function, not "ready"`],
    ["tls: null", { tls: null }, "tls must be an object, not null"],
    ["vm: \"yes\"", { vm: "yes" }, `vm must be true or false, not "yes"`],
    ["flushAfterEachSection: null", { flushAfterEachSection: null }, "flushAfterEachSection must be true or false, not null"],
    ["postcopyRam: \"Precopy\"", { postcopyRam: "Precopy" }, `postcopyRam "Precopy" is not refuse or precopy`]
  ]
  for (const [name, options, message] of incomingCases) {
    // (live: without the check, its accept timeout is what ends it)
    it.live(`QemuIncoming.listenAndReceive { ${name} }: BadOptions naming it before anything listens`, () =>
      Effect.gen(function*() {
        const transport = counting()
        const exit = yield* Effect.exit(QemuIncoming.listenAndReceive({ _tag: "Tcp", host: "127.0.0.1", port: 0 }, {
          channels: 2,
          acceptTimeout: "1 second",
          ...options
        } as QemuIncoming.Options).pipe(Effect.provide(transport.layer)))
        const error = failureOf(exit)
        expect(error).toMatchObject({ _tag: "MigrationError", reason: "BadOptions", message })
        expectOneLine(error)
        expect(transport.asked).toEqual({ connects: 0, listens: 0 })
      }))
  }

  it.effect("QemuIncoming.listenAndReceive with an async onListening: CallbackFailed saying so, not a defect", () =>
    Effect.gen(function*() {
      const onListening = (async () => {}) as unknown as (address: Transport.Address) => Effect.Effect<void>
      const exit = yield* Effect.exit(QemuIncoming.listenAndReceive({ _tag: "Tcp", host: "127.0.0.1", port: 0 }, {
        channels: 2,
        onListening
      }).pipe(Effect.provide(Transport.layer)))
      expect(failureOf(exit)).toMatchObject({
        _tag: "MigrationError",
        reason: "CallbackFailed",
        message: "onListening returned a Promise, not an Effect (an async function? wrap its work in Effect.promise)"
      })
    }))

  const outgoingCases: ReadonlyArray<readonly [string, Record<string, unknown>, string]> = [
    ["address: null", { address: null }, "the address null is not an address object"],
    ["vm: null", { vm: null }, "vm null is not a QEMU VM (QemuIncoming's vm, MappedRam.read or MappedRam.open)"],
    ["vm: an object", { vm: {} }, "vm (an object) is not a QEMU VM (QemuIncoming's vm, MappedRam.read or MappedRam.open)"],
    ["readPages: a string", { readPages: "x" }, `readPages must be a function, not "x"`],
    ["onProgress: 5", { onProgress: 5 }, "onProgress must be a function, not 5"],
    ["flushAfterEachSection: \"no\"", { flushAfterEachSection: "no" }, `flushAfterEachSection must be true or false, not "no"`],
    ["maxBandwidth: 1000", { maxBandwidth: 1000 }, "maxBandwidth 1000 is not a Bandwidth.Limit (Bandwidth.make)"]
  ]
  for (const [name, options, message] of outgoingCases) {
    it.effect(`QemuOutgoing.migrate { ${name} }: BadOptions naming it before anything connects`, () =>
      Effect.gen(function*() {
        const ram = yield* sourceRam()
        // a VM as QemuIncoming gives one (its device state need not be whole: the options are checked first)
        const vm = { configuration: undefined, ramSectionId: 2, ram, commands: [], deviceState: new Uint8Array(0) }
        const transport = counting()
        const exit = yield* Effect.exit(QemuOutgoing.migrate({
          address: { _tag: "Tcp", host: "127.0.0.1", port: 1 },
          channels: 2,
          vm,
          ...options
        } as QemuOutgoing.Options).pipe(Effect.provide(transport.layer)))
        const error = failureOf(exit)
        expect(error).toMatchObject({ _tag: "MigrationError", reason: "BadOptions", message: expect.stringContaining(message) })
        expectOneLine(error)
        expect(transport.asked).toEqual({ connects: 0, listens: 0 })
      }))
  }
})

describe("TLS settings from code of the wrong type", () => {
  /**
   * `Tls.make` / `Tls.layer` checked a config from the environment against the `TlsConfig` schema, but not one given
   * in code: a handshakeTimeoutMs of NaN or -5 was read as 0 (every handshake then timed out at once, "after 0"),
   * a verifyPeer of "yes" as true, an authz of "alice" (a string, not a list) or a psk of 5 died as the files were
   * read. Each is now a TlsError Config naming the field, before any file is read.
   */
  const psk = Path.join(import.meta.dirname, "fixtures", "tls", "keys.psk")
  const cases: ReadonlyArray<readonly [string, Record<string, unknown>, string]> = [
    ["handshakeTimeoutMs: NaN", { handshakeTimeoutMs: NaN }, "handshakeTimeoutMs: Expected a positive number, actual NaN (a number of milliseconds more than 0, at most 24 days)"],
    ["handshakeTimeoutMs: -5", { handshakeTimeoutMs: -5 }, "handshakeTimeoutMs: Expected a positive number, actual -5 (a number of milliseconds more than 0, at most 24 days)"],
    // (Infinity never timed a handshake out: no timer waits longer than 2^31 - 1 ms)
    ["handshakeTimeoutMs: Infinity", { handshakeTimeoutMs: Infinity }, "handshakeTimeoutMs: Expected a number less than or equal to 2147483647, actual Infinity (a number of milliseconds more than 0, at most 24 days)"],
    ["handshakeTimeoutMs: \"5000\"", { handshakeTimeoutMs: "5000" }, `handshakeTimeoutMs: Expected number, actual "5000" (a number of milliseconds more than 0, at most 24 days)`],
    ["verifyPeer: \"yes\"", { verifyPeer: "yes" }, `verifyPeer: Expected boolean, actual "yes"`],
    ["authz: \"alice\"", { authz: "alice" }, `authz: Expected ReadonlyArray<string>, actual "alice"`],
    ["identity: null", { identity: null }, "identity: Expected string, actual null"],
    ["psk: 5", { psk: 5 }, "psk: Expected string, actual 5"]
  ]
  for (const [name, config, message] of cases) {
    it.effect(`Tls.make { ${name} }: a TlsError Config naming it`, () =>
      Effect.gen(function*() {
        const error = failureOf(yield* Effect.exit(Tls.make({ psk, ...config } as Tls.TlsConfig)))
        expect(error).toMatchObject({ _tag: "TlsError", reason: "Config", message: `TLS configuration: ${message}` })
        expectOneLine(error)
      }))
  }
})

describe("a setting of null", () => {
  /**
   * From plain JavaScript (or a JSON setting that is none), a number or name given as `null` took the default in
   * silence (`channels: null` migrated on 2 channels, over MULTIFD_CHANNELS' 8 too), while `null` where an object,
   * a duration or a limit goes was BadOptions. `null` is now a value like any other: an error naming the option;
   * only an option left out (`undefined`) takes the default.
   */
  const migrateCases: ReadonlyArray<readonly [string, Record<string, unknown>, string]> = [
    ["channels: null", { channels: null }, "channels must be between 1 and 255, not null"],
    ["compression: null", { compression: null }, "compression null is not one of none, zlib, zstd"],
    ["zeroPage: null", { zeroPage: null }, "zero-page mode null is not multifd or none"],
    ["reconnect: { attempts: null }", { reconnect: { attempts: null } }, "reconnect attempts null is not a whole number from 0 to 1000"]
  ]
  for (const [name, options, message] of migrateCases) {
    it.effect(`migrate { ${name} }: BadOptions naming it, and no connect; with MigrationConfig in context too`, () =>
      Effect.gen(function*() {
        const ram = yield* sourceRam()
        for (const config of [false, true]) {
          const transport = counting()
          const attempt = Migration.migrate({ address: { _tag: "Tcp", host: "127.0.0.1", port: 1 }, ...options }).pipe(
            Effect.provide(transport.layer),
            Effect.provideService(GuestRam.GuestRam, ram)
          )
          // the settings in context are what an option left out takes, not one given as null
          const settings = MigrationConfig.layer({ channels: 8, compression: "zlib", zeroPage: "none", reconnect: 1 })
          const error = failureOf(yield* Effect.exit(config ? Effect.provide(attempt, settings) : attempt))
          expect(error).toMatchObject({ _tag: "MigrationError", reason: "BadOptions", message })
          expectOneLine(error)
          expect(transport.asked).toEqual({ connects: 0, listens: 0 })
        }
      }))
  }

  // `MigrationConfig.layer(null)` (plain JavaScript): every migration died inside resolve ("reading 'timeouts'")
  it.effect("settings in context that are no object (MigrationConfig.layer(null), a string): BadOptions naming them, and no connect", () =>
    Effect.gen(function*() {
      const ram = yield* sourceRam()
      for (const [settings, shown] of [[null, "null"], ["fast", "\"fast\""], [undefined, "undefined"]] as const) {
        const transport = counting()
        const attempt = Migration.migrate({ address: { _tag: "Tcp", host: "127.0.0.1", port: 1 } }).pipe(
          Effect.provide(transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram),
          Effect.provide(MigrationConfig.layer(settings as never))
        )
        const error = failureOf(yield* Effect.exit(attempt))
        expect(error).toMatchObject({
          _tag: "MigrationError",
          reason: "BadOptions",
          message: `the MigrationConfig in context must be an object, not ${shown}`
        })
        expect(transport.asked).toEqual({ connects: 0, listens: 0 })
      }
    }))

  it.effect("Snapshot.save { channels: null }, Snapshot.restore { readers: null }: errors naming them; no file made", () =>
    Effect.gen(function*() {
      const ram = yield* sourceRam()
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-null-setting-"))
      const path = Path.join(dir, "out.snap")
      const saved = failureOf(yield* Effect.exit(Snapshot.save(path, { channels: null as never }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram)
      )))
      expect(saved).toMatchObject({ _tag: "SnapshotError", message: `snapshot ${path}: channels must be between 1 and 255, not null` })
      expect(Fs.readdirSync(dir)).toEqual([])
      const restored = failureOf(yield* Effect.exit(Snapshot.restore(path, { readers: null as never })))
      expect(restored).toMatchObject({ _tag: "SnapshotError", message: `snapshot ${path}: readers must be between 1 and 255, not null` })
      Fs.rmSync(dir, { recursive: true, force: true })
    }))

  it.effect("GuestRam.make { pageSize: null }: BadPageSize naming it, not memory of 4 KiB pages", () =>
    Effect.gen(function*() {
      const error = failureOf(yield* Effect.exit(GuestRam.make({ pageSize: null as never, blocks: [{ name: "pc.ram", size: 65536 }] })))
      expect(error).toMatchObject({
        _tag: "GuestRamError",
        reason: "BadPageSize",
        message: "invalid memory layout: page size null is not a power of two between 512 and 524288"
      })
    }))

  it.effect("MappedRam.read { maxRamBytes: null }: Unsupported naming it, before the file is opened", () =>
    Effect.gen(function*() {
      const error = failureOf(yield* Effect.exit(MappedRam.read("/nonexistent/guest.vm", { maxRamBytes: null as never })))
      expect(error).toMatchObject({
        _tag: "MappedRamError",
        message: expect.stringContaining("the memory limit maxRamBytes must be a number of bytes >= 0, not null")
      })
    }))

  it.live("QemuIncoming { compression: null }: BadOptions naming it before anything listens", () =>
    Effect.gen(function*() {
      const transport = counting()
      const error = failureOf(yield* Effect.exit(QemuIncoming.listenAndReceive({ _tag: "Tcp", host: "127.0.0.1", port: 0 }, {
        channels: 2,
        compression: null as never,
        acceptTimeout: "1 second"
      }).pipe(Effect.provide(transport.layer))))
      expect(error).toMatchObject({ _tag: "MigrationError", reason: "BadOptions", message: "compression null is not one of none, zlib, zstd" })
      expect(transport.asked).toEqual({ connects: 0, listens: 0 })
    }))
})

describe("Snapshot.restore into memory that is none", () => {
  // `ram: null` (or an object that is no GuestRam) given to Snapshot.restore itself was a defect, "Cannot read
  // properties of null (reading 'blocks')" with a stack trace, before its own check of the options ran (through
  // listenAndReceive of a file: it was BadOptions already)
  for (const [name, ram] of [["null", null], ["an object", { blocks: [] }]] as const) {
    it.effect(`ram: ${name}: a SnapshotError naming it, not a defect; nothing read or written`, () =>
      Effect.gen(function*() {
        const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-restore-ram-"))
        const path = Path.join(dir, "in.snap")
        const exit = yield* Effect.exit(Snapshot.restore(path, { ram: ram as never }))
        const error = failureOf(exit)
        expect(error).toMatchObject({
          _tag: "SnapshotError",
          reason: "Unsupported",
          message: `snapshot ${path}: ram is not a GuestRam (memory that GuestRam.make built)`
        })
        expectOneLine(error)
        expect(Fs.readdirSync(dir)).toEqual([])
        Fs.rmSync(dir, { recursive: true, force: true })
      }))
  }
})

describe("options of null as a whole", () => {
  // each was a defect ("Cannot read properties of null (reading 'address')"); Snapshot.restore and MappedRam.read
  // threw as they were called, before any Effect ran
  it.effect("every entry point: a typed error saying so, before anything connects, listens or writes", () =>
    Effect.gen(function*() {
      const ram = yield* sourceRam()
      const transport = counting()
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-null-options-"))
      const tcp: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }
      const N = null as never
      const optional = "the options must be an object (or left out), not null"
      const required = "the options must be an object, not null"
      const cases: ReadonlyArray<readonly [string, Effect.Effect<unknown, unknown, Transport.Transport | GuestRam.GuestRam>, object]> = [
        ["Migration.migrate", Migration.migrate(N), { _tag: "MigrationError", reason: "BadOptions", message: required }],
        ["Migration.listenAndReceive", Migration.listenAndReceive(tcp, N), { _tag: "MigrationError", reason: "BadOptions", message: optional }],
        [
          "Migration.listenAndReceive of a file:",
          Migration.listenAndReceive({ _tag: "File", path: Path.join(dir, "in.snap") }, N),
          { _tag: "MigrationError", reason: "BadOptions", message: optional }
        ],
        ["Snapshot.save", Snapshot.save(Path.join(dir, "out.snap"), N), { _tag: "MigrationError", reason: "BadOptions", message: optional }],
        [
          "Snapshot.restore",
          Snapshot.restore(Path.join(dir, "in.snap"), N),
          { _tag: "SnapshotError", reason: "Unsupported", message: `snapshot ${Path.join(dir, "in.snap")}: ${optional}` }
        ],
        ["QemuIncoming.listenAndReceive", QemuIncoming.listenAndReceive(tcp, N), { _tag: "MigrationError", reason: "BadOptions", message: required }],
        ["QemuOutgoing.migrate", QemuOutgoing.migrate(N), { _tag: "MigrationError", reason: "BadOptions", message: required }],
        [
          "MappedRam.read",
          MappedRam.read(Path.join(dir, "in.vm"), N),
          { _tag: "MappedRamError", reason: "Unsupported", message: `${Path.join(dir, "in.vm")}: ${optional}` }
        ],
        [
          "Tls.make",
          Tls.make(N),
          { _tag: "TlsError", reason: "Config", message: "TLS configuration: must be an object ({ psk }, or { ca, cert, key, ... }), not null" }
        ]
      ]
      for (const [name, attempt, expected] of cases) {
        const error = failureOf(yield* Effect.exit(Effect.scoped(attempt)).pipe(
          Effect.provide(transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram)
        ))
        expect({ name, error }).toMatchObject({ name, error: expected })
        expectOneLine(error as Error)
      }
      const listener = yield* Effect.scoped(Effect.gen(function*() {
        const listener = yield* Transport.listen(tcp)
        const attempts: ReadonlyArray<Effect.Effect<unknown, unknown>> = [Migration.incoming(listener, N), QemuIncoming.incoming(listener, N)]
        for (const attempt of attempts) {
          expect(failureOf(yield* Effect.exit(attempt))).toMatchObject({ reason: "BadOptions" })
        }
        return listener
      }))
      expect(listener).toBeDefined()
      expect(transport.asked).toEqual({ connects: 0, listens: 0 })
      expect(Fs.readdirSync(dir)).toEqual([])
      Fs.rmSync(dir, { recursive: true, force: true })
    }))
})

describe("callbacks that return no Effect, throw, die or fail", () => {
  const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
  const quiet = <A, E, R>(self: Effect.Effect<A, E, R>) => Effect.provide(self, Logger.replace(Logger.defaultLogger, Logger.none))

  /** A migration of 1 MiB over loopback with these options on each side: both exits. */
  const both = (source: Partial<Migration.MigrateOptions>, destination: Migration.IncomingOptions<unknown>) =>
    Effect.gen(function*() {
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(256, 0.6, PAGE) }] })
      const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
      const receiving = yield* Effect.forkScoped(quiet(Migration.incoming(listener, { timeouts: TIMEOUTS, ...destination })))
      const sent = yield* noHang(
        Effect.exit(Migration.migrate({ address: listener.address, timeouts: TIMEOUTS, ...source }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram)
        )),
        "migrate"
      )
      const received = yield* noHang(Fiber.await(receiving), "incoming")
      return { sent, received }
    })

  const sourceReports: ReadonlyArray<readonly [string, (progress: Migration.Progress) => unknown, string]> = [
    [
      "an async function (a Promise)",
      async () => {},
      "the progress report (onProgress) returned a Promise, not an Effect (an async function? wrap its work in Effect.promise)"
    ],
    ["a function that returns nothing", () => undefined, "the progress report (onProgress) returned undefined, not an Effect"],
    ["a function that throws", () => {
      throw new Error("no console here")
    }, "the progress report (onProgress) threw: no console here"],
    ["an Effect that dies", () => Effect.die(new Error("a bug")), "the progress report (onProgress) died: a bug"]
  ]
  for (const [name, onProgress, message] of sourceReports) {
    it.live(`the source's onProgress is ${name}: CallbackFailed naming it, no defect; the destination hears why; nothing left open`, () =>
      leakFree(Effect.gen(function*() {
        const { received, sent } = yield* both({ onProgress: onProgress as Migration.MigrateOptions["onProgress"] }, {})
        const error = failureOf(sent)
        expect(error).toMatchObject({ _tag: "MigrationError", reason: "CallbackFailed", message })
        expectOneLine(error as MigrationError.MigrationError)
        expect((failureOf(received) as { message: string }).message).toBe(`the source aborted the migration: ${message}`)
      })))
  }

  it.live("an async store step (a Promise): incoming fails CallbackFailed saying so, the source that it was not stored", () =>
    leakFree(Effect.gen(function*() {
      const store = (async () => {}) as unknown as Migration.IncomingOptions<unknown>["store"]
      const { received, sent } = yield* both({}, { store })
      const message = "the store step (store) returned a Promise, not an Effect (an async function? wrap its work in Effect.promise)"
      expect(failureOf(received)).toMatchObject({ _tag: "MigrationError", reason: "CallbackFailed", message })
      expect(failureOf(sent)).toMatchObject({
        reason: "Aborted",
        message: `the destination could not store the image: ${message}`
      })
    })))

  it.live("an admit check that returns no reason (a number, an Effect): both sides Rejected saying what it returned", () =>
    leakFree(Effect.gen(function*() {
      for (const [answer, shown] of [[5, "5"], [Effect.succeed("too big"), "(an object)"]] as const) {
        const admit = (() => answer) as unknown as Migration.IncomingOptions<unknown>["admit"]
        const { received, sent } = yield* Effect.scoped(both({}, { admit }))
        const reason = `its admit check returned ${shown}, not a reason (a string) or undefined`
        expect(failureOf(received)).toMatchObject({ reason: "Rejected", message: `refused the migration: ${reason}` })
        expect(failureOf(sent)).toMatchObject({ reason: "Rejected", message: `the destination refused the migration: ${reason}` })
      }
    })))
})

describe("an application that writes memory while a migration is received into it", () => {
  /**
   * `incoming` into memory given whose gate was open: the application's write (GuestRam.write) went through while the
   * source's pages were arriving, and was lost under them in silence (written before the page came; a write after a
   * page came failed the migration DigestMismatch on both sides, blaming the transfer). Its writers now wait while the
   * migration writes and verifies the memory (its gate closed, unless it was already), as a restore's do, and go on
   * after it, on the received memory.
   */
  it.live("a write made once the source was admitted waits, and lands on the received memory; the migration succeeds", () =>
    leakFree(Effect.gen(function*() {
      const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const
      const image = mixedImage(256, 0.6, PAGE)
      const source = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: image }] })
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", size: image.length }] })
      const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
      let admitted!: () => void
      const admission = new Promise<void>((resolve) => (admitted = resolve))
      const marker = Buffer.alloc(8, 0xab)
      // the application writes page 0 as soon as the source is admitted (before its pages can arrive)
      const writer = yield* Effect.forkScoped(
        Effect.zipRight(Effect.promise(() => admission), GuestRam.write(ram, "pc.ram", 0, marker))
      )
      const receiving = yield* Effect.forkScoped(Migration.incoming(listener, {
        ram,
        timeouts: TIMEOUTS,
        admit: () => (admitted(), undefined)
      }))
      yield* noHang(
        Migration.migrate({ address: listener.address, timeouts: TIMEOUTS }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, source)
        ),
        "migrate"
      )
      yield* noHang(Fiber.join(receiving), "incoming")
      yield* noHang(Fiber.join(writer), "the application's write")
      // the received memory, with the application's write on top of it
      const expected = Buffer.from(image)
      marker.copy(expected, 0)
      expect(ram.blocks[0]!.bytes.equals(expected)).toBe(true)
      // and the gate is open again: a write goes through at once
      yield* noHang(GuestRam.write(ram, "pc.ram", PAGE, marker), "a write after the migration")
    })))
})

describe("listenAndReceive's onListening that returns no Effect", () => {
  it.live("an async onListening (a Promise): CallbackFailed saying so, not a defect; nothing left listening", () =>
    leakFree(Effect.gen(function*() {
      let told = 0
      const onListening = (async () => {
        told++
      }) as unknown as (address: Transport.Address) => Effect.Effect<void>
      const exit = yield* Effect.exit(Migration.listenAndReceive({ _tag: "Tcp", host: "127.0.0.1", port: 0 }, { onListening }).pipe(
        Effect.provide(Transport.layer)
      ))
      expect(failureOf(exit)).toMatchObject({
        _tag: "MigrationError",
        reason: "CallbackFailed",
        message: "onListening returned a Promise, not an Effect (an async function? wrap its work in Effect.promise)"
      })
      expect(told).toBe(1)
    })))
})

describe("a destination's progress report that never returns", () => {
  /**
   * The destination's last report (counting every page) runs once the source was told Done, as its scope closes,
   * uninterruptibly: one that never returned held `incoming` for good after the source had succeeded, deaf to any
   * interruption (its scope could not close). It is now given the peer timeout, then logged and left behind.
   */
  it.live("its last report: incoming returns once the peer timeout passed (the source succeeded); nothing left open", () =>
    leakFree(Effect.gen(function*() {
      const peer = { connect: "2 seconds", handshake: "2 seconds", peer: "1 second" } as const
      const ram = yield* GuestRam.make({ blocks: [{ name: "pc.ram", bytes: mixedImage(64, 0.6, PAGE) }] })
      const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
      const receiving = yield* Effect.forkScoped(Effect.provide(
        Migration.incoming(listener, {
          timeouts: peer,
          onProgress: (p) => p.doneBytes === p.totalBytes ? Effect.never : Effect.void
        }),
        Logger.replace(Logger.defaultLogger, Logger.none)
      ))
      yield* noHang(
        Migration.migrate({ address: listener.address, timeouts: peer }).pipe(
          Effect.provide(Transport.layer),
          Effect.provideService(GuestRam.GuestRam, ram)
        ),
        "migrate"
      )
      const received = yield* noHang(Fiber.join(receiving), "incoming")
      expect(received.ram.blocks[0]!.bytes.equals(ram.blocks[0]!.bytes)).toBe(true)
    })))
})

describe("values of the wrong kind where a function takes a listener, TLS settings, a VM, a path or a text", () => {
  // each threw as the function was called ("Cannot read properties of undefined (reading 'address')", "uri.startsWith
  // is not a function") or died inside its Effect ("Not a valid effect: undefined", "Invalid value used in weak set")
  it.effect("a typed error in one line naming what is wrong, not a throw or a defect", () =>
    Effect.gen(function*() {
      const N = null as never
      const cases: ReadonlyArray<readonly [string, () => Effect.Effect<unknown, unknown, Transport.Transport | Scope.Scope>, object]> = [
        ["Migration.incoming(undefined)", () => Migration.incoming(undefined as never), {
          _tag: "MigrationError",
          reason: "BadOptions",
          message: "the listener undefined is not a Transport.Listener (what transport.listen gives)"
        }],
        ["Migration.incoming({})", () => Migration.incoming({} as never), { _tag: "MigrationError", reason: "BadOptions" }],
        ["QemuIncoming.incoming(null)", () => QemuIncoming.incoming(N, { channels: 1 }), {
          _tag: "MigrationError",
          reason: "BadOptions",
          message: "the listener null is not a Transport.Listener (what transport.listen gives)"
        }],
        // a TlsConfig given where the settings it loads to are taken
        ["Tls.checkClient(a TlsConfig)", () => Tls.checkClient({ psk: "keys.psk" } as never), {
          _tag: "TlsError",
          reason: "Config",
          message: "TLS configuration: checkClient takes the settings Tls.load gives (yield* Tls.load(config)), not (an object)"
        }],
        ["Tls.checkServer(null)", () => Tls.checkServer(N), { _tag: "TlsError", reason: "Config" }],
        ["Tls.parsePskFile(a Buffer)", () => Tls.parsePskFile(Buffer.from("qemu:00") as never), { _tag: "TlsError", reason: "Config" }],
        ["MappedRam.open(null)", () => MappedRam.open(N), {
          _tag: "MappedRamError",
          reason: "Unusable",
          message: "mapped-ram file: the path null is not a string"
        }],
        ["MappedRam.read(5)", () => MappedRam.read(5 as never), { _tag: "MappedRamError", reason: "Unusable" }],
        // memory that no GuestRam.make built: each threw as it was called or died
        ["GuestRam.digest(null)", () => GuestRam.digest(N), {
          _tag: "GuestRamError",
          reason: "NotGuestRam",
          message: "GuestRam.digest: the memory null is not a GuestRam (memory that GuestRam.make built)"
        }],
        ["GuestRam.digester(null)", () => Effect.flatten(GuestRam.digester(N)), { _tag: "GuestRamError", reason: "NotGuestRam" }],
        ["GuestRam.write(null, ...)", () => GuestRam.write(N, "pc.ram", 0, new Uint8Array(1)), {
          _tag: "WriteBlocked",
          reason: "NotGuestRam",
          message: `a write to block "pc.ram": the memory null is not a GuestRam (memory that GuestRam.make built)`
        }],
        // TLS settings that Tls.load did not make, in each handshake's constructor
        ["Tls.client(null, host)", () => Tls.client(N, "localhost")(N, "main"), {
          _tag: "TlsError",
          reason: "Config",
          message: "TLS configuration: client takes the settings Tls.load gives (yield* Tls.load(config)), not null"
        }],
        ["Tls.server(null)", () => Tls.server(N)(N, "main"), { _tag: "TlsError", reason: "Config" }],
        ["Tls.clientFromData(null)", () => Tls.clientFromData(N), {
          _tag: "TlsError",
          reason: "Config",
          message: "TLS configuration: clientFromData takes what Tls.clientData gives, not null"
        }],
        ["MappedRam.write(path, null)", () => MappedRam.write("/nonexistent/guest.vm", N), {
          _tag: "MappedRamError",
          reason: "Unsupported",
          message: "/nonexistent/guest.vm: the VM null is not a QemuVm (what QemuIncoming, MappedRam.read or open give)"
        }]
      ]
      for (const [name, attempt, expected] of cases) {
        const error = failureOf(yield* Effect.exit(Effect.scoped(Effect.suspend(attempt))).pipe(Effect.provide(Transport.layer)))
        expect({ name, error }).toMatchObject({ name, error: expected })
        expectOneLine(error as Error)
      }
      // the parsers of texts: a Left, not a throw
      expect(Transport.parseAddress(5 as never)).toMatchObject({ _tag: "Left", left: { reason: "BadAddress", message: "5: a uri must be a string" } })
      expect(Bandwidth.parse(100 as never)).toMatchObject({ _tag: "Left" })
      expect(MigrationConfig.parseDuration(30 as never)).toMatchObject({ _tag: "Left" })
      expect(MigrationConfig.parseSize(N)).toMatchObject({ _tag: "Left" })
      // parseAuthz gives an array: a value that is no text throws a TlsError, as Schema's decodeSync throws its own
      expect(() => Tls.parseAuthz(N)).toThrow(expect.objectContaining({
        _tag: "TlsError",
        reason: "Config",
        message: "TLS configuration: parseAuthz takes a text (alice,bob), not null"
      }))
    }))
})
