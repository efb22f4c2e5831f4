import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // the `multifd` command bundled once per run, for the CLI tests' child processes
    globalSetup: ["test/support/cliBundle.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: "forks",
    // three files at a time, whatever the core count (vitest's default is one fewer than the cores: one here).
    // Much of a file's time is waiting (on child processes, sockets, QEMU, real peer timeouts): with two, a quarter
    // of two cores stood idle (304 s against 279 s for the whole suite on two cores, 2026-12-04); the tests that
    // bound a time leave room for a machine this loaded
    maxWorkers: 3,
    minWorkers: 1
  }
})
