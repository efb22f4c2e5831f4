/**
 * Host name lookups of this process's connects and listens, counted while they run. A lookup (`getaddrinfo`) runs on a thread
 * of libuv's pool and cannot be cancelled: a connect interrupted while its lookup waits for a DNS server that does
 * not answer gives the lookup up, but the thread stays in it, for as long as the resolver's timeouts and attempts
 * take (10 s by default, minutes as some systems set them). Node's `process.exit` waits for that thread (libuv
 * joins its pool as the process exits), deaf to every further signal: the command, interrupted, said so and then
 * hung. A process about to exit while one runs ends by its signal instead (`cli/main.ts`), which no thread holds.
 *
 * A native adapter: it imports no public module.
 *
 * @internal
 */
import * as Dns from "node:dns"
import type * as Net from "node:net"

let running = 0

/** How many lookups of connects are under way now (their threads busy, whether or not anyone still waits). */
export const inFlight = (): number => running

/** `Dns.lookup` as a connect's `lookup` option, counted in `inFlight` until it answers. */
export const lookup: Net.LookupFunction = (hostname, options, callback) => {
  running++
  let answered = false
  Dns.lookup(hostname, options, (error, address, family) => {
    if (!answered) {
      answered = true
      running--
    }
    ;(callback as (error: NodeJS.ErrnoException | null, address: string | Array<Dns.LookupAddress>, family?: number) => void)(
      error,
      address,
      family
    )
  })
}
