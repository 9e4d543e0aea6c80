// Real NBD peers for the specs: nbdkit, qemu-nbd and nbd-server, each on a private Unix socket in
// a fresh temporary directory (or on a free TCP port on 127.0.0.1), started and awaited until
// they accept, and stopped again (kill, await exit, remove the directory).
//
// Nothing may outlive the test process: nbdkit gets --exit-with-parent, qemu-nbd runs under
// `setpriv --pdeathsig KILL`, and nbd-server (which has no foreground mode that serves more than
// one client: its -d flag exits after the first connection) is daemonised with a pidfile and
// watched by a small shell loop that kills it once this process is gone.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import type { ExecutionContext } from 'ava'

export interface Server {
  /** Which program serves the export. */
  kind: 'nbdkit' | 'qemu-nbd' | 'nbd-server'
  /** Unix socket path, when listening on one. */
  socket?: string
  /** TCP port on 127.0.0.1, when listening on one. */
  port?: number
  /** The export name a client must ask for ('' when the server ignores names). */
  exportName: string
  /** An NBD URI for the export, for the independent client tools (nbdinfo, nbdcopy). */
  uri: string
  pid: number
  /** The private temporary directory (socket, image, config). */
  dir: string
  /** Backing file of the export, for qemu-nbd and nbd-server. */
  image?: string
  /** Resolves once the server process has exited. */
  exited: Promise<void>
  /** Sends a signal to the server without waiting. */
  kill(signal?: NodeJS.Signals): void
  /** Kills the server, waits for it to exit and removes its directory. Idempotent. */
  stop(): Promise<void>
}

export interface ListenOptions {
  /** Listen on a free TCP port on 127.0.0.1 instead of a Unix socket. */
  tcp?: boolean
}

export interface NbdkitOptions extends ListenOptions {
  /** Oldstyle handshake (`nbdkit -o`). */
  oldstyle?: boolean
  /** Plain (not fixed) newstyle handshake (`nbdkit --mask-handshake=0`). */
  plainNewstyle?: boolean
  /** Serve read-only (`nbdkit -r`). */
  readOnly?: boolean
  /** More nbdkit flags, placed before the plugin name (e.g. `--filter=delay`). */
  extraArgs?: string[]
}

export interface QemuNbdOptions extends ListenOptions {
  /** Image format: a fresh image of `size` bytes is made with qemu-img. Default 'raw'. */
  format?: 'raw' | 'qcow2'
  /** Size of the image in bytes. Default 16 MiB. */
  size?: number
  /** Export name (`-x`). Default 'disk'. */
  exportName?: string
  /** How many clients may be connected at once (`--shared`). Default 8. */
  shared?: number
  readOnly?: boolean
  /** Export description (`-D`). */
  description?: string
  /** More qemu-nbd flags (e.g. `-A`, `-B`, `b0`). */
  extraArgs?: string[]
  /**
   * Prepares the image before qemu-nbd starts (e.g. a bitmap with `qemu-img bitmap`, data
   * with `qemu-io`); may return another image to serve (e.g. the top of a backing chain).
   */
  prepare?: (image: string, dir: string) => string | void
}

export interface NbdServerOptions extends ListenOptions {
  /** Size of the backing file in bytes. Default 16 MiB. */
  size?: number
  /** Export (section) name. Default 'disk'. */
  exportName?: string
  readOnly?: boolean
  /** More exports, each a sparse file of the same size. */
  extraExports?: string[]
}

const running = new Set<Server>()

// A last resort for a worker that ends without running teardowns: synchronous kills only.
process.on('exit', () => {
  for (const server of running) {
    try {
      server.kill('SIGKILL')
    } catch {
      // already gone
    }
  }
})

/** True when `name` is an executable somewhere on PATH. */
export function hasTool(name: string): boolean {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue
    try {
      fs.accessSync(path.join(dir, name), fs.constants.X_OK)
      return true
    } catch {
      // keep looking
    }
  }
  return false
}

/**
 * Guard for a test that needs an external program. A missing program is never a silent skip:
 * it fails the test, unless NBD_ALLOW_MISSING_SERVERS=1 is set outside CI, in which case the
 * test passes with a loud log line. Returns whether the test may go on.
 */
export function requireTool(t: ExecutionContext, ...names: string[]): boolean {
  const missing = names.filter((name) => !hasTool(name))
  if (missing.length === 0) return true
  const message = `MISSING SERVER/TOOL: ${missing.join(', ')} not found on PATH; this test did NOT run`
  if (process.env.CI || process.env.NBD_ALLOW_MISSING_SERVERS !== '1') {
    t.fail(`${message} (install nbdkit, qemu-utils, nbd-server and libnbd-bin; set NBD_ALLOW_MISSING_SERVERS=1 outside CI to tolerate this)`)
  } else {
    console.warn(`\n*** ${message} (tolerated by NBD_ALLOW_MISSING_SERVERS=1) ***\n`)
    t.log(`*** ${message} ***`)
    t.pass()
  }
  return false
}

/** A fresh private directory under the system temp dir. */
export function makeTempDir(prefix = 'nbd-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix))
}

const portsHandedOut = new Set<number>()

/**
 * A TCP port on 127.0.0.1 that was free a moment ago, and not handed out before by this
 * process (so concurrent tests in one worker never race for the same port).
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const probe = net.createServer()
      probe.unref()
      probe.once('error', reject)
      probe.listen(0, '127.0.0.1', () => {
        const { port } = probe.address() as net.AddressInfo
        probe.close(() => resolve(port))
      })
    })
    if (!portsHandedOut.has(port)) {
      portsHandedOut.add(port)
      return port
    }
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

function tryConnect(target: { socket?: string; port?: number }): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = target.socket
      ? net.connect(target.socket)
      : net.connect(target.port!, '127.0.0.1')
    const done = (ok: boolean) => {
      sock.destroy()
      resolve(ok)
    }
    sock.once('connect', () => done(true))
    sock.once('error', () => done(false))
  })
}

function uriFor(target: { socket?: string; port?: number }, exportName: string): string {
  const name = encodeURIComponent(exportName)
  return target.socket
    ? `nbd+unix:///${name}?socket=${target.socket}`
    : `nbd://127.0.0.1:${target.port}/${name}`
}

function isAlive(pid: number): boolean {
  try {
    // A zombie still answers kill(0); its /proc state says 'Z'.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
    return !/^\d+ \(.*\) Z/.test(stat)
  } catch {
    return false
  }
}

interface Started {
  pid: number
  exited: Promise<void>
  stderr: () => string
  /** Keeps the event loop alive until the server exits (children are unref'd otherwise). */
  ref?: () => void
}

interface Launch {
  kind: Server['kind']
  dir: string
  target: { socket?: string; port?: number }
  exportName: string
  image?: string
  /** Starts the process; returns the pid of the server and a promise of its exit. */
  start(): Started
  /** Extra clean-up after the server is gone. */
  cleanup?: () => void
}

async function launch(spec: Launch): Promise<Server> {
  let started: Started
  try {
    started = spec.start()
  } catch (err) {
    fs.rmSync(spec.dir, { recursive: true, force: true })
    throw err
  }
  const { pid, exited, stderr, ref } = started
  let gone = false
  exited.then(() => {
    gone = true
  })
  const server: Server = {
    kind: spec.kind,
    ...spec.target,
    exportName: spec.exportName,
    uri: uriFor(spec.target, spec.exportName),
    pid,
    dir: spec.dir,
    image: spec.image,
    exited,
    kill(signal: NodeJS.Signals = 'SIGTERM') {
      try {
        process.kill(pid, signal)
      } catch {
        // already gone
      }
    },
    stop: once(async () => {
      running.delete(server)
      ref?.()
      server.kill('SIGTERM')
      const timer = setTimeout(() => server.kill('SIGKILL'), 3000)
      await exited
      clearTimeout(timer)
      spec.cleanup?.()
      fs.rmSync(spec.dir, { recursive: true, force: true })
    }),
  }
  running.add(server)

  const deadline = Date.now() + 15_000
  for (;;) {
    if (gone) {
      await server.stop()
      throw new Error(`${spec.kind} exited before accepting connections: ${stderr()}`)
    }
    if ((!spec.target.socket || fs.existsSync(spec.target.socket)) && (await tryConnect(spec.target))) {
      return server
    }
    if (Date.now() > deadline) {
      await server.stop()
      throw new Error(`${spec.kind} did not accept connections within 15 s: ${stderr()}`)
    }
    await sleep(20)
  }
}

function once<T>(fn: () => Promise<T>): () => Promise<T> {
  let result: Promise<T> | undefined
  return () => (result ??= fn())
}

/** Spawns a foreground server; stderr is kept for diagnostics. */
function spawnForeground(argv: string[], cwd: string): Started {
  const child: ChildProcess = spawn(argv[0], argv.slice(1), { cwd, stdio: ['ignore', 'ignore', 'pipe'] })
  let err = ''
  child.stderr!.setEncoding('utf8')
  child.stderr!.on('data', (chunk: string) => {
    if (err.length < 8192) err += chunk
  })
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve()
    else child.once('exit', () => resolve())
    child.once('error', (e) => {
      err += String(e)
      resolve()
    })
  })
  // The test process must not wait for servers to exit on its own, only while stopping them.
  const stderrHandle = child.stderr as unknown as { ref?: () => void; unref?: () => void }
  child.unref()
  stderrHandle.unref?.()
  const ref = () => {
    child.ref()
    stderrHandle.ref?.()
  }
  return { pid: child.pid ?? -1, exited, stderr: () => err, ref }
}

async function listenTarget(dir: string, opts: ListenOptions): Promise<{ socket?: string; port?: number }> {
  return opts.tcp ? { port: await freePort() } : { socket: path.join(dir, 'sock') }
}

/**
 * Starts nbdkit in the foreground: `await startNbdkit(['memory', '64M'])`,
 * `startNbdkit(['--filter=delay', 'memory', '64M', 'rdelay=2'])`.
 */
export async function startNbdkit(args: string[], opts: NbdkitOptions = {}): Promise<Server> {
  const dir = makeTempDir('nbdkit-')
  const target = await listenTarget(dir, opts)
  const argv = ['nbdkit', '-f', '--exit-with-parent']
  if (target.socket) argv.push('-U', target.socket)
  else argv.push('-i', '127.0.0.1', '-p', String(target.port))
  if (opts.oldstyle) argv.push('-o')
  if (opts.plainNewstyle) argv.push('--mask-handshake=0')
  if (opts.readOnly) argv.push('-r')
  argv.push(...(opts.extraArgs ?? []), ...args)
  return launch({ kind: 'nbdkit', dir, target, exportName: '', start: () => spawnForeground(argv, dir) })
}

/** Makes a fresh raw or qcow2 image with qemu-img and serves it with qemu-nbd. */
export async function startQemuNbd(opts: QemuNbdOptions = {}): Promise<Server> {
  const dir = makeTempDir('qemu-nbd-')
  const format = opts.format ?? 'raw'
  const size = opts.size ?? 16 * 1024 * 1024
  const exportName = opts.exportName ?? 'disk'
  const image = path.join(dir, `disk.${format}`)
  const made = spawnSync('qemu-img', ['create', '-q', '-f', format, image, String(size)], { encoding: 'utf8' })
  if (made.status !== 0) throw new Error(`qemu-img create failed: ${made.stderr}`)
  const served = opts.prepare?.(image, dir) ?? image
  const target = await listenTarget(dir, opts)
  const argv = ['setpriv', '--pdeathsig', 'KILL', 'qemu-nbd', '-f', format, '-x', exportName,
    '--persistent', `--shared=${opts.shared ?? 8}`]
  if (target.socket) argv.push('-k', target.socket)
  else argv.push('-b', '127.0.0.1', '-p', String(target.port))
  if (opts.readOnly) argv.push('-r')
  if (opts.description !== undefined) argv.push('-D', opts.description)
  argv.push(...(opts.extraArgs ?? []), served)
  return launch({ kind: 'qemu-nbd', dir, target, exportName, image: served, start: () => spawnForeground(argv, dir) })
}

/** Serves a sparse file of `size` bytes with nbd-server (fixed newstyle only). */
export async function startNbdServer(opts: NbdServerOptions = {}): Promise<Server> {
  const dir = makeTempDir('nbd-server-')
  const size = opts.size ?? 16 * 1024 * 1024
  const exportName = opts.exportName ?? 'disk'
  const image = path.join(dir, 'disk.img')
  fs.writeFileSync(image, '')
  fs.truncateSync(image, size)
  const target = await listenTarget(dir, opts)
  const listen = target.socket
    ? `unixsock = ${target.socket}\n`
    : `port = ${target.port}\nlistenaddr = 127.0.0.1\n`
  const config = path.join(dir, 'config')
  let sections = `[${exportName}]\nexportname = ${image}\nreadonly = ${opts.readOnly ? 'true' : 'false'}\n`
  for (const [i, name] of (opts.extraExports ?? []).entries()) {
    const file = path.join(dir, `extra${i}.img`)
    fs.writeFileSync(file, '')
    fs.truncateSync(file, size)
    sections += `[${name}]\nexportname = ${file}\n`
  }
  fs.writeFileSync(config, `[generic]\n${listen}allowlist = true\n` + sections)
  const pidFile = path.join(dir, 'pid')

  let watchdog: ChildProcess | undefined
  const start = (): Started => {
    // nbd-server forks into the background; its parent exits once the child is listening.
    const res = spawnSync('nbd-server', ['-C', config, '-p', pidFile], { cwd: dir, encoding: 'utf8' })
    if (res.status !== 0) throw new Error(`nbd-server failed to start: ${res.stderr}`)
    let pid = -1
    const until = Date.now() + 5000
    while (pid < 0 && Date.now() < until) {
      try {
        pid = Number(fs.readFileSync(pidFile, 'utf8').trim()) || -1
      } catch {
        spawnSync('sleep', ['0.02'])
      }
    }
    if (pid < 0) throw new Error(`nbd-server wrote no pidfile: ${res.stderr}`)
    // Kills the daemon if this process dies without stopping it.
    watchdog = spawn('sh', ['-c', `while kill -0 ${process.pid} 2>/dev/null && kill -0 ${pid} 2>/dev/null; do sleep 1; done; kill -9 ${pid} 2>/dev/null`],
      { stdio: 'ignore', detached: true })
    watchdog.unref()
    const exited = (async () => {
      while (isAlive(pid)) await sleep(20)
    })()
    return { pid, exited, stderr: () => res.stderr }
  }
  return launch({
    kind: 'nbd-server', dir, target, exportName, image, start,
    cleanup: () => {
      try {
        if (watchdog?.pid) process.kill(watchdog.pid, 'SIGKILL')
      } catch {
        // already gone
      }
    },
  })
}

/**
 * Starts a server for one test and stops it in the test's teardown. Returns undefined (after
 * requireTool has failed or loudly logged the test) when the program is missing.
 */
export async function useServer<T extends Server>(
  t: ExecutionContext,
  tools: string[],
  start: () => Promise<T>,
): Promise<T | undefined> {
  if (!requireTool(t, ...tools)) return undefined
  const server = await start()
  t.teardown(() => server.stop())
  return server
}

export const useNbdkit = (t: ExecutionContext, args: string[], opts?: NbdkitOptions) =>
  useServer(t, ['nbdkit'], () => startNbdkit(args, opts))

export const useQemuNbd = (t: ExecutionContext, opts?: QemuNbdOptions) =>
  useServer(t, ['qemu-nbd', 'qemu-img', 'setpriv'], () => startQemuNbd(opts))

export const useNbdServer = (t: ExecutionContext, opts?: NbdServerOptions) =>
  useServer(t, ['nbd-server'], () => startNbdServer(opts))
