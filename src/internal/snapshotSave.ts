/**
 * The steps of `Snapshot.save`: the writers (a pre-copy sink whose batches go to parallel positional writers
 * of the snapshot's temporary file, each page to its fixed place, the page bitmaps kept as they go) and the
 * index written last (the bitmaps and the header with the digests).
 *
 * @internal
 */
import * as Clock from "effect/Clock"
import * as Effect from "effect/Effect"
import * as FiberSet from "effect/FiberSet"
import * as Queue from "effect/Queue"
import * as Ref from "effect/Ref"
import * as GuestRam from "../GuestRam.js"
import * as FileIo from "./native/fileIo.js"
import type * as Precopy from "./precopy.js"
import { SnapshotError, type Temporary } from "./snapshotFile.js"
import * as Format from "./snapshotFormat.js"

/** Bytes of pages a writer gets at once (the largest single write). */
const BATCH_BYTES = 1024 * 1024

/** What the writers did so far. */
export interface WriteStats {
  readonly writes: number
  readonly rounds: number
  readonly storedPages: number
  readonly zeroPages: number
  readonly bytes: number
}

interface Job {
  readonly block: GuestRam.Block
  readonly pages: Uint32Array
  readonly count: number
}

interface Writer {
  readonly id: number
  readonly mailbox: Queue.Queue<Job>
  /** The writes of the current batch (reused: no allocation per batch). */
  runs: FileIo.IoList
}

/**
 * The writers as a pre-copy sink: batches go to whichever writer is idle; each writer tests its pages for
 * zeros, updates the bitmap and writes each run of consecutive stored pages with one positional write (a
 * view of guest memory, no copy). `sync` completes when every writer is idle again, so a later round never
 * races an earlier round's write of the same page. The first failure of any writer is the sink's failure;
 * closing the scope interrupts and awaits every writer.
 */
export const makeWriters = (
  path: string,
  file: Temporary,
  ram: GuestRam.GuestRam["Type"],
  plan: Format.Plan,
  bitmaps: ReadonlyArray<Uint8Array>,
  channels: number,
  detectZeros: boolean
) =>
  Effect.gen(function*() {
    const pageSize = ram.pageSize
    const slots = Math.max(1, Math.floor(BATCH_BYTES / pageSize))
    const where = new Map(
      ram.blocks.map((block, i) => [block, { dataOffset: plan.blocks[i]!.dataOffset, bitmap: bitmaps[i]! }])
    )
    // shared state first: released only after every writer has ended
    const idle = yield* Queue.bounded<Writer>(channels)
    const stats = yield* Ref.make<WriteStats>({ writes: 0, rounds: 0, storedPages: 0, zeroPages: 0, bytes: 0 })
    const fibers = yield* FiberSet.make<void, SnapshotError>()
    const failure = Effect.zipRight(FiberSet.join(fibers), Effect.never)

    const writeBatch = (writer: Writer, job: Job) =>
      Effect.suspend(() => {
        const { block, count, pages } = job
        const place = where.get(block)
        if (place === undefined) {
          const detail = `block ${JSON.stringify(block.name)} is not in the snapshot`
          return new SnapshotError({ reason: "Layout", path, detail })
        }
        if (writer.runs.at.length < count) writer.runs = FileIo.ioList(count)
        const runs = writer.runs
        runs.count = 0
        const run = (first: number, end: number) =>
          FileIo.push(runs, first * pageSize, (end - first) * pageSize, place.dataOffset + first * pageSize)
        let stored = 0
        let first = -1
        let end = -1
        let zero = 0
        for (let i = 0; i < count; i++) {
          const page = pages[i]!
          if (detectZeros && GuestRam.isZeroPage(block.bytes, page * pageSize, pageSize)) {
            Format.clearBit(place.bitmap, page)
            zero++
            continue
          }
          Format.setBit(place.bitmap, page)
          stored++
          if (page === end) {
            end++
            continue
          }
          if (first >= 0) run(first, end)
          first = page
          end = page + 1
        }
        if (first >= 0) run(first, end)
        const writes = runs.count
        return file.writeAll(block.bytes, runs).pipe(
          Effect.mapError((e) =>
            new SnapshotError({ reason: e.reason, path, detail: `writer ${writer.id}: ${e.detail}`, cause: e.cause })
          ),
          Effect.zipRight(Ref.update(stats, (s) => ({
            ...s,
            writes: s.writes + writes,
            storedPages: s.storedPages + stored,
            zeroPages: s.zeroPages + zero,
            bytes: s.bytes + stored * pageSize
          })))
        )
      })

    const worker = (writer: Writer) =>
      Effect.gen(function*() {
        yield* Queue.offer(idle, writer)
        while (true) {
          const job = yield* Queue.take(writer.mailbox)
          yield* writeBatch(writer, job)
          yield* Queue.offer(idle, writer)
        }
      })

    for (let id = 0; id < channels; id++) {
      const writer: Writer = { id, mailbox: yield* Queue.bounded<Job>(1), runs: FileIo.ioList(slots) }
      yield* FiberSet.run(fibers, worker(writer))
    }

    const guarded = <A, E>(effect: Effect.Effect<A, E>) => Effect.raceFirst(effect, failure)
    const sink: Precopy.Sink<SnapshotError> = {
      slots,
      send: (block, pages, count) =>
        guarded(Effect.flatMap(Queue.take(idle), (writer) => Queue.offer(writer.mailbox, { block, pages, count }))),
      // every writer idle = every batch handed over so far is written
      sync: guarded(Effect.gen(function*() {
        const all = yield* Queue.takeBetween(idle, channels, channels)
        yield* Queue.offerAll(idle, all)
        yield* Ref.update(stats, (s) => ({ ...s, rounds: s.rounds + 1 }))
      })),
      failure,
      progress: Effect.map(Ref.get(stats), (s) => s.bytes)
    }
    return { sink, stats: Ref.get(stats) }
  })

/** How the save went, as the header records it. */
export interface Saved {
  readonly uuid: string
  readonly channels: number
  readonly rounds: number
}

/**
 * Writes the index once every page is in the file and writers are paused: each bitmap, then the header
 * with the block digests of exactly the memory the pages were written from. Returns the header's bytes.
 */
export const writeIndex = (
  file: Temporary,
  ram: GuestRam.GuestRam["Type"],
  plan: Format.Plan,
  bitmaps: ReadonlyArray<Uint8Array>,
  saved: Saved
): Effect.Effect<Buffer, SnapshotError | GuestRam.GuestRamError> =>
  Effect.gen(function*() {
    const digests = yield* GuestRam.digest(ram)
    const header = Format.encodeHeader({
      version: Format.VERSION,
      pageSize: ram.pageSize,
      dataAlignment: Format.DATA_ALIGNMENT,
      fileBytes: plan.fileBytes,
      uuid: saved.uuid,
      channels: saved.channels,
      rounds: saved.rounds,
      savedAt: yield* Clock.currentTimeMillis,
      blocks: plan.blocks.map((b, i) => ({
        name: b.name,
        size: b.size,
        bitmapOffset: b.bitmapOffset,
        dataOffset: b.dataOffset,
        presentPages: Format.countBits(bitmaps[i]!),
        digest: digests[i]!.digest,
        bitmapDigest: Format.sha256(bitmaps[i]!)
      }))
    })
    for (const [i, b] of plan.blocks.entries()) yield* file.write(bitmaps[i]!, b.bitmapOffset)
    yield* file.write(header, 0)
    return header
  })
