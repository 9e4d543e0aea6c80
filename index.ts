/**
 * nbd-client: a Network Block Device client for Node.js and Electron.
 *
 * The protocol engine and the connection driver are Rust (crates/nbd-proto,
 * crates/nbd-client); this module is the public API. Its calls mirror libnbd's, in
 * camelCase and returning Promises: `nbd_connect_socket` → {@link Handle.connectSocket},
 * `nbd_pread` → {@link Handle.pread}, `nbd_can_flush` → {@link Handle.canFlush}. libnbd's
 * manual pages describe the behaviour of each call.
 *
 * @example
 * ```ts
 * import { Handle } from 'nbd-client'
 *
 * await using h = new Handle({ exportName: 'disk' })
 * await h.connectUnix('/run/nbd.sock')
 * const first = await h.pread(512, 0)
 * await h.pwrite(Buffer.alloc(4096, 0xff), 1 << 20, { fua: true })
 * ```
 *
 * @packageDocumentation
 */

import type * as Binding from './binding'

// eslint-disable-next-line @typescript-eslint/no-require-imports
const native: typeof Binding = require('../binding.js')
// eslint-disable-next-line @typescript-eslint/no-require-imports
const pkg: { version: string } = require('../package.json')

/** The version of this package. */
export const version: string = pkg.version

// ---- constants (values as in libnbd and the NBD protocol) ----

/** Force unit access: the command completes only once the data is on stable storage. */
export const CMD_FLAG_FUA = 0x01
/** With {@link Handle.zero}: write real zeroes, do not punch a hole. */
export const CMD_FLAG_NO_HOLE = 0x02
/** With structured reads: do not fragment the reply. */
export const CMD_FLAG_DF = 0x04
/** With block status: one extent is enough. */
export const CMD_FLAG_REQ_ONE = 0x08
/** With {@link Handle.zero}: fail fast rather than zero slowly. */
export const CMD_FLAG_FAST_ZERO = 0x10
/** The command carries an explicit payload length (extended headers). */
export const CMD_FLAG_PAYLOAD_LEN = 0x20

/** Strict mode: refuse commands and flags the server did not advertise. */
export const STRICT_COMMANDS = 0x01
/** Strict mode: refuse flags unknown to or invalid for the command. */
export const STRICT_FLAGS = 0x02
/** Strict mode: refuse requests beyond the end of the export. */
export const STRICT_BOUNDS = 0x04
/** Strict mode: refuse requests of length 0. */
export const STRICT_ZERO_SIZE = 0x08
/** Strict mode: refuse requests not aligned to the server's minimum block size. */
export const STRICT_ALIGN = 0x10
/** Strict mode: refuse payloads larger than the payload maximum. */
export const STRICT_PAYLOAD = 0x20
/** Strict mode: add flags the protocol requires automatically. */
export const STRICT_AUTO_FLAG = 0x40

/** Handshake flag: use fixed newstyle when the server offers it. */
export const HANDSHAKE_FLAG_FIXED_NEWSTYLE = 0x01
/** Handshake flag: skip the 124 zero bytes when the server offers it. */
export const HANDSHAKE_FLAG_NO_ZEROES = 0x02

/** base:allocation extent flag: the extent is a hole. */
export const STATE_HOLE = 0x01
/** base:allocation extent flag: the extent reads as zeroes. */
export const STATE_ZERO = 0x02
/** qemu:dirty-bitmap extent flag: the extent is dirty. */
export const STATE_DIRTY = 0x01
/** The name of the block allocation meta context. */
export const CONTEXT_BASE_ALLOCATION = 'base:allocation'

// ---- errors ----

const ERRNO: Record<string, number> = {
  EPERM: 1, ENOENT: 2, EINTR: 4, EIO: 5, EBADF: 9, EAGAIN: 11, ENOMEM: 12, EACCES: 13,
  EFAULT: 14, EBUSY: 16, EEXIST: 17, ENOTDIR: 20, EINVAL: 22, EMFILE: 24, ENOSPC: 28,
  EPIPE: 32, ERANGE: 34, ENAMETOOLONG: 36, ENOSYS: 38, EPROTO: 71, EOVERFLOW: 75,
  ENOTSOCK: 88, EPROTONOSUPPORT: 93, ENOTSUP: 95, EADDRINUSE: 98, EADDRNOTAVAIL: 99,
  ENETUNREACH: 101, ECONNABORTED: 103, ECONNRESET: 104, EISCONN: 106, ENOTCONN: 107,
  ESHUTDOWN: 108, ETIMEDOUT: 110, ECONNREFUSED: 111, EHOSTUNREACH: 113, ECANCELED: 125,
}

/** Every failure of this library (but an aborted call, which is an `AbortError`). */
export class NbdError extends Error {
  /** The errno name, e.g. `'EINVAL'`, `'EIO'`, `'ENOTCONN'`. */
  readonly code: string
  /** The positive POSIX number of {@link NbdError.code} (as libnbd's `nbd_get_errno`). */
  readonly errno: number
  /** The call that failed, e.g. `'pread'`. */
  readonly operation: string

  constructor(code: string, message: string, operation: string, errno?: number) {
    super(`${operation}: ${message}`)
    this.name = 'NbdError'
    this.code = code
    this.errno = errno ?? ERRNO[code] ?? 0
    this.operation = operation
  }
}

/** The error an aborted call rejects with (Node's usual shape). */
class AbortError extends Error {
  readonly code = 'ABORT_ERR'
  constructor(reason?: unknown) {
    super('The operation was aborted', reason === undefined ? undefined : { cause: reason })
    this.name = 'AbortError'
  }
}

const NATIVE_ERROR = /^\[([A-Z]+):(\d+)\] ([\s\S]*)$/

/** Turns anything thrown below into an `NbdError` for `operation`. */
function toNbdError(e: unknown, operation: string): Error {
  if (e instanceof NbdError || e instanceof AbortError) return e
  const message = e instanceof Error ? e.message : String(e)
  const m = NATIVE_ERROR.exec(message)
  if (m) return new NbdError(m[1]!, m[3]!, operation, Number(m[2]))
  // A conversion refused by the binding itself: the argument was of the wrong kind.
  return new NbdError('EINVAL', message, operation)
}

function invalid(operation: string, message: string, code = 'EINVAL'): NbdError {
  return new NbdError(code, message, operation)
}

// ---- argument checks (JavaScript values the Rust side cannot see the shape of) ----

const MAX_U64 = (1n << 64n) - 1n

function checkOffset(op: string, v: unknown): number | bigint {
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

function checkCount(op: string, v: unknown): number {
  if (typeof v !== 'number') throw invalid(op, `count must be a number, got ${describe(v)}`)
  if (!Number.isInteger(v) || v < 0) {
    throw invalid(op, `count must be a non-negative integer, got ${v}`)
  }
  if (!Number.isSafeInteger(v)) throw invalid(op, `count ${v} is too large`, 'ERANGE')
  return v
}

function checkBuffer(op: string, v: unknown): Buffer {
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

function checkBoolean(op: string, name: string, v: unknown): boolean {
  if (typeof v !== 'boolean') throw invalid(op, `${name} must be a boolean, got ${describe(v)}`)
  return v
}

function checkString(op: string, name: string, v: unknown): string {
  if (typeof v !== 'string') throw invalid(op, `${name} must be a string, got ${describe(v)}`)
  return v
}

function checkUint32(op: string, name: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw invalid(op, `${name} must be an integer from 0 to 2^32-1, got ${describe(v)}`)
  }
  return v
}

function describe(v: unknown): string {
  if (v === null) return 'null'
  if (typeof v === 'number' || typeof v === 'bigint' || typeof v === 'boolean') return `${typeof v} ${String(v)}`
  if (typeof v === 'string') return `string ${JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v)}`
  return typeof v
}

/** Options every command takes. */
export interface CmdOptions {
  /** Raw command flags (`CMD_FLAG_*`), OR-ed with the named ones; for libnbd parity. */
  flags?: number
  /** Aborts the call: it rejects with an `AbortError`, and a read's buffer is not written after that. */
  signal?: AbortSignal
}

/** The named flags each command accepts, and their bits. */
const NAMED_FLAGS = { fua: CMD_FLAG_FUA, noHole: CMD_FLAG_NO_HOLE, fastZero: CMD_FLAG_FAST_ZERO, df: CMD_FLAG_DF } as const
type FlagName = keyof typeof NAMED_FLAGS

function checkOptions(op: string, opts: unknown, named: readonly FlagName[]): { flags: number; signal: AbortSignal | undefined } {
  if (opts === undefined) return { flags: 0, signal: undefined }
  if (opts === null || typeof opts !== 'object') {
    throw invalid(op, `options must be an object, got ${describe(opts)}`)
  }
  const o = opts as Record<string, unknown>
  let flags = o.flags === undefined ? 0 : checkUint32(op, 'flags', o.flags)
  for (const name of named) {
    const v = o[name]
    if (v !== undefined && checkBoolean(op, name, v)) flags = (flags | NAMED_FLAGS[name]) >>> 0
  }
  const signal = o.signal
  if (signal !== undefined && !(signal instanceof AbortSignal)) {
    throw invalid(op, `signal must be an AbortSignal, got ${describe(signal)}`)
  }
  return { flags, signal }
}

// ---- the handle ----

/** Settings for a new {@link Handle}; each calls the setter of the same name. */
export interface HandleOptions {
  /** Export to attach to ({@link Handle.setExportName}); default `''`. */
  exportName?: string
  /** Name used in messages ({@link Handle.setHandleName}). */
  name?: string
  /** Strict-mode bits ({@link Handle.setStrictMode}); default all `STRICT_*`. */
  strict?: number
  /** Zero read buffers before reading ({@link Handle.setPreadInitialize}); default true. */
  preadInitialize?: boolean
  /** Ask for structured replies ({@link Handle.setRequestStructuredReplies}); default true. */
  requestStructuredReplies?: boolean
  /** Ask for block size constraints ({@link Handle.setRequestBlockSize}); default true. */
  requestBlockSize?: boolean
  /** Ask for the canonical name and description ({@link Handle.setFullInfo}); default false. */
  fullInfo?: boolean
  /** Handshake flags the client may use ({@link Handle.setHandshakeFlags}); default both. */
  handshakeFlags?: number
  /**
   * Milliseconds allowed for the whole connect and handshake; a server that stalls then
   * fails the connect with `ETIMEDOUT`. Default: no limit beyond the operating system's.
   */
  connectTimeout?: number
  /** Requests on the wire at once; more are queued, never refused. Default 64. */
  maxInFlight?: number
}

/** A handle's state, as libnbd names them. */
export type HandleState = 'created' | 'connecting' | 'negotiating' | 'ready' | 'processing' | 'dead' | 'closed'

/** Byte and chunk counters of a handle (libnbd's `nbd_stats_*`). */
export interface Stats {
  bytesSent: bigint
  chunksSent: bigint
  bytesReceived: bigint
  chunksReceived: bigint
}

/** Kinds of block size for {@link Handle.getBlockSize}. */
export type BlockSizeKind = 'minimum' | 'preferred' | 'maximum' | 'payload'

const asyncDispose: typeof Symbol.asyncDispose =
  (Symbol as { asyncDispose?: typeof Symbol.asyncDispose }).asyncDispose ??
  (Symbol.for('nodejs.asyncDispose') as typeof Symbol.asyncDispose)

// ---- completion of commands ----
//
// Every native command is started with an id and reports back once through one callback,
// shared by all handles (so the callback keeps no handle alive and garbage collection can
// close forgotten handles). The native side's notification channel does not hold the event
// loop open by itself; `keepAlive` does while any command is pending.

interface Settle {
  resolve(value: unknown): void
  reject(reason: unknown): void
  operation: string
}

const pending = new Map<number, Settle>()
let lastId = 0
let started = 0
const keepAlive = setInterval(() => {}, 0x3fffffff)
keepAlive.unref()

function onComplete(id: number, error: string | null, data: Buffer | null): void {
  if (--started === 0) keepAlive.unref()
  const settle = pending.get(id)
  if (settle === undefined) return // aborted: already rejected
  pending.delete(id)
  if (error === null) settle.resolve(data ?? undefined)
  else settle.reject(toNbdError(new Error(error), settle.operation))
}

function nextId(): number {
  do lastId = (lastId + 1) >>> 0
  while (pending.has(lastId))
  return lastId
}

/** The commands waiting on each signal, and the one 'abort' listener they share. */
const abortWatchers = new WeakMap<AbortSignal, { watchers: Set<() => void>; listener: () => void }>()

/**
 * Calls `onAbort` when `signal` aborts, until the returned function is called. All the
 * commands sharing a signal share one listener on it, so a signal passed to many commands
 * at once does not trip Node's MaxListenersExceededWarning; the listener goes with the last
 * of them, so a long-lived signal keeps nothing of ours once its commands are done.
 */
function watchAbort(signal: AbortSignal, onAbort: () => void): () => void {
  let entry = abortWatchers.get(signal)
  if (entry === undefined) {
    const watchers = new Set<() => void>()
    const listener = (): void => {
      abortWatchers.delete(signal)
      for (const f of watchers) f()
      watchers.clear()
    }
    signal.addEventListener('abort', listener, { once: true })
    entry = { watchers, listener }
    abortWatchers.set(signal, entry)
  }
  const { watchers, listener } = entry
  watchers.add(onAbort)
  return () => {
    if (!watchers.delete(onAbort) || watchers.size > 0) return
    abortWatchers.delete(signal)
    signal.removeEventListener('abort', listener)
  }
}

/**
 * Starts a native command; the promise settles when it completes, or at once with an
 * `AbortError` when `signal` aborts (the native side stops writing to any buffer first).
 */
function startCommand<T>(
  operation: string,
  signal: AbortSignal | undefined,
  start: (id: number, cancel: Binding.NativeCancel | undefined) => void,
): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const id = nextId()
    if (signal === undefined) {
      try {
        start(id, undefined)
      } catch (e) {
        reject(toNbdError(e, operation))
        return
      }
      pending.set(id, { resolve: resolve as (v: unknown) => void, reject, operation })
    } else {
      if (signal.aborted) {
        reject(new AbortError(signal.reason))
        return
      }
      const cancel = new native.NativeCancel()
      try {
        start(id, cancel)
      } catch (e) {
        reject(toNbdError(e, operation))
        return
      }
      const unwatch = watchAbort(signal, () => {
        cancel.cancel()
        pending.delete(id)
        reject(new AbortError(signal.reason))
      })
      pending.set(id, {
        resolve: (v) => {
          unwatch()
          resolve(v as T)
        },
        reject: (e) => {
          unwatch()
          reject(e)
        },
        operation,
      })
    }
    if (started++ === 0) keepAlive.ref()
  })
}

/**
 * A connection to one NBD export (libnbd's `struct nbd_handle`).
 *
 * Create it, connect it once, then issue commands: any number may be in flight at once,
 * and replies may come back in any order. Close it when done (or use `await using`); a
 * handle that is garbage-collected closes its socket too.
 *
 * Async methods never throw synchronously: bad arguments reject the promise with an
 * {@link NbdError}. Synchronous getters throw.
 */
export class Handle {
  readonly #native: Binding.NativeHandle

  /** A newly created handle (`nbd_create`); `options` calls the matching setters. */
  constructor(options?: HandleOptions) {
    this.#native = new native.NativeHandle(onComplete)
    if (options === undefined) return
    const op = 'create'
    if (options === null || typeof options !== 'object') {
      throw invalid(op, `options must be an object, got ${describe(options)}`)
    }
    const o = options as Record<string, unknown>
    if (o.exportName !== undefined) this.setExportName(o.exportName as string)
    if (o.name !== undefined) this.setHandleName(o.name as string)
    if (o.strict !== undefined) this.setStrictMode(o.strict as number)
    if (o.preadInitialize !== undefined) this.setPreadInitialize(o.preadInitialize as boolean)
    if (o.requestStructuredReplies !== undefined) this.setRequestStructuredReplies(o.requestStructuredReplies as boolean)
    if (o.requestBlockSize !== undefined) this.setRequestBlockSize(o.requestBlockSize as boolean)
    if (o.fullInfo !== undefined) this.setFullInfo(o.fullInfo as boolean)
    if (o.handshakeFlags !== undefined) this.setHandshakeFlags(o.handshakeFlags as number)
    if (o.connectTimeout !== undefined) {
      const ms = o.connectTimeout
      if (typeof ms !== 'number' || !(ms >= 0) || !Number.isFinite(ms)) {
        throw invalid(op, `connectTimeout must be a non-negative number of milliseconds, got ${describe(ms)}`)
      }
      this.#sync(op, () => this.#native.setConnectTimeout(ms))
    }
    if (o.maxInFlight !== undefined) {
      const n = o.maxInFlight
      if (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > 0xffffffff) {
        throw invalid(op, `maxInFlight must be a positive integer, got ${describe(n)}`)
      }
      this.#sync(op, () => this.#native.setMaxInFlight(n))
    }
  }

  /**
   * Runs an async native call, turning its errors into `NbdError`s. Not an `async` method:
   * a suspended one would hold `this` until the native call settles, so a handle nobody
   * references any more (one whose connect never finishes, say) could never be
   * garbage-collected and would keep its socket open.
   */
  #async<T>(op: string, f: () => Promise<T>): Promise<T> {
    let p: Promise<T>
    try {
      p = f()
    } catch (e) {
      return Promise.reject(toNbdError(e, op))
    }
    return p.then(undefined, (e: unknown) => {
      throw toNbdError(e, op)
    })
  }

  /** Runs a synchronous native call, turning its errors into `NbdError`s. */
  #sync<T>(op: string, f: () => T): T {
    try {
      return f()
    } catch (e) {
      throw toNbdError(e, op)
    }
  }

  // ---- state ----

  /** The handle's state: `created`, `connecting`, `negotiating`, `ready`, `processing`, `dead` or `closed`. */
  get state(): HandleState {
    return this.#native.state as HandleState
  }

  /** Commands issued and not yet finished (queued or on the wire). */
  get inFlight(): number {
    return this.#native.inFlight
  }

  /** Bytes and chunks sent and received so far, handshake included. */
  get stats(): Stats {
    return this.#native.stats()
  }

  // ---- connecting ----

  /**
   * Talks NBD over `fd`, an open, connected stream socket (Unix or TCP)
   * (`nbd_connect_socket`).
   *
   * The handle must be newly created and `fd` must be a connected stream socket; otherwise
   * the call rejects and the caller still owns `fd`. Once those checks pass the handle owns
   * `fd`, whether the handshake succeeds or not, and closes it when the handle is closed or
   * garbage-collected, never earlier. Resolves when the handshake is done.
   */
  async connectSocket(fd: number): Promise<void> {
    const op = 'connectSocket'
    return this.#async(op, async () => {
      if (typeof fd !== 'number' || !Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) {
        throw invalid(op, `fd must be a non-negative integer, got ${describe(fd)}`, typeof fd === 'number' ? 'EBADF' : 'EINVAL')
      }
      return this.#native.connectSocket(fd)
    })
  }

  /** Connects to a server listening on the Unix socket `path` (`nbd_connect_unix`). */
  async connectUnix(path: string): Promise<void> {
    const op = 'connectUnix'
    return this.#async(op, async () => this.#native.connectUnix(checkString(op, 'path', path)))
  }

  /**
   * Connects over TCP to `host` and `port` (a number, or a numeric string, or `'nbd'`)
   * (`nbd_connect_tcp`). Every address the host resolves to is tried in turn.
   */
  async connectTcp(host: string, port: number | string): Promise<void> {
    const op = 'connectTcp'
    return this.#async(op, async () => {
      checkString(op, 'host', host)
      let p: string
      if (typeof port === 'number') {
        if (!Number.isInteger(port) || port < 0 || port > 65535) throw invalid(op, `port must be 0–65535, got ${port}`)
        p = String(port)
      } else {
        p = checkString(op, 'port', port)
      }
      return this.#native.connectTcp(host, p)
    })
  }

  // ---- data ----

  /** Reads `count` bytes at `offset` into a new Buffer (`nbd_pread`). */
  async pread(count: number, offset: number | bigint, opts?: CmdOptions): Promise<Buffer> {
    const op = 'pread'
    const c = checkCount(op, count)
    const o = checkOffset(op, offset)
    const { flags, signal } = checkOptions(op, opts, [])
    return startCommand<Buffer>(op, signal, (id, cancel) => this.#native.pread(id, c, o, flags, cancel))
  }

  /**
   * Reads `buf.length` bytes at `offset` into `buf` (`nbd_pread`). Do not touch `buf` until
   * the promise settles. The data is copied into `buf` on the JavaScript thread as the
   * promise resolves; if the call is aborted or the handle closed first, the promise rejects
   * and `buf` is not written after that moment. With `preadInitialize` (the default) `buf`
   * is zeroed when the call starts, so a failed read leaves zeros.
   *
   * `buf` may be any Uint8Array, also a view into a SharedArrayBuffer (other threads then
   * see the data appear when the promise resolves) or a slice at any byte offset. A buffer
   * whose ArrayBuffer is detached (transferred) is refused with `EINVAL`; one detached while
   * the read is in flight is left alone and the call rejects with `EFAULT`.
   */
  async preadInto(buf: Uint8Array, offset: number | bigint, opts?: CmdOptions): Promise<void> {
    const op = 'preadInto'
    const b = checkBuffer(op, buf)
    const o = checkOffset(op, offset)
    const { flags, signal } = checkOptions(op, opts, [])
    return startCommand<void>(op, signal, (id, cancel) => this.#native.preadInto(id, b, o, flags, cancel))
  }

  /**
   * Writes `buf` at `offset` (`nbd_pwrite`). The bytes are copied when the call starts, so
   * `buf` may be reused, or even detached, at once. `buf` may be any Uint8Array, also a view
   * into a SharedArrayBuffer; a detached one is refused with `EINVAL`.
   */
  async pwrite(buf: Uint8Array, offset: number | bigint, opts?: CmdOptions & { fua?: boolean }): Promise<void> {
    const op = 'pwrite'
    const b = checkBuffer(op, buf)
    const o = checkOffset(op, offset)
    const { flags, signal } = checkOptions(op, opts, ['fua'])
    return startCommand<void>(op, signal, (id, cancel) => this.#native.pwrite(id, b, o, flags, cancel))
  }

  /** Asks the server to commit all completed writes to stable storage (`nbd_flush`). */
  async flush(opts?: CmdOptions): Promise<void> {
    const op = 'flush'
    const { flags, signal } = checkOptions(op, opts, [])
    return startCommand<void>(op, signal, (id, cancel) => this.#native.command(id, op, 0, 0, flags, cancel))
  }

  /** Tells the server `count` bytes at `offset` are no longer needed (`nbd_trim`). */
  async trim(count: number, offset: number | bigint, opts?: CmdOptions & { fua?: boolean }): Promise<void> {
    const op = 'trim'
    const c = checkCount(op, count)
    const o = checkOffset(op, offset)
    const { flags, signal } = checkOptions(op, opts, ['fua'])
    return startCommand<void>(op, signal, (id, cancel) => this.#native.command(id, op, c, o, flags, cancel))
  }

  /** Asks the server to prefetch `count` bytes at `offset` (`nbd_cache`). */
  async cache(count: number, offset: number | bigint, opts?: CmdOptions): Promise<void> {
    const op = 'cache'
    const c = checkCount(op, count)
    const o = checkOffset(op, offset)
    const { flags, signal } = checkOptions(op, opts, [])
    return startCommand<void>(op, signal, (id, cancel) => this.#native.command(id, op, c, o, flags, cancel))
  }

  /**
   * Writes `count` zero bytes at `offset` (`nbd_zero`). `noHole` asks for allocated
   * zeroes; `fastZero` asks the server to fail rather than zero slowly.
   */
  async zero(
    count: number,
    offset: number | bigint,
    opts?: CmdOptions & { fua?: boolean; noHole?: boolean; fastZero?: boolean },
  ): Promise<void> {
    const op = 'zero'
    const c = checkCount(op, count)
    const o = checkOffset(op, offset)
    const { flags, signal } = checkOptions(op, opts, ['fua', 'noHole', 'fastZero'])
    return startCommand<void>(op, signal, (id, cancel) => this.#native.command(id, op, c, o, flags, cancel))
  }

  // ---- ending ----

  /**
   * Disconnects cleanly (`nbd_shutdown`): waits for the commands in flight, sends
   * NBD_CMD_DISC and closes the write side. With `abandonPending` the disconnect is sent
   * at once and commands the server does not answer first reject with `ESHUTDOWN`.
   * The handle then is `closed`; getters keep working.
   */
  async shutdown(opts?: { abandonPending?: boolean }): Promise<void> {
    const op = 'shutdown'
    try {
      let abandon = false
      if (opts !== undefined) {
        if (opts === null || typeof opts !== 'object') throw invalid(op, `options must be an object, got ${describe(opts)}`)
        if (opts.abandonPending !== undefined) abandon = checkBoolean(op, 'abandonPending', opts.abandonPending)
      }
      return await this.#native.shutdown(abandon)
    } catch (e) {
      throw toNbdError(e, op)
    }
  }

  /**
   * Closes the handle: every pending command rejects, the socket is closed (and the fd
   * passed to {@link Handle.connectSocket} with it). Idempotent. After it, commands reject
   * with `EINVAL`.
   */
  async close(): Promise<void> {
    try {
      return await this.#native.close()
    } catch (e) {
      throw toNbdError(e, 'close')
    }
  }

  /** Same as {@link Handle.close}, for `await using`. */
  async [asyncDispose](): Promise<void> {
    return this.close()
  }

  // ---- information ----

  /**
   * The export size in bytes (`nbd_get_size`). As a number it throws `ERANGE` past
   * `Number.MAX_SAFE_INTEGER`; pass `{ bigint: true }` for a bigint.
   */
  getSize(opts?: { bigint?: false }): number
  getSize(opts: { bigint: true }): bigint
  getSize(opts?: { bigint?: boolean }): number | bigint
  getSize(opts?: { bigint?: boolean }): number | bigint {
    const op = 'getSize'
    let bigint = false
    if (opts !== undefined) {
      if (opts === null || typeof opts !== 'object') throw invalid(op, `options must be an object, got ${describe(opts)}`)
      if (opts.bigint !== undefined) bigint = checkBoolean(op, 'bigint', opts.bigint)
    }
    const size = this.#sync(op, () => this.#native.getSize())
    if (bigint) return size
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw invalid(op, `size ${size} is beyond Number.MAX_SAFE_INTEGER; use getSize({ bigint: true })`, 'ERANGE')
    }
    return Number(size)
  }

  /**
   * A block size constraint (`nbd_get_block_size`): `minimum`, `preferred` and `maximum`
   * as the server advertised them (0 when it did not), or `payload`, the largest read or
   * write this client sends in one command.
   */
  getBlockSize(kind: BlockSizeKind): number {
    return this.#sync('getBlockSize', () => this.#native.getBlockSize(checkString('getBlockSize', 'kind', kind)))
  }

  /** Whether the export is read-only (`nbd_is_read_only`). */
  isReadOnly(): boolean {
    return this.#sync('isReadOnly', () => this.#native.isReadOnly())
  }

  /** Whether the server says the export is on rotational media (`nbd_is_rotational`). */
  isRotational(): boolean {
    return this.#sync('isRotational', () => this.#native.isRotational())
  }

  /** Whether the server supports {@link Handle.flush} (`nbd_can_flush`). */
  canFlush(): boolean {
    return this.#sync('canFlush', () => this.#native.canFlush())
  }

  /** Whether the server supports the FUA flag (`nbd_can_fua`). */
  canFua(): boolean {
    return this.#sync('canFua', () => this.#native.canFua())
  }

  /** Whether the server supports {@link Handle.trim} (`nbd_can_trim`). */
  canTrim(): boolean {
    return this.#sync('canTrim', () => this.#native.canTrim())
  }

  /** Whether the server supports {@link Handle.zero} (`nbd_can_zero`). */
  canZero(): boolean {
    return this.#sync('canZero', () => this.#native.canZero())
  }

  /** Whether the server supports the fast-zero flag (`nbd_can_fast_zero`). */
  canFastZero(): boolean {
    return this.#sync('canFastZero', () => this.#native.canFastZero())
  }

  /** Whether the server supports the DF flag on structured reads (`nbd_can_df`). */
  canDf(): boolean {
    return this.#sync('canDf', () => this.#native.canDf())
  }

  /** Whether several connections to this export see each other's writes (`nbd_can_multi_conn`). */
  canMultiConn(): boolean {
    return this.#sync('canMultiConn', () => this.#native.canMultiConn())
  }

  /** Whether the server supports {@link Handle.cache} (`nbd_can_cache`). */
  canCache(): boolean {
    return this.#sync('canCache', () => this.#native.canCache())
  }

  /** The handshake the server spoke: `oldstyle`, `newstyle` or `newstyle-fixed` (`nbd_get_protocol`). */
  getProtocol(): 'oldstyle' | 'newstyle' | 'newstyle-fixed' {
    return this.#sync('getProtocol', () => this.#native.getProtocol()) as 'oldstyle' | 'newstyle' | 'newstyle-fixed'
  }

  /** Whether structured replies were negotiated (`nbd_get_structured_replies_negotiated`). */
  getStructuredRepliesNegotiated(): boolean {
    return this.#sync('getStructuredRepliesNegotiated', () => this.#native.getStructuredRepliesNegotiated())
  }

  // ---- settings ----

  /** Sets the export to attach to (`nbd_set_export_name`): before connecting. At most 4096 bytes. */
  setExportName(name: string): void {
    const op = 'setExportName'
    this.#sync(op, () => this.#native.setExportName(checkString(op, 'name', name)))
  }

  /** The export name that was set (`nbd_get_export_name`). */
  getExportName(): string {
    return this.#native.getExportName()
  }

  /** Names the handle in messages (`nbd_set_handle_name`). */
  setHandleName(name: string): void {
    const op = 'setHandleName'
    this.#sync(op, () => this.#native.setHandleName(checkString(op, 'name', name)))
  }

  /** The handle's name (`nbd_get_handle_name`). */
  getHandleName(): string {
    return this.#native.getHandleName()
  }

  /** Sets which client-side checks run (`nbd_set_strict_mode`, `STRICT_*` bits); any time. */
  setStrictMode(flags: number): void {
    const op = 'setStrictMode'
    this.#sync(op, () => this.#native.setStrictMode(checkUint32(op, 'flags', flags)))
  }

  /** The strict-mode bits (`nbd_get_strict_mode`). */
  getStrictMode(): number {
    return this.#native.getStrictMode()
  }

  /** Whether read buffers are zeroed before reading (`nbd_set_pread_initialize`); any time. */
  setPreadInitialize(v: boolean): void {
    const op = 'setPreadInitialize'
    this.#sync(op, () => this.#native.setPreadInitialize(checkBoolean(op, 'value', v)))
  }

  /** `nbd_get_pread_initialize`. */
  getPreadInitialize(): boolean {
    return this.#native.getPreadInitialize()
  }

  /** Whether to ask for structured replies (`nbd_set_request_structured_replies`): before connecting. */
  setRequestStructuredReplies(v: boolean): void {
    const op = 'setRequestStructuredReplies'
    this.#sync(op, () => this.#native.setRequestStructuredReplies(checkBoolean(op, 'value', v)))
  }

  /** `nbd_get_request_structured_replies`. */
  getRequestStructuredReplies(): boolean {
    return this.#native.getRequestStructuredReplies()
  }

  /** Whether to ask for block size constraints (`nbd_set_request_block_size`): before connecting. */
  setRequestBlockSize(v: boolean): void {
    const op = 'setRequestBlockSize'
    this.#sync(op, () => this.#native.setRequestBlockSize(checkBoolean(op, 'value', v)))
  }

  /** `nbd_get_request_block_size`. */
  getRequestBlockSize(): boolean {
    return this.#native.getRequestBlockSize()
  }

  /** Whether to ask for the canonical name and description (`nbd_set_full_info`): before connecting. */
  setFullInfo(v: boolean): void {
    const op = 'setFullInfo'
    this.#sync(op, () => this.#native.setFullInfo(checkBoolean(op, 'value', v)))
  }

  /** `nbd_get_full_info`. */
  getFullInfo(): boolean {
    return this.#native.getFullInfo()
  }

  /** Which handshake flags the client may use (`nbd_set_handshake_flags`, `HANDSHAKE_FLAG_*`): before connecting. */
  setHandshakeFlags(flags: number): void {
    const op = 'setHandshakeFlags'
    this.#sync(op, () => this.#native.setHandshakeFlags(checkUint32(op, 'flags', flags)))
  }

  /** `nbd_get_handshake_flags`. */
  getHandshakeFlags(): number {
    return this.#native.getHandshakeFlags()
  }
}
