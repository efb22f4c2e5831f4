/**
 * The source's side of TLS: the client handshake on each connection, and the plain data that rebuilds it on a
 * channel thread (`ChannelThreads`). Apart from `Tls` so that a channel thread loads this and not the whole
 * `Tls` module (its configuration schema and `Config` loader cost each thread about 4 MiB); `Tls` re-exports it.
 *
 * @internal
 */
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import type * as Crypto from "node:crypto"
import * as NodeTls from "node:tls"
import * as Transport from "../../Transport.js"
import { nameOf, ownRoleProblem, secureContextOf } from "./credentials.js"
import { explainingEarlyClose, handshake, open, secured } from "./handshake.js"
import { configError, type Credentials, type CrlInfo, type Settings, type TlsError } from "./model.js"
import { describe, explainServerError, peerCertificateOf, serverRefusal } from "./verification.js"

/**
 * Checks that the settings can secure a source's connections, before it connects: with a PSK file, that the
 * file has a key for the identity the source presents; with x509, that there is a CA file to verify the
 * destination (the public root CAs are never trusted) and that its certificate, if any, is for client
 * authentication. A `Config` error otherwise.
 */
export const checkClient = (settings: Settings): Effect.Effect<void, TlsError> =>
  settings.credentials._tag === "Psk" && !settings.credentials.keys.has(settings.credentials.identity)
    ? Effect.fail(configError(
      `PSK file ${settings.credentials.file} has no key for identity ${settings.credentials.identity}`
    ))
    : settings.credentials._tag === "X509" && settings.credentials.ca === undefined
    ? Effect.fail(configError(
      "a source with x509 needs a CA certificate (ca) to verify the destination: the public root CAs are never trusted"
    ))
    : Effect.suspend(() => {
      const own = settings.ownCertificate
      const problem = own === undefined ? undefined : ownRoleProblem(own, settings.ownIssuers ?? [], "client")
      return problem === undefined
        ? Effect.void
        : Effect.fail(configError(`certificate ${settings.ownCertificateFile} ${problem}`))
    })

/**
 * The source side: a TLS client handshake on each connection. `host` is the default name to check.
 */
export const client = (settings: Settings, host: string | undefined): Transport.Upgrade<TlsError> => {
  const data = clientDataOf(settings, host)
  return Object.assign(clientHandshake(settings, host, data.own), { [ClientDataKey]: data })
}

/** This side's certificate as a refusal names it, and when it expires. */
export interface OwnCertificate {
  /** `this source's certificate CN=alice (issued by CN=test CA)`. */
  readonly text: string
  readonly validTo: string
}

const ownOf = (settings: Settings): OwnCertificate | undefined => {
  const own = settings.ownCertificate
  return own === undefined
    ? undefined
    : { text: `this source's certificate ${nameOf(own)} (issued by ${nameOf(own, "issuer")})`, validTo: own.validTo }
}

/** `, which has expired since it was loaded (valid until ...)` once `own` has expired, else empty. */
const expiredSinceLoad = (own: OwnCertificate | undefined, now: number): string =>
  own !== undefined && now > Date.parse(own.validTo)
    ? `, which has expired since it was loaded (valid until ${own.validTo})`
    : ""

/**
 * What a source's handshake needs, as plain data (structured clone): a channel running on another thread
 * (`ChannelThreads`) does the same handshake there with a secure context of its own, built from the texts the
 * settings were loaded from (they were checked then). A PSK client carries the key of its identity only.
 */
export interface ClientData {
  readonly credentials: Credentials
  readonly contextOptions: NodeTls.SecureContextOptions
  readonly files: string
  readonly hostname: string | undefined
  readonly crls: ReadonlyArray<CrlInfo> | undefined
  readonly host: string | undefined
  readonly handshakeTimeoutMs: number
  /** This side's certificate, if it presents one (a channel thread names it when a destination refuses it). */
  readonly own?: OwnCertificate | undefined
}

const ClientDataKey = Symbol.for("effect-multifd/Tls/ClientData")

const clientDataOf = (settings: Settings, host: string | undefined): ClientData => {
  const creds = settings.credentials
  const key = creds._tag === "Psk" ? creds.keys.get(creds.identity) : undefined
  return {
    credentials: creds._tag === "Psk"
      ? { ...creds, keys: key === undefined ? new Map() : new Map([[creds.identity, key]]) }
      : creds,
    contextOptions: settings.contextOptions,
    files: settings.files,
    hostname: settings.hostname,
    crls: settings.crls,
    host,
    handshakeTimeoutMs: Duration.toMillis(settings.handshakeTimeout),
    own: creds._tag === "X509" && creds.cert !== undefined ? ownOf(settings) : undefined
  }
}

/**
 * The data of an upgrade made by `client` (`undefined` for any other upgrade: a test's fault injection, say,
 * which only works in the thread it was made in).
 */
export const clientData = (upgrade: Transport.Upgrade<Transport.UpgradeError>): ClientData | undefined =>
  (upgrade as { readonly [ClientDataKey]?: ClientData })[ClientDataKey]

/**
 * The source's handshake rebuilt from its data, in this thread (with a secure context of its own).
 */
export const clientFromData = (data: ClientData): Effect.Effect<Transport.Upgrade<TlsError>, TlsError> =>
  Effect.gen(function*() {
    const secureContext = yield* secureContextOf(data.contextOptions, data.files)
    const creds = data.credentials
    const settings: Settings = {
      // keys arrive as Uint8Arrays: Buffers again
      credentials: creds._tag === "Psk"
        ? { ...creds, keys: new Map(Array.from(creds.keys, ([identity, key]) => [identity, Buffer.from(key)])) }
        : creds,
      secureContext,
      writeOnlyContext: secureContext,
      contextOptions: data.contextOptions,
      files: data.files,
      ownCertificate: undefined,
      hostname: data.hostname,
      crls: data.crls,
      verifyPeer: false,
      authz: undefined,
      handshakeTimeout: Duration.millis(data.handshakeTimeoutMs)
    }
    return Object.assign(clientHandshake(settings, data.host, data.own), { [ClientDataKey]: data })
  })

/**
 * Why a certificate without DNS names does not carry `host` though Node's check would take its CN for it: Node
 * falls back to the CN whenever there is no DNS altname, and then to any CN of several; QEMU's GnuTLS reads a
 * certificate's CN as its name only when it has no altnames at all (RFC 6125: an IP or URI altname says what it is
 * for) and only when it has one CN (RFC 6125 §1.8). A certificate of CN=wrong.example and CN=localhost passed for
 * either name, one of CN=localhost with an IP altname for localhost. `undefined` leaves the check to Node's.
 */
const cnMismatch = (host: string, cert: NodeTls.PeerCertificate): Error | undefined => {
  if (Transport.isIp(host)) return undefined
  const altnames = cert.subjectaltname ?? ""
  if (altnames.split(", ").some((name) => name.startsWith("DNS:"))) return undefined
  const cn = (cert.subject as { CN?: string | Array<string> } | undefined)?.CN
  const cns = cn === undefined ? [] : Array.isArray(cn) ? cn : [cn]
  const why = altnames !== ""
    ? "its altnames hold no DNS name, and a CN is a certificate's name only in one without altnames"
    : cns.length > 1
    ? `the certificate has ${cns.length} CNs and no altnames, and a CN is checked only in a certificate of one`
    : undefined
  if (why === undefined) return undefined
  const reason = `Host: ${host.replace(/\.$/, "")} is not the certificate's name: ${why}, as QEMU's GnuTLS checks names`
  // (the certificate's names follow, as after Node's own reasons)
  return Object.assign(new Error(reason), { code: "ERR_TLS_CERT_ALTNAME_INVALID", reason })
}

const clientHandshake = (
  settings: Settings,
  host: string | undefined,
  own: OwnCertificate | undefined
): Transport.Upgrade<TlsError> =>
(connection, channel) =>
  Effect.gen(function*() {
    const creds = settings.credentials
    yield* checkClient(settings)
    const servername = settings.hostname ?? host
    // without a name, any certificate of the CA would pass for the destination (QEMU refuses likewise: "No
    // hostname for certificate validation")
    if (creds._tag === "X509" && servername === undefined) {
      return yield* configError(
        "x509 needs the name the destination's certificate must carry (hostname): a unix: socket names no host"
      )
    }
    yield* open(connection)
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
              const mismatch = servername === undefined
                ? undefined
                : cnMismatch(servername, cert) ?? NodeTls.checkServerIdentity(servername, cert)
              if (mismatch === undefined) return undefined
              const names = cert.subjectaltname ?? `CN=${cert.subject?.CN}`
              return Object.assign(mismatch, {
                // Node's reason ends with the certificate's names ("... is not in the cert's altnames: DNS:a, ..."), or
                // an empty list: they are said once, after it
                reason: `${(mismatch as Error & { reason?: string }).reason ?? mismatch.message} `
                  .replace(/(cert's [A-Za-z]+):[\s\S]*$/, "$1").trim() + ` (the certificate is for ${names})`
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
      explainServerError(creds, () => presented, settings.crls),
      (s) =>
        creds._tag !== "X509"
          // (a key proven, no certificate: one trusted by no CA of this side's proves nothing of the key)
          ? Object.keys(s.getPeerCertificate() ?? {}).length > 0
            ? "the destination presented a certificate instead of proving the pre-shared key (it uses x509, this side PSK)"
            : undefined
          : !s.authorized
          ? `certificate not trusted: ${describe(s.authorizationError)}`
          : serverRefusal(presented ?? peerCertificateOf(s))
    )
    const plain = yield* secured(socket, connection.peer)
    // who the destination proved to be: its certificate (the same one, not only the same name: its fingerprint), which
    // every channel of the migration must reach (a PSK destination proves the key only, the same for every one)
    const certificate = creds._tag === "X509" ? presented ?? peerCertificateOf(socket) : undefined
    const secure = certificate === undefined
      ? plain
      : { ...plain, peerIdentity: `certificate ${nameOf(certificate)} (SHA-256 ${certificate.fingerprint256})` }
    if (creds._tag !== "X509" || creds.cert === undefined) return secure
    const expired = expiredSinceLoad(own, yield* Effect.sync(() => Date.now()))
    const refused = `${own?.text ?? "this source's certificate"}${expired}`
    // a destination refusing this source's certificate closes the main channel before its first answer; a multifd
    // channel it never answers, so its close says nothing, unless this side's certificate has expired since it was
    // loaded (a channel connecting, or re-attaching, late in a long migration): then the likeliest cause is named, not
    // a bare "connection reset by peer" after every re-attach the destination refused
    return channel === "main" || expired !== "" ? explainingEarlyClose(secure, refused, channel) : secure
  })
