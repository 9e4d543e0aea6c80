// Careless callers: every public method with arguments of the wrong type or range, buffers of
// every odd shape (detached before or during the call, shared, resizable, empty, pool slices),
// calls on closed and dead handles, double close, connect twice, close while connecting, close
// with 10,000 commands in flight, and AbortSignal in all its forms. Every failure must be an
// NbdError with the exact code (or Node's AbortError for an abort), async methods must never
// throw synchronously, and nothing may crash the process or write memory it no longer owns.
import { getEventListeners } from 'node:events'
import fs from 'node:fs'
import test, { type ExecutionContext } from 'ava'
import { Handle, NbdError, STRICT_BOUNDS } from 'nbd-client'
import { connectedSocketFd, countOpenFds, fdTarget, rawServer, waitFor } from './helpers/fds'
import { expectReject, expectThrow, openEmbedded, openHandle, seededBytes, useEmbedded, KiB, MiB } from './helpers/nbd'
import { makeTempDir, sleep, useNbdkit, type Server } from './helpers/servers'

const EXPORT_SIZE = 4 * MiB
/** A range past the end: ENOSPC for the commands that write, EINVAL for the rest (libnbd). */
const BOUNDS = 'BOUNDS'
const boundsCode = (method: string) => (['pwrite', 'trim', 'zero'].includes(method) ? 'ENOSPC' : 'EINVAL')

function useTempDir(t: ExecutionContext): string {
  const dir = makeTempDir('nbd-careless-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

function isAbortError(e: unknown): boolean {
  const err = e as { name?: string; code?: string }
  return err instanceof Error && err.name === 'AbortError' && err.code === 'ABORT_ERR'
}

/** How a promise settled: 'resolved' or the rejection. */
function outcome(p: Promise<unknown>): Promise<unknown> {
  return p.then(() => 'resolved', (e: unknown) => e)
}

/** A Buffer whose ArrayBuffer has been transferred away (so it reads as empty). */
function detachedBuffer(): Buffer {
  const b = Buffer.alloc(512)
  structuredClone(b.buffer, { transfer: [b.buffer] })
  return b
}

function detachedUint8Array(): Uint8Array {
  const u = new Uint8Array(512)
  structuredClone(u.buffer, { transfer: [u.buffer] })
  return u
}

/** Detaches the ArrayBuffer under `view`; its memory goes to a copy that is dropped at once. */
function detach(view: Uint8Array): void {
  structuredClone(view.buffer, { transfer: [view.buffer] })
}

async function collectGarbage(): Promise<void> {
  const gc = (globalThis as { gc?: () => void }).gc
  for (let i = 0; i < 3; i++) {
    gc?.()
    await sleep(10)
  }
}

// ---- the table: methods × bad values --------------------------------------------------------

type Role = 'count' | 'offset' | 'buffer' | 'options' | 'flags' | 'named' | 'signal'
type Bad = [label: string, value: () => unknown, code: string]

const notNumbers: Bad[] = [
  ['undefined', () => undefined, 'EINVAL'],
  ['null', () => null, 'EINVAL'],
  ['a numeric string', () => '512', 'EINVAL'],
  ['an object', () => ({}), 'EINVAL'],
  ['an array', () => [512], 'EINVAL'],
  ['a boolean', () => true, 'EINVAL'],
  ['a symbol', () => Symbol('x'), 'EINVAL'],
  ['a function', () => () => 512, 'EINVAL'],
  ['a boxed number', () => Object(512), 'EINVAL'],
]

const BAD: Record<Role, Bad[]> = {
  count: [
    ...notNumbers,
    ['-1', () => -1, 'EINVAL'],
    ['NaN', () => Number.NaN, 'EINVAL'],
    ['Infinity', () => Number.POSITIVE_INFINITY, 'EINVAL'],
    ['-Infinity', () => Number.NEGATIVE_INFINITY, 'EINVAL'],
    ['1.5', () => 1.5, 'EINVAL'],
    ['-0 (a zero-size request)', () => -0, 'EINVAL'],
    ['2**53', () => 2 ** 53, 'ERANGE'],
    ['Number.MAX_VALUE', () => Number.MAX_VALUE, 'ERANGE'],
    // Too large for a request without extended headers, but also past the end: libnbd checks
    // the range first.
    ['2**32 (past the end, and more than a request can say)', () => 2 ** 32, BOUNDS],
    ['a bigint', () => 512n, 'EINVAL'],
    ['a negative bigint', () => -1n, 'EINVAL'],
    ['a huge bigint', () => 2n ** 64n, 'EINVAL'],
  ],
  offset: [
    ...notNumbers,
    ['-1', () => -1, 'EINVAL'],
    ['NaN', () => Number.NaN, 'EINVAL'],
    ['Infinity', () => Number.POSITIVE_INFINITY, 'EINVAL'],
    ['-Infinity', () => Number.NEGATIVE_INFINITY, 'EINVAL'],
    ['0.5', () => 0.5, 'EINVAL'],
    ['2**53', () => 2 ** 53, 'ERANGE'],
    ['Number.MAX_VALUE', () => Number.MAX_VALUE, 'ERANGE'],
    ['a negative bigint', () => -1n, 'EINVAL'],
    ['2n**64n', () => 2n ** 64n, 'ERANGE'],
    ['a bigint past the end of the export', () => 2n ** 64n - 1n, BOUNDS],
  ],
  buffer: [
    ['undefined', () => undefined, 'EINVAL'],
    ['null', () => null, 'EINVAL'],
    ['a string', () => 'abc', 'EINVAL'],
    ['a number', () => 512, 'EINVAL'],
    ['an object', () => ({ length: 512 }), 'EINVAL'],
    ['an array', () => new Array(512).fill(0), 'EINVAL'],
    ['an ArrayBuffer', () => new ArrayBuffer(512), 'EINVAL'],
    ['a SharedArrayBuffer', () => new SharedArrayBuffer(512), 'EINVAL'],
    ['a DataView', () => new DataView(new ArrayBuffer(512)), 'EINVAL'],
    ['a Uint16Array', () => new Uint16Array(256), 'EINVAL'],
    ['a Uint8ClampedArray', () => new Uint8ClampedArray(512), 'EINVAL'],
    ['an Int8Array', () => new Int8Array(512), 'EINVAL'],
    ['a detached Buffer', detachedBuffer, 'EINVAL'],
    ['a detached Uint8Array', detachedUint8Array, 'EINVAL'],
    ['a zero-length Buffer', () => Buffer.alloc(0), 'EINVAL'],
    ['a buffer past the end of the export', () => Buffer.alloc(EXPORT_SIZE + 512), BOUNDS],
  ],
  options: [
    ['null', () => null, 'EINVAL'],
    ['a string', () => 'fua', 'EINVAL'],
    ['a number', () => 1, 'EINVAL'],
    ['a boolean', () => true, 'EINVAL'],
    ['a symbol', () => Symbol('opts'), 'EINVAL'],
  ],
  flags: [
    ['-1', () => -1, 'EINVAL'],
    ['1.5', () => 1.5, 'EINVAL'],
    ['NaN', () => Number.NaN, 'EINVAL'],
    ['Infinity', () => Number.POSITIVE_INFINITY, 'EINVAL'],
    ['2**32', () => 2 ** 32, 'EINVAL'],
    ['a string', () => '1', 'EINVAL'],
    ['a bigint', () => 1n, 'EINVAL'],
    ['null', () => null, 'EINVAL'],
    ['an object', () => ({}), 'EINVAL'],
    ['a bit no command knows', () => 0x8000, 'EINVAL'],
  ],
  named: [
    ['a string', () => 'yes', 'EINVAL'],
    ['a number', () => 1, 'EINVAL'],
    ['null', () => null, 'EINVAL'],
    ['an object', () => ({}), 'EINVAL'],
  ],
  signal: [
    ['null', () => null, 'EINVAL'],
    ['a plain object', () => ({}), 'EINVAL'],
    ['a look-alike', () => ({ aborted: false, reason: undefined, addEventListener() {}, removeEventListener() {} }), 'EINVAL'],
    ['an EventTarget', () => new EventTarget(), 'EINVAL'],
    ['an AbortController', () => new AbortController(), 'EINVAL'],
    ['a string', () => 'abort', 'EINVAL'],
  ],
}

interface Method {
  name: string
  /** Calls the method with one argument replaced. */
  call(h: Handle, role: Role, value: unknown): Promise<unknown>
  roles: Role[]
  /** The named flags it takes. */
  named?: string
}

const SIZE = 512
const OFFSET = 4096

function args(role: Role, value: unknown, named = 'fua') {
  return {
    count: role === 'count' ? value : SIZE,
    offset: role === 'offset' ? value : OFFSET,
    buffer: role === 'buffer' ? value : Buffer.alloc(SIZE),
    opts:
      role === 'options' ? value
      : role === 'flags' ? { flags: value }
      : role === 'named' ? { [named]: value }
      : role === 'signal' ? { signal: value }
      : undefined,
  } as { count: number; offset: number; buffer: Uint8Array; opts: never }
}

const METHODS: Method[] = [
  {
    name: 'pread',
    roles: ['count', 'offset', 'options', 'flags', 'signal'],
    call: (h, r, v) => {
      const a = args(r, v)
      return h.pread(a.count, a.offset, a.opts)
    },
  },
  {
    name: 'preadInto',
    roles: ['buffer', 'offset', 'options', 'flags', 'signal'],
    call: (h, r, v) => {
      const a = args(r, v)
      return h.preadInto(a.buffer, a.offset, a.opts)
    },
  },
  {
    name: 'pwrite',
    roles: ['buffer', 'offset', 'options', 'flags', 'named', 'signal'],
    call: (h, r, v) => {
      const a = args(r, v, 'fua')
      return h.pwrite(a.buffer, a.offset, a.opts)
    },
  },
  {
    name: 'flush',
    roles: ['options', 'flags', 'signal'],
    call: (h, r, v) => h.flush(args(r, v).opts),
  },
  {
    name: 'trim',
    roles: ['count', 'offset', 'options', 'flags', 'named', 'signal'],
    call: (h, r, v) => {
      const a = args(r, v, 'fua')
      return h.trim(a.count, a.offset, a.opts)
    },
  },
  {
    name: 'cache',
    roles: ['count', 'offset', 'options', 'flags', 'signal'],
    call: (h, r, v) => {
      const a = args(r, v)
      return h.cache(a.count, a.offset, a.opts)
    },
  },
  {
    name: 'zero',
    roles: ['count', 'offset', 'options', 'flags', 'named', 'signal'],
    call: (h, r, v) => {
      const a = args(r, v, 'noHole')
      return h.zero(a.count, a.offset, a.opts)
    },
  },
]

async function memoryServer(t: ExecutionContext, pluginArgs: string[] = [], extraArgs: string[] = []): Promise<Server | undefined> {
  return useNbdkit(t, ['memory', String(EXPORT_SIZE), ...pluginArgs], { extraArgs })
}

for (const method of METHODS) {
  test(`${method.name}: every bad argument rejects with its exact code, sends nothing and leaves the handle ready`, async (t) => {
    const server = await memoryServer(t)
    if (!server) return
    const h = await openHandle(t, server)
    const sentBefore = h.stats.bytesSent
    let checked = 0
    for (const role of method.roles) {
      for (const [label, value, listed] of BAD[role]) {
        const code = listed === BOUNDS ? boundsCode(method.name) : listed
        // zero's named flags are noHole and fastZero; check the second one too.
        const err = await expectReject(t, () => method.call(h, role, value()), code, method.name)
        if (err === undefined) t.log(`${method.name} ${role} = ${label}`)
        checked++
        if (role === 'named' && method.name === 'zero') {
          await expectReject(t, () => h.zero(SIZE, OFFSET, { fastZero: value() as boolean }), code, 'zero')
        }
      }
    }
    t.log(`${checked} bad calls of ${method.name}`)
    t.is(h.stats.bytesSent, sentBefore, 'a bad call reached the server')
    t.is(h.state, 'ready')
    t.is(h.inFlight, 0)
    // Still fully usable.
    await h.pwrite(seededBytes(SIZE, 5), OFFSET)
    t.deepEqual(await h.pread(SIZE, OFFSET), seededBytes(SIZE, 5))
  })
}

test('shutdown: bad options reject with EINVAL and leave the handle ready', async (t) => {
  const server = await memoryServer(t)
  if (!server) return
  const h = await openHandle(t, server)
  for (const [, value] of BAD.options) {
    await expectReject(t, () => h.shutdown(value() as never), 'EINVAL', 'shutdown')
  }
  for (const [, value] of BAD.named) {
    await expectReject(t, () => h.shutdown({ abandonPending: value() as boolean }), 'EINVAL', 'shutdown')
  }
  t.is(h.state, 'ready')
  await h.shutdown()
  t.is(h.state, 'closed')
})

test('calls with missing arguments reject with EINVAL', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = await openEmbedded(t, server)
  const loose = h as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>
  for (const name of ['pread', 'preadInto', 'pwrite', 'trim', 'cache', 'zero']) {
    await expectReject(t, () => loose[name]!.call(h), 'EINVAL', name)
    await expectReject(t, () => loose[name]!.call(h, name.startsWith('p') && name !== 'pread' ? Buffer.alloc(8) : 8), 'EINVAL', name)
  }
  t.is(h.state, 'ready')
})

test('-0 is a valid offset (it is 0), and numbers and bigints address the same bytes', async (t) => {
  const server = await memoryServer(t)
  if (!server) return
  const h = await openHandle(t, server)
  const data = seededBytes(SIZE, 11)
  await h.pwrite(data, -0)
  t.deepEqual(await h.pread(SIZE, 0n), data)
  const into = Buffer.alloc(SIZE)
  await h.preadInto(into, -0)
  t.deepEqual(into, data)
  await h.zero(SIZE, -0)
  t.true((await h.pread(SIZE, 0)).every((b) => b === 0))
  // flags -0 is 0.
  await h.flush({ flags: -0 })
})

test('with strict bounds off, an offset near 2^64 reaches the server, which refuses it with EINVAL; the handle survives', async (t) => {
  const server = await memoryServer(t)
  if (!server) return
  const h = await openHandle(t, server, { strict: 0x7f & ~STRICT_BOUNDS })
  await expectReject(t, () => h.pread(SIZE, 2n ** 64n - 1024n), 'EINVAL', 'pread')
  t.is(h.state, 'ready')
  t.is((await h.pread(SIZE, 0)).length, SIZE)
})

// ---- synchronous methods and HandleOptions --------------------------------------------------

const notStrings: Bad[] = [
  ['undefined', () => undefined, 'EINVAL'],
  ['null', () => null, 'EINVAL'],
  ['a number', () => 5, 'EINVAL'],
  ['an object', () => ({}), 'EINVAL'],
  ['a boxed string', () => Object('name'), 'EINVAL'],
  ['a symbol', () => Symbol('s'), 'EINVAL'],
  ['a Buffer', () => Buffer.from('name'), 'EINVAL'],
]
const notBooleans: Bad[] = [
  ['undefined', () => undefined, 'EINVAL'],
  ['null', () => null, 'EINVAL'],
  ['1', () => 1, 'EINVAL'],
  ['"true"', () => 'true', 'EINVAL'],
  ['an object', () => ({}), 'EINVAL'],
]
const notUint32: Bad[] = [
  ['undefined', () => undefined, 'EINVAL'],
  ['null', () => null, 'EINVAL'],
  ['-1', () => -1, 'EINVAL'],
  ['1.5', () => 1.5, 'EINVAL'],
  ['NaN', () => Number.NaN, 'EINVAL'],
  ['2**32', () => 2 ** 32, 'EINVAL'],
  ['a string', () => '1', 'EINVAL'],
  ['a bigint', () => 1n, 'EINVAL'],
]

const SETTERS: [name: string, set: (h: Handle, v: unknown) => void, bad: Bad[]][] = [
  ['setExportName', (h, v) => h.setExportName(v as string), notStrings],
  ['setHandleName', (h, v) => h.setHandleName(v as string), notStrings],
  ['setStrictMode', (h, v) => h.setStrictMode(v as number), [...notUint32, ['an unknown bit', () => 0x80, 'EINVAL']]],
  ['setHandshakeFlags', (h, v) => h.setHandshakeFlags(v as number), [...notUint32, ['an unknown bit', () => 4, 'EINVAL']]],
  ['setPreadInitialize', (h, v) => h.setPreadInitialize(v as boolean), notBooleans],
  ['setRequestStructuredReplies', (h, v) => h.setRequestStructuredReplies(v as boolean), notBooleans],
  ['setRequestBlockSize', (h, v) => h.setRequestBlockSize(v as boolean), notBooleans],
  ['setFullInfo', (h, v) => h.setFullInfo(v as boolean), notBooleans],
]

test('setters throw NbdError with the exact code for bad values and keep the old setting', (t) => {
  for (const [name, set, bad] of SETTERS) {
    const h = new Handle()
    const before = JSON.stringify([h.getExportName(), h.getHandleName(), h.getStrictMode(), h.getHandshakeFlags(),
      h.getPreadInitialize(), h.getRequestStructuredReplies(), h.getRequestBlockSize(), h.getFullInfo()])
    for (const [label, value, code] of bad) {
      expectThrow(t, () => set(h, value()), code, name)
      t.is(h.state, 'created', `${name}(${label})`)
    }
    const after = JSON.stringify([h.getExportName(), h.getHandleName(), h.getStrictMode(), h.getHandshakeFlags(),
      h.getPreadInitialize(), h.getRequestStructuredReplies(), h.getRequestBlockSize(), h.getFullInfo()])
    t.is(after, before, `a refused ${name} changed a setting`)
  }
})

const OPTION_FIELDS: [field: string, bad: Bad[]][] = [
  ['exportName', notStrings.filter(([l]) => l !== 'undefined')],
  ['name', notStrings.filter(([l]) => l !== 'undefined')],
  ['strict', [...notUint32.filter(([l]) => l !== 'undefined'), ['an unknown bit', () => 0x80, 'EINVAL']]],
  ['handshakeFlags', [...notUint32.filter(([l]) => l !== 'undefined'), ['an unknown bit', () => 4, 'EINVAL']]],
  ['preadInitialize', notBooleans.filter(([l]) => l !== 'undefined')],
  ['requestStructuredReplies', notBooleans.filter(([l]) => l !== 'undefined')],
  ['requestBlockSize', notBooleans.filter(([l]) => l !== 'undefined')],
  ['fullInfo', notBooleans.filter(([l]) => l !== 'undefined')],
  ['connectTimeout', [
    ['null', () => null, 'EINVAL'],
    ['-1', () => -1, 'EINVAL'],
    ['NaN', () => Number.NaN, 'EINVAL'],
    ['Infinity', () => Number.POSITIVE_INFINITY, 'EINVAL'],
    ['a string', () => '100', 'EINVAL'],
    ['a bigint', () => 100n, 'EINVAL'],
    // Larger than any duration: once a panic that aborted the process.
    ['1e300', () => 1e300, 'ERANGE'],
    ['Number.MAX_VALUE', () => Number.MAX_VALUE, 'ERANGE'],
  ]],
  ['maxInFlight', [
    ['null', () => null, 'EINVAL'],
    ['0', () => 0, 'EINVAL'],
    ['-1', () => -1, 'EINVAL'],
    ['1.5', () => 1.5, 'EINVAL'],
    ['NaN', () => Number.NaN, 'EINVAL'],
    ['2**32', () => 2 ** 32, 'EINVAL'],
    ['a string', () => '64', 'EINVAL'],
  ]],
]

test('HandleOptions: every field with a bad value makes the constructor throw with the exact code', (t) => {
  let checked = 0
  for (const [field, bad] of OPTION_FIELDS) {
    for (const [label, value, code] of bad) {
      let thrown: unknown
      try {
        new Handle({ [field]: value() } as never)
      } catch (e) {
        thrown = e
      }
      t.true(thrown instanceof NbdError, `${field}: ${label} did not throw an NbdError (${String(thrown)})`)
      t.is((thrown as NbdError | undefined)?.code, code, `${field}: ${label}`)
      checked++
    }
  }
  for (const options of [null, 'x', 5, true, Symbol('o')]) {
    expectThrow(t, () => new Handle(options as never), 'EINVAL', 'create')
  }
  // Large but representable timeouts are fine.
  t.notThrows(() => new Handle({ connectTimeout: Number.MAX_SAFE_INTEGER, maxInFlight: 2 ** 32 - 1 }))
  t.log(`${checked} bad HandleOptions fields`)
})

test('synchronous getters with bad arguments throw EINVAL', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = await openEmbedded(t, server)
  for (const kind of [undefined, null, 5, 'MINIMUM', 'min', '', {}, Symbol('k')]) {
    expectThrow(t, () => h.getBlockSize(kind as never), 'EINVAL', 'getBlockSize')
  }
  for (const opts of [null, 'x', 5, true]) {
    expectThrow(t, () => h.getSize(opts as never), 'EINVAL', 'getSize')
  }
  for (const bigint of ['yes', 1, null, {}]) {
    expectThrow(t, () => h.getSize({ bigint } as never), 'EINVAL', 'getSize')
  }
  t.is(h.getSize({ bigint: false }), MiB)
  t.is(h.getSize({}), MiB)
})

// ---- connect* with bad arguments ------------------------------------------------------------

test('connect* with bad arguments reject with the exact code', async (t) => {
  const dir = useTempDir(t)
  const fresh = () => {
    const h = new Handle()
    t.teardown(() => h.close())
    return h
  }
  // Refused before anything starts: the handle stays created.
  const early: [string, (h: Handle) => Promise<unknown>, string][] = [
    ...[undefined, null, '3', {}, [], 3n, true].map((fd): [string, (h: Handle) => Promise<unknown>, string] =>
      ['connectSocket', (h) => h.connectSocket(fd as number), 'EINVAL']),
    ...[-1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 31, -0.5].map((fd): [string, (h: Handle) => Promise<unknown>, string] =>
      ['connectSocket', (h) => h.connectSocket(fd), 'EBADF']),
    ...[undefined, null, 5, {}, Buffer.from('/tmp/x.sock')].map((p): [string, (h: Handle) => Promise<unknown>, string] =>
      ['connectUnix', (h) => h.connectUnix(p as string), 'EINVAL']),
    ...[undefined, null, 5, {}].map((host): [string, (h: Handle) => Promise<unknown>, string] =>
      ['connectTcp', (h) => h.connectTcp(host as string, 10809), 'EINVAL']),
    ...[-1, 65536, 1.5, Number.NaN, null, {}, undefined, 10809n].map((port): [string, (h: Handle) => Promise<unknown>, string] =>
      ['connectTcp', (h) => h.connectTcp('127.0.0.1', port as number), 'EINVAL']),
  ]
  for (const [op, call, code] of early) {
    const h = fresh()
    await expectReject(t, () => call(h), code, op)
    t.is(h.state, 'created', `${op} refused its arguments but left state ${h.state}`)
  }
  // Refused once connecting has begun: the handle is dead, as after any failed connect.
  const late: [string, (h: Handle) => Promise<unknown>, string][] = [
    ['connectUnix', (h) => h.connectUnix(`${dir}/a\0b.sock`), 'EINVAL'],
    ['connectUnix', (h) => h.connectUnix(`${dir}/${'x'.repeat(200)}.sock`), 'ENAMETOOLONG'],
    ['connectUnix', (h) => h.connectUnix(''), 'EINVAL'],
    ['connectUnix', (h) => h.connectUnix(`${dir}/missing.sock`), 'ENOENT'],
    ['connectUnix', (h) => h.connectUnix(dir), 'ECONNREFUSED'],
    ['connectTcp', (h) => h.connectTcp('127.0.0.1', 'not-a-service'), 'EINVAL'],
    ['connectTcp', (h) => h.connectTcp('127.0.0.1', '99999'), 'EINVAL'],
    ['connectTcp', (h) => h.connectTcp('a\0b', 10809), 'EINVAL'],
    ['connectTcp', (h) => h.connectTcp('no-such-host.invalid', 10809), 'ENOENT'],
  ]
  for (const [op, call, code] of late) {
    const h = fresh()
    await expectReject(t, () => call(h), code, op)
    t.is(h.state, 'dead')
  }
})

// ---- closed and dead handles ----------------------------------------------------------------

const COMMANDS: [string, (h: Handle) => Promise<unknown>][] = [
  ['pread', (h) => h.pread(SIZE, 0)],
  ['preadInto', (h) => h.preadInto(Buffer.alloc(SIZE), 0)],
  ['pwrite', (h) => h.pwrite(Buffer.alloc(SIZE), 0)],
  ['flush', (h) => h.flush()],
  ['trim', (h) => h.trim(SIZE, 0)],
  ['cache', (h) => h.cache(SIZE, 0)],
  ['zero', (h) => h.zero(SIZE, 0)],
]

const CONFIG_SETTERS: [string, (h: Handle) => void][] = [
  ['setExportName', (h) => h.setExportName('x')],
  ['setRequestStructuredReplies', (h) => h.setRequestStructuredReplies(false)],
  ['setRequestBlockSize', (h) => h.setRequestBlockSize(false)],
  ['setFullInfo', (h) => h.setFullInfo(true)],
  ['setHandshakeFlags', (h) => h.setHandshakeFlags(0)],
]

test('a closed handle refuses everything with EINVAL, bad arguments included; close stays harmless', async (t) => {
  const server = await memoryServer(t)
  if (!server) return
  const h = await openHandle(t, server)
  await h.close()
  for (const [op, call] of COMMANDS) await expectReject(t, () => call(h), 'EINVAL', op)
  // With bad arguments as well: still a rejection, never a throw.
  await expectReject(t, () => h.pread(-1, 0), 'EINVAL', 'pread')
  await expectReject(t, () => h.preadInto(detachedBuffer(), 0), 'EINVAL', 'preadInto')
  await expectReject(t, () => h.shutdown(), 'EINVAL', 'shutdown')
  await expectReject(t, () => h.connectUnix(server.socket!), 'EINVAL', 'connectUnix')
  for (const [op, set] of CONFIG_SETTERS) expectThrow(t, () => set(h), 'EINVAL', op)
  expectThrow(t, () => h.getSize(), 'EINVAL', 'getSize')
  t.is(h.inFlight, 0)
  t.is(typeof h.stats.bytesSent, 'bigint')
  await Promise.all([h.close(), h.close()])
  t.is(h.state, 'closed')
})

test('a dead handle (server killed) refuses commands and getters with EINVAL, and closes twice', async (t) => {
  const server = await memoryServer(t)
  if (!server) return
  const h = await openHandle(t, server)
  t.is(h.getSize(), EXPORT_SIZE)
  server.kill('SIGKILL')
  t.true(await waitFor(() => h.state === 'dead', 5000), `state is ${h.state}, not dead`)
  for (const [op, call] of COMMANDS) await expectReject(t, () => call(h), 'EINVAL', op)
  await expectReject(t, () => h.pread(Number.NaN, 0), 'EINVAL', 'pread')
  await expectReject(t, () => h.shutdown(), 'EINVAL', 'shutdown')
  await expectReject(t, () => h.connectUnix(server.socket!), 'EINVAL', 'connectUnix')
  for (const [op, set] of CONFIG_SETTERS) expectThrow(t, () => set(h), 'EINVAL', op)
  // As libnbd, whose getters are allowed negotiating, connected or closed: not dead.
  expectThrow(t, () => h.getSize(), 'EINVAL', 'getSize')
  expectThrow(t, () => h.canTrim(), 'EINVAL', 'canTrim')
  expectThrow(t, () => h.getProtocol(), 'EINVAL', 'getProtocol')
  t.is(h.inFlight, 0)
  await Promise.all([h.close(), h.close()])
  t.is(h.state, 'closed')
  await h.close()
})

test('close twice, concurrently, in every state', async (t) => {
  const dir = useTempDir(t)
  const silent = await rawServer(dir, () => {})
  t.teardown(() => silent.close())
  // Reads take 60 s (emulated runs are slow): the one pending is cut short by the close.
  const server = await memoryServer(t, ['rdelay=60'], ['--filter=delay'])
  if (!server) return

  const created = new Handle()
  const ready = await openHandle(t, server)
  const processing = await openHandle(t, server)
  const closed = await openHandle(t, server)
  await closed.close()
  const connecting = new Handle()
  const connectingOutcome = outcome(connecting.connectUnix(silent.socket))
  const pendingRead = outcome(processing.pread(SIZE, 0))
  t.true(await waitFor(() => silent.connections === 1, 30_000))
  t.is(connecting.state, 'connecting')
  t.is(processing.state, 'processing')

  for (const h of [created, connecting, ready, processing, closed]) {
    const first = h.close()
    const second = h.close()
    t.true(first instanceof Promise && second instanceof Promise)
    await Promise.all([first, second])
    t.is(h.state, 'closed')
    await h.close()
  }
  const connectErr = await connectingOutcome
  t.true(connectErr instanceof NbdError && connectErr.code === 'ECANCELED', `connect: ${String(connectErr)}`)
  const readErr = await pendingRead
  t.true(readErr instanceof NbdError && readErr.code === 'ENOTCONN', `pread: ${String(readErr)}`)
})

// ---- connect twice --------------------------------------------------------------------------

test('connect twice: a second connect while connecting or after connecting rejects with EINVAL and takes no fd', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = new Handle()
  t.teardown(() => h.close())
  const first = h.connectSocket(server.socketpair())
  // While the first is connecting.
  const fd2 = server.socketpair()
  const target2 = fdTarget(fd2)
  await expectReject(t, () => h.connectSocket(fd2), 'EINVAL', 'connectSocket')
  await expectReject(t, () => h.connectTcp('127.0.0.1', 1), 'EINVAL', 'connectTcp')
  await first
  t.is(h.state, 'ready')
  // After it.
  await expectReject(t, () => h.connectSocket(fd2), 'EINVAL', 'connectSocket')
  await expectReject(t, () => h.connectUnix('/nonexistent.sock'), 'EINVAL', 'connectUnix')
  t.is(h.state, 'ready')
  // The refused fd still belongs to the caller, open and unchanged.
  t.is(fdTarget(fd2), target2)
  const other = new Handle()
  t.teardown(() => other.close())
  await other.connectSocket(fd2)
  t.is(other.state, 'ready')
})

// ---- close while connecting (a server that never answers) -----------------------------------

test.serial('close while connecting rejects the connect with ECANCELED at once and closes the socket', async (t) => {
  const dir = useTempDir(t)
  const silent = await rawServer(dir, () => {})
  t.teardown(() => silent.close())
  const before = countOpenFds()
  const h = new Handle()
  const connecting = outcome(h.connectUnix(silent.socket))
  t.true(await waitFor(() => silent.connections === 1, 30_000))
  t.is(h.state, 'connecting')
  const closedAt = Date.now()
  await h.close()
  const err = await connecting
  t.true(Date.now() - closedAt < 3000, 'the connect outlived close')
  t.true(err instanceof NbdError, String(err))
  t.is((err as NbdError).code, 'ECANCELED')
  t.is((err as NbdError).operation, 'connectUnix')
  t.is(h.state, 'closed')
  await silent.close()
  t.true(await waitFor(() => countOpenFds() <= before, 3000), `fds: ${countOpenFds()} now, ${before} before`)
})

test.serial('close while connectSocket is waiting for the server closes the fd it took', async (t) => {
  const dir = useTempDir(t)
  const silent = await rawServer(dir, () => {})
  t.teardown(() => silent.close())
  const fd = await connectedSocketFd({ socket: silent.socket })
  const target = fdTarget(fd)
  const h = new Handle()
  const connecting = outcome(h.connectSocket(fd))
  await sleep(50)
  t.is(h.state, 'connecting')
  t.is(fdTarget(fd), target, 'the fd was closed before close()')
  await h.close()
  const err = await connecting
  t.true(err instanceof NbdError && err.code === 'ECANCELED', String(err))
  t.not(fdTarget(fd), target, 'close() left the fd open')
})

// ---- close with 10,000 commands in flight ---------------------------------------------------

test.serial('close with 10,000 commands in flight: every one settles at once, with ENOTCONN or its result', async (t) => {
  const server = await memoryServer(t, ['rdelay=2', 'wdelay=2', 'delay-trim=2', 'delay-zero=2', 'delay-cache=2'], ['--filter=delay'])
  if (!server) return
  const h = await openHandle(t, server)
  const N = 10_000
  const intoBuffers: Buffer[] = []
  const outcomes: Promise<readonly [string, unknown]>[] = []
  const track = (op: string, p: Promise<unknown>) => outcomes.push(outcome(p).then((o) => [op, o] as const))
  for (let i = 0; i < N; i++) {
    const offset = (i * SIZE) % EXPORT_SIZE
    switch (i % 7) {
      case 0: track('pread', h.pread(SIZE, offset)); break
      case 1: {
        const b = Buffer.alloc(SIZE, 0xaa)
        intoBuffers.push(b)
        track('preadInto', h.preadInto(b, offset))
        break
      }
      case 2: track('pwrite', h.pwrite(Buffer.alloc(SIZE, i & 0xff), offset)); break
      case 3: track('flush', h.flush()); break
      case 4: track('trim', h.trim(SIZE, offset)); break
      case 5: track('cache', h.cache(SIZE, offset)); break
      default: track('zero', h.zero(SIZE, offset)); break
    }
  }
  // A few flushes (which the delay filter cannot slow) may already be answered.
  t.true(h.inFlight > N - 100, `only ${h.inFlight} in flight`)
  await sleep(100)
  const closedAt = Date.now()
  await h.close()
  const settled = await Promise.all(outcomes)
  const elapsed = Date.now() - closedAt
  t.true(elapsed < 5000, `settling took ${elapsed} ms after close`)
  const codes = new Map<string, number>()
  for (const [op, o] of settled) {
    const key = o === 'resolved' ? 'resolved' : o instanceof NbdError ? o.code : `not an NbdError: ${String(o)}`
    codes.set(key, (codes.get(key) ?? 0) + 1)
    if (o instanceof NbdError) t.is(o.operation, op)
  }
  t.log(Object.fromEntries(codes))
  t.deepEqual([...codes.keys()].filter((k) => k !== 'resolved' && k !== 'ENOTCONN'), [])
  // Only the first few dozen can have been answered before the close.
  t.true((codes.get('ENOTCONN') ?? 0) >= N - 200, `only ${codes.get('ENOTCONN')} ENOTCONN`)
  t.is(h.state, 'closed')
  t.is(h.inFlight, 0)
  // Buffers of reads that failed are never written after the close.
  const snapshot = intoBuffers.map((b) => Buffer.from(b))
  await sleep(300)
  t.true(intoBuffers.every((b, i) => b.equals(snapshot[i]!)), 'a preadInto buffer was written after close')
})

// ---- AbortSignal ----------------------------------------------------------------------------

const ABORTABLE: [string, (h: Handle, signal: AbortSignal, buf?: Buffer) => Promise<unknown>][] = [
  ['pread', (h, signal) => h.pread(SIZE, OFFSET, { signal })],
  ['preadInto', (h, signal, buf) => h.preadInto(buf ?? Buffer.alloc(SIZE), OFFSET, { signal })],
  ['pwrite', (h, signal) => h.pwrite(Buffer.alloc(SIZE, 1), OFFSET, { signal })],
  ['flush', (h, signal) => h.flush({ signal })],
  ['trim', (h, signal) => h.trim(SIZE, OFFSET, { signal, fua: true })],
  ['cache', (h, signal) => h.cache(SIZE, OFFSET, { signal })],
  ['zero', (h, signal) => h.zero(SIZE, OFFSET, { signal, noHole: true })],
]

test('an already aborted signal rejects every command with AbortError (reason as cause) and sends nothing', async (t) => {
  const server = await memoryServer(t)
  if (!server) return
  const h = await openHandle(t, server)
  const sent = h.stats.bytesSent
  const reason = new Error('changed my mind')
  for (const [op, call] of ABORTABLE) {
    const buf = Buffer.alloc(SIZE, 0x5a)
    const err = await outcome(call(h, AbortSignal.abort(reason), buf))
    t.true(isAbortError(err), `${op}: ${String(err)}`)
    t.is((err as Error).cause, reason, op)
    t.true(buf.every((b) => b === 0x5a), `${op} touched the buffer`)
  }
  t.is(h.stats.bytesSent, sent)
  t.is(h.inFlight, 0)
  t.is(h.state, 'ready')
})

test('aborting mid-flight rejects every command kind at once; late replies are dropped and the handle stays usable', async (t) => {
  // Every command but flush is delayed 2 s on the server (the delay filter cannot slow a
  // flush); the flush is caught queued behind a delayed read on a maxInFlight 1 handle.
  const server = await memoryServer(t, ['rdelay=2', 'wdelay=2', 'delay-trim=2', 'delay-zero=2', 'delay-cache=2'], ['--filter=delay'])
  if (!server) return
  const h = await openHandle(t, server)
  const serial = await openHandle(t, server, { maxInFlight: 1 })
  const controller = new AbortController()
  const warnings: Error[] = []
  const onWarning = (w: Error) => warnings.push(w)
  process.on('warning', onWarning)
  t.teardown(() => process.off('warning', onWarning))
  // Many commands share the signal: one listener for all of them.
  const sentBefore = h.stats.chunksSent
  const pending = [['pread', outcome(serial.pread(SIZE, 0, { signal: controller.signal }))] as const]
  for (let i = 0; i < 3; i++) {
    for (const [op, call] of ABORTABLE) {
      pending.push([op, outcome(call(op === 'flush' ? serial : h, controller.signal))] as const)
    }
  }
  t.is(getEventListeners(controller.signal, 'abort').length, 1)
  const onWire = 3n * BigInt(ABORTABLE.length - 1)
  t.true(await waitFor(() => h.stats.chunksSent - sentBefore >= onWire, 1000), 'the commands were not all sent')
  const abortedAt = Date.now()
  controller.abort()
  for (const [op, p] of pending) t.true(isAbortError(await p), `${op}: ${String(await p)}`)
  t.true(Date.now() - abortedAt < 500, 'the abort waited for the server')
  t.is(getEventListeners(controller.signal, 'abort').length, 0)
  // The server still answers them; those replies are matched and dropped.
  // Two rounds of 2 s on the server (its 16 threads); much longer under emulation.
  t.true(await waitFor(() => h.inFlight === 0 && serial.inFlight === 0, 30_000), `inFlight stuck at ${h.inFlight}`)
  t.is(h.state, 'ready')
  t.is(serial.state, 'ready')
  await h.pwrite(seededBytes(SIZE, 3), 0)
  t.deepEqual(await h.pread(SIZE, 0), seededBytes(SIZE, 3))
  await serial.flush()
  await sleep(0)
  t.deepEqual(warnings.filter((w) => w.name === 'MaxListenersExceededWarning').map(String), [])
})

test('AbortSignal.timeout rejects a slow command with AbortError whose cause is the TimeoutError', async (t) => {
  const server = await memoryServer(t, ['rdelay=10'], ['--filter=delay'])
  if (!server) return
  const h = await openHandle(t, server)
  // The reply would take 10 s; the timeout fires long before (however busy this process is).
  const started = Date.now()
  const err = await outcome(h.pread(SIZE, 0, { signal: AbortSignal.timeout(150) }))
  const elapsed = Date.now() - started
  t.true(isAbortError(err), String(err))
  t.is(((err as Error).cause as Error | undefined)?.name, 'TimeoutError')
  t.true(elapsed >= 100 && elapsed < 5000, `aborted after ${elapsed} ms`)
})

test('one signal on two handles: aborting it rejects the pending commands of both, and only those', async (t) => {
  // The signal's one native cancel token is shared by every command it is passed to.
  const server = await memoryServer(t, ['rdelay=2'], ['--filter=delay'])
  if (!server) return
  const a = await openHandle(t, server)
  const b = await openHandle(t, server)
  const controller = new AbortController()
  const first = outcome(a.pread(SIZE, 0, { signal: controller.signal }))
  const second = outcome(b.pread(SIZE, SIZE, { signal: controller.signal }))
  const unsignalled = b.pread(SIZE, 2 * SIZE)
  t.is(getEventListeners(controller.signal, 'abort').length, 1)
  t.true(await waitFor(() => a.inFlight === 1 && b.inFlight === 2, 2000), 'the reads were not all sent')
  const abortedAt = Date.now()
  controller.abort()
  t.true(isAbortError(await first), String(await first))
  t.true(isAbortError(await second), String(await second))
  t.true(Date.now() - abortedAt < 500, 'the abort waited for the server')
  t.is((await unsignalled).length, SIZE)
  t.true(await waitFor(() => a.inFlight === 0 && b.inFlight === 0, 30_000), 'late replies were not drained')
  t.is(a.state, 'ready')
  t.is(b.state, 'ready')
  t.is((await a.pread(SIZE, 0)).length, SIZE)
})

test('a signal outliving its commands keeps no listener; aborting it after they finished changes nothing', async (t) => {
  const server = await memoryServer(t)
  if (!server) return
  const h = await openHandle(t, server)
  const controller = new AbortController()
  const results = await Promise.all(Array.from({ length: 1000 }, (_, i) => h.pread(SIZE, (i * SIZE) % EXPORT_SIZE, { signal: controller.signal })))
  t.is(results.length, 1000)
  t.is(getEventListeners(controller.signal, 'abort').length, 0)
  const p = h.pread(SIZE, 0, { signal: controller.signal })
  t.is(getEventListeners(controller.signal, 'abort').length, 1)
  await p
  controller.abort()
  t.is(h.state, 'ready')
  // The aborted signal now refuses new commands, and only those.
  t.true(isAbortError(await outcome(h.pread(SIZE, 0, { signal: controller.signal }))))
  t.is((await h.pread(SIZE, 0)).length, SIZE)
})

for (const size of [4 * KiB, MiB]) {
  test(`an aborted preadInto (${size / KiB} KiB) never writes its buffer after the abort, though the reply arrives`, async (t) => {
    const server = await memoryServer(t, ['rdelay=3'], ['--filter=delay'])
    if (!server) return
    const data = seededBytes(size, size)
    // Planted before the delay matters (writes are not delayed).
    const h = await openHandle(t, server, { preadInitialize: false })
    await h.pwrite(data, 0)
    const buf = Buffer.alloc(size, 0xaa)
    const controller = new AbortController()
    const aborted = outcome(h.preadInto(buf, 0, { signal: controller.signal }))
    // The same range read without a signal: proves the reply did arrive meanwhile.
    const witness = h.pread(size, 0)
    await sleep(100)
    controller.abort()
    t.true(isAbortError(await aborted))
    const snapshot = Buffer.from(buf)
    t.true(snapshot.every((b) => b === 0xaa), 'with preadInitialize off nothing may touch the buffer')
    t.deepEqual(await witness, data)
    // The server may answer the witness first (its two reads sleep in parallel), and under
    // emulation the aborted read's reply can take a while to drain: wait until it has.
    t.true(await waitFor(() => h.inFlight === 0, 30_000), 'the aborted read\'s reply was never drained')
    await sleep(50)
    t.true(buf.equals(snapshot), 'the buffer was written after the abort')
  })
}

test('an AbortSignal.timeout preadInto leaves the buffer as it was at the timeout', async (t) => {
  const server = await memoryServer(t, ['rdelay=3'], ['--filter=delay'])
  if (!server) return
  const h = await openHandle(t, server)
  await h.pwrite(seededBytes(64 * KiB, 9), 0)
  const buf = Buffer.alloc(64 * KiB, 0xcc)
  const aborted = outcome(h.preadInto(buf, 0, { signal: AbortSignal.timeout(100) }))
  // Issued just after: the same range, read without a signal, while the first is pending.
  const witness = h.pread(64 * KiB, 0)
  t.true(isAbortError(await aborted))
  // preadInitialize (the default) zeroed it when the call started, before the abort.
  const snapshot = Buffer.from(buf)
  t.true(snapshot.every((b) => b === 0))
  t.deepEqual(await witness, seededBytes(64 * KiB, 9))
  // The two reads sleep in parallel in the server, which may answer either first.
  t.true(await waitFor(() => h.inFlight === 0, 30_000), 'the timed-out read\'s reply was never drained')
  await sleep(50)
  t.true(buf.equals(snapshot), 'the buffer was written after the timeout')
})

// ---- buffers of every shape -----------------------------------------------------------------

test('buffers of every shape: SharedArrayBuffer views, pool slices, offset views, resizable-backed views', async (t) => {
  const server = await memoryServer(t)
  if (!server) return
  const h = await openHandle(t, server)
  const data = seededBytes(SIZE, 21)
  // A view into a SharedArrayBuffer is allowed both ways.
  const shared = new Uint8Array(new SharedArrayBuffer(SIZE + 64), 32, SIZE)
  shared.set(data)
  await h.pwrite(shared, 8192)
  const sharedIn = new Uint8Array(new SharedArrayBuffer(SIZE + 64), 32, SIZE)
  await h.preadInto(sharedIn, 8192)
  t.deepEqual(Buffer.from(sharedIn), data)
  t.true(new Uint8Array(sharedIn.buffer, 0, 32).every((b) => b === 0))
  t.true(new Uint8Array(sharedIn.buffer, 32 + SIZE).every((b) => b === 0))
  // A slice at a non-zero byteOffset between two neighbours, and a slice of Buffer's pool.
  const backing = Buffer.alloc(300, 0xee)
  const slice = backing.subarray(100, 200)
  await h.pwrite(data.subarray(0, 100), 16384)
  await h.preadInto(slice, 16384)
  t.deepEqual(slice, data.subarray(0, 100))
  t.true(backing.subarray(0, 100).every((b) => b === 0xee) && backing.subarray(200).every((b) => b === 0xee))
  const pooled = Buffer.from('neighbour one, then a slice of the pool')
  const fromPool = Buffer.allocUnsafe(100)
  const next = Buffer.from('neighbour two')
  await h.preadInto(fromPool, 16384)
  t.deepEqual(fromPool, data.subarray(0, 100))
  t.is(pooled.toString(), 'neighbour one, then a slice of the pool')
  t.is(next.toString(), 'neighbour two')
  await h.pwrite(slice, 20000)
  t.deepEqual(await h.pread(100, 20000), data.subarray(0, 100))
  // A view over a resizable ArrayBuffer.
  const resizable = new ArrayBuffer(SIZE, { maxByteLength: 4 * SIZE } as never) as ArrayBuffer
  const view = new Uint8Array(resizable, 0, SIZE)
  await h.preadInto(view, 8192)
  t.deepEqual(Buffer.from(view), data)
})

test('a buffer detached while preadInto is in flight: EFAULT, no write to freed memory, the handle lives on', async (t) => {
  const server = await memoryServer(t, ['rdelay=400ms'], ['--filter=delay'])
  if (!server) return
  const h = await openHandle(t, server)
  await h.pwrite(Buffer.alloc(64 * KiB, 0x77), 0)
  // Small ones (malloc'd next to other objects) and large ones (mmap'd, unmapped when freed).
  const sizes = [...Array(32).fill(8 * KiB), ...Array(4).fill(MiB)] as number[]
  const outcomes = sizes.map((size) => {
    const buf = Buffer.alloc(size)
    const p = outcome(h.preadInto(buf, 0))
    detach(buf)
    return p
  })
  // Free the transferred memory and fill the heap with sentinels while the reads are pending.
  await collectGarbage()
  const sentinels = Array.from({ length: 200 }, () => Buffer.alloc(8 * KiB, 0x3c))
  for (const o of await Promise.all(outcomes)) {
    t.true(o instanceof NbdError, String(o))
    t.is((o as NbdError).code, 'EFAULT')
    t.is((o as NbdError).operation, 'preadInto')
  }
  t.true(sentinels.every((s) => s.every((b) => b === 0x3c)), 'a read landed in memory the buffer no longer owned')
  t.is(h.state, 'ready')
  t.true((await h.pread(SIZE, 0)).every((b) => b === 0x77))
})

test('a buffer shrunk while preadInto is in flight: EFAULT, nothing written', async (t) => {
  const server = await memoryServer(t, ['rdelay=300ms'], ['--filter=delay'])
  if (!server) return
  const h = await openHandle(t, server)
  const resizable = new ArrayBuffer(SIZE, { maxByteLength: SIZE } as never) as ArrayBuffer & { resize(n: number): void }
  const view = new Uint8Array(resizable, 0, SIZE)
  const p = outcome(h.preadInto(view, 0))
  resizable.resize(SIZE / 2)
  const err = await p
  t.true(err instanceof NbdError && err.code === 'EFAULT', String(err))
  t.is(h.state, 'ready')
})

test('a buffer detached or reused while pwrite is queued: small writes send the bytes they were given, a large one fails EFAULT and sends nothing', async (t) => {
  const server = await memoryServer(t, ['wdelay=300ms'], ['--filter=delay'])
  if (!server) return
  const h = await openHandle(t, server)
  const small = seededBytes(SIZE, 31)
  const large = seededBytes(MiB, 32)
  const a = Buffer.from(small)
  const b = Buffer.from(large)
  const c = Buffer.from(small)
  // Small writes are copied at the call; a large one is sent from its buffer, which is
  // checked again before the first byte leaves: gone, the write fails and nothing is sent.
  const writes = [h.pwrite(a, 0), outcome(h.pwrite(b, MiB)), h.pwrite(c, 3 * MiB)]
  detach(a)
  detach(b)
  c.fill(0)
  await collectGarbage()
  const [, bOutcome] = await Promise.all(writes)
  t.true(bOutcome instanceof NbdError && bOutcome.code === 'EFAULT', String(bOutcome))
  t.is(h.state, 'ready')
  t.deepEqual(await h.pread(SIZE, 0), small)
  t.deepEqual(await h.pread(MiB, MiB), Buffer.alloc(MiB))
  t.deepEqual(await h.pread(SIZE, 3 * MiB), small)
})
