/**
 * Run as a child (`node --import tsx test/support/trustProbe.ts CONFIG_JSON...`, with `NODE_EXTRA_CA_CERTS`: Node
 * reads it at start only): for each config, loads `Tls` settings, then makes one TLS handshake on loopback with
 * their secure context to a server presenting the fixtures' localhost certificate. Prints on stdout a JSON array:
 * for each config, whether that context trusted the certificate (`{ authorized, error }`), or why the settings
 * did not load (`{ loadError }`).
 */
import * as Effect from "effect/Effect"
import * as Fs from "node:fs"
import type * as Net from "node:net"
import * as NodeTls from "node:tls"
import { fileURLToPath } from "node:url"
import * as Tls from "../../src/Tls.js"

const fixture = (name: string) => fileURLToPath(new URL(`../fixtures/tls/${name}`, import.meta.url))

const server = NodeTls.createServer(
  { cert: Fs.readFileSync(fixture("server-cert.pem")), key: Fs.readFileSync(fixture("server-key.pem")) },
  (socket) => socket.end()
)
await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))

const verdict = (secureContext: NodeTls.SecureContext) =>
  new Promise<{ authorized: boolean; error: string }>((resolve, reject) => {
    const socket = NodeTls.connect({
      host: "127.0.0.1",
      port: (server.address() as Net.AddressInfo).port,
      secureContext,
      // the verdict is read, not enforced: this reports it
      rejectUnauthorized: false,
      checkServerIdentity: () => undefined
    })
    socket.on("error", reject)
    socket.on("secureConnect", () => {
      resolve({ authorized: socket.authorized, error: String(socket.authorizationError ?? "") })
      socket.destroy()
    })
  })

const results: Array<unknown> = []
for (const config of process.argv.slice(2)) {
  const loaded = await Effect.runPromise(Effect.either(Tls.load(JSON.parse(config) as Tls.TlsConfig)))
  results.push(loaded._tag === "Left" ? { loadError: loaded.left.message } : await verdict(loaded.right.secureContext))
}
server.close()
process.stdout.write(JSON.stringify(results))
