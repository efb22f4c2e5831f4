/**
 * Seeded mutation of captured bytes, for the fuzz tests (test/Fuzz.test.ts): a small PRNG, generic byte
 * mutations (flips, substitutions, interesting integers, truncation, duplicated or deleted ranges) and a
 * recording proxy that keeps every connection's bytes, both ways, in the order the connections came.
 *
 * The judge says what every failure must be: a typed error (no defect) with a one-line message that shows no
 * JavaScript internals.
 */
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import * as Net from "node:net"
import type * as Transport from "../../src/Transport.js"
import { loopbackServer } from "./tcpServer.js"

/** mulberry32: a tiny seeded PRNG (numbers in [0, 1)). */
export const prng = (seed: number) => {
  let a = seed >>> 0
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  const int = (n: number) => Math.floor(next() * n)
  const pick = <A>(xs: ReadonlyArray<A>): A => xs[int(xs.length)]!
  return { next, int, pick }
}
export type Rng = ReturnType<typeof prng>

/** 32-bit values worth trying in a length, count or flags field. */
export const INTERESTING_U32 = [0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0xfff, 0x1000, 0x1001, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff]

/** A mutation applied to a copy of `bytes` at a position in [from, to): what it did, and the result. */
export interface Mutated {
  readonly bytes: Buffer
  readonly what: string
}

/** One generic mutation of `bytes`, positions drawn in [from, to) (a region of interest). */
export const mutateBytes = (rng: Rng, bytes: Uint8Array, from = 0, to = bytes.length): Mutated => {
  const out = Buffer.from(bytes)
  const at = from + rng.int(Math.max(1, to - from))
  switch (rng.int(9)) {
    case 0: {
      const bit = rng.int(8)
      out[at] = out[at]! ^ (1 << bit)
      return { bytes: out, what: `flip bit ${bit} at ${at}` }
    }
    case 1: {
      const value = rng.pick([0, 0xff, 0x7f, 0x80, rng.int(256)])
      out[at] = value
      return { bytes: out, what: `byte ${at} = 0x${value.toString(16)}` }
    }
    case 2: {
      const p = Math.min(at - (at % 4), out.length - 4)
      if (p < 0) return { bytes: out.subarray(0, 0), what: "emptied" }
      const old = out.readUInt32BE(p)
      const value = rng.pick([...INTERESTING_U32, old + 1, old - 1, old * 2].map((v) => v >>> 0))
      out.writeUInt32BE(value, p)
      return { bytes: out, what: `u32 at ${p}: 0x${old.toString(16)} -> 0x${value.toString(16)}` }
    }
    case 3: {
      const p = Math.min(at - (at % 8), out.length - 8)
      if (p < 0) return { bytes: out.subarray(0, 0), what: "emptied" }
      const old = out.readBigUInt64BE(p)
      const value = rng.pick([0n, 1n, 0xfffffffffffffffn, 0xffffffffffffffffn, old + 1n, old + 4096n, old * 2n, 1n << 32n, 1n << 63n]) &
        0xffffffffffffffffn
      out.writeBigUInt64BE(value, p)
      return { bytes: out, what: `u64 at ${p}: ${old} -> ${value}` }
    }
    case 4:
      return { bytes: out.subarray(0, at), what: `truncated at ${at}` }
    case 5: {
      const length = 1 + rng.int(Math.min(2048, out.length - at))
      return { bytes: Buffer.concat([out.subarray(0, at), out.subarray(at + length)]), what: `deleted ${length} at ${at}` }
    }
    case 6: {
      const length = 1 + rng.int(Math.min(2048, out.length - at))
      const piece = out.subarray(at, at + length)
      return { bytes: Buffer.concat([out.subarray(0, at), piece, piece, out.subarray(at + length)]), what: `duplicated ${length} at ${at}` }
    }
    case 7: {
      const length = 1 + rng.int(64)
      const junk = Buffer.alloc(length)
      for (let i = 0; i < length; i++) junk[i] = rng.int(256)
      return { bytes: Buffer.concat([out.subarray(0, at), junk, out.subarray(at)]), what: `inserted ${length} random at ${at}` }
    }
    default: {
      const n = 2 + rng.int(8)
      for (let i = 0; i < n; i++) {
        const p = from + rng.int(Math.max(1, to - from))
        if (p < out.length) out[p] = rng.int(256)
      }
      return { bytes: out, what: `${n} random bytes in [${from}, ${to})` }
    }
  }
}

/** Node's or V8's words, or JavaScript's values, that must never reach a user's message. */
const INTERNALS = [
  /undefined/,
  /\[object /,
  /\bNaN\b/,
  /RangeError|TypeError|ReferenceError|SyntaxError/,
  /Cannot read propert/,
  /out of bounds/i,
  /is not a function/,
  /ERR_[A-Z_]+/,
  /\bat .*\.(ts|js):\d+/
]

/** What is wrong with a failed exit (a defect, an interruption only, a message that is not one clean line). */
export const judgeFailure = (exit: Exit.Exit<unknown, unknown>): string | undefined => {
  if (Exit.isSuccess(exit)) return undefined
  const defects = Cause.defects(exit.cause)
  if (defects.length > 0) return `defect: ${Cause.pretty(exit.cause)}`
  const failure = Cause.failureOption(exit.cause)
  if (Option.isNone(failure)) return `no typed failure: ${Cause.pretty(exit.cause)}`
  const error = failure.value as { readonly message?: unknown; readonly _tag?: unknown }
  if (typeof error._tag !== "string") return `untagged failure: ${String(error)}`
  const message = error.message
  if (typeof message !== "string" || message.length === 0) return `${error._tag}: no message`
  if (message.includes("\n")) return `${error._tag}: message of several lines: ${JSON.stringify(message)}`
  for (const pattern of INTERNALS) if (pattern.test(message)) return `${error._tag}: internals in message: ${message}`
  return undefined
}

/** The message of an exit's typed failure, or `success`. */
export const describeExit = (exit: Exit.Exit<unknown, unknown>): string => {
  if (Exit.isSuccess(exit)) return "success"
  const failure = Cause.failureOption(exit.cause)
  if (Option.isNone(failure)) return Cause.pretty(exit.cause).split("\n")[0]!
  const error = failure.value as { readonly message?: unknown; readonly _tag?: unknown }
  return `${String(error._tag)}: ${String(error.message)}`
}

/** One recorded connection: what the client sent and what the server answered. */
export interface Recorded {
  readonly up: Buffer
  readonly down: Buffer
}

/**
 * A recording TCP proxy to `target`: forwards every connection both ways unchanged (half-closes included) and
 * keeps its bytes. `recorded()` lists the connections in the order they were accepted.
 */
export const recordingProxy = (target: Transport.Address) =>
  Effect.gen(function*() {
    const connections: Array<{ up: Array<Buffer>; down: Array<Buffer> }> = []
    const port = target._tag === "Tcp" ? target.port : 0
    const { address } = yield* loopbackServer((client, track) => {
      const record = { up: [] as Array<Buffer>, down: [] as Array<Buffer> }
      connections.push(record)
      const upstream = Net.connect({ host: "127.0.0.1", port, allowHalfOpen: true })
      track(upstream)
      const pipe = (from: Net.Socket, to: Net.Socket, into: Array<Buffer>) => {
        from.on("data", (chunk: Buffer) => {
          into.push(Buffer.from(chunk))
          to.write(chunk)
        })
        from.on("end", () => to.end())
        from.on("error", () => to.destroy())
        from.on("close", () => {
          if (!to.writableEnded) to.destroy()
        })
      }
      pipe(client, upstream, record.up)
      pipe(upstream, client, record.down)
    }, { allowHalfOpen: true })
    const recorded = (): ReadonlyArray<Recorded> => connections.map((c) => ({ up: Buffer.concat(c.up), down: Buffer.concat(c.down) }))
    return { address, recorded }
  })

/** The frames of a control stream (u32 length, JSON), after `skip` bytes (the magic); a tail that is no frame is kept. */
export const controlFrames = (stream: Uint8Array, skip: number): { readonly head: Buffer; readonly frames: Array<Buffer>; readonly tail: Buffer } => {
  const bytes = Buffer.from(stream)
  const frames: Array<Buffer> = []
  let at = skip
  while (at + 4 <= bytes.length && at + 4 + bytes.readUInt32BE(at) <= bytes.length) {
    const length = bytes.readUInt32BE(at)
    frames.push(bytes.subarray(at + 4, at + 4 + length))
    at += 4 + length
  }
  return { head: bytes.subarray(0, skip), frames, tail: bytes.subarray(at) }
}

/** Frames back into a stream, each with its (correct) length. */
export const joinFrames = (head: Buffer, frames: ReadonlyArray<Buffer>, tail: Buffer = Buffer.alloc(0)): Buffer =>
  Buffer.concat([
    head,
    ...frames.flatMap((body) => {
      const length = Buffer.alloc(4)
      length.writeUInt32BE(body.length, 0)
      return [length, body]
    }),
    tail
  ])

/** JSON values worth trying in a control message's field. */
const interestingValue = (rng: Rng): unknown =>
  rng.pick<() => unknown>([
    () => 0,
    () => -1,
    () => 1,
    () => 0.5,
    () => 2 ** 31,
    () => 2 ** 32 + 1,
    () => 2 ** 53 + 2,
    () => 1e300,
    () => -0,
    () => 4097,
    () => 3,
    () => 256,
    () => "",
    () => "x".repeat(1 + rng.int(600)),
    () => "a\u0000b",
    () => "\u001b[2J\u0007",
    () => "../../etc/passwd",
    () => "mem",
    () => null,
    () => true,
    () => [],
    () => ({}),
    () => [{ name: "pc.ram", size: 4096 }, { name: "pc.ram", size: 4096 }],
    () => [{ name: "", size: 0 }],
    () => [{ name: "b", size: 4095 }],
    () => [{ name: "x".repeat(300), size: 4096 }],
    () => "none",
    () => "zstd"
  ])()

/** Every path to a value inside `json` (keys and indices). */
const pathsOf = (json: unknown, prefix: ReadonlyArray<string | number> = []): Array<ReadonlyArray<string | number>> => {
  if (typeof json !== "object" || json === null) return [prefix]
  const children = Array.isArray(json) ? json.map((v, i) => [i, v] as const) : Object.entries(json)
  return [prefix, ...children.flatMap(([k, v]) => pathsOf(v, [...prefix, k]))]
}

/** One change to one frame's JSON: a field set to an interesting value, removed, or the tag changed. */
export const mutateJsonFrame = (rng: Rng, body: Buffer): { readonly body: Buffer; readonly what: string } => {
  let json: unknown
  try {
    json = JSON.parse(body.toString("utf8"))
  } catch {
    return { body, what: "frame not JSON: unchanged" }
  }
  const paths = pathsOf(json).filter((p) => p.length > 0)
  if (paths.length === 0) return { body, what: "frame without fields: unchanged" }
  const path = rng.pick(paths)
  const op = rng.int(6)
  let parent: any = json
  for (const key of path.slice(0, -1)) parent = parent[key]
  const last = path[path.length - 1]!
  let what: string
  if (op === 0 && path.length > 0) {
    if (Array.isArray(parent)) parent.splice(Number(last), 1)
    else delete parent[last]
    what = `removed ${path.join(".")}`
  } else if (op === 1 && path[0] === "_tag") {
    const tag = rng.pick(["Hello", "Accept", "Reject", "Flush", "FlushAck", "Receiving", "Hashing", "Complete", "Storing", "Done", "Abort", "Reattach", "Reattached", "Lost", "Nope", "__proto__", "constructor", "toString"])
    parent[last] = tag
    what = `_tag -> ${tag}`
  } else {
    const value = interestingValue(rng)
    parent[last] = value
    what = `${path.join(".")} -> ${JSON.stringify(value)?.slice(0, 40)}`
  }
  return { body: Buffer.from(JSON.stringify(json), "utf8"), what }
}
