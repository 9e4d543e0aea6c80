// nbdinfo's output formats, from the library's ExportInfo and map extents: the text
// description, --json, --map and --map --totals (text and JSON). Pure functions, so each
// format is tested on its own and the info subcommand only gathers and prints.

import type { ExportDetails, ExportInfo, MapExtent } from './library'

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
export function protocolLine(info: ExportInfo): string {
  return `protocol: ${info.protocol} ${info.tls ? 'with' : 'without'} TLS, using ${info.structured ? 'structured' : 'simple'} packets\n`
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

/** One export in the text format; `content` is file(1)'s verdict on its first bytes. */
export function exportText(d: ExportDetails, content?: string): string {
  let out = `export=${jsonString(d.exportName)}:\n`
  if (d.description) out += `\tdescription: ${d.description}\n`
  const size = humanSize(d.exportSize)
  out += size.human ? `\texport-size: ${d.exportSize} (${size.text})\n` : `\texport-size: ${d.exportSize}\n`
  if (content !== undefined) out += `\tcontent: ${content}\n`
  if (d.uri !== undefined) out += `\turi: ${d.uri}\n`
  if (d.contexts !== undefined) {
    out += '\tcontexts:\n'
    for (const c of d.contexts) out += `\t\t${c}\n`
  }
  for (const [name, key] of FLAGS) out += `\t${name}: ${d[key] as boolean}\n`
  for (const [name, key] of BLOCK_SIZES) if (d[key] !== undefined) out += `\t${name}: ${d[key] as number}\n`
  return out
}

/** One export in the JSON format, opening the "exports" array when `first`, closing it when `last`. */
export function exportJson(d: ExportDetails, content: string | undefined, first: boolean, last: boolean): string {
  let out = first ? '"exports": [\n' : ''
  out += `\t{\n\t"export-name": ${jsonString(d.exportName)},\n`
  if (d.description) out += `\t"description": ${jsonString(d.description)},\n`
  if (content !== undefined) out += `\t"content": ${jsonString(content)},\n`
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
  out += `\t"export-size": ${d.exportSize},\n\t"export-size-str": "${humanSize(d.exportSize).text}"\n`
  out += last ? '\t} ]\n' : '\t},\n'
  return out
}

/** `--map` lines. */
export function mapText(extents: MapExtent[]): string {
  let out = ''
  for (const e of extents) {
    out += `${String(e.offset).padStart(10)}  ${String(e.length).padStart(10)}  ${String(e.flags).padStart(3)}`
    out += e.description ? `  ${e.description}\n` : '\n'
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

/** C's `%.1f`: the exact binary value rounded to one decimal, ties to even. */
export function fixed1(x: number): string {
  const text = x.toFixed(1)
  // toFixed breaks exact ties upwards; printf breaks them to even (0.25 → "0.2").
  const hundredths = x * 100
  if (Number.isInteger(hundredths) && hundredths % 10 === 5 && hundredths / 100 === x) {
    const down = Math.floor(x * 10)
    const even = down % 2 === 0 ? down : down + 1
    return (even / 10).toFixed(1)
  }
  return text
}

/** C's `%g`: six significant digits, trailing zeros dropped, exponent form outside 1e-4..1e6. */
export function cG(x: number): string {
  if (x === 0) return '0'
  let s = x.toExponential(5)
  let [mantissa, exp] = s.split('e') as [string, string]
  let e = Number(exp)
  if (e < -4 || e >= 6) {
    mantissa = mantissa.replace(/\.?0+$/, '')
    const sign = e < 0 ? '-' : '+'
    e = Math.abs(e)
    return `${mantissa}e${sign}${String(e).padStart(2, '0')}`
  }
  s = x.toFixed(Math.max(0, 5 - e))
  return s.includes('.') ? s.replace(/\.?0+$/, '') : s
}

/** `--map --totals`. */
export function totalsText(extents: MapExtent[], size: number): string {
  if (size === 0) return ''
  return totals(extents, size).map((t) =>
    `${String(t.size).padStart(10)} ${fixed1(t.percent).padStart(5)}% ${String(t.flags).padStart(3)}` +
    (t.description ? ` ${t.description}` : '') + '\n').join('')
}

/** `--map --totals --json`. */
export function totalsJson(extents: MapExtent[], size: number): string {
  if (size === 0) return '[]\n'
  const items = totals(extents, size).map((t) =>
    `{ "size": ${t.size}, "percent": ${cG(t.percent)}, "type": ${t.flags}` +
    (t.description ? `, "description": ${jsonString(t.description)}` : '') + ' }')
  return `[\n${items.join(',\n')}\n]\n`
}
