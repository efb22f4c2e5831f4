/**
 * Progress on stderr. On a terminal, a bar: the round's bytes sent (or received), the rate and the ETA; it is
 * stopped when its scope closes, whatever the migration's outcome, and its last frame is the last report (a
 * round's last report has all of its pages: a completed migration ends at 100 %). When stderr is not a
 * terminal (a log file, a pipe), or is one that cannot move its cursor (`TERM=dumb`: an editor's shell buffer,
 * which would show the bar's escape sequences as text), a line every `LINE_INTERVAL_MS` instead, and one at once
 * on SIGUSR1; nothing with `--quiet`.
 *
 * @since 0.1.0
 */
import CliProgress from "cli-progress"
import * as Clock from "effect/Clock"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as FileIo from "../internal/native/fileIo.js"
import type * as Migration from "../Migration.js"
import { oneLine } from "./errors.js"
import { formatBytes, formatRate } from "./report.js"
import * as Terminal from "./terminal.js"

/** Receives progress reports (as `onProgress` of `migrate` / `incoming`). */
export type OnProgress = (progress: Migration.Progress) => Effect.Effect<void>

/** How often a line is printed when stderr is not a terminal. */
export const LINE_INTERVAL_MS = 5000

/** How far back the ETA looks for the current rate. */
const ETA_WINDOW_MS = 5000

/**
 * The bars on a terminal now (each hides the cursor while it is drawn) and the stream each is drawn on, for
 * `stopNow`: a process that exits without closing its scopes (a second signal) left the cursor hidden and the
 * bar's line unended; and for `writeLines`.
 */
const drawn = new Map<CliProgress.SingleBar, NodeJS.WritableStream>()

/**
 * Stops, synchronously, every bar still drawn: its last frame ended, the cursor shown again. For a process about
 * to exit at once (`signals.ts`).
 */
export const stopNow = (): void => {
  for (const bar of drawn.keys()) bar.stop()
  drawn.clear()
}

/**
 * Writes `text` (whole lines, each ending in a line feed) on stderr, above the bar while one is drawn there (on
 * the bar's stream). Written as it came, a line ran on from the bar's text, cut at the terminal's edge (the bar
 * turns line wrapping off), and the bar's end put the cursor back where the bar had started (cli-progress
 * restores the position it saved then): the summary was written over the lines printed since, and the shell's
 * prompt came in the middle of the screen. Now the bar's line is cleared, the text written there with lines
 * wrapped, the cursor saved again on the line below, where the bar is drawn again.
 */
export const writeLines = (text: string): void => {
  const bar = [...drawn.entries()].find(([bar]) => bar.isActive)
  if (bar === undefined) {
    process.stderr.write(text)
    return
  }
  const [active, stream] = bar
  stream.write(`\r${CLEAR_LINE}${WRAP_LINES}${text}${SAVE_CURSOR}${NO_WRAP}`)
  // drawn again at once (the bar's option forceRedraw: an unchanged frame is drawn too)
  active.render()
}

interface State {
  readonly bar: CliProgress.SingleBar
  /** When the first report came (the rate counts from there). */
  startedAt: number
  /** Bytes of the rounds before this one (a source's rounds count from 0 each). */
  base: number
  lastDone: number
  lastTotal: number
  /** Recent (time, bytes moved in all) points, for the ETA. */
  readonly recent: Array<{ readonly at: number; readonly moved: number }>
}

/**
 * Progress reports for `label` while the scope is open: a bar when `stream` (stderr by default) is a terminal,
 * else a line every few seconds through `Terminal`; `undefined` with `quiet`. The bar starts with the first
 * report (the destination learns the total from the source's hello); each report sets the round's total, so a
 * later round's bar is of its own pages.
 */
export const make = (
  label: string,
  options: {
    readonly quiet?: boolean | undefined
    readonly stream?: (NodeJS.WritableStream & { readonly isTTY?: boolean }) | undefined
    /** The terminal's type (default: `TERM`); `dumb` gets the lines. */
    readonly term?: string | undefined
  } = {}
): Effect.Effect<OnProgress | undefined, never, Scope.Scope | Terminal.Terminal> => {
  const stream = options.stream ?? process.stderr
  if (options.quiet === true) return Effect.succeed(undefined)
  if (stream.isTTY !== true || (options.term ?? process.env["TERM"]) === "dumb") return lines(label)
  return Effect.map(
    Effect.tap(
      Effect.acquireRelease(
        Effect.sync((): State => {
          const bar = new CliProgress.SingleBar({
            stream: stream as NodeJS.WriteStream,
            format: frame(label),
            hideCursor: true,
            fps: 10,
            // its line may have been cleared for a line written above it (`writeLines`)
            forceRedraw: true
          })
          drawn.set(bar, stream)
          return { bar, startedAt: 0, base: 0, lastDone: 0, lastTotal: 0, recent: [] }
        }),
        (state) =>
          Effect.sync(() => {
            drawn.delete(state.bar)
            state.bar.stop()
          })
      ),
      (state) => suspendable(state.bar, stream)
    ),
    (state): OnProgress => (progress) =>
      Effect.sync(() => {
        // every page sent, the destination verifying or storing: the frame keeps its numbers and says so in place of
        // the rate and the ETA, once it has waited a second (a store that ends sooner leaves the frame as it was)
        const wait = progress.destination
        if (wait !== undefined) {
          if (wait.forMs >= 1000 && state.startedAt !== 0) {
            state.bar.update(state.lastDone, {
              ...payload({ ...progress, doneBytes: state.lastDone, totalBytes: state.lastTotal }, 0, 0, "-"),
              rate: `destination ${wait.state}, ${Math.round(wait.forMs / 1000)} s`
            })
          }
          return
        }
        const now = performance.now()
        // a report with fewer bytes done than the last is a new round's: the last round's pages were all sent
        if (progress.doneBytes < state.lastDone) state.base += state.lastTotal
        state.lastDone = progress.doneBytes
        state.lastTotal = progress.totalBytes
        const moved = state.base + progress.doneBytes
        state.recent.push({ at: now, moved })
        while (state.recent.length > 2 && now - state.recent[1]!.at >= ETA_WINDOW_MS) state.recent.shift()
        if (state.startedAt === 0) {
          state.startedAt = now
          state.bar.start(progress.totalBytes, progress.doneBytes, payload(progress, moved, 0, "-"))
          return
        }
        if (progress.totalBytes !== state.bar.getTotal()) state.bar.setTotal(progress.totalBytes)
        state.bar.update(progress.doneBytes, payload(progress, moved, now - state.startedAt, eta(state, progress, now)))
      })
  )
}

/**
 * While the scope is open, Ctrl-Z (SIGTSTP) gives the terminal back as it was before the bar (the cursor shown,
 * lines wrapped) before the process stops, and `fg` (SIGCONT) sets it for the bar again: by default the process
 * stopped where it stood, and the shell's prompt came back without a cursor, its long lines unwrapped. (The
 * process stops itself with SIGSTOP, which a handler cannot catch: SIGTSTP's default.)
 */
const suspendable = (bar: CliProgress.SingleBar, stream: NodeJS.WritableStream): Effect.Effect<void, never, Scope.Scope> =>
  Effect.asVoid(Effect.acquireRelease(
    Effect.sync(() => {
      const onStop = () => {
        if (bar.isActive) stream.write(SHOW_CURSOR + WRAP_LINES)
        process.kill(process.pid, "SIGSTOP")
      }
      // the bar goes on on the line the cursor is on now, below what the shell printed meanwhile ("Stopped", fg's
      // command line): its position is saved again there, else the bar's end went back to where it had started,
      // and the summary was written over those lines
      const onContinue = () => {
        if (bar.isActive) stream.write(`\r${SAVE_CURSOR}${HIDE_CURSOR}${NO_WRAP}`)
      }
      process.on("SIGTSTP", onStop)
      process.on("SIGCONT", onContinue)
      return { onStop, onContinue }
    }),
    ({ onContinue, onStop }) =>
      Effect.sync(() => {
        process.off("SIGTSTP", onStop)
        process.off("SIGCONT", onContinue)
      })
  ))

/** The terminal's escape sequences that show and hide the cursor, and turn line wrapping on and off (cli-progress's). */
const SHOW_CURSOR = "\x1b[?25h"
const HIDE_CURSOR = "\x1b[?25l"
const WRAP_LINES = "\x1b[?7h"
const NO_WRAP = "\x1b[?7l"
/** Saves the cursor's position (cli-progress's bar goes back to it when it stops), and erases the cursor's line. */
const SAVE_CURSOR = "\x1b7"
const CLEAR_LINE = "\x1b[2K"

/** The next delivery of `signal` to the process. */
const next = (signal: NodeJS.Signals): Effect.Effect<void> =>
  Effect.async<void>((resume) => {
    const onSignal = () => resume(Effect.void)
    process.once(signal, onSignal)
    return Effect.sync(() => process.off(signal, onSignal))
  })

/**
 * A line every `LINE_INTERVAL_MS` of the `Clock` (the first after as long: a short migration prints none), and
 * the line of the last report at once on SIGUSR1, as `dd` prints its progress (before any report, that no page
 * moved yet).
 */
const lines = (label: string): Effect.Effect<OnProgress, never, Scope.Scope | Terminal.Terminal> =>
  Effect.gen(function*() {
    const terminal = yield* Terminal.Terminal
    let startedAt: number | undefined
    let lastLine = 0
    let base = 0
    let lastDone = 0
    let lastTotal = 0
    let last: { readonly progress: Migration.Progress; readonly at: number } | undefined
    // the last report of pages (not of a wait for the destination): its numbers stay on the lines of the wait
    let lastPages: Migration.Progress | undefined
    // since when the reports have seen a file being flushed to disk (the image, once every byte is in): a slow disk
    // holds the command there for minutes, and a rate falling line after line said nothing of it
    let flushingSince: number | undefined
    const line = (progress: Migration.Progress, at: number, since: number) => {
      const percent = progress.totalBytes > 0 ? Math.floor(progress.doneBytes / progress.totalBytes * 100) : 100
      const done = `multifd: ${label}: ${formatBytes(progress.doneBytes)} of ${formatBytes(progress.totalBytes)} (${percent}%)`
      // a source whose pages are all sent: what its destination does (a store on a slow disk takes minutes), after
      // the numbers of its last report of pages
      if (progress.destination !== undefined) {
        const pages = lastPages ?? progress
        const all = pages.totalBytes > 0 ? Math.floor(pages.doneBytes / pages.totalBytes * 100) : 100
        return `multifd: ${label}: ${formatBytes(pages.doneBytes)} of ${formatBytes(pages.totalBytes)} (${all}%): ` +
          waitingFor(progress.destination)
      }
      const flushing = FileIo.flushingNow()
      if (flushing.length > 0 && flushingSince !== undefined) {
        return oneLine(
          `${done}: waiting ${Math.round((at - flushingSince) / 1000)} s so far for ${flushing.join(", ")} to be flushed to disk`
        )
      }
      return `${done} in round ${progress.round}${at > since ? `, ${formatRate(base + progress.doneBytes, at - since)}` : ""}`
    }
    // before the first report (recv waiting for its source, send for its destination's answer) a line that says so:
    // the signal answered with nothing looked lost
    yield* Effect.forkScoped(Effect.forever(Effect.zipRight(
      next("SIGUSR1"),
      Effect.suspend(() =>
        last === undefined || startedAt === undefined
          ? terminal.err(`multifd: ${label}: no pages ${label === "send" ? "sent" : "received"} yet`)
          : terminal.err(line(last.progress, last.at, startedAt))
      )
    )))
    return (progress: Migration.Progress) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) => {
        startedAt ??= now
        if (progress.destination !== undefined) {
          last = { progress, at: now }
          if (now - Math.max(lastLine, startedAt) < LINE_INTERVAL_MS) return Effect.void
          lastLine = now
          return terminal.err(line(progress, now, startedAt))
        }
        lastPages = progress
        if (progress.doneBytes < lastDone) base += lastTotal
        lastDone = progress.doneBytes
        lastTotal = progress.totalBytes
        last = { progress, at: now }
        flushingSince = FileIo.flushingNow().length === 0 ? undefined : flushingSince ?? now
        if (now - Math.max(lastLine, startedAt) < LINE_INTERVAL_MS) return Effect.void
        lastLine = now
        return terminal.err(line(progress, now, startedAt))
      })
  })

/** A source's wait for its destination, said in a line ("waiting 12 s so far for the destination to store the image"). */
const waitingFor = (wait: Migration.DestinationWait): string =>
  `waiting ${Math.round(wait.forMs / 1000)} s so far for the destination to ${
    wait.state === "storing" ? "store the image" : "verify the digests"
  }`

/** Time left for the round at the rate of the last seconds: `-` until it can be told. */
const eta = (state: State, progress: Migration.Progress, now: number): string => {
  const left = progress.totalBytes - progress.doneBytes
  if (left <= 0) return "0s"
  const first = state.recent[0]!
  const rate = now > first.at ? (state.base + progress.doneBytes - first.moved) / (now - first.at) : 0
  if (!(rate > 0)) return "-"
  const seconds = Math.ceil(left / rate / 1000)
  return seconds < 60
    ? `${seconds}s`
    : seconds < 3600
    ? `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`
    : `${Math.floor(seconds / 3600)}h${String(Math.floor(seconds / 60) % 60).padStart(2, "0")}m`
}

/** The widest bar, and the narrowest worth drawing (narrower, the frame is its numbers alone). */
const BAR_WIDTH = 40
const MIN_BAR_WIDTH = 10

/**
 * A frame of the bar: `send [████░░░░] 51% | 33.00 MiB / 64.00 MiB | 31.86 MiB/s | ETA 1s`, its bar as wide as the
 * terminal has room for (at most `BAR_WIDTH`), none on a terminal too narrow for one: the frame never reaches the
 * terminal's last column. With a bar of 40 always, the frame was 98 columns wide and, line wrapping off, a terminal
 * of 80 (the usual) cut it after "| 3": the rate and the ETA were never seen.
 */
const frame = (label: string) => (_: CliProgress.Options, params: CliProgress.Params, payload: Payload): string => {
  const numbers = `${Math.floor(params.progress * 100)}% | ${payload.done} / ${payload.size} | ${payload.rate} | ` +
    `ETA ${payload.timeLeft}`
  // the label, " [", "] " and the numbers, short of the last column (where some terminals wrap all the same)
  const width = Math.min(BAR_WIDTH, params.maxWidth - 1 - label.length - 4 - numbers.length)
  if (width < MIN_BAR_WIDTH) return `${label} ${numbers}`
  const done = Math.min(width, Math.max(0, Math.round(params.progress * width)))
  return `${label} [${"\u2588".repeat(done)}${"\u2591".repeat(width - done)}] ${numbers}`
}

/** What a frame shows besides the bar and the percentage. */
interface Payload {
  readonly done: string
  readonly size: string
  readonly rate: string
  readonly timeLeft: string
}

const payload = (progress: Migration.Progress, moved: number, elapsedMs: number, etaText: string): Payload => ({
  done: formatBytes(progress.doneBytes),
  size: formatBytes(progress.totalBytes),
  rate: elapsedMs > 0 ? formatRate(moved, elapsedMs) : "-",
  timeLeft: etaText
})
