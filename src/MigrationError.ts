/**
 * Errors of a migration as a whole, and the wrapper that says which channel a transport error came from.
 *
 * @since 0.1.0
 */
import * as Data from "effect/Data"
import type * as Duration from "effect/Duration"
import * as DurationFns from "effect/Duration"

/**
 * Which connection of a migration: a multifd channel id or the main (control) channel.
 *
 * @since 0.1.0
 * @category models
 */
export type ChannelName = number | "main"

const describeChannel = (channel: ChannelName): string =>
  channel === "main" ? "main channel" : `multifd channel ${channel}`

/**
 * A failure on one connection of the migration (its cause says what: transport, TLS, handshake).
 *
 * @since 0.1.0
 * @category errors
 */
export class ChannelError extends Data.TaggedError("ChannelError")<{
  readonly channel: ChannelName
  readonly cause: { readonly message: string; readonly _tag: string }
  /**
   * A source's channel that was lost and did not come back: the new connections tried (`attempts`) from the loss
   * until it gave up (`afterMs`), and the reconnect window (`withinMs`); `cause` is the last attempt's failure.
   * `reattached`: how many of those attempts re-attached and then broke again (a path that flaps, rather than
   * one that refuses new connections).
   */
  readonly reconnects?: {
    readonly attempts: number
    readonly afterMs: number
    readonly withinMs: number
    readonly reattached?: number | undefined
  } | undefined
}> {
  override get message(): string {
    const r = this.reconnects
    const again = r?.reattached === undefined || r.reattached === 0
      ? ""
      : r.reattached === r.attempts
      ? `, ${r.attempts === 1 ? "which" : "each of which"} re-attached and broke again`
      : `, ${r.reattached} of which re-attached and broke again`
    const gaveUp = r === undefined
      ? ""
      : ` (lost, and not back after ${r.attempts} reconnect attempt${r.attempts === 1 ? "" : "s"} in ${seconds(r.afterMs)}` +
        `${r.afterMs >= r.withinMs ? `, the reconnect window of ${seconds(r.withinMs)}` : ""}${again}: the last one's error)`
    return `${describeChannel(this.channel)}: ${this.cause.message}${gaveUp}`
  }
}

/** `0.3 s`, `12 s`. */
const seconds = (ms: number): string => `${ms < 10_000 ? Math.round(ms / 100) / 10 : Math.round(ms / 1000)} s`

/**
 * The migration could not go on: refused, aborted by the peer, timed out, or its result did not verify; or it
 * could not start: `BadOptions`, options it cannot use (found before anything connects); `Busy`, another
 * migration, save or restore of the same memory under way, or another migration being received on the same listener.
 *
 * @since 0.1.0
 * @category errors
 */
export class MigrationError extends Data.TaggedError("MigrationError")<{
  readonly reason:
    | "Rejected"
    | "Aborted"
    | "Timeout"
    | "DigestMismatch"
    | "ChannelClosed"
    | "NotConverged"
    | "Unexpected"
    | "BadOptions"
    /**
     * A callback given in the options returned no `Effect` (an `async` function's Promise, `undefined`), or a
     * source's progress report (`onProgress`) threw, died or failed: the message names the callback and what it did.
     */
    | "CallbackFailed"
    /**
     * Another migration, snapshot save or restore of the same memory is under way (`GuestRam.transfer`), or
     * another migration is being received on the same listener.
     */
    | "Busy"
  readonly detail: string
}> {
  override get message(): string {
    return this.detail
  }
}

/**
 * Builds the error for a wait on the peer that ran out of time.
 *
 * @since 0.1.0
 * @category constructors
 */
export const timeout = (what: string, after: Duration.DurationInput): MigrationError =>
  new MigrationError({ reason: "Timeout", detail: `timed out after ${DurationFns.format(after)} ${what}` })

/**
 * Wraps an error from the named channel, keeping errors that already name their channel as they are.
 *
 * @since 0.1.0
 * @category utils
 */
export const onChannel = (channel: ChannelName) => <E extends { readonly _tag: string; readonly message: string }>(
  error: E
): E | ChannelError =>
  error._tag === "TransportError" || error._tag === "TlsError" ? new ChannelError({ channel, cause: error }) : error
