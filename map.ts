/**
 * `Handle.map()`: the whole-range extent map of one meta context, as `nbdinfo --map` prints it.
 *
 * Built only on the public {@link Handle.blockStatus}: it asks again from wherever the
 * server's answer ended (servers may describe less than asked for, down to one extent per
 * reply), clips a final extent that runs past the range, and merges neighbours with equal
 * flags before yielding them, so a caller sees each run once.
 *
 * @packageDocumentation
 */

import { CMD_FLAG_REQ_ONE, CONTEXT_BASE_ALLOCATION } from './constants'
import { NbdError } from './errors'
import type { Handle } from './handle'

/** Options of {@link Handle.map}. */
export interface MapOptions {
  /** The meta context to map; the handle must have negotiated it. Default `'base:allocation'`. */
  context?: string
  /** Where the range starts. Default 0. */
  offset?: number | bigint
  /** How many bytes to map. Default: to the end of the export. */
  length?: number
  /** Ask for one extent per request (`NBD_CMD_FLAG_REQ_ONE`), as a cautious client would. */
  reqOne?: boolean
  /** Stops the map: the iterator rejects with an `AbortError`. */
  signal?: AbortSignal
}

/** One run of {@link Handle.map}: `length` bytes at `offset` with the same `flags`. */
export interface MapExtent {
  offset: number
  length: number
  /** The context's flags: for `base:allocation` {@link STATE_HOLE} and {@link STATE_ZERO}. */
  flags: number
  /**
   * nbdinfo's words for the flags: `data`, `hole`, `zero`, `hole,zero` (base:allocation);
   * `clean`, `dirty` (qemu:dirty-bitmap:*); `absent`, `local`, `backing depth N`
   * (qemu:allocation-depth); `''` for a context nbdinfo has no words for.
   */
  description: string
}

/** nbdinfo's description of `flags` in `context` (`''` where it prints none). */
export function describeExtent(context: string, flags: number): string {
  if (context === CONTEXT_BASE_ALLOCATION) {
    return ['data', 'hole', 'zero', 'hole,zero'][flags] ?? ''
  }
  if (context.startsWith('qemu:dirty-bitmap:')) {
    return ['clean', 'dirty'][flags] ?? ''
  }
  if (context === 'qemu:allocation-depth') {
    if (flags === 0) return 'absent'
    if (flags === 1) return 'local'
    return `backing depth ${flags}`
  }
  return ''
}

function fail(message: string, code = 'EINVAL'): NbdError {
  return new NbdError(code, message, 'map')
}

/** Checks the options up front, so that a wrong call fails on the first `next()`. */
function plan(h: Handle, options: MapOptions | undefined) {
  if (options !== undefined && (options === null || typeof options !== 'object')) {
    throw fail(`options must be an object, got ${options === null ? 'null' : typeof options}`)
  }
  const o = options ?? {}
  const context = o.context ?? CONTEXT_BASE_ALLOCATION
  if (typeof context !== 'string') throw fail(`context must be a string, got ${typeof context}`)
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw fail('signal must be an AbortSignal')
  if (o.reqOne !== undefined && typeof o.reqOne !== 'boolean') throw fail('reqOne must be a boolean')
  const size = h.getSize({ bigint: true })
  let start: bigint
  if (o.offset === undefined) start = 0n
  else if (typeof o.offset === 'bigint' && o.offset >= 0n) start = o.offset
  else if (typeof o.offset === 'number' && Number.isSafeInteger(o.offset) && o.offset >= 0) start = BigInt(o.offset)
  else throw fail(`offset must be a non-negative safe integer or bigint, got ${String(o.offset)}`)
  if (start > size) throw fail(`offset ${start} is past the end of the export (${size} bytes)`)
  let end = size
  if (o.length !== undefined) {
    if (typeof o.length !== 'number' || !Number.isSafeInteger(o.length) || o.length < 0) {
      throw fail(`length must be a non-negative safe integer, got ${String(o.length)}`)
    }
    end = start + BigInt(o.length)
    if (end > size) throw fail(`offset ${start} + length ${o.length} is past the end of the export (${size} bytes)`)
  }
  if (end > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw fail(`the range ends past Number.MAX_SAFE_INTEGER (${end}); map a smaller range`, 'ERANGE')
  }
  if (!h.canMetaContext(context)) {
    throw fail(`the handle did not negotiate the meta context "${context}" (add it with metaContexts before connecting)`, 'ENOTSUP')
  }
  // As nbdinfo: one request covers at most 4 GiB less one minimum block, so that a 32-bit
  // length stays aligned.
  const minimum = h.getBlockSize('minimum') || 512
  const maxRequest = 0x1_0000_0000 - minimum
  const filter = h.canBlockStatusPayload() ? [context] : undefined
  return { context, start: Number(start), end: Number(end), maxRequest, filter, reqOne: o.reqOne === true, signal: o.signal }
}

/** The iterator behind {@link Handle.map}. */
export async function* mapExtents(h: Handle, options?: MapOptions): AsyncGenerator<MapExtent, void, undefined> {
  const p = plan(h, options)
  let run: MapExtent | undefined
  let cursor = p.start
  while (cursor < p.end) {
    const count = Math.min(p.end - cursor, p.maxRequest)
    const reply = await h.blockStatus(count, cursor, {
      signal: p.signal,
      flags: p.reqOne ? CMD_FLAG_REQ_ONE : 0,
      ...(p.filter ? { contexts: p.filter } : {}),
    })
    const extents = reply[p.context]
    if (extents === undefined || extents.length === 0) {
      throw fail(`the server described no extents of "${p.context}" at ${cursor}`, 'EPROTO')
    }
    for (const e of extents) {
      if (cursor >= p.end) break
      if (Number(e.offset) !== cursor) {
        throw fail(`the server's extents of "${p.context}" skip from ${cursor} to ${e.offset}`, 'EPROTO')
      }
      // An extent may be longer than 2^53 − 1 (a bigint); the map never goes past p.end.
      const length = Math.min(Number(e.length), p.end - cursor)
      if (run !== undefined && run.flags === e.flags) {
        run.length += length
      } else {
        if (run !== undefined) yield run
        run = { offset: cursor, length, flags: e.flags, description: describeExtent(p.context, e.flags) }
      }
      cursor += length
    }
  }
  if (run !== undefined) yield run
}

/**
 * Sums a map by flags, as `nbdinfo --map --totals` does: one entry per flags value present,
 * ascending, with its share of the mapped bytes in percent.
 */
export function mapTotals(
  extents: Iterable<MapExtent>,
  context: string = CONTEXT_BASE_ALLOCATION,
): { flags: number; size: number; percent: number; description: string }[] {
  const sums = new Map<number, number>()
  let total = 0
  for (const e of extents) {
    sums.set(e.flags, (sums.get(e.flags) ?? 0) + e.length)
    total += e.length
  }
  return [...sums.entries()]
    .filter(([, size]) => size > 0)
    .sort(([a], [b]) => a - b)
    .map(([flags, size]) => ({ flags, size, percent: (100 * size) / total, description: describeExtent(context, flags) }))
}
