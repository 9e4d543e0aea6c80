/**
 * Argument checks: JavaScript values whose shape the Rust side cannot see (numbers that must
 * be integers, bigints, detached buffers, option objects). Each throws an `EINVAL` (or
 * `ERANGE`, `EBADF`) {@link NbdError} naming the call and the argument; not exported from
 * the package.
 *
 * @packageDocumentation
 */

import { CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE } from './constants'
import { invalid, type NbdError } from './errors'

const MAX_U64 = (1n << 64n) - 1n

/** A short description of `v` for messages: its type, and its value when that is short. */
export function describe(v: unknown): string {
  if (v === null) return 'null'
  if (typeof v === 'number' || typeof v === 'bigint' || typeof v === 'boolean') return `${typeof v} ${String(v)}`
  if (typeof v === 'string') return `string ${JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v)}`
  return typeof v
}

/** An offset: a non-negative safe integer, or a bigint of at most 64 bits. */
export function checkOffset(op: string, v: unknown): number | bigint {
  if (typeof v === 'number') {
    if (!Number.isInteger(v) || v < 0) {
      throw invalid(op, `offset must be a non-negative integer, got ${v}`)
    }
    if (!Number.isSafeInteger(v)) {
      throw invalid(op, `offset ${v} is beyond Number.MAX_SAFE_INTEGER; pass a bigint`, 'ERANGE')
    }
    return v
  }
  if (typeof v === 'bigint') {
    if (v < 0n) throw invalid(op, `offset must be non-negative, got ${v}`)
    if (v > MAX_U64) throw invalid(op, `offset ${v} does not fit in 64 bits`, 'ERANGE')
    return v
  }
  throw invalid(op, `offset must be a number or a bigint, got ${describe(v)}`)
}

/** A byte count: a non-negative safe integer. */
export function checkCount(op: string, v: unknown): number {
  if (typeof v !== 'number') throw invalid(op, `count must be a number, got ${describe(v)}`)
  if (!Number.isInteger(v) || v < 0) {
    throw invalid(op, `count must be a non-negative integer, got ${v}`)
  }
  if (!Number.isSafeInteger(v)) throw invalid(op, `count ${v} is too large`, 'ERANGE')
  return v
}

/** A Uint8Array that is not detached, as a Buffer over the same memory. */
export function checkBuffer(op: string, v: unknown): Buffer {
  if (!(v instanceof Uint8Array)) {
    throw invalid(op, `buffer must be a Uint8Array or Buffer, got ${describe(v)}`)
  }
  // A detached buffer reads as empty; say what happened instead of sending an empty request.
  if (v.byteLength === 0 && isDetached(v.buffer)) {
    throw invalid(op, 'buffer is detached (its ArrayBuffer was transferred)')
  }
  return Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength)
}

/** Whether `ab` is a detached ArrayBuffer (`ab.detached` where the runtime has it). */
function isDetached(ab: ArrayBufferLike): boolean {
  if (typeof SharedArrayBuffer === 'function' && ab instanceof SharedArrayBuffer) return false
  const detached = (ab as { detached?: unknown }).detached
  if (typeof detached === 'boolean') return detached
  try {
    new Uint8Array(ab, 0, 0)
    return false
  } catch {
    return true
  }
}

export function checkBoolean(op: string, name: string, v: unknown): boolean {
  if (typeof v !== 'boolean') throw invalid(op, `${name} must be a boolean, got ${describe(v)}`)
  return v
}

export function checkString(op: string, name: string, v: unknown): string {
  if (typeof v !== 'string') throw invalid(op, `${name} must be a string, got ${describe(v)}`)
  return v
}

export function checkUint32(op: string, name: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw invalid(op, `${name} must be an integer from 0 to 2^32-1, got ${describe(v)}`)
  }
  return v
}

export function checkStringList(op: string, name: string, v: unknown): string[] {
  if (!Array.isArray(v)) throw invalid(op, `${name} must be an array of strings, got ${describe(v)}`)
  return v.map((s, i) => checkString(op, `${name}[${i}]`, s))
}

/** A program and its arguments: a non-empty list of strings. */
export function checkArgv(op: string, v: unknown): string[] {
  const argv = checkStringList(op, 'argv', v)
  if (argv.length === 0) throw invalid(op, 'argv must name a program')
  return argv
}

/** An options argument that was given: an object. */
export function checkObject(op: string, v: unknown): Record<string, unknown> {
  if (v === null || typeof v !== 'object') throw invalid(op, `options must be an object, got ${describe(v)}`)
  return v as Record<string, unknown>
}

/** A file descriptor (`EBADF` for a number that cannot be one). */
export function checkFd(op: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 0x7fffffff) {
    throw invalid(op, `fd must be a non-negative integer, got ${describe(v)}`, typeof v === 'number' ? 'EBADF' : 'EINVAL')
  }
  return v
}

/** A TCP port: a number from 0 to 65535 or a string (a number or a service name), as a string. */
export function checkPort(op: string, v: unknown): string {
  if (typeof v === 'number') {
    if (!Number.isInteger(v) || v < 0 || v > 65535) throw invalid(op, `port must be 0–65535, got ${v}`)
    return String(v)
  }
  return checkString(op, 'port', v)
}

/** `connectTimeout`: a non-negative, finite number of milliseconds. */
export function checkMilliseconds(op: string, v: unknown): number {
  if (typeof v !== 'number' || !(v >= 0) || !Number.isFinite(v)) {
    throw invalid(op, `connectTimeout must be a non-negative number of milliseconds, got ${describe(v)}`)
  }
  return v
}

/** `maxInFlight`: an integer from 1 to 2^32-1. */
export function checkMaxInFlight(op: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 0xffffffff) {
    throw invalid(op, `maxInFlight must be a positive integer, got ${describe(v)}`)
  }
  return v
}

/** The named flags each command accepts, and their bits. */
const NAMED_FLAGS = { fua: CMD_FLAG_FUA, noHole: CMD_FLAG_NO_HOLE, fastZero: CMD_FLAG_FAST_ZERO, df: CMD_FLAG_DF, reqOne: CMD_FLAG_REQ_ONE } as const

/**
 * A command's options: its raw `flags` OR-ed with every named flag set to true, and its
 * signal. A named flag the command does not take counts as that bit in `flags` would: the
 * strict checks refuse it (EINVAL, as libnbd refuses the bit), rather than it being dropped.
 */
export function checkOptions(op: string, opts: unknown): { flags: number; signal: AbortSignal | undefined } {
  if (opts === undefined) return { flags: 0, signal: undefined }
  const o = checkObject(op, opts)
  let flags = o.flags === undefined ? 0 : checkUint32(op, 'flags', o.flags)
  for (const name of Object.keys(NAMED_FLAGS) as (keyof typeof NAMED_FLAGS)[]) {
    const v = o[name]
    if (v !== undefined && checkBoolean(op, name, v)) flags = (flags | NAMED_FLAGS[name]) >>> 0
  }
  const signal = o.signal
  if (signal !== undefined && !(signal instanceof AbortSignal)) {
    throw invalid(op, `signal must be an AbortSignal, got ${describe(signal)}`)
  }
  return { flags, signal }
}
