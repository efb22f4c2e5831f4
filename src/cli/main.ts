#!/usr/bin/env node
/**
 * Entry point of the `multifd` command (`npm run multifd -- <args>`): the only place that runs an Effect.
 *
 * @since 0.1.0
 */
import * as NodeContext from "@effect/platform-node/NodeContext"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Os from "node:os"
import { main } from "./command.js"
import { ExitCode } from "./errors.js"

// runMain interrupts the program on SIGINT / SIGTERM; remember which, to exit with 128 + its number
let signal: NodeJS.Signals = "SIGINT"
for (const name of ["SIGINT", "SIGTERM"] as const) process.once(name, () => (signal = name))

NodeRuntime.runMain(main(process.argv).pipe(Effect.provide(NodeContext.layer)), {
  disableErrorReporting: true,
  disablePrettyLogger: true,
  teardown: (exit, onExit) => {
    if (Exit.isSuccess(exit)) return onExit(typeof exit.value === "number" ? exit.value : ExitCode.Ok)
    if (!Cause.isInterruptedOnly(exit.cause)) return onExit(ExitCode.Failed)
    // everything the command opened is closed (and a partial --out removed) by now
    process.stderr.write(`multifd: interrupted by ${signal}\n`)
    onExit(128 + Os.constants.signals[signal])
  }
})
