/**
 * Worker threads for the channels of migrations: a pool started once (a thread per core, capped by
 * `maxThreads`) and reused by every migration while its layer lives. Each thread hosts several channels; a
 * channel's lease on a thread — its session there: socket, TLS, codec state — is a scoped resource of the
 * channel's fiber, and closing it waits until the thread says the session's socket is destroyed. A thread
 * that throws, exits or is terminated fails every channel it hosts with a cause naming the channel
 * ("multifd channel 2: its thread exited (code 1)"), and the next channel opened in the pool gets a new
 * thread in its place. A thread that stops answering (a session's close unanswered after `closeTimeout`) is
 * terminated and replaced the same way; a source's digest on the threads gives a chunk as long for its hash. Closing the layer's scope terminates every thread and waits until each
 * has exited.
 *
 * With the service in context, `Migration.migrate` runs each multifd channel on the pool when the memory is
 * shared (`GuestRam.allocate`), the transport is Node's (`Transport.layer`) and the upgrade is none or
 * `Tls.client`'s: connect, TLS, init packet, zero-page test, compression and writes happen in the threads,
 * which read guest memory in place, and the source's digest hashes there after the last round (a hash session
 * per thread it uses, rather than hashing threads of its own). Otherwise the channels run in this thread, as
 * without the service. On the
 * destination (`Migration.incoming`, `listenAndReceive`), with shared memory, each compressed channel's
 * payloads are decompressed, and its pages and zero pages written, by a decode session on the pool (the
 * accepted sockets are still read in this thread: Node cannot hand one to another thread).
 * Starting a thread costs tens of milliseconds of CPU and a few MiB: provide the layer once, at startup.
 *
 * Why threads of our own rather than `@effect/platform`'s `Worker`: see `docs/parallel-data-plane.md`.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import type * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import type * as Scope from "effect/Scope"
import * as Pool from "./internal/threads/pool.js"
import { ThreadError } from "./internal/threads/protocol.js"

export {
  /**
   * A channel thread failed: it could not start, it threw, it exited, or it stopped answering (`Hung`: a
   * session's close had no answer within the pool's `closeTimeout`, and the thread was terminated); or a
   * session's program died in it.
   * The message reads after the channel's name ("its thread exited (code 1)").
   *
   * @since 0.1.0
   * @category errors
   */
  ThreadError
}

/**
 * How the pool is sized.
 *
 * @since 0.1.0
 * @category models
 */
export type Options = Pool.Options

/**
 * A session in a thread as its owner sees it: its messages in and out, and its end.
 *
 * @since 0.1.0
 * @category models
 */
export type Session<In, Out> = Pool.Session<In, Out>

/**
 * What a session says: a message, or its end.
 *
 * @since 0.1.0
 * @category models
 */
export type Event<Out> = Pool.Event<Out>

/**
 * What a thread holds: its active resources and zstd contexts (`ChannelThreads["Type"]["inspect"]`).
 *
 * @since 0.1.0
 * @category models
 */
export type Inspection = Pool.Inspection

/**
 * Counts of the pool: threads running, sessions open and opened, threads replaced.
 *
 * @since 0.1.0
 * @category models
 */
export type Stats = Pool.PoolStats

/**
 * The pool of channel threads.
 *
 * @since 0.1.0
 * @category tags
 */
export class ChannelThreads extends Context.Tag("effect-multifd/ChannelThreads")<ChannelThreads, Pool.Pool>() {}

/**
 * Starts the pool's threads and waits until each is ready; they are terminated, and awaited, when the scope
 * closes.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (options?: Options): Effect.Effect<ChannelThreads["Type"], ThreadError, Scope.Scope> =>
  Pool.make(options)

/**
 * The pool as a layer: provide it once, at startup (the threads start when the layer is built).
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (options?: Options): Layer.Layer<ChannelThreads, ThreadError> =>
  Layer.scoped(ChannelThreads, make(options))

/**
 * Channel threads running in this process over all pools (started and not yet exited): a leak check.
 *
 * @since 0.1.0
 * @category diagnostics
 */
export const liveThreads: () => number = Pool.liveThreads
