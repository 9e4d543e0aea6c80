// Shared glue between the specs and the package: connecting handles to the peers of
// servers.ts, the embedded server, and assertions on NbdError.
import os from 'node:os'
import type { ExecutionContext } from 'ava'
import { Handle, NbdError } from 'nbd-client'
import { EmbeddedServer } from 'nbd-client/testing'
import type { Server } from './servers'

type HandleOptions = ConstructorParameters<typeof Handle>[0]
type EmbeddedOptions = ConstructorParameters<typeof EmbeddedServer>[0]

/** connectUnix or connectTcp, whichever the server listens on. */
export function connectTo(h: Handle, server: Pick<Server, 'socket' | 'port'>): Promise<void> {
  return server.socket ? h.connectUnix(server.socket) : h.connectTcp('127.0.0.1', server.port!)
}

/** A handle connected to `server` (with its export name), closed in the test's teardown. */
export async function openHandle(t: ExecutionContext, server: Server, options: HandleOptions = {}): Promise<Handle> {
  const h = new Handle({ exportName: server.exportName, ...options })
  t.teardown(() => h.close())
  await connectTo(h, server)
  return h
}

/** An embedded server, closed in the test's teardown. */
export function useEmbedded(t: ExecutionContext, options: EmbeddedOptions = {}): EmbeddedServer {
  const server = new EmbeddedServer(options)
  t.teardown(() => server.close())
  return server
}

/** A handle connected through a socketpair to `server`, closed in the test's teardown. */
export async function openEmbedded(t: ExecutionContext, server: EmbeddedServer, options: HandleOptions = {}): Promise<Handle> {
  const h = new Handle(options)
  t.teardown(() => h.close())
  await h.connectSocket(server.socketpair())
  return h
}

/** Any error code, for failures whose code the contract leaves open. */
export const ANY_CODE = '*'

/** errno numbers Node's os.constants.errno does not list. */
const LINUX_ONLY_ERRNO: Record<string, number> = { ESHUTDOWN: 108 }

/**
 * Checks that `err` is an NbdError with `code` (or one of `code`, or any with ANY_CODE), the
 * errno of that code and `operation`.
 */
export function assertNbdError(t: ExecutionContext, err: unknown, code: string | string[], operation?: string): void {
  const codes = Array.isArray(code) ? code : [code]
  t.true(err instanceof NbdError, `expected an NbdError, got ${String(err)}`)
  t.true(err instanceof Error)
  const e = err as NbdError
  if (!codes.includes(ANY_CODE)) {
    t.true(codes.includes(e.code), `expected code ${codes.join('|')}, got ${e.code}: ${e.message}`)
  }
  // Node's table lacks a few Linux names libnbd uses (ESHUTDOWN); those are listed here.
  const errno = (os.constants.errno as Record<string, number>)[e.code] ?? LINUX_ONLY_ERRNO[e.code]
  t.is(e.errno, errno, `errno of ${e.code}`)
  t.is(typeof e.message, 'string')
  t.true(e.message.length > 0, 'message is empty')
  if (operation !== undefined) t.is(e.operation, operation)
}

/**
 * Calls an async method and expects a rejected promise with an NbdError (never a synchronous
 * throw, never a resolution). Returns the error.
 */
export async function expectReject(
  t: ExecutionContext,
  call: () => Promise<unknown>,
  code: string | string[],
  operation?: string,
): Promise<NbdError | undefined> {
  let p: Promise<unknown>
  try {
    p = call()
  } catch (err) {
    t.fail(`threw synchronously instead of rejecting: ${String(err)}`)
    return undefined
  }
  t.true(p instanceof Promise, 'async method did not return a Promise')
  try {
    await p
  } catch (err) {
    assertNbdError(t, err, code, operation)
    return err as NbdError
  }
  t.fail(`expected a rejection with ${String(code)}, but it resolved`)
  return undefined
}

/** Calls a synchronous method and expects it to throw an NbdError. */
export function expectThrow(t: ExecutionContext, call: () => unknown, code: string | string[], operation?: string): void {
  try {
    call()
  } catch (err) {
    assertNbdError(t, err, code, operation)
    return
  }
  t.fail(`expected a throw with ${String(code)}`)
}

/** Random bytes, deterministic per seed, so a failure can be reproduced. */
export function seededBytes(length: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(length)
  let x = (seed * 2654435761) >>> 0 || 1
  for (let i = 0; i < length; i++) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    out[i] = x & 0xff
  }
  return out
}

/** What nbdkit's pattern plugin serves: each 8-byte word holds its own offset, big-endian. */
export function patternBytes(offset: number, length: number): Buffer {
  const first = offset - (offset % 8)
  const words = Buffer.alloc(Math.ceil((offset + length - first) / 8) * 8)
  for (let w = 0; w < words.length; w += 8) words.writeBigUInt64BE(BigInt(first + w), w)
  return words.subarray(offset - first, offset - first + length)
}

export const KiB = 1024
export const MiB = 1024 * 1024

/**
 * The whole export's extents for `context`, asked for in pieces of at most `step` bytes and
 * merged where neighbours have the same flags (as `nbdinfo --map` prints them).
 */
export async function fullMap(
  h: Handle,
  context = 'base:allocation',
  step = 1 << 30,
): Promise<{ offset: number; length: number; type: number }[]> {
  const size = h.getSize()
  const out: { offset: number; length: number; type: number }[] = []
  let offset = 0
  while (offset < size) {
    const count = Math.min(step, size - offset)
    const all = await h.blockStatus(count, offset)
    const extents = all[context]
    if (!extents || extents.length === 0) throw new Error(`no extents for ${context} at ${offset}`)
    for (const e of extents) {
      if (e.offset !== offset) throw new Error(`extent at ${e.offset}, expected ${offset}`)
      const length = Math.min(e.length, size - offset)
      const last = out[out.length - 1]
      if (last && last.type === e.flags) last.length += length
      else out.push({ offset, length, type: e.flags })
      offset += length
      if (offset >= size) break
    }
  }
  return out
}
