/**
 * TLS's model: its error, loaded credentials and the settings every handshake uses (re-exported by `Tls`).
 *
 * @internal
 */
import * as Data from "effect/Data"
import type * as Duration from "effect/Duration"
import type * as Crypto from "node:crypto"
import type * as NodeTls from "node:tls"

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

/** A CRL this side loaded, as far as messages need it. */
export interface CrlInfo {
  /** Its issuer, as `namesOf` (GnuTLS) writes names. */
  readonly issuer: string
  /** The serial numbers it revokes, upper-case hex without leading zeros. */
  readonly revoked: ReadonlyArray<string>
}

/** Everything a handshake needs. */
export interface Settings {
  readonly credentials: Credentials
  /** Built once from the credentials (checked at load): every handshake, on either side, reuses it. */
  readonly secureContext: NodeTls.SecureContext
  /** The same, limited to TLS 1.2: for peers that never read (`ServerOptions.writeOnlyPeers`). */
  readonly writeOnlyContext: NodeTls.SecureContext
  /**
   * What `secureContext` was built from (PEM texts and cipher lists, checked at load): another thread builds
   * its own from it (a secure context cannot cross threads).
   */
  readonly contextOptions: NodeTls.SecureContextOptions
  /** The files the credentials came from, for messages. */
  readonly files: string
  /** This side's certificate (x509 with a certificate), for messages. */
  readonly ownCertificate?: Crypto.X509Certificate | undefined
  /** The file of `ownCertificate`, for messages. */
  readonly ownCertificateFile?: string | undefined
  /** The CAs of `ownCertificateFile` that issued `ownCertificate`, nearest first (its chain as a peer builds it). */
  readonly ownIssuers?: ReadonlyArray<Crypto.X509Certificate> | undefined
  readonly hostname: string | undefined
  /** The CRLs checked at load (x509 with a CRL file; they are in `contextOptions`), for messages. */
  readonly crls?: ReadonlyArray<CrlInfo> | undefined
  /** Destination: verify client certificates (`undefined`: not given, no verification; see `TlsConfig.verifyPeer`). */
  readonly verifyPeer: boolean | undefined
  readonly authz: ReadonlyArray<string> | undefined
  readonly handshakeTimeout: Duration.Duration
}

/** A `Config` error with `detail`. */
export const configError = (detail: string, cause?: unknown) => new TlsError({ reason: "Config", detail, cause })
