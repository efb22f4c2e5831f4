/**
 * A file written by another process while a reader is in the middle of it, at a moment the test chooses rather than
 * one it hopes for: fanotify's permission events (`FAN_ACCESS_PERM`, Linux, as root) hold each read of the file
 * until a listener answers, and the listener — a small Python script, through ctypes — writes the file before it
 * lets a chosen read through. The reads before it are done by then; the bytes they read are the file's old ones.
 * The reader must open the file after the listener is ready: Linux (6.14 on) gives no permission events for a file
 * opened while nobody watched for them.
 */
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs/promises"
import * as Os from "node:os"
import * as Path from "node:path"

/** The listener: `python3 -c SCRIPT PATH AT OFFSET`; it prints `ready` once it watches, `changed` once it wrote. */
const SCRIPT = `
import ctypes, os, select, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
path, at, offset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
FAN_CLASS_CONTENT, FAN_CLOEXEC, FAN_MARK_ADD, FAN_ACCESS_PERM, FAN_ALLOW = 0x04, 0x01, 0x01, 0x00020000, 0x01
fan = libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY | os.O_LARGEFILE)
if fan < 0: sys.exit("fanotify_init: " + os.strerror(ctypes.get_errno()))
if libc.fanotify_mark(fan, FAN_MARK_ADD, FAN_ACCESS_PERM, -100, path.encode()) < 0:
    sys.exit("fanotify_mark: " + os.strerror(ctypes.get_errno()))
print("ready", flush=True)
# at 0: armed by a line on stdin, the next read then counts as the first
armed = at > 0
at = max(at, 1)
seen = 0
done = False
while seen < at:
    ready, _, _ = select.select([fan] + ([] if armed else [0]), [], [])
    if 0 in ready:
        sys.stdin.readline()
        armed = True
        print("armed", flush=True)
        continue
    events = os.read(fan, 4096)
    i = 0
    while i < len(events):
        length, _, _, _, _, fd, _ = struct.unpack_from("=IBBHQii", events, i)
        if armed: seen += 1
        if seen == at and armed and not done:
            done = True
            # the file written (a page at offset, another's bytes) before this read may go on
            target = os.open(path, os.O_WRONLY)
            os.pwrite(target, b"\\xa5" * 4096, offset)
            os.close(target)
        os.write(fan, struct.pack("=iI", fd, FAN_ALLOW))
        os.close(fd)
        i += length
print("changed", flush=True)
`

/**
 * A listener watching a file: `changed` settles once it wrote the file; `arm` (for `at` 0) starts counting reads
 * from the next one; `stop` ends it (if it did not end).
 */
export interface Writer {
  readonly changed: Promise<void>
  readonly arm: () => Promise<void>
  readonly stop: () => void
}

/**
 * Watches `path` and, when the `at`-th read of it (counting every process's) starts, writes a page of 0xa5 at
 * `offset`, then lets that read go on; `at` 0: the first read once `arm` returned. Why it cannot, if it cannot (no
 * python3, not root, no fanotify).
 */
export const writeAtRead = async (path: string, at: number, offset: number): Promise<Writer | string> => {
  const cannot = await (probed ??= probe())
  return cannot ?? listen(path, at, offset)
}

/** Why permission events cannot be used here, if they cannot (found once a process). */
let probed: Promise<string | undefined> | undefined

/**
 * Whether a listener here sees reads at all: a mark can succeed where no permission event ever comes (a file
 * system that does not deliver them), and a test would then wait for a write that never happens.
 */
const probe = async (): Promise<string | undefined> => {
  const dir = await Fs.mkdtemp(Path.join(Os.tmpdir(), "emfd-fanotify-"))
  try {
    const file = Path.join(dir, "probe")
    await Fs.writeFile(file, Buffer.alloc(4096, 0x5a))
    const writer = await listen(file, 1, 0)
    if (typeof writer === "string") return writer
    try {
      await Fs.readFile(file)
      const changed = await Promise.race([
        writer.changed.then(() => true, () => false),
        new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 5000).unref())
      ])
      return changed ? undefined : "fanotify delivers no permission event for a read here"
    } finally {
      writer.stop()
    }
  } finally {
    await Fs.rm(dir, { recursive: true, force: true })
  }
}

const listen = async (path: string, at: number, offset: number): Promise<Writer | string> => {
  const child = ChildProcess.spawn("python3", ["-c", SCRIPT, path, String(at), String(offset)], {
    stdio: ["pipe", "pipe", "pipe"]
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
    arm: async () => {
      const armed = said("armed")
      child.stdin.write("arm\n")
      if (!(await armed)) throw new Error(`the fanotify listener ended before it was armed: ${stderr.trim()}`)
    },
    changed: changed.then((done) => {
      if (!done) throw new Error(`the fanotify listener ended without writing the file: ${stderr.trim()}`)
    }),
    stop: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL")
    }
  }
}
