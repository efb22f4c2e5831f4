/**
 * The progress bar: bytes moved, GiB/s and ETA on stderr, only when stderr is a terminal. It is stopped when
 * its scope closes, whatever the migration's outcome.
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

/**
 * A progress bar labelled `label` while the scope is open, or `undefined` when stderr is not a terminal.
 * The bar starts with the first report (the destination learns the total from the source's hello).
 */
export const make = (
  label: string,
  stream: NodeJS.WriteStream = process.stderr
): Effect.Effect<OnProgress | undefined, never, Scope.Scope> => {
  if (stream.isTTY !== true) return Effect.succeed(undefined)
  return Effect.map(
    Effect.acquireRelease(
      Effect.sync(() => ({
        bar: new CliProgress.SingleBar({
          stream,
          format: `${label} [{bar}] {percentage}% | {done} / {size} | {rate} | ETA {eta_formatted}`,
          barCompleteChar: "\u2588",
          barIncompleteChar: "\u2591",
          hideCursor: true,
          etaBuffer: 50,
          fps: 10
        }),
        startedAt: 0
      })),
      (state) => Effect.sync(() => state.bar.stop())
    ),
    (state): OnProgress => (progress) =>
      Effect.sync(() => {
        const now = performance.now()
        if (state.startedAt === 0) {
          state.startedAt = now
          state.bar.start(progress.totalBytes, 0, payload(progress, 0))
        }
        state.bar.update(progress.doneBytes, payload(progress, now - state.startedAt))
      })
  )
}

const payload = (progress: Migration.Progress, elapsedMs: number) => ({
  done: formatBytes(progress.doneBytes),
  size: formatBytes(progress.totalBytes),
  rate: elapsedMs > 0 ? formatRate(progress.doneBytes, elapsedMs) : "-"
})
