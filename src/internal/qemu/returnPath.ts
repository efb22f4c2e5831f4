/**
 * The return path of a migration into QEMU, source side: what QEMU's destination sends back on the main
 * channel once the source opened it (`MIG_CMD_OPEN_RETURN_PATH`, which QEMU's destination honours with or
 * without capability return-path): a PONG for each PING, SWITCHOVER_ACK (with capability switchover-ack),
 * and SHUT when it is done — status 0 once it loaded the whole migration and started the VM, else it failed.
 * QEMU that refuses a migration (a wrong machine type, another channel count, bad device state) closes the
 * connection instead, or sends SHUT 1.
 *
 * One fiber in the caller's scope reads the messages; waits are effects that fail with a one-line
 * `MigrationError` when QEMU closed or broke the return path before the answer.
 *
 * @internal
 */
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as MigrationError from "../../MigrationError.js"
import type * as Transport from "../../Transport.js"
import { ReturnPath as Message, returnPathName } from "./format.js"

/**
 * The data length each message type has (QEMU's `rp_cmd_args`): `-1` for any up to `MAX_DATA`. Types outside
 * it (0, MIG_RP_MSG_INVALID, and 8 on) QEMU never sends.
 */
const LENGTHS: ReadonlyArray<number> = [Number.NaN, 4, 4, -1, 12, -1, 4, 0]

/** The most data bytes a return-path message has (QEMU's source reads into a buffer of 512). */
const MAX_DATA = 512

/** What is wrong with a message header (type and data length) as QEMU would say it, or `undefined`. */
const headerProblem = (type: number, length: number): string | undefined => {
  const expected = LENGTHS[type]
  const shown = `0x${type.toString(16).padStart(4, "0")}`
  if (expected === undefined || Number.isNaN(expected)) return `of type ${shown} (${length} data bytes)`
  if (expected === -1 ? length > MAX_DATA : length !== expected) {
    return `MIG_RP_MSG_${returnPathName(type)} (${shown}) with ${length} data bytes, expected ` +
      (expected === -1 ? `at most ${MAX_DATA}` : `${expected}`)
  }
  return undefined
}

/**
 * The most messages whose names are kept (`received`): QEMU sends a few (SWITCHOVER_ACK, a PONG for each PING,
 * SHUT); a return path that says message after message is read on, its names no longer kept.
 */
export const MAX_KEPT = 64

/** Bytes as hex, a space between each. */
const hex = (bytes: Buffer): string => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(" ")

/** The source's view of QEMU's return path. */
export interface ReturnPath {
  /** The first PONG (the answer to the source's first PING): QEMU took the configuration and reads on. */
  readonly firstPong: Effect.Effect<number, MigrationError.MigrationError>
  /** The SHUT status: 0 QEMU loaded the migration and started the VM. */
  readonly shut: Effect.Effect<number, MigrationError.MigrationError>
  /** Messages received so far, by name (the first `MAX_KEPT`). */
  readonly received: () => ReadonlyArray<string>
}

/**
 * Starts reading the return path on `connection` in the current scope. `refused` words what QEMU closing
 * the connection before SHUT means at the time (it is asked when that happens); `peer` is QEMU's address, as
 * messages name it.
 */
export const start = (
  connection: Transport.Connection,
  refused: () => string,
  peer: string
): Effect.Effect<ReturnPath, never, Scope.Scope> =>
  Effect.gen(function*() {
    const pong = yield* Deferred.make<number, MigrationError.MigrationError>()
    const shut = yield* Deferred.make<number, MigrationError.MigrationError>()
    const received: Array<string> = []
    const ended = (error: MigrationError.MigrationError) =>
      Effect.zipRight(Deferred.fail(pong, error), Deferred.fail(shut, error))
    const read = Effect.gen(function*() {
      while (true) {
        if (yield* connection.atEnd) {
          return yield* ended(new MigrationError.MigrationError({ reason: "Rejected", detail: refused() }))
        }
        const head = yield* connection.read(4)
        const type = head.readUInt16BE(0)
        const length = head.readUInt16BE(2)
        // judged before its data is waited for: garbage announces any length, and would be waited for in vain
        const refusal = headerProblem(type, length)
        if (refusal !== undefined) {
          return yield* ended(new MigrationError.MigrationError({
            reason: "Unexpected",
            detail: `QEMU's return path from ${peer}: unexpected return-path message ${refusal}, bytes ${hex(head)}: ` +
              "is that a QEMU migration destination?"
          }))
        }
        const data = length > 0 ? yield* connection.read(length) : Buffer.alloc(0)
        const name = returnPathName(type)
        if (received.length < MAX_KEPT) received.push(name)
        switch (type) {
          case Message.PONG:
          case Message.SHUT: {
            // (4 data bytes: `headerProblem`)
            const value = data.readUInt32BE(0)
            if (type === Message.PONG) {
              yield* Deferred.succeed(pong, value)
              continue
            }
            yield* Deferred.succeed(shut, value)
            return
          }
          case Message.SWITCHOVER_ACK:
            continue
          default:
            return yield* ended(new MigrationError.MigrationError({
              reason: "Unexpected",
              detail: `QEMU's return path from ${peer}: unexpected message MIG_RP_MSG_${name} (${length} data bytes): ` +
                "only a precopy migration is supported"
            }))
        }
      }
    }).pipe(
      Effect.catchTag("TransportError", (e) =>
        ended(new MigrationError.MigrationError({ reason: "Aborted", detail: `${refused()} (${e.message})` })))
    )
    yield* Effect.forkScoped(read)
    return { firstPong: Deferred.await(pong), shut: Deferred.await(shut), received: () => received }
  })
