/**
 * What a terminal shows after the text a program wrote to it: a small emulator of the sequences the command's
 * progress bar (cli-progress) and its lines use — carriage return and line feed, cursor to a column (`CSI n G`),
 * erase in line (`CSI n K`), save and restore the cursor (`ESC 7` / `ESC 8`), line wrapping on and off
 * (`CSI ? 7 h` / `l`); other control sequences are ignored. The screen is `columns` wide and as tall as the text
 * needs (rows never scroll away, so a restored cursor lands on the row it was saved on, as on a screen that did not
 * scroll). For tests that read the screen a user is left with, not the bytes written.
 */

/** The screen's rows after `text`, each without trailing blanks. */
export const render = (text: string, columns: number): ReadonlyArray<string> => {
  const rows: Array<Array<string>> = [[]]
  let row = 0
  let col = 0
  let wrap = true
  let saved = { row: 0, col: 0 }
  const line = (r: number) => {
    while (rows.length <= r) rows.push([])
    return rows[r]!
  }
  const put = (ch: string) => {
    if (col >= columns) {
      if (!wrap) {
        // without wrapping, what reaches the edge is written over the last column
        line(row)[columns - 1] = ch
        return
      }
      row++
      col = 0
    }
    const cells = line(row)
    while (cells.length < col) cells.push(" ")
    cells[col] = ch
    col++
  }
  const chars = [...text]
  for (let i = 0; i < chars.length; i++) {
    const ch = chars[i]!
    if (ch === "\r") {
      col = 0
    } else if (ch === "\n") {
      row++
      line(row)
    } else if (ch === "\x1b") {
      const next = chars[i + 1]
      if (next === "7") {
        saved = { row, col }
        i++
      } else if (next === "8") {
        ;({ col, row } = saved)
        i++
      } else if (next === "[") {
        let j = i + 2
        let params = ""
        while (j < chars.length && /[0-9;?]/.test(chars[j]!)) params += chars[j++]
        const final = chars[j]
        i = j
        const n = Number(params.replace("?", "") || "0")
        if (final === "G") {
          col = Math.max(0, (n || 1) - 1)
        } else if (final === "K") {
          const cells = line(row)
          if (n === 0) cells.splice(col)
          else if (n === 1) for (let c = 0; c <= col && c < cells.length; c++) cells[c] = " "
          else cells.splice(0)
        } else if ((final === "h" || final === "l") && params === "?7") {
          wrap = final === "h"
        }
      } else {
        i++
      }
    } else if (ch >= " ") {
      put(ch)
    }
  }
  return rows.map((cells) => cells.join("").trimEnd())
}
