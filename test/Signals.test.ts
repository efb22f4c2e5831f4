/**
 * The command's signals (src/cli/signals.ts): the first interrupts it, a repeat within a second is the same
 * request delivered twice, a later one (a teardown that takes long: an image flushed to a slow disk) exits at
 * once. Here the command's state while it tears down — its Unix socket listening, its temporary --out, its bar on
 * a terminal — is held open in a scope while the signals come, on a clock the test moves: what the process leaves
 * and prints when it exits at once. (The first signal's teardown is test/cli.test.ts's.)
 */
import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import { PassThrough } from "node:stream"
import * as Terminal from "../src/cli/terminal.js"
import * as Image from "../src/cli/image.js"
import * as Progress from "../src/cli/progress.js"
import * as Signals from "../src/cli/signals.js"
import type * as Migration from "../src/Migration.js"
import * as Transport from "../src/Transport.js"
import { tempDirectory } from "./support/files.js"

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

/** A process to hand `Signals.make`: its clock set by the test, what it printed, how it exited. */
const fakeProcess = (argv: ReadonlyArray<string>) => {
  const printed = { stdout: "", stderr: "" }
  const exits: Array<number> = []
  let now = 0
  const io: Signals.Io = {
    argv,
    now: () => now,
    stdout: { write: (text) => (printed.stdout += text) },
    stderr: { write: (text) => (printed.stderr += text) },
    exit: (code) => void exits.push(code)
  }
  return { io, printed, exits, at: (ms: number) => void (now = ms) }
}

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
