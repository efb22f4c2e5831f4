/**
 * The keyUsage extension of an X.509 certificate (RFC 5280 §4.2.1.3), which Node's `X509Certificate` does
 * not expose (its `keyUsage` is the extended key usage): a minimal DER walk to the extension.
 *
 * @internal
 */

/** keyUsage bit 0: the key may sign (TLS CertificateVerify). */
export const DIGITAL_SIGNATURE = 1 << 0

interface Tlv {
  readonly tag: number
  readonly start: number
  readonly end: number
}

/** keyUsage's object identifier, 2.5.29.15, as DER content bytes. */
const KEY_USAGE_OID = [0x55, 0x1d, 0x0f]

/**
 * The keyUsage bits of a DER certificate (bit i of the result is the extension's bit i: `DIGITAL_SIGNATURE`
 * is bit 0), or `undefined` when the certificate has no such extension. Throws on malformed DER (callers
 * pass certificates that OpenSSL has already parsed).
 */
export const keyUsageOf = (der: Uint8Array): number | undefined => {
  const tlv = (at: number, end: number): Tlv => {
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
    return { tag, start, end: start + length }
  }
  const children = (parent: Tlv): Array<Tlv> => {
    const out: Array<Tlv> = []
    for (let at = parent.start; at < parent.end;) {
      const child = tlv(at, parent.end)
      out.push(child)
      at = child.end
    }
    return out
  }
  // Certificate ::= SEQUENCE { tbsCertificate, ... }; the extensions are tbsCertificate's [3]
  const tbs = children(tlv(0, der.length))[0]
  if (tbs === undefined) throw new Error("no tbsCertificate")
  const explicit = children(tbs).find((c) => c.tag === 0xa3)
  if (explicit === undefined) return undefined
  const list = children(explicit)[0]
  if (list === undefined) return undefined
  for (const extension of children(list)) {
    // Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
    const parts = children(extension)
    const oid = parts[0]
    const value = parts.at(-1)
    if (oid === undefined || value === undefined || oid.tag !== 0x06) continue
    if (oid.end - oid.start !== KEY_USAGE_OID.length || KEY_USAGE_OID.some((b, i) => der[oid.start + i] !== b)) continue
    const bits = tlv(value.start, value.end) // KeyUsage ::= BIT STRING
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
