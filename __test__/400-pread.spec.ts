// Reads: exact data from nbdkit's pattern plugin, data planted by an independent client
// (nbdcopy) on every real peer, caller buffers, bigint offsets, many commands in flight,
// maxInFlight, AbortSignal, and the byte counters.
import { spawnSync } from 'node:child_process'
import test, { type ExecutionContext } from 'ava'
import { CROSSCHECK_TOOLS, crossReadAll, crossWrite, crossWritePrefix } from './helpers/crosscheck'
import {
  openEmbedded,
  openHandle,
  patternBytes,
  seededBytes,
  useEmbedded,
  KiB,
  MiB,
} from './helpers/nbd'
import { requireTool, sleep, useNbdkit, useNbdServer, useQemuNbd, type Server } from './helpers/servers'
import { waitFor } from './helpers/fds'

const PATTERN_SIZE = 8 * MiB

async function patternHandle(t: ExecutionContext, options = {}, extraArgs: string[] = [], pluginArgs: string[] = []) {
  const server = await useNbdkit(t, ['pattern', String(PATTERN_SIZE), ...pluginArgs], { extraArgs })
  if (!server) return undefined
  return openHandle(t, server, options)
}

test('pread returns what nbdkit pattern serves, at assorted offsets and lengths', async (t) => {
  const h = await patternHandle(t)
  if (!h) return
  t.is(h.getSize(), PATTERN_SIZE)
  const cases: [number, number][] = [
    [0, 8], [0, 512], [1, 7], [7, 9], [8, 1], [4095, 2], [4096, 4096], [65533, 100_003],
    [MiB - 3, 6], [3 * MiB + 5, MiB + 3], [PATTERN_SIZE - 16, 16], [PATTERN_SIZE - 1, 1],
  ]
  for (const [offset, count] of cases) {
    const got = await h.pread(count, offset)
    t.true(Buffer.isBuffer(got), 'pread must return a Buffer')
    t.is(got.length, count)
    t.true(got.equals(patternBytes(offset, count)), `pread(${count}, ${offset}) differs from the pattern`)
  }
})

test('bigint offsets read the same bytes as number offsets', async (t) => {
  const h = await patternHandle(t)
  if (!h) return
  for (const offset of [0, 10, 1024, 5 * MiB + 3]) {
    const viaBigint = await h.pread(64, BigInt(offset))
    t.true(viaBigint.equals(patternBytes(offset, 64)), `pread(64, ${offset}n)`)
  }
  const size = h.getSize({ bigint: true })
  t.is(typeof size, 'bigint')
  t.is(size, BigInt(PATTERN_SIZE))
  t.is(typeof h.getSize(), 'number')
  t.is(typeof h.getSize({ bigint: false }), 'number')
})

test('preadInto fills a subarray of a larger Buffer and nothing around it', async (t) => {
  const h = await patternHandle(t)
  if (!h) return
  const whole = Buffer.alloc(16 * KiB, 0xaa)
  const window = whole.subarray(1000, 1000 + 4096)
  const result = await h.preadInto(window, 8192 + 3)
  t.is(result, undefined)
  t.true(window.equals(patternBytes(8192 + 3, 4096)))
  t.true(whole.subarray(0, 1000).every((b) => b === 0xaa), 'bytes before the window were written')
  t.true(whole.subarray(1000 + 4096).every((b) => b === 0xaa), 'bytes after the window were written')
})

test('preadInto fills a plain Uint8Array and a view with a byteOffset', async (t) => {
  const h = await patternHandle(t)
  if (!h) return
  const plain = new Uint8Array(4096).fill(0x55)
  await h.preadInto(plain, 100)
  t.true(Buffer.from(plain).equals(patternBytes(100, 4096)))

  const backing = new ArrayBuffer(8192)
  new Uint8Array(backing).fill(0x66)
  const view = new Uint8Array(backing, 24, 2048)
  await h.preadInto(view, BigInt(MiB + 8))
  t.true(Buffer.from(view).equals(patternBytes(MiB + 8, 2048)))
  const all = new Uint8Array(backing)
  t.true(all.subarray(0, 24).every((b) => b === 0x66))
  t.true(all.subarray(24 + 2048).every((b) => b === 0x66))
})

test('1000 concurrent preads on one handle each get their own bytes', async (t) => {
  const h = await patternHandle(t)
  if (!h) return
  const requests: [number, number][] = []
  const lengths = seededBytes(2000, 41)
  for (let i = 0; i < 1000; i++) {
    const count = 1 + lengths.readUInt16LE(2 * i) % (16 * KiB)
    const offset = (i * 7919 * 13) % (PATTERN_SIZE - count)
    requests.push([offset, count])
  }
  const results = await Promise.all(requests.map(([offset, count]) => h.pread(count, offset)))
  let wrong = 0
  results.forEach((got, i) => {
    const [offset, count] = requests[i]
    if (got.length !== count || !got.equals(patternBytes(offset, count))) wrong++
  })
  t.is(wrong, 0, `${wrong} of 1000 reads returned the wrong bytes`)
  t.is(h.inFlight, 0)
  t.is(h.state, 'ready')
})

test('maxInFlight 2 still completes 1000 queued preads', async (t) => {
  const h = await patternHandle(t, { maxInFlight: 2 })
  if (!h) return
  const offsets = Array.from({ length: 1000 }, (_, i) => (i * 4099) % (PATTERN_SIZE - 4096))
  const results = await Promise.all(offsets.map((offset) => h.pread(512, offset)))
  t.is(results.filter((got, i) => !got.equals(patternBytes(offsets[i], 512))).length, 0)
  t.is(h.inFlight, 0)
})

test('maxInFlight bounds the requests on the wire (delayed server)', async (t) => {
  // Each read takes 60 ms at the server, which serves many in parallel: with at most 2 on the
  // wire, 12 reads need at least 6 rounds.
  const h = await patternHandle(t, { maxInFlight: 2 }, ['--filter=delay'], ['rdelay=60ms'])
  if (!h) return
  const started = Date.now()
  const results = await Promise.all(Array.from({ length: 12 }, (_, i) => h.pread(64, i * 4096)))
  const elapsed = Date.now() - started
  t.true(results.every((got, i) => got.equals(patternBytes(i * 4096, 64))))
  t.true(elapsed >= 6 * 60 - 20, `12 reads finished in ${elapsed} ms: more than 2 were in flight`)
})

test('inFlight counts commands awaiting replies and returns to 0', async (t) => {
  const h = await patternHandle(t, {}, ['--filter=delay'], ['rdelay=2'])
  if (!h) return
  t.is(h.inFlight, 0)
  let settled = 0
  const reads = Array.from({ length: 4 }, (_, i) => h.pread(512, i * 512).finally(() => settled++))
  await sleep(200)
  t.is(settled, 0, 'reads finished before the server delay')
  t.true(h.inFlight >= 1 && h.inFlight <= 4, `inFlight is ${h.inFlight} with 4 reads pending`)
  await Promise.all(reads)
  t.is(h.inFlight, 0)
})

test('stats count the bytes and chunks received and sent', async (t) => {
  const h = await patternHandle(t)
  if (!h) return
  const before = h.stats
  for (const value of Object.values(before)) t.is(typeof value, 'bigint')
  await h.pread(64 * KiB, 0)
  const after = h.stats
  t.true(after.bytesReceived - before.bytesReceived >= BigInt(64 * KiB), 'bytesReceived did not grow by the payload')
  t.true(after.chunksReceived > before.chunksReceived)
  t.true(after.bytesSent > before.bytesSent, 'the request header was not counted')
  t.true(after.chunksSent > before.chunksSent)
})

test('reads from the embedded server return what the server holds', async (t) => {
  const server = useEmbedded(t, { size: 4 * MiB })
  const data = seededBytes(300 * KiB, 42)
  server.write(MiB + 7, data)
  const h = await openEmbedded(t, server)
  t.deepEqual(await h.pread(data.length, MiB + 7), data)
  // Untouched space reads as zeros.
  t.deepEqual(await h.pread(4096, 3 * MiB), Buffer.alloc(4096))
})

// ---- data planted by an independent client --------------------------------------------------

const CROSS_SIZE = 4 * MiB

const peers: [string, (t: ExecutionContext) => Promise<Server | undefined>][] = [
  ['nbdkit memory', (t) => useNbdkit(t, ['memory', String(CROSS_SIZE)])],
  ['qemu-nbd raw file', (t) => useQemuNbd(t, { format: 'raw', size: CROSS_SIZE })],
  ['nbd-server file', (t) => useNbdServer(t, { size: CROSS_SIZE })],
]

for (const [name, start] of peers) {
  test(`pread returns what nbdcopy wrote (${name})`, async (t) => {
    if (!requireTool(t, ...CROSSCHECK_TOOLS)) return
    const server = await start(t)
    if (!server) return
    const prefix = seededBytes(MiB + 333, 7)
    await crossWritePrefix(server.uri, prefix)
    const patch = seededBytes(200 * KiB + 1, 8)
    await crossWrite(server.uri, 2 * MiB + 4093, patch)

    const h = await openHandle(t, server)
    // The whole export in 256 KiB reads, all issued at once.
    const chunk = 256 * KiB
    const parts = await Promise.all(
      Array.from({ length: CROSS_SIZE / chunk }, (_, i) => h.pread(chunk, i * chunk)),
    )
    const ours = Buffer.concat(parts)
    const theirs = await crossReadAll(server.uri)
    t.is(ours.length, CROSS_SIZE)
    t.true(ours.subarray(0, prefix.length).equals(prefix), 'prefix written by nbdcopy differs')
    t.true(ours.subarray(2 * MiB + 4093, 2 * MiB + 4093 + patch.length).equals(patch), 'patch differs')
    t.true(ours.equals(theirs), 'our view of the export differs from nbdcopy\'s')
  })
}

// ---- AbortSignal and close with reads pending -----------------------------------------------

function isAbortError(err: unknown): boolean {
  const e = err as { name?: string; code?: string }
  return e?.name === 'AbortError' && e?.code === 'ABORT_ERR'
}

test('an already aborted signal rejects pread with AbortError and sends nothing', async (t) => {
  const h = await patternHandle(t)
  if (!h) return
  const before = h.stats.bytesSent
  const p = h.pread(512, 0, { signal: AbortSignal.abort() })
  t.true(p instanceof Promise)
  const err = await p.then(() => undefined, (e: unknown) => e)
  t.true(isAbortError(err), `expected AbortError, got ${String(err)}`)
  t.is(h.stats.bytesSent, before)
  t.is(h.state, 'ready')
})

test('aborting a pending preadInto rejects it at once and the buffer is not written afterwards', async (t) => {
  const h = await patternHandle(t, {}, ['--filter=delay'], ['rdelay=1500ms'])
  if (!h) return
  const buf = Buffer.alloc(4096, 0xaa)
  const controller = new AbortController()
  const pending = h.preadInto(buf, 64 * KiB, { signal: controller.signal })
  await sleep(50)
  const abortedAt = Date.now()
  controller.abort()
  const err = await pending.then(() => undefined, (e: unknown) => e)
  t.true(isAbortError(err), `expected AbortError, got ${String(err)}`)
  t.true(Date.now() - abortedAt < 1000, 'the abort waited for the server')
  const snapshot = Buffer.from(buf)
  // The server's reply arrives during this wait; it must not land in buf.
  await sleep(1800)
  t.true(buf.equals(snapshot), 'buf was written after the call was aborted')
  t.false(buf.equals(patternBytes(64 * KiB, 4096)))
  // The late reply is discarded and the handle stays usable (under emulation the reply may
  // come later than the wait above).
  t.true(await waitFor(() => h.state === 'ready', 10_000), `state is ${h.state}`)
  t.true((await h.pread(64, 8)).equals(patternBytes(8, 64)))
})

test('closing the handle with a preadInto pending rejects it and the buffer is not written afterwards', async (t) => {
  const h = await patternHandle(t, {}, ['--filter=delay'], ['rdelay=1500ms'])
  if (!h) return
  const buf = Buffer.alloc(4096, 0xaa)
  let outcome: unknown
  const pending = h.preadInto(buf, 64 * KiB).then(() => 'resolved', (e: unknown) => e)
  void pending.then((o) => {
    outcome = o
  })
  await sleep(50)
  t.is(outcome, undefined, 'the read settled before close() was called')
  await h.close()
  t.not(await pending, 'resolved', 'the read resolved although the handle was closed first')
  const snapshot = Buffer.from(buf)
  // The server's reply would arrive during this wait.
  await sleep(1800)
  t.true(buf.equals(snapshot), 'buf was written after close')
})

// Loading the addon sets glibc malloc's thresholds (crates/nbd-napi/src/alloc.rs) so that
// the memory of large read Buffers, once the collector frees it, is reused rather than given
// back and faulted in again. Seen from outside: 12 MiB of 1 MiB Buffers freed by a collection
// stay in the process (under the 64 MiB trim threshold; without the tuning each is a mapping
// of its own, unmapped when freed), and NBD_CLIENT_MALLOC=default leaves glibc as it was.
test('loading the addon keeps freed read-sized memory for reuse on glibc, unless NBD_CLIENT_MALLOC=default', (t) => {
  const report = process.report.getReport() as { header?: { glibcVersionRuntime?: string } }
  const dist = require.resolve('nbd-client')
  const script = [
    `require(${JSON.stringify(dist)})`,
    'const rss = () => process.memoryUsage().rss',
    'let held = []',
    'for (let i = 0; i < 12; i++) held.push(Buffer.allocUnsafeSlow(1 << 20).fill(i + 1))',
    'const before = rss()',
    'held = null',
    'globalThis.gc(); globalThis.gc()',
    'setTimeout(() => { globalThis.gc(); console.log(Math.round((before - rss()) / 1048576)) }, 300)',
  ].join('\n')
  const run = (env: NodeJS.ProcessEnv) => {
    const r = spawnSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8', env, timeout: 60000 })
    t.is(r.status, 0, r.stderr)
    return Number(r.stdout.trim())
  }
  // Neither another allocator nor malloc settings of the caller's own.
  const clean = { ...process.env }
  for (const name of ['GLIBC_TUNABLES', 'NBD_CLIENT_MALLOC', 'LD_PRELOAD', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_']) {
    delete clean[name]
  }
  const tuned = run(clean)
  const untouched = run({ ...clean, NBD_CLIENT_MALLOC: 'default' })
  t.log(`MiB returned to the kernel after freeing 12 MiB: tuned ${tuned}, untouched ${untouched}`)
  if (!report.header?.glibcVersionRuntime) {
    t.pass('not glibc: nothing is tuned')
    return
  }
  // Under qemu-user (the arm64 suite; scripts/cross/common.sh sets NBD_TEST_EMULATED) memory
  // the guest unmaps stays in the emulator's resident set, so neither case can be told from
  // the other there; natively they can.
  if (process.env.NBD_TEST_EMULATED === '1') {
    t.log('emulated: the resident set does not show unmapped memory')
    return
  }
  t.true(tuned < 3, `tuned: ${tuned} MiB returned`)
  t.true(untouched > 9, `untouched: ${untouched} MiB returned`)
})
