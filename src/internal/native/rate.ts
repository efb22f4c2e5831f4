/**
 * A rate over the recent past: bytes per second between the oldest and the newest of the last samples.
 *
 * @internal
 */

/** Samples kept (at ten reports a second: the last second). */
const SAMPLES = 11

/** Bytes per second over the last `SAMPLES` samples of a growing counter. */
export class RecentRate {
  private readonly samples: Array<{ readonly at: number; readonly bytes: number }> = []

  /** Adds a sample (`at` in milliseconds) and returns the rate since the oldest one kept (0 at first). */
  sample(at: number, bytes: number): number {
    this.samples.push({ at, bytes })
    if (this.samples.length > SAMPLES) this.samples.shift()
    const oldest = this.samples[0]!
    return at > oldest.at ? (bytes - oldest.bytes) / (at - oldest.at) * 1000 : 0
  }
}
