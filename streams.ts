/**
 * Node streams over an export: {@link Handle.createReadStream} and
 * {@link Handle.createWriteStream}, with fs.createReadStream / fs.createWriteStream's
 * conventions (`end` inclusive, `bytesRead`, `bytesWritten`, destroy on error or abort).
 *
 * Both are built on the handle's public commands (`pread`, `pwrite`, `flush`), so they follow
 * whatever driver runs those. Several requests are kept in flight so the socket stays busy,
 * and each request stays within the server's limits: no larger than
 * `getBlockSize('payload')` or the advertised maximum, and aligned to the advertised minimum.
 *
 * @module
 */

import { Readable, Writable, addAbortSignal } from 'node:stream'
import { NbdError } from './errors'
import type { Handle } from './handle'

/** Options of {@link Handle.createReadStream}. */
export interface ReadStreamOptions {
  /** First byte to read (default 0). A bigint reaches past 2^53. */
  start?: number | bigint
  /**
   * Last byte to read, inclusive as in fs.createReadStream (default: the export's last byte;
   * `Infinity` also means that, as in fs). As fs at the end of a file, the stream ends at the
   * export's end when `end` lies past it.
   */
  end?: number | bigint
  /**
   * Bytes per read request and the stream's buffer threshold, as in fs.createReadStream
   * (default 256 KiB). A request is never larger than `getBlockSize('payload')` or the
   * server's advertised maximum. Unlike fs, which reads one request at a time, up to 16
   * requests are in flight or read ahead (for throughput), so up to 16 × `highWaterMark`
   * bytes may be held while a consumer pauses; as fs, the stream still hands out one
   * request's bytes per chunk (also to `for await`, whose `read()` would otherwise join all
   * that is buffered).
   */
  highWaterMark?: number
  /** Destroys the stream with an `AbortError` (and drops the reads in flight). */
  signal?: AbortSignal
}

/** Options of {@link Handle.createWriteStream}. */
export interface WriteStreamOptions {
  /** Where the first byte goes (default 0). A bigint reaches past 2^53. */
  start?: number | bigint
  /**
   * Flush the export once everything is written, before 'finish' (default true; skipped
   * when the server cannot flush, as nbdcopy does).
   */
  flush?: boolean
  /**
   * Bytes the stream accepts before `write()` returns false; writes in flight stay below it
   * (default 4 MiB).
   */
  highWaterMark?: number
  /** Destroys the stream with an `AbortError` (and drops the writes in flight). */
  signal?: AbortSignal
}

/** Default request size of a read stream (nbdcopy's default request size). */
const DEFAULT_READ_CHUNK = 256 * 1024
/** Reads a read stream keeps in flight. */
const READ_DEPTH = 16
/** Default highWaterMark of a write stream: the bytes it keeps in flight. */
const DEFAULT_WRITE_HWM = 4 * 1024 * 1024
/** Bytes per write request (coalescing small writes, splitting large ones). */
const WRITE_CHUNK = 256 * 1024
/**
 * A written chunk at least this many requests long is sent from its own memory, and its
 * callback waits for those requests; a shorter one is copied and called back at once.
 */
const DIRECT_REQUESTS = 4
const MAX_U64 = (1n << 64n) - 1n

function invalid(operation: string, message: string, code = 'EINVAL'): NbdError {
  return new NbdError(code, message, operation)
}

function describe(v: unknown): string {
  if (v === null) return 'null'
  if (typeof v === 'number' || typeof v === 'bigint' || typeof v === 'boolean') return `${typeof v} ${String(v)}`
  return typeof v
}

function checkPosition(op: string, name: string, v: unknown): bigint {
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v) || v < 0) {
      throw invalid(op, `${name} must be a non-negative safe integer or a bigint, got ${v}`)
    }
    return BigInt(v)
  }
  if (typeof v === 'bigint') {
    if (v < 0n || v > MAX_U64) throw invalid(op, `${name} must be from 0 to 2^64-1, got ${v}`)
    return v
  }
  throw invalid(op, `${name} must be a number or a bigint, got ${describe(v)}`)
}

function checkObject(op: string, options: unknown): Record<string, unknown> {
  if (options === undefined) return {}
  if (options === null || typeof options !== 'object') {
    throw invalid(op, `options must be an object, got ${describe(options)}`)
  }
  return options as Record<string, unknown>
}

function checkHighWaterMark(op: string, v: unknown, fallback: number): number {
  if (v === undefined) return fallback
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) {
    throw invalid(op, `highWaterMark must be a positive integer, got ${describe(v)}`)
  }
  return v
}

function checkSignal(op: string, v: unknown): AbortSignal | undefined {
  if (v !== undefined && !(v instanceof AbortSignal)) {
    throw invalid(op, `signal must be an AbortSignal, got ${describe(v)}`)
  }
  return v
}

/** A position as pread/pwrite take it: a number while it is safe, else a bigint. */
function offsetArg(v: bigint): number | bigint {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v
}

/**
 * The request size for `handle`: `wanted`, within the payload limit and the advertised
 * maximum, and a multiple of the advertised minimum (the alignment strict mode checks).
 * Also used by copy()'s JavaScript engine. @internal
 */
export function requestSize(handle: Handle, wanted: number): { size: number; minimum: number } {
  const minimum = Math.max(1, handle.getBlockSize('minimum'))
  let size = Math.min(wanted, handle.getBlockSize('payload'))
  const maximum = handle.getBlockSize('maximum')
  if (maximum > 0) size = Math.min(size, maximum)
  size = Math.max(minimum, size - (size % minimum))
  return { size, minimum }
}

/** One read in the order it must be pushed: its data once it came, or its error. */
interface ReadSlot {
  data?: Buffer
  error?: unknown
  /** Bytes to drop at the front and keep of the reply (the request is widened for alignment). */
  skip: number
  keep: number
}

/**
 * The `stream.Readable` of {@link Handle.createReadStream}. `bytesRead` counts the bytes
 * pushed so far; `start`, `end` and `pos` are as in fs.ReadStream (`pos`: the next byte to
 * be requested).
 */
export class NbdReadStream extends Readable {
  /** Bytes delivered to the stream so far. */
  bytesRead = 0
  /** The first byte of the range. */
  readonly start: number | bigint
  /** The last byte of the range (inclusive), once known (the export's last byte by default). */
  end: number | bigint | undefined

  readonly #handle: Handle
  readonly #chunk: number
  #pos: bigint
  /** One past the last byte wanted. */
  #limit = 0n
  #size = 0n
  #minimum = 1
  #requestSize = 0
  readonly #slots: ReadSlot[] = []
  #wanted = false
  #ended = false

  /** @internal Use {@link Handle.createReadStream}. */
  constructor(handle: Handle, options?: ReadStreamOptions) {
    const op = 'createReadStream'
    const o = checkObject(op, options)
    const start = o.start === undefined ? 0n : checkPosition(op, 'start', o.start)
    // Infinity is fs's own default for `end`: to the end.
    const end = o.end === undefined || o.end === Number.POSITIVE_INFINITY ? undefined : checkPosition(op, 'end', o.end)
    if (end !== undefined && start > end) {
      throw invalid(op, `start (${start}) must be <= end (${end})`, 'ERANGE')
    }
    const chunk = checkHighWaterMark(op, o.highWaterMark, DEFAULT_READ_CHUNK)
    const signal = checkSignal(op, o.signal)
    super({ highWaterMark: chunk })
    this.#handle = handle
    this.#chunk = chunk
    this.#pos = start
    this.start = offsetArg(start)
    this.end = end === undefined ? undefined : offsetArg(end)
    // Not in super()'s options: an aborted signal would destroy the stream before its fields exist.
    if (signal !== undefined) addAbortSignal(signal, this)
  }

  /** The next byte to be requested. */
  get pos(): number | bigint {
    return offsetArg(this.#pos)
  }

  override _construct(callback: (error?: Error | null) => void): void {
    try {
      const h = this.#handle
      const size = h.getSize({ bigint: true })
      this.#size = size
      const { size: request, minimum } = requestSize(h, this.#chunk)
      this.#requestSize = request
      this.#minimum = minimum
      // As fs at the end of a file: the range stops at the export's end, and a start at or
      // past it (or an empty export) makes an empty stream.
      const last = size > this.#pos ? size : this.#pos
      if (this.end === undefined) {
        this.#limit = last
        this.end = offsetArg(last - 1n < this.#pos ? this.#pos : last - 1n)
      } else {
        const wanted = BigInt(this.end) + 1n
        this.#limit = wanted < last ? wanted : last
      }
      callback()
    } catch (e) {
      callback(e as Error)
    }
  }

  override _read(): void {
    this.#wanted = true
    // Not pushed from inside _read: `read()`, which calls it, would hand out what is pushed
    // now together with what it was already returning (two chunks joined).
    queueMicrotask(this.#deliverNow)
  }

  readonly #deliverNow = (): void => this.#deliver()

  /**
   * Starts reads until READ_DEPTH are in flight or waiting to be pushed, or the range is all
   * requested, whether or not the consumer wants more yet: they are the read-ahead.
   */
  #issue(): void {
    if (this.destroyed) return
    while (this.#slots.length < READ_DEPTH && this.#pos < this.#limit) {
      const min = BigInt(this.#minimum)
      // Aligned down (the range ends within the export, so the position is inside it).
      const from = this.#pos - (this.#pos % min)
      let to = from + BigInt(this.#requestSize)
      if (to > this.#limit) {
        // The last request: widened to the alignment, which the export's size respects.
        to = this.#limit + ((min - (this.#limit % min)) % min)
      }
      // Never across the export's end (an export whose size breaks its own alignment: the
      // strict alignment check refuses the unaligned request: the stream fails with EINVAL).
      if (to > this.#size) to = this.#size
      const slot: ReadSlot = {
        skip: Number(this.#pos - from),
        keep: Number((to < this.#limit ? to : this.#limit) - this.#pos),
      }
      this.#slots.push(slot)
      this.#pos = to < this.#limit ? to : this.#limit
      // No abort signal per read: a destroyed stream drops the replies instead (see _destroy).
      this.#handle.pread(Number(to - from), offsetArg(from)).then(
        (data) => {
          slot.data = data
          this.#deliver()
        },
        (error) => {
          slot.error = error
          this.#deliver()
        },
      )
    }
    if (this.#slots.length === 0 && this.#pos >= this.#limit && !this.#ended) {
      this.#ended = true
      this.push(null)
    }
  }

  /**
   * Hands the consumer the next chunk when it wants one: at most `highWaterMark` bytes of
   * the oldest read, once per `_read` (as fs, whose chunks are one read each), so that Node's
   * buffer holds no more than that and `read()` (which async iteration calls) never joins
   * several. The rest of the read-ahead waits in its slots. A failed read with only finished
   * reads before it fails the stream at once, after their bytes, also while the consumer is
   * paused.
   */
  #deliver(): void {
    if (this.destroyed) return
    const failed = this.#slots.findIndex((slot) => slot.error !== undefined)
    if (failed >= 0 && this.#slots.slice(0, failed).every((slot) => slot.data !== undefined)) {
      for (const slot of this.#slots.slice(0, failed)) {
        while (slot.keep > 0 && !this.destroyed) this.push(this.#take(slot))
      }
      if (!this.destroyed) this.destroy(this.#slots[failed]!.error as Error)
      return
    }
    const head = this.#slots[0]
    if (this.#wanted && head?.data !== undefined) {
      const piece = this.#take(head)
      if (head.keep === 0) this.#slots.shift()
      this.#wanted = false
      // In flowing mode this emits 'data' at once, and its handler may destroy the stream.
      this.push(piece)
      if (this.destroyed) return
    }
    this.#issue()
  }

  /** The next chunk of a finished read: at most `highWaterMark` bytes. */
  #take(slot: ReadSlot): Buffer {
    const data = slot.data!
    const n = Math.min(slot.keep, this.#chunk)
    const piece = slot.skip === 0 && n === data.length ? data : data.subarray(slot.skip, slot.skip + n)
    slot.skip += n
    slot.keep -= n
    this.bytesRead += n
    return piece
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    // Reads in flight are left to finish and their replies dropped: each fills a Buffer of
    // its own, so nothing the caller holds is written. (Aborting them instead means a signal
    // on every read, which measured 8-10 % of a stream's CPU.) At most READ_DEPTH remain.
    this.#slots.length = 0
    callback(error)
  }
}

/**
 * The `stream.Writable` of {@link Handle.createWriteStream}. `bytesWritten` counts the bytes
 * the server has acknowledged; `pos` is where the next byte goes.
 */
export class NbdWriteStream extends Writable {
  /** Bytes the server has acknowledged so far. */
  bytesWritten = 0
  /** Where the first byte goes. */
  readonly start: number | bigint

  readonly #handle: Handle
  readonly #flush: boolean
  readonly #stop = new AbortController()
  readonly #limit: number
  #pos: bigint
  #requestSize = WRITE_CHUNK
  /** Small writes gathered into one request. */
  #gather: Buffer | undefined
  #gathered = 0
  #inFlightBytes = 0
  readonly #inFlight = new Set<Promise<void>>()
  /** The write callback held back while too many bytes are in flight. */
  #held: (() => void) | undefined
  #failed: unknown

  /** @internal Use {@link Handle.createWriteStream}. */
  constructor(handle: Handle, options?: WriteStreamOptions) {
    const op = 'createWriteStream'
    const o = checkObject(op, options)
    const start = o.start === undefined ? 0n : checkPosition(op, 'start', o.start)
    let flush = true
    if (o.flush !== undefined) {
      if (typeof o.flush !== 'boolean') throw invalid(op, `flush must be a boolean, got ${describe(o.flush)}`)
      flush = o.flush
    }
    const hwm = checkHighWaterMark(op, o.highWaterMark, DEFAULT_WRITE_HWM)
    const signal = checkSignal(op, o.signal)
    super({ highWaterMark: hwm, decodeStrings: true })
    this.#handle = handle
    this.#flush = flush
    this.#limit = hwm
    this.#pos = start
    this.start = offsetArg(start)
    if (signal !== undefined) addAbortSignal(signal, this)
  }

  /** Where the next byte goes. */
  get pos(): number | bigint {
    return offsetArg(this.#pos + BigInt(this.#gathered))
  }

  override _construct(callback: (error?: Error | null) => void): void {
    try {
      // Requests follow one another from `start`: aligned when `start` is.
      this.#requestSize = requestSize(this.#handle, WRITE_CHUNK).size
      callback()
    } catch (e) {
      callback(e as Error)
    }
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    const direct: Promise<void>[] = []
    this.#take(chunk, direct)
    this.#afterSent(direct, callback)
  }

  override _writev(chunks: { chunk: Buffer }[], callback: (error?: Error | null) => void): void {
    const direct: Promise<void>[] = []
    for (const { chunk } of chunks) this.#take(chunk, direct)
    this.#afterSent(direct, callback)
  }

  /**
   * Calls back once the caller may reuse its chunks: at once when they were copied, else
   * when the requests sent from them have settled (pwrite sends large writes from the
   * memory itself, and a chunk's owner may refill it as soon as its callback runs).
   */
  #afterSent(direct: Promise<void>[], callback: (error?: Error | null) => void): void {
    if (direct.length === 0) this.#afterWrite(callback)
    else void Promise.all(direct).then(() => this.#afterWrite(callback))
  }

  /**
   * Turns `chunk` into requests: whole ones sent at once, the rest gathered. A chunk of at
   * least {@link DIRECT_REQUESTS} requests is sent from its own memory (its promises go to
   * `direct`); a smaller one is copied, so that its callback comes at once and the next
   * chunk's requests join it on the wire.
   */
  #take(chunk: Buffer, direct: Promise<void>[]): void {
    let rest = chunk
    const fromChunk = chunk.length >= DIRECT_REQUESTS * this.#requestSize
    while (rest.length > 0) {
      if (fromChunk && this.#gathered === 0 && rest.length >= this.#requestSize) {
        const piece = rest.subarray(0, this.#requestSize)
        rest = rest.subarray(this.#requestSize)
        direct.push(this.#send(piece))
        continue
      }
      this.#gather ??= Buffer.allocUnsafe(this.#requestSize)
      const n = Math.min(rest.length, this.#requestSize - this.#gathered)
      rest.copy(this.#gather, this.#gathered, 0, n)
      this.#gathered += n
      rest = rest.subarray(n)
      if (this.#gathered === this.#requestSize) this.#sendGathered()
    }
  }

  /** Calls back now, or once the bytes in flight fall below the high-water mark. */
  #afterWrite(callback: (error?: Error | null) => void): void {
    if (this.#failed !== undefined) {
      callback(this.#failed as Error)
      return
    }
    if (this.#inFlightBytes < this.#limit) callback()
    else this.#held = () => callback()
  }

  #sendGathered(): void {
    if (this.#gathered === 0) return
    // pwrite may send large writes from the buffer itself while they are in flight: the
    // gathered bytes go with their buffer, and the next ones gather in a new one.
    this.#send(this.#gather!.subarray(0, this.#gathered))
    this.#gather = undefined
    this.#gathered = 0
  }

  #send(piece: Buffer): Promise<void> {
    const offset = this.#pos
    this.#pos += BigInt(piece.length)
    const length = piece.length
    this.#inFlightBytes += length
    const done = this.#handle.pwrite(piece, offsetArg(offset), { signal: this.#stop.signal }).then(
      () => {
        this.#inFlightBytes -= length
        this.bytesWritten += length
        this.#inFlight.delete(done)
        this.#release()
      },
      (error: unknown) => {
        this.#inFlightBytes -= length
        this.#inFlight.delete(done)
        if (this.#failed === undefined) this.#failed = error
        this.#release()
        if (!this.destroyed) this.destroy(error as Error)
      },
    )
    this.#inFlight.add(done)
    return done
  }

  #release(): void {
    const held = this.#held
    if (held !== undefined && (this.#inFlightBytes < this.#limit || this.#failed !== undefined)) {
      this.#held = undefined
      if (this.#failed !== undefined) return // destroy() reports the error
      held()
    }
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.#sendGathered()
    const finish = async (): Promise<void> => {
      while (this.#inFlight.size > 0) await Promise.all(this.#inFlight)
      if (this.#failed !== undefined) throw this.#failed
      if (this.#flush && this.#handle.canFlush()) await this.#handle.flush({ signal: this.#stop.signal })
    }
    finish().then(() => callback(), (e: Error) => callback(e))
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.#stop.abort()
    this.#held = undefined
    callback(error)
  }
}
