// libnbd 1.22 conformance (issue 11): behaviours where libnbd's own test suite, restated
// against this API, found a difference. Each test names its item. Real servers (nbdkit,
// qemu-nbd) wherever a real server can show the behaviour; the fake server where only a
// misbehaving one can.
import fs from 'node:fs'
import path from 'node:path'
import { randomBytes } from 'node:crypto'
import { execFileSync } from 'node:child_process'
import test from 'ava'
import {
  CMD_FLAG_FUA,
  CMD_FLAG_PAYLOAD_LEN,
  Handle,
  NbdError,
  isUri,
  STRICT_AUTO_FLAG,
  STRICT_COMMANDS,
  STRICT_FLAGS,
  STRICT_PAYLOAD,
} from 'nbd-client'
import { OPT, REP, REPLY_TYPE, optionReply, structuredChunk, dataPayload, useFake } from './helpers/fake-server'
import { holdThen, openFake, settle } from './helpers/hostile'
import { connectTo, expectReject, expectThrow, openHandle, seededBytes, MiB } from './helpers/nbd'
import { makeTempDir, requireTool, useNbdkit, useQemuNbd } from './helpers/servers'

const BASE = 'base:allocation'

/** Waits (at most 2 s) until `lines` has a line matching `pattern`; debug lines arrive through the event loop. */
async function waitForLine(lines: string[], pattern: RegExp): Promise<string | undefined> {
  for (let i = 0; i < 200; i++) {
    const line = lines.find((l) => pattern.test(l))
    if (line) return line
    await new Promise((r) => setTimeout(r, 10))
  }
  return undefined
}

/** Debug lines of one handle, for counting what went on the wire. */
function recorder(h: Handle): string[] {
  const lines: string[] = []
  h.setDebug((context, message) => lines.push(`${context}: ${message}`))
  return lines
}

// ---- item 4: STARTTLS resets what was negotiated in plaintext ----

test('item 4: after optStarttls, structured replies, meta contexts and export details from plaintext are gone', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const dir = makeTempDir('nbd-conf-tls-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const psk = path.join(dir, 'keys.psk')
  fs.writeFileSync(psk, `alice:${randomBytes(32).toString('hex')}\n`)
  // --tls=on: the server allows plaintext negotiation before STARTTLS.
  const server = await useNbdkit(t, ['memory', '4M'], { extraArgs: ['--tls=on', `--tls-psk=${psk}`] })
  if (!server) return
  const h = new Handle({ optMode: true, tlsPskFile: psk, tlsUsername: 'alice', metaContexts: [BASE] })
  t.teardown(() => h.close())
  await connectTo(h, server)
  t.true(h.getStructuredRepliesNegotiated(), 'negotiated in plaintext')
  t.deepEqual(await h.optSetMetaContext(), [BASE])
  await h.optInfo()
  t.true(h.canMetaContext(BASE))
  t.is(h.getSize(), 4 * MiB)

  t.true(await h.optStarttls())
  t.true(h.getTlsNegotiated())
  t.false(h.getStructuredRepliesNegotiated(), 'structured replies must be asked for again over TLS')
  t.false(h.getExtendedHeadersNegotiated())
  expectThrow(t, () => h.canMetaContext(BASE), 'EINVAL', 'canMetaContext')
  expectThrow(t, () => h.getSize(), 'EINVAL', 'getSize')

  // Negotiated again over TLS, everything works.
  t.true(await h.optStructuredReply())
  await h.optGo()
  t.is(h.state, 'ready')
  t.true(h.canMetaContext(BASE))
  const map = await h.blockStatus(4 * MiB, 0)
  t.true(Array.isArray(map[BASE]))
})

// ---- item 26: the state is final before a rejection is visible ----

test.serial('item 26: a command failed by a protocol violation sees the handle dead in its rejection handler', async (t) => {
  const server = await useFake(t, {
    onCommand: holdThen(1, ([req], conn) => {
      // A data chunk claiming 4 GiB: a protocol violation.
      conn.send(structuredChunk(req!.cookie, REPLY_TYPE.OFFSET_DATA, dataPayload(req!.offset, Buffer.alloc(0)), {
        done: true,
        length: 0xffffffff,
      }))
    }),
  })
  const h = await openFake(t, server)
  const seen: string[] = []
  const first = h.pread(4096, 0).then(
    () => seen.push('resolved'),
    (e: NbdError) => seen.push(`${e.code} ${h.state}`),
  )
  const second = h.pread(4096, 8192).then(
    () => seen.push('resolved'),
    (e: NbdError) => seen.push(`${e.code} ${h.state}`),
  )
  await Promise.all([first, second])
  t.deepEqual(seen.sort(), ['ENOTCONN dead', 'EPROTO dead'])
  // item 16: getters refuse a dead handle (EINVAL), as libnbd's state table says.
  expectThrow(t, () => h.getSize(), 'EINVAL', 'getSize')
  expectThrow(t, () => h.canFlush(), 'EINVAL', 'canFlush')
  expectThrow(t, () => h.getStructuredRepliesNegotiated(), 'EINVAL')
})

// ---- item 16: information getters in state dead ----

test('item 16: getters answer while connected and after shutdown, not once the server is gone', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server)
  t.is(h.getSize(), MiB)
  await h.shutdown()
  t.is(h.state, 'closed')
  t.is(h.getSize(), MiB, 'closed (after shutdown) still answers')

  const d = await openHandle(t, server)
  t.true(d.canFlush())
  await server.stop()
  await t.throwsAsync(d.pread(512, 0))
  t.is(d.state, 'dead')
  expectThrow(t, () => d.getSize(), 'EINVAL', 'getSize')
  expectThrow(t, () => d.isReadOnly(), 'EINVAL', 'isReadOnly')
})

// ---- item 1: canMetaContext before the server answered ----

test('item 1: canMetaContext is EINVAL for contexts asked for but never negotiated', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  // Asked for, but the request was switched off: the server never answered for them.
  const h = await openHandle(t, server, { metaContexts: [BASE], requestMetaContext: false })
  expectThrow(t, () => h.canMetaContext(BASE), 'EINVAL', 'canMetaContext')
  // Asked for and answered: a context the server does not know is a plain false.
  const k = await openHandle(t, server, { metaContexts: [BASE, 'nosuch:context'] })
  t.true(k.canMetaContext(BASE))
  t.false(k.canMetaContext('nosuch:context'))
  // Nothing asked for: false.
  const n = await openHandle(t, server)
  t.false(n.canMetaContext(BASE))
})

// ---- item 2: setExportName with the same name ----

test('item 2: setExportName with the same name keeps what optInfo learned', async (t) => {
  const server = await useQemuNbd(t, { size: 2 * MiB, exportName: 'disk' })
  if (!server) return
  const h = new Handle({ optMode: true, exportName: 'disk' })
  t.teardown(() => h.close())
  await connectTo(h, server)
  await h.optInfo()
  t.is(h.getSize(), 2 * MiB)
  h.setExportName('disk')
  t.is(h.getSize(), 2 * MiB, 'the same name is a no-op')
  h.setExportName('other')
  expectThrow(t, () => h.getSize(), 'EINVAL', 'getSize')
})

// ---- item 3: a refused optGo forgets the meta contexts ----

test.serial('item 3: after a refused optGo, canMetaContext no longer answers from the earlier request', async (t) => {
  let gos = 0
  const server = await useFake(t, {
    onOption: (o) => {
      // Refuse the first GO; SET_META_CONTEXT before it is answered normally.
      if (o.option !== OPT.GO || gos++ > 0) return 'default'
      return [optionReply(OPT.GO, REP.ERR_POLICY, Buffer.from('not now'))]
    },
  })
  const h = new Handle({ optMode: true, metaContexts: [BASE] })
  t.teardown(() => h.close())
  await h.connectUnix(server.socket)
  t.deepEqual(await h.optSetMetaContext(), [BASE])
  t.true(h.canMetaContext(BASE))
  await expectReject(t, () => h.optGo(), 'EPERM', 'optGo')
  t.is(h.state, 'negotiating')
  expectThrow(t, () => h.canMetaContext(BASE), 'EINVAL', 'canMetaContext')
  // The next GO sets the contexts again and succeeds.
  await h.optGo()
  t.true(h.canMetaContext(BASE))
})

// ---- item 5: option mode against a plain newstyle server ----

test('item 5: option mode against plain newstyle stops in negotiating; only optGo works', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'], { plainNewstyle: true })
  if (!server) return
  const h = new Handle({ optMode: true })
  t.teardown(() => h.close())
  await connectTo(h, server)
  t.is(h.state, 'negotiating')
  t.is(h.getProtocol(), 'newstyle')
  await expectReject(t, () => h.optList(), 'ENOTSUP', 'optList')
  await expectReject(t, () => h.optInfo(), 'ENOTSUP', 'optInfo')
  await expectReject(t, () => h.optStructuredReply(), 'ENOTSUP', 'optStructuredReply')
  t.is(h.state, 'negotiating')
  await h.optGo()
  t.is(h.state, 'ready')
  t.is(h.getSize(), MiB)
  t.deepEqual(await h.pread(512, 0), Buffer.alloc(512))

  const a = new Handle({ optMode: true })
  t.teardown(() => a.close())
  await connectTo(a, server)
  await a.optAbort()
  t.is(a.state, 'dead', 'plain newstyle knows no NBD_OPT_ABORT: the handle is dead, as in libnbd')
})

// ---- item 6: STRICT_AUTO_FLAG ----

test('item 6: STRICT_AUTO_FLAG clears CMD_FLAG_PAYLOAD_LEN without extended headers', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server)
  t.false(h.getExtendedHeadersNegotiated())
  const data = seededBytes(4096, 6)
  await h.pwrite(data, 0, { flags: CMD_FLAG_PAYLOAD_LEN })
  t.deepEqual(await h.pread(4096, 0), data)
  // With the bit cleared the caller's flag goes out, and the server refuses it.
  h.setStrictMode(h.getStrictMode() & ~STRICT_AUTO_FLAG)
  await expectReject(t, () => h.pwrite(data, 4096, { flags: CMD_FLAG_PAYLOAD_LEN }), 'EINVAL', 'pwrite')
})

test('item 6: STRICT_AUTO_FLAG sets CMD_FLAG_PAYLOAD_LEN with extended headers', async (t) => {
  const server = await useQemuNbd(t, { size: MiB })
  if (!server) return
  const h = await openHandle(t, server)
  t.true(h.getExtendedHeadersNegotiated(), 'qemu-nbd ≥ 8.2 negotiates extended headers')
  const lines = recorder(h)
  await h.pwrite(seededBytes(512, 1), 0)
  const sent = await waitForLine(lines, /sending NBD_CMD_WRITE/)
  t.truthy(sent, lines.join('\n'))
  t.regex(sent!, /flags 0x20\b/)
})

// ---- item 7: filtered block status goes to the server as asked ----

test('item 7: an empty filter and a duplicated context are sent for the server to judge', async (t) => {
  const server = await useQemuNbd(t, { size: MiB, format: 'qcow2', extraArgs: ['-A'] })
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [BASE, 'qemu:allocation-depth'] })
  t.true(h.canBlockStatusPayload())
  let before = h.stats.bytesSent
  await expectReject(t, () => h.blockStatus(MiB, 0, { contexts: [] }), 'EINVAL', 'blockStatus')
  t.true(h.stats.bytesSent > before, 'the server refused it, not the client')
  before = h.stats.bytesSent
  await expectReject(t, () => h.blockStatus(MiB, 0, { contexts: [BASE, BASE] }), 'EINVAL', 'blockStatus')
  t.true(h.stats.bytesSent > before, 'the server refused it, not the client')
  // An unknown name is still the client's refusal.
  before = h.stats.bytesSent
  await expectReject(t, () => h.blockStatus(MiB, 0, { contexts: ['qemu:dirty-bitmap:nope'] }), 'EINVAL', 'blockStatus')
  t.is(h.stats.bytesSent, before)
  t.is(h.state, 'ready')
  const one = await h.blockStatus(MiB, 0, { contexts: [BASE] })
  t.deepEqual(Object.keys(one), [BASE])
})

// ---- item 8: abandonPending drops unsent commands ----

test('item 8: shutdown({ abandonPending: true }) fails unsent commands with ENOTCONN without sending them', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'memory', '1M', 'rdelay=1'])
  if (!server) return
  const h = await openHandle(t, server, { maxInFlight: 1 })
  const lines = recorder(h)
  const reads = [0, 1, 2, 3].map((i) => settle(h.pread(512, i * 512)))
  // Let the first read reach the wire; the other three wait for its slot.
  t.truthy(await waitForLine(lines, /sending NBD_CMD_READ/))
  await h.shutdown({ abandonPending: true })
  const outcomes = await Promise.all(reads)
  const codes = outcomes.map((o) => (o.ok ? 'resolved' : (o.error as NbdError).code))
  t.deepEqual(codes.slice(1), ['ENOTCONN', 'ENOTCONN', 'ENOTCONN'])
  t.truthy(await waitForLine(lines, /NBD_CMD_DISC/))
  t.is(lines.filter((l) => l.includes('sending NBD_CMD_READ')).length, 1, lines.join('\n'))
})

// ---- item 12: NBD_CMD_DISC is counted in bytesSent ----

test('item 12: the NBD_CMD_DISC request counts one chunk and its 28 bytes', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server)
  const before = h.stats
  await h.shutdown()
  const after = h.stats
  t.is(after.chunksSent - before.chunksSent, 1n)
  t.is(after.bytesSent - before.bytesSent, 28n)
})

// ---- item 17: STRICT_BOUNDS errnos ----

test('item 17: out of bounds is ENOSPC for pwrite, trim and zero, EINVAL for reads, cache, block status', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [BASE] })
  const end = MiB
  await expectReject(t, () => h.pwrite(Buffer.alloc(512), end), 'ENOSPC', 'pwrite')
  await expectReject(t, () => h.trim(512, end), 'ENOSPC', 'trim')
  await expectReject(t, () => h.zero(512, end), 'ENOSPC', 'zero')
  await expectReject(t, () => h.pread(512, end), 'EINVAL', 'pread')
  await expectReject(t, () => h.cache(512, end), 'EINVAL', 'cache')
  await expectReject(t, () => h.blockStatus(512, end), 'EINVAL', 'blockStatus')
})

// ---- item 18: the payload maximum limits writes, not reads ----

test('item 18: reads up to 64 MiB pass STRICT_PAYLOAD; writes over the payload maximum do not', async (t) => {
  // Larger than 64 MiB, so that the read over 64 MiB below is in bounds (libnbd checks the
  // range first: out of bounds it would be EINVAL).
  const server = await useNbdkit(t, ['memory', '128M'])
  if (!server) return
  const h = await openHandle(t, server)
  const payload = h.getBlockSize('payload')
  t.true(payload < 64 * MiB)
  t.true(h.getStrictMode() & STRICT_PAYLOAD ? true : false)
  const big = payload + MiB
  const data = await h.pread(big, 0)
  t.is(data.length, big)
  await expectReject(t, () => h.pwrite(Buffer.alloc(big), 0), 'ERANGE', 'pwrite')
  await expectReject(t, () => h.pread(64 * MiB + 512, 0), 'ERANGE', 'pread')
  await expectReject(t, () => h.pread(64 * MiB + 512, 64 * MiB), 'EINVAL', 'pread')
})

// ---- item 19: block status without contexts under relaxed strict mode ----

test('item 19: block status without a negotiated context goes to the server when STRICT_COMMANDS is off', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server)
  await expectReject(t, () => h.blockStatus(4096, 0), 'ENOTSUP', 'blockStatus')
  h.setStrictMode(h.getStrictMode() & ~STRICT_COMMANDS)
  const before = h.stats.bytesSent
  await expectReject(t, () => h.blockStatus(4096, 0), 'EINVAL', 'blockStatus')
  t.true(h.stats.bytesSent > before, 'sent, and refused by the server')
  t.is(h.state, 'ready')
})

// ---- item 10: URI query keys in any case ----

test('item 10: connectUri takes SOCKET= as socket=', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectUri(`NBD+UNIX:///?SOCKET=${server.socket}`)
  t.is(h.getSize(), MiB)
})

// ---- item 11: socket activation name ----

test('item 11: LISTEN_FDNAMES is unknown by default and setSocketActivationName sets it', async (t) => {
  if (!requireTool(t, 'nbdkit')) return
  const dir = makeTempDir('nbd-conf-act-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  for (const [name, want] of [['', 'unknown'], ['nbd-a', 'nbd-a']] as const) {
    const out = path.join(dir, `names-${want}`)
    const h = new Handle()
    t.teardown(() => h.close())
    t.is(h.getSocketActivationName(), '')
    if (name) h.setSocketActivationName(name)
    t.is(h.getSocketActivationName(), name)
    // exec keeps the pid, so LISTEN_PID still names nbdkit.
    await h.connectSystemdSocketActivation(['sh', '-c', `echo "$LISTEN_FDNAMES" > ${out}; exec nbdkit -f memory 1M`])
    t.is(h.getSize(), MiB)
    t.is(fs.readFileSync(out, 'utf8').trim(), want)
    t.is(h.getSubprocessPid(), h.subprocessPid)
  }
  expectThrow(t, () => new Handle().setSocketActivationName('a:b'), 'EINVAL', 'setSocketActivationName')
})

// ---- items 13, 14, 15: handle names, LIBNBD_DEBUG, the closing message ----

test('item 13: handles are named nbd1, nbd2, … in order of creation', (t) => {
  const a = new Handle()
  const b = new Handle()
  const na = /^nbd(\d+)$/.exec(a.getHandleName())
  const nb = /^nbd(\d+)$/.exec(b.getHandleName())
  t.truthy(na, a.getHandleName())
  t.truthy(nb, b.getHandleName())
  t.true(Number(nb![1]) > Number(na![1]))
  t.is(new Handle({ name: 'mine' }).getHandleName(), 'mine')
})

test('item 14: LIBNBD_DEBUG=1 turns debugging on for new handles', (t) => {
  const script = "const { Handle } = require('./dist/index.js'); console.log(new Handle().getDebug())"
  const run = (env: NodeJS.ProcessEnv) =>
    execFileSync(process.execPath, ['-e', script], { cwd: path.join(__dirname, '..'), env, encoding: 'utf8' }).trim()
  const env = { ...process.env }
  delete env.LIBNBD_DEBUG
  t.is(run(env), 'false')
  t.is(run({ ...env, LIBNBD_DEBUG: '1' }), 'true')
  t.is(run({ ...env, LIBNBD_DEBUG: '0' }), 'false')
})

test('item 15: close() reports "closing handle" to the debug callback; clearDebugCallback forgets it', async (t) => {
  const lines: string[] = []
  const h = new Handle({ debug: (context, message) => lines.push(`${context}: ${message}`) })
  await h.close()
  t.truthy(await waitForLine(lines, /closing handle/), lines.join('\n'))
  const k = new Handle({ debug: (_c, m) => lines.push(m) })
  k.clearDebugCallback()
  k.setDebug(false)
  const before = lines.length
  await k.close()
  await new Promise((r) => setTimeout(r, 50))
  t.is(lines.length, before)
})

// ---- item 21: getUri ----

test('item 21: getUri is EINVAL for a connection no URI describes, and writes the TLS user and files when set', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const c = new Handle()
  t.teardown(() => c.close())
  await c.connectCommand(['nbdkit', '-s', 'memory', '1M'])
  expectThrow(t, () => c.getUri(), 'EINVAL', 'getUri')
  const h = await openHandle(t, server, { tlsUsername: 'alice', tlsPskFile: '/k.psk' })
  const uri = h.getUri()
  t.regex(uri, /^nbd\+unix:\/\/alice@\//)
  t.regex(uri, /tls-psk-file=%2Fk\.psk|tls-psk-file=\/k\.psk/)
})

// ---- item 22: isUri, nbd+ssh (see 255-uri-ssh) and tls-verify-peer's values ----

test('item 22: tls-verify-peer takes the values libnbd parses, and a bare name is EINVAL', async (t) => {
  const words: Array<[string, boolean]> = [['t', true], ['Y', true], ['on', true], ['1', true], ['f', false], ['N', false], ['off', false], ['0', false]]
  for (const [word, value] of words) {
    const h = new Handle()
    t.teardown(() => h.close())
    // The socket does not exist: the settings are applied before the connection fails.
    await expectReject(t, () => h.connectUri(`nbds+unix:///?socket=/nonexistent/s&tls-verify-peer=${word}`), '*', 'connectUri')
    t.is(h.getTlsVerifyPeer(), value, word)
  }
  for (const word of ['', 'maybe', '2']) {
    const h = new Handle()
    t.teardown(() => h.close())
    const q = word === '' ? 'tls-verify-peer' : `tls-verify-peer=${word}`
    const err = await expectReject(t, () => h.connectUri(`nbds+unix:///?socket=/s&${q}`), 'EINVAL', 'connectUri')
    t.regex(err!.message, /could not parse tls-verify-peer parameter/)
  }
  t.true(isUri('nbd+ssh://h/') && isUri('NBDS+SSH://h') && !isUri('nbd+ssh:h'))
})

// ---- item 9: preadInto zeroes the caller's buffer before any check ----

test('item 9: preadInto zeroes the buffer first, even when the call then fails', async (t) => {
  const unconnected = new Handle()
  t.teardown(() => unconnected.close())
  const b = Buffer.alloc(4096, 0xaa)
  await expectReject(t, () => unconnected.preadInto(b, 0), '*', 'preadInto')
  t.true(b.every((x) => x === 0), 'zeroed although the handle is not connected')
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server)
  const past = Buffer.alloc(4096, 0x55)
  await expectReject(t, () => h.preadInto(past, 1 * MiB), 'EINVAL', 'preadInto')
  t.true(past.every((x) => x === 0), 'zeroed although the range is past the end')
})

// ---- item 25: extents past 2^53 are exact ----

test('item 25: block status offsets and lengths past 2^53 - 1 come back as exact bigints', async (t) => {
  // A 2^60-byte export of nothing: nbdkit null reports one extent as large as asked for.
  const server = await useNbdkit(t, ['null', String(2n ** 60n)])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: ['base:allocation'] })
  t.is(h.getSize({ bigint: true }), 2n ** 60n)
  const at = 2n ** 53n + 1n // not representable as a double
  const reply = await h.blockStatus(1 * MiB, at)
  const extents = reply['base:allocation']!
  t.true(extents.length >= 1)
  t.is(extents[0]!.offset, at, 'a bigint, exact')
  const low = await h.blockStatus(4096, 4096)
  t.is(low['base:allocation']![0]!.offset, 4096, 'a plain number below 2^53')
})

// ---- item 24: the missing calls and constants ----

test('item 24: supportsVsock, getSubprocessPid ESRCH, the *_MASK and namespace constants, addMetaContext("")', async (t) => {
  const m = await import('nbd-client')
  t.is(m.supportsVsock(), process.platform === 'linux')
  expectThrow(t, () => new Handle().getSubprocessPid(), 'ESRCH', 'getSubprocessPid')
  t.is(new Handle().subprocessPid, null)
  t.is(m.CMD_FLAG_MASK, 0x3f)
  t.is(m.STRICT_MASK, 0x7f)
  t.is(m.HANDSHAKE_FLAG_MASK, 0x03)
  t.is(m.ALLOW_TRANSPORT_MASK, 0x0f)
  t.is(m.ALLOW_TRANSPORT_SSH, 0x08)
  t.is(m.NAMESPACE_BASE, 'base:')
  t.is(m.NAMESPACE_QEMU, 'qemu:')
  t.is(m.CONTEXT_QEMU_DIRTY_BITMAP, 'qemu:dirty-bitmap:')
  t.is(m.CONTEXT_QEMU_ALLOCATION_DEPTH, 'qemu:allocation-depth')
  const h = new Handle()
  h.addMetaContext('')
  t.deepEqual(h.getMetaContexts(), [''])
  t.is(h.getStrictMode(), m.STRICT_MASK)
})

// ---- item 23: connectTcp takes any service name ----

test('item 23: connectTcp resolves service names as getaddrinfo does', async (t) => {
  // "discard" is port 9 in every services database; nothing listens there, so the connect
  // itself is refused: the name was understood.
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectTcp('127.0.0.1', 'discard'), 'ECONNREFUSED', 'connectTcp')
  const k = new Handle()
  t.teardown(() => k.close())
  await expectReject(t, () => k.connectTcp('127.0.0.1', 'no-such-service-here'), 'EINVAL', 'connectTcp')
})

// ---- item 20: the effective TLS user and host names ----

test('item 20: getTlsUsername is the login name and getTlsHostname the TCP host when unset', async (t) => {
  const h = new Handle()
  t.teardown(() => h.close())
  // The login name as libnbd finds it: $LOGNAME first (this process is no worker thread,
  // so process.env is the real environment).
  const saved = process.env.LOGNAME
  try {
    process.env.LOGNAME = 'bob'
    t.is(h.getTlsUsername(), 'bob')
    delete process.env.LOGNAME
    // Without it, getlogin(); with no controlling terminal there is no name: EINVAL.
    try {
      t.is(typeof h.getTlsUsername(), 'string')
    } catch (e) {
      t.is((e as NbdError).code, 'EINVAL')
    }
  } finally {
    if (saved === undefined) delete process.env.LOGNAME
    else process.env.LOGNAME = saved
  }
  t.is(h.getTlsHostname(), null, 'nothing set, nothing connected')
  h.setTlsUsername('alice')
  t.is(h.getTlsUsername(), 'alice')
  const server = await useNbdkit(t, ['memory', '1M'], { tcp: true })
  if (!server) return
  await h.connectTcp('127.0.0.1', server.port!)
  t.is(h.getTlsHostname(), '127.0.0.1')
  const k = new Handle({ tlsHostname: 'srv.example' })
  t.is(k.getTlsHostname(), 'srv.example')
})

// ---- a request wrong in several ways gets libnbd's errno: its checks run in its order ----

test('client-side refusals follow libnbd order: command support, read-only, range, then size', async (t) => {
  const ro = await useNbdkit(t, ['-r', 'memory', '1M'])
  if (!ro) return
  const h = await openHandle(t, ro)
  t.true(h.isReadOnly())
  t.false(h.canTrim())
  t.false(h.canZero())
  // libnbd asks whether the server takes the command before whether the export is writable.
  await expectReject(t, () => h.trim(512, 0), 'EINVAL', 'trim')
  await expectReject(t, () => h.zero(512, 0), 'EINVAL', 'zero')
  await expectReject(t, () => h.pwrite(Buffer.alloc(512), 0), 'EPERM', 'pwrite')
  const rw = await useNbdkit(t, ['memory', '1M'])
  if (!rw) return
  const w = await openHandle(t, rw)
  // Too large and out of bounds: the range is checked first (ENOSPC for a write, EINVAL for a read).
  await expectReject(t, () => w.pwrite(Buffer.alloc(65 * MiB), 0), 'ENOSPC', 'pwrite')
  await expectReject(t, () => w.pread(65 * MiB, 0), 'EINVAL', 'pread')
  await expectReject(t, () => w.preadInto(Buffer.alloc(65 * MiB), 0), 'EINVAL', 'preadInto')
  // The state comes before everything: a handle not yet connected says so, whatever the size.
  const fresh = new Handle()
  t.teardown(() => fresh.close())
  await expectReject(t, () => fresh.pread(65 * MiB, 0), 'ENOTCONN', 'pread')
})

test('a named flag a command does not take is refused as its bit would be, not dropped', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server)
  t.true(h.canFua())
  // libnbd refuses FUA on a read or a flush (STRICT_FLAGS): so does the named form.
  await expectReject(t, () => h.pread(512, 0, { fua: true }), 'EINVAL', 'pread')
  await expectReject(t, () => h.flush({ fua: true } as never), 'EINVAL', 'flush')
  await expectReject(t, () => h.pread(512, 0, { flags: CMD_FLAG_FUA }), 'EINVAL', 'pread')
  await expectReject(t, () => h.pwrite(Buffer.alloc(512), 0, { reqOne: true } as never), 'EINVAL', 'pwrite')
  // false is no flag at all, and the flags a command takes still work by name.
  t.is((await h.pread(512, 0, { fua: false } as never)).length, 512)
  await h.pwrite(Buffer.alloc(512), 0, { fua: true })
  // With STRICT_FLAGS off the bit goes to the server, as libnbd sends it: whatever nbdkit
  // answers, it is the server's answer, and the handle stays usable.
  h.setStrictMode(h.getStrictMode() & ~STRICT_FLAGS)
  const sent = await h.pread(512, 0, { fua: true } as never).then(
    (b) => b.length,
    (e: NbdError) => e.message,
  )
  t.true(sent === 512 || /server|invalid/i.test(String(sent)), String(sent))
  t.is(h.state, 'ready')
})
