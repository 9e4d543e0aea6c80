// The event-loop driver: plain connections run on the JavaScript thread, reading into and
// writing from the caller's buffers directly. These tests push on what that design must get
// right: buffers detached mid-command, partial writes to a server that reads slowly,
// thousands of commands in flight with aborts mixed in, and settling order.
import fs from 'node:fs'
import test from 'ava'
import { Handle, NbdError } from 'nbd-client'
import { openHandle, seededBytes, KiB, MiB } from './helpers/nbd'
import { sleep, useNbdkit, useQemuNbd } from './helpers/servers'
import { useFake } from './helpers/fake-server'
import { waitFor } from './helpers/fds'

function outcome(p: Promise<unknown>): Promise<unknown> {
  return p.then(() => 'resolved', (e: unknown) => e)
}

function codeOf(o: unknown): string {
  return o instanceof NbdError ? o.code : o instanceof Error ? `${o.name}` : String(o)
}

function detach(view: Uint8Array): void {
  structuredClone(view.buffer, { transfer: [view.buffer] })
}

test('a buffer detached while its read is in flight fails EFAULT, is never written, and the handle goes on', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'memory', '8M', 'rdelay=200ms'])
  if (!server) return
  const h = await openHandle(t, server)
  await h.pwrite(seededBytes(2 * MiB, 5), 0)
  for (const size of [4 * KiB, MiB]) {
    const buf = Buffer.alloc(size)
    const view = new Uint8Array(buf.buffer, buf.byteOffset, buf.length)
    const p = outcome(h.preadInto(view, 0))
    await sleep(50)
    // The memory moves to a new owner; it must not be written by the late reply.
    const moved = new Uint8Array(structuredClone(view.buffer, { transfer: [view.buffer] }))
    moved.fill(0xaa)
    const o = await p
    t.is(codeOf(o), 'EFAULT', `size ${size}: ${String(o)}`)
    t.true(moved.every((x) => x === 0xaa), 'the transferred memory was left alone')
  }
  t.is(h.state, 'ready')
  t.deepEqual(await h.pread(4 * KiB, 0), seededBytes(2 * MiB, 5).subarray(0, 4 * KiB))
})

test('large writes to a server that delays reading their payload arrive byte for byte', async (t) => {
  let received = 0
  const server = await useFake(t, {
    size: 64 * MiB,
    onRequestHeader: async (req) => {
      if (req.type === 1) {
        // Let the client's socket fill up before the payload is read.
        await sleep(150)
        received++
      }
      return 'default'
    },
  })
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectUnix(server.socket)
  // Larger than the socket's buffer, so that each write leaves in several partial sends.
  const data = seededBytes(2 * MiB, 9)
  const small = seededBytes(4 * KiB, 10)
  const writes = [h.pwrite(data, 0), h.pwrite(small, 32 * MiB), h.pwrite(data.subarray(MiB), 40 * MiB)]
  await Promise.all(writes)
  t.is(received, 3)
  t.deepEqual(await h.pread(2 * MiB, 0), data)
  t.deepEqual(await h.pread(4 * KiB, 32 * MiB), small)
  t.deepEqual(await h.pread(MiB, 40 * MiB), data.subarray(MiB))
})

test('a buffer detached while its write is half sent fails EFAULT and ends the connection; nothing else is sent', async (t) => {
  let headerSeen = false
  const server = await useFake(t, {
    size: 64 * MiB,
    onRequestHeader: async (req) => {
      if (req.type === 1) {
        // The write's header has arrived, so the write is partly sent; the server then
        // stops reading for a while, and the rest of the payload waits in the client.
        headerSeen = true
        await sleep(2000)
      }
      return 'default'
    },
  })
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectUnix(server.socket)
  const buf = Buffer.from(seededBytes(32 * MiB, 11))
  const p = outcome(h.pwrite(buf, 0))
  const later = outcome(h.pread(4 * KiB, 0))
  t.true(await waitFor(() => headerSeen, 10_000), 'the write never reached the server')
  detach(buf)
  const o = await p
  t.is(codeOf(o), 'EFAULT', String(o))
  t.is(h.state, 'dead')
  t.is(codeOf(await later), 'ENOTCONN')
})

test('10,000 commands in flight with every third aborted: each settles exactly once, the data checks out', async (t) => {
  const server = await useNbdkit(t, ['memory', '64M'])
  if (!server) return
  const h = await openHandle(t, server)
  const data = seededBytes(8 * MiB, 21)
  await h.pwrite(data, 0)
  const N = 10_000
  const controllers: AbortController[] = []
  const results = Array.from({ length: N }, (_, i) => {
    const offset = (i * 4096) % (8 * MiB)
    if (i % 3 === 0) {
      const c = new AbortController()
      controllers.push(c)
      const buf = Buffer.alloc(4096, 0x55)
      return h.preadInto(buf, offset, { signal: c.signal }).then(() => buf, (e: unknown) => e)
    }
    return h.pread(4096, offset).then((b) => b, (e: unknown) => e)
  })
  // Abort some at once, the rest a little later (on the wire or queued).
  controllers.forEach((c, i) => (i % 2 === 0 ? c.abort() : setImmediate(() => c.abort())))
  const settled = await Promise.all(results)
  let ok = 0
  let aborted = 0
  settled.forEach((r, i) => {
    const offset = (i * 4096) % (8 * MiB)
    if (Buffer.isBuffer(r)) {
      t.true(r.equals(data.subarray(offset, offset + 4096)), `command ${i}`)
      ok++
    } else if (r instanceof Error && r.name === 'AbortError') {
      aborted++
    } else {
      t.fail(`command ${i}: ${String(r)}`)
    }
  })
  t.is(ok + aborted, N)
  t.true(aborted > 0)
  t.is(h.inFlight, 0)
  t.is(h.state, 'ready')
  t.deepEqual(await h.pread(4096, 4096), data.subarray(4096, 8192))
})

test('a command issued from a completion goes out with the others of the same wake-up (depth-1 loop works)', async (t) => {
  const server = await useNbdkit(t, ['memory', '16M'])
  if (!server) return
  const h = await openHandle(t, server)
  const before = h.stats.chunksSent
  for (let i = 0; i < 2000; i++) await h.pread(512, (i * 512) % (16 * MiB))
  t.is(h.stats.chunksSent - before, 2000n)
  t.is(h.state, 'ready')
})

test('small pread results share pooled slabs: each holds its own bytes, and no result can detach another read', async (t) => {
  const server = await useNbdkit(t, ['memory', '16M'])
  if (!server) return
  const h = await openHandle(t, server)
  const data = seededBytes(4 * MiB, 33)
  await h.pwrite(data, 0)
  const sizes = [1, 512, 4096, 5000, 16 * KiB]
  const reads = Array.from({ length: 500 }, (_, i) => {
    const size = sizes[i % sizes.length]!
    const offset = (i * 7919) % (4 * MiB - size)
    return h.pread(size, offset).then((b) => ({ b, offset, size }))
  })
  // Trying to take the first result's memory away while the others are in flight.
  const first = await reads[0]!
  try {
    structuredClone(first.b.buffer, { transfer: [first.b.buffer] })
  } catch {
    // Refused outright is fine too: either way the memory stays where it is.
  }
  t.is(first.b.length, first.size, 'the result was not detached')
  for (const { b, offset, size } of await Promise.all(reads)) {
    t.true(Buffer.isBuffer(b))
    t.is(b.length, size)
    t.true(b.equals(data.subarray(offset, offset + size)), `read of ${size} at ${offset}`)
  }
  // Results are independent: changing one leaves the others alone.
  const [x, y] = await Promise.all([h.pread(4096, 0), h.pread(4096, 4096)])
  x.fill(0)
  t.true(y.equals(data.subarray(4096, 8192)))
})

test('close() while shutdown() waits for a pending command: the command rejects and the shutdown settles', async (t) => {
  const server = await useNbdkit(t, ['--filter=delay', 'memory', '8M', 'rdelay=2'])
  if (!server) return
  const h = await openHandle(t, server)
  const read = outcome(h.pread(4096, 0))
  const shutdown = outcome(h.shutdown())
  await sleep(50)
  await h.close()
  t.is(codeOf(await read), 'ENOTCONN')
  // Never left pending: it resolves (the handle is closed, there is nothing left to shut down).
  const settled = await Promise.race([shutdown, sleep(1000).then(() => 'still pending')])
  t.is(settled, 'resolved')
  t.is(h.state, 'closed')
})

test('the native per-command calls check what they are given: binding to a non-handle throws a TypeError, a wrong argument rejects with EINVAL', async (t) => {
  // The binding itself, as handle.ts reaches it (not exported from the package).
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const native = require('../binding.js') as typeof import('../binding')
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { makeError } = require('../dist/errors.js') as typeof import('../errors')
  const cancel = new native.NativeCancel()
  const h = new native.NativeHandle(makeError)
  const buf = Buffer.alloc(16)
  // Another class's instance (the cancel token), plain objects and primitives: never taken
  // for a handle.
  for (const notHandle of [undefined, null, 1, 'handle', {}, [], cancel, buf, Object.create(native.NativeHandle.prototype)]) {
    const as = notHandle as unknown as InstanceType<typeof native.NativeHandle>
    t.throws(() => native.commandCalls(as), { instanceOf: TypeError, message: /commandCalls: the argument is not a NativeHandle/ })
  }
  const calls = native.commandCalls(h)
  const rejects = async (p: Promise<unknown>, op: string, message: RegExp) => {
    const e = await p.then(() => undefined, (x: unknown) => x)
    t.true(e instanceof NbdError, String(e))
    t.is((e as NbdError).code, 'EINVAL')
    t.is((e as NbdError).operation, op)
    t.regex((e as NbdError).message, message)
  }
  const asCancel = h as unknown as InstanceType<typeof native.NativeCancel>
  await rejects(calls.pread(16, 0, 0, asCancel), 'pread', /cancel must be a NativeCancel or null/)
  await rejects(calls.pread(16, 0, 0, asCancel, true), 'preadStructured', /cancel must be/)
  await rejects(calls.pread('x' as unknown as number, 0, 0, null), 'pread', /count must be a number/)
  await rejects(calls.preadInto(buf, '0' as unknown as number, 0, null), 'preadInto', /offset must be a number or a bigint/)
  await rejects(calls.preadInto(buf, 0, 0, {} as never, true), 'pread', /cancel must be/)
  await rejects(calls.pwrite(buf, 0, 'fua' as unknown as number, null), 'pwrite', /flags must be a number/)
  await rejects(calls.pwrite('not a buffer' as unknown as Buffer, 0, 0, null), 'pwrite', /buf must be a Uint8Array/)
  await rejects(calls.pwrite(buf, -1n, 0, cancel), 'pwrite', /bigint offset/)
  await rejects(calls.pread(16, 0, 0, null, 'yes' as unknown as boolean), 'pread', /structured must be a boolean/)
  await rejects(calls.preadInto(buf, 0, 0, null, 1 as unknown as boolean), 'preadInto', /fresh must be a boolean/)
  // Right arguments on a handle that never connected: refused by its state, as the methods are.
  const e = await calls.preadInto(buf, 0, 0, cancel).then(() => undefined, (x: unknown) => x)
  t.true(e instanceof NbdError && e.operation === 'preadInto', String(e))
})

test.serial('per-command calls kept after their handle was collected throw a TypeError; their native data is freed with them', async (t) => {
  t.is(typeof global.gc, 'function', 'run with --expose-gc')
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const native = require('../binding.js') as typeof import('../binding')
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { makeError } = require('../dist/errors.js') as typeof import('../errors')
  // Finalizers that napi defers run from setImmediate: give them two turns.
  const settle = async () => {
    await new Promise(setImmediate)
    await new Promise(setImmediate)
  }
  const baseline = native.liveBoundCalls()
  // handle.ts never lets this happen (a Handle holds both); the binding must survive it anyway.
  let handleGone = false
  let callsGone = false
  const registry = new FinalizationRegistry((what: string) => {
    if (what === 'handle') handleGone = true
    else callsGone = true
  })
  let calls: ReturnType<typeof native.commandCalls> | undefined = (() => {
    const h = new native.NativeHandle(makeError)
    registry.register(h, 'handle')
    return native.commandCalls(h)
  })()
  t.is(native.liveBoundCalls(), baseline + 1)
  const collected = await waitFor(() => {
    if (!handleGone) global.gc!()
    return handleGone
  }, 10_000, 20)
  t.true(collected, 'the NativeHandle was never collected: something still holds it')
  await settle()
  const buf = Buffer.alloc(16)
  t.throws(() => calls!.pread(16, 0, 0, null), { instanceOf: TypeError, message: /pread: its handle was garbage-collected/ })
  t.throws(() => calls!.preadInto(buf, 0, 0, null), { instanceOf: TypeError, message: /preadInto: its handle/ })
  t.throws(() => calls!.pwrite(buf, 0, 0, null), { instanceOf: TypeError, message: /pwrite: its handle/ })
  t.is(native.liveBoundCalls(), baseline + 1, 'freed while its functions live')
  // Dropping the functions frees what they carried.
  registry.register(calls, 'calls')
  calls = undefined
  const dropped = await waitFor(() => {
    if (!callsGone) global.gc!()
    return callsGone
  }, 10_000, 20)
  t.true(dropped, 'the calls were never collected')
  let freed = false
  for (let i = 0; i < 50 && !freed; i++) {
    global.gc!()
    await settle()
    freed = native.liveBoundCalls() === baseline
  }
  t.true(freed, `still ${native.liveBoundCalls() - baseline} bound set(s) alive after their functions were collected`)
})

test('a large pread over holes (qemu-nbd sends hole chunks) reads zeros there, never stale memory', async (t) => {
  // pread's Buffer is not zeroed when made: every byte must come from the reply.
  const server = await useQemuNbd(t, {
    format: 'raw',
    size: 4 * MiB,
    prepare: (image) => {
      const fd = fs.openSync(image, 'r+')
      fs.writeSync(fd, Buffer.alloc(64 * KiB, 7), 0, 64 * KiB, 0)
      fs.writeSync(fd, Buffer.alloc(64 * KiB, 9), 0, 64 * KiB, 3 * MiB)
      fs.closeSync(fd)
    },
  })
  if (!server) return
  const h = await openHandle(t, server)
  t.true(h.getStructuredRepliesNegotiated())
  const want = Buffer.alloc(4 * MiB)
  want.fill(7, 0, 64 * KiB)
  want.fill(9, 3 * MiB, 3 * MiB + 64 * KiB)
  for (let round = 0; round < 4; round++) {
    // Garbage in freed memory, for the next Buffers to be made from.
    for (let i = 0; i < 32; i++) Buffer.allocUnsafeSlow(4 * MiB).fill(0xaa)
    const chunks = await h.preadStructured(4 * MiB, 0)
    t.true(chunks.chunks.some((c) => c.status === 'hole'), 'the server sent holes')
    t.true((await h.pread(4 * MiB, 0)).equals(want), `round ${round}`)
    t.true((await h.pread(MiB + 4096, 2 * MiB + 4096)).equals(want.subarray(2 * MiB + 4096, 3 * MiB + 8192)))
  }
})
