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
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
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

/**
 * Claims the socket file path `path` for a listener of this library while the scope is open: `false` when another
 * listener (of this process or another) holds it. Making way for a listener (removing a stale socket file, then
 * binding) is a check and a removal: two listeners doing it at once both found the file stale, the first removed it
 * and listened, and the second removed the first's live socket file and listened too (the first unreachable, and
 * its close removed the second's file). A claim makes them take turns: held, nobody else of ours removes or binds.
 *
 * The claim is a socket bound in Linux's abstract namespace under a name made of the directory's identity (device,
 * inode) and the file's name, so that every spelling of the path (relative, through a link) is one claim; the kernel
 * drops it with its process, a SIGKILL included, so that no claim is ever stale. Elsewhere (no abstract namespace),
 * or where the directory cannot be read, nothing is claimed (`true`): the bind then tells.
 */
export const claim = (path: string): Effect.Effect<boolean, never, Scope.Scope> =>
  Effect.suspend(() => {
    if (process.platform !== "linux") return Effect.succeed(true)
    let name: string
    try {
      const absolute = Path.resolve(path)
      const dir = Fs.statSync(Path.dirname(absolute))
      const digest = Crypto.createHash("sha256").update(`${dir.dev}:${dir.ino}/${Path.basename(absolute)}`).digest("hex")
      name = `\0effect-multifd/listen/${digest.slice(0, 48)}`
    } catch {
      return Effect.succeed(true)
    }
    return Effect.map(
      Effect.acquireRelease(
        Effect.async<Net.Server | "held" | "unclaimable">((resume) => {
          // nothing is served on it: a connection (anyone may connect to an abstract socket) is closed at once
          const server = Net.createServer((socket) => {
            socket.on("error", () => {})
            socket.destroy()
          })
          server.once("error", (error: NodeJS.ErrnoException) =>
            resume(Effect.succeed(error.code === "EADDRINUSE" ? "held" : "unclaimable")))
          server.listen({ path: name }, () => resume(Effect.succeed(server)))
        }),
        (server) =>
          typeof server === "string"
            ? Effect.void
            : Effect.async<void>((resume) => void server.close(() => resume(Effect.void)))
      ),
      (server) => server !== "held"
    )
  })
