/**
 * A window of memory that pages pass through on their way from a file to the channels: `slots` batches of
 * `slotBytes` each, in shared memory (a channel thread reads them in place). A batch is read into a free slot,
 * handed to a channel, and the slot is free again once the channel handed its bytes to the kernel — so a VM
 * file of any size is sent through the same few batches, and the VM's own memory is never touched.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as Queue from "effect/Queue"
import * as GuestRam from "../../GuestRam.js"

/** A slot taken from the window: its bytes, a view of them for a block, and how to give it back. */
export interface Slot {
  readonly bytes: Buffer
  /**
   * The slot as the memory of `block` (`MultifdSend.send`'s block): one view per slot and block, so a channel
   * thread that was given it once knows it by name.
   */
  readonly view: (block: string) => { readonly name: string; readonly bytes: Buffer }
  /** Gives the slot back (once its batch was sent). */
  readonly release: Effect.Effect<void>
}

/** A window of `slots` slots of `slotBytes`: `take` waits for a free one. */
export interface PageWindow {
  readonly take: Effect.Effect<Slot>
}

/** Allocates the window (shared memory, untouched until read into). */
export const make = (slots: number, slotBytes: number): Effect.Effect<PageWindow> =>
  Effect.gen(function*() {
    const memory = GuestRam.allocate(slots * slotBytes)
    const free = yield* Queue.bounded<Slot>(slots)
    for (let i = 0; i < slots; i++) {
      const bytes = memory.subarray(i * slotBytes, (i + 1) * slotBytes)
      const views = new Map<string, { readonly name: string; readonly bytes: Buffer }>()
      const slot: Slot = {
        bytes,
        view: (name) => {
          let view = views.get(name)
          if (view === undefined) {
            view = { name, bytes: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length) }
            views.set(name, view)
          }
          return view
        },
        release: Effect.suspend(() => Effect.asVoid(Queue.offer(free, slot)))
      }
      yield* Queue.offer(free, slot)
    }
    return { take: Queue.take(free) }
  })
