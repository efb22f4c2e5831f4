import { describe, expect, it } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Scope from "effect/Scope"
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import {
  type Address,
  connect,
  type Connection,
  describeError,
  formatAddress,
  fromStream,
  layer,
  listen,
  MAX_UNIX_PATH_BYTES,
  parseAddress,
  Transport,
  TransportError
} from "../src/Transport.js"
import { COPIED_WRITE_BUFFER } from "../src/internal/native/connection.js"
import { expectNoLeaks, leakFree, nextTurn, openHandles, tempSocketPath } from "./support/handles.js"
import { killChildren, start } from "./support/cli.js"
import { pair } from "./support/sockets.js"

// ---------------------------------------------------------------------------------------------------------
// helpers

const addr = (uri: string): Address => Either.getOrThrow(parseAddress(uri))

/** A guard (never used to let things settle): fail instead of hanging the test file. */
const noHang = <A, E, R>(self: Effect.Effect<A, E, R>, what: string) =>
  Effect.timeoutFail(self, { duration: "5 seconds", onTimeout: () => new Error(`hung: ${what}`) })

/** Waits (event-loop turns, bounded) until `n` more TCP sockets than `base` are open. */
const untilTcpSockets = (atLeast: number) =>
  Effect.suspend(() => {
    const loop = (left: number): Effect.Effect<void, Error> =>
      (openHandles()["TCPSocketWrap"] ?? 0) >= atLeast
        ? Effect.void
        : left === 0
        ? Effect.fail(new Error(`fewer than ${atLeast} TCP sockets open: ${JSON.stringify(openHandles())}`))
        : Effect.flatMap(nextTurn, () => loop(left - 1))
    return loop(1000)
  })

/** Resolves once the stream has emitted 'close'. */
const closed = (connection: Connection) =>
  Effect.async<void>((resume) => {
    if (connection.stream.closed) return resume(Effect.void)
    const onClose = () => resume(Effect.void)
    connection.stream.once("close", onClose)
    return Effect.sync(() => connection.stream.off("close", onClose))
  })

const expectError = (error: unknown, reasons: ReadonlyArray<TransportError["reason"]>, text?: string) => {
  expect(error).toBeInstanceOf(TransportError)
  const e = error as TransportError
  expect(reasons).toContain(e.reason)
  expect(e.message).not.toContain("\n")
  if (text !== undefined) expect(e.message).toContain(text)
  return e
}

const bytes = (n: number, seed: number) => {
  const b = Buffer.allocUnsafe(n)
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13) & 0xff
  return b
}

const ipv6Available = await new Promise<boolean>((resolve) => {
  const server = Net.createServer()
  server.once("error", () => resolve(false))
  server.listen(0, "::1", () => server.close(() => resolve(true)))
})

/** A link-local IPv6 address of this machine with its interface (fe80::...%eth0), if it has one. */
const linkLocal = Object.entries(Os.networkInterfaces()).flatMap(([name, addresses]) =>
  (addresses ?? []).filter((a) => a.family === "IPv6" && a.address.startsWith("fe80:")).map((a) => `${a.address}%${name}`)
)[0]

const LOOPBACK = addr("tcp:127.0.0.1:0")

// ---------------------------------------------------------------------------------------------------------

describe("parseAddress / formatAddress", () => {
  it.live("parses and formats tcp and unix addresses", () =>
    leakFree(Effect.sync(() => {
      const cases: ReadonlyArray<[string, Address]> = [
        ["tcp:127.0.0.1:0", { _tag: "Tcp", host: "127.0.0.1", port: 0 }],
        ["tcp:[::1]:5000", { _tag: "Tcp", host: "::1", port: 5000 }],
        ["tcp:localhost:1", { _tag: "Tcp", host: "localhost", port: 1 }],
        ["tcp:0.0.0.0:65535", { _tag: "Tcp", host: "0.0.0.0", port: 65535 }],
        ["unix:/tmp/x", { _tag: "Unix", path: "/tmp/x" }]
      ]
      for (const [uri, expected] of cases) {
        const parsed = parseAddress(uri)
        expect(parsed).toStrictEqual(Either.right(expected))
        expect(formatAddress(expected)).toBe(uri)
      }
    })))

  it.live("rejects malformed addresses with a one-line BadAddress error", () =>
    leakFree(Effect.sync(() => {
      for (
        const uri of [
          "tcp:1.2.3.4",
          "tcp:host:99999",
          "tcp:host:123456",
          "tcp:[zz]:1",
          "tcp:[1.2.3.4]:1",
          "tcp:::1:5",
          "tcp::5",
          "tcp: 127.0.0.1:5",
          "tcp:127.0.0.1 :5",
          "tcp:local\thost:5",
          "foo:bar",
          "unix:",
          "unix:/tmp/recv.sock/",
          ""
        ]
      ) {
        const parsed = parseAddress(uri)
        expect(Either.isLeft(parsed), uri).toBe(true)
        const e = expectError(Either.isLeft(parsed) ? parsed.left : undefined, ["BadAddress"])
        expect(e.address).toBe(uri)
        expect(e.message.startsWith(`${uri}: `)).toBe(true)
      }
      const range = Either.getLeft(parseAddress("tcp:host:99999"))
      expect(range._tag === "Some" && range.value.detail).toContain("out of range")
      // longer than DNS allows (it was looked up: "getaddrinfo EINVAL <the name>"); 253 and a trailing dot pass
      const long = Either.getLeft(parseAddress(`tcp:${"a".repeat(254)}:1`))
      expect(long._tag === "Some" && long.value.detail).toBe("the host name is 254 characters long; a name has at most 253")
      expect(Either.isRight(parseAddress(`tcp:${"a.".repeat(126)}a.:1`))).toBe(true)
    })))

  // an IPv6 link-local address means nothing without its interface (fe80::1 is on every link): tcp:[fe80::1%eth0]:P
  // was refused as malformed ("expected tcp:HOST:PORT"), and without the interface listen and connect said Node's
  // "listen EINVAL: invalid argument fe80::1:4444"
  it.live("an IPv6 address with its interface (tcp:[fe80::1%eth0]:P) parses; a link-local one without says it needs one", () =>
    leakFree(Effect.gen(function*() {
      expect(parseAddress("tcp:[fe80::1%eth0]:4444")).toStrictEqual(Either.right({ _tag: "Tcp", host: "fe80::1%eth0", port: 4444 }))
      expect(formatAddress({ _tag: "Tcp", host: "fe80::1%eth0", port: 4444 })).toBe("tcp:[fe80::1%eth0]:4444")
      for (const uri of ["tcp:[fe80::1%]:1", "tcp:[fe80::1%et]h0]:1", "tcp:[fe80::1%eth 0]:1"]) {
        expect(Either.isLeft(parseAddress(uri)), uri).toBe(true)
      }
      const needsInterface = "a link-local address needs its interface, as tcp:[fe80::1%eth0]:4444"
      expectError(yield* Effect.flip(listen(addr("tcp:[fe80::1]:4444"))), ["Listen"], needsInterface)
      expectError(yield* Effect.flip(connect(addr("tcp:[fe80::1]:4444"))), ["Connect"], needsInterface)
      // an interface this machine does not have: Node's "connect EINVAL fe80::1%nosuchif0:4444 - Local (:::0)"
      const noInterface = "tcp:[fe80::1%nosuchif0]:4444: this machine has no network interface nosuchif0 (the address's %nosuchif0)"
      expectError(yield* Effect.flip(listen(addr("tcp:[fe80::1%nosuchif0]:4444"))), ["Listen"], noInterface)
      expectError(yield* Effect.flip(connect(addr("tcp:[fe80::1%nosuchif0]:4444"))), ["Connect"], noInterface)
      const noIndex = "tcp:[fe80::1%4000000]:4444: this machine has no network interface of index 4000000 (the address's %4000000)"
      expectError(yield* Effect.flip(connect(addr("tcp:[fe80::1%4000000]:4444"))), ["Connect"], noIndex)
    })))

  it.live.skipIf(linkLocal === undefined)("listen and connect on a link-local address with its interface", () =>
    leakFree(Effect.gen(function*() {
      const { client, listener, server } = yield* pair(addr(`tcp:[${linkLocal}]:0`))
      expect(formatAddress(listener.address)).toMatch(/^tcp:\[fe80:[0-9a-f:]+%[^\]]+\]:\d+$/)
      yield* client.write([Buffer.from("zone")])
      expect((yield* server.read(4)).toString()).toBe("zone")
    })))

  it.live("a TCP port outside 0-65535 given as an Address is a BadAddress error of listen and connect, leaving no socket handle", () =>
    leakFree(Effect.gen(function*() {
      // Node throws a RangeError for these (connect after it made the socket's handle, which then stays open)
      for (const port of [70000, -1, 1.5, Number.NaN]) {
        const address: Address = { _tag: "Tcp", host: "127.0.0.1", port }
        for (const attempt of [Effect.scoped(Effect.asVoid(listen(address))), Effect.scoped(Effect.asVoid(connect(address)))]) {
          const e = expectError(yield* Effect.flip(attempt), ["BadAddress"])
          expect(e.message).toBe(`tcp:127.0.0.1:${port}: port ${port} is out of range 0-65535`)
        }
      }
    })))

  it.live("a unix path longer than a socket address holds is refused (parseAddress, listen, connect; no file made); a missing directory is named", () =>
    leakFree(Effect.gen(function*() {
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-long-"))
      const fits = Path.join(dir, "s".repeat(MAX_UNIX_PATH_BYTES - dir.length - 1))
      const long = `${fits}x`
      expect(Buffer.byteLength(fits)).toBe(MAX_UNIX_PATH_BYTES)
      expect(parseAddress(`unix:${fits}`)).toStrictEqual(Either.right({ _tag: "Unix", path: fits }))
      const parsed = Either.getLeft(parseAddress(`unix:${long}`))
      expect(parsed._tag === "Some" && parsed.value.message).toBe(
        `unix:${long}: the socket path is ${MAX_UNIX_PATH_BYTES + 1} bytes long; at most ${MAX_UNIX_PATH_BYTES} fit in a socket address`
      )
      // Node would bind (and connect to) the path cut to what fits: another file
      const address: Address = { _tag: "Unix", path: long }
      for (const attempt of [Effect.scoped(Effect.asVoid(listen(address))), Effect.scoped(Effect.asVoid(connect(address)))]) {
        const e = expectError(yield* Effect.flip(attempt), ["BadAddress"])
        expect(e.detail).toContain("at most")
      }
      expect(Fs.readdirSync(dir)).toEqual([])
      // a path in a directory that does not exist: named as such (libuv says EACCES, "permission denied")
      const nowhere = expectError(
        yield* Effect.flip(Effect.scoped(listen({ _tag: "Unix", path: Path.join(dir, "none", "s.sock") }))),
        ["Listen"]
      )
      expect(nowhere.detail).toBe(`no such directory: ${Path.join(dir, "none")}`)
      // a path under a regular file: said in words, as for files ("listen ENOTDIR: not a directory /x/s.sock")
      const file = Path.join(dir, "file")
      Fs.writeFileSync(file, "")
      const under: Address = { _tag: "Unix", path: Path.join(file, "s.sock") }
      for (const attempt of [Effect.scoped(Effect.asVoid(listen(under))), Effect.scoped(Effect.asVoid(connect(under)))]) {
        expect(expectError(yield* Effect.flip(attempt), ["Listen", "Connect"]).detail).toBe(
          "a component of the path is not a directory"
        )
      }
      Fs.rmSync(file)
      // the longest path that fits works
      yield* Effect.scoped(Effect.gen(function*() {
        const listener = yield* listen({ _tag: "Unix", path: fits })
        const [client] = yield* Effect.all([connect(listener.address), listener.accept], { concurrency: 2 })
        yield* client.write([Buffer.from("ok")])
      }))
      Fs.rmSync(dir, { recursive: true, force: true })
    })))
})

describe("listen", () => {
  it.live("tcp 127.0.0.1 port 0 reports the real port", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* listen(LOOPBACK)
      expect(listener.address._tag).toBe("Tcp")
      const port = listener.address._tag === "Tcp" ? listener.address.port : 0
      expect(port).toBeGreaterThan(0)
      expect(formatAddress(listener.address)).toBe(`tcp:127.0.0.1:${port}`)
      const [client, server] = yield* Effect.all([connect(addr(`tcp:127.0.0.1:${port}`)), listener.accept], {
        concurrency: 2
      })
      yield* client.write([Buffer.from("ping")])
      expect((yield* server.read(4)).toString()).toBe("ping")
      expect(client.peer).toBe(`tcp:127.0.0.1:${port}`)
      expect(server.peer).toContain("127.0.0.1")
    })))

  it.live.skipIf(!ipv6Available)("tcp [::1] works", () =>
    leakFree(Effect.gen(function*() {
      const { client, listener, server } = yield* pair(addr("tcp:[::1]:0"))
      expect(formatAddress(listener.address)).toMatch(/^tcp:\[::1\]:\d+$/)
      // the peer as a uri writes it: "::1:40000" reads as one address
      expect(server.peer).toMatch(/^tcp:\[::1\]:\d+ \(from \[::1\]:\d+\)$/)
      yield* server.write([Buffer.from("v6")])
      expect((yield* client.read(2)).toString()).toBe("v6")
    })))

  it.live("tcp:localhost connects to a 127.0.0.1 listener", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* listen(LOOPBACK)
      const port = listener.address._tag === "Tcp" ? listener.address.port : 0
      const [client, server] = yield* Effect.all([connect(addr(`tcp:localhost:${port}`)), listener.accept], {
        concurrency: 2
      })
      yield* client.write([Buffer.from("local")])
      expect((yield* server.read(5)).toString()).toBe("local")
    })))

  it.live("unix socket works, and the socket file is removed when the scope closes", () => {
    const path = tempSocketPath("listen")
    return leakFree(Effect.gen(function*() {
      yield* Effect.scoped(Effect.gen(function*() {
        const { client, listener, server } = yield* pair(addr(`unix:${path}`))
        expect(listener.address).toStrictEqual({ _tag: "Unix", path })
        expect(Fs.existsSync(path)).toBe(true)
        yield* client.write([Buffer.from("over unix")])
        expect((yield* server.read(9)).toString()).toBe("over unix")
        yield* server.write([Buffer.from("back")])
        expect((yield* client.read(4)).toString()).toBe("back")
      }))
      expect(Fs.existsSync(path)).toBe(false)
      // and the path can be listened on again
      const again = yield* listen(addr(`unix:${path}`))
      expect(again.address).toStrictEqual({ _tag: "Unix", path })
    }))
  })

  it.live("closing a listener accepts nothing more while it closes the connections nobody took", () => {
    const path = tempSocketPath("late")
    const clients: Array<Net.Socket> = []
    const raw = () => {
      const socket = Net.connect({ path }).on("error", () => {})
      clients.push(socket)
      return socket
    }
    return leakFree(Effect.gen(function*() {
      yield* Effect.scoped(Effect.gen(function*() {
        const before = openHandles().PipeWrap ?? 0
        yield* listen(addr(`unix:${path}`))
        // a connection accepted and never taken: the listener's close destroys it and awaits its close
        raw()
        while ((openHandles().PipeWrap ?? 0) < before + 3) yield* nextTurn // listener, client, accepted
        // a connection arriving as the listener closes (this finalizer runs just before the listener's)
        yield* Effect.addFinalizer(() => Effect.sync(() => void raw()))
        // fibers resume in the check phase, after the loop polled for connections: the window is every time
      })).pipe(Effect.withScheduler({ scheduleTask: (task) => void setImmediate(task), shouldYield: () => false }))
    }).pipe(Effect.ensuring(Effect.sync(() => clients.forEach((socket) => socket.destroy())))))
  })

  it.live("the Transport service layer exposes connect and listen", () =>
    leakFree(Effect.gen(function*() {
      const transport = yield* Transport
      const listener = yield* transport.listen(LOOPBACK)
      const [client, server] = yield* Effect.all([transport.connect(listener.address), listener.accept], {
        concurrency: 2
      })
      yield* client.write([Buffer.from("svc")])
      expect((yield* server.read(3)).toString()).toBe("svc")
    }).pipe(Effect.provide(layer))))
})

/**
 * Leaves a Unix socket file at `path` as a listener killed with SIGKILL does: a child process binds it and is
 * killed before it could close (and unlink) it.
 */
const staleSocketAt = (path: string) =>
  Effect.promise(() =>
    new Promise<void>((resolve, reject) => {
      const child = ChildProcess.spawn(process.execPath, [
        "-e",
        `require("node:net").createServer().listen(${JSON.stringify(path)}, () => process.stdout.write("up"))`
      ], { stdio: ["ignore", "pipe", "inherit"] })
      child.stdout!.once("data", () => child.kill("SIGKILL"))
      child.once("error", reject)
      child.once("exit", (_code, signal) =>
        signal === "SIGKILL" ? resolve() : reject(new Error(`the child exited by itself (${signal})`)))
    })
  )

describe("listen on unix: where something already is", () => {
  it.live("a socket file left by a SIGKILLed listener is removed, and the path is listened on", () => {
    const path = tempSocketPath("stale")
    return leakFree(Effect.gen(function*() {
      yield* staleSocketAt(path)
      expect(Fs.lstatSync(path).isSocket()).toBe(true)
      // nobody accepts there: connecting is refused
      const refused = yield* Effect.flip(Effect.scoped(connect(addr(`unix:${path}`))))
      expectError(refused, ["Connect"], "connection refused")
      yield* Effect.scoped(Effect.gen(function*() {
        const { client, server } = yield* pair(addr(`unix:${path}`))
        yield* client.write([Buffer.from("fresh")])
        expect((yield* server.read(5)).toString()).toBe("fresh")
      }))
      expect(Fs.existsSync(path)).toBe(false)
    }))
  })

  it.live("a live listener at the path: address already in use, something listens there; it stays and works", () => {
    const path = tempSocketPath("live")
    return leakFree(Effect.gen(function*() {
      const accepted: Array<Net.Socket> = []
      const other = yield* Effect.acquireRelease(
        Effect.async<Net.Server>((resume) => {
          const server = Net.createServer((socket) => void accepted.push(socket))
          server.listen(path, () => resume(Effect.succeed(server)))
        }),
        (server) =>
          Effect.async<void>((resume) => {
            for (const socket of accepted) socket.destroy()
            server.close(() => resume(Effect.void))
          })
      )
      const e = expectError(yield* Effect.flip(listen(addr(`unix:${path}`))), ["Listen"])
      expect(e.message).toBe(`unix:${path}: address already in use: something is listening on it`)
      expect(Fs.lstatSync(path).isSocket()).toBe(true)
      // the other listener still gets connections
      yield* Effect.scoped(connect(addr(`unix:${path}`)))
      expect(other.listening).toBe(true)
    }))
  })

  // two listeners making way at one path at once (two recv started together where a killed one left its socket):
  // both found it stale, the first removed it and listened, and the second then removed the first's live socket
  // file and listened too. The first listened on a file nobody could reach any longer (its source was turned away
  // by the second), and its close removed the second's file. strace holds the command's unlink of the stale file
  // (the moment it has found it stale) while this process listens at the path
  it("two listeners clearing a stale socket at once: one listens, the other is told the address is in use (strace holds the first one's unlink)", async (ctx) => {
    if (ChildProcess.spawnSync("strace", ["-f", "-qq", "-o", "/dev/null", "true"]).status !== 0) return ctx.skip("strace cannot run here")
    const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "multifd-stale-race-"))
    let pid: number | undefined
    try {
      const path = Path.join(dir, "recv.sock")
      await Effect.runPromise(staleSocketAt(path))
      const recv = start(["recv", `unix:${path}`, "--out", Path.join(dir, "out.img")], {
        under: ["strace", "-f", "-qq", "-o", "|cat", "-P", path, "-e", "trace=unlink,unlinkat", "-e",
          "inject=unlink,unlinkat:delay_enter=2000000"]
      })
      const ended = recv.finished.then((f) => {
        throw new Error(`recv ended (${f.code}) early: ${f.stderr}`)
      })
      let traced = ""
      // strace writes the call as it starts ("unlink(\"...\"", its end after the delay)
      await Promise.race([ended, new Promise<void>((resolve) => {
        const check = () => {
          if (!traced.includes("unlink")) return
          recv.child.stdout!.off("data", check)
          resolve()
        }
        recv.child.stdout!.setEncoding("utf8").on("data", (s: string) => {
          traced += s
          check()
        })
      })])
      const here = await Effect.runPromise(Effect.scoped(Effect.either(listen(addr(`unix:${path}`)))))
      await Promise.race([ended, new Promise<void>((resolve) => {
        const check = () => {
          if (/listening on/.test(recv.stderr())) resolve()
        }
        recv.child.stderr!.on("data", check)
        check()
      })])
      expect(Either.isLeft(here) ? here.left.message : "listening here too").toBe(
        `unix:${path}: address already in use: something is listening on it`
      )
      // the command's socket is at the path and takes connections
      await Effect.runPromise(Effect.scoped(connect(addr(`unix:${path}`))))
      // the command itself (strace's child), by the pid in its temporary file's name
      const partial = Fs.readdirSync(dir).find((name) => name.endsWith(".partial"))!
      pid = Number(/\.(\d+)\.partial$/.exec(partial)![1])
      process.kill(pid, "SIGTERM")
      expect((await recv.finished).code).toBe(143)
      expect(Fs.existsSync(path)).toBe(false)
    } finally {
      if (pid !== undefined) {
        try {
          process.kill(pid, "SIGKILL")
        } catch {
          // gone
        }
      }
      killChildren()
      Fs.rmSync(dir, { recursive: true, force: true })
    }
  })

  it.live("a regular file or a directory at the path: an error that says so, and it is left alone", () => {
    const file = tempSocketPath("file")
    const dir = tempSocketPath("dir")
    return leakFree(Effect.gen(function*() {
      Fs.writeFileSync(file, "not a socket")
      Fs.mkdirSync(dir)
      try {
        const e = expectError(yield* Effect.flip(listen(addr(`unix:${file}`))), ["Listen"])
        expect(e.message).toBe(`unix:${file}: address already in use: ${file} is a regular file, not a socket (left alone)`)
        expect(Fs.readFileSync(file, "utf8")).toBe("not a socket")
        const d = expectError(yield* Effect.flip(listen(addr(`unix:${dir}`))), ["Listen"])
        expect(d.message).toBe(`unix:${dir}: address already in use: ${dir} is a directory, not a socket (left alone)`)
        expect(Fs.statSync(dir).isDirectory()).toBe(true)
      } finally {
        Fs.rmSync(file, { force: true })
        Fs.rmSync(dir, { recursive: true, force: true })
      }
    }))
  })
})

describe("listen on unix: who may connect", () => {
  /** Whether a process of user nobody can connect to the socket at `path`: "connected", or the error's code. */
  const connectAsNobody = (path: string) =>
    Effect.promise(() =>
      new Promise<string>((resolve) => {
        const script = `require("node:net").connect(${JSON.stringify(path)})` +
          `.on("connect", () => { console.log("connected"); process.exit(0) })` +
          `.on("error", (e) => { console.log(e.code); process.exit(0) })`
        const child = ChildProcess.spawn("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "--", process.execPath, "-e", script], {
          stdio: ["ignore", "pipe", "inherit"]
        })
        let out = ""
        child.stdout.on("data", (chunk) => (out += chunk))
        child.once("error", (error) => resolve(`cannot run: ${error.message}`))
        child.once("close", () => resolve(out.trim()))
      })
    )

  // a socket file's mode comes from the umask: under umask 000 (a service manager's, a container's) it was
  // srwxrwxrwx, and any local user could connect and, without TLS, offer the migration its pages
  it.live("under umask 000 the socket file is not writable by others: another local user cannot connect", (ctx) => {
    const path = tempSocketPath("umask")
    return leakFree(Effect.gen(function*() {
      const previous = process.umask(0)
      yield* Effect.addFinalizer(() => Effect.sync(() => void process.umask(previous)))
      const listener = yield* listen(addr(`unix:${path}`))
      // nothing else this process made meanwhile is touched: the umask is the one it set
      expect(process.umask()).toBe(0)
      expect((Fs.lstatSync(path).mode & 0o777).toString(8)).toBe("775")
      // its owner still connects
      yield* Effect.scoped(Effect.all([connect(listener.address), listener.accept], { concurrency: 2 }))
      if (process.geteuid?.() !== 0 || ChildProcess.spawnSync("setpriv", ["--version"]).status !== 0) {
        return ctx.skip("needs root and setpriv, to connect as another user")
      }
      // the directory lets everyone through (/tmp): only the socket's mode stops nobody
      expect(yield* connectAsNobody(path)).toBe("EACCES")
    }).pipe(Effect.scoped))
  })

  it.live("under umask 022 and 077 the socket file has what the umask gives", () =>
    leakFree(Effect.gen(function*() {
      for (const [mask, mode] of [[0o022, "755"], [0o002, "775"], [0o077, "700"]] as const) {
        const path = tempSocketPath("umask")
        yield* Effect.scoped(Effect.gen(function*() {
          const previous = process.umask(mask)
          yield* Effect.addFinalizer(() => Effect.sync(() => void process.umask(previous)))
          yield* listen(addr(`unix:${path}`))
          expect((Fs.lstatSync(path).mode & 0o777).toString(8)).toBe(mode)
        }))
      }
    })))
})

describe("round trip", () => {
  it.live("vectored write, exact reads, readInto, readScatter, peek, atEnd", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(LOOPBACK)

      // several chunks in one vectored write, read back with lengths that straddle the chunk boundaries
      const a = bytes(100, 1)
      const b = bytes(3000, 2)
      const c = new Uint8Array(bytes(7, 3)) // a plain Uint8Array, not a Buffer
      yield* client.write([a, b, c])
      yield* client.write([]) // nothing to write: completes at once
      expect(yield* server.read(0)).toHaveLength(0)
      const first = yield* server.read(50)
      const second = yield* server.read(3050)
      const third = yield* server.read(7)
      expect(Buffer.concat([first, second, third])).toStrictEqual(Buffer.concat([a, b, c]))

      // readInto at an offset leaves the rest of the target alone
      const payload = bytes(20, 4)
      yield* client.write([payload])
      const target = Buffer.alloc(100, 0xee)
      yield* server.readInto(target, 37, 20)
      expect(target.subarray(37, 57)).toStrictEqual(payload)
      expect(target.subarray(0, 37).every((x) => x === 0xee)).toBe(true)
      expect(target.subarray(57).every((x) => x === 0xee)).toBe(true)

      // readScatter: the i-th page goes to offsets[i], in any order
      const pages = [bytes(4096, 10), bytes(4096, 11), bytes(4096, 12)]
      yield* client.write(pages)
      const ram = Buffer.alloc(3 * 4096)
      yield* server.readScatter(ram, [8192, 0, 4096], 3, 4096)
      expect(ram.subarray(8192, 12288)).toStrictEqual(pages[0])
      expect(ram.subarray(0, 4096)).toStrictEqual(pages[1])
      expect(ram.subarray(4096, 8192)).toStrictEqual(pages[2])
      // a scatter whose pages arrive in pieces, and a Uint32Array of offsets
      const fork = yield* Effect.fork(server.readScatter(ram, new Uint32Array([4096, 0]), 2, 4096))
      yield* client.write([pages[2]!.subarray(0, 1000)])
      yield* client.write([pages[2]!.subarray(1000), pages[0]!.subarray(0, 3)])
      yield* client.write([pages[0]!.subarray(3)])
      yield* Fiber.join(fork)
      expect(ram.subarray(4096, 8192)).toStrictEqual(pages[2])
      expect(ram.subarray(0, 4096)).toStrictEqual(pages[0])
      yield* server.readScatter(ram, [], 0, 4096) // nothing asked: nothing read

      // peek does not consume; atEnd is false while data is pending (it waits for the data to arrive)
      yield* client.write([Buffer.from("MAGIC"), Buffer.from("rest")])
      expect(yield* server.atEnd).toBe(false)
      expect((yield* server.peek(4)).toString()).toBe("MAGI")
      expect((yield* server.peek(4)).toString()).toBe("MAGI")
      expect((yield* server.peek(0)).length).toBe(0)
      expect((yield* server.read(5)).toString()).toBe("MAGIC")
      expect(yield* server.atEnd).toBe(false)
      expect((yield* server.read(4)).toString()).toBe("rest")
      // a peek for more than is buffered waits for the rest (without spinning) and still consumes nothing
      const peeking = yield* Effect.fork(server.peek(8))
      yield* client.write([Buffer.from("abc")])
      // (one reader at a time: no other read may run while the peek waits; a few turns let "abc" arrive alone)
      for (let i = 0; i < 5; i++) yield* nextTurn
      yield* client.write([Buffer.from("defgh")])
      expect((yield* noHang(Fiber.join(peeking), "peek for more than is buffered")).toString()).toBe("abcdefgh")
      expect((yield* server.read(8)).toString()).toBe("abcdefgh")

      // the other direction, then a graceful end from each side
      yield* server.write([Buffer.from("reply")])
      expect((yield* client.read(5)).toString()).toBe("reply")
      yield* client.write([Buffer.from("last")])
      yield* client.end
      yield* client.end // ending twice is harmless
      expect(yield* server.atEnd).toBe(false)
      expect((yield* server.read(4)).toString()).toBe("last")
      expect(yield* server.atEnd).toBe(true)
      expect(yield* server.atEnd).toBe(true)
      expectError(yield* Effect.flip(server.read(1)), ["Closed"], "peer closed the connection")
      yield* server.end
      expect(yield* client.atEnd).toBe(true)
      // both sides ended gracefully: the sockets close by themselves, before the scope does it
      yield* noHang(Effect.all([closed(client), closed(server)]), "graceful close")
    })))

  it.live("large transfer (64 MiB in 512 KiB writes) with backpressure", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(LOOPBACK)
      const CHUNK = 512 * 1024
      const COUNT = 128
      const TOTAL = CHUNK * COUNT
      const base = Crypto.randomBytes(CHUNK)
      let written = 0
      let read = 0
      const sent = Crypto.createHash("sha256")

      const writer = yield* Effect.fork(Effect.gen(function*() {
        for (let i = 0; i < COUNT; i++) {
          const chunk = Buffer.from(base)
          for (let at = 0; at < CHUNK; at += 4096) chunk.writeUInt32BE(i, at) // every page names its chunk
          sent.update(chunk)
          yield* client.write([chunk])
          written += CHUNK
        }
      }))

      // do not read until the writer has stopped making progress: it must block, well short of the total
      let last = -1
      let still = 0
      while (still < 20 && written < TOTAL) {
        if (written === last) still++
        else {
          still = 0
          last = written
        }
        yield* nextTurn
      }
      const aheadWhenBlocked = written - read
      // what can be in flight: the reader's 8 MiB high-water mark plus the kernel's socket buffers
      expect(aheadWhenBlocked).toBeLessThan(48 * 1024 * 1024)
      expect(written).toBeLessThan(TOTAL)

      // then read slowly, in 1 MiB pieces with event-loop turns between them
      const received = Crypto.createHash("sha256")
      const block = Buffer.allocUnsafe(1024 * 1024)
      let maxAhead = aheadWhenBlocked
      while (read < TOTAL) {
        yield* server.readInto(block, 0, block.length)
        received.update(block)
        read += block.length
        maxAhead = Math.max(maxAhead, written - read)
        yield* nextTurn
        yield* nextTurn
      }
      yield* Fiber.join(writer)
      expect(written).toBe(TOTAL)
      expect(maxAhead).toBeLessThan(48 * 1024 * 1024)
      expect(received.digest("hex")).toBe(sent.digest("hex"))
      yield* client.end
      expect(yield* server.atEnd).toBe(true)
    })), 20_000)
})

describe("drained", () => {
  it.live("completes once every write called back: small writes (no 'drain' event) and large ones", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(addr("tcp:127.0.0.1:0"))
      yield* client.write([Buffer.from("small")])
      yield* noHang(client.drained, "drained after a small write")
      const big = Crypto.randomBytes(8 * 1024 * 1024)
      const reader = yield* Effect.fork(server.read(5 + big.length))
      yield* client.write([big])
      yield* noHang(client.drained, "drained after a large write")
      const got = yield* noHang(Fiber.join(reader), "the reader")
      expect(got.subarray(5).equals(big)).toBe(true)
    })))

  it.live("fails when the connection is destroyed before the bytes left", () =>
    leakFree(Effect.gen(function*() {
      const { client } = yield* pair(addr("tcp:127.0.0.1:0"))
      // nobody reads on the other side: a large write stays queued in user space
      yield* Effect.fork(client.write([Buffer.alloc(64 * 1024 * 1024)]))
      while (client.stream.writableLength === 0) yield* Effect.yieldNow()
      const drained = yield* Effect.fork(client.drained)
      yield* Effect.yieldNow()
      client.stream.destroy()
      const exit = yield* noHang(Fiber.await(drained), "drained after destroy")
      expect(Exit.isFailure(exit)).toBe(true)
    })))
})

describe("streams that copy what they are given (fromStream: TLS)", () => {
  it.live("a long write is handed over 1 MiB at a time (their copy stays small), in order, chunks split where needed", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* listen(addr("tcp:127.0.0.1:0"))
      const [raw, server] = yield* Effect.all([connect(listener.address), listener.accept], { concurrency: 2 })
      const client = yield* fromStream(raw.stream, "test peer")
      // what the stream is given per write call
      let largest = 0
      const write = client.stream.write.bind(client.stream)
      let pending = 0
      client.stream.cork = ((cork) => () => {
        pending = 0
        cork()
      })(client.stream.cork.bind(client.stream))
      client.stream.write = ((chunk: Uint8Array, ...rest: Array<unknown>) => {
        pending += chunk.length
        largest = Math.max(largest, pending)
        return (write as (...args: Array<unknown>) => boolean)(chunk, ...rest)
      }) as typeof client.stream.write
      // 13 MiB in chunks of odd sizes: groups end inside chunks
      const chunks = [3, 5, 1, 4].map((mib) => Crypto.randomBytes(mib * 1024 * 1024 + 4097))
      const total = chunks.reduce((n, c) => n + c.length, 0)
      const reader = yield* Effect.fork(server.read(total))
      yield* client.write(chunks)
      const got = yield* noHang(Fiber.join(reader), "the reader")
      expect(got.equals(Buffer.concat(chunks))).toBe(true)
      expect(largest).toBe(COPIED_WRITE_BUFFER)
      expect(COPIED_WRITE_BUFFER).toBe(1024 * 1024)
    })))
})

describe("errors", () => {
  it.live("connect to a closed port fails with Connect: connection refused", () =>
    leakFree(Effect.gen(function*() {
      const address = yield* Effect.scoped(Effect.map(listen(LOOPBACK), (l) => l.address))
      const error = yield* Effect.flip(connect(address))
      const e = expectError(error, ["Connect"], "connection refused")
      expect(e.address).toBe(formatAddress(address))
    })))

  it.live("connect to a unix path that does not exist fails at once with: no such socket", () =>
    leakFree(Effect.gen(function*() {
      const path = tempSocketPath("missing")
      expectError(yield* Effect.flip(connect(addr(`unix:${path}`))), ["Connect"], "no such socket")
    })))

  it.live("a unix:~/... path the shell did not expand: listen and connect say so (no directory ~ here)", () =>
    leakFree(Effect.gen(function*() {
      expect(Fs.existsSync("~")).toBe(false)
      const hint = " (the shell does not expand ~ inside unix:~/...: write the path out, as unix:$HOME/...)"
      const listened = expectError(yield* Effect.flip(Effect.scoped(listen(addr("unix:~/multifd-tilde.sock")))), ["Listen"])
      expect(listened.detail).toBe(`no such directory: ~${hint}`)
      const connected = expectError(yield* Effect.flip(Effect.scoped(connect(addr("unix:~/multifd-tilde.sock")))), ["Connect"])
      expect(connected.detail).toBe(`no such socket${hint}`)
    })))

  it.live("connect to a unix path that holds a regular file or a directory says so (it read: connection refused)", () => {
    const file = tempSocketPath("connect-file")
    const dir = tempSocketPath("connect-dir")
    return leakFree(Effect.gen(function*() {
      Fs.writeFileSync(file, "not a socket")
      Fs.mkdirSync(dir)
      try {
        const e = expectError(yield* Effect.flip(connect(addr(`unix:${file}`))), ["Connect"])
        expect(e.message).toBe(`unix:${file}: ${file} is a regular file, not a socket`)
        const d = expectError(yield* Effect.flip(connect(addr(`unix:${dir}`))), ["Connect"])
        expect(d.message).toBe(`unix:${dir}: ${dir} is a directory, not a socket`)
      } finally {
        Fs.rmSync(file, { force: true })
        Fs.rmSync(dir, { recursive: true, force: true })
      }
    }))
  })

  it("errors of connect and listen read as words, not Node's 'connect EHOSTUNREACH 2001:db8::1:4444'", () => {
    const nodeError = (code: string, syscall = "connect") =>
      Object.assign(new Error(`${syscall} ${code} 2001:db8::1:4444`), { code, syscall })
    const said: Record<string, string> = {
      EHOSTUNREACH: "no route to host",
      ENETUNREACH: "network is unreachable",
      ETIMEDOUT: "connection timed out",
      ECONNABORTED: "connection aborted",
      EPROTOTYPE: "not a stream socket (a datagram socket?)",
      EAI_AGAIN: "host name lookup failed for now (temporary failure in name resolution)"
    }
    for (const [code, words] of Object.entries(said)) expect({ code, said: describeError(nodeError(code)) }).toEqual({ code, said: words })
    // any other code in the system's words, with the code (a firewall's EPERM said "connect EPERM 2001:db8::1:4444")
    const numbered = (code: string, errno: number, syscall = "connect") => Object.assign(nodeError(code, syscall), { errno })
    expect(describeError(numbered("EPERM", -1))).toBe("operation not permitted (EPERM)")
    expect(describeError(numbered("ENOBUFS", -105))).toBe("no buffer space available (ENOBUFS)")
    expect(describeError(numbered("EAI_FAIL", -3004, "getaddrinfo"))).toBe("host name lookup failed: permanent failure (EAI_FAIL)")
    // an errno the system does not know, or none: Node's words as they are
    expect(describeError(numbered("EWHAT", -99999))).toBe("connect EWHAT 2001:db8::1:4444")
  })

  it.live("reading past the peer's end mid-read: Closed, after N of M bytes", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(LOOPBACK)
      yield* client.write([bytes(10, 1)])
      yield* client.end
      expectError(yield* Effect.flip(server.read(20)), ["Closed"], "after 10 of 20 bytes")
      // scatter reads count the bytes they did get
      const { client: c2, server: s2 } = yield* pair(LOOPBACK)
      yield* c2.write([bytes(5000, 1)])
      yield* c2.end
      expectError(
        yield* Effect.flip(s2.readScatter(Buffer.alloc(8192), [4096, 0], 2, 4096)),
        ["Closed"],
        "after 5000 of 8192 bytes"
      )
      // peek too
      const { client: c3, server: s3 } = yield* pair(LOOPBACK)
      yield* c3.write([bytes(3, 1)])
      yield* c3.end
      expectError(yield* Effect.flip(s3.peek(4)), ["Closed"], "after 3 of 4 bytes")
      expect((yield* s3.read(3))).toStrictEqual(bytes(3, 1))
      expect(yield* s3.atEnd).toBe(true)
    })))

  it.live("peer destroyed or reset mid-read: the pending read fails, it does not hang", () =>
    leakFree(Effect.gen(function*() {
      // destroyed: FIN after 10 bytes
      const { client, server } = yield* pair(LOOPBACK)
      yield* client.write([bytes(10, 1)])
      expect((yield* server.peek(10)).length).toBe(10)
      const reading = yield* Effect.fork(Effect.flip(server.read(100)))
      client.stream.destroy()
      expectError(yield* noHang(Fiber.join(reading), "read after destroy"), ["Closed"], "after 10 of 100 bytes")

      // reset: RST
      const { client: c2, server: s2 } = yield* pair(LOOPBACK)
      yield* c2.write([bytes(10, 1)])
      expect((yield* s2.peek(10)).length).toBe(10)
      const reading2 = yield* Effect.fork(Effect.flip(s2.read(100)))
      ;(c2.stream as Net.Socket).resetAndDestroy()
      // where it broke, as for a close (it said "connection reset by peer" alone: at a message's start, or inside it?)
      expectError(yield* noHang(Fiber.join(reading2), "read after reset"), ["Reset"], "connection reset by peer after 10 of 100 bytes")
      expectError(yield* Effect.flip(s2.atEnd), ["Reset"])
    })))

  it.live("a connection whose peer is gone before the first read reports it (no hang)", () =>
    leakFree(Effect.gen(function*() {
      // the peer ends before we ever read (an accepted socket reads nothing before the first read, so that a
      // TLS upgrade can take it over: it sees the end then)
      const { client, server } = yield* pair(LOOPBACK)
      yield* client.end
      for (let i = 0; i < 20; i++) yield* nextTurn
      expect(yield* noHang(server.atEnd, "atEnd on a closed connection")).toBe(true)
      expectError(yield* noHang(Effect.flip(server.read(1)), "read"), ["Closed"], "peer closed the connection")
      expect(yield* noHang(client.atEnd, "client atEnd")).toBe(true)

      // the peer resets before we ever read
      const { client: c2, server: s2 } = yield* pair(LOOPBACK)
      ;(c2.stream as Net.Socket).resetAndDestroy()
      yield* noHang(closed(c2), "client socket close after reset")
      for (let i = 0; i < 20; i++) yield* nextTurn
      expectError(yield* noHang(Effect.flip(s2.read(4)), "read after reset"), ["Reset", "Closed"])
      expectError(yield* noHang(Effect.flip(s2.peek(4)), "peek after reset"), ["Reset", "Closed"])
      expectError(yield* s2.write([Buffer.from("x")]).pipe(Effect.flip), ["Reset", "Closed", "Write"])
    })))

  // a write after the peer's FIN was read failed "connection is closed": which side closed it? (a source's channel
  // said "multifd channel 0: tcp:...: connection is closed" when its write came before its watch of the end)
  it.live("writing after the peer closed the connection (its end read): Closed, saying the peer closed it", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(LOOPBACK)
      yield* client.end
      expect(yield* noHang(server.atEnd, "atEnd")).toBe(true)
      yield* noHang(closed(server), "the server side's close after the peer's end")
      expectError(yield* Effect.flip(server.write([Buffer.from("x")])), ["Closed"], "peer closed the connection")
    })))

  it.live("writing after the peer vanished eventually fails (Write, Closed or Reset), not a hang", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* listen(LOOPBACK)
      const [client] = yield* Effect.all([connect(listener.address), Effect.scoped(listener.accept)], {
        concurrency: 2
      })
      // the accepted connection's scope has closed: it is destroyed
      const chunk = Buffer.alloc(64 * 1024, 1)
      let writes = 0
      const error = yield* noHang(
        Effect.flip(Effect.forever(Effect.tap(client.write([chunk]), () => writes++))),
        "writes to a vanished peer"
      )
      expectError(error, ["Write", "Closed", "Reset"])
      expect(writes).toBeLessThan(10_000)
      // and every later write fails at once
      expectError(yield* Effect.flip(client.write([chunk])), ["Write", "Closed", "Reset"])
    })))

  it.live("listening twice on the same address fails with Listen: address already in use", () =>
    leakFree(Effect.gen(function*() {
      const first = yield* listen(LOOPBACK)
      const e = expectError(yield* Effect.flip(listen(first.address)), ["Listen"], "address already in use")
      expect(e.address).toBe(formatAddress(first.address))
      const path = tempSocketPath("twice")
      yield* listen(addr(`unix:${path}`))
      expectError(yield* Effect.flip(listen(addr(`unix:${path}`))), ["Listen"], "address already in use")
      // the first listeners still work
      const [client, server] = yield* Effect.all([connect(first.address), first.accept], { concurrency: 2 })
      yield* client.write([Buffer.from("ok")])
      expect((yield* server.read(2)).toString()).toBe("ok")
    })))
})

describe("interruption", () => {
  it.live("an accept run uninterruptibly (an acquire, Effect.uninterruptible) returns the connection that came, also interrupted meanwhile", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* listen(LOOPBACK)
      // forked uninterruptible, the fiber as a whole: its exit is the accept's own
      const accepting = yield* Effect.uninterruptible(Effect.forkDaemon(Effect.scoped(Effect.gen(function*() {
        const connection = yield* listener.accept
        return (yield* connection.read(5)).toString()
      }))))
      yield* nextTurn
      // the race's loser, the listener's end (which does not come), inherited the uninterruptibility: the accept
      // waited for it for ever once a connection came; and a second interruption reached the race's sides at once
      accepting.unsafeInterruptAsFork(accepting.id())
      const client = yield* connect(listener.address)
      yield* client.write([Buffer.from("hello")])
      const exit = yield* noHang(Fiber.await(accepting), "an uninterruptible accept")
      expect(exit).toEqual(Exit.succeed("hello"))
    })))

  it.live("interrupting a pending accept returns promptly; the next connection is still accepted", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* listen(LOOPBACK)
      const accepting = yield* Effect.fork(Effect.scoped(listener.accept))
      yield* Effect.yieldNow()
      const exit = yield* noHang(Fiber.interrupt(accepting), "interrupting accept")
      expect(Exit.isInterrupted(exit)).toBe(true)
      const { client, server } = yield* Effect.all({ client: connect(listener.address), server: listener.accept }, {
        concurrency: 2
      })
      yield* client.write([Buffer.from("after")])
      expect((yield* server.read(5)).toString()).toBe("after")
    })))

  it.live("interrupting a pending read returns promptly; the bytes go to the next read", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(LOOPBACK)
      for (const pending of [server.read(10), server.peek(10), server.atEnd, server.readInto(Buffer.alloc(10), 0, 10)]) {
        const fiber = yield* Effect.fork(pending)
        yield* Effect.yieldNow()
        const exit = yield* noHang(Fiber.interrupt(fiber), "interrupting a read")
        expect(Exit.isInterrupted(exit)).toBe(true)
      }
      yield* client.write([Buffer.from("0123456789")])
      expect((yield* server.read(10)).toString()).toBe("0123456789")
    })))

  it.live("interrupting a blocked writer and a reader mid-transfer, then closing the scope, leaves nothing", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(LOOPBACK)
      const started = yield* Deferred.make<void>()
      const chunk = Buffer.alloc(512 * 1024, 7)
      const writer = yield* Effect.fork(
        Effect.forever(Effect.zipRight(client.write([chunk]), Deferred.succeed(started, undefined)))
      )
      yield* Deferred.await(started)
      yield* server.read(1000) // some arrived
      const reader = yield* Effect.fork(server.read(1 << 30)) // never completes
      yield* Effect.yieldNow()
      yield* noHang(Fiber.interrupt(writer), "interrupting the writer")
      yield* noHang(Fiber.interrupt(reader), "interrupting the reader")
    })))
})

describe("scope", () => {
  it.live("closing the scope of listen + connect + accept closes every handle", () =>
    leakFree(Effect.gen(function*() {
      for (const address of [LOOPBACK, addr(`unix:${tempSocketPath("scope")}`)]) {
        yield* expectNoLeaks(Effect.scoped(Effect.gen(function*() {
          const { client, server } = yield* pair(address)
          yield* client.write([Buffer.from("x")])
          yield* server.read(1)
        })))
      }
    })))

  it.live("a failed connect or listen inside a scope leaves no handle", () =>
    leakFree(Effect.gen(function*() {
      const address = yield* Effect.scoped(Effect.map(listen(LOOPBACK), (l) => l.address))
      yield* expectNoLeaks(Effect.scoped(Effect.flip(connect(address))))
      const first = yield* listen(LOOPBACK)
      yield* expectNoLeaks(Effect.scoped(Effect.flip(listen(first.address))))
    })))

  it.live("the listener's release destroys accepted connections, taken or not, and does not wait for them", () =>
    leakFree(Effect.gen(function*() {
      const before = openHandles()["TCPSocketWrap"] ?? 0
      const listenerScope = yield* Scope.make()
      const listener = yield* Scope.extend(listen(LOOPBACK), listenerScope)
      // three clients in the outer scope; one connection accepted into the outer scope (outlives the listener)
      const clients = yield* Effect.all([connect(listener.address), connect(listener.address), connect(listener.address)])
      const taken = yield* listener.accept
      // the other two were accepted by the server but never taken by `accept`
      yield* untilTcpSockets(before + 6)
      const pendingRead = yield* Effect.fork(Effect.flip(taken.read(1)))
      yield* Effect.yieldNow()

      yield* noHang(Scope.close(listenerScope, Exit.void), "closing the listener")

      expectError(yield* noHang(Fiber.join(pendingRead), "the taken connection's read"), ["Closed", "Reset"])
      expect(taken.stream.destroyed).toBe(true)
      // every client sees its connection end
      for (const client of clients) {
        const end = yield* noHang(Effect.either(client.atEnd), "client sees the end")
        if (Either.isRight(end)) expect(end.right).toBe(true)
        else expectError(end.left, ["Closed", "Reset"])
      }
    })))

  it.live("closing the scope while connect is pending (DNS) leaves no handle", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* listen(LOOPBACK)
      const port = listener.address._tag === "Tcp" ? listener.address.port : 0
      const fiber = yield* Effect.fork(Effect.scoped(connect(addr(`tcp:localhost:${port}`))))
      yield* noHang(Fiber.interrupt(fiber), "interrupting connect")
    })))
})
