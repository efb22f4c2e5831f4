/**
 * `multifd send <uri> --in <file>`: migrates an image file to a destination.
 *
 * @since 0.1.0
 */
import * as Command from "@effect/cli/Command"
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"
import * as GuestRam from "../GuestRam.js"
import * as Migration from "../Migration.js"
import * as Transport from "../Transport.js"
import { UsageError } from "./errors.js"
import * as Image from "./image.js"
import * as Options from "./options.js"
import * as Progress from "./progress.js"
import * as Report from "./report.js"

/** The name of the one block an image file becomes. */
export const BLOCK_NAME = "ram"

/** `--timeout` as the library's timeouts: the peer's answers and connecting. */
export const timeoutsOf = (timing: Options.Timing): Partial<Migration.Timeouts> =>
  Option.match(timing.timeout, {
    onNone: () => ({}),
    onSome: (d) => ({ peer: d, connect: d })
  })

/** The `send` subcommand. */
export const command = Command.make(
  "send",
  {
    uri: Options.uri,
    input: Options.input,
    transfer: Options.sendTransfer,
    timing: Options.timing,
    reporting: Options.reporting
  },
  ({ input, reporting, timing, transfer, uri }) =>
    Effect.gen(function*() {
      const bytes = yield* Image.read(input, transfer.pageSize)
      const ram = yield* GuestRam.make({ pageSize: transfer.pageSize, blocks: [{ name: BLOCK_NAME, bytes }] }).pipe(
        Effect.mapError((error) => new UsageError({ detail: error.message }))
      )
      const stats = yield* Effect.scoped(Effect.gen(function*() {
        const onProgress = yield* Progress.make("send")
        return yield* Migration.migrate({
          address: uri,
          channels: transfer.channels,
          compression: transfer.compression,
          compressionLevel: Option.getOrUndefined(transfer.compressionLevel),
          zeroPage: transfer.zeroPage,
          timeouts: timeoutsOf(timing),
          onProgress
        })
      })).pipe(
        Effect.provideService(GuestRam.GuestRam, ram),
        Effect.provide(Transport.layer)
      )
      yield* Report.print({ role: "send", input, pageSize: ram.pageSize, stats }, reporting.json)
    })
).pipe(Command.withDescription("Migrate the RAM image in --in to a destination listening at <uri>."))
