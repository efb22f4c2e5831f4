#!/usr/bin/env node
// Makes a test RAM image: `node scripts/make-image.mjs FILE SIZE [random|mixed]` (SIZE like 256M, 1G, 4096K).
// `mixed` (the default) looks like a guest's memory: a quarter zero pages, a quarter repetitive, half random;
// `random` is random throughout (what compresses worst). Written in 64 MiB steps, so any size fits in memory.
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"

const [file, sizeText, kind = "mixed"] = process.argv.slice(2)
const units = { K: 1024, M: 1024 ** 2, G: 1024 ** 3 }
const m = /^(\d+)([KMG]?)$/i.exec(sizeText ?? "")
if (file === undefined || m === null || !["random", "mixed"].includes(kind)) {
  console.error("usage: node scripts/make-image.mjs FILE SIZE [random|mixed]   (SIZE: 256M, 1G, ...; a multiple of 4K)")
  process.exit(2)
}
const size = Number(m[1]) * (units[m[2].toUpperCase()] ?? 1)
const PAGE = 4096
if (size === 0 || size % PAGE !== 0) {
  console.error(`make-image: ${sizeText} is not a positive multiple of 4K`)
  process.exit(2)
}
const STEP = 64 * 1024 * 1024
const fd = Fs.openSync(file, "w")
try {
  for (let at = 0; at < size; at += STEP) {
    const bytes = Crypto.randomBytes(Math.min(STEP, size - at))
    if (kind === "mixed") {
      for (let page = 0; page < bytes.length / PAGE; page++) {
        const n = (at / PAGE + page) % 4
        if (n === 0) bytes.fill(0, page * PAGE, (page + 1) * PAGE)
        else if (n === 1) bytes.fill(page & 0xff, page * PAGE, (page + 1) * PAGE)
      }
    }
    Fs.writeSync(fd, bytes, 0, bytes.length, at)
  }
} finally {
  Fs.closeSync(fd)
}
console.error(`make-image: wrote ${file} (${size} bytes, ${kind})`)
