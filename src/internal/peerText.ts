/**
 * Text a peer chose (a refusal's or an abort's reason, a name in its certificate) as this side shows it:
 * characters a terminal would act on rather than show are escaped, and a peer's reason is cut to a length a
 * message can hold.
 *
 * @internal
 */

/** C0 and C1 controls, DEL, and the bidirectional marks, overrides and isolates (which reorder what follows). */
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g

/** `text` with every character a terminal would act on written as a `\u` escape, as JSON writes controls. */
export const printable = (text: string): string =>
  text.replace(UNPRINTABLE, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`)

/** Characters of a peer's reason kept in a message. */
export const MAX_PEER_TEXT = 300

/** A peer's free text for a message: printable, and cut after `max` characters (saying how many more). */
export const fromPeer = (text: string, max: number = MAX_PEER_TEXT): string => {
  const shown = printable(text.length > max ? text.slice(0, max) : text)
  return text.length > max ? `${shown}… (${text.length - max} more characters)` : shown
}

/** Characters of a name or value quoted in a message (`quoted`), at most. */
export const MAX_QUOTED = 100

/**
 * A name or value a peer may have chosen, quoted for a message as JSON quotes it (controls and line breaks
 * escaped), with what JSON leaves (C1 controls, bidirectional marks) escaped too, and cut after `max`
 * characters (saying how many more): a hello's uuid or block name may be a control frame's megabyte.
 */
export const quoted = (text: string, max: number = MAX_QUOTED): string =>
  text.length > max
    ? `${printable(JSON.stringify(text.slice(0, max)))}… (${text.length - max} more characters)`
    : printable(JSON.stringify(text))
