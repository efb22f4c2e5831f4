/**
 * TLS on every connection of a migration, as QEMU's `tls-creds-psk` / `tls-creds-x509` do: pre-shared keys
 * in QEMU's `keys.psk` format, or x509 certificates with host name checking, optional client certificates
 * and an authorization list. Credentials are checked when loaded, before anything listens or connects, and
 * one secure context serves every handshake. A peer's certificate is accepted only when its chain verifies
 * (to the CA file, within its validity period, for its role's usage, none of it revoked by the CRL file if one is
 * given); authorization applies to verified certificates only, by CN or, as QEMU's tls-authz, by whole DN. The handshake is an Effect with a timeout that must succeed before a channel exists;
 * the TLS socket is destroyed at once on failure and ended with close_notify on success.
 *
 * This module holds the public surface (configuration, loading, the client and server handshakes, the
 * service); reading credentials, judging certificates and running a handshake are in `internal/tls/`. It is
 * over 500 lines because the client and server handshakes each need their own options and checks, and the
 * configuration its rules (CRL files, authorization lists that hold distinguished names).
 *
 * @since 0.1.0
 */
import * as Config from "effect/Config"
import * as ConfigError from "effect/ConfigError"
import * as Context from "effect/Context"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Layer from "effect/Layer"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"
import * as Crypto from "node:crypto"
import * as NodeTls from "node:tls"
import * as Field from "./internal/configField.js"
import * as PeerText from "./internal/peerText.js"
import {
  caCertificateProblem,
  caSecurityLevelProblem,
  certificatesOf,
  crlsOf,
  nameOf,
  opensslReason,
  ownCertificateProblem,
  ownKeyProblem,
  orphanProblem,
  ownRoleProblem,
  privateKeyOf,
  PSK_CIPHERS,
  readText,
  secureContextOf,
  securityLevelProblem,
  untrustedTop,
  X509_CIPHERS
} from "./internal/tls/credentials.js"
import * as TlsClient from "./internal/tls/client.js"
import * as Handshake from "./internal/tls/handshake.js"
import { handshake, open, secured } from "./internal/tls/handshake.js"
import { configError, type Credentials, type Settings, TlsError } from "./internal/tls/model.js"
import * as Der from "./internal/tls/der.js"
import {
  clientRefusal,
  describe,
  hint,
  ownChainVerdict,
  peerCertificateOf,
  refusedOwnCertificate,
  revokedBy,
  verifyProblem
} from "./internal/tls/verification.js"
import * as Transfer from "./Transfer.js"
import * as Transport from "./Transport.js"

/**
 * A TLS failure: bad configuration, a failed or stalled handshake, or a peer that is not authorized.
 *
 * @since 0.1.0
 * @category errors
 */
export { TlsError }

/**
 * Loaded credentials, and everything a handshake needs.
 *
 * @since 0.1.0
 * @category models
 */
export type { Credentials, Settings }

/**
 * TLS settings as files and names: what the CLI flags and environment variables carry.
 *
 * @since 0.1.0
 * @category models
 */
export const TlsConfig = Schema.Struct({
  /** QEMU `keys.psk` file: one `identity:hexkey` a line. */
  psk: Schema.optional(Schema.String),
  /** PSK identity the source presents (default `qemu`, as QEMU); with x509 (no `psk`) it is refused at load. */
  identity: Schema.optional(Schema.String),
  /** CA certificate(s), PEM: verifies the peer's certificate. */
  ca: Schema.optional(Schema.String),
  /** This side's certificate, PEM. */
  cert: Schema.optional(Schema.String),
  /** This side's private key, PEM. */
  key: Schema.optional(Schema.String),
  /**
   * Certificate revocation lists, PEM (one file, one or more CRLs; QEMU's `ca-crl.pem`): a peer whose certificate,
   * or a CA of its chain, is listed is refused. Each CRL must be signed by a CA of `ca` and current, and every CA
   * of `ca` needs one (OpenSSL checks every certificate of a chain against its issuer's CRL): checked at load.
   * A destination given one verifies its clients (as with `verifyPeer`; `verifyPeer: false` with it is refused).
   */
  crl: Schema.optional(Schema.String),
  /**
   * Name the destination's certificate must carry (default: the host of the address): a DNS name, or an IP address
   * (an IPv6 one bracketed or not). One with a port, a path or brackets around a name is refused at load, and so is
   * one with `psk` (a PSK destination proves the key, not a name). A source's: a destination does not use it.
   */
  hostname: Schema.optional(Schema.String),
  /**
   * Destination, x509: require and verify client certificates. Unset, a destination verifies them when it has a `crl`
   * or an `authz` list (which have no other use there), and otherwise takes any client (with a `ca` too: one `TlsConfig`
   * serves both roles, and a source's `ca` verifies its destination; the command line's `recv --tls-ca` verifies: a
   * destination of such settings says so once in its log as it starts, unless verifyPeer is `false`). `false` with
   * `crl` or `authz`, or with `psk` (a key always proves its source), is refused at load.
   */
  verifyPeer: Schema.optional(Schema.Boolean),
  /**
   * Destination: admit only these clients. An entry with `=` is a client certificate's whole distinguished name,
   * matched exactly as QEMU's tls-authz matches it (GnuTLS's form: `O=Example,CN=alice`, see `distinguishedName`);
   * an entry without is a certificate's CN, or a PSK identity (one the PSK file has a key for). A list that names
   * nobody (empty, or with an empty entry) is refused at load.
   */
  authz: Schema.optional(Schema.Array(Schema.String)),
  /**
   * Cipher suites in order of preference, in OpenSSL's syntax (TLS 1.3 suite names and TLS 1.2 ciphers,
   * colon-separated). Default: AES-GCM first (fast where the CPU has AES instructions), then
   * ChaCha20-Poly1305. A destination's order wins over its source's.
   */
  ciphers: Schema.optional(Schema.String),
  /**
   * Handshake timeout in milliseconds (default 10000): more than 0 and at most `Transfer.MAX_TIMEOUT_MS` (24 days,
   * the longest a timer waits: `Infinity` never timed a handshake out).
   */
  handshakeTimeoutMs: Schema.optional(Schema.Number.pipe(Schema.positive(), Schema.lessThanOrEqualTo(Transfer.MAX_TIMEOUT_MS)))
})

/**
 * TLS settings as files and names.
 *
 * @since 0.1.0
 * @category models
 */
export type TlsConfig = Schema.Schema.Type<typeof TlsConfig>

/**
 * Default handshake timeout.
 *
 * @since 0.1.0
 * @category constants
 */
export const DEFAULT_HANDSHAKE_TIMEOUT = Duration.seconds(10)

/**
 * The longest pre-shared key a TLS handshake here can use: OpenSSL's `PSK_MAX_PSK_LEN`. A longer key is refused
 * when its file is read, not at the first handshake.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_PSK_BYTES = 512

/**
 * The shortest pre-shared key taken: 128 bits (RFC 9257 §6). A shorter key is refused when its file is read, on any
 * line: an eavesdropper who captured one handshake finds it offline (each guess checked against the handshake's PSK
 * binder), then reads the migration or passes for either side. QEMU and GnuTLS take any length; their `psktool` makes
 * keys of 32 bytes.
 *
 * @since 0.1.0
 * @category constants
 */
export const MIN_PSK_BYTES = 16

/**
 * The longest PSK identity a TLS handshake here can use: OpenSSL's `PSK_MAX_IDENTITY_LEN`, in bytes of UTF-8. A
 * longer one is refused when its file is read, not at the first handshake.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_PSK_IDENTITY_BYTES = 256

/**
 * The identity of a keys.psk line in GnuTLS's form of an identity with ':' or other special characters, which a QEMU
 * destination reads: `#` and the identity's bytes in hex (`#613a62:hexkey` is identity a:b), if the line is one. Any
 * other `#` line is a comment (it was taken for one too, and a source of that identity refused as having no key);
 * so is one whose bytes are no UTF-8, an identity no peer here can present.
 */
const gnutlsIdentity = (line: string): string | undefined => {
  const hex = /^#((?:[0-9a-fA-F]{2})+):(?:[0-9a-fA-F]{2})+$/.exec(line)?.[1]
  if (hex === undefined) return undefined
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(Buffer.from(hex, "hex"))
  } catch {
    return undefined
  }
}

/**
 * Parses QEMU's `keys.psk` format: one `identity:hexkey` a line, or `#hexidentity:hexkey` (GnuTLS's form of an
 * identity with `:` or other special characters, as a QEMU destination reads the file); blank lines and other `#`
 * lines (comments) ignored. A key shorter than `MIN_PSK_BYTES` or longer than `MAX_PSK_BYTES`, or an identity longer
 * than `MAX_PSK_IDENTITY_BYTES`, is a `Config` error.
 *
 * @since 0.1.0
 * @category utils
 */
export const parsePskFile = (text: string, source = "keys file"): Effect.Effect<ReadonlyMap<string, Buffer>, TlsError> =>
  Effect.suspend(() => {
    // (from plain JavaScript, a Buffer or null died: "text.split is not a function")
    if (typeof text !== "string") return Effect.fail(configError(`${source}: its text must be a string (the file's contents, read as UTF-8)`))
    const keys = new Map<string, Buffer>()
    const lines = text.split(/\r?\n/)
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i]!.trim()
      const hexIdentity = gnutlsIdentity(line)
      if (line === "" || (line.startsWith("#") && hexIdentity === undefined)) continue
      // (hex has no ':': the first one ends a hex identity)
      const colon = hexIdentity !== undefined ? line.indexOf(":") : line.lastIndexOf(":")
      const identity = hexIdentity ?? line.slice(0, colon)
      const hex = line.slice(colon + 1)
      if (colon <= 0 || hex.length === 0 || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
        return new TlsError({ reason: "Config", detail: `${source} line ${i + 1} is not identity:hexkey` })
      }
      const identityBytes = Buffer.byteLength(identity, "utf8")
      if (identityBytes > MAX_PSK_IDENTITY_BYTES) {
        return new TlsError({
          reason: "Config",
          detail: `${source} line ${i + 1}: an identity of ${identityBytes} bytes; TLS (OpenSSL) takes at most ` +
            `${MAX_PSK_IDENTITY_BYTES}`
        })
      }
      if (hex.length / 2 < MIN_PSK_BYTES) {
        return new TlsError({
          reason: "Config",
          detail: `${source} line ${i + 1}: a key of ${hex.length / 2} bytes, which a peer can guess; give at least ` +
            `${MIN_PSK_BYTES} bytes (128 bits) of random key (psktool -u IDENTITY -p FILE makes 32, as QEMU's documentation says)`
        })
      }
      if (hex.length / 2 > MAX_PSK_BYTES) {
        return new TlsError({
          reason: "Config",
          detail: `${source} line ${i + 1}: a key of ${hex.length / 2} bytes; TLS (OpenSSL) takes at most ${MAX_PSK_BYTES}`
        })
      }
      // QEMU's tls-creds-psk takes an identity's first line: so does this side, or one file gives two keys
      if (!keys.has(identity)) keys.set(identity, Buffer.from(hex, "hex"))
    }
    if (keys.size === 0) return new TlsError({ reason: "Config", detail: `${source} has no identity:hexkey line` })
    return Effect.succeed(keys)
  })

/**
 * Reads the files a `TlsConfig` names and checks that they are usable before anything listens or connects:
 * that the combination makes sense, that every PEM file holds what it should and parses, that the key is
 * the certificate's and that the certificate is a valid leaf (not a CA, within its validity period, the CAs of its
 * file that issued it CAs within theirs, issued by a CA of the CA file if one is given, as QEMU checks it), that every
 * certificate of the CA file is a CA that can vouch for a peer now (basicConstraints CA:TRUE, keyUsage allowing
 * keyCertSign, within its validity period: QEMU's tls-creds-x509 checks its `ca-cert.pem` so), that an
 * explicit PSK identity has a key, that x509 verifying clients (`verifyPeer`,
 * `authz`) has a CA file, that a CRL file holds current CRLs signed by the CA file's CAs, one for each of them. Builds the secure context every handshake reuses: with x509 it trusts the CA file
 * only, never Node's public roots (a source without a CA file is refused by `checkClient`).
 *
 * @since 0.1.0
 * @category constructors
 */
export const load = (config: TlsConfig): Effect.Effect<Settings, TlsError> =>
  Effect.gen(function*() {
    // (from plain JavaScript, a config of null was a defect: "Cannot read properties of null")
    if (typeof config !== "object" || config === null || Array.isArray(config)) {
      const given = typeof config === "string" ? JSON.stringify(config) : config === null || typeof config !== "object" ? String(config) : "an array"
      return yield* configError(`must be an object ({ psk }, or { ca, cert, key, ... }), not ${given}`)
    }
    // a config given in code is held to the schema the environment's is (from plain JavaScript, nothing checked it: a
    // handshakeTimeoutMs of NaN or -5 was read as 0 and every handshake timed out at once, a verifyPeer of "yes" or an
    // authz of "alice" (a string, not a list) were read as true or died on it): the first field it refuses, in one line
    const invalid = Either.getLeft(Schema.decodeUnknownEither(TlsConfig, { onExcessProperty: "ignore" })(config))
    if (invalid._tag === "Some") {
      const [first] = ParseResult.ArrayFormatter.formatErrorSync(invalid.value)
      const field = first?.path.map(String).join(".") ?? ""
      return yield* configError(
        `${field === "" ? "" : `${field}: `}${(first?.message ?? "invalid").split("\n")[0]}${
          first?.path[0] === "handshakeTimeoutMs" ? " (a number of milliseconds more than 0, at most 24 days)" : ""
        }`
      )
    }
    const x509 = config.ca !== undefined || config.cert !== undefined || config.key !== undefined
    if (config.psk !== undefined && x509) {
      return yield* configError("use either a PSK file or x509 certificates, not both")
    }
    if (config.crl !== undefined && !x509) {
      return yield* configError(
        config.psk !== undefined ? "a CRL file applies to x509 certificates, not a PSK file" : "a CRL file needs the CA certificate (ca) that issued it"
      )
    }
    if (config.crl !== undefined && config.ca === undefined) {
      return yield* configError("a CRL file needs the CA certificate (ca) that issued it")
    }
    // settings that would take no effect, loaded without a word (one TlsConfig serves both roles: these take none in
    // either): an identity with x509, a name with PSK, verifyPeer false where every client is verified all the same
    if (x509 && config.identity !== undefined) {
      return yield* configError(
        "identity is the PSK identity a source presents (psk): with x509 the certificate (cert) names this side"
      )
    }
    if (config.psk !== undefined && config.hostname !== undefined) {
      return yield* configError(
        "hostname is the name the destination's x509 certificate must carry: a PSK destination proves the key, not a name"
      )
    }
    if (config.psk !== undefined && config.verifyPeer === false) {
      return yield* configError(
        "verifyPeer false with a PSK file: a PSK destination verifies every source by its key, always (authz limits the identities)"
      )
    }
    // a CRL, or an authorization list, on an x509 destination verifies its clients (it has no other use there): with
    // verifyPeer false the CRL checked nobody, a revoked client admitted without a word
    if (x509 && config.verifyPeer === false && config.crl !== undefined) {
      return yield* configError(
        "verifyPeer false with a CRL file (crl): a destination given one verifies its clients against it (a source checks " +
          "the destination's certificate, whatever verifyPeer says); drop verifyPeer: false, or the crl"
      )
    }
    if (x509 && config.verifyPeer === false && config.authz !== undefined) {
      return yield* configError(
        "verifyPeer false with an authorization list (authz): a destination given one verifies its clients; drop " +
          "verifyPeer: false, or the authz"
      )
    }
    // an empty list (MULTIFD_TLS_AUTHZ set empty, or to ","), or an empty entry, names no peer: every handshake was
    // refused ("not in the authorization list") though the destination looked ready
    if (config.authz !== undefined && (config.authz.length === 0 || config.authz.some((entry) => entry.trim() === ""))) {
      return yield* configError(
        config.authz.length === 0
          ? "the authorization list (authz) is empty: it admits no peer; give at least one identity, or no list to " +
            "admit every peer whose credentials verify"
          : `the authorization list (authz) holds an empty entry (entry ${config.authz.findIndex((e) => e.trim() === "") + 1}), which names no peer`
      )
    }
    const notDn = config.authz?.find((entry) => entry.includes("=") && entry.split(/(?<!\\),/).some((rdn) => !/^[^=]+=/.test(rdn)))
    if (notDn !== undefined) {
      return yield* configError(
        `authorization entry ${JSON.stringify(notDn)} is not a distinguished name: each part is TYPE=value ` +
          "(O=Example,CN=alice); in a list that holds one, entries are separated by ';'"
      )
    }
    // a DN as GnuTLS never writes one (`cn=alice`, `O = Example, CN = alice` as `openssl x509 -subject` prints it)
    // admits no certificate: every client was refused, though the destination looked ready
    for (const entry of x509 ? config.authz ?? [] : []) {
      const written = entry.includes("=") ? Der.asGnutlsWrites(entry) : undefined
      if (written !== undefined) {
        return yield* configError(
          `authorization entry ${JSON.stringify(entry)} can match no certificate: GnuTLS (whose form QEMU's tls-authz ` +
            `matches) writes that name as ${JSON.stringify(written)}`
        )
      }
    }
    // an empty MULTIFD_TLS_HOSTNAME is the name "", which no certificate carries: every handshake failed ("Host: .")
    if (config.hostname !== undefined && (config.hostname === "" || /[\s\x00-\x1f\x7f]/.test(config.hostname))) {
      return yield* configError(
        `hostname ${JSON.stringify(config.hostname)} is no host name: give the name the destination's certificate ` +
          "must carry, or none to check the host of its address"
      )
    }
    // an IPv6 address as a uri writes it ([::1], as the command's --tls-hostname takes it) is that address; a name
    // with ':' (a port), '[', ']' or '/' is none a certificate carries: every handshake failed ("Host: [::1]. is not
    // in the cert's altnames")
    const inner = config.hostname === undefined ? undefined : /^\[(.*)\]$/.exec(config.hostname)?.[1]
    const hostname = inner !== undefined && Transport.isIp(inner) ? inner : config.hostname
    if (hostname !== undefined && !Transport.isIp(hostname) && /[:[\]/]/.test(hostname)) {
      return yield* configError(
        `hostname ${JSON.stringify(hostname)} is no host name: a certificate names no host with ':' (but an IPv6 ` +
          "address), '[', ']' or '/' (give the name alone, without a port)"
      )
    }
    if ((config.cert === undefined) !== (config.key === undefined)) {
      return yield* configError("a certificate needs its key and a key its certificate")
    }
    if (x509 && config.ca === undefined && (config.verifyPeer === true || config.authz !== undefined)) {
      return yield* configError(
        `${config.verifyPeer === true ? "verifyPeer" : "authz"} with x509 needs a CA certificate (ca) to verify clients: ` +
          "the public root CAs are never trusted"
      )
    }
    let credentials: Credentials
    let contextOptions: NodeTls.SecureContextOptions
    let files: string
    let ownCertificate: Crypto.X509Certificate | undefined
    let ownChain = false
    let ownIssuers: ReadonlyArray<Crypto.X509Certificate> | undefined
    let crls: Settings["crls"]
    if (config.psk !== undefined) {
      const keys = yield* Effect.flatMap(readText(config.psk, "PSK file"), (text) => parsePskFile(text, config.psk))
      if (config.identity !== undefined && !keys.has(config.identity)) {
        return yield* configError(`PSK file ${config.psk} has no key for identity ${config.identity}`)
      }
      // an entry no key of the file can prove admits nobody: authz [bob] loaded, and every source was refused
      const keyless = config.authz?.find((identity) => !keys.has(identity))
      if (keyless !== undefined) {
        return yield* configError(
          `authorization entry ${JSON.stringify(keyless)} has no key in PSK file ${config.psk}: no source can prove that ` +
            "identity; add its key to the file, or remove the entry"
        )
      }
      credentials = { _tag: "Psk", keys, identity: config.identity ?? "qemu", file: config.psk }
      // no CA at all (Node's public roots and NODE_EXTRA_CA_CERTS otherwise): TLS 1.3's suites serve certificates as
      // well as keys, and a destination that proved no key but presented a certificate those roots trust was taken
      contextOptions = { ciphers: config.ciphers ?? PSK_CIPHERS, ca: [] }
      files = `PSK file ${config.psk}`
    } else if (x509) {
      const ca = config.ca === undefined ? undefined : yield* readText(config.ca, "CA certificate")
      const cas = ca === undefined ? [] : yield* certificatesOf(ca, "CA certificate", config.ca!)
      // every certificate of the CA file a CA that can vouch for a peer now, as QEMU's tls-creds-x509 checks them
      const loadedAt = yield* Effect.sync(() => Date.now())
      for (const [i, authority] of cas.entries()) {
        // (at the security level of the cipher list the contexts get: `@SECLEVEL=0` in it admits any key)
        const weak = caSecurityLevelProblem(authority, config.ciphers ?? X509_CIPHERS)
        const orphan = orphanProblem(authority, cas)
        const bad = caCertificateProblem(authority, loadedAt) ??
          (weak === undefined ? undefined : { notCa: false, problem: weak }) ??
          (orphan === undefined ? undefined : { notCa: false, problem: orphan })
        if (bad === undefined) continue
        const which = cas.length === 1 ? "" : `certificate ${i + 1} of ${cas.length}, `
        return yield* configError(
          `CA certificate ${config.ca} (${which}${nameOf(authority)}) ${bad.problem}: ` + (bad.notCa
            ? "it vouches for no peer; give the certificate of the CA that issued the peers' certificates"
            : "OpenSSL accepts no certificate it issued")
        )
      }
      // the wall clock, as OpenSSL uses it in every handshake
      const crl = config.crl === undefined
        ? undefined
        : yield* Effect.flatMap(
          readText(config.crl, "CRL file"),
          (text) => Effect.flatMap(Effect.sync(() => Date.now()), (now) => crlsOf(text, config.crl!, cas, config.ca!, now))
        )
      crls = crl?.crls
      const cert = config.cert === undefined ? undefined : yield* readText(config.cert, "certificate")
      const key = config.key === undefined ? undefined : yield* readText(config.key, "private key")
      if (cert !== undefined && key !== undefined) {
        const [leaf, ...chain] = yield* certificatesOf(cert, "certificate", config.cert!)
        const privateKey = yield* privateKeyOf(key, config.key!)
        if (!leaf!.checkPrivateKey(privateKey)) {
          // the key's certificate further down the file: its chain written CAs first (OpenSSL takes the first for
          // this side's own and the key for another's)
          const own = chain.findIndex((c) => c.checkPrivateKey(privateKey))
          return yield* configError(
            own < 0
              ? `private key ${config.key} does not match certificate ${config.cert} (${nameOf(leaf!)})`
              : `certificate ${config.cert} holds its chain in the wrong order: the certificate of private key ` +
                `${config.key} (${nameOf(chain[own]!)}) is certificate ${own + 2} of ${chain.length + 1}, and must come ` +
                "first, followed by the CAs that issued it"
          )
        }
        // the wall clock, as OpenSSL's verification of the peer's certificate uses (not the Effect Clock: a
        // TestClock, in 1970, would refuse every certificate)
        const now = yield* Effect.sync(() => Date.now())
        const problem = ownCertificateProblem(leaf!, now) ?? ownKeyProblem(leaf!)
        if (problem !== undefined) return yield* configError(`certificate ${config.cert} (${nameOf(leaf!)}) ${problem}`)
        // the CAs of its file that issued it (sent with it: a peer builds its chain through them), each a CA that
        // can vouch for it now, as QEMU checks its certificates at load: a peer refused it in every handshake
        const issuers: Array<Crypto.X509Certificate> = []
        for (let issued = leaf!, steps = 0; steps < chain.length; steps++) {
          const at = chain.findIndex((c) => c !== issued && c.subject !== undefined && c.subject === issued.issuer)
          if (at < 0) break
          const issuer = chain[at]!
          const bad = caCertificateProblem(issuer, now)
          if (bad !== undefined) {
            return yield* configError(
              `certificate ${config.cert} (certificate ${at + 2} of ${chain.length + 1}, ${nameOf(issuer)}, which issued ` +
                `${nameOf(issued)}) ${bad.problem}: a peer accepts no certificate it issued`
            )
          }
          issuers.push(issuer)
          issued = issuer
        }
        // issued by a CA of the CA file (itself, or through the CAs of its file), as QEMU checks its certificate against
        // its CA file at load ("Our own certificate ... failed validation"): another CA's, or a self-signed one, loaded
        // and every peer of that CA file refused it
        const top = untrustedTop([leaf!, ...issuers], cas)
        if (top !== undefined) {
          const selfSigned = top.checkIssued(top)
          return yield* configError(
            `certificate ${config.cert} (${nameOf(leaf!)}) ` + (top === leaf
              ? selfSigned ? "is self-signed" : `was issued by ${nameOf(top, "issuer")}`
              : `was issued by ${nameOf(top)} (in its file), which ${selfSigned ? "is self-signed" : `was issued by ${nameOf(top, "issuer")}`}`) +
              `, and no CA of the CA file ${config.ca} issued it: a peer with that CA file refuses it in every handshake, ` +
              "and QEMU refuses it at load; add the CA that issued it to the CA file (which may hold several CAs)"
          )
        }
        // revoked by the CRL file, or a CA that issued it is (of its file or the CA file): every peer that checks
        // the CRL refused it, this side's log only guessing why ("did the source refuse ...?")
        if (crl !== undefined) {
          // (each CA once: the walk ends)
          const lineage = [leaf!, ...issuers]
          for (;;) {
            const last = lineage.at(-1)!
            const next = cas.find((c) => !lineage.includes(c) && c.subject !== undefined && c.subject === last.issuer && last.checkIssued(c))
            if (next === undefined) break
            lineage.push(next)
          }
          for (const [depth, certificate] of lineage.entries()) {
            const listed = revokedBy(certificate, crl.crls)
            if (listed === undefined) continue
            const where = `(listed in the CRL of ${Der.shortName(listed.issuer)} in ${config.crl})`
            return yield* configError(
              `certificate ${config.cert} (${nameOf(leaf!)}) ` +
                (depth === 0 ? `is revoked ${where}` : `was issued by ${nameOf(certificate)}, which is revoked ${where}`) +
                ": every peer that checks that CRL refuses it"
            )
          }
        }
        ownCertificate = leaf
        ownIssuers = issuers
        ownChain = chain.length > 0
      }
      credentials = { _tag: "X509", ca, cert, key }
      contextOptions = {
        ciphers: config.ciphers ?? X509_CIPHERS,
        // always a list: Node loads its public roots (and NODE_EXTRA_CA_CERTS) into a context without one
        ca: ca ?? [],
        // one text a CRL: Node reads only the first CRL of a text
        ...(crl !== undefined ? { crl: crl.pems } : {}),
        ...(cert !== undefined ? { cert, key } : {})
      }
      files = [config.ca, config.cert, config.key, config.crl].filter((f) => f !== undefined).join(", ")
    } else {
      return yield* configError("no credentials: give a PSK file or x509 certificates")
    }
    // OpenSSL's security level judges this side's certificate as the context takes it, in words of its own
    const own = ownCertificate
    const secureContext = yield* secureContextOf(
      contextOptions,
      config.ciphers === undefined ? files : `${files} with --tls-ciphers ${config.ciphers}`
    ).pipe(Effect.mapError((error) => {
      const problem = own === undefined ? undefined : securityLevelProblem(opensslReason(error.cause), own, ownChain)
      return problem === undefined ? error : configError(`certificate ${config.cert} (${nameOf(own!)}) ${problem}`, error.cause)
    }))
    // and a peer of this side's CA file judges its chain as OpenSSL does in every handshake (a name constraint of a CA
    // that issued it, a path length), from a handshake in memory: every peer refused it, this side's log only asking
    // "did the source refuse this destination's certificate?"
    if (own !== undefined && config.ca !== undefined) {
      const peer = yield* secureContextOf({ ciphers: contextOptions.ciphers, ca: contextOptions.ca }, files)
      const verdict = yield* ownChainVerdict(secureContext, peer)
      if (verdict !== undefined) {
        return yield* configError(
          `certificate ${config.cert} (${nameOf(own)}) ${verifyProblem(verdict, own, "server")}: a peer with the same ` +
            `CA file (${config.ca}) refuses it in every handshake`
        )
      }
    }
    return {
      credentials,
      secureContext,
      // (a secure context carries its own versions: a socket's are ignored when it is given one)
      writeOnlyContext: yield* secureContextOf({ ...contextOptions, maxVersion: "TLSv1.2" }, files),
      contextOptions,
      files,
      ownCertificate,
      ownCertificateFile: config.cert,
      ownIssuers,
      hostname,
      crls,
      // an x509 destination given a CRL file or an authorization list verifies its clients (checked against them)
      verifyPeer: config.verifyPeer ?? (x509 && (config.crl !== undefined || config.authz !== undefined) ? true : undefined),
      authz: config.authz,
      handshakeTimeout: config.handshakeTimeoutMs === undefined
        ? DEFAULT_HANDSHAKE_TIMEOUT
        : Duration.millis(config.handshakeTimeoutMs)
    }
  })

/**
 * Checks that the settings can secure a source's connections, before it connects: with a PSK file, that the
 * file has a key for the identity the source presents; with x509, that there is a CA file to verify the
 * destination (the public root CAs are never trusted) and that its certificate, if any, is for client
 * authentication. A `Config` error otherwise.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkClient = (settings: Settings): Effect.Effect<void, TlsError> =>
  Effect.suspend(() => {
    const bad = notSettings(settings, "checkClient")
    return bad === undefined ? TlsClient.checkClient(settings) : Effect.fail(bad)
  })

/**
 * Why `settings`, given to `what`, are no settings `load` made, if they are not: from plain JavaScript, a
 * `TlsConfig` given as it is (`Tls.checkClient({ psk: "keys.psk" })`) threw as it was called or died ("Cannot read
 * properties of undefined (reading '_tag')").
 */
const notSettings = (settings: unknown, what: string): TlsError | undefined => {
  const s = settings as { readonly credentials?: { readonly _tag?: unknown } } | null
  return typeof s === "object" && s !== null && typeof s.credentials === "object" && s.credentials !== null &&
      (s.credentials._tag === "Psk" || s.credentials._tag === "X509")
    ? undefined
    : configError(
      `${what} takes the settings Tls.load gives (yield* Tls.load(config)), not ${kindOf(settings)}`
    )
}

/** What a value of the wrong kind is, said in a message: `null`, `5`, `(an object)`. */
const kindOf = (u: unknown): string =>
  typeof u === "object" && u !== null ? "(an object)" : typeof u === "string" ? JSON.stringify(u) : String(u)

const NO_SERVER_CERTIFICATE = "an x509 destination needs a certificate of its own and its key (cert, key), which it " +
  "presents to every source: the CA file (ca) verifies the sources"

/**
 * Checks that the settings can secure a destination's connections, before it listens: with x509, that it has a
 * certificate (a CA file alone verifies clients, and presents nothing) and that it is for server authentication (a
 * `Config` error otherwise, naming the file). `server` does not check it on each connection.
 *
 * @since 0.1.0
 * @category utils
 */
export const checkServer = (settings: Settings): Effect.Effect<void, TlsError> =>
  Effect.suspend(() => {
    const bad = notSettings(settings, "checkServer")
    if (bad !== undefined) return Effect.fail(bad)
    // a TLS server presents a certificate: without one every handshake failed, each side blaming the other's
    if (settings.credentials._tag === "X509" && settings.credentials.cert === undefined) {
      return Effect.fail(configError(NO_SERVER_CERTIFICATE))
    }
    const own = settings.ownCertificate
    const problem = own === undefined ? undefined : ownRoleProblem(own, settings.ownIssuers ?? [], "server")
    return problem === undefined
      ? Effect.void
      : Effect.fail(configError(`certificate ${settings.ownCertificateFile} ${problem}`))
  })

const pskKey = (settings: Settings, identity: string): Buffer | undefined =>
  settings.credentials._tag === "Psk" &&
    (settings.authz === undefined || settings.authz.includes(identity))
    ? settings.credentials.keys.get(identity)
    : undefined

/**
 * The source side: a TLS client handshake on each connection. `host` is the default name to check; with x509
 * one of them (`host`, the settings' `hostname`) is needed, or the handshake fails `Config` before it starts
 * (without a name any certificate of the CA would pass for the destination).
 *
 * @since 0.1.0
 * @category handshakes
 */
export const client = (settings: Settings, host: string | undefined): Transport.Upgrade<TlsError> => {
  // from plain JavaScript, settings that `load` did not make threw as `client` was called (each handshake fails instead)
  const bad = notSettings(settings, "client")
  return bad === undefined ? TlsClient.client(settings, host) : () => Effect.fail(bad)
}

/**
 * What a source's handshake needs, as plain data (structured clone): a channel running on another thread
 * (`ChannelThreads`) does the same handshake there with a secure context of its own, built from the texts the
 * settings were loaded from (they were checked then). A PSK client carries the key of its identity only.
 *
 * @since 0.1.0
 * @category models
 */
export type ClientData = TlsClient.ClientData

/**
 * The data of an upgrade made by `client` (`undefined` for any other upgrade: a test's fault injection, say,
 * which only works in the thread it was made in).
 *
 * @since 0.1.0
 * @category handshakes
 */
export const clientData: (upgrade: Transport.Upgrade<Transport.UpgradeError>) => ClientData | undefined =
  TlsClient.clientData

/**
 * The source's handshake rebuilt from its data, in this thread (with a secure context of its own).
 *
 * @since 0.1.0
 * @category handshakes
 */
export const clientFromData = (data: ClientData): Effect.Effect<Transport.Upgrade<TlsError>, TlsError> =>
  Effect.suspend(() => {
    // from plain JavaScript, data that `clientData` did not give died ("Cannot read properties of null")
    const d = data as { readonly credentials?: unknown; readonly contextOptions?: unknown } | null
    return typeof d === "object" && d !== null && typeof d.credentials === "object" && d.credentials !== null &&
        typeof d.contextOptions === "object" && d.contextOptions !== null
      ? TlsClient.clientFromData(data)
      : Effect.fail(configError(`clientFromData takes what Tls.clientData gives, not ${kindOf(data)}`))
  })

/**
 * How the destination's handshakes treat their peers.
 *
 * @since 0.1.0
 * @category models
 */
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

/**
 * The destination side: a TLS server handshake on each accepted connection, then authorization.
 *
 * @since 0.1.0
 * @category handshakes
 */
export const server = (settings: Settings, options?: ServerOptions): Transport.Upgrade<TlsError> =>
  Handshake.withServerNote(serverHandshake(settings, options), unverifiedNote(settings))

/**
 * What a destination of `settings` says once as it starts, if anything: that it verifies no client although it has a CA
 * file (verifyPeer unset; one `TlsConfig` serves both roles, and a source's CA verifies its destination). It took any
 * client without a word, and looked verified.
 */
const unverifiedNote = (settings: Settings): string | undefined =>
  // settings that `load` did not make (plain JavaScript) fail the handshake (`notSettings`), noted or not
  notSettings(settings, "server") === undefined && settings.credentials._tag === "X509" && settings.credentials.ca !== undefined && settings.verifyPeer === undefined &&
    settings.authz === undefined && settings.crls === undefined
    ? "TLS: this destination verifies no client certificate: its x509 settings have a CA file (ca) but verifyPeer is " +
      "unset, so any client is admitted; give verifyPeer: true to verify clients against it, or false to say so"
    : undefined

const serverHandshake = (settings: Settings, options?: ServerOptions): Transport.Upgrade<TlsError> => (connection) =>
  Effect.gen(function*() {
    // from plain JavaScript, settings that `load` did not make died in the handshake ("Cannot read properties")
    const bad = notSettings(settings, "server")
    if (bad !== undefined) return yield* Effect.fail(bad)
    const creds = settings.credentials
    // a PSK identity outside the authorization list makes OpenSSL fail with an unrelated alert: remember it
    let refusedIdentity: string | undefined
    // the PSK identity admitted (the callback is not called on a session resumed with a ticket: refused below)
    let admittedIdentity: string | undefined
    // (a CRL or an authorization list verifies clients: `load` says so in `verifyPeer`, settings made otherwise may not)
    const verifyPeer = settings.verifyPeer ||
      (creds._tag === "X509" && (settings.authz !== undefined || settings.crls !== undefined))
    yield* open(connection)
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
                else admittedIdentity = identity
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
      (error) => {
        const text = describe(error)
        // (with nothing to present, OpenSSL finds no signature algorithm, or no cipher, for any x509 source)
        return creds._tag === "X509" && creds.cert === undefined && /no suitable signature algorithm|no shared cipher/.test(text)
          ? `${text} (this destination has no certificate: an x509 destination presents one to every source; give ` +
            "cert and key)"
          : hint(creds, text)
      },
      (s) => creds._tag === "X509" && verifyPeer ? clientRefusal(s, settings.authz, settings.crls) : undefined,
      // a Node source that refuses this side's certificate hangs up without an alert, before its Finished
      creds._tag === "X509"
        ? refusedOwnCertificate(settings, yield* Effect.sync(() => Date.now()))
        : undefined
    ).pipe(
      Effect.mapError((error) =>
        refusedIdentity === undefined ? error : new TlsError({
          reason: "Unauthorized",
          detail: `handshake with ${connection.peer}: PSK identity "${PeerText.fromPeer(refusedIdentity)}" ` +
            (creds._tag === "Psk" && creds.keys.has(refusedIdentity)
              ? "is not in the authorization list"
              : "has no key in this side's PSK file")
        })
      )
    )
    // a session resumed with a ticket skipped the PSK callback, where the authorization list is checked: a ticket
    // another destination of the same settings (another authz) gave, say, admitted an identity this one refuses
    if (creds._tag === "Psk" && admittedIdentity === undefined) {
      return yield* new TlsError({
        reason: "Unauthorized",
        detail: `handshake with ${connection.peer}: a resumed TLS session, which proves no PSK identity (the ` +
          "authorization list is checked on a full handshake only)"
      })
    }
    const secure = yield* secured(socket, connection.peer, true)
    // who the peer proved to be: its PSK identity, or its client certificate once its chain verified (the same
    // certificate, not only the same name: its fingerprint)
    const certificate = creds._tag === "X509" && verifyPeer ? peerCertificateOf(socket) : undefined
    const peerIdentity = admittedIdentity !== undefined
      ? `PSK identity ${JSON.stringify(admittedIdentity)}`
      : certificate !== undefined
      ? `certificate ${nameOf(certificate)} (SHA-256 ${certificate.fingerprint256})`
      : undefined
    return peerIdentity === undefined ? secure : { ...secure, peerIdentity }
  })

/**
 * TLS for a migration: the handshakes of both sides.
 *
 * @since 0.1.0
 * @category services
 */
export class Tls extends Context.Tag("effect-multifd/Tls")<Tls, {
  readonly settings: Settings
  /** The source's handshake; `host` is the address's host, the default name to check. */
  readonly client: (host: string | undefined) => Transport.Upgrade<TlsError>
  readonly server: Transport.Upgrade<TlsError>
}>() {}

/**
 * Builds the service from a config (reads the files it names).
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (config: TlsConfig): Effect.Effect<Tls["Type"], TlsError> =>
  Effect.map(load(config), (settings) => ({
    settings,
    client: (host) => client(settings, host),
    server: server(settings)
  }))

/**
 * A layer from a config given in code.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (config: TlsConfig): Layer.Layer<Tls, TlsError> => Layer.effect(Tls, make(config))

const optional = Field.optional

/**
 * A client certificate's subject as QEMU's tls-authz sees it (GnuTLS's `gnutls_x509_crt_get_dn`): RDNs in the
 * certificate's order, most general first, `,` between them, `+` within a multi-valued one, values escaped as
 * RFC 4514 says (`\,` `\+` `\"` `\\` `\<` `\>` `\;`, a leading `#` or space, a trailing space), attribute types by
 * GnuTLS's names (`C`, `O`, `OU`, `CN`, `EMAIL`, `UID`, `DC`, `surName`, ...). What an `authz` entry with `=` must
 * equal, e.g. `O=effect-multifd tests,CN=alice`. Throws on a certificate whose names cannot be read.
 *
 * @since 0.1.0
 * @category utils
 */
export const distinguishedName = (certificate: Crypto.X509Certificate): string => Der.namesOf(certificate.raw).subject

/**
 * An authorization list as the command line and `MULTIFD_TLS_AUTHZ` give it: CNs or PSK identities separated by
 * commas (`alice,bob`); a list that holds a distinguished name (an `=`) is separated by `;` instead, since a DN
 * holds commas (`O=Example,CN=alice;bob`). Blanks around entries are dropped, and so are empty entries; an
 * escaped `\;` inside a DN does not separate. Throws a `TlsError` (`Config`) on a value that is no string (from
 * plain JavaScript), as Schema's `decodeSync` throws its error.
 *
 * @since 0.1.0
 * @category utils
 */
export const parseAuthz = (text: string): Array<string> => {
  if (typeof text !== "string") throw configError(`parseAuthz takes a text (alice,bob), not ${kindOf(text)}`)
  const entries: Array<string> = []
  const separator = text.includes("=") ? ";" : ","
  let current = ""
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!
    if (c === "\\" && i + 1 < text.length) {
      current += c + text[++i]!
    } else if (c === separator) {
      entries.push(current)
      current = ""
    } else current += c
  }
  entries.push(current)
  return entries.map((entry) => entry.trim()).filter((entry) => entry.length > 0)
}

/**
 * The config from the environment: `MULTIFD_TLS_PSK`, `_IDENTITY`, `_CA`, `_CERT`, `_KEY`, `_CRL`, `_HOSTNAME`,
 * `_VERIFY_PEER`, `_AUTHZ` (comma-separated; `;`-separated when it holds a distinguished name: `parseAuthz`), `_CIPHERS` and `_HANDSHAKE_TIMEOUT_MS`, validated by `TlsConfig`. A bad value
 * is an `InvalidData` error at its variable with a one-line message (`MULTIFD_TLS_VERIFY_PEER: "maybe" is not
 * true or false`).
 *
 * @since 0.1.0
 * @category config
 */
export const config: Config.Config<TlsConfig> = Config.all({
  psk: optional(Config.string("PSK")),
  identity: optional(Config.string("IDENTITY")),
  ca: optional(Config.string("CA")),
  cert: optional(Config.string("CERT")),
  key: optional(Config.string("KEY")),
  crl: optional(Config.string("CRL")),
  hostname: optional(Config.string("HOSTNAME")),
  verifyPeer: optional(Field.field("VERIFY_PEER", Field.boolean)),
  authz: optional(Config.map(Config.string("AUTHZ"), parseAuthz)),
  ciphers: optional(Config.string("CIPHERS")),
  handshakeTimeoutMs: optional(Field.field("HANDSHAKE_TIMEOUT_MS", (text) => {
    const ms = Number(text)
    return !(text.length > 0 && Number.isFinite(ms) && ms > 0)
      ? Either.left(`must be a positive number of milliseconds, not ${JSON.stringify(text)}`)
      : ms > Transfer.MAX_TIMEOUT_MS
      ? Either.left(`must be at most ${Transfer.MAX_TIMEOUT_MS} milliseconds (24 days, the longest a timer waits), not ${JSON.stringify(text)}`)
      : Either.right(ms)
  }))
}).pipe(
  Config.nested("MULTIFD_TLS"),
  Config.mapOrFail((raw) =>
    Either.mapLeft(
      Schema.decodeUnknownEither(TlsConfig)(raw),
      (e) => {
        // every field is checked above: this names the first field the schema refuses, in one line
        const [first] = ParseResult.ArrayFormatter.formatErrorSync(e)
        return ConfigError.InvalidData(["MULTIFD_TLS", ...(first?.path ?? []).map(String)], first?.message ?? "invalid")
      }
    )
  )
)

/**
 * A layer from the environment (see `config`). A bad variable is a `TlsError` of reason `Config` naming it in one
 * line (`TLS configuration: MULTIFD_TLS_HANDSHAKE_TIMEOUT_MS: must be a positive number of milliseconds, not "-5"`).
  *
 * @since 0.1.0
 * @category layers
 */
export const layerConfig: Layer.Layer<Tls, TlsError> = Layer.effect(
  Tls,
  Effect.flatMap(Effect.mapError(config, (error) => configError(Field.describe(error), error)), make)
)
