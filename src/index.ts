/**
 * effect-multifd: QEMU's multifd live migration on Effect. Every public module, as a namespace:
 *
 * ```ts
 * import { GuestRam, Migration, Transport } from "effect-multifd"
 * ```
 *
 * Each module is also its own entry point (`effect-multifd/Migration`, ...).
 *
 * @since 0.1.0
 */

/** A bandwidth limit shared by a migration's channels, changeable while it runs (QEMU's max-bandwidth). @since 0.1.0 */
export * as Bandwidth from "./Bandwidth.js"
/** Worker threads for the channels of migrations: a pool, a scoped session per channel. @since 0.1.0 */
export * as ChannelThreads from "./ChannelThreads.js"
/** The main channel's messages (`effect/Schema`) and framing. @since 0.1.0 */
export * as Control from "./Control.js"
/** Named blocks of guest memory, the zero-page test, dirty tracking, digests. @since 0.1.0 */
export * as GuestRam from "./GuestRam.js"
/** QEMU 10's mapped-ram migration file, as the file of a whole VM. @since 0.1.0 */
export * as MappedRam from "./MappedRam.js"
/** `migrate` (source) and `incoming` (destination): hello, rounds, flush, completion, verification. @since 0.1.0 */
export * as Migration from "./Migration.js"
/** Migration settings from Effect's `Config` (`MULTIFD_CHANNELS`, ...), used where options leave them out. @since 0.1.0 */
export * as MigrationConfig from "./MigrationConfig.js"
/** Errors of a migration as a whole, and which channel a failure came from. @since 0.1.0 */
export * as MigrationError from "./MigrationError.js"
/** The metrics a migration updates (Effect `Metric`s): bytes per channel, pages, packets, rounds, downtime. @since 0.1.0 */
export * as MigrationMetrics from "./MigrationMetrics.js"
/** A migration's status at any moment, as QEMU's `query-migrate`. @since 0.1.0 */
export * as MigrationStatus from "./MigrationStatus.js"
/** The destination's channel set. @since 0.1.0 */
export * as MultifdRecv from "./MultifdRecv.js"
/** The source's channel set. @since 0.1.0 */
export * as MultifdSend from "./MultifdSend.js"
/** How pages travel: raw views of memory, or a per-channel compression stream. @since 0.1.0 */
export * as PageCodec from "./PageCodec.js"
/** QEMU multifd packets: init, RAM and SYNC packets, encode and validating decode. @since 0.1.0 */
export * as Protocol from "./Protocol.js"
/** Receiving a real QEMU 10 migration. @since 0.1.0 */
export * as QemuIncoming from "./QemuIncoming.js"
/** Migrating a whole VM into an unmodified QEMU 10. @since 0.1.0 */
export * as QemuOutgoing from "./QemuOutgoing.js"
/** QEMU's main migration stream. @since 0.1.0 */
export * as QemuStream from "./QemuStream.js"
/** A QEMU VM as its migration carries it: RAM, configuration, device state. @since 0.1.0 */
export * as QemuVm from "./QemuVm.js"
/** `file:` snapshots: parallel save and verified restore. @since 0.1.0 */
export * as Snapshot from "./Snapshot.js"
/** PSK and x509 TLS handshakes as Effects, authorization, configuration. @since 0.1.0 */
export * as Tls from "./Tls.js"
/** What every transfer shares: timeouts, live policy, progress reports, stats. @since 0.1.0 */
export * as Transfer from "./Transfer.js"
/** `tcp:` / `unix:` addresses, scoped connect and listen. @since 0.1.0 */
export * as Transport from "./Transport.js"
