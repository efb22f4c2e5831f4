/**
 * Small helpers the migration tests share: mixed test images and wall-clock timing.
 */
import * as Effect from "effect/Effect"
import * as Crypto from "node:crypto"

/** `pages` pages of `pageSize` bytes: a share `randomShare` of them random, the rest zero (zero pages travel too). */
export const mixedImage = (pages: number, randomShare: number, pageSize = 4096): Buffer => {
  const bytes = Buffer.alloc(pages * pageSize)
  for (let p = 0; p < pages; p++) if (Math.random() < randomShare) Crypto.randomFillSync(bytes, p * pageSize, pageSize)
  return bytes
}

/** Runs an effect and pairs its result with its wall-clock duration in milliseconds. */
export const timed = <A, E, R>(self: Effect.Effect<A, E, R>) =>
  Effect.suspend(() => {
    const t0 = performance.now()
    return Effect.map(self, (a) => [a, performance.now() - t0] as const)
  })
