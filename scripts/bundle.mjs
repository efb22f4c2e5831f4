// How the `multifd` command is bundled (esbuild), shared by `npm run build` (scripts/build.mjs) and the test
// run's bundle (test/support/cliBundle.ts): one ES module for node20, the native zstd binding loaded at run time
// from the installed package, and the worker threads' modules beside the command, where it starts them
// (`./digestWorker.js` and `./channelWorker.js` relative to its own `import.meta.url`).
import * as Path from "node:path"

/** esbuild options of every bundle of ours. */
export const bundleOptions = {
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
}

/** The command and its workers' modules, from the repository at `root`. */
export const commandEntryPoints = (root) => ({
  multifd: Path.join(root, "src", "cli", "main.ts"),
  digestWorker: Path.join(root, "src", "internal", "native", "digestWorker.ts"),
  channelWorker: Path.join(root, "src", "internal", "threads", "channelWorker.ts")
})
