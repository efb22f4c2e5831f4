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
import { ExitCode, toJson } from "./errors.js"

/**
 * A repeat of the signal within this long is the same request delivered twice: Ctrl-C reaches every
 * process of the terminal's group, and `npm run` forwards it to its child as well.
 */
const REPEAT_MS = 1000

// runMain interrupts the program on the first SIGINT / SIGTERM (`hangup` below on SIGHUP) and then stops
// listening; this listener stays for the process's life, so that a duplicate does not kill the process by
// default while it tears down (the "interrupted" line and the cleanup would be lost). A later signal is a
// second request: exit at once.
let first: { readonly signal: NodeJS.Signals; readonly at: number } | undefined
const onSignal = (name: NodeJS.Signals) => {
  if (first === undefined) {
    first = { signal: name, at: performance.now() }
    return
  }
  if (performance.now() - first.at < REPEAT_MS) return
  process.stderr.write(`multifd: ${name} again: exiting without cleanup\n`)
  process.exit(128 + Os.constants.signals[name])
}
for (const name of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(name, onSignal)

// A write to stdout or stderr that fails (the reader of a pipe gone, `multifd recv … 2>&1 | head -1`; a full
// disk; a terminal that went away) is an 'error' event on the stream, which without a listener crashed the
// process: a partial --out left, the peer told nothing. Output is not what the command is for: the migration
// goes on and its exit status stands, the lines that cannot be written are lost (Node's stdio streams cannot
// be closed: each later write fails the same way, cheaply). Only the `--json` result is checked (terminal.ts).
for (const stream of [process.stdout, process.stderr]) stream.on("error", () => {})

/**
 * SIGHUP (the terminal closed) interrupts the command as SIGINT and SIGTERM do, which runMain does not listen
 * for: by default it killed the process where it stood, leaving its temporary file and telling the peer
 * nothing. (`nohup` cannot keep a Node process alive: Node resets SIGHUP's disposition when it starts.)
 */
const hangup = Effect.async<never>((resume) => {
  const onHangup = () => resume(Effect.interrupt)
  process.once("SIGHUP", onHangup)
  return Effect.sync(() => process.off("SIGHUP", onHangup))
})

NodeRuntime.runMain(main(process.argv).pipe(Effect.raceFirst(hangup), Effect.provide(NodeContext.layer)), {
  disableErrorReporting: true,
  disablePrettyLogger: true,
  teardown: (exit, onExit) => {
    if (Exit.isSuccess(exit)) return onExit(typeof exit.value === "number" ? exit.value : ExitCode.Ok)
    if (!Cause.isInterruptedOnly(exit.cause)) return onExit(ExitCode.Failed)
    // everything the command opened is closed (and a partial --out removed) by now
    const signal = first?.signal ?? "SIGINT"
    process.stderr.write(`multifd: interrupted by ${signal}\n`)
    if (process.argv.includes("--json")) {
      process.stdout.write(`${toJson({ tag: "Interrupted", reason: signal, message: `interrupted by ${signal}` })}\n`)
    }
    onExit(128 + Os.constants.signals[signal])
  }
})
