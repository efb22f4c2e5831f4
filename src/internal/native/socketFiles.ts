/**
 * The Unix socket files this process listens on, for a process about to exit without closing its scopes (the
 * command given a second signal while it tears down): closing a listener removes its file (libuv unlinks it),
 * an exit at once does not, and the file was left behind.
 *
 * A native adapter: it imports no public module.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as Fs from "node:fs"
import * as Path from "node:path"

/** Each socket file listened on now, absolute, with the identity of the file its listener made. */
const listening = new Map<string, { readonly dev: number; readonly ino: number }>()

/**
 * Records the socket file at `path` (which a listener has just bound) while the scope is open: close the
 * listener in the same scope, after this (a release that comes first forgets the file).
 */
export const held = (path: string): Effect.Effect<void, never, Scope.Scope> =>
  Effect.asVoid(Effect.acquireRelease(
    Effect.sync(() => {
      const absolute = Path.resolve(path)
      try {
        const stat = Fs.lstatSync(absolute)
        listening.set(absolute, { dev: stat.dev, ino: stat.ino })
      } catch {
        // nothing there (removed by someone else): nothing to remove
      }
      return absolute
    }),
    (absolute) => Effect.sync(() => void listening.delete(absolute))
  ))

/**
 * Removes, synchronously, every socket file this process listens on, if it is still the file its listener made
 * (another there is left alone).
 */
export const removeNow = (): void => {
  for (const [path, made] of listening) {
    try {
      const stat = Fs.lstatSync(path)
      if (stat.isSocket() && stat.dev === made.dev && stat.ino === made.ino) Fs.unlinkSync(path)
    } catch {
      // nothing more can be done on the way out
    }
  }
  listening.clear()
}
