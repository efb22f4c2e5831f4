/**
 * Memory of a VM whose pages are still in its file: `MappedRam.open` allocates a mapped-ram file's memory untouched
 * and leaves the pages to `load` or `readPages`, as they are needed. The consumers that take the VM's memory as the
 * VM itself — `QemuOutgoing.migrate` without `readPages` or `load`, `MappedRam.write` — would send or store zeros
 * for the pages not loaded: they ask here first, and refuse such a VM.
 *
 * @internal
 */

/** The memories of opened files whose pages are not all loaded → how many of the pages the file holds are not. */
const pending = new WeakMap<object, () => number>()

/** Records that `ram` (an opened file's memory) lacks the pages that `notLoaded` counts. */
export const track = (ram: object, notLoaded: () => number): void => {
  pending.set(ram, notLoaded)
}

/** Why `ram` is not the VM's memory yet (pages of its file not loaded), with what to do (`remedy`); else `undefined`. */
export const problem = (ram: object, remedy: string): string | undefined => {
  const missing = pending.get(ram)?.() ?? 0
  return missing === 0
    ? undefined
    : `the VM's pages are still in its file (MappedRam.open): ${missing} of them not loaded; ${remedy}`
}
