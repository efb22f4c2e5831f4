/**
 * "Success means the bytes are durably where the user asked": what the command and the library do to make a
 * written file (and the directory entries that lead to it) survive a crash, and what is left on the disk when
 * the disk or the directory does not cooperate. The system calls are watched with strace (skipped, saying why,
 * where it cannot run); real child processes, real files, real small file systems (tmpfs, as root).
 */
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import { inject } from "vitest"
import * as GuestRam from "../src/GuestRam.js"
import * as MappedRam from "../src/MappedRam.js"
import * as QemuIncoming from "../src/QemuIncoming.js"
import * as Snapshot from "../src/Snapshot.js"
import * as Transport from "../src/Transport.js"
import { killChildren, ROOT, run, runHere, runRecvHereUntilListening, startHere, startRecv } from "./support/cli.js"
import { writeAtRead } from "./support/fanotify.js"
import { onExt4, onTmpfs } from "./support/files.js"

const FIXTURES = new URL("./fixtures/qemu-10.0.2/", import.meta.url)
const fixture = (path: string): Buffer => Fs.readFileSync(new URL(path, FIXTURES))

let dir: string

beforeAll(() => {
  dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "multifd-durable-"))
})

afterEach(killChildren)

afterAll(() => {
  Fs.rmSync(dir, { recursive: true, force: true })
})

/** Why strace cannot watch a child here, if it cannot. */
const straceMissing = (): string | undefined => {
  const probe = ChildProcess.spawnSync("strace", ["-f", "-o", "/dev/null", "true"], { stdio: "pipe" })
  if (probe.error !== undefined) return String(probe.error)
  return probe.status === 0 ? undefined : probe.stderr.toString().trim()
}

/** The system calls of a finished child: each line of strace's log (`-y`: descriptors shown with their paths). */
interface Traced {
  readonly code: number | null
  readonly stderr: string
  readonly calls: ReadonlyArray<string>
}

/** A `recv` child started by `startRecvUnder`: its port, and how it ended. */
interface Wrapped {
  readonly port: number
  readonly child: ChildProcess.ChildProcess
  readonly finished: Promise<{ readonly code: number | null; readonly stderr: string }>
}

/**
 * Starts `<wrapper...> node <bundle> recv <args>` (under strace, in a pid namespace of its own...) and waits for
 * its `listening on` line.
 */
const startRecvUnder = async (wrapper: ReadonlyArray<string>, args: ReadonlyArray<string>): Promise<Wrapped> => {
  const child = ChildProcess.spawn(wrapper[0]!, [...wrapper.slice(1), process.execPath, inject("cliBundle"), "recv", ...args], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, NO_COLOR: "1" }
  })
  let stderr = ""
  child.stderr.setEncoding("utf8")
  const timer = setTimeout(() => child.kill("SIGKILL"), 20_000)
  const finished = new Promise<{ readonly code: number | null; readonly stderr: string }>((resolve) =>
    child.once("close", (code) => {
      clearTimeout(timer)
      resolve({ code, stderr })
    })
  )
  const port = await new Promise<number>((resolve, reject) => {
    child.stderr.on("data", (s: string) => {
      stderr += s
      const m = /multifd: listening on tcp:127\.0\.0\.1:(\d+)/.exec(stderr)
      if (m !== null) resolve(Number(m[1]))
    })
    void finished.then((f) => reject(new Error(`recv ended (${f.code}) before listening: ${f.stderr}`)))
  })
  return { port, child, finished }
}

/** Runs `<wrapper...> node <bundle> <args>` to its end. */
const runUnder = (wrapper: ReadonlyArray<string>, args: ReadonlyArray<string>) =>
  new Promise<{ readonly code: number | null; readonly stderr: string }>((resolve) => {
    const child = ChildProcess.spawn(wrapper[0]!, [...wrapper.slice(1), process.execPath, inject("cliBundle"), ...args], {
      cwd: ROOT,
      stdio: ["ignore", "ignore", "pipe"],
      env: { ...process.env, NO_COLOR: "1" }
    })
    let stderr = ""
    child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s))
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000)
    child.once("close", (code) => {
      clearTimeout(timer)
      resolve({ code, stderr })
    })
  })

/**
 * Starts `multifd recv <args>` under `strace -f -y` (file system calls only), and its `listening on` address;
 * `finished` gives the exit code, stderr and the calls, in order.
 */
const tracedRecv = async (args: ReadonlyArray<string>) => {
  const log = Path.join(dir, `strace-${process.pid}-${Math.random().toString(36).slice(2)}.log`)
  const trace = "trace=mkdir,mkdirat,fsync,fdatasync,rename,renameat,renameat2"
  const recv = await startRecvUnder(["strace", "-f", "-y", "-qq", "-e", trace, "-o", log], args)
  return {
    port: recv.port,
    finished: recv.finished.then((f): Traced => {
      const calls = Fs.readFileSync(log, "utf8").split("\n").filter((line) => line.length > 0)
      Fs.rmSync(log, { force: true })
      return { ...f, calls }
    })
  }
}

/** Sends QEMU 10.0.2's captured migration (main channel, two multifd channels) to `port`, each on its connection. */
const replayQemu = (port: number) =>
  Promise.all(["none-2ch/main.bin", "none-2ch/multifd-0.bin", "none-2ch/multifd-1.bin"].map((name) =>
    new Promise<void>((resolve) => {
      const socket = Net.connect({ host: "127.0.0.1", port }, () => socket.end(fixture(name)))
      socket.on("error", () => resolve())
      socket.on("close", () => resolve())
    })
  ))

/** A two-block VM file `<dir>/<name>.vm` (`twoBlockVm`) and an empty directory `<dir>/<name>` beside it. */
const vmBesideFolder = async (name: string): Promise<{ readonly vm: string; readonly folder: string }> => {
  const vm = Path.join(dir, `${name}.vm`)
  await twoBlockVm(vm)
  const folder = Path.join(dir, name)
  Fs.mkdirSync(folder)
  return { vm, folder }
}

/**
 * A mapped-ram file of QEMU's captured VM with two RAM blocks, mem (0x11) and vga.vram (0x22), of `pages` pages of 4 KiB
 * each, at `file`.
 */
const twoBlockVm = (file: string, pages = 16) =>
  Effect.gen(function*() {
    const port = yield* Deferred.make<number>()
    const [received] = yield* Effect.all([
      QemuIncoming.listenAndReceive({ _tag: "Tcp", host: "127.0.0.1", port: 0 }, {
        channels: 2,
        vm: true,
        onListening: (address) => Deferred.succeed(port, address._tag === "Tcp" ? address.port : 0)
      }),
      Effect.flatMap(Deferred.await(port), (p) => Effect.promise(() => replayQemu(p)))
    ], { concurrency: "unbounded" })
    const ram = yield* GuestRam.make({
      pageSize: 4096,
      blocks: [
        { name: "mem", bytes: Buffer.alloc(pages * 4096, 0x11) },
        { name: "vga.vram", bytes: Buffer.alloc(pages * 4096, 0x22) }
      ]
    })
    yield* MappedRam.write(file, { ...received.vm!, ram })
  }).pipe(Effect.scoped, Effect.provide(Transport.layer), Effect.runPromise)

/** The paths of the directories `fsync`ed (strace -y: `fsync(7</tmp/x>) = 0`), in order. */
const syncedDirectories = (calls: ReadonlyArray<string>): ReadonlyArray<string> =>
  calls.flatMap((line) => {
    const m = /\bf(?:data)?sync\(\d+<([^>]*)>\)\s+=\s+0/.exec(line)
    return m !== null && Fs.statSync(m[1]!, { throwIfNoEntry: false })?.isDirectory() === true ? [m[1]!] : []
  })

/** The directories created (`mkdir("/tmp/x", 0777) = 0`, or `mkdirat(AT_FDCWD</cwd>, "/tmp/x", 0777) = 0`), in order. */
const createdDirectories = (calls: ReadonlyArray<string>): ReadonlyArray<string> =>
  calls.flatMap((line) => {
    const m = /\bmkdir(?:at)?\((?:AT_FDCWD(?:<[^>]*>)?, )?"([^"]*)",[^)]*\)\s+=\s+0/.exec(line)
    return m === null ? [] : [Path.resolve(ROOT, m[1]!)]
  })

describe("recv --from-qemu --out-dir: the directories it creates survive a crash", () => {
  // mkdir -p of ram/a/b made three directory entries, in DIR, ram and ram/a, and only ram/a/b (where the block
  // files were renamed) was fsynced: after a power loss the whole tree, with the verified image, could be gone
  // although recv had said it was written
  it("the parent of every directory it made is fsynced before it reports success", async (ctx) => {
    const why = straceMissing()
    if (why !== undefined) return ctx.skip(`strace cannot trace a child here: ${why}`)
    const top = Path.join(dir, "fresh")
    const out = Path.join(top, "a", "b")
    const recv = await tracedRecv(["tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--out-dir", out, "--quiet"])
    await replayQemu(recv.port)
    const done = await recv.finished
    expect(done.code, done.stderr).toBe(0)
    expect(Fs.readFileSync(Path.join(out, "mem.img")).equals(fixture("ram.bin"))).toBe(true)
    const created = createdDirectories(done.calls).filter((d) => d.startsWith(top))
    expect(created).toEqual([top, Path.join(top, "a"), out])
    const synced = syncedDirectories(done.calls)
    for (const made of created) expect(synced, `the parent of ${made}`).toContain(Path.dirname(made))
    expect(synced).toContain(out) // the block's rename, as before
  })
})

describe("recv --from-qemu --out-dir under umask 000 (a service manager's, a container's)", () => {
  // the directories it made were rwxrwxrwx: any local user could remove or replace a block's file (0600, unreadable to
  // them, but not theirs to swap for another guest's memory), as the Unix socket recv listens on never lets them
  it("makes no directory that others may write in: owner and group get what the umask gives", async () => {
    const vm = Path.join(dir, "umask.vm")
    await twoBlockVm(vm)
    const top = Path.join(dir, "umask-blocks")
    const out = Path.join(top, "a")
    const recv = await runUnder(["sh", "-c", 'umask 000 && exec "$0" "$@"'], ["recv", `file:${vm}`, "--from-qemu", "--out-dir", out])
    expect(recv.code, recv.stderr).toBe(0)
    expect([top, out].map((d) => (Fs.statSync(d).mode & 0o777).toString(8))).toEqual(["775", "775"])
    expect((Fs.statSync(Path.join(out, "mem.img")).mode & 0o777).toString(8)).toBe("600")
  })
})

describe("recv --from-qemu --out-dir where no directory can be made", () => {
  // Node's recursive mkdir turns every error but a few into ENOENT: a read-only or full file system was reported
  // as "cannot create the directory: no such file or directory", of a parent that exists
  it("a read-only file system, or one out of inodes, is named as such (exit 2), nothing left", async (ctx) => {
    const small = Path.join(dir, "ro")
    await onTmpfs(ctx, small, "1m", async () => {
      Fs.mkdirSync(Path.join(small, "kept"))
      ChildProcess.execFileSync("mount", ["-o", "remount,ro", small])
      for (const out of [Path.join(small, "new"), Path.join(small, "kept", "new", "deeper")]) {
        const result = await runHere(["recv", "tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--out-dir", out])
        expect({ code: result.code, stderr: result.stderr.trim() }).toEqual({
          code: 2,
          stderr: `multifd: error: ${out}: cannot create the directory: read-only file system`
        })
      }
      expect(Fs.readdirSync(small)).toEqual(["kept"])
    })
    const few = Path.join(dir, "few-inodes")
    await onTmpfs(ctx, few, "1m,nr_inodes=3", async () => {
      // the root and one directory: the next directory has no inode
      Fs.mkdirSync(Path.join(few, "a"))
      const out = Path.join(few, "a", "b", "c")
      const result = await runHere(["recv", "tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--out-dir", out])
      expect({ code: result.code, stderr: result.stderr.trim() }).toEqual({
        code: 2,
        stderr: expect.stringMatching(new RegExp(`^multifd: error: ${out}: cannot create the directory: no space left on device$`))
      })
      expect(Fs.readdirSync(Path.join(few, "a"))).toEqual([])
    })
  })
})

describe("a save whose directory is renamed meanwhile", () => {
  // the temporary file was removed by its name, which no longer led to it: the save failed (its rename found
  // nothing) and left DIR.moved/x.snap.<pid>.partial, a whole memory image, for ever
  it.scopedLive("fails, and leaves no temporary file in the directory under its new name", () =>
    Effect.gen(function*() {
      const from = Path.join(dir, "renamed-during-save")
      const to = Path.join(dir, "renamed-during-save.moved")
      Fs.mkdirSync(from)
      const path = Path.join(from, "x.snap")
      const ram = yield* GuestRam.make({ blocks: [{ name: "ram", size: 4 * 1024 * 1024 }] })
      ram.blocks[0]!.bytes.fill(7)
      let moved = false
      const error = yield* Effect.flip(Snapshot.save(path, {
        channels: 2,
        onProgress: () =>
          Effect.sync(() => {
            if (moved) return
            expect(Fs.readdirSync(from)).toEqual([`x.snap.${process.pid}.partial`])
            Fs.renameSync(from, to)
            moved = true
          })
      }).pipe(Effect.provideService(GuestRam.GuestRam, ram)))
      expect(moved).toBe(true)
      expect([error._tag, (error as Snapshot.SnapshotError).reason]).toEqual(["SnapshotError", "Io"])
      expect(error.message).toBe(`snapshot ${path}: cannot rename x.snap.${process.pid}.partial to it: no such file or directory`)
      expect(Fs.readdirSync(to)).toEqual([])
      expect(Fs.existsSync(from)).toBe(false)
    }))
})

describe("two recv of one --out at once, each pid 1 of its own pid namespace (two containers, one volume)", () => {
  // the second took the first's OUT.1.partial for a dead pid 1's and made its own under that name; the first,
  // done, renamed that empty, unfinished file to OUT, and both it and its source reported success: OUT held 0
  // bytes (and the second, done, found its temporary file gone)
  it("the first fails without touching the second's file; the second writes the one complete image", async (ctx) => {
    const probe = ChildProcess.spawnSync("unshare", ["--pid", "--fork", "--mount-proc", "true"], { stdio: "pipe" })
    if (probe.status !== 0) {
      return ctx.skip(`cannot make a pid namespace here (needs root): ${probe.error ?? probe.stderr.toString().trim()}`)
    }
    const image = Path.join(dir, "two.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(4 * 1024 * 1024))
    const out = Path.join(dir, "two.img")
    const container = ["unshare", "--pid", "--fork", "--mount-proc"]
    const first = await startRecvUnder(container, ["tcp:127.0.0.1:0", "--out", out])
    expect(Fs.readdirSync(dir).filter((n) => n.startsWith("two.img"))).toEqual(["two.img.1.partial"])
    const second = await startRecvUnder(container, ["tcp:127.0.0.1:0", "--out", out])
    const toFirst = await run(["send", `tcp:127.0.0.1:${first.port}`, "--in", image])
    const firstDone = await first.finished
    expect(firstDone.code, firstDone.stderr).toBe(1)
    const reason = `${out}: cannot write the image: two.img.1.partial was replaced meanwhile by another file ` +
      "(another process writing two.img?)"
    expect(firstDone.stderr.trim().split("\n").at(-1)).toBe(`multifd: error: ${reason}`)
    expect(toFirst.code, toFirst.stderr).toBe(1)
    expect(toFirst.stderr.trim()).toBe(`multifd: error: the destination could not store the image: ${reason}`)
    // nothing claims to be the image; the second's temporary file is where it left it
    expect(Fs.readdirSync(dir).filter((n) => n.startsWith("two.img"))).toEqual(["two.img.1.partial"])
    const toSecond = await run(["send", `tcp:127.0.0.1:${second.port}`, "--in", image])
    const secondDone = await second.finished
    expect([toSecond.code, secondDone.code], secondDone.stderr).toEqual([0, 0])
    expect(Fs.readFileSync(out).equals(Fs.readFileSync(image))).toBe(true)
    expect(Fs.readdirSync(dir).filter((n) => n.startsWith("two.img"))).toEqual(["two.img"])
  })
})

describe("recv --from-qemu --out-dir into a directory it cannot write in", () => {
  // --out fails before recv listens when its directory cannot take the file; --out-dir only made the directory
  // and found it unwritable after the whole migration, when QEMU had stopped its VM for good ("completed")
  it("is refused before recv listens (exit 2), as --out is", async (ctx) => {
    const ro = Path.join(dir, "ro-existing")
    await onTmpfs(ctx, ro, "1m", async () => {
      Fs.mkdirSync(Path.join(ro, "blocks"))
      ChildProcess.execFileSync("mount", ["-o", "remount,ro", ro])
      for (const out of [ro, Path.join(ro, "blocks")]) {
        const result = await runRecvHereUntilListening(["tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--out-dir", out])
        expect({ listened: result.listened, code: result.code, stderr: result.stderr.trim() }).toEqual({
          listened: false,
          code: 2,
          stderr: `multifd: error: ${out}: cannot write in the directory: read-only file system`
        })
      }
    })
  })
})

describe("an output that is a mount point (a file bind-mounted there, as a container's volume)", () => {
  /**
   * Runs `body` with a file holding "the host's file" bind-mounted at `<dir>/<volume>/<name>` (an empty file made there
   * first), unmounted after; skips the test where no file can be mounted (not root).
   */
  const withMountedFile = async (
    ctx: { readonly skip: (note: string) => void },
    volume: string,
    name: string,
    body: (target: string, volume: string) => Promise<void>
  ): Promise<void> => {
    const host = Path.join(dir, `${volume}.host`)
    Fs.writeFileSync(host, "the host's file")
    const folder = Path.join(dir, volume)
    Fs.mkdirSync(folder)
    const target = Path.join(folder, name)
    Fs.writeFileSync(target, "")
    try {
      ChildProcess.execFileSync("mount", ["--bind", host, target], { stdio: "pipe" })
    } catch (error) {
      return ctx.skip(`cannot bind-mount a file here (needs root): ${(error as { stderr?: Buffer }).stderr?.toString().trim()}`)
    }
    try {
      await body(target, folder)
    } finally {
      ChildProcess.execFileSync("umount", [target])
    }
  }

  // a rename cannot replace a mount point: the whole migration (or save) ran, and only its last step failed,
  // "cannot rename out.img.<pid>.partial to it: EBUSY: resource busy or locked, rename '...' -> '...'"
  it("is refused before anything is transferred, the mounted file untouched", (ctx) =>
    withMountedFile(ctx, "volume", "out.img", async (out, volume) => {
      const why = "not replacing it: it is a mount point (a file mounted there, as a container's volume), which a " +
        "rename cannot replace; name a file in a mounted directory instead"
      const recv = await runRecvHereUntilListening(["tcp:127.0.0.1:0", "--out", out])
      expect({ listened: recv.listened, code: recv.code, stderr: recv.stderr.trim() }).toEqual({
        listened: false,
        code: 2,
        stderr: `multifd: error: ${out}: ${why}`
      })
      const ram = await Effect.runPromise(GuestRam.make({ blocks: [{ name: "ram", size: 1024 * 1024 }] }))
      ram.blocks[0]!.bytes.fill(3)
      const saved = await Effect.runPromise(Effect.flip(Snapshot.save(out).pipe(Effect.provideService(GuestRam.GuestRam, ram))))
      expect([(saved as Snapshot.SnapshotError).reason, saved.message]).toEqual(["Unusable", `snapshot ${out}: ${why}`])
      expect(Fs.readFileSync(out, "utf8")).toBe("the host's file")
      expect(Fs.readdirSync(volume)).toEqual(["out.img"])
    }))

  it("recv --from-qemu --out-dir: a block's file that is one is refused once the blocks are known, before a page", async (ctx) => {
    const vm = Path.join(dir, "mounted-block.vm")
    await twoBlockVm(vm)
    await withMountedFile(ctx, "block-volume", "vga.vram.img", async (block, volume) => {
      // "not stored": refused by the check of the blocks QEMU announced, not after every page was read (or received)
      const recv = await runHere(["recv", `file:${vm}`, "--from-qemu", "--out-dir", volume])
      expect([recv.code, recv.stderr.trim()]).toEqual([
        1,
        `multifd: error: ${vm}: not stored: ${block}: not replacing it: it is a mount point (a file mounted there, as a ` +
        "container's volume), which a rename cannot replace; name a file in a mounted directory instead"
      ])
      expect(Fs.readFileSync(block, "utf8")).toBe("the host's file")
      expect(Fs.readdirSync(volume)).toEqual(["vga.vram.img"])
    })
  })
})

describe("recv under a file size limit (ulimit -f) below the image", () => {
  // the limit was heeded only when the write past it failed, after the whole transfer, and worded as the file
  // system's: "cannot write the image: file too large for the file system"
  it("refuses the migration at the hello, both sides saying why; nothing left", async (ctx) => {
    const probe = ChildProcess.spawnSync("prlimit", ["--fsize=4194304", "true"], { stdio: "pipe" })
    if (probe.status !== 0) return ctx.skip(`prlimit cannot run here: ${probe.error ?? probe.stderr.toString().trim()}`)
    const image = Path.join(dir, "limited.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(8 * 1024 * 1024))
    const folder = Path.join(dir, "limited")
    Fs.mkdirSync(folder)
    const out = Path.join(folder, "out.img")
    const recv = await startRecvUnder(["prlimit", "--fsize=4194304"], ["tcp:127.0.0.1:0", "--out", out])
    const send = await run(["send", `tcp:127.0.0.1:${recv.port}`, "--in", image])
    const received = await recv.finished
    const reason = `${out}: the image needs 8.00 MiB, and this process may write files of at most 4.00 MiB (ulimit -f)`
    expect([send.code, send.stderr.trim()]).toEqual([1, `multifd: error: the destination refused the migration: ${reason}`])
    expect([received.code, received.stderr.trim().split("\n").at(-1)]).toEqual([1, `multifd: error: refused the migration: ${reason}`])
    expect(Fs.readdirSync(folder)).toEqual([])
  })

  // --vm was not held to the limit: QEMU sent its whole VM (and, without a return path, stopped it for good as
  // migrated), and only then did recv fail, "cannot write the file: size failed: file too large": a mapped-ram
  // file gives each block its place, so it is at least as long as the RAM
  it("recv --from-qemu --vm: refuses QEMU's migration once its blocks are known, saying why; nothing left", async (ctx) => {
    const probe = ChildProcess.spawnSync("prlimit", ["--fsize=1048576", "true"], { stdio: "pipe" })
    if (probe.status !== 0) return ctx.skip(`prlimit cannot run here: ${probe.error ?? probe.stderr.toString().trim()}`)
    const folder = Path.join(dir, "limited-vm")
    Fs.mkdirSync(folder)
    const vm = Path.join(folder, "vm.img")
    const recv = await startRecvUnder(["prlimit", "--fsize=1048576"], ["tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--vm", vm])
    await replayQemu(recv.port)
    const received = await recv.finished
    const reason = `${vm}: the VM's file needs 4.00 MiB, and this process may write files of at most 1.00 MiB (ulimit -f)`
    expect([received.code, received.stderr.trim().split("\n").at(-1)]).toEqual([1, `multifd: error: refused the migration: ${reason}`])
    expect(Fs.readdirSync(folder)).toEqual([])
  })
})

describe("recv file: --from-qemu whose --json result stdout does not take (`| true`, a full disk)", () => {
  // the command failed with 'cannot write the --json result' alone, though --out held the image: read as a failed read
  it("fails (exit 1) saying the output holds the image, and why the command failed", async () => {
    const vm = Path.join(dir, "json-full.vm")
    await twoBlockVm(vm)
    const out = Path.join(dir, "json-full.out")
    const recv = await runUnder(["sh", "-c", 'exec "$0" "$@" >/dev/full'], ["recv", `file:${vm}`, "--from-qemu", "--out", out, "--json"])
    expect([recv.code, recv.stderr.trim().split("\n")]).toEqual([1, [
      `multifd: ${out} holds the received image: it was stored; only the --json result could not be written`,
      "multifd: error: cannot write the --json result to stdout: no space left on device"
    ]])
    expect(Fs.statSync(out).size).toBe(2 * 16 * 4096)
  })
})

describe("send file: under a file size limit (ulimit -f) below the snapshot", () => {
  // the save failed at once, sizing its file, but as a failed save (exit 1, reason Io), which a script tries again
  // and again: under that limit no save of that memory ever succeeds
  it("is refused as the configuration it is (exit 2), saying why; nothing left", async (ctx) => {
    const probe = ChildProcess.spawnSync("prlimit", ["--fsize=1048576", "true"], { stdio: "pipe" })
    if (probe.status !== 0) return ctx.skip(`prlimit cannot run here: ${probe.error ?? probe.stderr.toString().trim()}`)
    const image = Path.join(dir, "limited-save.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(2 * 1024 * 1024))
    const folder = Path.join(dir, "limited-save")
    Fs.mkdirSync(folder)
    const snapshot = Path.join(folder, "s.snap")
    const save = await runUnder(["prlimit", "--fsize=1048576"], ["send", `file:${snapshot}`, "--in", image])
    expect([save.code, save.stderr.trim()]).toEqual([
      2,
      expect.stringMatching(
        new RegExp(`^multifd: error: snapshot ${snapshot}: cannot size the file to \\d+ bytes: file too large \\(for the ` +
          "file system, or this process's file size limit, ulimit -f\\)$")
      )
    ])
    expect(Fs.readdirSync(folder)).toEqual([])
  })
})

describe("an output in a directory this process may write in but not read (a drop box, mode 0300)", () => {
  // the directory's fsync needs it open for reading: the image was written, synced and renamed over the older
  // file, and only then did the command fail, "cannot sync its directory: permission denied" (exit 1; recv's
  // source told the migration failed) with the new file in place and the old one gone
  it("is refused before anything is written, the older file there untouched", async (ctx) => {
    // root without the capabilities that pass over a directory's permissions (as any other user)
    const user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    const probe = ChildProcess.spawnSync(user[0]!, [...user.slice(1), "true"], { stdio: "pipe" })
    if (probe.status !== 0) return ctx.skip(`setpriv cannot drop capabilities here: ${probe.error ?? probe.stderr.toString().trim()}`)
    const image = Path.join(dir, "drop.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(1024 * 1024))
    const drop = Path.join(dir, "drop")
    Fs.mkdirSync(drop)
    Fs.writeFileSync(Path.join(drop, "s.snap"), "older")
    Fs.writeFileSync(Path.join(drop, "out.img"), "older")
    Fs.chmodSync(drop, 0o300)
    const why = `cannot open its directory ${drop} to sync it (which makes the file durable): permission denied`
    const save = await runUnder(user, ["send", `file:${Path.join(drop, "s.snap")}`, "--in", image])
    expect([save.code, save.stderr.trim()]).toEqual([2, `multifd: error: snapshot ${Path.join(drop, "s.snap")}: ${why}`])
    const out = Path.join(drop, "out.img")
    const recv = await runUnder(user, ["recv", "tcp:127.0.0.1:0", "--out", out])
    expect([recv.code, recv.stderr.trim()]).toEqual([2, `multifd: error: ${out}: ${why}`])
    expect(Fs.readdirSync(drop).sort()).toEqual(["out.img", "s.snap"])
    expect(Fs.readFileSync(Path.join(drop, "s.snap"), "utf8")).toBe("older")
    expect(Fs.readFileSync(out, "utf8")).toBe("older")
    // --out-dir: its block files are made once QEMU sent everything, so the directory is checked before it listens
    const blocks = await runUnder(user, ["recv", "tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--out-dir", drop])
    expect([blocks.code, blocks.stderr.trim()]).toEqual([
      2,
      `multifd: error: ${drop}: cannot open the directory to sync it (which makes the files durable): permission denied`
    ])
  })
})

describe("an output path that ends with /", () => {
  // it names a directory: the temporary file was `.<pid>.partial` inside it, and the error named that file,
  // "cannot create .4242.partial beside it: no such file or directory"
  it("is refused saying so, nothing made", async () => {
    const out = Path.join(dir, "slash.img") + "/"
    const recv = await runRecvHereUntilListening(["tcp:127.0.0.1:0", "--out", out])
    expect({ listened: recv.listened, code: recv.code, stderr: recv.stderr.trim() }).toEqual({
      listened: false,
      code: 2,
      stderr: `multifd: error: ${out}: cannot create it: the path ends with /, which names a directory, not a file`
    })
    const ram = await Effect.runPromise(GuestRam.make({ blocks: [{ name: "ram", size: 64 * 1024 }] }))
    const saved = await Effect.runPromise(Effect.flip(Snapshot.save(out).pipe(Effect.provideService(GuestRam.GuestRam, ram))))
    expect(saved.message).toBe(`snapshot ${out}: cannot create it: the path ends with /, which names a directory, not a file`)
    expect(Fs.readdirSync(dir).filter((n) => n.startsWith("slash"))).toEqual([])
  })
})

describe("recv --out on a file system remounted read-only once recv listens (after an error, errors=remount-ro)", () => {
  // the temporary file could not be removed, and that was dropped in silence: the user heard "read-only file
  // system" and came across OUT.<pid>.partial later, not knowing whose or what it was
  it("fails saying so, and says which unfinished file it had to leave behind; the older image untouched", async (ctx) => {
    const image = Path.join(dir, "ro-midway.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(1024 * 1024))
    const mount = Path.join(dir, "ro-midway")
    await onExt4(ctx, mount, async (sysfs) => {
      if (!Fs.existsSync(Path.join(sysfs, "trigger_fs_error"))) return ctx.skip(`${sysfs}/trigger_fs_error is missing here`)
      const out = Path.join(mount, "o.img")
      Fs.writeFileSync(out, "older")
      const recv = await startRecv(["tcp:127.0.0.1:0", "--out", out])
      const partial = `${out}.${recv.child.pid}.partial`
      expect(Fs.existsSync(partial)).toBe(true)
      Fs.writeFileSync(Path.join(sysfs, "trigger_fs_error"), "a test error")
      const send = await run(["send", recv.uri, "--in", image])
      const received = await recv.finished
      const why = `${out}: cannot write the image: read-only file system`
      expect([send.code, send.stderr.trim()]).toEqual([1, `multifd: error: the destination could not store the image: ${why}`])
      expect([received.code, received.stderr.trim().split("\n").slice(-2)]).toEqual([1, [
        `multifd: warning: left ${partial} behind, an unfinished file: cannot remove it: read-only file system (remove it, ` +
          "or the next command that writes o.img will)",
        `multifd: error: ${why}`
      ]])
      expect(Fs.readdirSync(mount).sort()).toEqual(["lost+found", "o.img", Path.basename(partial)])
      expect(Fs.readFileSync(out, "utf8")).toBe("older")
    })
  })
})

describe("recv --from-qemu --out-dir and --vm on a file system remounted read-only once recv listens", () => {
  // their files are made once QEMU sent everything, and a file that could not be made then was reported as a
  // command line to fix (exit 2, reason Unusable) though the outputs had been checked before recv listened: the
  // migration failed for the disk, and a script took it for a mistake of its own and did not try again
  it("fails as a failed migration (exit 1), naming the file, nothing written", async (ctx) => {
    for (const output of ["--out-dir", "--vm"] as const) {
      const mount = Path.join(dir, `ro-qemu${output}`)
      await onExt4(ctx, mount, async (sysfs) => {
        if (!Fs.existsSync(Path.join(sysfs, "trigger_fs_error"))) return ctx.skip(`${sysfs}/trigger_fs_error is missing here`)
        const out = output === "--vm" ? Path.join(mount, "vm.img") : mount
        const recv = await startRecv(["tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", output, out, "--json"])
        Fs.writeFileSync(Path.join(sysfs, "trigger_fs_error"), "a test error")
        await replayQemu(Number(recv.uri.split(":").at(-1)))
        const received = await recv.finished
        const file = output === "--vm" ? out : Path.join(mount, "mem.img")
        const why = output === "--vm"
          ? `${file}: cannot write the file: create failed: read-only file system`
          : `${file}: cannot create mem.img.${recv.child.pid}.partial beside it: read-only file system`
        expect([received.code, received.stderr.trim().split("\n").at(-1)], output).toEqual([1, `multifd: error: ${why}`])
        expect(JSON.parse(received.stdout).error.reason, output).toBe("Io")
        expect(Fs.readdirSync(mount), output).toEqual(["lost+found"])
      })
    }
  })
})

describe("a disk that takes the writes and fails them at the fsync (ENOSPC at writeback, as thin-provisioned storage)", () => {
  // the file system sees room, so the free-space check passes and every write() succeeds into the page cache: the
  // fsync is the first to hear that the bytes have nowhere to go
  it("recv --out and a save fail naming the file, nothing left beside it, the older files untouched", async (ctx) => {
    const image = Path.join(dir, "late-enospc.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(8 * 1024 * 1024))
    const mount = Path.join(dir, "late-enospc")
    await onExt4(ctx, mount, async () => {
      const out = Path.join(mount, "o.img")
      Fs.writeFileSync(out, "older")
      const recv = await startRecv(["tcp:127.0.0.1:0", "--out", out])
      const send = await run(["send", recv.uri, "--in", image])
      const received = await recv.finished
      const why = `${out}: cannot write the image: no space left on device`
      expect([send.code, send.stderr.trim()]).toEqual([1, `multifd: error: the destination could not store the image: ${why}`])
      expect([received.code, received.stderr.trim().split("\n").at(-1)]).toEqual([1, `multifd: error: ${why}`])
      const snapshot = Path.join(mount, "s.snap")
      Fs.writeFileSync(snapshot, "older")
      const ram = await Effect.runPromise(GuestRam.make({ blocks: [{ name: "ram", size: 8 * 1024 * 1024 }] }))
      ram.blocks[0]!.bytes.set(Fs.readFileSync(image))
      const saved = await Effect.runPromise(Effect.flip(Snapshot.save(snapshot).pipe(Effect.provideService(GuestRam.GuestRam, ram))))
      expect([(saved as Snapshot.SnapshotError).reason, saved.message]).toEqual([
        "Io",
        `snapshot ${snapshot}: cannot flush the file to disk: no space left on device`
      ])
      expect(Fs.readdirSync(mount).sort()).toEqual(["lost+found", "o.img", "s.snap"])
      expect([Fs.readFileSync(out, "utf8"), Fs.readFileSync(snapshot, "utf8")]).toEqual(["older", "older"])
    }, { backing: "3m" })
  })
})

describe("send file:/dev/stdout with stdout a pipe or a socket (| gzip)", () => {
  // /proc/self/fd/1 reads "socket:[123]" (or "pipe:[123]"), which was followed as a relative name: "cannot create
  // socket:[123].<pid>.partial beside it: no such file or directory", a file the user never named
  it("is refused as not a regular file, naming the path given", async () => {
    const image = Path.join(dir, "stdout.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(64 * 1024))
    const save = await run(["send", "file:/dev/stdout", "--in", image]) // its stdout a pipe of this process
    expect([save.code, save.stderr.trim(), save.stdout]).toEqual([
      2,
      "multifd: error: snapshot /dev/stdout: exists and is not a regular file",
      ""
    ])
  })
})

describe("send file: onto a file system that fills up", () => {
  it("fails in one line naming the snapshot (exit 1): no temporary file, the older snapshot untouched", async (ctx) => {
    // as large as the free space (the 4 MiB but the older snapshot's page): up-front check passes it, and the
    // snapshot's header and bitmap beside its pages do not fit
    const image = Path.join(dir, "full.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(4 * 1024 * 1024 - 4096))
    const small = Path.join(dir, "full-save")
    await onTmpfs(ctx, small, "4m", async () => {
      const snapshot = Path.join(small, "s.snap")
      Fs.writeFileSync(snapshot, "older")
      const save = await run(["send", `file:${snapshot}`, "--in", image])
      expect(save.code, save.stderr).toBe(1)
      expect(save.stderr.trim()).toMatch(
        new RegExp(`^multifd: error: snapshot ${snapshot}: (writer \\d+: )?cannot write \\d+ bytes at \\d+: no space left on device$`)
      )
      expect(Fs.readdirSync(small)).toEqual(["s.snap"])
      expect(Fs.readFileSync(snapshot, "utf8")).toBe("older")
    })
  })
})

describe("send --in of an image that another process writes while it is read", () => {
  // the image was read in chunks (32 MiB, up to four at once), the first ones before the write and the last after:
  // the snapshot held a page the file never had beside bytes it no longer had, and the command said it succeeded
  it("fails saying so (exit 1), nothing saved, the image as the other process left it", async (ctx) => {
    // one chunk more than the reads in flight at once (Image.read's READS): the last read starts once the first
    // chunks are in memory, and the page at offset 0 is written then
    const chunks = Math.min(4, Os.availableParallelism()) + 1
    const image = Path.join(dir, "busy.raw")
    Fs.writeFileSync(image, Buffer.alloc(chunks * 32 * 1024 * 1024, 0x5a))
    const writer = await writeAtRead(image, chunks, 0)
    if (typeof writer === "string") return ctx.skip(writer)
    try {
      const snapshot = Path.join(dir, "busy.snap")
      const save = await run(["send", `file:${snapshot}`, "--in", image])
      await writer.changed
      expect([save.code, save.stderr.trim()]).toEqual([
        1,
        `multifd: error: ${image}: the image changed while it was read (another process writing it?): what was read ` +
          "may mix its old and new bytes; read it again once nothing writes it"
      ])
      expect(Fs.readdirSync(dir).filter((name) => name.startsWith("busy.snap"))).toEqual([])
      const now = Fs.readFileSync(image)
      expect([now[0], now[4095], now[4096]]).toEqual([0xa5, 0xa5, 0x5a])
    } finally {
      writer.stop()
    }
  })
})

describe("a directory whose fsync fails after the rename (EIO: the file is in place, its entry not yet durable)", () => {
  // the error said only "DIR: cannot sync the directory: input/output error" (recv, and send's "could not store the
  // image"), "snapshot S: cannot sync its directory": read as a failure that left OUT as it was, while the older file
  // was gone and the new one in its place
  it("recv --out and send file: fail saying that the new file is in place and the older one gone", async (ctx) => {
    const why = straceMissing()
    if (why !== undefined) return ctx.skip(`strace cannot run here: ${why}`)
    const image = Path.join(dir, "unsynced.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(256 * 1024))
    const at = Path.join(dir, "unsynced")
    Fs.mkdirSync(at)
    // -P: the directory's own fsync alone fails, not the file's (its path is another)
    const failDirectorySync = ["strace", "-f", "-qq", "-o", "/dev/null", "-P", at, "-e", "trace=fsync", "-e", "inject=fsync:error=EIO"]
    const inPlace = (file: string, older: string) =>
      `${file}: the new file is in place${older}, but its directory ${at} could not be synced to make that durable, ` +
      "so a crash may undo it: input/output error"
    const out = Path.join(at, "o.img")
    Fs.writeFileSync(out, "older")
    const recv = await startRecvUnder(failDirectorySync, ["tcp:127.0.0.1:0", "--out", out])
    const send = await run(["send", `tcp:127.0.0.1:${recv.port}`, "--in", image])
    const received = await recv.finished
    expect([received.code, received.stderr.trim().split("\n").at(-1)]).toEqual([
      1,
      `multifd: error: ${inPlace(out, " (the older one is gone)")}`
    ])
    expect([send.code, send.stderr.trim()]).toEqual([
      1,
      `multifd: error: the destination could not store the image: ${inPlace(out, " (the older one is gone)")}`
    ])
    const snapshot = Path.join(at, "s.snap")
    const save = await runUnder(failDirectorySync, ["send", `file:${snapshot}`, "--in", image])
    expect([save.code, save.stderr.trim()]).toEqual([1, `multifd: error: snapshot ${inPlace(snapshot, "")}`])
    // what they said: both are there, complete, and nothing beside them
    expect(Fs.readdirSync(at).sort()).toEqual(["o.img", "s.snap"])
    expect(Fs.readFileSync(out).equals(Fs.readFileSync(image))).toBe(true)
  })
})

describe("recv --from-qemu --out-dir whose second block cannot be renamed into place (EIO)", () => {
  // every block was written and synced first, then each renamed into place in turn: a rename that failed at the second
  // left the first block this migration's and the second an earlier one's (the README: "never a mix of two migrations'
  // blocks"), and the error named only the second ("cannot write the image")
  it("puts back the block renamed before it: the directory as it was, the error saying so", async (ctx) => {
    const why = straceMissing()
    if (why !== undefined) return ctx.skip(`strace cannot run here: ${why}`)
    const vm = Path.join(dir, "two-blocks.vm")
    await twoBlockVm(vm)
    // one thread of libuv's pool does every file operation: strace counts each thread's calls on their own
    const failSecondRename = [
      "env", "UV_THREADPOOL_SIZE=1",
      "strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename", "-e", "inject=rename:error=EIO:when=2"
    ]
    for (const older of [true, false]) {
      const out = Path.join(dir, `two-blocks-${older}`)
      Fs.mkdirSync(out)
      if (older) {
        Fs.writeFileSync(Path.join(out, "mem.img"), "older")
        Fs.writeFileSync(Path.join(out, "vga.vram.img"), "older")
      }
      const recv = await runUnder(failSecondRename, ["recv", `file:${vm}`, "--from-qemu", "--out-dir", out])
      const undone = older ? "mem.img put back" : "mem.img removed (there was none)"
      expect([recv.code, recv.stderr.trim()], String(older)).toEqual([
        1,
        `multifd: error: ${out}/vga.vram.img: cannot write the image: input/output error; undone: ${undone}: every file ` +
          "is as it was"
      ])
      expect(Fs.readdirSync(out).sort(), String(older)).toEqual(older ? ["mem.img", "vga.vram.img"] : [])
      if (older) {
        expect([Fs.readFileSync(Path.join(out, "mem.img"), "utf8"), Fs.readFileSync(Path.join(out, "vga.vram.img"), "utf8")])
          .toEqual(["older", "older"])
      }
    }
    // the directory's sync after the put-back fails too (the blocks' two fsyncs, the directory's after the first
    // rename, then that one): the put-back is not durable, and a crash may bring back this write's first block beside
    // the older second one; the error said "every file is as it was"
    const out = Path.join(dir, "two-blocks-unsynced")
    Fs.mkdirSync(out)
    Fs.writeFileSync(Path.join(out, "mem.img"), "older")
    Fs.writeFileSync(Path.join(out, "vga.vram.img"), "older")
    const recv = await runUnder(
      [...failSecondRename.slice(0, -4), "-e", "trace=rename,fsync", "-e", "inject=rename:error=EIO:when=2", "-e", "inject=fsync:error=EIO:when=4"],
      ["recv", `file:${vm}`, "--from-qemu", "--out-dir", out]
    )
    expect([recv.code, recv.stderr.trim()]).toEqual([
      1,
      `multifd: error: ${out}/vga.vram.img: cannot write the image: input/output error; undone: mem.img put back, but ` +
      `its directory ${out} could not be synced after that, so a crash may still undo it: input/output error`
    ])
  })
})

describe("recv --from-qemu --out-dir into a directory where another process publishes its blocks (its lock file there)", () => {
  // all or nothing held within one process only: two commands renaming their blocks into one directory at once left
  // some blocks of each, and a SIGKILL mid-publish left a mix without a word to the next command
  it("waits for it, then publishes; takes over a lock whose process is gone, saying so; gives up after --timeout", async () => {
    const vm = Path.join(dir, "locked.vm")
    await twoBlockVm(vm)
    const out = Path.join(dir, "locked")
    Fs.mkdirSync(out)
    const lock = Path.join(out, ".multifd-out-dir.lock")
    const blocks = () => Fs.readdirSync(out).filter((name) => !name.includes(".partial")).sort()
    const holder = ChildProcess.spawn("sleep", ["20"], { stdio: "ignore" })
    try {
      Fs.symlinkSync(String(holder.pid), lock) // a link to the holder's pid, made with what it says
      const given = await runHere(["recv", `file:${vm}`, "--from-qemu", "--out-dir", out, "--timeout", "300ms"])
      expect([given.code, given.stderr.trim().split("\n").at(-1)]).toEqual([
        1,
        `multifd: error: ${out}: process ${holder.pid} is publishing its blocks there (${lock}): waited 0.3 s for it ` +
        "(--timeout); if no such process writes there, remove that file"
      ])
      expect(blocks()).toEqual([".multifd-out-dir.lock"])
      // the wait is a wait like any other: an interruption (a signal) ends it, nothing left of this command
      const interrupted = startHere(["recv", `file:${vm}`, "--from-qemu", "--out-dir", out])
      await interrupted.waitFor(/waiting for process/)
      expect((await interrupted.interrupt()).code).toBeNull()
      expect(Fs.readdirSync(out)).toEqual([".multifd-out-dir.lock"])
      const recv = startHere(["recv", `file:${vm}`, "--from-qemu", "--out-dir", out])
      await recv.waitFor(new RegExp(`waiting for process ${holder.pid}, which is publishing its blocks in ${out}`))
      expect(blocks()).toEqual([".multifd-out-dir.lock"])
      Fs.rmSync(lock) // its publish over
      const published = await recv.finished
      expect(published.code, published.stderr).toBe(0)
      expect(blocks()).toEqual(["mem.img", "vga.vram.img"])
    } finally {
      holder.kill("SIGKILL")
    }
    // SIGKILLed while it published: its lock stays, naming a process that is gone
    const gone = ChildProcess.spawnSync(process.execPath, ["-e", ""]).pid!
    Fs.symlinkSync(String(gone), lock)
    const next = await runHere(["recv", `file:${vm}`, "--from-qemu", "--out-dir", out])
    expect(next.code, next.stderr).toBe(0)
    expect(next.stderr).toContain(
      `multifd: warning: took over ${lock}, which process ${gone} left (killed while it published its blocks? ${out} ` +
        "may hold some of them beside older ones until this command's are in place)"
    )
    expect(blocks()).toEqual(["mem.img", "vga.vram.img"])
  })

  it("publishes without the lock, saying so, where it cannot be made (no inode left once the blocks were written)", async (ctx) => {
    const vm = Path.join(dir, "no-inode.vm")
    await twoBlockVm(vm)
    const small = Path.join(dir, "no-inode")
    // the root, the directory and the blocks' two temporary files: none left for the lock
    await onTmpfs(ctx, small, "1m,nr_inodes=4", async () => {
      const out = Path.join(small, "b")
      const recv = await runHere(["recv", `file:${vm}`, "--from-qemu", "--out-dir", out])
      expect([recv.code, recv.stderr.trim().split("\n")[0]]).toEqual([
        0,
        `multifd: warning: cannot make ${out}/.multifd-out-dir.lock (no space left on device): publishing without it (a ` +
        "command publishing in that directory at once could leave some blocks of each)"
      ])
      expect(Fs.readdirSync(out).sort()).toEqual(["mem.img", "vga.vram.img"])
    })
  })
})

describe("recv file: --from-qemu of a QEMU file shortened while it is read (a read meets its end)", () => {
  // the end of the file where its size at the open said there were bytes: "cannot read the file: ended failed"
  it("fails as a truncated file (exit 1), saying where it ended, nothing written", async (ctx) => {
    const why = straceMissing()
    if (why !== undefined) return ctx.skip(`strace cannot run here: ${why}`)
    const vm = Path.join(dir, "shortened.vm")
    await twoBlockVm(vm)
    const out = Path.join(dir, "shortened.img")
    Fs.writeFileSync(out, "older")
    // its second read finds the end (pread64 returns 0), as once another process truncated it
    const shortened = [
      "env", "UV_THREADPOOL_SIZE=1",
      "strace", "-f", "-qq", "-o", "/dev/null", "-P", vm, "-e", "trace=pread64", "-e", "inject=pread64:retval=0:when=2"
    ]
    const recv = await runUnder(shortened, ["recv", `file:${vm}`, "--from-qemu", "--out", out])
    expect(recv.code, recv.stderr).toBe(1)
    expect(recv.stderr.trim()).toMatch(
      new RegExp(`^multifd: error: ${vm}: the file ended early, at \\d+ \\(was it truncated while being read\\?\\)$`)
    )
    expect(Fs.readdirSync(dir).filter((name) => name.startsWith("shortened.img"))).toEqual(["shortened.img"])
    expect(Fs.readFileSync(out, "utf8")).toBe("older")
  })
})

describe("recv --from-qemu --vm whose unfinished file cannot be removed after a failed write", () => {
  // MappedRam.write ran with every warning below an error silenced (so that a hard link's was not said twice): its
  // "left VM.<pid>.partial behind ... cannot remove it" went unsaid, and the file was left without a word (--out says it)
  it("says which unfinished file it left behind, as --out does", async (ctx) => {
    const why = straceMissing()
    if (why !== undefined) return ctx.skip(`strace cannot run here: ${why}`)
    const { vm, folder: at } = await vmBesideFolder("left-behind")
    const out = Path.join(at, "out.vm")
    // one thread of libuv's pool: the check's temporary file is removed (the first unlink), then the file is written,
    // its third write fails and it cannot be removed, as on a file system remounted read-only meanwhile
    const failing = [
      "env", "UV_THREADPOOL_SIZE=1",
      "strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64,unlink,unlinkat",
      "-e", "inject=pwrite64:error=EIO:when=3", "-e", "inject=unlink,unlinkat:error=EROFS:when=2+"
    ]
    const recv = await runUnder(failing, ["recv", `file:${vm}`, "--from-qemu", "--vm", out])
    const left = Fs.readdirSync(at)
    expect(left).toEqual([expect.stringMatching(/^out\.vm\.\d+\.partial$/)])
    expect([recv.code, recv.stderr.trim().split("\n")]).toEqual([1, [
      `multifd: warning: left ${Path.join(at, left[0]!)} behind, an unfinished file: cannot remove it: read-only file ` +
      "system (remove it, or the next command that writes out.vm will)",
      `multifd: error: ${out}: cannot write the file: write failed: input/output error`
    ]])
  })
})

describe("recv file: --from-qemu onto a file system too small for the VM's RAM (2 MiB on a 1 MiB tmpfs)", () => {
  // a QEMU source's blocks were held to the free space (and MULTIFD_MAX_RAM) when announced, a snapshot's before it is
  // read; a file QEMU wrote was read whole and written until the disk was full ("no space left on device"), and
  // MULTIFD_MAX_RAM was not asked at all
  it("is refused before its pages are read, as a QEMU source is, nothing left; MULTIFD_MAX_RAM holds", async (ctx) => {
    const vm = Path.join(dir, "two-mib.vm")
    await twoBlockVm(vm, 256)
    const limited = await runHere(["recv", `file:${vm}`, "--from-qemu", "--out", Path.join(dir, "two-mib.img")], {
      env: { MULTIFD_MAX_RAM: "1M" }
    })
    expect([limited.code, limited.stderr.trim()]).toEqual([
      1,
      `multifd: error: ${vm}: its 2097152 bytes of RAM exceed the limit of 1048576`
    ])
    expect(Fs.readdirSync(dir).filter((name) => name.startsWith("two-mib.img"))).toEqual([])
    const small = Path.join(dir, "small-qemu-file")
    await onTmpfs(ctx, small, "1m", async () => {
      const out = Path.join(small, "ram.img")
      const single = await runHere(["recv", `file:${vm}`, "--from-qemu", "--out", out])
      expect([single.code, single.stderr.trim()]).toEqual([
        1,
        `multifd: error: ${vm}: not stored: ${out}: the image needs 2.00 MiB, and ${small} has 1.00 MiB free`
      ])
      const blocks = Path.join(small, "blocks")
      const each = await runHere(["recv", `file:${vm}`, "--from-qemu", "--out-dir", blocks])
      expect([each.code, each.stderr.trim()]).toEqual([
        1,
        `multifd: error: ${vm}: not stored: ${blocks}: the image needs 2.00 MiB, and ${blocks} has 1.00 MiB free`
      ])
      expect(Fs.readdirSync(small)).toEqual([])
    })
  })
})

describe("an input named as a dead process's temporary file of the output (OUT.<pid>.partial, OUT.<pid>.older)", () => {
  // the stale temporary files of OUT are removed before it is written: the command removed the very file it was given
  // to read ("removed R.partial, which a process that is gone left beside R", then "cannot open it"), or had just read
  it("is read, and kept: only what the command does not read is taken for a stale temporary file", async () => {
    const gone = ChildProcess.spawnSync(process.execPath, ["-e", ""]).pid!
    const image = Path.join(dir, `kept.snap.${gone}.older`)
    const bytes = Crypto.randomBytes(16 * 4096)
    Fs.writeFileSync(image, bytes)
    const snapshot = Path.join(dir, "kept.snap")
    const saved = await runHere(["send", `file:${snapshot}`, "--in", image])
    expect(saved.code, saved.stderr).toBe(0)
    expect(Fs.readFileSync(image).equals(bytes)).toBe(true)
    const partial = Path.join(dir, `kept.img.${gone}.partial`)
    Fs.renameSync(snapshot, partial)
    const out = Path.join(dir, "kept.img")
    const restored = await runHere(["recv", `file:${partial}`, "--out", out])
    expect(restored.code, restored.stderr).toBe(0)
    expect(Fs.readFileSync(out).equals(bytes)).toBe(true)
    const vm = Path.join(dir, `kept.vm.${gone}.partial`)
    await twoBlockVm(vm)
    for (const flag of ["--out", "--vm"]) {
      const read = await runHere(["recv", `file:${vm}`, "--from-qemu", flag, Path.join(dir, "kept.vm")])
      expect(read.code, read.stderr).toBe(0)
    }
    expect([Fs.existsSync(partial), Fs.existsSync(vm)]).toEqual([true, true])
  })
})

describe("recv file: of a snapshot that another process writes while it is read", () => {
  // the pages read after the write did not match the digests read before it: "the page data is damaged", a snapshot
  // that was sound said to be corrupt, where every other reader of a file says that it changed while it was read
  it("fails saying so (exit 1), nothing written", async (ctx) => {
    const image = Path.join(dir, "busy-restore.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(64 * 4096))
    const snapshot = Path.join(dir, "busy-restore.snap")
    expect((await runHere(["send", `file:${snapshot}`, "--in", image])).code).toBe(0)
    // the header (its start, then whole), the bitmap, then the pages at 1 MiB: the first page written as they are read
    const writer = await writeAtRead(snapshot, 4, 1024 * 1024)
    if (typeof writer === "string") return ctx.skip(writer)
    try {
      const out = Path.join(dir, "busy-restore.img")
      const restored = await runHere(["recv", `file:${snapshot}`, "--out", out])
      await writer.changed
      expect([restored.code, restored.stderr.trim()]).toEqual([
        1,
        `multifd: error: snapshot ${snapshot}: the file changed while it was read (another process writing it?): what ` +
          "was read may mix its old and new bytes; read it again once nothing writes it"
      ])
      expect(Fs.readdirSync(dir).filter((name) => name.startsWith("busy-restore.img"))).toEqual([])
    } finally {
      writer.stop()
    }
  })
})

/**
 * `multifd <args>` (the test run's bundle) under strace with `options` (the trace written on stdout through cat, so that a
 * call shows as it starts), killed after 20 s: the child, its stderr so far, and its exit code once it closed.
 */
const underStrace = (options: ReadonlyArray<string>, args: ReadonlyArray<string>, env: Record<string, string> = {}) => {
  const command = ChildProcess.spawn("strace", ["-f", "-qq", "-o", "|cat", ...options, process.execPath, inject("cliBundle"), ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, NO_COLOR: "1", ...env }
  })
  const timer = setTimeout(() => command.kill("SIGKILL"), 20_000)
  let stderr = ""
  command.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s))
  const exited = new Promise<number | null>((resolve) =>
    command.once("close", (code) => {
      clearTimeout(timer)
      resolve(code)
    })
  )
  return { command, stderr: () => stderr, exited }
}

/**
 * Runs `multifd <args>` under strace, each fsync delayed by 0.4 s, and gives it SIGINT as its `fsyncs`-th fsync starts
 * (the command's pid read from its temporary file's name in `at` at its first): its exit code and stderr (but the
 * "stopping after" line, which a slow machine may add).
 */
const interruptedAtFsync = async (args: ReadonlyArray<string>, at: string, fsyncs: number) => {
  // "fsync(" comes as the call starts
  const { command, stderr: errors, exited } = underStrace(["-e", "trace=fsync", "-e", "inject=fsync:delay_enter=400000"], args)
  // the command's pid from its temporary file's name, there at its first fsync (the file's own)
  let partial: string | undefined
  await new Promise<void>((resolve) => {
    let traced = ""
    command.stdout.setEncoding("utf8").on("data", (s: string) => {
      traced += s
      if (traced.includes("fsync(")) partial ??= Fs.readdirSync(at).find((name) => name.endsWith(".partial"))
      if (traced.split("fsync(").length > fsyncs) resolve()
    })
    void exited.then(() => resolve())
  })
  expect(partial, errors()).toBeDefined()
  process.kill(Number(/\.(\d+)\.partial$/.exec(partial!)![1]), "SIGINT")
  const code = await exited
  return { code, stderr: errors().split("\n").filter((line) => line.length > 0 && !line.includes("stopping after SIGINT")) }
}

describe("a command given SIGINT while its output is renamed into place (strace delays each fsync by 0.4 s)", () => {
  // the rename went through (the older file gone) and the command said only "interrupted by SIGINT", exit 130, where
  // plain recv says that OUT holds the image: a script took the output for untouched
  it("recv file: --from-qemu (at the image's fsync) and send file: (at its directory's) say that OUT is in place, exit 130", async (ctx) => {
    const why = straceMissing()
    if (why !== undefined) return ctx.skip(`strace cannot run here: ${why}`)
    const { vm, folder: at } = await vmBesideFolder("flushed")
    const out = Path.join(at, "ram.img")
    Fs.writeFileSync(out, "older")
    const read = await interruptedAtFsync(["recv", `file:${vm}`, "--from-qemu", "--out", out], at, 1)
    expect([read.code, read.stderr]).toEqual([130, [
      `multifd: ${out} holds the received image: it was stored before the interruption`,
      "multifd: interrupted by SIGINT"
    ]])
    expect(Fs.readdirSync(at)).toEqual(["ram.img"])
    const ram = Buffer.concat([Buffer.alloc(16 * 4096, 0x11), Buffer.alloc(16 * 4096, 0x22)])
    expect(Fs.readFileSync(out).equals(ram)).toBe(true)
    // the snapshot's fsync, then its directory's after the rename
    const snapshot = Path.join(at, "ram.snap")
    Fs.writeFileSync(snapshot, "older")
    const saved = await interruptedAtFsync(["send", `file:${snapshot}`, "--in", out], at, 2)
    expect([saved.code, saved.stderr]).toEqual([130, [
      `multifd: ${snapshot} holds the snapshot: it was saved before the interruption`,
      "multifd: interrupted by SIGINT"
    ]])
    expect(Fs.readdirSync(at).sort()).toEqual(["ram.img", "ram.snap"])
    expect((await runHere(["recv", `file:${snapshot}`, "--out", Path.join(at, "restored.img")])).code).toBe(0)
  })
})

describe("recv --from-qemu --out-dir given SIGINT again while it publishes its blocks (strace delays their directory's fsyncs)", () => {
  // the first signal lets the publish go on (the renames are uninterruptible); the second exits at once, and removed
  // the older blocks' second names (BLOCK.img.<pid>.older) with the temporary files: the first block this migration's,
  // the second an earlier one's, and the older first block gone for good
  it("exits at once with the directory as it was: the blocks renamed so far put back", async (ctx) => {
    const why = straceMissing()
    if (why !== undefined) return ctx.skip(`strace cannot run here: ${why}`)
    const { vm, folder: out } = await vmBesideFolder("twice")
    Fs.writeFileSync(Path.join(out, "mem.img"), "older")
    Fs.writeFileSync(Path.join(out, "vga.vram.img"), "older")
    // one thread of libuv's pool does every file operation (strace counts each thread's calls on their own): the
    // blocks' two fsyncs, then the directory's after each rename, 1 s each
    const { command, stderr, exited } = underStrace(
      ["-e", "trace=fsync,rename", "-e", "inject=fsync:delay_enter=1000000:when=3+"],
      ["recv", `file:${vm}`, "--from-qemu", "--out-dir", out],
      { UV_THREADPOOL_SIZE: "1" }
    )
    // the first block renamed into place: its directory's fsync (delayed) comes next
    const pid = await new Promise<number | undefined>((resolve) => {
      let traced = ""
      command.stdout.setEncoding("utf8").on("data", (s: string) => {
        traced += s
        const m = /rename\("[^"]*mem\.img\.(\d+)\.partial", "[^"]*mem\.img"\) = 0/.exec(traced)
        if (m !== null) resolve(Number(m[1]))
      })
      void exited.then(() => resolve(undefined))
    })
    expect(pid, stderr()).toBeDefined()
    process.kill(pid!, "SIGINT")
    // later than a repeat of the same request (Signals.REPEAT_MS), while the second block's directory fsync waits
    await new Promise((resolve) => setTimeout(resolve, 1200))
    process.kill(pid!, "SIGINT")
    const code = await exited
    expect([code, stderr().trim().split("\n").at(-1)]).toEqual([130, "multifd: SIGINT again: exiting at once (the peer is not told)"])
    expect(Fs.readdirSync(out).sort()).toEqual(["mem.img", "vga.vram.img"])
    const older = (name: string) => Fs.readFileSync(Path.join(out, name)).equals(Buffer.from("older"))
    expect({ mem: older("mem.img"), vga: older("vga.vram.img") }).toEqual({ mem: true, vga: true })
  })
})

describe("send file: into a directory it cannot write in", () => {
  // the whole image was read first (minutes for a big one), and only then was the snapshot's file found unwritable;
  // recv creates its output's temporary file before it listens
  it("is refused before the image is opened (exit 2), as recv refuses an unwritable --out before it listens", async (ctx) => {
    const why = straceMissing()
    if (why !== undefined) return ctx.skip(`strace cannot run here: ${why}`)
    const image = Path.join(dir, "unwritten.raw")
    Fs.writeFileSync(image, Crypto.randomBytes(16 * 4096))
    const log = Path.join(dir, "unwritten.strace")
    const snapshot = Path.join(dir, "missing", "s.snap")
    const save = await runUnder(
      ["strace", "-f", "-qq", "-o", log, "-P", image, "-e", "trace=open,openat"],
      ["send", `file:${snapshot}`, "--in", image]
    )
    expect([save.code, save.stderr.trim()]).toEqual([
      2,
      `multifd: error: snapshot ${snapshot}: cannot create s.snap.${/s\.snap\.(\d+)\.partial/.exec(save.stderr)?.[1]}.partial ` +
        "beside it: no such file or directory"
    ])
    expect(Fs.readFileSync(log, "utf8")).toBe("")
  })
})
