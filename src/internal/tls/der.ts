/**
 * What Node's `X509Certificate` does not give, read from DER: a certificate's subject and issuer names written
 * as QEMU's GnuTLS writes them (`gnutls_x509_crt_get_dn`, which QEMU's tls-authz matches), a certificate's
 * keyUsage extension (Node's `keyUsage` is the extended key usage), and certificate revocation lists (issuer,
 * dates, revoked serial numbers, signature). A minimal DER walk; malformed input throws (callers turn that into
 * a `Config` error or a refusal).
 *
 * @internal
 */
import * as Crypto from "node:crypto"
import * as PeerText from "../peerText.js"

interface Tlv {
  readonly tag: number
  readonly at: number
  readonly start: number
  readonly end: number
}

const tlv = (der: Uint8Array, at: number, end: number): Tlv => {
  if (at + 2 > end) throw new Error("truncated DER")
  const tag = der[at]!
  let length = der[at + 1]!
  let start = at + 2
  if (length & 0x80) {
    const n = length & 0x7f
    if (n === 0 || n > 4 || start + n > end) throw new Error("bad DER length")
    length = 0
    for (let i = 0; i < n; i++) length = length * 256 + der[start + i]!
    start += n
  }
  if (start + length > end) throw new Error("truncated DER")
  return { tag, at, start, end: start + length }
}

const children = (der: Uint8Array, parent: Tlv): Array<Tlv> => {
  const out: Array<Tlv> = []
  for (let at = parent.start; at < parent.end;) {
    const child = tlv(der, at, parent.end)
    out.push(child)
    at = child.end
  }
  return out
}

const need = (t: Tlv | undefined, tag: number, what: string): Tlv => {
  if (t === undefined || t.tag !== tag) throw new Error(`${what} missing`)
  return t
}

const oidOf = (der: Uint8Array, t: Tlv): string => {
  const parts: Array<number> = []
  let value = 0
  for (let i = t.start; i < t.end; i++) {
    value = value * 128 + (der[i]! & 0x7f)
    if ((der[i]! & 0x80) === 0) {
      if (parts.length === 0) parts.push(value < 80 ? Math.floor(value / 40) : 2, value < 80 ? value % 40 : value - 80)
      else parts.push(value)
      value = 0
    }
  }
  return parts.join(".")
}

const hex = (der: Uint8Array, start: number, end: number) => Buffer.from(der.subarray(start, end)).toString("hex")

/** GnuTLS's names of attribute types (as QEMU 10.0.2 printed them); others are written as their OID. */
const ATTRIBUTE_NAMES: Record<string, string> = {
  "2.5.4.3": "CN",
  "2.5.4.4": "surName",
  "2.5.4.5": "serialNumber",
  "2.5.4.6": "C",
  "2.5.4.7": "L",
  "2.5.4.8": "ST",
  "2.5.4.9": "street",
  "2.5.4.10": "O",
  "2.5.4.11": "OU",
  "2.5.4.12": "title",
  "2.5.4.41": "name",
  "2.5.4.42": "givenName",
  "2.5.4.43": "initials",
  "2.5.4.44": "generationQualifier",
  "2.5.4.46": "dnQualifier",
  "2.5.4.65": "pseudonym",
  "0.9.2342.19200300.100.1.25": "DC",
  "0.9.2342.19200300.100.1.1": "UID",
  "1.2.840.113549.1.9.1": "EMAIL"
}

/** The text of a directory string, or `undefined` for a type that is written as hex. */
const stringOf = (der: Uint8Array, t: Tlv): string | undefined => {
  const bytes = Buffer.from(der.subarray(t.start, t.end))
  switch (t.tag) {
    case 0x0c: // UTF8String
      return bytes.toString("utf8")
    case 0x12: // NumericString
    case 0x13: // PrintableString
    case 0x16: // IA5String
    case 0x1a: // VisibleString
    case 0x14: // TeletexString (as Latin-1)
      return bytes.toString("latin1")
    case 0x1e: { // BMPString: UCS-2, big-endian
      let text = ""
      for (let i = 0; i + 1 < bytes.length; i += 2) text += String.fromCharCode(bytes.readUInt16BE(i))
      return text
    }
    case 0x1c: { // UniversalString: UCS-4, big-endian
      let text = ""
      for (let i = 0; i + 3 < bytes.length; i += 4) text += String.fromCodePoint(bytes.readUInt32BE(i))
      return text
    }
    default:
      return undefined
  }
}

/**
 * A value escaped as GnuTLS escapes it (RFC 4514): `,` `+` `"` `\` `<` `>` `;` always, `#` or a space first,
 * a space last. So a value can never pass for more of the name: CN `alice,O=x` is written `CN=alice\,O=x`.
 */
export const escapeValue = (value: string): string => {
  let out = ""
  const chars = Array.from(value)
  chars.forEach((c, i) => {
    if (",+\"\\<>;".includes(c) || (i === 0 && (c === "#" || c === " ")) || (i === chars.length - 1 && c === " ")) out += "\\"
    out += c
  })
  return out
}

/**
 * A DER Name (RDNSequence) as GnuTLS's `gnutls_x509_crt_get_dn` writes it, which QEMU's tls-authz matches: the
 * RDNs in the certificate's order (most general first: `C=GB,O=Example,CN=alice`; GnuTLS keeps this pre-RFC 4514
 * order for compatibility), joined by `,`; the attributes of a multi-valued RDN joined by `+`; values escaped
 * (`escapeValue`); an attribute type GnuTLS has no name for as its OID, a value of an unknown string type as
 * `#` and the hex of its DER.
 */
const formatName = (der: Uint8Array, name: Tlv): string =>
  children(der, name).map((rdn) =>
    children(der, rdn).map((attribute) => {
      const [type, value] = children(der, attribute)
      const oid = oidOf(der, need(type, 0x06, "attribute type"))
      if (value === undefined) throw new Error("attribute value missing")
      const text = stringOf(der, value)
      return `${ATTRIBUTE_NAMES[oid] ?? oid}=${text === undefined ? `#${hex(der, value.at, value.end)}` : escapeValue(text)}`
    }).join("+")
  ).join(",")

/** `CN=x` of a name as `namesOf` writes it (its last CN), or the whole name, for messages (printable). */
export const shortName = (dn: string): string =>
  PeerText.fromPeer(dn.split(/(?<!\\),/).reverse().find((rdn) => rdn.startsWith("CN=")) ?? dn)

/** A certificate's subject and issuer as GnuTLS writes them (see `formatName`). */
export const namesOf = (certificate: Uint8Array): { readonly subject: string; readonly issuer: string } => {
  const tbs = need(children(certificate, tlv(certificate, 0, certificate.length))[0], 0x30, "tbsCertificate")
  const fields = children(certificate, tbs)
  // [0] version, serialNumber, signature, issuer, validity, subject
  const at = fields[0]?.tag === 0xa0 ? 1 : 0
  return {
    issuer: formatName(certificate, need(fields[at + 2], 0x30, "issuer")),
    subject: formatName(certificate, need(fields[at + 4], 0x30, "subject"))
  }
}

/** A certificate revocation list, as far as this side checks it. */
export interface Crl {
  /** The issuer, as `namesOf` writes names. */
  readonly issuer: string
  readonly thisUpdate: Date
  readonly nextUpdate: Date | undefined
  /** The serial numbers it revokes, as upper-case hex without leading zeros (as `X509Certificate.serialNumber`). */
  readonly revoked: ReadonlyArray<string>
  /** Its extensions (crlExtensions): OID and criticality. */
  readonly extensions: ReadonlyArray<{ readonly oid: string; readonly critical: boolean }>
  /** Whether `publicKey` signed it. */
  readonly signedBy: (publicKey: Crypto.KeyObject) => boolean
}

const timeOf = (der: Uint8Array, t: Tlv): Date => {
  const text = Buffer.from(der.subarray(t.start, t.end)).toString("latin1")
  const m = t.tag === 0x17
    ? /^(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(text)
    : t.tag === 0x18
    ? /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(text)
    : null
  if (m === null) throw new Error("bad time")
  const year = t.tag === 0x17 ? (Number(m[1]) < 50 ? 2000 : 1900) + Number(m[1]) : Number(m[1])
  return new Date(Date.UTC(year, Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6])))
}

/** Node's digest names for the signature algorithms of certificates and CRLs (`null`: the algorithm has its own). */
const SIGNATURE_DIGESTS: Record<string, string | null> = {
  "1.2.840.10045.4.1": "sha1",
  "1.2.840.10045.4.3.1": "sha224",
  "1.2.840.10045.4.3.2": "sha256",
  "1.2.840.10045.4.3.3": "sha384",
  "1.2.840.10045.4.3.4": "sha512",
  "1.2.840.113549.1.1.5": "sha1",
  "1.2.840.113549.1.1.14": "sha224",
  "1.2.840.113549.1.1.11": "sha256",
  "1.2.840.113549.1.1.12": "sha384",
  "1.2.840.113549.1.1.13": "sha512",
  "1.3.101.112": null, // Ed25519
  "1.3.101.113": null // Ed448
}

/** Parses one DER CRL (RFC 5280 §5.1). Throws on what it cannot read, or a signature algorithm it cannot check. */
export const parseCrl = (der: Uint8Array): Crl => {
  const [tbs, algorithm, signature] = children(der, need(tlv(der, 0, der.length), 0x30, "CertificateList"))
  need(tbs, 0x30, "tbsCertList")
  const fields = children(der, tbs!)
  // version (INTEGER, optional), signature, issuer, thisUpdate, nextUpdate (optional), revokedCertificates (optional)
  let i = fields[0]?.tag === 0x02 ? 1 : 0
  i++ // signature algorithm (the outer one is checked)
  const issuer = formatName(der, need(fields[i++], 0x30, "issuer"))
  const thisUpdateField = fields[i++]
  if (thisUpdateField === undefined) throw new Error("thisUpdate missing")
  const thisUpdate = timeOf(der, thisUpdateField)
  const nextUpdate = fields[i] !== undefined && (fields[i]!.tag === 0x17 || fields[i]!.tag === 0x18)
    ? timeOf(der, fields[i++]!)
    : undefined
  const revoked: Array<string> = []
  if (fields[i]?.tag === 0x30) {
    for (const entry of children(der, fields[i]!)) {
      const serial = need(children(der, entry)[0], 0x02, "serial number")
      revoked.push(hex(der, serial.start, serial.end).replace(/^(00)+(?=.)/, "").toUpperCase())
    }
    i++
  }
  // crlExtensions [0] EXPLICIT Extensions; Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }
  const extensions: Array<{ oid: string; critical: boolean }> = []
  if (fields[i]?.tag === 0xa0) {
    for (const extension of children(der, need(children(der, fields[i]!)[0], 0x30, "crlExtensions"))) {
      const [id, second] = children(der, need(extension, 0x30, "extension"))
      extensions.push({
        oid: oidOf(der, need(id, 0x06, "extension OID")),
        critical: second?.tag === 0x01 && second.end > second.start && der[second.start] !== 0
      })
    }
  }
  const oid = oidOf(der, need(children(der, need(algorithm, 0x30, "signatureAlgorithm"))[0], 0x06, "algorithm"))
  if (!(oid in SIGNATURE_DIGESTS)) throw new Error(`a signature algorithm this side cannot check (OID ${oid})`)
  const bits = need(signature, 0x03, "signature")
  const tbsBytes = der.subarray(tbs!.at, tbs!.end)
  const signatureBytes = der.subarray(bits.start + 1, bits.end) // after the count of unused bits
  return {
    issuer,
    thisUpdate,
    nextUpdate,
    revoked,
    extensions,
    signedBy: (publicKey) => {
      try {
        return Crypto.verify(SIGNATURE_DIGESTS[oid] ?? null, tbsBytes, publicKey, signatureBytes)
      } catch {
        return false
      }
    }
  }
}

/** keyUsage bit 0: the key may sign (TLS CertificateVerify). */
export const DIGITAL_SIGNATURE = 1 << 0

/**
 * The keyUsage bits of a DER certificate (RFC 5280 §4.2.1.3; bit i of the result is the extension's bit i:
 * `DIGITAL_SIGNATURE` is bit 0), or `undefined` when the certificate has no such extension. Throws on malformed
 * DER (callers pass certificates that OpenSSL has already parsed).
 */
export const keyUsageOf = (der: Uint8Array): number | undefined => {
  // Certificate ::= SEQUENCE { tbsCertificate, ... }; the extensions are tbsCertificate's [3]
  const tbs = children(der, tlv(der, 0, der.length))[0]
  if (tbs === undefined) throw new Error("no tbsCertificate")
  const explicit = children(der, tbs).find((c) => c.tag === 0xa3)
  if (explicit === undefined) return undefined
  const list = children(der, explicit)[0]
  if (list === undefined) return undefined
  for (const extension of children(der, list)) {
    // Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
    const parts = children(der, extension)
    const oid = parts[0]
    const value = parts.at(-1)
    if (oid === undefined || value === undefined || oid.tag !== 0x06 || oidOf(der, oid) !== "2.5.29.15") continue
    const bits = tlv(der, value.start, value.end) // KeyUsage ::= BIT STRING
    if (bits.tag !== 0x03 || bits.end <= bits.start) throw new Error("keyUsage is not a BIT STRING")
    let result = 0
    // the first content byte counts the unused bits of the last byte; bit 0 is the first byte's top bit
    for (let i = 0; i < (bits.end - bits.start - 1) * 8 && i < 31; i++) {
      if (der[bits.start + 1 + (i >> 3)]! & (0x80 >> (i & 7))) result |= 1 << i
    }
    return result
  }
  return undefined
}
