// Block status: full maps equal `nbdinfo --map` for base:allocation (nbdkit memory, sparse-random,
// data; qemu-nbd qcow2), qemu:dirty-bitmap and qemu:allocation-depth; reqOne; 64-bit extents with
// extended headers; filtered block status; refusals.
import { spawnSync } from 'node:child_process'
import path from 'node:path'
import test, { type ExecutionContext } from 'ava'
import { CONTEXT_BASE_ALLOCATION, Handle, STATE_DIRTY, STATE_HOLE, STATE_ZERO } from 'nbd-client'
import { nbdinfoMap } from './helpers/crosscheck'
import { expectReject, fullMap, openHandle, seededBytes, KiB, MiB } from './helpers/nbd'
import { requireTool, useNbdkit, useQemuNbd, type Server } from './helpers/servers'

function sh(t: ExecutionContext, argv: string[]): void {
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' })
  if (r.status !== 0) t.fail(`${argv.join(' ')} failed: ${r.stderr}`)
}

async function sameMap(t: ExecutionContext, server: Server, h: Handle, context = CONTEXT_BASE_ALLOCATION, step?: number) {
  const ours = await fullMap(h, context, step)
  const theirs = await nbdinfoMap(server.uri, context)
  t.true(ours.length > 0)
  t.deepEqual(ours, theirs, `${context} map of ${server.kind} differs from nbdinfo --map`)
  return ours
}

test('nbdkit memory after writes, zeroes and trims: base:allocation equals nbdinfo --map', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useNbdkit(t, ['memory', '8M'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  t.true(h.canMetaContext(CONTEXT_BASE_ALLOCATION))
  await h.pwrite(seededBytes(64 * KiB, 1), 0)
  await h.pwrite(seededBytes(300 * KiB, 2), 3 * MiB)
  await h.zero(64 * KiB, 3 * MiB + 64 * KiB)
  await h.trim(32 * KiB, 32 * KiB)
  const map = await sameMap(t, server, h)
  t.is(map[0]!.type, 0, 'written data is allocated')
  // Small steps too: the pieces must join up into the same map.
  await sameMap(t, server, h, CONTEXT_BASE_ALLOCATION, 1 * MiB)
})

test('nbdkit sparse-random: base:allocation equals nbdinfo --map', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useNbdkit(t, ['sparse-random', '64M', 'seed=42', 'percent=30'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  const map = await sameMap(t, server, h, CONTEXT_BASE_ALLOCATION, 16 * MiB)
  t.true(map.length >= 3, `a real mixture of extents (${map.length})`)
})

test('nbdkit data plugin: base:allocation equals nbdinfo --map', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useNbdkit(t, ['data', '1 2 3 @1048576 4 5 6 @4194304 7', 'size=8M'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  await sameMap(t, server, h)
})

test('qemu-nbd qcow2: base:allocation equals nbdinfo --map, with STATE_HOLE|STATE_ZERO holes', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useQemuNbd(t, { format: 'qcow2', size: 16 * MiB })
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  await h.pwrite(seededBytes(128 * KiB, 3), 0)
  await h.pwrite(seededBytes(64 * KiB, 4), 5 * MiB)
  await h.zero(1 * MiB, 8 * MiB, { noHole: true })
  const map = await sameMap(t, server, h)
  t.true(map.some((e) => e.type === (STATE_HOLE | STATE_ZERO)))
})

test('qemu:dirty-bitmap:b0 on a qcow2 with a bitmap equals nbdinfo --map', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'qemu-io', 'qemu-img')) return
  const server = await useQemuNbd(t, {
    format: 'qcow2',
    size: 4 * MiB,
    extraArgs: ['-B', 'b0'],
    prepare: (image) => {
      sh(t, ['qemu-img', 'bitmap', '--add', image, 'b0'])
      sh(t, ['qemu-io', '-f', 'qcow2', '-c', 'write -P 3 1M 64k', '-c', 'write -P 4 3M 128k', image])
    },
  })
  if (!server) return
  const context = 'qemu:dirty-bitmap:b0'
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION, context] })
  t.true(h.canMetaContext(context))
  const map = await sameMap(t, server, h, context)
  t.deepEqual(
    map.filter((e) => e.type & STATE_DIRTY).map((e) => [e.offset, e.length]),
    [[1 * MiB, 64 * KiB], [3 * MiB, 128 * KiB]],
  )
  // Both contexts come back from one command.
  const both = await h.blockStatus(4 * MiB, 0)
  t.deepEqual(Object.keys(both).sort(), [CONTEXT_BASE_ALLOCATION, context])
})

test('qemu:allocation-depth on a backing chain equals nbdinfo --map', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'qemu-io', 'qemu-img')) return
  const server = await useQemuNbd(t, {
    format: 'qcow2',
    size: 4 * MiB,
    extraArgs: ['-A'],
    prepare: (image, dir) => {
      sh(t, ['qemu-io', '-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 1M 128k', image])
      const top = path.join(dir, 'top.qcow2')
      sh(t, ['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', image, '-F', 'qcow2', top])
      sh(t, ['qemu-io', '-f', 'qcow2', '-c', 'write -P 3 2M 64k', top])
      return top
    },
  })
  if (!server) return
  const context = 'qemu:allocation-depth'
  const h = await openHandle(t, server, { metaContexts: [context] })
  const map = await sameMap(t, server, h, context)
  t.deepEqual([...new Set(map.map((e) => e.type))].sort(), [0, 1, 2], 'absent, local and backing extents')
})

test('reqOne asks for one extent per context', async (t) => {
  const server = await useNbdkit(t, ['data', '1 @1048576 2 @2097152 3', 'size=4M'])
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  const many = await h.blockStatus(4 * MiB, 0)
  t.true(many[CONTEXT_BASE_ALLOCATION]!.length > 1)
  const one = await h.blockStatus(4 * MiB, 0, { reqOne: true })
  t.is(one[CONTEXT_BASE_ALLOCATION]!.length, 1)
  t.is(one[CONTEXT_BASE_ALLOCATION]![0]!.offset, 0)
})

test('extended headers with qemu-nbd: one block status of more than 4 GiB in 64-bit extents', async (t) => {
  const server = await useQemuNbd(t, { format: 'qcow2', size: 8 * 1024 * MiB })
  if (!server) return
  const h = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  t.true(h.getExtendedHeadersNegotiated(), `qemu-nbd ${server.kind} negotiates extended headers`)
  await h.pwrite(seededBytes(4 * KiB, 9), 6 * 1024 * MiB)
  const status = await h.blockStatus(8 * 1024 * MiB, 0)
  const extents = status[CONTEXT_BASE_ALLOCATION]!
  t.is(extents[0]!.offset, 0)
  t.true(extents[0]!.length > 4 * 1024 * MiB, `first extent ${extents[0]!.length} bytes, past 32 bits`)
  const data = extents.find((e) => e.flags === 0)
  t.is(data?.offset, 6 * 1024 * MiB)
  // And zero and trim of more than 4 GiB in one command (qemu-nbd caps cache at 32 MiB).
  await h.zero(5 * 1024 * MiB, 0)
  await h.trim(5 * 1024 * MiB, 0)

  const compact = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION], requestExtendedHeaders: false })
  t.false(compact.getExtendedHeadersNegotiated())
  t.true(compact.getStructuredRepliesNegotiated())
  await expectReject(t, () => compact.blockStatus(5 * 1024 * MiB, 0), 'ERANGE', 'blockStatus')
  await expectReject(t, () => compact.zero(5 * 1024 * MiB, 0), 'ERANGE', 'zero')
  const small = await compact.blockStatus(1 * MiB, 6 * 1024 * MiB)
  t.deepEqual(small[CONTEXT_BASE_ALLOCATION]![0]!.flags, 0)
})

test('filtered block status returns only the named contexts', async (t) => {
  const server = await useQemuNbd(t, {
    format: 'qcow2',
    size: 4 * MiB,
    extraArgs: ['-A', '-B', 'b0'],
    prepare: (image) => sh(t, ['qemu-img', 'bitmap', '--add', image, 'b0']),
  })
  if (!server) return
  const contexts = [CONTEXT_BASE_ALLOCATION, 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0']
  const h = await openHandle(t, server, { metaContexts: contexts })
  t.true(h.canBlockStatusPayload(), 'qemu-nbd with extended headers accepts a block status payload')
  const all = await h.blockStatus(4 * MiB, 0)
  t.deepEqual(Object.keys(all).sort(), [...contexts].sort())
  const some = await h.blockStatus(4 * MiB, 0, { contexts: ['qemu:dirty-bitmap:b0'] })
  t.deepEqual(Object.keys(some), ['qemu:dirty-bitmap:b0'])
  await expectReject(t, () => h.blockStatus(4 * MiB, 0, { contexts: ['qemu:nope'] }), 'EINVAL', 'blockStatus')
  await expectReject(t, () => h.blockStatus(4 * MiB, 0, { contexts: [] }), 'EINVAL', 'blockStatus')

  const compact = await openHandle(t, server, { metaContexts: contexts, requestExtendedHeaders: false })
  t.false(compact.canBlockStatusPayload())
  await expectReject(t, () => compact.blockStatus(4 * MiB, 0, { contexts: ['qemu:dirty-bitmap:b0'] }), 'ENOTSUP', 'blockStatus')
})

test('block status without a negotiated context is refused with ENOTSUP', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = await openHandle(t, server)
  t.false(h.canMetaContext(CONTEXT_BASE_ALLOCATION))
  await expectReject(t, () => h.blockStatus(4096, 0), 'ENOTSUP', 'blockStatus')
  const unknown = await openHandle(t, server, { metaContexts: ['no-such:context'] })
  t.false(unknown.canMetaContext('no-such:context'))
  await expectReject(t, () => unknown.blockStatus(4096, 0), 'ENOTSUP', 'blockStatus')
  // Bounds and flags follow the strict rules.
  const ok = await openHandle(t, server, { metaContexts: [CONTEXT_BASE_ALLOCATION] })
  await expectReject(t, () => ok.blockStatus(4096, 1 * MiB), 'EINVAL', 'blockStatus')
  await expectReject(t, () => ok.blockStatus(4096, 0, { flags: 1 }), 'EINVAL', 'blockStatus')
})

test('preadStructured reports data and hole chunks that cover the read, and df', async (t) => {
  const server = await useQemuNbd(t, { format: 'qcow2', size: 4 * MiB })
  if (!server) return
  const h = await openHandle(t, server)
  const data = seededBytes(64 * KiB, 5)
  await h.pwrite(data, 64 * KiB)
  const r = await h.preadStructured(256 * KiB, 0)
  t.deepEqual(r.data.subarray(64 * KiB, 128 * KiB), data)
  t.true(r.chunks.some((c) => c.status === 'hole'))
  t.true(r.chunks.some((c) => c.status === 'data'))
  const covered = r.chunks.reduce((n, c) => n + c.length, 0)
  t.is(covered, 256 * KiB, 'the chunks cover the request exactly')
  t.true(h.canDf())
  const df = await h.preadStructured(256 * KiB, 0, { df: true })
  t.is(df.chunks.filter((c) => c.status !== 'error').length, 1, 'one content chunk with df')
  t.deepEqual(df.data, r.data)

  const simple = await openHandle(t, server, { requestStructuredReplies: false })
  const s = await simple.preadStructured(4 * KiB, 64 * KiB)
  t.deepEqual(s.chunks, [{ offset: 64 * KiB, length: 4 * KiB, status: 'data' }])
  t.deepEqual(s.data, data.subarray(0, 4 * KiB))
  await expectReject(t, () => simple.preadStructured(4096, 0, { df: true }), 'EINVAL', 'preadStructured')
})
