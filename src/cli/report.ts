/**
 * The result of a command: one JSON object on stdout with `--json`, else a one-line summary on stderr.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import type * as Migration from "../Migration.js"
import type * as MigrationStatus from "../MigrationStatus.js"
import * as Transport from "../Transport.js"
import { oneLine } from "./errors.js"
import * as Terminal from "./terminal.js"

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"] as const

/** `1.00 GiB`, `8.00 MiB`, `512 B`. */
export const formatBytes = (n: number): string => {
  let unit = 0
  let value = n
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024
    unit++
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(2)} ${UNITS[unit]}`
}

/** `1.18 GiB/s`, `61.50 MiB/s`: bytes over milliseconds. */
export const formatRate = (bytes: number, ms: number): string => `${formatBytes(bytes / (Math.max(ms, 1) / 1000))}/s`

/** What a finished command reports, in the order it appears in `--json`. */
export type Result =
  | {
    readonly role: "send"
    readonly input: string
    readonly pageSize: number
    readonly stats: Migration.Stats
    readonly status?: MigrationStatus.Snapshot | undefined
  }
  | {
    readonly role: "recv"
    readonly output: string
    readonly pageSize: number
    readonly stats: Migration.Stats
    readonly rejected: ReadonlyArray<string>
    readonly status?: MigrationStatus.Snapshot | undefined
    /** The file read rather than received (a `file:` uri): a snapshot, or a file QEMU wrote. Not in `--json`. */
    readonly read?: { readonly kind: "snapshot" | "qemu"; readonly path: string } | undefined
  }

/**
 * The `--json` object: the role, the file, the page size, then every field of `Stats` (and recv's
 * `rejected`), then `status`: the migration's final `MigrationStatus` (QEMU's `query-migrate` fields).
 */
export const toJson = (result: Result): Record<string, unknown> => {
  const status = result.status === undefined ? {} : { status: result.status }
  return result.role === "send"
    ? { role: "send", input: result.input, pageSize: result.pageSize, ...result.stats, ...status }
    : {
      role: "recv",
      output: result.output,
      pageSize: result.pageSize,
      ...result.stats,
      rejected: result.rejected,
      ...status
    }
}

/** `4 channels`, `1 channel`; none: the main channel alone (QEMU without multifd). */
const channelsOf = (n: number) => n === 0 ? "the main channel" : `${n} channel${n === 1 ? "" : "s"}`

/**
 * `multifd: migrated 1.00 GiB over 4 channels in 0.85 s (1.18 GiB/s), 262144 pages (65536 zero), 2052 packets`;
 * a file read rather than received, no channels nor packets:
 * `multifd: restored 1.00 GiB from snapshot S (saved by 4 writers) in 0.30 s (3.33 GiB/s), 262144 pages (65536 zero), wrote OUT`
 */
export const summary = (result: Result): string => {
  const s = result.stats
  const took = `in ${(s.durationMs / 1000).toFixed(2)} s (${formatRate(s.ramBytes, s.durationMs)})`
  const pages = `${s.normalPages + s.zeroPages} pages (${s.zeroPages} zero)`
  const where = result.role === "recv" ? `, wrote ${result.output}` : ""
  if (result.role === "recv" && result.read !== undefined) {
    // a header's writer count is what the save used; one that says none (a file not of this command) is left out
    const from = result.read.kind === "qemu"
      ? `read ${formatBytes(s.ramBytes)} from QEMU's file ${result.read.path}`
      : `restored ${formatBytes(s.ramBytes)} from snapshot ${result.read.path}` +
        (s.channels > 0 ? ` (saved by ${s.channels} writer${s.channels === 1 ? "" : "s"})` : "")
    return `multifd: ${from} ${took}, ${pages}${where}`
  }
  const verb = result.role === "send" ? "migrated" : "received"
  const compression = s.compression === "none" ? "" : ` with ${s.compression}`
  const reconnects = s.reconnects === undefined || s.reconnects === 0
    ? ""
    : `, ${s.reconnects} channel reconnect${s.reconnects === 1 ? "" : "s"} (${s.resentPages ?? 0} pages resent)`
  return `multifd: ${verb} ${formatBytes(s.ramBytes)} over ${channelsOf(s.channels)}${compression} ${took}, ` +
    `${pages}, ${s.packets} packets${reconnects}${where}`
}

/**
 * `multifd: listening on unix:/run/m.sock`: recv's line once it listens, the address it really has (the port picked
 * for port 0), on one printable line as every message (`oneLine`): a path with a line break or an escape sequence
 * in it was printed as it was, on two lines or acted on by the terminal (and `listening on (\S+)$` no longer read it).
 */
export const listeningLine = (address: Transport.Address): string =>
  oneLine(`multifd: listening on ${Transport.formatAddress(address)}`)

/**
 * Reports a finished command: the JSON object on stdout with `--json` (an `OutputError` if stdout does not take
 * it: the script waiting for it would get nothing), else the summary on stderr unless `--quiet`.
 */
export const print = (
  result: Result,
  reporting: { readonly json: boolean; readonly quiet: boolean }
): Effect.Effect<void, Terminal.OutputError, Terminal.Terminal> =>
  reporting.json
    ? Terminal.out(JSON.stringify(toJson(result)), "the --json result")
    : reporting.quiet
    ? Effect.void
    // one printable line, as every message: the files it names are the user's (a line break in --out split it, an
    // escape sequence there was acted on by the terminal)
    : Terminal.err(oneLine(summary(result)))
