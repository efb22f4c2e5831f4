/**
 * Reading TLS credentials and checking them before anything listens or connects: PEM files that hold what
 * they should and parse, the secure context OpenSSL builds from them, names of certificates for messages.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs/promises"
import * as NodeTls from "node:tls"
import * as FileIo from "../native/fileIo.js"
import * as PeerText from "../peerText.js"
import { configError, TlsError } from "./model.js"

export const readText = (path: string, what: string) =>
  Effect.tryPromise({
    try: () => Fs.readFile(path, "utf8"),
    catch: (cause) =>
      new TlsError({ reason: "Config", detail: `cannot read ${what} ${path}: ${FileIo.describe(cause)}`, cause })
  })

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
    : `a ${labels[0]} block`

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

/** `CN=alice`, or the whole subject when there is no CN. */
export const nameOf = (certificate: Crypto.X509Certificate, field: "subject" | "issuer" = "subject"): string => {
  const text = certificate[field]
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
    : undefined

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
