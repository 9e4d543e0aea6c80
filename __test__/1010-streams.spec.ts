// Streams over an export (streams.ts): createReadStream and createWriteStream piped to and from
// files, hashes and zlib, checked byte for byte against nbdkit's pattern and against what
// libnbd's nbdcopy reads and writes; ranges (inclusive end, unaligned, bigint), the server's
// block size limits, backpressure, abort, errors in the middle of a stream, past the end, and
// flush on finish.
import test, { type ExecutionContext } from 'ava'
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import zlib from 'node:zlib'
import { waitFor } from './helpers/fds'
import { Handle, NbdError } from 'nbd-client'
import { CROSSCHECK_TOOLS, crossReadAll, crossWritePrefix } from './helpers/crosscheck'
import { assertNbdError, expectThrow, openHandle, patternBytes, seededBytes, KiB, MiB } from './helpers/nbd'
import { makeTempDir, requireTool, useNbdkit, useQemuNbd } from './helpers/servers'

function tempDir(t: ExecutionContext): string {
  const dir = makeTempDir('nbd-streams-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

function sha256(data: Uint8Array): string {
  return crypto.createHash('sha256').update(data).digest('hex')
}

async function collect(stream: Readable): Promise<Buffer> {
  const parts: Buffer[] = []
  for await (const chunk of stream) parts.push(chunk as Buffer)
  return Buffer.concat(parts)
}

/** Waits for `stream` to fail and returns its error (fails the test if it ends instead). */
function streamError(t: ExecutionContext, stream: Readable | Writable): Promise<Error | undefined> {
  return new Promise((resolve) => {
    stream.once('error', resolve)
    stream.once('end', () => {
      t.fail('the stream ended instead of failing')
      resolve(undefined)
    })
    stream.once('finish', () => {
      t.fail('the stream finished instead of failing')
      resolve(undefined)
    })
  })
}

/** Debug messages arrive a little after the commands complete: give them time. */
function debugSettled(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 100))
}

/** Commands the handle sent, from its debug messages: `{ kind, offset, count }`. */
function recordCommands(h: Handle): { kind: string; offset: bigint; count: number }[] {
  const sent: { kind: string; offset: bigint; count: number }[] = []
  h.setDebug((_context, message) => {
    const m = /sending NBD_CMD_(\w+) cookie \d+ offset (\d+) count (\d+)/.exec(message)
    if (m) sent.push({ kind: m[1]!, offset: BigInt(m[2]!), count: Number(m[3]) })
  })
  return sent
}

test('createReadStream pipes the whole export into a file and a hash, byte for byte as nbdcopy reads it (nbdkit pattern)', async (t) => {
  if (!requireTool(t, ...CROSSCHECK_TOOLS)) return
  const size = 8 * MiB + 4 * KiB + 16
  const server = await useNbdkit(t, ['pattern', String(size)])
  if (!server) return
  const h = await openHandle(t, server)
  const file = path.join(tempDir(t), 'out.img')
  const rs = h.createReadStream()
  t.true(rs instanceof Readable)
  await pipeline(rs, fs.createWriteStream(file))
  t.is(rs.bytesRead, size)
  const written = fs.readFileSync(file)
  t.is(written.length, size)
  t.true(written.equals(patternBytes(0, size)), 'file differs from the pattern')
  t.is(sha256(written), sha256(await crossReadAll(server.uri)))

  const hash = crypto.createHash('sha256')
  await pipeline(h.createReadStream({ highWaterMark: 64 * KiB }), hash)
  t.is(hash.digest('hex'), sha256(written))
  t.is(h.inFlight, 0)
})

test('createWriteStream writes a file into the export; nbdcopy reads back the same bytes (qemu-nbd)', async (t) => {
  if (!requireTool(t, ...CROSSCHECK_TOOLS)) return
  const size = 4 * MiB
  const server = await useQemuNbd(t, { size })
  if (!server) return
  const h = await openHandle(t, server)
  const data = seededBytes(size - 1000, 7)
  const file = path.join(tempDir(t), 'in.img')
  fs.writeFileSync(file, data)
  // fs reads in 64 KiB pieces; a small highWaterMark makes the last pieces odd sizes too.
  const ws = h.createWriteStream()
  t.true(ws instanceof Writable)
  await pipeline(fs.createReadStream(file, { highWaterMark: 10_000 }), ws)
  t.is(ws.bytesWritten, data.length)
  const back = await crossReadAll(server.uri)
  t.true(back.subarray(0, data.length).equals(data), 'export differs from the file')
  t.true(back.subarray(data.length).equals(Buffer.alloc(1000)), 'bytes past the stream changed')
})

test('export → gzip → file → gunzip → another export: byte-identical (nbdkit memory)', async (t) => {
  if (!requireTool(t, ...CROSSCHECK_TOOLS)) return
  const size = 3 * MiB
  const src = await useNbdkit(t, ['memory', String(size)])
  const dst = await useNbdkit(t, ['memory', String(size)])
  if (!src || !dst) return
  const data = Buffer.concat([seededBytes(MiB, 3), Buffer.alloc(MiB), seededBytes(MiB, 4)])
  await crossWritePrefix(src.uri, data)
  const a = await openHandle(t, src)
  const b = await openHandle(t, dst)
  const gz = path.join(tempDir(t), 'disk.gz')
  await pipeline(a.createReadStream(), zlib.createGzip(), fs.createWriteStream(gz))
  t.true(fs.statSync(gz).size < 2 * MiB + 64 * KiB, 'the zero MiB should compress')
  const ws = b.createWriteStream()
  await pipeline(fs.createReadStream(gz), zlib.createGunzip(), ws)
  t.is(ws.bytesWritten, size)
  t.is(sha256(await crossReadAll(dst.uri)), sha256(data))
})

test('start and end are inclusive byte positions, at any alignment; bytesRead, start, end, pos', async (t) => {
  const size = 4 * MiB
  const server = await useNbdkit(t, ['pattern', String(size)])
  if (!server) return
  const h = await openHandle(t, server)
  const cases: [number, number, number | undefined][] = [
    [0, 0, undefined], [0, 15, undefined], [1, 1, undefined], [7, 8, 3], [4095, 4096, 1000],
    [100_003, 100_003 + 600_001, 65_536], [size - 17, size - 1, undefined], [size - 1, size - 1, 1],
    [3, size - 2, 100_000],
  ]
  for (const [start, end, highWaterMark] of cases) {
    const rs = h.createReadStream({ start, end, highWaterMark })
    const got = await collect(rs)
    t.true(got.equals(patternBytes(start, end - start + 1)), `createReadStream({ start: ${start}, end: ${end} })`)
    t.is(rs.bytesRead, end - start + 1)
    t.is(rs.start, start)
    t.is(rs.end, end)
    t.is(rs.pos, end + 1)
  }
  // Without an end: to the export's end; a start at the end: an empty stream.
  const tail = h.createReadStream({ start: size - 100 })
  t.true((await collect(tail)).equals(patternBytes(size - 100, 100)))
  t.is(tail.end, size - 1)
  const empty = h.createReadStream({ start: size })
  t.is((await collect(empty)).length, 0)
  t.is(empty.bytesRead, 0)
})

test('reads keep several requests in flight, each at most highWaterMark bytes', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'pattern', String(4 * MiB), 'rdelay=20ms'])
  if (!server) return
  const h = await openHandle(t, server)
  const sent = recordCommands(h)
  let most = 0
  const rs = h.createReadStream({ highWaterMark: 64 * KiB })
  rs.on('data', () => {
    most = Math.max(most, h.inFlight)
  })
  const got = await collect(rs)
  t.true(got.equals(patternBytes(0, 4 * MiB)))
  t.true(most >= 4, `at most ${most} reads were in flight`)
  await debugSettled()
  const reads = sent.filter((c) => c.kind === 'READ')
  t.is(reads.length, 64)
  t.true(reads.every((c) => c.count === 64 * KiB))
})

test('chunks are at most highWaterMark bytes, as fs gives them, also to for await (whose read() joins what is buffered)', async (t) => {
  // A minimum block of 512 bytes: requests of 1000 bytes are widened, an unaligned start too.
  const server = await useNbdkit(t, ['--filter=blocksize-policy', 'pattern', String(2 * MiB), 'blocksize-minimum=512'])
  if (!server) return
  const h = await openHandle(t, server)
  t.is(h.getBlockSize('minimum'), 512)
  for (const [highWaterMark, start] of [[1000, 0], [64 * KiB, 100], [100, 3], [undefined, 777]] as const) {
    const limit = highWaterMark ?? 256 * KiB
    const chunks: Buffer[] = []
    const sent = recordCommands(h)
    let sentAtFirst = 0
    for await (const c of h.createReadStream({ highWaterMark, start, end: MiB - 2 })) {
      if (chunks.length === 0) sentAtFirst = sent.length
      chunks.push(c as Buffer)
    }
    t.true(Buffer.concat(chunks).equals(patternBytes(start, MiB - 1 - start)), `highWaterMark ${limit}, start ${start}`)
    const largest = Math.max(...chunks.map((c) => c.length))
    t.true(largest <= limit, `highWaterMark ${limit}, start ${start}: a chunk of ${largest} bytes`)
    // The read-ahead still runs while the chunks are handed out one at a time: by the first
    // chunk, several reads had been sent.
    t.true(sentAtFirst >= 2, `highWaterMark ${limit}: ${sentAtFirst} reads sent by the first chunk`)
  }
})

test('a paused read stream still fails when its reads do (the handle closed): error and close come at once', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'pattern', String(64 * MiB), 'rdelay=50ms'])
  if (!server) return
  const h = await openHandle(t, server)
  const rs = h.createReadStream({ highWaterMark: 64 * KiB })
  const first = await new Promise<Buffer>((resolve) => rs.once('data', resolve))
  rs.pause()
  t.is(first.length, 64 * KiB)
  t.true(await waitFor(() => h.inFlight > 0, 5000), 'reads ahead in flight while paused')
  const errored = new Promise<unknown>((resolve) => rs.once('error', resolve))
  const closed = new Promise<void>((resolve) => rs.once('close', resolve))
  await h.close()
  const error = await errored
  await closed
  assertNbdError(t, error, 'ENOTCONN')
  t.true(rs.destroyed)
})

test('a read stream destroyed from its data handler starts no more reads', async (t) => {
  const server = await useNbdkit(t, ['pattern', String(16 * MiB)])
  if (!server) return
  const h = await openHandle(t, server)
  const sent = recordCommands(h)
  const rs = h.createReadStream({ highWaterMark: 64 * KiB })
  let chunks = 0
  rs.on('data', () => {
    if (++chunks === 3) rs.destroy()
  })
  await new Promise((resolve) => rs.once('close', resolve))
  await debugSettled()
  const reads = sent.filter((c) => c.kind === 'READ').length
  // The read-ahead at the time of the destroy, and nothing after it.
  t.true(reads <= 3 + 16, `${reads} reads sent`)
  await new Promise((resolve) => setTimeout(resolve, 200))
  await debugSettled()
  t.is(sent.filter((c) => c.kind === 'READ').length, reads)
  t.is(chunks, 3)
})

test('requests follow the server\'s block sizes: aligned to the minimum, within the maximum (blocksize-policy error)', async (t) => {
  const size = 2 * MiB
  const server = await useNbdkit(t, ['--filter=blocksize-policy', 'memory', String(size),
    'blocksize-minimum=4096', 'blocksize-maximum=65536', 'blocksize-error-policy=error'])
  if (!server) return
  const h = await openHandle(t, server)
  t.is(h.getBlockSize('minimum'), 4096)
  const data = seededBytes(size, 11)
  const sent = recordCommands(h)
  // A default request (256 KiB) is too large for this server; 10_000-byte chunks are unaligned.
  await pipeline(Readable.from(function* () {
    for (let i = 0; i < size; i += 10_000) yield data.subarray(i, Math.min(size, i + 10_000))
  }()), h.createWriteStream())
  const got = await collect(h.createReadStream({ start: 4097, end: size - 4000 }))
  t.true(got.equals(data.subarray(4097, size - 3999)), 'unaligned range read back')
  await debugSettled()
  t.true(sent.length > 0)
  for (const c of sent.filter((c) => c.kind === 'READ' || c.kind === 'WRITE')) {
    t.true(c.count <= 65536 && c.count % 4096 === 0 && c.offset % 4096n === 0n, `${c.kind} ${c.offset}+${c.count}`)
  }
  // No read-modify-write: an unaligned start is refused as strict mode refuses the request.
  const err = await t.throwsAsync(pipeline(Readable.from([Buffer.alloc(8192)]), h.createWriteStream({ start: 100 })))
  assertNbdError(t, err, 'EINVAL', 'pwrite')
})

test('an export whose size is not a multiple of its minimum block size: a clear EINVAL, never a hang', async (t) => {
  const server = await useNbdkit(t, ['--filter=blocksize-policy', 'memory', '10000', 'blocksize-minimum=4096'])
  if (!server) return
  const h = await openHandle(t, server)
  for (const options of [{}, { end: 20_000 }, { start: 9000 }]) {
    const err = await t.throwsAsync(collect(h.createReadStream(options)))
    assertNbdError(t, err, 'EINVAL', 'pread')
  }
  t.is((await collect(h.createReadStream({ start: 4096, end: 8191 }))).length, 4096)
})

test('bigint positions past 2^53: start, end and pos stay exact (nbdkit pattern, memory)', async (t) => {
  const huge = 1n << 62n
  const pattern = await useNbdkit(t, ['pattern', String(huge)])
  const memory = await useNbdkit(t, ['memory', String(huge)])
  if (!pattern || !memory) return
  const p = await openHandle(t, pattern)
  const start = (1n << 60n) + 5n
  const rs = p.createReadStream({ start, end: start + 99n })
  t.is(rs.start, start)
  const got = await collect(rs)
  const want = Buffer.alloc(112)
  for (let w = 0; w < 14; w++) want.writeBigUInt64BE((start - 5n) + BigInt(w * 8), w * 8)
  t.true(got.equals(want.subarray(5, 105)), 'pattern bytes at 2^60 + 5')
  t.is(rs.pos, start + 100n)
  t.is(rs.end, start + 99n)

  const m = await openHandle(t, memory)
  const where = (1n << 61n) + 3n
  const data = seededBytes(300 * KiB, 5)
  const ws = m.createWriteStream({ start: where })
  await pipeline(Readable.from([data.subarray(0, 1), data.subarray(1)]), ws)
  t.is(ws.bytesWritten, data.length)
  t.true((await m.pread(data.length, where)).equals(data))
  // The last bytes of a 2^62-byte export, end defaulting to the last byte.
  const tail = m.createReadStream({ start: huge - 10n })
  t.is((await collect(tail)).length, 10)
  t.is(tail.end, huge - 1n)
})

test('backpressure: a paused reader stops the requests; a slow writer holds the writes', async (t) => {
  const server = await useNbdkit(t, ['memory', String(64 * MiB)])
  if (!server) return
  const h = await openHandle(t, server)
  const rs = h.createReadStream({ highWaterMark: 128 * KiB })
  // Seen once under heavy load in the full suite: the handle closed (teardown) while this
  // paused stream still had reads in flight; an error then must fail the test, not the process.
  const errors: unknown[] = []
  rs.on('error', (e) => errors.push(e))
  let received = 0
  rs.on('data', (chunk: Buffer) => {
    received += chunk.length
    if (received >= MiB) rs.pause()
  })
  // Paused once the reads in flight have landed. Waited for rather than slept on: other
  // tests in this process read, hash and compare whole files synchronously, which can hold
  // the event loop up (seen once in CI: 7 reads still in flight after 300 ms).
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.true(await waitFor(() => h.inFlight === 0, 10_000), `${h.inFlight} reads still in flight`)
  const requested = Number(rs.pos)
  // Paused: what was asked for is bounded by the buffer and the reads in flight.
  t.true(requested <= received + 128 * KiB * 18, `requested ${requested}, received ${received}`)
  t.true(requested < 4 * MiB)
  t.is(h.inFlight, 0)
  rs.destroy()
  t.deepEqual(errors, [])

  // Writes: with highWaterMark 1 MiB, write() says false and no more than that is in flight.
  const slow = await useNbdkit(t, ['--filter=delay', 'memory', String(64 * MiB), 'wdelay=30ms'])
  if (!slow) return
  const w = await openHandle(t, slow)
  const ws = w.createWriteStream({ highWaterMark: MiB })
  let most = 0
  const chunk = Buffer.alloc(256 * KiB, 1)
  let refused = 0
  for (let i = 0; i < 32; i++) {
    if (!ws.write(chunk)) {
      refused++
      await new Promise((resolve) => ws.once('drain', resolve))
    }
    most = Math.max(most, w.inFlight)
  }
  ws.end()
  await new Promise((resolve) => ws.once('finish', resolve))
  t.true(refused > 0, 'write() never returned false')
  t.true(most <= 5, `${most} writes in flight`)
  t.is(ws.bytesWritten, 8 * MiB)
})

test('abort: a signal destroys the read stream with an AbortError; the handle stays usable', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'pattern', String(64 * MiB), 'rdelay=10ms'])
  if (!server) return
  const h = await openHandle(t, server)
  const ac = new AbortController()
  const rs = h.createReadStream({ signal: ac.signal })
  let received = 0
  rs.on('data', (chunk: Buffer) => {
    received += chunk.length
    if (received >= MiB) ac.abort()
  })
  const err = (await streamError(t, rs)) as Error & { code?: string }
  t.is(err?.name, 'AbortError')
  t.is(err?.code, 'ABORT_ERR')
  t.true(rs.destroyed)
  t.true(rs.bytesRead < 64 * MiB)
  t.true((await h.pread(16, 8)).equals(patternBytes(8, 16)))
  // Already aborted: the stream fails without a read.
  const sent = recordCommands(h)
  const dead = h.createReadStream({ signal: AbortSignal.abort() })
  t.is((await streamError(t, dead))?.name, 'AbortError')
  await debugSettled()
  t.is(sent.filter((c) => c.kind === 'READ').length, 0)
  // pipeline reports the abort too.
  const ac2 = new AbortController()
  setTimeout(() => ac2.abort(), 50)
  const e2 = await t.throwsAsync(pipeline(h.createReadStream({ signal: ac2.signal }), crypto.createHash('md5')))
  t.is(e2?.name, 'AbortError')
})

test('abort: a signal destroys the write stream; no flush is sent', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'memory', String(64 * MiB), 'wdelay=20ms'])
  if (!server) return
  const h = await openHandle(t, server)
  const sent = recordCommands(h)
  const ac = new AbortController()
  const ws = h.createWriteStream({ signal: ac.signal })
  const source = Readable.from(function* () {
    for (let i = 0; i < 256; i++) yield Buffer.alloc(256 * KiB, i)
  }())
  setTimeout(() => ac.abort(), 100)
  const err = await t.throwsAsync(pipeline(source, ws))
  t.is(err?.name, 'AbortError')
  t.true(ws.destroyed)
  t.true(ws.bytesWritten < 64 * MiB)
  await debugSettled()
  t.is(sent.filter((c) => c.kind === 'FLUSH').length, 0)
  await h.pwrite(Buffer.from('still works'), 0)
  t.is((await h.pread(11, 0)).toString(), 'still works')
})

test('an error in the middle of a read stream: the bytes before it, then the server\'s EIO (nbdkit error filter)', async (t) => {
  const dir = tempDir(t)
  const trigger = path.join(dir, 'inject')
  const server = await useNbdkit(t, ['--filter=error', 'pattern', String(32 * MiB),
    'error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`])
  if (!server) return
  const h = await openHandle(t, server)
  const rs = h.createReadStream({ highWaterMark: 64 * KiB })
  const parts: Buffer[] = []
  rs.on('data', (chunk: Buffer) => {
    parts.push(chunk)
    if (parts.length === 4) fs.writeFileSync(trigger, '')
  })
  const err = await streamError(t, rs)
  assertNbdError(t, err, 'EIO', 'pread')
  const got = Buffer.concat(parts)
  t.true(got.length >= 4 * 64 * KiB && got.length < 32 * MiB, `${got.length} bytes before the error`)
  t.is(rs.bytesRead, got.length)
  t.true(got.equals(patternBytes(0, got.length)), 'the bytes before the error are right')
  // pipeline rejects with the same error, and the handle is still usable.
  const e2 = await t.throwsAsync(pipeline(h.createReadStream(), crypto.createHash('md5')))
  assertNbdError(t, e2, 'EIO', 'pread')
  fs.rmSync(trigger)
  t.true((await h.pread(8, 8)).equals(patternBytes(8, 8)))
})

test('an error in the middle of a write stream fails it with the server\'s error (nbdkit error filter, ENOSPC)', async (t) => {
  const dir = tempDir(t)
  const trigger = path.join(dir, 'inject')
  const server = await useNbdkit(t, ['--filter=error', 'memory', String(32 * MiB),
    'error-pwrite=ENOSPC', 'error-pwrite-rate=100%', `error-pwrite-file=${trigger}`])
  if (!server) return
  const h = await openHandle(t, server)
  let n = 0
  const source = Readable.from(function* () {
    for (; n < 128; n++) {
      if (n === 8) fs.writeFileSync(trigger, '')
      yield Buffer.alloc(256 * KiB, n)
    }
  }())
  const ws = h.createWriteStream()
  const err = await t.throwsAsync(pipeline(source, ws))
  assertNbdError(t, err, 'ENOSPC', 'pwrite')
  t.true(ws.destroyed)
  t.true(n < 128, 'the source was not drained to its end')
})

test('past the end: a read stream ends at the export\'s end (as fs at the end of a file); a write stream fails with pwrite\'s code', async (t) => {
  const size = MiB
  const server = await useNbdkit(t, ['memory', String(size)])
  if (!server) return
  const h = await openHandle(t, server)
  await h.pwrite(seededBytes(size, 9), 0)
  const rs = h.createReadStream({ start: size - 1000, end: size + 5000 })
  t.true((await collect(rs)).equals(seededBytes(size, 9).subarray(size - 1000)))
  t.is(rs.bytesRead, 1000)
  t.is(rs.end, size + 5000, 'end stays as given, as fs.ReadStream keeps it')
  t.is((await collect(h.createReadStream({ start: size + 10, end: size + 20 }))).length, 0)

  const ws = h.createWriteStream({ start: size - 10 })
  const err = await t.throwsAsync(pipeline(Readable.from([Buffer.alloc(20, 7)]), ws))
  // libnbd's STRICT_BOUNDS code for a write past the end.
  assertNbdError(t, err, 'ENOSPC', 'pwrite')
  t.is(ws.bytesWritten, 0)
  // A read-only export refuses the first write as libnbd does.
  const ro = await useNbdkit(t, ['memory', String(size)], { readOnly: true })
  if (!ro) return
  const r = await openHandle(t, ro)
  const e2 = await t.throwsAsync(pipeline(Readable.from([Buffer.alloc(4096)]), r.createWriteStream()))
  assertNbdError(t, e2, 'EPERM', 'pwrite')
})

test('flush on finish by default, not with flush: false; finish comes after the server acknowledged every write', async (t) => {
  const server = await useNbdkit(t, ['memory', String(4 * MiB)])
  if (!server) return
  const h = await openHandle(t, server)
  t.true(h.canFlush())
  const sent = recordCommands(h)
  const ws = h.createWriteStream({ start: 512 })
  await pipeline(Readable.from([Buffer.alloc(MiB, 1), Buffer.alloc(77, 2)]), ws)
  t.is(ws.bytesWritten, MiB + 77)
  t.is(h.inFlight, 0)
  await debugSettled()
  const kinds = sent.map((c) => c.kind)
  t.is(kinds.filter((k) => k === 'FLUSH').length, 1)
  t.is(kinds[kinds.length - 1], 'FLUSH', 'the flush comes after every write')
  sent.length = 0
  await pipeline(Readable.from([Buffer.alloc(4096, 3)]), h.createWriteStream({ flush: false }))
  await debugSettled()
  t.deepEqual(sent.map((c) => c.kind), ['WRITE'])
  // The written bytes are there.
  t.true((await h.pread(77, 512 + MiB)).equals(Buffer.alloc(77, 2)))
  t.true((await h.pread(4096, 0)).equals(Buffer.alloc(4096, 3)))
})

test('bad options throw an NbdError at once; a handle that is not connected fails the stream', async (t) => {
  const h = new Handle()
  t.teardown(() => h.close())
  expectThrow(t, () => h.createReadStream({ start: 10, end: 5 }), 'ERANGE', 'createReadStream')
  expectThrow(t, () => h.createReadStream({ start: -1 }), 'EINVAL', 'createReadStream')
  expectThrow(t, () => h.createReadStream({ start: 1.5 }), 'EINVAL', 'createReadStream')
  expectThrow(t, () => h.createReadStream({ end: '5' as unknown as number }), 'EINVAL', 'createReadStream')
  expectThrow(t, () => h.createReadStream({ highWaterMark: 0 }), 'EINVAL', 'createReadStream')
  expectThrow(t, () => h.createReadStream({ signal: {} as AbortSignal }), 'EINVAL', 'createReadStream')
  expectThrow(t, () => h.createReadStream(null as unknown as undefined), 'EINVAL', 'createReadStream')
  expectThrow(t, () => h.createWriteStream({ start: 2n ** 64n }), 'EINVAL', 'createWriteStream')
  expectThrow(t, () => h.createWriteStream({ flush: 1 as unknown as boolean }), 'EINVAL', 'createWriteStream')
  expectThrow(t, () => h.createWriteStream({ highWaterMark: -5 }), 'EINVAL', 'createWriteStream')

  const rs = h.createReadStream()
  const err = await streamError(t, rs)
  t.true(err instanceof NbdError)
  assertNbdError(t, err, 'ENOTCONN')
  const ws = h.createWriteStream()
  assertNbdError(t, await streamError(t, ws), 'ENOTCONN')
})

test('a write stream calls back only once the caller may reuse its chunk (large chunks go from its memory)', async (t) => {
  // Writes take 300 ms each: a callback that came before the request was sent would let the
  // caller's refill reach the server (the bug: the export held the refilled bytes).
  const server = await useNbdkit(t, ['--filter=delay', 'memory', String(8 * MiB), 'delay-write=300ms'])
  if (!server) return
  const h = await openHandle(t, server)
  for (const size of [2 * MiB, 256 * KiB, 1000]) {
    const buf = Buffer.alloc(size, 0xaa)
    const ws = h.createWriteStream({ flush: false })
    await new Promise<void>((resolve, reject) => {
      ws.on('error', reject)
      ws.write(buf, () => {
        buf.fill(0x55)
        ws.end()
      })
      ws.on('finish', resolve)
    })
    const back = await h.pread(size, 0)
    t.true(back.equals(Buffer.alloc(size, 0xaa)), `${size}: the server got the refilled bytes`)
  }
})

test('createReadStream takes end: Infinity as fs does (to the end)', async (t) => {
  const server = await useNbdkit(t, ['memory', String(MiB)])
  if (!server) return
  const h = await openHandle(t, server)
  await h.pwrite(seededBytes(MiB, 3), 0)
  const rs = h.createReadStream({ start: MiB - 4096, end: Number.POSITIVE_INFINITY })
  t.true((await collect(rs)).equals(seededBytes(MiB, 3).subarray(MiB - 4096)))
})
