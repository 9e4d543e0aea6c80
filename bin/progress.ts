// nbdcopy's progress output, for `nbd-client copy -p` / `--progress=FD`: on stderr a bar
// redrawn in place (a spinner, the percentage, 40 cells), ending with a full bar and \n (as
// libnbd 1.14's nbdcopy prints it; a terminal shows that \n as \r\n); on a file descriptor one `N/100` line per update, ending
// with `100/100`. Both start at 0 and end at 100 whatever the copy reports, as nbdcopy does.

import fs from 'node:fs'

const SPINNER = ['▝', '▐', '▗', '▃', '▖', '▍', '▘', '▀']

/** The bar line for `fraction` (0..1) with spinner position `spin`; ends in \r, or \n when full. */
export function progressBar(fraction: number, spin: number): string {
  const f = Math.min(1, Math.max(0, fraction))
  if (f === 1) return `█ 100% [${'*'.repeat(40)}]\n`
  // As nbdcopy: a cell is starred while its index is below 40 × fraction.
  const stars = Math.min(40, Math.ceil(40 * f))
  const percent = String(Math.trunc(100 * f)).padStart(3)
  return `${SPINNER[spin % SPINNER.length]} ${percent}% [${'*'.repeat(stars)}${'-'.repeat(40 - stars)}]\r`
}

/** The machine-readable line for `fraction`. */
export function progressLine(fraction: number): string {
  const f = Math.min(1, Math.max(0, fraction))
  return f === 1 ? '100/100\n' : `${Math.trunc(100 * f)}/100\n`
}

/** Draws progress to stderr (`fd` undefined) or writes lines to `fd`. */
export class Progress {
  readonly #fd: number
  readonly #lines: boolean
  #spin = 0
  #done = false
  #wrote = false

  constructor(fd?: number) {
    this.#lines = fd !== undefined
    this.#fd = fd ?? 2
    this.update(0, 1)
  }

  update(bytesDone: number, bytesTotal: number): void {
    if (this.#done || bytesTotal === 0) return
    const fraction = bytesDone / bytesTotal
    const text = this.#lines ? progressLine(fraction) : progressBar(fraction, this.#spin++)
    // The end is drawn once: the copy's final report and finish() both say 100%.
    if (fraction >= 1) this.#done = true
    try {
      fs.writeSync(this.#fd, text)
      this.#wrote = true
    } catch (e) {
      // A descriptor that never took a line is the user's mistake, and said so.
      if (!this.#wrote) throw e
      // A full non-blocking pipe: this frame is skipped.
      if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return
      // Whoever read the progress went away (EPIPE, a closed fd): the copy goes on
      // without it, as it would without --progress.
      this.#done = true
    }
  }

  finish(): void {
    this.update(1, 1)
    this.#done = true
  }
}
