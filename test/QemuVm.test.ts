/**
 * Whole VMs between real QEMUs and effect-multifd, both ways: a guest that keeps running (`-machine pc` with
 * the counter BIOS of test/support/guest.ts, 32 MiB of RAM from an image) migrates from QEMU to `recv
 * --from-qemu --vm` (a QEMU mapped-ram file), then with `send --to-qemu` into a fresh QEMU (`-incoming`,
 * multifd), which resumes it: it runs, its counter moves, and its RAM outside the counter's page equals the
 * source's. The same through QEMU's own mapped-ram file (QEMU writes it, we send it; we write it, QEMU loads it),
 * with compression none, zlib and zstd, over PSK TLS, on 1, 4 and 8 channels (each dimension covered, not the
 * cross product), with capability return-path on the source and with QEMU without multifd (`--channels 0`).
 * Failures — QEMU refuses (another machine; another RAM size, when it says SHUT 1; another multifd-compression or
 * fewer multifd-channels, when it closes channels and keeps the main one), QEMU killed on either side — end with
 * one line and no file left.
 *
 * Skipped, with the reason in the test name, when QEMU 10 is not installed (`.ci/install-qemu.sh` installs it).
 */
import { describe, expect, it } from "@effect/vitest"
import * as NodeContext from "@effect/platform-node/NodeContext"
import * as Console from "effect/Console"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Logger from "effect/Logger"
import * as Ref from "effect/Ref"
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Zlib from "node:zlib"
import { afterAll, beforeAll } from "vitest"
import * as Cli from "../src/cli/command.js"
import * as MappedRam from "../src/MappedRam.js"
import * as QemuIncoming from "../src/QemuIncoming.js"
import * as QemuOutgoing from "../src/QemuOutgoing.js"
import * as QemuVm from "../src/QemuVm.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import * as Guest from "./support/guest.js"
import { noHang } from "./support/guards.js"
import { mountTmpfs } from "./support/files.js"
import { expectNoLeaks } from "./support/handles.js"
import * as Qemu from "./support/qemu.js"

const PAGE = 4096
const MIB = 1024 * 1024
const SIZE = 32 * MIB

const qemu = Qemu.probe()
const missing = "missing" in qemu ? qemu.missing : undefined
const skipReason = missing === undefined ? "" : ` (skipped: ${missing})`

const roomy = (path: string) => {
  try {
    const s = Fs.statfsSync(path)
    return s.bavail * s.bsize > 1024 * MIB
  } catch {
    return false
  }
}
const dir = Fs.mkdtempSync(Path.join(roomy("/dev/shm") ? "/dev/shm" : Os.tmpdir(), "emfd-vm-"))
afterAll(() => Fs.rmSync(dir, { recursive: true, force: true }))

// the command's progress looks at stderr: Node opens its handle on first use, not a leak of a test's
void process.stderr.isTTY
void process.stdout.isTTY

const BIOS = Guest.writeCounterBios(Path.join(dir, "counter-bios.bin"))
const fixtureTls = (name: string) => Path.join(import.meta.dirname, "fixtures", "tls", name)

/** The guest's RAM image: random pages, a fifth of them zero (made once). */
const IMAGE = (() => {
  const bytes = Buffer.alloc(SIZE)
  for (let page = 0; page < SIZE / PAGE; page++) if (page % 5 !== 0) Crypto.randomFillSync(bytes, page * PAGE, PAGE)
  const path = Path.join(dir, "guest.img")
  Fs.writeFileSync(path, bytes)
  return { path, bytes }
})()

let files = 0
const fresh = (name: string) => Path.join(dir, `${++files}-${name}`)

/** Files in the scratch directory whose name contains `part` (a VM file, or a temporary file beside one). */
const leftovers = (part: string) => Fs.readdirSync(dir).filter((f) => f.includes(part))

// ---------------------------------------------------------------------------------------------------------
// QEMUs

/** A running guest whose counter is seen moving. */
const guest = (extraArgs: ReadonlyArray<string> = [], machine?: string) =>
  Effect.gen(function*() {
    const src = yield* Qemu.startGuest(IMAGE.path, SIZE, BIOS, { extraArgs, machine })
    yield* counterMoves(src.qmp)
    return src
  })

/** Waits (up to 10 s) until the guest's counter changes: its CPU runs the loop. */
const counterMoves = (qmp: Qemu.Qmp) =>
  Effect.gen(function*() {
    const first = yield* Qemu.readGuestWord(qmp, Guest.COUNTER_ADDRESS)
    while ((yield* Qemu.readGuestWord(qmp, Guest.COUNTER_ADDRESS)) === first) yield* Effect.sleep("20 millis")
  }).pipe(Effect.timeoutFail({ duration: "10 seconds", onTimeout: () => new Error("the guest's counter does not move") }))

/** A fresh destination for the guest, its migration set up; its uri (the real port) and RAM file. */
const destination = (
  settings: Omit<Qemu.IncomingSettings, "uri"> & { readonly uri?: string | undefined },
  options: {
    readonly machine?: string | undefined
    readonly extraArgs?: ReadonlyArray<string> | undefined
    /** Its RAM (default the guest's, SIZE). */
    readonly size?: number | undefined
  } = {}
) =>
  Effect.gen(function*() {
    const memPath = fresh("dst-ram.img")
    const size = options.size ?? SIZE
    Fs.writeFileSync(memPath, "")
    Fs.truncateSync(memPath, size)
    const dst = yield* Qemu.startGuestDestination(memPath, size, BIOS, options)
    const uri = yield* Qemu.incoming(dst.qmp, { ...settings, uri: settings.uri ?? "tcp:127.0.0.1:0" })
    return { ...dst, uri, memPath }
  })

/**
 * The destination resumed the guest: its migration completed, it runs, the counter moves, and its RAM equals
 * the source's image outside the counter's page (which the guest writes).
 */
const expectResumed = (dst: { readonly qmp: Qemu.Qmp; readonly memPath: string }) =>
  Effect.gen(function*() {
    expect(yield* Qemu.waitDone(dst.qmp, "30 seconds")).toBe("completed")
    expect(yield* Qemu.runState(dst.qmp)).toBe("running")
    yield* counterMoves(dst.qmp)
    expectSameRam(Fs.readFileSync(dst.memPath))
  })

/** RAM equal to the image, but for the counter's page. */
const expectSameRam = (ram: Uint8Array) => {
  const mine = Buffer.from(ram.buffer, ram.byteOffset, ram.length)
  expect(mine.length).toBe(SIZE)
  const differs: Array<number> = []
  for (let page = 0; page < SIZE / PAGE && differs.length < 5; page++) {
    if (page === Guest.counterPage(PAGE)) continue
    if (mine.compare(IMAGE.bytes, page * PAGE, (page + 1) * PAGE, page * PAGE, (page + 1) * PAGE) !== 0) differs.push(page)
  }
  expect(differs).toEqual([])
}

// ---------------------------------------------------------------------------------------------------------
// our side: the library, and the command line in this process

/** A console that prints nothing. */
const quietConsole: Console.Console = new Proxy({} as Console.Console, {
  get: (_, key) => key === Console.TypeId ? Console.TypeId : key === "unsafe" ? new Proxy({}, { get: () => () => {} }) : () => Effect.void
})

const silent = <A, E, R>(self: Effect.Effect<A, E, R>) => Effect.provide(self, Logger.replace(Logger.defaultLogger, Logger.none))

/** `multifd <args>` in this process: its exit code, stdout and stderr lines; the listening line's uri to `bound`. */
const cli = (args: ReadonlyArray<string>, bound?: Deferred.Deferred<string>) =>
  Effect.gen(function*() {
    const stdout: Array<string> = []
    const stderr: Array<string> = []
    const console = new Proxy({} as Console.Console, {
      get: (_, key) =>
        key === "error"
          ? (...parts: ReadonlyArray<unknown>) =>
            Effect.suspend(() => {
              const line = parts.join(" ")
              stderr.push(line)
              const m = /^multifd: listening on (\S+)$/.exec(line)
              return m === null || bound === undefined ? Effect.void : Deferred.succeed(bound, m[1]!)
            })
          : key === "log"
          ? (...parts: ReadonlyArray<unknown>) => Effect.sync(() => void stdout.push(parts.join(" ")))
          : Reflect.get(quietConsole, key)
    })
    const code = yield* Cli.main(["node", "multifd", ...args]).pipe(
      Effect.provide(NodeContext.layer),
      silent,
      Effect.withConsole(console)
    )
    return { code, stdout, stderr: stderr.filter((l) => !l.startsWith("multifd: listening on ")) }
  })

/** `recv tcp:127.0.0.1:0 --from-qemu ... <flags>` in a fiber, once it listens: the fiber and its uri. */
const recvCli = (flags: ReadonlyArray<string>) =>
  Effect.gen(function*() {
    const bound = yield* Deferred.make<string>()
    const fiber = yield* Effect.forkScoped(cli(["recv", "tcp:127.0.0.1:0", "--from-qemu", ...flags], bound))
    const uri = yield* Effect.raceFirst(Deferred.await(bound), Effect.flatMap(Fiber.join(fiber), (r) => Effect.dieMessage(r.stderr.join("\n"))))
    return { fiber, uri }
  })

/** QemuIncoming keeping the whole VM, on a fresh loopback port, in a fiber. */
const incomingVm = (options: Omit<QemuIncoming.Options, "vm">) =>
  Effect.gen(function*() {
    const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
    const fiber = yield* Effect.forkScoped(silent(QemuIncoming.incoming(listener, { timeouts: { peer: "20 seconds" }, ...options, vm: true })))
    const address = listener.address
    return { fiber, uri: address._tag === "Tcp" ? `tcp:127.0.0.1:${address.port}` : "" }
  })

const address = (uri: string): Transport.Address => {
  const parsed = Transport.parseAddress(uri)
  if (parsed._tag === "Left") throw parsed.left
  return parsed.right
}

/** The guest migrates from `src` to `uri` (multifd with `channels`, 0: without) and QEMU says completed. */
const migrateGuest = (src: Qemu.QemuSource, uri: string, settings: Omit<Qemu.MigrateSettings, "uri">) =>
  Effect.gen(function*() {
    yield* Qemu.migrate(src.qmp, { ...settings, uri })
    expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("completed")
    expect(yield* Qemu.runState(src.qmp)).toBe("postmigrate")
  })

/** A VM file of a real guest, received from QEMU over 2 plain channels and written as mapped-ram (`name`). */
/** Waits (20 s at most) until QEMU's migration under way has sent more than `bytes`; fails if it ended first. */
const sentAtLeast = (qmp: Qemu.Qmp, bytes: number) =>
  noHang(Effect.gen(function*() {
    while (true) {
      const info = (yield* qmp.execute("query-migrate")) as { status?: string; ram?: { transferred?: number } }
      if ((info.ram?.transferred ?? 0) > bytes) return
      if (info.status !== "setup" && info.status !== "active") throw new Error(`QEMU's migration is ${info.status}`)
      yield* Effect.sleep("50 millis")
    }
  }), `QEMU sending ${bytes / MIB} MiB`, 20)

const receivedVmFile = (name: string) =>
  Effect.gen(function*() {
    const src = yield* guest()
    const ours = yield* incomingVm({ channels: 2 })
    yield* migrateGuest(src, ours.uri, { channels: 2, compression: "none" })
    const vmFile = fresh(name)
    yield* MappedRam.write(vmFile, (yield* Fiber.join(ours.fiber)).vm!)
    return vmFile
  })

/** A VM file is sparse (zero pages are holes) and nothing temporary is left beside it. */
const expectVmFile = (path: string) => {
  const stat = Fs.statSync(path)
  expect(stat.blocks * 512).toBeLessThan(stat.size)
  expect(leftovers(`${Path.basename(path)}.`)).toEqual([])
}

// ---------------------------------------------------------------------------------------------------------

describe.skipIf(missing !== undefined)(`QEMU ${"version" in qemu ? qemu.version : ""} ↔ effect-multifd: whole VMs${skipReason}`, () => {
  // the command opens some of Node's handles on first use (not a leak of any test): once, before them
  beforeAll(() => Effect.runPromise(Effect.asVoid(cli(["recv", "--help"]))))

  it.live("recv --from-qemu --vm, then send --to-qemu (the command line, 4 channels): QEMU resumes the guest; QEMU also loads the file itself", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = fresh("guest.vm")
      const src = yield* guest()
      const recv = yield* recvCli(["--channels", "4", "--vm", vmFile, "--json"])
      yield* migrateGuest(src, recv.uri, { channels: 4, compression: "none" })
      const received = yield* noHang(Fiber.join(recv.fiber), "recv --vm", 30)
      expect(received).toMatchObject({ code: 0, stderr: [] })
      expect(JSON.parse(received.stdout.join(""))).toMatchObject({ role: "recv", output: vmFile, channels: 4, ramBytes: SIZE + 320 * 1024 + 8192 })
      expectVmFile(vmFile)

      const dst = yield* destination({ channels: 4 })
      const sent = yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "4", "--json"])
      expect(sent).toMatchObject({ code: 0, stderr: [] })
      const stats = JSON.parse(sent.stdout.join(""))
      expect(stats).toMatchObject({ role: "send", input: vmFile, channels: 4, compression: "none" })
      expect(stats.qemu.returnPath).toEqual(["PONG", "SHUT"])
      yield* expectResumed(dst)

      // the same file, loaded by QEMU itself (migrate-incoming file: with capability mapped-ram)
      const fromFile = yield* destination({ channels: 2, mappedRam: true, uri: `file:${vmFile}` })
      yield* expectResumed(fromFile)
    }))), 90_000)

  it.live("1 channel, zlib (the library: QemuIncoming → MappedRam → QemuOutgoing)", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const src = yield* guest()
      const ours = yield* incomingVm({ channels: 1, compression: "zlib" })
      yield* migrateGuest(src, ours.uri, { channels: 1, compression: "zlib" })
      const received = yield* noHang(Fiber.join(ours.fiber), "QemuIncoming", 30)
      const vm = received.vm!
      expect(QemuVm.isComplete(vm)).toBe(true)
      expect(vm.configuration?.machine).toMatch(/^pc-i440fx-/)
      expect(vm.commands.map((c) => c.command)).toEqual([11])
      expectSameRam(vm.ram.block("mem")!.bytes)
      const file = fresh("zlib.vm")
      const written = yield* MappedRam.write(file, vm)
      const { vm: back } = yield* MappedRam.read(file)
      expect(back.ram.blocks.map((b) => [b.name, b.bytes.equals(vm.ram.block(b.name)!.bytes)])).toEqual(
        vm.ram.blocks.map((b) => [b.name, true])
      )
      expect(Buffer.from(back.deviceState).equals(Buffer.from(vm.deviceState))).toBe(true)
      expect(written.pages).toBeLessThan(vm.ram.size / PAGE)

      const dst = yield* destination({ channels: 1, compression: "zlib" })
      const stats = yield* QemuOutgoing.migrate({ address: address(dst.uri), vm: back, channels: 1, compression: "zlib" }).pipe(
        Effect.provide(Transport.layer)
      )
      expect(stats).toMatchObject({ channels: 1, compression: "zlib", ramBytes: vm.ram.size })
      expect(stats.normalPages + stats.zeroPages).toBe(vm.ram.size / PAGE)
      yield* expectResumed(dst)
    }))), 90_000)

  // MappedRam.open leaves a mapped-ram file's pages in the file (for load or readPages): its VM given as it is, QEMU
  // resumed a guest of zeros and migrate succeeded, and MappedRam.write stored a VM of zeros under a new name
  it.live("the VM of MappedRam.open, its pages not loaded, given to QemuOutgoing.migrate without readPages or load, or to MappedRam.write: refused before anything connects or is written; loaded, QEMU resumes it", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = yield* receivedVmFile("opened.vm")
      const opened = yield* MappedRam.open(vmFile)
      const dst = yield* destination({ channels: 2 })
      const error = failureOf(yield* Effect.exit(silent(QemuOutgoing.migrate({ address: address(dst.uri), vm: opened.vm, channels: 2 })).pipe(
        Effect.provide(Transport.layer)
      )))
      expect(error).toMatchObject({ reason: "BadOptions" })
      expect(error.message).toMatch(/^the VM's pages are still in its file \(MappedRam\.open\): \d+ of them not loaded; give readPages or load, or read it whole with MappedRam\.read$/)
      expect(yield* Qemu.runState(dst.qmp)).toBe("inmigrate")
      const copy = fresh("opened-copy.vm")
      const written = failureOf(yield* Effect.exit(MappedRam.write(copy, opened.vm)))
      expect(written.message).toMatch(/the VM's pages are still in its file \(MappedRam\.open\)/)
      expect(leftovers(Path.basename(copy))).toEqual([])
      // every block loaded, the VM is whole
      for (const block of opened.vm.ram.blocks) yield* opened.load(block, 0, block.pages)
      yield* silent(QemuOutgoing.migrate({ address: address(dst.uri), vm: opened.vm, channels: 2 })).pipe(Effect.provide(Transport.layer))
      yield* expectResumed(dst)
    }))), 90_000)

  it.live("8 channels, zstd, PSK TLS both ways (recv --tls-psk, send --tls-psk)", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = fresh("zstd-tls.vm")
      const src = yield* guest(Qemu.sourceTls("psk", fresh("src-tls")).args)
      const recv = yield* recvCli(["--channels", "8", "--compression", "zstd", "--tls-psk", fixtureTls("keys.psk"), "--vm", vmFile, "--quiet"])
      yield* migrateGuest(src, recv.uri, { channels: 8, compression: "zstd", extraParameters: { "tls-creds": "tls0" } })
      expect(yield* noHang(Fiber.join(recv.fiber), "recv --vm over TLS", 30)).toMatchObject({ code: 0, stderr: [] })
      expectVmFile(vmFile)

      const tls = Qemu.destinationTls(fresh("dst-tls"))
      const dst = yield* destination({ channels: 8, compression: "zstd", extraParameters: tls.parameters }, { extraArgs: tls.args })
      const sent = yield* cli([
        "send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "8", "--compression", "zstd",
        "--tls-psk", fixtureTls("keys.psk"), "--quiet"
      ])
      expect(sent).toMatchObject({ code: 0, stderr: [] })
      yield* expectResumed(dst)
    }))), 90_000)

  it.live("QEMU's own mapped-ram file (migrate file:): recv file: --from-qemu reads it (--out, --out-dir, --vm), send --to-qemu resumes it over x509 TLS", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const qemuFile = fresh("qemu-saved.vm")
      const src = yield* guest()
      yield* Qemu.migrate(src.qmp, { uri: `file:${qemuFile}`, channels: 2, compression: "none", extraCapabilities: ["mapped-ram"] })
      expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("completed")

      const out = fresh("qemu-saved.ram")
      const read = yield* cli(["recv", `file:${qemuFile}`, "--from-qemu", "--out", out, "--json"])
      expect(read).toMatchObject({ code: 0, stderr: [] })
      expectSameRam(Fs.readFileSync(out).subarray(0, SIZE))
      const dir_ = fresh("qemu-saved-blocks")
      expect(yield* cli(["recv", `file:${qemuFile}`, "--from-qemu", "--out-dir", dir_, "--quiet"])).toMatchObject({ code: 0 })
      expectSameRam(Fs.readFileSync(Path.join(dir_, QemuIncoming.blockFileName("mem"))))
      // all or nothing: a block that cannot be written (its file's name taken by a directory) leaves every
      // older block file as it was, not a directory of two migrations' blocks
      const blocks = Fs.readdirSync(dir_).sort()
      expect(blocks.length).toBeGreaterThan(1)
      const dir2 = fresh("qemu-saved-blocks-2")
      Fs.mkdirSync(dir2)
      for (const name of blocks.slice(0, -1)) Fs.writeFileSync(Path.join(dir2, name), "older")
      Fs.mkdirSync(Path.join(dir2, blocks.at(-1)!))
      const blocked = yield* cli(["recv", `file:${qemuFile}`, "--from-qemu", "--out-dir", dir2, "--quiet"])
      expect(blocked.code).not.toBe(0)
      for (const name of blocks.slice(0, -1)) expect(Fs.readFileSync(Path.join(dir2, name), "utf8")).toBe("older")
      expect(Fs.readdirSync(dir2).sort()).toEqual(blocks)
      // --vm: the whole VM again, as our mapped-ram file: the same RAM blocks and device state as QEMU's
      const copy = fresh("qemu-saved-copy.vm")
      expect(yield* cli(["recv", `file:${qemuFile}`, "--from-qemu", "--vm", copy, "--quiet"])).toMatchObject({ code: 0, stderr: [] })
      expectVmFile(copy)
      const [theirs, ours] = [(yield* MappedRam.read(qemuFile)).vm, (yield* MappedRam.read(copy)).vm]
      expect(ours.ram.blocks.map((b) => [b.name, b.bytes.equals(theirs.ram.block(b.name)!.bytes)])).toEqual(
        theirs.ram.blocks.map((b) => [b.name, true])
      )
      expect(Buffer.from(ours.deviceState).equals(Buffer.from(theirs.deviceState))).toBe(true)
      // the same file cut in the middle of its pages: one line, exit 1, neither --vm nor --out left behind
      const cut = fresh("qemu-saved-cut.vm")
      Fs.copyFileSync(qemuFile, cut)
      Fs.truncateSync(cut, Math.floor(Fs.statSync(qemuFile).size / 2))
      for (const flag of ["--vm", "--out"]) {
        const target = fresh(`from-cut${flag}`)
        const result = yield* cli(["recv", `file:${cut}`, "--from-qemu", flag, target, "--quiet"])
        expect({ flag, code: result.code, stderr: result.stderr }).toEqual({
          flag,
          code: 1,
          stderr: [expect.stringMatching(/^multifd: error: .*qemu-saved-cut\.vm/)]
        })
        expect(leftovers(Path.basename(target))).toEqual([])
        if (process.env["SHOW_ERRORS"]) console.log(`cut file, ${flag}: ${result.stderr[0]}`)
      }

      // into a QEMU with x509 credentials (tls-creds-x509, endpoint=server), which requires a client certificate
      const tls = Qemu.destinationTls(fresh("dst-x509"), "x509")
      const dst = yield* destination({ channels: 2, extraParameters: tls.parameters }, { extraArgs: tls.args })
      expect(
        yield* cli([
          "send", dst.uri, "--to-qemu", "--vm", qemuFile, "--channels", "2", "--quiet", "--tls-ca", fixtureTls("ca-cert.pem"),
          "--tls-cert", fixtureTls("alice-cert.pem"), "--tls-key", fixtureTls("alice-key.pem")
        ])
      ).toMatchObject({ code: 0, stderr: [] })
      yield* expectResumed(dst)
    }))), 90_000)

  it.live("QEMU's plain migrate file: (no mapped-ram, no multifd): recv file: --from-qemu --vm makes it a mapped-ram file QEMU resumes from", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const plain = fresh("qemu-plain.stream")
      const src = yield* guest()
      yield* Qemu.migrate(src.qmp, { uri: `file:${plain}`, channels: 0, compression: "none" })
      expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("completed")
      const vmFile = fresh("from-plain.vm")
      expect(yield* cli(["recv", `file:${plain}`, "--from-qemu", "--vm", vmFile, "--quiet"])).toMatchObject({ code: 0, stderr: [] })
      expectVmFile(vmFile)
      const fromFile = yield* destination({ channels: 2, mappedRam: true, uri: `file:${vmFile}` })
      yield* expectResumed(fromFile)
    }))), 90_000)

  it.live("a file QEMU wrote at an offset (migrate file:PATH,offset=N, mapped-ram or plain): recv file:PATH,offset=N --from-qemu reads it; without the offset, one line", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      for (const mappedRam of [true, false]) {
        const qemuFile = fresh(`qemu-at-offset-${mappedRam}.vm`)
        // what the file held before QEMU's stream, kept as it was: a header of the user's own
        Fs.writeFileSync(qemuFile, Buffer.alloc(MIB, 0xab))
        const src = yield* guest()
        yield* Qemu.migrate(src.qmp, {
          uri: `file:${qemuFile},offset=0x100000`,
          channels: mappedRam ? 2 : 0,
          compression: "none",
          extraCapabilities: mappedRam ? ["mapped-ram"] : []
        })
        expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("completed")
        for (const offset of ["0x100000", "1M", "1048576"]) {
          const out = fresh(`at-offset-${mappedRam}-${offset}.ram`)
          expect(yield* cli(["recv", `file:${qemuFile},offset=${offset}`, "--from-qemu", "--out", out, "--quiet"]))
            .toMatchObject({ code: 0, stderr: [] })
          expectSameRam(Fs.readFileSync(out).subarray(0, SIZE))
        }
        // the library, as the command reads it
        const { vm } = yield* MappedRam.read(qemuFile, { offset: MIB })
        expectSameRam(vm.ram.block("mem")!.bytes)
        // without the offset (or another one), QEMU's stream is not where it is looked for: one line naming where
        // (and where it is: the user is told what to give)
        const found = "; a QEMU stream starts at byte 1048576 \\(written by QEMU's migrate file:PATH,offset=1048576\\?\\)"
        const without = yield* cli(["recv", `file:${qemuFile}`, "--from-qemu", "--out", fresh("no-offset.ram"), "--quiet"])
        expect(without).toMatchObject({
          code: 2,
          stderr: [expect.stringMatching(
            new RegExp(`not a QEMU migration stream: magic 0xabababab.*\\(at byte 0\\)${found}: give file:${qemuFile},offset=1048576$`)
          )]
        })
        const off = yield* cli(["recv", `file:${qemuFile},offset=4096`, "--from-qemu", "--out", fresh("off.ram"), "--quiet"])
        expect(off).toMatchObject({ code: 2, stderr: [expect.stringMatching(new RegExp(`not a QEMU migration stream: .*\\(at byte 4096\\)${found}`))] })
        // send --to-qemu --vm likewise: without the offset told where, with it (PATH,offset=N, as QEMU names the file)
        // the VM resumes
        const sent = yield* cli(["send", "tcp:127.0.0.1:1", "--to-qemu", "--vm", qemuFile, "--channels", "2", "--quiet"])
        expect(sent).toMatchObject({
          code: 2,
          stderr: [expect.stringMatching(new RegExp(`\\(at byte 0\\)${found}: give --vm ${qemuFile},offset=1048576$`))]
        })
        // QEMU's stream through a compressor (migrate "exec:gzip -c > FILE", as QEMU's documentation shows it): said so
        if (!mappedRam) {
          const head = Fs.readFileSync(qemuFile).subarray(MIB, MIB + 65536)
          // (and a stream at the start given an offset: told to give none)
          const atStart = fresh("qemu-stream-head")
          Fs.writeFileSync(atStart, head)
          expect(yield* cli(["recv", `file:${atStart},offset=4096`, "--from-qemu", "--out", fresh("head.ram"), "--quiet"])).toMatchObject({
            code: 2,
            stderr: [expect.stringMatching(/\(at byte 4096\); a QEMU stream starts at byte 0 \(the file's start\): give file:.*-qemu-stream-head, without an offset$/)]
          })
          const gzipped = fresh("qemu-stream.gz")
          Fs.writeFileSync(gzipped, Zlib.gzipSync(head))
          for (const args of [["recv", `file:${gzipped}`, "--from-qemu", "--out", fresh("gz.ram")], ["send", "tcp:127.0.0.1:1", "--to-qemu", "--vm", gzipped, "--channels", "2"]]) {
            expect(yield* cli([...args, "--quiet"])).toMatchObject({
              code: 2,
              stderr: [expect.stringMatching(/magic 0x1f8b0800.*\(at byte 0\); it is gzip-compressed \(QEMU's migrate "exec:gzip -c > FILE"\?\): decompress it first \(gzip -d\)$/)]
            })
          }
        }
        if (mappedRam) {
          const dst = yield* destination({ channels: 2 })
          expect(yield* cli(["send", dst.uri, "--to-qemu", "--vm", `${qemuFile},offset=1M`, "--channels", "2", "--quiet"]))
            .toMatchObject({ code: 0, stderr: [] })
          yield* expectResumed(dst)
        }
        const past = yield* cli(["recv", `file:${qemuFile},offset=1T`, "--from-qemu", "--out", fresh("past.ram"), "--quiet"])
        expect(past).toMatchObject({ code: 1, stderr: [expect.stringMatching(/ends before offset 1099511627776, where QEMU's stream was to start$/)] })
        expect(leftovers("no-offset.ram")).toEqual([])
        expect(leftovers("past.ram")).toEqual([])
      }
    }))), 90_000)

  it.live("a libvirt save image (virsh save: libvirt's header and domain XML, then QEMU's stream, raw or sparse): recv file: --from-qemu reads it, send --to-qemu --vm resumes it; compressed or unfinished, one line", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      /** libvirt's virQEMUSaveHeader (host order), then `dataLen` bytes of domain XML and padding. */
      const libvirtHeader = (magic: string, format: number, dataLen: number) => {
        const header = Buffer.alloc(92 + dataLen)
        header.write(magic, 0, "latin1")
        header.writeUInt32LE(2, 16) // version
        header.writeUInt32LE(dataLen, 20)
        header.writeUInt32LE(1, 24) // was_running
        header.writeUInt32LE(format, 28)
        header.write("<domain type='kvm'><name>guest</name></domain>", 92, "latin1")
        return header
      }
      for (const [mappedRam, format] of [[false, 0], [true, 6]] as const) {
        const saved = fresh(`libvirt-${format}.save`)
        const dataLen = 8192 - 92
        Fs.writeFileSync(saved, libvirtHeader("LibvirtQemudSave", format, dataLen))
        const src = yield* guest()
        yield* Qemu.migrate(src.qmp, {
          uri: `file:${saved},offset=8192`,
          channels: mappedRam ? 2 : 0,
          compression: "none",
          extraCapabilities: mappedRam ? ["mapped-ram"] : []
        })
        expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("completed")
        const out = fresh(`libvirt-${format}.ram`)
        expect(yield* cli(["recv", `file:${saved}`, "--from-qemu", "--out", out, "--quiet"])).toMatchObject({ code: 0, stderr: [] })
        expectSameRam(Fs.readFileSync(out).subarray(0, SIZE))
        expectSameRam((yield* MappedRam.read(saved)).vm.ram.block("mem")!.bytes)
        // and resumed into QEMU from it, as virsh restore would
        const dst = yield* destination({ channels: 2 })
        expect(yield* cli(["send", dst.uri, "--to-qemu", "--vm", saved, "--channels", "2", "--quiet"])).toMatchObject({ code: 0, stderr: [] })
        yield* expectResumed(dst)

        // the same image compressed by libvirt (gzip), or whose save never finished: one line each, nothing written;
        // and one whose header says its XML is shorter than it is: QEMU's stream is not where it says
        for (const [magic, form, length, message] of [
          ["LibvirtQemudSave", 1, dataLen, /a libvirt save image whose QEMU stream is compressed \(gzip\), which is not supported/],
          ["LibvirtQemudPart", format, dataLen, /an incomplete libvirt save image \(its header says LibvirtQemudPart: the save never finished\)/],
          ["LibvirtQemudSave", format, dataLen - 100, /a libvirt save image, whose QEMU stream at byte 8092 is not a QEMU migration stream/]
        ] as const) {
          const other = fresh(`libvirt-${magic}-${form}-${length}.save`)
          Fs.copyFileSync(saved, other)
          const fd = Fs.openSync(other, "r+")
          Fs.writeSync(fd, libvirtHeader(magic, form, length).subarray(0, 92), 0, 92, 0)
          Fs.closeSync(fd)
          const result = yield* cli(["recv", `file:${other}`, "--from-qemu", "--out", fresh("from-other.ram"), "--quiet"])
          expect(result.code).not.toBe(0)
          expect(result.stderr).toEqual([expect.stringMatching(message)])
        }
        expect(leftovers("from-other.ram")).toEqual([])
      }
    }))), 90_000)

  it.live("return-path and switchover-ack on the source, without multifd (--channels 0): answered as QEMU answers; QEMU completes", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = fresh("legacy.vm")
      const src = yield* guest()
      const recv = yield* recvCli(["--channels", "0", "--vm", vmFile, "--json"])
      // switchover-ack: a running guest's QEMU switches over only once the destination acknowledges it
      yield* migrateGuest(src, recv.uri, { channels: 0, compression: "none", extraCapabilities: ["return-path", "switchover-ack"] })
      const received = yield* noHang(Fiber.join(recv.fiber), "recv --channels 0", 30)
      expect(received).toMatchObject({ code: 0, stderr: [] })
      const stats = JSON.parse(received.stdout.join(""))
      expect(stats).toMatchObject({ channels: 0, packets: 0 })
      expect(stats.qemu.returnPath).toBe(true)
      expect(stats.qemu.commands).toEqual(["OPEN_RETURN_PATH", "PING", "SWITCHOVER_START"])
      expect(stats.qemu.mainNormalPages).toBeGreaterThan(SIZE / PAGE / 2)

      const dst = yield* destination({ channels: 2 })
      expect(yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--quiet"])).toMatchObject({ code: 0 })
      yield* expectResumed(dst)
    }))), 90_000)

  it.live("a background snapshot of a running guest (capability background-snapshot, --channels 0): recv --from-qemu --vm, then send --to-qemu; QEMU resumes it", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = fresh("background.vm")
      const src = yield* guest()
      const recv = yield* recvCli(["--channels", "0", "--vm", vmFile, "--json"])
      yield* Qemu.migrate(src.qmp, { uri: recv.uri, channels: 0, compression: "none", extraCapabilities: ["background-snapshot"] })
      expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("completed")
      // the guest went on running all along
      expect(yield* Qemu.runState(src.qmp)).toBe("running")
      const received = yield* noHang(Fiber.join(recv.fiber), "recv --channels 0", 30)
      expect(received).toMatchObject({ code: 0, stderr: [] })
      expect(JSON.parse(received.stdout.join("")).qemu.devices).toBeGreaterThan(0)
      const dst = yield* destination({ channels: 2 })
      expect(yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--quiet"])).toMatchObject({ code: 0 })
      yield* expectResumed(dst)
    }))), 90_000)

  // QEMU 10 still runs them (a VM keeps the machine type it was started with): multifd-flush-after-each-section on,
  // QEMU syncs the channels at every EOS word and at each RAM_SAVE_FLAG_MULTIFD_FLUSH. A flush word before each EOS
  // made it wait at the EOS for SYNC packets that never came, while send waited for its SHUT: both until a timeout
  it.live("a guest on a machine type of QEMU 8.0 (pc-i440fx-8.0), both ways: recv --from-qemu --vm, then send --to-qemu; QEMU resumes it", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const machine = "pc-i440fx-8.0"
      const vmFile = fresh("machine-8.0.vm")
      const src = yield* guest([], machine)
      const recv = yield* recvCli(["--channels", "2", "--vm", vmFile, "--quiet", "--timeout", "5s"])
      yield* migrateGuest(src, recv.uri, { channels: 2, compression: "none" })
      expect(yield* noHang(Fiber.join(recv.fiber), "recv --vm", 30)).toMatchObject({ code: 0, stderr: [] })
      expect((yield* MappedRam.read(vmFile)).vm.configuration?.machine).toBe(machine)

      const dst = yield* destination({ channels: 2, compression: "zlib" }, { machine })
      const sent = yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--compression", "zlib", "--quiet", "--timeout", "5s"])
      expect(sent).toMatchObject({ code: 0, stderr: [] })
      yield* expectResumed(dst)
    }))), 90_000)

  // QEMU's destination requires its multifd channels to carry its -uuid (zeros without one): a VM whose source ran
  // without capability validate-uuid (the default) has none in its file, and nothing could give it
  it.live("a destination started with -uuid (as libvirt starts QEMU): without --uuid, one line naming the channels' uuid, exit 1; with it, QEMU resumes the VM", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const uuid = "6c1bd8a6-4a6e-4c1f-9d36-1f0e3a2b5c7d"
      const vmFile = yield* receivedVmFile("pc.vm")
      const refused = yield* destination({ channels: 2 }, { extraArgs: ["-uuid", uuid] })
      const sent = yield* cli(["send", refused.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--quiet"])
      expect(sent.code).toBe(1)
      expect(sent.stderr).toHaveLength(1)
      expect(sent.stderr[0]).toContain("a -uuid other than the channels' 00000000-0000-0000-0000-000000000000 (--uuid)")
      expect(refused.stderr()).toContain(`expected uuid '${uuid}'`)
      const dst = yield* destination({ channels: 2 }, { extraArgs: ["-uuid", uuid] })
      const resumed = yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--uuid", uuid, "--json"])
      expect(resumed).toMatchObject({ code: 0, stderr: [] })
      expect(JSON.parse(resumed.stdout.join(""))).toMatchObject({ uuid })
      yield* expectResumed(dst)
      // a VM whose source sent its uuid (capability validate-uuid) into a QEMU of another: the configuration carries
      // the uuid given too (QEMU checks it against its -uuid as well), not the source's
      const validated = fresh("validated.vm")
      const src = yield* guest(["-uuid", "0f6f1c2e-9b7a-4d3e-8c5b-2a1d0e9f8c7b"])
      const recv = yield* recvCli(["--channels", "2", "--vm", validated, "--quiet"])
      yield* migrateGuest(src, recv.uri, { channels: 2, compression: "none", extraCapabilities: ["validate-uuid"] })
      expect(yield* noHang(Fiber.join(recv.fiber), "recv --vm", 30)).toMatchObject({ code: 0 })
      const other = yield* destination({ channels: 2 }, { extraArgs: ["-uuid", uuid] })
      expect(yield* cli(["send", other.uri, "--to-qemu", "--vm", validated, "--channels", "2", "--uuid", uuid, "--quiet"]))
        .toMatchObject({ code: 0, stderr: [] })
      yield* expectResumed(other)
    }))), 90_000)

  // two VMs (each its own -uuid, as libvirt starts them) migrating to one recv: the second's main channel was turned
  // away, but its channels' uuid conflicted with the one adopted from the first's channels and failed the migration
  // under way, saying "give the uuid to expect", which the command line could not take
  it.live("a second QEMU migrating to recv --from-qemu --uuid while the first does: turned away; the first completes", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const [first, second] = ["6c1bd8a6-4a6e-4c1f-9d36-1f0e3a2b5c7d", "0f6f1c2e-9b7a-4d3e-8c5b-2a1d0e9f8c7b"]
      const vmFile = fresh("first.vm")
      const src = yield* guest(["-uuid", first])
      const other = yield* Qemu.startGuest(IMAGE.path, SIZE, BIOS, { extraArgs: ["-uuid", second] })
      const recv = yield* recvCli(["--channels", "2", "--uuid", first, "--vm", vmFile, "--json"])
      // 8 MiB/s: about 4 s for the guest's RAM, time enough for the second to come in the middle
      yield* Qemu.migrate(src.qmp, { uri: recv.uri, channels: 2, compression: "none", maxBandwidth: 8 * MIB, downtimeLimit: 100 })
      yield* sentAtLeast(src.qmp, 4 * MIB)
      yield* Qemu.migrate(other.qmp, { uri: recv.uri, channels: 2, compression: "none" })
      expect(yield* Qemu.waitDone(other.qmp, "30 seconds")).toBe("failed")
      expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("completed")
      const received = yield* noHang(Fiber.join(recv.fiber), "recv --uuid", 30)
      expect(received).toMatchObject({ code: 0 })
      const report = JSON.parse(received.stdout.join(""))
      expect(report).toMatchObject({ uuid: first })
      // the second QEMU's connections, turned away
      expect(report.rejected).toEqual(expect.arrayContaining([
        expect.stringContaining("a second QEMU main channel"),
        expect.stringContaining(`bad uuid: ${second} is not this migration's ${first}`)
      ]))
      expectSameRam((yield* MappedRam.read(vmFile)).vm.ram.block("mem")!.bytes)
    }))), 90_000)

  it.live("a destination of another machine (q35), or with capability x-ignore-shared: send --to-qemu fails with one line, exit 1", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = yield* receivedVmFile("pc.vm")
      const dst = yield* destination({ channels: 2 }, { machine: "q35" })
      const sent = yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--quiet"])
      expect(sent.code).toBe(1)
      expect(sent.stderr).toHaveLength(1)
      expect(sent.stderr[0]).toMatch(/^multifd: error: QEMU at tcp:127\.0\.0\.1:\d+ ended the migration before it took the configuration: it refused it/)
      if (process.env["SHOW_ERRORS"]) console.log(sent.stderr[0])
      // the same machine with capability x-ignore-shared (its shared memory not migrated: every page is, here), which
      // QEMU checks against the configuration's: named among the causes
      const ignoring = yield* destination({ channels: 2, extraCapabilities: ["x-ignore-shared"] })
      const refused = yield* cli(["send", ignoring.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--quiet"])
      expect(refused).toMatchObject({ code: 1, stderr: [expect.stringMatching(/before it took the configuration: .*capability x-ignore-shared on/)] })
      expect(ignoring.stderr()).toContain("x-ignore-shared")
    }))), 90_000)

  it.live("a destination of another RAM size (64 MiB, 16 MiB): QEMU says SHUT 1 and closes its channels; send --to-qemu fails with one line saying QEMU failed to load it, exit 1", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const src = yield* guest()
      const ours = yield* incomingVm({ channels: 2 })
      yield* migrateGuest(src, ours.uri, { channels: 2, compression: "none" })
      const vm = (yield* Fiber.join(ours.fiber)).vm!
      const vmFile = fresh("pc.vm")
      yield* MappedRam.write(vmFile, vm)
      for (const size of [64 * MIB, 16 * MIB]) {
        // the library with the VM in memory (its channels at once), and the command line (pages read from the file)
        const dst = yield* destination({ channels: 2 }, { size })
        const error = failureOf(yield* Effect.exit(silent(QemuOutgoing.migrate({ address: address(dst.uri), vm, channels: 2 })).pipe(Effect.provide(Transport.layer))))
        // not 'multifd channel 1: tcp:...: connection is closed', as if the network had failed
        expect(error.message).toBe(`QEMU at ${dst.uri} failed to load the migration (MIG_RP_MSG_SHUT 1): its log says why`)
        expect(dst.stderr()).toContain("Size mismatch")
        const again = yield* destination({ channels: 2 }, { size })
        const sent = yield* cli(["send", again.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--quiet"])
        expect(sent).toMatchObject({ code: 1, stderr: [`multifd: error: QEMU at ${again.uri} failed to load the migration (MIG_RP_MSG_SHUT 1): its log says why`] })
      }
    }))), 90_000)

  it.live("send --to-qemu --tls-psk into a QEMU without tls-creds (it resets the connection): one line asking whether it uses TLS, exit 1", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = yield* receivedVmFile("pc.vm")
      const dst = yield* destination({ channels: 2 })
      const sent = yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--tls-psk", fixtureTls("keys.psk"), "--quiet"])
      expect(sent.code).toBe(1)
      expect(sent.stderr).toHaveLength(1)
      // not just 'failed: read ECONNRESET'
      expect(sent.stderr[0]).toMatch(
        /^multifd: error: main channel: TLS handshake with tcp:127\.0\.0\.1:\d+ failed: read ECONNRESET \(the peer reset the connection in the TLS handshake: does it use TLS, with PSK or x509 as this side does\?\)$/
      )
    }))), 90_000)

  // QEMU (GnuTLS) hangs up without an alert on a PSK binder made with another key: 'does it use TLS, with PSK or x509
  // as this side does?' sent a user whose QEMU uses PSK to look for anything but the key
  it.live("send --to-qemu --tls-psk with another key than QEMU's: one line asking for the same key of the identity, exit 1", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = yield* receivedVmFile("pc.vm")
      const tls = Qemu.destinationTls(fresh("dst-psk"))
      const dst = yield* destination({ channels: 2, extraParameters: tls.parameters }, { extraArgs: tls.args })
      const sent = yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--tls-psk", fixtureTls("wrong-keys.psk"), "--quiet"])
      expect(sent.code).toBe(1)
      expect(sent.stderr).toHaveLength(1)
      expect(sent.stderr[0]).toMatch(/^multifd: error: main channel: TLS handshake with tcp:127\.0\.0\.1:\d+ failed: .*\(the peer closed the connection in the TLS handshake: does it use TLS, with PSK as this side does, and the same key for identity "qemu"\?\)$/)
    }))), 90_000)

  // QEMU's tls-creds-x509 asks for the client's certificate (verify-peer, on by default) and closes the connection
  // after the handshake when none came: the line listed six causes (machine type, uuid, TLS...) and not that one
  it.live("send --to-qemu --tls-ca without --tls-cert into QEMU's tls-creds-x509 (verify-peer on): one line saying a client certificate is wanted, exit 1", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = yield* receivedVmFile("pc.vm")
      const tls = Qemu.destinationTls(fresh("dst-x509"), "x509")
      const dst = yield* destination({ channels: 2, extraParameters: tls.parameters }, { extraArgs: tls.args })
      const sent = yield* cli([
        "send", dst.uri.replace("127.0.0.1", "localhost"), "--to-qemu", "--vm", vmFile, "--channels", "2",
        "--tls-ca", fixtureTls("ca-cert.pem"), "--quiet"
      ])
      expect(sent.code).toBe(1)
      expect(sent.stderr).toHaveLength(1)
      expect(sent.stderr[0]).toMatch(
        /^multifd: error: QEMU at tcp:localhost:\d+ ended the migration before it took the configuration: this side presented no TLS client certificate, which QEMU's tls-creds-x509 asks for unless verify-peer=off \(give --tls-cert and --tls-key\); else its log says why \(.*\)$/
      )
      expect(dst.stderr()).toContain("No certificate was found")
    }))), 90_000)

  it.live("a destination without capability multifd (it takes the main channel, and ignores and closes the others): one line naming capability multifd, exit 1", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = yield* receivedVmFile("pc.vm")
      const dst = yield* destination({ channels: 0 })
      const sent = yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--quiet"])
      expect(sent.code).toBe(1)
      expect(sent.stderr).toHaveLength(1)
      expect(sent.stderr[0]).toMatch(/^multifd: error: QEMU closed multifd channel \d+ .*: it refused it \(capability multifd off, /)
      expect(dst.stderr()).toContain("Extra incoming migration connection")
    }))), 90_000)

  it.live("QEMU's mapped-ram file written without multifd: recv file: --from-qemu reads it; send --to-qemu --channels 0 into a QEMU without multifd, with capability postcopy-ram (which QEMU 10.0 takes only without multifd), on a unix socket: every page on the main channel; QEMU resumes the guest", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      // the VM as QEMU's own mapped-ram file written without multifd (libvirt's sparse save image without --parallel),
      // which nothing else here reads
      const vmFile = fresh("no-multifd.vm")
      const src = yield* guest()
      yield* Qemu.migrate(src.qmp, { uri: `file:${vmFile}`, channels: 0, compression: "none", extraCapabilities: ["mapped-ram"] })
      expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("completed")
      const out = fresh("no-multifd.ram")
      expect(yield* cli(["recv", `file:${vmFile}`, "--from-qemu", "--out", out, "--quiet"])).toMatchObject({ code: 0, stderr: [] })
      expectSameRam(Fs.readFileSync(out).subarray(0, SIZE))
      // (on a unix socket, as libvirt's unix migration URIs, which nothing else here uses)
      const dst = yield* destination({ channels: 0, extraCapabilities: ["postcopy-ram"], uri: `unix:${fresh("no-multifd.sock")}` })
      // (--max-bandwidth paces the main channel: a rate high enough not to slow the test)
      const sent = yield* cli(["send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "0", "--max-bandwidth", "1G", "--json"])
      expect(sent).toMatchObject({ code: 0, stderr: [] })
      const stats = JSON.parse(sent.stdout.join(""))
      expect(stats).toMatchObject({ role: "send", channels: 0, compression: "none", packets: 0, syncs: 0 })
      expect(stats.normalPages + stats.zeroPages).toBe(stats.ramBytes / PAGE)
      expect(stats.qemu.returnPath).toEqual(["PONG", "SHUT"])
      yield* expectResumed(dst)
      // refused by a QEMU of another machine: one line that names no multifd setting or channel uuid (there are none)
      const q35 = yield* destination({ channels: 0 }, { machine: "q35" })
      expect(yield* cli(["send", q35.uri, "--to-qemu", "--vm", vmFile, "--channels", "0", "--quiet"])).toMatchObject({
        code: 1,
        stderr: [
          `multifd: error: QEMU at ${q35.uri} ended the migration before it took the configuration: it refused it (another machine type ` +
          "or machine options, capability x-ignore-shared on, TLS, a device it cannot load? its log says) or it stopped"
        ]
      })
    }))), 90_000)

  it.live("a destination of another multifd-compression, or fewer multifd-channels: QEMU closes channels and keeps the main one; one line saying QEMU refused it", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = yield* receivedVmFile("pc.vm")
      // QEMU refuses the first packet of zlib (flags 2, expected 0) on a channel, and closes that channel
      const plain = yield* destination({ channels: 2 })
      const zlib = yield* cli(["send", plain.uri, "--to-qemu", "--vm", vmFile, "--channels", "2", "--compression", "zlib", "--quiet"])
      // QEMU takes as many channels as its multifd-channels and closes the others ("Extra incoming migration connection")
      const two = yield* destination({ channels: 2 })
      const four = yield* cli(["send", two.uri, "--to-qemu", "--vm", vmFile, "--channels", "4", "--quiet"])
      for (const sent of [zlib, four]) {
        expect(sent.code).toBe(1)
        expect(sent.stderr).toHaveLength(1)
        expect(sent.stderr[0]).toMatch(
          /^multifd: error: QEMU closed multifd channel \d+ (before it took the configuration|while it took the RAM blocks|while it received the RAM) \(tcp:127\.0\.0\.1:\d+: [^)]+\): it refused it \(capability multifd off, another multifd-compression, more channels than its multifd-channels, TLS\? its log says\) or it stopped$/
        )
        if (process.env["SHOW_ERRORS"]) console.log(sent.stderr[0])
      }
    }))), 90_000)

  // `--timeout` bounds silence, not work: the channels' last batches, held to --max-bandwidth, took longer than it to
  // drain before their SYNC packets, and the sync wait had a fixed deadline of its own: "timed out after 1s waiting
  // for the multifd channels to send their SYNC packets", while every channel was sending
  it.live("send --to-qemu --max-bandwidth slower than --timeout can drain the last batches: QEMU resumes the guest (a slow link is not a dead one)", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = yield* receivedVmFile("pc.vm")
      // 3 channels: the RAM's two 16 MiB batches on two of them, the small blocks on the third, whose idle turn
      // ends the sending: the sync then waits for both batches, about 2 s at this rate
      const dst = yield* destination({ channels: 3 })
      const sent = yield* cli([
        "send", dst.uri, "--to-qemu", "--vm", vmFile, "--channels", "3", "--max-bandwidth", "12M", "--timeout", "1s", "--quiet"
      ])
      expect(sent).toMatchObject({ code: 0, stderr: [] })
      yield* expectResumed(dst)
    }))), 90_000)

  it.live("QEMU killed while a VM migrates into it: one line at once, nothing left open", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const src = yield* guest()
      const ours = yield* incomingVm({ channels: 2 })
      yield* migrateGuest(src, ours.uri, { channels: 2, compression: "none" })
      const vm = (yield* Fiber.join(ours.fiber)).vm!
      // QEMU waits for 8 channels and gets 4: it never reads the main stream; it is killed while it waits
      const dst = yield* destination({ channels: 8 })
      const connected = yield* Ref.make(0)
      const all = yield* Deferred.make<void>()
      const counting = Layer.succeed(Transport.Transport, {
        listen: Transport.listen,
        connect: (a, o) =>
          Effect.tap(Transport.connect(a, o), () =>
            Effect.flatMap(Ref.updateAndGet(connected, (n) => n + 1), (n) => n === 5 ? Deferred.succeed(all, undefined) : Effect.void))
      })
      const send = yield* Effect.forkScoped(
        QemuOutgoing.migrate({ address: address(dst.uri), vm, channels: 4 }).pipe(Effect.provide(counting))
      )
      yield* noHang(Deferred.await(all), "the main channel and 4 channels connected", 20)
      const t0 = performance.now()
      yield* dst.kill
      const error = failureOf(yield* noHang(Fiber.await(send), "QemuOutgoing after QEMU was killed", 10))
      expect(performance.now() - t0).toBeLessThan(3000)
      expectOneLine(error)
      expect(error.message).toMatch(/QEMU at tcp:127\.0\.0\.1:\d+ ended the migration|connection reset|closed/)
      if (process.env["SHOW_ERRORS"]) console.log(`killed destination: ${error.message}`)
    }))), 90_000)

  // a stopped QEMU (SIGSTOP, a debugger) takes nothing and closes nothing: the timeout said what it waited for
  // ('waiting for QEMU at ADDRESS to answer on the main channel (is its multifd-channels 2?)', 'waiting for the multifd channels
  // to send their SYNC packets') and nothing of a QEMU that stopped
  it.live("QEMU stopped (SIGSTOP) while a VM migrates into it: one line after the timeout, asking whether it is stopped", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const src = yield* guest()
      const ours = yield* incomingVm({ channels: 2 })
      yield* migrateGuest(src, ours.uri, { channels: 2, compression: "none" })
      const vm = (yield* Fiber.join(ours.fiber)).vm!
      const dst = yield* destination({ channels: 2 })
      // continued however the test ends (a stopped QEMU would not quit when asked), before it is ended
      yield* Effect.addFinalizer(() => Effect.sync(() => process.kill(dst.pid, "SIGCONT")))
      const connected = yield* Ref.make(0)
      const counting = Layer.succeed(Transport.Transport, {
        listen: Transport.listen,
        connect: (a, o) =>
          Effect.tap(Transport.connect(a, o), () =>
            Effect.flatMap(Ref.updateAndGet(connected, (n) => n + 1), (n) => n === 3 ? Effect.sync(() => process.kill(dst.pid, "SIGSTOP")) : Effect.void))
      })
      const error = failureOf(yield* noHang(
        Effect.exit(silent(QemuOutgoing.migrate({ address: address(dst.uri), vm, channels: 2, timeouts: { peer: "1 second" } })).pipe(Effect.provide(counting))),
        "QemuOutgoing into a stopped QEMU",
        20
      ))
      expectOneLine(error)
      expect(error).toMatchObject({ reason: "Timeout" })
      expect(error.message).toMatch(/^timed out after 1s .*is it stopped\?\)$/)
      if (process.env["SHOW_ERRORS"]) console.log(`stopped destination: ${error.message}`)
    }))), 90_000)

  // QEMU's own destination says SHUT 0 once it has the VM (loaded, started): recv's once the output is written
  it.live("recv --vm on a file system too small for the VM, return-path on the source: QEMU is told it failed (SHUT 1), not completed; one line, exit 1, no file left", (ctx) =>
    Effect.gen(function*() {
      const small = fresh("small-fs")
      const why = mountTmpfs(small, "4m")
      if (why !== undefined) return ctx.skip(`cannot mount a 4 MiB tmpfs here (needs root): ${why}`)
      // unmounted however the test ends (a failed assertion included)
      yield* expectNoLeaks(Effect.scoped(Effect.gen(function*() {
        yield* Effect.addFinalizer(() => Effect.sync(() => ChildProcess.execFileSync("umount", [small])))
        const vmFile = Path.join(small, "guest.vm")
        const src = yield* guest()
        const recv = yield* recvCli(["--channels", "2", "--vm", vmFile, "--quiet"])
        yield* Qemu.migrate(src.qmp, { uri: recv.uri, channels: 2, compression: "none", extraCapabilities: ["return-path"] })
        const result = yield* noHang(Fiber.join(recv.fiber), "recv --vm on a full file system", 30)
        expect(result.code).toBe(1)
        expect(result.stderr).toHaveLength(1)
        expect(result.stderr[0]).toMatch(/^multifd: error: .*guest\.vm/)
        expect(yield* Qemu.waitDone(src.qmp, "30 seconds")).toBe("failed")
        // the source keeps the guest (QEMU resumes a failed migration's source): it can go on
        expect(yield* Qemu.runState(src.qmp)).not.toBe("postmigrate")
        expect(Fs.readdirSync(small)).toEqual([])
        if (process.env["SHOW_ERRORS"]) console.log(`full file system: ${result.stderr[0]}`)
      })))
    }), 90_000)

  it.live("the source QEMU killed while recv --vm receives: one line, exit 1, no file left", () =>
    expectNoLeaks(Effect.scoped(Effect.gen(function*() {
      const vmFile = fresh("killed.vm")
      const src = yield* guest()
      const recv = yield* recvCli(["--channels", "2", "--vm", vmFile, "--quiet"])
      // 8 MiB/s: about 4 s for the guest's RAM, time enough to stop it in the middle
      yield* Qemu.migrate(src.qmp, { uri: recv.uri, channels: 2, compression: "none", maxBandwidth: 8 * MIB, downtimeLimit: 100 })
      yield* sentAtLeast(src.qmp, 4 * MIB)
      yield* src.kill
      const result = yield* noHang(Fiber.join(recv.fiber), "recv after QEMU was killed", 10)
      expect(result.code).toBe(1)
      expect(result.stderr).toHaveLength(1)
      expect(result.stderr[0]).toMatch(/^multifd: error: /)
      expect(leftovers(Path.basename(vmFile))).toEqual([])
      if (process.env["SHOW_ERRORS"]) console.log(`killed source: ${result.stderr[0]}`)
    }))), 90_000)
})

describe("the command line of whole VMs: usage", () => {
  it.effect("misplaced or missing flags are usage errors (exit 2), one line", () =>
    Effect.gen(function*() {
      const vmFile = fresh("nothing.vm")
      const cases: ReadonlyArray<readonly [ReadonlyArray<string>, RegExp]> = [
        [["send", "tcp:127.0.0.1:1", "--to-qemu"], /--to-qemu needs --vm FILE/],
        [["send", "tcp:127.0.0.1:1", "--to-qemu", "--vm", vmFile, "--in", vmFile], /--to-qemu takes the VM as --vm FILE, not --in/],
        [["send", "tcp:127.0.0.1:1", "--vm", vmFile], /--vm goes with --to-qemu/],
        [["send", "tcp:127.0.0.1:1", "--in", vmFile, "--uuid", "6c1bd8a6-4a6e-4c1f-9d36-1f0e3a2b5c7d"], /--uuid goes with --to-qemu/],
        [["send", "tcp:127.0.0.1:1", "--to-qemu", "--vm", vmFile, "--uuid", "6c1bd8a6"], /--uuid 6c1bd8a6: not a uuid/],
        [["send", `file:${vmFile}`, "--to-qemu", "--vm", vmFile], /--to-qemu needs a tcp: or unix: uri/],
        [["send", "tcp:127.0.0.1:1", "--to-qemu", "--vm", Path.join(dir, "missing.vm")], /missing\.vm: .*no such file/],
        [["recv", "tcp:127.0.0.1:0", "--vm", vmFile], /--vm goes with --from-qemu/],
        [["recv", "tcp:127.0.0.1:0", "--out", vmFile, "--uuid", "6c1bd8a6-4a6e-4c1f-9d36-1f0e3a2b5c7d"], /--uuid goes with --from-qemu/],
        [["recv", `file:${vmFile}`, "--from-qemu", "--out", vmFile + ".ram", "--uuid", "6c1bd8a6-4a6e-4c1f-9d36-1f0e3a2b5c7d"], /--uuid does not apply to a file QEMU wrote/],
        [["recv", "tcp:127.0.0.1:0", "--out", vmFile, "--postcopy-ram", "precopy"], /--postcopy-ram goes with --from-qemu/],
        [["recv", `file:${vmFile}`, "--from-qemu", "--out", vmFile + ".ram", "--postcopy-ram", "precopy"], /--postcopy-ram does not apply to a file QEMU wrote/],
        [["recv", "tcp:127.0.0.1:0", "--from-qemu", "--channels", "0", "--out", vmFile, "--postcopy-ram", "yes"], /--postcopy-ram must be one of refuse, precopy, not "yes"/],
        [["recv", `file:${vmFile},offset=1.5M`, "--from-qemu", "--out", vmFile + ".ram"], /^multifd: error: file:.*nothing\.vm,offset=1\.5M: invalid file offset '1\.5M'/],
        // a size QEMU takes, past any file: said as what it is, not "invalid"
        [["recv", `file:${vmFile},offset=1E`, "--from-qemu", "--out", vmFile + ".ram"], /: file offset '1E' is 1152921504606846976 bytes, past the end of any file \(at most 9007199254740991\)$/],
        [["recv", "tcp:127.0.0.1:0", "--channels", "0", "--out", vmFile], /--channels must be between 1 and 255, not 0 \(0 goes with --from-qemu/],
        [["send", "tcp:127.0.0.1:1", "--in", vmFile, "--channels", "0"], /--channels must be between 1 and 255, not 0 \(0 goes with --to-qemu: a QEMU without multifd\)$/],
        [["recv", "tcp:127.0.0.1:0", "--from-qemu", "--channels", "0", "--compression", "zlib", "--out", vmFile], /^multifd: error: --compression zlib is QEMU's multifd-compression: with --channels 0 \(QEMU without multifd\) every page comes uncompressed on the main channel$/],
        [["send", "tcp:127.0.0.1:1", "--to-qemu", "--vm", vmFile, "--channels", "0", "--compression", "zstd"], /--compression zstd is QEMU's multifd-compression: with --channels 0 \(a QEMU without multifd\) every page goes uncompressed on the main channel$/],
        [["recv", "tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--out", vmFile, "--vm", vmFile], /exactly one of --out FILE, --out-dir DIR or --vm FILE/],
        [["recv", "tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--vm", Path.join(dir, "no", "such", "dir", "x.vm")], /no such file or directory/]
      ]
      for (const [args, message] of cases) {
        const result = yield* cli(args)
        expect({ args, code: result.code, stderr: result.stderr }).toEqual({ args, code: 2, stderr: [expect.stringMatching(message)] })
      }
      expect(leftovers("nothing.vm")).toEqual([])
    }))
})
