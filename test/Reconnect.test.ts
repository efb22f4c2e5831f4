/**
 * Channel loss survival (issue 14): a multifd channel whose connection breaks mid-migration is re-attached
 * (same id, a new connection announced on the main channel) and its unacknowledged pages resent.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Logger from "effect/Logger"
import * as GuestRam from "../src/GuestRam.js"
import * as Migration from "../src/Migration.js"
import * as Transport from "../src/Transport.js"
import { failureOf } from "./support/failures.js"
import * as Faulty from "./support/faultyTransport.js"
import { leakFree, tempSocketPath } from "./support/handles.js"
import { mixedImage } from "./support/images.js"
import { sameMemory } from "./support/memory.js"

const PAGE = 4096
const TIMEOUTS = { connect: "2 seconds", handshake: "2 seconds", peer: "2 seconds" } as const

const noHang = <A, E, R>(self: Effect.Effect<A, E, R>, what: string, seconds = 10) =>
  Effect.timeoutFail(self, { duration: `${seconds} seconds`, onTimeout: () => new Error(`hung: ${what}`) })

const sourceRam = () =>
  GuestRam.make({
    blocks: [{ name: "pc.ram", bytes: mixedImage(768, 0.6, PAGE) }, { name: "vga.vram", bytes: mixedImage(256, 0.6, PAGE) }]
  })

const unixAddress = (name: string): Transport.Address => ({ _tag: "Unix", path: tempSocketPath(name) })

const startDestination = (faulty: Faulty.Faulty, address: Transport.Address) =>
  Effect.gen(function*() {
    const logs: Array<string> = []
    const bound = yield* Deferred.make<Transport.Address, Transport.TransportError>()
    const destination = Effect.scoped(Effect.gen(function*() {
      const listener = yield* faulty.transport.listen(address).pipe(Effect.tapError((e) => Deferred.fail(bound, e)))
      yield* Deferred.succeed(bound, listener.address)
      return yield* Migration.incoming(listener, { timeouts: TIMEOUTS })
    }))
    const fiber = yield* Effect.forkScoped(Effect.provide(
      destination,
      Logger.replace(Logger.defaultLogger, Logger.make(({ message }) => logs.push(String(message))))
    ))
    return { fiber, address: yield* Deferred.await(bound), logs }
  })

const migrateWith = (faulty: Faulty.Faulty, ram: GuestRam.GuestRam["Type"], options: Migration.MigrateOptions) =>
  Migration.migrate({ timeouts: TIMEOUTS, ...options }).pipe(
    Effect.provide(faulty.layer),
    Effect.provideService(GuestRam.GuestRam, ram)
  )

describe("a lost channel is re-attached", () => {
  it.live("a cut inside the first data packet: the migration completes, one reconnect", () =>
    leakFree(Effect.gen(function*() {
      const ram = yield* sourceRam()
      const faulty = yield* Faulty.make({ cut: { channel: 1, afterBytes: 64 + 1344 + 1000 } })
      const dest = yield* startDestination(faulty, unixAddress("re1"))
      const exit = yield* noHang(Effect.exit(migrateWith(faulty, ram, { address: dest.address, channels: 4 })), "migrate")
      if (Exit.isFailure(exit)) throw new Error(failureOf(exit).message + "\n" + dest.logs.join("\n"))
      expect(exit.value.reconnects).toBe(1)
      const received = yield* noHang(Fiber.join(dest.fiber), "incoming")
      expect(sameMemory(received.ram, ram)).toBe(true)
    })))
})
