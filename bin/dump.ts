// nbd-client dump: a hexdump of an export, byte for byte as libnbd's nbddump prints it: lines
// of 16 bytes with a 10-digit hexadecimal address, the bytes in hex (an extra space after the
// eighth), the printable ASCII between bars; a line equal to the one before it is replaced by
// one `*` line for the whole run (never the first line printed, nor the export's last line).
// --color draws it as nbddump does on a terminal. --offset (an extension) starts the dump at
// that byte, with absolute addresses as `hexdump -s` prints them.

import { CONTEXT_BASE_ALLOCATION, Handle, NbdError, STATE_ZERO } from '../index'
import {
  COLOUR_OPTIONS, COMMON_HELP, COMMON_OPTIONS, Output, PROGRAM, answerHelpOrVersion, colourWanted, connectTarget,
  handleOptions, last, parseArgs, parseSize, parseTarget, type OptionSpec,
} from './cli'

const SUBCOMMAND = 'dump'

const OPTIONS: OptionSpec[] = [
  ...COMMON_OPTIONS,
  { key: 'length', long: ['length', 'limit'], short: 'n', arg: 'required' },
  { key: 'offset', long: ['offset'], short: 'o', arg: 'required' },
  ...COLOUR_OPTIONS,
]

export const DUMP_HELP = `
Hexdump the content of an export (as nbddump):

    ${PROGRAM} dump [--offset N] [--length N] NBD-URI | [ CMD ARGS ... ]

    -o, --offset=N        start at byte N (addresses stay absolute)
    -n, --length=N        dump at most N bytes
    --color, --no-color   ANSI colours (default: when stdout is a terminal)

N takes a k, M, G, T, P or E suffix (powers of 1024).

Examples:

    ${PROGRAM} dump nbd://localhost
    ${PROGRAM} dump --offset 1M --length 512 'nbd+unix:///disk?socket=/tmp/sock'
    ${PROGRAM} dump [ qemu-nbd -r -f qcow2 file.qcow2 ]

${COMMON_HELP}`

// nbddump's colours (ANSI SGR parameters).
const GREEN = '\x1b[22;32m'
const GREY = '\x1b[22;90m'
const BRIGHT_BLUE = '\x1b[1;34m'
const BRIGHT_RED = '\x1b[1;31m'
const BRIGHT_MAGENTA = '\x1b[1;35m'
const RESTORE = '\x1b[0m'

const ZERO_LINE = Buffer.alloc(16)
const HEX_DIGIT = Buffer.from('0123456789abcdef', 'latin1')
/** Lines formatted into one string at most (8192 lines of at most 96 bytes: 768 KiB). */
const PLAIN_BATCH = 8192

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'))

function isAlnum(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a)
}

function isPrint(c: number): boolean {
  return c >= 0x20 && c <= 0x7e
}

/**
 * Turns bytes into nbddump's lines. Feed it the dumped range in order, in pieces of any size;
 * it keeps the partial line between pieces.
 */
export class HexDumper {
  readonly #colour: boolean
  readonly #exportSize: bigint
  /** Address of the next line. */
  #address: bigint
  readonly #first: bigint
  readonly #line = Buffer.alloc(16)
  #lineFill = 0
  readonly #previous = Buffer.alloc(16)
  #squashing = false
  #scratch = Buffer.alloc(0)

  /** `start`: address of the first byte; `exportSize`: the export's size (its last line is never squashed). */
  constructor(start: bigint, exportSize: bigint, colour: boolean) {
    this.#address = start
    this.#first = start
    this.#exportSize = exportSize
    this.#colour = colour
  }

  /** The lines completed by `data`. */
  push(data: Uint8Array): string {
    let out = ''
    let i = 0
    // Finish a partial line first, then whole lines straight from `data`.
    if (this.#lineFill > 0) {
      const n = Math.min(16 - this.#lineFill, data.length)
      this.#line.set(data.subarray(0, n), this.#lineFill)
      this.#lineFill += n
      i = n
      if (this.#lineFill < 16) return out
      out += this.#emit(this.#line, 16)
      this.#lineFill = 0
    }
    if (this.#colour) {
      for (; i + 16 <= data.length; i += 16) out += this.#emit(data.subarray(i, i + 16), 16)
    } else {
      const whole = Math.floor((data.length - i) / 16)
      out += this.#plainLines(data, i, whole)
      i += whole * 16
    }
    if (i < data.length) {
      this.#line.set(data.subarray(i))
      this.#lineFill = data.length - i
    }
    return out
  }

  /**
   * The lines completed by `count` zero bytes: the same as `push` of that many zeros, but
   * without touching each line once they are squashed (a sparse terabyte costs nothing).
   */
  zeros(count: bigint): string {
    let out = ''
    if (this.#lineFill > 0) {
      const n = Number(count < BigInt(16 - this.#lineFill) ? count : BigInt(16 - this.#lineFill))
      this.#line.fill(0, this.#lineFill, this.#lineFill + n)
      this.#lineFill += n
      count -= BigInt(n)
      if (this.#lineFill < 16) return out
      out += this.#emit(this.#line, 16)
      this.#lineFill = 0
    }
    let lines = count / 16n
    // Line by line until a run of zero lines is being squashed...
    while (lines > 0n && !(this.#squashing && this.#previous.equals(ZERO_LINE))) {
      out += this.#emit(ZERO_LINE, 16)
      lines--
    }
    // ...then every line that is not the export's last one is squashed silently.
    if (lines > 0n && this.#address + 16n < this.#exportSize) {
      const quiet = (this.#exportSize - 16n - this.#address + 15n) / 16n
      const skip = quiet < lines ? quiet : lines
      this.#address += 16n * skip
      lines -= skip
    }
    for (; lines > 0n; lines--) out += this.#emit(ZERO_LINE, 16)
    const rest = Number(count % 16n)
    if (rest > 0) {
      this.#line.fill(0, 0, rest)
      this.#lineFill = rest
    }
    return out
  }

  /** The last, partial line, if any. */
  end(): string {
    if (this.#lineFill === 0) return ''
    // nbddump compares a short last line with the one before it padded with zeros.
    this.#line.fill(0, this.#lineFill)
    const out = this.#emit(this.#line, this.#lineFill)
    this.#lineFill = 0
    return out
  }

  /**
   * `count` whole lines of `data` from `from`, without colour: the same as #emit for each, but
   * written byte by byte into one buffer (a dense dump is millions of lines).
   */
  #plainLines(data: Uint8Array, from: number, count: number): string {
    // In batches: Node makes a string of more than about 1 MB from a Buffer an external one,
    // whose memory the garbage collector does not see growing (RSS then climbs by gigabytes).
    let text = ''
    for (let done = 0; done < count; done += PLAIN_BATCH) {
      text += this.#plainBatch(data, from + done * 16, Math.min(PLAIN_BATCH, count - done))
    }
    return text
  }

  #plainBatch(data: Uint8Array, from: number, count: number): string {
    // One scratch buffer, reused: the text leaves it as a string.
    if (this.#scratch.length < count * 96 + 2) this.#scratch = Buffer.allocUnsafe(count * 96 + 2)
    const out = this.#scratch
    let n = 0
    const previous = this.#previous
    for (let line = 0; line < count; line++) {
      const at = from + line * 16
      const address = this.#address
      this.#address += 16n
      let same = address > this.#first && address + 16n < this.#exportSize
      for (let j = 0; same && j < 16; j++) same = data[at + j] === previous[j]
      if (same) {
        if (!this.#squashing) {
          this.#squashing = true
          out[n++] = 0x2a // '*'
          out[n++] = 0x0a
        }
        continue
      }
      this.#squashing = false
      for (let j = 0; j < 16; j++) previous[j] = data[at + j]!
      const hex = address.toString(16)
      for (let k = hex.length; k < 10; k++) out[n++] = 0x30
      n += out.write(hex, n, 'latin1')
      out[n++] = 0x3a // ':'
      out[n++] = 0x20
      for (let j = 0; j < 16; j++) {
        const c = data[at + j]!
        out[n++] = HEX_DIGIT[c >> 4]!
        out[n++] = HEX_DIGIT[c & 15]!
        out[n++] = 0x20
        if (j === 7) out[n++] = 0x20
      }
      out[n++] = 0x7c // '|'
      for (let j = 0; j < 16; j++) {
        const c = data[at + j]!
        out[n++] = isPrint(c) ? c : 0x2e
      }
      out[n++] = 0x7c
      out[n++] = 0x0a
    }
    return out.toString('latin1', 0, n)
  }

  #emit(bytes: Uint8Array, length: number): string {
    const address = this.#address
    this.#address += 16n
    const same = address > this.#first && address + 16n < this.#exportSize && this.#previous.equals(bytes)
    if (same) {
      if (this.#squashing) return ''
      this.#squashing = true
      return this.#colour ? '☆\n' : '*\n'
    }
    this.#squashing = false
    this.#previous.set(bytes)
    return this.#colour ? this.#colourLine(address, bytes, length) : this.#plainLine(address, bytes, length)
  }

  #plainLine(address: bigint, bytes: Uint8Array, length: number): string {
    let hex = ''
    let ascii = ''
    for (let j = 0; j < 16; j++) {
      if (j < length) {
        const c = bytes[j]!
        hex += HEX[c] + ' '
        ascii += isPrint(c) ? String.fromCharCode(c) : '.'
      } else {
        hex += '   '
        ascii += ' '
      }
      if (j === 7) hex += ' '
    }
    return `${address.toString(16).padStart(10, '0')}: ${hex}|${ascii}|\n`
  }

  #colourLine(address: bigint, bytes: Uint8Array, length: number): string {
    let out = `${GREEN}${address.toString(16).padStart(10, '0')}${GREY}: `
    for (let j = 0; j < length; j++) {
      const c = bytes[j]!
      out += (c !== 0 ? BRIGHT_BLUE : GREY) + HEX[c] + ' '
      if (j === 7) out += ' '
    }
    out += GREY
    for (let j = length; j < 16; j++) {
      out += '   '
      if (j === 7) out += ' '
    }
    out += '│'
    for (let j = 0; j < length; j++) {
      const c = bytes[j]!
      if (isAlnum(c)) out += BRIGHT_RED + String.fromCharCode(c)
      else if (isPrint(c)) out += BRIGHT_MAGENTA + String.fromCharCode(c)
      else out += GREY + '·'
    }
    out += GREY + ' '.repeat(16 - length) + '│\n' + RESTORE
    return out
  }
}

/** Largest block status request (as nbdinfo: 4 GiB less one alignment unit). */
const MAX_STATUS = 0xffffffff - 4095

/**
 * The dump of [from, to) as text pieces. Ranges that block status (base:allocation) reports
 * as reading zeros are not read at all, as nbddump does; the rest is read with a stream.
 */
async function* dumpRange(h: Handle, dumper: HexDumper, from: bigint, to: bigint): AsyncGenerator<string> {
  const readData = async function* (start: bigint, end: bigint): AsyncGenerator<string> {
    if (end <= start) return
    for await (const chunk of h.createReadStream({ start, end: end - 1n })) {
      const text = dumper.push(chunk as Buffer)
      if (text.length > 0) yield text
    }
  }
  if (!h.canMetaContext(CONTEXT_BASE_ALLOCATION)) {
    yield* readData(from, to)
    return
  }
  let offset = from
  while (offset < to) {
    const want = to - offset < BigInt(MAX_STATUS) ? Number(to - offset) : MAX_STATUS
    const extents = (await h.blockStatus(want, offset))[CONTEXT_BASE_ALLOCATION] ?? []
    if (extents.length === 0) {
      // Nothing described: read what was asked for.
      yield* readData(offset, offset + BigInt(want))
      offset += BigInt(want)
      continue
    }
    // Runs of data and of zeros, each handled at once.
    let runStart = offset
    let runZero: boolean | undefined
    for (const e of extents) {
      const zero = (e.flags & STATE_ZERO) !== 0
      const eEnd = BigInt(e.offset) + BigInt(e.length) < to ? BigInt(e.offset) + BigInt(e.length) : to
      if (runZero !== undefined && zero !== runZero) {
        const boundary = BigInt(e.offset)
        if (runZero) yield dumper.zeros(boundary - runStart)
        else yield* readData(runStart, boundary)
        runStart = boundary
      }
      runZero = zero
      offset = eEnd
      if (offset >= to) break
    }
    if (runZero) yield dumper.zeros(offset - runStart)
    else yield* readData(runStart, offset)
  }
}

/** Runs `nbd-client dump ARGS`; resolves to the exit status. */
export async function dumpCommand(argv: string[], output = new Output()): Promise<number> {
  const args = parseArgs(SUBCOMMAND, argv, OPTIONS)
  if (await answerHelpOrVersion(args, DUMP_HELP, output)) return 0
  const target = parseTarget(SUBCOMMAND, args.positionals)
  const lengthArg = last(args, 'length')
  const offsetArg = last(args, 'offset')
  const limit = typeof lengthArg === 'string' ? parseSize(SUBCOMMAND, 'length', lengthArg) : undefined
  const offset = typeof offsetArg === 'string' ? parseSize(SUBCOMMAND, 'offset', offsetArg) : 0n
  const colour = colourWanted(argv)

  const h = new Handle({ ...handleOptions(SUBCOMMAND, args), metaContexts: [CONTEXT_BASE_ALLOCATION] })
  try {
    await connectTarget(h, target)
    const size = h.getSize({ bigint: true })
    if (offset > size) {
      throw new NbdError('EINVAL', `--offset ${offset} is past the end of the export (size ${size})`, SUBCOMMAND)
    }
    let end = size
    if (limit !== undefined && offset + limit < end) end = offset + limit
    const dumper = new HexDumper(offset, size, colour)
    for await (const text of dumpRange(h, dumper, offset, end)) await output.write(text)
    const tail = dumper.end()
    if (tail.length > 0) await output.write(tail)
    await h.shutdown()
  } finally {
    await h.close()
  }
  return 0
}
