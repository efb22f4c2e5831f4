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
  if ((tag & 0x1f) === 0x1f) throw new Error("a DER tag of the high-tag-number form")
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
 * How GnuTLS 3.7 writes an attribute type and reads its value (lib/x509/common.c `_oid2str`): its name (none: the
 * OID is written), and how its value is decoded: `directory` a DirectoryString (teletexString, printableString,
 * universalString, utf8String or bmpString), `challenge` PKCS #9's challengePassword (printableString or
 * utf8String), or the one DER tag it must have. Attribute types not listed are written as their OID and `#` and
 * the hex of the whole DER value.
 */
const ATTRIBUTE_TYPES: Record<string, { readonly name?: string; readonly value: "directory" | "challenge" | number }> = {
  "1.3.6.1.5.5.7.9.2": { name: "placeOfBirth", value: "directory" },
  "1.3.6.1.5.5.7.9.3": { name: "gender", value: 0x13 },
  "1.3.6.1.5.5.7.9.4": { name: "countryOfCitizenship", value: 0x13 },
  "1.3.6.1.5.5.7.9.5": { name: "countryOfResidence", value: 0x13 },
  "2.5.4.6": { name: "C", value: 0x13 },
  "2.5.4.9": { name: "street", value: "directory" },
  "2.5.4.12": { name: "title", value: "directory" },
  "2.5.4.10": { name: "O", value: "directory" },
  "2.5.4.11": { name: "OU", value: "directory" },
  "2.5.4.3": { name: "CN", value: "directory" },
  "2.5.4.7": { name: "L", value: "directory" },
  "2.5.4.8": { name: "ST", value: "directory" },
  "2.5.4.13": { name: "description", value: "directory" },
  "2.5.4.5": { name: "serialNumber", value: 0x13 },
  "2.5.4.20": { name: "telephoneNumber", value: 0x13 },
  "2.5.4.4": { name: "surName", value: "directory" },
  "2.5.4.43": { name: "initials", value: "directory" },
  "2.5.4.44": { name: "generationQualifier", value: "directory" },
  "2.5.4.42": { name: "givenName", value: "directory" },
  "2.5.4.65": { name: "pseudonym", value: "directory" },
  "2.5.4.46": { name: "dnQualifier", value: 0x13 },
  "2.5.4.17": { name: "postalCode", value: "directory" },
  "2.5.4.41": { name: "name", value: "directory" },
  "2.5.4.15": { name: "businessCategory", value: "directory" },
  "0.9.2342.19200300.100.1.25": { name: "DC", value: 0x16 },
  "0.9.2342.19200300.100.1.1": { name: "UID", value: "directory" },
  "1.2.840.113556.1.4.656": { name: "userPrincipalName", value: "directory" },
  "1.3.6.1.4.1.311.60.2.1.1": { name: "jurisdictionOfIncorporationLocalityName", value: "directory" },
  "1.3.6.1.4.1.311.60.2.1.2": { name: "jurisdictionOfIncorporationStateOrProvinceName", value: "directory" },
  "1.3.6.1.4.1.311.60.2.1.3": { name: "jurisdictionOfIncorporationCountryName", value: 0x13 },
  "1.2.840.113549.1.9.1": { name: "EMAIL", value: 0x16 },
  "1.2.840.113549.1.9.7": { value: "challenge" },
  "1.2.840.113549.1.9.20": { value: 0x1e },
  "1.2.840.113549.1.9.21": { value: 0x04 },
  "1.2.840.113549.1.9.4": { value: 0x04 },
  "1.3.6.1.5.5.7.8.5": { name: "XmppAddr", value: 0x0c },
  "1.2.643.100.1": { name: "OGRN", value: 0x12 },
  "1.2.643.100.3": { name: "SNILS", value: 0x12 },
  "1.2.643.100.5": { name: "OGRNIP", value: 0x12 },
  "1.2.643.3.131.1.1": { name: "INN", value: 0x12 }
}

/** GnuTLS's names of attribute types (`ATTRIBUTE_TYPES`), by their letters in lower case. */
const WRITTEN_NAMES = new Map(
  Object.values(ATTRIBUTE_TYPES).flatMap((t) => t.name === undefined ? [] : [[t.name.toLowerCase(), t.name] as const])
)

/** OpenSSL's long and short names of attribute types (`openssl x509 -subject` writes them) GnuTLS writes otherwise. */
const OPENSSL_NAMES: Record<string, string> = {
  commonname: "CN",
  countryname: "C",
  organizationname: "O",
  organizationalunitname: "OU",
  localityname: "L",
  stateorprovincename: "ST",
  streetaddress: "street",
  emailaddress: "EMAIL",
  domaincomponent: "DC",
  userid: "UID",
  sn: "surName",
  gn: "givenName"
}

/**
 * A distinguished name as an `authz` entry gives it, written as GnuTLS writes every name (`nameOf`), or `undefined`
 * when it already is: attribute types by GnuTLS's names, in its letter case (`cn`, `commonName` and `2.5.4.3` are
 * `CN`, `emailAddress` is `EMAIL`), with no blanks around them or around values (GnuTLS writes none unescaped: `O =
 * Example, CN = alice`, as `openssl x509 -subject` prints a name, is `O=Example,CN=alice`). A type it has no name for
 * stays as given (an OID is written as such). An entry that is not its own GnuTLS form can match no certificate.
 */
export const asGnutlsWrites = (entry: string): string | undefined => {
  const written = entry.split(/(?<!\\),/).map((rdn) =>
    rdn.split(/(?<!\\)\+/).map((attribute) => {
      const at = attribute.indexOf("=")
      if (at < 0) return attribute
      const type = attribute.slice(0, at).trim()
      const value = attribute.slice(at + 1).replace(/^ +/, "").replace(/(?<!\\) +$/, "")
      const named = WRITTEN_NAMES.get(type.toLowerCase()) ?? OPENSSL_NAMES[type.toLowerCase()] ??
        ATTRIBUTE_TYPES[type]?.name ?? type
      return `${named}=${value}`
    }).join("+")
  ).join(",")
  return written === entry ? undefined : written
}

const DIRECTORY_STRINGS = [0x14, 0x13, 0x1c, 0x0c, 0x1e]
const CHALLENGE_STRINGS = [0x13, 0x0c]

// ignoreBOM: a leading U+FEFF is part of the value, as GnuTLS writes it
const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true })
const utf16 = new TextDecoder("utf-16be", { fatal: true, ignoreBOM: true })

/**
 * The text of a value GnuTLS writes as text: its bytes, which GnuTLS writes as they are (no UTF-8 check). A
 * string whose bytes are no UTF-8 is refused (throws): no entry given as text could match it.
 */
const textOf = (bytes: Uint8Array): string => {
  try {
    return utf8.decode(bytes)
  } catch {
    throw new Error("an attribute value that is not UTF-8")
  }
}

/**
 * An attribute value as GnuTLS's `_gnutls_x509_dn_to_string` writes it: a string of the type the attribute
 * type allows as its text (a BMPString as UTF-8; a TeletexString of printable ASCII only, a UniversalString
 * never, a BMPString that is no UTF-16 as `#` and the hex of their content), escaped (`escapeValue`, so such a
 * hex is written `\#...`); a value of an unknown type, of a type the attribute type does not allow, empty (for
 * a one-type attribute) or holding a NUL as `#` and the hex of its whole DER, unescaped. Throws where GnuTLS
 * fails to write the name (an empty DirectoryString, a NUL in an OCTET STRING), or on bytes that are no UTF-8.
 */
const valueOf = (der: Uint8Array, oid: string, value: Tlv): string => {
  const whole = `#${hex(der, value.at, value.end)}`
  const type = ATTRIBUTE_TYPES[oid]
  if (type === undefined) return whole
  const allowed = type.value === "directory"
    ? DIRECTORY_STRINGS
    : type.value === "challenge"
    ? CHALLENGE_STRINGS
    : [type.value]
  if (!allowed.includes(value.tag)) return whole
  const bytes = der.subarray(value.start, value.end)
  if (bytes.length === 0) {
    // a DirectoryString (of SIZE (1..MAX)) does not decode, and GnuTLS gives up the name; a one-type value is hex
    if (typeof type.value === "number") return whole
    throw new Error("an empty attribute value")
  }
  const contentHex = `#${hex(der, value.start, value.end)}`
  let text: string
  switch (value.tag) {
    case 0x14: // TeletexString: as it is when all printable ASCII
      text = bytes.every((b) => b >= 0x20 && b <= 0x7e) ? textOf(bytes) : contentHex
      break
    case 0x1c: // UniversalString: always hex
      text = contentHex
      break
    case 0x1e: // BMPString: UTF-16 (an odd last byte ignored, one last U+0000 dropped), or hex if it is not
      try {
        text = utf16.decode(bytes.subarray(0, bytes.length & ~1)).replace(/\u0000$/, "")
      } catch {
        text = contentHex
      }
      break
    case 0x04: // OCTET STRING: its bytes; a NUL fails GnuTLS's escaping, and the name with it
      if (bytes.includes(0)) throw new Error("an OCTET STRING attribute value holding a NUL")
      return escapeValue(textOf(bytes))
    default: // UTF8String, PrintableString, IA5String, NumericString: their bytes
      if (bytes.includes(0)) return whole
      text = textOf(bytes)
  }
  // GnuTLS refuses strings holding a NUL, and writes them as unknown
  return text.includes("\u0000") ? whole : escapeValue(text)
}

/**
 * A DER Name (RDNSequence) as GnuTLS's `gnutls_x509_crt_get_dn` writes it, which QEMU's tls-authz matches: the
 * RDNs in the certificate's order (most general first: `C=GB,O=Example,CN=alice`; GnuTLS keeps this pre-RFC 4514
 * order for compatibility), joined by `,`; the attributes of a multi-valued RDN joined by `+`; values escaped
 * (`escapeValue`); each attribute as `valueOf` writes it, its type by GnuTLS's name for it or as its OID.
 */
const formatName = (der: Uint8Array, name: Tlv): string =>
  children(der, name).map((rdn) =>
    children(der, rdn).map((attribute) => {
      const [type, value] = children(der, attribute)
      const oid = oidOf(der, need(type, 0x06, "attribute type"))
      if (value === undefined) throw new Error("attribute value missing")
      return `${ATTRIBUTE_TYPES[oid]?.name ?? oid}=${valueOf(der, oid, value)}`
    }).join("+")
  ).join(",")

/** A DER Name as GnuTLS writes it (`formatName`). Throws where GnuTLS would fail to write it, or on malformed DER. */
export const nameOf = (der: Uint8Array): string => {
  const name = need(tlv(der, 0, der.length), 0x30, "Name")
  if (name.end !== der.length) throw new Error("bytes after the Name")
  return formatName(der, name)
}

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
  /**
   * How its issuingDistributionPoint extension limits the certificates it covers, as RFC 5280 names the fields
   * (`onlyContainsUserCerts`, `onlyContainsCACerts`, `onlySomeReasons`, `indirectCRL`,
   * `onlyContainsAttributeCerts`); empty for a CRL of all the CA's certificates.
   */
  readonly scope: ReadonlyArray<string>
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

const ISSUING_DISTRIBUTION_POINT = "2.5.29.28"

/** The fields of IssuingDistributionPoint that limit a CRL's scope, by their context tags (RFC 5280 §5.2.5). */
const SCOPE_FIELDS: Record<number, string> = {
  0x81: "onlyContainsUserCerts",
  0x82: "onlyContainsCACerts",
  0x83: "onlySomeReasons",
  0x84: "indirectCRL",
  0x85: "onlyContainsAttributeCerts"
}

/**
 * The scope limits of an issuingDistributionPoint extension's value (its extnValue OCTET STRING): each BOOLEAN
 * field that is TRUE, and onlySomeReasons when present. IssuingDistributionPoint ::= SEQUENCE {
 * distributionPoint [0], onlyContainsUserCerts [1] BOOLEAN, onlyContainsCACerts [2] BOOLEAN, onlySomeReasons [3]
 * ReasonFlags, indirectCRL [4] BOOLEAN, onlyContainsAttributeCerts [5] BOOLEAN } (IMPLICIT tags).
 */
const scopeOf = (der: Uint8Array, extnValue: Tlv): Array<string> =>
  children(der, need(tlv(der, extnValue.start, extnValue.end), 0x30, "IssuingDistributionPoint")).flatMap((field) => {
    const name = SCOPE_FIELDS[field.tag]
    if (name === undefined) return []
    const isTrue = field.tag === 0x83 || (field.end > field.start && der[field.start] !== 0)
    return isTrue ? [name] : []
  })

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
  const scope: Array<string> = []
  if (fields[i]?.tag === 0xa0) {
    for (const extension of children(der, need(children(der, fields[i]!)[0], 0x30, "crlExtensions"))) {
      const parts = children(der, need(extension, 0x30, "extension"))
      const [id, second] = parts
      const oid = oidOf(der, need(id, 0x06, "extension OID"))
      extensions.push({ oid, critical: second?.tag === 0x01 && second.end > second.start && der[second.start] !== 0 })
      if (oid === ISSUING_DISTRIBUTION_POINT) scope.push(...scopeOf(der, need(parts.at(-1), 0x04, "extnValue")))
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
    scope,
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
/** keyUsage bit 5: the key may sign certificates (a CA's). */
export const KEY_CERT_SIGN = 1 << 5
/** keyUsage bit 6: the key may sign CRLs (a CRL's issuer, as OpenSSL checks it). */
export const CRL_SIGN = 1 << 6

/** The value (the OCTET STRING's content) of a DER certificate's extension `oid`, or `undefined` without one. */
const extensionOf = (der: Uint8Array, oid: string): Tlv | undefined => {
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
    const id = parts[0]
    const value = parts.at(-1)
    if (id === undefined || value === undefined || id.tag !== 0x06 || oidOf(der, id) !== oid) continue
    return tlv(der, value.start, value.end)
  }
  return undefined
}

/**
 * The certificate extensions OpenSSL's verification handles (`X509_supported_extension` in crypto/x509/v3_purp.c):
 * nsCertType, keyUsage, subjectAltName, basicConstraints, certificatePolicies, cRLDistributionPoints,
 * extendedKeyUsage, the RFC 3779 address and AS blocks, OCSP noCheck, policyConstraints, proxyCertInfo,
 * nameConstraints, policyMappings, inhibitAnyPolicy.
 */
const HANDLED_EXTENSIONS = new Set([
  "2.16.840.1.113730.1.1",
  "2.5.29.15",
  "2.5.29.17",
  "2.5.29.19",
  "2.5.29.32",
  "2.5.29.31",
  "2.5.29.37",
  "1.3.6.1.5.5.7.1.7",
  "1.3.6.1.5.5.7.1.8",
  "1.3.6.1.5.5.7.48.1.5",
  "2.5.29.36",
  "1.3.6.1.5.5.7.1.14",
  "2.5.29.30",
  "2.5.29.33",
  "2.5.29.54"
])

/**
 * The OID of the first critical extension of a DER certificate that OpenSSL's verification does not handle, or
 * `undefined`: RFC 5280 §4.2 has a verifier refuse such a certificate, and OpenSSL refuses every chain that holds it
 * ("unhandled critical extension"), as GnuTLS does. Throws on malformed DER.
 */
export const unhandledCriticalExtensionOf = (der: Uint8Array): string | undefined => {
  const tbs = children(der, tlv(der, 0, der.length))[0]
  if (tbs === undefined) throw new Error("no tbsCertificate")
  const explicit = children(der, tbs).find((c) => c.tag === 0xa3)
  const list = explicit === undefined ? undefined : children(der, explicit)[0]
  if (list === undefined) return undefined
  for (const extension of children(der, list)) {
    // Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
    const [id, critical] = children(der, extension)
    if (id === undefined || id.tag !== 0x06) throw new Error("an extension without its OID")
    const oid = oidOf(der, id)
    if (critical?.tag === 0x01 && critical.end > critical.start && der[critical.start] !== 0 && !HANDLED_EXTENSIONS.has(oid)) {
      return oid
    }
  }
  return undefined
}

/**
 * The keyUsage bits of a DER certificate (RFC 5280 §4.2.1.3; bit i of the result is the extension's bit i:
 * `DIGITAL_SIGNATURE` is bit 0), or `undefined` when the certificate has no such extension. Throws on malformed
 * DER (callers pass certificates that OpenSSL has already parsed).
 */
export const keyUsageOf = (der: Uint8Array): number | undefined => {
  const bits = extensionOf(der, "2.5.29.15") // KeyUsage ::= BIT STRING
  if (bits === undefined) return undefined
  if (bits.tag !== 0x03 || bits.end <= bits.start) throw new Error("keyUsage is not a BIT STRING")
  let result = 0
  // the first content byte counts the unused bits of the last byte; bit 0 is the first byte's top bit
  for (let i = 0; i < (bits.end - bits.start - 1) * 8 && i < 31; i++) {
    if (der[bits.start + 1 + (i >> 3)]! & (0x80 >> (i & 7))) result |= 1 << i
  }
  return result
}

/**
 * Whether a DER certificate's basicConstraints say CA:TRUE (RFC 5280 §4.2.1.9): `false` with CA:FALSE or without
 * the extension. Throws on malformed DER.
 */
export const isCaOf = (der: Uint8Array): boolean => {
  const constraints = extensionOf(der, "2.5.29.19") // BasicConstraints ::= SEQUENCE { cA BOOLEAN DEFAULT FALSE, ... }
  if (constraints === undefined) return false
  if (constraints.tag !== 0x30) throw new Error("basicConstraints is not a SEQUENCE")
  const first = children(der, constraints)[0]
  return first !== undefined && first.tag === 0x01 && first.end > first.start && der[first.start] !== 0
}
