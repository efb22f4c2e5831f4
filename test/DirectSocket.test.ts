/**
 * `internal/native/directSocket`: accepted sockets re-wrapped with `onread`, so that long runs are read by libuv
 * straight into the caller's memory, and a destination's TLS sockets adopted after their handshake, so that
 * decrypted bytes are copied straight there. Real sockets on loopback, real TLS; every test proves nothing is
 * left open.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Cause from "effect/Cause"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import type * as Net from "node:net"
import * as NodeTls from "node:tls"
import * as Connections from "../src/internal/native/connection.js"
import * as DirectSocket from "../src/internal/native/directSocket.js"
import * as Path from "node:path"
import * as Tls from "../src/Tls.js"
import { connect, type Connection, listen, parseAddress } from "../src/Transport.js"
import { expectNoLeaks, leakFree, tempSocketPath } from "./support/handles.js"
import { pair } from "./support/sockets.js"

const noHang = <A, E, R>(self: Effect.Effect<A, E, R>, what: string) =>
  Effect.timeoutFail(self, { duration: "10 seconds", onTimeout: () => new Error(`hung: ${what}`) })

const tcp = Either.getOrThrow(parseAddress("tcp:127.0.0.1:0"))
const PAGE = 4096

/** `count` packets: a 16-byte header naming the packet, then `pages` random pages. */
const packets = (count: number, pages: number) =>
  Array.from({ length: count }, (_, i) => {
    const header = Buffer.alloc(16)
    header.writeUInt32BE(i, 0)
    return { header, payload: Crypto.randomBytes(pages * PAGE) }
  })

/**
 * A reader that does not read stops its socket near its high-water mark, which grows with what it consumed:
 * before it consumed anything, near `FIRST_HIGH_WATER` (`raw`, the socket that reads the network, has read less
 * than 1 MiB: a peer cannot make this side hold megabytes nobody asked for); once it consumed 8 MiB, near 8 MiB
 * more (at least 16 MiB read, less than 20); reading then gets every byte in order.
 */
const stopsThenResumes = (client: Connection, server: Connection, raw: Net.Socket) =>
  Effect.gen(function*() {
    const payload = Crypto.randomBytes(48 * 1024 * 1024)
    const wrote = yield* Deferred.make<void>()
    yield* Effect.fork(Effect.zipRight(client.write([payload]), Deferred.succeed(wrote, undefined)))
    const turns = (n: number, until: () => boolean = () => false) =>
      Effect.gen(function*() {
        for (let i = 0; i < n && !until(); i++) yield* Effect.promise(() => new Promise((resolve) => setImmediate(resolve)))
      })
    yield* server.peek(1) // reading has started
    // give the peer ample turns to push: the server side must stop near its first high-water mark
    yield* turns(200, () => raw.bytesRead >= 8 * 1024 * 1024)
    yield* turns(50)
    expect(raw.bytesRead).toBeGreaterThan(0)
    expect(raw.bytesRead).toBeLessThan(1024 * 1024)
    // 8 MiB consumed: the mark is 8 MiB further on
    const memory = Buffer.alloc(payload.length)
    const consumed = 8 * 1024 * 1024
    yield* noHang(server.readInto(memory, 0, consumed), "reading 8 MiB")
    yield* turns(200, () => raw.bytesRead >= 2 * consumed)
    yield* turns(50)
    expect(raw.bytesRead).toBeGreaterThanOrEqual(2 * consumed)
    expect(raw.bytesRead).toBeLessThan(2 * consumed + 4 * 1024 * 1024)
    yield* noHang(server.readInto(memory, consumed, payload.length - consumed), "reading after a stop")
    expect(memory.equals(payload)).toBe(true)
    yield* noHang(Deferred.await(wrote), "the writer")
  })

/** A chain over `sent`: each header, then its payload at the slot the header names, until `stopAt`. */
const plan = (sent: ReadonlyArray<{ readonly header: Buffer; readonly payload: Buffer }>, memory: Buffer, stopAt: number) => {
  const header = Buffer.alloc(16)
  const seen: Array<number> = []
  let expectingHeader = true
  const next = (full: Uint8Array): Uint8Array | undefined => {
    if (!expectingHeader) {
      expectingHeader = true
      return header
    }
    const index = header.readUInt32BE(0)
    seen.push(index)
    if (index === stopAt) return undefined
    expectingHeader = false
    const size = sent[index]!.payload.length
    expect(full).toBe(header)
    return memory.subarray(index * size, (index + 1) * size)
  }
  return { header, next, seen }
}

/**
 * 40 packets of 128 pages through `server.readChain`, part of the first queued before the chain starts (read
 * by a peek): every byte lands in its view, in order; the chain stops after the 40th header, whose payload is
 * still there for the next read.
 */
const chainsInOrder = (client: Connection, server: Connection) =>
  Effect.gen(function*() {
    const sent = packets(40, 128)
    const memory = Buffer.alloc(40 * 128 * PAGE)
    yield* client.write([sent[0]!.header, sent[0]!.payload])
    // part of the first packet waits in the queue when the chain starts
    yield* server.peek(1000)
    const writer = yield* Effect.fork(Effect.forEach(sent.slice(1), (p) => client.write([p.header, p.payload]), { discard: true }))
    const { header, next, seen } = plan(sent, memory, 39)
    expect(server.readChain).toBeDefined()
    expect(yield* noHang(server.readChain!(header, next), "the chain")).toBe(true)
    expect(seen).toEqual(Array.from({ length: 40 }, (_, i) => i))
    for (let i = 0; i < 39; i++) expect(memory.subarray(i * 128 * PAGE, (i + 1) * 128 * PAGE).equals(sent[i]!.payload)).toBe(true)
    const rest = Buffer.alloc(128 * PAGE)
    yield* server.readInto(rest, 0, rest.length)
    expect(rest.equals(sent[39]!.payload)).toBe(true)
    yield* Fiber.join(writer)
  })

describe("DirectSocket: reads into guest memory on accepted sockets", () => {
  for (const [name, address] of [["tcp", tcp], ["unix", { _tag: "Unix", path: tempSocketPath("direct") }]] as const) {
    it.live(`${name}: headers through the queue, contiguous runs direct, scattered pages staged, all in order`, () =>
      leakFree(Effect.gen(function*() {
        const { client, server } = yield* pair(address)
        const sent = packets(24, 128) // 512 KiB runs: read directly
        const memory = Buffer.alloc(24 * 128 * PAGE)
        const writer = yield* Effect.fork(Effect.forEach(sent, (p) => client.write([p.header, p.payload]), { discard: true }))
        const header = Buffer.alloc(16)
        for (let i = 0; i < sent.length; i++) {
          yield* server.readInto(header, 0, 16)
          expect(header.readUInt32BE(0)).toBe(i)
          // odd packets go to reversed page slots (scattered: staged), even ones to one contiguous run
          const base = i * 128 * PAGE
          const offsets = Array.from({ length: 128 }, (_, k) => base + (i % 2 === 0 ? k : 127 - k) * PAGE)
          yield* server.readScatter(memory, offsets, 128, PAGE)
          for (let k = 0; k < 128; k++) {
            const page = sent[i]!.payload.subarray(k * PAGE, (k + 1) * PAGE)
            expect(memory.subarray(offsets[k]!, offsets[k]! + PAGE).equals(page)).toBe(true)
          }
        }
        yield* Fiber.join(writer)
      })))
  }

  it.live("bytes that arrived before the reader asked land where the read wants them", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(tcp)
      const payload = Crypto.randomBytes(3 * 1024 * 1024 + 123)
      yield* client.write([payload])
      // wait until part of it is queued (staged) before a direct read is asked for
      yield* server.peek(1000)
      const memory = Buffer.alloc(payload.length + 7)
      yield* server.readInto(memory, 7, payload.length)
      expect(memory.subarray(7).equals(payload)).toBe(true)
    })))

  it.live("a reader that does not read stops the socket: bounded buffering, then every byte in order", () =>
    leakFree(Effect.flatMap(pair(tcp), ({ client, server }) => stopsThenResumes(client, server, server.stream as Net.Socket))))

  it.live("the peer ends in the middle of a direct read: a Closed error with the count, nothing hangs", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(tcp)
      yield* client.write([Crypto.randomBytes(300 * 1024)])
      yield* client.end
      const memory = Buffer.alloc(1024 * 1024)
      const error = yield* noHang(Effect.flip(server.readInto(memory, 0, memory.length)), "a short read")
      expect(error.reason).toBe("Closed")
      expect(error.message).toContain(`after ${300 * 1024} of ${1024 * 1024} bytes`)
    })))

  it.live("nothing is read before the first read: a TLS upgrade after the ClientHello arrived still works", () =>
    leakFree(Effect.gen(function*() {
      const tls = yield* Tls.make({ psk: Path.join(import.meta.dirname, "fixtures", "tls", "keys.psk") })
      const listener = yield* listen(tcp)
      const raw = yield* connect(listener.address)
      const accepted = yield* listener.accept
      // the client's handshake starts at once; the server upgrades only after its first bytes are surely here
      const client = yield* Effect.fork(tls.client("127.0.0.1")(raw, 0))
      for (let i = 0; i < 50; i++) yield* Effect.promise(() => new Promise((resolve) => setImmediate(resolve)))
      const server = yield* noHang(tls.server(accepted, "main"), "the server handshake")
      const secured = yield* noHang(Fiber.join(client), "the client handshake")
      yield* secured.write([Buffer.from("over tls")])
      expect((yield* server.read(8)).toString()).toBe("over tls")
    })))

  it.live("closing the listener's scope with re-wrapped connections open completes at once", () =>
    expectNoLeaks(noHang(
      Effect.scoped(Effect.gen(function*() {
        const { client, server } = yield* pair(tcp)
        yield* client.write([Buffer.from("hello")])
        expect((yield* server.read(5)).toString()).toBe("hello")
      })),
      "closing the scope"
    )))
})

describe("Connection.readChain: one read plan, header, pages, header, …, chosen as each view fills", () => {
  for (const [name, address] of [["tcp", tcp], ["unix", { _tag: "Unix", path: tempSocketPath("chain") }]] as const) {
    it.live(`${name}: every byte lands in its view, in order, bytes queued before the chain first`, () =>
      leakFree(Effect.gen(function*() {
        const { client, server } = yield* pair(address)
        yield* chainsInOrder(client, server)
      })))
  }

  it.live("the stream ending just before a view completes with false; inside a view, it fails saying where", () =>
    leakFree(Effect.gen(function*() {
      const sent = packets(3, 2)
      const clean = yield* pair(tcp)
      yield* clean.client.write(sent.flatMap((p) => [p.header, p.payload]))
      yield* clean.client.end
      const first = plan(sent, Buffer.alloc(3 * 2 * PAGE), -1)
      expect(yield* noHang(clean.server.readChain!(first.header, first.next), "a clean end")).toBe(false)
      expect(first.seen).toEqual([0, 1, 2])

      const cut = yield* pair(tcp)
      yield* cut.client.write([sent[0]!.header, sent[0]!.payload.subarray(0, 5000)])
      yield* cut.client.end
      const second = plan(sent, Buffer.alloc(3 * 2 * PAGE), -1)
      const error = yield* Effect.flip(noHang(cut.server.readChain!(second.header, second.next), "an end inside a view"))
      expect(error.message).toContain(`after 5000 of ${2 * PAGE} bytes`)
    })))

  it.live("the stream failing just before a view (a TLS record that failed authentication) fails the chain with that error, not false", () =>
    leakFree(Effect.gen(function*() {
      const sent = packets(2, 2)
      const { client, server } = yield* pair(tcp)
      yield* client.write(sent.flatMap((p) => [p.header, p.payload]))
      const chain = plan(sent, Buffer.alloc(2 * 2 * PAGE), -1)
      // the last payload filled: the chain now waits for the next header's first byte
      const waiting = yield* Deferred.make<void>()
      const next = (full: Uint8Array) => {
        const view = chain.next(full)
        if (chain.seen.length === 2 && view === chain.header) Deferred.unsafeDone(waiting, Exit.void)
        return view
      }
      const reading = yield* Effect.fork(server.readChain!(chain.header, next))
      yield* noHang(Deferred.await(waiting), "the chain at a packet boundary")
      const bad = Object.assign(new Error("decryption failed or bad record mac"), {
        code: "ERR_SSL_DECRYPTION_FAILED_OR_BAD_RECORD_MAC",
        reason: "decryption failed or bad record mac"
      })
      server.stream.destroy(bad)
      const error = yield* Effect.flip(noHang(Fiber.join(reading), "the failed chain"))
      expect(error).toMatchObject({ _tag: "TransportError", reason: "Tls" })
      expect(error.message).toMatch(/: TLS: decryption failed or bad record mac$/)
    })))

  it.live("interrupting a chain stops it: no view is asked for afterwards, and the socket closes with the scope", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(tcp)
      const sent = packets(2, 64)
      const asked = { count: 0 }
      const firstPacketRead = yield* Deferred.make<void>()
      const header = Buffer.alloc(16)
      const memory = Buffer.alloc(2 * 64 * PAGE)
      const chain = yield* Effect.fork(server.readChain!(header, () => {
        asked.count++
        if (asked.count === 2) Deferred.unsafeDone(firstPacketRead, Exit.void)
        return asked.count % 2 === 1 ? memory.subarray(0, 64 * PAGE) : header
      }))
      yield* client.write([sent[0]!.header, sent[0]!.payload])
      yield* noHang(Deferred.await(firstPacketRead), "the first packet")
      yield* Fiber.interrupt(chain)
      const before = asked.count
      yield* client.write([sent[1]!.header, sent[1]!.payload])
      // the bytes now go to the queue, not to the interrupted chain's views
      yield* server.readInto(Buffer.alloc(16 + 64 * PAGE), 0, 16 + 64 * PAGE)
      expect(asked.count).toBe(before)
    })))

  it.live("a view chooser that throws ends the chain with that defect, not the process", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* pair(tcp)
      const sent = packets(1, 4)
      yield* client.write([sent[0]!.header, sent[0]!.payload])
      const exit = yield* noHang(
        Effect.exit(server.readChain!(Buffer.alloc(16), () => {
          throw new Error("a bug in the packet reader")
        })),
        "the chain"
      )
      expect(Exit.isFailure(exit) && Cause.isDie(exit.cause)).toBe(true)
      expect(Cause.pretty((exit as Exit.Failure<unknown, unknown>).cause)).toContain("a bug in the packet reader")
    })))

  it.effect("connections that cannot read in place have no readChain (the caller falls back to readScatter)", () =>
    leakFree(Effect.gen(function*() {
      const listener = yield* listen(tcp)
      const [client] = yield* Effect.all([connect(listener.address), listener.accept], { concurrency: 2 })
      expect(client.readChain).toBeUndefined()
    })))
})

describe("DirectSocket.adopt: a destination's TLS connection reads decrypted bytes straight into memory", () => {
  /** A PSK TLS connection over loopback: `client` the source's side, `server` the destination's. */
  const tlsPair = Effect.gen(function*() {
    const tls = yield* Tls.make({ psk: Path.join(import.meta.dirname, "fixtures", "tls", "keys.psk") })
    const { client: rawClient, server: rawServer } = yield* pair(tcp)
    const [client, server] = yield* noHang(
      Effect.all([tls.client("127.0.0.1")(rawClient, 0), tls.server(rawServer, "main")], { concurrency: 2 }),
      "the handshakes"
    )
    return { client, server }
  })

  /** Counts the 'data' events of the server's TLS socket: none while reads go straight into memory. */
  const dataEvents = (server: { readonly stream: unknown }) => {
    const counter = { events: 0 }
    ;(server.stream as Net.Socket).on("data", () => counter.events++)
    return counter
  }

  it.live("packets through readChain: every byte in its view, in order, bytes sent before the first read first", () =>
    leakFree(Effect.gen(function*() {
      const { client, server } = yield* tlsPair
      // counted from before the first byte: the first packet is decrypted and queued before the chain reads
      const data = dataEvents(server)
      yield* chainsInOrder(client, server)
      // 20 MiB decrypted, and not one record went through a 'data' event's fresh buffer
      expect(data.events).toBe(0)
    })))

  it.live("decrypted bytes the TLS socket buffered before it was adopted come first, then reads go straight into memory", () =>
    leakFree(Effect.gen(function*() {
      const fixture = (name: string) => Fs.readFileSync(Path.join(import.meta.dirname, "fixtures", "tls", name))
      const first = Crypto.randomBytes(5000)
      const second = Crypto.randomBytes(3 * 1024 * 1024)
      const accepted = yield* Effect.acquireRelease(
        Effect.async<{ readonly server: NodeTls.Server; readonly socket: NodeTls.TLSSocket; readonly client: NodeTls.TLSSocket }>(
          (resume) => {
            const server = NodeTls.createServer({ key: fixture("server-key.pem"), cert: fixture("server-cert.pem") })
            server.listen(0, "127.0.0.1", () => {
              const client = NodeTls.connect({
                port: (server.address() as Net.AddressInfo).port,
                host: "127.0.0.1",
                ca: fixture("ca-cert.pem"),
                servername: "localhost"
              })
              client.on("secureConnect", () => client.write(first))
              client.on("error", () => {})
              server.once("secureConnection", (socket) => resume(Effect.succeed({ server, socket, client })))
            })
          }
        ),
        ({ client, server, socket }) =>
          Effect.async<void>((resume) => {
            client.destroy()
            socket.destroy()
            server.close(() => resume(Effect.void))
          })
      )
      // wait until the first message is decrypted and buffered in the socket (nothing reads it yet)
      for (let i = 0; i < 500 && accepted.socket.readableLength < first.length; i++) {
        yield* Effect.promise(() => new Promise((resolve) => setImmediate(resolve)))
      }
      expect(accepted.socket.readableLength).toBe(first.length)
      const reader = DirectSocket.adopt(accepted.socket)
      expect(reader).toBeDefined()
      const data = dataEvents({ stream: accepted.socket })
      const connection = Connections.make(accepted.socket, "test", reader)
      accepted.client.end(second)
      const memory = Buffer.alloc(first.length + second.length)
      yield* noHang(connection.readInto(memory, 0, memory.length), "the bytes")
      expect(memory.equals(Buffer.concat([first, second]))).toBe(true)
      expect(yield* noHang(connection.atEnd, "the end")).toBe(true)
      expect(data.events).toBe(0)
      // a socket that already reads into a buffer of its own is not adopted twice
      expect(DirectSocket.adopt(accepted.socket)).toBeUndefined()
    })))

  it.live("a reader that does not read stops the TLS socket: bounded buffering, then every byte in order", () =>
    leakFree(Effect.flatMap(tlsPair, ({ client, server }) =>
      // what arrives is counted on the socket under the TLS one: a little more than the decrypted bytes
      stopsThenResumes(client, server, (server.stream as unknown as { _parent: Net.Socket })._parent))))

  it.live("the source ends: just before a view the chain completes with false; inside a view, a Closed error with the count", () =>
    leakFree(Effect.gen(function*() {
      const sent = packets(3, 2)
      const clean = yield* tlsPair
      yield* clean.client.write(sent.flatMap((p) => [p.header, p.payload]))
      yield* clean.client.end
      const header = Buffer.alloc(16)
      const memory = Buffer.alloc(3 * 2 * PAGE)
      let expectingHeader = true
      const next = () => {
        expectingHeader = !expectingHeader
        return expectingHeader ? header : memory.subarray(header.readUInt32BE(0) * 2 * PAGE, (header.readUInt32BE(0) + 1) * 2 * PAGE)
      }
      expect(yield* noHang(clean.server.readChain!(header, next), "a clean end")).toBe(false)
      expect(memory.equals(Buffer.concat(sent.map((p) => p.payload)))).toBe(true)

      const cut = yield* tlsPair
      yield* cut.client.write([Crypto.randomBytes(300 * 1024)])
      yield* cut.client.end
      const error = yield* noHang(Effect.flip(cut.server.readInto(Buffer.alloc(1024 * 1024), 0, 1024 * 1024)), "a short read")
      expect(error.reason).toBe("Closed")
      expect(error.message).toContain(`after ${300 * 1024} of ${1024 * 1024} bytes`)
    })))
})
