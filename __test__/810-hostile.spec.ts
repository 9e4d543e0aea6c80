// A hostile server: the scriptable fake server of helpers/fake-server.ts shakes hands
// correctly and then misbehaves on cue, one fault per test. Every fault must end in the
// outcome API.md names: the right NbdError code, the handle in the state libnbd would be in
// (dead after a broken protocol or a lost connection, still ready after an error reply), a
// prompt settle (no hang), no crash, and no allocation of a size the server claimed.
//
// The tests run one at a time so that the memory checks see only their own test.
import { execFile } from 'node:child_process'
import net from 'node:net'
import test from 'ava'
import { Handle, NbdError } from 'nbd-client'
import {
  CMD,
  FLAG,
  INFO,
  NBD_ERRNO,
  OPT,
  REP,
  REPLY_TYPE,
  dataPayload,
  errorPayload,
  exportNameReply,
  holePayload,
  infoBlockSize,
  infoExport,
  optionReply,
  simpleReply,
  structuredChunk,
  useFake,
  type FakeConnection,
  type FakeOptions,
  type NbdRequest,
  type OptionRequest,
} from './helpers/fake-server'
import {
  PROMPT_MS,
  assertNoBigAllocation,
  codesOf,
  holdThen,
  memory,
  messageOf,
  openFake,
  settleAll,
  type Outcome,
} from './helpers/hostile'
import { assertNbdError, expectReject, seededBytes } from './helpers/nbd'
import { requireTool } from './helpers/servers'

type HandleOptions = ConstructorParameters<typeof Handle>[0]

const GiB4 = 0xffffffff
const TWO_63 = 2n ** 63n

// Load the addon and start its runtime before any memory is measured.
test.before(async () => {
  const { startFake } = await import('./helpers/fake-server')
  const server = await startFake()
  const h = new Handle()
  await h.connectUnix(server.socket)
  await h.pread(4096, 0)
  await h.close()
  await server.close()
})

// ---- the fake server itself ---------------------------------------------------------------------

test.serial('the fake server serves reads, writes, trims and zeroes correctly (structured and simple)', async (t) => {
  for (const structured of [true, false]) {
    const server = await useFake(t, { sparseReads: true })
    const h = await openFake(t, server, { requestStructuredReplies: structured })
    t.is(h.getStructuredRepliesNegotiated(), structured)
    t.is(h.getSize(), 1024 * 1024)
    const data = seededBytes(100_000, 3)
    await h.pwrite(data, 5000)
    t.true((await h.pread(100_000, 5000)).equals(data))
    await h.flush()
    await h.trim(65536, 65536)
    await h.zero(10, 5000)
    const expected = Buffer.concat([Buffer.alloc(10), data.subarray(10, 65536 - 5000), Buffer.alloc(65536)])
    t.true((await h.pread(expected.length, 5000)).equals(expected))
    t.true((await h.pread(4096, 512 * 1024)).equals(Buffer.alloc(4096)))
    await h.close()
    t.deepEqual(server.errors, [])
    t.deepEqual(
      server.requests.map((r) => r.type),
      [CMD.WRITE, CMD.READ, CMD.FLUSH, CMD.TRIM, CMD.WRITE_ZEROES, CMD.READ, CMD.READ],
    )
    t.deepEqual(
      server.options.map((o) => o.option),
      structured ? [OPT.EXTENDED_HEADERS, OPT.STRUCTURED_REPLY, OPT.GO] : [OPT.GO],
    )
  }
})

test.serial('the fake server satisfies libnbd (nbdinfo, nbdinfo --map, nbdcopy)', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'nbdcopy')) return
  const server = await useFake(t, { size: 4 * 1024 * 1024, description: 'hostile', sparseReads: true })
  server.disk.write(65536n, Buffer.alloc(65536, 0x5a))
  const uri = `nbd+unix:///?socket=${server.socket}`
  // The server lives in this process: the tools must run asynchronously.
  const info = await run('nbdinfo', ['--json', uri])
  const parsed = JSON.parse(info.toString()) as { exports: { 'export-size': number }[] }
  t.is(parsed.exports[0]?.['export-size'], 4 * 1024 * 1024)
  const map = (await run('nbdinfo', ['--map', uri])).toString()
  t.regex(map, /65536\s+65536\s+0\s+data/)
  const copy = await run('nbdcopy', [uri, '-'])
  const expected = Buffer.alloc(4 * 1024 * 1024)
  expected.fill(0x5a, 65536, 131072)
  t.true(copy.equals(expected))
  t.deepEqual(server.errors, [])
})

function run(cmd: string, args: string[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { encoding: 'buffer', maxBuffer: 16 * 1024 * 1024, timeout: 20_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} failed: ${err.message}: ${stderr.toString()}`))
      else resolve(stdout)
    })
  })
}

// libnbd 1.14 predates extended headers, so that framing is checked here by hand: a raw
// client negotiates it, sets base:allocation, and reads the fake's 32-byte-header replies.
test.serial('the fake server speaks extended headers and meta contexts (checked by a raw client)', async (t) => {
  const server = await useFake(t, { extendedHeaders: true })
  server.disk.write(65536n, Buffer.alloc(65536, 0x11))
  const sock = net.connect(server.socket)
  t.teardown(() => sock.destroy())
  let input = Buffer.alloc(0)
  let wake: (() => void) | undefined
  sock.on('data', (d: Buffer) => {
    input = Buffer.concat([input, d])
    wake?.()
  })
  const read = async (n: number): Promise<Buffer> => {
    while (input.length < n) await new Promise<void>((r) => (wake = r))
    const out = input.subarray(0, n)
    input = input.subarray(n)
    return out
  }
  const u32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b }
  const u64 = (n: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(n); return b }
  const option = (opt: number, data: Buffer) => sock.write(Buffer.concat([u64(0x49484156454f5054n), u32(opt), u32(data.length), data]))
  const optionReplyOf = async () => {
    const h = await read(20)
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await read(h.readUInt32BE(16)) }
  }
  t.is((await read(18)).readUInt16BE(16), 3)
  sock.write(u32(3))
  option(OPT.EXTENDED_HEADERS, Buffer.alloc(0))
  t.like(await optionReplyOf(), { option: OPT.EXTENDED_HEADERS, type: REP.ACK })
  const query = Buffer.from('base:allocation')
  option(OPT.SET_META_CONTEXT, Buffer.concat([u32(0), u32(1), u32(query.length), query]))
  const ctx = await optionReplyOf()
  t.is(ctx.type, REP.META_CONTEXT)
  t.is(ctx.data.readUInt32BE(0), 1)
  t.is(ctx.data.subarray(4).toString(), 'base:allocation')
  t.like(await optionReplyOf(), { type: REP.ACK })
  option(OPT.GO, Buffer.from([0, 0, 0, 0, 0, 0]))
  t.like(await optionReplyOf(), { type: REP.INFO })
  t.like(await optionReplyOf(), { type: REP.ACK })
  const request = (type: number, flags: number, cookie: bigint, offset: bigint, length: bigint) =>
    sock.write(Buffer.concat([u32(0x21e41c71), Buffer.from([flags >> 8, flags & 0xff, type >> 8, type & 0xff]), u64(cookie), u64(offset), u64(length)]))
  const chunkOf = async () => {
    const h = await read(32)
    t.is(h.readUInt32BE(0), 0x6e8a278c)
    const length = h.readBigUInt64BE(24)
    return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), offset: h.readBigUInt64BE(16), payload: await read(Number(length)) }
  }
  request(CMD.READ, 0, 5n, 65536n + 100n, 50n)
  const data = await chunkOf()
  t.like(data, { flags: 1, type: REPLY_TYPE.OFFSET_DATA, cookie: 5n, offset: 65536n + 100n })
  t.is(data.payload.readBigUInt64BE(0), 65536n + 100n)
  t.true(data.payload.subarray(8).equals(Buffer.alloc(50, 0x11)))
  request(CMD.BLOCK_STATUS, 0, 6n, 0n, 3n * 65536n)
  const bs = await chunkOf()
  t.like(bs, { flags: 1, type: REPLY_TYPE.BLOCK_STATUS_EXT, cookie: 6n, offset: 0n })
  t.is(bs.payload.readUInt32BE(0), 1)
  t.is(bs.payload.readUInt32BE(4), 3)
  const extents = [0, 1, 2].map((i) => [bs.payload.readBigUInt64BE(8 + 16 * i), bs.payload.readBigUInt64BE(16 + 16 * i)])
  t.deepEqual(extents, [[65536n, 3n], [65536n, 0n], [65536n, 3n]])
  request(CMD.BLOCK_STATUS, 8, 7n, 0n, 3n * 65536n)
  t.is((await chunkOf()).payload.readUInt32BE(4), 1, 'REQ_ONE gives one extent')
  const payload = Buffer.alloc(10, 0x22)
  sock.write(Buffer.concat([u32(0x21e41c71), Buffer.from([0, 0, 0, CMD.WRITE]), u64(8n), u64(0n), u64(10n), payload]))
  t.like(await chunkOf(), { flags: 1, type: REPLY_TYPE.NONE, cookie: 8n })
  t.true(server.disk.read(0n, 10).equals(payload))
  t.deepEqual(server.errors, [])
})

// ---- handshake faults ---------------------------------------------------------------------------

interface HandshakeFault {
  title: string
  fake: FakeOptions
  handle?: HandleOptions
  code: string
  /** What the message must say. */
  message: RegExp
}

/** Replaces the answer to `option` with `bytes`, everything else default. */
function onOption(option: number, answer: (o: OptionRequest, conn: FakeConnection) => 'close' | 'reset' | 'stall' | Buffer[] | 'handled'): FakeOptions['onOption'] {
  return (o, conn) => (o.option === option ? answer(o, conn) : 'default')
}

/** A GO answer with `infos` (REP_INFO payloads) and then an ACK. */
function goReply(...infos: Buffer[]): Buffer[] {
  return [...infos.map((i) => optionReply(OPT.GO, REP.INFO, i)), optionReply(OPT.GO, REP.ACK)]
}

const FLAGS = FLAG.HAS_FLAGS | FLAG.SEND_FLUSH

const handshakeFaults: HandshakeFault[] = [
  // wrong magic
  {
    title: 'a greeting without NBDMAGIC',
    fake: { greeting: (g) => [Buffer.concat([Buffer.from('HTTP/1.1'), g.subarray(8)])] },
    code: 'EPROTO',
    message: /not an NBD server/,
  },
  {
    title: 'a greeting with an unknown second magic',
    fake: { greeting: (g) => { const b = Buffer.from(g); b.writeUInt32BE(0xdeadbeef, 8); return [b] } },
    code: 'EPROTO',
    message: /unknown handshake magic/,
  },
  {
    title: 'an option reply with the wrong magic',
    fake: { onOption: onOption(OPT.STRUCTURED_REPLY, (o) => [optionReply(o.option, REP.ACK, undefined, { magic: 0x1234n })]) },
    code: 'EPROTO',
    message: /wrong magic/,
  },
  // the connection closed at each step
  {
    title: 'a hang-up before the greeting',
    fake: { greeting: () => 'close' },
    code: 'ECONNRESET',
    message: /before completing its greeting/,
  },
  {
    title: 'a reset before the greeting',
    fake: { greeting: () => 'reset' },
    code: 'ECONNRESET',
    message: /./,
  },
  {
    title: 'a hang-up in the middle of the greeting',
    fake: { greeting: (g, conn) => { conn.send(g.subarray(0, 11)); conn.close(); return 'handled' } },
    code: 'ECONNRESET',
    message: /before completing its greeting/,
  },
  {
    title: 'a hang-up after the greeting, once the client flags arrive',
    fake: { greeting: async (g, conn) => { conn.send(g); await conn.read(4); conn.close(); return 'handled' as const } },
    code: 'ECONNRESET',
    message: /instead of answering NBD_OPT_(EXTENDED_HEADERS|STRUCTURED_REPLY)/,
  },
  {
    title: 'a hang-up instead of answering NBD_OPT_GO',
    fake: { onOption: onOption(OPT.GO, () => 'close') },
    code: 'ECONNRESET',
    message: /instead of answering NBD_OPT_GO/,
  },
  {
    title: 'a hang-up between NBD_INFO_EXPORT and the ACK of NBD_OPT_GO',
    fake: { onOption: onOption(OPT.GO, (o, conn) => { conn.send(optionReply(OPT.GO, REP.INFO, infoExport(4096, FLAGS))); conn.close(); return 'handled' }) },
    code: 'ECONNRESET',
    message: /NBD_OPT_GO/,
  },
  {
    title: 'a hang-up in the middle of an option reply header',
    fake: { onOption: onOption(OPT.GO, (o, conn) => { conn.send(optionReply(OPT.GO, REP.ACK).subarray(0, 10)); conn.close(); return 'handled' }) },
    code: 'ECONNRESET',
    message: /NBD_OPT_GO/,
  },
  {
    title: 'a hang-up in the middle of an option reply payload',
    fake: { onOption: onOption(OPT.GO, (o, conn) => { conn.send(optionReply(OPT.GO, REP.INFO, infoExport(4096, FLAGS)).subarray(0, 25)); conn.close(); return 'handled' }) },
    code: 'ECONNRESET',
    message: /NBD_OPT_GO/,
  },
  {
    title: 'a hang-up after NBD_OPT_EXPORT_NAME (the fallback when NBD_OPT_GO is unsupported)',
    fake: {
      exports: ['other'],
      onOption: (o) => (o.option === OPT.GO ? [optionReply(OPT.GO, REP.ERR_UNSUP)] : 'default'),
    },
    handle: { exportName: 'missing' },
    code: 'ECONNRESET',
    message: /no export named "missing"/,
  },
  {
    title: 'a hang-up in the middle of the NBD_OPT_EXPORT_NAME reply',
    fake: {
      onOption: (o, conn) => {
        if (o.option === OPT.GO) return [optionReply(OPT.GO, REP.ERR_UNSUP)]
        if (o.option !== OPT.EXPORT_NAME) return 'default'
        conn.send(exportNameReply(4096, FLAGS).subarray(0, 5))
        conn.close()
        return 'handled'
      },
    },
    code: 'ECONNRESET',
    message: /NBD_OPT_EXPORT_NAME/,
  },
  {
    title: 'a hang-up in the middle of an oldstyle greeting',
    fake: { oldstyle: true, greeting: (g, conn) => { conn.send(g.subarray(0, 40)); conn.close(); return 'handled' } },
    code: 'ECONNRESET',
    message: /before completing its greeting/,
  },
  // absurd lengths
  {
    title: 'an ACK to NBD_OPT_STRUCTURED_REPLY claiming 4 GiB',
    fake: { onOption: onOption(OPT.STRUCTURED_REPLY, (o) => [optionReply(o.option, REP.ACK, undefined, { length: GiB4 })]) },
    code: 'EPROTO',
    message: /4294967295 bytes/,
  },
  {
    title: 'an NBD_REP_INFO claiming 4 GiB',
    fake: { onOption: onOption(OPT.GO, (o) => [optionReply(o.option, REP.INFO, infoExport(4096, FLAGS), { length: GiB4 })]) },
    code: 'EPROTO',
    message: /4294967295 bytes/,
  },
  {
    title: 'an error reply to NBD_OPT_GO claiming 4 GiB of message',
    fake: { onOption: onOption(OPT.GO, (o) => [optionReply(o.option, REP.ERR_UNKNOWN, Buffer.from('no'), { length: GiB4 })]) },
    code: 'EPROTO',
    message: /4294967295 bytes/,
  },
  {
    title: 'an NBD_REP_INFO one byte over the 64 KiB limit',
    fake: { onOption: onOption(OPT.GO, (o) => [optionReply(o.option, REP.INFO, Buffer.alloc(65537))]) },
    code: 'EPROTO',
    message: /65537 bytes/,
  },
  // replies to options never sent
  {
    title: 'an answer to NBD_OPT_LIST while NBD_OPT_STRUCTURED_REPLY is outstanding',
    fake: { onOption: onOption(OPT.STRUCTURED_REPLY, () => [optionReply(OPT.LIST, REP.ACK)]) },
    code: 'EPROTO',
    message: /NBD_OPT_LIST.*while NBD_OPT_STRUCTURED_REPLY was outstanding/,
  },
  {
    title: 'an answer to NBD_OPT_INFO while NBD_OPT_GO is outstanding',
    fake: { onOption: onOption(OPT.GO, () => [optionReply(OPT.INFO, REP.INFO, infoExport(4096, FLAGS)), optionReply(OPT.INFO, REP.ACK)]) },
    code: 'EPROTO',
    message: /NBD_OPT_INFO.*while NBD_OPT_GO was outstanding/,
  },
  {
    title: 'an answer to an option number nobody knows',
    fake: { onOption: onOption(OPT.GO, () => [optionReply(4242, REP.ACK)]) },
    code: 'EPROTO',
    message: /4242/,
  },
  {
    title: 'NBD_REP_META_CONTEXT in answer to NBD_OPT_GO',
    fake: { onOption: onOption(OPT.GO, () => [optionReply(OPT.GO, REP.META_CONTEXT, Buffer.from('\0\0\0\x01base:allocation'))]) },
    code: 'EPROTO',
    message: /NBD_REP_META_CONTEXT.*NBD_OPT_GO/,
  },
  // NBD_INFO of the wrong length
  {
    title: 'NBD_INFO_EXPORT one byte short',
    fake: { onOption: onOption(OPT.GO, () => goReply(infoExport(4096, FLAGS).subarray(0, 11))) },
    code: 'EPROTO',
    message: /NBD_INFO_EXPORT has 9 bytes/,
  },
  {
    title: 'NBD_INFO_EXPORT one byte long',
    fake: { onOption: onOption(OPT.GO, () => goReply(Buffer.concat([infoExport(4096, FLAGS), Buffer.alloc(1)]))) },
    code: 'EPROTO',
    message: /NBD_INFO_EXPORT has 11 bytes/,
  },
  {
    title: 'NBD_INFO_BLOCK_SIZE four bytes short',
    fake: { onOption: onOption(OPT.GO, () => goReply(infoExport(4096, FLAGS), infoBlockSize(512, 4096, 65536).subarray(0, 10))) },
    code: 'EPROTO',
    message: /NBD_INFO_BLOCK_SIZE has 8 bytes/,
  },
  {
    title: 'an NBD_REP_INFO too short for its type',
    fake: { onOption: onOption(OPT.GO, () => goReply(Buffer.from([0]))) },
    code: 'EPROTO',
    message: /shorter than its type/,
  },
  {
    title: 'an NBD_INFO_NAME longer than 4096 bytes',
    fake: { onOption: onOption(OPT.GO, () => goReply(infoExport(4096, FLAGS), Buffer.concat([Buffer.from([0, INFO.NAME]), Buffer.alloc(5000, 0x61)]))) },
    handle: { fullInfo: true },
    code: 'EPROTO',
    message: /longer than 4096/,
  },
  {
    title: 'impossible block sizes (minimum not a power of two)',
    fake: { onOption: onOption(OPT.GO, () => goReply(infoExport(4096, FLAGS), infoBlockSize(3, 4096, 65536))) },
    code: 'EPROTO',
    message: /impossible block sizes/,
  },
  {
    title: 'an ACK to NBD_OPT_GO without NBD_INFO_EXPORT',
    fake: { onOption: onOption(OPT.GO, () => goReply()) },
    code: 'EPROTO',
    message: /without sending NBD_INFO_EXPORT/,
  },
  // sizes past 2^63
  {
    title: 'an export size of 2^63 in NBD_INFO_EXPORT',
    fake: { size: TWO_63 },
    code: 'EPROTO',
    message: /9223372036854775808/,
  },
  {
    title: 'an export size of 2^64-1 in NBD_INFO_EXPORT',
    fake: { size: 2n ** 64n - 1n },
    code: 'EPROTO',
    message: /18446744073709551615/,
  },
  {
    title: 'an export size of 2^63 in the NBD_OPT_EXPORT_NAME reply',
    fake: { size: TWO_63, onOption: (o) => (o.option === OPT.GO ? [optionReply(OPT.GO, REP.ERR_UNSUP)] : 'default') },
    code: 'EPROTO',
    message: /9223372036854775808/,
  },
  {
    title: 'an export size of 2^63 in an oldstyle greeting',
    fake: { size: TWO_63, oldstyle: true },
    code: 'EPROTO',
    message: /9223372036854775808/,
  },
  // refusals (server errors, not protocol violations)
  {
    title: 'NBD_REP_ERR_UNKNOWN with a message',
    fake: { exports: ['disk'] },
    handle: { exportName: 'nope' },
    code: 'ENOENT',
    message: /NBD_REP_ERR_UNKNOWN: no export named "nope"/,
  },
  {
    title: 'NBD_REP_ERR_POLICY',
    fake: { onOption: onOption(OPT.GO, () => [optionReply(OPT.GO, REP.ERR_POLICY, Buffer.from('go away'))]) },
    code: 'EPERM',
    message: /NBD_REP_ERR_POLICY: go away/,
  },
]

for (const f of handshakeFaults) {
  test.serial(`handshake: ${f.title} fails the connect with ${f.code}`, async (t) => {
    const server = await useFake(t, f.fake)
    const h = new Handle(f.handle)
    t.teardown(() => h.close())
    const before = memory()
    const started = Date.now()
    const err = await expectReject(t, () => h.connectUnix(server.socket), f.code, 'connectUnix')
    const ms = Date.now() - started
    t.true(ms < PROMPT_MS, `the connect took ${ms} ms to fail`)
    if (err) t.regex(err.message, f.message)
    t.is(h.state, 'dead')
    t.log(`${err?.code} in ${ms} ms, state ${h.state}: ${err?.message}`)
    assertNoBigAllocation(t, before)
    t.deepEqual(server.errors, [])
    // A dead handle refuses commands by the state rule, without a crash.
    await expectReject(t, () => h.pread(512, 0), 'EINVAL', 'pread')
  })
}

test.serial('handshake: an export of 2^63-1 bytes is accepted and read at its far end', async (t) => {
  const server = await useFake(t, { size: TWO_63 - 1n })
  const h = await openFake(t, server)
  t.is(h.getSize({ bigint: true }), TWO_63 - 1n)
  try {
    h.getSize()
    t.fail('getSize() did not throw for a size past 2^53')
  } catch (err) {
    assertNbdError(t, err, 'ERANGE', 'getSize')
  }
  server.disk.write(TWO_63 - 4096n, Buffer.alloc(4095, 7))
  const data = await h.pread(4095, TWO_63 - 4096n)
  t.true(data.equals(Buffer.alloc(4095, 7)))
})

// A server that stalls: only connectTimeout saves the client.
const stalls: [string, FakeOptions][] = [
  ['sends nothing at all', { greeting: () => 'stall' }],
  ['stops in the middle of the greeting', { greeting: (g, conn) => { conn.send(g.subarray(0, 9)); conn.stall(); return 'handled' } }],
  ['never answers NBD_OPT_STRUCTURED_REPLY', { onOption: onOption(OPT.STRUCTURED_REPLY, () => 'stall') }],
  ['never answers NBD_OPT_GO', { onOption: onOption(OPT.GO, () => 'stall') }],
  ['stops after NBD_INFO_EXPORT', { onOption: onOption(OPT.GO, (o, conn) => { conn.send(optionReply(OPT.GO, REP.INFO, infoExport(4096, FLAGS))); conn.stall(); return 'handled' }) }],
  ['stops in the middle of an option reply that claims 60 KiB', {
    onOption: onOption(OPT.GO, (o, conn) => { conn.send(optionReply(OPT.GO, REP.INFO, Buffer.alloc(100), { length: 60 * 1024 })); conn.stall(); return 'handled' }),
  }],
  ['stops after an oldstyle greeting of 100 bytes', { oldstyle: true, greeting: (g, conn) => { conn.send(g.subarray(0, 100)); conn.stall(); return 'handled' } }],
]

for (const [what, fake] of stalls) {
  test.serial(`handshake: a server that ${what} fails the connect with ETIMEDOUT after connectTimeout`, async (t) => {
    const server = await useFake(t, fake)
    const h = new Handle({ connectTimeout: 300 })
    t.teardown(() => h.close())
    const started = Date.now()
    const err = await expectReject(t, () => h.connectUnix(server.socket), 'ETIMEDOUT', 'connectUnix')
    const ms = Date.now() - started
    t.true(ms >= 250 && ms < PROMPT_MS, `the connect failed after ${ms} ms with connectTimeout 300`)
    if (err) t.regex(err.message, /300 ms/)
    t.is(h.state, 'dead')
    t.deepEqual(server.errors, [])
  })
}

// ---- transmission faults --------------------------------------------------------------------------

interface TxFault {
  title: string
  fake?: FakeOptions
  handle?: HandleOptions
  /** The commands to issue; the fault is the answer to the first. Default: three 4 KiB reads. */
  commands?: (h: Handle) => Promise<unknown>[]
  /** What the server sends when all commands have arrived (instead of answering the first). */
  bad: (req: NbdRequest, conn: FakeConnection) => Buffer[]
  /** Hang up after the bad bytes. */
  hangUp?: boolean
  /** Expected codes, first command then the others. */
  codes: string[]
  /** Expected state afterwards. */
  state: 'dead' | 'ready'
  /** What the first failure's message must say. */
  message: RegExp
}

const threeReads = (h: Handle) => [h.pread(4096, 0), h.pread(4096, 8192), h.pread(4096, 16384)]
const DEAD_EPROTO = ['EPROTO', 'ENOTCONN', 'ENOTCONN']
const DEAD_ALL = ['ENOTCONN', 'ENOTCONN', 'ENOTCONN']
const SIMPLE: FakeOptions = { structuredReplies: false }

/** A structured chunk (compact framing) in answer to `req`. */
const chunk = (req: NbdRequest, type: number, payload?: Buffer, opts: { done?: boolean; length?: number } = {}) =>
  structuredChunk(req.cookie, type, payload, { done: opts.done ?? true, length: opts.length })

const txFaults: TxFault[] = [
  // unknown cookies and wrong magic name no command: the oldest one on the wire takes the
  // blame (EPROTO), the others get ENOTCONN
  {
    title: 'a simple reply to a cookie never sent',
    fake: SIMPLE,
    bad: (req) => [simpleReply(req.cookie + 1000n)],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /unknown cookie/,
  },
  {
    title: 'a structured chunk for a cookie never sent',
    bad: (req) => [structuredChunk(0xdeadbeefn, REPLY_TYPE.NONE, undefined, { done: true })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /unknown cookie/,
  },
  {
    title: 'a second reply to a command already answered',
    fake: SIMPLE,
    bad: (req, conn) => [...conn.defaultReply(req), simpleReply(req.cookie)],
    codes: ['resolved', 'EPROTO', 'ENOTCONN'],
    state: 'dead',
    message: /unknown cookie/,
  },
  {
    title: 'a reply with an unknown magic',
    bad: (req) => [simpleReply(req.cookie, 0, undefined, { magic: 0x12345678 })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /unknown magic 0x12345678/,
  },
  {
    title: 'a structured reply magic when only simple replies were negotiated',
    fake: SIMPLE,
    bad: (req) => [chunk(req, REPLY_TYPE.NONE)],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /not negotiated/,
  },
  // absurd chunk lengths
  {
    title: 'an OFFSET_DATA chunk claiming 4 GiB',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset, Buffer.alloc(0)), { length: GiB4 })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /outside the requested/,
  },
  {
    title: 'an OFFSET_DATA chunk claiming 4 GiB with its bytes still coming',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset, Buffer.alloc(100_000)), { length: GiB4 })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /outside the requested/,
  },
  {
    title: 'an error chunk claiming 4 GiB',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR, errorPayload(NBD_ERRNO.EIO, 'x'), { length: GiB4 })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /4294967295 bytes/,
  },
  {
    title: 'a NONE chunk claiming 4 GiB',
    bad: (req) => [chunk(req, REPLY_TYPE.NONE, Buffer.alloc(0), { length: GiB4 })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /4294967295 bytes/,
  },
  {
    title: 'a chunk of unknown type claiming 4 GiB',
    bad: (req) => [chunk(req, 77, Buffer.alloc(0), { length: GiB4 })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /4294967295 bytes/,
  },
  {
    title: 'a hole of 4 GiB',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_HOLE, holePayload(req.offset, GiB4))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /hole .*outside the requested/,
  },
  {
    title: 'a hole chunk of the wrong length',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_HOLE, Buffer.concat([holePayload(req.offset, 4096), Buffer.alloc(4)]))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /length 16, not 12/,
  },
  // data outside the requested range
  {
    title: 'data before the requested range',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset + 1000n - 1n, Buffer.alloc(4096)))],
    commands: (h) => [h.pread(4096, 1000), h.pread(4096, 8192), h.pread(4096, 16384)],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /outside the requested/,
  },
  {
    title: 'data running past the requested range',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset + 1n, Buffer.alloc(4096)))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /outside the requested/,
  },
  {
    title: 'data at an offset that wraps around 2^64',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(2n ** 64n - 16n, Buffer.alloc(64)))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /outside the requested/,
  },
  {
    title: 'a hole past the requested range',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_HOLE, holePayload(req.offset + 4096n, 512))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /hole .*outside the requested/,
  },
  {
    title: 'an error offset outside the requested range',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR_OFFSET, errorPayload(NBD_ERRNO.EIO, '', { offset: req.offset + 5000n }))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /error offset .*outside the requested/,
  },
  {
    title: 'read data in reply to a write',
    commands: (h) => [h.pwrite(Buffer.alloc(4096, 1), 0), h.pread(4096, 8192), h.pread(4096, 16384)],
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset, Buffer.alloc(4096)))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /read data in reply to NBD_CMD_WRITE/,
  },
  // missing data (libnbd: EIO, the connection goes on)
  {
    title: 'a structured read answered with NONE only',
    bad: (req) => [chunk(req, REPLY_TYPE.NONE)],
    codes: ['EIO', 'resolved', 'resolved'],
    state: 'ready',
    message: /0 of 4096 bytes/,
  },
  {
    title: 'a structured read answered with half its data',
    bad: (req) => [
      chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset, Buffer.alloc(2048, 1)), { done: false }),
      chunk(req, REPLY_TYPE.NONE),
    ],
    codes: ['EIO', 'resolved', 'resolved'],
    state: 'ready',
    message: /2048 of 4096 bytes/,
  },
  // error chunks (server errors: the handle stays usable)
  {
    title: 'an error chunk with a message',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR, errorPayload(NBD_ERRNO.EIO, 'the disk is on fire'))],
    codes: ['EIO', 'resolved', 'resolved'],
    state: 'ready',
    message: /the disk is on fire/,
  },
  {
    title: 'an error chunk without a message',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR, errorPayload(NBD_ERRNO.ENOSPC))],
    codes: ['ENOSPC', 'resolved', 'resolved'],
    state: 'ready',
    message: /error 28 \(ENOSPC\)$/,
  },
  {
    title: 'an error chunk with an offset',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR_OFFSET, errorPayload(NBD_ERRNO.EIO, 'bad sector', { offset: req.offset + 512n }))],
    codes: ['EIO', 'resolved', 'resolved'],
    state: 'ready',
    message: /at offset 512 with error 5 \(EIO\): bad sector/,
  },
  {
    title: 'an error chunk among data chunks (the error wins)',
    bad: (req) => [
      chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset, Buffer.alloc(2048, 1)), { done: false }),
      chunk(req, REPLY_TYPE.ERROR, errorPayload(NBD_ERRNO.EPERM, 'second half refused'), { done: false }),
      chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset + 2048n, Buffer.alloc(2048, 1)), { done: true }),
    ],
    codes: ['EPERM', 'resolved', 'resolved'],
    state: 'ready',
    message: /second half refused/,
  },
  {
    title: 'an error chunk whose message claims 65535 bytes in a 10-byte chunk',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR, errorPayload(NBD_ERRNO.EIO, 'abcd', { messageLength: 65535 }))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /claims 65535 bytes/,
  },
  {
    title: 'an error chunk too short for its error number',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR, Buffer.from([0, 0, 0]))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /shorter than its error/,
  },
  {
    title: 'an error chunk with error number 0',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR, errorPayload(0, 'all is well'))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /error number 0/,
  },
  // a simple reply where structured replies were negotiated
  {
    title: 'a simple reply with data to a read when structured replies were negotiated',
    bad: (req) => [simpleReply(req.cookie, 0, Buffer.alloc(4096))],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /simple reply with data to NBD_CMD_READ although structured replies/,
  },
  // death in the middle of a reply
  {
    title: 'a hang-up in the middle of a simple reply header',
    fake: SIMPLE,
    bad: (req) => [simpleReply(req.cookie).subarray(0, 10)],
    hangUp: true,
    codes: DEAD_ALL,
    state: 'dead',
    message: /closed the connection/,
  },
  {
    title: 'a hang-up in the middle of simple read data',
    fake: SIMPLE,
    bad: (req) => [simpleReply(req.cookie, 0, Buffer.alloc(1000))],
    hangUp: true,
    codes: DEAD_ALL,
    state: 'dead',
    message: /closed the connection/,
  },
  {
    title: 'a hang-up in the middle of a large simple read (straight into the buffer)',
    fake: SIMPLE,
    commands: (h) => [h.pread(1024 * 1024, 0), h.pread(4096, 8192), h.pread(4096, 16384)],
    bad: (req) => [simpleReply(req.cookie, 0, Buffer.alloc(300_000))],
    hangUp: true,
    codes: DEAD_ALL,
    state: 'dead',
    message: /closed the connection/,
  },
  {
    title: 'a hang-up in the middle of an OFFSET_DATA chunk',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset, Buffer.alloc(4096))).subarray(0, 20 + 8 + 100)],
    hangUp: true,
    codes: DEAD_ALL,
    state: 'dead',
    message: /closed the connection/,
  },
  {
    title: 'a hang-up in the middle of an error chunk',
    bad: (req) => [chunk(req, REPLY_TYPE.ERROR, errorPayload(NBD_ERRNO.EIO, 'this message is cut short')).subarray(0, 30)],
    hangUp: true,
    codes: DEAD_ALL,
    state: 'dead',
    message: /closed the connection/,
  },
  {
    title: 'a hang-up between the chunks of one reply',
    bad: (req) => [chunk(req, REPLY_TYPE.OFFSET_DATA, dataPayload(req.offset, Buffer.alloc(2048)), { done: false })],
    hangUp: true,
    codes: DEAD_ALL,
    state: 'dead',
    message: /closed the connection/,
  },
]

for (const f of txFaults) {
  const outcome = f.state === 'ready' ? `${f.codes[0]}, the handle stays ready` : `${f.codes.join('/')}, the handle is dead`
  test.serial(`transmission: ${f.title} → ${outcome}`, async (t) => {
    const commands = f.commands ?? threeReads
    const server = await useFake(t, {
      ...f.fake,
      onCommand: holdThen(3, (held, conn) => {
        conn.send(...f.bad(held[0]!, conn))
        if (f.state === 'ready') for (const req of held.slice(1)) conn.send(...conn.defaultReply(req))
        if (f.hangUp) conn.close()
      }),
    })
    const h = await openFake(t, server, f.handle)
    const before = memory()
    const { outcomes, ms } = await settleAll(commands(h))
    const codes = codesOf(outcomes)
    t.deepEqual(codes, f.codes)
    t.true(ms < PROMPT_MS, `the commands took ${ms} ms to settle`)
    const first = outcomes[0] as Outcome
    if (!first.ok) {
      assertNbdError(t, first.error, f.codes[0]!)
      t.regex(messageOf(first), f.message)
    } else {
      // The blame lies in a later command's failure message.
      t.regex(messageOf(outcomes[1] as Outcome), f.message)
    }
    for (const o of outcomes.slice(1)) {
      if (o !== 'hung' && !o.ok) t.regex(messageOf(o), f.message, 'other commands say why the connection died')
    }
    t.is(h.state, f.state)
    t.is(h.inFlight, 0)
    t.log(`${codes.join('/')} in ${ms} ms, state ${h.state}: ${messageOf(first) || messageOf(outcomes[1] as Outcome)}`)
    assertNoBigAllocation(t, before)
    if (f.state === 'ready') {
      // Still usable: a write and a read round-trip.
      const data = seededBytes(4096, 9)
      await h.pwrite(data, 65536)
      t.true((await h.pread(4096, 65536)).equals(data))
      t.is(h.state, 'ready')
    } else {
      await expectReject(t, () => h.pread(512, 0), 'EINVAL', 'pread')
    }
    t.deepEqual(server.errors, [])
  })
}

// Every error number a server may send, simple and structured, maps as libnbd maps it.
const errnoTable: [number, string][] = [
  [NBD_ERRNO.EPERM, 'EPERM'],
  [NBD_ERRNO.EIO, 'EIO'],
  [NBD_ERRNO.ENOMEM, 'ENOMEM'],
  [NBD_ERRNO.EINVAL, 'EINVAL'],
  [NBD_ERRNO.ENOSPC, 'ENOSPC'],
  [NBD_ERRNO.EOVERFLOW, 'EOVERFLOW'],
  [NBD_ERRNO.ENOTSUP, 'ENOTSUP'],
  [NBD_ERRNO.ESHUTDOWN, 'ESHUTDOWN'],
  // Unknown numbers become EINVAL.
  [2, 'EINVAL'],
  [110, 'EINVAL'],
  [9999, 'EINVAL'],
  [0xffffffff, 'EINVAL'],
]

for (const structured of [true, false]) {
  test.serial(`transmission: every server error number maps as libnbd maps it (${structured ? 'structured' : 'simple'} replies), the handle stays ready`, async (t) => {
    let next = 0
    const server = await useFake(t, {
      structuredReplies: structured,
      onCommand: (req, conn) => {
        if (req.type !== CMD.FLUSH || next >= errnoTable.length) return 'default'
        const [error] = errnoTable[next++]!
        return structured ? [chunk(req, REPLY_TYPE.ERROR, errorPayload(error, `error ${error} on purpose`))] : [simpleReply(req.cookie, error)]
      },
    })
    const h = await openFake(t, server, { requestStructuredReplies: structured })
    for (const [error, code] of errnoTable) {
      const err = await expectReject(t, () => h.flush(), code, 'flush')
      if (err) t.regex(err.message, new RegExp(`error ${error}`))
      t.is(h.state, 'ready')
    }
    await h.flush()
    t.true((await h.pread(512, 0)).equals(Buffer.alloc(512)))
    t.is(h.state, 'ready')
  })
}

// Death with many commands in flight (and more queued behind maxInFlight).
for (const how of ['close', 'reset'] as const) {
  test.serial(`transmission: a server that ${how === 'close' ? 'hangs up' : 'resets the connection'} with 100 commands pending rejects them all promptly with ENOTCONN`, async (t) => {
    const server = await useFake(t, {
      onCommand: holdThen(16, (held, conn) => (how === 'close' ? conn.close() : conn.reset())),
    })
    const h = await openFake(t, server, { maxInFlight: 16 })
    const pending = [
      ...Array.from({ length: 60 }, (_, i) => h.pread(4096, i * 4096)),
      ...Array.from({ length: 30 }, (_, i) => h.pwrite(Buffer.alloc(4096, i), 512 * 1024 + i * 4096)),
      ...Array.from({ length: 10 }, () => h.flush()),
    ]
    t.is(h.inFlight, 100)
    const { outcomes, ms } = await settleAll(pending)
    t.true(ms < PROMPT_MS, `pending commands took ${ms} ms to settle`)
    const codes = codesOf(outcomes)
    t.deepEqual([...new Set(codes)], ['ENOTCONN'], `codes: ${[...new Set(codes)].join(', ')}`)
    for (const o of outcomes) if (o !== 'hung' && !o.ok) t.true(o.error instanceof NbdError)
    t.is(h.state, 'dead')
    t.is(h.inFlight, 0)
    t.true(server.requests.length <= 16 + 1, `${server.requests.length} requests went out past maxInFlight 16`)
    await h.close()
    t.is(h.state, 'closed')
    t.deepEqual(server.errors, [])
  })
}

// A write whose payload the server never reads: the client must not hang on a full socket.
for (const how of ['close', 'reset'] as const) {
  test.serial(`transmission: a server that ${how === 'close' ? 'hangs up' : 'resets the connection'} while a large write is being sent rejects it promptly`, async (t) => {
    // The fake gives up as soon as the write's header arrives, with megabytes still unsent.
    const server = await useFake(t, { size: 64 * 1024 * 1024, onRequestHeader: () => how })
    const h = await openFake(t, server)
    const { outcomes, ms } = await settleAll([h.pwrite(Buffer.alloc(32 * 1024 * 1024, 1), 0), h.pread(4096, 0)])
    t.true(ms < PROMPT_MS, `took ${ms} ms`)
    t.deepEqual(codesOf(outcomes), ['ENOTCONN', 'ENOTCONN'])
    t.is(h.state, 'dead')
    t.is(h.inFlight, 0)
  })
}

test.serial('transmission: a reply naming no command is blamed on the oldest command still awaited, not on an aborted one', async (t) => {
  let bothArrived!: () => void
  const arrived = new Promise<void>((resolve) => (bothArrived = resolve))
  let sendBad!: () => void
  const server = await useFake(t, {
    onCommand: holdThen(3, (held, conn) => {
      bothArrived()
      sendBad = () => conn.send(simpleReply(held[0]!.cookie, 0, undefined, { magic: 0x12345678 }))
    }),
  })
  const h = await openFake(t, server)
  const ac = new AbortController()
  const aborted = h.pread(4096, 0, { signal: ac.signal })
  const awaited = [h.pread(4096, 8192), h.pread(4096, 16384)]
  // All three are on the wire before the first is aborted (a queued one would never be sent).
  await arrived
  ac.abort()
  await t.throwsAsync(aborted, { name: 'AbortError' })
  sendBad()
  const outcomes = await Promise.allSettled(awaited)
  const codes = outcomes.map((o) => (o.status === 'rejected' ? (o.reason as NbdError).code : 'resolved'))
  t.deepEqual(codes, ['EPROTO', 'ENOTCONN'])
  t.regex(((outcomes[0] as PromiseRejectedResult).reason as Error).message, /unknown magic 0x12345678/)
  t.is(h.state, 'dead')
})

test.serial('transmission: a server that stops answering leaves commands pending until close, which rejects them', async (t) => {
  const server = await useFake(t, { onCommand: () => 'stall' })
  const h = await openFake(t, server)
  const pending = [h.pread(4096, 0), h.flush()]
  const { outcomes } = await settleAll([Promise.race([pending[0]!, new Promise((r) => setTimeout(() => r('still pending'), 300))])])
  t.deepEqual(outcomes, [{ ok: true, value: 'still pending' }])
  t.is(h.state, 'processing')
  await h.close()
  const after = await settleAll(pending)
  t.true(after.ms < PROMPT_MS)
  t.true(codesOf(after.outcomes).every((c) => c !== 'resolved' && c !== 'hung'), codesOf(after.outcomes).join(', '))
  t.is(h.state, 'closed')
})
