/**
 * Scratch space of the QEMU benchmarks: a directory on tmpfs (/dev/shm when it has room, else /tmp), removed
 * when the process exits, and a random RAM image written into it.
 */
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Path from "node:path"

const hasRoom = (path: string, bytes: number): boolean => {
  try {
    const s = Fs.statfsSync(path)
    return s.bavail * s.bsize > bytes
  } catch {
    return false
  }
}

/** A fresh directory with room for `bytes` where possible, removed when the process exits. */
export const scratchDir = (bytes: number): string => {
  const dir = Fs.mkdtempSync(Path.join(hasRoom("/dev/shm", bytes) ? "/dev/shm" : "/tmp", "emfd-bench-"))
  process.on("exit", () => Fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** Writes `size` random bytes to `dir`/random.img (64 MiB at a time) and gives its path. */
export const randomImage = (dir: string, size: number): string => {
  const path = Path.join(dir, "random.img")
  const fd = Fs.openSync(path, "w")
  const chunk = Buffer.alloc(64 * 1024 * 1024)
  for (let at = 0; at < size; at += chunk.length) {
    Crypto.randomFillSync(chunk)
    Fs.writeSync(fd, chunk, 0, Math.min(chunk.length, size - at))
  }
  Fs.closeSync(fd)
  return path
}
