/**
 * The SIZE knob of the benchmarks: `256M`, `1G`, `512MiB` or a number of bytes, rounded to whole 4 KiB pages.
 */
export const parseSize = (text: string): number => {
  const m = /^(\d+(?:\.\d+)?)([KMG]?)i?B?$/i.exec(text.trim())
  if (!m) throw new Error(`SIZE ${text} is not a size like 256M or 1G`)
  const unit = { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[m[2]!.toUpperCase() as "" | "K" | "M" | "G"]
  return Math.round(Number(m[1]) * unit / 4096) * 4096
}
