/**
 * The progress bar: the round's bytes sent (or received), the rate and the ETA on stderr, only when stderr is
 * a terminal. It is stopped when its scope closes, whatever the migration's outcome; its last frame is the
 * last report (a round's last report has all of its pages: a completed migration ends at 100 %).
 *
 * @since 0.1.0
 */
import CliProgress from "cli-progress"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import type * as Migration from "../Migration.js"
import { formatBytes, formatRate } from "./report.js"

/** Receives progress reports (as `onProgress` of `migrate` / `incoming`). */
export type OnProgress = (progress: Migration.Progress) => Effect.Effect<void>

/** How far back the ETA looks for the current rate. */
const ETA_WINDOW_MS = 5000

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
 * A progress bar labelled `label` while the scope is open, or `undefined` when `stream` (stderr by default) is
 * not a terminal. The bar starts with the first report (the destination learns the total from the source's
 * hello); each report sets the round's total, so a later round's bar is of its own pages.
 */
export const make = (
  label: string,
  stream: NodeJS.WritableStream & { readonly isTTY?: boolean } = process.stderr
): Effect.Effect<OnProgress | undefined, never, Scope.Scope> => {
  if (stream.isTTY !== true) return Effect.succeed(undefined)
  return Effect.map(
    Effect.acquireRelease(
      Effect.sync((): State => ({
        bar: new CliProgress.SingleBar({
          stream: stream as NodeJS.WriteStream,
          format: `${label} [{bar}] {percentage}% | {done} / {size} | {rate} | ETA {timeLeft}`,
          barCompleteChar: "\u2588",
          barIncompleteChar: "\u2591",
          hideCursor: true,
          fps: 10
        }),
        startedAt: 0,
        base: 0,
        lastDone: 0,
        lastTotal: 0,
        recent: []
      })),
      (state) => Effect.sync(() => state.bar.stop())
    ),
    (state): OnProgress => (progress) =>
      Effect.sync(() => {
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

const payload = (progress: Migration.Progress, moved: number, elapsedMs: number, etaText: string) => ({
  done: formatBytes(progress.doneBytes),
  size: formatBytes(progress.totalBytes),
  rate: elapsedMs > 0 ? formatRate(moved, elapsedMs) : "-",
  timeLeft: etaText
})
