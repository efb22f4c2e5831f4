// `npm test`: the type check (`tsc --noEmit`) and the test suite (`vitest run`, given this script's arguments) side
// by side. tsc is one thread for half a minute, and the suite keeps every core busy: one after the other, a core
// stood idle for the whole type check. vitest's output streams as it comes; tsc's is printed once vitest ended
// (its errors, else a line saying the types check). Exits with the first failure's code: 0 only if both passed.
// Plain JavaScript so that it runs before anything is compiled.
import * as ChildProcess from "node:child_process"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Url from "node:url"

const root = Path.resolve(Path.dirname(Url.fileURLToPath(import.meta.url)), "..")
const bin = (...parts) => Path.join(root, "node_modules", ...parts)

/** Runs `node script ...args` to its end: its exit code (128 + n for a signal), and its output if captured. */
const run = (script, args, capture) =>
  new Promise((resolve) => {
    const child = ChildProcess.spawn(process.execPath, [script, ...args], {
      cwd: root,
      stdio: capture ? ["ignore", "pipe", "pipe"] : "inherit"
    })
    let output = ""
    if (capture) {
      child.stdout.setEncoding("utf8").on("data", (s) => (output += s))
      child.stderr.setEncoding("utf8").on("data", (s) => (output += s))
    }
    child.once("error", (error) => resolve({ code: 1, output: `${output}${error.message}\n` }))
    child.once("close", (code, signal) =>
      resolve({ code: code ?? 128 + (Os.constants.signals[signal] ?? 0), output }))
  })

const [typeCheck, suite] = await Promise.all([
  run(bin("typescript", "bin", "tsc"), ["--noEmit"], true),
  run(bin("vitest", "vitest.mjs"), ["run", ...process.argv.slice(2)], false)
])
if (typeCheck.code === 0) {
  process.stdout.write("tsc --noEmit: the types check\n")
} else {
  process.stdout.write(`tsc --noEmit failed (exit ${typeCheck.code}):\n${typeCheck.output}`)
}
process.exitCode = typeCheck.code !== 0 ? typeCheck.code : suite.code
