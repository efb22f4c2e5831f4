/**
 * vitest global setup (vitest.config.ts): bundles the `multifd` command once per test run, as `npm run build`
 * does (scripts/build.mjs: src/cli/main.ts into one ES module, the digest's and the channels' workers
 * `digestWorker.js` and `channelWorker.js` beside it,
 * zstd-napi left to load at run time), into a temporary directory. Test files get the bundle's path with
 * `inject("cliBundle")` (test/support/cli.ts spawns `node <bundle>`): a child then starts in a fraction of the
 * time that `node --import tsx src/cli/main.ts` takes to load a few hundred module files. The examples that tests
 * run many times (examples/demo.ts, examples/live.ts) are bundled beside it (`inject("examplesBundle")`).
 *
 * The directory links the repository's node_modules, where the bundle resolves zstd-napi. In watch mode the
 * bundle is rebuilt before each rerun (the sources may have changed); the directory is removed at the end.
 */
import * as Esbuild from "esbuild"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import type { TestProject } from "vitest/node"
import { bundleOptions, commandEntryPoints } from "../../scripts/bundle.mjs"

declare module "vitest" {
  export interface ProvidedContext {
    /** The bundled `multifd` command (`node <cliBundle> recv …`). */
    readonly cliBundle: string
    /**
     * The directory of the examples bundled likewise (`demo.js`, `live.js`, beside the command's workers): for the
     * tests of their flags and signals, which need not load a few hundred module files through tsx each time (the
     * examples' own tests run each one once as the README says, through tsx).
     */
    readonly examplesBundle: string
  }
}

const ROOT = Path.resolve(import.meta.dirname, "..", "..")

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "multifd-cli-bundle-"))
  Fs.symlinkSync(Path.join(ROOT, "node_modules"), Path.join(dir, "node_modules"), "dir")
  // as scripts/build.mjs bundles it
  const context = await Esbuild.context({ ...bundleOptions, entryPoints: commandEntryPoints(ROOT), outdir: dir })
  // the examples import the package by its name: its "source" export, as `--conditions=source` gives them under tsx
  const examples = await Esbuild.context({
    ...bundleOptions,
    conditions: ["source"],
    entryPoints: {
      demo: Path.join(ROOT, "examples", "demo.ts"),
      live: Path.join(ROOT, "examples", "live.ts")
    },
    outdir: dir
  })
  const cleanUp = async () => {
    await context.dispose()
    await examples.dispose()
    Fs.rmSync(dir, { recursive: true, force: true })
  }
  try {
    await context.rebuild()
    await examples.rebuild()
  } catch (error) {
    await cleanUp()
    throw error
  }
  project.provide("cliBundle", Path.join(dir, "multifd.js"))
  project.provide("examplesBundle", dir)
  project.onTestsRerun(async () => {
    await context.rebuild()
    await examples.rebuild()
  })
  return cleanUp
}
