/**
 * The command's signals (src/cli/signals.ts): the first interrupts it, a repeat within a second is the same
 * request delivered twice, a later one (a teardown that takes long: an image flushed to a slow disk) exits at
 * once. Here the command's state while it tears down — its Unix socket listening, its temporary --out, its bar on
 * a terminal — is held open in a scope while the signals come, on a clock the test moves: what the process leaves
 * and prints when it exits at once. (The first signal's teardown is test/cli.test.ts's.) And Ctrl-Z on a terminal,
 * the command a job of a shell with job control in a pseudo-terminal (`script`).
 */
import { afterEach, describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { PassThrough } from "node:stream"
import { inject } from "vitest"
import * as Terminal from "../src/cli/terminal.js"
import * as FromQemu from "../src/cli/fromQemu.js"
import * as Image from "../src/cli/image.js"
import * as Progress from "../src/cli/progress.js"
import * as Signals from "../src/cli/signals.js"
import type * as Migration from "../src/Migration.js"
import * as Transport from "../src/Transport.js"
import { killChildren, start } from "./support/cli.js"
import { tempDirectory } from "./support/files.js"
import * as Screen from "./support/screen.js"
import * as TerminalText from "./support/terminalText.js"

const MIB = 1024 * 1024

const report = (doneBytes: number, totalBytes: number): Migration.Progress => ({
  round: 0,
  phase: "precopy",
  doneBytes,
  totalBytes,
  dirtyPages: (totalBytes - doneBytes) / 4096,
  bandwidth: 0,
  expectedDowntimeMs: 0
})

/**
 * A process to hand `Signals.make`: its clock set by the test (the timers it set run when the clock passes them),
 * what it printed, how it exited, the files it is flushing to disk.
 */
const fakeProcess = (argv: ReadonlyArray<string>) => {
  const printed = { stdout: "", stderr: "" }
  const exits: Array<number> = []
  let now = 0
  let timers: Array<{ readonly at: number; readonly f: () => void }> = []
  const flushing: Array<string> = []
  // whether the command printed its --json object already
  const stdout = { reported: false }
  const io: Signals.Io = {
    argv,
    now: () => now,
    stdout: { write: (text) => (printed.stdout += text) },
    stderr: { write: (text) => (printed.stderr += text) },
    exit: (code) => void exits.push(code),
    later: (ms, f) => void timers.push({ at: now + ms, f }),
    flushing: () => flushing,
    reported: () => stdout.reported
  }
  const at = (ms: number) => {
    now = ms
    const due = timers.filter((timer) => timer.at <= ms)
    timers = timers.filter((timer) => timer.at > ms)
    for (const timer of due) timer.f()
  }
  return { io, printed, exits, at, flushing, stdout }
}

// a signal in the turn between the command's --json object and its exit (recv closing its image's handle) printed a
// second object, "Interrupted", after the result: a script reading one object got two
describe("a signal after the command printed its --json object", () => {
  it("prints no second object, at the teardown's end or on a second signal; without one printed, each prints it", () => {
    const argv = ["recv", "tcp:127.0.0.1:4444", "--out", "image.out", "--json"]
    const done = fakeProcess(argv)
    done.stdout.reported = true
    expect(Signals.interrupted("SIGTERM", done.io)).toBe(143)
    const signals = Signals.make(done.io)
    signals.on("SIGTERM")
    done.at(1500)
    signals.on("SIGINT")
    expect(done.printed.stdout).toBe("")
    expect(done.printed.stderr).toBe("multifd: interrupted by SIGTERM\nmultifd: SIGINT again: exiting at once (the peer is not told)\n")
    expect(done.exits).toEqual([130])

    const early = fakeProcess(argv)
    expect(Signals.interrupted("SIGTERM", early.io)).toBe(143)
    expect(JSON.parse(early.printed.stdout)).toEqual({ error: { tag: "Interrupted", reason: "SIGTERM", message: "interrupted by SIGTERM" } })
    // without --json, stdout stays empty whatever came
    const plain = fakeProcess(argv.slice(0, -1))
    Signals.interrupted("SIGINT", plain.io)
    expect(plain.printed).toEqual({ stdout: "", stderr: "multifd: interrupted by SIGINT\n" })
  })
})

describe("a second signal while the command tears down", () => {
  it.scoped("exits at once with the signal's code, its socket file, temporary --out and hidden cursor not left behind, and the --json object printed", () =>
    Effect.gen(function*() {
      const dir = yield* tempDirectory("multifd-signals-")
      const socket = Path.join(dir, "recv.sock")
      const out = Path.join(dir, "image.out")
      // what recv holds while it tears down: its listener, its temporary file, its bar on a terminal
      yield* Transport.listen({ _tag: "Unix", path: socket })
      const image = yield* Image.create(out)
      let drawn = ""
      const tty = Object.assign(new PassThrough(), { isTTY: true, columns: 120 })
      tty.setEncoding("utf8").on("data", (s: string) => (drawn += s))
      const onProgress = (yield* Progress.make("recv", { stream: tty, term: "xterm-256color" }).pipe(
        Effect.provide(Terminal.layer)
      ))!
      yield* onProgress(report(0, 64 * MIB))
      yield* onProgress(report(32 * MIB, 64 * MIB))
      yield* Effect.promise(() => new Promise<void>((resolve) => setImmediate(resolve)))
      expect(drawn).toContain("\x1b[?25l") // the bar hid the cursor
      expect(Fs.lstatSync(socket).isSocket()).toBe(true)
      expect(Fs.existsSync(image.temporary)).toBe(true)

      const process = fakeProcess(["recv", `unix:${socket}`, "--out", out, "--json"])
      const signals = Signals.make(process.io)
      signals.on("SIGINT")
      // Ctrl-C again within the second (the terminal's group, npm forwarding it): the same request
      process.at(400)
      signals.on("SIGINT")
      expect({ exits: process.exits, first: signals.first() }).toEqual({ exits: [], first: "SIGINT" })
      // the teardown is still at work 1.5 s later: a second request
      process.at(1500)
      signals.on("SIGTERM")
      yield* Effect.promise(() => new Promise<void>((resolve) => setImmediate(resolve)))

      expect(process.exits).toEqual([143])
      expect(process.printed.stderr).toBe("multifd: SIGTERM again: exiting at once (the peer is not told)\n")
      // a script reads one JSON object, as from any other ending (it read nothing)
      expect(process.printed.stdout.endsWith("\n")).toBe(true)
      expect(JSON.parse(process.printed.stdout)).toEqual({
        error: {
          tag: "Interrupted",
          reason: "SIGTERM",
          message: "interrupted by SIGTERM again: exited at once (the peer was not told)"
        }
      })
      // the cursor shown again and the bar's line ended (the shell's prompt went on after the bar)
      const after = drawn.slice(drawn.lastIndexOf("\x1b[?25l"))
      expect(after).toContain("\x1b[?25h")
      expect(after.endsWith("\n")).toBe(true)
      // no stale socket (the next recv would have had to probe it), no temporary file
      expect(Fs.readdirSync(dir)).toEqual([])
    }))

  it.scoped("recv --from-qemu --out-dir: the directories it created are removed (each only if empty), as its failure removes them", () =>
    Effect.gen(function*() {
      const dir = yield* tempDirectory("multifd-signals-")
      const kept = Path.join(dir, "kept")
      Fs.mkdirSync(kept)
      // created by the command: kept/a and kept/a/b; one block's file being written in it
      const outDir = Path.join(kept, "a", "b")
      yield* FromQemu.outputDirectory(outDir)
      const block = yield* Image.create(Path.join(outDir, "pc.ram"))
      expect(Fs.existsSync(block.temporary)).toBe(true)
      const process = fakeProcess(["recv", "tcp:127.0.0.1:0", "--from-qemu", "--channels", "2", "--out-dir", outDir])
      const signals = Signals.make(process.io)
      signals.on("SIGTERM")
      process.at(2000)
      signals.on("SIGINT")
      expect(process.exits).toEqual([130])
      // the directory that existed stays
      expect(Fs.readdirSync(dir)).toEqual(["kept"])
      expect(Fs.readdirSync(kept)).toEqual([])
    }))

  it.scoped("without --json stdout stays empty; a socket file that is no longer the listener's is left alone", () =>
    Effect.gen(function*() {
      const dir = yield* tempDirectory("multifd-signals-")
      const socket = Path.join(dir, "recv.sock")
      yield* Transport.listen({ _tag: "Unix", path: socket })
      // someone else's file now at the path (the listener's was removed under it)
      Fs.unlinkSync(socket)
      Fs.writeFileSync(socket, "not ours")
      const process = fakeProcess(["recv", `unix:${socket}`, "--out", Path.join(dir, "x")])
      const signals = Signals.make(process.io)
      signals.on("SIGHUP")
      process.at(1000)
      signals.on("SIGHUP")
      expect(process.exits).toEqual([129])
      expect(process.printed.stdout).toBe("")
      expect(Fs.readFileSync(socket, "utf8")).toBe("not ours")
    }))
})

// the first Ctrl-C during a long flush (an image of GiBs to a slow disk, which Node cannot cancel) printed nothing
// until the flush ended: the user could not tell whether the signal was heard, nor that a second one would end it
describe("a first signal whose teardown takes long", () => {
  it("says, STILL_MS after it, what the command waits for and that the signal again exits at once; a quick teardown prints nothing more", () => {
    const process = fakeProcess(["recv", "tcp:127.0.0.1:0", "--out", "/tmp/x.out"])
    const signals = Signals.make(process.io)
    signals.on("SIGINT")
    process.at(Signals.STILL_MS - 1)
    expect(process.printed).toEqual({ stdout: "", stderr: "" })
    process.flushing.push("/tmp/x.out")
    process.at(Signals.STILL_MS)
    expect(process.printed.stderr).toBe(
      "multifd: stopping after SIGINT: waiting for /tmp/x.out to be flushed to disk (SIGINT again exits at once)\n"
    )
    expect({ stdout: process.printed.stdout, exits: process.exits }).toEqual({ stdout: "", exits: [] })
    // as it says
    process.at(Signals.STILL_MS + 10)
    signals.on("SIGINT")
    expect(process.exits).toEqual([130])

    // nothing being flushed: still closing down (the peer told, sockets closed); a name is one printable line
    const other = fakeProcess(["send", "tcp:127.0.0.1:1", "--in", "x", "--json"])
    Signals.make(other.io).on("SIGTERM")
    other.at(Signals.STILL_MS)
    expect(other.printed).toEqual({
      stdout: "",
      stderr: "multifd: stopping after SIGTERM: still closing down (SIGTERM again exits at once)\n"
    })
    expect(Signals.stillStopping("SIGHUP", ["/tmp/a\nb\x1b[2J.out"]).split("\n")).toHaveLength(2)
    expect(Signals.stillStopping("SIGHUP", ["/tmp/a\nb\x1b[2J.out"])).not.toContain("\x1b")
  })

  afterEach(killChildren)

  /** Whether strace can run a command here (installed, ptrace allowed). */
  const straceWorks = ChildProcess.spawnSync("strace", ["-f", "-qq", "-o", "/dev/null", "true"]).status === 0

  // the real command: each fsync held for 3 s by strace (fault injection), as a slow disk holds a big image's
  it("recv given SIGINT while its image is flushed to disk says, 2 s on, that it waits for that flush; then the image is in place and it exits 130 (strace delays the fsync)", async (ctx) => {
    if (!straceWorks) ctx.skip()
    const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "multifd-flush-"))
    const running: Array<() => void> = []
    try {
      const socket = Path.join(dir, "recv.sock")
      const out = Path.join(dir, "image.out")
      const image = Path.join(dir, "image.raw")
      Fs.writeFileSync(image, Crypto.randomBytes(4 * 1024 * 1024))
      // strace's trace through cat on stdout (recv writes nothing there without --json): "fsync(" comes as the
      // call starts
      const recv = ChildProcess.spawn("strace", [
        "-f", "-qq", "-o", "|cat", "-e", "trace=fsync", "-e", "inject=fsync:delay_enter=3000000",
        process.execPath, inject("cliBundle"), "recv", `unix:${socket}`, "--out", out
      ], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1" } })
      running.push(() => recv.kill("SIGKILL"))
      const timer = setTimeout(() => recv.kill("SIGKILL"), 40_000)
      let stderr = ""
      let traced = ""
      recv.stderr!.setEncoding("utf8").on("data", (s: string) => (stderr += s))
      recv.stdout!.setEncoding("utf8").on("data", (s: string) => (traced += s))
      const exited = new Promise<number | null>((resolve) =>
        recv.once("close", (code) => {
          clearTimeout(timer)
          resolve(code)
        })
      )
      /** Waits until `text()` matches `pattern` as `stream` brings more; fails if the command ends first. */
      const seen = (pattern: RegExp, text: () => string, stream: NodeJS.ReadableStream) =>
        new Promise<void>((resolve, reject) => {
          const check = () => {
            if (!pattern.test(text())) return
            stream.off("data", check)
            resolve()
          }
          stream.on("data", check)
          void exited.then((code) => reject(new Error(`recv ended (${code}) before ${pattern}: ${stderr}`)))
          check()
        })
      await seen(/listening on/, () => stderr, recv.stderr!)
      // the command's own pid (strace's child) is in its temporary file's name
      const partial = Fs.readdirSync(dir).find((name) => name.endsWith(".partial"))!
      const pid = Number(/\.(\d+)\.partial$/.exec(partial)![1])
      running.push(() => {
        try {
          process.kill(pid, "SIGKILL")
        } catch {
          // gone
        }
      })
      const send = start(["send", `unix:${socket}`, "--in", image])
      await seen(/fsync\(/, () => traced, recv.stdout!)
      process.kill(pid, "SIGINT")
      // before, nothing until the flush ended (minutes for a big image on a slow disk)
      await seen(/stopping after SIGINT/, () => stderr, recv.stderr!)
      expect(await exited).toBe(130)
      const sent = await send.finished
      // the image was stored before the interruption took effect: the source heard Done
      expect(sent.code, sent.stderr).toBe(0)
      // (its progress line every 5 s aside)
      expect(stderr.split("\n").filter((line) => line.length > 0 && !line.startsWith("multifd: recv:")).slice(1)).toEqual([
        expect.stringMatching(/^multifd: stopping after SIGINT: waiting for \S*image\.out to be flushed to disk \(SIGINT again exits at once\)$/),
        `multifd: ${out} holds the verified image: it was stored before the interruption`,
        "multifd: interrupted by SIGINT"
      ])
      expect(Fs.readFileSync(out).equals(Fs.readFileSync(image))).toBe(true)
      expect(Fs.readdirSync(dir).sort()).toEqual(["image.out", "image.raw"])
    } finally {
      for (const kill of running) kill()
      Fs.rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe("Ctrl-Z on a terminal while the progress bar is drawn", () => {
  const SHOW_CURSOR = "\x1b[?25h"
  const HIDE_CURSOR = "\x1b[?25l"
  const WRAP_LINES = "\x1b[?7h"
  const NO_WRAP = "\x1b[?7l"
  afterEach(killChildren)

  // the process stopped where it stood, the cursor hidden: the shell's prompt came back without one
  it("SIGTSTP shows the cursor and wraps lines again before the process stops, SIGCONT (fg) hides it again, and the migration completes", async () => {
    const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "multifd-tstp-"))
    const terminals: Array<ChildProcess.ChildProcess> = []
    try {
      const socket = Path.join(dir, "recv.sock")
      const out = Path.join(dir, "image.out")
      const image = Path.join(dir, "image.raw")
      Fs.writeFileSync(image, Crypto.randomBytes(2 * 1024 * 1024))
      // recv as a job of its own (set -m) of a shell on a pseudo-terminal: a stop signal stops it (one to a
      // process of an orphaned group, as the session's leader, is discarded), and the shell says when it stopped
      const job = `set -m; "$NODE" "$BUNDLE" recv "unix:$SOCKET" --out "$OUT" & echo "pid=$!"; wait -f $!; echo "recv exited $?"`
      const terminal = ChildProcess.spawn("script", ["-qfec", "bash -c \"$JOB\"", "/dev/null"], {
        stdio: ["pipe", "pipe", "pipe"],
        env: {
          ...process.env,
          TERM: "xterm-256color",
          NO_COLOR: "1",
          JOB: job,
          NODE: process.execPath,
          BUNDLE: inject("cliBundle"),
          SOCKET: socket,
          OUT: out
        }
      })
      terminals.push(terminal)
      const { shown, text } = TerminalText.watch(terminal)
      const pid = Number((await shown(/pid=(\d+)/))[1])
      await shown(/multifd: listening on unix:/)
      // about two seconds: the bar is drawn meanwhile
      const send = start(["send", `unix:${socket}`, "--in", image, "--max-bandwidth", "1M"])
      await shown(/recv \[/)
      const mark = text().length
      process.kill(pid, "SIGTSTP")
      await shown(/Stopped/)
      const beforeStop = text().slice(mark, text().indexOf("Stopped", mark))
      expect(beforeStop.lastIndexOf(SHOW_CURSOR), JSON.stringify(beforeStop)).toBeGreaterThan(beforeStop.lastIndexOf(HIDE_CURSOR))
      // and lines wrap again (the bar turned wrapping off)
      expect(beforeStop.lastIndexOf(WRAP_LINES)).toBeGreaterThan(beforeStop.lastIndexOf(NO_WRAP))
      const resumed = text().length
      process.kill(pid, "SIGCONT")
      const sent = await send.finished
      await shown(/recv exited (\d+)/)
      expect(sent.code, sent.stderr).toBe(0)
      expect(/recv exited (\d+)/.exec(text())![1]).toBe("0")
      // hidden again while the bar is drawn, shown once it ends
      const after = text().slice(resumed)
      expect(after.indexOf(HIDE_CURSOR)).toBeGreaterThanOrEqual(0)
      expect(after.lastIndexOf(SHOW_CURSOR)).toBeGreaterThan(after.indexOf(HIDE_CURSOR))
      // the screen ends with the bar's last frame and the summary below it, the shell's "Stopped" line kept: the
      // bar's end put the cursor back on the line where the bar had started, before the stop, and the summary was
      // written over the "Stopped" line, the shell's next line over the bar
      const screen = Screen.render(text(), 1000).filter((row) => row !== "")
      const stopped = screen.filter((row) => /Stopped/.test(row))
      expect(stopped, JSON.stringify(text())).toHaveLength(1)
      const summary = screen.findIndex((row) => /^multifd: received 2\.00 MiB /.test(row))
      expect(screen[summary - 1]).toMatch(/^recv \[\u2588+\] 100% /)
      expect(screen.indexOf(stopped[0]!)).toBeLessThan(summary - 1)
      expect(screen.at(-1)).toBe("recv exited 0")
      expect(Fs.readFileSync(out).equals(Fs.readFileSync(image))).toBe(true)
    } finally {
      for (const terminal of terminals) terminal.kill("SIGKILL")
      Fs.rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe("a connect or listen whose host name lookup hangs (a DNS server that does not answer)", () => {
  afterEach(killChildren)

  /**
   * Whether this process may make namespaces (a network and a mount namespace of its own: root, unshare) and bring
   * up the loopback there (iproute2's ip), where the silent DNS server listens.
   */
  const namespaces = ChildProcess.spawnSync("unshare", ["-mn", "ip", "link", "set", "lo", "up"]).status === 0

  // the lookup holds a thread of libuv's pool, which process.exit waits for: the command said "interrupted" and
  // hung for as long as the resolver's timeouts and attempts take, deaf to any further signal
  // recv's listen on a host name looks it up too (every address of it)
  for (const [command, args] of [["send", `--in "$IMAGE"`], ["recv", `--out "$IMAGE.out"`]] as const) {
  it(`${command} interrupted then ends at once, by the signal (a shell sees 130), with its one interrupted line`, async (ctx) => {
    if (!namespaces) ctx.skip()
    const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "multifd-dns-"))
    const servers: Array<number> = []
    try {
      const image = Path.join(dir, "image.raw")
      Fs.writeFileSync(image, Crypto.randomBytes(64 * 1024))
      const resolv = Path.join(dir, "resolv.conf")
      // one server, asked once for 3 s: without the fix the command ended after that, exit 130 (not by its signal)
      Fs.writeFileSync(resolv, "nameserver 127.0.0.1\noptions timeout:3 attempts:1\n")
      const ready = Path.join(dir, "ready")
      // in namespaces of its own: a resolv.conf naming a DNS server on its loopback that reads and never answers;
      // unshare and sh exec, so the command is the child itself
      const script = [
        "ip link set lo up",
        `mount --bind "$RESOLV" /etc/resolv.conf`,
        `mkfifo "$READY"`,
        `"$NODE" -e 'const s = require("dgram").createSocket("udp4"); s.on("message", () => process.stderr.write("asked\\n")); s.bind(53, "127.0.0.1", () => require("fs").writeFileSync(process.env.READY, String(process.pid))); setTimeout(() => process.exit(), 30000)' >/dev/null &`,
        `read server < "$READY"`,
        `echo "dns=$server" >&2`,
        `exec "$NODE" "$BUNDLE" ${command} tcp:migrate.example.com:4444 ${args}`
      ].join("\n")
      const send = ChildProcess.spawn("unshare", ["-mn", "sh", "-c", script], {
        stdio: ["ignore", "pipe", "pipe"],
        env: { ...process.env, NO_COLOR: "1", NODE: process.execPath, BUNDLE: inject("cliBundle"), RESOLV: resolv, READY: ready, IMAGE: image }
      })
      const timer = setTimeout(() => send.kill("SIGKILL"), 20_000)
      let stderr = ""
      send.stderr!.setEncoding("utf8").on("data", (s: string) => (stderr += s))
      const exited = new Promise<{ readonly code: number | null; readonly signal: NodeJS.Signals | null }>((resolve) =>
        send.once("exit", (code, signal) => {
          clearTimeout(timer)
          resolve({ code, signal })
        })
      )
      await new Promise<void>((resolve, reject) => {
        const check = () => {
          const m = /dns=(\d+)/.exec(stderr)
          if (m === null) return
          servers.push(Number(m[1]))
          send.stderr!.off("data", check)
          resolve()
        }
        send.stderr!.on("data", check)
        void exited.then(() => reject(new Error(`ended first: ${stderr}`)))
      })
      // the command's lookup has reached the silent server
      await new Promise<void>((resolve, reject) => {
        const check = () => {
          if (!/^asked$/m.test(stderr)) return
          send.stderr!.off("data", check)
          resolve()
        }
        send.stderr!.on("data", check)
        void exited.then(() => reject(new Error(`ended first: ${stderr}`)))
        check()
      })
      send.kill("SIGINT")
      const ended = await exited
      expect(ended).toEqual({ code: null, signal: "SIGINT" })
      expect(stderr.split("\n").filter((line) => line.startsWith("multifd:"))).toEqual(["multifd: interrupted by SIGINT"])
    } finally {
      for (const pid of servers) {
        try {
          process.kill(pid, "SIGKILL")
        } catch {
          // gone
        }
      }
      Fs.rmSync(dir, { recursive: true, force: true })
    }
  })
  }
})
