/**
 * How many more files this process may open, where the system says (Linux: `/proc/self/fd` and
 * `/proc/self/limits`). A listener that runs out of descriptors loses connections without a word — libuv
 * accepts each and closes it at once, and Node reports nothing — so a destination checks that its channels
 * fit before it takes a migration, and a source before it connects them.
 *
 * A native adapter: it imports no public module.
 *
 * @internal
 */
import * as Fs from "node:fs"

/**
 * Descriptors kept free beside the channels: the main channel, the image file, the digest threads' event loops,
 * a re-attaching channel's new socket, strangers. Measured: a 16-channel `multifd recv` peaked at 21 over its
 * idle count.
 */
export const MARGIN = 16

/** Files open now and the soft limit on them (`ulimit -n`), or `undefined` where the system does not say. */
export const usage = (): { readonly open: number; readonly limit: number } | undefined => {
  try {
    const m = /^Max open files\s+(\d+|unlimited)\s/m.exec(Fs.readFileSync("/proc/self/limits", "utf8"))
    if (m === null || m[1] === "unlimited") return undefined
    return { open: Fs.readdirSync("/proc/self/fd").length, limit: Number(m[1]) }
  } catch {
    return undefined
  }
}

/**
 * Why `channels` connections (and `MARGIN` more files) do not fit under this process's open-files limit, if
 * they do not, said of `side`.
 */
export const tooFewFor = (channels: number, side: "source" | "destination"): string | undefined => {
  const now = usage()
  if (now === undefined) return undefined
  const free = now.limit - now.open
  return free >= channels + MARGIN
    ? undefined
    : `this ${side} may open only ${Math.max(0, free)} more files (open files limit ${now.limit}, ` +
      `${now.open} open): too few for ${channels} channels; raise its limit (ulimit -n)`
}
