// Whole-export description: Handle.map() equals `nbdinfo --map` (JSON, text lines and
// --totals) on nbdkit, qemu-nbd (qcow2 with holes, a dirty bitmap, a backing chain) and a
// server that answers one extent per reply; info() equals `nbdinfo --json` and
// `nbdinfo --list --json` value for value on nbdkit, qemu-nbd and nbd-server.
import { spawn, spawnSync } from 'node:child_process'
import path from 'node:path'
import test, { type ExecutionContext } from 'ava'
import { CONTEXT_BASE_ALLOCATION, Handle, humanSize, info, mapTotals, type MapExtent } from 'nbd-client'
import { nbdinfoMap } from './helpers/crosscheck'
import { expectReject, openHandle, seededBytes, KiB, MiB } from './helpers/nbd'
import { requireTool, useNbdkit, useNbdServer, useQemuNbd, type Server } from './helpers/servers'

async function waitUntil(ok: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms
  while (!ok()) {
    if (Date.now() > end) return false
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return true
}

function sh(t: ExecutionContext, argv: string[]): void {
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' })
  if (r.status !== 0) t.fail(`${argv.join(' ')} failed: ${r.stderr}`)
}

function nbdinfo(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('nbdinfo', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s))
    child.stderr.setEncoding('utf8').on('data', (s: string) => (err += s))
    child.once('error', reject)
    child.once('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`nbdinfo ${args.join(' ')}: ${err}`))))
  })
}

async function collect(it: AsyncIterable<MapExtent>): Promise<MapExtent[]> {
  const out: MapExtent[] = []
  for await (const e of it) out.push(e)
  return out
}

/** nbdinfo --map's text line for one extent. */
function mapLine(e: MapExtent): string {
  const head = `${String(e.offset).padStart(10)}  ${String(e.length).padStart(10)}  ${String(e.flags).padStart(3)}`
  return e.description ? `${head}  ${e.description}` : head
}

/** nbdinfo --map --totals's text line for one total. */
function totalLine(x: { size: number; percent: number; flags: number; description: string }): string {
  const head = `${String(x.size).padStart(10)} ${x.percent.toFixed(1).padStart(5)}% ${String(x.flags).padStart(3)}`
  return x.description ? `${head} ${x.description}` : head
}

/** Our map against nbdinfo's: JSON entries, text lines and totals. */
async function sameAsNbdinfo(t: ExecutionContext, server: Server, h: Handle, context = CONTEXT_BASE_ALLOCATION) {
  const ours = await collect(h.map({ context }))
  const theirs = await nbdinfoMap(server.uri, context)
  t.deepEqual(ours.map(({ offset, length, flags }) => ({ offset, length, type: flags })), theirs, `${context} on ${server.kind}`)
  const text = await nbdinfo([`--map=${context}`, server.uri])
  t.is(ours.map(mapLine).join('\n') + '\n', text, 'text lines as nbdinfo --map')
  const totals = await nbdinfo([`--map=${context}`, '--totals', server.uri])
  t.is(mapTotals(ours, context).map(totalLine).join('\n') + '\n', totals, 'totals as nbdinfo --map --totals')
  // The whole range, no gaps, no overlaps, neighbours always different.
  let at = 0
  for (const [i, e] of ours.entries()) {
    t.is(e.offset, at)
    if (i > 0) t.not(e.flags, ours[i - 1]!.flags)
    at += e.length
  }
  t.is(at, h.getSize())
  return ours
}

test('map: nbdkit memory after writes, zeroes and trims equals nbdinfo --map (json, text, totals)', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useNbdkit(t, ['memory', '8M'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  await h.pwrite(seededBytes(64 * KiB, 1), 0)
  await h.pwrite(seededBytes(300 * KiB, 2), 3 * MiB)
  await h.zero(64 * KiB, 3 * MiB + 64 * KiB)
  await h.trim(32 * KiB, 32 * KiB)
  const map = await sameAsNbdinfo(t, server, h)
  t.is(map[0]!.description, 'data')
  t.true(map.some((e) => e.description === 'hole,zero'))
})

test('map: nbdkit sparse-random equals nbdinfo --map', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useNbdkit(t, ['sparse-random', '64M', 'seed=7', 'percent=40'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  const map = await sameAsNbdinfo(t, server, h)
  t.true(map.length >= 3)
})

test('map: a server that answers one extent per reply (nbdkit eval) still maps the whole export', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  // Every reply describes at most 64 KiB, alternating data and hole every 256 KiB, so the
  // library must ask again many times and merge the pieces.
  const extents = 'o=$4; n=$3; [ $n -gt 65536 ] && n=65536; if [ $(( (o / 262144) % 2 )) = 0 ]; then t=; else t=hole,zero; fi; r=$(( 262144 - o % 262144 )); [ $n -gt $r ] && n=$r; echo $o $n $t'
  const server = await useNbdkit(t, ['eval', 'get_size=echo 2097152', 'pread=dd if=/dev/zero count=$3 iflag=count_bytes 2>/dev/null', `extents=${extents}`, 'can_extents=exit 0'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  const one = await h.blockStatus(2 * MiB, 0)
  t.is(one[CONTEXT_BASE_ALLOCATION]!.length, 1, 'the server describes one extent per reply')
  const map = await sameAsNbdinfo(t, server, h)
  t.is(map.length, 8)
  t.deepEqual(map.slice(0, 2).map((e) => [e.offset, e.length, e.description]), [[0, 256 * KiB, 'data'], [256 * KiB, 256 * KiB, 'hole,zero']])
})

test('map: reqOne, sub-ranges and a final extent clipped to the range', async (t) => {
  const server = await useNbdkit(t, ['data', '1 @1048576 2 @2097152 3', 'size=4M'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  const whole = await collect(h.map())
  t.deepEqual(await collect(h.map({ reqOne: true })), whole)
  const part = await collect(h.map({ offset: 1000, length: 1048576 }))
  t.is(part[0]!.offset, 1000)
  t.is(part.reduce((n, e) => n + e.length, 0), 1048576)
  t.is(part.at(-1)!.offset + part.at(-1)!.length, 1000 + 1048576)
  t.deepEqual(await collect(h.map({ offset: 4 * MiB })), [], 'an empty range maps to nothing')
  t.deepEqual(await collect(h.map({ offset: 5, length: 0 })), [])
})

test('map: qemu-nbd qcow2 with holes, a dirty bitmap and a backing chain equals nbdinfo --map', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'qemu-io', 'qemu-img')) return
  const server = await useQemuNbd(t, {
    format: 'qcow2',
    size: 8 * MiB,
    extraArgs: ['-A', '-B', 'b0'],
    prepare: (image, dir) => {
      sh(t, ['qemu-io', '-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 1M 128k', image])
      const top = path.join(dir, 'top.qcow2')
      sh(t, ['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', image, '-F', 'qcow2', top])
      sh(t, ['qemu-img', 'bitmap', '--add', top, 'b0'])
      sh(t, ['qemu-io', '-f', 'qcow2', '-c', 'write -P 3 2M 64k', '-c', 'write -z 4M 1M', top])
      return top
    },
  })
  if (!server) return
  const contexts = [CONTEXT_BASE_ALLOCATION, 'qemu:dirty-bitmap:b0', 'qemu:allocation-depth']
  const h = await openHandle(t, server, { metaContexts: contexts })
  const base = await sameAsNbdinfo(t, server, h, CONTEXT_BASE_ALLOCATION)
  t.true(base.some((e) => e.description === 'hole,zero'))
  const dirty = await sameAsNbdinfo(t, server, h, 'qemu:dirty-bitmap:b0')
  t.deepEqual(dirty.filter((e) => e.description === 'dirty').map((e) => e.offset), [2 * MiB, 4 * MiB])
  const depth = await sameAsNbdinfo(t, server, h, 'qemu:allocation-depth')
  t.deepEqual([...new Set(depth.map((e) => e.description))].sort(), ['absent', 'backing depth 2', 'local'])
})

test('map: 64-bit extents (qemu-nbd, extended headers) merge into one run past 4 GiB', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useQemuNbd(t, { format: 'qcow2', size: 8 * 1024 * MiB })
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  t.true(h.getExtendedHeadersNegotiated())
  await h.pwrite(seededBytes(64 * KiB, 9), 6 * 1024 * MiB)
  const map = await sameAsNbdinfo(t, server, h)
  t.true(map[0]!.length >= 6 * 1024 * MiB, `first run ${map[0]!.length} bytes`)
})

test('map: refusals and abort', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const plain = await openHandle(t, server)
  await expectReject(t, () => plain.map().next(), 'ENOTSUP', 'map')
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  await expectReject(t, () => h.map({ offset: 2 * MiB }).next(), 'EINVAL', 'map')
  await expectReject(t, () => h.map({ offset: 0, length: 2 * MiB }).next(), 'EINVAL', 'map')
  await expectReject(t, () => h.map({ offset: -1 }).next(), 'EINVAL', 'map')
  await expectReject(t, () => h.map({ context: 'qemu:dirty-bitmap:x' }).next(), 'ENOTSUP', 'map')
  const ac = new AbortController()
  ac.abort()
  const err = await t.throwsAsync(() => h.map({ signal: ac.signal }).next())
  t.is(err?.name, 'AbortError')
})

test('map: nbd-server without meta contexts is refused as nbdinfo refuses it', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useNbdServer(t, { size: 1 * MiB })
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  if (h.canMetaContext(CONTEXT_BASE_ALLOCATION)) {
    await sameAsNbdinfo(t, server, h)
  } else {
    await expectReject(t, () => h.map().next(), 'ENOTSUP', 'map')
    await t.throwsAsync(() => nbdinfo(['--map', server.uri]))
  }
})

/** nbdinfo's JSON keys in camelCase, as info() reports them. */
function camel(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(camel)
  if (value === null || typeof value !== 'object') return value
  const out: Record<string, unknown> = {}
  for (const [k, v] of Object.entries(value)) {
    const key = k === 'TLS' ? 'tls' : k.replace(/[-_]([a-z])/g, (_, c: string) => c.toUpperCase())
    out[key] = camel(v)
  }
  return out
}

async function sameInfo(t: ExecutionContext, server: Server, list = false) {
  const ours = await info(server.uri, { list })
  const theirs = camel(JSON.parse(await nbdinfo(list ? ['--list', '--json', server.uri] : ['--json', server.uri])))
  t.deepEqual(ours, theirs as typeof ours, `info(${list ? '{ list }' : ''}) of ${server.kind}`)
  return ours
}

test('info: nbdkit memory, sparse-random, read-only and oldstyle equal nbdinfo --json', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file')) return
  const memory = await useNbdkit(t, ['memory', '3584K'])
  const random = await useNbdkit(t, ['sparse-random', '1G'], { readOnly: true })
  const old = await useNbdkit(t, ['memory', '1M'], { oldstyle: true })
  if (!memory || !random || !old) return
  const a = await sameInfo(t, memory)
  t.is(a.exports[0]!.exportSizeStr, '3584K')
  t.is(a.exports[0]!.content, 'data')
  const b = await sameInfo(t, random)
  t.true(b.exports[0]!.isReadOnly)
  const c = await sameInfo(t, old)
  t.is(c.protocol, 'oldstyle')
  await sameInfo(t, memory, true)
})

test('info: an export past Number.MAX_SAFE_INTEGER reports its size as a bigint, the rest as nbdinfo --json', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file')) return
  const huge = await useNbdkit(t, ['null', '4E'])
  if (!huge) return
  const ours = await info(huge.uri)
  const theirs = camel(JSON.parse(await nbdinfo(['--json', huge.uri]))) as typeof ours
  const { exportSize, ...rest } = ours.exports[0]!
  t.is(exportSize, 4n << 60n)
  t.is(rest.exportSizeStr, '4E')
  // 2^62 is exact as a JSON number too.
  t.is(BigInt(theirs.exports[0]!.exportSize), exportSize)
  const { exportSize: _, ...theirRest } = theirs.exports[0]!
  t.deepEqual({ ...ours, exports: [rest] }, { ...theirs, exports: [theirRest] })
})

test('info: qemu-nbd (description, block sizes, contexts, content of a boot sector) equals nbdinfo --json and --list --json', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file', 'qemu-io')) return
  const server = await useQemuNbd(t, {
    format: 'qcow2',
    size: 4 * MiB,
    description: 'a disk for "info" \\ tests',
    extraArgs: ['-A', '-B', 'b0'],
    prepare: (image) => {
      sh(t, ['qemu-img', 'bitmap', '--add', image, 'b0'])
      sh(t, ['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x55 510 1', '-c', 'write -P 0xaa 511 1', image])
    },
  })
  if (!server) return
  const one = await sameInfo(t, server)
  const e = one.exports[0]!
  t.is(e.exportName, 'disk')
  t.is(e.description, 'a disk for "info" \\ tests')
  t.true((e.contexts ?? []).includes('qemu:dirty-bitmap:b0'))
  t.true(e.blockSizeMinimum! > 0)
  const listed = await sameInfo(t, server, true)
  t.is(listed.exports.length, 1)
  t.is(listed.exports[0]!.content, undefined, 'no content probe with list, as nbdinfo')
})

test('info: nbd-server with several exports equals nbdinfo --list --json', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file')) return
  const server = await useNbdServer(t, { size: 2 * MiB, extraExports: ['second', 'third'] })
  if (!server) return
  await sameInfo(t, server)
  const all = await sameInfo(t, server, true)
  t.deepEqual(all.exports.map((e) => e.exportName).sort(), ['disk', 'second', 'third'])
})

test('info: a Handle in option mode is described and left negotiating; a ready one from its getters', async (t) => {
  const server = await useNbdkit(t, ['memory', '2M'])
  if (!server) return
  const o = await openHandle(t, server, { optMode: true })
  const viaHandle = await info(o)
  t.is(o.state, 'negotiating')
  const viaUri = await info(server.uri, { content: false })
  const { uri, ...rest } = viaUri.exports[0]!
  t.is(uri, server.uri)
  t.deepEqual(viaHandle.exports[0], rest, 'the same facts, without the uri nbdinfo gives only for a URI')
  const ready = await openHandle(t, server)
  const r = await info(ready)
  t.is(r.exports[0]!.exportSize, 2 * MiB)
  t.is(r.exports[0]!.contexts, undefined)
  await expectReject(t, () => info(ready, { list: true }), 'EINVAL', 'info')
})

test('info: bad targets and options, refused connections and abort', async (t) => {
  await expectReject(t, () => info(42 as never), 'EINVAL', 'info')
  await expectReject(t, () => info('nbd://x', { list: 'yes' as never }), 'EINVAL', 'info')
  await expectReject(t, () => info('not a uri'), ['EINVAL', 'ENOTSUP'], 'info')
  await expectReject(t, () => info('nbd+unix:///?socket=/nonexistent/sock'), ['ENOENT', 'ECONNREFUSED'], 'info')
  const ac = new AbortController()
  ac.abort()
  const err = await t.throwsAsync(() => info('nbd+unix:///?socket=/nonexistent/sock', { signal: ac.signal }))
  t.is(err?.name, 'AbortError')
  t.is(humanSize(0), '0')
  t.is(humanSize(1023), '1023')
  t.is(humanSize(1n << 60n), '1E')
  t.is(humanSize(3 * 1024 * 1024 + 1024), '3073K')
})

test('info: a server that never answers NBD_OPT_ABORT holds info() up 2 s at most; a signal ends the wait at once', async (t) => {
  const { useFake, OPT } = await import('./helpers/fake-server')
  const server = await useFake(t, { size: MiB, onOption: (o) => (o.option === OPT.ABORT ? 'stall' : 'default') })
  const uri = `nbd+unix:///?socket=${server.socket}`
  let started = Date.now()
  const plain = await info(uri, { content: false })
  t.is(plain.exports[0]!.exportSize, MiB)
  const took = Date.now() - started
  t.true(took >= 1500 && took < 30_000, `info took ${took} ms`)
  // With a signal that fires while info() waits for the answer: it resolves (the facts were
  // complete) as soon as the signal closes the connection.
  const ac = new AbortController()
  started = Date.now()
  setTimeout(() => ac.abort(), 300)
  const settled = await info(uri, { list: true, signal: ac.signal }).then(
    (r) => `resolved with ${r.exports.length} export`,
    (e: Error) => `rejected: ${e.name}`,
  )
  // It did not wait out the 2 s (natively it takes about 300 ms; emulation adds to both).
  const withSignal = Date.now() - started
  t.true(withSignal < Math.max(1500, took - 1000), `info with a signal took ${withSignal} ms, without ${took} ms: ${settled}`)
})

test('info(handle): a stalled option request rejects at the abort, and the caller keeps its handle', async (t) => {
  const { useFake, OPT } = await import('./helpers/fake-server')
  for (const [opt, options] of [
    [OPT.INFO, {}],
    [OPT.LIST, { list: true }],
  ] as const) {
    const server = await useFake(t, { size: MiB, onOption: (o) => (o.option === opt ? 'stall' : 'default') })
    const h = new Handle({ optMode: true, fullInfo: true })
    t.teardown(() => h.close())
    await h.connectUri(`nbd+unix:///?socket=${server.socket}`)
    const ac = new AbortController()
    const started = Date.now()
    setTimeout(() => ac.abort(), 200)
    const err = await t.throwsAsync(() => info(h, { ...options, signal: ac.signal }))
    t.is(err?.name, 'AbortError')
    // Before the fix it waited for the stalled answer forever.
    t.true(Date.now() - started < 5000, `the abort took ${Date.now() - started} ms`)
    t.not(h.state, 'closed')
    await h.close()
    t.is(h.state, 'closed')
  }
})

test('info(handle) aborted while the server is slow: once the answer comes, nothing more is sent and the settings are given back', async (t) => {
  const { useFake, OPT } = await import('./helpers/fake-server')
  const seen: number[] = []
  const server = await useFake(t, {
    size: MiB,
    onOption: async (o) => {
      seen.push(o.option)
      if (o.option === OPT.INFO) await new Promise((resolve) => setTimeout(resolve, 600))
      return 'default'
    },
  })
  const h = new Handle({ optMode: true })
  t.teardown(() => h.close())
  await h.connectUri(`nbd+unix:///?socket=${server.socket}`)
  const before = seen.length
  const ac = new AbortController()
  setTimeout(() => ac.abort(), 100)
  const err = await t.throwsAsync(() => info(h, { signal: ac.signal }))
  t.is(err?.name, 'AbortError')
  t.true(await waitUntil(() => h.state === 'negotiating', 5000), `state ${h.state}`)
  await new Promise((resolve) => setTimeout(resolve, 200))
  t.deepEqual(seen.slice(before), [OPT.INFO], 'only the request in flight at the abort was sent')
  t.true(h.getRequestMetaContext())
  t.is(h.state, 'negotiating')
})

test('info(handle) gives back the export name and requestMetaContext it changed', async (t) => {
  const server = await useNbdServer(t, { size: 2 * MiB, extraExports: ['second', 'third'] })
  if (!server) return
  const h = new Handle({ optMode: true })
  t.teardown(() => h.close())
  await h.connectUri(server.uri)
  const name = h.getExportName()
  t.true(h.getRequestMetaContext())
  const listed = await info(h, { list: true })
  t.is(listed.exports.length, 3)
  t.is(h.getExportName(), name)
  t.true(h.getRequestMetaContext())
  const one = await info(h)
  t.is(one.exports[0]!.exportName, name)
  t.is(h.getExportName(), name)
  t.true(h.getRequestMetaContext())
  // The handle still enters transmission, with the export it was set to.
  await h.optGo()
  t.is(h.getExportName(), name)
  t.is(h.state, 'ready')
})
