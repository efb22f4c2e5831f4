/**
 * examples/live.ts (issue 14: a live migration from the command line): a workload writes its memory while the
 * library migrates it; the example reports rounds, the dirty rate and the downtime, as JSON with --json. It
 * imports the package by name: `--conditions=source` resolves that to src/ (package.json's "source" export),
 * so the test needs no build.
 */
import * as ChildProcess from "node:child_process"
import * as Path from "node:path"
import { describe, expect, inject, it } from "vitest"

const ROOT = Path.resolve(import.meta.dirname, "..")

describe("npx tsx examples/live.ts", () => {
  it("migrates memory that a workload keeps writing: more than one round, the downtime, the dirty rate, verified", () => {
    const ran = ChildProcess.spawnSync(
      process.execPath,
      ["--conditions=source", "--import", "tsx", "examples/live.ts", "--size", "16M", "--rate", "64M", "--channels", "2", "--json"],
      { cwd: ROOT, encoding: "utf8", timeout: 60_000 }
    )
    expect({ code: ran.status, stderr: ran.stderr }).toEqual({ code: 0, stderr: "" })
    const result = JSON.parse(ran.stdout) as Record<string, unknown>
    expect(result).toMatchObject({ ramBytes: 16 * 1024 * 1024, channels: 2, verified: true })
    // round 0 sends every page; the pages written meanwhile go in later rounds (the last with writers paused)
    expect(result["rounds"]).toBeGreaterThanOrEqual(2)
    const pagesPerRound = result["pagesPerRound"] as Array<number>
    expect(pagesPerRound[0]).toBe(4096)
    expect(pagesPerRound.slice(1).reduce((a, b) => a + b, 0)).toBeGreaterThan(0)
    expect(result["pagesWritten"]).toBeGreaterThan(0)
    expect(result["dirtyRateBytesPerSecond"]).toBeGreaterThan(0)
    expect(result["downtimeMs"]).toBeGreaterThanOrEqual(0)
  })

  it("takes the flags its header documents (--downtime 300ms), and a bad one is one line and exit 2", () => {
    // bundled as it is under tsx (test/support/cliBundle.ts): the run above loads it through tsx
    const live = (...args: Array<string>) =>
      ChildProcess.spawnSync(process.execPath, [Path.join(inject("examplesBundle"), "live.js"), ...args], {
        cwd: ROOT,
        encoding: "utf8",
        timeout: 60_000
      })
    const ran = live("--size", "8M", "--rate", "8M", "--channels", "2", "--downtime", "300ms", "--json")
    expect({ code: ran.status, stderr: ran.stderr }).toEqual({ code: 0, stderr: "" })
    expect(JSON.parse(ran.stdout)).toMatchObject({ ramBytes: 8 * 1024 * 1024, verified: true })
    const bad = live("--downtime", "soon")
    expect({ code: bad.status, stderr: bad.stderr }).toEqual({
      code: 2,
      stderr: "live: --downtime: \"soon\" is not a positive duration like 30s, 500ms, 2m or 1h\n"
    })
  })
})
