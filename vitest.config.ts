import * as Os from "node:os"
import { defineConfig } from "vitest/config"

// vitest's default is one worker per core but one; on the 2-core machines that is a single worker and a serial
// suite. The tests wait on sockets, threads and child processes much of the time, so two workers on two cores
// finish sooner (201 → ~137 s measured) with no test depending on having a core to itself.
const workers = Math.max(2, Os.availableParallelism() - 1)

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // the `multifd` command bundled once per run, for the CLI tests' child processes
    globalSetup: ["test/support/cliBundle.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: "forks",
    maxWorkers: workers,
    minWorkers: 1
  }
})
