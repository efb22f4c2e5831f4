/**
 * Judging a peer's certificate and explaining a failed handshake in one line: OpenSSL's verification verdict
 * (chain, validity, purpose), the keyUsage it does not check, authorization of verified names only.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"
import * as Stream from "node:stream"
import * as NodeTls from "node:tls"
import * as PeerText from "../peerText.js"
import { EKU_NAMES, nameOf, ownUsageProblem } from "./credentials.js"
import * as Der from "./der.js"
import type { CrlInfo, Credentials, Settings } from "./model.js"

/**
 * The peer's certificate as an `X509Certificate`. Read through `getPeerCertificate`: on Node 20, a call to
 * `getPeerX509Certificate` first leaves the chain that `getPeerCertificate(true)` (Node's host name check)
 * returns empty.
 */
export const peerCertificateOf = (socket: NodeTls.TLSSocket): Crypto.X509Certificate | undefined => {
  const detailed = socket.getPeerCertificate(true) as NodeTls.DetailedPeerCertificate | undefined
  if (detailed?.raw === undefined) return undefined
  const certificate = new Crypto.X509Certificate(detailed.raw)
  // the certificates the peer sent with it (its chain), nearest issuer first: a self-signed one ends it
  const chain: Array<Crypto.X509Certificate> = []
  for (let c = detailed; c.issuerCertificate !== undefined && c.issuerCertificate !== c && chain.length < 16;) {
    c = c.issuerCertificate
    if (c.raw === undefined) break
    chain.push(new Crypto.X509Certificate(c.raw))
  }
  issuers.set(certificate, chain)
  return certificate
}

/** The chains `peerCertificateOf` read with each certificate. */
const issuers = new WeakMap<Crypto.X509Certificate, ReadonlyArray<Crypto.X509Certificate>>()

/** " CN=..." of this side's certificate, or nothing. */
export const ownName = (settings: Settings): string => settings.ownCertificate ? ` ${nameOf(settings.ownCertificate)}` : ""

/**
 * ", which has expired since it was loaded (valid until ...)" when this side's certificate has at `now` (the wall
 * clock, as a peer's OpenSSL reads it), else nothing: settings loaded long ago (a service's, a listener serving one
 * migration after another) outlive their certificate, and every peer refuses it from then on.
 */
export const ownExpiry = (settings: Settings, now: number): string => {
  const own = settings.ownCertificate
  return own !== undefined && now > Date.parse(own.validTo)
    ? `, which has expired since it was loaded (valid until ${own.validTo})`
    : ""
}

/** What a close in a destination's x509 handshake most likely means: a source refused its certificate (expired?). */
export const refusedOwnCertificate = (settings: Settings, now: number): string => {
  const expired = ownExpiry(settings, now)
  return expired === ""
    ? `connection closed (did the source refuse this destination's certificate${ownName(settings)}?)`
    : `connection closed: the source refused this destination's certificate${ownName(settings)}${expired}: every ` +
      "source refuses it; load a current one"
}

export const describe = (error: unknown): string => {
  const e = error as (Error & { code?: string; reason?: string }) | undefined
  const text = e?.reason ?? e?.message ?? String(error)
  // OpenSSL's long form: "8050...:error:0A000410:SSL routines:fn:reason:../deps/...:line:"
  return text.replace(/^[0-9A-F]+:error:[0-9A-F]+:SSL routines:[^:]*:/, "").replace(/:\.\.\/deps\/.*$/s, "")
    // Node's argument errors quote the value ("… Received <Buffer 71 42 …>"): it may be a key, never shown
    .replace(/\s*Received\b.*$/s, "")
    .trim()
}

/**
 * Adds what an alert most likely means when keys or certificates do not match, or when the peer does not
 * speak TLS (or not the same kind: PSK against x509), or hung up or reset the connection in the handshake.
 */
export const hint = (credentials: Credentials, text: string): string =>
  credentials._tag === "Psk" && /illegal parameter|binder|decrypt|bad record mac/.test(text)
    ? `${text} (do both sides use the same pre-shared key for this identity?)`
    : /certificate required/.test(text)
    ? `${text} (the destination requires a client certificate)`
    : /wrong version number|http request|unknown protocol/i.test(text)
    ? `${text} (the peer does not speak TLS: does it use the TLS options too?)`
    // (QEMU's GnuTLS hangs up without an alert on a PSK binder of another key)
    : /socket disconnected before secure TLS connection/.test(text)
    ? `${text} (the peer closed the connection in the TLS handshake: does it use TLS, ${
      credentials._tag === "Psk"
        ? `with PSK as this side does, and the same key for identity ${JSON.stringify(credentials.identity)}?)`
        : "with PSK or x509 as this side does?)"
    }`
    // (a peer that closes with this side's hello unread resets the connection: QEMU without tls-creds does)
    : /ECONNRESET/.test(text)
    ? `${text} (the peer reset the connection in the TLS handshake: does it use TLS, with PSK or x509 as this side does?)`
    : /no suitable signature algorithm|no shared cipher|handshake failure/.test(text)
    ? `${text} (do both sides use the same kind of credentials, PSK or x509, and cipher suites in common (ciphers)?${
      /no shared cipher/.test(text) ? "" : " does the peer admit this side?"
    })`
    : /unsupported protocol|protocol version/.test(text)
    ? `${text} (the peer offers no TLS version this side speaks: TLS 1.2 or 1.3)`
    : credentials._tag === "Psk" && /certificate/.test(text)
    ? `${text} (the peer presents a certificate: it uses x509, this side PSK)`
    // OpenSSL refuses to resume a session (a ticket another connection got) where client certificates are verified and
    // no session context is set: none is, so that every connection proves its certificate (its chain, its CRL, authz now)
    : /session id context uninitialized/.test(text)
    ? `${text} (the peer resumed a TLS session: this destination verifies client certificates, and takes only full ` +
      "handshakes, each proving one)"
    : text

/** The certificates that issued `certificate`, nearest first, as far as the peer's chain gives them. */
const issuersOf = (certificate: Crypto.X509Certificate): ReadonlyArray<Crypto.X509Certificate> =>
  issuers.get(certificate) ?? []

/** `certificate`'s issuer as `Der` writes names, or `undefined` when its DER cannot be read. */
const issuerOf = (certificate: Crypto.X509Certificate): string | undefined => {
  try {
    return Der.namesOf(certificate.raw).issuer
  } catch {
    return undefined
  }
}

/** The CRL that revokes `certificate`, if one of `crls` does. */
export const revokedBy = (certificate: Crypto.X509Certificate, crls: ReadonlyArray<CrlInfo>): CrlInfo | undefined => {
  const issuer = issuerOf(certificate)
  const serial = certificate.serialNumber.replace(/^(00)+(?=.)/, "").toUpperCase()
  return crls.find((crl) => crl.issuer === issuer && crl.revoked.includes(serial))
}

/** Why a certificate failed the revocation check, after "certificate CN=x ": which one of its chain is revoked. */
const revocationProblem = (
  code: "CERT_REVOKED" | "UNABLE_TO_GET_CRL",
  certificate: Crypto.X509Certificate | undefined,
  crls: ReadonlyArray<CrlInfo>
): string => {
  const chain = certificate === undefined ? [] : [certificate, ...issuersOf(certificate)]
  if (code === "CERT_REVOKED") {
    // the first of the chain a CRL lists: Node reports OpenSSL's last error, not its depth
    for (const [depth, c] of chain.entries()) {
      const crl = revokedBy(c, crls)
      if (crl === undefined) continue
      const listed = `(listed in the CRL of ${Der.shortName(crl.issuer)})`
      return depth === 0 ? `is revoked ${listed}` : `was issued by ${nameOf(c)}, which is revoked ${listed}`
    }
    return "is revoked, or a certificate that issued it is"
  }
  // a certificate of the chain whose issuer has no CRL in the CRL file (an intermediate CA the CA file lacks)
  const missing = chain.find((c) => !crls.some((crl) => crl.issuer === issuerOf(c)))
  return `cannot be checked for revocation: the CRL file has no CRL of ${
    missing === undefined ? "a CA of its chain" : nameOf(missing, "issuer")
  } (with CRLs, every CA of a chain needs its certificate in the CA file and its CRL in the CRL file)`
}

/**
 * Why OpenSSL's verification of a peer's certificate failed, after "certificate CN=x ": its chain to the CA
 * file (trust), its validity period, its purpose (extendedKeyUsage / keyUsage for `role` authentication), its
 * revocation (`crls`: the CRLs this side loaded).
 */
export const verifyProblem = (
  error: { readonly code?: string | undefined; readonly message: string },
  certificate: Crypto.X509Certificate | undefined,
  role: "client" | "server",
  crls: ReadonlyArray<CrlInfo> = []
): string => {
  switch (error.code) {
    case "CERT_REVOKED":
    case "UNABLE_TO_GET_CRL":
      return revocationProblem(error.code, certificate, crls)
    case "CRL_HAS_EXPIRED":
    case "CRL_NOT_YET_VALID":
      return `cannot be checked for revocation: a CRL of the CRL file ${
        error.code === "CRL_HAS_EXPIRED" ? "has expired since it was loaded" : "is not valid yet"
      } (load a current one)`
    case "CERT_HAS_EXPIRED":
    case "CERT_NOT_YET_VALID": {
      // OpenSSL says which check failed, not at which depth: the certificate itself, or one that issued it
      const expired = error.code === "CERT_HAS_EXPIRED"
      const out = (c: Crypto.X509Certificate) =>
        expired ? Date.now() > Date.parse(c.validTo) : Date.now() < Date.parse(c.validFrom)
      const dates = (c: Crypto.X509Certificate) => expired ? `valid until ${c.validTo}` : `valid from ${c.validFrom}`
      const what = expired ? "has expired" : "is not valid yet"
      if (certificate === undefined || out(certificate)) return `${what}${certificate ? ` (${dates(certificate)})` : ""}`
      const issuer = issuersOf(certificate).find(out)
      return issuer === undefined
        ? `${what}, or a certificate that issued it has`
        : `was issued by ${nameOf(issuer)}, which ${what} (${dates(issuer)})`
    }
    case "INVALID_PURPOSE": {
      // the certificate's own purpose, or a certificate above it that is no CA or whose extendedKeyUsage leaves the
      // role out (OpenSSL checks it on every CA of a chain, and says only "purpose")
      const names = (c: Crypto.X509Certificate) => c.keyUsage?.map((oid) => EKU_NAMES[oid] ?? oid).join(", ")
      const own = certificate === undefined ? undefined : ownUsageProblem(certificate, role)
      const above = certificate === undefined || own !== undefined ? [] : issuersOf(certificate)
      const notCa = above.find((c) => !c.ca)
      if (notCa !== undefined) return `was issued by ${nameOf(notCa)}, which is not a CA (basicConstraints CA:FALSE)`
      const restricted = above.find((c) => ownUsageProblem(c, role) !== undefined)
      if (restricted !== undefined) {
        return `was issued by ${nameOf(restricted)}, whose extendedKeyUsage (${names(restricted)}) is not for ${role} authentication`
      }
      const usage = certificate === undefined ? undefined : names(certificate)
      // its extendedKeyUsage allows the role: its keyUsage does not, or a CA this side holds (OpenSSL's purpose
      // check reads both, on every certificate of the chain)
      return own === undefined && certificate !== undefined
        ? `is not for ${role} authentication (its keyUsage, or a certificate of its chain, does not allow it)`
        : `is not for ${role} authentication${usage ? ` (extendedKeyUsage ${usage})` : ""}`
    }
    case "DEPTH_ZERO_SELF_SIGNED_CERT":
      return "is not trusted: self-signed certificate"
    case "UNABLE_TO_VERIFY_LEAF_SIGNATURE":
    case "UNABLE_TO_GET_ISSUER_CERT_LOCALLY":
    case "UNABLE_TO_GET_ISSUER_CERT":
    case "SELF_SIGNED_CERT_IN_CHAIN":
      return `is not trusted: ${certificate ? `issued by ${nameOf(certificate, "issuer")}, ` : ""}not by a trusted CA`
    default:
      // what Node has no code of its own for (UNSPECIFIED) says what OpenSSL checked in OpenSSL's words only
      return `is not trusted: ${error.message}${
        /subtree violation|name constraint/i.test(error.message)
          ? " (a name constraint of a CA of its chain)"
          : /too weak|too small/i.test(error.message)
          ? " (a key or signature digest below what OpenSSL's security level accepts)"
          : ""
      }`
  }
}

/**
 * OpenSSL's verdict on the client certificate of a server-side socket: `null` when its chain verified (to
 * the CA file, within its validity period, for client authentication), else the verification error. A
 * standalone server `TLSSocket` neither enforces `rejectUnauthorized` nor sets `authorized` (only sockets a
 * `tls.Server` accepts get that), so this asks the handle as `tls.Server` does. Fails closed.
 */
export const clientVerdict = (socket: NodeTls.TLSSocket): { readonly code?: string; readonly message: string } | null => {
  const handle = (socket as unknown as { _handle?: { verifyError?: () => Error & { code?: string } | null } })._handle
  if (typeof handle?.verifyError !== "function") {
    return { message: "this Node.js does not report the result of the certificate's verification" }
  }
  return handle.verifyError() ?? null
}

/**
 * Why the destination refuses a client certificate (what QEMU's verify-peer checks, then `authz`), or
 * `undefined` to admit it. Authorization applies to verified certificates only. An `authz` entry with `=` is a
 * whole distinguished name, which must equal the certificate's subject as QEMU's GnuTLS writes it (`Der.namesOf`:
 * values escaped, so a CN `alice,O=Example` never passes for two attributes); an entry without is its CN, and
 * matches only a certificate of one CN.
 */
export const clientRefusal = (
  socket: NodeTls.TLSSocket,
  authz: ReadonlyArray<string> | undefined,
  crls: ReadonlyArray<CrlInfo> = []
): string | undefined => {
  const certificate = peerCertificateOf(socket)
  if (certificate === undefined) return "the client sent no certificate"
  const name = nameOf(certificate)
  const verdict = clientVerdict(socket)
  if (verdict !== null) return `client certificate ${name} ${verifyProblem(verdict, certificate, "client", crls)}`
  // OpenSSL's purpose check admits keyAgreement alone; a TLS client certificate must sign (CertificateVerify)
  let usage: number | undefined
  try {
    usage = Der.keyUsageOf(certificate.raw)
  } catch {
    return `client certificate ${name} is not trusted: its keyUsage extension cannot be read`
  }
  if (usage !== undefined && (usage & Der.DIGITAL_SIGNATURE) === 0) {
    return `client certificate ${name} is not for client authentication (its keyUsage lacks digitalSignature)`
  }
  if (authz === undefined) return undefined
  // a CN entry names a certificate of one CN: with two (CN=alice and CN=mallory), which it names is a guess
  const cns = (certificate.subject as string | undefined ?? "").split("\n").filter((line) => line.startsWith("CN="))
  const cn = cns.length === 1 ? cns[0]!.slice(3) : undefined
  let dn: string
  try {
    dn = Der.namesOf(certificate.raw).subject
  } catch {
    return `client certificate ${name} is not trusted: its subject cannot be read`
  }
  return authz.some((entry) => entry.includes("=") ? entry === dn : entry === cn)
    ? undefined
    : `client certificate ${name} is not in the authorization list (its distinguished name: ${PeerText.fromPeer(dn)}${
      cns.length > 1 ? `; with ${cns.length} CNs, only an entry of the whole name can admit it` : ""
    })`
}

/**
 * Why the source refuses the destination's certificate once OpenSSL verified it, or `undefined` to accept it:
 * OpenSSL's purpose check ignores keyUsage, and a TLS server certificate must sign (its handshake's
 * CertificateVerify or ServerKeyExchange), as QEMU's GnuTLS requires.
 */
export const serverRefusal = (certificate: Crypto.X509Certificate | undefined): string | undefined => {
  if (certificate === undefined) return "the destination sent no certificate"
  const name = nameOf(certificate)
  let usage: number | undefined
  try {
    usage = Der.keyUsageOf(certificate.raw)
  } catch {
    return `the destination's certificate ${name} is not trusted: its keyUsage extension cannot be read`
  }
  return usage !== undefined && (usage & Der.DIGITAL_SIGNATURE) === 0
    ? `the destination's certificate ${name} does not permit digital signatures (keyUsage)`
    : undefined
}

/**
 * The codes of OpenSSL's certificate verification errors (X509_V_ERR_*, as Node names them; those Node has no
 * name for, a name constraint violated or a digest too weak, are all UNSPECIFIED).
 */
export const VERIFY_CODE =
  /^(?:UNABLE_TO_|CERT_|CRL_|ERROR_IN_|DEPTH_ZERO_|SELF_SIGNED_|INVALID_CA$|INVALID_PURPOSE$|PATH_LENGTH_|UNSPECIFIED$)/

/**
 * The verification errors `ownChainVerdict` leaves to other checks: a chain to no CA of the CA file (`untrustedTop`,
 * checked at load before; OpenSSL reports the last of its errors, which may be another), the purpose
 * (judged for the role by `checkServer` / `checkClient`), validity and revocation (checked at load before).
 */
const OWN_CHAIN_LEFT = /^(?:UNABLE_TO_GET_ISSUER_CERT|UNABLE_TO_GET_ISSUER_CERT_LOCALLY|UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|DEPTH_ZERO_SELF_SIGNED_CERT|INVALID_PURPOSE|CERT_HAS_EXPIRED|CERT_NOT_YET_VALID|CERT_REVOKED|UNABLE_TO_GET_CRL|CRL_.*)$/

/** Two duplex streams, each reading what the other writes: a connection in memory. */
const memoryPair = (): readonly [Stream.Duplex, Stream.Duplex] => {
  const ends: Array<Stream.Duplex> = []
  const end = (other: () => Stream.Duplex) =>
    new Stream.Duplex({
      read() {},
      write(chunk, _encoding, callback) {
        other().push(chunk)
        callback()
      },
      final(callback) {
        other().push(null)
        callback()
      },
      // (a TLS socket that fails destroys its stream: the other end reads its end, not nothing for ever)
      destroy(error, callback) {
        other().push(null)
        callback(error)
      }
    })
  ends.push(end(() => ends[1]!), end(() => ends[0]!))
  return [ends[0]!, ends[1]!]
}

/**
 * OpenSSL's verdict on this side's own certificate as a peer with this side's CA file (`peer`: a context of the CA
 * file and the cipher list) judges it, from a handshake in memory with `own` (this side's context): `undefined`
 * when it verifies, or when what fails is for other checks (`OWN_CHAIN_LEFT`) or no verification at all; else the
 * verification error (a name constraint, a path length, a signature that does not verify). QEMU verifies its own
 * certificate against its CA file at load likewise (`qcrypto_tls_creds_check_cert_pair`).
 */
export const ownChainVerdict = (
  own: NodeTls.SecureContext,
  peer: NodeTls.SecureContext
): Effect.Effect<{ readonly code?: string; readonly message: string } | undefined> =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const [serverEnd, clientEnd] = memoryPair()
      const server = new NodeTls.TLSSocket(serverEnd, { isServer: true, secureContext: own })
      server.on("error", () => undefined) // (it hears the client's alert)
      const client = NodeTls.connect({ socket: clientEnd, secureContext: peer, checkServerIdentity: () => undefined })
      client.on("error", () => undefined) // (its first error is the verdict, heard below; a later one says nothing)
      return { server, client, ends: [serverEnd, clientEnd] as const }
    }),
    ({ client, ends, server }) => Effect.sync(() => [client, server, ...ends].forEach((s) => s.destroy()))
  ).pipe(
    Effect.flatMap(({ client }) =>
      Effect.async<{ readonly code?: string; readonly message: string } | undefined>((resume) => {
        const verdict = (error: Error & { code?: string }) =>
          error.code !== undefined && VERIFY_CODE.test(error.code) && !OWN_CHAIN_LEFT.test(error.code)
            ? { code: error.code, message: error.message }
            : undefined
        const onSecure = () => resume(Effect.succeed(undefined))
        const onError = (error: Error & { code?: string }) => resume(Effect.succeed(verdict(error)))
        const onClose = () => resume(Effect.succeed(undefined))
        client.once("secureConnect", onSecure).once("error", onError).once("close", onClose)
        return Effect.sync(() => {
          client.off("secureConnect", onSecure).off("error", onError).off("close", onClose)
        })
      })
    ),
    Effect.scoped,
    // (in memory it takes milliseconds; a handshake that never ends says nothing of the chain)
    Effect.timeoutTo({ duration: "5 seconds", onTimeout: () => undefined, onSuccess: (verdict) => verdict })
  )

/** What the source reports when its handshake fails: a certificate that does not verify says why. */
export const explainServerError = (
  creds: Credentials,
  certificate: () => Crypto.X509Certificate | undefined,
  crls: ReadonlyArray<CrlInfo> = []
) =>
(error: unknown): string => {
  const e = error as Error & { code?: string }
  const code = e?.code
  if (creds._tag === "X509" && code !== undefined && VERIFY_CODE.test(code)) {
    const peer = certificate()
    return `the destination's certificate${peer ? ` ${nameOf(peer)}` : ""} ${verifyProblem(e, peer, "server", crls)}`
  }
  return hint(creds, describe(error))
}

