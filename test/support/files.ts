/**
 * Files for tests: a temporary directory per test, and the check that nothing is left open under it.
 */
import * as Effect from "effect/Effect"
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"

/** A fresh directory (its name starts with `prefix`) for the scope, removed with whatever is left in it. */
export const tempDirectory = (prefix: string) =>
  Effect.acquireRelease(
    Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), prefix))),
    (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
  )

/**
 * Descriptors this process has open on files under `dir` (Linux: /proc/self/fd). Node 20's
 * `process.getActiveResourcesInfo()` does not list an open, idle `FileHandle` at all — only requests in flight
 * (`FSReqPromise`, `FSReqCallback`, `CloseReq`) — so the descriptor table is the real check.
 */
export const openFilesIn = (dir: string): ReadonlyArray<string> => {
  if (!Fs.existsSync("/proc/self/fd")) return []
  const open: Array<string> = []
  for (const fd of Fs.readdirSync("/proc/self/fd")) {
    try {
      const target = Fs.readlinkSync(`/proc/self/fd/${fd}`)
      if (target.startsWith(dir)) open.push(target)
    } catch {
      // closed meanwhile (the descriptor readdir itself used)
    }
  }
  return open
}

/**
 * Mounts a tmpfs of `size` (`1m`, `12m`) at `mountpoint`, a really small file system; why not, if it cannot
 * (mounting needs root). The caller unmounts it (`umount`).
 */
export const mountTmpfs = (mountpoint: string, size: string): string | undefined => {
  Fs.mkdirSync(mountpoint, { recursive: true })
  try {
    ChildProcess.execFileSync("mount", ["-t", "tmpfs", "-o", `size=${size}`, "tmpfs", mountpoint], { stdio: "pipe" })
    return undefined
  } catch (error) {
    const stderr = (error as { stderr?: Buffer }).stderr?.toString().trim()
    return stderr !== undefined && stderr.length > 0 ? stderr : String(error)
  }
}

/**
 * Runs `body` with a tmpfs of `size` mounted at `mountpoint`, unmounted after it whatever happens; skips the
 * test (saying why) where mounting is not allowed.
 */
export const onTmpfs = async (
  ctx: { readonly skip: (note: string) => void },
  mountpoint: string,
  size: string,
  body: () => Promise<void>
): Promise<void> => {
  const why = mountTmpfs(mountpoint, size)
  if (why !== undefined) return ctx.skip(`cannot mount a ${size.toUpperCase().replace("M", " MiB")} tmpfs here (needs root): ${why}`)
  try {
    await body()
  } finally {
    ChildProcess.execFileSync("umount", [mountpoint])
  }
}

/**
 * Runs `body` with a fresh ext4 file system loop-mounted at `mountpoint`, unmounted (and its file removed) after it
 * whatever happens; `body` gets the path of its ext4 sysfs directory (`trigger_fs_error` there, where the kernel has
 * it, makes the kernel remount it read-only, as after a real error). Skips the test (saying why) where that cannot be done (it needs root,
 * loop devices and mkfs.ext4).
 *
 * By default it is 16 MiB in a file beside `mountpoint`, journalled, mounted errors=remount-ro. With `backing` (a size,
 * `3m`) it is 64 MiB in a file on a tmpfs of that size, which it outgrows: a write then succeeds (into the page cache,
 * the file system sees room) and only its writeback fails, so that an fsync says "no space left on device", as on
 * thin-provisioned storage; it has no journal (a failed journal write would make it read-only) and errors=continue.
 */
export const onExt4 = async (
  ctx: { readonly skip: (note: string) => void },
  mountpoint: string,
  body: (sysfs: string) => Promise<void>,
  options: { readonly backing?: string | undefined } = {}
): Promise<void> => {
  const step = (command: string, args: ReadonlyArray<string>): string | undefined => {
    try {
      ChildProcess.execFileSync(command, args, { stdio: "pipe" })
      return undefined
    } catch (error) {
      const stderr = (error as { stderr?: Buffer }).stderr?.toString().trim()
      return `${command}: ${stderr !== undefined && stderr.length > 0 ? stderr : String(error)}`
    }
  }
  const backing = `${mountpoint}.backing`
  if (options.backing !== undefined) {
    const why = mountTmpfs(backing, options.backing)
    if (why !== undefined) return ctx.skip(`cannot mount a tmpfs for an ext4 file system here (needs root): ${why}`)
  }
  const image = options.backing === undefined ? `${mountpoint}.ext4` : Path.join(backing, "fs.ext4")
  const cleanUp = () => {
    Fs.rmSync(image, { force: true })
    if (options.backing !== undefined) ChildProcess.execFileSync("umount", [backing])
  }
  Fs.mkdirSync(mountpoint, { recursive: true })
  Fs.writeFileSync(image, "")
  Fs.truncateSync(image, (options.backing === undefined ? 16 : 64) * 1024 * 1024)
  const why = options.backing === undefined
    ? step("mkfs.ext4", ["-q", "-F", image]) ?? step("mount", ["-o", "loop,errors=remount-ro", image, mountpoint])
    : step("mkfs.ext4", ["-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=0", image]) ??
      step("mount", ["-o", "loop,errors=continue", image, mountpoint])
  if (why !== undefined) {
    cleanUp()
    return ctx.skip(`cannot mount an ext4 file system here (needs root and loop devices): ${why}`)
  }
  try {
    const device = ChildProcess.execFileSync("findmnt", ["-n", "-o", "SOURCE", mountpoint], { encoding: "utf8" }).trim()
    await body(Path.join("/sys/fs/ext4", Path.basename(device)))
  } finally {
    ChildProcess.execFileSync("umount", [mountpoint])
    cleanUp()
  }
}
