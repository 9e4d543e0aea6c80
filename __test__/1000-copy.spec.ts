// copy(): byte-identical to nbdcopy in every endpoint combination (NBD URI, Handle with and
// without a URI, file, null:, Readable, Writable) on nbdkit, qemu-nbd (qcow2 with holes and a
// dirty bitmap) and nbd-server; sparse results (a file's allocated blocks, `nbdinfo --map` of
// an NBD destination) equal nbdcopy's on the same source; allocated, destinationIsZero, sparse
// false; abort mid-copy (no fd left behind); a failing read names the side and the offset; a
// destination too small or out of space; onProgress at most 10 a second and a final call.
import { spawn, spawnSync } from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { PassThrough, Readable, Writable } from 'node:stream'
import test, { type ExecutionContext } from 'ava'
import { CONTEXT_BASE_ALLOCATION, Handle, NbdError, copy, type CopyProgress } from 'nbd-client'
import { crossReadAll, crossWritePrefix, nbdinfoMap } from './helpers/crosscheck'
import { countOpenFds, connectedSocketFd, waitFor } from './helpers/fds'
import { assertNbdError, openHandle, seededBytes, KiB, MiB } from './helpers/nbd'
import { makeTempDir, requireTool, useNbdkit, useNbdServer, useQemuNbd } from './helpers/servers'

function tempDir(t: ExecutionContext): string {
  const dir = makeTempDir('nbd-copy-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

function nbdcopy(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('nbdcopy', args, { stdio: ['ignore', 'ignore', 'pipe'] })
    let err = ''
    child.stderr.setEncoding('utf8').on('data', (s: string) => (err += s))
    child.once('error', reject)
    child.once('close', (code) => (code === 0 ? resolve() : reject(new Error(`nbdcopy ${args.join(' ')}: ${err}`))))
  })
}

function sha(b: Uint8Array): string {
  return crypto.createHash('sha256').update(b).digest('hex')
}

function fileSha(p: string): string {
  return sha(fs.readFileSync(p))
}

/** A sparse-random source with a known map, served read-only by nbdkit. */
async function sparseSource(t: ExecutionContext, size = '64M') {
  return useNbdkit(t, ['sparse-random', size, 'seed=11', 'percent=25', 'runlength=65536'], { readOnly: true })
}

test('NBD → file: byte-identical to nbdcopy, same allocated blocks, counts add up, flush', async (t) => {
  if (!requireTool(t, 'nbdcopy')) return
  const server = await sparseSource(t)
  if (!server) return
  const dir = tempDir(t)
  const ours = path.join(dir, 'ours.img')
  const theirs = path.join(dir, 'theirs.img')
  const r = await copy(server.uri, ours)
  await nbdcopy([server.uri, theirs])
  t.is(r.engine, 'native')
  t.is(r.bytes, 64 * MiB)
  t.is(r.dataBytes + r.zeroBytes, r.bytes)
  t.true(r.zeroBytes > 0 && r.dataBytes > 0)
  t.is(fileSha(ours), fileSha(theirs))
  t.is(fs.statSync(ours).size, 64 * MiB)
  t.is(fs.statSync(ours).blocks, fs.statSync(theirs).blocks, 'the same allocated blocks as nbdcopy')
  t.true(fs.statSync(ours).blocks * 512 < 64 * MiB, 'holes stay holes')
})

test('an existing larger file is truncated to the source size, a smaller one grown (as nbdcopy)', async (t) => {
  if (!requireTool(t, 'nbdcopy')) return
  const server = await useNbdkit(t, ['pattern', '3M'])
  if (!server) return
  const dir = tempDir(t)
  for (const initial of [8 * MiB, 1 * MiB]) {
    const ours = path.join(dir, `ours-${initial}`)
    const theirs = path.join(dir, `theirs-${initial}`)
    fs.writeFileSync(ours, Buffer.alloc(initial, 0xee))
    fs.writeFileSync(theirs, Buffer.alloc(initial, 0xee))
    await copy(server.uri, ours)
    await nbdcopy([server.uri, theirs])
    t.is(fs.statSync(ours).size, fs.statSync(theirs).size)
    t.is(fileSha(ours), fileSha(theirs))
  }
})

test('NBD → NBD (nbdkit memory): data, and nbdinfo --map of the destination equals nbdcopy’s', async (t) => {
  if (!requireTool(t, 'nbdcopy', 'nbdinfo')) return
  const server = await sparseSource(t)
  const ours = await useNbdkit(t, ['memory', '64M'])
  const theirs = await useNbdkit(t, ['memory', '64M'])
  if (!server || !ours || !theirs) return
  const r = await copy(server.uri, ours.uri)
  await nbdcopy([server.uri, theirs.uri])
  t.is(r.engine, 'native')
  t.is(sha(await crossReadAll(ours.uri)), sha(await crossReadAll(theirs.uri)))
  t.deepEqual(await nbdinfoMap(ours.uri), await nbdinfoMap(theirs.uri))
})

test('allocated, destinationIsZero and sparse: false give nbdcopy’s destination maps', async (t) => {
  if (!requireTool(t, 'nbdcopy', 'nbdinfo')) return
  const server = await sparseSource(t, '16M')
  const pattern = await useNbdkit(t, ['pattern', '16M'], { readOnly: true })
  if (!server || !pattern) return
  const cases: [Parameters<typeof copy>[2], string[]][] = [
    [{ allocated: true }, ['--allocated']],
    [{ destinationIsZero: true }, ['--destination-is-zero']],
    [{ sparse: false }, ['-S', '0']],
    [{ sparse: 65536, requestSize: 1 * MiB }, ['-S', '65536', '--request-size=1048576']],
  ]
  for (const [options, flags] of cases) {
    // Destinations full of data first, so that what zero requests do shows in the map.
    const ours = await useNbdkit(t, ['memory', '16M'])
    const theirs = await useNbdkit(t, ['memory', '16M'])
    if (!ours || !theirs) return
    await copy(pattern.uri, ours.uri)
    await copy(pattern.uri, theirs.uri)
    await copy(server.uri, ours.uri, options)
    await nbdcopy([...flags, server.uri, theirs.uri])
    t.is(sha(await crossReadAll(ours.uri)), sha(await crossReadAll(theirs.uri)), JSON.stringify(options))
    t.deepEqual(await nbdinfoMap(ours.uri), await nbdinfoMap(theirs.uri), JSON.stringify(options))
  }
})

test('qemu-nbd qcow2 (holes, dirty bitmap) → nbd-server → file → qemu-nbd raw → null:, all as nbdcopy', async (t) => {
  if (!requireTool(t, 'nbdcopy', 'qemu-io')) return
  const qcow = await useQemuNbd(t, {
    format: 'qcow2',
    size: 8 * MiB,
    extraArgs: ['-B', 'b0'],
    prepare: (image) => {
      for (const argv of [
        ['qemu-img', 'bitmap', '--add', image, 'b0'],
        ['qemu-io', '-f', 'qcow2', '-c', 'write -P 7 0 64k', '-c', 'write -P 9 3M 1M', '-c', 'write -z 5M 1M', image],
      ]) {
        const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' })
        if (r.status !== 0) throw new Error(`${argv.join(' ')}: ${r.stderr}`)
      }
    },
  })
  const nbdServer = await useNbdServer(t, { size: 8 * MiB })
  const raw = await useQemuNbd(t, { format: 'raw', size: 8 * MiB })
  if (!qcow || !nbdServer || !raw) return
  const want = sha(await crossReadAll(qcow.uri))
  const dir = tempDir(t)
  const file = path.join(dir, 'via.img')
  await copy(qcow.uri, nbdServer.uri)
  t.is(sha(await crossReadAll(nbdServer.uri)), want, 'qemu-nbd → nbd-server')
  await copy(nbdServer.uri, file)
  t.is(fileSha(file), want, 'nbd-server → file')
  const r = await copy(file, raw.uri)
  t.is(r.engine, 'native')
  t.is(sha(await crossReadAll(raw.uri)), want, 'file → qemu-nbd')
  const n = await copy(raw.uri, 'null:')
  t.is(n.bytes, 8 * MiB)
  // And file → file.
  const again = path.join(dir, 'again.img')
  await copy(file, again)
  t.is(fileSha(again), want)
})

test('Handle endpoints: with a URI the native engine, with connectSocket the JavaScript one', async (t) => {
  const server = await sparseSource(t, '8M')
  const dest = await useNbdkit(t, ['memory', '8M'])
  if (!server || !dest) return
  const want = sha(await crossReadAll(server.uri))
  const src = await openHandle(t, server)
  const dir = tempDir(t)
  const a = await copy(src, path.join(dir, 'a.img'))
  t.is(a.engine, 'native')
  t.is(fileSha(path.join(dir, 'a.img')), want)

  const bySocket = new Handle({ metaContexts: [CONTEXT_BASE_ALLOCATION] })
  t.teardown(() => bySocket.close())
  await bySocket.connectSocket(await connectedSocketFd(server))
  const b = await copy(bySocket, path.join(dir, 'b.img'))
  t.is(b.engine, 'javascript')
  t.is(fileSha(path.join(dir, 'b.img')), want)
  t.is(b.zeroBytes + b.dataBytes, 8 * MiB)
  t.true(b.zeroBytes > 0)

  const destBySocket = new Handle()
  t.teardown(() => destBySocket.close())
  await destBySocket.connectSocket(await connectedSocketFd(dest))
  const c = await copy(server.uri, destBySocket, { requests: 8 })
  t.is(c.engine, 'javascript')
  t.is(sha(await crossReadAll(dest.uri)), want)
  t.is(bySocket.state, 'ready', 'a handle passed in stays open')
})

test('a server that serves one client at a time (qemu-nbd --shared=1): a read-only URI source copies over one connection, a connected Handle through itself', async (t) => {
  if (!requireTool(t, 'qemu-io')) return
  const server = await useQemuNbd(t, {
    format: 'raw',
    size: 8 * MiB,
    shared: 1,
    readOnly: true,
    prepare: (image) => {
      const r = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 5 0 1M', '-c', 'write -P 6 5M 512k', image], { encoding: 'utf8' })
      if (r.status !== 0) throw new Error(`qemu-io: ${r.stderr}`)
    },
  })
  if (!server) return
  const want = sha(fs.readFileSync(server.image!))
  const dir = tempDir(t)
  // Read-only without multi-conn still counts as safe for several connections; the server
  // leaves all but the first unanswered. With the default number the copy goes on with one;
  // a number asked for fails, saying why, instead of waiting forever.
  const a = await copy(server.uri, path.join(dir, 'a.img'), { signal: AbortSignal.timeout(20_000) })
  t.is(a.engine, 'native')
  t.is(fileSha(path.join(dir, 'a.img')), want)
  const asked = await t.throwsAsync(copy(server.uri, 'null:', { connections: 2, signal: AbortSignal.timeout(20_000) }))
  assertNbdError(t, asked, 'ETIMEDOUT', 'copy')
  t.regex(asked!.message, /unanswered/)
  // A handle holding the server's only place: the engine's own connection goes unanswered,
  // so the copy goes through the handle.
  const h = await openHandle(t, server)
  const started = Date.now()
  const b = await copy(h, path.join(dir, 'b.img'), { signal: AbortSignal.timeout(20_000) })
  t.is(b.engine, 'javascript')
  t.is(fileSha(path.join(dir, 'b.img')), want)
  t.true(Date.now() - started < 15_000, `${Date.now() - started} ms`)
  t.is(h.state, 'ready', 'a handle passed in stays open')
  t.is(b.dataBytes + b.zeroBytes, 8 * MiB)
})

test('a Readable that gives one large chunk is cut into blocks without copying the chunk again for each', async (t) => {
  // 64 MiB in one chunk, to a file: each block used to be cut off a fresh copy of what was
  // left, some 8 GiB of copying in all (17–21 s); a single pass takes well under a second.
  const data = crypto.randomBytes(64 * MiB)
  const file = path.join(tempDir(t), 'one-chunk.img')
  const started = Date.now()
  const r = await copy(Readable.from([data]), file)
  const ms = Date.now() - started
  t.is(r.bytes, data.length)
  t.true(fs.readFileSync(file).equals(data))
  t.true(ms < 8000, `${ms} ms`)
  // Chunks that straddle blocks: the remainders are carried over in order.
  const parts = [data.subarray(0, 300_000), data.subarray(300_000, 300_001), data.subarray(300_001, 9 * MiB + 5), data.subarray(9 * MiB + 5, 10 * MiB)]
  const r2 = await copy(Readable.from(parts), file)
  t.is(r2.bytes, 10 * MiB)
  t.true(fs.readFileSync(file).equals(data.subarray(0, 10 * MiB)))
})

test('streams: Readable → NBD and file, NBD → Writable (holes as zeroes), in order', async (t) => {
  const server = await sparseSource(t, '8M')
  const dest = await useNbdkit(t, ['memory', '8M'])
  if (!server || !dest) return
  const whole = await crossReadAll(server.uri)
  // NBD → Writable: every byte, in order.
  const chunks: Buffer[] = []
  const sink = new Writable({
    highWaterMark: 1 * MiB,
    write(chunk: Buffer, _enc, cb) {
      chunks.push(chunk)
      setImmediate(cb)
    },
  })
  const r = await copy(server.uri, sink)
  t.is(r.engine, 'javascript')
  t.is(sha(Buffer.concat(chunks)), sha(whole))
  t.true(sink.writableFinished, 'the Writable is ended')
  // Readable (odd chunk sizes) → NBD.
  const pieces: Buffer[] = []
  for (let at = 0; at < whole.length; at += 77777) pieces.push(whole.subarray(at, at + 77777))
  const w = await copy(Readable.from(pieces), dest.uri)
  t.is(w.bytes, whole.length)
  t.is(sha(await crossReadAll(dest.uri)), sha(whole))
  // Readable → file.
  const dir = tempDir(t)
  const pass = new PassThrough()
  pass.end(whole)
  await copy(pass, path.join(dir, 's.img'))
  t.is(fileSha(path.join(dir, 's.img')), sha(whole))
})

test.serial('abort mid-copy stops promptly and leaves no fd or thread behind (both engines)', async (t) => {
  // A server per aborted copy: nbdkit 1.32 can die on an assertion (raw_send_socket:
  // sock >= 0) when a client closes a connection while delayed reads are still being
  // served, and the next connection to it is then refused. Started before counting fds.
  const delayed = ['--filter=delay', 'pattern', '64M', 'rdelay=100ms']
  // The last one is slow enough (about a second) for the copy's threads to be seen.
  const slow = ['--filter=delay', 'pattern', '8M', 'rdelay=20ms']
  const servers = [await useNbdkit(t, delayed), await useNbdkit(t, delayed), await useNbdkit(t, slow)]
  const [forFile, forWritable, plain] = servers
  if (!forFile || !forWritable || !plain) return
  const dir = tempDir(t)
  const before = countOpenFds()
  const cases: [string, string | Writable][] = [
    [forFile.uri, path.join(dir, 'x.img')],
    [forWritable.uri, new Writable({ write: (_c, _e, cb) => cb() })],
  ]
  for (const [uri, dest] of cases) {
    const ac = new AbortController()
    let abortedAt = 0
    const p = copy(uri, dest, { signal: ac.signal, requests: 4 })
    setTimeout(() => {
      abortedAt = Date.now()
      ac.abort()
    }, 300)
    const err = await t.throwsAsync(p)
    t.is(err?.name, 'AbortError', `${typeof dest === 'string' ? 'file' : 'Writable'}: ${err?.stack}`)
    t.is((err as { code?: string }).code, 'ABORT_ERR')
    t.true(abortedAt > 0, 'the copy was still running when aborted')
    t.true(Date.now() - abortedAt < 1500, `rejected ${Date.now() - abortedAt} ms after the abort`)
  }
  t.true(await waitFor(() => countOpenFds() <= before, 3000), `fds: ${before} before, ${countOpenFds()} after`)
  t.true(await waitFor(() => copyThreads() === 0, 3000), `${copyThreads()} nbd-copy threads left after the aborts`)
  const ac = new AbortController()
  ac.abort()
  const early = await t.throwsAsync(copy(plain.uri, 'null:', { signal: ac.signal }))
  t.is(early?.name, 'AbortError')
  // The native engine runs on threads named nbd-copy; they end with the copy.
  const running = copy(plain.uri, 'null:', { connections: 2, requestSize: 64 * KiB, requests: 1 })
  running.catch(() => {})
  t.true(await waitFor(() => copyThreads() > 0, 3000), 'no nbd-copy thread seen while copying')
  t.is((await running).engine, 'native')
  t.true(await waitFor(() => copyThreads() === 0, 3000), `${copyThreads()} nbd-copy threads left`)
})

test.serial('a copy whose extra connections are refused fails naming the side, and leaves no fd or thread behind', async (t) => {
  // nbdkit's limit filter lets two clients in: the copy's planning connection and one of its
  // two per-connection threads; the other thread's connection is refused at NBD_OPT_GO.
  const server = await useNbdkit(t, ['--filter=limit', 'pattern', '8M', 'limit=2'])
  if (!server) return
  const before = countOpenFds()
  const err = await t.throwsAsync(copy(server.uri, 'null:', { connections: 2 }))
  t.true(err instanceof NbdError, String(err))
  // The filter refuses the third client at NBD_OPT_GO, or (when it counts it earlier, as it
  // may under load) closes its socket before the greeting.
  t.regex(err!.message, /^copy: connecting to the source: (server refused NBD_OPT_GO|the server closed the connection)/)
  t.true(await waitFor(() => countOpenFds() <= before, 3000), `fds: ${before} before, ${countOpenFds()} after`)
  t.true(await waitFor(() => copyThreads() === 0, 3000), `${copyThreads()} nbd-copy threads left`)
  // With the one connection the server allows besides, the same copy goes through, once
  // nbdkit has let go of the refused copy's connections (it notices their close on its own
  // time: under load, after the copy has already failed).
  let r
  for (let attempt = 1; ; attempt++) {
    try {
      r = await copy(server.uri, 'null:', { connections: 1 })
      break
    } catch (e) {
      if (attempt === 50) throw e
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  t.is(r.bytes, 8 * MiB)
  // The thread that did connect ends quietly when the copy gives up: run in a process of its
  // own to see its stderr (a panic there once printed "called after complete").
  const dist = path.join(__dirname, '..', 'dist', 'index.js')
  const script = `require(${JSON.stringify(dist)}).copy(${JSON.stringify(server.uri)}, 'null:', { connections: 2 }).then(() => process.exit(3), (e) => { console.log(e.message); process.exit(0) })`
  const child = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 30000 })
  t.is(child.status, 0, child.stderr)
  t.regex(child.stdout, /^copy: connecting to the source: /)
  t.notRegex(child.stderr, /panicked/)
})

/** Threads of this process named nbd-copy (Linux: /proc/self/task). */
function copyThreads(): number {
  let n = 0
  for (const task of fs.readdirSync('/proc/self/task')) {
    try {
      if (fs.readFileSync(`/proc/self/task/${task}/comm`, 'utf8').trim() === 'nbd-copy') n++
    } catch {
      // The thread ended while being listed.
    }
  }
  return n
}

test('a source that fails a read rejects naming the side and the offset', async (t) => {
  // An nbdkit eval plugin that fails every read at or past 1 MiB with EIO.
  const pread = 'if [ $4 -ge 1048576 ]; then echo "EIO bad sector" >&2; exit 1; fi; dd if=/dev/zero bs=1 count=0 2>/dev/null; head -c $3 /dev/zero'
  const dir = tempDir(t)
  for (const dest of [path.join(dir, 'e.img'), 'null:', new Writable({ write: (_c, _e, cb) => cb() })]) {
    // A server per copy: a failed copy closes its connections with reads in flight, which
    // nbdkit 1.32 can die of (raw_send_socket: sock >= 0), refusing the next copy.
    const server = await useNbdkit(t, ['eval', 'get_size=echo 1310720', `pread=${pread}`])
    if (!server) return
    const err = await t.throwsAsync(copy(server.uri, dest, { requestSize: 256 * KiB }))
    assertNbdError(t, err, 'EIO', 'copy')
    t.regex(err!.message, /^copy: reading the source at 1048576: EIO/)
  }
})

test('a destination smaller than the source, read-only, or out of space is refused', async (t) => {
  const server = await useNbdkit(t, ['pattern', '4M'])
  const small = await useNbdkit(t, ['memory', '1M'])
  const ro = await useNbdkit(t, ['memory', '4M'], { readOnly: true })
  const full = await useNbdkit(t, ['--filter=error', 'memory', '4M', 'error-pwrite=ENOSPC', 'error-pwrite-rate=100%', 'error-zero=ENOSPC', 'error-zero-rate=100%'])
  if (!server || !small || !ro || !full) return
  const e1 = await t.throwsAsync(copy(server.uri, small.uri))
  assertNbdError(t, e1, 'ENOSPC', 'copy')
  t.regex(e1!.message, /smaller than the source/)
  const e2 = await t.throwsAsync(copy(server.uri, ro.uri))
  assertNbdError(t, e2, 'EPERM', 'copy')
  const e3 = await t.throwsAsync(copy(server.uri, full.uri))
  assertNbdError(t, e3, 'ENOSPC', 'copy')
  t.regex(e3!.message, /^copy: writing the destination at \d+: ENOSPC/)
  const e4 = await t.throwsAsync(copy(Readable.from([Buffer.alloc(2 * MiB, 1)]), small.uri))
  assertNbdError(t, e4, 'ENOSPC', 'copy')
})

test('onProgress: at most 10 calls a second, and a final one with everything done', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'pattern', '16M', 'rdelay=20ms'])
  if (!server) return
  for (const dest of ['null:', new Writable({ write: (_c, _e, cb) => cb() })]) {
    const calls: { at: number; p: CopyProgress }[] = []
    const started = Date.now()
    const r = await copy(server.uri, dest, { requests: 2, connections: 1, onProgress: (p) => calls.push({ at: Date.now(), p }) })
    const seconds = (Date.now() - started) / 1000
    t.true(calls.length >= 2, `${calls.length} calls`)
    t.true(calls.length <= Math.ceil(seconds * 10) + 1, `${calls.length} calls in ${seconds} s`)
    const last = calls.at(-1)!.p
    t.is(last.bytesDone, r.bytes)
    t.is(last.bytesTotal, r.bytes)
    for (let i = 1; i < calls.length; i++) t.true(calls[i]!.p.bytesDone >= calls[i - 1]!.p.bytesDone)
  }
})

test('bad arguments reject with EINVAL', async (t) => {
  const bad: [unknown, unknown, unknown][] = [
    ['null:', 'null:', undefined],
    [42, 'null:', undefined],
    ['nbd://localhost', {}, undefined],
    ['nbd://localhost', 'null:', { connections: 0 }],
    ['nbd://localhost', 'null:', { sparse: 1000 }],
    ['nbd://localhost', 'null:', { requestSize: -1 }],
    ['nbd://localhost', 'null:', { flush: 'yes' }],
    ['nbd://localhost', 'null:', 'fast'],
  ]
  for (const [s, d, o] of bad) {
    const err = await t.throwsAsync(copy(s as never, d as never, o as never))
    t.true(err instanceof NbdError)
    t.is((err as NbdError).code, 'EINVAL', `${String(s)} → ${String(d)} ${JSON.stringify(o)}`)
  }
  const dir = tempDir(t)
  const missing = await t.throwsAsync(copy(path.join(dir, 'nope.img'), 'null:'))
  assertNbdError(t, missing, 'ENOENT', 'copy')
  await copy(Readable.from([seededBytes(1000, 1)]), path.join(dir, 'small.img'))
  t.is(fs.statSync(path.join(dir, 'small.img')).size, 1000)
})

test('every endpoint combination copies the same bytes', async (t) => {
  const server = await useNbdkit(t, ['sparse-random', '4M', 'seed=5', 'percent=40', 'runlength=32768'], { readOnly: true })
  const dest = await useNbdkit(t, ['memory', '4M'])
  if (!server || !dest) return
  const whole = await crossReadAll(server.uri)
  const want = sha(whole)
  const dir = tempDir(t)
  const srcFile = path.join(dir, 'src.img')
  fs.writeFileSync(srcFile, whole)
  const sources: [string, () => Promise<Parameters<typeof copy>[0]>][] = [
    ['uri', async () => server.uri],
    ['handle (uri)', async () => openHandle(t, server)],
    ['handle (socket)', async () => {
      const h = new Handle({ metaContexts: [CONTEXT_BASE_ALLOCATION] })
      t.teardown(() => h.close())
      await h.connectSocket(await connectedSocketFd(server))
      return h
    }],
    ['file', async () => srcFile],
    ['readable', async () => Readable.from([whole.subarray(0, 1000000), whole.subarray(1000000)])],
  ]
  let written: Buffer[] = []
  const dests: [string, () => Promise<Parameters<typeof copy>[1]>, () => Promise<string>][] = [
    ['uri', async () => dest.uri, async () => sha(await crossReadAll(dest.uri))],
    ['handle (socket)', async () => {
      const h = new Handle()
      t.teardown(() => h.close())
      await h.connectSocket(await connectedSocketFd(dest))
      return h
    }, async () => sha(await crossReadAll(dest.uri))],
    ['file', async () => path.join(dir, 'dst.img'), async () => fileSha(path.join(dir, 'dst.img'))],
    ['null:', async () => 'null:', async () => want],
    ['writable', async () => {
      written = []
      return new Writable({ write: (c: Buffer, _e, cb) => { written.push(c); cb() } })
    }, async () => sha(Buffer.concat(written))],
  ]
  for (const [sname, makeSource] of sources) {
    for (const [dname, makeDest, check] of dests) {
      await crossWritePrefix(dest.uri, Buffer.alloc(4 * MiB, 0xa5))
      fs.writeFileSync(path.join(dir, 'dst.img'), Buffer.alloc(1 * MiB, 0xa5))
      const r = await copy(await makeSource(), await makeDest())
      t.is(r.bytes, 4 * MiB, `${sname} → ${dname}`)
      t.is(await check(), want, `${sname} → ${dname}`)
    }
  }
})

test('a TLS (PSK) Handle as the source: the native engine connects with its URI and key file', async (t) => {
  const dir = tempDir(t)
  const psk = path.join(dir, 'keys.psk')
  fs.writeFileSync(psk, `alice:${crypto.randomBytes(32).toString('hex')}\n`)
  const server = await useNbdkit(t, ['--tls=require', `--tls-psk=${psk}`, 'pattern', '4M'], { readOnly: true })
  if (!server) return
  const h = new Handle({ tls: 'require', tlsPskFile: psk, tlsUsername: 'alice' })
  t.teardown(() => h.close())
  await h.connectUnix(server.socket!)
  t.true(h.getTlsNegotiated())
  t.regex(h.getUri(), /^nbds\+unix:/)
  const r = await copy(h, path.join(dir, 'tls.img'))
  t.is(r.engine, 'native')
  const plain = await h.pread(4 * MiB, 0)
  t.is(fileSha(path.join(dir, 'tls.img')), sha(plain))
})

test('the JavaScript engine: a file that cannot be opened is an NbdError naming the side', async (t) => {
  const dir = tempDir(t)
  const sink = new Writable({ write: (_c, _e, cb) => cb() })
  const e1 = await t.throwsAsync(copy(path.join(dir, 'missing.img'), sink))
  assertNbdError(t, e1, 'ENOENT', 'copy')
  t.regex(e1!.message, /^copy: opening the source .*missing\.img: /)
  const e2 = await t.throwsAsync(copy(Readable.from([Buffer.alloc(10)]), path.join(dir, 'no', 'such', 'dir.img')))
  assertNbdError(t, e2, 'ENOENT', 'copy')
  t.regex(e2!.message, /^copy: opening the destination .*dir\.img: /)
  const e3 = await t.throwsAsync(copy(Readable.from([Buffer.alloc(10)]), `nbd+unix:///?socket=${path.join(dir, 'nobody.sock')}`))
  assertNbdError(t, e3, 'ENOENT', 'copy')
  t.regex(e3!.message, /^copy: connecting to the destination: /)
})

/** The whole export, read by nbdcopy (the independent reader) in requests of 64 KiB. */
function readIn64K(uri: string): Buffer {
  const r = spawnSync('nbdcopy', ['--request-size=65536', uri, '-'], { maxBuffer: 8 * MiB })
  if (r.status !== 0) throw new Error(`nbdcopy: ${r.stderr}`)
  return r.stdout
}

test('the JavaScript engine keeps requests within the servers’ maximum block size, and takes a handle with commands in flight', async (t) => {
  // Requests over 64 KiB fail at the server (blocksize-policy's error policy).
  const strict = ['blocksize-maximum=64K', 'blocksize-preferred=4K', 'blocksize-error-policy=error']
  const server = await useNbdkit(t, ['--filter=blocksize-policy', 'pattern', '4M', ...strict])
  const dest = await useNbdkit(t, ['--filter=blocksize-policy', 'memory', '4M', ...strict])
  if (!server || !dest) return
  const want = sha(readIn64K(server.uri))
  const src = new Handle()
  t.teardown(() => src.close())
  await src.connectSocket(await connectedSocketFd(server))
  t.is(src.getBlockSize('maximum'), 64 * KiB)
  // A read of its own still in flight: the handle is `processing`, and connected.
  const own = src.pread(4096, 0)
  t.is(src.state, 'processing')
  const chunks: Buffer[] = []
  const r = await copy(src, new Writable({ write: (c: Buffer, _e, cb) => (chunks.push(c), cb()) }), { requestSize: 1 * MiB })
  t.is(r.engine, 'javascript')
  t.is(sha(Buffer.concat(chunks)), want)
  t.is((await own).length, 4096)

  const dst = new Handle()
  t.teardown(() => dst.close())
  await dst.connectSocket(await connectedSocketFd(dest))
  const data = seededBytes(4 * MiB, 9)
  const w = await copy(Readable.from([data]), dst, { requestSize: 2 * MiB })
  t.is(w.engine, 'javascript')
  t.is(sha(readIn64K(dest.uri)), sha(data))
})

test('the JavaScript engine into a destination with a large minimum block size and no zero command: zeroes and data runs stay within its limits', async (t) => {
  // 64 KiB minimum and maximum, no NBD_CMD_WRITE_ZEROES: zero runs must be written as data,
  // and no run may be smaller or larger than a block.
  const policy = ['blocksize-minimum=64K', 'blocksize-preferred=64K', 'blocksize-maximum=64K', 'blocksize-error-policy=error']
  const dest = await useNbdkit(t, ['--filter=blocksize-policy', '--filter=nozero', 'memory', '4M', ...policy])
  if (!dest) return
  // Data with zero blocks of 4 KiB (smaller than the destination's minimum) and a long hole.
  const data = seededBytes(4 * MiB, 3)
  data.fill(0, 4096, 8192)
  data.fill(0, MiB, 3 * MiB)
  const dst = new Handle()
  t.teardown(() => dst.close())
  await dst.connectSocket(await connectedSocketFd(dest))
  t.false(dst.canZero())
  // Make the destination dirty first, so that skipped zeroes would show.
  for (let at = 0; at < 4 * MiB; at += 64 * KiB) await dst.pwrite(Buffer.alloc(64 * KiB, 0xee), at)
  const r = await copy(Readable.from([data]), dst, { destinationIsZero: false })
  t.is(r.engine, 'javascript')
  t.is(sha(readIn64K(dest.uri)), sha(data))
})

test('the native engine rounds requestSize down to the servers’ minimum block size', async (t) => {
  // Requests that are not whole 4 KiB blocks fail at the servers (blocksize-policy's error policy).
  const strict = ['blocksize-minimum=4K', 'blocksize-preferred=4K', 'blocksize-maximum=1M', 'blocksize-error-policy=error']
  const source = await useNbdkit(t, ['--filter=blocksize-policy', 'pattern', '1M', ...strict], { readOnly: true })
  const dest = await useNbdkit(t, ['--filter=blocksize-policy', 'memory', '1M', ...strict])
  if (!source || !dest) return
  const dir = tempDir(t)
  const file = path.join(dir, 'f.img')
  for (const [from, to] of [
    [source.uri, 'null:'],
    [source.uri, file],
    [file, dest.uri],
  ] as const) {
    const r = await copy(from, to, { requestSize: 5000 })
    t.is(r.engine, 'native')
    t.is(r.bytes, MiB)
  }
  t.is(fileSha(file), sha(readIn64K(source.uri)))
  t.is(sha(readIn64K(dest.uri)), sha(readIn64K(source.uri)))
  // Block sizes that cannot meet: the source takes at most 4 KiB, the destination at least 64 KiB.
  const small = await useNbdkit(t, ['--filter=blocksize-policy', 'pattern', '1M', 'blocksize-minimum=512', 'blocksize-maximum=4K'], { readOnly: true })
  const large = await useNbdkit(t, ['--filter=blocksize-policy', 'memory', '1M', 'blocksize-minimum=64K', 'blocksize-preferred=64K', 'blocksize-maximum=1M'])
  if (!small || !large) return
  const err = await t.throwsAsync(copy(small.uri, large.uri))
  assertNbdError(t, err, 'EINVAL', 'copy')
  t.regex(err!.message, /block sizes do not fit together/)
})

test('a FIFO as source or destination is refused at once (both engines), never waited on', async (t) => {
  const server = await useNbdkit(t, ['pattern', '1M'])
  if (!server) return
  const dir = tempDir(t)
  const fifo = path.join(dir, 'fifo')
  spawnSync('mkfifo', [fifo])
  t.true(fs.statSync(fifo).isFIFO())
  const cases: [string, () => Promise<unknown>][] = [
    ['native, source', () => copy(fifo, 'null:')],
    ['native, destination', () => copy(server.uri, fifo)],
    ['javascript, source', () => copy(fifo, new Writable({ write: (_c, _e, cb) => cb() }))],
    ['javascript, destination', () => copy(Readable.from([Buffer.alloc(4096)]), fifo)],
  ]
  for (const [what, run] of cases) {
    // Before the fix these never settled (an open(2) waiting for the FIFO's other end).
    const err = await t.throwsAsync(settlesWithin(run(), 60_000, what), undefined, what)
    assertNbdError(t, err, 'EINVAL', 'copy')
    t.regex(err!.message, /neither a regular file nor a block device/, what)
  }
})

/** `p`, or a rejection naming `what` if it has not settled within `ms` (a hang, not slowness). */
function settlesWithin<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms)
  })
  return Promise.race([p, late]).finally(() => clearTimeout(timer))
}

test('a Writable destroyed without an error fails the copy with EPIPE and closes the source', async (t) => {
  // A server per copy: nbdkit 1.32 can die of a copy that fails with reads in flight
  // (raw_send_socket: sock >= 0), refusing the next one.
  const server = await useNbdkit(t, ['pattern', '16M'])
  const second = await useNbdkit(t, ['pattern', '16M'])
  if (!server || !second) return
  const before = countOpenFds()
  let got = 0
  const w: Writable = new Writable({
    highWaterMark: 64 * KiB,
    write(c: Buffer, _e, cb) {
      got += c.length
      // A consumer that goes away, as an HTTP response whose client hung up.
      if (got > 2 * MiB) w.destroy()
      else setImmediate(cb)
    },
  })
  const err = await t.throwsAsync(copy(server.uri, w))
  assertNbdError(t, err, 'EPIPE', 'copy')
  const gone = new Writable({ write: (_c, _e, cb) => cb() })
  gone.destroy()
  const err2 = await t.throwsAsync(copy(second.uri, gone))
  assertNbdError(t, err2, 'EPIPE', 'copy')
  t.true(await waitFor(() => countOpenFds() <= before, 3000), `fds: ${countOpenFds()} now, ${before} before`)
})

test('an onProgress that throws stops the copy, which rejects with what it threw (both engines)', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'pattern', '8M', 'rdelay=200ms'])
  if (!server) return
  for (const dest of ['null:', new Writable({ write: (_c, _e, cb) => cb() })]) {
    let calls = 0
    const boom = new Error('progress went wrong')
    const started = Date.now()
    const err = await t.throwsAsync(
      copy(server.uri, dest, {
        requestSize: 64 * KiB,
        connections: 1,
        requests: 1,
        onProgress: () => {
          calls++
          throw boom
        },
      }),
    )
    t.is(err, boom)
    t.is(calls, 1)
    // 128 reads of 200 ms, one at a time, would take 25 s: it stopped at the first report
    // (natively within half a second; the margin is for emulated platforms).
    t.true(Date.now() - started < 15_000, `took ${Date.now() - started} ms`)
  }
})

test('a stream source that goes idle does not hide a destination that failed', async (t) => {
  const { useFake, CMD } = await import('./helpers/fake-server')
  const server = await useFake(t, { size: 64 * MiB, onCommand: (req) => (req.type === CMD.WRITE ? 'close' : 'default') })
  const src = new PassThrough()
  // One request's worth and more, then nothing: the producer stays open and quiet.
  src.write(Buffer.alloc(MiB, 1))
  // Before the fix it waited for more data forever.
  const err = await t.throwsAsync(settlesWithin(copy(src, `nbd+unix:///?socket=${server.socket}`), 60_000, 'the copy'))
  assertNbdError(t, err, 'ENOTCONN', 'copy')
  t.true(src.destroyed)
})
