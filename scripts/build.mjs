// `npm run build`: the library as ES modules with declarations (tsc, dist/*.js + *.d.ts) and the `multifd`
// command as one bundled file (esbuild, dist/bin/multifd.js, with its digest worker beside it), which starts
// in a fraction of the time that loading a few hundred module files takes. Plain JavaScript so that it runs
// before anything is compiled.
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as Url from "node:url"
import * as Esbuild from "esbuild"

const root = Path.resolve(Path.dirname(Url.fileURLToPath(import.meta.url)), "..")
const dist = Path.join(root, "dist")
Fs.rmSync(dist, { recursive: true, force: true })

const tsc = Path.join(root, "node_modules", "typescript", "bin", "tsc")
const compiled = ChildProcess.spawnSync(process.execPath, [tsc, "-p", Path.join(root, "tsconfig.build.json")], {
  stdio: "inherit"
})
if (compiled.status !== 0) process.exit(compiled.status ?? 1)

await Esbuild.build({
  // the digest's worker thread beside the command: the bundle starts it from `./digestWorker.js` relative to
  // its own `import.meta.url`, as the library does from dist/internal/native
  entryPoints: {
    multifd: Path.join(root, "src", "cli", "main.ts"),
    digestWorker: Path.join(root, "src", "internal", "native", "digestWorker.ts")
  },
  outdir: Path.join(dist, "bin"),
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  // the native zstd binding is loaded at run time from the installed package
  external: ["zstd-napi"],
  // bundled CommonJS dependencies call require(): give the ES module one
  banner: { js: "import { createRequire as __multifdRequire } from \"node:module\";\nconst require = __multifdRequire(import.meta.url);" },
  logLevel: "warning",
  legalComments: "none"
})
Fs.chmodSync(Path.join(dist, "bin", "multifd.js"), 0o755)
