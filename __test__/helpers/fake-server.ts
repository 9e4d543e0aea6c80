// A scriptable NBD server written from scratch for the hostile-server specs: it speaks the
// server side of fixed newstyle correctly (or oldstyle, on request) and serves a sparse
// in-memory export, and every step can be replaced by a hook that sends other bytes, stalls,
// or hangs up. Replies are built with the builders below, so a test reads as "on this step,
// send that".
//
// It listens on a Unix socket in a private temporary directory. `useFake(t, …)` closes it
// (every connection destroyed, directory removed) in the test's teardown.
//
//   const server = await useFake(t, {
//     onCommand: (req, conn) => req.type === CMD.READ
//       ? [structuredChunk(req.cookie, REPLY_TYPE.NONE, Buffer.alloc(0), { done: true })]
//       : 'default',
//   })
//
// A hook returns an Action:
//   'default'           do what a correct server does;
//   Buffer | Buffer[]   send these bytes instead (the conversation goes on as if the default
//                       reply had been sent, except that a replaced NBD_OPT_GO or
//                       NBD_OPT_EXPORT_NAME stays in the option phase unless the hook calls
//                       conn.enterTransmission());
//   'handled'           the hook did everything itself through `conn` (sent, closed, or
//                       deliberately left the client waiting);
//   'stall'             send nothing, ever, and read nothing more (the client must time out);
//   'close'             hang up (FIN) without replying;
//   'reset'             destroy the socket without replying (see FakeConnection.reset).
// Hooks may be async.
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import type { ExecutionContext } from 'ava'
import { makeTempDir } from './servers'

// ---- protocol numbers (NBD protocol specification, doc/proto.md) ------------------------------

export const NBDMAGIC = 0x4e42444d41474943n
export const IHAVEOPT = 0x49484156454f5054n
export const OLDSTYLE_MAGIC = 0x0000420281861253n
export const OPT_REPLY_MAGIC = 0x0003e889045565a9n
export const REQUEST_MAGIC = 0x25609513
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71
export const SIMPLE_REPLY_MAGIC = 0x67446698
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c

export const HANDSHAKE_FLAG = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const

export const FLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STAT_PAYLOAD: 1 << 12,
} as const

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const

const ERR = 0x80000000
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: (ERR | 1) >>> 0,
  ERR_POLICY: (ERR | 2) >>> 0,
  ERR_INVALID: (ERR | 3) >>> 0,
  ERR_PLATFORM: (ERR | 4) >>> 0,
  ERR_TLS_REQD: (ERR | 5) >>> 0,
  ERR_UNKNOWN: (ERR | 6) >>> 0,
  ERR_SHUTDOWN: (ERR | 7) >>> 0,
  ERR_BLOCK_SIZE_REQD: (ERR | 8) >>> 0,
  ERR_TOO_BIG: (ERR | 9) >>> 0,
  ERR_EXT_HEADER_REQD: (ERR | 10) >>> 0,
} as const

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const

export const CMD_FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16, PAYLOAD_LEN: 32 } as const

export const REPLY_FLAG_DONE = 1
export const REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: (1 << 15) | 1,
  ERROR_OFFSET: (1 << 15) | 2,
} as const

/** Error numbers on the wire (the protocol's, which are Linux's). */
export const NBD_ERRNO = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const

/** base:allocation flags. */
export const STATE = { HOLE: 1, ZERO: 2 } as const

// ---- builders ---------------------------------------------------------------------------------

function u16(n: number): Buffer {
  const b = Buffer.alloc(2)
  b.writeUInt16BE(n)
  return b
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4)
  b.writeUInt32BE(n >>> 0)
  return b
}

function u64(n: number | bigint): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(BigInt.asUintN(64, BigInt(n)))
  return b
}

/** The fixed newstyle greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export function newstyleGreeting(handshakeFlags: number = HANDSHAKE_FLAG.FIXED_NEWSTYLE | HANDSHAKE_FLAG.NO_ZEROES): Buffer {
  return Buffer.concat([u64(NBDMAGIC), u64(IHAVEOPT), u16(handshakeFlags)])
}

/** The whole oldstyle greeting (152 bytes). */
export function oldstyleGreeting(size: number | bigint, flags: number): Buffer {
  return Buffer.concat([u64(NBDMAGIC), u64(OLDSTYLE_MAGIC), u64(size), u32(flags & 0xffff), Buffer.alloc(124)])
}

/**
 * An option reply. `length` overrides the length field (to lie about it); the payload is
 * sent as given either way.
 */
export function optionReply(option: number, type: number, payload: Buffer = Buffer.alloc(0), opts: { length?: number; magic?: bigint } = {}): Buffer {
  return Buffer.concat([
    u64(opts.magic ?? OPT_REPLY_MAGIC),
    u32(option),
    u32(type),
    u32(opts.length ?? payload.length),
    payload,
  ])
}

/** NBD_REP_INFO payload of NBD_INFO_EXPORT. */
export function infoExport(size: number | bigint, flags: number): Buffer {
  return Buffer.concat([u16(INFO.EXPORT), u64(size), u16(flags)])
}

/** NBD_REP_INFO payload of NBD_INFO_BLOCK_SIZE. */
export function infoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  return Buffer.concat([u16(INFO.BLOCK_SIZE), u32(minimum), u32(preferred), u32(maximum)])
}

/** NBD_REP_INFO payload of NBD_INFO_NAME. */
export function infoName(name: string): Buffer {
  return Buffer.concat([u16(INFO.NAME), Buffer.from(name)])
}

/** NBD_REP_INFO payload of NBD_INFO_DESCRIPTION. */
export function infoDescription(text: string): Buffer {
  return Buffer.concat([u16(INFO.DESCRIPTION), Buffer.from(text)])
}

/** NBD_REP_META_CONTEXT payload: the id, then the name. */
export function metaContextPayload(id: number, name: string): Buffer {
  return Buffer.concat([u32(id), Buffer.from(name)])
}

/** NBD_REP_SERVER payload for NBD_OPT_LIST. */
export function serverPayload(name: string, description = ''): Buffer {
  const n = Buffer.from(name)
  return Buffer.concat([u32(n.length), n, Buffer.from(description)])
}

/** The reply to NBD_OPT_EXPORT_NAME: size, flags and (unless `noZeroes`) 124 zero bytes. */
export function exportNameReply(size: number | bigint, flags: number, noZeroes = true): Buffer {
  return Buffer.concat([u64(size), u16(flags), noZeroes ? Buffer.alloc(0) : Buffer.alloc(124)])
}

/** A simple reply, optionally followed by read data. */
export function simpleReply(cookie: bigint, error = 0, data?: Buffer, opts: { magic?: number } = {}): Buffer {
  const header = Buffer.concat([u32(opts.magic ?? SIMPLE_REPLY_MAGIC), u32(error), u64(cookie)])
  return data ? Buffer.concat([header, data]) : header
}

export interface ChunkOptions {
  /** Sets NBD_REPLY_FLAG_DONE. */
  done?: boolean
  /** Overrides the length field (the payload is sent as given). */
  length?: number | bigint
  /** Overrides the magic. */
  magic?: number
  /** Extended headers only: the offset field (the request's offset for a correct server). */
  offset?: number | bigint
}

/** A structured reply chunk (20-byte header). */
export function structuredChunk(cookie: bigint, type: number, payload: Buffer = Buffer.alloc(0), opts: ChunkOptions = {}): Buffer {
  return Buffer.concat([
    u32(opts.magic ?? STRUCTURED_REPLY_MAGIC),
    u16(opts.done ? REPLY_FLAG_DONE : 0),
    u16(type),
    u64(cookie),
    u32(Number(opts.length ?? payload.length)),
    payload,
  ])
}

/** An extended reply chunk (32-byte header). */
export function extendedChunk(cookie: bigint, type: number, payload: Buffer = Buffer.alloc(0), opts: ChunkOptions = {}): Buffer {
  return Buffer.concat([
    u32(opts.magic ?? EXTENDED_REPLY_MAGIC),
    u16(opts.done ? REPLY_FLAG_DONE : 0),
    u16(type),
    u64(cookie),
    u64(opts.offset ?? 0),
    u64(opts.length ?? payload.length),
    payload,
  ])
}

/** Payload of NBD_REPLY_TYPE_OFFSET_DATA. */
export function dataPayload(offset: number | bigint, data: Buffer): Buffer {
  return Buffer.concat([u64(offset), data])
}

/** Payload of NBD_REPLY_TYPE_OFFSET_HOLE (32-bit hole length, compact and extended alike). */
export function holePayload(offset: number | bigint, length: number): Buffer {
  return Buffer.concat([u64(offset), u32(length)])
}

/**
 * Payload of NBD_REPLY_TYPE_ERROR (or ERROR_OFFSET with `offset`). `messageLength` overrides
 * the message length field.
 */
export function errorPayload(error: number, message = '', opts: { messageLength?: number; offset?: number | bigint } = {}): Buffer {
  const msg = Buffer.from(message)
  const parts = [u32(error), u16(opts.messageLength ?? msg.length), msg]
  if (opts.offset !== undefined) parts.push(u64(opts.offset))
  return Buffer.concat(parts)
}

export interface Extent {
  length: number | bigint
  flags: number | bigint
}

/** Payload of NBD_REPLY_TYPE_BLOCK_STATUS (32-bit extents). */
export function blockStatusPayload(contextId: number, extents: Extent[]): Buffer {
  return Buffer.concat([u32(contextId), ...extents.flatMap((e) => [u32(Number(e.length)), u32(Number(e.flags))])])
}

/** Payload of NBD_REPLY_TYPE_BLOCK_STATUS_EXT (64-bit extents). `count` overrides the count. */
export function blockStatusExtPayload(contextId: number, extents: Extent[], opts: { count?: number } = {}): Buffer {
  return Buffer.concat([
    u32(contextId),
    u32(opts.count ?? extents.length),
    ...extents.flatMap((e) => [u64(e.length), u64(e.flags)]),
  ])
}

// ---- the server ---------------------------------------------------------------------------------

export type Action = 'default' | 'handled' | 'stall' | 'close' | 'reset' | Buffer | Buffer[]
type MaybeAsync<T> = T | Promise<T>

/** An option as the client sent it. */
export interface OptionRequest {
  option: number
  data: Buffer
}

/** A transmission request as the client sent it (write payloads are kept). */
export interface NbdRequest {
  flags: number
  type: number
  cookie: bigint
  offset: bigint
  length: bigint
  /** The write payload (NBD_CMD_WRITE, or any command sent with NBD_CMD_FLAG_PAYLOAD_LEN). */
  payload?: Buffer
  /** Whether the request came in the 32-byte extended form. */
  extended: boolean
}

export interface MetaContextSpec {
  name: string
  /** Context id; defaults to 1, 2, … in list order. */
  id?: number
  /**
   * The extents the default block status reply sends for this context, covering
   * `offset..offset+length` (the default for base:allocation reads the in-memory export's
   * allocation; for any other context one extent of flags 0).
   */
  extents?: (offset: bigint, length: bigint) => Extent[]
}

export interface FakeOptions {
  /** Export size in bytes (default 1 MiB). Any 64-bit value may be advertised. */
  size?: number | bigint
  /** Transmission flags (default: HAS_FLAGS and every SEND_* for the commands served). */
  flags?: number
  /** Handshake flags in the greeting (default FIXED_NEWSTYLE | NO_ZEROES). */
  handshakeFlags?: number
  /** Speak oldstyle: the greeting carries size and flags, then transmission at once. */
  oldstyle?: boolean
  /** The export names served (default ['']; an empty list accepts any name). */
  exports?: string[]
  /** Description for NBD_INFO_DESCRIPTION and NBD_OPT_LIST. */
  description?: string
  /** NBD_INFO_BLOCK_SIZE to send on NBD_OPT_INFO/GO (default none). */
  blockSize?: { minimum: number; preferred: number; maximum: number }
  /** Accept NBD_OPT_STRUCTURED_REPLY (default true). */
  structuredReplies?: boolean
  /** Accept NBD_OPT_EXTENDED_HEADERS (default false). */
  extendedHeaders?: boolean
  /** Meta contexts offered (default: base:allocation with id 1). */
  metaContexts?: MetaContextSpec[]
  /** Answer structured reads with holes for unallocated runs (default false: data only). */
  sparseReads?: boolean

  /** Replaces the greeting (`greeting` is what a correct server would send). */
  greeting?: (greeting: Buffer, conn: FakeConnection) => MaybeAsync<Action>
  /** Replaces the answer to one option. */
  onOption?: (opt: OptionRequest, conn: FakeConnection) => MaybeAsync<Action>
  /**
   * Called with each request header before its payload (if any) is read; anything but
   * 'default' replaces the rest of the request's handling, payload unread.
   */
  onRequestHeader?: (req: NbdRequest, conn: FakeConnection) => MaybeAsync<Action>
  /** Replaces the answer to one transmission request. */
  onCommand?: (req: NbdRequest, conn: FakeConnection) => MaybeAsync<Action>
}

const PAGE = 64 * 1024

/** A sparse in-memory disk of 64 KiB pages; unwritten pages read as zeroes. */
export class SparseDisk {
  readonly pages = new Map<bigint, Buffer>()

  read(offset: bigint, length: number): Buffer {
    const out = Buffer.alloc(length)
    this.each(offset, length, (page, at, n, pos) => {
      const p = this.pages.get(page)
      if (p) p.copy(out, pos, at, at + n)
    })
    return out
  }

  write(offset: bigint, data: Buffer): void {
    this.each(offset, data.length, (page, at, n, pos) => {
      let p = this.pages.get(page)
      if (!p) {
        p = Buffer.alloc(PAGE)
        this.pages.set(page, p)
      }
      data.copy(p, at, pos, pos + n)
    })
  }

  zero(offset: bigint, length: bigint): void {
    // Whole pages are dropped, partial ones zeroed.
    let pos = offset
    const end = offset + length
    while (pos < end) {
      const page = pos / BigInt(PAGE)
      const at = Number(pos % BigInt(PAGE))
      const n = Number(BigInt(Math.min(PAGE - at, Number(end - pos))))
      const p = this.pages.get(page)
      if (p) {
        if (at === 0 && n === PAGE) this.pages.delete(page)
        else p.fill(0, at, at + n)
      }
      pos += BigInt(n)
    }
  }

  allocated(offset: bigint): boolean {
    return this.pages.has(offset / BigInt(PAGE))
  }

  /** Runs of allocated / unallocated pages over `offset..offset+length`. */
  runs(offset: bigint, length: bigint): { length: bigint; allocated: boolean }[] {
    const out: { length: bigint; allocated: boolean }[] = []
    let pos = offset
    const end = offset + length
    while (pos < end) {
      const next = (pos / BigInt(PAGE) + 1n) * BigInt(PAGE)
      const n = (next < end ? next : end) - pos
      const allocated = this.allocated(pos)
      const last = out[out.length - 1]
      if (last && last.allocated === allocated) last.length += n
      else out.push({ length: n, allocated })
      pos += n
    }
    return out
  }

  private each(offset: bigint, length: number, f: (page: bigint, at: number, n: number, pos: number) => void): void {
    let pos = 0
    while (pos < length) {
      const abs = offset + BigInt(pos)
      const page = abs / BigInt(PAGE)
      const at = Number(abs % BigInt(PAGE))
      const n = Math.min(PAGE - at, length - pos)
      f(page, at, n, pos)
      pos += n
    }
  }
}

/** Thrown inside a connection's loop when the client hung up; ends the loop quietly. */
class Hangup extends Error {}

/** One client connection: an input queue the protocol loop reads from, and ways to answer. */
export class FakeConnection {
  readonly server: FakeServer
  readonly socket: net.Socket
  /** Reply framing after negotiation. */
  structured = false
  extended = false
  /** Meta contexts the client set (NBD_OPT_SET_META_CONTEXT), by id. */
  readonly activeContexts = new Map<number, MetaContextSpec & { id: number }>()
  /** Flags the client sent after the greeting. */
  clientFlags?: number
  /** The export the client chose. */
  exportName?: string
  /** Set once the connection is in the transmission phase. */
  transmission = false
  /** Received and not yet read: a list of chunks (joined only when a read needs them). */
  private input: Buffer[] = []
  private buffered = 0
  private waiter?: () => void
  private ended = false
  private stalled = false

  constructor(server: FakeServer, socket: net.Socket) {
    this.server = server
    this.socket = socket
    socket.on('data', (chunk: Buffer) => {
      if (this.stalled) return
      this.input.push(chunk)
      this.buffered += chunk.length
      this.wake()
    })
    socket.on('end', () => {
      this.ended = true
      this.wake()
    })
    socket.on('close', () => {
      this.ended = true
      this.wake()
    })
    socket.on('error', () => {})
  }

  private wake(): void {
    const w = this.waiter
    this.waiter = undefined
    w?.()
  }

  /** Reads exactly `n` bytes; throws Hangup if the client goes away first. */
  async read(n: number): Promise<Buffer> {
    while (this.buffered < n) {
      if (this.ended) throw new Hangup()
      await new Promise<void>((resolve) => (this.waiter = resolve))
    }
    const all = this.input.length === 1 ? this.input[0]! : Buffer.concat(this.input, this.buffered)
    const out = Buffer.from(all.subarray(0, n))
    this.input = all.length > n ? [all.subarray(n)] : []
    this.buffered -= n
    return out
  }

  /** Sends bytes (nothing after the connection ended). */
  send(...bufs: Buffer[]): void {
    if (this.socket.destroyed || this.socket.writableEnded) return
    for (const b of bufs) this.socket.write(b)
  }

  /** Hangs up after what was sent so far (FIN). */
  close(): void {
    if (!this.socket.destroyed) this.socket.end()
  }

  /**
   * Destroys the socket at once: a TCP reset where there is TCP; on this server's Unix
   * socket, a close that discards whatever the client sent and the server did not read
   * (the client's next send or receive then fails with ECONNRESET or EPIPE).
   */
  reset(): void {
    if (this.socket.remoteFamily) this.socket.resetAndDestroy()
    else this.socket.destroy()
  }

  /** Stops answering and reading; the connection stays open until the server closes. */
  stall(): void {
    this.stalled = true
  }

  /** Moves to the transmission phase (for a hook that replaced NBD_OPT_GO by hand). */
  enterTransmission(): void {
    this.transmission = true
  }

  /** A chunk in the negotiated framing (structured, or extended with `offset` defaulted). */
  chunk(req: NbdRequest, type: number, payload: Buffer = Buffer.alloc(0), opts: ChunkOptions = {}): Buffer {
    return this.extended
      ? extendedChunk(req.cookie, type, payload, { offset: req.offset, ...opts })
      : structuredChunk(req.cookie, type, payload, opts)
  }

  /** The reply a correct server sends to `req`. */
  defaultReply(req: NbdRequest): Buffer[] {
    return this.server.defaultReply(req, this)
  }

  /** Carries out an action; resolves to false when the conversation must stop. */
  async act(action: Action, otherwise: () => MaybeAsync<void>): Promise<boolean> {
    if (action === 'default') {
      await otherwise()
      return !this.socket.destroyed
    }
    if (action === 'stall') {
      this.stall()
      return false
    }
    if (action === 'close') {
      this.close()
      return false
    }
    if (action === 'reset') {
      this.reset()
      return false
    }
    if (action === 'handled') return !this.stalled && !this.socket.destroyed && !this.socket.writableEnded
    const bufs = Array.isArray(action) ? action : [action]
    this.send(...bufs)
    return true
  }
}

export class FakeServer {
  readonly dir: string
  readonly socket: string
  readonly disk = new SparseDisk()
  readonly size: bigint
  readonly flags: number
  readonly contexts: (MetaContextSpec & { id: number })[]
  /** Every option any client sent, in order. */
  readonly options: OptionRequest[] = []
  /** Every transmission request any client sent, in order. */
  readonly requests: NbdRequest[] = []
  readonly connections: FakeConnection[] = []
  /** Errors thrown by hooks or by the server itself (a test should expect none). */
  readonly errors: unknown[] = []
  private readonly net: net.Server
  private closed = false

  constructor(readonly opts: FakeOptions, dir: string, server: net.Server) {
    this.dir = dir
    this.socket = path.join(dir, 'fake.sock')
    this.net = server
    this.size = BigInt(opts.size ?? 1024 * 1024)
    this.flags =
      opts.flags ??
      FLAG.HAS_FLAGS | FLAG.SEND_FLUSH | FLAG.SEND_FUA | FLAG.SEND_TRIM | FLAG.SEND_WRITE_ZEROES |
        FLAG.SEND_DF | FLAG.SEND_CACHE | FLAG.SEND_FAST_ZERO
    let next = 1
    this.contexts = (opts.metaContexts ?? [{ name: 'base:allocation' }]).map((c) => {
      const id = c.id ?? next
      next = id + 1
      return { ...c, id }
    })
  }

  /** Requests of one command type. */
  requestsOf(type: number): NbdRequest[] {
    return this.requests.filter((r) => r.type === type)
  }

  /** Options of one type. */
  optionsOf(option: number): OptionRequest[] {
    return this.options.filter((o) => o.option === option)
  }

  /** Closes the listener and destroys every connection; removes the directory. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    for (const c of this.connections) c.socket.destroy()
    await new Promise<void>((resolve) => this.net.close(() => resolve()))
    fs.rmSync(this.dir, { recursive: true, force: true })
  }

  /** Runs one connection to its end. */
  async serve(conn: FakeConnection): Promise<void> {
    try {
      await this.converse(conn)
    } catch (err) {
      if (!(err instanceof Hangup)) {
        this.errors.push(err)
        conn.socket.destroy()
      }
    }
  }

  private async converse(conn: FakeConnection): Promise<void> {
    const o = this.opts
    if (o.oldstyle) {
      const greeting = oldstyleGreeting(this.size, this.flags)
      if (!(await conn.act(await (o.greeting?.(greeting, conn) ?? 'default'), () => conn.send(greeting)))) return
      conn.transmission = true
    } else {
      const greeting = newstyleGreeting(o.handshakeFlags)
      if (!(await conn.act(await (o.greeting?.(greeting, conn) ?? 'default'), () => conn.send(greeting)))) return
      conn.clientFlags = (await conn.read(4)).readUInt32BE(0)
      while (!conn.transmission) {
        const header = await conn.read(16)
        const magic = header.readBigUInt64BE(0)
        if (magic !== IHAVEOPT) throw new Error(`client sent option magic ${magic.toString(16)}`)
        const option = header.readUInt32BE(8)
        const length = header.readUInt32BE(12)
        const data = await conn.read(length)
        const req = { option, data }
        this.options.push(req)
        const action = await (o.onOption?.(req, conn) ?? 'default')
        if (!(await conn.act(action, () => this.answerOption(req, conn)))) return
      }
    }
    for (;;) {
      const req = await this.readRequestHeader(conn)
      this.requests.push(req)
      const early = await (o.onRequestHeader?.(req, conn) ?? 'default')
      if (early !== 'default') {
        if (!(await conn.act(early, () => {}))) return
        continue
      }
      await this.readPayload(req, conn)
      const action = await (o.onCommand?.(req, conn) ?? 'default')
      if (!(await conn.act(action, () => this.answerCommand(req, conn)))) return
    }
  }

  private async readRequestHeader(conn: FakeConnection): Promise<NbdRequest> {
    const magic = (await conn.read(4)).readUInt32BE(0)
    const extended = magic === EXTENDED_REQUEST_MAGIC
    if (magic !== REQUEST_MAGIC && !extended) throw new Error(`client sent request magic ${magic.toString(16)}`)
    if (extended !== conn.extended) throw new Error(`client sent a ${extended ? 'extended' : 'compact'} request in the other framing`)
    const rest = await conn.read(extended ? 28 : 24)
    const req: NbdRequest = {
      flags: rest.readUInt16BE(0),
      type: rest.readUInt16BE(2),
      cookie: rest.readBigUInt64BE(4),
      offset: rest.readBigUInt64BE(12),
      length: extended ? rest.readBigUInt64BE(20) : BigInt(rest.readUInt32BE(20)),
      extended,
    }
    return req
  }

  private async readPayload(req: NbdRequest, conn: FakeConnection): Promise<void> {
    if (req.type === CMD.WRITE || (req.extended && req.flags & CMD_FLAG.PAYLOAD_LEN)) {
      if (req.length > 64n * 1024n * 1024n) throw new Error(`client sent a ${req.length}-byte payload`)
      req.payload = await conn.read(Number(req.length))
    }
  }

  private knownExport(name: string): boolean {
    const names = this.opts.exports ?? ['']
    return names.length === 0 || names.includes(name)
  }

  private answerOption(req: OptionRequest, conn: FakeConnection): void {
    const o = this.opts
    const { option, data } = req
    const reply = (type: number, payload?: Buffer) => conn.send(optionReply(option, type, payload))
    switch (option) {
      case OPT.EXPORT_NAME: {
        const name = data.toString()
        if (!this.knownExport(name)) {
          conn.close() // the only way to refuse NBD_OPT_EXPORT_NAME
          return
        }
        conn.exportName = name
        const noZeroes = ((conn.clientFlags ?? 0) & HANDSHAKE_FLAG.NO_ZEROES) !== 0
        conn.send(exportNameReply(this.size, this.flags, noZeroes))
        conn.transmission = true
        return
      }
      case OPT.ABORT:
        reply(REP.ACK)
        conn.close()
        return
      case OPT.LIST:
        for (const name of o.exports ?? ['']) reply(REP.SERVER, serverPayload(name, o.description ?? ''))
        reply(REP.ACK)
        return
      case OPT.STRUCTURED_REPLY:
        if (o.structuredReplies === false) return reply(REP.ERR_UNSUP)
        if (data.length) return reply(REP.ERR_INVALID)
        conn.structured = true
        return reply(REP.ACK)
      case OPT.EXTENDED_HEADERS:
        if (!o.extendedHeaders) return reply(REP.ERR_UNSUP)
        if (data.length) return reply(REP.ERR_INVALID)
        conn.extended = true
        conn.structured = true
        return reply(REP.ACK)
      case OPT.INFO:
      case OPT.GO: {
        if (data.length < 6) return reply(REP.ERR_INVALID)
        const nameLen = data.readUInt32BE(0)
        if (data.length < 4 + nameLen + 2) return reply(REP.ERR_INVALID)
        const name = data.subarray(4, 4 + nameLen).toString()
        const count = data.readUInt16BE(4 + nameLen)
        if (data.length !== 4 + nameLen + 2 + 2 * count) return reply(REP.ERR_INVALID)
        const asked = Array.from({ length: count }, (_, i) => data.readUInt16BE(4 + nameLen + 2 + 2 * i))
        if (!this.knownExport(name)) return reply(REP.ERR_UNKNOWN, Buffer.from(`no export named "${name}"`))
        reply(REP.INFO, infoExport(this.size, this.flags))
        if (o.blockSize) reply(REP.INFO, infoBlockSize(o.blockSize.minimum, o.blockSize.preferred, o.blockSize.maximum))
        if (asked.includes(INFO.NAME)) reply(REP.INFO, infoName(name))
        if (asked.includes(INFO.DESCRIPTION) && o.description !== undefined) reply(REP.INFO, infoDescription(o.description))
        reply(REP.ACK)
        if (option === OPT.GO) {
          conn.exportName = name
          conn.transmission = true
        }
        return
      }
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT: {
        const parsed = parseMetaContextRequest(data)
        if (!parsed) return reply(REP.ERR_INVALID)
        if (option === OPT.SET_META_CONTEXT && !conn.structured) return reply(REP.ERR_INVALID, Buffer.from('structured replies first'))
        if (!this.knownExport(parsed.exportName)) return reply(REP.ERR_UNKNOWN)
        const matches = (c: MetaContextSpec) =>
          parsed.queries.some((q) => q === c.name || (option === OPT.LIST_META_CONTEXT && q.endsWith(':') && c.name.startsWith(q)))
        const chosen =
          option === OPT.LIST_META_CONTEXT && parsed.queries.length === 0 ? this.contexts : this.contexts.filter(matches)
        if (option === OPT.SET_META_CONTEXT) {
          conn.activeContexts.clear()
          for (const c of chosen) conn.activeContexts.set(c.id, c)
        }
        for (const c of chosen) reply(REP.META_CONTEXT, metaContextPayload(option === OPT.SET_META_CONTEXT ? c.id : 0, c.name))
        return reply(REP.ACK)
      }
      default:
        return reply(REP.ERR_UNSUP)
    }
  }

  private answerCommand(req: NbdRequest, conn: FakeConnection): void {
    if (req.type === CMD.DISC) {
      conn.close()
      return
    }
    this.apply(req)
    conn.send(...this.defaultReply(req, conn))
  }

  /** Carries out a modifying request on the disk (done once, by the default answer). */
  private apply(req: NbdRequest): void {
    if (this.errorFor(req)) return
    switch (req.type) {
      case CMD.WRITE:
        this.disk.write(req.offset, req.payload!)
        break
      case CMD.TRIM:
      case CMD.WRITE_ZEROES:
        this.disk.zero(req.offset, req.length)
        break
    }
  }

  /** The errno a correct server would fail `req` with, or 0. */
  private errorFor(req: NbdRequest): number {
    const inBounds = req.offset + req.length <= this.size
    switch (req.type) {
      case CMD.READ:
      case CMD.WRITE:
      case CMD.TRIM:
      case CMD.WRITE_ZEROES:
      case CMD.CACHE:
        if (!inBounds) return NBD_ERRNO.EINVAL
        if (req.type !== CMD.READ && req.type !== CMD.CACHE && this.flags & FLAG.READ_ONLY) return NBD_ERRNO.EPERM
        if (req.type === CMD.READ && req.length > 64n * 1024n * 1024n) return NBD_ERRNO.EINVAL
        return 0
      case CMD.FLUSH:
        return 0
      case CMD.BLOCK_STATUS:
        return inBounds && req.length > 0n ? 0 : NBD_ERRNO.EINVAL
      default:
        return NBD_ERRNO.EINVAL
    }
  }

  /** The bytes a correct server sends in answer to `req` (without changing the disk). */
  defaultReply(req: NbdRequest, conn: FakeConnection): Buffer[] {
    const error = this.errorFor(req) || (req.type === CMD.BLOCK_STATUS && conn.activeContexts.size === 0 ? NBD_ERRNO.EINVAL : 0)
    if (!conn.structured) {
      if (error) return [simpleReply(req.cookie, error)]
      if (req.type === CMD.READ) return [simpleReply(req.cookie, 0, this.disk.read(req.offset, Number(req.length)))]
      return [simpleReply(req.cookie)]
    }
    if (error) return [conn.chunk(req, REPLY_TYPE.ERROR, errorPayload(error, 'refused by the fake server'), { done: true })]
    if (req.type === CMD.READ) return this.readChunks(req, conn)
    if (req.type === CMD.BLOCK_STATUS) return this.blockStatusChunks(req, conn)
    return [conn.chunk(req, REPLY_TYPE.NONE, Buffer.alloc(0), { done: true })]
  }

  private readChunks(req: NbdRequest, conn: FakeConnection): Buffer[] {
    const runs = this.opts.sparseReads && !(req.flags & CMD_FLAG.DF)
      ? this.disk.runs(req.offset, req.length)
      : [{ length: req.length, allocated: true }]
    const out: Buffer[] = []
    let pos = req.offset
    runs.forEach((run, i) => {
      const done = i === runs.length - 1
      out.push(
        run.allocated
          ? conn.chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(pos, this.disk.read(pos, Number(run.length))), { done })
          : conn.chunk(req, REPLY_TYPE.OFFSET_HOLE, holePayload(pos, Number(run.length)), { done }),
      )
      pos += run.length
    })
    return out
  }

  /** Extents of one context over the request's range (the default answer). */
  extentsFor(ctx: MetaContextSpec, offset: bigint, length: bigint): Extent[] {
    if (ctx.extents) return ctx.extents(offset, length)
    if (ctx.name === 'base:allocation') {
      return this.disk.runs(offset, length).map((r) => ({ length: r.length, flags: r.allocated ? 0 : STATE.HOLE | STATE.ZERO }))
    }
    return [{ length, flags: 0 }]
  }

  private blockStatusChunks(req: NbdRequest, conn: FakeConnection): Buffer[] {
    const contexts = [...conn.activeContexts.values()]
    return contexts.map((ctx, i) => {
      let extents = this.extentsFor(ctx, req.offset, req.length)
      if (req.flags & CMD_FLAG.REQ_ONE) extents = extents.slice(0, 1)
      const done = i === contexts.length - 1
      return conn.extended
        ? conn.chunk(req, REPLY_TYPE.BLOCK_STATUS_EXT, blockStatusExtPayload(ctx.id, extents), { done })
        : conn.chunk(req, REPLY_TYPE.BLOCK_STATUS, blockStatusPayload(ctx.id, extents), { done })
    })
  }
}

function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | undefined {
  if (data.length < 8) return undefined
  const nameLen = data.readUInt32BE(0)
  let at = 4 + nameLen
  if (data.length < at + 4) return undefined
  const exportName = data.subarray(4, at).toString()
  const count = data.readUInt32BE(at)
  at += 4
  const queries: string[] = []
  for (let i = 0; i < count; i++) {
    if (data.length < at + 4) return undefined
    const len = data.readUInt32BE(at)
    at += 4
    if (data.length < at + len) return undefined
    queries.push(data.subarray(at, at + len).toString())
    at += len
  }
  return at === data.length ? { exportName, queries } : undefined
}

/** Starts a fake server on a Unix socket in a fresh private directory. */
export async function startFake(opts: FakeOptions = {}): Promise<FakeServer> {
  const dir = makeTempDir('nbd-fake-')
  const netServer = net.createServer()
  const server = new FakeServer(opts, dir, netServer)
  netServer.on('connection', (sock) => {
    const conn = new FakeConnection(server, sock)
    server.connections.push(conn)
    void server.serve(conn)
  })
  await new Promise<void>((resolve, reject) => {
    netServer.once('error', reject)
    netServer.listen(server.socket, resolve)
  })
  netServer.unref()
  return server
}

/** A fake server, closed in the test's teardown. */
export async function useFake(t: ExecutionContext, opts: FakeOptions = {}): Promise<FakeServer> {
  const server = await startFake(opts)
  t.teardown(() => server.close())
  return server
}
