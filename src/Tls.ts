/**
 * TLS on every connection of a migration, as QEMU's `tls-creds-psk` / `tls-creds-x509` do: pre-shared keys
 * in QEMU's `keys.psk` format, or x509 certificates with host name checking, optional client certificates
 * and an authorization list. The handshake is an Effect with a timeout that must succeed before a channel
 * exists; the TLS socket is destroyed at once on failure and ended with close_notify on success.
 *
 * @since 0.1.0
 */
import * as Config from "effect/Config"
import * as ConfigError from "effect/ConfigError"
import * as Context from "effect/Context"
import * as Data from "effect/Data"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"
import * as Fs from "node:fs/promises"
import * as NodeTls from "node:tls"
import * as Transport from "./Transport.js"

/** A TLS failure: bad configuration, a failed or stalled handshake, or a peer that is not authorized. */
export class TlsError extends Data.TaggedError("TlsError")<{
  readonly reason: "Config" | "Handshake" | "Timeout" | "Unauthorized"
  readonly detail: string
  readonly cause?: unknown
}> {
  override get message(): string {
    return this.reason === "Config" ? `TLS configuration: ${this.detail}` : `TLS ${this.detail}`
  }
}

/** TLS settings as files and names: what the CLI flags and environment variables carry. */
export const TlsConfig = Schema.Struct({
  /** QEMU `keys.psk` file: one `identity:hexkey` a line. */
  psk: Schema.optional(Schema.String),
  /** PSK identity the source presents (default `qemu`, as QEMU). */
  identity: Schema.optional(Schema.String),
  /** CA certificate(s), PEM: verifies the peer's certificate. */
  ca: Schema.optional(Schema.String),
  /** This side's certificate, PEM. */
  cert: Schema.optional(Schema.String),
  /** This side's private key, PEM. */
  key: Schema.optional(Schema.String),
  /** Name the destination's certificate must carry (default: the host of the address). */
  hostname: Schema.optional(Schema.String),
  /** Destination: require and verify client certificates. */
  verifyPeer: Schema.optional(Schema.Boolean),
  /** Destination: admit only these client certificate CNs or PSK identities. */
  authz: Schema.optional(Schema.Array(Schema.String)),
  /** Handshake timeout in milliseconds (default 10000). */
  handshakeTimeoutMs: Schema.optional(Schema.Number.pipe(Schema.positive()))
})

/** TLS settings as files and names. */
export type TlsConfig = Schema.Schema.Type<typeof TlsConfig>

/** Loaded credentials, ready for handshakes. */
export type Credentials =
  | {
    readonly _tag: "Psk"
    /** Every identity and key of the keys file. */
    readonly keys: ReadonlyMap<string, Buffer>
    /** The identity the source presents. */
    readonly identity: string
  }
  | {
    readonly _tag: "X509"
    readonly ca: string | undefined
    readonly cert: string | undefined
    readonly key: string | undefined
  }

/** Everything a handshake needs. */
export interface Settings {
  readonly credentials: Credentials
  readonly hostname: string | undefined
  readonly verifyPeer: boolean
  readonly authz: ReadonlyArray<string> | undefined
  readonly handshakeTimeout: Duration.Duration
}

/** Default handshake timeout. */
export const DEFAULT_HANDSHAKE_TIMEOUT = Duration.seconds(10)

/** Parses QEMU's `keys.psk` format: one `identity:hexkey` a line; blank lines and `#` comments ignored. */
export const parsePskFile = (text: string, source = "keys file"): Effect.Effect<ReadonlyMap<string, Buffer>, TlsError> =>
  Effect.suspend(() => {
    const keys = new Map<string, Buffer>()
    const lines = text.split(/\r?\n/)
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i]!.trim()
      if (line === "" || line.startsWith("#")) continue
      const colon = line.lastIndexOf(":")
      const identity = line.slice(0, colon)
      const hex = line.slice(colon + 1)
      if (colon <= 0 || hex.length === 0 || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
        return new TlsError({ reason: "Config", detail: `${source} line ${i + 1} is not identity:hexkey` })
      }
      keys.set(identity, Buffer.from(hex, "hex"))
    }
    if (keys.size === 0) return new TlsError({ reason: "Config", detail: `${source} has no identity:hexkey line` })
    return Effect.succeed(keys)
  })

const readText = (path: string, what: string) =>
  Effect.tryPromise({
    try: () => Fs.readFile(path, "utf8"),
    catch: (cause) =>
      new TlsError({ reason: "Config", detail: `cannot read ${what} ${path}: ${(cause as Error).message}`, cause })
  })

/** Reads the files a `TlsConfig` names and checks that the combination makes sense. */
export const load = (config: TlsConfig): Effect.Effect<Settings, TlsError> =>
  Effect.gen(function*() {
    const x509 = config.ca !== undefined || config.cert !== undefined || config.key !== undefined
    if (config.psk !== undefined && x509) {
      return yield* new TlsError({ reason: "Config", detail: "use either a PSK file or x509 certificates, not both" })
    }
    if ((config.cert === undefined) !== (config.key === undefined)) {
      return yield* new TlsError({ reason: "Config", detail: "a certificate needs its key and a key its certificate" })
    }
    const credentials: Credentials = config.psk !== undefined
      ? {
        _tag: "Psk",
        keys: yield* Effect.flatMap(readText(config.psk, "PSK file"), (text) => parsePskFile(text, config.psk)),
        identity: config.identity ?? "qemu"
      }
      : x509
      ? {
        _tag: "X509",
        ca: config.ca === undefined ? undefined : yield* readText(config.ca, "CA certificate"),
        cert: config.cert === undefined ? undefined : yield* readText(config.cert, "certificate"),
        key: config.key === undefined ? undefined : yield* readText(config.key, "private key")
      }
      : yield* new TlsError({ reason: "Config", detail: "no credentials: give a PSK file or x509 certificates" })
    return {
      credentials,
      hostname: config.hostname,
      verifyPeer: config.verifyPeer ?? false,
      authz: config.authz,
      handshakeTimeout: config.handshakeTimeoutMs === undefined
        ? DEFAULT_HANDSHAKE_TIMEOUT
        : Duration.millis(config.handshakeTimeoutMs)
    }
  })

// TLS 1.3 external PSKs in OpenSSL use SHA-256 suites; the TLS 1.2 PSK suites are a fallback (ECDHE-PSK first:
// forward secrecy, and what QEMU's GnuTLS offers first).
const PSK_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:ECDHE-PSK-CHACHA20-POLY1305:" +
  "PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305"

const describe = (error: unknown): string => {
  const e = error as (Error & { code?: string; reason?: string }) | undefined
  const text = e?.reason ?? e?.message ?? String(error)
  // OpenSSL's long form: "8050...:error:0A000410:SSL routines:fn:reason:../deps/...:line:"
  return text.replace(/^[0-9A-F]+:error:[0-9A-F]+:SSL routines:[^:]*:/, "").replace(/:\.\.\/deps\/.*$/s, "").trim()
}

/** Adds what an alert most likely means when keys or certificates do not match. */
const hint = (credentials: Credentials, text: string): string =>
  credentials._tag === "Psk" && /illegal parameter|binder|decrypt|bad record mac/.test(text)
    ? `${text} (do both sides use the same pre-shared key for this identity?)`
    : /certificate required/.test(text)
    ? `${text} (the destination requires a client certificate)`
    : text

/** Runs a handshake on a TLS socket: resolves on `secureEvent`, fails on error, close or timeout. */
const handshake = (
  socket: NodeTls.TLSSocket,
  secureEvent: "secureConnect" | "secure",
  peer: string,
  timeout: Duration.Duration,
  explain: (text: string) => string,
  authorize: (socket: NodeTls.TLSSocket) => string | undefined
) =>
  Effect.async<void, TlsError>((resume) => {
    const onSecure = () => {
      cleanup()
      const refusal = authorize(socket)
      resume(
        refusal === undefined
          ? Effect.void
          : Effect.fail(new TlsError({ reason: "Unauthorized", detail: `handshake with ${peer}: ${refusal}` }))
      )
    }
    const onError = (error: Error) => {
      cleanup()
      resume(Effect.fail(new TlsError({ reason: "Handshake", detail: `handshake with ${peer} failed: ${explain(describe(error))}`, cause: error })))
    }
    const onClose = () => {
      cleanup()
      resume(Effect.fail(new TlsError({ reason: "Handshake", detail: `handshake with ${peer} failed: connection closed` })))
    }
    const cleanup = () => {
      socket.off(secureEvent, onSecure)
      socket.off("error", onError)
      socket.off("close", onClose)
    }
    socket.once(secureEvent, onSecure)
    socket.once("error", onError)
    socket.once("close", onClose)
    return Effect.sync(cleanup)
  }).pipe(
    Effect.timeoutFail({
      duration: timeout,
      onTimeout: () =>
        new TlsError({ reason: "Timeout", detail: `handshake with ${peer} timed out after ${Duration.format(timeout)}` })
    })
  )

/** Wraps a TLS socket as a scoped connection: destroyed at once on failure, `end` sends close_notify. */
const secured = (socket: NodeTls.TLSSocket, peer: string) =>
  Effect.acquireRelease(Effect.succeed(socket), Transport.destroy).pipe(
    // once secure, Node only emits a TLS error (a fatal alert, say) and leaves the socket open, where further
    // writes never complete: destroy it, as a plain socket is on error
    Effect.tap(() => Effect.sync(() => socket.on("error", () => socket.destroy()))),
    Effect.zipRight(Transport.fromStream(socket, peer))
  )

const pskKey = (settings: Settings, identity: string): Buffer | undefined =>
  settings.credentials._tag === "Psk" &&
    (settings.authz === undefined || settings.authz.includes(identity))
    ? settings.credentials.keys.get(identity)
    : undefined

/** The source side: a TLS client handshake on each connection. `host` is the default name to check. */
export const client = (settings: Settings, host: string | undefined): Transport.Upgrade<TlsError> =>
(connection) =>
  Effect.gen(function*() {
    const creds = settings.credentials
    const servername = settings.hostname ?? host
    const socket = yield* Effect.acquireRelease(
      Effect.sync(() =>
        creds._tag === "Psk"
          ? NodeTls.connect({
            socket: connection.stream as never,
            ciphers: PSK_CIPHERS,
            minVersion: "TLSv1.2",
            pskCallback: () => {
              const psk = creds.keys.get(creds.identity)
              return psk === undefined ? null : { psk, identity: creds.identity }
            },
            checkServerIdentity: () => undefined
          })
          : NodeTls.connect({
            socket: connection.stream as never,
            minVersion: "TLSv1.2",
            ...(creds.ca !== undefined ? { ca: creds.ca } : {}),
            ...(creds.cert !== undefined ? { cert: creds.cert, key: creds.key } : {}),
            ...(servername !== undefined && !Transport.isIp(servername) ? { servername } : {}),
            checkServerIdentity: (_name, cert) => {
              const mismatch = servername === undefined ? undefined : NodeTls.checkServerIdentity(servername, cert)
              if (mismatch === undefined) return undefined
              const names = cert.subjectaltname ?? `CN=${cert.subject?.CN}`
              return Object.assign(mismatch, {
                reason: `${(mismatch as Error & { reason?: string }).reason ?? mismatch.message} `.replace(/:\s*$/, "")
                  .trim() + ` (the certificate is for ${names})`
              })
            }
          })
      ),
      Transport.destroy
    )
    if (creds._tag === "Psk" && !creds.keys.has(creds.identity)) {
      return yield* new TlsError({ reason: "Config", detail: `the PSK file has no key for identity ${creds.identity}` })
    }
    yield* handshake(socket, "secureConnect", connection.peer, settings.handshakeTimeout, (t) => hint(creds, t), (s) =>
      creds._tag === "X509" && !s.authorized
        ? `certificate not trusted: ${describe(s.authorizationError)}`
        : undefined)
    return yield* secured(socket, connection.peer)
  })

/** How the destination's handshakes treat their peers. */
export interface ServerOptions {
  /**
   * The peers only write after the handshake and never read (QEMU's migration channels without a return path):
   * nothing may reach them after their handshake. Bytes a peer leaves unread make its kernel reset the
   * connection when the peer closes it, and a reset throws away whatever the peer had queued but not yet sent:
   * the end of its stream. A TLS 1.3 server sends session tickets after the handshake (OpenSSL always does and
   * Node cannot turn that off), so these handshakes stop at TLS 1.2, whose ticket is part of the handshake.
   */
  readonly writeOnlyPeers?: boolean | undefined
}

/** The destination side: a TLS server handshake on each accepted connection, then authorization. */
export const server = (settings: Settings, options?: ServerOptions): Transport.Upgrade<TlsError> => (connection) =>
  Effect.gen(function*() {
    const creds = settings.credentials
    // a PSK identity outside the authorization list makes OpenSSL fail with an unrelated alert: remember it
    let refusedIdentity: string | undefined
    const verifyPeer = settings.verifyPeer || (creds._tag === "X509" && settings.authz !== undefined)
    // (a secure context carries its own versions: the socket's are ignored then)
    const versions: Pick<NodeTls.SecureContextOptions, "minVersion" | "maxVersion"> = {
      minVersion: "TLSv1.2",
      ...(options?.writeOnlyPeers === true ? { maxVersion: "TLSv1.2" } : {})
    }
    const socket = yield* Effect.acquireRelease(
      Effect.sync(() =>
        new NodeTls.TLSSocket(connection.stream as never, {
          isServer: true,
          ...versions,
          ...(creds._tag === "Psk"
            ? {
              ciphers: PSK_CIPHERS,
              pskCallback: (_socket: NodeTls.TLSSocket, identity: string) => {
                const key = pskKey(settings, identity)
                if (key === undefined) refusedIdentity = identity
                return key ?? null
              }
            }
            : {
              secureContext: NodeTls.createSecureContext({
                ...versions,
                ...(creds.ca !== undefined ? { ca: creds.ca } : {}),
                ...(creds.cert !== undefined ? { cert: creds.cert, key: creds.key } : {})
              }),
              requestCert: verifyPeer,
              rejectUnauthorized: verifyPeer
            })
        } as NodeTls.TLSSocketOptions)
      ),
      Transport.destroy
    )
    yield* handshake(socket, "secure", connection.peer, settings.handshakeTimeout, (t) => hint(creds, t), (s) => {
      if (creds._tag !== "X509" || settings.authz === undefined) return undefined
      const cn = s.getPeerCertificate()?.subject?.CN
      const name = Array.isArray(cn) ? cn[0] : cn
      return name !== undefined && settings.authz.includes(name)
        ? undefined
        : `client ${name === undefined ? "without a certificate" : `CN=${name}`} is not in the authorization list`
    }).pipe(
      Effect.mapError((error) =>
        refusedIdentity === undefined ? error : new TlsError({
          reason: "Unauthorized",
          detail: `handshake with ${connection.peer}: PSK identity ${JSON.stringify(refusedIdentity)} ` +
            (creds._tag === "Psk" && creds.keys.has(refusedIdentity)
              ? "is not in the authorization list"
              : "has no key in this side's PSK file")
        })
      )
    )
    return yield* secured(socket, connection.peer)
  })

/** TLS for a migration: the handshakes of both sides. */
export class Tls extends Context.Tag("effect-multifd/Tls")<Tls, {
  readonly settings: Settings
  /** The source's handshake; `host` is the address's host, the default name to check. */
  readonly client: (host: string | undefined) => Transport.Upgrade<TlsError>
  readonly server: Transport.Upgrade<TlsError>
}>() {}

/** Builds the service from a config (reads the files it names). */
export const make = (config: TlsConfig): Effect.Effect<Tls["Type"], TlsError> =>
  Effect.map(load(config), (settings) => ({
    settings,
    client: (host) => client(settings, host),
    server: server(settings)
  }))

/** A layer from a config given in code. */
export const layer = (config: TlsConfig): Layer.Layer<Tls, TlsError> => Layer.effect(Tls, make(config))

const optional = <A>(config: Config.Config<A>) => Config.map(Config.option(config), Option.getOrUndefined)

/**
 * The config from the environment: `MULTIFD_TLS_PSK`, `_IDENTITY`, `_CA`, `_CERT`, `_KEY`, `_HOSTNAME`,
 * `_VERIFY_PEER`, `_AUTHZ` (comma-separated) and `_HANDSHAKE_TIMEOUT_MS`, validated by `TlsConfig`.
 */
export const config: Config.Config<TlsConfig> = Config.all({
  psk: optional(Config.string("PSK")),
  identity: optional(Config.string("IDENTITY")),
  ca: optional(Config.string("CA")),
  cert: optional(Config.string("CERT")),
  key: optional(Config.string("KEY")),
  hostname: optional(Config.string("HOSTNAME")),
  verifyPeer: optional(Config.boolean("VERIFY_PEER")),
  authz: optional(Config.array(Config.string(), "AUTHZ")),
  handshakeTimeoutMs: optional(Config.number("HANDSHAKE_TIMEOUT_MS"))
}).pipe(
  Config.nested("MULTIFD_TLS"),
  Config.mapOrFail((raw) =>
    Either.mapLeft(
      Schema.decodeUnknownEither(TlsConfig)(raw),
      (e) => ConfigError.InvalidData(["MULTIFD_TLS"], ParseResult.TreeFormatter.formatErrorSync(e))
    )
  )
)

/** A layer from the environment (see `config`). */
export const layerConfig: Layer.Layer<Tls, TlsError | ConfigError.ConfigError> = Layer.effect(
  Tls,
  Effect.flatMap(config, make)
)
