/**
 * The `multifd` command: its subcommands and how @effect/cli runs them.
 *
 * @since 0.1.0
 */
import * as CliConfig from "@effect/cli/CliConfig"
import * as Command from "@effect/cli/Command"
import * as HelpDoc from "@effect/cli/HelpDoc"
import * as Span from "@effect/cli/HelpDoc/Span"
import * as Effect from "effect/Effect"
import { toExitCode } from "./errors.js"
import * as Log from "./log.js"
import * as Recv from "./recv.js"
import * as Send from "./send.js"

/** The program name, as it appears in help and messages. */
export const NAME = "multifd"

/** The version printed by `--version`. */
export const VERSION = "0.1.0"

/** `multifd` with its `recv` and `send` subcommands. */
export const command = Command.make(NAME).pipe(
  Command.withDescription(
    "Move a RAM image between processes or hosts over parallel multifd channels (QEMU's packet format), " +
      "verified end to end by per-block digests."
  ),
  Command.withSubcommands([Recv.command, Send.command])
)

/** Parses `process.argv` (runtime and script first) and runs the chosen subcommand. */
export const run = Command.run(command, {
  name: NAME,
  version: VERSION,
  summary: Span.text("QEMU-compatible multifd live migration of a RAM image file"),
  footer: HelpDoc.blocks([
    HelpDoc.p("Run `multifd recv --help` or `multifd send --help` for their options; --version prints the version."),
    HelpDoc.p(
      "Exit status: 0 success, 1 the migration failed (one line on stderr says why), 2 bad usage or configuration."
    )
  ])
})

/** How @effect/cli parses and documents: built-in options (--help, --version, ...) are left out of the help. */
export const config = CliConfig.layer({ showBuiltIns: false })

/**
 * The whole command for `argv` (runtime and script first, as `process.argv`): parses, runs, reports any
 * failure as one line and succeeds with the exit code. Only an interruption fails it.
 */
export const main = (argv: ReadonlyArray<string>) =>
  Effect.suspend(() => run(argv)).pipe(
    toExitCode,
    Effect.provide(Log.layer),
    Effect.provide(config)
  )
