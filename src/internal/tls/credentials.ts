/**
 * Reading TLS credentials and checking them before anything listens or connects: PEM files that hold what
 * they should and parse, the secure context OpenSSL builds from them, names of certificates for messages.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as NodeTls from "node:tls"
import * as FileIo from "../native/fileIo.js"
import * as PeerText from "../peerText.js"
import * as Der from "./der.js"
import { configError, type CrlInfo, TlsError } from "./model.js"

/**
 * The most a credentials file may hold (a CRL of a large CA runs to megabytes). Past it, the path is no such file: a
 * device (`/dev/zero`, `/dev/urandom`) or an endless pipe was read whole, gigabytes, until the string it made was too
 * long ("Invalid string length").
 */
export const MAX_CREDENTIALS_BYTES = 64 * 1024 * 1024

/**
 * An open credentials file: a file (or a device) read at its descriptor, or a pipe (`<(...)`, a FIFO) read as a
 * stream, since a blocking read or open of a pipe would hold a thread of libuv's pool until a writer came, deaf to
 * interruption (the command's exit waits for that thread).
 */
type Opened =
  | { readonly _tag: "File"; readonly fd: number }
  | { readonly _tag: "Pipe"; readonly socket: Net.Socket }

/**
 * A socket over a pipe's descriptor that reads nothing until asked (`manualStart`, Node's own option for the pipes of
 * child processes, missing from its types): no event, not even the end of an empty pipe, before `readPipe` listens.
 */
const PIPE = (fd: number) =>
  ({ fd, readable: true, writable: false, allowHalfOpen: true, manualStart: true }) as Net.SocketConstructorOpts

/** Opens `path` without blocking (a FIFO no process writes opens at once) and tells a pipe from a file. */
const open = (path: string, failed: (cause: unknown) => TlsError) =>
  Effect.async<Opened, TlsError>((resume) =>
    Fs.open(path, Fs.constants.O_RDONLY | Fs.constants.O_NONBLOCK, (error, fd) => {
      if (error !== null) return resume(Effect.fail(failed(error)))
      try {
        resume(Effect.succeed(
          Fs.fstatSync(fd).isFIFO()
            ? { _tag: "Pipe", socket: new Net.Socket(PIPE(fd)) }
            : { _tag: "File", fd }
        ))
      } catch (cause) {
        Fs.close(fd, () => undefined)
        resume(Effect.fail(failed(cause)))
      }
    })
  )

const close = (opened: Opened) =>
  opened._tag === "Pipe"
    ? Effect.sync(() => opened.socket.destroy())
    : Effect.async<void>((resume) => Fs.close(opened.fd, () => resume(Effect.void)))

/** A file's bytes, read at its descriptor until its end, or `undefined` past `MAX_CREDENTIALS_BYTES`. */
const readFile = (fd: number, failed: (cause: unknown) => TlsError) =>
  Effect.tryPromise({
    try: async () => {
      const chunks: Array<Buffer> = []
      let total = 0
      while (total <= MAX_CREDENTIALS_BYTES) {
        const buffer = Buffer.allocUnsafe(1024 * 1024)
        const bytesRead = await new Promise<number>((resolve, reject) =>
          Fs.read(fd, buffer, 0, buffer.length, null, (error, n) => error === null ? resolve(n) : reject(error))
        )
        if (bytesRead === 0) return Buffer.concat(chunks, total)
        chunks.push(buffer.subarray(0, bytesRead))
        total += bytesRead
      }
      return undefined
    },
    catch: failed
  })

/**
 * A pipe's bytes until its writer closes it, or `undefined` past `MAX_CREDENTIALS_BYTES`. It waits for a writer,
 * which a FIFO may not have yet; interrupted, it stops listening (the pipe is closed with it).
 */
const readPipe = (socket: Net.Socket, failed: (cause: unknown) => TlsError) =>
  Effect.async<Buffer | undefined, TlsError>((resume) => {
    const chunks: Array<Buffer> = []
    let total = 0
    const stop = () => {
      socket.removeAllListeners("data").removeAllListeners("end").removeAllListeners("error")
      socket.on("error", () => undefined) // the socket is destroyed with its scope; nothing is read any more
      socket.pause()
    }
    socket.on("data", (chunk: Buffer) => {
      total += chunk.length
      if (total > MAX_CREDENTIALS_BYTES) {
        stop()
        return resume(Effect.succeed(undefined))
      }
      chunks.push(chunk)
    })
    socket.on("end", () => {
      stop()
      resume(Effect.succeed(Buffer.concat(chunks, total)))
    })
    socket.on("error", (cause) => {
      stop()
      resume(Effect.fail(failed(cause)))
    })
    socket.resume()
    return Effect.sync(stop)
  })

/** Reads a PEM or PSK file as text, at most `MAX_CREDENTIALS_BYTES` of it; a pipe (`<(...)`, a FIFO) too, interruptibly. */
export const readText = (path: string, what: string) => {
  const failed = (cause: unknown) =>
    new TlsError({ reason: "Config", detail: `cannot read ${what} ${path}: ${FileIo.describe(cause)}`, cause })
  return Effect.acquireUseRelease(
    open(path, failed),
    (opened) =>
      Effect.flatMap(
        opened._tag === "Pipe" ? readPipe(opened.socket, failed) : readFile(opened.fd, failed),
        (bytes) =>
          bytes !== undefined ? Effect.succeed(bytes.toString("utf8")) : Effect.fail(
            new TlsError({
              reason: "Config",
              detail: `${what} ${path} holds more than ${MAX_CREDENTIALS_BYTES / (1024 * 1024)} MiB: no ${what} is that long ` +
                "(a device, an endless pipe?)"
            })
          )
      ),
    close
  )
}

/** The reason of an OpenSSL error without its codes: "error:04800064:PEM routines::bad base64 decode" → "bad base64 decode". */
export const opensslReason = (error: unknown): string => {
  const text = (error as Error | undefined)?.message ?? String(error)
  return text.replace(/^(?:[0-9A-F]+:)?error:[0-9A-F]+:[^:]*:[^:]*:/, "").trim()
}

/** The labels of a text's PEM blocks (`CERTIFICATE`, `PRIVATE KEY`, ...). */
export const pemLabels = (text: string): Array<string> =>
  Array.from(text.matchAll(/-----BEGIN ([A-Z0-9 ]+)-----/g), (m) => m[1]!)

export const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g

/** What a PEM file holds instead of the expected thing, for messages: "a private key", "a CERTIFICATE REQUEST block". */
export const holds = (labels: ReadonlyArray<string>): string =>
  labels.some((label) => label.endsWith("PRIVATE KEY"))
    ? "a private key"
    : labels.includes("CERTIFICATE")
    ? "a certificate"
    : labels.includes("X509 CRL")
    ? "a CRL"
    : `a ${labels[0]} block`

/** deltaCRLIndicator (RFC 5280 §5.2.4). */
const DELTA_CRL_INDICATOR = "2.5.29.27"
/** The CRL extensions OpenSSL accepts as critical (crl_cb in x_crl.c): issuingDistributionPoint, deltaCRLIndicator, authorityKeyIdentifier. */
const HANDLED_CRL_EXTENSIONS = ["2.5.29.28", DELTA_CRL_INDICATOR, "2.5.29.35"]

export const PEM_CRL = /-----BEGIN X509 CRL-----[\s\S]*?-----END X509 CRL-----/g

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
/** A date as OpenSSL (and `X509Certificate.validTo`) writes it: "Jan  1 00:00:00 2001 GMT". */
export const opensslDate = (date: Date): string =>
  `${MONTHS[date.getUTCMonth()]} ${String(date.getUTCDate()).padStart(2, " ")} ` +
  `${[date.getUTCHours(), date.getUTCMinutes(), date.getUTCSeconds()].map((n) => String(n).padStart(2, "0")).join(":")} ` +
  `${date.getUTCFullYear()} GMT`

/**
 * The CRLs of a PEM file (`crl`), checked against the CA certificates (`cas`, from `caPath`) at `now`, as OpenSSL
 * would use them in every handshake: each parses, is signed by a CA of the CA file (a CRL of any other issuer is
 * never consulted), is within its validity (OpenSSL fails every handshake with an expired CRL: "CRL has
 * expired"), and every CA of the CA file has one (Node turns on CRL_CHECK_ALL: each certificate of a chain must
 * be checked against a CRL of its issuer, else "unable to get certificate CRL"). The PEM texts, one CRL each
 * (Node's `crl` option reads only the first CRL of a text), and what messages need. A `Config` error otherwise.
 */
export const crlsOf = (
  text: string,
  path: string,
  cas: ReadonlyArray<Crypto.X509Certificate>,
  caPath: string,
  now: number
): Effect.Effect<{ readonly pems: Array<string>; readonly crls: Array<CrlInfo> }, TlsError> =>
  Effect.suspend(() => {
    const blocks = text.match(PEM_CRL) ?? []
    if (blocks.length === 0) {
      const labels = pemLabels(text)
      return Effect.fail(configError(
        labels.length === 0 ? `CRL file ${path} is not a PEM CRL` : `CRL file ${path} holds ${holds(labels)}, not a CRL`
      ))
    }
    const authorities = cas.map((ca) => ({ ca, name: Der.namesOf(ca.raw).subject }))
    const crls: Array<CrlInfo> = []
    // the CA (index in `authorities`) that signed each CRL so far, and which CRL of the file it was
    const signers = new Map<number, number>()
    for (let i = 0; i < blocks.length; i++) {
      const which = blocks.length === 1 ? "" : ` (CRL ${i + 1} of ${blocks.length})`
      let crl: Der.Crl
      try {
        const body = blocks[i]!.replace(/-----(BEGIN|END) X509 CRL-----/g, "")
        if (!/^[A-Za-z0-9+/=\s]*$/.test(body)) throw new Error("bad base64 decode")
        crl = Der.parseCrl(Buffer.from(body.replace(/\s/g, ""), "base64"))
      } catch (cause) {
        return Effect.fail(configError(`CRL file ${path} is not a valid PEM CRL${which}: ${opensslReason(cause)}`, cause))
      }
      const issuer = Der.shortName(crl.issuer)
      const named = authorities.filter((a) => a.name === crl.issuer)
      if (named.length === 0) {
        return Effect.fail(configError(
          `CRL file ${path}${which} is a CRL of ${issuer}, which is not a CA of ${caPath}: it cannot be checked, and OpenSSL would never consult it`
        ))
      }
      const signer = authorities.findIndex((a) => a.name === crl.issuer && crl.signedBy(a.ca.publicKey))
      if (signer < 0) {
        return Effect.fail(configError(
          `CRL file ${path}${which} names ${issuer} as its issuer but is not signed by that CA (in ${caPath})`
        ))
      }
      // OpenSSL refuses a CRL whose signer's keyUsage leaves out cRLSign, and with it every certificate of that CA
      // ("key usage does not include CRL signing"), as GnuTLS does: every handshake failed, blaming the peer
      let usage: number | undefined
      try {
        usage = Der.keyUsageOf(authorities[signer]!.ca.raw)
      } catch {
        usage = undefined // (read when the CA file was checked: caCertificateProblem)
      }
      if (usage !== undefined && (usage & Der.CRL_SIGN) === 0) {
        return Effect.fail(configError(
          `CRL file ${path}${which}: the CRL of ${issuer} is signed by a CA whose keyUsage does not permit signing CRLs ` +
            `(cRLSign): OpenSSL would refuse every certificate that CA issued ("key usage does not include CRL ` +
            "signing\"); give a CRL signed with a key that may sign CRLs"
        ))
      }
      if (crl.nextUpdate !== undefined && now > crl.nextUpdate.getTime()) {
        return Effect.fail(configError(
          `CRL file ${path}${which}: the CRL of ${issuer} has expired (next update ${opensslDate(crl.nextUpdate)}): ` +
            `every handshake would fail with "CRL has expired"; get a current one`
        ))
      }
      if (now < crl.thisUpdate.getTime()) {
        return Effect.fail(configError(
          `CRL file ${path}${which}: the CRL of ${issuer} is not valid yet (last update ${opensslDate(crl.thisUpdate)}): ` +
            `every handshake would fail with "CRL is not yet valid"`
        ))
      }
      if (crl.extensions.some((e) => e.oid === DELTA_CRL_INDICATOR)) {
        return Effect.fail(configError(
          `CRL file ${path}${which} is a delta CRL of ${issuer} (deltaCRLIndicator), which lists only what changed since ` +
            "its base CRL: OpenSSL, as Node sets it up, would take it for the CA's complete CRL and admit what the base " +
            "CRL revokes; give the complete CRL"
        ))
      }
      if (crl.scope.length > 0) {
        return Effect.fail(configError(
          `CRL file ${path}${which}: the CRL of ${issuer} covers only some of its certificates (issuingDistributionPoint: ` +
            `${crl.scope.join(", ")}): OpenSSL checks a certificate only against a CRL that covers it, and would refuse ` +
            `the handshake of every certificate it does not cover; give a complete CRL of ${issuer}`
        ))
      }
      const unhandled = crl.extensions.find((e) => e.critical && !HANDLED_CRL_EXTENSIONS.includes(e.oid))
      if (unhandled !== undefined) {
        return Effect.fail(configError(
          `CRL file ${path}${which}: the CRL of ${issuer} has a critical extension OpenSSL does not handle ` +
            `(OID ${unhandled.oid}): every handshake would fail with "unhandled critical CRL extension"`
        ))
      }
      const earlier = signers.get(signer)
      if (earlier !== undefined) {
        return Effect.fail(configError(
          `CRL file ${path} holds two CRLs of ${issuer} (CRL ${earlier + 1} and CRL ${i + 1} of ${blocks.length}): ` +
            "OpenSSL consults only the most recent, and what the other revokes would be admitted; give one CRL per CA"
        ))
      }
      signers.set(signer, i)
      crls.push({ issuer: crl.issuer, revoked: crl.revoked })
    }
    const uncovered = authorities.find((a) => a.ca.ca && !crls.some((c) => c.issuer === a.name))
    if (uncovered !== undefined) {
      return Effect.fail(configError(
        `CRL file ${path} has no CRL of ${nameOf(uncovered.ca)} (a CA of ${caPath}): with CRLs, OpenSSL checks every ` +
          "certificate of a chain against a CRL of its issuer, so each CA needs one"
      ))
    }
    return Effect.succeed({ pems: blocks, crls })
  })

/** Every certificate of a PEM file, each parsed: a file without one, or with a broken one, is a `Config` error. */
export const certificatesOf = (text: string, what: string, path: string): Effect.Effect<Array<Crypto.X509Certificate>, TlsError> =>
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
export const privateKeyOf = (text: string, path: string): Effect.Effect<Crypto.KeyObject, TlsError> =>
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

/** `CN=alice`, or the whole subject when there is no CN, or `with an empty subject (DNS:...)`. */
export const nameOf = (certificate: Crypto.X509Certificate, field: "subject" | "issuer" = "subject"): string => {
  // (undefined for an empty name: RFC 5280 allows an empty subject when subjectAltName names the certificate, and a
  // stranger's self-signed certificate may have an empty issuer too)
  const text = certificate[field] as string | undefined
  if (text === undefined || text === "") {
    const names = field === "subject" ? certificate.subjectAltName : undefined
    return PeerText.fromPeer(`with an empty ${field}${names ? ` (${names})` : ""}`)
  }
  const cn = text.split("\n").find((line) => line.startsWith("CN="))
  // a peer's certificate names what it likes
  return PeerText.fromPeer(cn ?? text.replace(/\n/g, ", "))
}

/**
 * Why this side's own certificate cannot be used, whatever its role (as QEMU's tls-creds-x509 finds it at load),
 * after "certificate FILE (CN=x) ", or `undefined`: a CA certificate, or one outside its validity period at `now`.
 */
export const ownCertificateProblem = (certificate: Crypto.X509Certificate, now: number): string | undefined =>
  certificate.ca
    ? "is a CA certificate (basicConstraints CA:TRUE), not a server or client certificate"
    : now < Date.parse(certificate.validFrom)
    ? `is not valid yet (valid from ${certificate.validFrom})`
    : now > Date.parse(certificate.validTo)
    ? `has expired (valid until ${certificate.validTo})`
    : criticalExtensionProblem(certificate, ": every peer refuses it (\"unhandled critical extension\")") ??
      signingProblem(certificate)

/**
 * Why a CA of the CA file (`cas`) vouches for no peer though it is a CA, after "CA certificate FILE (CN=x) ", or
 * `undefined`: it is not self-signed and the file lacks the CA that issued it. OpenSSL (as Node sets it up: no partial
 * chains) trusts a chain only up to a self-signed CA, and failed every handshake through it ("unable to get issuer
 * certificate"); QEMU's GnuTLS takes any certificate of its CA file as an anchor.
 */
export const orphanProblem = (
  ca: Crypto.X509Certificate,
  cas: ReadonlyArray<Crypto.X509Certificate>
): string | undefined => {
  const signedBy = (issuer: Crypto.X509Certificate) => ca.checkIssued(issuer) && ca.verify(issuer.publicKey)
  if (signedBy(ca) || cas.some((other) => other !== ca && signedBy(other))) return undefined
  const issuer = nameOf(ca, "issuer")
  return `was issued by ${issuer}, which the file does not hold (OpenSSL, unlike QEMU's GnuTLS, trusts a chain only up ` +
    `to a self-signed CA: add the certificate of ${issuer} to the file)`
}

/**
 * The last certificate of `chain` (this side's certificate, then the CAs of its file that issued it, nearest first)
 * that its next one signed, when no CA of `cas` (the CA file) signed any of those (its name and AKID match and its
 * signature verifies), or `undefined`: with none of `cas` (no CA file) there is nothing to check against. Every peer
 * with that CA file refuses such a chain; QEMU refuses it at load (`qcrypto_tls_creds_check_cert_pair`).
 */
export const untrustedTop = (
  chain: ReadonlyArray<Crypto.X509Certificate>,
  cas: ReadonlyArray<Crypto.X509Certificate>
): Crypto.X509Certificate | undefined => {
  const signed = (c: Crypto.X509Certificate, by: Crypto.X509Certificate) => c.checkIssued(by) && c.verify(by.publicKey)
  if (cas.length === 0) return undefined
  for (const [i, c] of chain.entries()) {
    if (cas.some((ca) => signed(c, ca))) return undefined
    const next = chain[i + 1]
    if (next === undefined || !signed(c, next)) return c
  }
  return chain.at(-1)
}

/**
 * Why a certificate of this side's (its own, a CA of its files) cannot be used because of an extension, then
 * `consequence`, or `undefined`: a critical extension OpenSSL (and GnuTLS) does not handle, for which a peer refuses
 * every chain that holds the certificate ("unhandled critical extension").
 */
const criticalExtensionProblem = (certificate: Crypto.X509Certificate, consequence = ""): string | undefined => {
  let oid: string | undefined
  try {
    oid = Der.unhandledCriticalExtensionOf(certificate.raw)
  } catch {
    return "has extensions that cannot be read"
  }
  return oid === undefined
    ? undefined
    : `has a critical extension that OpenSSL and GnuTLS do not handle (OID ${oid})${consequence}`
}

/** The curves of the ECDSA signatures of TLS 1.3 (RFC 8446 §4.2.3), and of the groups OpenSSL's TLS 1.2 peers offer. */
const SIGNING_CURVES: Record<string, string> = { prime256v1: "P-256", secp384r1: "P-384", secp521r1: "P-521" }

/**
 * Why this side's certificate has a key no handshake here can sign with, after "certificate FILE (CN=x) ", or
 * `undefined`. TLS 1.3 signs with RSA (PSS), ECDSA on P-256, P-384 or P-521, Ed25519 or Ed448 only; a TLS 1.2
 * ECDHE-ECDSA suite needs a curve the peer offers (OpenSSL: those three); DSA, none. Otherwise every handshake
 * failed, OpenSSL finding "no suitable signature algorithm", which reads as though the peer were at fault.
 */
export const ownKeyProblem = (certificate: Crypto.X509Certificate): string | undefined => {
  const key = certificate.publicKey
  switch (key.asymmetricKeyType) {
    case "ec": {
      const curve = key.asymmetricKeyDetails?.namedCurve
      if (curve !== undefined && SIGNING_CURVES[curve] !== undefined) return undefined
      return `has an EC key on curve ${curve ?? "(unnamed)"}, with which no TLS handshake here can be signed (TLS 1.3 ` +
        "signs with P-256, P-384 and P-521 only, and OpenSSL's peers offer no other curve in TLS 1.2): reissue it with " +
        "a key on P-256 (or RSA, Ed25519)"
    }
    case "dsa":
      // (not even with a DHE-DSS suite and @SECLEVEL=0 in the cipher list: OpenSSL 3 finds no signature algorithm)
      return "has a DSA key, with which no TLS handshake here can be signed (TLS 1.3 has no DSA signatures, and " +
        "OpenSSL finds none for TLS 1.2 either): reissue it with an EC key on P-256 (or RSA)"
    default:
      return undefined
  }
}

/** The keyUsage bits by name, bit 0 first (RFC 5280 §4.2.1.3). */
const KEY_USAGE_NAMES = [
  "digitalSignature",
  "nonRepudiation",
  "keyEncipherment",
  "dataEncipherment",
  "keyAgreement",
  "keyCertSign",
  "cRLSign",
  "encipherOnly",
  "decipherOnly"
] as const

/**
 * Why this side's certificate cannot sign its TLS handshake (CertificateVerify, a TLS 1.2 ServerKeyExchange), or
 * `undefined`: a keyUsage that leaves out digitalSignature, which every peer refuses (this library's either side, as
 * QEMU's GnuTLS; QEMU refuses it at load).
 */
const signingProblem = (certificate: Crypto.X509Certificate): string | undefined => {
  let usage: number | undefined
  try {
    usage = Der.keyUsageOf(certificate.raw)
  } catch {
    return "has a keyUsage extension that cannot be read"
  }
  if (usage === undefined || (usage & Der.DIGITAL_SIGNATURE) !== 0) return undefined
  const named = KEY_USAGE_NAMES.filter((_, bit) => (usage & (1 << bit)) !== 0)
  return `has a keyUsage without digitalSignature (${named.length === 0 ? "none" : named.join(", ")}): it cannot ` +
    "sign its TLS handshake, and every peer refuses it; reissue it with digitalSignature in its keyUsage"
}

/**
 * Why a certificate cannot vouch for those it issued, as QEMU's tls-creds-x509 checks each certificate of its
 * `ca-cert.pem` at load, after "CA certificate FILE (CN=x) ", or `undefined`: one that is no CA
 * (`notCa`: a server's or a client's certificate given as a CA), whose keyUsage does not permit signing
 * certificates, or outside its validity period at `now`: OpenSSL accepts no certificate it issued.
 */
export const caCertificateProblem = (
  certificate: Crypto.X509Certificate,
  now: number
): { readonly notCa: boolean; readonly problem: string } | undefined => {
  let ca: boolean
  let usage: number | undefined
  try {
    ca = Der.isCaOf(certificate.raw)
    usage = Der.keyUsageOf(certificate.raw)
  } catch {
    return { notCa: false, problem: "has extensions that cannot be read (basicConstraints, keyUsage)" }
  }
  if (!ca) return { notCa: true, problem: "is not a CA certificate (its basicConstraints do not say CA:TRUE)" }
  if (usage !== undefined && (usage & Der.KEY_CERT_SIGN) === 0) {
    return { notCa: false, problem: "is a CA certificate whose keyUsage does not permit signing certificates (keyCertSign)" }
  }
  const critical = criticalExtensionProblem(certificate)
  return now < Date.parse(certificate.validFrom)
    ? { notCa: false, problem: `is not valid yet (valid from ${certificate.validFrom})` }
    : now > Date.parse(certificate.validTo)
    ? { notCa: false, problem: `has expired (valid until ${certificate.validTo})` }
    : critical !== undefined
    ? { notCa: false, problem: critical }
    : undefined
}

const EKU_OF = { server: "1.3.6.1.5.5.7.3.1", client: "1.3.6.1.5.5.7.3.2" } as const
/** The extendedKeyUsage purposes a migration's certificates name, by OID. */
export const EKU_NAMES: Record<string, string> = { [EKU_OF.server]: "serverAuth", [EKU_OF.client]: "clientAuth" }
const ANY_EKU = "2.5.29.37.0"

/**
 * Why this side's own certificate cannot authenticate it as `role`, after "certificate FILE (CN=x) ", or
 * `undefined`: an extendedKeyUsage that names neither the role's usage nor anyExtendedKeyUsage.
 */
export const ownUsageProblem = (certificate: Crypto.X509Certificate, role: "client" | "server"): string | undefined => {
  const usage = certificate.keyUsage
  if (usage === undefined || usage.length === 0 || usage.includes(EKU_OF[role]) || usage.includes(ANY_EKU)) return undefined
  return `is not for ${role} authentication (extendedKeyUsage ${usage.map((oid) => EKU_NAMES[oid] ?? oid).join(", ")})`
}

/**
 * Why this side's certificate (`ownCertificate`, issued by `ownIssuers` of its file) cannot authenticate it as `role`,
 * after "certificate FILE ", or `undefined`: its own extendedKeyUsage, or that of a CA of its file that issued it
 * (OpenSSL and GnuTLS check the purpose on every CA of a chain: a peer refused it in every handshake).
 */
export const ownRoleProblem = (
  own: Crypto.X509Certificate,
  issuers: ReadonlyArray<Crypto.X509Certificate>,
  role: "client" | "server"
): string | undefined => {
  const problem = ownUsageProblem(own, role)
  if (problem !== undefined) return `(${nameOf(own)}) ${problem}`
  const restricted = issuers.find((ca) => ownUsageProblem(ca, role) !== undefined)
  return restricted === undefined ? undefined : `(${nameOf(own)}) was issued by ${nameOf(restricted)} (in its file), whose ` +
    `extendedKeyUsage (${restricted.keyUsage!.map((oid) => EKU_NAMES[oid] ?? oid).join(", ")}) is not for ${role} ` +
    "authentication: a peer accepts no certificate it issued for that"
}

/**
 * Why OpenSSL's security level refused this side's own certificate when its secure context was built (OpenSSL's
 * terse reason: "ca md too weak", "ee key too small", "ca key too small"), after "certificate FILE (CN=x) ", or
 * `undefined` for any other reason. `chain`: whether the certificate's file holds CA certificates after it.
 */
export const securityLevelProblem = (
  reason: string,
  certificate: Crypto.X509Certificate,
  chain: boolean
): string | undefined => {
  switch (reason) {
    case "ca md too weak":
      return "is signed with a digest too weak for OpenSSL's security level (SHA-1 or MD5, which QEMU's GnuTLS refuses " +
        `too)${chain ? ", or a CA certificate of its file is" : ""}: reissue it signed with SHA-256`
    case "ee key too small":
      return `has ${keyText(certificate)}, smaller than OpenSSL's security level accepts: reissue it with a larger key ` +
        "(RSA of 2048 bits, or EC)"
    case "ca key too small":
      return "comes with a CA certificate (in its file) whose key is smaller than OpenSSL's security level accepts"
    default:
      return undefined
  }
}

/**
 * Why OpenSSL's security level makes a certificate of the CA file useless, after "CA certificate FILE (CN=x) ", or
 * `undefined`: a key too small (RSA below 1024 bits at level 1), or, but for a self-signed one, a signature with a
 * digest too weak (SHA-1, MD5). OpenSSL then accepts no chain through it ("CA certificate key too weak", "CA
 * signature digest algorithm too weak"), and a destination whose own certificate it issued fails every handshake
 * ("ca key too small", the source hearing only "internal error"). Asked of OpenSSL itself, at the level `ciphers`
 * sets (`@SECLEVEL=n`): the checks it runs on a certificate a context takes as its own are these.
 */
export const caSecurityLevelProblem = (certificate: Crypto.X509Certificate, ciphers: string): string | undefined => {
  try {
    NodeTls.createSecureContext({ cert: certificate.toString(), ciphers })
    return undefined
  } catch (cause) {
    switch (opensslReason(cause)) {
      case "ee key too small":
        return `has ${keyText(certificate)}, smaller than OpenSSL's security level accepts`
      case "ca md too weak":
        return "is signed with a digest too weak for OpenSSL's security level (SHA-1 or MD5, which QEMU's GnuTLS refuses too)"
      default:
        // (a cipher list OpenSSL does not know: the context built next says so)
        return undefined
    }
  }
}

/** "a 512-bit RSA key", or "a key". */
const keyText = (certificate: Crypto.X509Certificate): string => {
  const key = certificate.publicKey
  const bits = key.asymmetricKeyDetails?.modulusLength
  return bits === undefined ? "a key" : `a ${bits}-bit ${key.asymmetricKeyType?.toUpperCase()} key`
}

/**
 * Builds a secure context; OpenSSL's refusal is a `Config` error naming `what`. As a server it picks the
 * cipher by its own order of preference (`honorCipherOrder`), not the client's: what we prefer (AES-GCM, cheap
 * with AES instructions) is what a source gets, whatever it lists first. (QEMU's GnuTLS, as a server, picks
 * ChaCha20-Poly1305, about twice AES-GCM's CPU there: bench/qemu-extra-bench.sh sniffs it.) TLS 1.2
 * renegotiation is refused, asked by either peer: a migration never needs it.
 */
export const secureContextOf = (options: NodeTls.SecureContextOptions, what: string) =>
  Effect.try({
    try: () =>
      NodeTls.createSecureContext({
        minVersion: "TLSv1.2",
        honorCipherOrder: true,
        secureOptions: Crypto.constants.SSL_OP_NO_RENEGOTIATION,
        ...options
      }),
    catch: (cause) => configError(`cannot use ${what}: ${opensslReason(cause)}`, cause)
  })

// TLS 1.3 external PSKs in OpenSSL use SHA-256 suites (AES-128-GCM first: fast with AES instructions); the TLS 1.2
// PSK suites are a fallback (ECDHE-PSK first: forward secrecy, and what QEMU's GnuTLS offers first).
export const PSK_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:ECDHE-PSK-CHACHA20-POLY1305:" +
  "PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305"

/**
 * The x509 cipher suites, in order of preference: AES-GCM first (fast with AES instructions), then
 * ChaCha20-Poly1305 (fast without them), for TLS 1.3 and for TLS 1.2 with ECDHE (forward secrecy).
 */
export const X509_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:" +
  "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" +
  "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
