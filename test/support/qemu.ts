/**
 * A real QEMU for interop tests: a source `qemu-system-x86_64 -machine none,memory-backend=mem -accel tcg
 * -nodefaults -S` whose only RAM is a file (mapped privately, so the image is never modified), a running guest
 * (`-machine pc` with a BIOS of test/support/guest.ts), and destinations (`-incoming defer`, their RAM a shared
 * file), driven over QMP on a Unix socket by a small QMP client.
 *
 * Everything is scoped: the QMP socket is destroyed and the QEMU process is ended (quit over QMP, then SIGKILL
 * of that one pid if it lingers) when the scope closes, and the release waits for the process to exit.
 */
import * as Data from "effect/Data"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"

/** The QEMU binary the tests drive. */
export const QEMU_BINARY = process.env["QEMU"] ?? "qemu-system-x86_64"

/** The version line of the installed QEMU, or why there is none. */
export const probe = (): { readonly version: string; readonly major: number } | { readonly missing: string } => {
  const result = ChildProcess.spawnSync(QEMU_BINARY, ["--version"], { encoding: "utf8", timeout: 10_000 })
  if (result.error !== undefined) return { missing: `${QEMU_BINARY} is not installed (${result.error.message})` }
  const line = (result.stdout ?? "").split("\n")[0] ?? ""
  const m = /version (\d+)\.(\d+)/.exec(line)
  if (result.status !== 0 || m === null) return { missing: `${QEMU_BINARY} --version failed: ${line || result.stderr}` }
  const major = Number(m[1])
  return major >= 10
    ? { version: line, major }
    : { missing: `${QEMU_BINARY} is ${line}; these tests need QEMU 10 (run .ci/install-qemu.sh)` }
}

/** A QMP command that failed, or a QMP connection that broke. */
export class QmpError extends Data.TaggedError("QmpError")<{ readonly detail: string }> {
  override get message(): string {
    return `QMP: ${this.detail}`
  }
}

/** A QMP event. */
export interface QmpEvent {
  readonly event: string
  readonly data?: Record<string, unknown>
}

/** A QMP connection: commands in order, events collected. */
export interface Qmp {
  readonly execute: (command: string, args?: Record<string, unknown>) => Effect.Effect<unknown, QmpError>
  /** Waits for an event (already received or still to come) that satisfies `pred`. */
  readonly waitEvent: (
    name: string,
    pred: (data: Record<string, unknown>) => boolean,
    timeout: Duration.DurationInput
  ) => Effect.Effect<QmpEvent, QmpError>
}

/** Connects to QMP at `path` (retrying while QEMU creates the socket) and negotiates capabilities. */
export const connectQmp = (path: string, timeout: Duration.DurationInput = "20 seconds"): Effect.Effect<Qmp, QmpError, Scope.Scope> =>
  Effect.gen(function*() {
    const socket = yield* Effect.acquireRelease(
      Effect.async<Net.Socket, QmpError>((resume) => {
        const deadline = Date.now() + Duration.toMillis(Duration.decode(timeout))
        let current: Net.Socket | undefined
        let timer: NodeJS.Timeout | undefined
        const attempt = () => {
          const s = Net.connect({ path })
          current = s
          s.once("connect", () => {
            s.removeAllListeners("error")
            s.on("error", () => {})
            resume(Effect.succeed(s))
          })
          s.once("error", (e) => {
            s.destroy()
            if (Date.now() > deadline) resume(Effect.fail(new QmpError({ detail: `cannot connect to ${path}: ${e.message}` })))
            else timer = setTimeout(attempt, 20)
          })
        }
        attempt()
        return Effect.sync(() => {
          if (timer !== undefined) clearTimeout(timer)
          current?.destroy()
        })
      }),
      (s) =>
        Effect.async<void>((resume) => {
          if (s.closed) return resume(Effect.void)
          s.once("close", () => resume(Effect.void))
          s.destroy()
        })
    )
    // replies in order; events aside
    const events: Array<QmpEvent> = []
    const replies: Array<{ readonly return?: unknown; readonly error?: { readonly desc?: string } }> = []
    let closed: string | undefined
    let pending = ""
    // a change counter and every waiter woken: a waiter compares the count it saw before its check, so a change
    // between its check and its wait (the fiber may yield there) is not lost, nor one waiter's wake-up another's
    let changes = 0
    const waiters = new Set<() => void>()
    const notify = () => {
      changes++
      for (const w of [...waiters]) w()
    }
    socket.setEncoding("utf8")
    socket.on("data", (chunk: string) => {
      pending += chunk
      let nl: number
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl).trim()
        pending = pending.slice(nl + 1)
        if (line.length === 0) continue
        const message = JSON.parse(line) as Record<string, unknown>
        if ("event" in message) events.push(message as unknown as QmpEvent)
        else if ("return" in message || "error" in message) replies.push(message)
        // the greeting ({"QMP": ...}) is neither
      }
      notify()
    })
    socket.on("close", () => {
      closed = "QMP connection closed"
      notify()
    })
    const waitChange = (seen: number) =>
      Effect.async<void>((resume) => {
        if (changes !== seen) return resume(Effect.void)
        const w = () => {
          waiters.delete(w)
          resume(Effect.void)
        }
        waiters.add(w)
        return Effect.sync(() => waiters.delete(w))
      })
    const lock = yield* Effect.makeSemaphore(1)
    const execute = (command: string, args?: Record<string, unknown>) =>
      lock.withPermits(1)(Effect.gen(function*() {
        if (closed !== undefined) return yield* new QmpError({ detail: `${command}: ${closed}` })
        socket.write(JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }) + "\n")
        while (true) {
          const seen = changes
          if (replies.length > 0) break
          if (closed !== undefined) return yield* new QmpError({ detail: `${command}: ${closed}` })
          yield* waitChange(seen)
        }
        const reply = replies.shift()!
        if (reply.error !== undefined) return yield* new QmpError({ detail: `${command}: ${reply.error.desc ?? JSON.stringify(reply.error)}` })
        return reply.return
      })).pipe(
        Effect.timeoutFail({ duration: "30 seconds", onTimeout: () => new QmpError({ detail: `${command}: no reply in 30 s` }) })
      )
    const waitEvent = (name: string, pred: (data: Record<string, unknown>) => boolean, within: Duration.DurationInput) =>
      Effect.gen(function*() {
        while (true) {
          const seen = changes
          const i = events.findIndex((e) => e.event === name && pred(e.data ?? {}))
          if (i >= 0) return events.splice(i, 1)[0]!
          if (closed !== undefined) return yield* new QmpError({ detail: `waiting for ${name}: ${closed}` })
          yield* waitChange(seen)
        }
      }).pipe(
        Effect.timeoutFail({ duration: within, onTimeout: () => new QmpError({ detail: `no ${name} event in ${Duration.format(within)}` }) })
      )
    yield* execute("qmp_capabilities")
    return { execute, waitEvent }
  })

/** A running QEMU source. */
export interface QemuSource {
  readonly qmp: Qmp
  readonly pid: number
  /** Whatever QEMU printed on stderr so far. */
  readonly stderr: () => string
  /**
   * Waits until QEMU's stderr contains `text` (woken on each chunk QEMU prints; no polling), failing with what it
   * printed if `within` passes first: QEMU prints its error after the QMP event that reports it, now and then.
   */
  readonly waitStderr: (text: string, within: Duration.DurationInput) => Effect.Effect<void, QmpError>
  /** Kills this QEMU (SIGKILL to its pid) without waiting. */
  readonly kill: Effect.Effect<void>
}

let counter = 0

/** A fresh path under the OS temp dir for a QMP socket (short enough for `sun_path`). */
const socketPath = () => Path.join(Os.tmpdir(), `emfd-qmp-${process.pid}-${++counter}.sock`)

/**
 * Starts `qemu-system-x86_64 -machine none` with `image` as its only RAM (size = the file's size, mapped
 * privately and pre-faulted), paused, with QMP on a Unix socket.
 */
export const startSource = (
  image: string,
  size: number,
  extraArgs: ReadonlyArray<string> = [],
  machine = "none"
): Effect.Effect<QemuSource, QmpError, Scope.Scope> =>
  start({ name: "src", memPath: image, size, share: false, prealloc: true, incoming: false, extraArgs, machine })

/**
 * Starts a QEMU destination (`-incoming defer`) whose RAM is the file at `memPath` (shared, so the file holds
 * what it receives; `prealloc` off: a fresh, sparse file as an incoming VM has).
 */
export const startDestination = (memPath: string, size: number, prealloc = false): Effect.Effect<QemuSource, QmpError, Scope.Scope> =>
  start({ name: "dst", memPath, size, share: true, prealloc, incoming: true, extraArgs: [], machine: "none" })

/**
 * Starts a running guest: `-machine <machine>` (default `pc`) with `bios` as its firmware and `image` as its
 * RAM (mapped privately: the guest's writes never reach the file), not paused.
 */
export const startGuest = (
  image: string,
  size: number,
  bios: string,
  options: { readonly machine?: string | undefined; readonly extraArgs?: ReadonlyArray<string> | undefined } = {}
): Effect.Effect<QemuSource, QmpError, Scope.Scope> =>
  start({
    name: "src",
    memPath: image,
    size,
    share: false,
    prealloc: true,
    incoming: false,
    running: true,
    extraArgs: ["-bios", bios, ...(options.extraArgs ?? [])],
    machine: options.machine ?? "pc"
  })

/**
 * Starts a destination for a guest of `startGuest` (`-incoming defer`, not paused: it resumes the VM as soon
 * as a migration completes), its RAM the fresh file at `memPath` (shared: the file shows what the guest does).
 */
export const startGuestDestination = (
  memPath: string,
  size: number,
  bios: string,
  options: { readonly machine?: string | undefined; readonly extraArgs?: ReadonlyArray<string> | undefined } = {}
): Effect.Effect<QemuSource, QmpError, Scope.Scope> =>
  start({
    name: "dst",
    memPath,
    size,
    share: true,
    prealloc: false,
    incoming: true,
    running: true,
    extraArgs: ["-bios", bios, ...(options.extraArgs ?? [])],
    machine: options.machine ?? "pc"
  })

const start = (options: {
  readonly name: string
  readonly memPath: string
  readonly size: number
  readonly share: boolean
  readonly prealloc: boolean
  readonly incoming: boolean
  /** Start the guest's CPUs (no `-S`). */
  readonly running?: boolean | undefined
  readonly extraArgs: ReadonlyArray<string>
  /** `none` (no devices at all) or a real machine type (`q35`, `pc`): its RAM is still the file. */
  readonly machine: string
}): Effect.Effect<QemuSource, QmpError, Scope.Scope> =>
  Effect.gen(function*() {
    const { memPath, size } = options
    const qmpPath = socketPath()
    const onOff = (b: boolean) => (b ? "on" : "off")
    const args = [
      "-machine", `${options.machine},memory-backend=mem`,
      "-m", `${Math.ceil(size / (1024 * 1024))}M`,
      "-accel", "tcg",
      "-nodefaults", "-display", "none", ...(options.running ? [] : ["-S"]),
      "-monitor", "none", "-serial", "none", "-parallel", "none",
      "-name", options.name,
      "-object",
      `memory-backend-file,id=mem,size=${size},mem-path=${memPath},share=${onOff(options.share)},prealloc=${onOff(options.prealloc)}`,
      "-qmp", `unix:${qmpPath},server=on,wait=off`,
      ...(options.incoming ? ["-incoming", "defer"] : []),
      ...options.extraArgs
    ]
    let stderr = ""
    const child = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const c = ChildProcess.spawn(QEMU_BINARY, args, { stdio: ["ignore", "ignore", "pipe"] })
        c.stderr!.setEncoding("utf8")
        c.stderr!.on("data", (s: string) => (stderr = (stderr + s).slice(-4000)))
        c.on("error", (e) => (stderr += `\nspawn error: ${e.message}`))
        return c
      }),
      (c) =>
        Effect.async<void>((resume) => {
          if (c.exitCode !== null || c.signalCode !== null) {
            Fs.rmSync(qmpPath, { force: true })
            return resume(Effect.void)
          }
          const timer = setTimeout(() => c.kill("SIGKILL"), 5000)
          c.once("exit", () => {
            clearTimeout(timer)
            Fs.rmSync(qmpPath, { force: true })
            resume(Effect.void)
          })
          // the QMP connection is closed first (later acquisitions are released first): ask by signal
          c.kill("SIGTERM")
        })
    )
    const qmp = yield* connectQmp(qmpPath).pipe(
      Effect.mapError((e) => new QmpError({ detail: `${e.detail}; QEMU stderr: ${stderr.trim()}` }))
    )
    return {
      qmp,
      pid: child.pid!,
      stderr: () => stderr,
      waitStderr: (text, within) =>
        Effect.async<void>((resume) => {
          if (stderr.includes(text)) return resume(Effect.void)
          const onData = () => {
            if (stderr.includes(text)) resume(Effect.void)
          }
          // after the listener that appends: this one sees the chunk in `stderr`
          child.stderr!.on("data", onData)
          return Effect.sync(() => void child.stderr!.off("data", onData))
        }).pipe(
          Effect.timeoutFail({
            duration: within,
            onTimeout: () => new QmpError({ detail: `QEMU printed no "${text}" in ${Duration.format(within)}; its stderr: ${stderr.trim()}` })
          })
        ),
      kill: Effect.sync(() => {
        child.kill("SIGKILL")
      })
    }
  })

/** The test PKI (test/fixtures/tls, made by make-certs.sh). */
const TLS_FIXTURES = fileURLToPath(new URL("../fixtures/tls/", import.meta.url))

/** QEMU's TLS credentials for a source: the `-object` to start it with and the migration parameters. */
export interface SourceTls {
  readonly args: ReadonlyArray<string>
  readonly parameters: Record<string, unknown>
}

/**
 * TLS credentials for a QEMU source from the test PKI, written to `dir` under the names QEMU looks for:
 * `tls-creds-psk` (keys.psk, identity `qemu`) or `tls-creds-x509` (ca-cert.pem, and alice's certificate as
 * client-cert.pem / client-key.pem). QEMU checks the destination's certificate against `hostname` when given,
 * else against the address it migrates to.
 */
export const sourceTls = (kind: "psk" | "x509", dir: string, hostname?: string): SourceTls => {
  Fs.mkdirSync(dir, { recursive: true })
  const files: ReadonlyArray<readonly [string, string]> = kind === "psk"
    ? [["keys.psk", "keys.psk"]]
    : [["ca-cert.pem", "ca-cert.pem"], ["alice-cert.pem", "client-cert.pem"], ["alice-key.pem", "client-key.pem"]]
  for (const [from, to] of files) Fs.copyFileSync(Path.join(TLS_FIXTURES, from), Path.join(dir, to))
  return {
    args: ["-object", `tls-creds-${kind},id=tls0,endpoint=client,dir=${dir}`],
    parameters: { "tls-creds": "tls0", ...(hostname === undefined ? {} : { "tls-hostname": hostname }) }
  }
}

/**
 * TLS credentials for a QEMU destination from the test PKI, written to `dir`: `tls-creds-psk` with
 * endpoint=server (keys.psk), or `tls-creds-x509` with the server's certificate, which then requires a client
 * certificate that chains to the test CA (QEMU's verify-peer default); the `-object` to start it with and the
 * migration parameters.
 */
export const destinationTls = (dir: string, kind: "psk" | "x509" = "psk"): SourceTls => {
  Fs.mkdirSync(dir, { recursive: true })
  const files: ReadonlyArray<readonly [string, string]> = kind === "psk"
    ? [["keys.psk", "keys.psk"]]
    : [["ca-cert.pem", "ca-cert.pem"], ["server-cert.pem", "server-cert.pem"], ["server-key.pem", "server-key.pem"]]
  for (const [from, to] of files) Fs.copyFileSync(Path.join(TLS_FIXTURES, from), Path.join(dir, to))
  return { args: ["-object", `tls-creds-${kind},id=tls0,endpoint=server,dir=${dir}`], parameters: { "tls-creds": "tls0" } }
}

/** How a QEMU destination expects its migration. */
export interface IncomingSettings {
  /** `tcp:127.0.0.1:0` (a free port, reported by `incoming`), `file:PATH`, ... */
  readonly uri: string
  /** QEMU's multifd-channels; 0: multifd off. */
  readonly channels: number
  readonly compression?: "none" | "zlib" | "zstd" | undefined
  /** Capability mapped-ram (a `file:` uri). */
  readonly mappedRam?: boolean | undefined
  readonly extraParameters?: Record<string, unknown> | undefined
  /** More capabilities to turn on (`postcopy-ram`, ...). */
  readonly extraCapabilities?: ReadonlyArray<string> | undefined
}

/**
 * Sets a destination's capabilities and parameters and starts its `migrate-incoming`; returns the uri it
 * listens at (with the real port when port 0 was asked).
 */
export const incoming = (qmp: Qmp, settings: IncomingSettings): Effect.Effect<string, QmpError> =>
  Effect.gen(function*() {
    const capabilities = [
      "events",
      ...(settings.channels > 0 ? ["multifd"] : []),
      ...(settings.mappedRam ? ["mapped-ram"] : []),
      ...(settings.extraCapabilities ?? [])
    ]
    yield* qmp.execute("migrate-set-capabilities", { capabilities: capabilities.map((capability) => ({ capability, state: true })) })
    yield* qmp.execute("migrate-set-parameters", {
      ...(settings.channels > 0 ? { "multifd-channels": settings.channels } : {}),
      ...(settings.compression === undefined ? {} : { "multifd-compression": settings.compression }),
      ...settings.extraParameters
    })
    yield* qmp.execute("migrate-incoming", { uri: settings.uri })
    if (!settings.uri.startsWith("tcp:")) return settings.uri
    const info = (yield* qmp.execute("query-migrate")) as { readonly "socket-address"?: ReadonlyArray<{ readonly port?: string }> }
    const port = info["socket-address"]?.[0]?.port
    return port === undefined ? settings.uri : `tcp:127.0.0.1:${port}`
  })

/** A 32-bit little-endian word of guest memory at `address` (HMP `xp`, through QMP). */
export const readGuestWord = (qmp: Qmp, address: number): Effect.Effect<number, QmpError> =>
  Effect.flatMap(qmp.execute("human-monitor-command", { "command-line": `xp /1wx ${address}` }), (out) => {
    const m = /:\s*0x([0-9a-f]+)/i.exec(String(out))
    return m === null ? Effect.fail(new QmpError({ detail: `xp: unexpected output ${JSON.stringify(out)}` })) : Effect.succeed(parseInt(m[1]!, 16))
  })

/** QEMU's run state (`running`, `paused`, `postmigrate`, `inmigrate`, ...). */
export const runState = (qmp: Qmp): Effect.Effect<string, QmpError> =>
  Effect.map(qmp.execute("query-status"), (status) => String((status as { readonly status?: unknown }).status))

/** Migration settings of a source. */
export interface MigrateSettings {
  readonly uri: string
  readonly channels: number
  readonly compression: "none" | "zlib" | "zstd"
  /** bytes per second (default: 1 TiB/s, i.e. unthrottled) */
  readonly maxBandwidth?: number | undefined
  /** ms (default 60000: switch over at once; the rate limit does not apply to the switch-over) */
  readonly downtimeLimit?: number | undefined
  readonly zeroPageDetection?: "multifd" | "legacy" | "none" | undefined
  readonly extraCapabilities?: ReadonlyArray<string> | undefined
  readonly extraParameters?: Record<string, unknown> | undefined
}

/**
 * Sets the capabilities and parameters of a multifd migration (`channels` 0: multifd off) and starts it
 * (`migrate`).
 */
export const migrate = (qmp: Qmp, settings: MigrateSettings): Effect.Effect<void, QmpError> =>
  Effect.gen(function*() {
    yield* qmp.execute("migrate-set-capabilities", {
      capabilities: [
        { capability: "events", state: true },
        ...(settings.channels > 0 ? [{ capability: "multifd", state: true }] : []),
        ...(settings.extraCapabilities ?? []).map((capability) => ({ capability, state: true }))
      ]
    })
    yield* qmp.execute("migrate-set-parameters", {
      ...(settings.channels > 0
        ? { "multifd-channels": settings.channels, "multifd-compression": settings.compression }
        : {}),
      "max-bandwidth": settings.maxBandwidth ?? 1099511627776,
      "downtime-limit": settings.downtimeLimit ?? 60000,
      ...(settings.zeroPageDetection ? { "zero-page-detection": settings.zeroPageDetection } : {}),
      ...settings.extraParameters
    })
    yield* qmp.execute("migrate", { uri: settings.uri })
  })

/** Waits for the source's migration to reach a final state; returns it (`completed`, `failed`, `cancelled`). */
export const waitDone = (qmp: Qmp, timeout: Duration.DurationInput): Effect.Effect<string, QmpError> =>
  Effect.map(
    qmp.waitEvent("MIGRATION", (d) => ["completed", "failed", "cancelled"].includes(String(d["status"])), timeout),
    (e) => String(e.data?.["status"])
  )
