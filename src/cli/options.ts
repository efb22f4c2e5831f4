/**
 * The command line of `multifd`: the uri argument and the option groups. Each group is one
 * `Options.all({...})`, so a command is `{ uri, file, transfer, ..., output }` and a new concern (TLS) is one
 * more group added to both commands.
 *
 * Values are validated here, while parsing: @effect/cli prints the problem and the command exits 2.
 *
 * @since 0.1.0
 */
import * as Args from "@effect/cli/Args"
import * as HelpDoc from "@effect/cli/HelpDoc"
import * as Options from "@effect/cli/Options"
import * as ValidationError from "@effect/cli/ValidationError"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import type * as Option from "effect/Option"
import * as GuestRam from "../GuestRam.js"
import type * as Protocol from "../Protocol.js"
import * as Transport from "../Transport.js"

// ---------------------------------------------------------------------------------------------------------
// Parsers (pure, exported for tests)

/** Channels a migration may use. */
export const MIN_CHANNELS = 1
export const MAX_CHANNELS = 255

/** Smallest and largest page size the library accepts (a power of two in between). */
export const MIN_PAGE_SIZE = 512
export const MAX_PAGE_SIZE = 512 * 1024

/** Why a channel count is unusable, if it is. */
export const checkChannels = (n: number): string | undefined =>
  Number.isInteger(n) && n >= MIN_CHANNELS && n <= MAX_CHANNELS
    ? undefined
    : `--channels must be between ${MIN_CHANNELS} and ${MAX_CHANNELS}, not ${n}`

/** Why a page size is unusable, if it is. */
export const checkPageSize = (n: number): string | undefined =>
  Number.isInteger(n) && n >= MIN_PAGE_SIZE && n <= MAX_PAGE_SIZE && (n & (n - 1)) === 0
    ? undefined
    : `--page-size must be a power of two between ${MIN_PAGE_SIZE} and ${MAX_PAGE_SIZE}, not ${n}`

const DURATION = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/

/** Parses `30s`, `500ms`, `2m`, `1h` or a plain number of seconds; must be positive. */
export const parseDuration = (text: string): Either.Either<Duration.Duration, string> => {
  const m = DURATION.exec(text.trim())
  const value = m === null ? NaN : Number(m[1])
  if (m === null || !Number.isFinite(value) || value <= 0) {
    return Either.left(`--timeout: ${JSON.stringify(text)} is not a positive duration like 30s, 500ms, 2m or 1h`)
  }
  switch (m[2]) {
    case "ms":
      return Either.right(Duration.millis(value))
    case "m":
      return Either.right(Duration.minutes(value))
    case "h":
      return Either.right(Duration.hours(value))
    default:
      return Either.right(Duration.seconds(value))
  }
}

const invalid = (message: string) => ValidationError.invalidValue(HelpDoc.p(message))

const check = <A>(problem: (a: A) => string | undefined) => (a: A) => {
  const why = problem(a)
  return why === undefined ? Effect.succeed(a) : Effect.fail(invalid(why))
}

// ---------------------------------------------------------------------------------------------------------
// Argument

/** Where to connect (send) or listen (recv). */
export const uri: Args.Args<Transport.Address> = Args.text({ name: "uri" }).pipe(
  Args.withDescription("tcp:HOST:PORT (IPv6 as tcp:[::1]:PORT; recv may use port 0) or unix:PATH"),
  Args.mapEffect((text) =>
    Either.match(Transport.parseAddress(text), {
      onLeft: (error) => Effect.fail(HelpDoc.p(`bad uri: ${error.message}`)),
      onRight: Effect.succeed
    })
  )
)

// ---------------------------------------------------------------------------------------------------------
// Files

/** The image to migrate. */
export const input = Options.file("in").pipe(
  Options.withDescription("The RAM image to migrate: a file whose size is a positive multiple of --page-size.")
)

/** Where to write the received image. */
export const output = Options.file("out").pipe(
  Options.withDescription(
    "Where to write the received RAM image (the blocks concatenated in order; an existing file is replaced). " +
      "It is written to a temporary file beside it and renamed only after the migration succeeded and its " +
      "digests verified; on failure nothing is left."
  )
)

// ---------------------------------------------------------------------------------------------------------
// Transfer

const channelsOption = (description: string) =>
  Options.integer("channels").pipe(
    Options.withPseudoName("N"),
    Options.withDescription(description),
    Options.mapEffect(check(checkChannels))
  )

const pageSizeOption = (description: string) =>
  Options.integer("page-size").pipe(
    Options.withPseudoName("BYTES"),
    Options.withDescription(description),
    Options.mapEffect(check(checkPageSize))
  )

const compressionOption = (description: string) =>
  Options.choice("compression", ["none", "zlib", "zstd"] as const).pipe(Options.withDescription(description))

const CHANNELS = `Parallel multifd channels, ${MIN_CHANNELS}-${MAX_CHANNELS}`
const PAGE_SIZE = `Page size in bytes: a power of two, ${MIN_PAGE_SIZE}-${MAX_PAGE_SIZE}`
const COMPRESSION = "Compression of page data on the multifd channels"

/** Transfer settings of the source. */
export interface SendTransfer {
  readonly channels: number
  readonly pageSize: number
  readonly compression: Protocol.Compression
  readonly compressionLevel: Option.Option<number>
  readonly zeroPage: "multifd" | "none"
}

/** Transfer settings of the source, with their defaults. */
export const sendTransfer: Options.Options<SendTransfer> = Options.all({
  channels: channelsOption(`${CHANNELS} (default 2).`).pipe(Options.withDefault(2)),
  pageSize: pageSizeOption(`${PAGE_SIZE} (default ${GuestRam.DEFAULT_PAGE_SIZE}).`).pipe(Options.withDefault(GuestRam.DEFAULT_PAGE_SIZE)),
  compression: compressionOption(`${COMPRESSION} (default none).`).pipe(Options.withDefault("none" as const)),
  compressionLevel: Options.integer("compression-level").pipe(
    Options.withPseudoName("N"),
    Options.withDescription("Compression level: zlib 0-9 (default 1), zstd 0-20 (default 1); ignored without compression."),
    Options.optional
  ),
  zeroPage: Options.choice("zero-page", ["multifd", "none"] as const).pipe(
    Options.withDescription("multifd: zero pages travel as offsets only; none: as data (default multifd)."),
    Options.withDefault("multifd" as const)
  )
})

/**
 * Transfer settings on the destination: the source decides them (its hello carries them). Values given here
 * are expectations, checked against what the source used.
 */
export interface RecvTransfer {
  readonly channels: Option.Option<number>
  readonly pageSize: Option.Option<number>
  readonly compression: Option.Option<Protocol.Compression>
}

const followsSource = " On recv the source decides; when given, the source must agree, else recv fails and writes nothing."

/** Transfer settings on the destination, all optional. */
export const recvTransfer: Options.Options<RecvTransfer> = Options.all({
  channels: channelsOption(`${CHANNELS}.${followsSource}`).pipe(Options.optional),
  pageSize: pageSizeOption(`${PAGE_SIZE}.${followsSource}`).pipe(Options.optional),
  compression: compressionOption(`${COMPRESSION}.${followsSource}`).pipe(Options.optional)
})

// ---------------------------------------------------------------------------------------------------------
// Timing

/** How long to wait on the peer. */
export interface Timing {
  readonly timeout: Option.Option<Duration.Duration>
}

/** Timing settings shared by both commands. */
export const timing: Options.Options<Timing> = Options.all({
  timeout: Options.text("timeout").pipe(
    Options.withPseudoName("DURATION"),
    Options.withDescription(
      "Give up when the peer does not answer, or no data moves, for this long; send also when connecting takes " +
        "longer. 30s, 500ms, 2m, 1h or plain seconds (default 30s; connecting 10s). recv waits for a source " +
        "for ever."
    ),
    Options.mapEffect((text) =>
      Either.match(parseDuration(text), { onLeft: (why) => Effect.fail(invalid(why)), onRight: Effect.succeed })
    ),
    Options.optional
  )
})

// ---------------------------------------------------------------------------------------------------------
// Reporting

/** How the result is reported. */
export interface Reporting {
  readonly json: boolean
}

/** Reporting settings shared by both commands. */
export const reporting: Options.Options<Reporting> = Options.all({
  json: Options.boolean("json").pipe(
    Options.withDescription("Print the final statistics as one JSON object on stdout (instead of a summary on stderr).")
  )
})
