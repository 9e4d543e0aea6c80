// Body of the worker_threads used by 900-concurrency.spec.ts (plain CommonJS: a worker loads it
// without the test's TypeScript loader). workerData.mode chooses what it does:
//
//   io     open `handles` handles to `socket`, run `ops` reads and writes (`depth` in flight per
//          handle) in the worker's own region of the export, check every byte read back, close,
//          and post { ok, ops, errors }.
//   flood  open a handle to `socket`, start `count` commands (pread, preadInto, pwrite, zero)
//          and post { flooded: inFlight }; then wait to be terminated.
//   load   wait on the shared `barrier` so that every worker loads the addon at the same moment,
//          then do a round trip with an EmbeddedServer and post { ok, version }.
'use strict'

const path = require('node:path')
const { parentPort, workerData, threadId } = require('node:worker_threads')

const root = path.join(__dirname, '..', '..')

function bytes(length, seed) {
  const out = Buffer.allocUnsafe(length)
  let x = (seed * 2654435761) >>> 0 || 1
  for (let i = 0; i < length; i++) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    out[i] = x & 0xff
  }
  return out
}

async function io({ socket, handles, ops, depth, region, regionSize, block }) {
  const { Handle } = require(path.join(root, 'dist', 'index.js'))
  const hs = []
  for (let i = 0; i < handles; i++) {
    const h = new Handle()
    await h.connectUnix(socket)
    hs.push(h)
  }
  const blocks = regionSize / block
  // What each block of this worker's region should hold (undefined: never written).
  const expected = new Array(blocks)
  let done = 0
  let errors = 0
  let next = 0
  async function lane(h, lane) {
    while (next < ops) {
      const n = next++
      // Each lane owns the blocks congruent to it, so no two commands race on one block.
      const b = ((n * 7919) % Math.floor(blocks / (handles * depth))) * handles * depth + lane
      const offset = region + b * block
      if (n % 3 === 0 || expected[b] === undefined) {
        const data = bytes(block, threadId * 1_000_003 + n)
        await h.pwrite(data, offset)
        expected[b] = data
      } else {
        const got = n % 2 ? await h.pread(block, offset) : Buffer.alloc(block)
        if (!(n % 2)) await h.preadInto(got, offset)
        if (!got.equals(expected[b])) errors++
      }
      done++
    }
  }
  const lanes = []
  hs.forEach((h, i) => {
    for (let d = 0; d < depth; d++) lanes.push(lane(h, i * depth + d))
  })
  await Promise.all(lanes)
  await Promise.all(hs.map((h) => h.close()))
  return { ok: errors === 0, ops: done, errors }
}

async function flood({ socket, count }) {
  const { Handle } = require(path.join(root, 'dist', 'index.js'))
  const h = new Handle()
  await h.connectUnix(socket)
  for (let i = 0; i < count; i++) {
    const offset = (i % 1024) * 4096
    const p =
      i % 4 === 0 ? h.pread(4096, offset)
      : i % 4 === 1 ? h.preadInto(Buffer.alloc(4096), offset)
      : i % 4 === 2 ? h.pwrite(Buffer.alloc(4096, i & 0xff), offset)
      : h.zero(4096, offset)
    p.catch(() => {})
  }
  parentPort.postMessage({ flooded: h.inFlight })
  // Stays alive (the pending commands keep the event loop busy) until terminated.
  setInterval(() => {}, 1000)
}

async function load({ barrier }) {
  // Everyone loads the addon at the same moment.
  const flag = new Int32Array(barrier)
  Atomics.add(flag, 0, 1)
  Atomics.notify(flag, 0)
  while (Atomics.load(flag, 0) < flag[1]) Atomics.wait(flag, 0, Atomics.load(flag, 0), 50)
  const { Handle, version } = require(path.join(root, 'dist', 'index.js'))
  const { EmbeddedServer } = require(path.join(root, 'dist', 'testing.js'))
  const server = new EmbeddedServer({ size: 1024 * 1024 })
  try {
    const h = new Handle()
    await h.connectSocket(server.socketpair())
    const data = bytes(64 * 1024, threadId)
    await h.pwrite(data, 4096)
    const back = await h.pread(data.length, 4096)
    await h.close()
    return { ok: back.equals(data) && server.read(4096, data.length).equals(data), version }
  } finally {
    server.close()
  }
}

const modes = { io, flood, load }
modes[workerData.mode](workerData).then(
  (result) => {
    if (result !== undefined) parentPort.postMessage(result)
  },
  (err) => parentPort.postMessage({ ok: false, error: `${err && err.code}: ${err && err.message}` }),
)
