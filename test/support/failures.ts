/**
 * What the tests expect of a failed effect: its typed failure (not a defect, not an interruption only), and
 * an error message of one line (the project's rule for every error a user can see).
 */
import * as Cause from "effect/Cause"
import * as Exit from "effect/Exit"
import * as Option from "effect/Option"
import { expect } from "@effect/vitest"

/** The failure of an exit, which must be a failure (not a success, a defect or an interruption only). */
export const failureOf = <A, E>(exit: Exit.Exit<A, E>): E => {
  if (Exit.isSuccess(exit)) throw new Error("expected a failure, got success")
  const failure = Cause.failureOption(exit.cause)
  if (Option.isNone(failure)) throw new Error(`expected a failure, got ${Cause.pretty(exit.cause)}`)
  return failure.value
}

/** Expects a message of one line: not empty, no line break. */
export const expectOneLine = (error: { readonly message: string }) => {
  expect(error.message.length).toBeGreaterThan(0)
  expect(error.message).not.toContain("\n")
}
