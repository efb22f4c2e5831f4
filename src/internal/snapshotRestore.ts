/**
 * The steps of `Snapshot.restore`: reading and validating the header and the page bitmaps, reading the
 * stored pages with parallel readers straight into memory, and verifying every block's digest.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as GuestRam from "../GuestRam.js"
import * as FileIo from "./native/fileIo.js"
import { type Reader, SnapshotError } from "./snapshotFile.js"
import * as Format from "./snapshotFormat.js"

/** Bytes of pages a reader handles at once. */
const READ_JOB_BYTES = 1024 * 1024
/** A restore reads across a gap of absent pages up to this size rather than issuing two reads. */
const MERGE_GAP_BYTES = 64 * 1024

/** A validated header and the bitmaps it vouches for. */
export interface Index {
  readonly header: Format.Header
  readonly bitmaps: ReadonlyArray<Uint8Array>
}

/**
 * Reads and validates everything but the pages: magic, version, header checksum, offsets and the file's
 * length (`Format.decodeHeader`), then — once `admit` accepted the header — each bitmap against its checksum
 * and its count of stored pages.
 */
export const readIndex = (
  path: string,
  file: Reader,
  admit: (header: Format.Header) => Effect.Effect<void, SnapshotError> = () => Effect.void
): Effect.Effect<Index, SnapshotError> =>
  Effect.gen(function*() {
    const fail = (problem: Format.Problem) => new SnapshotError({ path, ...problem })
    const fileSize = file.size
    const first = Buffer.alloc(Math.min(fileSize, Format.PREFIX_SIZE))
    yield* file.read(first, 0, first.length, 0)
    const prefix = Format.decodePrefix(first, fileSize)
    if (Format.isProblem(prefix)) return yield* fail(prefix)
    const headerBytes = Buffer.alloc(prefix.headerBytes)
    yield* file.read(headerBytes, 0, headerBytes.length, 0)
    const header = Format.decodeHeader(headerBytes, prefix, fileSize)
    if (Format.isProblem(header)) return yield* fail(header)
    yield* admit(header)

    const bitmaps: Array<Uint8Array> = []
    for (const entry of header.blocks) {
      const pages = entry.size / header.pageSize
      const bitmap = new Uint8Array(Format.bitmapSize(pages))
      yield* file.read(bitmap, 0, bitmap.length, entry.bitmapOffset)
      const damaged = Format.sha256(bitmap) !== entry.bitmapDigest || Format.hasBitsPast(bitmap, pages) ||
        Format.countBits(bitmap) !== entry.presentPages
      if (damaged) {
        return yield* new SnapshotError({
          reason: "Corrupt",
          path,
          detail: `the page bitmap of block ${JSON.stringify(entry.name)} is damaged`
        })
      }
      bitmaps.push(bitmap)
    }
    return { header, bitmaps }
  })

/**
 * The page reads of a restore: `run` reads every stored page; `restoredBytes` says how much memory is done, and
 * `restoredPages` how many of its pages were stored (read) and absent (zero).
 */
export interface PageReads {
  readonly run: (readers: number) => Effect.Effect<void, SnapshotError>
  readonly restoredBytes: () => number
  readonly restoredPages: () => { readonly stored: number; readonly absent: number }
}

/**
 * Reads the stored pages into `ram` in jobs of up to 1 MiB of pages, each job as one batch of positional
 * reads (runs of stored pages, merged across small gaps). Absent pages read as part of a span are zeroed
 * afterwards, and so is every absent page when `fresh` is false (memory that was given, not allocated).
 */
export const pageReads = (
  file: Reader,
  { bitmaps, header }: Index,
  ram: GuestRam.GuestRam["Type"],
  fresh: boolean
): PageReads => {
  // jobs of up to 1 MiB of pages; fresh memory is zero already, so only jobs with stored pages matter
  const pageSize = header.pageSize
  const jobPages = Math.max(1, Math.floor(READ_JOB_BYTES / pageSize))
  const mergeGap = Math.floor(MERGE_GAP_BYTES / pageSize)
  const jobs: Array<{ readonly block: number; readonly first: number; readonly end: number }> = []
  header.blocks.forEach((entry, block) => {
    const pages = entry.size / pageSize
    for (let page = 0; page < pages; page += jobPages) {
      jobs.push({ block, first: page, end: Math.min(pages, page + jobPages) })
    }
  })
  let restoredBytes = 0
  let storedPages = 0
  let absentPages = 0
  const readJob = (job: (typeof jobs)[number]) =>
    Effect.suspend(() => {
      const bytes = ram.blocks[job.block]!.bytes
      const dataOffset = header.blocks[job.block]!.dataOffset
      const spans = FileIo.ioList(job.end - job.first)
      const zeros: Array<Format.Run> = []
      Format.forEachSpan(
        bitmaps[job.block]!,
        job.first,
        job.end,
        mergeGap,
        ({ end, first }) =>
          FileIo.push(spans, first * pageSize, (end - first) * pageSize, dataOffset + first * pageSize),
        (gap, inSpan) => {
          if (inSpan || !fresh) zeros.push(gap)
        }
      )
      return Effect.map(file.readAll(bytes, spans), () => {
        // absent pages read as part of a span (holes, or stale bytes of a page that became zero), and every
        // absent page of memory that was not fresh
        for (const { end, first } of zeros) bytes.fill(0, first * pageSize, end * pageSize)
        restoredBytes += (job.end - job.first) * pageSize
        let stored = 0
        for (let page = job.first; page < job.end; page++) if (Format.testBit(bitmaps[job.block]!, page)) stored++
        storedPages += stored
        absentPages += job.end - job.first - stored
      })
    })
  return {
    run: (readers) => Effect.forEach(jobs, readJob, { concurrency: readers, discard: true }),
    restoredBytes: () => restoredBytes,
    restoredPages: () => ({ stored: storedPages, absent: absentPages })
  }
}

/** Compares every block's digest with the header's; a mismatch names the damaged blocks. */
export const verify = (
  path: string,
  ram: GuestRam.GuestRam["Type"],
  header: Format.Header
): Effect.Effect<void, SnapshotError> =>
  Effect.gen(function*() {
    // memory given whose ArrayBuffer was detached meanwhile (transferred to another thread): refused as up front
    const digests = yield* Effect.mapError(
      GuestRam.digest(ram),
      (error) => new SnapshotError({ reason: "Layout", path, detail: `not restored: ${error.detail}` })
    )
    const bad = header.blocks
      .filter((entry, i) => digests[i]!.digest !== entry.digest)
      .map((entry) => JSON.stringify(entry.name))
    if (bad.length > 0) {
      return yield* new SnapshotError({
        reason: "DigestMismatch",
        path,
        detail: `${bad.length === 1 ? "block" : "blocks"} ${bad.join(", ")} ${bad.length === 1 ? "does" : "do"} ` +
          "not match the saved digest: the page data is damaged"
      })
    }
  })
