/**
 * One bandwidth limit shared by every channel of a migration, whichever thread a channel runs on (QEMU's
 * `max-bandwidth`): a reservation scheduler in shared memory. Each write of `n` bytes reserves the next
 * `n / rate` seconds of the link after the reservations before it (one atomic compare-and-swap on a shared
 * clock) and waits until its slot has passed, so the channels share the rate between them, their writes
 * spread evenly, and what goes at once after an idle moment is at most `burst` bytes (a token bucket of that
 * size). The rate can change at any moment (0 means no limit): a change forgets what was reserved at the old
 * rate and bumps a generation, so that a writer waiting on an old reservation re-reserves at the new rate
 * (`wait`) instead of sleeping out a slot of a rate that no longer holds.
 *
 * The state is a `SharedArrayBuffer`: hand it to another thread and `attach` it there.
 *
 * @internal
 */

/** Nanoseconds on a clock every thread of the process shares (`performance.timeOrigin` differs per thread). */
const now = (): bigint => process.hrtime.bigint()

/** Fields of the shared state (BigInt64Array slots). */
const NEXT_FREE = 0 // when the link is free again (ns, hrtime)
const RATE = 1 // bytes per second; 0: no limit
const BURST = 2 // bytes that may go at once after an idle moment
const GENERATION = 3 // bumped by every change of the rate

/** A bandwidth limit in shared memory. */
export class RateLimit {
  private readonly state: BigInt64Array

  private constructor(readonly buffer: SharedArrayBuffer) {
    this.state = new BigInt64Array(buffer)
  }

  /**
   * A new limit of `bytesPerSecond` (0: none), letting `burst` bytes go at once after an idle moment (by
   * default a packet's worth: 512 KiB of pages and its header).
   */
  static make(bytesPerSecond: number, burst = 512 * 1024 + 4096): RateLimit {
    // the link starts idle: a first burst may go at once
    const limit = new RateLimit(new SharedArrayBuffer(4 * 8))
    Atomics.store(limit.state, NEXT_FREE, 0n)
    Atomics.store(limit.state, BURST, BigInt(Math.max(0, Math.round(burst))))
    limit.set(bytesPerSecond)
    return limit
  }

  /** The limit whose state another thread made (`buffer` of its `RateLimit`). */
  static attach(buffer: SharedArrayBuffer): RateLimit {
    return new RateLimit(buffer)
  }

  /** Bytes per second now (0: no limit). */
  get rate(): number {
    return Number(Atomics.load(this.state, RATE))
  }

  /** Which change of the rate is in force (compare before and after a wait). */
  get generation(): bigint {
    return Atomics.load(this.state, GENERATION)
  }

  /**
   * Changes the rate from now on (0: no limit): the reservations made at the old rate are forgotten (the link
   * counts as free now) and waiters see a new `generation`.
   */
  set(bytesPerSecond: number): void {
    if (!(bytesPerSecond >= 0) || !Number.isFinite(bytesPerSecond)) {
      throw new RangeError(`a bandwidth limit must be a finite number of bytes per second >= 0, not ${bytesPerSecond}`)
    }
    const rate = BigInt(Math.round(bytesPerSecond))
    if (Atomics.exchange(this.state, RATE, rate) === rate) return
    const t = now()
    if (Atomics.load(this.state, NEXT_FREE) > t) Atomics.store(this.state, NEXT_FREE, t)
    Atomics.add(this.state, GENERATION, 1n)
  }

  /**
   * Reserves the link for `bytes` and returns how many milliseconds to wait before sending them (0: at once):
   * until the end of their slot, as if the link had carried them by then. The reservation is made whether or
   * not the caller waits.
   */
  reserve(bytes: number): number {
    const rate = Atomics.load(this.state, RATE)
    if (rate === 0n || bytes <= 0) return 0
    const cost = BigInt(Math.ceil(bytes * 1e9 / Number(rate)))
    const burstNs = Atomics.load(this.state, BURST) * 1_000_000_000n / rate
    const t = now()
    while (true) {
      const next = Atomics.load(this.state, NEXT_FREE)
      // an idle link does not save up more than the burst
      const start = next < t - burstNs ? t - burstNs : next
      const end = start + cost
      if (Atomics.compareExchange(this.state, NEXT_FREE, next, end) === next) {
        return end > t ? Number(end - t) / 1e6 : 0
      }
    }
  }
}

/** The key under which a `Bandwidth.Limit` holds its `RateLimit`. */
export const LimitTypeId: unique symbol = Symbol.for("effect-multifd/Bandwidth")

/** A `Bandwidth.Limit`, as far as the channels see it: its `RateLimit`. */
export interface HasRateLimit {
  readonly [LimitTypeId]: RateLimit
}

/** The shared memory behind a limit (`undefined` for none), for a channel on another thread. */
export const sharedOf = (limit: HasRateLimit | undefined): SharedArrayBuffer | undefined =>
  limit === undefined ? undefined : limit[LimitTypeId].buffer
