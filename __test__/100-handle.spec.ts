// The handle's life cycle and the state rule: created → ready → closed; a call in the wrong state
// fails with ENOTCONN while the handle is still 'created', with EINVAL otherwise.
import os from 'node:os'
import test from 'ava'
import {
  Handle,
  NbdError,
  version,
  CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE,
  CMD_FLAG_DF,
  CMD_FLAG_REQ_ONE,
  CMD_FLAG_FAST_ZERO,
  CMD_FLAG_PAYLOAD_LEN,
  STRICT_COMMANDS,
  STRICT_FLAGS,
  STRICT_BOUNDS,
  STRICT_ZERO_SIZE,
  STRICT_ALIGN,
  STRICT_PAYLOAD,
  STRICT_AUTO_FLAG,
  HANDSHAKE_FLAG_FIXED_NEWSTYLE,
  HANDSHAKE_FLAG_NO_ZEROES,
  STATE_HOLE,
  STATE_ZERO,
  STATE_DIRTY,
  CONTEXT_BASE_ALLOCATION,
} from 'nbd-client'
import { expectReject, expectThrow, openEmbedded, useEmbedded, MiB } from './helpers/nbd'

// Synchronous getters that need a negotiated connection.
const infoGetters: [string, (h: Handle) => unknown][] = [
  ['getSize', (h) => h.getSize()],
  ['getBlockSize', (h) => h.getBlockSize('payload')],
  ['isReadOnly', (h) => h.isReadOnly()],
  ['isRotational', (h) => h.isRotational()],
  ['canFlush', (h) => h.canFlush()],
  ['canFua', (h) => h.canFua()],
  ['canTrim', (h) => h.canTrim()],
  ['canZero', (h) => h.canZero()],
  ['canFastZero', (h) => h.canFastZero()],
  ['canDf', (h) => h.canDf()],
  ['canMultiConn', (h) => h.canMultiConn()],
  ['canCache', (h) => h.canCache()],
  ['getProtocol', (h) => h.getProtocol()],
  ['getStructuredRepliesNegotiated', (h) => h.getStructuredRepliesNegotiated()],
]

// Commands that need a connection.
const commands: [string, (h: Handle) => Promise<unknown>][] = [
  ['pread', (h) => h.pread(512, 0)],
  ['preadInto', (h) => h.preadInto(Buffer.alloc(512), 0)],
  ['pwrite', (h) => h.pwrite(Buffer.alloc(512), 0)],
  ['flush', (h) => h.flush()],
  ['trim', (h) => h.trim(512, 0)],
  ['cache', (h) => h.cache(512, 0)],
  ['zero', (h) => h.zero(512, 0)],
  ['shutdown', (h) => h.shutdown()],
]

test('a new handle is created, idle and has no export name', (t) => {
  const h = new Handle()
  t.is(h.state, 'created')
  t.is(h.inFlight, 0)
  t.is(h.getExportName(), '')
  const stats = h.stats
  t.is(stats.bytesSent, 0n)
  t.is(stats.bytesReceived, 0n)
  t.is(stats.chunksSent, 0n)
  t.is(stats.chunksReceived, 0n)
})

for (const [name, call] of infoGetters) {
  test(`${name} on a created handle throws ENOTCONN`, (t) => {
    const h = new Handle()
    expectThrow(t, () => call(h), 'ENOTCONN', name)
    t.is(h.state, 'created')
  })
}

for (const [name, call] of commands) {
  test(`${name} on a created handle rejects with ENOTCONN`, async (t) => {
    const h = new Handle()
    await expectReject(t, () => call(h), 'ENOTCONN', name)
    t.is(h.state, 'created')
  })
}

test('connecting makes the handle ready; the getters then describe the export', async (t) => {
  const server = useEmbedded(t, { size: 4 * MiB })
  const h = new Handle()
  t.teardown(() => h.close())
  const connecting = h.connectSocket(server.socketpair())
  t.true(connecting instanceof Promise)
  await connecting
  t.is(h.state, 'ready')
  t.is(h.inFlight, 0)
  t.is(h.getSize(), 4 * MiB)
  t.is(h.getSize({ bigint: true }), BigInt(4 * MiB))
  t.false(h.isReadOnly())
  // The embedded server speaks fixed newstyle with simple replies only, and has no trim/zero.
  t.is(h.getProtocol(), 'newstyle-fixed')
  t.false(h.getStructuredRepliesNegotiated())
  t.false(h.canTrim())
  t.false(h.canZero())
  const payload = h.getBlockSize('payload')
  t.true(payload >= MiB && payload <= 64 * MiB, `payload ${payload} outside 1-64 MiB`)
})

test('a read-only embedded export reports isReadOnly', async (t) => {
  const server = useEmbedded(t, { size: MiB, readOnly: true })
  const h = await openEmbedded(t, server)
  t.true(h.isReadOnly())
})

test('after close the handle is closed and every call fails with EINVAL', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = await openEmbedded(t, server)
  await h.close()
  t.is(h.state, 'closed')
  for (const [name, call] of infoGetters) expectThrow(t, () => call(h), 'EINVAL', name)
  for (const [name, call] of commands) await expectReject(t, () => call(h), 'EINVAL', name)
  await expectReject(t, () => h.connectUnix('/nonexistent/nbd.sock'), 'EINVAL', 'connectUnix')
  await expectReject(t, () => h.connectTcp('127.0.0.1', 1), 'EINVAL', 'connectTcp')
})

test('a handle closed before connecting is closed, and calls fail with EINVAL (not ENOTCONN)', async (t) => {
  const h = new Handle()
  await h.close()
  t.is(h.state, 'closed')
  await expectReject(t, () => h.pread(512, 0), 'EINVAL', 'pread')
  expectThrow(t, () => h.getSize(), 'EINVAL', 'getSize')
  await expectReject(t, () => h.connectUnix('/nonexistent/nbd.sock'), 'EINVAL', 'connectUnix')
})

test('close is idempotent, also when called concurrently', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = await openEmbedded(t, server)
  const first = h.close()
  const second = h.close()
  t.true(first instanceof Promise)
  await t.notThrowsAsync(Promise.all([first, second]))
  await t.notThrowsAsync(h.close())
  t.is(h.state, 'closed')
})

test('Symbol.asyncDispose closes the handle', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const direct = await openEmbedded(t, server)
  t.is(typeof direct[Symbol.asyncDispose], 'function')
  await direct[Symbol.asyncDispose]()
  t.is(direct.state, 'closed')

  let scoped: Handle | undefined
  {
    await using h = new Handle()
    await h.connectSocket(server.socketpair())
    t.is(h.state, 'ready')
    scoped = h
  }
  t.is(scoped!.state, 'closed')
})

test('constructor options reach the handle', async (t) => {
  const named = new Handle({ exportName: 'first' })
  t.is(named.getExportName(), 'first')
  named.setExportName('second')
  t.is(named.getExportName(), 'second')

  // Every Foundation option is accepted together and leaves the handle created.
  const h = new Handle({
    exportName: 'x',
    name: 'handle-under-test',
    strict: STRICT_COMMANDS | STRICT_FLAGS | STRICT_BOUNDS | STRICT_ZERO_SIZE | STRICT_ALIGN,
    preadInitialize: true,
    requestStructuredReplies: false,
    handshakeFlags: HANDSHAKE_FLAG_FIXED_NEWSTYLE | HANDSHAKE_FLAG_NO_ZEROES,
    connectTimeout: 5000,
    maxInFlight: 4,
  })
  t.is(h.state, 'created')
  t.is(h.getExportName(), 'x')
  t.is(h.getHandleName(), 'handle-under-test')
  t.is(h.getStrictMode(), STRICT_COMMANDS | STRICT_FLAGS | STRICT_BOUNDS | STRICT_ZERO_SIZE | STRICT_ALIGN)
  t.true(h.getPreadInitialize())
  t.false(h.getRequestStructuredReplies())
  t.is(h.getHandshakeFlags(), HANDSHAKE_FLAG_FIXED_NEWSTYLE | HANDSHAKE_FLAG_NO_ZEROES)
  // And the defaults, as libnbd: strict all bits, structured replies requested, both flags.
  const plain = new Handle()
  t.true(plain.getRequestStructuredReplies())
  t.is(plain.getHandshakeFlags(), HANDSHAKE_FLAG_FIXED_NEWSTYLE | HANDSHAKE_FLAG_NO_ZEROES)
  t.true(plain.getPreadInitialize())
  const allStrict = STRICT_COMMANDS | STRICT_FLAGS | STRICT_BOUNDS | STRICT_ZERO_SIZE | STRICT_ALIGN
  t.is(plain.getStrictMode() & allStrict, allStrict)

  // Their effects are checked where they matter (200-connect, 400-pread); here, a handle built
  // with all of them still connects.
  const server = useEmbedded(t, { size: MiB, exportName: 'x' })
  t.teardown(() => h.close())
  await h.connectSocket(server.socketpair())
  t.is(h.state, 'ready')
  t.is(h.getExportName(), 'x')
})

test('setExportName after connecting throws EINVAL and keeps the name', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = await openEmbedded(t, server)
  expectThrow(t, () => h.setExportName('other'), 'EINVAL', 'setExportName')
  t.is(h.getExportName(), '')
  t.is(h.state, 'ready')
})

test('export names over 4096 bytes are refused with ENAMETOOLONG', (t) => {
  const h = new Handle()
  t.notThrows(() => h.setExportName('n'.repeat(4096)))
  t.is(h.getExportName().length, 4096)
  expectThrow(t, () => h.setExportName('n'.repeat(4097)), 'ENAMETOOLONG', 'setExportName')
  t.is(h.getExportName().length, 4096)
  // Bytes count, not characters: 2049 two-byte characters are 4098 bytes.
  expectThrow(t, () => h.setExportName('é'.repeat(2049)), 'ENAMETOOLONG', 'setExportName')
})

test('NbdError is an Error with code, errno, operation and message', async (t) => {
  const h = new Handle()
  const err = await h.pread(512, 0).then(
    () => undefined,
    (e: unknown) => e,
  )
  t.true(err instanceof NbdError)
  t.true(err instanceof Error)
  const e = err as NbdError
  t.is(e.code, 'ENOTCONN')
  t.is(e.errno, os.constants.errno.ENOTCONN)
  t.is(e.operation, 'pread')
  t.is(typeof e.message, 'string')
  t.true(e.message.length > 0)
  t.is(typeof e.stack, 'string')

  await h.close()
  const closed = (await h.pread(512, 0).catch((x: unknown) => x)) as NbdError
  t.is(closed.code, 'EINVAL')
  t.is(closed.errno, os.constants.errno.EINVAL)
})

test('version and constants are exported with libnbd values', (t) => {
  t.is(typeof version, 'string')
  t.regex(version, /^\d+\.\d+\.\d+/)

  t.is(CMD_FLAG_FUA, 0x01)
  t.is(CMD_FLAG_NO_HOLE, 0x02)
  t.is(CMD_FLAG_DF, 0x04)
  t.is(CMD_FLAG_REQ_ONE, 0x08)
  t.is(CMD_FLAG_FAST_ZERO, 0x10)
  t.is(CMD_FLAG_PAYLOAD_LEN, 0x20)
  t.is(HANDSHAKE_FLAG_FIXED_NEWSTYLE, 0x01)
  t.is(HANDSHAKE_FLAG_NO_ZEROES, 0x02)
  t.is(STRICT_COMMANDS, 0x01)
  t.is(STRICT_FLAGS, 0x02)
  t.is(STRICT_BOUNDS, 0x04)
  t.is(STRICT_ZERO_SIZE, 0x08)
  t.is(STRICT_ALIGN, 0x10)
  // The two newer strict bits: distinct single bits above the older five.
  for (const bit of [STRICT_PAYLOAD, STRICT_AUTO_FLAG]) {
    t.is(typeof bit, 'number')
    t.true(bit > STRICT_ALIGN && (bit & (bit - 1)) === 0, `strict bit ${bit}`)
  }
  t.not(STRICT_PAYLOAD, STRICT_AUTO_FLAG)
  t.is(STATE_HOLE, 1)
  t.is(STATE_ZERO, 2)
  t.is(STATE_DIRTY, 1)
  t.is(CONTEXT_BASE_ALLOCATION, 'base:allocation')
})
