import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // the `multifd` command bundled once per run, for the CLI tests' child processes
    globalSetup: ["test/support/cliBundle.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: "forks",
    // two files at a time, whatever the core count (vitest's default is one fewer than the cores: one here).
    // Most of a file's time is waiting (on child processes, sockets, QEMU), and the tests that bound a time
    // leave room for a machine this loaded
    maxWorkers: 2,
    minWorkers: 1
  }
})
