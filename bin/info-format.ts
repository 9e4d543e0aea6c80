// nbdinfo's output formats, from the library's ExportInfo (info()) and map extents (Handle.map()): the text
// description, --json, --map and --map --totals (text and JSON). Pure functions, so each
// format is tested on its own and the info subcommand only gathers and prints.

import type { ExportDetails, ExportInfo, MapExtent } from './library'

// nbdinfo's colours (ANSI SGR), used when colour is on (a terminal, or --color).
const BOLD_BLACK = '\x1b[1;30m'
const GREY = '\x1b[22;90m'
const GREEN = '\x1b[22;32m'
const RED = '\x1b[22;31m'
const RESTORE = '\x1b[0m'

/** The colour nbdinfo gives extents of `flags` in `context` ('' for none). */
export function extentColour(context: string, flags: number): string {
  if (context === 'base:allocation') return flags === 0 ? BOLD_BLACK : ''
  if (context.startsWith('qemu:dirty-bitmap:')) return flags === 0 ? GREEN : flags === 1 ? RED : ''
  if (context === 'qemu:allocation-depth') {
    return flags === 0 ? '' : flags === 1 ? '\x1b[1;37m\x1b[40m' : '\x1b[47m'
  }
  return ''
}

/** A JSON string as nbdinfo writes it: `\\` and `"` escaped, control bytes as \u00XX, the rest raw. */
export function jsonString(s: string): string {
  let out = '"'
  for (const ch of s) {
    const c = ch.codePointAt(0)!
    if (ch === '\\' || ch === '"') out += '\\' + ch
    else if (c < 0x20) out += '\\u' + c.toString(16).padStart(4, '0')
    else out += ch
  }
  return out + '"'
}

/** nbdinfo's size abbreviation: the largest power of 1024 that divides it exactly (1M, 3862848K, 1000). */
export function humanSize(bytes: bigint): { text: string; human: boolean } {
  const suffixes = ['', 'K', 'M', 'G', 'T', 'P', 'E']
  let i = 0
  if (bytes !== 0n) {
    while ((bytes & 1023n) === 0n && i < suffixes.length - 1) {
      bytes >>= 10n
      i++
    }
  }
  return { text: `${bytes}${suffixes[i]}`, human: i > 0 }
}

/** The first line of the text description (per connection). */
export function protocolLine(info: ExportInfo, colour = false): string {
  const line = `protocol: ${info.protocol} ${info.tls ? 'with' : 'without'} TLS, using ${info.structured ? 'structured' : 'simple'} packets\n`
  return colour ? GREY + line + RESTORE : line
}

/** The per-connection keys that open the JSON document. */
export function jsonHeader(info: ExportInfo): string {
  return `{\n"protocol": ${jsonString(info.protocol)},\n"TLS": ${info.tls},\n"structured": ${info.structured},\n`
}

const FLAGS: [string, keyof ExportDetails][] = [
  ['is_rotational', 'isRotational'], ['is_read_only', 'isReadOnly'], ['can_cache', 'canCache'],
  ['can_df', 'canDf'], ['can_fast_zero', 'canFastZero'], ['can_flush', 'canFlush'], ['can_fua', 'canFua'],
  ['can_multi_conn', 'canMultiConn'], ['can_trim', 'canTrim'], ['can_zero', 'canZero'],
]
const BLOCK_SIZES: [string, keyof ExportDetails][] = [
  ['block_size_minimum', 'blockSizeMinimum'], ['block_size_preferred', 'blockSizePreferred'],
  ['block_size_maximum', 'blockSizeMaximum'],
]

/** One export in the text format (`content` is file(1)'s verdict on its first bytes, when probed). */
export function exportText(d: ExportDetails, colour = false): string {
  const paint = (c: string): string => (colour ? c : '')
  let out = `${paint(BOLD_BLACK)}export=${jsonString(d.exportName)}:\n`
  if (d.description) out += `\tdescription: ${d.description}\n`
  const size = humanSize(BigInt(d.exportSize))
  out += size.human ? `\texport-size: ${d.exportSize} (${size.text})\n` : `\texport-size: ${d.exportSize}\n`
  if (d.content !== undefined) out += `\tcontent: ${d.content}\n`
  if (d.uri !== undefined) out += `\turi: ${d.uri}\n`
  out += paint(RESTORE) + paint(GREY)
  if (d.contexts !== undefined) {
    out += '\tcontexts:\n'
    for (const c of d.contexts) out += `\t\t${c}\n`
  }
  out += `\tis_rotational: ${d.isRotational}\n${paint(RESTORE)}`
  out += `\tis_read_only: ${d.isReadOnly}\n`
  for (const [name, key] of FLAGS.slice(2)) {
    const v = d[key] as boolean
    out += `${paint(v ? GREEN : RED)}\t${name}: ${v}\n${paint(RESTORE)}`
  }
  for (const [name, key] of BLOCK_SIZES) if (d[key] !== undefined) out += `\t${name}: ${d[key] as number}\n`
  return out
}

/** One export in the JSON format, opening the "exports" array when `first`, closing it when `last`. */
export function exportJson(d: ExportDetails, first: boolean, last: boolean): string {
  let out = first ? '"exports": [\n' : ''
  out += `\t{\n\t"export-name": ${jsonString(d.exportName)},\n`
  if (d.description) out += `\t"description": ${jsonString(d.description)},\n`
  if (d.content !== undefined) out += `\t"content": ${jsonString(d.content)},\n`
  if (d.uri !== undefined) out += `\t"uri": ${jsonString(d.uri)},\n`
  if (d.contexts !== undefined) {
    out += '\t"contexts": [\n'
    d.contexts.forEach((c, i) => {
      out += `\t\t${jsonString(c)}${i + 1 < d.contexts!.length ? ',' : ''}\n`
    })
    out += '\t],\n'
  }
  for (const [name, key] of FLAGS) out += `\t"${name}": ${d[key] as boolean},\n`
  for (const [name, key] of BLOCK_SIZES) if (d[key] !== undefined) out += `\t"${name}": ${d[key] as number},\n`
  out += `\t"export-size": ${d.exportSize},\n\t"export-size-str": ${jsonString(d.exportSizeStr)}\n`
  out += last ? '\t} ]\n' : '\t},\n'
  return out
}

/** `--map` lines; `context` chooses the colours. */
export function mapText(extents: MapExtent[], context = '', colour = false): string {
  let out = ''
  for (const e of extents) {
    const paint = colour ? extentColour(context, e.flags) : ''
    out += `${paint}${String(e.offset).padStart(10)}  ${String(e.length).padStart(10)}  ${String(e.flags).padStart(3)}`
    out += e.description ? `  ${e.description}` : ''
    out += paint ? `${RESTORE}\n` : '\n'
  }
  return out
}

/** `--map --json`. */
export function mapJson(extents: MapExtent[]): string {
  const items = extents.map((e) =>
    `{ "offset": ${e.offset}, "length": ${e.length}, "type": ${e.flags}` +
    (e.description ? `, "description": ${jsonString(e.description)}` : '') + '}')
  return `[\n${items.join(',\n')}\n]\n`
}

interface Total {
  size: number
  percent: number
  flags: number
  description: string
}

/** Bytes per distinct flags value, in increasing order of flags, with the share of `size`. */
function totals(extents: MapExtent[], size: number): Total[] {
  const byFlags = new Map<number, Total>()
  for (const e of extents) {
    const t = byFlags.get(e.flags)
    if (t) t.size += e.length
    else byFlags.set(e.flags, { size: e.length, percent: 0, flags: e.flags, description: e.description })
  }
  const out = [...byFlags.values()].filter((t) => t.size > 0).sort((a, b) => a.flags - b.flags)
  for (const t of out) t.percent = (100 * t.size) / size
  return out
}

/** round(x × 10^scale), ties to even, on the exact binary value of x (finite, >= 0), as printf rounds. */
function roundScaled(x: number, scale: number): bigint {
  const view = new DataView(new ArrayBuffer(8))
  view.setFloat64(0, x)
  const bits = view.getBigUint64(0)
  const biased = Number((bits >> 52n) & 0x7ffn)
  const fraction = bits & ((1n << 52n) - 1n)
  // x = mantissa × 2^exponent exactly.
  const mantissa = biased === 0 ? fraction : fraction | (1n << 52n)
  const exponent = (biased === 0 ? 1 : biased) - 1075
  let num = mantissa
  let den = 1n
  if (exponent >= 0) num <<= BigInt(exponent)
  else den <<= BigInt(-exponent)
  if (scale >= 0) num *= 10n ** BigInt(scale)
  else den *= 10n ** BigInt(-scale)
  let q = num / den
  const twice = 2n * (num % den)
  if (twice > den || (twice === den && (q & 1n) === 1n)) q++
  return q
}

/** The digits of `q × 10^-decimals` with that many decimals. */
function withDecimals(q: bigint, decimals: number): string {
  if (decimals <= 0) return (q * 10n ** BigInt(-decimals)).toString()
  const digits = q.toString().padStart(decimals + 1, '0')
  return `${digits.slice(0, -decimals)}.${digits.slice(-decimals)}`
}

/** C's `%.1f` (for x >= 0). */
export function fixed1(x: number): string {
  return withDecimals(roundScaled(x, 1), 1)
}

/** C's `%g` (for x >= 0): six significant digits, trailing zeros dropped, exponent form outside 1e-4..1e6. */
export function cG(x: number): string {
  if (x === 0) return '0'
  let e = Math.floor(Math.log10(x))
  if (10 ** e > x) e--
  else if (10 ** (e + 1) <= x) e++
  let q = roundScaled(x, 5 - e)
  if (q === 1_000_000n) {
    // Rounding carried into a new digit (9.999995 → 10.0000).
    e++
    q = 100_000n
  }
  const strip = (t: string): string => (t.includes('.') ? t.replace(/\.?0+$/, '') : t)
  if (e < -4 || e >= 6) {
    const mantissa = strip(withDecimals(q, 5))
    return `${mantissa}e${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`
  }
  return strip(withDecimals(q, 5 - e))
}

/** `--map --totals`; `context` chooses the colours. */
export function totalsText(extents: MapExtent[], size: number, context = '', colour = false): string {
  if (size === 0) return ''
  return totals(extents, size).map((t) => {
    const paint = colour ? extentColour(context, t.flags) : ''
    return `${paint}${String(t.size).padStart(10)} ${fixed1(t.percent).padStart(5)}% ${String(t.flags).padStart(3)}` +
      (t.description ? ` ${t.description}` : '') + (paint ? RESTORE : '') + '\n'
  }).join('')
}

/** `--map --totals --json`. */
export function totalsJson(extents: MapExtent[], size: number): string {
  if (size === 0) return '[]\n'
  const items = totals(extents, size).map((t) =>
    `{ "size": ${t.size}, "percent": ${cG(t.percent)}, "type": ${t.flags}` +
    (t.description ? `, "description": ${jsonString(t.description)}` : '') + ' }')
  return `[\n${items.join(',\n')}\n]\n`
}
