/**
 * What both commands derive from their options and the environment: the library's timeouts, the settings
 * without a flag (`MigrationConfig`) and the TLS service.
 *
 * @since 0.1.0
 */
import * as AutoCorrect from "@effect/cli/AutoCorrect"
import * as CliConfig from "@effect/cli/CliConfig"
import * as Config from "effect/Config"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Os from "node:os"
import * as ChannelThreads from "../ChannelThreads.js"
import type * as Migration from "../Migration.js"
import * as MigrationConfig from "../MigrationConfig.js"
import * as PageCodec from "../PageCodec.js"
import type * as Protocol from "../Protocol.js"
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

const optional = <A>(config: Config.Config<A>) => Config.map(Config.option(config), Option.getOrUndefined)

/**
 * The settings that have no flag, from the environment (`MULTIFD_TIMEOUT`, `MULTIFD_CONNECT_TIMEOUT`,
 * `MULTIFD_HANDSHAKE_TIMEOUT`, the live policy, `MULTIFD_MAX_RAM`, `MULTIFD_ACCEPT_TIMEOUT`), for the library to
 * use where the command gives nothing (`--timeout` sets all three timeouts: given, their variables are not read,
 * as a flag given wins over its variable; a bad `MULTIFD_TIMEOUT` refused `--timeout 5s`). The flags' own variables
 * are read by their options (`Options.withFallbackConfig`), so that a flag given wins over them. A bad value is a
 * `UsageError` naming the variable (exit 2).
 */
export const environment = (timing: Options.Timing): Layer.Layer<MigrationConfig.MigrationConfig, UsageError> =>
  Layer.effect(
    MigrationConfig.MigrationConfig,
    Config.all({
      timeouts: Option.isSome(timing.timeout) ? Config.succeed({}) : MigrationConfig.timeouts,
      live: MigrationConfig.live,
      maxRamBytes: optional(MigrationConfig.maxRamBytes),
      acceptTimeout: optional(MigrationConfig.acceptTimeout)
    }).pipe(Effect.mapError((error) => new UsageError({ detail: MigrationConfig.describeError(error) })))
  )

/**
 * Warns of each `MULTIFD_` variable in `env` that nothing reads (`MigrationConfig.variables`; `MULTIFD_TLS_*` are
 * refused by `tlsOf`), naming the one it is closest to: a misspelt `MULTIFD_CHANELS=8` migrated over the default
 * two channels in silence.
 */
export const warnUnknownVariables = (env: NodeJS.ProcessEnv = process.env): Effect.Effect<void> => {
  const known = MigrationConfig.variables
  const config = CliConfig.make({})
  const unknown = Object.keys(env)
    .filter((name) => name.startsWith("MULTIFD_") && !name.startsWith("MULTIFD_TLS_") && !known.includes(name))
    .sort()
  return Effect.forEach(unknown, (name) => {
    const [closest] = known
      .map((k) => [k, AutoCorrect.levensteinDistance(name, k, config)] as const)
      .sort((a, b) => a[1] - b[1])
    const hint = closest !== undefined && closest[1] <= 2 ? ` (did you mean ${closest[0]}?)` : ""
    return Effect.logWarning(`${name} is set, but no setting of multifd has that name: ignored${hint}`)
  }, { discard: true })
}

/**
 * The TLS service the flags ask for, if any: flags that do not fit together, or TLS to a `file:` address (a
 * snapshot, or with `file` "qemu" a file QEMU wrote), are a `UsageError`; unreadable or unusable credentials (checked here, before anything listens or connects)
 * a `TlsError` with reason `Config` (both exit 2).
 */
export const tlsOf = (
  flags: Options.TlsFlags,
  role: "send" | "recv",
  uri: Transport.Address,
  timing: Options.Timing,
  /** What a `file:` uri names, for the refusal: a snapshot, or a file QEMU wrote (`recv --from-qemu`). */
  file: "snapshot" | "qemu" = "snapshot"
): Effect.Effect<Tls.Tls["Type"] | undefined, UsageError | Tls.TlsError> => {
  // the library's Tls.layerConfig reads MULTIFD_TLS_*; the command takes TLS from its flags alone. A variable
  // set for it would be ignored in silence (MULTIFD_TLS_VERIFY_PEER=true, and no peer verified): refused
  const variable = Object.keys(process.env).find((name) => name.startsWith("MULTIFD_TLS_"))
  if (variable !== undefined) {
    return Effect.fail(new UsageError({
      detail: `${variable} is set, but the command takes TLS settings from its --tls-* flags only ` +
        "(the library's Tls.layerConfig reads MULTIFD_TLS_*): unset it and give the flag"
    }))
  }
  return Either.match(Options.tlsConfigOf(flags, role, timing.timeout), {
    onLeft: (detail) => Effect.fail(new UsageError({ detail })),
    onRight: (config) =>
      config === undefined
        ? Effect.succeed(undefined)
        : uri._tag === "File"
        ? Effect.fail(new UsageError({
          detail: file === "qemu"
            ? "TLS does not apply to a file QEMU wrote (file: --from-qemu): it is read, not received"
            : "TLS does not apply to a file: snapshot"
        }))
        // a socket path names no host: without a name, any certificate of the CA would pass for the destination
        // (QEMU refuses likewise: "No hostname for certificate validation")
        : role === "send" && uri._tag === "Unix" && config.psk === undefined && config.hostname === undefined
        ? Effect.fail(new UsageError({
          detail: "send to a unix: socket with x509 needs --tls-hostname NAME, the name the destination's " +
            "certificate must carry: a socket path names no host to check it against"
        }))
        : role === "send"
        ? Effect.tap(Tls.make(config), (tls) => Tls.checkClient(tls.settings))
        : Effect.tap(Tls.make(config), (tls) => Tls.checkServer(tls.settings))
  })
}

/**
 * Warns that `recv --from-qemu` with x509 credentials and no `--tls-ca` verifies no client: QEMU's own destination
 * (`tls-creds-x509`, `verify-peer` on by default) does, and QEMU's channels carry no secret (its uuid is zeros unless
 * `-uuid` is given), so any peer that reaches the port and speaks TLS can offer the migration a channel of its own
 * before QEMU's. With a verified client every channel must be that client's.
 */
export const warnUnverifiedQemu = (settings: Tls.Settings): Effect.Effect<void> =>
  settings.credentials._tag === "X509" && !settings.verifyPeer && settings.authz === undefined
    ? Effect.logWarning(
      "--from-qemu without --tls-ca: QEMU's client certificate is not checked (QEMU's own destination checks it by " +
        "default), and QEMU's channels carry no secret: any peer that reaches the port and speaks TLS could send this " +
        "migration a channel of its own; give --tls-ca, the CA of QEMU's client certificate (its tls-creds-x509 " +
        "directory then needs client-cert.pem)"
    )
    : Effect.void

/**
 * Whether this machine can compress and decompress with `compression` (zstd needs its native binding, which npm
 * builds when the package is installed): a `UsageError` if not, before anything listens or connects. It failed the
 * migration (exit 1, as a transfer that failed), which a script retried for ever: the installation is to fix.
 */
export const checkCompression = (compression: Protocol.Compression | undefined): Effect.Effect<void, UsageError> =>
  compression === undefined ? Effect.void : Either.match(PageCodec.checkAvailable(compression), {
    onLeft: (error) => Effect.fail(new UsageError({ detail: `compression ${compression}: ${error.detail}` })),
    onRight: () => Effect.void
  })

/**
 * Whether the channels get worker threads: with compression (on memory that compresses, as a guest's code and
 * data do, compressing is most of the CPU and two threads use both cores: programs' image, two cores, zlib
 * 0.09 against 0.08 GiB/s, zstd 0.18–0.22 against 0.16), or with more than two cores. On two cores without
 * compression the two processes of a migration already keep both cores busy, and threads only add their
 * isolates' warm-up and messaging (random RAM: 0.86 against 0.93 GiB/s). docs/parallel-data-plane.md §9.
 */
export const wantsThreads = (compression: Protocol.Compression, cores = Os.availableParallelism()): boolean =>
  compression !== "none" || cores > 2

/**
 * The channels' worker threads (`ChannelThreads`), started before the migration when they pay
 * (`wantsThreads`); none for a snapshot file. A pool that cannot start leaves the channels on the main thread,
 * with a warning.
 */
export const channelThreads = (uri: Transport.Address, compression: Protocol.Compression): Layer.Layer<never> =>
  uri._tag === "File" || !wantsThreads(compression) ? Layer.empty : ChannelThreads.layer().pipe(
    Layer.catchAll((error) =>
      Layer.effectDiscard(Effect.logWarning(`channel threads: ${error.message}; the channels run on the main thread`))
    )
  )

