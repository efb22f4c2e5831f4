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
import * as FileIo from "../internal/native/fileIo.js"
import * as Lookups from "../internal/native/lookups.js"
import { main } from "./command.js"
import { ExitCode } from "./errors.js"
import * as Progress from "./progress.js"
import * as Signals from "./signals.js"
import { INTERRUPTING } from "./signals.js"
import * as Terminal from "./terminal.js"

/**
 * Ends the process by `signal`, which ended the command, while a lookup of a host name still holds a thread of
 * libuv's pool (a DNS server that does not answer: `Lookups`): `process.exit` would wait for that thread, deaf to
 * any further signal. No thread holds up a signal's default action, and a shell sees the same status (128 + its
 * number). Otherwise it returns, and the caller exits as usual.
 */
const endBySignal = (signal: NodeJS.Signals): void => {
  // (not SIGQUIT, whose default action dumps core: a file of the process's memory, a guest's pages in it)
  if (signal === "SIGQUIT" || Lookups.inFlight() === 0) return
  // without a listener the signal's default action: the process ends where it stands, everything closed by now
  process.removeAllListeners(signal)
  process.kill(process.pid, signal)
}

// runMain interrupts the program on the first SIGINT / SIGTERM (`signalled` below on the others) and then stops
// listening; these listeners stay for the process's life, so that a duplicate does not kill the process by
// default while it tears down (the "interrupted" line and the cleanup would be lost). A later signal is a
// second request: exit at once (signals.ts), the peer not told.
/** Lines the command wrote on stdout, counted as each is handed over (with `--json`: its one object). */
let stdoutLines = 0
const terminal: Terminal.Terminal["Type"] = {
  ...Terminal.stdio,
  out: (line, what) => Effect.suspend(() => {
    stdoutLines++
    return Terminal.stdio.out(line, what)
  })
}

const io: Signals.Io = {
  argv: process.argv.slice(2),
  now: () => performance.now(),
  stdout: process.stdout,
  // above the progress bar while one is drawn (a teardown's line), as any line the command logs
  stderr: { write: (text) => Progress.writeLines(text) },
  exit: (code, signal) => {
    if (signal !== undefined) endBySignal(signal)
    process.exit(code)
  },
  later: (ms, f) => void setTimeout(f, ms).unref(),
  flushing: FileIo.flushingNow,
  reported: () => stdoutLines > 0
}
const signals = Signals.make(io)
for (const name of INTERRUPTING) process.on(name, signals.on)

// SIGUSR1 would open Node's inspector (a debugger port on 127.0.0.1:9229, to a process that may run as root
// holding a guest's memory), and SIGUSR2 killed the process where it stood: a listener keeps Node from doing
// either (it is Node's own SIGUSR1 handling that starts the inspector). The command ignores SIGUSR2; SIGUSR1
// prints a progress line when stderr is not a terminal (progress.ts), as `dd` does.
for (const name of ["SIGUSR1", "SIGUSR2"] as const) process.on(name, () => {})

// A write to stdout or stderr that fails (the reader of a pipe gone, `multifd recv … 2>&1 | head -1`; a full
// disk; a terminal that went away) is an 'error' event on the stream, which without a listener crashed the
// process: a partial --out left, the peer told nothing. Output is not what the command is for: the migration
// goes on and its exit status stands, the lines that cannot be written are lost (Node's stdio streams cannot
// be closed: each later write fails the same way, cheaply). What stdout carries, the `--json` result or a help
// page, is checked (`Terminal.stdio`): losing it fails the command.
for (const stream of [process.stdout, process.stderr]) stream.on("error", () => {})

/**
 * SIGHUP (the terminal closed), SIGQUIT and SIGALRM interrupt the command as SIGINT and SIGTERM do, which
 * runMain does not listen for: by default they killed the process where it stood, leaving its temporary file
 * and telling the peer nothing. (`nohup` cannot keep a Node process alive: Node resets SIGHUP's disposition
 * when it starts.)
 */
const signalled = Effect.async<never>((resume) => {
  const names = INTERRUPTING.filter((name) => name !== "SIGINT" && name !== "SIGTERM")
  const onSignal = () => resume(Effect.interrupt)
  for (const name of names) process.once(name, onSignal)
  return Effect.sync(() => {
    for (const name of names) process.off(name, onSignal)
  })
})

NodeRuntime.runMain(
  main(process.argv).pipe(
    Effect.provideService(Terminal.Terminal, terminal),
    Effect.raceFirst(signalled),
    Effect.provide(NodeContext.layer)
  ),
  {
    disableErrorReporting: true,
    disablePrettyLogger: true,
    teardown: (exit, onExit) => {
      if (Exit.isSuccess(exit)) return onExit(typeof exit.value === "number" ? exit.value : ExitCode.Ok)
      if (!Cause.isInterruptedOnly(exit.cause)) return onExit(ExitCode.Failed)
      // everything the command opened is closed (and a partial --out removed) by now
      const signal = signals.first() ?? "SIGINT"
      const code = Signals.interrupted(signal, { ...io, stderr: process.stderr })
      endBySignal(signal)
      onExit(code)
    }
  }
)
