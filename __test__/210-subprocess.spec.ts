// Subprocess servers: connectCommand (server on stdin/stdout) and connectSystemdSocketActivation
// with nbdkit and qemu-nbd; the child is ended and reaped on close and on garbage collection;
// a child that fails to start has its stderr in the error.
import fs from 'node:fs'
import path from 'node:path'
import { spawnSync } from 'node:child_process'
import test from 'ava'
import { Handle } from 'nbd-client'
import { waitFor } from './helpers/fds'
import { expectReject, seededBytes, KiB, MiB } from './helpers/nbd'
import { makeTempDir, requireTool } from './helpers/servers'

/** True while `pid` exists and is not a zombie. */
function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
    return !/^\d+ \(.*\) Z/.test(stat)
  } catch {
    return false
  }
}

/** True while `pid` exists at all (a zombie included). */
function exists(pid: number): boolean {
  return fs.existsSync(`/proc/${pid}`)
}

test('connectCommand runs nbdkit -s; close ends and reaps it', async (t) => {
  if (!requireTool(t, 'nbdkit')) return
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectCommand(['nbdkit', '-s', '--exit-with-parent', 'memory', '4M'])
  t.is(h.state, 'ready')
  t.is(h.getSize(), 4 * MiB)
  const pid = h.subprocessPid
  t.true(typeof pid === 'number' && alive(pid))
  const data = seededBytes(64 * KiB, 11)
  await h.pwrite(data, 1 * MiB)
  t.deepEqual(await h.pread(64 * KiB, 1 * MiB), data)
  await h.close()
  t.true(await waitFor(() => !exists(pid!), 5000), `nbdkit ${pid} is gone and reaped after close`)
})

test('connectSystemdSocketActivation with qemu-nbd and with nbdkit', async (t) => {
  if (!requireTool(t, 'qemu-nbd', 'qemu-img', 'nbdkit')) return
  const dir = makeTempDir()
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const image = path.join(dir, 'disk.qcow2')
  spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '2M'])
  const q = new Handle()
  t.teardown(() => q.close())
  await q.connectSystemdSocketActivation(['qemu-nbd', '-f', 'qcow2', image])
  t.is(q.getSize(), 2 * MiB)
  await q.pwrite(seededBytes(4 * KiB, 2), 0)
  t.deepEqual(await q.pread(4 * KiB, 0), seededBytes(4 * KiB, 2))
  const qpid = q.subprocessPid!
  await q.close()
  t.true(await waitFor(() => !exists(qpid), 5000), 'qemu-nbd is gone after close')

  const k = new Handle()
  t.teardown(() => k.close())
  await k.connectSystemdSocketActivation(['nbdkit', 'memory', '1M'])
  t.is(k.getSize(), 1 * MiB)
  const kpid = k.subprocessPid!
  await k.close()
  t.true(await waitFor(() => !exists(kpid), 5000), 'nbdkit is gone after close')
})

test('a handle that is never closed: garbage collection ends and reaps its server', async (t) => {
  if (!requireTool(t, 'nbdkit')) return
  let pid = 0
  await (async () => {
    const h = new Handle()
    await h.connectCommand(['nbdkit', '-s', '--exit-with-parent', 'memory', '1M'])
    pid = h.subprocessPid!
    await h.pread(512, 0)
  })()
  t.true(alive(pid))
  const gc = (globalThis as { gc?: () => void }).gc
  if (!gc) return t.fail('run with --expose-gc')
  const gone = await waitFor(() => {
    gc()
    return !exists(pid)
  }, 10_000, 100)
  t.true(gone, `server ${pid} ended after the handle was collected`)
})

test('a server that fails to start: the error quotes its stderr and exit status', async (t) => {
  if (!requireTool(t, 'nbdkit')) return
  const h = new Handle()
  t.teardown(() => h.close())
  const err = await expectReject(t, () => h.connectCommand(['nbdkit', '-s', 'no-such-plugin-xyz']), ['ECONNRESET', 'EPIPE'], 'connectCommand')
  t.regex(err?.message ?? '', /no-such-plugin-xyz/, 'the server\'s own message is there')
  t.regex(err?.message ?? '', /exit/i)
  t.is(h.state, 'dead')
})

test('a program that does not exist, and bad argv', async (t) => {
  const h = new Handle()
  t.teardown(() => h.close())
  await expectReject(t, () => h.connectCommand(['/nonexistent/server']), 'ENOENT', 'connectCommand')
  t.is(h.state, 'dead')
  await expectReject(t, () => new Handle().connectCommand([]), 'EINVAL', 'connectCommand')
  await expectReject(t, () => new Handle().connectCommand(['nbdkit', 3 as unknown as string]), 'EINVAL', 'connectCommand')
  await expectReject(t, () => new Handle().connectCommand('nbdkit' as unknown as string[]), 'EINVAL', 'connectCommand')
  await expectReject(t, () => new Handle().connectSystemdSocketActivation(['bad\0name']), 'EINVAL', 'connectSystemdSocketActivation')
})

test('a server that ignores end of file and SIGTERM is still killed and reaped', async (t) => {
  if (!requireTool(t, 'sh')) return
  const h = new Handle({ connectTimeout: 300 })
  t.teardown(() => h.close())
  // Never answers the handshake; ignores TERM.
  await expectReject(t, () => h.connectCommand(['sh', '-c', 'trap "" TERM; exec sleep 1000 < /dev/null']), 'ETIMEDOUT', 'connectCommand')
  const pid = h.subprocessPid!
  t.true(exists(pid))
  await h.close()
  t.true(await waitFor(() => !exists(pid), 10_000, 100), 'killed with SIGKILL in the end, and reaped')
})
