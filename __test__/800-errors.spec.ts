// Failures: server error replies (the handle stays usable), a server that dies or breaks the
// protocol with commands in flight, and every kind of bad argument from JavaScript (rejected
// with EINVAL or ERANGE, never a synchronous throw, never a crash), plus the strict-mode checks.
import fs from 'node:fs'
import test, { type ExecutionContext } from 'ava'
import { Handle, NbdError, CMD_FLAG_FUA } from 'nbd-client'
import { rawServer } from './helpers/fds'
import {
  assertNbdError,
  expectReject,
  openEmbedded,
  openHandle,
  seededBytes,
  useEmbedded,
  KiB,
  MiB,
} from './helpers/nbd'
import { makeTempDir, sleep, useNbdkit, useNbdServer } from './helpers/servers'

// ---- server error replies -------------------------------------------------------------------

const injected: [string, string, (h: Handle) => Promise<unknown>][] = [
  ['EIO', 'pread', (h) => h.pread(4096, 0)],
  ['ENOSPC', 'pwrite', (h) => h.pwrite(Buffer.alloc(4096, 1), 0)],
  ['EPERM', 'trim', (h) => h.trim(4096, 0)],
  ['ENOMEM', 'zero', (h) => h.zero(4096, 0)],
  ['ESHUTDOWN', 'cache', (h) => h.cache(4096, 0)],
]

for (const [code, operation, call] of injected) {
  for (const structured of [true, false]) {
    const replies = structured ? 'structured' : 'simple'
    test(`a server ${code} on ${operation} rejects with ${code} (${replies} replies) and the handle stays usable`, async (t) => {
      const server = await useNbdkit(t, ['memory', '4M', `error=${code}`, `error-${operation}-rate=100%`], {
        extraArgs: ['--filter=error'],
      })
      if (!server) return
      const h = await openHandle(t, server, { requestStructuredReplies: structured })
      t.is(h.getStructuredRepliesNegotiated(), structured)
      await expectReject(t, () => call(h), code, operation)
      t.is(h.state, 'ready')
      // Other commands still work, and the failing one keeps failing the same way.
      const data = seededBytes(512, 77)
      if (operation !== 'pwrite') {
        await h.pwrite(data, 8192)
      }
      if (operation !== 'pread') {
        t.true((await h.pread(512, 8192)).equals(operation === 'pwrite' ? Buffer.alloc(512) : data))
      }
      await h.flush()
      await expectReject(t, () => call(h), code, operation)
      t.is(h.state, 'ready')
      t.is(h.inFlight, 0)
    })
  }
}

test('a failed preadInto leaves zeros, not stale bytes, in the buffer (preadInitialize default)', async (t) => {
  const server = await useNbdkit(t, ['memory', '4M', 'error=EIO', 'error-pread-rate=100%'], { extraArgs: ['--filter=error'] })
  if (!server) return
  const h = await openHandle(t, server)
  const buf = Buffer.alloc(4096, 0xaa)
  const err = await expectReject(t, () => h.preadInto(buf, 0), 'EIO', 'preadInto')
  t.truthy(err)
  t.true(buf.every((b) => b === 0), 'stale bytes left in the buffer after a failed read')
})

// ---- connection loss and protocol violations ------------------------------------------------

test('SIGKILL of the server rejects every pending command promptly and the handle becomes dead', async (t) => {
  const server = await useNbdkit(t, ['memory', '16M', 'rdelay=3', 'wdelay=3'], { extraArgs: ['--filter=delay'] })
  if (!server) return
  const h = await openHandle(t, server)
  const pending = [
    ...Array.from({ length: 40 }, (_, i) => h.pread(4096, i * 4096)),
    ...Array.from({ length: 20 }, (_, i) => h.pwrite(Buffer.alloc(4096, i), MiB + i * 4096)),
  ].map((p) => p.then(() => 'resolved', (e: unknown) => e))
  await sleep(300)
  t.true(h.inFlight > 0, 'nothing was in flight when the server was killed')
  const killedAt = Date.now()
  server.kill('SIGKILL')
  const outcomes = await Promise.all(pending)
  const elapsed = Date.now() - killedAt
  t.true(elapsed < 2000, `pending commands took ${elapsed} ms to reject after the server died`)
  t.is(outcomes.filter((o) => o === 'resolved').length, 0)
  t.true(outcomes.every((o) => o instanceof NbdError), 'a pending command failed with something other than NbdError')
  t.is(h.state, 'dead')
  t.is(h.inFlight, 0)
  // A dead handle refuses new commands by the state rule.
  await expectReject(t, () => h.pread(512, 0), 'EINVAL', 'pread')
  await h.close()
  t.is(h.state, 'closed')
  await expectReject(t, () => h.pwrite(Buffer.alloc(512), 0), 'EINVAL', 'pwrite')
})

// A minimal oldstyle server: a valid handshake, then a structured reply although none was
// negotiated, for the first request it sees, while two more requests are pending.
function oldstyleGreeting(size: number): Buffer {
  const greeting = Buffer.alloc(152)
  greeting.write('NBDMAGIC', 0, 'latin1')
  greeting.writeBigUInt64BE(0x00420281861253n, 8)
  greeting.writeBigUInt64BE(BigInt(size), 16)
  greeting.writeUInt32BE(1, 24) // NBD_FLAG_HAS_FLAGS
  return greeting
}

test('a reply that breaks the protocol fails that command with EPROTO, the others with ENOTCONN', async (t) => {
  const dir = makeTempDir('nbd-proto-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const server = await rawServer(dir, (sock) => {
    sock.write(oldstyleGreeting(MiB))
    let received = Buffer.alloc(0)
    let replied = false
    sock.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk])
      if (replied || received.length < 3 * 28) return
      replied = true
      const reply = Buffer.alloc(20)
      reply.writeUInt32BE(0x668e33ef, 0) // structured reply magic
      reply.writeUInt16BE(1, 4) // NBD_REPLY_FLAG_DONE
      reply.writeUInt16BE(0, 6) // NBD_REPLY_TYPE_NONE
      received.copy(reply, 8, 8, 16) // the first request's cookie
      reply.writeUInt32BE(0, 16)
      sock.write(reply)
    })
  })
  t.teardown(() => server.close())
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectUnix(server.socket)
  t.is(h.getProtocol(), 'oldstyle')
  t.is(h.getSize(), MiB)
  const outcomes = await Promise.all(
    [0, 1, 2].map((i) => h.pread(512, i * 512).then(() => 'resolved', (e: unknown) => e)),
  )
  const codes = outcomes.map((o) => (o instanceof NbdError ? o.code : String(o)))
  t.is(codes.filter((c) => c === 'EPROTO').length, 1, `codes: ${codes.join(', ')}`)
  t.is(codes.filter((c) => c === 'ENOTCONN').length, 2, `codes: ${codes.join(', ')}`)
  for (const o of outcomes) if (o instanceof NbdError) assertNbdError(t, o, ['EPROTO', 'ENOTCONN'], 'pread')
  t.is(h.state, 'dead')
})

// ---- bad arguments --------------------------------------------------------------------------

const ARG_CODES = ['EINVAL', 'ERANGE']

const badCounts: unknown[] = [-1, Number.NaN, 1.5, Number.POSITIVE_INFINITY, 2 ** 53, '512', null, undefined, {}]
const badOffsets: unknown[] = [
  -1, -1n, Number.NaN, 0.5, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 2 ** 53, '0', null, {}, [], 2n ** 64n,
]
const badBuffers: unknown[] = ['abc', null, undefined, 123, {}, [1, 2, 3], new ArrayBuffer(8)]

async function argHandle(t: ExecutionContext) {
  const server = useEmbedded(t, { size: 4 * MiB })
  return openEmbedded(t, server)
}

test('bad counts reject with EINVAL or ERANGE', async (t) => {
  const h = await argHandle(t)
  for (const count of badCounts) {
    const c = count as number
    await expectReject(t, () => h.pread(c, 0), ARG_CODES, 'pread')
    await expectReject(t, () => h.cache(c, 0), ARG_CODES, 'cache')
    await expectReject(t, () => h.trim(c, 0), ARG_CODES, 'trim')
    await expectReject(t, () => h.zero(c, 0), ARG_CODES, 'zero')
  }
  t.is(h.state, 'ready')
  t.is((await h.pread(512, 0)).length, 512)
})

test('bad offsets reject with EINVAL or ERANGE', async (t) => {
  const h = await argHandle(t)
  for (const offset of badOffsets) {
    const o = offset as number
    await expectReject(t, () => h.pread(512, o), ARG_CODES, 'pread')
    await expectReject(t, () => h.preadInto(Buffer.alloc(512), o), ARG_CODES, 'preadInto')
    await expectReject(t, () => h.pwrite(Buffer.alloc(512), o), ARG_CODES, 'pwrite')
    await expectReject(t, () => h.zero(512, o), ARG_CODES, 'zero')
  }
  t.is(h.state, 'ready')
  t.is((await h.pread(512, 0)).length, 512)
})

test('bad buffers reject with EINVAL', async (t) => {
  const h = await argHandle(t)
  for (const buffer of badBuffers) {
    const b = buffer as Uint8Array
    await expectReject(t, () => h.pwrite(b, 0), 'EINVAL', 'pwrite')
    await expectReject(t, () => h.preadInto(b, 0), 'EINVAL', 'preadInto')
  }
  t.is(h.state, 'ready')
})

test('bad flags reject with EINVAL', async (t) => {
  const h = await argHandle(t)
  for (const flags of [-1, 1.5, Number.NaN, 0x10000, 'fua']) {
    await expectReject(t, () => h.pread(512, 0, { flags: flags as number }), 'EINVAL', 'pread')
  }
  // FUA is not a read flag.
  await expectReject(t, () => h.pread(512, 0, { flags: CMD_FLAG_FUA }), 'EINVAL', 'pread')
  t.is(h.state, 'ready')
})

test('bad calls never throw synchronously and never kill the handle', async (t) => {
  const h = await argHandle(t)
  const calls: (() => Promise<unknown>)[] = [
    () => h.pread(-1, 0),
    () => (h.pread as unknown as () => Promise<Buffer>)(),
    () => (h.pwrite as unknown as (x: unknown) => Promise<void>)(undefined),
    () => (h.preadInto as unknown as () => Promise<void>)(),
    () => (h.trim as unknown as (x: unknown, y: unknown) => Promise<void>)('a', 'b'),
    // Symbols throw a TypeError on any implicit conversion: it must become a rejection.
    () => h.cache(Symbol('count') as unknown as number, 0),
    () => h.pwrite(Buffer.alloc(1), Symbol('offset') as unknown as number),
  ]
  for (const call of calls) {
    let p: unknown
    t.notThrows(() => {
      p = call()
    })
    t.true(p instanceof Promise)
    await t.throwsAsync(p as Promise<unknown>)
  }
  t.is(h.state, 'ready')
  const data = seededBytes(1024, 99)
  await h.pwrite(data, 0)
  t.true((await h.pread(1024, 0)).equals(data))
})

test('a method taken off its handle fails with EINVAL: rejected where it returns a promise, thrown where not', async (t) => {
  const h = await argHandle(t)
  // Every method of the prototype, and which of them return promises, from the published types.
  const dts = fs.readFileSync(`${__dirname}/../dist/handle.d.ts`, 'utf8')
  const names = Object.getOwnPropertyNames(Handle.prototype).filter(
    (n) => n !== 'constructor' && typeof Object.getOwnPropertyDescriptor(Handle.prototype, n)!.value === 'function',
  )
  t.true(names.length > 80, `${names.length} methods`)
  // Each method's declaration runs from its line (four spaces, its name, a parenthesis) to
  // the next member's; comments are left out.
  const declarations = new Map<string, string>()
  let member: string | undefined
  for (const line of dts.split('\n')) {
    if (/^\s*(\/\*\*|\*)/.test(line)) continue
    const m = /^ {4}([A-Za-z]\w*)\(/.exec(line)
    if (m) member = m[1]!
    else if (/^ {4}[^\s})]/.test(line)) member = undefined
    if (member !== undefined) declarations.set(member, `${declarations.get(member) ?? ''}${line}\n`)
  }
  const returnsPromise = (name: string) => /\)\s*:\s*Promise</.test(declarations.get(name) ?? '')
  t.true(returnsPromise('flush') && returnsPromise('connectUnix') && !returnsPromise('getSize'))
  for (const name of names) {
    const method = (h as unknown as Record<string, (...a: unknown[]) => unknown>)[name]!
    let result: unknown
    let thrown: unknown
    try {
      // Arguments the buffer-taking calls accept, so that only `this` is wrong.
      result = name === 'preadInto' || name === 'pwrite' ? method(Buffer.alloc(4096), 0) : method(4096, 0)
    } catch (e) {
      thrown = e
    }
    if (returnsPromise(name)) {
      t.is(thrown, undefined, `${name} threw synchronously`)
      t.true(result instanceof Promise, name)
      thrown = await (result as Promise<unknown>).then(() => undefined, (e: unknown) => e)
    }
    t.true(thrown instanceof NbdError, `${name}: ${String(thrown)}`)
    t.is((thrown as NbdError).code, 'EINVAL', name)
    t.is((thrown as NbdError).operation, name, name)
  }
  // [Symbol.asyncDispose] is close() by another name.
  const dispose = (h as unknown as Record<symbol, () => Promise<void>>)[Symbol.asyncDispose ?? Symbol.for('nodejs.asyncDispose')]!
  const disposed = await dispose().then(() => undefined, (e: unknown) => e)
  assertNbdError(t, disposed, 'EINVAL', 'close')
  // The handle itself was never touched.
  t.is(h.state, 'ready')
  t.is(h.inFlight, 0)
})

// ---- strict checks against the export -------------------------------------------------------

test('ranges past the end of the export reject with EINVAL, or ENOSPC for what writes (strict bounds)', async (t) => {
  const server = await useNbdkit(t, ['memory', '4M'])
  if (!server) return
  const h = await openHandle(t, server)
  const size = h.getSize()
  const before = h.stats.bytesSent
  await expectReject(t, () => h.pread(512, size - 511), 'EINVAL', 'pread')
  await expectReject(t, () => h.pread(1, size), 'EINVAL', 'pread')
  await expectReject(t, () => h.pread(1, BigInt(size) + 4096n), 'EINVAL', 'pread')
  await expectReject(t, () => h.preadInto(Buffer.alloc(2), size - 1), 'EINVAL', 'preadInto')
  await expectReject(t, () => h.pwrite(Buffer.alloc(2), size - 1), 'ENOSPC', 'pwrite')
  await expectReject(t, () => h.zero(4096, size - 2048), 'ENOSPC', 'zero')
  await expectReject(t, () => h.trim(4096, size - 2048), 'ENOSPC', 'trim')
  await expectReject(t, () => h.cache(4096, size - 2048), 'EINVAL', 'cache')
  t.is(h.stats.bytesSent, before, 'out-of-bounds requests were sent to the server')
  // The last byte itself is fine.
  t.is((await h.pread(1, size - 1)).length, 1)
  t.is(h.state, 'ready')
})

test('zero-length requests reject with EINVAL', async (t) => {
  const server = await useNbdkit(t, ['memory', '4M'])
  if (!server) return
  const h = await openHandle(t, server)
  await expectReject(t, () => h.pread(0, 0), 'EINVAL', 'pread')
  await expectReject(t, () => h.preadInto(Buffer.alloc(0), 0), 'EINVAL', 'preadInto')
  await expectReject(t, () => h.pwrite(Buffer.alloc(0), 0), 'EINVAL', 'pwrite')
  await expectReject(t, () => h.zero(0, 0), 'EINVAL', 'zero')
  await expectReject(t, () => h.trim(0, 0), 'EINVAL', 'trim')
  await expectReject(t, () => h.cache(0, 0), 'EINVAL', 'cache')
  t.is(h.state, 'ready')
})

test('writes above the payload maximum and reads above 64 MiB reject with ERANGE; trim and zero do not', async (t) => {
  const server = await useNbdkit(t, ['memory', '80M'])
  if (!server) return
  const h = await openHandle(t, server)
  const payload = h.getBlockSize('payload')
  // nbdkit memory advertises no block sizes, so the default applies.
  t.is(payload, 32 * MiB)
  // STRICT_PAYLOAD limits what the client sends (as libnbd); reads stop at 64 MiB.
  await expectReject(t, () => h.pread(64 * MiB + 1, 0), 'ERANGE', 'pread')
  await expectReject(t, () => h.preadInto(Buffer.alloc(64 * MiB + 1), 0), 'ERANGE', 'preadInto')
  await expectReject(t, () => h.pwrite(Buffer.alloc(payload + 1), 0), 'ERANGE', 'pwrite')
  t.is((await h.pread(payload + 1, 0)).length, payload + 1)
  t.is(h.state, 'ready')
  // Exactly the maximum is allowed.
  t.is((await h.pread(payload, 0)).length, payload)
  await h.pwrite(Buffer.alloc(payload, 7), 0)
  // Commands without a payload are not limited by it.
  await h.zero(48 * MiB, 0)
  await h.trim(48 * MiB, 0)
  t.true((await h.pread(4096, 40 * MiB)).every((b) => b === 0))
})

test('writes to a read-only export reject with EPERM; reads still work', async (t) => {
  const server = await useNbdkit(t, ['memory', '4M'], { readOnly: true })
  if (!server) return
  const h = await openHandle(t, server)
  t.true(h.isReadOnly())
  const before = h.stats.bytesSent
  await expectReject(t, () => h.pwrite(Buffer.alloc(512, 1), 0), 'EPERM', 'pwrite')
  await expectReject(t, () => h.zero(512, 0), ['EPERM', 'EINVAL'], 'zero')
  await expectReject(t, () => h.trim(512, 0), ['EPERM', 'EINVAL'], 'trim')
  t.is(h.stats.bytesSent, before, 'a write to a read-only export was sent')
  t.is(h.state, 'ready')
  t.true((await h.pread(512, 0)).every((b) => b === 0))
})

test('with strict mode off, the server\'s own EPERM comes back for a read-only write', async (t) => {
  const server = await useNbdkit(t, ['memory', '4M'], { readOnly: true })
  if (!server) return
  const h = await openHandle(t, server, { strict: 0 })
  const before = h.stats.bytesSent
  await expectReject(t, () => h.pwrite(Buffer.alloc(512, 1), 0), 'EPERM', 'pwrite')
  t.true(h.stats.bytesSent > before, 'with strict 0 the write should have gone to the server')
  t.is(h.state, 'ready')
})

test('commands and flags the server does not support are refused with EINVAL (nbd-server)', async (t) => {
  const server = await useNbdServer(t, { size: MiB })
  if (!server) return
  const h = await openHandle(t, server)
  // nbd-server with a default config advertises none of these.
  t.false(h.canFua())
  t.false(h.canTrim())
  t.false(h.canFlush())
  t.false(h.canCache())
  const before = h.stats.bytesSent
  await expectReject(t, () => h.pwrite(Buffer.alloc(512), 0, { fua: true }), 'EINVAL', 'pwrite')
  await expectReject(t, () => h.pwrite(Buffer.alloc(512), 0, { flags: CMD_FLAG_FUA }), 'EINVAL', 'pwrite')
  await expectReject(t, () => h.trim(512, 0), 'EINVAL', 'trim')
  await expectReject(t, () => h.flush(), 'EINVAL', 'flush')
  await expectReject(t, () => h.cache(512, 0), 'EINVAL', 'cache')
  t.is(h.stats.bytesSent, before)
  t.is(h.state, 'ready')
  await h.pwrite(Buffer.alloc(512, 3), 0)
  t.true((await h.pread(512, 0)).every((b) => b === 3))
})

test('zero and trim on the embedded export, which lacks them, are refused with EINVAL', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = await openEmbedded(t, server)
  t.false(h.canZero())
  t.false(h.canTrim())
  await expectReject(t, () => h.zero(4 * KiB, 0), 'EINVAL', 'zero')
  await expectReject(t, () => h.trim(4 * KiB, 0), 'EINVAL', 'trim')
  t.is(h.state, 'ready')
})
