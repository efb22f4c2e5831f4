/**
 * The main (control) channel: a 4-byte magic, then length-prefixed JSON messages defined and validated
 * with `effect/Schema`. The destination answers on the same connection (a return path QEMU's precopy lacks).
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"
import { ProtocolError } from "./Protocol.js"
import type * as Transport from "./Transport.js"

/** First bytes of a control connection: "EMFC" (effect-multifd control). */
export const MAGIC = 0x454d4643

/** Version of the control protocol. */
export const VERSION = 1

/** Largest control frame accepted (the hello of 255 blocks with long names fits easily). */
export const MAX_FRAME = 1024 * 1024

const Block = Schema.Struct({
  name: Schema.String,
  size: Schema.Number.pipe(Schema.int(), Schema.nonNegative())
})

const Digest = Schema.Struct({ name: Schema.String, digest: Schema.String })

/** Source → destination: who we are and what is coming. */
export class Hello extends Schema.TaggedClass<Hello>()("Hello", {
  version: Schema.Number,
  uuid: Schema.String,
  pageSize: Schema.Number.pipe(Schema.int(), Schema.positive()),
  channels: Schema.Number.pipe(Schema.int(), Schema.between(1, 255)),
  compression: Schema.Literal("none", "zlib", "zstd"),
  zeroPage: Schema.Literal("multifd", "none"),
  blocks: Schema.Array(Block)
}) {}

/** Destination → source: the layout fits, channels may connect. */
export class Accept extends Schema.TaggedClass<Accept>()("Accept", {}) {}

/** Destination → source: the migration is refused, with the reason. */
export class Reject extends Schema.TaggedClass<Reject>()("Reject", { reason: Schema.String }) {}

/** Source → destination: every channel has sent its SYNC for this round. */
export class Flush extends Schema.TaggedClass<Flush>()("Flush", {
  round: Schema.Number,
  /** The switch-over's flush: no page follows it (the destination may start its digest). */
  final: Schema.optionalWith(Schema.Boolean, { default: () => false })
}) {}

/** Destination → source: every channel reached the round's barrier; all its pages are in memory. */
export class FlushAck extends Schema.TaggedClass<FlushAck>()("FlushAck", { round: Schema.Number }) {}

/** Source → destination: nothing more to send; the source's per-block digests. */
export class Complete extends Schema.TaggedClass<Complete>()("Complete", { digests: Schema.Array(Digest) }) {}

/** Destination → source: the digests matched; the destination has everything. */
export class Done extends Schema.TaggedClass<Done>()("Done", {}) {}

/** Either way: the sender gives up, with the reason. */
export class Abort extends Schema.TaggedClass<Abort>()("Abort", { reason: Schema.String }) {}

/** Every control message. */
export const Message = Schema.Union(Hello, Accept, Reject, Flush, FlushAck, Complete, Done, Abort)

/** A control message. */
export type Message = Schema.Schema.Type<typeof Message>

const decodeJson = Schema.decodeUnknownEither(Schema.parseJson(Message))
const encodeJson = Schema.encodeSync(Schema.parseJson(Message))

const badMessage = (detail: string) =>
  new ProtocolError({ reason: "BadMessage", channel: "main", field: "control message", detail })

/** Encodes a message as one frame: u32 big-endian length, then JSON. */
export const encode = (message: Message): Buffer => {
  const body = Buffer.from(encodeJson(message), "utf8")
  const frame = Buffer.allocUnsafe(4 + body.length)
  frame.writeUInt32BE(body.length, 0)
  body.copy(frame, 4)
  return frame
}

/** Decodes a frame body. */
export const decode = (body: Uint8Array): Either.Either<Message, ProtocolError> =>
  decodeJson(Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString("utf8")).pipe(
    Either.mapLeft((e) => badMessage(ParseResult.TreeFormatter.formatErrorSync(e).replace(/\s+/g, " ")))
  )

const magicBytes = Buffer.alloc(4)
magicBytes.writeUInt32BE(MAGIC, 0)

/** Writes the control magic that opens the connection. */
export const writeMagic = (connection: Transport.Connection): Effect.Effect<void, Transport.TransportError> =>
  connection.write([magicBytes])

/** Sends one message. */
export const send = (
  connection: Transport.Connection,
  message: Message
): Effect.Effect<void, Transport.TransportError> => connection.write([encode(message)])

/** Why a message could not be received. */
export type ReceiveError = Transport.TransportError | ProtocolError

/** Receives one message, validating its length and shape. */
export const receive = (connection: Transport.Connection): Effect.Effect<Message, ReceiveError> =>
  Effect.gen(function*() {
    const length = (yield* connection.read(4)).readUInt32BE(0)
    if (length > MAX_FRAME) {
      return yield* badMessage(`frame of ${length} bytes exceeds ${MAX_FRAME}`)
    }
    return yield* decode(yield* connection.read(length))
  })
