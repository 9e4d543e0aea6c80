// Concurrency and lifetime: handles that are never closed (garbage collection closes their
// sockets), handles in several worker_threads at once, a worker terminated with thousands of
// commands in flight, and the addon loaded by several workers at once (and by workers only).
// These tests count this process's open fds, so they run one at a time.
import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import { Worker } from 'node:worker_threads'
import test, { type ExecutionContext } from 'ava'
import { Handle, NbdError } from 'nbd-client'
import { countOpenFds, listOpenFds, rawServer, waitFor } from './helpers/fds'
import { openHandle, seededBytes, KiB, MiB } from './helpers/nbd'
import { makeTempDir, sleep, startNbdkit, useNbdkit, type Server } from './helpers/servers'

const WORKER = path.join(__dirname, 'helpers', 'worker.js')
const ROOT = path.join(__dirname, '..')

const gc = (globalThis as { gc?: () => void }).gc

/** Collects garbage until `predicate` holds (finalizers run between collections), or times out. */
async function collectUntil(predicate: () => boolean, timeoutMs = 5000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    gc!()
    await sleep(20)
    if (predicate()) return true
    if (Date.now() > deadline) return false
  }
}

function describeFds(baseline: string[]): string {
  const now = listOpenFds().map(String)
  const extra = now.filter((fd) => !baseline.includes(fd))
  return extra.map((fd) => {
    try {
      return `${fd}->${fs.readlinkSync(`/proc/self/fd/${fd}`)}`
    } catch {
      return `${fd} (gone)`
    }
  }).join(', ')
}

/** Opens a handle to `server` and uses it, keeping no reference to it. */
async function forgottenHandle(server: Server, pending: Promise<unknown>[], withPending: boolean): Promise<void> {
  const h = new Handle()
  await h.connectUnix(server.socket!)
  // Writes are not delayed; reads are (by 15 s), so a read stays pending.
  await h.pwrite(Buffer.alloc(4096, 1), 0)
  await h.flush()
  if (withPending) pending.push(h.pread(4096, 8192).then(() => 'resolved', (e: unknown) => e))
}

/** Starts a connect to a server that never answers, keeping no reference to the handle. */
function forgottenConnect(socket: string, pending: Promise<unknown>[]): void {
  const h = new Handle()
  pending.push(h.connectUnix(socket).then(() => 'resolved', (e: unknown) => e))
}

/** Warms up the native side (runtime threads, epoll) so that it does not count as a leak. */
async function warmUp(server: Server): Promise<void> {
  const h = new Handle()
  await h.connectUnix(server.socket!)
  await h.pwrite(Buffer.alloc(512), 0)
  await h.close()
}

test.serial('handles that are never closed are closed by garbage collection: fds return to the baseline', async (t) => {
  t.truthy(gc, 'run with --expose-gc')
  const server = await useNbdkit(t, ['memory', '16M', 'rdelay=15'], { extraArgs: ['--filter=delay'] })
  if (!server) return
  const dir = makeTempDir('nbd-gc-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const silent = await rawServer(dir, () => {})
  t.teardown(() => silent.close())
  await warmUp(server)
  await collectUntil(() => false, 200)
  const baselineList = listOpenFds().map(String)
  const baseline = baselineList.length

  const pending: Promise<unknown>[] = []
  const N = 20
  // Idle handles, handles with a read pending (the server delays it 3 s), and handles stuck
  // connecting to a server that never answers.
  for (let i = 0; i < N; i++) await forgottenHandle(server, pending, i % 2 === 1)
  for (let i = 0; i < 5; i++) forgottenConnect(silent.socket, pending)
  t.true(await waitFor(() => silent.connections === 5, 30_000))
  const opened = countOpenFds()
  t.log(`fds: ${baseline} before, ${opened} with ${N + 5} forgotten handles`)
  t.true(opened >= baseline + N + 5, `only ${opened - baseline} new fds`)

  const started = Date.now()
  const collected = await collectUntil(() => countOpenFds() <= baseline, 10_000)
  t.log(`back to ${countOpenFds()} fds after ${Date.now() - started} ms of collecting`)
  t.true(collected, `still open after gc: ${describeFds(baselineList)}`)
  // Nothing they started stays pending: the reads fail ENOTCONN, the connects ECANCELED.
  const outcomes = await Promise.all(pending)
  const codes = outcomes.map((o) => (o instanceof NbdError ? o.code : String(o)))
  t.deepEqual(codes.filter((c) => c !== 'ENOTCONN' && c !== 'ECANCELED'), [])
  t.is(codes.filter((c) => c === 'ECANCELED').length, 5)
  t.is(codes.filter((c) => c === 'ENOTCONN').length, N / 2)
})

// ---- worker_threads -------------------------------------------------------------------------

interface WorkerResult {
  ok?: boolean
  error?: string
  ops?: number
  errors?: number
  flooded?: number
  version?: string
}

function startWorker(data: Record<string, unknown>): { worker: Worker; message: Promise<WorkerResult>; exit: Promise<number> } {
  const worker = new Worker(WORKER, { workerData: data })
  const message = new Promise<WorkerResult>((resolve, reject) => {
    worker.once('message', resolve)
    worker.once('error', reject)
    worker.once('exit', (code) => reject(new Error(`worker exited (${code}) before answering`)))
  })
  const exit = new Promise<number>((resolve) => worker.once('exit', resolve))
  return { worker, message, exit }
}

function memoryServer(t: ExecutionContext, size: number): Promise<Server | undefined> {
  return useNbdkit(t, ['memory', String(size)])
}

test.serial('4 workers with 2 handles each read and write at once; every byte checks out', async (t) => {
  const server = await memoryServer(t, 64 * MiB)
  if (!server) return
  const REGION = 8 * MiB
  const workers = Array.from({ length: 4 }, (_, i) =>
    startWorker({ mode: 'io', socket: server.socket, handles: 2, ops: 3000, depth: 8, region: i * REGION, regionSize: REGION, block: 4 * KiB }))
  // The main thread keeps working meanwhile.
  const h = await openHandle(t, server)
  const mine = seededBytes(64 * KiB, 900)
  for (let i = 0; i < 50; i++) {
    await h.pwrite(mine, 48 * MiB + i * 64 * KiB)
    t.deepEqual(await h.pread(mine.length, 48 * MiB + i * 64 * KiB), mine)
  }
  const results = await Promise.all(workers.map((w) => w.message))
  for (const r of results) {
    t.true(r.ok, JSON.stringify(r))
    t.is(r.ops, 3000)
  }
  t.deepEqual(await Promise.all(workers.map((w) => w.exit)), [0, 0, 0, 0])
  t.is(h.state, 'ready')
})

test.serial('terminating a worker with thousands of commands in flight leaves the process healthy', async (t) => {
  // The main thread's handle talks to a server of its own: nbdkit 1.32 can abort (assertion
  // `sock >= 0' in raw_send_socket) when a client vanishes with replies pending, which is just
  // what a terminated worker does, so each round floods a fresh server.
  const mainServer = await memoryServer(t, 16 * MiB)
  if (!mainServer) return
  await warmUp(mainServer)
  // A handle of the main thread, open across the terminations.
  const before = await openHandle(t, mainServer)
  const baselineList = listOpenFds().map(String)
  const baseline = baselineList.length
  for (let round = 0; round < 3; round++) {
    const flooded = await startNbdkit(['memory', String(16 * MiB), 'rdelay=200ms', 'wdelay=200ms'], { extraArgs: ['--filter=delay'] })
    try {
      const w = startWorker({ mode: 'flood', socket: flooded.socket, count: 5000 })
      const reply = await w.message
      t.true((reply.flooded ?? 0) > 4000, `round ${round}: ${JSON.stringify(reply)}`)
      await sleep(50)
      await w.worker.terminate()
      // The main thread's handle, the runtime under it, and new handles all still work.
      const data = seededBytes(8 * KiB, round)
      await before.pwrite(data, MiB)
      t.deepEqual(await before.pread(data.length, MiB), data)
      const fresh = new Handle()
      await fresh.connectUnix(mainServer.socket!)
      await fresh.pwrite(data, 2 * MiB)
      t.deepEqual(await fresh.pread(data.length, 2 * MiB), data)
      await fresh.close()
    } finally {
      await flooded.stop()
    }
    t.true(await waitFor(() => countOpenFds() <= baseline, 5000), `round ${round}: left open: ${describeFds(baselineList)}`)
  }
  t.is(before.state, 'ready')
})

test.serial('the addon loads in 4 workers at the same moment, and each uses it', async (t) => {
  const barrier = new SharedArrayBuffer(8)
  new Int32Array(barrier)[1] = 4
  const workers = Array.from({ length: 4 }, () => startWorker({ mode: 'load', barrier }))
  const results = await Promise.all(workers.map((w) => w.message))
  for (const r of results) t.true(r.ok, JSON.stringify(r))
  t.deepEqual(await Promise.all(workers.map((w) => w.exit)), [0, 0, 0, 0])
  // The main thread's copy is unaffected by the workers' coming and going.
  const { EmbeddedServer } = await import('nbd-client/testing')
  const server = new EmbeddedServer({ size: MiB })
  t.teardown(() => server.close())
  const h = new Handle()
  t.teardown(() => h.close())
  await h.connectSocket(server.socketpair())
  t.is((await h.pread(512, 0)).length, 512)
})

test.serial('a process where only workers load the addon, one after another, stays healthy', (t) => {
  // Here the addon's last user goes away between workers, so its runtime stops and starts again.
  const script = `
    const { Worker } = require('node:worker_threads')
    const run = () => new Promise((resolve, reject) => {
      const barrier = new SharedArrayBuffer(8)
      new Int32Array(barrier)[1] = 1
      const w = new Worker(${JSON.stringify(WORKER)}, { workerData: { mode: 'load', barrier } })
      w.once('message', (m) => (m.ok ? resolve() : reject(new Error(JSON.stringify(m)))))
      w.once('error', reject)
    })
    ;(async () => {
      for (let i = 0; i < 3; i++) await run()
      console.log('ok')
    })().catch((e) => { console.error(e); process.exit(1) })
  `
  const res = spawnSync(process.execPath, ['-e', script], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 })
  t.is(res.status, 0, `stderr: ${res.stderr}`)
  t.is(res.stdout.trim(), 'ok')
})
