/**
 * What both commands derive from their options: the library's timeouts and the TLS service.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import type * as Migration from "../Migration.js"
import * as Tls from "../Tls.js"
import type * as Transport from "../Transport.js"
import { UsageError } from "./errors.js"
import * as Options from "./options.js"

/** `--timeout` as the library's timeouts: the peer's answers, connecting, and a new connection's handshake. */
export const timeoutsOf = (timing: Options.Timing): Partial<Migration.Timeouts> =>
  Option.match(timing.timeout, {
    onNone: () => ({}),
    onSome: (d) => ({ peer: d, connect: d, handshake: d })
  })

/**
 * The TLS service the flags ask for, if any: flags that do not fit together, or TLS to a `file:` address,
 * are a `UsageError`; unreadable or unusable credentials (checked here, before anything listens or connects)
 * a `TlsError` with reason `Config` (both exit 2).
 */
export const tlsOf = (
  flags: Options.TlsFlags,
  role: "send" | "recv",
  uri: Transport.Address,
  timing: Options.Timing
): Effect.Effect<Tls.Tls["Type"] | undefined, UsageError | Tls.TlsError> =>
  Either.match(Options.tlsConfigOf(flags, role, timing.timeout), {
    onLeft: (detail) => Effect.fail(new UsageError({ detail })),
    onRight: (config) =>
      config === undefined
        ? Effect.succeed(undefined)
        : uri._tag === "File"
        ? Effect.fail(new UsageError({ detail: "TLS does not apply to a file: snapshot" }))
        : role === "send"
        ? Effect.tap(Tls.make(config), (tls) => Tls.checkClient(tls.settings))
        : Tls.make(config)
  })
