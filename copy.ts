/**
 * `copy()`: nbdcopy's work in the library.
 *
 * Two engines:
 * - **native** (crates/nbd-copy), used whenever both ends are NBD URIs, `Handle`s that can
 *   name their export with {@link Handle.getUri}, local files or block devices, or `'null:'`.
 *   Bytes move in Rust with no JavaScript per request; for a `Handle` the engine opens its
 *   own connections to the same export (from `getUri()`, which carries the TLS settings),
 *   because the handle's own connection is driven from the JavaScript thread. A server that
 *   serves one client at a time (qemu-nbd without `--shared`) leaves those unanswered while
 *   the handle is connected: when the engine's first connection to a handle's export has
 *   not finished its handshake within {@link HANDLE_CONNECT_WAIT_MS}, the javascript engine
 *   copies through the handle itself instead.
 * - **javascript**, used when one end is a Node stream, or a `Handle` that no URI describes
 *   (connected with `connectSocket`, `connectCommand`, …): it drives `pread`/`pwrite`/`zero`
 *   of the handles with many requests in flight and moves stream data in `requestSize`
 *   blocks.
 *
 * {@link CopyResult.engine} says which one ran.
 *
 * @packageDocumentation
 */

import fs from 'node:fs'
import path from 'node:path'
import type { Readable, Writable } from 'node:stream'
import type * as Binding from './binding'
import { CONTEXT_BASE_ALLOCATION, STATE_ZERO } from './constants'
import { NbdError, abortError, checkAborted, makeError } from './errors'
import { Handle } from './handle'
import { native } from './native'
import { requestSize as fitRequest } from './streams'
import { isUri } from './support'

/** One end of a copy: an NBD URI, `'null:'` (destination only), a file or block device path, a `Handle`, or a Node stream. */
export type CopyEndpoint = string | Handle | Readable | Writable

/** Progress of a copy, as {@link CopyOptions.onProgress} receives it. */
export interface CopyProgress {
  /** Bytes of the source dealt with so far (copied, zeroed or skipped). */
  bytesDone: number
  /** The source's size (0 while unknown, e.g. for a stream). */
  bytesTotal: number
  /** Of `bytesDone`, the bytes that were zero. */
  bytesZero: number
}

/** Options of {@link copy}; the defaults are nbdcopy's, but `flush` is on. */
export interface CopyOptions {
  /**
   * Connections per NBD side (native engine); default 4, at most one per CPU (as nbdcopy),
   * where multi-conn is safe (canMultiConn, or a read-only source), else 1. If the server
   * refuses the extra connections or leaves them unanswered, the copy goes on with one by
   * default, and fails (`ETIMEDOUT` for connections left unanswered) when a number was given.
   */
  connections?: number
  /** Requests in flight per connection; default 64. */
  requests?: number
  /** Bytes per request; default 256 KiB, raised to the servers' preferred, capped at their maximum block size and rounded down to a multiple of their minimum. */
  requestSize?: number
  /** Zero detection granularity in bytes (a power of two ≥ 512; default 4096), or `false` to write every byte read. */
  sparse?: number | false
  /** Zero ranges become allocated zeroes (zero with `noHole`) instead of holes, and data is not scanned for zeroes. */
  allocated?: boolean
  /** The destination already reads as zeroes: zero ranges are skipped. (A regular destination file is truncated first, so it always does.) */
  destinationIsZero?: boolean
  /** Flush the destination before resolving; default true. */
  flush?: boolean
  /** Aborts the copy: it rejects with an `AbortError`, having closed what it opened. */
  signal?: AbortSignal
  /**
   * Called at most 10 times a second while the copy runs, and once at the end. If it throws,
   * the copy stops as if aborted and rejects with what it threw.
   */
  onProgress?(p: CopyProgress): void
}

/** What {@link copy} resolves to. */
export interface CopyResult {
  /** Bytes copied (the source's size). */
  bytes: number
  /** Of those, bytes written as data. */
  dataBytes: number
  /** Of those, bytes that were zero (zero requests, holes, or skipped). */
  zeroBytes: number
  seconds: number
  /** Which engine ran: `native` (Rust, no JavaScript per request) or `javascript` (streams, handles without a URI). */
  engine: 'native' | 'javascript'
}

const MiB = 1024 * 1024
/** The most connections per NBD side and requests in flight per connection copy() takes (not exported from the package; the command line uses them). */
export const COPY_LIMITS = { connections: 64, requests: 1024 } as const

function fail(message: string, code = 'EINVAL'): NbdError {
  return new NbdError(code, message, 'copy')
}

function isReadable(x: unknown): x is Readable {
  return x !== null && typeof x === 'object' && typeof (x as Readable).read === 'function' && typeof (x as Readable).on === 'function'
}

function isWritable(x: unknown): x is Writable {
  return x !== null && typeof x === 'object' && typeof (x as Writable).write === 'function' && typeof (x as Writable).end === 'function'
}

interface Settled {
  connections?: number
  requests: number
  requestSize: number
  sparse: number
  allocated: boolean
  destinationIsZero: boolean
  flush: boolean
  signal?: AbortSignal
  onProgress?: (p: CopyProgress) => void
}

function positive(name: string, v: unknown, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > max) {
    throw fail(`${name} must be an integer from 1 to ${max}, got ${String(v)}`)
  }
  return v
}

function settle(options: CopyOptions | undefined): Settled {
  if (options !== undefined && (options === null || typeof options !== 'object')) throw fail('options must be an object')
  const o = options ?? {}
  const bool = (name: keyof CopyOptions, dflt: boolean): boolean => {
    const v = o[name]
    if (v === undefined) return dflt
    if (typeof v !== 'boolean') throw fail(`${name} must be a boolean, got ${typeof v}`)
    return v
  }
  let sparse = 4096
  if (o.sparse === false) sparse = 0
  else if (o.sparse !== undefined) {
    sparse = positive('sparse', o.sparse, 64 * MiB)
    if (sparse < 512 || (sparse & (sparse - 1)) !== 0) throw fail(`sparse must be a power of two of at least 512, or false, got ${sparse}`)
  }
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw fail('signal must be an AbortSignal')
  if (o.onProgress !== undefined && typeof o.onProgress !== 'function') throw fail('onProgress must be a function')
  return {
    connections: o.connections === undefined ? undefined : positive('connections', o.connections, COPY_LIMITS.connections),
    requests: o.requests === undefined ? 64 : positive('requests', o.requests, COPY_LIMITS.requests),
    requestSize: o.requestSize === undefined ? 256 * 1024 : positive('requestSize', o.requestSize, 64 * MiB),
    sparse,
    allocated: bool('allocated', false),
    destinationIsZero: bool('destinationIsZero', false),
    flush: bool('flush', true),
    signal: o.signal,
    onProgress: o.onProgress,
  }
}

type NativeEndpoint = Binding.NativeCopyEndpoint

/**
 * Milliseconds the native engine waits for its own connection to a `Handle`'s export before
 * the copy goes through the handle instead (the server may serve one client at a time).
 */
const HANDLE_CONNECT_WAIT_MS = 3000

/** The native engine's view of an endpoint, or undefined when only the JavaScript engine can serve it. */
function nativeEndpoint(e: CopyEndpoint, source: boolean): NativeEndpoint | undefined {
  if (typeof e === 'string') {
    if (e === 'null:') {
      if (source) throw fail("'null:' can only be a destination")
      return { kind: 'null' }
    }
    if (isUri(e)) return { kind: 'nbd', uri: e }
    if (e === '') throw fail('an empty path')
    return { kind: 'file', path: path.resolve(e) }
  }
  if (e instanceof Handle) {
    // Connected: idle (`ready`) or with commands of its own in flight (`processing`).
    if (e.state !== 'ready' && e.state !== 'processing') {
      throw fail(`the ${source ? 'source' : 'destination'} handle is ${e.state}, not connected`)
    }
    try {
      return { kind: 'nbd', uri: e.getUri(), connectTimeout: HANDLE_CONNECT_WAIT_MS }
    } catch {
      return undefined
    }
  }
  if (source ? isReadable(e) : isWritable(e)) return undefined
  throw fail(`the ${source ? 'source' : 'destination'} must be an NBD URI, ${source ? '' : "'null:', "}a path, a Handle or a ${source ? 'Readable' : 'Writable'} stream`)
}

/**
 * Whether `e` says the native engine's first connection to a side given as a Handle timed out.
 * Only that connection carries a connect timeout; the extra connections' own wait fails with
 * a message of its own ("left another connection unanswered"), so the two cannot be confused.
 */
function unansweredHandleSide(e: unknown, source: CopyEndpoint, destination: CopyEndpoint): boolean {
  if (!(e instanceof NbdError) || e.code !== 'ETIMEDOUT') return false
  return (source instanceof Handle && /connecting to the source/.test(e.message)) ||
    (destination instanceof Handle && /connecting to the destination/.test(e.message))
}

/** Calls onProgress at most every 100 ms, and once more at the end. */
function progressReporter(s: Settled, read: () => CopyProgress): { stop(final: boolean): void } {
  if (!s.onProgress) return { stop() {} }
  const report = s.onProgress
  const timer = setInterval(() => report(read()), 100)
  return {
    stop(final: boolean) {
      clearInterval(timer)
      if (final) report(read())
    },
  }
}

/**
 * Copies a whole export, file or stream to another, like nbdcopy: the source's
 * `base:allocation` extents decide what is read, data blocks that are all zero (`sparse`
 * granularity) become zero requests (or holes in a file), and with `connections` ×
 * `requests` requests in flight reads and writes overlap.
 *
 * A destination path is created if missing. A regular destination file is truncated to the
 * source's size first (whatever it held, as nbdcopy does), so zero ranges stay holes; a block
 * device or an NBD export smaller than the source is refused with `ENOSPC`, a larger one
 * keeps its tail. A Readable source is read to its end (its size is not known in advance and
 * its data is written as it comes); a Writable destination receives every byte in order,
 * holes as zeroes, and is ended when the copy is done.
 *
 * Errors are `NbdError`s with operation `copy` that name the side and the offset:
 * `copy: reading the source at 1048576: EIO: …`.
 *
 * The native engine runs on threads of its own, one per connection. On Linux, such a thread
 * that finds another of the copy's threads on its CPU moves itself to a CPU none of them is
 * on, by setting its own CPU affinity and at once setting it back: left together, they drag a
 * local server's threads between CPUs. `NBD_CLIENT_COPY_PLACEMENT=off` in the environment
 * turns this off.
 *
 * @example
 * ```ts
 * const r = await copy('nbd+unix:///disk?socket=/run/nbd.sock', 'backup.img', {
 *   onProgress: ({ bytesDone, bytesTotal }) => console.log(`${((100 * bytesDone) / bytesTotal).toFixed(1)}%`),
 * })
 * console.log(r.bytes, r.dataBytes, r.zeroBytes, r.seconds, r.engine)
 * ```
 */
export async function copy(source: CopyEndpoint, destination: CopyEndpoint, options?: CopyOptions): Promise<CopyResult> {
  const s = settle(options)
  checkAborted(s.signal)
  const src = nativeEndpoint(source, true)
  const dst = nativeEndpoint(destination, false)
  if (isWritable(destination) && (destination.destroyed || destination.writableEnded)) {
    throw fail('the destination stream was destroyed or ended before the copy', 'EPIPE')
  }
  const run = (settled: Settled) => (src !== undefined && dst !== undefined
    ? copyNative(src, dst, settled).catch((e: unknown) => {
      // The engine's own first connection to a handle's export went unanswered: copy
      // through the handle. (Nothing was read or written yet: the sides are opened first,
      // and the extra connections, opened after a file destination was truncated, do not
      // carry this timeout.)
      if (!unansweredHandleSide(e, source, destination)) throw e
      return copyJs(source, destination, settled)
    })
    : copyJs(source, destination, settled))
  if (!s.onProgress) return run(s)
  // An onProgress that throws stops the copy, which rejects with what it threw: the engines
  // see an abort of their own signal.
  const user = s.signal
  const stop = new AbortController()
  const forward = () => stop.abort(user?.reason)
  user?.addEventListener('abort', forward, { once: true })
  const report = s.onProgress
  let thrown: { error: unknown } | undefined
  const guarded = (p: CopyProgress) => {
    if (thrown) return
    try {
      report(p)
    } catch (error) {
      thrown = { error }
      stop.abort(error)
    }
  }
  const inner: Settled = { ...s, signal: stop.signal, onProgress: guarded }
  try {
    const r = await run(inner)
    if (thrown) throw thrown.error
    return r
  } catch (e) {
    if (thrown) throw thrown.error
    if (user?.aborted) throw abortError(user)
    throw e
  } finally {
    user?.removeEventListener('abort', forward)
  }
}

async function copyNative(src: NativeEndpoint, dst: NativeEndpoint, s: Settled): Promise<CopyResult> {
  const job = new native.NativeCopy(makeError)
  const onAbort = () => job.abort()
  s.signal?.addEventListener('abort', onAbort, { once: true })
  const progress = progressReporter(s, () => job.progress())
  let ok = false
  try {
    const r = await job.run(src, dst, {
      connections: s.connections,
      requests: s.requests,
      requestSize: s.requestSize,
      sparse: s.sparse,
      allocated: s.allocated,
      destinationIsZero: s.destinationIsZero,
      flush: s.flush,
    })
    ok = true
    return { bytes: r.bytes, dataBytes: r.dataBytes, zeroBytes: r.zeroBytes, seconds: r.seconds, engine: 'native' }
  } catch (e) {
    if (s.signal?.aborted) throw abortError(s.signal)
    // The engine's failures are NbdErrors of operation 'copy' already.
    if (e instanceof NbdError) throw e
    throw fail(e instanceof Error ? e.message : String(e))
  } finally {
    s.signal?.removeEventListener('abort', onAbort)
    progress.stop(ok)
  }
}

// ---- the JavaScript engine (streams, handles without a URI) ----

interface Piece {
  offset: number
  length: number
  zero: boolean
}

interface Source {
  /** Undefined for a stream. */
  size: number | undefined
  /** An NBD source: requests must fit its block-size limits. */
  handle?: Handle
  /** Pieces of [offset, offset+length): zero where the source reads as zeroes. */
  extents(offset: number, length: number): Promise<Piece[]>
  read(offset: number, length: number): Promise<Buffer>
  close(): Promise<void>
}

interface Sink {
  /** Writes must arrive in order (a stream). */
  sequential: boolean
  /** An NBD destination: writes must fit its block-size limits. */
  handle?: Handle
  /** Reads as zeroes already (a truncated file). */
  isZero: boolean
  /** Undefined when there is no limit. */
  size: number | undefined
  /** Makes the sink `size` bytes where it can (a regular file), before anything is written. */
  prepare(size: number | undefined): Promise<void>
  write(offset: number, data: Buffer): Promise<void>
  zero(offset: number, length: number, allocated: boolean): Promise<void>
  /** Called once a stream source has ended at `size` bytes (a file skipped its trailing zeroes: extend it). */
  ended?(size: number): Promise<void>
  flush(): Promise<void>
  close(ok: boolean): Promise<void>
}

/**
 * Any failure of a copy as its NbdError, naming what the copy was doing: `what: message`
 * (opening or connecting to an end), or at an offset `what at offset: CODE: message`
 * (`reading the source at 1048576: EIO: …`).
 */
function copyError(e: unknown, what: string, signal?: AbortSignal, offset?: number): Error {
  if (signal?.aborted) return abortError(signal)
  let code = 'EIO'
  let errno: number | undefined
  let known = false
  let message = e instanceof Error ? e.message : String(e)
  if (e instanceof NbdError) {
    ;({ code, errno } = e)
    message = message.replace(/^[a-zA-Z]+: /, '')
    known = true
  } else {
    const err = e as NodeJS.ErrnoException
    if (err && typeof err.code === 'string' && /^E[A-Z]+$/.test(err.code)) {
      code = err.code
      errno = typeof err.errno === 'number' ? Math.abs(err.errno) : undefined
      known = true
    }
  }
  if (offset === undefined) return new NbdError(code, `${what}: ${message}`, 'copy', errno)
  return new NbdError(code, `${what} at ${offset}: ${known ? `${code}: ` : ''}${message}`, 'copy', errno)
}

async function openHandle(uri: string, source: boolean): Promise<Handle> {
  const h = new Handle({ uriAllowLocalFile: true, metaContexts: source ? [CONTEXT_BASE_ALLOCATION] : [] })
  try {
    await h.connectUri(uri)
  } catch (e) {
    await h.close()
    throw e
  }
  return h
}

function handleSource(h: Handle, owned: boolean, signal?: AbortSignal): Source {
  const hasExtents = h.canMetaContext(CONTEXT_BASE_ALLOCATION)
  return {
    handle: h,
    size: h.getSize(),
    async extents(offset, length) {
      if (!hasExtents) return [{ offset, length, zero: false }]
      const out: Piece[] = []
      for await (const e of h.map({ offset, length, signal })) {
        out.push({ offset: e.offset, length: e.length, zero: (e.flags & STATE_ZERO) !== 0 })
      }
      return out
    },
    read: (offset, length) => h.pread(length, offset, { signal }),
    close: () => (owned ? h.close() : Promise.resolve()),
  }
}

/** Opens a local path, which must be a regular file or a block device. */
async function openLocal(p: string, flags: number, mode?: number): Promise<{ fh: fs.promises.FileHandle; st: fs.Stats }> {
  const notAFile = () => fail(`${p} is neither a regular file nor a block device (use a stream for pipes)`)
  // Looked at first, so that a FIFO is never opened: opening one waits (in the thread pool,
  // beyond abort) for its other end. (A block device is opened as usual: some drivers skip
  // their media checks on a non-blocking open.)
  const seen = await fs.promises.stat(p).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return undefined
    throw e
  })
  if (seen && !seen.isFile() && !seen.isBlockDevice()) throw notAFile()
  const fh = await fs.promises.open(p, flags, mode)
  const st = await fh.stat().catch(async (e: unknown) => {
    await fh.close()
    throw e
  })
  if (!st.isFile() && !st.isBlockDevice()) {
    await fh.close()
    throw notAFile()
  }
  return { fh, st }
}

async function fileSource(p: string): Promise<Source> {
  const { fh, st } = await openLocal(p, fs.constants.O_RDONLY)
  return {
    size: st.size,
    extents: async (offset, length) => [{ offset, length, zero: false }],
    async read(offset, length) {
      const buf = Buffer.allocUnsafe(length)
      let done = 0
      while (done < length) {
        const { bytesRead } = await fh.read(buf, done, length - done, offset + done)
        if (bytesRead === 0) throw Object.assign(new Error('unexpected end of file'), { code: 'EIO' })
        done += bytesRead
      }
      return buf
    },
    close: () => fh.close(),
  }
}

function handleSink(h: Handle, owned: boolean, signal?: AbortSignal): Sink {
  if (h.isReadOnly()) throw fail('the destination is read-only', 'EPERM')
  return {
    handle: h,
    sequential: false,
    isZero: false,
    size: h.getSize(),
    async prepare() {},
    write: (offset, data) => h.pwrite(data, offset, { signal }),
    async zero(offset, length, allocated) {
      if (h.canZero()) return h.zero(length, offset, { noHole: allocated, signal })
      // No zero command: zeroes written in requests within the server's limits.
      const block = Buffer.alloc(Math.min(length, fitRequest(h, 1 * MiB).size))
      for (let at = offset; at < offset + length; at += block.length) {
        await h.pwrite(block.subarray(0, Math.min(block.length, offset + length - at)), at, { signal })
      }
    },
    flush: async () => {
      if (h.canFlush()) await h.flush({ signal })
    },
    close: async (ok) => {
      if (!owned) return
      if (ok) await h.shutdown().catch(() => {})
      await h.close()
    },
  }
}

async function fileSink(p: string): Promise<Sink> {
  const { O_RDWR, O_WRONLY, O_CREAT, O_EXCL } = fs.constants
  let opened: { fh: fs.promises.FileHandle; st: fs.Stats }
  try {
    opened = await openLocal(p, O_RDWR)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e
    opened = await openLocal(p, O_WRONLY | O_CREAT | O_EXCL, 0o644)
  }
  const { fh, st } = opened
  const regular = st.isFile()
  let size: number | undefined
  return {
    sequential: false,
    isZero: regular,
    get size() {
      return size
    },
    async prepare(want) {
      if (!regular) return
      await fh.truncate(0)
      if (want !== undefined) await fh.truncate(want)
      size = undefined
    },
    async write(offset, data) {
      let done = 0
      while (done < data.length) {
        const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done)
        done += bytesWritten
      }
    },
    async zero(offset, length) {
      const block = Buffer.alloc(Math.min(length, 1 * MiB))
      for (let at = offset; at < offset + length; at += block.length) {
        await fh.write(block, 0, Math.min(block.length, offset + length - at), at)
      }
    },
    async ended(total) {
      if (regular && (await fh.stat()).size < total) await fh.truncate(total)
    },
    flush: () => fh.sync(),
    close: () => fh.close(),
  }
}

function nullSink(): Sink {
  return {
    sequential: false,
    isZero: true,
    size: undefined,
    async prepare() {},
    async write() {},
    async zero() {},
    async flush() {},
    async close() {},
  }
}

function streamSink(w: Writable, signal?: AbortSignal): Sink {
  let failure: Error | undefined
  const onError = (e: Error) => {
    failure = e
  }
  w.on('error', onError)
  // A stream destroyed without an error (as an HTTP response whose client went away) takes
  // no more data: the copy fails rather than wait for a 'drain' or 'finish' that never comes.
  const gone = () => new NbdError('EPIPE', 'the destination stream was destroyed before the copy ended', 'copy')
  const waitFor = (event: 'drain' | 'finish') =>
    new Promise<void>((resolve, reject) => {
      const done = () => {
        cleanup()
        resolve()
      }
      const closed = () => {
        cleanup()
        if (failure) reject(failure)
        else if (event === 'finish' && w.writableFinished) resolve()
        else reject(gone())
      }
      const bad = (e: Error) => {
        cleanup()
        reject(e)
      }
      const aborted = () => {
        cleanup()
        reject(abortError(signal))
      }
      const cleanup = () => {
        w.off(event, done)
        w.off('error', bad)
        w.off('close', closed)
        signal?.removeEventListener('abort', aborted)
      }
      w.once(event, done)
      w.once('error', bad)
      w.once('close', closed)
      signal?.addEventListener('abort', aborted, { once: true })
    })
  const put = async (data: Buffer) => {
    if (failure) throw failure
    if (w.destroyed || w.writableEnded) throw gone()
    if (!w.write(data)) await waitFor('drain')
    if (failure) throw failure
  }
  return {
    sequential: true,
    isZero: false,
    size: undefined,
    async prepare() {},
    write: (_offset, data) => put(data),
    async zero(_offset, length) {
      const block = Buffer.alloc(Math.min(length, 1 * MiB))
      for (let left = length; left > 0; left -= block.length) await put(left >= block.length ? block : block.subarray(0, left))
    },
    async flush() {},
    async close(ok) {
      w.off('error', onError)
      if (ok) {
        if (failure) throw failure
        if (w.writableFinished) return
        if (w.destroyed) throw gone()
        const finished = waitFor('finish')
        w.end()
        await finished
        if (failure) throw failure
      }
    },
  }
}

/**
 * Runs `work` over `items` with at most `limit` at once; the first failure stops the rest,
 * even while the next item is still awaited (an idle stream source must not hide a
 * destination that failed). The iterator is closed once that pending item arrives; a caller
 * whose items may never come (a stream) ends their source itself.
 */
async function pool<T>(items: AsyncIterable<T>, limit: number, work: (item: T) => Promise<void>): Promise<void> {
  const running = new Set<Promise<void>>()
  let failure: unknown
  let failed = false
  const FAILED = Symbol('failed')
  let onFailed = () => {}
  const failedNow = new Promise<typeof FAILED>((resolve) => {
    onFailed = () => resolve(FAILED)
  })
  const it = items[Symbol.asyncIterator]()
  for (;;) {
    if (failed) {
      await it.return?.()
      break
    }
    const next = it.next()
    const r = await Promise.race([next, failedNow])
    if (r === FAILED) {
      next.then(
        () => it.return?.()?.catch(() => {}),
        () => {},
      )
      break
    }
    if (r.done) break
    const p: Promise<void> = work(r.value).then(
      () => {
        running.delete(p)
      },
      (e: unknown) => {
        running.delete(p)
        if (!failed) {
          failed = true
          failure = e
          onFailed()
        }
      },
    )
    running.add(p)
    if (running.size >= limit) await Promise.race(running)
  }
  await Promise.all(running)
  if (failed) throw failure
}

/** Splits a buffer read at `offset` into data and zero runs at `granule` blocks aligned to the source. */
function zeroRuns(buf: Buffer, offset: number, granule: number): Piece[] {
  const out: Piece[] = []
  const push = (o: number, length: number, zero: boolean) => {
    const last = out[out.length - 1]
    if (last && last.zero === zero && last.offset + last.length === o) last.length += length
    else out.push({ offset: o, length, zero })
  }
  const first = Math.min(Math.ceil(offset / granule) * granule - offset, buf.length)
  if (first > 0) push(offset, first, false)
  for (let at = first; at < buf.length; at += granule) {
    const n = Math.min(granule, buf.length - at)
    const zero = n === granule && buf.subarray(at, at + n).every((b) => b === 0)
    push(offset + at, n, zero)
  }
  return out
}

async function copyJs(source: CopyEndpoint, destination: CopyEndpoint, s: Settled): Promise<CopyResult> {
  const started = process.hrtime.bigint()
  const signal = s.signal
  let src: Source | undefined
  let sink: Sink | undefined
  let stream: Readable | undefined
  const counters = { bytesDone: 0, bytesTotal: 0, bytesZero: 0, dataBytes: 0 }
  const progress = progressReporter(s, () => ({ bytesDone: counters.bytesDone, bytesTotal: counters.bytesTotal, bytesZero: counters.bytesZero }))
  let ok = false
  try {
    // Open both ends.
    if (typeof source === 'string') {
      const uri = isUri(source)
      try {
        src = uri ? handleSource(await openHandle(source, true), true, signal) : await fileSource(path.resolve(source))
      } catch (e) {
        throw copyError(e, uri ? 'connecting to the source' : `opening the source ${source}`, signal)
      }
    } else if (source instanceof Handle) {
      src = handleSource(source, false, signal)
    } else {
      stream = source as Readable
    }
    checkAborted(signal)
    if (typeof destination === 'string') {
      const uri = isUri(destination)
      try {
        if (destination === 'null:') sink = nullSink()
        else if (uri) sink = handleSink(await openHandle(destination, false), true, signal)
        else sink = await fileSink(path.resolve(destination))
      } catch (e) {
        throw copyError(e, uri ? 'connecting to the destination' : `opening the destination ${destination}`, signal)
      }
    } else if (destination instanceof Handle) {
      sink = handleSink(destination, false, signal)
    } else {
      sink = streamSink(destination as Writable, signal)
    }
    checkAborted(signal)
    const size = src?.size
    if (size !== undefined && sink.size !== undefined && sink.size < size) {
      throw fail(`the destination (${sink.size} bytes) is smaller than the source (${size} bytes)`, 'ENOSPC')
    }
    await sink.prepare(size).catch((e: unknown) => {
      throw copyError(e, 'preparing the destination', signal, 0)
    })
    const destinationIsZero = s.destinationIsZero || sink.isZero
    counters.bytesTotal = size ?? 0
    const out = sink
    // Requests within both NBD ends' limits (payload, advertised maximum, minimum alignment).
    let request = s.requestSize
    for (const h of [src?.handle, out.handle]) if (h !== undefined) request = fitRequest(h, request).size
    // Zero detection in blocks no smaller than the destination's minimum, so that the data
    // and zero runs it splits a piece into stay aligned to it.
    const granule = Math.max(s.sparse, out.handle?.getBlockSize('minimum') ?? 0)
    const zeroOut = async (offset: number, length: number) => {
      if (!destinationIsZero || out.sequential) {
        await out.zero(offset, length, s.allocated).catch((e: unknown) => {
          throw copyError(e, 'zeroing the destination', signal, offset)
        })
      }
      counters.bytesZero += length
      counters.bytesDone += length
    }
    const writeOut = async (offset: number, data: Buffer) => {
      const runs = s.sparse > 0 && !s.allocated && !out.sequential ? zeroRuns(data, offset, granule) : [{ offset, length: data.length, zero: false }]
      for (const r of runs) {
        if (r.zero) {
          await zeroOut(r.offset, r.length)
          continue
        }
        await out.write(r.offset, data.subarray(r.offset - offset, r.offset - offset + r.length)).catch((e: unknown) => {
          throw copyError(e, 'writing the destination', signal, r.offset)
        })
        counters.dataBytes += r.length
        counters.bytesDone += r.length
      }
    }
    const limit = s.requests * (s.connections ?? 1)

    if (stream !== undefined) {
      // A Readable: blocks of the request size in the order they come.
      let offset = 0
      let pending: Buffer[] = []
      let pendingLength = 0
      async function* blocks(): AsyncGenerator<{ offset: number; data: Buffer }> {
        for await (const chunk of stream as AsyncIterable<Buffer | string>) {
          checkAborted(signal)
          const b = typeof chunk === 'string' ? Buffer.from(chunk) : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength)
          pending.push(b)
          pendingLength += b.length
          if (pendingLength < request) continue
          // Joined once (not again for every block cut off: a large chunk would be copied
          // over and over), then cut into whole blocks; the rest waits for the next chunk.
          const all = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingLength)
          let at = 0
          while (all.length - at >= request) {
            yield { offset, data: all.subarray(at, at + request) }
            at += request
            offset += request
          }
          pending = at < all.length ? [all.subarray(at)] : []
          pendingLength = all.length - at
        }
        if (pendingLength > 0) {
          yield { offset, data: Buffer.concat(pending, pendingLength) }
          offset += pendingLength
        }
      }
      const onAbort = () => stream!.destroy(abortError(signal))
      signal?.addEventListener('abort', onAbort, { once: true })
      try {
        await pool(blocks(), out.sequential ? 1 : limit, ({ offset: o, data }) => {
          if (out.size !== undefined && o + data.length > out.size) {
            throw fail(`writing the destination at ${o}: ENOSPC: the source is larger than the destination (${out.size} bytes)`, 'ENOSPC')
          }
          return writeOut(o, data)
        })
      } catch (e) {
        // The source may be waiting for data that never comes: it is ended here, as an
        // early end of its iteration would have ended it.
        if (!stream.destroyed) stream.destroy()
        if (signal?.aborted) throw abortError(signal)
        if (e instanceof NbdError) throw e
        throw copyError(e, 'reading the source', signal, offset)
      } finally {
        signal?.removeEventListener('abort', onAbort)
      }
      counters.bytesTotal = offset
      await out.ended?.(offset).catch((e: unknown) => {
        throw copyError(e, 'extending the destination', signal, offset)
      })
    } else {
      // Random access: extents per unit, pieces of the request size.
      const input = src!
      const total = size!
      const unit = 32 * MiB
      async function* pieces(): AsyncGenerator<Piece> {
        for (let start = 0; start < total; start += unit) {
          checkAborted(signal)
          const length = Math.min(unit, total - start)
          let extents: Piece[]
          try {
            extents = await input.extents(start, length)
          } catch (e) {
            throw copyError(e, 'block status of the source', signal, start)
          }
          let k = 0
          let zeroFrom = -1
          for (let at = start; at < start + length; ) {
            const n = Math.min(request, start + length - at)
            while (k + 1 < extents.length && extents[k]!.offset + extents[k]!.length <= at) k++
            let allZero = true
            for (let j = k; j < extents.length && extents[j]!.offset < at + n; j++) if (!extents[j]!.zero) allZero = false
            if (allZero) {
              if (zeroFrom < 0) zeroFrom = at
            } else {
              if (zeroFrom >= 0) yield { offset: zeroFrom, length: at - zeroFrom, zero: true }
              zeroFrom = -1
              yield { offset: at, length: n, zero: false }
            }
            at += n
          }
          if (zeroFrom >= 0) yield { offset: zeroFrom, length: start + length - zeroFrom, zero: true }
        }
      }
      if (out.sequential) {
        // In order: reads run ahead (up to `limit`), writes follow one by one.
        const ahead: Promise<Buffer | null>[] = []
        const drain = async () => {
          const data = await ahead.shift()!
          return data
        }
        const queue: Piece[] = []
        for await (const p of pieces()) {
          queue.push(p)
          ahead.push(p.zero ? Promise.resolve(null) : input.read(p.offset, p.length).catch((e: unknown) => Promise.reject(copyError(e, 'reading the source', signal, p.offset))))
          // Keep unhandled-rejection noise away; the rejection is awaited in order below.
          ahead[ahead.length - 1]!.catch(() => {})
          while (ahead.length >= limit) {
            const piece = queue.shift()!
            const data = await drain()
            if (data === null) await zeroOut(piece.offset, piece.length)
            else await writeOut(piece.offset, data)
          }
        }
        while (ahead.length > 0) {
          const piece = queue.shift()!
          const data = await drain()
          if (data === null) await zeroOut(piece.offset, piece.length)
          else await writeOut(piece.offset, data)
        }
      } else {
        await pool(pieces(), limit, async (p) => {
          checkAborted(signal)
          if (p.zero) return zeroOut(p.offset, p.length)
          let data: Buffer
          try {
            data = await input.read(p.offset, p.length)
          } catch (e) {
            throw copyError(e, 'reading the source', signal, p.offset)
          }
          await writeOut(p.offset, data)
        })
      }
    }
    if (s.flush) {
      await out.flush().catch((e: unknown) => {
        throw copyError(e, 'flushing the destination', signal, counters.bytesDone)
      })
    }
    ok = true
  } catch (e) {
    if (signal?.aborted) throw abortError(signal)
    // Every failure is an NbdError; the paths above name their side already.
    if (e instanceof NbdError) throw e
    throw copyError(e, 'copy failed', signal)
  } finally {
    const closing: Promise<void>[] = []
    if (src) closing.push(src.close().catch(() => {}))
    if (sink) closing.push(sink.close(ok).catch((e: unknown) => {
      if (ok) {
        ok = false
        throw copyError(e, 'closing the destination', signal, counters.bytesDone)
      }
    }))
    try {
      await Promise.all(closing)
    } finally {
      progress.stop(ok)
    }
  }
  return {
    bytes: counters.bytesTotal,
    dataBytes: counters.dataBytes,
    zeroBytes: counters.bytesZero,
    seconds: Number(process.hrtime.bigint() - started) / 1e9,
    engine: 'javascript',
  }
}
