/**
 * `internal/native/unsent`: what a socket has not handed to the kernel, to the byte. Node keeps a whole write
 * request in `writableLength` until all of it has left; a channel's long vectored write on a slow link must
 * still show its progress (the source's inactivity watch and its stats count what the socket accepted).
 * Real sockets on loopback, plain and TLS, with a peer that reads nothing until told.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Tls from "node:tls"
import { fileURLToPath } from "node:url"
import { unsent } from "../src/internal/native/unsent.js"

const BIG = 16 * 1024 * 1024

/** The first key of the test keys.psk. */
const psk = Buffer.from(
  Fs.readFileSync(fileURLToPath(new URL("./fixtures/tls/keys.psk", import.meta.url)), "utf8").trim().split("\n")[0]!.split(":")[1]!,
  "hex"
)

/** The next turn of the event loop (no timer). */
const turn = () => new Promise<void>((resolve) => setImmediate(resolve))

/** A peer on loopback that reads nothing until `drain`; `client` is connected to it (over TLS with `tls`). */
const silentPeer = async (tls: boolean) => {
  const accepted: Array<Net.Socket> = []
  const onSocket = (socket: Net.Socket) => {
    accepted.push(socket)
    socket.on("error", () => {})
    socket.pause()
  }
  const server = tls
    ? Tls.createServer({ pskCallback: () => psk, ciphers: "PSK-AES128-GCM-SHA256", maxVersion: "TLSv1.2" }, onSocket)
    : Net.createServer(onSocket)
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  const port = (server.address() as Net.AddressInfo).port
  const raw = Net.connect(port, "127.0.0.1")
  raw.on("error", () => {})
  const client: Net.Socket = await new Promise((resolve) => {
    // TLS over a connected socket, as `Tls.client` upgrades a channel
    const socket: Net.Socket = tls
      ? Tls.connect({
        socket: raw,
        pskCallback: () => ({ psk, identity: "qemu" }),
        ciphers: "PSK-AES128-GCM-SHA256",
        maxVersion: "TLSv1.2",
        checkServerIdentity: () => undefined
      }, () => resolve(socket))
      : raw.once("connect", () => resolve(raw))
    socket.on("error", () => {})
  })
  while (accepted.length === 0) await turn()
  return {
    client,
    drain: () => {
      for (const socket of accepted) socket.resume()
    },
    close: async () => {
      client.destroy()
      raw.destroy()
      for (const socket of accepted) socket.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

describe("unsent: bytes a socket has not handed to the kernel", () => {
  for (const tls of [false, true]) {
    it(`${tls ? "TLS" : "TCP"}: a 16 MiB write the peer does not read counts what the kernel took before the write completes`, async () => {
      const peer = await silentPeer(tls)
      try {
        const { client } = peer
        expect(unsent(client)).toBe(0)
        let done = false
        client.write(Buffer.alloc(BIG), () => (done = true))
        // the kernel takes what its buffers hold at once: the write is incomplete, yet part of it has left
        // (within a few turns of the event loop: TLS encrypts first)
        for (let turns = 0; turns < 1000 && unsent(client) === client.writableLength && !done; turns++) await turn()
        expect(done).toBe(false)
        expect(client.writableLength).toBe(BIG)
        expect(unsent(client)).toBeLessThan(BIG)
        expect(unsent(client)).toBeGreaterThan(0)
        // the peer reads: everything leaves, and the count follows it down to nothing
        const before = unsent(client)
        peer.drain()
        while (!done) await turn()
        expect(unsent(client)).toBe(0)
        expect(before).toBeGreaterThan(0)
      } finally {
        await peer.close()
      }
    }, 20_000)
  }
})
