/**
 * The command's signals. The first interrupts it (runMain for SIGINT and SIGTERM, `main.ts` for the others): the
 * peer is told, everything closed, `multifd: interrupted by SIGINT`, exit 128 + the signal's number. A repeat
 * within `REPEAT_MS` is the same request delivered twice (Ctrl-C reaches every process of the terminal's group,
 * and `npm run` forwards it as well) and is ignored; a later one is a second request, for a teardown that takes
 * long (an image being flushed to a slow disk): the command exits at once, the peer not told, but it still leaves
 * nothing behind that it can remove at once (the temporary files of its outputs, the `--out-dir` directories it
 * created, the socket file it listens on), shows the cursor its progress bar hid, and with `--json` still prints
 * its one JSON object. A first signal whose teardown goes on for `STILL_MS` (an image being flushed to a slow disk,
 * which Node cannot cancel) is answered with a line that says what it waits for and that another signal exits at
 * once: it was silent, and the user could only guess whether the signal was heard.
 *
 * @since 0.1.0
 */
import * as Os from "node:os"
import * as FileIo from "../internal/native/fileIo.js"
import * as SocketFiles from "../internal/native/socketFiles.js"
import { oneLine, toJson, wantsJson } from "./errors.js"
import * as FromQemu from "./fromQemu.js"
import * as Progress from "./progress.js"

/** A repeat of a signal within this long (ms) is the same request delivered twice. */
export const REPEAT_MS = 1000

/**
 * The signals that end the command cleanly (the peer told, a partial --out removed), with exit 128 + the
 * signal's number (SIGQUIT is Ctrl-\ on a terminal; by default the others killed the process where it stood).
 */
export const INTERRUPTING = ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGALRM"] as const

/**
 * How long (ms) the teardown of a first signal goes on before the command says that it is still stopping, and what
 * for. Longer than `REPEAT_MS` (a signal then exits at once, as the line says); a teardown that ends sooner, the
 * usual, prints its one "interrupted" line alone.
 */
export const STILL_MS = 2000

/** What a signal's handling needs of the process (`process` itself but in tests). */
export interface Io {
  /** The command line (`--json` there asks for the JSON object). */
  readonly argv: ReadonlyArray<string>
  /** Now, in milliseconds (`performance.now()`). */
  readonly now: () => number
  readonly stdout: { readonly write: (text: string) => unknown }
  readonly stderr: { readonly write: (text: string) => unknown }
  /** Exits with `code`, for `signal` if one ended the command (`main.ts` may then end by that signal). */
  readonly exit: (code: number, signal?: NodeJS.Signals) => void
  /** Runs `f` in `ms` unless the process has exited by then (a timer that does not keep it alive). */
  readonly later: (ms: number, f: () => void) => void
  /** The files being flushed to disk now (`FileIo.flushingNow`). */
  readonly flushing: () => ReadonlyArray<string>
  /**
   * Whether the command's `--json` object (its result, or its error) is on stdout already: a signal that comes after
   * it, while the command closes what it opened, prints no second one (a script reads one object).
   */
  readonly reported: () => boolean
}

/** The exit status of an interruption by `signal`: 128 + its number. */
export const exitCodeOf = (signal: NodeJS.Signals): number => 128 + Os.constants.signals[signal]

/** The `--json` object of an interruption: `{"error":{"tag":"Interrupted","reason":"SIGINT",...}}`. */
export const interruptedJson = (signal: NodeJS.Signals, message: string): string =>
  toJson({ tag: "Interrupted", reason: signal, message })

/**
 * Exits at once on a second `signal`: removes the temporary files of the outputs, the directories created for
 * them and the socket file listened on,
 * stops the progress bar (its line ended, the cursor shown), says so on stderr and, with `--json`, on stdout.
 */
export const exitAtOnce = (signal: NodeJS.Signals, io: Io): void => {
  FileIo.removeTemporariesNow()
  FromQemu.removeDirectoriesNow()
  SocketFiles.removeNow()
  Progress.stopNow()
  const message = `${signal} again: exiting at once (the peer is not told)`
  io.stderr.write(`multifd: ${message}\n`)
  if (wantsJson(io.argv) && !io.reported()) {
    io.stdout.write(`${interruptedJson(signal, `interrupted by ${signal} again: exited at once (the peer was not told)`)}\n`)
  }
  io.exit(exitCodeOf(signal), signal)
}

/**
 * Says that the command was interrupted by `signal`, its teardown over: a line on stderr and, with `--json`, the
 * object on stdout unless the command printed its own already (`Io.reported`). The exit status it calls for.
 */
export const interrupted = (signal: NodeJS.Signals, io: Io): number => {
  io.stderr.write(`multifd: interrupted by ${signal}\n`)
  if (wantsJson(io.argv) && !io.reported()) io.stdout.write(`${interruptedJson(signal, `interrupted by ${signal}`)}\n`)
  return exitCodeOf(signal)
}

/**
 * The line of a first `signal` whose teardown goes on: what it waits for (the files being flushed to disk, if
 * any), and that another signal exits at once.
 */
export const stillStopping = (signal: NodeJS.Signals, flushing: ReadonlyArray<string>): string =>
  oneLine(
    `multifd: stopping after ${signal}: ${
      flushing.length === 0 ? "still closing down" : `waiting for ${flushing.join(", ")} to be flushed to disk`
    } (${signal} again exits at once)`
  ) + "\n"

/** The command's record of the signals it was given. */
export interface Signals {
  /** The first signal, once one came. */
  readonly first: () => NodeJS.Signals | undefined
  /** Handles a delivery of `signal` (a listener of each of `INTERRUPTING` for the process's life). */
  readonly on: (signal: NodeJS.Signals) => void
}

/**
 * Records the first signal and ignores its repeats within `REPEAT_MS`; a later one ends the process at once
 * (`exitAtOnce`). A teardown still under way `STILL_MS` after the first says so (`stillStopping`).
 */
export const make = (io: Io): Signals => {
  let first: { readonly signal: NodeJS.Signals; readonly at: number } | undefined
  return {
    first: () => first?.signal,
    on: (signal) => {
      if (first === undefined) {
        first = { signal, at: io.now() }
        io.later(STILL_MS, () => io.stderr.write(stillStopping(signal, io.flushing())))
        return
      }
      if (io.now() - first.at < REPEAT_MS) return
      exitAtOnce(signal, io)
    }
  }
}
