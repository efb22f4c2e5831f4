/**
 * TLS on every connection of a migration, as QEMU's `tls-creds-psk` / `tls-creds-x509` do: pre-shared keys
 * in QEMU's `keys.psk` format, or x509 certificates with host name checking, optional client certificates
 * and an authorization list. Credentials are checked when loaded, before anything listens or connects, and
 * one secure context serves every handshake. A peer's certificate is accepted only when its chain verifies
 * (to the CA file, within its validity period, for its role's usage); authorization applies to verified
 * certificates only. The handshake is an Effect with a timeout that must succeed before a channel exists;
 * the TLS socket is destroyed at once on failure and ended with close_notify on success.
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
import * as Crypto from "node:crypto"
import * as Fs from "node:fs/promises"
import * as NodeTls from "node:tls"
import * as KeyUsage from "./internal/native/keyUsage.js"
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
    /** The keys file, for messages. */
    readonly file: string
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
  /** Built once from the credentials (checked at load): every handshake, on either side, reuses it. */
  readonly secureContext: NodeTls.SecureContext
  /** The same, limited to TLS 1.2: for peers that never read (`ServerOptions.writeOnlyPeers`). */
  readonly writeOnlyContext: NodeTls.SecureContext
  /** This side's certificate (x509 with a certificate), for messages. */
  readonly ownCertificate?: Crypto.X509Certificate | undefined
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

const configError = (detail: string, cause?: unknown) => new TlsError({ reason: "Config", detail, cause })

/** The reason of an OpenSSL error without its codes: "error:04800064:PEM routines::bad base64 decode" → "bad base64 decode". */
const opensslReason = (error: unknown): string => {
  const text = (error as Error | undefined)?.message ?? String(error)
  return text.replace(/^(?:[0-9A-F]+:)?error:[0-9A-F]+:[^:]*:[^:]*:/, "").trim()
}

/** The labels of a text's PEM blocks (`CERTIFICATE`, `PRIVATE KEY`, ...). */
const pemLabels = (text: string): Array<string> =>
  Array.from(text.matchAll(/-----BEGIN ([A-Z0-9 ]+)-----/g), (m) => m[1]!)

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g

/** What a PEM file holds instead of the expected thing, for messages: "a private key", "a CERTIFICATE REQUEST block". */
const holds = (labels: ReadonlyArray<string>): string =>
  labels.some((label) => label.endsWith("PRIVATE KEY"))
    ? "a private key"
    : labels.includes("CERTIFICATE")
    ? "a certificate"
    : `a ${labels[0]} block`

/** Every certificate of a PEM file, each parsed: a file without one, or with a broken one, is a `Config` error. */
const certificatesOf = (text: string, what: string, path: string): Effect.Effect<Array<Crypto.X509Certificate>, TlsError> =>
  Effect.suspend(() => {
    const blocks = text.match(PEM_CERTIFICATE) ?? []
    if (blocks.length === 0) {
      const labels = pemLabels(text)
      return Effect.fail(configError(
        labels.length === 0
          ? `${what} ${path} is not a PEM certificate`
          : `${what} ${path} holds ${holds(labels)}, not a certificate`
      ))
    }
    const certificates: Array<Crypto.X509Certificate> = []
    for (let i = 0; i < blocks.length; i++) {
      try {
        certificates.push(new Crypto.X509Certificate(blocks[i]!))
      } catch (cause) {
        const which = blocks.length === 1 ? "" : ` (certificate ${i + 1} of ${blocks.length})`
        return Effect.fail(configError(`${what} ${path} is not a valid PEM certificate${which}: ${opensslReason(cause)}`, cause))
      }
    }
    return Effect.succeed(certificates)
  })

/** The private key of a PEM file: a file without one, an encrypted or a broken one is a `Config` error. */
const privateKeyOf = (text: string, path: string): Effect.Effect<Crypto.KeyObject, TlsError> =>
  Effect.suspend(() => {
    const labels = pemLabels(text)
    if (labels.length === 0) return Effect.fail(configError(`private key ${path} is not a PEM private key`))
    if (!labels.some((label) => label.endsWith("PRIVATE KEY"))) {
      return Effect.fail(configError(`private key ${path} holds ${holds(labels)}, not a private key`))
    }
    if (labels.includes("ENCRYPTED PRIVATE KEY") || /^Proc-Type:\s*4,\s*ENCRYPTED/m.test(text)) {
      return Effect.fail(configError(
        `private key ${path} is encrypted and no passphrase can be given: decrypt it (openssl pkey -in KEY -out PLAIN)`
      ))
    }
    return Effect.try({
      try: () => Crypto.createPrivateKey(text),
      catch: (cause) => configError(`private key ${path} is not a valid private key: ${opensslReason(cause)}`, cause)
    })
  })

/** `CN=alice`, or the whole subject when there is no CN. */
const nameOf = (certificate: Crypto.X509Certificate, field: "subject" | "issuer" = "subject"): string => {
  const text = certificate[field]
  const cn = text.split("\n").find((line) => line.startsWith("CN="))
  return cn ?? text.replace(/\n/g, ", ")
}

/**
 * The peer's certificate as an `X509Certificate`. Read through `getPeerCertificate`: on Node 20, a call to
 * `getPeerX509Certificate` first leaves the chain that `getPeerCertificate(true)` (Node's host name check)
 * returns empty.
 */
const peerCertificateOf = (socket: NodeTls.TLSSocket): Crypto.X509Certificate | undefined => {
  const raw = socket.getPeerCertificate(true)?.raw
  return raw === undefined ? undefined : new Crypto.X509Certificate(raw)
}

/** " CN=..." of this side's certificate, or nothing. */
const ownName = (settings: Settings): string => settings.ownCertificate ? ` ${nameOf(settings.ownCertificate)}` : ""

/** Builds a secure context; OpenSSL's refusal is a `Config` error naming `what`. */
const secureContextOf = (options: NodeTls.SecureContextOptions, what: string) =>
  Effect.try({
    try: () => NodeTls.createSecureContext({ minVersion: "TLSv1.2", ...options }),
    catch: (cause) => configError(`cannot use ${what}: ${opensslReason(cause)}`, cause)
  })

// TLS 1.3 external PSKs in OpenSSL use SHA-256 suites; the TLS 1.2 PSK suites are a fallback (ECDHE-PSK first:
// forward secrecy, and what QEMU's GnuTLS offers first).
const PSK_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:ECDHE-PSK-CHACHA20-POLY1305:" +
  "PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305"

/**
 * Reads the files a `TlsConfig` names and checks that they are usable before anything listens or connects:
 * that the combination makes sense, that every PEM file holds what it should and parses, that the key is
 * the certificate's, that an explicit PSK identity has a key. Builds the secure context every handshake
 * reuses.
 */
export const load = (config: TlsConfig): Effect.Effect<Settings, TlsError> =>
  Effect.gen(function*() {
    const x509 = config.ca !== undefined || config.cert !== undefined || config.key !== undefined
    if (config.psk !== undefined && x509) {
      return yield* configError("use either a PSK file or x509 certificates, not both")
    }
    if ((config.cert === undefined) !== (config.key === undefined)) {
      return yield* configError("a certificate needs its key and a key its certificate")
    }
    let credentials: Credentials
    let contextOptions: NodeTls.SecureContextOptions
    let files: string
    let ownCertificate: Crypto.X509Certificate | undefined
    if (config.psk !== undefined) {
      const keys = yield* Effect.flatMap(readText(config.psk, "PSK file"), (text) => parsePskFile(text, config.psk))
      if (config.identity !== undefined && !keys.has(config.identity)) {
        return yield* configError(`PSK file ${config.psk} has no key for identity ${config.identity}`)
      }
      credentials = { _tag: "Psk", keys, identity: config.identity ?? "qemu", file: config.psk }
      contextOptions = { ciphers: PSK_CIPHERS }
      files = `PSK file ${config.psk}`
    } else if (x509) {
      const ca = config.ca === undefined ? undefined : yield* readText(config.ca, "CA certificate")
      if (ca !== undefined) yield* certificatesOf(ca, "CA certificate", config.ca!)
      const cert = config.cert === undefined ? undefined : yield* readText(config.cert, "certificate")
      const key = config.key === undefined ? undefined : yield* readText(config.key, "private key")
      if (cert !== undefined && key !== undefined) {
        const [leaf] = yield* certificatesOf(cert, "certificate", config.cert!)
        const privateKey = yield* privateKeyOf(key, config.key!)
        if (!leaf!.checkPrivateKey(privateKey)) {
          return yield* configError(`private key ${config.key} does not match certificate ${config.cert} (${nameOf(leaf!)})`)
        }
        ownCertificate = leaf
      }
      credentials = { _tag: "X509", ca, cert, key }
      contextOptions = { ...(ca !== undefined ? { ca } : {}), ...(cert !== undefined ? { cert, key } : {}) }
      files = [config.ca, config.cert, config.key].filter((f) => f !== undefined).join(", ")
    } else {
      return yield* configError("no credentials: give a PSK file or x509 certificates")
    }
    return {
      credentials,
      secureContext: yield* secureContextOf(contextOptions, files),
      // (a secure context carries its own versions: a socket's are ignored when it is given one)
      writeOnlyContext: yield* secureContextOf({ ...contextOptions, maxVersion: "TLSv1.2" }, files),
      ownCertificate,
      hostname: config.hostname,
      verifyPeer: config.verifyPeer ?? false,
      authz: config.authz,
      handshakeTimeout: config.handshakeTimeoutMs === undefined
        ? DEFAULT_HANDSHAKE_TIMEOUT
        : Duration.millis(config.handshakeTimeoutMs)
    }
  })

/**
 * Checks that the settings can secure a source's connections, before it connects: with a PSK file, that the
 * file has a key for the identity the source presents (a `Config` error otherwise).
 */
export const checkClient = (settings: Settings): Effect.Effect<void, TlsError> =>
  settings.credentials._tag === "Psk" && !settings.credentials.keys.has(settings.credentials.identity)
    ? Effect.fail(configError(
      `PSK file ${settings.credentials.file} has no key for identity ${settings.credentials.identity}`
    ))
    : Effect.void

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

const EKU_NAMES: Record<string, string> = {
  "1.3.6.1.5.5.7.3.1": "serverAuth",
  "1.3.6.1.5.5.7.3.2": "clientAuth"
}

/**
 * Why OpenSSL's verification of a peer's certificate failed, after "certificate CN=x ": its chain to the CA
 * file (trust), its validity period, its purpose (extendedKeyUsage / keyUsage for `role` authentication).
 */
const verifyProblem = (
  error: { readonly code?: string | undefined; readonly message: string },
  certificate: Crypto.X509Certificate | undefined,
  role: "client" | "server"
): string => {
  switch (error.code) {
    case "CERT_HAS_EXPIRED":
      return `has expired${certificate ? ` (valid until ${certificate.validTo})` : ""}`
    case "CERT_NOT_YET_VALID":
      return `is not valid yet${certificate ? ` (valid from ${certificate.validFrom})` : ""}`
    case "INVALID_PURPOSE": {
      const usage = certificate?.keyUsage?.map((oid) => EKU_NAMES[oid] ?? oid).join(", ")
      return `is not for ${role} authentication${usage ? ` (extendedKeyUsage ${usage})` : ""}`
    }
    case "DEPTH_ZERO_SELF_SIGNED_CERT":
      return "is not trusted: self-signed certificate"
    case "UNABLE_TO_VERIFY_LEAF_SIGNATURE":
    case "UNABLE_TO_GET_ISSUER_CERT_LOCALLY":
    case "UNABLE_TO_GET_ISSUER_CERT":
    case "SELF_SIGNED_CERT_IN_CHAIN":
      return `is not trusted: ${certificate ? `issued by ${nameOf(certificate, "issuer")}, ` : ""}not by a trusted CA`
    default:
      return `is not trusted: ${error.message}`
  }
}

/**
 * OpenSSL's verdict on the client certificate of a server-side socket: `null` when its chain verified (to
 * the CA file, within its validity period, for client authentication), else the verification error. A
 * standalone server `TLSSocket` neither enforces `rejectUnauthorized` nor sets `authorized` (only sockets a
 * `tls.Server` accepts get that), so this asks the handle as `tls.Server` does. Fails closed.
 */
const clientVerdict = (socket: NodeTls.TLSSocket): { readonly code?: string; readonly message: string } | null => {
  const handle = (socket as unknown as { _handle?: { verifyError?: () => Error & { code?: string } | null } })._handle
  if (typeof handle?.verifyError !== "function") {
    return { message: "this Node.js does not report the result of the certificate's verification" }
  }
  return handle.verifyError() ?? null
}

/**
 * Why the destination refuses a client certificate (what QEMU's verify-peer checks, then `authz`), or
 * `undefined` to admit it. Authorization applies to verified certificates only.
 */
const clientRefusal = (socket: NodeTls.TLSSocket, authz: ReadonlyArray<string> | undefined): string | undefined => {
  const certificate = peerCertificateOf(socket)
  if (certificate === undefined) return "the client sent no certificate"
  const name = nameOf(certificate)
  const verdict = clientVerdict(socket)
  if (verdict !== null) return `client certificate ${name} ${verifyProblem(verdict, certificate, "client")}`
  // OpenSSL's purpose check admits keyAgreement alone; a TLS client certificate must sign (CertificateVerify)
  let usage: number | undefined
  try {
    usage = KeyUsage.keyUsageOf(certificate.raw)
  } catch {
    return `client certificate ${name} is not trusted: its keyUsage extension cannot be read`
  }
  if (usage !== undefined && (usage & KeyUsage.DIGITAL_SIGNATURE) === 0) {
    return `client certificate ${name} is not for client authentication (its keyUsage lacks digitalSignature)`
  }
  if (authz === undefined) return undefined
  const cn = certificate.subject.split("\n").find((line) => line.startsWith("CN="))?.slice(3)
  return cn !== undefined && authz.includes(cn)
    ? undefined
    : `client certificate ${name} is not in the authorization list`
}

/** Runs a handshake on a TLS socket: resolves on `secureEvent`, fails on error, close or timeout. */
const handshake = (
  socket: NodeTls.TLSSocket,
  secureEvent: "secureConnect" | "secure",
  peer: string,
  timeout: Duration.Duration,
  explain: (error: unknown) => string,
  authorize: (socket: NodeTls.TLSSocket) => string | undefined,
  /** What a close in the middle of the handshake most likely means. */
  closed = "connection closed"
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
      resume(Effect.fail(new TlsError({ reason: "Handshake", detail: `handshake with ${peer} failed: ${explain(error)}`, cause: error })))
    }
    const onClose = () => {
      cleanup()
      resume(Effect.fail(new TlsError({ reason: "Handshake", detail: `handshake with ${peer} failed: ${closed}` })))
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

/**
 * The source's main channel, which the destination may still turn away without a word: a Node destination
 * cannot send the alert that says why it refuses a client certificate (Node judges certificates after the
 * handshake, and in TLS 1.3 the client's handshake is over before the server has seen its certificate), so
 * the source just sees the connection close before any answer. Until the first byte arrives, a close or
 * reset is reported as the most likely `refusal`: the `TransportError` says it, its cause is a `TlsError`
 * "Unauthorized" (which `Migration.migrate` reports as the refusal).
 */
const explainingEarlyClose = (connection: Transport.Connection, refusal: string): Transport.Connection => {
  let heard = false
  const explain = (error: Transport.TransportError) => {
    if (heard || (error.reason !== "Closed" && error.reason !== "Reset" && error.reason !== "Write")) return error
    const closed = "the destination closed the connection right after the TLS handshake, without answering: " +
      `it most likely refused ${refusal}`
    return new Transport.TransportError({
      reason: error.reason,
      address: error.address,
      detail: closed,
      cause: new TlsError({
        reason: "Unauthorized",
        detail: `handshake with ${connection.peer}: ${closed}; its log says why`,
        cause: error
      })
    })
  }
  const reading = <A>(effect: Effect.Effect<A, Transport.TransportError>) =>
    heard ? effect : effect.pipe(
      Effect.tap(() => {
        heard = true
      }),
      Effect.mapError(explain)
    )
  const writing = <A>(effect: Effect.Effect<A, Transport.TransportError>) =>
    heard ? effect : Effect.mapError(effect, explain)
  return {
    ...connection,
    write: (chunks) => writing(connection.write(chunks)),
    drained: Effect.suspend(() => writing(connection.drained)),
    read: (length) => reading(connection.read(length)),
    readInto: (target, at, length) => reading(connection.readInto(target, at, length)),
    readScatter: (target, offsets, count, length) => reading(connection.readScatter(target, offsets, count, length)),
    peek: (length) => reading(connection.peek(length)),
    atEnd: Effect.suspend(() => writing(connection.atEnd)),
    readSome: (max) =>
      Effect.suspend(() =>
        heard ? connection.readSome(max) : connection.readSome(max).pipe(
          Effect.tap((chunk) => {
            if (chunk.length > 0) heard = true
          }),
          Effect.mapError(explain)
        )
      ),
    end: Effect.suspend(() => writing(connection.end))
  }
}

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

/** The codes of OpenSSL's certificate verification errors (X509_V_ERR_*, as Node names them). */
const VERIFY_CODE = /^(?:UNABLE_TO_|CERT_|CRL_|ERROR_IN_|DEPTH_ZERO_|SELF_SIGNED_|INVALID_CA$|INVALID_PURPOSE$|PATH_LENGTH_)/

/** What the source reports when its handshake fails: a certificate that does not verify says why. */
const explainServerError = (creds: Credentials, certificate: () => Crypto.X509Certificate | undefined) =>
(error: unknown): string => {
  const e = error as Error & { code?: string }
  const code = e?.code
  if (creds._tag === "X509" && code !== undefined && VERIFY_CODE.test(code)) {
    const peer = certificate()
    return `the destination's certificate${peer ? ` ${nameOf(peer)}` : ""} ${verifyProblem(e, peer, "server")}`
  }
  return hint(creds, describe(error))
}

/** The source side: a TLS client handshake on each connection. `host` is the default name to check. */
export const client = (settings: Settings, host: string | undefined): Transport.Upgrade<TlsError> =>
(connection, channel) =>
  Effect.gen(function*() {
    const creds = settings.credentials
    yield* checkClient(settings)
    const servername = settings.hostname ?? host
    // the destination's certificate, taken before Node judges it (a refused one is gone with the socket)
    let presented: Crypto.X509Certificate | undefined
    const socket = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const socket = creds._tag === "Psk"
          ? NodeTls.connect({
            socket: connection.stream as never,
            secureContext: settings.secureContext,
            pskCallback: () => {
              const psk = creds.keys.get(creds.identity)
              return psk === undefined ? null : { psk, identity: creds.identity }
            },
            checkServerIdentity: () => undefined
          })
          : NodeTls.connect({
            socket: connection.stream as never,
            secureContext: settings.secureContext,
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
        if (creds._tag === "X509") {
          socket.prependOnceListener("secure", () => {
            presented = peerCertificateOf(socket)
          })
        }
        return socket
      }),
      Transport.destroy
    )
    yield* handshake(
      socket,
      "secureConnect",
      connection.peer,
      settings.handshakeTimeout,
      explainServerError(creds, () => presented),
      (s) =>
        creds._tag === "X509" && !s.authorized
          ? `certificate not trusted: ${describe(s.authorizationError)}`
          : undefined
    )
    const secure = yield* secured(socket, connection.peer)
    // a destination refusing this source's certificate closes the main channel before its first answer
    if (channel !== "main" || creds._tag !== "X509" || creds.cert === undefined) return secure
    const mine = settings.ownCertificate
    return explainingEarlyClose(
      secure,
      `this source's certificate${mine ? ` ${nameOf(mine)} (issued by ${nameOf(mine, "issuer")})` : ""}`
    )
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
    const socket = yield* Effect.acquireRelease(
      Effect.sync(() =>
        new NodeTls.TLSSocket(connection.stream as never, {
          isServer: true,
          secureContext: options?.writeOnlyPeers === true ? settings.writeOnlyContext : settings.secureContext,
          ...(creds._tag === "Psk"
            ? {
              pskCallback: (_socket: NodeTls.TLSSocket, identity: string) => {
                const key = pskKey(settings, identity)
                if (key === undefined) refusedIdentity = identity
                return key ?? null
              }
            }
            : {
              // OpenSSL refuses a missing certificate in the handshake; the chain is judged after it
              requestCert: verifyPeer,
              rejectUnauthorized: verifyPeer
            })
        } as NodeTls.TLSSocketOptions)
      ),
      Transport.destroy
    )
    yield* handshake(
      socket,
      "secure",
      connection.peer,
      settings.handshakeTimeout,
      (error) => hint(creds, describe(error)),
      (s) => creds._tag === "X509" && verifyPeer ? clientRefusal(s, settings.authz) : undefined,
      // a Node source that refuses this side's certificate hangs up without an alert, before its Finished
      creds._tag === "X509"
        ? `connection closed (did the source refuse this destination's certificate${ownName(settings)}?)`
        : undefined
    ).pipe(
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
