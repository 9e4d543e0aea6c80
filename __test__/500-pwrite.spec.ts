// Writes and the other data commands: what we write is what an independent client (nbdcopy)
// reads back on every real peer; flags reach the server (seen through nbdkit's log filter);
// flush, zero, trim and cache on nbdkit memory; mixed concurrent traffic on one handle.
import fs from 'node:fs'
import path from 'node:path'
import test, { type ExecutionContext } from 'ava'
import { CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_FAST_ZERO } from 'nbd-client'
import { CROSSCHECK_TOOLS, crossRead, crossReadAll, crossWritePrefix } from './helpers/crosscheck'
import { waitFor } from './helpers/fds'
import { openEmbedded, openHandle, seededBytes, useEmbedded, KiB, MiB } from './helpers/nbd'
import { makeTempDir, requireTool, useNbdkit, useNbdServer, useQemuNbd, type Server } from './helpers/servers'

const SIZE = 4 * MiB

const peers: [string, (t: ExecutionContext) => Promise<Server | undefined>][] = [
  ['nbdkit memory', (t) => useNbdkit(t, ['memory', String(SIZE)])],
  ['qemu-nbd raw file', (t) => useQemuNbd(t, { format: 'raw', size: SIZE })],
  ['nbd-server file', (t) => useNbdServer(t, { size: SIZE })],
]

for (const [name, start] of peers) {
  test(`nbdcopy reads back what pwrite wrote (${name})`, async (t) => {
    if (!requireTool(t, ...CROSSCHECK_TOOLS)) return
    const server = await start(t)
    if (!server) return
    const h = await openHandle(t, server)
    const writes: [number, Buffer][] = [
      [0, seededBytes(512, 1)],
      [4093, seededBytes(10_000, 2)],
      [MiB, seededBytes(MiB, 3)],
      [SIZE - 777, seededBytes(777, 4)],
    ]
    await Promise.all(writes.map(([offset, data]) => h.pwrite(data, offset)))
    if (h.canFlush()) await h.flush()
    await h.close()
    const image = await crossReadAll(server.uri)
    t.is(image.length, SIZE)
    for (const [offset, data] of writes) {
      t.true(image.subarray(offset, offset + data.length).equals(data), `write at ${offset} not seen by nbdcopy`)
    }
    // Bytes between the writes were left alone.
    t.true(image.subarray(512, 4093).every((b) => b === 0))
    t.true(image.subarray(2 * MiB, SIZE - 777).every((b) => b === 0))
  })
}

test('pwrite sends exactly the bytes of a Uint8Array view, bigint offset included', async (t) => {
  if (!requireTool(t, ...CROSSCHECK_TOOLS)) return
  const server = await useNbdkit(t, ['memory', String(SIZE)])
  if (!server) return
  const h = await openHandle(t, server)
  const backing = new Uint8Array(8192).fill(0xee)
  const payload = seededBytes(3000, 5)
  backing.set(payload, 100)
  await h.pwrite(backing.subarray(100, 3100), 10n)
  const plain = new Uint8Array(seededBytes(1000, 6))
  await h.pwrite(plain, 2 * MiB)
  t.true((await crossRead(server.uri, 10, 3000)).equals(payload))
  t.true((await crossRead(server.uri, 0, 10)).every((b) => b === 0), 'bytes before the view were written')
  t.true((await crossRead(server.uri, 3010, 100)).every((b) => b === 0), 'bytes after the view were written')
  t.true((await crossRead(server.uri, 2 * MiB, 1000)).equals(Buffer.from(plain)))
})

test('pwrite to the embedded server lands in its memory', async (t) => {
  const server = useEmbedded(t, { size: 2 * MiB })
  const h = await openEmbedded(t, server)
  const data = seededBytes(128 * KiB + 5, 9)
  await h.pwrite(data, 12345)
  t.deepEqual(server.read(12345, data.length), data)
})

test('1000+ concurrent mixed pwrites and preads on one handle keep every region intact', async (t) => {
  if (!requireTool(t, ...CROSSCHECK_TOOLS)) return
  const server = await useNbdkit(t, ['memory', String(SIZE)])
  if (!server) return
  // The second half is planted by nbdcopy and read by us; the first half is written by us.
  const half = SIZE / 2
  const planted = seededBytes(half, 10)
  await crossWritePrefix(server.uri, Buffer.concat([Buffer.alloc(half), planted]))
  const h = await openHandle(t, server)
  const region = 2 * KiB
  const count = half / region // 1024 regions in each half
  const written = Array.from({ length: count }, (_, i) => seededBytes(region, 1000 + i))
  const ops: Promise<unknown>[] = []
  for (let i = 0; i < count; i++) {
    ops.push(h.pwrite(written[i], i * region))
    ops.push(h.pread(region, half + i * region))
  }
  const results = await Promise.all(ops)
  let badReads = 0
  for (let i = 0; i < count; i++) {
    const got = results[2 * i + 1] as Buffer
    if (!got.equals(planted.subarray(i * region, (i + 1) * region))) badReads++
  }
  t.is(badReads, 0, `${badReads} of ${count} reads returned the wrong bytes`)
  t.is(h.inFlight, 0)
  const image = await crossReadAll(server.uri)
  let badWrites = 0
  for (let i = 0; i < count; i++) {
    if (!image.subarray(i * region, (i + 1) * region).equals(written[i])) badWrites++
  }
  t.is(badWrites, 0, `${badWrites} of ${count} writes did not land`)
  t.true(image.subarray(half).equals(planted), 'the read half was modified')
})

test('maxInFlight 2 completes 1000 queued pwrites', async (t) => {
  const server = useEmbedded(t, { size: 2 * MiB })
  const h = await openEmbedded(t, server, { maxInFlight: 2 })
  const region = 1 * KiB
  const data = Array.from({ length: 1000 }, (_, i) => seededBytes(region, 5000 + i))
  await Promise.all(data.map((d, i) => h.pwrite(d, i * region)))
  let bad = 0
  for (let i = 0; i < data.length; i++) if (!server.read(i * region, region).equals(data[i])) bad++
  t.is(bad, 0)
  t.is(h.inFlight, 0)
})

test('stats count the bytes and chunks sent by pwrite', async (t) => {
  const server = useEmbedded(t, { size: MiB })
  const h = await openEmbedded(t, server)
  const before = h.stats
  await h.pwrite(Buffer.alloc(64 * KiB, 1), 0)
  const after = h.stats
  t.is(typeof after.bytesSent, 'bigint')
  t.true(after.bytesSent - before.bytesSent >= BigInt(64 * KiB), 'bytesSent did not grow by the payload')
  t.true(after.chunksSent > before.chunksSent)
  t.true(after.bytesReceived > before.bytesReceived, 'the reply was not counted')
  t.true(after.chunksReceived > before.chunksReceived)
})

// ---- flags and the other commands on nbdkit memory, observed through the log filter ------------

async function nbdkitWithLog(t: ExecutionContext) {
  if (!requireTool(t, 'nbdkit', ...CROSSCHECK_TOOLS)) return undefined
  const dir = makeTempDir('nbdkit-log-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const logfile = path.join(dir, 'log')
  const server = await useNbdkit(t, ['memory', String(SIZE), `logfile=${logfile}`], { extraArgs: ['--filter=log'] })
  if (!server) return undefined
  const h = await openHandle(t, server)
  // Waits for a line of the log to match (the filter logs each request as it is handled).
  const logged = async (pattern: RegExp) =>
    waitFor(() => {
      try {
        return pattern.test(fs.readFileSync(logfile, 'utf8'))
      } catch {
        return false
      }
    }, 3000)
  return { server, h, logged, log: () => fs.readFileSync(logfile, 'utf8') }
}

test('nbdkit memory advertises flush, FUA, trim, zero, fast zero and cache', async (t) => {
  const ctx = await nbdkitWithLog(t)
  if (!ctx) return
  const { h } = ctx
  t.true(h.canFlush())
  t.true(h.canFua())
  t.true(h.canTrim())
  t.true(h.canZero())
  t.true(h.canFastZero())
  t.true(h.canCache())
  t.true(h.canMultiConn())
  t.false(h.isReadOnly())
  t.false(h.isRotational())
})

test('pwrite with { fua: true } and with flags: CMD_FLAG_FUA sends FUA; without, it does not', async (t) => {
  const ctx = await nbdkitWithLog(t)
  if (!ctx) return
  const { h, logged, server } = ctx
  const a = seededBytes(4096, 20)
  const b = seededBytes(4096, 21)
  const c = seededBytes(4096, 22)
  await h.pwrite(a, 0x10000, { fua: true })
  await h.pwrite(b, 0x20000, { flags: CMD_FLAG_FUA })
  await h.pwrite(c, 0x30000)
  t.true(await logged(/Write id=\d+ offset=0x10000 count=0x1000 fua=1/), 'named fua did not reach the server')
  t.true(await logged(/Write id=\d+ offset=0x20000 count=0x1000 fua=1/), 'raw CMD_FLAG_FUA did not reach the server')
  t.true(await logged(/Write id=\d+ offset=0x30000 count=0x1000 fua=0/), 'a plain write carried FUA')
  t.true((await crossRead(server.uri, 0x10000, 4096)).equals(a))
  t.true((await crossRead(server.uri, 0x20000, 4096)).equals(b))
  t.true((await crossRead(server.uri, 0x30000, 4096)).equals(c))
})

test('flush reaches the server', async (t) => {
  const ctx = await nbdkitWithLog(t)
  if (!ctx) return
  const { h, logged } = ctx
  const p = h.flush()
  t.true(p instanceof Promise)
  t.is(await p, undefined)
  t.true(await logged(/Flush id=\d+/))
})

test('zero writes zeros; noHole and fastZero reach the server as flags', async (t) => {
  const ctx = await nbdkitWithLog(t)
  if (!ctx) return
  const { h, logged, server } = ctx
  const ones = Buffer.alloc(64 * KiB, 0xff)
  await h.pwrite(ones, 0)
  await h.zero(4096, 4096)
  await h.zero(4096, 3 * 4096, { noHole: true })
  await h.zero(4096, 5 * 4096, { flags: CMD_FLAG_NO_HOLE | CMD_FLAG_FUA })
  await h.zero(4096, 7 * 4096, { fastZero: true, fua: true })
  await h.zero(4096, 9 * 4096, { flags: CMD_FLAG_FAST_ZERO })
  // may-trim is on unless NO_HOLE was asked for.
  t.true(await logged(/Zero id=\d+ offset=0x1000 count=0x1000 trim=1 fua=0 fast=0/), ctx.log())
  t.true(await logged(/Zero id=\d+ offset=0x3000 count=0x1000 trim=0 fua=0 fast=0/), 'noHole')
  t.true(await logged(/Zero id=\d+ offset=0x5000 count=0x1000 trim=0 fua=1 fast=0/), 'raw NO_HOLE|FUA')
  t.true(await logged(/Zero id=\d+ offset=0x7000 count=0x1000 trim=1 fua=1 fast=1/), 'fastZero + fua')
  t.true(await logged(/Zero id=\d+ offset=0x9000 count=0x1000 trim=1 fua=0 fast=1/), 'raw FAST_ZERO')
  const ours = await h.pread(64 * KiB, 0)
  const theirs = await crossRead(server.uri, 0, 64 * KiB)
  t.true(ours.equals(theirs))
  for (let block = 0; block < 16; block++) {
    const zeroed = block % 2 === 1 && block <= 9
    const expected = zeroed ? 0 : 0xff
    t.true(ours.subarray(block * 4096, (block + 1) * 4096).every((x) => x === expected), `block ${block}`)
  }
})

test('trim makes the range read back as zeros on nbdkit memory', async (t) => {
  const ctx = await nbdkitWithLog(t)
  if (!ctx) return
  const { h, logged, server } = ctx
  await h.pwrite(Buffer.alloc(MiB, 0x5a), MiB)
  await h.trim(256 * KiB, MiB + 256 * KiB)
  await h.trim(4096, 2 * MiB - 4096, { fua: true })
  t.true(await logged(/Trim id=\d+ offset=0x140000 count=0x40000 fua=0/))
  t.true(await logged(/Trim id=\d+ offset=0x1ff000 count=0x1000 fua=1/))
  const image = await crossRead(server.uri, MiB, MiB)
  t.true(image.subarray(0, 256 * KiB).every((b) => b === 0x5a))
  t.true(image.subarray(256 * KiB, 512 * KiB).every((b) => b === 0))
  t.true(image.subarray(512 * KiB, MiB - 4096).every((b) => b === 0x5a))
  t.true(image.subarray(MiB - 4096).every((b) => b === 0))
  t.true((await h.pread(MiB, MiB)).equals(image))
})

test('cache reaches the server and leaves the data alone', async (t) => {
  const ctx = await nbdkitWithLog(t)
  if (!ctx) return
  const { h, logged } = ctx
  const data = seededBytes(8192, 30)
  await h.pwrite(data, 0x40000)
  t.is(await h.cache(8192, 0x40000), undefined)
  t.true(await logged(/Cache id=\d+ offset=0x40000 count=0x2000/))
  t.true((await h.pread(8192, 0x40000)).equals(data))
})

test('commands accept bigint offsets', async (t) => {
  const ctx = await nbdkitWithLog(t)
  if (!ctx) return
  const { h, logged } = ctx
  await h.pwrite(Buffer.alloc(4096, 1), 0x50000n)
  await h.zero(512, 0x50000n)
  await h.trim(512, 0x50200n)
  await h.cache(512, 0x50400n)
  t.true(await logged(/Write id=\d+ offset=0x50000 count=0x1000/))
  t.true(await logged(/Zero id=\d+ offset=0x50000 count=0x200/))
  t.true(await logged(/Trim id=\d+ offset=0x50200 count=0x200/))
  t.true(await logged(/Cache id=\d+ offset=0x50400 count=0x200/))
  const back = await h.pread(4096, 0x50000n)
  t.true(back.subarray(0, 1024).every((b) => b === 0))
  t.true(back.subarray(1024).every((b) => b === 1))
})
