// Connecting: the connectSocket ownership contract clause by clause, connectUnix/connectTcp to
// every real peer and the embedded server, the three handshake styles, export selection and the
// connect timeout.
import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import test, { type ExecutionContext } from 'ava'
import { Handle, HANDSHAKE_FLAG_NO_ZEROES } from 'nbd-client'
import {
  closedFdNumber,
  connectedSocketFd,
  fdTarget,
  listeningSocket,
  pipeFd,
  rawServer,
  regularFileFd,
  waitFor,
} from './helpers/fds'
import { CROSSCHECK_TOOLS, nbdinfoJson } from './helpers/crosscheck'
import {
  ANY_CODE,
  connectTo,
  expectReject,
  openEmbedded,
  openHandle,
  seededBytes,
  useEmbedded,
  KiB,
  MiB,
} from './helpers/nbd'
import {
  makeTempDir,
  requireTool,
  useNbdkit,
  useNbdServer,
  useQemuNbd,
  type Server,
} from './helpers/servers'

const REFUSED_FD_CODES = ['EBADF', 'ENOTSOCK', 'ENOTCONN', 'EINVAL']

function useTempDir(t: ExecutionContext): string {
  const dir = makeTempDir('nbd-connect-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

// ---- connectSocket: the ownership contract --------------------------------------------------
// These tests watch fd numbers, so they run serially (before the concurrent ones).

test.serial('connectSocket on a fresh handle resolves ready; close() then closes the fd', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const fd = server.socketpair()
  const target = fdTarget(fd)
  t.truthy(target)
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectSocket(fd)
  t.is(h.state, 'ready')
  t.is(h.getSize(), MiB)
  // The handle owns the fd now and keeps it until close.
  t.is(fdTarget(fd), target)
  await h.close()
  t.not(fdTarget(fd), target, 'fd still open after close()')
})

test.serial('connectSocket on a connected handle rejects and the caller keeps a usable fd', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const first = await openEmbedded(t, server)
  const fd = server.socketpair()
  const target = fdTarget(fd)
  await expectReject(t, () => first.connectSocket(fd), 'EINVAL', 'connectSocket')
  t.is(first.state, 'ready')
  t.is(fdTarget(fd), target, 'the refused fd was closed or replaced')
  // Still the caller's, and still a working connection: another handle can use it.
  const second = new Handle()
  t.teardown(() => second.close())
  await second.connectSocket(fd)
  t.is(second.state, 'ready')
  const data = seededBytes(4 * KiB, 200)
  await first.pwrite(data, 8 * KiB)
  t.deepEqual(await second.pread(data.length, 8 * KiB), data)
})

test.serial('connectSocket on a closed handle rejects with EINVAL and leaves the fd open', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = new Handle()
  await h.close()
  const fd = server.socketpair()
  const target = fdTarget(fd)
  await expectReject(t, () => h.connectSocket(fd), 'EINVAL', 'connectSocket')
  t.is(fdTarget(fd), target)
  const other = new Handle()
  t.teardown(() => other.close())
  await other.connectSocket(fd)
  t.is(other.state, 'ready')
})

test.serial('connectSocket refuses a regular file fd and leaves it untouched', async (t) => {
  const dir = useTempDir(t)
  const fd = regularFileFd(dir)
  t.teardown(() => fs.closeSync(fd))
  const target = fdTarget(fd)
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectSocket(fd), REFUSED_FD_CODES, 'connectSocket')
  t.is(fdTarget(fd), target)
  // Nothing was read from or written to it.
  const content = Buffer.alloc(64)
  const n = fs.readSync(fd, content, 0, 64, 0)
  t.is(content.toString('utf8', 0, n), 'not a socket')
})

test.serial('connectSocket refuses a pipe fd and leaves it untouched', async (t) => {
  const dir = useTempDir(t)
  const fd = pipeFd(dir)
  t.teardown(() => fs.closeSync(fd))
  const target = fdTarget(fd)
  fs.writeSync(fd, 'queued')
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectSocket(fd), REFUSED_FD_CODES, 'connectSocket')
  t.is(fdTarget(fd), target)
  // The bytes queued in the pipe are still there: nothing read them.
  const back = Buffer.alloc(6)
  t.is(fs.readSync(fd, back), 6)
  t.is(back.toString(), 'queued')
})

test.serial('connectSocket refuses a listening socket and leaves it open', async (t) => {
  const dir = useTempDir(t)
  const listening = await listeningSocket(dir)
  t.teardown(() => listening.close())
  const target = fdTarget(listening.fd)
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectSocket(listening.fd), REFUSED_FD_CODES, 'connectSocket')
  t.is(fdTarget(listening.fd), target)
})

test.serial('connectSocket refuses a closed fd number', async (t) => {
  const fd = closedFdNumber()
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectSocket(fd), REFUSED_FD_CODES, 'connectSocket')
  t.is(fdTarget(fd), undefined)
})

test.serial('connectSocket refuses values that are not fd numbers, without throwing', async (t) => {
  const bad: unknown[] = [-1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, '3', null, undefined, {}, 2 ** 53]
  for (const value of bad) {
    const h = new Handle()
    await expectReject(t, () => h.connectSocket(value as number), [...REFUSED_FD_CODES, 'ERANGE'], 'connectSocket')
    await h.close()
  }
})

test.serial('a handle dropped without close() closes its fd when garbage-collected', async (t) => {
  t.is(typeof global.gc, 'function', 'run with --expose-gc')
  const server = useEmbedded(t, { size: MiB })
  const fd = server.socketpair()
  const target = fdTarget(fd)
  await (async () => {
    const h = new Handle()
    await h.connectSocket(fd)
    t.is(h.state, 'ready')
    t.is(await h.pread(512, 0).then((b) => b.length), 512)
  })()
  t.is(fdTarget(fd), target, 'the fd closed before the handle was collected')
  const closed = await waitFor(() => {
    global.gc!()
    return fdTarget(fd) !== target
  }, 10_000, 50)
  t.true(closed, 'fd still open 10 s after the handle became garbage')
})

test.serial('a failed handshake keeps the fd open until close()', async (t) => {
  const dir = useTempDir(t)
  const garbage = await rawServer(dir, (sock) => {
    sock.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n' + 'garbage'.repeat(64))
  })
  t.teardown(() => garbage.close())
  const fd = await connectedSocketFd({ socket: garbage.socket })
  const target = fdTarget(fd)
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectSocket(fd), 'EPROTO', 'connectSocket')
  t.not(h.state, 'ready')
  t.is(h.state, 'dead')
  t.is(fdTarget(fd), target, 'the fd was closed before close()')
  await h.close()
  t.not(fdTarget(fd), target, 'fd still open after close()')
})

test.serial('a server that hangs up during the handshake fails connectSocket; the fd stays until close()', async (t) => {
  const dir = useTempDir(t)
  const hangup = await rawServer(dir, (sock) => {
    sock.end()
  })
  t.teardown(() => hangup.close())
  const fd = await connectedSocketFd({ socket: hangup.socket })
  const target = fdTarget(fd)
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectSocket(fd), ANY_CODE, 'connectSocket')
  t.is(h.state, 'dead')
  t.is(fdTarget(fd), target)
  await h.close()
  t.not(fdTarget(fd), target)
})

test.serial('connectSocket also works with a socket fd connected to nbdkit', async (t) => {
  const server = await useNbdkit(t, ['memory', '4M'])
  if (!server) return
  const fd = await connectedSocketFd({ socket: server.socket })
  const target = fdTarget(fd)
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectSocket(fd)
  t.is(h.state, 'ready')
  t.is(h.getSize(), 4 * MiB)
  t.is(h.getProtocol(), 'newstyle-fixed')
  await h.close()
  t.not(fdTarget(fd), target)
})

// ---- connect timeout ------------------------------------------------------------------------

test('connectTimeout fails connectUnix to a silent server with ETIMEDOUT', async (t) => {
  const dir = useTempDir(t)
  const silent = await rawServer(dir, () => {})
  t.teardown(() => silent.close())
  const h = new Handle({ connectTimeout: 400 })
  t.teardown(() => h.close())
  const started = Date.now()
  await expectReject(t, () => h.connectUnix(silent.socket), 'ETIMEDOUT', 'connectUnix')
  const elapsed = Date.now() - started
  t.true(elapsed >= 350, `gave up after ${elapsed} ms, before the 400 ms timeout`)
  t.true(elapsed < 3000, `took ${elapsed} ms for a 400 ms timeout`)
  // The server process sees the connection on its next poll, which under emulation may come
  // after the rejection; it must come, and only once (no retry).
  t.true(await waitFor(() => silent.connections >= 1, 30_000), 'the server never saw the connection')
  t.is(silent.connections, 1)
  t.not(h.state, 'ready')
})

test('connectTimeout fails connectSocket to a silent server with ETIMEDOUT', async (t) => {
  const dir = useTempDir(t)
  const silent = await rawServer(dir, () => {})
  t.teardown(() => silent.close())
  const fd = await connectedSocketFd({ socket: silent.socket })
  const h = new Handle({ connectTimeout: 300 })
  t.teardown(() => h.close())
  const started = Date.now()
  await expectReject(t, () => h.connectSocket(fd), 'ETIMEDOUT', 'connectSocket')
  const elapsed = Date.now() - started
  t.true(elapsed >= 250 && elapsed < 3000, `timed out after ${elapsed} ms for 300 ms`)
})

// ---- real peers -----------------------------------------------------------------------------

const SIZE = 8 * MiB

const peers: [string, (t: ExecutionContext, tcp: boolean) => Promise<Server | undefined>][] = [
  ['nbdkit', (t, tcp) => useNbdkit(t, ['memory', String(SIZE)], { tcp })],
  ['qemu-nbd', (t, tcp) => useQemuNbd(t, { format: 'qcow2', size: SIZE, tcp })],
  ['nbd-server', (t, tcp) => useNbdServer(t, { size: SIZE, tcp })],
]

for (const [name, start] of peers) {
  for (const tcp of [false, true]) {
    const call = tcp ? 'connectTcp' : 'connectUnix'
    test(`${call} to ${name} reaches ready and agrees with nbdinfo`, async (t) => {
      if (!requireTool(t, ...CROSSCHECK_TOOLS)) return
      const server = await start(t, tcp)
      if (!server) return
      const h = new Handle({ exportName: server.exportName })
      t.teardown(() => h.close())
      await connectTo(h, server)
      t.is(h.state, 'ready')
      t.is(h.getSize(), SIZE)
      t.is(h.getProtocol(), 'newstyle-fixed')
      t.is(h.getExportName(), server.exportName)
      const info = await nbdinfoJson(server.uri)
      const exp = info.exports[0]
      t.is(h.getStructuredRepliesNegotiated(), info.structured)
      t.is(h.isReadOnly(), exp.is_read_only)
      t.is(h.isRotational(), exp.is_rotational)
      t.is(h.canFlush(), exp.can_flush)
      t.is(h.canFua(), exp.can_fua)
      t.is(h.canTrim(), exp.can_trim)
      t.is(h.canZero(), exp.can_zero)
      t.is(h.canFastZero(), exp.can_fast_zero)
      t.is(h.canCache(), exp.can_cache)
      t.is(h.canMultiConn(), exp.can_multi_conn)
      if (info.structured) t.is(h.canDf(), exp.can_df)
      // A short round trip proves the transmission phase works too.
      const data = seededBytes(64 * KiB, tcp ? 2 : 1)
      await h.pwrite(data, MiB + 512)
      t.deepEqual(await h.pread(data.length, MiB + 512), data)
      await h.close()
      t.is(h.state, 'closed')
    })
  }
}

test('connectTcp accepts the port as a string', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'], { tcp: true })
  if (!server) return
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectTcp('127.0.0.1', String(server.port))
  t.is(h.state, 'ready')
  t.is(h.getSize(), MiB)
})

// ---- handshake styles -----------------------------------------------------------------------

test('fixed newstyle nbdkit: getProtocol is newstyle-fixed and structured replies are on by default', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server)
  t.is(h.getProtocol(), 'newstyle-fixed')
  t.true(h.getStructuredRepliesNegotiated())
})

test('requestStructuredReplies: false keeps simple replies', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server, { requestStructuredReplies: false })
  t.false(h.getStructuredRepliesNegotiated())
  const data = seededBytes(4 * KiB, 3)
  await h.pwrite(data, 0)
  t.deepEqual(await h.pread(data.length, 0), data)
})

test('plain newstyle (nbdkit --mask-handshake=0): getProtocol is newstyle', async (t) => {
  const server = await useNbdkit(t, ['memory', '2M'], { plainNewstyle: true })
  if (!server) return
  const h = await openHandle(t, server)
  t.is(h.state, 'ready')
  t.is(h.getProtocol(), 'newstyle')
  t.false(h.getStructuredRepliesNegotiated())
  t.is(h.getSize(), 2 * MiB)
  const data = seededBytes(8 * KiB, 4)
  await h.pwrite(data, 4 * KiB)
  t.deepEqual(await h.pread(data.length, 4 * KiB), data)
})

test('oldstyle (nbdkit -o): getProtocol is oldstyle', async (t) => {
  const server = await useNbdkit(t, ['memory', '2M'], { oldstyle: true })
  if (!server) return
  const h = await openHandle(t, server)
  t.is(h.state, 'ready')
  t.is(h.getProtocol(), 'oldstyle')
  t.false(h.getStructuredRepliesNegotiated())
  t.is(h.getSize(), 2 * MiB)
  const data = seededBytes(8 * KiB, 5)
  await h.pwrite(data, 12 * KiB)
  t.deepEqual(await h.pread(data.length, 12 * KiB), data)
})

test('handshakeFlags without FIXED_NEWSTYLE makes the client speak plain newstyle', async (t) => {
  // As libnbd: the flags the client sends are the server's masked by handshakeFlags, and the
  // protocol reported follows them.
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server, { handshakeFlags: HANDSHAKE_FLAG_NO_ZEROES })
  t.is(h.state, 'ready')
  t.is(h.getProtocol(), 'newstyle')
  t.false(h.getStructuredRepliesNegotiated())
  t.is(h.getSize(), MiB)
})

// ---- embedded server ------------------------------------------------------------------------

test('the embedded server is reached over Unix, TCP and a socketpair (NBD_OPT_EXPORT_NAME fallback)', async (t) => {
  const dir = useTempDir(t)
  const server = useEmbedded(t, { size: 2 * MiB, exportName: 'embedded' })
  const socket = `${dir}/embedded.sock`
  await server.listenUnix(socket)
  const port = await server.listenTcp()
  t.is(typeof port, 'number')

  const viaUnix = new Handle({ exportName: 'embedded' })
  const viaTcp = new Handle({ exportName: 'embedded' })
  const viaPair = new Handle({ exportName: 'embedded' })
  t.teardown(() => Promise.all([viaUnix.close(), viaTcp.close(), viaPair.close()]))
  await viaUnix.connectUnix(socket)
  await viaTcp.connectTcp('127.0.0.1', port)
  await viaPair.connectSocket(server.socketpair())
  for (const h of [viaUnix, viaTcp, viaPair]) {
    // The server refuses NBD_OPT_GO, so ready here means the client fell back to EXPORT_NAME.
    t.is(h.state, 'ready')
    t.is(h.getProtocol(), 'newstyle-fixed')
    t.is(h.getSize(), 2 * MiB)
  }
  t.true(server.connectionsServed >= 3)
  // All three see the same memory.
  const data = seededBytes(4 * KiB, 6)
  await viaUnix.pwrite(data, 0)
  t.deepEqual(await viaTcp.pread(data.length, 0), data)
  t.deepEqual(await viaPair.pread(data.length, 0), data)
  t.deepEqual(server.read(0, data.length), data)
})

test('the embedded server refuses an unknown export name; the connect fails', async (t) => {
  const server = useEmbedded(t, { size: MiB, exportName: 'embedded' })
  const h = new Handle({ exportName: 'some-other-name' })
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectSocket(server.socketpair()), ANY_CODE, 'connectSocket')
  t.not(h.state, 'ready')
})

// ---- export selection and connect failures --------------------------------------------------

test('exportName selects the qemu-nbd export; a wrong name fails with an NbdError', async (t) => {
  const server = await useQemuNbd(t, { exportName: 'wanted', size: MiB })
  if (!server) return
  const good = await openHandle(t, server, { exportName: 'wanted' })
  t.is(good.state, 'ready')
  t.is(good.getSize(), MiB)

  const bad = new Handle({ exportName: 'nope-not-here' })
  t.teardown(() => bad.close())
  const err = await expectReject(t, () => bad.connectUnix(server.socket!), ANY_CODE, 'connectUnix')
  t.regex(err?.message ?? '', /nope-not-here/, 'the message should name the missing export')
  t.not(bad.state, 'ready')
})

test('a wrong export name on nbd-server fails with an NbdError', async (t) => {
  const server = await useNbdServer(t, { exportName: 'disk', size: MiB })
  if (!server) return
  const bad = new Handle({ exportName: 'nope-not-here' })
  t.teardown(() => bad.close())
  await expectReject(t, () => bad.connectUnix(server.socket!), ANY_CODE, 'connectUnix')
  t.not(bad.state, 'ready')
})

test('connectUnix to a missing socket rejects with ENOENT', async (t) => {
  const dir = useTempDir(t)
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectUnix(`${dir}/missing.sock`), 'ENOENT', 'connectUnix')
})

test('connectTcp to a closed port rejects with ECONNREFUSED', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'], { tcp: true })
  if (!server) return
  const port = server.port!
  await server.stop()
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectTcp('127.0.0.1', port), 'ECONNREFUSED', 'connectTcp')
})

test('connectSocket after a failed connect is refused by state, not retried', async (t) => {
  const dir = useTempDir(t)
  const server = useEmbedded(t, { size: MiB })
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectUnix(`${dir}/missing.sock`), 'ENOENT', 'connectUnix')
  // As libnbd: a failed connect leaves the handle dead, and connect* needs a new handle.
  t.is(h.state, 'dead')
  const fd = server.socketpair()
  const target = fdTarget(fd)
  await expectReject(t, () => h.connectSocket(fd), 'EINVAL', 'connectSocket')
  t.is(fdTarget(fd), target)
  const other = new Handle()
  t.teardown(() => other.close())
  await other.connectSocket(fd)
  t.is(other.state, 'ready')
})

// ---- connect calls take the handle when they are called ----

test('of two connect calls made together the first wins; the handle is connecting when the call returns', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  for (let i = 0; i < 10; i++) {
    const h = new Handle()
    t.teardown(() => h.close())
    const first = h.connectUri(`nbd+unix:///first?socket=${server.socket}`)
    // Before the fix the state moved on a tokio thread: 'created' here about a third of the time.
    t.not(h.state, 'created')
    await expectReject(t, () => h.connectUri(`nbd+unix:///second?socket=${server.socket}`), 'EINVAL', 'connectUri')
    t.throws(() => h.setExportName('third'), { code: 'EINVAL' })
    await first
    t.is(h.getExportName(), 'first')
    await h.close()
  }
})

test('connectSocket that cannot duplicate the fd (no descriptors left) still keeps it until close()', async (t) => {
  // A child with a low descriptor limit fills it, then connects: the handle must fail (EMFILE)
  // and, as the contract says, close the fd only when it is closed itself.
  const script = `
    const fs = require('node:fs')
    const { Handle } = require('nbd-client')
    const { EmbeddedServer } = require('nbd-client/testing')
    const isOpen = (fd) => { try { fs.fstatSync(fd); return true } catch { return false } }
    const server = new EmbeddedServer({ size: 1 << 20 })
    const fd = server.socketpair()
    const h = new Handle()
    const fillers = []
    try { for (;;) fillers.push(fs.openSync('/dev/null', 'r')) } catch {}
    h.connectSocket(fd).then(() => 'connected', (e) => e.code).then(async (outcome) => {
      const openBeforeClose = isOpen(fd)
      for (const f of fillers) fs.closeSync(f)
      await h.close()
      console.log(JSON.stringify({ outcome, filled: fillers.length, openBeforeClose, openAfterClose: isOpen(fd) }))
      server.close()
    })`
  const res = spawnSync('bash', ['-c', 'ulimit -n 200 && exec "$0" -e "$1"', process.execPath, script], {
    encoding: 'utf8',
    timeout: 60_000,
  })
  t.is(res.status, 0, res.stderr)
  const r = JSON.parse(res.stdout.trim().split('\n').pop() ?? '{}')
  t.true(r.filled > 0)
  t.is(r.outcome, 'EMFILE')
  t.true(r.openBeforeClose, 'the fd was closed before the handle was')
  t.false(r.openAfterClose, 'close() did not close the fd')
})
