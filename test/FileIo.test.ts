/**
 * internal/native/fileIo on real files: the atomic file (a target replaced only by a committed file, nothing left
 * beside it otherwise, nothing open), chunked positional transfers, and the errno table.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Path from "node:path"
import * as FileIo from "../src/internal/native/fileIo.js"
import { openFilesIn, tempDirectory } from "./support/files.js"

const tempDir = tempDirectory("emfd-fileio-")

/**
 * Runs `script` (an ES module, in the repository) as nobody (65534:65534, and of group 65533 too), through setpriv:
 * its stdout, or `exit N: stderr` if it failed; why it cannot run here, if it cannot (needs root and setpriv).
 */
const asNobody = (script: string): Effect.Effect<{ readonly output: string } | { readonly cannot: string }> =>
  Effect.promise(() => {
    if (process.geteuid?.() !== 0) return Promise.resolve({ cannot: "needs root, to run a writer as another user" })
    if (ChildProcess.spawnSync("setpriv", ["--version"]).status !== 0) {
      return Promise.resolve({ cannot: "needs setpriv (util-linux), to run a writer as another user with a second group" })
    }
    return new Promise((resolve) => {
      const nobody = ["--reuid=65534", "--regid=65534", "--groups=65533", "--"]
      const node = [process.execPath, "--import", "tsx", "--input-type=module", "-e", script]
      const child = ChildProcess.spawn("setpriv", [...nobody, ...node], {
        cwd: Path.resolve(import.meta.dirname, ".."),
        stdio: ["ignore", "pipe", "pipe"]
      })
      let text = ""
      let errors = ""
      child.stdout.on("data", (chunk) => (text += chunk))
      child.stderr.on("data", (chunk) => (errors += chunk))
      child.on("close", (code) => resolve({ output: code === 0 ? text : `exit ${code}: ${errors}` }))
    })
  })

describe("FileIo.atomicFile", () => {
  it.scopedLive("the target is replaced only by a committed file; uncommitted or interrupted, nothing is left beside it", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const target = Path.join(dir, "out")
      Fs.writeFileSync(target, "old")
      const temporary = `${target}.${process.pid}.partial`

      // written, not committed: the temporary file goes, the target stays
      yield* Effect.scoped(Effect.gen(function*() {
        const file = yield* FileIo.atomicFile(target, { size: 8 })
        expect(file.path).toBe(temporary)
        expect(Fs.statSync(temporary).size).toBe(8)
        yield* FileIo.transfer("write", file, Buffer.from("new"), 0, 3, 0)
      }))
      expect(Fs.readdirSync(dir)).toEqual(["out"])
      expect(Fs.readFileSync(target, "utf8")).toBe("old")

      // interrupted in the middle of a chunked write of 64 MiB: the same
      const big = Crypto.randomBytes(64 * 1024 * 1024)
      const writing = yield* Deferred.make<void>()
      const fiber = yield* Effect.fork(Effect.scoped(Effect.gen(function*() {
        const file = yield* FileIo.atomicFile(target)
        yield* FileIo.transfer("write", file, big, 0, 64 * 1024, 0)
        yield* Deferred.succeed(writing, undefined)
        yield* FileIo.transferChunked("write", file, big, 0, 64 * 1024)
        yield* file.commit
      })))
      yield* Deferred.await(writing)
      expect(Fs.readdirSync(dir).sort()).toEqual(["out", Path.basename(temporary)])
      expect(Exit.isInterrupted(yield* Fiber.interrupt(fiber))).toBe(true)
      expect(Fs.readdirSync(dir)).toEqual(["out"])
      expect(Fs.readFileSync(target, "utf8")).toBe("old")

      // committed: the new bytes under the target's name, nothing beside it
      yield* Effect.scoped(Effect.gen(function*() {
        const file = yield* FileIo.atomicFile(target)
        yield* FileIo.transferChunked("write", file, big, 0, 1024 * 1024)
        yield* file.commit
      }))
      expect(Fs.readdirSync(dir)).toEqual(["out"])
      expect(Fs.readFileSync(target).equals(big)).toBe(true)
      expect(openFilesIn(dir)).toEqual([])
    }))

  it.scopedLive("a guest's memory is its owner's alone: a new file is created 0600, a replaced file keeps its permissions", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const write = (target: string, check: (temporary: string) => void) =>
        Effect.scoped(Effect.gen(function*() {
          const file = yield* FileIo.atomicFile(target, { size: 4096 })
          check(file.path) // from the first byte, not only once committed
          yield* FileIo.transfer("write", file, Buffer.from("new"), 0, 3, 0)
          yield* file.commit
        }))
      const mode = (path: string) => Fs.statSync(path).mode & 0o777
      const fresh = Path.join(dir, "fresh.img")
      yield* write(fresh, (temporary) => expect(mode(temporary)).toBe(0o600))
      expect(mode(fresh)).toBe(0o600)
      // an existing file's readers stay its readers
      const shared = Path.join(dir, "shared.img")
      Fs.writeFileSync(shared, "old", { mode: 0o640 })
      Fs.chmodSync(shared, 0o640)
      yield* write(shared, (temporary) => expect(mode(temporary)).toBe(0o640))
      expect([mode(shared), Fs.readFileSync(shared, "utf8").slice(0, 3)]).toEqual([0o640, "new"])
      // and a file its owner had closed stays closed
      const closed = Path.join(dir, "closed.img")
      Fs.writeFileSync(closed, "old")
      Fs.chmodSync(closed, 0o400)
      yield* write(closed, (temporary) => expect(mode(temporary)).toBe(0o400))
      expect(mode(closed)).toBe(0o400)
      expect(openFilesIn(dir)).toEqual([])
    }))

  // the new file is of this user's group when it may not be given the old one's: 0640 of group root (or kvm) became
  // 0640 of group nogroup (or users, every user's on many systems), readable by that whole group
  it.scopedLive("a replaced file whose group cannot be kept: the new group has no more than everyone else", (ctx) =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      Fs.chmodSync(dir, 0o755)
      const shared = Path.join(dir, "shared")
      Fs.mkdirSync(shared)
      Fs.chmodSync(shared, 0o777) // not sticky: anyone may replace a file here
      // nobody (65534:65534, and of group 65533 too) replaces root's files: it may give them neither root's owner
      // nor root's group; group 65533 it may give
      const modes = { "private.img": [0o640, 0], "public.img": [0o644, 0], "odd.img": [0o664, 0], "team.img": [0o660, 65533] }
      const targets = Object.entries(modes).map(([name, [mode, group]]) => {
        const target = Path.join(shared, name)
        Fs.writeFileSync(target, "old")
        Fs.chmodSync(target, mode!)
        Fs.chownSync(target, 0, group!)
        return target
      })
      const script = `
        import * as Effect from "effect/Effect"
        import * as FileIo from "./src/internal/native/fileIo.ts"
        for (const target of ${JSON.stringify(targets)}) {
          await Effect.runPromise(Effect.scoped(Effect.flatMap(FileIo.atomicFile(target), (file) => file.commit)))
        }`
      const run = yield* asNobody(script)
      if ("cannot" in run) return ctx.skip(run.cannot)
      expect(run.output).toBe("")
      const after = targets.map((target) => {
        const stat = Fs.statSync(target)
        return [Path.basename(target), stat.uid, stat.gid, stat.size, (stat.mode & 0o777).toString(8)]
      })
      expect(after).toEqual([
        ["private.img", 65534, 65534, 0, "600"], // group root could read it, group nogroup may not
        ["public.img", 65534, 65534, 0, "644"], // everyone could
        ["odd.img", 65534, 65534, 0, "644"], // group root could write it, group nogroup only read, as everyone
        ["team.img", 65534, 65533, 0, "660"] // its group kept, with its permissions
      ])
    }))

  // a group's shared directory (sticky, not world-writable): the file was written in full beside another member's,
  // and the rename over it failed, "permission denied", after a whole migration
  it.scopedLive("another user's file in a sticky directory that is not world-writable (a group's, 1770) is refused up front", (ctx) =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      Fs.chmodSync(dir, 0o755)
      const shared = Path.join(dir, "team")
      Fs.mkdirSync(shared)
      Fs.chownSync(shared, 0, 65533)
      Fs.chmodSync(shared, 0o1770) // the group's members may create files here, and rename over their own alone
      const theirs = Path.join(shared, "theirs.img")
      Fs.writeFileSync(theirs, "theirs")
      Fs.chownSync(theirs, 0, 65533)
      Fs.chmodSync(theirs, 0o664)
      const script = `
        import * as Effect from "effect/Effect"
        import * as FileIo from "./src/internal/native/fileIo.ts"
        const target = ${JSON.stringify(theirs)}
        const result = await Effect.runPromise(Effect.either(Effect.scoped(Effect.flatMap(FileIo.atomicFile(target), (file) => file.commit))))
        const error = result._tag === "Left" ? result.left : undefined
        process.stdout.write(JSON.stringify(error === undefined ? "replaced" : [error.step, error.step === "Unsafe" ? FileIo.describeUnsafe(target, error) : FileIo.describe(error.cause)]))`
      const run = yield* asNobody(script)
      if ("cannot" in run) return ctx.skip(run.cannot)
      expect(JSON.parse(run.output)).toEqual([
        "Unsafe",
        `not replacing it: another user's file in the sticky directory ${shared}, where none but its owner (or the ` +
          "directory's) may replace it"
      ])
      expect([Fs.readdirSync(shared), Fs.readFileSync(theirs, "utf8")]).toEqual([["theirs.img"], "theirs"])
    }))

  it.scopedLive("removeTemporariesNow (a second Ctrl-C, exiting without closing scopes) removes the open temporary files and kept older files' second names, not committed ones", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      yield* Effect.scoped(Effect.gen(function*() {
        const done = yield* FileIo.atomicFile(Path.join(dir, "done.img"))
        yield* done.commit
        const open = yield* FileIo.atomicFile(Path.join(dir, "open.img"), { size: 4096 })
        // an older file kept while several are published (recv --out-dir's blocks): a second name of it
        const older = yield* FileIo.keepOlder(Path.join(dir, "done.img"))
        expect(Fs.readdirSync(dir).sort()).toEqual(["done.img", Path.basename(older.path!), Path.basename(open.path)].sort())
        FileIo.removeTemporariesNow()
        expect(Fs.readdirSync(dir)).toEqual(["done.img"])
      }))
      expect(Fs.readdirSync(dir)).toEqual(["done.img"])
      expect(openFilesIn(dir)).toEqual([])
    }))

  it.scopedLive("refuses a directory at the target and a temporary file this process is writing already", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const taken = Path.join(dir, "taken")
      Fs.mkdirSync(taken)
      const notRegular = yield* Effect.flip(Effect.scoped(FileIo.atomicFile(taken)))
      expect([notRegular.step, notRegular.path]).toEqual(["NotRegular", taken])
      const target = Path.join(dir, "out")
      const first = yield* FileIo.atomicFile(target)
      yield* FileIo.transfer("write", first, Buffer.from("first"), 0, 5, 0)
      const exists = yield* Effect.flip(Effect.scoped(FileIo.atomicFile(target)))
      expect([exists.step, FileIo.errorCode(exists.cause)]).toEqual(["Create", "EEXIST"])
      // however the target is spelt
      const spelt = yield* Effect.flip(Effect.scoped(FileIo.atomicFile(`${dir}/./out`)))
      expect([spelt.step, FileIo.errorCode(spelt.cause)]).toEqual(["Create", "EEXIST"])
      // the first write's: left alone, and it goes on
      expect(Fs.readFileSync(`${target}.${process.pid}.partial`, "utf8")).toBe("first")
      yield* first.commit
      expect([Fs.readFileSync(target, "utf8"), Fs.readdirSync(dir).sort()]).toEqual(["first", ["out", "taken"]])
    }))

  it.scopedLive("a symbolic link is written through: the file it points at is replaced, the link kept (as cp would)", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = Path.join(dir, "data")
      const links = Path.join(dir, "links")
      Fs.mkdirSync(data)
      Fs.mkdirSync(links)
      const write = (target: string, text: string) =>
        Effect.scoped(Effect.gen(function*() {
          const file = yield* FileIo.atomicFile(target)
          yield* FileIo.transfer("write", file, Buffer.from(text), 0, text.length, 0)
          yield* file.commit
          return file
        }))
      // a link to an existing file, relative, through a second link: the temporary file was beside the file
      Fs.writeFileSync(Path.join(data, "real.img"), "old")
      Fs.symlinkSync("../data/real.img", Path.join(links, "hop.img"))
      Fs.symlinkSync("hop.img", Path.join(links, "out.img"))
      const file = yield* write(Path.join(links, "out.img"), "new")
      expect(file.path).toBe(`${Path.join(data, "real.img")}.${process.pid}.partial`)
      expect(Fs.readFileSync(Path.join(data, "real.img"), "utf8")).toBe("new")
      expect(Fs.lstatSync(Path.join(links, "out.img")).isSymbolicLink()).toBe(true)
      expect(Fs.readdirSync(data)).toEqual(["real.img"])
      expect(Fs.readdirSync(links).sort()).toEqual(["hop.img", "out.img"])
      // a dangling link names the file it would create
      Fs.symlinkSync(Path.join(data, "fresh.img"), Path.join(links, "fresh.img"))
      yield* write(Path.join(links, "fresh.img"), "created")
      expect(Fs.readFileSync(Path.join(data, "fresh.img"), "utf8")).toBe("created")
      expect(Fs.lstatSync(Path.join(links, "fresh.img")).isSymbolicLink()).toBe(true)
      // a link to a directory is refused as the directory is; a loop says so
      Fs.symlinkSync(data, Path.join(links, "dir.img"))
      expect((yield* Effect.flip(write(Path.join(links, "dir.img"), "x"))).step).toBe("NotRegular")
      Fs.symlinkSync("loop-b", Path.join(links, "loop-a"))
      Fs.symlinkSync("loop-a", Path.join(links, "loop-b"))
      const loop = yield* Effect.flip(write(Path.join(links, "loop-a"), "x"))
      expect([loop.step, FileIo.describe(loop.cause)]).toEqual(["Create", "too many levels of symbolic links"])
      expect(Fs.readdirSync(data).sort()).toEqual(["fresh.img", "real.img"])
      expect(openFilesIn(dir)).toEqual([])
    }))

  // the lock's key here was the path as given: through a link to the directory, this process's own lock was taken for an
  // earlier process's with this pid (stale), and both published at once
  it.scopedLive("lockDirectory: a lock this process holds is waited for, whatever name its directory is given", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const real = Path.join(dir, "blocks")
      Fs.mkdirSync(real)
      Fs.symlinkSync(real, Path.join(dir, "link"))
      const heard: Array<string> = []
      const options = {
        patience: 100,
        onWait: (pid: number | undefined) => Effect.sync(() => void heard.push(`wait ${pid}`)),
        onStale: (pid: number | undefined) => Effect.sync(() => void heard.push(`stale ${pid}`)),
        onUnlocked: () => Effect.sync(() => void heard.push("unlocked"))
      }
      yield* FileIo.lockDirectory(real, options)
      const second = yield* Effect.flip(Effect.scoped(FileIo.lockDirectory(Path.join(dir, "link"), options)))
      expect([second.step, heard]).toEqual(["Locked", [`wait ${process.pid}`]])
      expect(Fs.readlinkSync(Path.join(real, FileIo.LOCK_NAME))).toBe(String(process.pid))
    }))

  // /proc's links (/proc/self/fd/N, /dev/stdout) are the kernel's: their text names the open file only while it has
  // that name; a deleted file's reads "/dir/x (deleted)", and a file of that name was created and renamed into place
  it.scopedLive("a link of /proc to an open file is written through while the file has its name; one deleted is refused", () =>
    Effect.gen(function*() {
      if (!Fs.existsSync("/proc/self/fd")) return
      const dir = yield* tempDir
      const write = (target: string) =>
        Effect.scoped(Effect.gen(function*() {
          const file = yield* FileIo.atomicFile(target)
          yield* FileIo.transfer("write", file, Buffer.from("memory"), 0, 6, 0)
          yield* file.commit
        }))
      const named = Path.join(dir, "named.img")
      const fd = yield* Effect.acquireRelease(
        Effect.sync(() => Fs.openSync(named, "w")),
        (fd) => Effect.sync(() => Fs.closeSync(fd))
      )
      yield* write(`/proc/self/fd/${fd}`)
      expect([Fs.readFileSync(named, "utf8"), Fs.readdirSync(dir)]).toEqual(["memory", ["named.img"]])
      const deleted = Path.join(dir, "deleted.img")
      const gone = yield* Effect.acquireRelease(
        Effect.sync(() => Fs.openSync(deleted, "w")),
        (fd) => Effect.sync(() => Fs.closeSync(fd))
      )
      Fs.rmSync(deleted)
      const link = `/proc/self/fd/${gone}`
      const refused = yield* Effect.flip(write(link))
      expect([refused.step, FileIo.describeUnsafe(link, refused)]).toEqual([
        "Unsafe",
        "not replacing it: it is an open file that has no name (deleted, or made without one), which no rename can replace"
      ])
      expect(Fs.readdirSync(dir)).toEqual(["named.img"])
    }))

  // the links are followed here, not by the kernel, so its protected_symlinks never applied: another user's link
  // /tmp/vm.snap -> ~/.bashrc (or /etc/shadow, for root) had that file replaced by the memory saved
  it.scopedLive("another user's symbolic link in a world-writable sticky directory (/tmp) is not followed, the file it points at untouched", (ctx) =>
    Effect.gen(function*() {
      if (process.geteuid?.() !== 0) return ctx.skip("needs root, to give a link to another user")
      const dir = yield* tempDir
      const shared = Path.join(dir, "tmp")
      Fs.mkdirSync(shared)
      Fs.chmodSync(shared, 0o1777)
      const victim = Path.join(dir, "victim")
      Fs.writeFileSync(victim, "precious")
      const link = Path.join(shared, "vm.snap")
      Fs.symlinkSync(victim, link)
      Fs.lchownSync(link, 65534, 65534) // nobody's
      const write = (target: string) =>
        Effect.scoped(Effect.gen(function*() {
          const file = yield* FileIo.atomicFile(target)
          yield* FileIo.transfer("write", file, Buffer.from("memory"), 0, 6, 0)
          yield* file.commit
        }))
      const refused = yield* Effect.flip(write(link))
      expect([refused.step, refused.path]).toEqual(["Unsafe", link])
      expect(FileIo.describeUnsafe(link, refused)).toBe(
        `not following it: another user's symbolic link in the world-writable sticky directory ${shared}`
      )
      // through a link of ours to it, the same
      const ours = Path.join(dir, "ours.snap")
      Fs.symlinkSync(link, ours)
      const through = yield* Effect.flip(write(ours))
      expect([through.step, through.path]).toEqual(["Unsafe", link])
      expect(FileIo.describeUnsafe(ours, through)).toBe(
        `not following ${link}: another user's symbolic link in the world-writable sticky directory ${shared}`
      )
      expect(Fs.readFileSync(victim, "utf8")).toBe("precious")
      expect(Fs.readdirSync(dir).sort()).toEqual(["ours.snap", "tmp", "victim"])
      // a link of the directory's owner, or of this user, is followed; so is any link where the directory is not sticky
      Fs.lchownSync(link, 0, 0)
      yield* write(link)
      expect(Fs.readFileSync(victim, "utf8")).toBe("memory")
      Fs.lchownSync(link, 65534, 65534)
      Fs.chmodSync(shared, 0o777)
      Fs.writeFileSync(victim, "precious")
      yield* write(link)
      expect(Fs.readFileSync(victim, "utf8")).toBe("memory")
      expect(openFilesIn(dir)).toEqual([])
    }))

  // a replaced file's owner and permissions go to the new file: another user's /tmp/vm.snap, made 0666 beforehand,
  // became that user's, with the guest's memory in it, readable by everyone
  it.scopedLive("another user's file in a world-writable sticky directory (/tmp) is not replaced: it stays as it was, nothing is given to that user", (ctx) =>
    Effect.gen(function*() {
      if (process.geteuid?.() !== 0) return ctx.skip("needs root, to give a file to another user")
      const dir = yield* tempDir
      const shared = Path.join(dir, "tmp")
      Fs.mkdirSync(shared)
      Fs.chmodSync(shared, 0o1777)
      const planted = Path.join(shared, "vm.snap")
      Fs.writeFileSync(planted, "planted")
      Fs.chownSync(planted, 65534, 65534)
      Fs.chmodSync(planted, 0o666)
      const write = (target: string) =>
        Effect.scoped(Effect.gen(function*() {
          const file = yield* FileIo.atomicFile(target)
          yield* FileIo.transfer("write", file, Buffer.from("memory"), 0, 6, 0)
          yield* file.commit
        }))
      const refused = yield* Effect.flip(write(planted))
      expect([refused.step, refused.path]).toEqual(["Unsafe", planted])
      expect(FileIo.describeUnsafe(planted, refused)).toBe(
        `not replacing it: another user's file in the world-writable sticky directory ${shared}`
      )
      expect([Fs.readFileSync(planted, "utf8"), Fs.readdirSync(shared)]).toEqual(["planted", ["vm.snap"]])
      // the directory owner's file, or any other user's where the directory is not sticky: replaced, keeping its owner
      Fs.chownSync(planted, 0, 0)
      yield* write(planted)
      Fs.chownSync(planted, 65534, 65534)
      Fs.chmodSync(shared, 0o777)
      yield* write(planted)
      expect([Fs.readFileSync(planted, "utf8"), Fs.statSync(planted).uid]).toEqual(["memory", 65534])
      expect(openFilesIn(dir)).toEqual([])
    }))
})

describe("FileIo.atomicFile of a file with other names (hard links)", () => {
  // the rename replaced the one name given, silently: `ln guest.img backups/guest.img`, then `recv --out guest.img`,
  // and backups/guest.img still held the older image, where cp or QEMU (writing in place) would have changed both
  it.scopedLive("replaces the name given alone, saying that the other names keep the older file", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const warnings: Array<string> = []
      const write = (target: string) =>
        Effect.scoped(Effect.gen(function*() {
          const file = yield* FileIo.atomicFile(target)
          yield* FileIo.transfer("write", file, Buffer.from("new"), 0, 3, 0)
          yield* file.commit
        })).pipe(
          Effect.provide(Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => warnings.push(String(message)))))
        )
      const target = Path.join(dir, "guest.img")
      Fs.writeFileSync(target, "old")
      Fs.linkSync(target, Path.join(dir, "backup.img"))
      Fs.linkSync(target, Path.join(dir, "copy.img"))
      yield* write(target)
      expect(["guest.img", "backup.img", "copy.img"].map((name) => Fs.readFileSync(Path.join(dir, name), "utf8")))
        .toEqual(["new", "old", "old"])
      expect(warnings).toEqual([
        "guest.img has 2 other names (hard links), which will keep the older file: only guest.img is replaced"
      ])
      // a file of one name: nothing to say
      warnings.length = 0
      yield* write(target)
      expect(warnings).toEqual([])
      // nor of the second name a live process's publish gives it for a moment (recv --out-dir's BLOCK.img.<pid>.older,
      // while another command publishes its blocks there): no name of the user's
      const publisher = ChildProcess.spawn("sleep", ["20"], { stdio: "ignore" })
      yield* Effect.addFinalizer(() => Effect.sync(() => publisher.kill("SIGKILL")))
      const block = Path.join(dir, "mem.img")
      Fs.writeFileSync(block, "old")
      Fs.linkSync(block, `${block}.${publisher.pid}.older`)
      yield* write(block)
      expect(warnings).toEqual([])
    }))
})

describe("FileIo.atomicFile of an immutable file (chattr +i)", () => {
  // the whole file was written beside it, and only the rename failed, "cannot rename out.img.4242.partial to it:
  // permission denied": a migration's whole transfer (and a source told it failed at the very end) for nothing
  it.scopedLive("is refused before anything is written, saying so; the file as it was", (ctx) =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const target = Path.join(dir, "out.img")
      Fs.writeFileSync(target, "kept")
      const chattr = ChildProcess.spawnSync("chattr", ["+i", target], { stdio: "pipe" })
      if (chattr.status !== 0) return ctx.skip(`cannot make a file immutable here: ${chattr.error ?? chattr.stderr.toString().trim()}`)
      // lifted before the directory is removed (nothing, not even root, removes an immutable file)
      yield* Effect.addFinalizer(() => Effect.sync(() => ChildProcess.spawnSync("chattr", ["-i", target])))
      const error = yield* Effect.flip(Effect.scoped(FileIo.atomicFile(target, { size: 4096 })))
      expect([error.step, FileIo.describeUnsafe(target, error)]).toEqual([
        "Unsafe",
        "not replacing it: it is immutable (chattr +i: lsattr shows it), which no rename can replace; chattr -i lifts it"
      ])
      expect([Fs.readdirSync(dir), Fs.readFileSync(target, "utf8")]).toEqual([["out.img"], "kept"])
    }))
})

describe("FileIo.atomicFile of a long name", () => {
  // "<name>.<pid>.partial" was longer than a file name may be: "cannot create ... beside it: file name too long"
  it.scopedLive("a target named with up to 255 bytes is written: its temporary file's name is cut to leave room for the suffix", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      // 255 bytes, a 2-byte character where the cut falls
      const name = `${"a".repeat(226)}é${"b".repeat(27)}`
      expect(Buffer.byteLength(name)).toBe(255)
      const target = Path.join(dir, name)
      const gone = ChildProcess.spawnSync(process.execPath, ["-e", ""]).pid!
      // the cut falls before é, not inside it; the name kept marked with 8 hex digits of its SHA-256
      const stem = `${"a".repeat(226)}~${Crypto.createHash("sha256").update(name).digest("hex").slice(0, 8)}`
      const stale = `${stem}.${gone}.partial`
      Fs.writeFileSync(Path.join(dir, stale), "half an image")
      yield* Effect.scoped(Effect.gen(function*() {
        const file = yield* FileIo.atomicFile(target)
        expect(file.path).toBe(Path.join(dir, `${stem}.${process.pid}.partial`))
        expect(Fs.readdirSync(dir)).toEqual([Path.basename(file.path)]) // the stale one removed
        yield* FileIo.transfer("write", file, Buffer.from("whole"), 0, 5, 0)
        yield* file.commit
      })).pipe(Effect.provide(Logger.replace(Logger.defaultLogger, Logger.none)))
      expect([Fs.readdirSync(dir), Fs.readFileSync(target, "utf8")]).toEqual([[name], "whole"])
      // a name that leaves room keeps its whole name
      const short = Path.join(dir, "b".repeat(236))
      const file = yield* Effect.scoped(Effect.tap(FileIo.atomicFile(short), (file) => file.commit))
      expect(file.path).toBe(`${short}.${process.pid}.partial`)
      expect(openFilesIn(dir)).toEqual([])
    }))

  // two names alike in the first 236 bytes had one temporary name: the second file of a write of several (recv
  // --from-qemu --out-dir of two such blocks) failed "file already exists" once everything had arrived
  it.scopedLive("two targets alike in the bytes where their temporary names are cut: each its own temporary file", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const targets = ["1", "2"].map((last) => Path.join(dir, `${"a".repeat(240)}${last}`))
      yield* Effect.scoped(Effect.gen(function*() {
        const files = yield* Effect.forEach(targets, (target) => FileIo.atomicFile(target))
        expect(new Set(files.map((file) => file.path)).size).toBe(2)
        yield* Effect.forEach(files, (file, i) =>
          Effect.zipRight(FileIo.transfer("write", file, Buffer.from(`file ${i}`), 0, 6, 0), file.commit))
      }))
      expect(targets.map((target) => Fs.readFileSync(target, "utf8"))).toEqual(["file 0", "file 1"])
      expect(Fs.readdirSync(dir)).toHaveLength(2)
    }))

  // the temporary file's name was cut to fit, so it was written in full, and only the rename into place failed
  // ("file name too long"): a recv --out of 300 bytes took the whole migration first, a save the whole snapshot
  it.scopedLive("a target whose name is longer than the file system takes: refused before anything is created", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const target = Path.join(dir, "a".repeat(256))
      const error = yield* Effect.flip(Effect.scoped(FileIo.atomicFile(target, { size: 4096 })))
      expect([error.step, error.path, FileIo.describe(error.cause)]).toEqual(["Create", target, "file name too long"])
      expect([Fs.readdirSync(dir), openFilesIn(dir)]).toEqual([[], []])
    }))
})

describe("FileIo.atomicFile after a killed process", () => {
  it.scopedLive("removes the temporary files of its target that processes which are gone left, with a warning; nothing else", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const target = Path.join(dir, "out.img")
      // pids of processes that have exited (spawnSync returns once they did)
      const gone = [0, 1].map(() => ChildProcess.spawnSync(process.execPath, ["-e", ""]).pid!)
      const alive = process.ppid
      const stale = `out.img.${gone[0]}.partial`
      Fs.writeFileSync(Path.join(dir, stale), "half an image")
      const kept = [
        `out.img.${alive}.partial`, // a process that still runs
        `other.img.${gone[0]}.partial`, // another target's
        `out.img.x${gone[0]}.partial`, // not a pid
        `out.img.${gone[0]}.partial.bak` // not a temporary file
      ]
      for (const name of kept) Fs.writeFileSync(Path.join(dir, name), "keep")
      Fs.mkdirSync(Path.join(dir, `out.img.${gone[1]}.partial`)) // not a regular file
      const warnings: Array<string> = []
      yield* Effect.scoped(FileIo.atomicFile(target)).pipe(
        Effect.provide(Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => warnings.push(String(message)))))
      )
      expect(Fs.readdirSync(dir).sort()).toEqual([...kept, `out.img.${gone[1]}.partial`].sort())
      expect(warnings).toEqual([`removed ${stale}, which a process that is gone left beside out.img`])
    }))

  // a container's command is pid 1 run after run: one killed (out of memory, docker kill) left OUT.1.partial, and
  // every later run failed "cannot create OUT.1.partial beside it: file already exists" until someone removed it
  it.scopedLive("a temporary file of this process's pid that this process did not make (an earlier process of that pid) is removed too", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const target = Path.join(dir, "out.img")
      const leftover = `out.img.${process.pid}.partial`
      Fs.writeFileSync(Path.join(dir, leftover), "half an image of the run before")
      const warnings: Array<string> = []
      yield* Effect.scoped(Effect.gen(function*() {
        const file = yield* FileIo.atomicFile(target)
        yield* FileIo.transfer("write", file, Buffer.from("whole"), 0, 5, 0)
        yield* file.commit
      })).pipe(
        Effect.provide(Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => warnings.push(String(message)))))
      )
      expect([Fs.readdirSync(dir), Fs.readFileSync(target, "utf8")]).toEqual([["out.img"], "whole"])
      expect(warnings).toEqual([`removed ${leftover}, which a process that is gone left beside out.img`])
    }))
})

describe("FileIo.keepOlder and putBack (undoing a publish of several files)", () => {
  it.scopedLive("the older file kept under a second name is put back, a file that was none removed; a second name a killed process left is removed by the next write", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const [a, b] = [Path.join(dir, "a.img"), Path.join(dir, "b.img")]
      Fs.writeFileSync(a, "older")
      yield* Effect.scoped(Effect.gen(function*() {
        const olders = [yield* FileIo.keepOlder(a), yield* FileIo.keepOlder(b)]
        expect(olders).toEqual([{ existed: true, path: `${a}.${process.pid}.older` }, { existed: false, path: undefined }])
        for (const target of [a, b]) {
          const file = yield* FileIo.atomicFile(target)
          yield* FileIo.transfer("write", file, Buffer.from("newer"), 0, 5, 0)
          yield* file.commit
        }
        yield* FileIo.putBack(a, olders[0]!)
        yield* FileIo.putBack(b, olders[1]!)
      }))
      expect([Fs.readdirSync(dir), Fs.readFileSync(a, "utf8")]).toEqual([["a.img"], "older"])
      const gone = ChildProcess.spawnSync(process.execPath, ["-e", ""]).pid!
      Fs.writeFileSync(Path.join(dir, `a.img.${gone}.older`), "older")
      const warnings: Array<string> = []
      yield* Effect.scoped(FileIo.atomicFile(a)).pipe(
        Effect.provide(Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => warnings.push(String(message)))))
      )
      expect([Fs.readdirSync(dir), warnings]).toEqual([["a.img"], [`removed a.img.${gone}.older, which a process that is gone left beside a.img`]])
    }))
})

describe("FileIo transfers", () => {
  it.scopedLive("a chunked read fills the buffer; a file shorter than asked: Ended at the chunk that met its end", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const path = Path.join(dir, "data")
      const bytes = Crypto.randomBytes(10_000)
      Fs.writeFileSync(path, bytes)
      yield* Effect.scoped(Effect.gen(function*() {
        const file = yield* FileIo.openForReading(path)
        expect(file.size).toBe(10_000)
        const into = Buffer.alloc(10_000)
        yield* FileIo.transferChunked("read", file, into, 0, 4096)
        expect(into.equals(bytes)).toBe(true)
        // three chunks at a time: groups of three, then the one left (and its short end)
        const parallel = Buffer.alloc(10_000)
        yield* FileIo.transferChunked("read", file, parallel, 0, 2048, 3)
        expect(parallel.equals(bytes)).toBe(true)
        const longer = Buffer.alloc(12_000)
        const ended = yield* Effect.flip(FileIo.transferChunked("read", file, longer, 0, 4096))
        expect([ended.step, ended.position, ended.length]).toEqual(["Ended", 8192, 3808])
      }))
      const missing = yield* Effect.flip(Effect.scoped(FileIo.openForReading(Path.join(dir, "nothing"))))
      expect([missing.step, FileIo.describe(missing.cause)]).toEqual(["Open", "no such file or directory"])
      const directory = yield* Effect.flip(Effect.scoped(FileIo.openForReading(dir)))
      expect(directory.step).toBe("NotRegular")
      expect(openFilesIn(dir)).toEqual([])
    }))

  it.scopedLive("a FIFO nobody writes to, a device or a socket is NotRegular at once: opening a FIFO does not wait for a writer", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const fifo = Path.join(dir, "fifo")
      ChildProcess.execFileSync("mkfifo", [fifo])
      const opened = yield* Effect.flip(Effect.scoped(FileIo.openForReading(fifo)))
      expect([opened.step, opened.path]).toEqual(["NotRegular", fifo])
      expect((yield* Effect.flip(Effect.scoped(FileIo.openForReading("/dev/zero")))).step).toBe("NotRegular")
      // a Unix socket cannot be opened at all (ENXIO): still not a regular file, not "no such device or address"
      const socket = Path.join(dir, "socket")
      const server = Net.createServer()
      yield* Effect.acquireRelease(
        Effect.async<void>((resume) => void server.listen(socket, () => resume(Effect.void))),
        () => Effect.async<void>((resume) => void server.close(() => resume(Effect.void)))
      )
      const opened2 = yield* Effect.flip(Effect.scoped(FileIo.openForReading(socket)))
      expect([opened2.step, opened2.path]).toEqual(["NotRegular", socket])
      expect(openFilesIn(dir)).toEqual([])
    }))
})

describe("FileIo.describe", () => {
  it("words the common codes and keeps anything else on one line", () => {
    const error = (code: string) => Object.assign(new Error(`${code}: something, open '/x'`), { code })
    expect(FileIo.describe(error("ENOSPC"))).toBe("no space left on device")
    expect(FileIo.describe(error("ENOTDIR"))).toBe("a component of the path is not a directory")
    expect(FileIo.describe(error("EROFS"))).toBe("read-only file system")
    expect(FileIo.describe(error("EXDEV"))).toBe("EXDEV: something, open '/x'")
    expect(FileIo.describe(new Error("two\n  lines"))).toBe("two lines")
    expect(FileIo.describe("text")).toBe("text")
  })
})
