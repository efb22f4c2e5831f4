// `npm run build`: the library as ES modules with declarations (tsc, dist/*.js + *.d.ts; its channel thread
// dist/internal/threads/channelWorker.js one bundled file) and the `multifd` command as one bundled file
// (esbuild, dist/bin/multifd.js, with its digest and channel workers beside it), which starts
// in a fraction of the time that loading a few hundred module files takes. Plain JavaScript so that it runs
// before anything is compiled.
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as Url from "node:url"
import * as Esbuild from "esbuild"
import { bundleOptions, commandEntryPoints } from "./bundle.mjs"

const root = Path.resolve(Path.dirname(Url.fileURLToPath(import.meta.url)), "..")
const dist = Path.join(root, "dist")
Fs.rmSync(dist, { recursive: true, force: true })

const tsc = Path.join(root, "node_modules", "typescript", "bin", "tsc")
const compiled = ChildProcess.spawnSync(process.execPath, [tsc, "-p", Path.join(root, "tsconfig.build.json")], {
  stdio: "inherit"
})
if (compiled.status !== 0) process.exit(compiled.status ?? 1)

await Esbuild.build({
  ...bundleOptions,
  // the worker threads beside the command, as the library has them beside dist/internal/native and
  // dist/internal/threads
  entryPoints: commandEntryPoints(root),
  outdir: Path.join(dist, "bin")
})

// The library's channel thread as one bundled file, in place of tsc's module (which would load effect as a few
// hundred module files in every thread: several times the start-up time of one file)
await Esbuild.build({
  ...bundleOptions,
  entryPoints: { channelWorker: Path.join(root, "src", "internal", "threads", "channelWorker.ts") },
  outdir: Path.join(dist, "internal", "threads"),
  allowOverwrite: true
})
Fs.rmSync(Path.join(dist, "internal", "threads", "channelWorker.js.map"), { force: true })
Fs.chmodSync(Path.join(dist, "bin", "multifd.js"), 0o755)
