// File descriptor helpers for the connectSocket ownership contract: is an fd open, which object
// does it name, and fds of every kind connectSocket must refuse (regular file, pipe, listening
// socket, closed number) or accept (a connected stream socket).
import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import { sleep } from './servers'

/** Open fd numbers of this process (the directory handle used to list them included). */
export function listOpenFds(): number[] {
  return fs.readdirSync('/proc/self/fd').map(Number).sort((a, b) => a - b)
}

export function countOpenFds(): number {
  return listOpenFds().length
}

/** Whether `fd` is open: fstat fails with EBADF on a closed number. */
export function isFdOpen(fd: number): boolean {
  try {
    fs.fstatSync(fd)
    return true
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EBADF') return false
    throw err
  }
}

/**
 * What `fd` names, e.g. 'socket:[123456]' or a file path; undefined when closed. Comparing it
 * before and after tells "still the same open object" apart from "the number was reused".
 */
export function fdTarget(fd: number): string | undefined {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`)
  } catch {
    return undefined
  }
}

/** Polls `predicate` until it holds or `timeoutMs` passes; returns its last value. */
export async function waitFor(predicate: () => boolean, timeoutMs = 5000, intervalMs = 20): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (predicate()) return true
    if (Date.now() >= deadline) return false
    await sleep(intervalMs)
  }
}

/** An fd of a regular file in `dir`. The caller closes it. */
export function regularFileFd(dir: string): number {
  const file = path.join(dir, 'regular-file')
  fs.writeFileSync(file, 'not a socket')
  return fs.openSync(file, 'r+')
}

/**
 * An fd of a pipe (a FIFO made with mkfifo, opened read-write so the open does not block).
 * Unlike a pipe from child_process (which libuv makes as a socketpair), this is a real pipe,
 * and Node does not track it. The caller closes it.
 */
export function pipeFd(dir: string): number {
  const fifo = path.join(dir, 'fifo')
  const made = spawnSync('mkfifo', [fifo], { encoding: 'utf8' })
  if (made.status !== 0) throw new Error(`mkfifo failed: ${made.stderr}`)
  return fs.openSync(fifo, 'r+')
}

/** A number that names no open fd right now. */
export function closedFdNumber(): number {
  for (let fd = 1000; ; fd++) if (!isFdOpen(fd)) return fd
}

// Node has no public way to get a socket's fd, nor to let go of one. `socket._handle.fd` is an
// internal of net.Socket that libuv fills in on Linux (for both Pipe and TCP handles); it is
// the only way to obtain a connected socket fd inside this process without a native addon.
// Node would still close that fd when the net.Socket is destroyed, so a socket whose fd is
// handed to connectSocket is kept here, paused and unreferenced, and never touched again: Node
// then neither reads from it (it was paused before the connection completed, so no handshake
// byte is consumed) nor closes it, and the handle is its only user.
const handedOver: net.Socket[] = []

function handleFd(obj: net.Socket | net.Server): number {
  const fd = (obj as unknown as { _handle?: { fd?: number } })._handle?.fd
  if (typeof fd !== 'number' || fd < 0) throw new Error('no fd on this Node handle (Linux only)')
  return fd
}

/**
 * A connected stream socket fd to a Unix socket path or a TCP port on 127.0.0.1, for
 * connectSocket. Ownership goes to whoever receives it: Node will not close or read it.
 */
export function connectedSocketFd(target: { socket?: string; port?: number }): Promise<number> {
  return new Promise((resolve, reject) => {
    const sock = target.socket ? net.connect(target.socket) : net.connect(target.port!, '127.0.0.1')
    // Paused before 'connect', Node never starts reading, so the server's greeting stays unread.
    sock.pause()
    sock.once('error', reject)
    sock.once('connect', () => {
      sock.removeListener('error', reject)
      sock.on('error', () => {
        // the handle owns the fd now; its errors are not ours
      })
      sock.unref()
      handedOver.push(sock)
      resolve(handleFd(sock))
    })
  })
}

/** A listening Unix socket and its fd (still owned by Node: close it with close()). */
export async function listeningSocket(dir: string): Promise<{ fd: number; close(): Promise<void> }> {
  const server = net.createServer()
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(path.join(dir, 'listening.sock'), resolve)
  })
  server.unref()
  return { fd: handleFd(server), close: () => new Promise((resolve) => server.close(() => resolve())) }
}

/**
 * A Unix socket server in `dir` that runs `onConnection` for every client instead of speaking
 * NBD (to send garbage, hang up, or stay silent). close() ends it and every connection.
 */
export async function rawServer(
  dir: string,
  onConnection: (sock: net.Socket) => void,
): Promise<{ socket: string; connections: number; close(): Promise<void> }> {
  const socketPath = path.join(dir, 'raw.sock')
  const clients = new Set<net.Socket>()
  const server = net.createServer((sock) => {
    result.connections++
    clients.add(sock)
    sock.on('error', () => {})
    sock.on('close', () => clients.delete(sock))
    onConnection(sock)
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(socketPath, resolve)
  })
  server.unref()
  const result = {
    socket: socketPath,
    connections: 0,
    close: () =>
      new Promise<void>((resolve) => {
        for (const sock of clients) sock.destroy()
        server.close(() => resolve())
      }),
  }
  return result
}
