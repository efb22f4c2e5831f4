/**
 * A man in the middle that tampers with a TLS connection after its handshake (test/support/tamperProxy.ts):
 * it flips one byte of a record's ciphertext, or cuts a record in the middle and ends the stream (a peer that
 * vanishes mid-record). The side that reads the record fails at once, naming the channel and what TLS found
 * ("TLS: decryption failed or bad record mac"), a `TransportError` of reason `Tls` — never re-attached as a lost
 * connection — and the other side hears it promptly; nothing is left open.
 *
 * The proxy also swallows what the detecting side sends back on that connection (its alert), so that only the
 * detecting side can tell: a destination's TLS socket (made by hand, not by `tls.Server`) used to keep such an
 * error to itself and wait for its peer timeout. Every migration here has a peer timeout of 60 s: a test that
 * ends with the TLS reason ended because of it, not because something timed out.
 *
 * Real loopback TCP, real TLS (PSK and x509, fixtures/tls), the source's channels on the main thread and on
 * channel threads (`ChannelThreads`). No sleeps.
 */
import { describe, expect, inject, it } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Crypto from "node:crypto"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import * as ChannelThreads from "../src/ChannelThreads.js"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as MigrationError from "../src/MigrationError.js"
import * as Tls from "../src/Tls.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { noHang } from "./support/guards.js"
import { leakFree } from "./support/handles.js"
import { type TamperPlan, tamperProxy } from "./support/tamperProxy.js"

const PAGE = 4096
/** Far longer than any of these tests: a failure that names TLS did not come from a timeout. */
const TIMEOUTS = { connect: "60 seconds", handshake: "60 seconds", peer: "60 seconds" } as const
/** The bundled threads' module (beside the tests' CLI bundle). */
const MODULE = Path.join(Path.dirname(inject("cliBundle")), "channelWorker.js")

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/tls/${name}`, import.meta.url))

const credentials = {
  psk: () => Effect.map(Tls.make({ psk: fixture("keys.psk") }), (tls) => ({ server: tls.server, client: tls.client("127.0.0.1") })),
  x509: () =>
    Effect.zipWith(
      Tls.make({ ca: fixture("ca-cert.pem"), cert: fixture("server-cert.pem"), key: fixture("server-key.pem") }),
      Tls.make({ ca: fixture("ca-cert.pem") }),
      (server, client) => ({ server: server.server, client: client.client("127.0.0.1") })
    )
} as const

/** 8 MiB of shared memory (channel threads can read it), three in five pages random. */
const sourceRam = GuestRam.make({
  blocks: [{
    name: "pc.ram",
    bytes: (() => {
      const bytes = GuestRam.allocate(2048 * PAGE)
      for (let p = 0; p < 2048; p++) if (p % 5 < 3) Crypto.randomFillSync(bytes, p * PAGE, PAGE)
      return bytes
    })()
  }]
})

interface Outcome {
  readonly source: Exit.Exit<unknown, unknown>
  readonly destination: Exit.Exit<unknown, unknown>
  readonly threadSessions: number
}

/**
 * One migration through the tampering proxy, with `reconnect` attempts; both sides' exits, and how many channel
 * sessions the threads opened (with `threads`).
 */
const tampered = (
  tls: keyof typeof credentials,
  plan: TamperPlan,
  options: { readonly threads: boolean; readonly reconnect?: number }
) =>
  Effect.gen(function*() {
    const { client, server } = yield* credentials[tls]()
    const ram = yield* sourceRam
    const listener = yield* Transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
    const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS, upgrade: server }))
    const proxy = yield* tamperProxy(listener.address, { ...plan, swallowReply: true })
    const pool = options.threads ? yield* ChannelThreads.make({ maxThreads: 2, module: MODULE }) : undefined
    const source = yield* Migration.migrate({
      address: proxy.address,
      channels: 2,
      timeouts: TIMEOUTS,
      upgrade: client,
      reconnect: options.reconnect ?? 3
    }).pipe(
      Effect.provide(
        pool === undefined ? Transport.layer : Layer.merge(Transport.layer, Layer.succeed(ChannelThreads.ChannelThreads, pool))
      ),
      Effect.provideService(GuestRam.GuestRam, ram),
      Effect.exit,
      (self) => noHang(self, "migrate", 45)
    )
    const destinationExit = yield* noHang(Fiber.await(destination), "incoming", 45)
    expect(yield* Deferred.isDone(proxy.tampered)).toBe(true)
    const threadSessions = pool === undefined ? 0 : (yield* pool.stats).opened
    return { source, destination: destinationExit, threadSessions } satisfies Outcome
  })

/** The failure is a `ChannelError` of `channel` caused by a `TransportError` of reason `Tls`: one line, saying what. */
const expectTlsRecordFailure = (error: unknown, channel: "main" | "multifd") => {
  expect(error).toBeInstanceOf(MigrationError.ChannelError)
  const e = error as MigrationError.ChannelError
  if (channel === "main") expect(e.channel).toBe("main")
  else expect(typeof e.channel).toBe("number")
  expect(e.cause).toBeInstanceOf(Transport.TransportError)
  expect((e.cause as Transport.TransportError).reason).toBe("Tls")
  expect(e.message).toMatch(
    channel === "main"
      ? /^main channel: tcp:127\.0\.0\.1:\d+.*: TLS: decryption failed or bad record mac$/
      : /^multifd channel \d: tcp:127\.0\.0\.1:\d+.*: TLS: decryption failed or bad record mac$/
  )
  expectOneLine(e)
  return e
}

/** The other side's failure: prompt (not the peer timeout), one line. */
const expectHeard = (exit: Exit.Exit<unknown, unknown>) => {
  const error = failureOf(exit) as { readonly message: string; readonly _tag: string; readonly reason?: string }
  expect(error._tag === "MigrationError" && error.reason === "Timeout").toBe(false)
  expect(error.message).not.toMatch(/timed out|nothing arrived/)
  expectOneLine(error)
  return error
}

for (const tls of ["psk", "x509"] as const) {
  for (const threads of [false, true]) {
    describe(`${tls}, the source's channels ${threads ? "on channel threads" : "on the main thread"}`, () => {
      it.live("a flipped byte in a multifd channel's record: the destination fails at once naming the channel; the source hears it", () =>
        leakFree(Effect.gen(function*() {
          // (reconnecting on, as by default: a tampered record is no lost connection)
          const outcome = yield* tampered(tls, { connection: 1, direction: "up", record: 40, mode: "flip" }, { threads })
          const detected = expectTlsRecordFailure(failureOf(outcome.destination), "multifd")
          const heard = expectHeard(outcome.source)
          expect(heard.message).toBe(`the destination aborted the migration: ${detected.message}`)
          if (threads) expect(outcome.threadSessions).toBeGreaterThan(0)
        })))

      it.live("a flipped byte in the main channel's record to the destination: it fails at once; the source hears the close", () =>
        leakFree(Effect.gen(function*() {
          const outcome = yield* tampered(tls, { connection: 0, direction: "up", record: 2, mode: "flip" }, { threads })
          expectTlsRecordFailure(failureOf(outcome.destination), "main")
          expectHeard(outcome.source)
        })))

      it.live("a flipped byte in the main channel's record to the source: it fails at once, not as a refusal; the destination hears it", () =>
        leakFree(Effect.gen(function*() {
          const outcome = yield* tampered(tls, { connection: 0, direction: "down", record: 2, mode: "flip" }, { threads })
          expectTlsRecordFailure(failureOf(outcome.source), "main")
          expectHeard(outcome.destination)
        })))

      it.live("a multifd channel's record cut in the middle, then FIN: the destination fails at once (without reconnecting)", () =>
        leakFree(Effect.gen(function*() {
          const outcome = yield* tampered(tls, { connection: 1, direction: "up", record: 40, mode: "truncate" }, {
            threads,
            reconnect: 0
          })
          // the destination finds its stream cut; its end of the connection closing, the source finds its own
          // broken (on a write, or watching the channel's end: the destination closed it) and says so on the main
          // channel: either may reach the destination's verdict first
          const error = expectHeard(outcome.destination)
          expect(error.message).toMatch(
            /^(the source aborted the migration: )?multifd channel \d: tcp:127\.0\.0\.1:\d+.*: (peer closed the connection|connection|the destination closed the connection)/
          )
          expect(expectHeard(outcome.source).message).toMatch(/multifd channel \d: tcp:127\.0\.0\.1:\d+/)
        })))

      it.live("the main channel's record to the source cut in the middle, then FIN: the source fails at once; the destination hears it", () =>
        leakFree(Effect.gen(function*() {
          const outcome = yield* tampered(tls, { connection: 0, direction: "down", record: 2, mode: "truncate" }, { threads })
          const error = failureOf(outcome.source) as { readonly message: string }
          expect(error.message).toMatch(/peer closed the connection/)
          expectOneLine(error)
          expectHeard(outcome.destination)
        })))
    })
  }
}
