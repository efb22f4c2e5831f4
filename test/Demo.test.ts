/**
 * `npm start` (examples/demo.ts), as a newcomer runs it: without a terminal (a plain line per quarter), and with
 * its knobs (DEMO_SIZE_MIB, DEMO_CHANNELS) given badly, which is one line and exit 2, never a stack trace.
 */
import * as ChildProcess from "node:child_process"
import * as Path from "node:path"
import { describe, expect, it } from "vitest"

const ROOT = Path.resolve(import.meta.dirname, "..")

const demo = (env: Record<string, string>) =>
  ChildProcess.spawnSync(process.execPath, ["--import", "tsx", "examples/demo.ts"], {
    cwd: ROOT,
    encoding: "utf8",
    timeout: 60_000,
    env: { ...process.env, NO_COLOR: "1", ...env }
  })

describe("npm start (examples/demo.ts)", () => {
  it("migrates and verifies, its progress in plain lines on stderr when that is not a terminal", () => {
    const ran = demo({ DEMO_SIZE_MIB: "8", DEMO_CHANNELS: "2" })
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
})
