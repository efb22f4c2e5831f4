/**
 * A network that breaks under a migration, played by a TCP proxy the test drives chunk by chunk
 * (test/support/hostileProxy.ts): connections cut (RST or FIN) at a chosen message or byte, every channel at
 * once, the main channel too.
 *
 * - Done lost on the way and the main channel ended gracefully both ways (what a tunnel or proxy does when the
 *   other side of a connection breaks: ssh -L, socat, a port-forward end the far side with a FIN): the source,
 *   which never heard Done, fails; the destination must not succeed then (the source's user resumes the guest
 *   there), which it did when it took that end for the source's own.
 *
 * Real loopback TCP; nothing waits on a timer (`noHang` turns a hang into a failure).
 */
import { describe, expect, it } from "@effect/vitest"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as Crypto from "node:crypto"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as Transport from "../src/Transport.js"
import { expectOneLine, failureOf } from "./support/failures.js"
import { noHang } from "./support/guards.js"
import { leakFree } from "./support/handles.js"
import { hostileProxy, type Link, type Verdict } from "./support/hostileProxy.js"
import { sameMemory } from "./support/memory.js"

const PAGE = 4096
const TIMEOUTS = { connect: "5 seconds", handshake: "5 seconds", peer: "5 seconds" } as const
const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

/** 8 MiB, three in five pages random. */
const sourceRam = () => {
  const bytes = Buffer.alloc(2048 * PAGE)
  for (let p = 0; p < 2048; p++) if (p % 5 < 3) Crypto.randomFillSync(bytes, p * PAGE, PAGE)
  return GuestRam.make({ blocks: [{ name: "pc.ram", bytes }] })
}

/** Whether a chunk of the main channel carries a control message `tag`. */
const carries = (chunk: Buffer, tag: string) => chunk.includes(`"_tag":"${tag}"`)

/** One migration of 3 channels through a proxy that judges every chunk with `onChunk`: both sides' exits. */
const throughProxy = (
  onChunk: (link: Link, direction: "up" | "down", chunk: Buffer, links: ReadonlyArray<Link>) => Verdict,
  options: Partial<Migration.MigrateOptions> = {}
) =>
  Effect.gen(function*() {
    const listener = yield* Transport.listen(tcp0)
    const destination = yield* Effect.forkScoped(Migration.incoming(listener, { timeouts: TIMEOUTS }))
    const proxy = yield* hostileProxy(listener.address, onChunk)
    const ram = yield* sourceRam()
    const source = yield* noHang(
      Effect.exit(Migration.migrate({ address: proxy.address, channels: 3, timeouts: TIMEOUTS, ...options }).pipe(
        Effect.provideService(GuestRam.GuestRam, ram)
      )),
      "migrate"
    )
    const received = yield* noHang(Fiber.await(destination), "incoming")
    return { source, received, ram, proxy }
  }).pipe(Effect.scoped, Effect.provide(Transport.layer), Effect.provide(Logger.remove(Logger.defaultLogger)))

describe("the main channel cut while Done is on its way", () => {
  for (const how of ["fin", "reset"] as const) {
    it.live(`Done dropped, the main channel ended both ways (${how}): the source fails, and so does the destination`, () =>
      leakFree(Effect.gen(function*() {
        let cut = false
        const { received, source } = yield* throughProxy((link, direction, chunk) => {
          if (!cut && link.role === "main" && direction === "down" && carries(chunk, "Done")) {
            cut = true
            return { _tag: "Break", how }
          }
          return undefined
        })
        expect(cut).toBe(true)
        const sourceError = failureOf(source)
        expectOneLine(sourceError)
        expect(sourceError.message).toContain("main channel: ")
        // before: the destination succeeded (with how = "fin"), while the source had failed
        const error = failureOf(received)
        expectOneLine(error)
        expect(error.message).toContain("main channel")
        if (how === "fin") {
          expect(error).toMatchObject({ _tag: "MigrationError", reason: "ChannelClosed" })
          expect(error.message).toContain("before the source said it heard Done")
        }
      })))
  }

  it.live("Done delivered: both succeed, the memories are equal", () =>
    leakFree(Effect.gen(function*() {
      const { ram, received, source } = yield* throughProxy(() => undefined)
      expect(Exit.isSuccess(source)).toBe(true)
      if (Exit.isFailure(received)) throw new Error(`the destination failed: ${failureOf(received).message}`)
      expect(sameMemory(received.value.ram, ram)).toBe(true)
    })))
})
