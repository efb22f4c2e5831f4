/**
 * TLS on every connection of a migration, mirroring QEMU's multifd TLS tests (tests/qtest/migration/
 * tls-tests.c: psk match/mismatch, x509 default-host / override-host / mismatch-host, allow-anon-client /
 * reject-anon-client, authz) with stricter expectations: every failure is a clear one-line error on the
 * source, naming the channel; a destination that turned a connection away keeps waiting; the handshake of
 * channel k of N failing, a peer that drops or stalls mid-handshake, and closing the scope while handshakes
 * are in flight end promptly; a successful migration ends every source→destination TLS stream with
 * close_notify; and nothing is left open after any test (expectNoLeaks).
 *
 * Real loopback TCP, real TLS with the test PKI of fixtures/tls (make-certs.sh). No sleeps: every wait is on
 * a Deferred, a fiber or a recorded event; the only timer a scenario waits on is the 300 ms handshake timeout
 * of the stall tests.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as ConfigError from "effect/ConfigError"
import * as ConfigProvider from "effect/ConfigProvider"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as FiberId from "effect/FiberId"
import * as Logger from "effect/Logger"
import * as Option from "effect/Option"
import * as Schedule from "effect/Schedule"
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as NodeTls from "node:tls"
import * as Os from "node:os"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as Protocol from "../src/Protocol.js"
import * as Tls from "../src/Tls.js"
import * as Transport from "../src/Transport.js"
import * as Der from "../src/internal/tls/der.js"
import * as Verification from "../src/internal/tls/verification.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { leakFree } from "./support/handles.js"
import { mixedImage, timed } from "./support/images.js"
import { sameMemory } from "./support/memory.js"
import { loopbackServer } from "./support/tcpServer.js"
import { TlsRecords } from "./support/tlsRecords.js"

// ---------------------------------------------------------------------------------------------------------
// helpers

const PAGE = 4096
const TIMEOUTS = { connect: "3 seconds", handshake: "2 seconds", peer: "3 seconds" } as const
const HANDSHAKE_MS = 2000
/** "Promptly": well below every timeout of the migration. */
const PROMPT_MS = 1000

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/tls/${name}`, import.meta.url))

type Upgrade = Transport.Upgrade<Transport.UpgradeError>

/** A guard (never used to let things settle): fail instead of hanging the file. */
const noHang = <A, E, R>(self: Effect.Effect<A, E, R>, what: string, seconds = 6) =>
  Effect.timeoutFail(self, { duration: `${seconds} seconds`, onTimeout: () => new Error(`hung: ${what}`) })

/** A block of `pages` pages: about 60 % random pages, the rest zero. */
const image = (pages: number): Buffer => mixedImage(pages, 0.6, PAGE)

/** `mib` MiB of mixed random and zero pages in two blocks (3/4 + 1/4). */
const sourceRam = (mib = 4) =>
  GuestRam.make({
    blocks: [
      { name: "pc.ram", bytes: image(mib * 192) },
      { name: "vga.vram", bytes: image(mib * 64) }
    ]
  })

/** The error is a `ChannelError` of `channel` caused by a `TlsError` of `reason`; returns the TLS error. */
const expectTlsFailure = (
  error: unknown,
  channel: MigrationError.ChannelName,
  reason: Tls.TlsError["reason"]
): Tls.TlsError => {
  expect(error).toBeInstanceOf(MigrationError.ChannelError)
  const channelError = error as MigrationError.ChannelError
  expect(channelError.channel).toBe(channel)
  expect(channelError.cause).toBeInstanceOf(Tls.TlsError)
  const tls = channelError.cause as Tls.TlsError
  expect(tls.reason).toBe(reason)
  expect(channelError.message.startsWith(channel === "main" ? "main channel: TLS " : `multifd channel ${channel}: TLS `))
    .toBe(true)
  expectOneLine(channelError)
  return tls
}

/**
 * The source's certificate was refused after its handshake: the destination closed the main channel before
 * answering, and the source says that it most likely refused this certificate.
 */
const expectCertificateRefused = (error: unknown, certificate: string) => {
  expect(error).toBeInstanceOf(MigrationError.MigrationError)
  const e = error as MigrationError.MigrationError
  expect(e.reason).toBe("Rejected")
  expect(e.message).toMatch(
    /^TLS handshake with tcp:127\.0\.0\.1:\d+: the destination closed the connection right after the TLS handshake, without answering: /
  )
  expect(e.message).toContain(`it most likely refused this source's certificate ${certificate}`)
  expect(e.message).toContain("its log says why")
  expectOneLine(e)
}

// TLS credentials from the fixtures, with short handshake timeouts

const loadTls = (config: Tls.TlsConfig) => Tls.make({ handshakeTimeoutMs: HANDSHAKE_MS, ...config })
const pskTls = (file = "keys.psk", config: Tls.TlsConfig = {}) => loadTls({ psk: fixture(file), ...config })
const serverX509 = (name: string, config: Tls.TlsConfig = {}) =>
  loadTls({ ca: fixture("ca-cert.pem"), cert: fixture(`${name}-cert.pem`), key: fixture(`${name}-key.pem`), ...config })
const clientX509 = (config: Tls.TlsConfig = {}, client?: string) =>
  loadTls({
    ca: fixture("ca-cert.pem"),
    ...(client === undefined ? {} : { cert: fixture(`${client}-cert.pem`), key: fixture(`${client}-key.pem`) }),
    ...config
  })

/** Fixtures signed with SHA-1: OpenSSL's security level (Node's default, 1) refuses them, as QEMU's GnuTLS does. */
const WEAK = new Set(["sha1-alice", "sha1-server"])

/** Fixtures that this side's own checks refuse (expired, not yet valid, not for its role, weak): only a peer presents them. */
const REFUSED_AS_OWN = new Set([
  "expired-alice",
  "not-yet-valid-alice",
  "serveronly-alice",
  "expired-server",
  "not-yet-valid-server",
  "clientonly-server",
  // its file's intermediate CA expired, or is no CA
  "expired-ca-server",
  "notca-server",
  // a stranger's self-signed certificate (openssl req -x509 makes it a CA)
  "emptysubject-selfsigned",
  // a keyUsage without digitalSignature: it cannot sign a handshake
  "keyagreement-alice",
  "keyencipherment-server",
  // a critical extension of an unknown OID
  "unknowncrit-server",
  // a chain a peer of the same CA file refuses: a name constraint of its intermediate CA
  "constrained-server",
  // issued by no CA of the CA file: another CA's, a self-signed one (QEMU refuses them at load too)
  "other-ca-alice",
  "selfsigned-alice",
  ...WEAK
])

/**
 * `tls` presenting the fixture `name` instead of its own certificate (loaded with a good one, the secure
 * contexts rebuilt with `name`'s): how a peer judges a certificate that `load` refuses as this side's own.
 */
const presenting = (tls: Tls.Tls["Type"], name: string): Tls.Tls["Type"] => {
  const cert = Fs.readFileSync(fixture(`${name}-cert.pem`), "utf8")
  const key = Fs.readFileSync(fixture(`${name}-key.pem`), "utf8")
  const contextOptions = {
    ...tls.settings.contextOptions,
    // (a weak certificate is refused by the security level before anything connects: the presenting side has none)
    ...(WEAK.has(name) ? { ciphers: `${tls.settings.contextOptions.ciphers}:@SECLEVEL=0` } : {}),
    cert,
    key
  }
  const settings: Tls.Settings = {
    ...tls.settings,
    contextOptions,
    secureContext: NodeTls.createSecureContext({ minVersion: "TLSv1.2", ...contextOptions }),
    writeOnlyContext: NodeTls.createSecureContext({ minVersion: "TLSv1.2", ...contextOptions, maxVersion: "TLSv1.2" })
  }
  return { settings, client: (host) => Tls.client(settings, host), server: Tls.server(settings) }
}

/** `tls` as loaded while `name`'s certificate was valid, now presenting it. */
const outlived = (tls: Tls.Tls["Type"], name: string): Tls.Tls["Type"] => {
  const presented = presenting(tls, name)
  const settings: Tls.Settings = {
    ...presented.settings,
    ownCertificate: new Crypto.X509Certificate(Fs.readFileSync(fixture(`${name}-cert.pem`)))
  }
  return { settings, client: (host) => Tls.client(settings, host), server: Tls.server(settings) }
}

/** A source presenting the client certificate `name` (with the test CA). */
const forgedClient = (name: string) =>
  REFUSED_AS_OWN.has(name) ? Effect.map(clientX509({}, "alice"), (tls) => presenting(tls, name)) : clientX509({}, name)
/** A destination presenting the server certificate `name`. */
const forgedServer = (name: string) =>
  REFUSED_AS_OWN.has(name) ? Effect.map(serverX509("server"), (tls) => presenting(tls, name)) : serverX509(name)

const LOOPBACK = "127.0.0.1"
const tcp = (host: string, port: number): Transport.Address => ({ _tag: "Tcp", host, port })
const portOf = (address: Transport.Address) => (address._tag === "Tcp" ? address.port : 0)

/** Waiters woken on every change of some recorded state (no polling, no timers). */
const makeSignal = () => {
  const waiters = new Set<() => void>()
  return {
    notify: () => {
      for (const w of Array.from(waiters)) w()
    },
    until: (predicate: () => boolean) =>
      Effect.async<void>((resume) => {
        if (predicate()) return resume(Effect.void)
        const check = () => {
          if (predicate()) {
            waiters.delete(check)
            resume(Effect.void)
          }
        }
        waiters.add(check)
        return Effect.sync(() => waiters.delete(check))
      })
  }
}

/**
 * A destination on loopback TCP in a fiber of the test's scope (closing the scope interrupts it and closes
 * its listener). Its log (the connections it turned away) is kept, not printed.
 */
const startDestination = (upgrade: Upgrade | undefined, options: Migration.IncomingOptions = {}) =>
  Effect.gen(function*() {
    const logs: Array<string> = []
    const signal = makeSignal()
    const bound = yield* Deferred.make<Transport.Address, Transport.TransportError>()
    const destination = Effect.scoped(Effect.gen(function*() {
      const listener = yield* Transport.listen(tcp(LOOPBACK, 0)).pipe(Effect.tapError((e) => Deferred.fail(bound, e)))
      yield* Deferred.succeed(bound, listener.address)
      return yield* Migration.incoming(listener, { timeouts: TIMEOUTS, upgrade, ...options })
    }))
    const fiber = yield* Effect.forkScoped(Effect.provide(
      destination,
      Logger.replace(
        Logger.defaultLogger,
        Logger.make(({ message }) => {
          logs.push(Array.isArray(message) ? message.join(" ") : String(message))
          signal.notify()
        })
      )
    ))
    const address = yield* Deferred.await(bound)
    return {
      fiber,
      address,
      port: portOf(address),
      logs,
      /** Waits until the destination has turned `n` connections away. */
      rejections: (n: number) => signal.until(() => logs.filter((l) => l.includes("rejected a connection")).length >= n)
    }
  })

const migrateTo = (
  ram: GuestRam.GuestRam["Type"],
  address: Transport.Address,
  upgrade: Upgrade | undefined,
  options: Partial<Migration.MigrateOptions> = {}
) =>
  Migration.migrate({ address, channels: 2, timeouts: TIMEOUTS, upgrade, ...options }).pipe(
    Effect.provide(Transport.layer),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

/** Migrates `ram` to a fresh TLS destination and checks that the destination received it byte for byte. */
const roundTrip = (
  server: Upgrade,
  client: Upgrade,
  options: { readonly host?: string; readonly channels?: number; readonly mib?: number } = {}
) =>
  Effect.gen(function*() {
    const ram = yield* sourceRam(options.mib)
    const dest = yield* startDestination(server)
    const stats = yield* noHang(
      migrateTo(ram, tcp(options.host ?? LOOPBACK, dest.port), client, { channels: options.channels ?? 2 }),
      "migrate"
    )
    const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
    expect(sameMemory(result.ram, ram)).toBe(true)
    expect(result.rejected).toEqual([])
    expect(stats.channels).toBe(options.channels ?? 2)
    return { ram, stats, result }
  })

/** Wraps an upgrade to remember what each secured connection negotiated. */
const negotiated = (upgrade: Upgrade) => {
  const seen: Array<{ protocol: string | null; cipher: string }> = []
  const wrapped: Upgrade = (connection, channel) =>
    Effect.tap(upgrade(connection, channel), (secured) =>
      Effect.sync(() => {
        const socket = secured.stream as NodeTls.TLSSocket
        seen.push({ protocol: socket.getProtocol(), cipher: socket.getCipher().name })
      }))
  return { upgrade: wrapped, seen }
}

/**
 * Tells the destination which channel an accepted connection is: the source's hook records its local port
 * for each channel before its handshake starts, the destination's looks the remote port up (waiting, if it
 * runs first). Loopback TCP only.
 */
const channelRegistry = () => {
  const byPort = new Map<number, number | "main">()
  const signal = makeSignal()
  return {
    source: (inner: Upgrade): Upgrade => (connection, channel) =>
      Effect.suspend(() => {
        byPort.set((connection.stream as Net.Socket).localPort!, channel)
        signal.notify()
        return inner(connection, channel)
      }),
    channelOf: (connection: Transport.Connection) =>
      Effect.suspend(() => {
        const port = (connection.stream as Net.Socket).remotePort!
        return Effect.as(signal.until(() => byPort.has(port)), byPort.get(port)!)
      })
  }
}

/** A destination's upgrade that runs `server` on every channel but `stalled`, whose handshake it reads and never answers. */
const stallingChannel = (registry: ReturnType<typeof channelRegistry>, server: Upgrade, stalled: number): Upgrade =>
(connection, channel) =>
  Effect.flatMap(registry.channelOf(connection), (id): ReturnType<Upgrade> =>
    id !== stalled
      ? server(connection, channel)
      : Effect.zipRight(connection.read(5), Effect.never))

/**
 * A raw TCP "TLS server" that reads the ClientHello and then drops the connection, or never answers. Its
 * sockets and server are closed with the scope.
 */
const rawPeer = (behaviour: "drop" | "stall") =>
  Effect.gen(function*() {
    const clientHellos = yield* Deferred.make<void>()
    const { address } = yield* loopbackServer((socket) => {
      socket.on("data", (chunk: Buffer) => {
        if (chunk[0] === 0x16) Deferred.unsafeDone(clientHellos, Exit.void) // a handshake record
        if (behaviour === "drop") socket.destroy()
      })
    })
    return { address, clientHellos }
  })

/** One direction of a proxied TLS connection: the records seen (type, length) and whether it ended (FIN). */
interface Direction {
  readonly records: Array<{ readonly type: number; readonly length: number }>
  ended: boolean
  readonly follower: TlsRecords
}

const newDirection = (): Direction => ({ records: [], ended: false, follower: new TlsRecords() })

/**
 * A TCP proxy that forwards both directions unchanged (half-closes included) and follows the TLS records of
 * each, to see on the wire how a TLS connection ended. Closed with the scope.
 */
const recordProxy = (target: Transport.Address) =>
  Effect.gen(function*() {
    const connections: Array<{ up: Direction; down: Direction; closed: Deferred.Deferred<void> }> = []
    const { address } = yield* loopbackServer((client, track) => {
      const upstream = Net.connect({ host: LOOPBACK, port: portOf(target), allowHalfOpen: true })
      track(upstream)
      const record = { up: newDirection(), down: newDirection(), closed: Deferred.unsafeMake<void>(FiberId.none) }
      connections.push(record)
      // the source's side of the proxy is gone: whatever it sent (its FIN included) has been seen
      client.on("close", () => Deferred.unsafeDone(record.closed, Exit.void))
      const pipe = (from: Net.Socket, to: Net.Socket, d: Direction) => {
        from.on("data", (chunk: Buffer) => {
          d.follower.scan(chunk, (type, length) => d.records.push({ type, length }))
          to.write(chunk)
        })
        from.on("end", () => {
          d.ended = true
          to.end()
        })
        from.on("error", () => to.destroy())
        from.on("close", () => {
          if (!to.writableEnded) to.destroy()
        })
      }
      pipe(client, upstream, record.up)
      pipe(upstream, client, record.down)
    }, { allowHalfOpen: true })
    return { address, connections }
  })

/**
 * A TLS 1.3 close_notify as it crosses the wire: one encrypted record (outer type application_data, 0x17)
 * holding the 2-byte alert, the inner content type and the 16-byte AEAD tag. Nothing else the migration
 * sends is 2 bytes long.
 */
const CLOSE_NOTIFY_RECORD = { type: 0x17, length: 2 + 1 + 16 }

// ---------------------------------------------------------------------------------------------------------

describe("PSK (QEMU tls-creds-psk)", () => {
  it.live("psk/match: the migration succeeds, memory byte-identical, over TLS 1.3 with a PSK suite", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      const server = negotiated(tls.server)
      const client = negotiated(tls.client(undefined))
      yield* roundTrip(server.upgrade, client.upgrade)
      // main + 2 channels on each side
      expect(server.seen).toHaveLength(3)
      expect(client.seen).toHaveLength(3)
      for (const s of [...server.seen, ...client.seen]) {
        expect(s).toEqual({ protocol: "TLSv1.3", cipher: "TLS_AES_128_GCM_SHA256" })
      }
    })))

  it.live("psk/mismatch: the source fails with a handshake error; the destination keeps waiting and then accepts the right key", () =>
    leakFree(Effect.gen(function*() {
      const good = yield* pskTls()
      const wrong = yield* pskTls("wrong-keys.psk")
      const ram = yield* sourceRam()
      const dest = yield* startDestination(good.server)

      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), wrong.client(undefined))), "migrate")
      )
      const tls = expectTlsFailure(failureOf(exit), "main", "Handshake")
      expect(tls.message).toMatch(/^TLS handshake with tcp:127\.0\.0\.1:\d+ failed: /)
      expect(tls.message).toContain("same pre-shared key")
      expect(elapsed).toBeLessThan(PROMPT_MS)

      // the destination turned the connection away and is still waiting for a migration
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.fiber.unsafePoll()).toBeNull()

      // a second source with the right key, same listener
      const stats = yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), good.client(undefined)), "second migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(stats.channels).toBe(2)
      expect(result.rejected).toHaveLength(1)
      expect(result.rejected[0]).toMatch(/TLS handshake with .* failed/)
    })))

  it.live("psk authz [qemu] admits identity qemu", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* pskTls("keys.psk", { authz: ["qemu"] })
      const client = yield* pskTls("keys.psk", { identity: "qemu" })
      yield* roundTrip(server.server, client.client(undefined))
    })))

  it.live("psk authz [other] refuses identity qemu: the source fails on the main channel's handshake", () =>
    leakFree(Effect.gen(function*() {
      // (a file with a key for other too: an entry without one is refused at load)
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-psk-"))
      const file = Path.join(dir, "keys.psk")
      Fs.writeFileSync(file, `${Fs.readFileSync(fixture("keys.psk"), "utf8")}other:${Crypto.randomBytes(32).toString("hex")}\n`)
      const server = yield* loadTls({ psk: file, authz: ["other"] }).pipe(
        Effect.ensuring(Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true })))
      )
      const client = yield* pskTls()
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server.server)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(undefined))), "migrate")
      expectTlsFailure(failureOf(exit), "main", "Handshake")
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.fiber.unsafePoll()).toBeNull()
    })))

  it.live("a PSK identity the destination has no key for is named escaped (a client chooses it)", () =>
    leakFree(Effect.gen(function*() {
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-psk-"))
      try {
        const file = Path.join(dir, "hostile.psk")
        Fs.writeFileSync(file, `ev\x1b[2J\u202eil:${"ab".repeat(32)}\n`)
        const server = yield* pskTls()
        const client = yield* loadTls({ psk: file, identity: "ev\x1b[2J\u202eil" })
        const dest = yield* startDestination(server.server)
        yield* Effect.exit(migrateTo(yield* sourceRam(), tcp(LOOPBACK, dest.port), client.client(undefined)))
        yield* noHang(dest.rejections(1), "the destination's rejection")
        const line = dest.logs.find((l) => l.includes("rejected a connection"))!
        expect(line).toContain(`PSK identity "ev\\u001b[2J\\u202eil" has no key in this side's PSK file`)
        expect(line).not.toMatch(/[\x1b\u202e]/)
      } finally {
        Fs.rmSync(dir, { recursive: true, force: true })
      }
    })))

  it.live("TLS on one side only: both sides say that the other does not speak it (either way round)", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      const ram = yield* sourceRam()
      // the destination uses TLS, the source does not
      const secured = yield* startDestination(tls.server)
      const plain = failureOf(yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, secured.port), undefined)), "plain migrate"))
      expect(plain.message).toContain("it may use TLS (this source does not)")
      yield* noHang(secured.rejections(1), "the TLS destination's rejection")
      expect(secured.logs.find((l) => l.includes("rejected a connection"))).toContain("(the peer does not speak TLS")
      // the source uses TLS, the destination does not
      const open = yield* startDestination(undefined)
      const tlsSource = failureOf(yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, open.port), tls.client(undefined))), "TLS migrate"))
      expect(tlsSource.message).toContain("(the peer closed the connection in the TLS handshake: does it use TLS")
      yield* noHang(open.rejections(1), "the plain destination's rejection")
      expect(open.logs.find((l) => l.includes("rejected a connection"))).toContain(
        "): a TLS handshake, and this destination does not use TLS"
      )
    })))

  it.live("a real image: 32 MiB over TLS with 4 channels, byte for byte", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      const { stats, result } = yield* roundTrip(tls.server, tls.client(undefined), { channels: 4, mib: 32 })
      expect(stats.ramBytes).toBe(32 * 1024 * 1024)
      expect(result.stats.normalPages + result.stats.zeroPages).toBe(32 * 256)
    })), 20_000)
})

// ---------------------------------------------------------------------------------------------------------

describe("cipher suites: fast with AES instructions, configurable, the destination's order wins", () => {
  const ciphersOf = (seen: ReadonlyArray<{ readonly cipher: string }>) => Array.from(new Set(seen.map((s) => s.cipher)))

  it.live("x509 negotiates AES-128-GCM by default (Node's own default would be AES-256-GCM)", () =>
    leakFree(Effect.gen(function*() {
      const server = negotiated((yield* serverX509("server")).server)
      yield* roundTrip(server.upgrade, (yield* clientX509()).client(LOOPBACK))
      expect(ciphersOf(server.seen)).toEqual(["TLS_AES_128_GCM_SHA256"])
    })))

  it.live("a source that prefers ChaCha20 (as QEMU's GnuTLS does) gets the destination's AES-GCM, for PSK and x509", () =>
    leakFree(Effect.gen(function*() {
      const chachaFirst = "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"
      const psk = negotiated((yield* pskTls()).server)
      yield* roundTrip(psk.upgrade, (yield* pskTls("keys.psk", { ciphers: chachaFirst })).client(undefined))
      expect(ciphersOf(psk.seen)).toEqual(["TLS_AES_128_GCM_SHA256"])
      const x509 = negotiated((yield* serverX509("server")).server)
      yield* roundTrip(x509.upgrade, (yield* clientX509({ ciphers: chachaFirst })).client(LOOPBACK))
      expect(ciphersOf(x509.seen)).toEqual(["TLS_AES_128_GCM_SHA256"])
    })))

  it.live("ciphers configured on both sides are used (ChaCha20-Poly1305, for CPUs without AES instructions)", () =>
    leakFree(Effect.gen(function*() {
      const chacha = { ciphers: "TLS_CHACHA20_POLY1305_SHA256" }
      const server = negotiated((yield* pskTls("keys.psk", chacha)).server)
      yield* roundTrip(server.upgrade, (yield* pskTls("keys.psk", chacha)).client(undefined))
      expect(ciphersOf(server.seen)).toEqual(["TLS_CHACHA20_POLY1305_SHA256"])
    })))

  it.live("cipher lists with no suite in common: both sides say that in one line, and the destination then admits a source that shares one", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { ciphers: "TLS_CHACHA20_POLY1305_SHA256:ECDHE-ECDSA-CHACHA20-POLY1305" })
      const client = yield* clientX509({ ciphers: "TLS_AES_256_GCM_SHA384:ECDHE-ECDSA-AES256-GCM-SHA384" })
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination(server.server)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
      const tls = expectTlsFailure(failureOf(exit), "main", "Handshake")
      expect(tls.message).toContain("and cipher suites in common (ciphers)")
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.logs.join("\n")).toMatch(/failed: no shared cipher \(.*and cipher suites in common \(ciphers\)\?\)$/)
      const sharing = yield* clientX509({ ciphers: "TLS_CHACHA20_POLY1305_SHA256" })
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), sharing.client(LOOPBACK)), "second migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
    })))

  it.live("a peer that offers only TLS 1.1 or older: the destination says it needs TLS 1.2, in one line", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server")
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination(server.server)
      // an old client (OpenSSL's security level 0 lets it offer TLS 1.1)
      const old = yield* Effect.acquireRelease(
        Effect.sync(() => {
          const socket = NodeTls.connect({
            host: LOOPBACK,
            port: dest.port,
            minVersion: "TLSv1",
            maxVersion: "TLSv1.1",
            ciphers: "DEFAULT@SECLEVEL=0",
            rejectUnauthorized: false
          })
          socket.on("error", () => {})
          return socket
        }),
        (socket) => Effect.sync(() => socket.destroy())
      )
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.logs.join("\n")).toMatch(
        /failed: unsupported protocol \(the peer offers no TLS version this side speaks: TLS 1\.2 or 1\.3\)$/
      )
      old.destroy()
      const client = yield* clientX509()
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK)), "migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
    })))

  it.live("a cipher list OpenSSL does not know is a configuration error at load, naming it", () =>
    Effect.gen(function*() {
      const error = yield* Effect.flip(Tls.load({ psk: fixture("keys.psk"), ciphers: "NO-SUCH-CIPHER" }))
      expect(error).toMatchObject({ reason: "Config" })
      expect(error.message).toContain("NO-SUCH-CIPHER")
      expect(error.message.split("\n")).toHaveLength(1)
    }))
})

describe("x509 (QEMU tls-creds-x509)", () => {
  it.live("default-host, by IP: the client checks 127.0.0.1 against the certificate's IP SAN", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server")
      const client = yield* clientX509()
      const s = negotiated(server.server)
      yield* roundTrip(s.upgrade, client.client(LOOPBACK))
      for (const n of s.seen) expect(n.protocol).toBe("TLSv1.3")
    })))

  it.live("default-host, by name: connecting to localhost checks the DNS SAN localhost", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server")
      const client = yield* clientX509()
      yield* roundTrip(server.server, client.client("localhost"), { host: "localhost" })
    })))

  it.live("override-host: hostname localhost while connecting to 127.0.0.1", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server")
      const client = yield* clientX509({ hostname: "localhost" })
      yield* roundTrip(server.server, client.client(LOOPBACK))
    })))

  it.live("mismatch-host: the source fails naming the mismatch; the destination stays up and then admits an override-host source", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("wronghost")
      const client = yield* clientX509()
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server.server)

      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
      )
      const tls = expectTlsFailure(failureOf(exit), "main", "Handshake")
      expect(tls.message).toContain("127.0.0.1")
      expect(tls.message).toMatch(/not in the cert's|does not match/)
      expect(elapsed).toBeLessThan(PROMPT_MS)

      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.fiber.unsafePoll()).toBeNull()

      // the override is what the client checks: wrong.example is the name this certificate carries
      const override = yield* clientX509({ hostname: "wrong.example" })
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), override.client(LOOPBACK)), "second migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected).toHaveLength(1)
    })))

  it.live("no name to check (no hostname, no host: a unix: socket): the source refuses before its handshake, as QEMU does", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("wronghost")
      const client = yield* clientX509()
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server.server)
      // any certificate of the CA passed for the destination: here one for wrong.example
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(undefined))), "migrate")
      const tls = expectTlsFailure(failureOf(exit), "main", "Config")
      expect(tls.message).toContain("x509 needs the name the destination's certificate must carry (hostname)")
      yield* noHang(dest.rejections(1), "the destination's rejection")
      // a name given checks it: the right one migrates
      const named = yield* clientX509({ hostname: "wrong.example" })
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), named.client(undefined)), "second migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
    })))

  it.live("a name in the CN counts only as GnuTLS counts it: the one CN of a certificate without altnames", () =>
    leakFree(Effect.gen(function*() {
      const client = yield* clientX509({ hostname: "localhost" })
      const ram = yield* sourceRam(1)
      // CN=localhost, no subjectAltName: its CN is its name, as QEMU's GnuTLS takes it
      const named = yield* serverX509("cn-server")
      const dest = yield* startDestination(named.server)
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK)), "migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      // CN=wrong.example and CN=localhost: for neither (it passed for both); CN=localhost with an IP altname: the
      // altnames are its names (it passed for localhost)
      for (
        const [name, said] of [
          ["twocn-server", "the certificate has 2 CNs and no altnames"],
          ["ipsan-cn-server", "its altnames hold no DNS name"]
        ] as const
      ) {
        const server = yield* serverX509(name)
        const refusing = yield* startDestination(server.server)
        const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, refusing.port), client.client(LOOPBACK))), name)
        const tls = expectTlsFailure(failureOf(exit), "main", "Handshake")
        expect(tls.message).toContain(`Host: localhost is not the certificate's name: ${said}`)
        expect(tls.message).toContain("as QEMU's GnuTLS checks names (the certificate is for ")
        yield* noHang(refusing.rejections(1), "the destination's rejection")
        yield* Fiber.interrupt(refusing.fiber)
      }
    })))

  it.live("a server certificate from an unknown CA is refused", () =>
    leakFree(Effect.gen(function*() {
      // the client trusts only another CA: the server's chain does not verify (a CA file holding no CA, alice's
      // certificate say, is refused at load: see "configuration")
      const server = yield* serverX509("server")
      const client = yield* loadTls({ ca: fixture("other-ca-cert.pem") })
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server.server)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
      const tls = expectTlsFailure(failureOf(exit), "main", "Handshake")
      expect(tls.message).toMatch(/certificate/)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.fiber.unsafePoll()).toBeNull()
    })))

  // a CA file on a destination whose verifyPeer is unset looks like verification and is none (one TlsConfig serves both
  // roles: a source's CA verifies its destination): the destination took any client without a word
  it.live("allow-anon-client: destination without verifyPeer, client without a certificate (with a CA file and verifyPeer unset, its log says once that no client is verified; verifyPeer false, not)", () =>
    leakFree(Effect.gen(function*() {
      const client = yield* clientX509()
      for (const [config, said] of [[{}, true], [{ verifyPeer: false }, false]] as const) {
        const server = yield* serverX509("server", config)
        const ram = yield* sourceRam(1)
        const dest = yield* startDestination(server.server)
        yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK)), "migrate")
        const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(sameMemory(result.ram, ram)).toBe(true)
        expect(dest.logs.filter((l) => l.includes("verifies no client"))).toEqual(said
          ? [
            "TLS: this destination verifies no client certificate: its x509 settings have a CA file (ca) but verifyPeer " +
            "is unset, so any client is admitted; give verifyPeer: true to verify clients against it, or false to say so"
          ]
          : [])
      }
    })))

  it.live("reject-anon-client: destination with verifyPeer, client without a certificate: certificate required", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { verifyPeer: true })
      const client = yield* clientX509()
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server.server)
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
      )
      const error = failureOf(exit)
      // TLS 1.3: the client's handshake completes before the server checks its (empty) certificate, so the
      // refusal arrives as an alert on the main channel
      expect(error.message).toContain("certificate required")
      expectOneLine(error)
      expect(elapsed).toBeLessThan(PROMPT_MS)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.fiber.unsafePoll()).toBeNull()
    })))

  it.live("a fatal alert after the client's handshake closes the connection: a later write fails at once", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { verifyPeer: true })
      const client = yield* clientX509()
      const listener = yield* Transport.listen(tcp(LOOPBACK, 0))
      const serverSide = yield* Effect.forkScoped(
        Effect.scoped(Effect.flatMap(listener.accept, (c) => Effect.either(server.server(c, "main"))))
      )
      const raw = yield* Transport.connect(listener.address)
      // TLS 1.3: the client is done before the server checks the (missing) client certificate
      const secured = yield* client.client(LOOPBACK)(raw, "main")
      const readError = yield* noHang(Effect.flip(secured.read(1)), "read")
      expect(readError.message).toContain("certificate required")
      const [writeExit, ms] = yield* timed(noHang(Effect.exit(secured.write([Buffer.from("hello")])), "write", 2))
      expect(Exit.isFailure(writeExit)).toBe(true)
      expect(ms).toBeLessThan(200)
      const refused = yield* Fiber.join(serverSide)
      expect(refused._tag).toBe("Left")
    })))

  it.live("verifyPeer with a client certificate (alice) succeeds", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { verifyPeer: true })
      const client = yield* clientX509({}, "alice")
      yield* roundTrip(server.server, client.client(LOOPBACK))
    })))

  it.live("authz [alice]: alice is admitted", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { verifyPeer: true, authz: ["alice"] })
      const client = yield* clientX509({}, "alice")
      yield* roundTrip(server.server, client.client(LOOPBACK))
    })))

  it.live("authz [alice]: mallory is refused (the destination closes the main channel), the destination stays up", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { verifyPeer: true, authz: ["alice"] })
      const mallory = yield* clientX509({}, "mallory")
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server.server)
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), mallory.client(LOOPBACK))), "migrate")
      )
      expectCertificateRefused(failureOf(exit), "CN=mallory (issued by CN=test CA)")
      expect(elapsed).toBeLessThan(PROMPT_MS)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.logs.join("\n")).toContain("client certificate CN=mallory is not in the authorization list")
      expect(dest.fiber.unsafePoll()).toBeNull()

      // and alice, on the same listener, gets through
      const alice = yield* clientX509({}, "alice")
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), alice.client(LOOPBACK)), "second migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected).toHaveLength(1)
      expect(result.rejected[0]).toContain("CN=mallory")
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("peer certificates (QEMU verify-peer: chain to the CA, validity, usage; authz only for a verified chain)", () => {
  /**
   * Client certificates with CN=alice that the destination must refuse: fixture, the issuer the source names (that of
   * the certificate it loaded: one its load refuses is presented in place of alice's, REFUSED_AS_OWN), and why.
   */
  const forged: ReadonlyArray<readonly [name: string, issuer: string, why: string]> = [
    ["selfsigned-alice", "CN=test CA", "client certificate CN=alice is not trusted: self-signed certificate"],
    [
      "other-ca-alice",
      "CN=test CA",
      "client certificate CN=alice is not trusted: issued by CN=other test CA, not by a trusted CA"
    ],
    ["expired-alice", "CN=test CA", "client certificate CN=alice has expired (valid until Jan  1 00:00:00 2001 GMT)"],
    [
      "not-yet-valid-alice",
      "CN=test CA",
      "client certificate CN=alice is not valid yet (valid from Jan  1 00:00:00 2100 GMT)"
    ],
    [
      "serveronly-alice",
      "CN=test CA",
      "client certificate CN=alice is not for client authentication (extendedKeyUsage serverAuth)"
    ],
    [
      "keyagreement-alice",
      "CN=test CA",
      "client certificate CN=alice is not for client authentication (its keyUsage lacks digitalSignature)"
    ],
    [
      "sha1-alice",
      "CN=test CA",
      "client certificate CN=alice is not trusted: CA signature digest algorithm too weak " +
      "(a key or signature digest below what OpenSSL's security level accepts)"
    ]
  ]

  for (const [name, issuer, why] of forged) {
    it.live(`authz [alice] refuses ${name}: one line on each side, nothing received, then the real alice migrates`, () =>
      leakFree(Effect.gen(function*() {
        const server = yield* serverX509("server", { authz: ["alice"] })
        const forger = yield* forgedClient(name)
        const ram = yield* sourceRam(1)
        const dest = yield* startDestination(server.server)
        const [exit, elapsed] = yield* timed(
          noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), forger.client(LOOPBACK))), "migrate")
        )
        expectCertificateRefused(failureOf(exit), `CN=alice (issued by ${issuer})`)
        expect(elapsed).toBeLessThan(PROMPT_MS)

        // the destination says why, in one line, and is still waiting
        yield* noHang(dest.rejections(1), "the destination's rejection")
        const rejection = dest.logs.find((l) => l.includes("rejected a connection"))!
        expect(rejection).toMatch(
          /^rejected a connection from (tcp:127\.0\.0\.1:\d+ \(from 127\.0\.0\.1:\d+\)): TLS handshake with \1: /
        )
        expect(rejection.endsWith(`: ${why}`)).toBe(true)
        expect(rejection).not.toContain("\n")
        expect(dest.fiber.unsafePoll()).toBeNull()

        const alice = yield* clientX509({}, "alice")
        yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), alice.client(LOOPBACK)), "second migrate")
        const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(sameMemory(result.ram, ram)).toBe(true)
        expect(result.rejected).toHaveLength(1)
        expect(result.rejected[0]).toContain(why)
      })))
  }

  it.live("verifyPeer without authz refuses every one of them too, and then admits alice", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { verifyPeer: true })
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination(server.server)
      for (const [name, issuer] of forged) {
        const forger = yield* forgedClient(name)
        const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), forger.client(LOOPBACK))), name)
        expectCertificateRefused(failureOf(exit), `CN=alice (issued by ${issuer})`)
      }
      yield* noHang(dest.rejections(forged.length), "the destination's rejections")
      expect(dest.fiber.unsafePoll()).toBeNull()
      const alice = yield* clientX509({}, "alice")
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), alice.client(LOOPBACK)), "alice")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected.map((r) => r.replace(/^.*?\): TLS handshake with .*?\): /, ""))).toEqual(
        forged.map(([, , why]) => why)
      )
    })))

  /** Destination certificates for localhost that the source must refuse, and why. */
  const badServers: ReadonlyArray<readonly [name: string, why: string]> = [
    ["expired-server", "the destination's certificate CN=localhost has expired (valid until Jan  1 00:00:00 2001 GMT)"],
    [
      "not-yet-valid-server",
      "the destination's certificate CN=localhost is not valid yet (valid from Jan  1 00:00:00 2100 GMT)"
    ],
    [
      "clientonly-server",
      "the destination's certificate CN=localhost is not for server authentication (extendedKeyUsage clientAuth)"
    ],
    // its chain's intermediate CA expired, or is no CA at all, not the certificate: the message names the one
    ["notca-server", "the destination's certificate CN=localhost was issued by CN=not a CA, which is not a CA (basicConstraints CA:FALSE)"],
    [
      "expired-ca-server",
      "the destination's certificate CN=localhost was issued by CN=expired intermediate CA, which has expired " +
      "(valid until Jan  1 00:00:00 2001 GMT)"
    ],
    // a verification error Node has no code of its own for (UNSPECIFIED): still the destination's certificate's
    [
      "constrained-server",
      "the destination's certificate CN=localhost is not trusted: permitted subtree violation " +
      "(a name constraint of a CA of its chain)"
    ],
    // its own extendedKeyUsage is serverAuth, its intermediate CA's clientAuth only: the CA is named, not its usage
    [
      "clientonly-ca-server",
      "the destination's certificate CN=localhost was issued by CN=client-only intermediate CA, whose " +
      "extendedKeyUsage (clientAuth) is not for server authentication"
    ],
    // a critical extension of an OID nobody knows: RFC 5280 has every verifier refuse it, as OpenSSL and GnuTLS do
    ["unknowncrit-server", "the destination's certificate CN=localhost is not trusted: unhandled critical extension"],
    // signed with SHA-1: refused as QEMU's GnuTLS refuses it ("the certificate chain uses insecure algorithm")
    [
      "sha1-server",
      "the destination's certificate CN=localhost is not trusted: CA signature digest algorithm too weak " +
      "(a key or signature digest below what OpenSSL's security level accepts)"
    ]
  ]

  for (const [name, why] of badServers) {
    it.live(`the source refuses ${name} in one line; the destination asks whether its certificate was refused`, () =>
      leakFree(Effect.gen(function*() {
        const server = yield* forgedServer(name)
        const client = yield* clientX509({}, "alice")
        const ram = yield* sourceRam(1)
        const dest = yield* startDestination(server.server)
        const [exit, elapsed] = yield* timed(
          noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
        )
        const tls = expectTlsFailure(failureOf(exit), "main", "Handshake")
        expect(tls.message).toMatch(/^TLS handshake with tcp:127\.0\.0\.1:\d+ failed: /)
        expect(tls.message.endsWith(why), tls.message).toBe(true)
        expect(elapsed).toBeLessThan(PROMPT_MS)
        yield* noHang(dest.rejections(1), "the destination's rejection")
        // a Node source hangs up without an alert, before its Finished reaches the destination
        expect(dest.logs.join("\n")).toMatch(
          /: TLS handshake with .* failed: connection closed \(did the source refuse this destination's certificate CN=localhost\?\)$/
        )
        expect(dest.fiber.unsafePoll()).toBeNull()
      })))
  }
  // settings loaded once (a service's, a listener serving one migration after another) outlive their certificate: every
  // peer refuses it from then on, and this side's log only asked "did the source refuse this destination's certificate?"
  it.live("settings that outlived their certificate: the destination's log, and a source's refusal, say it expired since it was loaded", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam(1)
      const expired = "which has expired since it was loaded (valid until Jan  1 00:00:00 2001 GMT)"

      const dest = yield* startDestination(outlived(yield* serverX509("server"), "expired-server").server)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), (yield* clientX509({}, "alice")).client(LOOPBACK))), "migrate")
      expect(expectTlsFailure(failureOf(exit), "main", "Handshake").message).toContain("the destination's certificate CN=localhost has expired")
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.logs.find((l) => l.includes("rejected a connection"))).toMatch(new RegExp(
        ": TLS handshake with .* failed: connection closed: the source refused this destination's certificate CN=localhost, " +
          `${expired.replace(/[()]/g, "\\$&")}: every source refuses it; load a current one$`
      ))

      const verifying = yield* startDestination((yield* serverX509("server", { verifyPeer: true })).server)
      const source = outlived(yield* clientX509({}, "alice"), "expired-alice")
      const refused = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, verifying.port), source.client(LOOPBACK))), "source")
      expectCertificateRefused(failureOf(refused), `CN=alice (issued by CN=test CA), ${expired}`)
    })))

  /**
   * A one-page source, a destination admitting alice, and alice's upgrades: `valid` with her current certificate, `late`
   * with one that has expired since it was loaded (as a long migration's late channel presents it).
   */
  const aliceExpiringLater = Effect.gen(function*() {
    const ram = yield* sourceRam(1)
    const dest = yield* startDestination((yield* serverX509("server", { authz: ["alice"] })).server)
    const valid = (yield* clientX509({}, "alice")).client(LOOPBACK)
    const late = outlived(yield* clientX509({}, "alice"), "expired-alice").client(LOOPBACK)
    return { ram, dest, valid, late }
  })

  it.live("a source's certificate that expires after its main channel's handshake: a channel the destination then refuses names it, not 'connection reset'", () =>
    leakFree(Effect.gen(function*() {
      // the main channel's handshake while alice's certificate is valid, the channels' once it has expired (a channel
      // connecting, or re-attaching, late in a long migration)
      const { ram, dest, valid, late } = yield* aliceExpiringLater
      const upgrade: Upgrade = (connection, channel) => (channel === "main" ? valid : late)(connection, channel)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), upgrade, { reconnect: 0 })), "migrate")
      const error = failureOf(exit)
      expect(error).toBeInstanceOf(MigrationError.ChannelError)
      expect((error as MigrationError.ChannelError).message).toContain(
        "it most likely refused this source's certificate CN=alice (issued by CN=test CA), which has expired since it was " +
          "loaded (valid until Jan  1 00:00:00 2001 GMT)"
      )
      expectOneLine(error as MigrationError.ChannelError)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.logs.find((l) => l.includes("rejected a connection"))).toContain("client certificate CN=alice has expired")
    })))

  // a refusal no new connection changes (this source's certificate expired) burnt every re-attach attempt, 1 s and 2 s
  // apart, before the migration failed with it
  it.live("a lost channel whose re-attach the destination refuses for this source's expired certificate: the migration ends at its first refusal, saying so", () =>
    leakFree(Effect.gen(function*() {
      const { ram, dest, valid, late } = yield* aliceExpiringLater
      // channel 1's first connection breaks at its first packet; its re-attaching connections present the expired one
      let connections = 0
      const upgrade: Upgrade = (connection, channel) =>
        Effect.gen(function*() {
          if (channel !== 1) return yield* valid(connection, channel)
          const nth = ++connections
          if (nth > 1) return yield* late(connection, channel)
          const secured = yield* valid(connection, channel)
          let writes = 0
          return {
            ...secured,
            write: (chunks: ReadonlyArray<Uint8Array>) =>
              Effect.suspend(() => {
                if (++writes === 2) connection.stream.destroy()
                return secured.write(chunks)
              })
          }
        })
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), upgrade, { reconnect: 3 })), "migrate")
      const error = failureOf(exit)
      expect(error).toBeInstanceOf(MigrationError.ChannelError)
      expect((error as MigrationError.ChannelError).message).toMatch(
        /^multifd channel 1: tcp:127\.0\.0\.1:\d+: the destination closed the connection right after the TLS handshake: /
      )
      expect((error as MigrationError.ChannelError).message).toContain(
        "it most likely refused this source's certificate CN=alice (issued by CN=test CA), which has expired since it was " +
          "loaded (valid until Jan  1 00:00:00 2001 GMT)"
      )
      // a channel never answers: its refusal says nothing of an answer
      expect((error as MigrationError.ChannelError).message).not.toContain("without answering")
      expectOneLine(error as MigrationError.ChannelError)
      // one re-attach, not three
      expect(connections).toBe(2)
    })))

  describe("an empty subject (RFC 5280 allows one when subjectAltName names the certificate; Node's X509Certificate then has no subject)", () => {
    it.live("a stranger's self-signed certificate of an empty subject: the destination refuses it in one line and keeps waiting (it threw an uncaught TypeError), then alice migrates", () =>
      leakFree(Effect.gen(function*() {
        const server = yield* serverX509("server", { verifyPeer: true })
        const dest = yield* startDestination(server.server)
        // a stranger with Node's own TLS client: any certificate it made, with an empty subject and issuer
        const stranger = yield* Effect.promise(() =>
          new Promise<string>((resolve) => {
            const socket = NodeTls.connect({
              port: dest.port,
              host: LOOPBACK,
              ca: Fs.readFileSync(fixture("ca-cert.pem")),
              servername: "localhost",
              cert: Fs.readFileSync(fixture("emptysubject-selfsigned-cert.pem")),
              key: Fs.readFileSync(fixture("emptysubject-selfsigned-key.pem"))
            })
            socket.on("error", () => socket.destroy())
            socket.on("close", () => resolve("closed"))
          })
        )
        expect(stranger).toBe("closed")
        yield* noHang(dest.rejections(1), "the destination's rejection")
        const rejection = dest.logs.find((l) => l.includes("rejected a connection"))!
        expect(rejection.endsWith(": client certificate with an empty subject (DNS:localhost) is not trusted: self-signed certificate"), rejection)
          .toBe(true)
        expect(dest.fiber.unsafePoll()).toBeNull()
        const alice = yield* clientX509({}, "alice")
        const ram = yield* sourceRam(1)
        yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), alice.client(LOOPBACK)), "alice")
        const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(sameMemory(result.ram, ram)).toBe(true)
        expect(result.rejected).toHaveLength(1)
      })))

    it.live("a destination presenting one self-signed: the source refuses it in one line (it threw an uncaught TypeError)", () =>
      leakFree(Effect.gen(function*() {
        const server = yield* forgedServer("emptysubject-selfsigned")
        const client = yield* clientX509({}, "alice")
        const dest = yield* startDestination(server.server)
        const exit = yield* noHang(Effect.exit(migrateTo(yield* sourceRam(1), tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
        const tls = expectTlsFailure(failureOf(exit), "main", "Handshake")
        expect(tls.message).toMatch(
          /^TLS handshake with tcp:127\.0\.0\.1:\d+ failed: the destination's certificate with an empty subject \(DNS:localhost\) is not trusted: self-signed certificate$/
        )
        yield* noHang(dest.rejections(1), "the destination's rejection")
        expect(dest.fiber.unsafePoll()).toBeNull()
      })))

    it.live("certificates of the CA with empty subjects, on both sides: migrate byte for byte; authz [alice] refuses the client, naming it by its altnames", () =>
      leakFree(Effect.gen(function*() {
        const server = yield* serverX509("emptysubject-server", { verifyPeer: true })
        const client = yield* clientX509({}, "emptysubject-alice")
        yield* roundTrip(server.server, client.client(LOOPBACK), { mib: 1 })

        const refusing = yield* serverX509("emptysubject-server", { authz: ["alice"] })
        const dest = yield* startDestination(refusing.server)
        const exit = yield* noHang(Effect.exit(migrateTo(yield* sourceRam(1), tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
        expectCertificateRefused(failureOf(exit), "with an empty subject (DNS:alice.example) (issued by CN=test CA)")
        yield* noHang(dest.rejections(1), "the destination's rejection")
        expect(dest.logs.find((l) => l.includes("rejected a connection"))!).toMatch(
          /: client certificate with an empty subject \(DNS:alice\.example\) is not in the authorization list \(its distinguished name: \)$/
        )
      })))
  })

  it.live("the source refuses a destination's certificate whose keyUsage forbids signatures (keyEncipherment only), as GnuTLS does", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* forgedServer("keyencipherment-server")
      const client = yield* clientX509()
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination(server.server)
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
      )
      const tls = expectTlsFailure(failureOf(exit), "main", "Unauthorized")
      expect(tls.message).toMatch(
        /^TLS handshake with tcp:127\.0\.0\.1:\d+: the destination's certificate CN=localhost does not permit digital signatures \(keyUsage\)$/
      )
      expect(elapsed).toBeLessThan(PROMPT_MS)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.fiber.unsafePoll()).toBeNull()
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("one peer per migration: every channel is the main channel's peer", () => {
  /**
   * A keys file of two identities, qemu (alice's) and other (mallory's), in a directory removed with the scope:
   * a destination that admits both.
   */
  const twoIdentities = Effect.acquireRelease(
    Effect.sync(() => {
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-psk-"))
      const file = Path.join(dir, "keys.psk")
      Fs.writeFileSync(file, `qemu:${Crypto.randomBytes(32).toString("hex")}\nother:${Crypto.randomBytes(32).toString("hex")}\n`)
      return { dir, file }
    }),
    ({ dir }) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
  )

  // alice's channel 1 waits in its handshake while the intruders are turned away: timeouts no wait comes near
  const long = { handshakeTimeoutMs: 30_000 }
  const LONG = { connect: "30 seconds", handshake: "30 seconds", peer: "30 seconds" } as const
  const peers = {
    x509: Effect.gen(function*() {
      return {
        server: yield* serverX509("server", { authz: ["alice", "mallory"], ...long }),
        alice: yield* clientX509(long, "alice"),
        mallory: yield* clientX509(long, "mallory"),
        aliceIs: "certificate CN=alice (SHA-256 ",
        malloryIs: "certificate CN=mallory (SHA-256 "
      }
    }),
    psk: Effect.gen(function*() {
      const { file } = yield* twoIdentities
      return {
        server: yield* loadTls({ psk: file, authz: ["qemu", "other"], ...long }),
        alice: yield* loadTls({ psk: file, ...long }),
        mallory: yield* loadTls({ psk: file, identity: "other", ...long }),
        aliceIs: `PSK identity "qemu"`,
        malloryIs: `PSK identity "other"`
      }
    })
  }

  /**
   * A source's upgrade as Node's own client (`options`: its credentials): it keeps the session tickets a destination
   * gives in `tickets`, and resumes the session of the one given.
   */
  const resumingClient = (options: NodeTls.ConnectionOptions, tickets: Array<Buffer>) => (session: Buffer | undefined): Upgrade => (connection) =>
    Effect.gen(function*() {
      const socket = yield* Effect.acquireRelease(
        Effect.sync(() =>
          NodeTls.connect({
            socket: connection.stream as Net.Socket,
            checkServerIdentity: () => undefined,
            ...options,
            ...(session === undefined ? {} : { session })
          }).on("session", (ticket: Buffer) => tickets.push(ticket))
        ),
        (socket) => Effect.sync(() => socket.destroy())
      )
      yield* Effect.async<void, Tls.TlsError>((resume) => {
        socket.once("secureConnect", () => resume(Effect.void))
        socket.once("error", (e) => resume(Effect.fail(new Tls.TlsError({ reason: "Handshake", detail: e.message }))))
      })
      return yield* Transport.fromStream(socket, connection.peer)
    })

  it.live(
    "psk: a session resumed with a ticket that another destination of the same settings gave (authz [other]) proves no " +
      "identity: a destination admitting only qemu refuses it, nothing received, and then qemu migrates",
    () =>
      leakFree(Effect.gen(function*() {
        const { file } = yield* twoIdentities
        // one loaded PSK file (one secure context, one ticket key), two destinations with their own authorization
        const loaded = yield* loadTls({ psk: file })
        const forOther = Tls.server({ ...loaded.settings, authz: ["other"] })
        const forQemu = Tls.server({ ...loaded.settings, authz: ["qemu"] })
        // mallory's client as Node's own: it keeps the session tickets a destination gives, and resumes with one
        const other = yield* loadTls({ psk: file, identity: "other" })
        const key = (other.settings.credentials as Extract<Tls.Credentials, { _tag: "Psk" }>).keys.get("other")!
        const tickets: Array<Buffer> = []
        const resuming = resumingClient({
          secureContext: other.settings.secureContext,
          pskCallback: () => ({ psk: key, identity: "other" })
        }, tickets)
        const ram = yield* sourceRam(1)
        const mallorys = yield* sourceRam(1)
        // mallory migrates to the destination that admits her, and keeps its tickets
        const admitting = yield* startDestination(forOther)
        yield* noHang(migrateTo(mallorys, tcp(LOOPBACK, admitting.port), resuming(undefined), { channels: 1 }), "mallory to her destination")
        yield* noHang(Fiber.join(admitting.fiber), "her destination")
        expect(tickets.length).toBeGreaterThan(0)

        const dest = yield* startDestination(forQemu)
        const exit = yield* noHang(
          Effect.exit(migrateTo(mallorys, tcp(LOOPBACK, dest.port), resuming(tickets.at(-1)), { channels: 1 })),
          "mallory resuming"
        )
        // (it succeeded: the resumed session skipped the PSK callback, where the authorization list is checked)
        expect(Exit.isFailure(exit)).toBe(true)
        yield* noHang(dest.rejections(1), "the destination's rejection")
        const rejection = dest.logs.find((l) => l.includes("rejected a connection"))!
        expect(rejection).toContain(
          ": a resumed TLS session, which proves no PSK identity (the authorization list is checked on a full handshake only)"
        )
        expect(rejection).not.toContain("\n")
        expect(dest.fiber.unsafePoll()).toBeNull()
        const qemu = yield* loadTls({ psk: file })
        yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), qemu.client(undefined), { channels: 1 }), "qemu")
        const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(sameMemory(result.ram, ram)).toBe(true)
        expect(result.rejected).toHaveLength(1)
        expect(result.rejected[0]).toContain("a resumed TLS session, which proves no PSK identity")
      }))
  )

  it.live(
    "x509: a session resumed with a ticket that another destination of the same settings gave (authz [alice, mallory]), " +
      "without a certificate: a destination admitting only alice refuses it, saying why, and keeps waiting",
    () =>
      leakFree(Effect.gen(function*() {
        const loaded = yield* serverX509("server")
        const forBoth = Tls.server({ ...loaded.settings, authz: ["alice", "mallory"] })
        const forAlice = Tls.server({ ...loaded.settings, authz: ["alice"] })
        const mallory = yield* clientX509({}, "mallory")
        const ca = yield* clientX509()
        const tickets: Array<Buffer> = []
        const mallorys = yield* sourceRam(1)
        const admitting = yield* startDestination(forBoth)
        yield* noHang(
          migrateTo(mallorys, tcp(LOOPBACK, admitting.port), resumingClient({ secureContext: mallory.settings.secureContext }, tickets)(undefined), { channels: 1 }),
          "mallory to her destination"
        )
        yield* noHang(Fiber.join(admitting.fiber), "her destination")
        expect(tickets.length).toBeGreaterThan(0)

        const dest = yield* startDestination(forAlice)
        // (a context of the CA alone: the resumed session is all she offers)
        const resumed = resumingClient({ secureContext: ca.settings.secureContext }, tickets)(tickets.at(-1))
        const exit = yield* noHang(Effect.exit(migrateTo(mallorys, tcp(LOOPBACK, dest.port), resumed, { channels: 1 })), "mallory resuming")
        expect(Exit.isFailure(exit)).toBe(true)
        yield* noHang(dest.rejections(1), "the destination's rejection")
        const rejection = dest.logs.find((l) => l.includes("rejected a connection"))!
        expect(rejection).toContain(
          "(the peer resumed a TLS session: this destination verifies client certificates, and takes only full " +
            "handshakes, each proving one)"
        )
        expect(rejection).not.toContain("\n")
        // (it keeps waiting for a migration)
        expect(dest.fiber.unsafePoll()).toBeNull()
      }))
  )

  for (const kind of ["x509", "psk"] as const) {
    it.live(
      `${kind}: another peer the destination admits, knowing the migration's uuid, cannot join it as a multifd channel (nor a plain connection): ` +
        "both turned away, naming the peers, and alice's memory arrives byte for byte",
      () =>
        leakFree(Effect.gen(function*() {
          const { alice, aliceIs, mallory, malloryIs, server } = yield* peers[kind]
          const ram = yield* sourceRam(1)
          const dest = yield* startDestination(server.server, { timeouts: LONG })
          // alice's channel 0 shows the migration's uuid (its init packet), her channel 1 waits for the intruders
          const uuid = yield* Deferred.make<Uint8Array>()
          const intruded = yield* Deferred.make<void>()
          const spied: Upgrade = (connection, channel) =>
            Effect.gen(function*() {
              if (channel === 1) yield* Deferred.await(intruded)
              const secured = yield* alice.client(LOOPBACK)(connection, channel)
              return channel !== 0 ? secured : {
                ...secured,
                write: (chunks: ReadonlyArray<Uint8Array>) =>
                  Effect.zipRight(Deferred.succeed(uuid, Buffer.from(chunks[0]!.subarray(8, 24))), secured.write(chunks))
              }
            })
          const migrating = yield* Effect.fork(migrateTo(ram, tcp(LOOPBACK, dest.port), spied, { timeouts: LONG }))
          const id = yield* noHang(Deferred.await(uuid), "alice's channel 0")
          const init = Protocol.encodeInit({ uuid: id, id: 1 })
          // a plain connection, then mallory over TLS, each announcing alice's channel 1
          yield* Effect.scoped(Effect.gen(function*() {
            const plain = yield* Transport.connect(tcp(LOOPBACK, dest.port))
            yield* plain.write([init])
            yield* noHang(dest.rejections(1), "the plain connection turned away")
            const intruder = yield* mallory.client(LOOPBACK)(yield* Transport.connect(tcp(LOOPBACK, dest.port)), 1)
            yield* intruder.write([init])
            yield* noHang(dest.rejections(2), "mallory's channel turned away")
          }))
          yield* Deferred.succeed(intruded, undefined)
          yield* noHang(Fiber.join(migrating), "alice's migration")
          const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
          expect(sameMemory(result.ram, ram)).toBe(true)
          expect(result.rejected).toHaveLength(2)
          expect(result.rejected[0]).toContain("the peer does not speak TLS")
          const [, refused] = result.rejected
          expect(refused).toContain(`: a multifd channel of another peer than the main channel's: ${malloryIs}`)
          expect(refused).toContain(`(the main channel's: ${aliceIs}`)
          expect(refused).not.toContain("\n")
        })))

    it.live(
      `${kind}: another peer the destination admits cannot re-attach a lost channel of alice's, even with its nonce: ` +
        "turned away naming the peers, alice's own connection re-attaches it",
      () =>
        leakFree(Effect.gen(function*() {
          const { alice, aliceIs, mallory, malloryIs, server } = yield* peers[kind]
          const ram = yield* sourceRam(1)
          const dest = yield* startDestination(server.server, { timeouts: LONG })
          // alice's channel 1 loses its first connection at its first packet; her second connection's init packet
          // (this migration's uuid, channel 1, the nonce the main channel announced) waits for the intruder
          const reattach = yield* Deferred.make<Buffer>()
          const intruded = yield* Deferred.make<void>()
          let connections = 0
          const spied: Upgrade = (connection, channel) =>
            Effect.gen(function*() {
              const secured = yield* alice.client(LOOPBACK)(connection, channel)
              if (channel !== 1) return secured
              const nth = ++connections
              let writes = 0
              return {
                ...secured,
                write: (chunks: ReadonlyArray<Uint8Array>) =>
                  Effect.suspend(() => {
                    writes++
                    if (nth === 1 && writes === 2) connection.stream.destroy()
                    if (nth !== 2 || writes !== 1) return secured.write(chunks)
                    return Deferred.succeed(reattach, Buffer.from(chunks[0]!)).pipe(
                      Effect.zipRight(Deferred.await(intruded)),
                      Effect.zipRight(secured.write(chunks))
                    )
                  })
              }
            })
          const migrating = yield* Effect.fork(
            migrateTo(ram, tcp(LOOPBACK, dest.port), spied, { timeouts: LONG, reconnect: 2 })
          )
          const init = yield* noHang(Deferred.await(reattach), "alice's channel 1 re-attaching")
          expect(Protocol.decodeInit(init, { channels: 2, uuid: undefined })).toMatchObject({ right: { id: 1 } })
          yield* Effect.scoped(Effect.gen(function*() {
            const intruder = yield* mallory.client(LOOPBACK)(yield* Transport.connect(tcp(LOOPBACK, dest.port)), 1)
            yield* intruder.write([init])
            yield* noHang(dest.rejections(1), "mallory's re-attach turned away")
          }))
          yield* Deferred.succeed(intruded, undefined)
          const stats = yield* noHang(Fiber.join(migrating), "alice's migration")
          expect(stats.reconnects).toBe(1)
          const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
          expect(sameMemory(result.ram, ram)).toBe(true)
          expect(result.rejected).toHaveLength(1)
          expect(result.rejected[0]).toContain(`: a multifd channel of another peer than the main channel's: ${malloryIs}`)
          expect(result.rejected[0]).toContain(`(the main channel's: ${aliceIs}`)
        })))
  }

  it.live(
    "x509, the source's side: a channel that reaches another destination than the main channel's (another " +
      "certificate of the CA for the same name) is refused after its handshake, before its init packet: that " +
      "destination gets no byte, the migration fails naming both certificates",
    () =>
      leakFree(Effect.gen(function*() {
        const server = yield* serverX509("server")
        const client = yield* clientX509({ hostname: "localhost" })
        const ram = yield* sourceRam(1)
        const dest = yield* startDestination(server.server)
        // the main channel reaches the destination; every later connection an impostor whose certificate (CN=localhost,
        // no altnames) the CA issued for the same name: a name that resolves to several hosts, or a path that sends
        // some connections elsewhere
        const impostor = NodeTls.createSecureContext({
          cert: Fs.readFileSync(fixture("cn-server-cert.pem")),
          key: Fs.readFileSync(fixture("cn-server-key.pem"))
        })
        const received: Array<Buffer> = []
        let accepted = 0
        const { address } = yield* loopbackServer((socket, track) => {
          if (accepted++ === 0) {
            const upstream = Net.connect({ host: LOOPBACK, port: dest.port })
            track(upstream)
            socket.pipe(upstream).pipe(socket)
            return
          }
          const secure = new NodeTls.TLSSocket(socket, { isServer: true, secureContext: impostor })
          track(secure)
          secure.on("data", (chunk: Buffer) => received.push(chunk))
        })
        const exit = yield* noHang(Effect.exit(migrateTo(ram, address, client.client("localhost"), { reconnect: 0 })), "migrate")
        const error = failureOf(exit)
        expect(error).toBeInstanceOf(MigrationError.ChannelError)
        const message = (error as MigrationError.ChannelError).message
        const fingerprint = (name: string) => new Crypto.X509Certificate(Fs.readFileSync(fixture(name))).fingerprint256
        expect(message).toContain(
          `another destination than the main channel's: certificate CN=localhost (SHA-256 ${fingerprint("cn-server-cert.pem")}) ` +
            `(the main channel's: certificate CN=localhost (SHA-256 ${fingerprint("server-cert.pem")}))`
        )
        expectOneLine(error as MigrationError.ChannelError)
        expect(Buffer.concat(received).length).toBe(0)
      }))
  )
})

// ---------------------------------------------------------------------------------------------------------

describe("certificate revocation lists (QEMU's ca-crl.pem)", () => {
  const CRL_MESSAGE = "(listed in the CRL of CN=test CA)"

  /** The source (with `client`'s credentials) fails on the main channel's handshake; returns the message. */
  const sourceRefused = (server: Tls.Tls["Type"], client: Tls.Tls["Type"]) =>
    Effect.gen(function*() {
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination(server.server)
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
      )
      const tls = expectTlsFailure(failureOf(exit), "main", "Handshake")
      expect(tls.message).toMatch(/^TLS handshake with tcp:127\.0\.0\.1:\d+ failed: /)
      expect(elapsed).toBeLessThan(PROMPT_MS)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.fiber.unsafePoll()).toBeNull()
      return tls.message
    })

  it.live("the source refuses a destination whose certificate the CRL revokes, in one line naming it", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("revoked-server")
      const client = yield* clientX509({ crl: fixture("ca-crl.pem") })
      const message = yield* sourceRefused(server, client)
      expect(message).toMatch(/failed: the destination's certificate CN=localhost is revoked \(listed in the CRL of CN=test CA\)$/)
    })))

  it.live("the source refuses a destination whose chain holds a revoked intermediate CA, naming that CA", () =>
    leakFree(Effect.gen(function*() {
      const chain = { ca: fixture("chain-ca-cert.pem"), crl: fixture("chain-crl.pem") }
      const server = yield* loadTls({
        ca: fixture("chain-ca-cert.pem"),
        cert: fixture("revoked-inter-server-cert.pem"),
        key: fixture("revoked-inter-server-key.pem")
      })
      const message = yield* sourceRefused(server, yield* loadTls(chain))
      expect(message.endsWith(
        `the destination's certificate CN=localhost was issued by CN=revoked intermediate CA, which is revoked ${CRL_MESSAGE}`
      ), message).toBe(true)
    })))

  it.live("an intermediate CA in good standing, with its certificate in the CA file and its CRL in the CRL file: migrates byte for byte", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* loadTls({
        ca: fixture("chain-ca-cert.pem"),
        cert: fixture("inter-server-cert.pem"),
        key: fixture("inter-server-key.pem")
      })
      const client = yield* loadTls({ ca: fixture("chain-ca-cert.pem"), crl: fixture("chain-crl.pem") })
      yield* roundTrip(server.server, client.client(LOOPBACK), { mib: 1 })
    })))

  it.live("an intermediate CA of which the CRL file has no CRL: refused, saying which CA lacks one (OpenSSL checks the whole chain)", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("inter-server")
      const client = yield* clientX509({ crl: fixture("ca-crl.pem") })
      const message = yield* sourceRefused(server, client)
      expect(message).toContain(
        "the destination's certificate CN=localhost cannot be checked for revocation: the CRL file has no CRL of CN=CRL intermediate CA"
      )
    })))

  it.live("verifyPeer with a CRL: a revoked client certificate is refused (one line on each side), then alice, under the same CRL, migrates", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { verifyPeer: true, crl: fixture("ca-crl.pem") })
      // (a source with the CRL refuses its own revoked certificate at load)
      const revoked = yield* clientX509({}, "revoked-alice")
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination(server.server)
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), revoked.client(LOOPBACK))), "migrate")
      )
      expectCertificateRefused(failureOf(exit), "CN=alice (issued by CN=test CA)")
      expect(elapsed).toBeLessThan(PROMPT_MS)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      const rejection = dest.logs.find((l) => l.includes("rejected a connection"))!
      expect(rejection.endsWith(`: client certificate CN=alice is revoked ${CRL_MESSAGE}`), rejection).toBe(true)
      expect(rejection).not.toContain("\n")
      expect(dest.fiber.unsafePoll()).toBeNull()

      const alice = yield* clientX509({ crl: fixture("ca-crl.pem") }, "alice")
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), alice.client(LOOPBACK)), "alice")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)
      expect(result.rejected).toHaveLength(1)
    })))

  /**
   * Starts a destination of `server` and has the revoked alice migrate to it: refused as revoked, on both sides. The
   * destination and a one-page source for what follows.
   */
  const refusesRevokedAlice = (server: Upgrade) =>
    Effect.gen(function*() {
      const revoked = yield* clientX509({}, "revoked-alice")
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination(server)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), revoked.client(LOOPBACK))), "migrate")
      expectCertificateRefused(failureOf(exit), "CN=alice (issued by CN=test CA)")
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.logs.join("\n")).toContain(`client certificate CN=alice is revoked ${CRL_MESSAGE}`)
      return { ram, dest }
    })

  it.live("authz with a CRL: the revoked alice is refused as revoked, not as unauthorized", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { authz: ["alice"], crl: fixture("ca-crl.pem") })
      yield* refusesRevokedAlice(server.server)
    })))

  // a CRL on a destination checks its clients or nothing: without verifyPeer it admitted any client, revoked ones
  // included, without a word (the command line was not affected: recv --tls-ca turns verification on)
  it.live("a CRL without verifyPeer: the destination verifies its clients against it (a revoked alice refused, then alice migrates); verifyPeer false with a CRL is refused at load", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { crl: fixture("ca-crl.pem") })
      expect(server.settings.verifyPeer).toBe(true)
      const { ram, dest } = yield* refusesRevokedAlice(server.server)
      const alice = yield* clientX509({}, "alice")
      yield* noHang(migrateTo(ram, tcp(LOOPBACK, dest.port), alice.client(LOOPBACK)), "alice")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)

      const contradiction = yield* Effect.flip(serverX509("server", { crl: fixture("ca-crl.pem"), verifyPeer: false }))
      expect(contradiction.reason).toBe("Config")
      expect(contradiction.message).toBe(
        "TLS configuration: verifyPeer false with a CRL file (crl): a destination given one verifies its clients " +
          "against it (a source checks the destination's certificate, whatever verifyPeer says); drop verifyPeer: false, or the crl"
      )
    })))

  it.live("both sides with the CRL, certificates it does not list: byte for byte, over 4 channels", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server", { verifyPeer: true, crl: fixture("ca-crl.pem") })
      const client = yield* clientX509({ crl: fixture("ca-crl.pem") }, "alice")
      expect(server.settings.crls?.[0]?.revoked).toHaveLength(3)
      yield* roundTrip(server.server, client.client(LOOPBACK), { channels: 4 })
    })))

  it.live("load: a CRL file that is no PEM CRL, from another CA, forged, expired or not yet valid, a delta CRL, of a limited scope (issuingDistributionPoint), with an unhandled critical extension, with two CRLs of one CA, or that lacks a CA's CRL, is refused naming it", () =>
    leakFree(Effect.gen(function*() {
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-crl-"))
      yield* Effect.addFinalizer(() => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true })))
      const garbage = Path.join(dir, "garbage.pem")
      Fs.writeFileSync(garbage, "not a CRL\n")
      const badBase64 = Path.join(dir, "bad64.pem")
      Fs.writeFileSync(badBase64, "-----BEGIN X509 CRL-----\nMIIB!!!!not*base64\n-----END X509 CRL-----\n")
      const truncated = Path.join(dir, "truncated.pem")
      Fs.writeFileSync(truncated, "-----BEGIN X509 CRL-----\nMIIBAAAA\n-----END X509 CRL-----\n")
      // OpenSSL consults only the newest CRL of a CA: one that lacks an entry of the other admitted what it revoked
      const twice = Path.join(dir, "twice.pem")
      Fs.writeFileSync(twice, Fs.readFileSync(fixture("ca-crl.pem"), "utf8").repeat(2))
      const ca = fixture("ca-cert.pem")
      const crl = (name: string) => fixture(name)
      const cases: ReadonlyArray<readonly [Tls.TlsConfig, string]> = [
        [{ crl: garbage }, `CRL file ${garbage} is not a PEM CRL`],
        [{ crl: ca }, `CRL file ${ca} holds a certificate, not a CRL`],
        [{ crl: fixture("alice-key.pem") }, `CRL file ${fixture("alice-key.pem")} holds a private key, not a CRL`],
        [{ crl: badBase64 }, `CRL file ${badBase64} is not a valid PEM CRL: bad base64 decode`],
        [{ crl: truncated }, `CRL file ${truncated} is not a valid PEM CRL: truncated DER`],
        [
          { crl: crl("other-ca-crl.pem") },
          `CRL file ${crl("other-ca-crl.pem")} is a CRL of CN=foreign CRL CA, which is not a CA of ${ca}: it cannot be checked, and OpenSSL would never consult it`
        ],
        [
          { crl: crl("forged-crl.pem") },
          `CRL file ${crl("forged-crl.pem")} names CN=test CA as its issuer but is not signed by that CA (in ${ca})`
        ],
        [
          { crl: crl("expired-crl.pem") },
          `CRL file ${crl("expired-crl.pem")}: the CRL of CN=test CA has expired (next update Jan  1 00:00:00 2001 GMT): ` +
          `every handshake would fail with "CRL has expired"; get a current one`
        ],
        [
          { crl: crl("not-yet-valid-crl.pem") },
          `CRL file ${crl("not-yet-valid-crl.pem")}: the CRL of CN=test CA is not valid yet (last update Jan  1 00:00:00 2100 GMT): ` +
          `every handshake would fail with "CRL is not yet valid"`
        ],
        [
          { ca: fixture("chain-ca-cert.pem"), crl: crl("ca-crl.pem") },
          `CRL file ${crl("ca-crl.pem")} has no CRL of CN=CRL intermediate CA (a CA of ${fixture("chain-ca-cert.pem")}): ` +
          "with CRLs, OpenSSL checks every certificate of a chain against a CRL of its issuer, so each CA needs one"
        ],
        [
          { crl: crl("delta-crl.pem") },
          `CRL file ${crl("delta-crl.pem")} is a delta CRL of CN=test CA (deltaCRLIndicator), which lists only what changed since its base CRL`
        ],
        [
          { crl: crl("critical-ext-crl.pem") },
          `CRL file ${crl("critical-ext-crl.pem")}: the CRL of CN=test CA has a critical extension OpenSSL does not handle (OID 1.2.3.4.5): ` +
          `every handshake would fail with "unhandled critical CRL extension"`
        ],
        ...([
          ["user-only", "onlyContainsUserCerts"],
          ["ca-only", "onlyContainsCACerts"],
          ["some-reasons", "onlySomeReasons"],
          ["indirect", "indirectCRL"]
        ] as const).map(([name, scope]) =>
          [
            { crl: crl(`${name}-crl.pem`) },
            `CRL file ${crl(`${name}-crl.pem`)}: the CRL of CN=test CA covers only some of its certificates ` +
            `(issuingDistributionPoint: ${scope}): OpenSSL checks a certificate only against a CRL that covers it, and ` +
            "would refuse the handshake of every certificate it does not cover; give a complete CRL of CN=test CA"
          ] as const
        ),
        [
          { crl: twice },
          `CRL file ${twice} holds two CRLs of CN=test CA (CRL 1 and CRL 2 of 2): OpenSSL consults only the most recent`
        ],
        [{ ca: undefined, crl: crl("ca-crl.pem") }, "a CRL file needs the CA certificate (ca) that issued it"],
        [
          { ca: undefined, cert: fixture("server-cert.pem"), key: fixture("server-key.pem"), crl: crl("ca-crl.pem") },
          "a CRL file needs the CA certificate (ca) that issued it"
        ],
        [{ ca: undefined, psk: fixture("keys.psk"), crl: crl("ca-crl.pem") }, "a CRL file applies to x509 certificates, not a PSK file"],
        [{ crl: "/nonexistent/ca-crl.pem" }, "cannot read CRL file /nonexistent/ca-crl.pem"]
      ]
      for (const [config, problem] of cases) {
        const error = yield* Effect.flip(Tls.make({ ca, ...config })).pipe(
          Effect.mapError(() => new Error(`loaded: ${JSON.stringify(config)}`))
        )
        expect({ config, reason: error.reason }).toEqual({ config, reason: "Config" })
        expect(error.message.startsWith(`TLS configuration: ${problem}`), error.message).toBe(true)
        expectOneLine(error)
      }
    })))

  // OpenSSL checks a CRL's signer for keyUsage cRLSign: a CRL signed by a CA that may sign certificates only was
  // loaded, and then every handshake with a peer of that CA failed, blaming the peer ("the destination's certificate
  // CN=localhost is not trusted: key usage does not include CRL signing"); GnuTLS refuses such a CRL too
  it.live("load: a CRL signed by a CA whose keyUsage does not permit signing CRLs (keyCertSign only) is refused naming it", () =>
    leakFree(Effect.gen(function*() {
      const ca = fixture("nocrlsign-ca-cert.pem")
      const crl = fixture("nocrlsign-ca-crl.pem")
      const error = yield* Effect.flip(Tls.make({ ca, crl })).pipe(Effect.mapError(() => new Error("loaded")))
      expect(error.reason).toBe("Config")
      expect(error.message).toBe(
        `TLS configuration: CRL file ${crl}: the CRL of CN=no-CRL-sign CA is signed by a CA whose keyUsage does not ` +
          "permit signing CRLs (cRLSign): OpenSSL would refuse every certificate that CA issued (\"key usage does not " +
          "include CRL signing\"); give a CRL signed with a key that may sign CRLs"
      )
      expectOneLine(error)
    })))

  it.live("layerConfig reads MULTIFD_TLS_CRL", () =>
    leakFree(Effect.gen(function*() {
      const env = (crl: string) =>
        Effect.withConfigProvider(ConfigProvider.fromMap(
          new Map([["MULTIFD_TLS_CA", fixture("ca-cert.pem")], ["MULTIFD_TLS_CRL", crl]]),
          { pathDelim: "_" }
        ))
      const tls = yield* Effect.provide(Tls.Tls, Tls.layerConfig).pipe(env(fixture("ca-crl.pem")))
      expect(tls.settings.crls?.map((c) => c.issuer)).toEqual(["O=effect-multifd tests,CN=test CA"])
      const expired = yield* Effect.flip(Effect.provide(Tls.Tls, Tls.layerConfig).pipe(env(fixture("expired-crl.pem"))))
      expect(expired.message).toContain("has expired")
    })))
})

describe("authorization by distinguished name (QEMU's tls-authz: the subject as GnuTLS writes it)", () => {
  const dnOf = (name: string) => Tls.distinguishedName(new Crypto.X509Certificate(Fs.readFileSync(fixture(`${name}-cert.pem`))))

  it("subjects are written as QEMU 10.0.2's GnuTLS writes them: most general first, values escaped", () => {
    // each string as QEMU printed it ("TLS x509 authz check for ... is denied") for a certificate of that subject
    expect(dnOf("alice")).toBe("O=effect-multifd tests,CN=alice")
    expect(dnOf("other-org-alice")).toBe("O=other org,CN=alice")
    expect(dnOf("crafted-alice")).toBe("O=effect-multifd tests,CN=alice\\,O=Example")
    expect(dnOf("crafted-org-alice")).toBe("O=effect-multifd tests\\,CN=alice")
  })

  /**
   * Attribute values GnuTLS 3.7.9 writes otherwise than as text (lib/x509/common.c, `_gnutls_x509_dn_to_string`).
   * Each expected string is what `gnutls_x509_dn_get_str2(dn, &s, GNUTLS_X509_DN_FLAG_COMPAT)` (the writer of
   * `gnutls_x509_crt_get_dn`, which QEMU's tls-authz matches) wrote for the DER Name built here.
   */
  describe("values as GnuTLS writes them (Der.nameOf on DER Names built here)", () => {
    const length = (n: number) => n < 0x80 ? [n] : [0x81, n]
    const tlv = (tag: number, content: ReadonlyArray<number>) => [tag, ...length(content.length), ...content]
    const oid = (dotted: string) => {
      const [a, b, ...rest] = dotted.split(".").map(Number)
      const body = [a! * 40 + b!]
      for (const arc of rest) {
        const bytes = [arc & 0x7f]
        for (let v = arc >>> 7; v > 0; v >>>= 7) bytes.unshift(0x80 | (v & 0x7f))
        body.push(...bytes)
      }
      return tlv(0x06, body)
    }
    const bytes = (text: string) => [...Buffer.from(text, "latin1")]
    /** A Name of one RDN per attribute: [OID, value tag, value bytes]. */
    const name = (...attributes: ReadonlyArray<readonly [string, number, ReadonlyArray<number>]>) =>
      Der.nameOf(Uint8Array.from(tlv(0x30, attributes.flatMap(([o, tag, value]) => tlv(0x31, tlv(0x30, [...oid(o), ...tlv(tag, value)]))))))
    const CN = "2.5.4.3"
    const UTF8 = 0x0c, PRINTABLE = 0x13, T61 = 0x14, IA5 = 0x16, UNIVERSAL = 0x1c, BMP = 0x1e

    it("a CN holding a NUL is written as the hex of its whole DER value (tag and length too), never as text", () => {
      expect(name([CN, UTF8, bytes("alice\0")])).toBe("CN=#0c06616c69636500")
      expect(name([CN, UTF8, bytes("alice\0mallory")])).toBe("CN=#0c0d616c696365006d616c6c6f7279")
      // so neither reads as CN=alice
      expect(name([CN, UTF8, bytes("alice")])).toBe("CN=alice")
      // a BMPString's NUL too (one last U+0000 GnuTLS's UTF-16 conversion drops)
      expect(name([CN, BMP, [0, 0x61, 0, 0, 0, 0x62]])).toBe("CN=#1e06006100000062")
      expect(name([CN, BMP, [0, 0x61, 0, 0]])).toBe("CN=a")
    })

    it("an attribute type GnuTLS does not know is its OID and the hex of the whole DER value", () => {
      expect(name(["1.2.3.4", UTF8, bytes("x")])).toBe("1.2.3.4=#0c0178")
      // a known type's value of a string type it does not allow, too: it never reads as the text
      expect(name([CN, IA5, bytes("alice")])).toBe("CN=#1605616c696365")
      expect(name(["2.5.4.6", UTF8, bytes("GB")])).toBe("C=#0c024742")
      expect(name(["2.5.4.6", PRINTABLE, bytes("GB")])).toBe("C=GB")
    })

    it("a TeletexString not all printable ASCII, and a UniversalString, are '#' and the hex of their content, escaped", () => {
      expect(name([CN, T61, bytes("al\xc3\xa9ce")])).toBe("CN=\\#616cc3a96365")
      expect(name([CN, T61, bytes("al\nice")])).toBe("CN=\\#616c0a696365")
      expect(name([CN, T61, bytes("alice")])).toBe("CN=alice")
      expect(name([CN, UNIVERSAL, [0, 0, 0, 0x61]])).toBe("CN=\\#00000061")
      // a BMPString is text (UTF-16 written as UTF-8), unless it is no UTF-16
      expect(name([CN, BMP, [...Buffer.from("caf\u00e9", "utf16le").swap16()]])).toBe("CN=caf\u00e9")
      expect(name([CN, BMP, [0xd8, 0, 0, 0x61]])).toBe("CN=\\#d8000061")
    })

    it("attribute types by GnuTLS's names for them (gnutls_x509_dn_oid_name), others by their OID", () => {
      expect(name(
        ["2.5.4.15", UTF8, bytes("b")],
        ["2.5.4.17", UTF8, bytes("1")],
        ["2.5.4.13", UTF8, bytes("d,x")],
        ["1.3.6.1.4.1.311.60.2.1.1", UTF8, bytes("L")],
        ["1.3.6.1.4.1.311.60.2.1.2", UTF8, bytes("S")],
        ["1.3.6.1.4.1.311.60.2.1.3", PRINTABLE, bytes("GB")],
        ["2.5.4.20", PRINTABLE, bytes("12")],
        ["1.2.840.113549.1.9.1", IA5, bytes("a@b")],
        ["0.9.2342.19200300.100.1.25", IA5, bytes("com")]
      )).toBe(
        "businessCategory=b,postalCode=1,description=d\\,x,jurisdictionOfIncorporationLocalityName=L," +
          "jurisdictionOfIncorporationStateOrProvinceName=S,jurisdictionOfIncorporationCountryName=GB," +
          "telephoneNumber=12,EMAIL=a@b,DC=com"
      )
      // PKCS #9 friendlyName: known (its value is read) but unnamed
      expect(name(["1.2.840.113549.1.9.20", BMP, [0, 0x66, 0, 0x72]])).toBe("1.2.840.113549.1.9.20=fr")
    })

    it("a name GnuTLS cannot write (an empty DirectoryString) cannot be read: no entry admits it", () => {
      expect(() => name([CN, UTF8, []])).toThrow()
      // an empty value of a one-type attribute is hex
      expect(name(["2.5.4.6", PRINTABLE, []])).toBe("C=#1300")
    })
  })

  it("parseAuthz: commas separate CNs and identities; a list holding a DN is separated by ';' (an escaped one does not separate)", () => {
    expect(Tls.parseAuthz("alice, bob,,")).toEqual(["alice", "bob"])
    expect(Tls.parseAuthz("O=Example,CN=alice; bob")).toEqual(["O=Example,CN=alice", "bob"])
    expect(Tls.parseAuthz("O=Ex\\;ample,CN=alice;O=x,CN=y")).toEqual(["O=Ex\\;ample,CN=alice", "O=x,CN=y"])
  })

  it.live("load: an authz entry with '=' that is no DN (a CN list run into a DN) is refused, saying how to separate entries", () =>
    leakFree(Effect.gen(function*() {
      const error = yield* Effect.flip(
        Tls.load({ ca: fixture("ca-cert.pem"), cert: fixture("server-cert.pem"), key: fixture("server-key.pem"), authz: Tls.parseAuthz("alice,O=Example,CN=bob") })
      )
      expect(error.message).toBe(
        `TLS configuration: authorization entry "alice,O=Example,CN=bob" is not a distinguished name: each part is TYPE=value (O=Example,CN=alice); in a list that holds one, entries are separated by ';'`
      )
      // an escaped comma is part of a value
      yield* Tls.load({ ca: fixture("ca-cert.pem"), cert: fixture("server-cert.pem"), key: fixture("server-key.pem"), authz: ["O=a\\,b,CN=c"] })
    })))

  // QEMU's tls-authz compares the DN string GnuTLS writes, and so does this side: an entry in another form (OpenSSL's
  // `-subject` print, a type in other letters or by OID) loaded, and then refused every client ("not in the
  // authorization list"), though the destination looked ready
  it.live("load: an authz DN that GnuTLS never writes so (types in other letters, OpenSSL's names, blanks around '=' and ',') is refused, giving GnuTLS's form", () =>
    leakFree(Effect.gen(function*() {
      const server = { ca: fixture("ca-cert.pem"), cert: fixture("server-cert.pem"), key: fixture("server-key.pem") }
      for (const [entry, written] of [
        ["O = effect-multifd tests, CN = alice", "O=effect-multifd tests,CN=alice"],
        ["o=effect-multifd tests,cn=alice", "O=effect-multifd tests,CN=alice"],
        ["organizationName=effect-multifd tests,commonName=alice", "O=effect-multifd tests,CN=alice"],
        ["O=effect-multifd tests,2.5.4.3=alice", "O=effect-multifd tests,CN=alice"],
        ["CN=alice+emailAddress=alice@example.org", "CN=alice+EMAIL=alice@example.org"]
      ] as const) {
        // (a load that succeeds fails the test with a short message: its settings are too big to print)
        const error = yield* Effect.flip(Tls.load({ ...server, authz: [entry] })).pipe(
          Effect.mapError(() => new Error(`loaded with authz ${JSON.stringify(entry)}: expected a refusal`))
        )
        expect(error.message).toBe(
          `TLS configuration: authorization entry ${JSON.stringify(entry)} can match no certificate: GnuTLS (whose form ` +
            `QEMU's tls-authz matches) writes that name as ${JSON.stringify(written)}`
        )
        expectOneLine(error)
      }
      // GnuTLS's own form loads: escaped commas and blanks, OIDs of types it has no name for; a PSK identity is no DN
      yield* Tls.load({ ...server, authz: ["O=effect-multifd tests,CN=alice", "O=a\\,b,CN=\\ c\\ ", "1.2.3.4=#0c0161", "alice"] })
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-psk-"))
      const keys = Path.join(dir, "keys.psk")
      Fs.writeFileSync(keys, `${Fs.readFileSync(fixture("keys.psk"), "utf8")}o = x:${Crypto.randomBytes(32).toString("hex")}\n`)
      yield* Tls.load({ psk: keys, authz: ["qemu", "o = x"] }).pipe(
        Effect.ensuring(Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true })))
      )
    })))

  /**
   * Runs the client certificate `name` (whose name in messages is `shown`) against a destination with `authz`:
   * "admitted" (and the memory arrived), or the destination's refusal.
   */
  const against = (authz: ReadonlyArray<string>, name: string, shown = "CN=alice") =>
    Effect.scoped(Effect.gen(function*() {
      const server = yield* serverX509("server", { authz })
      const client = yield* clientX509({}, name)
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination(server.server)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
      if (Exit.isSuccess(exit)) {
        const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
        expect(sameMemory(result.ram, ram)).toBe(true)
        return "admitted"
      }
      expectCertificateRefused(failureOf(exit), `${shown} (issued by CN=test CA)`)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      const rejection = dest.logs.find((l) => l.includes("rejected a connection"))!
      expect(rejection).not.toContain("\n")
      return rejection.replace(/^.*?\): TLS handshake with .*?\): /, "")
    }))

  it.live("a full DN admits exactly that subject: alice migrates; a CN alice of another organization is refused, naming its DN", () =>
    leakFree(Effect.gen(function*() {
      expect(yield* against(["O=effect-multifd tests,CN=alice"], "alice")).toBe("admitted")
      expect(yield* against(["O=effect-multifd tests,CN=alice"], "other-org-alice")).toBe(
        "client certificate CN=alice is not in the authorization list (its distinguished name: O=other org,CN=alice)"
      )
      // an entry without '=' is still a CN, whatever the organization
      expect(yield* against(["alice"], "other-org-alice")).toBe("admitted")
    })))

  it.live("a certificate of two CNs (alice, then mallory) is admitted by no CN entry, only by its whole name", () =>
    leakFree(Effect.gen(function*() {
      // the CN entry alice matched the first CN: a name the CA signed beside mallory's
      expect(yield* against(["alice"], "twocn-alice")).toBe(
        "client certificate CN=alice is not in the authorization list (its distinguished name: " +
          "O=effect-multifd tests,CN=alice,CN=mallory; with 2 CNs, only an entry of the whole name can admit it)"
      )
      expect(yield* against(["mallory"], "twocn-alice")).toMatch(/with 2 CNs, only an entry of the whole name/)
      expect(yield* against(["O=effect-multifd tests,CN=alice,CN=mallory"], "twocn-alice")).toBe("admitted")
    })))

  it.live("the DN in RFC 4514's reversed order is not the subject QEMU matches: refused", () =>
    leakFree(Effect.gen(function*() {
      expect(yield* against(["CN=alice,O=effect-multifd tests"], "alice")).toBe(
        "client certificate CN=alice is not in the authorization list (its distinguished name: O=effect-multifd tests,CN=alice)"
      )
    })))

  it.live("crafted values never pass for more of the name: CN 'alice,O=Example' and O 'effect-multifd tests,CN=alice' are refused", () =>
    leakFree(Effect.gen(function*() {
      expect(yield* against(["O=effect-multifd tests,CN=alice,O=Example", "alice"], "crafted-alice", "CN=alice\\,O=Example")).toMatch(
        /is not in the authorization list \(its distinguished name: O=effect-multifd tests,CN=alice\\,O=Example\)$/
      )
      // no CN: messages show the whole subject, as Node writes it
      const crafted = yield* against(["O=effect-multifd tests,CN=alice"], "crafted-org-alice", "O=effect-multifd tests\\,CN=alice")
      expect(crafted).toBe(
        "client certificate O=effect-multifd tests\\,CN=alice is not in the authorization list (its distinguished name: O=effect-multifd tests\\,CN=alice)"
      )
      // written escaped, as QEMU writes it, the entry is that subject
      expect(yield* against(["O=effect-multifd tests,CN=alice\\,O=Example"], "crafted-alice")).toBe("admitted")
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("trust: the CA file only, never Node's public roots (QEMU's tls-creds-x509 always needs ca-cert.pem)", () => {
  const noCa = (name: string, config: Tls.TlsConfig = {}): Tls.TlsConfig => ({
    cert: fixture(`${name}-cert.pem`),
    key: fixture(`${name}-key.pem`),
    ...config
  })
  /** The error of an effect that must fail (one that succeeds fails the test with a short message). */
  const refused = <A, E, R>(self: Effect.Effect<A, E, R>) =>
    Effect.flip(self).pipe(Effect.mapError(() => new Error("expected a refusal, but it succeeded")))

  it.live("a destination that verifies clients (verifyPeer, authz) without a CA file is refused at load", () =>
    leakFree(Effect.gen(function*() {
      for (const [config, what] of [[{ verifyPeer: true }, "verifyPeer"], [{ authz: ["alice"] }, "authz"]] as const) {
        const error = yield* refused(Tls.load(noCa("server", config)))
        expect(error.reason).toBe("Config")
        expect(error.message).toBe(
          `TLS configuration: ${what} with x509 needs a CA certificate (ca) to verify clients: ` +
            "the public root CAs are never trusted"
        )
      }
      // the environment's variables too
      const fromEnv = yield* refused(Effect.provide(Tls.Tls, Tls.layerConfig)).pipe(
        Effect.withConfigProvider(ConfigProvider.fromMap(
          new Map([
            ["MULTIFD_TLS_CERT", fixture("server-cert.pem")],
            ["MULTIFD_TLS_KEY", fixture("server-key.pem")],
            ["MULTIFD_TLS_VERIFY_PEER", "true"]
          ]),
          { pathDelim: "_" }
        ))
      )
      expect(fromEnv.message).toContain("verifyPeer with x509 needs a CA certificate (ca)")
      // a destination that verifies nobody needs none
      yield* Tls.load(noCa("server"))
    })))

  // settings that took no effect were loaded without a word: an identity with x509 (no PSK identity is presented), a
  // hostname with PSK (no certificate names the destination), verifyPeer false with PSK (a key always proves the
  // source) or with an x509 authorization list (it verified the clients all the same)
  it.live("load: settings that would be ignored (identity with x509, hostname or verifyPeer false with PSK, verifyPeer false with authz) are refused in one line", () =>
    leakFree(Effect.gen(function*() {
      const cases: ReadonlyArray<readonly [Tls.TlsConfig, string]> = [
        [
          { ca: fixture("ca-cert.pem"), identity: "alice" },
          "identity is the PSK identity a source presents (psk): with x509 the certificate (cert) names this side"
        ],
        [
          { psk: fixture("keys.psk"), hostname: "localhost" },
          "hostname is the name the destination's x509 certificate must carry: a PSK destination proves the key, not a name"
        ],
        [
          { psk: fixture("keys.psk"), verifyPeer: false },
          "verifyPeer false with a PSK file: a PSK destination verifies every source by its key, always (authz limits the identities)"
        ],
        [
          { ca: fixture("ca-cert.pem"), cert: fixture("server-cert.pem"), key: fixture("server-key.pem"), authz: ["alice"], verifyPeer: false },
          "verifyPeer false with an authorization list (authz): a destination given one verifies its clients; drop verifyPeer: false, or the authz"
        ]
      ]
      for (const [config, detail] of cases) {
        const error = yield* Effect.flip(loadTls(config)).pipe(Effect.mapError(() => new Error(`loaded: ${JSON.stringify(config)}`)))
        expect(error.reason).toBe("Config")
        expect(error.message).toBe(`TLS configuration: ${detail}`)
        expectOneLine(error)
      }
      // the environment's variables too
      const fromEnv = yield* Effect.flip(Effect.provide(Tls.Tls, Tls.layerConfig)).pipe(
        Effect.withConfigProvider(ConfigProvider.fromMap(
          new Map([["MULTIFD_TLS_CA", fixture("ca-cert.pem")], ["MULTIFD_TLS_IDENTITY", "alice"]]),
          { pathDelim: "_" }
        )),
        Effect.mapError(() => new Error("loaded"))
      )
      expect(fromEnv.message).toContain("identity is the PSK identity a source presents")
    })))

  // a TLS server presents a certificate: settings of a CA file alone (what verifies the other side) passed checkServer,
  // and then every source was refused in the handshake, each side blaming the other's credentials ("no suitable
  // signature algorithm (do both sides use the same kind of credentials, PSK or x509 ...?)")
  it.live("a destination of x509 settings without a certificate (a CA file alone): checkServer refuses them; a handshake says why", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server")
      const caOnly = yield* clientX509({ verifyPeer: true })
      const error = yield* Effect.flip(Tls.checkServer(caOnly.settings)).pipe(Effect.mapError(() => new Error("passed")))
      expect(error.reason).toBe("Config")
      expect(error.message).toBe(
        "TLS configuration: an x509 destination needs a certificate of its own and its key (cert, key), which it " +
          "presents to every source: the CA file (ca) verifies the sources"
      )
      expectOneLine(error)
      // run anyway: the destination's log says what it lacks
      const client = yield* clientX509({}, "alice")
      const dest = yield* startDestination(caOnly.server)
      const ram = yield* sourceRam(1)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), client.client(LOOPBACK))), "migrate")
      expect(Exit.isFailure(exit)).toBe(true)
      yield* noHang(dest.rejections(1), "the destination's rejection")
      expect(dest.logs.join("\n")).toContain(
        "(this destination has no certificate: an x509 destination presents one to every source; give cert and key)"
      )
      // with one, checkServer passes
      yield* Tls.checkServer(server.settings)
    })))

  it.live("a source with a certificate and no CA file is refused before its first byte (checkClient)", () =>
    leakFree(Effect.gen(function*() {
      const source = yield* loadTls(noCa("alice"))
      const refusal = yield* refused(Tls.checkClient(source.settings))
      expect(refusal.reason).toBe("Config")
      expect(refusal.message).toBe(
        "TLS configuration: a source with x509 needs a CA certificate (ca) to verify the destination: " +
          "the public root CAs are never trusted"
      )
      const dest = yield* startDestination((yield* serverX509("server")).server)
      const exit = yield* noHang(Effect.exit(migrateTo(yield* sourceRam(1), tcp(LOOPBACK, dest.port), source.client(LOOPBACK))), "migrate")
      expect(expectTlsFailure(failureOf(exit), "main", "Config").message).toBe(refusal.message)
    })))

  /**
   * A child process where the test CA is one of Node's trusted roots (NODE_EXTRA_CA_CERTS, as a public CA would
   * be) loads settings and reports whether their secure context trusts a certificate that CA issued.
   */
  const trustedByRoots = (...configs: ReadonlyArray<Tls.TlsConfig>) =>
    Effect.promise(() =>
      new Promise<Array<{ authorized?: boolean; error?: string; loadError?: string }>>((resolve, reject) => {
        ChildProcess.execFile(
          process.execPath,
          [
            "--import",
            "tsx",
            fileURLToPath(new URL("./support/trustProbe.ts", import.meta.url)),
            ...configs.map((config) => JSON.stringify(config))
          ],
          { env: { ...process.env, NODE_EXTRA_CA_CERTS: fixture("ca-cert.pem") }, timeout: 20_000 },
          (error, stdout, stderr) => (error ? reject(new Error(`${error.message}: ${stderr}`)) : resolve(JSON.parse(stdout)))
        )
      })
    )

  it.live("a secure context never holds the public roots: a CA trusted only through NODE_EXTRA_CA_CERTS vouches for nothing", () =>
    Effect.gen(function*() {
      const [destination, otherCa, ownCa] = yield* trustedByRoots(
        // the settings of a destination that verifies nobody (no CA file), and of a source trusting another CA
        noCa("server"),
        { ca: fixture("other-ca-cert.pem") },
        // and the CA file is what is trusted
        { ca: fixture("ca-cert.pem") }
      )
      expect(destination).toMatchObject({ authorized: false })
      expect(otherCa).toMatchObject({ authorized: false })
      expect(ownCa).toEqual({ authorized: true, error: "" })
    }), 30_000)
})

// ---------------------------------------------------------------------------------------------------------

describe("renegotiation", () => {
  /**
   * A TLS 1.2 client (Node's, on loopback) that asks the destination's handshake for a renegotiation once it is
   * secure, then writes a byte: the renegotiation's outcome (`undefined` when it succeeded, else its error).
   */
  const renegotiate = (port: number) =>
    Effect.async<string | undefined>((resume) => {
      const socket = NodeTls.connect({
        host: LOOPBACK,
        port,
        maxVersion: "TLSv1.2",
        ca: Fs.readFileSync(fixture("ca-cert.pem")),
        checkServerIdentity: () => undefined
      })
      const done = (outcome: string | undefined) => {
        socket.destroy()
        resume(Effect.succeed(outcome))
      }
      socket.once("error", (error) => done(error.message))
      socket.once("close", () => done("closed"))
      socket.once("secureConnect", () => {
        const asked = socket.renegotiate({ rejectUnauthorized: true }, (error) => {
          if (error) return done(error.message)
          socket.write("x", () => done(undefined))
        })
        if (!asked) done("not asked")
      })
      return Effect.sync(() => socket.destroy())
    })

  for (const writeOnlyPeers of [false, true]) {
    it.live(`the destination refuses a client-initiated TLS 1.2 renegotiation${writeOnlyPeers ? " (writeOnlyPeers)" : ""}`, () =>
      leakFree(Effect.gen(function*() {
        const tls = yield* serverX509("server")
        const listener = yield* Transport.listen(tcp(LOOPBACK, 0))
        const serverSide = yield* Effect.forkScoped(Effect.scoped(Effect.flatMap(
          listener.accept,
          (connection) =>
            Effect.either(Effect.flatMap(Tls.server(tls.settings, { writeOnlyPeers })(connection, "main"), (secured) => secured.read(1)))
        )))
        const outcome = yield* noHang(renegotiate(portOf(listener.address)), "renegotiation")
        expect(outcome ?? "renegotiated").toContain("no renegotiation")
        // the destination's side fails, not hangs
        expect((yield* noHang(Fiber.join(serverSide), "server side"))._tag).toBe("Left")
      })))
  }
})

// ---------------------------------------------------------------------------------------------------------

describe("handshake faults", () => {
  const N = 4
  const k = 2

  /**
   * An upgrade given a connection whose scope had ended (destroyed: a Connection kept past its scope, or one the
   * listener's close destroyed under it) waited the whole handshake timeout, the TLS socket over it hearing nothing,
   * then said "timed out after 10s" of a connection that had been gone from the start. Read and write fail at once
   * there (Closed); the handshakes now do too.
   */
  it.live("a client or server handshake on a connection whose scope has ended fails at once, saying so", () =>
    leakFree(Effect.gen(function*() {
      // a handshake timeout longer than noHang's guard: only a prompt failure passes
      const tls = yield* pskTls("keys.psk", { handshakeTimeoutMs: 60_000 })
      const [client, server] = yield* Effect.scoped(Effect.gen(function*() {
        const listener = yield* Transport.listen({ _tag: "Tcp", host: LOOPBACK, port: 0 })
        const client = yield* Transport.connect(listener.address)
        return [client, yield* listener.accept] as const
      }))
      for (const [side, upgrade] of [["client", tls.client(LOOPBACK)(client, "main")], ["server", tls.server(server, "main")]] as const) {
        const error = failureOf(yield* noHang(Effect.exit(Effect.scoped(upgrade)), `the ${side} handshake`))
        expect(error).toMatchObject({
          _tag: "TlsError",
          reason: "Handshake",
          message: expect.stringContaining("failed: the connection is closed already (its scope has ended)")
        })
        expectOneLine(error)
      }
    })))

  it.live("the handshake of channel k of N fails (wrong key on channel k only): migrate fails naming channel k, promptly", () =>
    leakFree(Effect.gen(function*() {
      const good = yield* pskTls()
      const wrong = yield* pskTls("wrong-keys.psk")
      const upgrade: Upgrade = (connection, channel) =>
        channel === k ? wrong.client(undefined)(connection, channel) : good.client(undefined)(connection, channel)
      const ram = yield* sourceRam()
      const dest = yield* startDestination(good.server)
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), upgrade, { channels: N })), "migrate")
      )
      const tls = expectTlsFailure(failureOf(exit), k, "Handshake")
      expect(tls.message).toContain("same pre-shared key")
      expect(elapsed).toBeLessThan(PROMPT_MS)

      // the destination was told (Abort naming channel k) instead of waiting for channel k
      const destError = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming after the source failed"))
      expectOneLine(destError)
      expect(destError).toBeInstanceOf(MigrationError.MigrationError)
      expect((destError as MigrationError.MigrationError).reason).toBe("Aborted")
      expect(destError.message).toContain(`multifd channel ${k}`)
    })))

  it.live("a raw peer drops the connection after the ClientHello: handshake error on the main channel, no hang", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      const peer = yield* rawPeer("drop")
      const ram = yield* sourceRam()
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, peer.address, tls.client(undefined))), "migrate")
      )
      expect(yield* Deferred.isDone(peer.clientHellos)).toBe(true)
      const error = expectTlsFailure(failureOf(exit), "main", "Handshake")
      expect(error.message).toMatch(/^TLS handshake with tcp:127\.0\.0\.1:\d+ failed: /)
      expect(elapsed).toBeLessThan(PROMPT_MS)
    })))

  it.live("x509: a raw peer that drops the connection mid-handshake is not reported as a certificate problem", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* clientX509({}, "alice")
      const peer = yield* rawPeer("drop")
      const exit = yield* noHang(Effect.exit(migrateTo(yield* sourceRam(1), peer.address, tls.client(LOOPBACK))), "migrate")
      const error = expectTlsFailure(failureOf(exit), "main", "Handshake")
      expect(error.message).toMatch(/^TLS handshake with tcp:127\.0\.0\.1:\d+ failed: /)
      expect(error.message).not.toContain("certificate")
    })))

  it.live("the destination drops channel k after its ClientHello: handshake error naming channel k", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      const registry = channelRegistry()
      const server: Upgrade = (connection, channel) =>
        Effect.flatMap(registry.channelOf(connection), (id) =>
          id !== k ? tls.server(connection, channel) : Effect.gen(function*() {
            yield* connection.read(5) // the ClientHello's record header
            yield* Transport.destroy(connection.stream)
            return yield* new Tls.TlsError({ reason: "Handshake", detail: "dropped by the test" })
          }))
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server)
      const [exit, elapsed] = yield* timed(noHang(
        Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), registry.source(tls.client(undefined)), { channels: N })),
        "migrate"
      ))
      expectTlsFailure(failureOf(exit), k, "Handshake")
      expect(elapsed).toBeLessThan(PROMPT_MS)
      const destError = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming after the source failed"))
      expect((destError as MigrationError.MigrationError).reason).toBe("Aborted")
    })))

  it.live("a TLS client run uninterruptibly (an acquire, a finalizer) against a peer that stalls mid-handshake: Timeout", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls("keys.psk", { handshakeTimeoutMs: 300 })
      const peer = yield* rawPeer("stall")
      // the handshake's timeout could not interrupt its wait, which had inherited the uninterruptibility, and
      // waited with it for ever; awaited in a daemon fiber (a hung uninterruptible one would hold up the test)
      const fiber = yield* Effect.forkDaemon(Effect.uninterruptible(Effect.scoped(
        Effect.flatMap(Transport.connect(peer.address), (connection) => tls.client(undefined)(connection, 0))
      ).pipe(Effect.provide(Transport.layer))))
      const exit = yield* noHang(Fiber.await(fiber), "an uninterruptible TLS client")
      expect(Exit.isFailure(exit) && Cause.failureOption(exit.cause).pipe(Option.map((e) => e.reason), Option.getOrUndefined))
        .toBe("Timeout")
    })))

  it.live("a raw peer stalls mid-handshake: the source fails after handshakeTimeoutMs with reason Timeout", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls("keys.psk", { handshakeTimeoutMs: 300 })
      const peer = yield* rawPeer("stall")
      const ram = yield* sourceRam()
      const [exit, elapsed] = yield* timed(
        noHang(Effect.exit(migrateTo(ram, peer.address, tls.client(undefined))), "migrate")
      )
      expect(yield* Deferred.isDone(peer.clientHellos)).toBe(true)
      const error = expectTlsFailure(failureOf(exit), "main", "Timeout")
      expect(error.message).toMatch(/timed out after 300/)
      expect(elapsed).toBeGreaterThanOrEqual(290)
      expect(elapsed).toBeLessThan(300 + PROMPT_MS)
    })))

  it.live("the migration's timeouts.handshake bounds the source's TLS handshake when the TLS settings allow longer", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls("keys.psk", { handshakeTimeoutMs: 10_000 })
      const peer = yield* rawPeer("stall")
      const ram = yield* sourceRam()
      const [exit, elapsed] = yield* timed(noHang(
        Effect.exit(migrateTo(ram, peer.address, tls.client(undefined), {
          timeouts: { ...TIMEOUTS, handshake: "300 millis" }
        })),
        "migrate"
      ))
      const error = expectTlsFailure(failureOf(exit), "main", "Timeout")
      expect(error.message).toMatch(/timed out after 300ms$/)
      expect(elapsed).toBeLessThan(300 + PROMPT_MS)
    })))

  it.live("the migration's timeouts.handshake bounds channel k's TLS handshake when the TLS settings allow longer", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      const long = yield* pskTls("keys.psk", { handshakeTimeoutMs: 10_000 })
      const registry = channelRegistry()
      const server = stallingChannel(registry, tls.server, k)
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server)
      const [exit, elapsed] = yield* timed(noHang(
        Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), registry.source(long.client(undefined)), {
          channels: N,
          // the main channel's and the other channels' real handshakes get the usual time
          timeouts: { ...TIMEOUTS, handshake: "1 second" }
        })),
        "migrate"
      ))
      const error = expectTlsFailure(failureOf(exit), k, "Timeout")
      expect(error.message).toMatch(/timed out after 1s$/)
      expect(elapsed).toBeLessThan(1000 + PROMPT_MS)
    })))

  it.live("the migration's timeouts.handshake bounds the destination's TLS handshake when the TLS settings allow longer", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls("keys.psk", { handshakeTimeoutMs: 10_000 })
      const dest = yield* startDestination(tls.server, { timeouts: { ...TIMEOUTS, handshake: "300 millis" } })
      // a client that connects and never starts its handshake
      const silent = yield* Effect.acquireRelease(
        Effect.sync(() => Net.connect({ host: LOOPBACK, port: dest.port }).on("error", () => {})),
        Transport.destroy
      )
      yield* noHang(dest.rejections(1), "the silent client turned away", 3)
      expect(dest.logs.find((l) => l.includes("rejected a connection"))).toMatch(/timed out after 300ms/)
      silent.destroy()
      yield* Fiber.interrupt(dest.fiber)
    })))

  it.live("the destination stalls channel k's handshake: Timeout naming channel k, the destination is aborted", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      const short = yield* pskTls("keys.psk", { handshakeTimeoutMs: 300 })
      const registry = channelRegistry()
      const server = stallingChannel(registry, tls.server, k)
      const ram = yield* sourceRam()
      const dest = yield* startDestination(server)
      const [exit, elapsed] = yield* timed(noHang(
        // only channel k's handshake has the short timeout: on a loaded machine another channel's real handshake
        // may take longer than 300 ms, and the test is about channel k
        Effect.exit(migrateTo(
          ram,
          tcp(LOOPBACK, dest.port),
          registry.source((connection, channel) =>
            (channel === k ? short : tls).client(undefined)(connection, channel)
          ),
          { channels: N }
        )),
        "migrate"
      ))
      expectTlsFailure(failureOf(exit), k, "Timeout")
      expect(elapsed).toBeLessThan(300 + PROMPT_MS)
      const destError = failureOf(yield* noHang(Fiber.await(dest.fiber), "incoming after the source failed"))
      expect((destError as MigrationError.MigrationError).reason).toBe("Aborted")
    })))

  it.live("the scope closes while every channel's handshake is in flight: interruption is prompt, nothing left", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      let calls = 0
      let stalled = 0
      const signal = makeSignal()
      // the destination secures the main channel (its first connection: multifd channels connect only after
      // Accept) and reads every multifd channel's ClientHello, never answering it
      const server: Upgrade = (connection, channel) =>
        Effect.suspend((): ReturnType<Upgrade> =>
          calls++ === 0
            ? tls.server(connection, channel)
            : Effect.zipRight(
              connection.read(5),
              Effect.zipRight(
                Effect.sync(() => {
                  stalled++
                  signal.notify()
                }),
                Effect.never
              )
            )
        )
      const ram = yield* sourceRam()
      const destination = yield* startDestination(server)
      const source = yield* Effect.fork(migrateTo(ram, tcp(LOOPBACK, destination.port), tls.client(undefined), { channels: N }))
      yield* noHang(signal.until(() => stalled === N), "every handshake stalled")
      expect(source.unsafePoll()).toBeNull()

      const [exit, elapsed] = yield* timed(noHang(Fiber.interrupt(source), "interrupting migrate"))
      expect(Exit.isInterrupted(exit)).toBe(true)
      expect(elapsed).toBeLessThan(PROMPT_MS)

      // the destination sees its source go away: it fails (main channel closed), it does not hang
      const destExit = yield* noHang(Fiber.await(destination.fiber), "incoming after the source vanished")
      expectOneLine(failureOf(destExit))
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("clean termination", () => {
  it.live("after a successful TLS migration every source→destination stream ends with close_notify, then FIN", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* pskTls()
      const ram = yield* sourceRam()
      const dest = yield* startDestination(tls.server)
      const proxy = yield* recordProxy(dest.address)
      yield* noHang(migrateTo(ram, proxy.address, tls.client(undefined), { channels: 4 }), "migrate")
      const result = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(result.ram, ram)).toBe(true)

      expect(proxy.connections).toHaveLength(1 + 4)
      // the source closed its sockets, but the proxy may not have read their FINs yet
      yield* noHang(Effect.forEach(proxy.connections, (c) => Deferred.await(c.closed), { discard: true }), "the proxy's sockets closed")
      for (const { up } of proxy.connections) {
        expect(up.ended).toBe(true)
        expect(up.follower.atRecordBoundary).toBe(true) // no torn record header, no torn record
        expect(up.records.at(-1)).toEqual(CLOSE_NOTIFY_RECORD)
        // the close_notify is the only such record: the migration itself sent none of that size
        expect(up.records.filter((r) => r.length === CLOSE_NOTIFY_RECORD.length)).toHaveLength(1)
      }
    })))
})

// ---------------------------------------------------------------------------------------------------------

describe("configuration", () => {
  const tmp = (name: string, text: string) => {
    const path = Path.join(Os.tmpdir(), `emfd-tls-${process.pid}-${Math.random().toString(36).slice(2, 8)}-${name}`)
    Fs.writeFileSync(path, text)
    return path
  }
  const removing = (path: string) => Effect.addFinalizer(() => Effect.sync(() => Fs.rmSync(path, { force: true })))

  const configError = (config: Tls.TlsConfig) =>
    Effect.gen(function*() {
      // (a load that succeeds fails the test with a short message: its settings are too big to print)
      const error = yield* Effect.flip(Tls.load(config)).pipe(Effect.mapError(() => new Error("loaded: expected a refusal")))
      expect(error).toBeInstanceOf(Tls.TlsError)
      expect(error.reason).toBe("Config")
      expect(error.message.startsWith("TLS configuration: ")).toBe(true)
      expectOneLine(error)
      return error
    })

  it.live("load: a missing file", () =>
    leakFree(Effect.gen(function*() {
      const e = yield* configError({ psk: "/nonexistent/keys.psk" })
      expect(e.message).toContain("cannot read PSK file /nonexistent/keys.psk")
      const ca = yield* configError({ ca: "/nonexistent/ca.pem" })
      expect(ca.message).toContain("cannot read CA certificate /nonexistent/ca.pem")
    })))

  // a device, or an endless pipe, was read whole: /dev/zero took gigabytes, for seconds, until the string it made was
  // too long ("Invalid string length")
  it.live("load: a file that never ends (/dev/zero) is refused once it held more than any credentials file", () =>
    leakFree(Effect.gen(function*() {
      const rss = process.memoryUsage().rss
      const ca = yield* configError({ ca: "/dev/zero" })
      expect(ca.message).toContain("CA certificate /dev/zero holds more than 64 MiB")
      const psk = yield* configError({ psk: "/dev/zero" })
      expect(psk.message).toContain("PSK file /dev/zero holds more than 64 MiB")
      expect(process.memoryUsage().rss - rss).toBeLessThan(512 * 1024 * 1024)
    })))

  // `--tls-psk <(vault read ...)` keeps a key off the disk: the shell passes a pipe. Opened or read the blocking way, a
  // FIFO no process writes held a thread of libuv's pool: an interrupted load never ended, nor did the command's exit
  describe("load from a pipe", () => {
    const fifo = Effect.acquireRelease(
      Effect.sync(() => {
        const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-tls-fifo-"))
        const path = Path.join(dir, "keys.psk")
        ChildProcess.execFileSync("mkfifo", [path])
        return path
      }),
      (path) => Effect.sync(() => Fs.rmSync(Path.dirname(path), { recursive: true, force: true }))
    )
    /** Whether this process holds a descriptor of `path`. */
    const holds = (path: string) =>
      Fs.readdirSync("/proc/self/fd").some((fd) => {
        try {
          return Fs.readlinkSync(`/proc/self/fd/${fd}`) === path
        } catch {
          return false
        }
      })
    const opened = (path: string) =>
      noHang(
        Effect.repeat(Effect.sync(() => holds(path)), { until: (held) => held, schedule: Schedule.spaced("5 millis") }),
        "the FIFO opened"
      )

    it.live("a FIFO is read once its writer comes, to the writer's end", () =>
      leakFree(Effect.scoped(Effect.gen(function*() {
        const path = yield* fifo
        const loading = yield* Effect.fork(Tls.load({ psk: path }))
        yield* opened(path)
        expect(loading.unsafePoll()).toBeNull() // no writer yet: it waits
        // the writer, in two pieces
        const keys = Fs.readFileSync(fixture("keys.psk"), "utf8")
        const writer = Fs.openSync(path, "w")
        try {
          Fs.writeSync(writer, keys.slice(0, 10))
          Fs.writeSync(writer, keys.slice(10))
        } finally {
          Fs.closeSync(writer)
        }
        const settings = yield* noHang(Fiber.join(loading), "loading from the FIFO")
        expect(settings).toBeDefined()
        expect(holds(path)).toBe(false)
      }))))

    it.live("a FIFO no process writes: the load waits, and interrupted, ends at once with the FIFO closed", () =>
      leakFree(Effect.scoped(Effect.gen(function*() {
        const path = yield* fifo
        for (const config of [{ psk: path }, { ca: path }] satisfies Array<Tls.TlsConfig>) {
          const loading = yield* Effect.fork(Tls.load(config))
          yield* opened(path)
          yield* noHang(Fiber.interrupt(loading), "interrupting the load")
          expect(holds(path)).toBe(false)
        }
      }))))

    it.live("an empty pipe (its writer closed at once) is a file without keys, named", () =>
      leakFree(Effect.scoped(Effect.gen(function*() {
        const path = yield* fifo
        const loading = yield* Effect.fork(Effect.flip(Tls.load({ psk: path })))
        yield* opened(path)
        Fs.closeSync(Fs.openSync(path, "w"))
        const error = yield* noHang(Fiber.join(loading), "loading from the FIFO")
        expect(error.message).toContain(path)
        expectOneLine(error)
      }))))
  })

  it.effect("an identity listed twice in keys.psk: its first key, as QEMU's tls-creds-psk reads it (one file, one key)", () =>
    Effect.gen(function*() {
      const keys = yield* Tls.parsePskFile(`qemu:${"11".repeat(32)}\nother:${"22".repeat(32)}\nqemu:${"33".repeat(32)}\n`)
      expect(keys.get("qemu")!.toString("hex")).toBe("11".repeat(32))
      expect([...keys.keys()]).toEqual(["qemu", "other"])
    }))

  // QEMU's destination reads keys.psk with GnuTLS, where an identity with ':' or other special characters is written
  // `#` and its bytes in hex; QEMU's source reads its own line `identity:hexkey` up to the identity's length. The hex
  // form was taken for a comment: a source of that identity was refused, "has no key in this side's PSK file"
  it.live("keys.psk: an identity in GnuTLS's hex form (#hexidentity:hexkey, for ':' or non-ASCII) is that identity, other '#' lines comments (no UTF-8, an odd key)", () =>
    leakFree(Effect.gen(function*() {
      const key = Crypto.randomBytes(32).toString("hex")
      const hex = (identity: string) => Buffer.from(identity, "utf8").toString("hex")
      const destination = tmp(
        "gnutls.psk",
        `# keys for QEMU's destination: a comment, even with a colon: ${key}\n#zz:00\n#cafe:${key}\n#6869:123\n` +
          `#${hex("migration:host-1")}:${key}\n` +
          `#${hex("zoë")}:${"ab".repeat(32)}\n`
      )
      yield* removing(destination)
      const source = tmp("qemu-client.psk", `migration:host-1:${key}\n`)
      yield* removing(source)
      const keys = yield* Tls.parsePskFile(Fs.readFileSync(destination, "utf8"))
      expect([...keys.keys()]).toEqual(["migration:host-1", "zoë"])
      const server = yield* loadTls({ psk: destination, authz: ["migration:host-1"] })
      const client = yield* loadTls({ psk: source, identity: "migration:host-1" })
      yield* roundTrip(server.server, client.client(undefined), { mib: 1 })
    })))

  it.live("load: a bad keys.psk line names the file and the line", () =>
    leakFree(Effect.gen(function*() {
      const path = tmp("bad.psk", `# comment\n\nqemu:${"00ff".repeat(8)}\nnot-a-key-line\n`)
      yield* removing(path)
      const e = yield* configError({ psk: path })
      expect(e.message).toContain(`${path} line 4 is not identity:hexkey`)
      const odd = tmp("odd.psk", "qemu:abc\n")
      yield* removing(odd)
      expect((yield* configError({ psk: odd })).message).toContain("line 1")
      const empty = tmp("empty.psk", "# nothing\n")
      yield* removing(empty)
      expect((yield* configError({ psk: empty })).message).toContain("no identity:hexkey line")
    })))

  it.live("keys.psk: a key of 512 bytes migrates; one of 513 is refused at load, and no message shows a key's bytes", () =>
    leakFree(Effect.gen(function*() {
      const longest = Crypto.randomBytes(Tls.MAX_PSK_BYTES).toString("hex")
      const path = tmp("long.psk", `qemu:${longest}\n`)
      yield* removing(path)
      const tls = yield* loadTls({ psk: path })
      yield* roundTrip(tls.server, tls.client(undefined), { mib: 1 })
      const tooLong = Crypto.randomBytes(Tls.MAX_PSK_BYTES + 1).toString("hex")
      const over = tmp("over.psk", `# a comment\nqemu:${tooLong}\n`)
      yield* removing(over)
      const e = yield* configError({ psk: over })
      expect(e.message).toBe(`TLS configuration: ${over} line 2: a key of 513 bytes; TLS (OpenSSL) takes at most 512`)
      // Node's own argument errors quote the value they refused: never shown
      expect(Verification.describe(new TypeError("The argument 'psk' Pre-shared key exceeds 512 bytes. Received <Buffer 71 42 5b>")))
        .toBe("The argument 'psk' Pre-shared key exceeds 512 bytes.")
    })))

  // a key of a byte or two loaded, and a handshake "authenticated" with it: an eavesdropper who captured one handshake
  // finds it offline in as many tries (each checks the PSK binder), then impersonates either side or reads the memory
  it.live("keys.psk: a key shorter than 16 bytes (128 bits) is refused at load, naming the line and never the key; one of 16 bytes migrates", () =>
    leakFree(Effect.gen(function*() {
      const good = Crypto.randomBytes(32).toString("hex")
      const short = tmp("short.psk", `qemu:${good}
# the next one is short
other:c0ffee00c0ffee00c0ffee00c0ffee
`)
      yield* removing(short)
      // every line counts: a destination admits each identity of its file
      for (const config of [{ psk: short }, { psk: short, identity: "qemu" }]) {
        expect((yield* configError(config)).message).toBe(
          `TLS configuration: ${short} line 3: a key of 15 bytes, which a peer can guess; give at least ` +
            `${Tls.MIN_PSK_BYTES} bytes (128 bits) of random key (psktool -u IDENTITY -p FILE makes 32, as QEMU's documentation says)`
        )
      }
      const shortest = tmp("shortest.psk", `qemu:${Crypto.randomBytes(Tls.MIN_PSK_BYTES).toString("hex")}
`)
      yield* removing(shortest)
      const tls = yield* loadTls({ psk: shortest })
      yield* roundTrip(tls.server, tls.client(undefined), { mib: 1 })
    })))

  // OpenSSL takes a PSK identity of at most 256 bytes (PSK_MAX_IDENTITY_LEN): a longer one loaded, and the source's
  // every handshake failed with Node's "The argument 'identity' PSK identity exceeds 256 bytes." (a destination's key
  // for it could never be asked for)
  it.live("keys.psk: an identity of 256 bytes (UTF-8) migrates; one of 257 is refused at load, naming the line", () =>
    leakFree(Effect.gen(function*() {
      const key = Crypto.randomBytes(32).toString("hex")
      const longest = "é".repeat(128) // 256 bytes, 128 characters
      const path = tmp("long-identity.psk", `${longest}:${key}\n`)
      yield* removing(path)
      const tls = yield* loadTls({ psk: path, identity: longest })
      yield* roundTrip(tls.server, tls.client(undefined), { mib: 1 })
      const over = tmp("over-identity.psk", `qemu:${key}\n${longest}x:${key}\n`)
      yield* removing(over)
      for (const config of [{ psk: over }, { psk: over, identity: "qemu" }]) {
        const e = yield* configError(config)
        expect(e.message).toBe(
          `TLS configuration: ${over} line 2: an identity of 257 bytes; TLS (OpenSSL) takes at most 256`
        )
      }
    })))

  it.live("load: psk and x509 together, a certificate without its key, no credentials at all", () =>
    leakFree(Effect.gen(function*() {
      expect((yield* configError({ psk: fixture("keys.psk"), ca: fixture("ca-cert.pem") })).message)
        .toContain("not both")
      expect((yield* configError({ cert: fixture("alice-cert.pem") })).message).toContain("needs its key")
      expect((yield* configError({ key: fixture("alice-key.pem") })).message).toContain("needs its key")
      expect((yield* configError({})).message).toContain("no credentials")
    })))

  it.live("load: an explicit PSK identity without a key in the file fails at load, naming the file", () =>
    leakFree(Effect.gen(function*() {
      const e = yield* configError({ psk: fixture("keys.psk"), identity: "nobody" })
      expect(e.message).toBe(`TLS configuration: PSK file ${fixture("keys.psk")} has no key for identity nobody`)
    })))

  it.live("checkClient: a PSK file without the default identity qemu is refused for a source before it connects", () =>
    leakFree(Effect.gen(function*() {
      const other = tmp("other.psk", `other:${"00ff".repeat(8)}\n`)
      yield* removing(other)
      // a destination may use such a file (its sources present other identities)
      const tls = yield* loadTls({ psk: other })
      const e = yield* Effect.flip(Tls.checkClient(tls.settings))
      expect(e.reason).toBe("Config")
      expect(e.message).toBe(`TLS configuration: PSK file ${other} has no key for identity qemu`)
      // and the source's upgrade refuses it too, before its first byte
      const ram = yield* sourceRam(1)
      const dest = yield* startDestination((yield* pskTls()).server)
      const exit = yield* noHang(Effect.exit(migrateTo(ram, tcp(LOOPBACK, dest.port), tls.client(undefined))), "migrate")
      const error = expectTlsFailure(failureOf(exit), "main", "Config")
      expect(error.message).toContain("no key for identity qemu")
    })))

  it.live("load: unusable x509 files are found at load, each named with its problem (nothing connects first)", () =>
    leakFree(Effect.gen(function*() {
      const garbage = tmp("garbage.pem", "this is not PEM at all\n")
      const badBase64 = tmp("bad64.pem", "-----BEGIN CERTIFICATE-----\nMIIB!!!!not*base64\n-----END CERTIFICATE-----\n")
      const badKey = tmp("badkey.pem", "-----BEGIN PRIVATE KEY-----\nMIIB!!!!not*base64\n-----END PRIVATE KEY-----\n")
      const request = tmp("request.pem", "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n")
      const { privateKey } = Crypto.generateKeyPairSync("ec", { namedCurve: "P-256" })
      const encrypted = tmp(
        "encrypted-key.pem",
        privateKey.export({ format: "pem", type: "pkcs8", cipher: "aes-256-cbc", passphrase: "secret" }) as string
      )
      for (const path of [garbage, badBase64, badKey, request, encrypted]) yield* removing(path)
      const aliceCert = fixture("alice-cert.pem")
      const aliceKey = fixture("alice-key.pem")
      const cases: ReadonlyArray<readonly [Tls.TlsConfig, string]> = [
        [{ cert: garbage, key: aliceKey }, `certificate ${garbage} is not a PEM certificate`],
        [{ cert: aliceKey, key: aliceKey }, `certificate ${aliceKey} holds a private key, not a certificate`],
        [{ cert: request, key: aliceKey }, `certificate ${request} holds a CERTIFICATE REQUEST block, not a certificate`],
        [{ cert: badBase64, key: aliceKey }, `certificate ${badBase64} is not a valid PEM certificate: bad base64 decode`],
        [{ ca: garbage }, `CA certificate ${garbage} is not a PEM certificate`],
        [{ ca: aliceKey }, `CA certificate ${aliceKey} holds a private key, not a certificate`],
        [{ ca: badBase64 }, `CA certificate ${badBase64} is not a valid PEM certificate: bad base64 decode`],
        [{ cert: aliceCert, key: garbage }, `private key ${garbage} is not a PEM private key`],
        [{ cert: aliceCert, key: aliceCert }, `private key ${aliceCert} holds a certificate, not a private key`],
        [{ cert: aliceCert, key: badKey }, `private key ${badKey} is not a valid private key: `],
        [{ cert: aliceCert, key: encrypted }, `private key ${encrypted} is encrypted and no passphrase can be given`],
        [
          { cert: aliceCert, key: fixture("mallory-key.pem") },
          `private key ${fixture("mallory-key.pem")} does not match certificate ${aliceCert} (CN=alice)`
        ]
      ]
      for (const [config, problem] of cases) {
        // Tls.make is what the CLI calls before it listens or connects
        const error = yield* Effect.flip(Tls.make({ ca: fixture("ca-cert.pem"), ...config }))
        expect({ config, reason: error.reason }).toEqual({ config, reason: "Config" })
        expect(error.message).toContain(`TLS configuration: ${problem}`)
        expectOneLine(error)
      }
    })))

  it.live("load: a certificate file holding its chain CAs first is refused as in the wrong order, naming the key's certificate (not 'the key does not match the CA')", () =>
    leakFree(Effect.gen(function*() {
      // inter-server's file: its certificate, then the intermediate CA that issued it; written the other way round
      const [leaf, intermediate] = Fs.readFileSync(fixture("inter-server-cert.pem"), "utf8")
        .match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----\n/g)!
      const reversed = tmp("reversed-chain.pem", intermediate! + leaf!)
      yield* removing(reversed)
      const key = fixture("inter-server-key.pem")
      const error = yield* configError({ ca: fixture("chain-ca-cert.pem"), cert: reversed, key })
      // (it said "private key KEY does not match certificate FILE (CN=CRL intermediate CA)")
      expect(error.message).toBe(
        `TLS configuration: certificate ${reversed} holds its chain in the wrong order: the certificate of private key ` +
          `${key} (CN=localhost) is certificate 2 of 2, and must come first, followed by the CAs that issued it`
      )
      // in the right order it loads; a key of no certificate of the file still does not match
      yield* loadTls({ ca: fixture("chain-ca-cert.pem"), cert: fixture("inter-server-cert.pem"), key })
      expect((yield* configError({ ca: fixture("chain-ca-cert.pem"), cert: reversed, key: fixture("mallory-key.pem") })).message)
        .toBe(`TLS configuration: private key ${fixture("mallory-key.pem")} does not match certificate ${reversed} (CN=CRL intermediate CA)`)
    })))

  it.live("load: every certificate of the CA file must be a CA that can vouch for a peer now, as QEMU checks ca-cert.pem: a peer's certificate, a self-signed leaf, a CA without keyCertSign, an expired CA, an intermediate CA without its issuer are refused, each named", () =>
    leakFree(Effect.gen(function*() {
      // the expired intermediate CA that expired-ca-server's file carries after its certificate
      const blocks = Fs.readFileSync(fixture("expired-ca-server-cert.pem"), "utf8").match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----\n/g)!
      const expiredCa = tmp("expired-ca.pem", blocks[1]!)
      // the test CA, then alice's certificate in the same file
      const withLeaf = tmp("ca-and-alice.pem", Fs.readFileSync(fixture("ca-cert.pem"), "utf8") + Fs.readFileSync(fixture("alice-cert.pem"), "utf8"))
      // an intermediate CA without the CA that issued it (QEMU's GnuTLS takes it as an anchor; OpenSSL, which trusts a
      // chain only up to a self-signed CA, failed every handshake: "unable to get issuer certificate")
      const orphan = tmp("intermediate-only.pem", Fs.readFileSync(fixture("inter-server-cert.pem"), "utf8").match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----\n/g)![1]!)
      for (const path of [expiredCa, withLeaf, orphan]) yield* removing(path)
      const notCa = "is not a CA certificate (its basicConstraints do not say CA:TRUE): it vouches for no peer; " +
        "give the certificate of the CA that issued the peers' certificates"
      const cases: ReadonlyArray<readonly [string, string]> = [
        // the destination's own certificate given to a source as its CA (OpenSSL found no issuer in it: every
        // handshake failed "issued by CN=test CA, not by a trusted CA")
        [fixture("server-cert.pem"), `(CN=localhost) ${notCa}`],
        [fixture("selfsigned-alice-cert.pem"), `(CN=alice) ${notCa}`],
        [withLeaf, `(certificate 2 of 2, CN=alice) ${notCa}`],
        [
          fixture("nocertsign-ca-cert.pem"),
          "(CN=no-certsign CA) is a CA certificate whose keyUsage does not permit signing certificates (keyCertSign): " +
          "OpenSSL accepts no certificate it issued"
        ],
        [
          expiredCa,
          "(CN=expired intermediate CA) has expired (valid until Jan  1 00:00:00 2001 GMT): OpenSSL accepts no " +
          "certificate it issued"
        ],
        [
          orphan,
          "(CN=CRL intermediate CA) was issued by CN=test CA, which the file does not hold (OpenSSL, unlike QEMU's " +
          "GnuTLS, trusts a chain only up to a self-signed CA: add the certificate of CN=test CA to the file): OpenSSL " +
          "accepts no certificate it issued"
        ]
      ]
      for (const [ca, problem] of cases) {
        // a source's CA file, and a destination's that verifies its clients
        expect((yield* configError({ ca })).message).toBe(`TLS configuration: CA certificate ${ca} ${problem}`)
        expect((yield* configError({ ca, cert: fixture("server-cert.pem"), key: fixture("server-key.pem"), verifyPeer: true })).message)
          .toBe(`TLS configuration: CA certificate ${ca} ${problem}`)
      }
      // a file of CAs only, intermediate ones included, loads
      yield* loadTls({ ca: fixture("chain-ca-cert.pem") })
    })))

  // OpenSSL checks the key of every CA of a chain, and the signature of every one but the self-signed root, against its
  // security level: a CA file of a CA it finds weak loaded, and then every handshake failed, a destination whose own
  // certificate that CA issued with "ca key too small" while its sources heard only "tlsv1 alert internal error"
  it.live("load: a CA of the CA file that OpenSSL's security level makes useless (a 512-bit RSA key, an intermediate CA signed with SHA-1) is refused, naming it", () =>
    leakFree(Effect.gen(function*() {
      const small = fixture("smallkey-ca-cert.pem")
      const sha1 = fixture("sha1-ca-file.pem")
      const smallKey = `TLS configuration: CA certificate ${small} (CN=small-key CA) has a 512-bit RSA key, smaller than ` +
        "OpenSSL's security level accepts: OpenSSL accepts no certificate it issued"
      // a source's CA file, and a destination's whose own certificate that CA issued
      expect((yield* configError({ ca: small })).message).toBe(smallKey)
      expect((yield* configError({
        ca: small,
        cert: fixture("smallkey-ca-server-cert.pem"),
        key: fixture("smallkey-ca-server-key.pem")
      })).message).toBe(smallKey)
      expect((yield* configError({ ca: sha1 })).message).toBe(
        `TLS configuration: CA certificate ${sha1} (certificate 2 of 2, CN=SHA-1 intermediate CA) is signed with a digest ` +
          "too weak for OpenSSL's security level (SHA-1 or MD5, which QEMU's GnuTLS refuses too): OpenSSL accepts no " +
          "certificate it issued"
      )
      // a cipher list that lowers the security level admits them, as it does in the handshake
      yield* loadTls({ ca: small, ciphers: "DEFAULT:@SECLEVEL=0" })
      yield* loadTls({ ca: sha1, ciphers: "DEFAULT:@SECLEVEL=0" })
    })))

  it.live("load: this side's own certificate must be a leaf within its validity period, issued by CAs of its file that can vouch for it; checkServer / checkClient: for its role, its file's CAs too", () =>
    leakFree(Effect.gen(function*() {
      const own = (name: string) => ({ ca: fixture("ca-cert.pem"), cert: fixture(`${name}-cert.pem`), key: fixture(`${name}-key.pem`) })
      const atLoad: ReadonlyArray<readonly [string, string]> = [
        ["expired-alice", "(CN=alice) has expired (valid until Jan  1 00:00:00 2001 GMT)"],
        ["not-yet-valid-server", "(CN=localhost) is not valid yet (valid from Jan  1 00:00:00 2100 GMT)"],
        ["ca", "(CN=test CA) is a CA certificate (basicConstraints CA:TRUE), not a server or client certificate"],
        // the CA of its file that issued it: a peer refused it in every handshake ("was issued by CN=expired
        // intermediate CA, which has expired"), this side's log only guessing why ("did the source refuse ...?")
        [
          "expired-ca-server",
          "(certificate 2 of 2, CN=expired intermediate CA, which issued CN=localhost) has expired " +
          "(valid until Jan  1 00:00:00 2001 GMT): a peer accepts no certificate it issued"
        ],
        [
          "notca-server",
          "(certificate 2 of 2, CN=not a CA, which issued CN=localhost) is not a CA certificate (its basicConstraints " +
          "do not say CA:TRUE): a peer accepts no certificate it issued"
        ],
        // what OpenSSL's security level refuses, in words (OpenSSL says "ca md too weak", "ee key too small")
        [
          "sha1-server",
          "(CN=localhost) is signed with a digest too weak for OpenSSL's security level (SHA-1 or MD5, which QEMU's " +
          "GnuTLS refuses too): reissue it signed with SHA-256"
        ],
        [
          "smallkey-server",
          "(CN=localhost) has a 512-bit RSA key, smaller than OpenSSL's security level accepts: reissue it with a " +
          "larger key (RSA of 2048 bits, or EC)"
        ]
      ]
      for (const [name, problem] of atLoad) {
        expect((yield* configError(own(name))).message).toBe(`TLS configuration: certificate ${fixture(`${name}-cert.pem`)} ${problem}`)
      }
      // a chain through an intermediate CA in good standing loads
      yield* loadTls({ ...own("inter-server"), ca: fixture("chain-ca-cert.pem") })
      const checked = (check: (settings: Tls.Settings) => Effect.Effect<void, Tls.TlsError>, name: string) =>
        Effect.flatMap(loadTls(own(name)), (tls) => Effect.flip(check(tls.settings)).pipe(Effect.mapError(() => new Error(`${name} passed`))))
      expect((yield* checked(Tls.checkServer, "clientonly-server")).message).toBe(
        `TLS configuration: certificate ${fixture("clientonly-server-cert.pem")} (CN=localhost) is not for server authentication (extendedKeyUsage clientAuth)`
      )
      // its own extendedKeyUsage is serverAuth, that of the intermediate CA of its file clientAuth only: every source
      // refused it ("was issued by CN=client-only intermediate CA, whose extendedKeyUsage (clientAuth) is not for
      // server authentication"), and this destination's log only guessed why
      expect((yield* checked(Tls.checkServer, "clientonly-ca-server")).message).toBe(
        `TLS configuration: certificate ${fixture("clientonly-ca-server-cert.pem")} (CN=localhost) was issued by ` +
          "CN=client-only intermediate CA (in its file), whose extendedKeyUsage (clientAuth) is not for server " +
          "authentication: a peer accepts no certificate it issued for that"
      )
      expect((yield* checked(Tls.checkClient, "serveronly-alice")).message).toBe(
        `TLS configuration: certificate ${fixture("serveronly-alice-cert.pem")} (CN=alice) is not for client authentication (extendedKeyUsage serverAuth)`
      )
      // each for its own role
      yield* Effect.flatMap(loadTls(own("server")), (tls) => Tls.checkServer(tls.settings))
      yield* Effect.flatMap(loadTls(own("alice")), (tls) => Tls.checkClient(tls.settings))
    })))

  // RFC 5280: a verifier refuses a certificate with a critical extension it does not handle, and OpenSSL and GnuTLS do,
  // anywhere in a chain: a destination of such a certificate loaded, and every source refused it ("unhandled
  // critical extension"), its log only asking "did the source refuse this destination's certificate CN=localhost?"
  it.live("load: a certificate with a critical extension OpenSSL and GnuTLS do not handle, this side's own or a CA of the CA file, is refused naming the OID", () =>
    leakFree(Effect.gen(function*() {
      const own = fixture("unknowncrit-server-cert.pem")
      expect((yield* configError({ ca: fixture("ca-cert.pem"), cert: own, key: fixture("unknowncrit-server-key.pem") })).message).toBe(
        `TLS configuration: certificate ${own} (CN=localhost) has a critical extension that OpenSSL and GnuTLS do not ` +
          "handle (OID 1.2.3.4.5): every peer refuses it (\"unhandled critical extension\")"
      )
      const ca = fixture("unknowncrit-ca-cert.pem")
      expect((yield* configError({ ca })).message).toBe(
        `TLS configuration: CA certificate ${ca} (CN=unknown-critical CA) has a critical extension that OpenSSL and GnuTLS ` +
          "do not handle (OID 1.2.3.4.5): OpenSSL accepts no certificate it issued"
      )
      // the critical extensions OpenSSL handles (basicConstraints, keyUsage, a critical subjectAltName) load
      yield* loadTls({ ca: fixture("ca-cert.pem"), cert: fixture("emptysubject-server-cert.pem"), key: fixture("emptysubject-server-key.pem") })
    })))

  // OpenSSL found "no suitable signature algorithm" in every handshake, and both sides' messages asked whether the
  // peer used the same kind of credentials and admitted this side
  it.live("load: this side's own certificate of a key no TLS handshake here can sign with (EC on secp256k1, DSA) is refused, naming the key", () =>
    leakFree(Effect.gen(function*() {
      const own = (name: string, config: Tls.TlsConfig = {}) =>
        configError({ ca: fixture("ca-cert.pem"), cert: fixture(`${name}-cert.pem`), key: fixture(`${name}-key.pem`), ...config })
      expect((yield* own("secp256k1-server")).message).toBe(
        `TLS configuration: certificate ${fixture("secp256k1-server-cert.pem")} (CN=localhost) has an EC key on curve ` +
          "secp256k1, with which no TLS handshake here can be signed (TLS 1.3 signs with P-256, P-384 and P-521 only, and " +
          "OpenSSL's peers offer no other curve in TLS 1.2): reissue it with a key on P-256 (or RSA, Ed25519)"
      )
      expect((yield* own("dsa-server")).message).toBe(
        `TLS configuration: certificate ${fixture("dsa-server-cert.pem")} (CN=localhost) has a DSA key, with which no ` +
          "TLS handshake here can be signed (TLS 1.3 has no DSA signatures, and OpenSSL finds none for TLS 1.2 either): " +
          "reissue it with an EC key on P-256 (or RSA)"
      )
      // a key on P-256 loads
      yield* loadTls({ ca: fixture("ca-cert.pem"), cert: fixture("server-cert.pem"), key: fixture("server-key.pem") })
    })))

  // QEMU verifies its own certificate against its CA file at load (qcrypto_tls_creds_check_cert_pair): a chain that a
  // peer of the same CA file refuses loaded, and every source refused it ("permitted subtree violation", "path length
  // constraint exceeded"), the destination's log only asking "did the source refuse this destination's certificate?"
  it.live("load: this side's own chain that a peer of the same CA file refuses (a name constraint of its intermediate CA, a path length; issued by no CA of the file, as QEMU refuses it) is refused, saying why", () =>
    leakFree(Effect.gen(function*() {
      const own = (name: string) =>
        configError({ ca: fixture("ca-cert.pem"), cert: fixture(`${name}-cert.pem`), key: fixture(`${name}-key.pem`) })
      const refusal = (name: string, why: string) =>
        `TLS configuration: certificate ${fixture(`${name}-cert.pem`)} (CN=localhost) is not trusted: ${why}: a peer ` +
        `with the same CA file (${fixture("ca-cert.pem")}) refuses it in every handshake`
      expect((yield* own("constrained-server")).message).toBe(
        refusal("constrained-server", "permitted subtree violation (a name constraint of a CA of its chain)")
      )
      expect((yield* own("pathlen-server")).message).toBe(refusal("pathlen-server", "path length constraint exceeded"))
      // a chain through an intermediate CA in good standing loads
      yield* loadTls({ ca: fixture("ca-cert.pem"), cert: fixture("inter-server-cert.pem"), key: fixture("inter-server-key.pem") })
      // a certificate no CA of the CA file issued (another CA's, a self-signed one) loaded, and every peer of that CA
      // file refused it; QEMU refuses it at load ("Our own certificate ... failed validation against ca-cert.pem")
      const foreign = (name: string, why: string) =>
        `TLS configuration: certificate ${fixture(`${name}-cert.pem`)} (CN=alice) ${why}, and no CA of the CA file ` +
        `${fixture("ca-cert.pem")} issued it: a peer with that CA file refuses it in every handshake, and QEMU refuses it ` +
        "at load; add the CA that issued it to the CA file (which may hold several CAs)"
      expect((yield* own("other-ca-alice")).message).toBe(foreign("other-ca-alice", "was issued by CN=other test CA"))
      expect((yield* own("selfsigned-alice")).message).toBe(foreign("selfsigned-alice", "is self-signed"))
      // a CA file that holds its CA among others: it loads
      const both = tmp("cas.pem", Fs.readFileSync(fixture("ca-cert.pem"), "utf8") + Fs.readFileSync(fixture("other-ca-cert.pem"), "utf8"))
      yield* loadTls({ ca: both, cert: fixture("other-ca-alice-cert.pem"), key: fixture("other-ca-alice-key.pem") }).pipe(
        Effect.ensuring(Effect.sync(() => Fs.rmSync(both, { force: true })))
      )
    })))

  // a peer checking the same CRL refused it in every handshake: a destination of a revoked certificate loaded and kept
  // waiting, its log asking each time "did the source refuse this destination's certificate CN=localhost?"
  it.live("load: this side's own certificate that its CRL file revokes, or issued by a CA it revokes (in its file or the CA file), is refused, naming the CRL", () =>
    leakFree(Effect.gen(function*() {
      const crl = fixture("ca-crl.pem")
      const revoked = (name: string, cn: string) =>
        `TLS configuration: certificate ${fixture(`${name}-cert.pem`)} (CN=${cn}) is revoked (listed in the CRL of CN=test CA ` +
        `in ${crl}): every peer that checks that CRL refuses it`
      for (const [name, cn] of [["revoked-server", "localhost"], ["revoked-alice", "alice"]] as const) {
        expect((yield* configError({ ca: fixture("ca-cert.pem"), crl, cert: fixture(`${name}-cert.pem`), key: fixture(`${name}-key.pem`) })).message)
          .toBe(revoked(name, cn))
      }
      // the intermediate CA that issued it revoked: sent with it, or found in the CA file
      const chain = { ca: fixture("chain-ca-cert.pem"), crl: fixture("chain-crl.pem"), key: fixture("revoked-inter-server-key.pem") }
      const leafOnly = tmp("revoked-inter-leaf.pem", Fs.readFileSync(fixture("revoked-inter-server-cert.pem"), "utf8").match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----\n/)![0])
      yield* removing(leafOnly)
      for (const cert of [fixture("revoked-inter-server-cert.pem"), leafOnly]) {
        expect((yield* configError({ ...chain, cert })).message).toBe(
          `TLS configuration: certificate ${cert} (CN=localhost) was issued by CN=revoked intermediate CA, which is revoked ` +
            `(listed in the CRL of CN=test CA in ${fixture("chain-crl.pem")}): every peer that checks that CRL refuses it`
        )
      }
      // in good standing they load; without the CRL too (nothing says they are revoked)
      yield* loadTls({ ...chain, cert: fixture("inter-server-cert.pem"), key: fixture("inter-server-key.pem") })
      yield* loadTls({ ca: fixture("ca-cert.pem"), crl, cert: fixture("alice-cert.pem"), key: fixture("alice-key.pem") })
      yield* loadTls({ ca: fixture("ca-cert.pem"), cert: fixture("revoked-server-cert.pem"), key: fixture("revoked-server-key.pem") })
    })))

  // a TLS peer signs its handshake (CertificateVerify, or a TLS 1.2 ServerKeyExchange): a certificate whose keyUsage
  // leaves out digitalSignature cannot, and every peer refused it in every handshake (a source of this library, "the
  // destination's certificate CN=localhost does not permit digital signatures (keyUsage)", as QEMU's GnuTLS; a
  // destination, "its keyUsage lacks digitalSignature"), this side's log only guessing why; QEMU refuses it at load
  it.live("load: this side's own certificate whose keyUsage leaves out digitalSignature (keyEncipherment, keyAgreement only) is refused, naming it", () =>
    leakFree(Effect.gen(function*() {
      for (const [name, cn, usage] of [
        ["keyencipherment-server", "localhost", "keyEncipherment"],
        ["keyagreement-alice", "alice", "keyAgreement"]
      ] as const) {
        const error = yield* configError({ ca: fixture("ca-cert.pem"), cert: fixture(`${name}-cert.pem`), key: fixture(`${name}-key.pem`) })
        expect(error.message).toBe(
          `TLS configuration: certificate ${fixture(`${name}-cert.pem`)} (CN=${cn}) has a keyUsage without ` +
            `digitalSignature (${usage}): it cannot sign its TLS handshake, and every peer refuses it; reissue it with ` +
            "digitalSignature in its keyUsage"
        )
      }
    })))

  const fromEnv = (env: Record<string, string>) =>
    Effect.withConfigProvider(ConfigProvider.fromMap(new Map(Object.entries(env)), { pathDelim: "_" }))

  it.live("layerConfig reads MULTIFD_TLS_* and builds the service", () =>
    leakFree(Effect.gen(function*() {
      // (every identity of the list has a key in the file)
      const keys = tmp("qemu-other.psk", `${Fs.readFileSync(fixture("keys.psk"), "utf8")}other:${Crypto.randomBytes(32).toString("hex")}\n`)
      const tls = yield* Effect.provide(Tls.Tls, Tls.layerConfig).pipe(
        fromEnv({
          MULTIFD_TLS_PSK: keys,
          MULTIFD_TLS_IDENTITY: "qemu",
          MULTIFD_TLS_AUTHZ: "qemu,other",
          MULTIFD_TLS_VERIFY_PEER: "true",
          MULTIFD_TLS_HANDSHAKE_TIMEOUT_MS: "1500"
        }),
        Effect.ensuring(Effect.sync(() => Fs.rmSync(keys, { force: true })))
      )
      expect(tls.settings.credentials._tag).toBe("Psk")
      expect(tls.settings.authz).toEqual(["qemu", "other"])
      expect(tls.settings.verifyPeer).toBe(true)
      expect(Duration.toMillis(tls.settings.handshakeTimeout)).toBe(1500)

      const x509 = yield* Effect.provide(Tls.Tls, Tls.layerConfig).pipe(fromEnv({
        MULTIFD_TLS_CA: fixture("ca-cert.pem"),
        MULTIFD_TLS_CERT: fixture("server-cert.pem"),
        MULTIFD_TLS_KEY: fixture("server-key.pem"),
        MULTIFD_TLS_HOSTNAME: "localhost"
      }))
      expect(x509.settings.credentials._tag).toBe("X509")
      expect(x509.settings.hostname).toBe("localhost")
      expect(Duration.toMillis(x509.settings.handshakeTimeout)).toBe(Duration.toMillis(Tls.DEFAULT_HANDSHAKE_TIMEOUT))
    })))

  it.live("layerConfig validates: a bad MULTIFD_TLS_* is one line naming the variable, psk+ca a TlsError", () =>
    leakFree(Effect.gen(function*() {
      const build = (env: Record<string, string>) => Effect.flip(Effect.provide(Tls.Tls, Tls.layerConfig).pipe(fromEnv(env)))
      const oneLine = (error: Tls.TlsError, text: string) => {
        expect(error).toBeInstanceOf(Tls.TlsError)
        expect(error.reason).toBe("Config")
        expect(error.message).toBe(`TLS configuration: ${text}`)
      }

      const maybe = yield* build({ MULTIFD_TLS_PSK: fixture("keys.psk"), MULTIFD_TLS_VERIFY_PEER: "maybe" })
      oneLine(maybe, `MULTIFD_TLS_VERIFY_PEER: "maybe" is not true or false`)

      const negative = yield* build({ MULTIFD_TLS_PSK: fixture("keys.psk"), MULTIFD_TLS_HANDSHAKE_TIMEOUT_MS: "-5" })
      oneLine(negative, `MULTIFD_TLS_HANDSHAKE_TIMEOUT_MS: must be a positive number of milliseconds, not "-5"`)
      const word = yield* build({ MULTIFD_TLS_PSK: fixture("keys.psk"), MULTIFD_TLS_HANDSHAKE_TIMEOUT_MS: "soon" })
      oneLine(word, `MULTIFD_TLS_HANDSHAKE_TIMEOUT_MS: must be a positive number of milliseconds, not "soon"`)
      // (no timer waits longer: the handshake was never timed out)
      const long = yield* build({ MULTIFD_TLS_PSK: fixture("keys.psk"), MULTIFD_TLS_HANDSHAKE_TIMEOUT_MS: "1e12" })
      oneLine(long, `MULTIFD_TLS_HANDSHAKE_TIMEOUT_MS: must be at most 2147483647 milliseconds (24 days, the longest a timer waits), not "1e12"`)

      // the Config itself fails with a ConfigError at the variable's path
      const raw = yield* Effect.flip(Tls.config).pipe(fromEnv({ MULTIFD_TLS_VERIFY_PEER: "maybe" }))
      expect(ConfigError.isConfigError(raw)).toBe(true)
      expect(raw).toMatchObject({ _op: "InvalidData", path: ["MULTIFD_TLS", "VERIFY_PEER"] })

      const both = yield* build({ MULTIFD_TLS_PSK: fixture("keys.psk"), MULTIFD_TLS_CA: fixture("ca-cert.pem") })
      expect(both).toBeInstanceOf(Tls.TlsError)
      expect((both as Tls.TlsError).reason).toBe("Config")

      const none = yield* build({})
      expect(none).toBeInstanceOf(Tls.TlsError)
      expect((none as Tls.TlsError).message).toContain("no credentials")
    })))

  it.live("load: an authorization list that names nobody ([], MULTIFD_TLS_AUTHZ set empty or to ',', an empty entry) is refused at load, not at every handshake", () =>
    leakFree(Effect.gen(function*() {
      // it loaded, and every source was then refused "not in the authorization list" (x509: verifyPeer turned on too)
      const empty = "TLS configuration: the authorization list (authz) is empty: it admits no peer; give at least one " +
        "identity, or no list to admit every peer whose credentials verify"
      expect((yield* configError({ psk: fixture("keys.psk"), authz: [] })).message).toBe(empty)
      expect((yield* configError({ ca: fixture("ca-cert.pem"), cert: fixture("server-cert.pem"), key: fixture("server-key.pem"), authz: [] })).message)
        .toBe(empty)
      expect((yield* configError({ psk: fixture("keys.psk"), authz: ["qemu", " "] })).message).toBe(
        "TLS configuration: the authorization list (authz) holds an empty entry (entry 2), which names no peer"
      )
      for (const value of ["", ",", " , "]) {
        const error = yield* Effect.flip(Effect.provide(Tls.Tls, Tls.layerConfig).pipe(fromEnv({
          MULTIFD_TLS_PSK: fixture("keys.psk"),
          MULTIFD_TLS_AUTHZ: value
        })))
        expect(error).toBeInstanceOf(Tls.TlsError)
        expect({ value, message: error.message }).toEqual({ value, message: empty })
      }
      // a list of one identity loads
      yield* loadTls({ psk: fixture("keys.psk"), authz: ["qemu"] })
    })))

  // an entry of the PSK authorization list that the PSK file has no key for admits nobody: authz [bob] loaded, and every
  // source was refused ("PSK identity \"qemu\" is not in the authorization list", or for bob "has no key")
  it.live("load: a PSK authorization entry without a key in the PSK file is refused at load, naming it", () =>
    leakFree(Effect.gen(function*() {
      for (const authz of [["bob"], ["qemu", "bob"]]) {
        expect((yield* configError({ psk: fixture("keys.psk"), authz })).message).toBe(
          `TLS configuration: authorization entry "bob" has no key in PSK file ${fixture("keys.psk")}: no source can ` +
            "prove that identity; add its key to the file, or remove the entry"
        )
      }
    })))

  // no certificate carries a name with ':' (but an IPv6 address), '[', ']' or '/': MULTIFD_TLS_HOSTNAME=[::1] (an IPv6
  // address as a uri writes it, which the command's --tls-hostname takes) or localhost:4444 loaded, and every
  // handshake failed, "Host: [::1]. is not in the cert's altnames"
  it.live("load: a hostname as a uri writes it ([::1]) is that address; one with a port, a path or brackets around a name is refused at load", () =>
    leakFree(Effect.gen(function*() {
      const server = yield* serverX509("server")
      const bracketed = yield* clientX509({ hostname: "[::1]" })
      expect(bracketed.settings.hostname).toBe("::1")
      yield* roundTrip(server.server, bracketed.client(LOOPBACK), { mib: 1, channels: 1 })
      for (const hostname of ["localhost:4444", "[localhost]", "localhost/x"]) {
        const error = yield* Effect.flip(clientX509({ hostname })).pipe(Effect.mapError(() => new Error(`loaded ${hostname}`)))
        expect(error.reason).toBe("Config")
        expect(error.message).toBe(
          `TLS configuration: hostname ${JSON.stringify(hostname)} is no host name: a certificate names no host with ` +
            "':' (but an IPv6 address), '[', ']' or '/' (give the name alone, without a port)"
        )
        expectOneLine(error)
      }
    })))

  it.live("load: a hostname that names nothing (empty, blank, with spaces) is refused at load, not at every handshake", () =>
    leakFree(Effect.gen(function*() {
      // MULTIFD_TLS_HOSTNAME= (set, empty) was the name "": every handshake failed "Host: . is not in the cert's altnames"
      const empty = yield* Effect.flip(Effect.provide(Tls.Tls, Tls.layerConfig).pipe(fromEnv({
        MULTIFD_TLS_CA: fixture("ca-cert.pem"),
        MULTIFD_TLS_HOSTNAME: ""
      })))
      expect(empty).toBeInstanceOf(Tls.TlsError)
      expect(empty.reason).toBe("Config")
      expect(empty.message).toBe(
        "TLS configuration: hostname \"\" is no host name: give the name the destination's certificate must carry, " +
          "or none to check the host of its address"
      )
      for (const hostname of ["  ", "localhost ", "local host"]) {
        const error = yield* Effect.flip(clientX509({ hostname }))
        expect(error.reason).toBe("Config")
        expect(error.message).toContain(`hostname ${JSON.stringify(hostname)} is no host name`)
        expectOneLine(error)
      }
      // a name in another case, with a final dot, is a host name: checked as it was
      const client = yield* clientX509({ hostname: "LOCALHOST." })
      const server = yield* serverX509("server")
      yield* roundTrip(server.server, client.client(LOOPBACK), { mib: 1, channels: 1 })
    })))
})
