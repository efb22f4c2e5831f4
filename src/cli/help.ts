/**
 * The `--help` pages, in plain text: a usage line that starts with `multifd send` / `multifd recv`, each
 * command's own arguments and flags with what they do and their defaults, the exit status and examples.
 *
 * The descriptions are the ones the options were defined with (`options.ts`): the help pages are read off
 * @effect/cli's help of each command, keeping what we wrote and leaving out its generic sentences ("A
 * user-defined piece of text.", "This setting is optional.").
 *
 * @since 0.1.0
 */
import * as CliConfig from "@effect/cli/CliConfig"
import * as Command from "@effect/cli/Command"
import * as HelpDoc from "@effect/cli/HelpDoc"
import type * as Span from "@effect/cli/HelpDoc/Span"

/** One entry of a help page: a flag or argument and what it does. */
export interface Entry {
  readonly term: string
  readonly description: string
}

/** The plain text of a span. */
const textOf = (span: Span.Span): string => {
  switch (span._tag) {
    case "Text":
    case "URI":
      return span.value
    case "Sequence":
      return textOf(span.left) + textOf(span.right)
    default:
      return textOf(span.value)
  }
}

/** The plain text of a help document's paragraphs (a validation error's message, say), on one line. */
export const plainText = (doc: HelpDoc.HelpDoc): string => paragraphs(doc).join(" ")

/** The plain text of each paragraph of a help document (each problem of a validation error, say), in order. */
export const paragraphsOf = (doc: HelpDoc.HelpDoc): Array<string> => paragraphs(doc)

const paragraphs = (doc: HelpDoc.HelpDoc): Array<string> => {
  switch (doc._tag) {
    case "Paragraph":
    case "Header":
      return [textOf(doc.value)]
    case "Sequence":
      return [...paragraphs(doc.left), ...paragraphs(doc.right)]
    case "Enumeration":
      return doc.elements.flatMap(paragraphs)
    case "DescriptionList":
      return doc.definitions.flatMap(([term, description]) => [textOf(term), ...paragraphs(description)])
    default:
      return []
  }
}

/** @effect/cli's own sentences about a value's type and optionality: the help pages leave them out. */
const GENERIC = [
  /^A user-defined piece of text\.$/,
  /^An integer\.$/,
  /^A floating point number\.$/,
  /^A true or false value\.$/,
  /^An? (file|directory|path)\.$/,
  /^A file or directory\.$/,
  /^One of the following: /,
  /^This setting is optional\.$/,
  /^This option can be set from environment variables\.$/,
  /^This (setting|argument) is (repeatable|variadic)/
]

const generic = (text: string) => GENERIC.some((re) => re.test(text.trim()))

/** Every description list entry of a document, in order. */
const entries = (doc: HelpDoc.HelpDoc): Array<Entry> => {
  switch (doc._tag) {
    case "Sequence":
      return [...entries(doc.left), ...entries(doc.right)]
    case "DescriptionList":
      return doc.definitions.map(([term, description]) => ({
        // "(-q, --quiet)" as "--quiet, -q": the long name first, as the other flags
        term: textOf(term).replace(/\s+/g, " ").trim().replace(/^\((-\w), (--[\w-]+)\)/, "$2, $1"),
        description: paragraphs(description).filter((p) => !generic(p)).join(" ")
      }))
    default:
      return []
  }
}

const config = CliConfig.make({ showBuiltIns: false, isCaseSensitive: true })

/** The arguments and flags of a command, as its help lists them. */
export const entriesOf = <Name extends string, R, E, A>(command: Command.Command<Name, R, E, A>): Array<Entry> =>
  entries(Command.getHelp(command, config))

/** Wraps `text` to `width` columns, every line after the first indented by `indent`. */
const wrap = (text: string, width: number, indent: number): string => {
  const lines: Array<string> = []
  let line = ""
  for (const word of text.split(/\s+/).filter((w) => w.length > 0)) {
    if (line.length > 0 && line.length + 1 + word.length > width) {
      lines.push(line)
      line = word
    } else line = line.length === 0 ? word : `${line} ${word}`
  }
  if (line.length > 0) lines.push(line)
  return lines.join(`\n${" ".repeat(indent)}`)
}

/** What a help page holds. */
export interface Page {
  readonly title: string
  readonly usage: ReadonlyArray<string>
  readonly description?: string | undefined
  /** Sections of entries, in order (a section's entries are picked from the command's by `pick`). */
  readonly sections: ReadonlyArray<{ readonly heading: string; readonly entries: ReadonlyArray<Entry> }>
  readonly footer?: ReadonlyArray<string> | undefined
  readonly examples?: ReadonlyArray<readonly [comment: string, command: string]> | undefined
}

/** The widest a page is, and the narrowest it is made for a terminal. */
const WIDTH = 100
const MIN_WIDTH = 60
const TERM_WIDTH = 26

/**
 * How wide a page is for a terminal of `columns` (`undefined`: not a terminal): as wide as the terminal, from
 * `MIN_WIDTH` to `WIDTH`. At 100 always, a terminal of 80 columns, the usual, broke every description line in two,
 * its end at the left edge.
 */
export const widthFor = (columns: number | undefined): number =>
  columns === undefined || !(columns > 0) ? WIDTH : Math.max(MIN_WIDTH, Math.min(WIDTH, columns))

/** A page as text (no escape codes), its prose wrapped at `width` (usage lines and examples are commands: whole). */
export const render = (page: Page, width: number = WIDTH): string => {
  const out: Array<string> = [wrap(page.title, width, 0), "", "Usage:", ...page.usage.map((u) => `  ${u}`)]
  if (page.description !== undefined) out.push("", wrap(page.description, width, 0))
  for (const section of page.sections) {
    if (section.entries.length === 0) continue
    out.push("", `${section.heading}:`)
    for (const { description, term } of section.entries) {
      const head = `  ${term}`
      const body = wrap(description, width - TERM_WIDTH - 2, TERM_WIDTH + 2)
      out.push(head.length <= TERM_WIDTH ? `${head.padEnd(TERM_WIDTH)}  ${body}` : `${head}\n${" ".repeat(TERM_WIDTH + 2)}${body}`)
    }
  }
  if (page.footer !== undefined) out.push("", ...page.footer.map((line) => wrap(line, width, 0)))
  if (page.examples !== undefined && page.examples.length > 0) {
    out.push("", "Examples:")
    for (const [comment, command] of page.examples) {
      out.push(...wrap(comment, width - 4, 0).split("\n").map((line) => `  # ${line}`), `  ${command}`)
    }
  }
  return out.join("\n") + "\n"
}

/** The flag (or argument) an entry is about: `--channels` of `--channels N`, `--quiet` of `--quiet, -q`. */
export const flagOf = (entry: Entry): string => entry.term.split(/[ ,]/)[0]!

/** The entries of `flags` (`<uri>`, `--channels`, ...), in the order of `flags`. */
export const pick = (all: ReadonlyArray<Entry>, flags: ReadonlyArray<string>): Array<Entry> =>
  flags.flatMap((flag) => all.filter((entry) => flagOf(entry) === flag))
