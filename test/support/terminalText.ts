/**
 * What a terminal child (`script` running a job in a pseudo-terminal) has printed so far, and a wait for a
 * pattern in it: for tests of what the command leaves on a real terminal (the cursor, line wrapping, job control).
 */
import type * as ChildProcess from "node:child_process"

/** The text `terminal` printed, growing as it prints. */
export interface TerminalText {
  /** Everything printed so far. */
  readonly text: () => string
  /** The first match of `pattern` in what is printed, once it is; rejects if the terminal ends first. */
  readonly shown: (pattern: RegExp) => Promise<RegExpExecArray>
}

/** Collects `terminal`'s stdout (from now on). */
export const watch = (terminal: ChildProcess.ChildProcess): TerminalText => {
  let text = ""
  terminal.stdout!.setEncoding("utf8").on("data", (s: string) => (text += s))
  const shown = (pattern: RegExp) =>
    new Promise<RegExpExecArray>((resolve, reject) => {
      const check = () => {
        const match = pattern.exec(text)
        if (match === null) return
        terminal.stdout!.off("data", check)
        resolve(match)
      }
      terminal.stdout!.on("data", check)
      terminal.once("exit", () => reject(new Error(`the terminal ended before ${pattern}: ${JSON.stringify(text)}`)))
      check()
    })
  return { text: () => text, shown }
}
