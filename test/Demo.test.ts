/**
 * `npm start` (examples/demo.ts), as a newcomer runs it: without a terminal (a plain line per quarter), and with
 * its knobs (DEMO_SIZE_MIB, DEMO_CHANNELS) given badly, which is one line and exit 2, never a stack trace; and
 * Ctrl-C while its bar is drawn on a terminal (a pseudo-terminal: `script`).
 */
import * as ChildProcess from "node:child_process"
import * as Path from "node:path"
import { afterEach, describe, expect, inject, it } from "vitest"
import * as TerminalText from "./support/terminalText.js"

const ROOT = Path.resolve(import.meta.dirname, "..")

/** The demo as `npm start` runs it (tsx), or bundled (test/support/cliBundle.ts) for the runs that test its knobs. */
const DEMO = { tsx: ["--import", "tsx", "examples/demo.ts"], bundled: [Path.join(inject("examplesBundle"), "demo.js")] }

const demo = (env: Record<string, string>, entry: keyof typeof DEMO = "bundled") =>
  ChildProcess.spawnSync(process.execPath, DEMO[entry], {
    cwd: ROOT,
    encoding: "utf8",
    timeout: 60_000,
    env: { ...process.env, NO_COLOR: "1", ...env }
  })

describe("npm start (examples/demo.ts)", () => {
  it("migrates and verifies, its progress in plain lines on stderr when that is not a terminal", () => {
    const ran = demo({ DEMO_SIZE_MIB: "8", DEMO_CHANNELS: "2" }, "tsx")
    expect({ code: ran.status, stderr: ran.stderr }).toMatchObject({ code: 0, stderr: expect.stringMatching(/^migrating: 100%$/m) })
    expect(ran.stdout).toMatch(/^verified: destination memory is byte-identical/m)
  })

  it.each([
    ["DEMO_SIZE_MIB", "-4", "DEMO_SIZE_MIB must be a whole number from 1 to 1048576, not \"-4\""],
    ["DEMO_SIZE_MIB", "lots", "DEMO_SIZE_MIB must be a whole number from 1 to 1048576, not \"lots\""],
    ["DEMO_CHANNELS", "0", "DEMO_CHANNELS must be a whole number from 1 to 255, not \"0\""]
  ])("%s=%s is one line and exit 2", (name, value, message) => {
    const ran = demo({ [name]: value })
    expect({ code: ran.status, stdout: ran.stdout, stderr: ran.stderr }).toEqual({ code: 2, stdout: "", stderr: `demo: ${message}\n` })
  })

  const terminals: Array<ChildProcess.ChildProcess> = []
  afterEach(() => {
    for (const terminal of terminals.splice(0)) terminal.kill("SIGKILL")
  })

  // killed where it stood by SIGINT, the demo left the terminal with its cursor hidden and line wrapping off
  it("Ctrl-C while the bar is drawn: the terminal gets its cursor and line wrapping back, one line, exit 130", async () => {
    // the demo as a job of its own (set -m) of a shell on a pseudo-terminal, which says how it ended
    const job = `set -m; "$NODE" "$DEMO" & echo "pid=$!"; wait -f $!; echo "demo exited $?"`
    const terminal = ChildProcess.spawn("script", ["-qfec", "bash -c \"$JOB\"", "/dev/null"], {
      cwd: ROOT,
      stdio: ["pipe", "pipe", "pipe"],
      env: { ...process.env, TERM: "xterm-256color", NO_COLOR: "1", JOB: job, NODE: process.execPath, DEMO: DEMO.bundled[0], DEMO_SIZE_MIB: "512" }
    })
    terminals.push(terminal)
    const { shown, text } = TerminalText.watch(terminal)
    const pid = Number((await shown(/pid=(\d+)/))[1])
    await shown(/migrating \[/)
    process.kill(pid, "SIGINT")
    const code = (await shown(/demo exited (\d+)/))[1]
    const drawn = text().slice(text().indexOf("migrating ["))
    expect(drawn.lastIndexOf("\x1b[?25h"), JSON.stringify(drawn.slice(-300))).toBeGreaterThan(drawn.lastIndexOf("\x1b[?25l"))
    expect(drawn.lastIndexOf("\x1b[?7h")).toBeGreaterThan(drawn.lastIndexOf("\x1b[?7l"))
    expect(text()).toMatch(/^demo: interrupted by SIGINT\r?$/m)
    expect(code).toBe("130")
  })
})
