/**
 * `nbd-client/testing`: an NBD server that runs inside the Node.js process.
 *
 * {@link EmbeddedServer} serves a zero-filled, memory-backed export, so demos, examples and
 * tests can exercise a real NBD connection without installing nbdkit, qemu-nbd or any other
 * system package. Reach it through a socket pair ({@link EmbeddedServer.socketpair} with
 * `Handle.connectSocket`), a Unix socket ({@link EmbeddedServer.listenUnix}) or a TCP port on
 * 127.0.0.1 ({@link EmbeddedServer.listenTcp}). Each connection is served on its own native
 * thread, so the server never blocks the event loop, even while the same process awaits the
 * client side.
 *
 * It is deliberately small (it is built on the Rust `nbd` crate), and what a client negotiates
 * with it is fixed:
 *
 * - fixed-newstyle handshake only: `NBD_OPT_GO`, `NBD_OPT_INFO` and `NBD_OPT_STRUCTURED_REPLY`
 *   are refused as unsupported, so clients fall back to `NBD_OPT_EXPORT_NAME` and no block-size
 *   constraints or export description are sent;
 * - simple replies only (no structured replies, no meta contexts, no block status);
 * - one export, named by `exportName` (default `''`); any other name ends the connection;
 * - `NBD_FLAG_SEND_FLUSH` on a writable export, `NBD_FLAG_READ_ONLY` on a read-only one,
 *   `NBD_FLAG_ROTATIONAL` on request; no trim, zero, FUA, cache or multi-conn;
 * - a read starting at or beyond the end of the export gets an `EINVAL` reply; a read running
 *   past the end, or any refused write (`EPERM` when read-only, `ENOSPC` past the end), ends the
 *   connection after its reply.
 *
 * Use nbdkit or qemu-nbd to test anything beyond that.
 *
 * @example
 * ```ts
 * import { Handle } from 'nbd-client'
 * import { EmbeddedServer } from 'nbd-client/testing'
 *
 * using server = new EmbeddedServer({ size: 16 * 1024 * 1024 })
 * const h = new Handle()
 * await h.connectSocket(server.socketpair())
 * await h.pwrite(Buffer.from('hello'), 0)
 * console.log(server.read(0, 5).toString()) // 'hello'
 * await h.close()
 * ```
 *
 * @packageDocumentation
 */

import type * as Binding from './binding'
import { native } from './native'

/** Options of {@link EmbeddedServer}'s constructor. Every field is optional. */
export interface EmbeddedServerOptions {
  /** Export size in bytes: a positive safe integer. Default 64 MiB. */
  size?: number
  /** Advertise the export as read-only; clients' writes are refused with `EPERM`. Default false. */
  readOnly?: boolean
  /** The only export name the server accepts. Default `''` (the default export). */
  exportName?: string
  /** Advertise rotational media (`NBD_FLAG_ROTATIONAL`). Default false. */
  rotational?: boolean
}

/**
 * An in-process, memory-backed NBD server for demos and tests.
 *
 * All connections share one export; bytes written by a client are visible to every other
 * client and to {@link EmbeddedServer.read} at once. Call {@link EmbeddedServer.close} (or
 * declare it with `using`) to stop listening; the memory is released once the server object
 * and all its connections are gone.
 */
export class EmbeddedServer {
  readonly #native: Binding.EmbeddedServer

  /**
   * Creates the server with a zero-filled export. No memory is committed until it is written.
   *
   * @throws `Error` if `size` is not a positive safe integer or cannot be allocated.
   */
  constructor(options: EmbeddedServerOptions = {}) {
    this.#native = new native.EmbeddedServer(options)
  }

  /**
   * Creates a connected Unix socket pair, serves one end on a new thread, and returns the other
   * end's file descriptor, ready for `Handle.connectSocket(fd)`.
   *
   * The caller owns the returned descriptor (and `connectSocket` takes it over). Each call is a
   * new connection.
   *
   * @throws `Error` once the server is closed.
   */
  socketpair(): number {
    return this.#native.socketpair()
  }

  /**
   * Listens on a new Unix socket at `path` (which must not exist) until {@link close}, which
   * also removes the socket file. Connect with `connectUnix(path)` or
   * `connectUri('nbd+unix:///?socket=' + path)`.
   *
   * @throws `Error` if the socket cannot be created there, or once the server is closed.
   */
  listenUnix(path: string): void {
    this.#native.listenUnix(path)
  }

  /**
   * Listens on a free TCP port of 127.0.0.1 until {@link close}. Connect with
   * `connectTcp('127.0.0.1', port)` or `connectUri('nbd://127.0.0.1:' + port)`.
   *
   * @returns the port.
   * @throws `Error` once the server is closed.
   */
  listenTcp(): number {
    return this.#native.listenTcp()
  }

  /**
   * Returns a copy of `length` bytes of the export starting at `offset`, as clients have
   * written them.
   *
   * @throws `Error` if the range does not lie within the export.
   */
  read(offset: number, length: number): Buffer {
    return this.#native.read(offset, length)
  }

  /**
   * Overwrites the export at `offset` with `data`, for example to preload contents before a
   * client connects. Allowed on a read-only export too. Clients see the bytes from their next
   * request on.
   *
   * @throws `Error` if the range does not lie within the export.
   */
  write(offset: number, data: Uint8Array): void {
    this.#native.write(offset, data)
  }

  /** Export size in bytes. */
  get size(): number {
    return this.#native.size
  }

  /**
   * How many connections the server has been given so far (socket pairs and accepted
   * connections), whether or not their handshake succeeded.
   */
  get connectionsServed(): number {
    return this.#native.connectionsServed
  }

  /**
   * Stops all listeners (removing Unix socket files) and refuses new connections. Connections
   * already established keep being served until their clients disconnect, and
   * {@link read}/{@link write} keep working. Idempotent.
   */
  close(): void {
    this.#native.close()
  }

  /** Same as {@link close}, for `using server = new EmbeddedServer()`. */
  [Symbol.dispose](): void {
    this.close()
  }
}
