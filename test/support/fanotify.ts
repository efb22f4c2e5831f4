/**
 * A file written by another process while a reader is in the middle of it, at a moment the test chooses rather than
 * one it hopes for: fanotify's permission events (`FAN_ACCESS_PERM`, Linux, as root) hold each read of the file
 * until a listener answers, and the listener — a small Python script, through ctypes — writes the file before it
 * lets a chosen read through. The reads before it are done by then; the bytes they read are the file's old ones.
 */
import * as ChildProcess from "node:child_process"

/** The listener: `python3 -c SCRIPT PATH AT OFFSET`; it prints `ready` once it watches, `changed` once it wrote. */
const SCRIPT = `
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
path, at, offset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
FAN_CLASS_CONTENT, FAN_CLOEXEC, FAN_MARK_ADD, FAN_ACCESS_PERM, FAN_ALLOW = 0x04, 0x01, 0x01, 0x00020000, 0x01
fan = libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY | os.O_LARGEFILE)
if fan < 0: sys.exit("fanotify_init: " + os.strerror(ctypes.get_errno()))
if libc.fanotify_mark(fan, FAN_MARK_ADD, FAN_ACCESS_PERM, -100, path.encode()) < 0:
    sys.exit("fanotify_mark: " + os.strerror(ctypes.get_errno()))
print("ready", flush=True)
seen = 0
while seen < at:
    events = os.read(fan, 4096)
    i = 0
    while i < len(events):
        length, _, _, _, _, fd, _ = struct.unpack_from("=IBBHQii", events, i)
        seen += 1
        if seen == at:
            # the file written (a page at offset, another's bytes) before this read may go on
            target = os.open(path, os.O_WRONLY)
            os.pwrite(target, b"\\xa5" * 4096, offset)
            os.close(target)
        os.write(fan, struct.pack("=iI", fd, FAN_ALLOW))
        os.close(fd)
        i += length
print("changed", flush=True)
`

/** A listener watching a file: `changed` settles once it wrote the file; `stop` ends it (if it did not end). */
export interface Writer {
  readonly changed: Promise<void>
  readonly stop: () => void
}

/**
 * Watches `path` and, when the `at`-th read of it (counting every process's) starts, writes a page of 0xa5 at
 * `offset`, then lets that read go on. Why it cannot, if it cannot (no python3, not root, no fanotify).
 */
export const writeAtRead = async (path: string, at: number, offset: number): Promise<Writer | string> => {
  const child = ChildProcess.spawn("python3", ["-c", SCRIPT, path, String(at), String(offset)], {
    stdio: ["ignore", "pipe", "pipe"]
  })
  let stdout = ""
  let stderr = ""
  const waiting: Array<() => void> = []
  child.stdout.setEncoding("utf8").on("data", (s: string) => {
    stdout += s
    for (const wake of waiting.splice(0)) wake()
  })
  child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s))
  const ended = new Promise<void>((resolve) => {
    child.once("close", () => resolve())
    child.once("error", () => resolve())
  })
  /** Whether the listener says `line` before it ends. */
  const said = (line: string): Promise<boolean> =>
    new Promise((resolve) => {
      const check = () => {
        if (stdout.split("\n").includes(line)) resolve(true)
        else waiting.push(check)
      }
      check()
      void ended.then(() => resolve(stdout.split("\n").includes(line)))
    })
  const ready = said("ready")
  const changed = said("changed")
  if (!(await ready)) return `cannot watch reads with fanotify here: ${stderr.trim() || "python3 did not start"}`
  return {
    changed: changed.then((done) => {
      if (!done) throw new Error(`the fanotify listener ended without writing the file: ${stderr.trim()}`)
    }),
    stop: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL")
    }
  }
}
