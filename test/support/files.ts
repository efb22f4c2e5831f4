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
