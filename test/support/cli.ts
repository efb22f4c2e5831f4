/**
 * Runs the `multifd` command for tests: as a child process (`start`, `run`, `startRecv`), by default the bundle
 * that test/support/cliBundle.ts builds once per run (`node <bundle>`, as the published `multifd` is), or the
 * TypeScript source through tsx (`{ entry: "source" }`, `node --import tsx src/cli/main.ts`, as `npm run
 * multifd` does) where the point is the source entry; or in this process (`runHere`, cheaper still), capturing
 * what it prints. Every child has a bounded lifetime; `killChildren` ends those still running (after each test).
 */
import * as NodeContext from "@effect/platform-node/NodeContext"
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as ChildProcess from "node:child_process"
import * as Path from "node:path"
import { inject } from "vitest"
import * as Cli from "../../src/cli/command.js"
import * as Log from "../../src/cli/log.js"

/** The repository (the children's working directory). */
export const ROOT = Path.resolve(import.meta.dirname, "..", "..")
/** The command's TypeScript entry. */
export const MAIN = Path.join(ROOT, "src", "cli", "main.ts")
/** Longest a child may live. */
const CHILD_TIMEOUT_MS = 20_000

/** What a command printed and how it ended. */
export interface Finished {
  readonly code: number | null
  readonly signal: NodeJS.Signals | null
  readonly stdout: string
  readonly stderr: string
}

/** A child running the command. */
export interface Running {
  readonly child: ChildProcess.ChildProcess
  readonly finished: Promise<Finished>
  /** stderr so far. */
  readonly stderr: () => string
}

/** Which entry a child runs: the bundle (default) or src/cli/main.ts through tsx. */
export interface StartOptions {
  readonly entry?: "bundle" | "source" | undefined
  /** Variables added to the child's environment (`MULTIFD_CHANNELS`, ...). */
  readonly env?: Record<string, string> | undefined
  /** The child's limit on open files (`ulimit -n`, set by a shell that then becomes the command). */
  readonly openFiles?: number | undefined
  /** The child's limit on its address space, in KiB (`ulimit -v`, likewise). */
  readonly virtualMemoryKiB?: number | undefined
  /** A descriptor of this process the child's stdout goes to (`/dev/full`), rather than a pipe. */
  readonly stdout?: number | undefined
  /** The child's working directory (default: the repository). */
  readonly cwd?: string | undefined
  /**
   * A command the child runs under, given the node command line after it (`unshare -m sh -c '...; exec "$0" "$@"'`:
   * the command in a mount namespace of its own).
   */
  readonly under?: ReadonlyArray<string> | undefined
  /** Another copy of the bundle to run (with `entry` "bundle"), as one beside other node_modules. */
  readonly bundle?: string | undefined
}

const children = new Set<ChildProcess.ChildProcess>()
const here = new Set<Fiber.RuntimeFiber<number>>()

/** Kills (SIGKILL) every child still running, and interrupts (and awaits) every command still running here. */
export const killChildren = async (): Promise<void> => {
  for (const child of children) child.kill("SIGKILL")
  await Effect.runPromise(Fiber.interruptAll(here))
}

/** Starts `multifd <args>` as a child process, its output collected. */
export const start = (args: ReadonlyArray<string>, options: StartOptions = {}): Running => {
  const entry = options.entry === "source" ? ["--import", "tsx", MAIN] : [options.bundle ?? inject("cliBundle")]
  const limits = [
    ...(options.openFiles === undefined ? [] : [`ulimit -n ${options.openFiles}`]),
    ...(options.virtualMemoryKiB === undefined ? [] : [`ulimit -v ${options.virtualMemoryKiB}`])
  ]
  const [command, argv] = limits.length === 0
    ? [process.execPath, [...entry, ...args]]
    : ["/bin/sh", ["-c", `${limits.join(" && ")} && exec "$0" "$@"`, process.execPath, ...entry, ...args]]
  const child = ChildProcess.spawn(options.under?.[0] ?? command, options.under === undefined ? argv : [...options.under.slice(1), command, ...argv], {
    cwd: options.cwd ?? ROOT,
    stdio: ["ignore", options.stdout ?? "pipe", "pipe"],
    env: { ...process.env, NO_COLOR: "1", ...options.env }
  })
  children.add(child)
  let stdout = ""
  let stderr = ""
  child.stdout?.setEncoding("utf8").on("data", (s: string) => (stdout += s))
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (stderr += s))
  const timer = setTimeout(() => child.kill("SIGKILL"), CHILD_TIMEOUT_MS)
  const finished = new Promise<Finished>((resolve) => {
    child.once("close", (code, signal) => {
      clearTimeout(timer)
      children.delete(child)
      resolve({ code, signal, stdout, stderr })
    })
  })
  return { child, finished, stderr: () => stderr }
}

/** Runs `multifd <args>` as a child process to its end. */
export const run = (args: ReadonlyArray<string>, options?: StartOptions): Promise<Finished> => start(args, options).finished

/** The command running in this process (`startHere`). */
export interface RunningHere {
  readonly finished: Promise<Finished>
  /** stderr so far. */
  readonly stderr: () => string
  /** Interrupts it, as a signal interrupts the process (its `finished` then has code `null`), and awaits its end. */
  readonly interrupt: () => Promise<Finished>
  /** Whether it has ended. */
  readonly ended: () => boolean
  /** Waits until its stderr matches `pattern` (or fails if it ends first). */
  readonly waitFor: (pattern: RegExp) => Promise<void>
}

/**
 * Starts the command in this process (cheaper than a child: no startup), capturing what it prints: its lines
 * through `Console` and its log's lines (`Log.Lines`: warnings, `--verbose` events). `finished`'s code is what
 * `main.ts` would exit with, or `null` when it was interrupted. `onStderr` sees each piece of stderr as it comes.
 * What it writes to the process's stderr itself (the progress bar and the lines around it) is not captured:
 * tests of those run a child.
 */
export const startHere = (args: ReadonlyArray<string>, onStderr: (text: string) => void = () => {}): RunningHere => {
  const stdout: Array<string> = []
  const stderr: Array<string> = []
  const err = (text: string) => {
    stderr.push(text)
    onStderr(text)
    for (const listener of [...listeners]) listener()
  }
  const listeners = new Set<() => void>()
  const fiber = Effect.runFork(Effect.gen(function*() {
    const console = yield* Effect.console
    const capture = {
      ...console,
      log: (...parts: ReadonlyArray<unknown>) => Effect.sync(() => void stdout.push(`${parts.join(" ")}\n`)),
      error: (...parts: ReadonlyArray<unknown>) => Effect.sync(() => err(`${parts.join(" ")}\n`))
    }
    return yield* Cli.main(["node", "multifd", ...args]).pipe(
      Effect.withConsole(capture),
      Effect.provideService(Log.Lines, { write: err }),
      Effect.provide(NodeContext.layer)
    )
  }))
  here.add(fiber)
  let ended = false
  const finished = Effect.runPromise(Fiber.await(fiber)).then((exit): Finished => {
    here.delete(fiber)
    ended = true
    if (Exit.isFailure(exit) && !Cause.isInterruptedOnly(exit.cause)) {
      throw new Error(`multifd ${args.join(" ")} failed here: ${Cause.pretty(exit.cause)}`)
    }
    return { code: Exit.isSuccess(exit) ? exit.value : null, signal: null, stdout: stdout.join(""), stderr: stderr.join("") }
  })
  return {
    finished,
    stderr: () => stderr.join(""),
    interrupt: () => Effect.runPromise(Fiber.interrupt(fiber)).then(() => finished),
    ended: () => ended,
    waitFor: (pattern) =>
      new Promise<void>((resolve, reject) => {
        const check = () => {
          if (pattern.test(stderr.join(""))) {
            listeners.delete(check)
            resolve()
          }
        }
        listeners.add(check)
        check()
        void finished.then((f) => reject(new Error(`ended (${f.code}) before ${pattern}: ${f.stderr}`)), () => {})
      })
  }
}

/**
 * Runs the command in this process to its end (`startHere`). `env`'s variables are set in this process's
 * environment for the run and restored after it (tests of a file run one at a time).
 */
export const runHere = (args: ReadonlyArray<string>, options: { readonly env?: Record<string, string> } = {}): Promise<Finished> =>
  Effect.runPromise(withEnvironment(options.env ?? {})(Effect.promise(() => startHere(args).finished)))

/** Starts `recv` in this process and waits for its `listening on` line; the URI it printed is its real address. */
export const startRecvHere = async (args: ReadonlyArray<string>): Promise<RunningHere & { readonly uri: string }> => {
  let listening: (uri: string) => void = () => {}
  const uri = new Promise<string>((resolve) => (listening = resolve))
  const recv = startHere(["recv", ...args], (text) => {
    const m = /^multifd: listening on (\S+)$/m.exec(text)
    if (m !== null) listening(m[1]!)
  })
  const ended = recv.finished.then((f): never => {
    throw new Error(`recv ended (${f.code}) before listening: ${f.stderr}`)
  })
  ended.catch(() => {}) // its end after the listening line is no failure
  return { ...recv, uri: await Promise.race([uri, ended]) }
}

/** `self` with `env`'s variables set in `process.env`, each restored (or unset) after it. */
const withEnvironment = (env: Record<string, string>) => <A, E, R>(self: Effect.Effect<A, E, R>) =>
  Effect.acquireUseRelease(
    Effect.sync(() => {
      const saved = Object.keys(env).map((name) => [name, process.env[name]] as const)
      Object.assign(process.env, env)
      return saved
    }),
    () => self,
    (saved) =>
      Effect.sync(() => {
        for (const [name, value] of saved) {
          if (value === undefined) delete process.env[name]
          else process.env[name] = value
        }
      })
  )

/** Starts `recv` and waits for its `listening on` line; the URI it printed is its real address. */
export const startRecv = async (
  args: ReadonlyArray<string>,
  options?: StartOptions
): Promise<Running & { readonly uri: string }> => {
  const recv = start(["recv", ...args], options)
  const uri = await new Promise<string>((resolve, reject) => {
    const check = () => {
      const m = /^multifd: listening on (\S+)$/m.exec(recv.stderr())
      if (m !== null) {
        recv.child.stderr!.off("data", check)
        resolve(m[1]!)
      }
    }
    recv.child.stderr!.on("data", check)
    void recv.finished.then((f) => reject(new Error(`recv ended (${f.code}) before listening: ${f.stderr}`)))
  })
  return { ...recv, uri }
}

/** Waits until the command's stderr matches `pattern` (or fails if it ends first). */
export const waitForStderr = (running: Running | RunningHere, pattern: RegExp): Promise<void> =>
  "waitFor" in running ? running.waitFor(pattern) : new Promise<void>((resolve, reject) => {
    const check = () => {
      if (pattern.test(running.stderr())) {
        running.child.stderr!.off("data", check)
        resolve()
      }
    }
    running.child.stderr!.on("data", check)
    check()
    void running.finished.then((f) => reject(new Error(`ended (${f.code}) before ${pattern}: ${f.stderr}`)))
  })

/**
 * Runs `recv` in this process until it ends, or until it prints its listening line (then it is interrupted:
 * it should not have started listening). `listened` tells which.
 */
export const runRecvHereUntilListening = async (
  args: ReadonlyArray<string>
): Promise<Finished & { readonly listened: boolean }> => {
  let listening: () => void = () => {}
  const listened = new Promise<void>((resolve) => (listening = resolve))
  const recv = startHere(["recv", ...args], (text) => {
    if (/^multifd: listening on /m.test(text)) listening()
  })
  const outcome = await Promise.race([
    recv.finished.then((finished) => ({ finished, listened: false })),
    listened.then(async () => ({ finished: await recv.interrupt(), listened: true }))
  ])
  return { ...outcome.finished, stdout: "", listened: outcome.listened }
}
