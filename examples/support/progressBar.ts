/**
 * A progress bar on stderr for the demo (`npm start`), not an example of its own (a plain line per 25% when stderr is not a terminal, or is TERM=dumb).
 */
import * as CliProgress from "cli-progress"
import * as Effect from "effect/Effect"
import type * as Migration from "../../src/Migration.js"

export const progressBar = (label: string) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const bar = process.stderr.isTTY && process.env["TERM"] !== "dumb"
        ? new CliProgress.SingleBar({
          stream: process.stderr,
          format: `${label} [{bar}] {percentage}% | {value}/{total} MiB`,
          hideCursor: true
        }, CliProgress.Presets.shades_classic)
        : undefined
      let quarter = 0
      return {
        bar,
        update: (p: Migration.Progress) =>
          Effect.sync(() => {
            const mib = Math.round(p.doneBytes / 2 ** 20)
            if (bar) {
              if (bar.getTotal() !== Math.round(p.totalBytes / 2 ** 20)) bar.start(Math.round(p.totalBytes / 2 ** 20), mib)
              else bar.update(mib)
            } else if (p.doneBytes * 4 >= (quarter + 1) * p.totalBytes) {
              quarter = Math.floor(p.doneBytes * 4 / p.totalBytes)
              process.stderr.write(`${label}: ${quarter * 25}%\n`)
            }
          })
      }
    }),
    ({ bar }) => Effect.sync(() => bar?.stop())
  )
