/**
 * The main (control) channel: a 4-byte magic, then length-prefixed JSON messages defined and validated
 * with `effect/Schema`. The destination answers on the same connection (a return path QEMU's precopy lacks).
 *
 * A conversation: `Hello` → `Accept` | `Reject`; per round `Flush` → `Receiving`* → `FlushAck`; `Hashing`* →
 * `Complete` (digests) → `Hashing`* → `Storing`* → `Done` | `Abort`. `Done` is the destination's promise that the migration is finished on its
 * side: the digests matched *and*, when the destination has a store step (an image file it writes), the
 * memory is durably stored there. Until `Done` the source must not report success; until the source ended the main
 * channel after it (its channels first), neither may the destination. `Abort` either way ends the migration with a
 * reason.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"
import * as PeerText from "./internal/peerText.js"
import { Channels, ProtocolError } from "./Protocol.js"
import type * as Transport from "./Transport.js"

/**
 * First bytes of a control connection: "EMFC" (effect-multifd control).
 *
 * @since 0.1.0
 * @category constants
 */
export const MAGIC = 0x454d4643

/**
 * Version of the control protocol. A hello of another version is refused (`Reject`), never guessed at.
 *
 * 2: `Done` means "verified and stored"; `Storing` keeps the source waiting while the destination stores the
 * memory; `Abort` may say that the store step failed.
 *
 * @since 0.1.0
 * @category constants
 */
export const VERSION = 2

/**
 * Largest control frame accepted (the hello of 255 blocks with long names fits easily).
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_FRAME = 1024 * 1024

const Block = Schema.Struct({
  name: Schema.String,
  size: Schema.Number.pipe(Schema.int(), Schema.nonNegative())
})

const Digest = Schema.Struct({ name: Schema.String, digest: Schema.String })

/**
 * Source → destination: who we are and what is coming.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Hello extends Schema.TaggedClass<Hello>()("Hello", {
  version: Schema.Number,
  uuid: Schema.String,
  pageSize: Schema.Number.pipe(Schema.int(), Schema.positive()),
  channels: Channels,
  compression: Schema.Literal("none", "zlib", "zstd"),
  zeroPage: Schema.Literal("multifd", "none"),
  blocks: Schema.Array(Block),
  /**
   * The source re-attaches a multifd channel whose connection broke (`Reattach`): the destination keeps a
   * lost channel's place this many milliseconds. Absent: a lost channel fails the migration.
   */
  reconnectMs: Schema.optional(Schema.Number.pipe(Schema.nonNegative())),
  /**
   * The source understands the destination's heartbeats, which say that a wait is work, not a dead peer:
   * `Receiving` while a round's last bytes still arrive (on a slow link the kernels' buffers alone may take
   * longer than the peer timeout to drain) and `Hashing` while it hashes the memory for the digests. Absent (an
   * older source): the destination sends neither.
   */
  heartbeats: Schema.optional(Schema.Boolean),
  /**
   * The source's channels wait for a bandwidth limit before their packets: one of them may be quiet between
   * packets for long while the others have finished the round. Absent: a channel quiet between packets while
   * another waits at the round's sync has a path that went silent (with `reconnectMs`, it is re-attached).
   */
  paced: Schema.optional(Schema.Boolean),
  /**
   * The source ends a migration it succeeded at with `Bye` (it heard Done and ended its channels) before it ends
   * the main channel: the destination succeeds only once `Bye` came, not on the main channel's end alone, which a
   * broken path delivers too (a tunnel or proxy ends a connection gracefully when its other side broke). Absent
   * (an older source): the end after Done is the source's.
   */
  bye: Schema.optional(Schema.Boolean)
}) {}

/**
 * Destination → source: the layout fits, channels may connect.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Accept extends Schema.TaggedClass<Accept>()("Accept", {
  /** The destination understands the source's `Hashing` (absent: an older destination, which is sent none). */
  heartbeats: Schema.optional(Schema.Boolean),
  /** The destination understands the source's `Bye` (absent: an older destination, which is sent none). */
  bye: Schema.optional(Schema.Boolean)
}) {}

/**
 * Destination → source: the migration is refused, with the reason.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Reject extends Schema.TaggedClass<Reject>()("Reject", { reason: Schema.String }) {}

/**
 * Source → destination: every channel has sent its SYNC for this round.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Flush extends Schema.TaggedClass<Flush>()("Flush", {
  round: Schema.Number,
  /** The switch-over's flush: no page follows it (the destination may start its digest). */
  final: Schema.optionalWith(Schema.Boolean, { default: () => false })
}) {}

/**
 * Destination → source: every channel reached the round's barrier; all its pages are in memory.
 *
 * @since 0.1.0
 * @category schemas
 */
export class FlushAck extends Schema.TaggedClass<FlushAck>()("FlushAck", { round: Schema.Number }) {}

/**
 * Destination → source: `bytes` have arrived on the multifd channels so far (`round`: the rounds it has
 * acknowledged). Sent all through the rounds, about every second while that count grows (never when it does
 * not), to a source whose hello asked for heartbeats: bytes reaching the destination are the source's
 * progress too (on a slow link the kernels' buffers hide its own writes from it for seconds, and hold a
 * round's last bytes after it wrote them), so a slow link is told apart from a dead one.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Receiving extends Schema.TaggedClass<Receiving>()("Receiving", {
  round: Schema.Number.pipe(Schema.int(), Schema.nonNegative()),
  bytes: Schema.Number.pipe(Schema.nonNegative())
}) {}

/**
 * Either side → the other: still hashing the memory for the digests, sent about every second while it does,
 * and only to a peer that said it understands heartbeats (`Hello.heartbeats`, `Accept.heartbeats`): hashing
 * runs at a few GiB a second, so a large memory takes longer than the peer timeout, which then bounds the
 * silence between two messages rather than the whole digest.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Hashing extends Schema.TaggedClass<Hashing>()("Hashing", {}) {}

/**
 * Source → destination: nothing more to send; the source's per-block digests.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Complete extends Schema.TaggedClass<Complete>()("Complete", { digests: Schema.Array(Digest) }) {}

/**
 * Destination → source: the digests matched and the destination is storing the memory (writing, syncing,
 * renaming its image). Sent when the store step starts and then about every second until it ends, so that
 * a long write is told apart from a dead destination: the source's peer timeout bounds the silence between
 * two messages, not the whole store.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Storing extends Schema.TaggedClass<Storing>()("Storing", {}) {}

/**
 * Destination → source: the migration is finished and durable on the destination — the digests matched and,
 * if the destination has a store step, the memory is stored (written, flushed to disk, in place). The source
 * reports success only after it.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Done extends Schema.TaggedClass<Done>()("Done", {}) {}

/**
 * Source → destination, the last message of a migration: the source heard `Done`, ended its multifd channels and
 * reports success; the main channel's end follows. Only a hello with `bye` promises it, and only to a destination
 * whose `Accept` said `bye` (an older one would take it for garbage after its Done).
 *
 * @since 0.1.0
 * @category schemas
 */
export class Bye extends Schema.TaggedClass<Bye>()("Bye", {}) {}

/**
 * Either way: the sender gives up, with the reason. `step: "store"` (destination → source): the memory
 * arrived and verified, but the destination could not store it (it is not durably in place).
 *
 * @since 0.1.0
 * @category schemas
 */
export class Abort extends Schema.TaggedClass<Abort>()("Abort", {
  reason: Schema.String,
  step: Schema.optional(Schema.Literal("store")),
  /**
   * Destination → source: what the destination found, when it is a verdict on the memory rather than a giving up
   * (`DigestMismatch`: the pages arrived and do not hash to the source's digests). A field of its own, so that a peer
   * that does not know it still reads the abort (a field it does not know is ignored; a new `step` would not decode).
   */
  found: Schema.optional(Schema.Literal("DigestMismatch"))
}) {}

/**
 * Source → destination: multifd channel `channel` lost its connection and re-attaches; its next init packet
 * carries `nonce` (32 hex digits). Only a hello with `reconnectMs` allows it.
 *
 * @since 0.1.0
 * @category schemas
 */
export class Reattach extends Schema.TaggedClass<Reattach>()("Reattach", {
  channel: Schema.Number.pipe(Schema.int(), Schema.nonNegative()),
  nonce: Schema.String.pipe(Schema.pattern(/^[0-9a-f]{32}$/))
}) {}

/**
 * Destination → source: the lost connection of `channel` is stopped (what it was inside of dropped) and a
 * connection with the announced nonce may take its place; `syncs` SYNC packets of the channel arrived so far
 * (the source resends what followed the last of them).
 *
 * @since 0.1.0
 * @category schemas
 */
export class Reattached extends Schema.TaggedClass<Reattached>()("Reattached", {
  channel: Schema.Number.pipe(Schema.int(), Schema.nonNegative()),
  syncs: Schema.Number.pipe(Schema.int(), Schema.nonNegative())
}) {}

/**
 * Destination → source: the connection of multifd channel `channel` (the one that re-attached with `nonce`, or
 * its first) broke; it keeps its place for a new one. The source may not have noticed (nothing to write).
 *
 * @since 0.1.0
 * @category schemas
 */
export class Lost extends Schema.TaggedClass<Lost>()("Lost", {
  channel: Schema.Number.pipe(Schema.int(), Schema.nonNegative()),
  nonce: Schema.optional(Schema.String.pipe(Schema.pattern(/^[0-9a-f]{32}$/)))
}) {}

/**
 * Every control message.
 *
 * @since 0.1.0
 * @category schemas
 */
export const Message = Schema.Union(
  Hello,
  Accept,
  Reject,
  Flush,
  FlushAck,
  Receiving,
  Hashing,
  Complete,
  Storing,
  Done,
  Bye,
  Abort,
  Reattach,
  Reattached,
  Lost
)

/**
 * A control message.
 *
 * @since 0.1.0
 * @category models
 */
export type Message = Schema.Schema.Type<typeof Message>

const encodeJson = Schema.encodeSync(Schema.parseJson(Message))

/** One decoder per message tag: a bad message is described by its own schema, not by the whole union's. */
const decoders: Readonly<Record<string, (u: unknown) => Either.Either<Message, ParseResult.ParseError>>> = Object
  .fromEntries(
    [Hello, Accept, Reject, Flush, FlushAck, Receiving, Hashing, Complete, Storing, Done, Bye, Abort, Reattach, Reattached, Lost].map((
      schema
    ) => [
      schema._tag,
      Schema.decodeUnknownEither(schema as Schema.Schema<Message, unknown>)
    ])
  )

/** A message that is not one, saying why (in the peer's words at most 300 characters of them, escaped). */
const badMessage = (detail: string) =>
  new ProtocolError({ reason: "BadMessage", channel: "main", field: "control message", detail: PeerText.fromPeer(detail) })

/** The first issue of a parse error, on one line: `["blocks"][0]["size"]: Expected a non-negative number...`. */
const firstIssue = (error: ParseResult.ParseError): string => {
  let issue: ParseResult.ArrayFormatterIssue | undefined
  try {
    issue = ParseResult.ArrayFormatter.formatErrorSync(error)[0]
  } catch {
    // printing the peer's value failed (it is the peer's to make unprintable): say that much
    return "invalid"
  }
  if (issue === undefined) return "invalid"
  const path = issue.path.map((key) => `[${JSON.stringify(key)}]`).join("")
  return `${path}${path.length > 0 ? ": " : ""}${issue.message}`.replace(/\s+/g, " ")
}

/**
 * Encodes a message as one frame: u32 big-endian length, then JSON.
 *
 * @since 0.1.0
 * @category encoding
 */
export const encode = (message: Message): Buffer => {
  const body = Buffer.from(encodeJson(message), "utf8")
  const frame = Buffer.allocUnsafe(4 + body.length)
  frame.writeUInt32BE(body.length, 0)
  body.copy(frame, 4)
  return frame
}

/**
 * Decodes a frame body: JSON of one of the messages.
 *
 * @since 0.1.0
 * @category decoding
 */
export const decode = (body: Uint8Array): Either.Either<Message, ProtocolError> => {
  let json: unknown
  try {
    json = JSON.parse(Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString("utf8"))
  } catch (error) {
    return Either.left(badMessage(`not JSON (${error instanceof Error ? error.message : String(error)})`))
  }
  // no message nests deeper; a peer's deeper value would only be walked (and printed) recursively
  if (depthOf(json, MAX_DEPTH) > MAX_DEPTH) return Either.left(badMessage(`nested more than ${MAX_DEPTH} levels deep`))
  const tag = typeof json === "object" && json !== null ? (json as { readonly _tag?: unknown })._tag : undefined
  if (typeof tag !== "string") return Either.left(badMessage("not a control message (no _tag)"))
  const decoder = Object.hasOwn(decoders, tag) ? decoders[tag] : undefined
  if (decoder === undefined) return Either.left(badMessage(`unknown message "${tag}"`))
  return Either.mapLeft(decoder(json), (e) => badMessage(`${tag}: ${firstIssue(e)}`))
}

/** Deepest nesting of arrays and objects a control message may have (a hello has 3). */
const MAX_DEPTH = 16

/** How deep `value` nests arrays and objects, counted without recursion and only up to just past `limit`. */
const depthOf = (value: unknown, limit: number): number => {
  let deepest = 0
  const stack: Array<readonly [unknown, number]> = [[value, 0]]
  while (stack.length > 0) {
    const [item, depth] = stack.pop()!
    if (typeof item !== "object" || item === null) continue
    if (depth + 1 > deepest) deepest = depth + 1
    if (deepest > limit) return deepest
    for (const child of Object.values(item)) stack.push([child, depth + 1])
  }
  return deepest
}

const magicBytes = Buffer.alloc(4)
magicBytes.writeUInt32BE(MAGIC, 0)

/**
 * Writes the control magic that opens the connection.
 *
 * @since 0.1.0
 * @category encoding
 */
export const writeMagic = (connection: Transport.Connection): Effect.Effect<void, Transport.TransportError> =>
  connection.write([magicBytes])

/**
 * Sends one message.
 *
 * @since 0.1.0
 * @category utils
 */
export const send = (
  connection: Transport.Connection,
  message: Message
): Effect.Effect<void, Transport.TransportError> => connection.write([encode(message)])

/**
 * Why a message could not be received.
 *
 * @since 0.1.0
 * @category errors
 */
export type ReceiveError = Transport.TransportError | ProtocolError

/**
 * Receives one message, validating its length and shape. `inFrame`, when given, is told the length of the frame
 * whose body is being read once its header came, and `undefined` once the body came: a peer that falls silent
 * inside a frame (its length corrupted on the way, a frame cut short) can then be described as such.
 *
 * @since 0.1.0
 * @category utils
 */
export const receive = (
  connection: Transport.Connection,
  inFrame?: (length: number | undefined) => void
): Effect.Effect<Message, ReceiveError> =>
  Effect.gen(function*() {
    const header = yield* connection.read(4)
    const length = header.readUInt32BE(0)
    if (length > MAX_FRAME) {
      // text where a length belongs (a peer of another protocol: "SSH-", "HTTP") is shown as such
      const text = /^[\x20-\x7e]{4}$/.test(header.toString("latin1")) ? ` (${JSON.stringify(header.toString("latin1"))} as text)` : ""
      return yield* badMessage(`frame of ${length} bytes${text} exceeds ${MAX_FRAME}`)
    }
    inFrame?.(length)
    const body = yield* connection.read(length)
    inFrame?.(undefined)
    return yield* decode(body)
  })
