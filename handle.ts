/**
 * The {@link Handle} class: a connection to one NBD export, libnbd's calls as methods.
 *
 * Each method checks its arguments (validation.ts) and calls the native handle
 * (crates/nbd-napi), whose failures arrive as `NbdError`s already (errors.ts).
 *
 * @packageDocumentation
 */

import type * as Binding from './binding'
import { run } from './abort'
import { type CONTEXT_BASE_ALLOCATION, type STRICT_COMMANDS } from './constants'
import { invalid, makeError, toNbdError, type NbdError } from './errors'
import { mapExtents, type MapExtent, type MapOptions } from './map'
import { native } from './native'
import { pooledBuffer } from './read-pool'
import { NbdReadStream, NbdWriteStream, type ReadStreamOptions, type WriteStreamOptions } from './streams'
import type {
  BlockSizeKind,
  CmdOptions,
  DebugCallback,
  ExportListing,
  Extent,
  HandleOptions,
  HandleState,
  ReadChunk,
  Stats,
  TlsMode,
} from './types'
import {
  checkArgv,
  checkBoolean,
  checkBuffer,
  checkCount,
  checkFd,
  checkMaxInFlight,
  checkMilliseconds,
  checkObject,
  checkOffset,
  checkOptions,
  checkPort,
  checkString,
  checkStringList,
  checkUint32,
} from './validation'

/** The largest `pread` whose Buffer is a slice of a pooled slab (read-pool.ts). */
const POOLED_READ_MAX = 16 * 1024
/** The largest read (libnbd's limit too): larger ones are refused with `ERANGE`. */
const READ_MAX = 64 * 1024 * 1024

// Large reads return new Buffers from malloc: glibc's thresholds are set for them once per
// process, as the package loads (crates/nbd-napi/src/alloc.rs; README, "malloc, on glibc").
native.tuneMalloc()

/** The per-command native calls of one handle (crates/nbd-napi/src/fast.rs). */
type CommandCalls = ReturnType<typeof Binding.commandCalls>

const asyncDispose: typeof Symbol.asyncDispose =
  (Symbol as { asyncDispose?: typeof Symbol.asyncDispose }).asyncDispose ??
  (Symbol.for('nodejs.asyncDispose') as typeof Symbol.asyncDispose)

/**
 * A connection to one NBD export (libnbd's `struct nbd_handle`).
 *
 * Create it, connect it once, then issue commands: any number may be in flight at once,
 * and replies may come back in any order. Close it when done (or use `await using`); a
 * handle that is garbage-collected closes its socket too.
 *
 * Async methods never throw synchronously: bad arguments reject the promise with an
 * {@link NbdError}. Synchronous getters throw.
 */
export class Handle {
  readonly #native: Binding.NativeHandle
  /**
   * pread, preadInto and pwrite bound to #native: plain functions rather than methods of the
   * class, which cost napi-rs's per-call bookkeeping, and bound so that no call has to find
   * and check its handle.
   */
  readonly #calls: CommandCalls

  /** A newly created handle (`nbd_create`); `options` calls the matching setters. */
  constructor(options?: HandleOptions) {
    this.#native = new native.NativeHandle(makeError)
    this.#calls = native.commandCalls(this.#native)
    if (options === undefined) return
    const op = 'create'
    const o = checkObject(op, options)
    if (o.exportName !== undefined) this.setExportName(o.exportName as string)
    if (o.name !== undefined) this.setHandleName(o.name as string)
    if (o.strict !== undefined) this.setStrictMode(o.strict as number)
    if (o.preadInitialize !== undefined) this.setPreadInitialize(o.preadInitialize as boolean)
    if (o.requestStructuredReplies !== undefined) this.setRequestStructuredReplies(o.requestStructuredReplies as boolean)
    if (o.requestBlockSize !== undefined) this.setRequestBlockSize(o.requestBlockSize as boolean)
    if (o.fullInfo !== undefined) this.setFullInfo(o.fullInfo as boolean)
    if (o.handshakeFlags !== undefined) this.setHandshakeFlags(o.handshakeFlags as number)
    if (o.requestExtendedHeaders !== undefined) this.setRequestExtendedHeaders(o.requestExtendedHeaders as boolean)
    if (o.requestMetaContext !== undefined) this.setRequestMetaContext(o.requestMetaContext as boolean)
    if (o.metaContexts !== undefined) {
      for (const name of checkStringList(op, 'metaContexts', o.metaContexts)) this.addMetaContext(name)
    }
    if (o.optMode !== undefined) this.setOptMode(o.optMode as boolean)
    if (o.debug !== undefined) this.setDebug(o.debug as boolean | DebugCallback)
    if (o.tls !== undefined) this.setTls(o.tls as TlsMode)
    if (o.tlsCertificates !== undefined) this.setTlsCertificates(o.tlsCertificates as string)
    if (o.tlsVerifyPeer !== undefined) this.setTlsVerifyPeer(o.tlsVerifyPeer as boolean)
    if (o.tlsUsername !== undefined) this.setTlsUsername(o.tlsUsername as string)
    if (o.tlsPskFile !== undefined) this.setTlsPskFile(o.tlsPskFile as string)
    if (o.tlsHostname !== undefined) this.setTlsHostname(o.tlsHostname as string)
    if (o.uriAllowTransports !== undefined) this.setUriAllowTransports(o.uriAllowTransports as number)
    if (o.uriAllowTls !== undefined) this.setUriAllowTls(o.uriAllowTls as TlsMode)
    if (o.uriAllowLocalFile !== undefined) this.setUriAllowLocalFile(o.uriAllowLocalFile as boolean)
    // Native errors of these two name the operation `create`.
    if (o.connectTimeout !== undefined) this.#native.setConnectTimeout(checkMilliseconds(op, o.connectTimeout))
    if (o.maxInFlight !== undefined) this.#native.setMaxInFlight(checkMaxInFlight(op, o.maxInFlight))
  }

  /**
   * Runs an async native call: a throw of its argument checks becomes a rejection, and
   * `attach` follows success. Not an `async` method:
   * a suspended one would hold `this` until the native call settles, so a handle nobody
   * references any more (one whose connect never finishes, say) could never be
   * garbage-collected and would keep its socket open.
   */
  #async<T>(op: string, f: () => Promise<T>): Promise<T> {
    let p: Promise<T>
    try {
      p = f()
    } catch (e) {
      return Promise.reject(toNbdError(e, op))
    }
    // Weakly: a connect that never finishes must not keep a forgotten handle alive.
    const native = new WeakRef(this.#native)
    return p.then(
      (v) => {
        // A connect or optGo that entered transmission hands the socket to the event loop.
        native.deref()?.attach()
        return v
      },
      (e: unknown) => {
        throw toNbdError(e, op)
      },
    )
  }

  // ---- state ----

  /** The handle's state: `created`, `connecting`, `negotiating`, `ready`, `processing`, `dead` or `closed`. */
  get state(): HandleState {
    return this.#native.state as HandleState
  }

  /** Commands issued and not yet finished (queued or on the wire). */
  get inFlight(): number {
    return this.#native.inFlight
  }

  /** Bytes and chunks sent and received so far, handshake included. */
  get stats(): Stats {
    return this.#native.stats()
  }

  // ---- connecting ----

  /**
   * Talks NBD over `fd`, an open, connected stream socket (Unix or TCP)
   * (`nbd_connect_socket`).
   *
   * The handle must be newly created and `fd` must be a connected stream socket; otherwise
   * the call rejects and the caller still owns `fd`. Once those checks pass the handle owns
   * `fd`, whether the handshake succeeds or not, and closes it when the handle is closed or
   * garbage-collected, never earlier. Resolves when the handshake is done.
   */
  async connectSocket(fd: number): Promise<void> {
    const op = 'connectSocket'
    return this.#async(op, async () => this.#native.connectSocket(checkFd(op, fd)))
  }

  /** Connects to a server listening on the Unix socket `path` (`nbd_connect_unix`). */
  async connectUnix(path: string): Promise<void> {
    const op = 'connectUnix'
    return this.#async(op, async () => this.#native.connectUnix(checkString(op, 'path', path)))
  }

  /**
   * Connects over TCP to `host` and `port` (a number, or a numeric string, or `'nbd'`)
   * (`nbd_connect_tcp`). Every address the host resolves to is tried in turn.
   */
  async connectTcp(host: string, port: number | string): Promise<void> {
    const op = 'connectTcp'
    return this.#async(op, async () => this.#native.connectTcp(checkString(op, 'host', host), checkPort(op, port)))
  }

  /**
   * Connects to the server an NBD URI names (`nbd_connect_uri`): `nbd://host[:port]/export`,
   * `nbds://…` (TLS), `nbd+unix:///export?socket=PATH`, `nbds+unix://…`,
   * `nbd+vsock://cid[:port]/export`, `nbd+ssh://host[:sshport]/export` (`nbds+…` for each),
   * with the query parameters `socket`, `tls-certificates`, `tls-psk-file`, `tls-hostname`,
   * `tls-verify-peer`, and `user@` as the TLS user name. The export name is percent-decoded;
   * the port defaults to 10809.
   *
   * An ssh URI runs `ssh [-C] [-p PORT] [-o User=USER] -- HOST nc …` as
   * {@link Handle.connectCommand} would: on the remote host `nc -U SOCKET` when the URI has
   * `socket=`, else `nc localhost PORT` for `nbd-port=` (default 10809); `compress=true` adds
   * `-C`. ssh must log in without a password prompt (keys or an agent), and the remote host
   * needs `nc`. {@link Handle.getSubprocessPid} is ssh's pid. The
   * URI's settings replace the handle's: the export name, and what it says of TLS (`nbds`
   * requires it; its files, user and host name). As in libnbd, a plain `nbd` scheme does not
   * turn off a `tls` mode set on the handle: with `'allow'` a server that offers TLS still
   * gets it. What a URI may ask for is
   * limited by {@link Handle.setUriAllowTransports}, {@link Handle.setUriAllowTls} and
   * {@link Handle.setUriAllowLocalFile} (refusals: `EPERM`); a malformed URI rejects with
   * `EINVAL` naming the fault.
   */
  async connectUri(uri: string): Promise<void> {
    const op = 'connectUri'
    return this.#async(op, async () => this.#native.connectUri(checkString(op, 'uri', uri)))
  }

  /**
   * Starts a server process with a socket as its stdin and stdout and talks NBD to it
   * (`nbd_connect_command`), e.g. `['nbdkit', '-s', 'memory', '1G']`. `argv[0]` is looked
   * up on PATH. The process gets only stdin, stdout and stderr (which goes to ours), and is
   * ended and reaped when the handle is closed or garbage-collected (end of file first, then
   * SIGTERM, then SIGKILL). If it cannot start or the handshake fails, the error says how
   * it ended and quotes the end of its stderr.
   */
  async connectCommand(argv: string[]): Promise<void> {
    const op = 'connectCommand'
    return this.#async(op, async () => this.#native.connectCommand(checkArgv(op, argv)))
  }

  /**
   * Starts a server process with a listening socket as fd 3, as systemd socket activation
   * does (`LISTEN_FDS=1`, `LISTEN_PID`), and connects to it
   * (`nbd_connect_systemd_socket_activation`), e.g. `['qemu-nbd', '-f', 'qcow2', 'disk.qcow2']`
   * or `['nbdkit', 'memory', '1G']`. The process ends with the handle, as for
   * {@link Handle.connectCommand}.
   */
  async connectSystemdSocketActivation(argv: string[]): Promise<void> {
    const op = 'connectSystemdSocketActivation'
    return this.#async(op, async () => this.#native.connectSystemdSocketActivation(checkArgv(op, argv)))
  }

  /** The pid of the server process {@link Handle.connectCommand} started, or `null`. */
  get subprocessPid(): number | null {
    try {
      return this.#native.getSubprocessPid()
    } catch {
      return null
    }
  }

  /**
   * The pid of the server process {@link Handle.connectCommand} or
   * {@link Handle.connectSystemdSocketActivation} started (`nbd_get_subprocess_pid`); throws
   * `ESRCH` when the handle started none.
   */
  getSubprocessPid(): number {
    return this.#native.getSubprocessPid()
  }

  /**
   * The name a socket-activated server sees in `LISTEN_FDNAMES`
   * (`nbd_set_socket_activation_name`); empty (the default) means `unknown`. At most 255
   * printable ASCII characters other than `:`. Before connecting.
   */
  setSocketActivationName(name: string): void {
    this.#native.setSocketActivationName(checkString('setSocketActivationName', 'name', name))
  }

  /** `nbd_get_socket_activation_name`. */
  getSocketActivationName(): string {
    return this.#native.getSocketActivationName()
  }

  /** Connects over AF_VSOCK to `cid` and `port` (`nbd_connect_vsock`; Linux). */
  async connectVsock(cid: number, port: number): Promise<void> {
    const op = 'connectVsock'
    return this.#async(op, async () => this.#native.connectVsock(checkUint32(op, 'cid', cid), checkUint32(op, 'port', port)))
  }

  // ---- data ----

  /**
   * Runs a command method's argument checks and start; anything thrown becomes a rejected
   * promise (async methods never throw synchronously).
   */
  #command<T>(op: string, f: () => Promise<T>): Promise<T> {
    try {
      return f()
    } catch (e) {
      return Promise.reject(toNbdError(e, op))
    }
  }

  /** Reads `count` bytes at `offset` into a new Buffer (`nbd_pread`). */
  pread(count: number, offset: number | bigint, opts?: CmdOptions): Promise<Buffer> {
    // The hot path is written out (no closures): it runs once per command.
    try {
      const c = checkCount('pread', count)
      const o = checkOffset('pread', offset)
      let fresh: Buffer | undefined
      if (c > 0 && c <= POOLED_READ_MAX) {
        // Small reads land in a slice of a shared slab (as Buffer.allocUnsafe's pool), not a
        // Buffer of their own: a backing store per read costs more than the read.
        fresh = pooledBuffer(c)
      } else if (c > 0 && c <= READ_MAX) {
        // Larger ones get a Buffer of their own, not zeroed: nobody sees it before every byte
        // is written. (Memory the native side recycled through external Buffers cost a sixth
        // to a third more CPU per read, 256 KiB to 2 MiB: each carries a finalizer the
        // collector must run, where a plain ArrayBuffer is simply freed.)
        fresh = Buffer.allocUnsafeSlow(c)
      }
      if (fresh !== undefined) {
        const b = fresh
        if (opts === undefined) return this.#calls.preadInto(b, o, 0, null, true) as Promise<Buffer>
        const { flags, signal } = checkOptions('pread', opts)
        return run(signal, (cancel) => this.#calls.preadInto(b, o, flags, cancel, true) as Promise<Buffer>)
      }
      // Empty reads, and reads over the limit (refused with ERANGE), are the native side's.
      if (opts === undefined) return this.#calls.pread(c, o, 0, null) as Promise<Buffer>
      const { flags, signal } = checkOptions('pread', opts)
      return run(signal, (cancel) => this.#calls.pread(c, o, flags, cancel) as Promise<Buffer>)
    } catch (e) {
      return Promise.reject(toNbdError(e, 'pread'))
    }
  }

  /**
   * Reads `count` bytes at `offset` and reports how the server sent them
   * (`nbd_pread_structured`): `chunks` lists each data or hole chunk (and error offsets)
   * in the order they came. `df` asks the server not to fragment the reply
   * ({@link Handle.canDf}). Without structured replies the whole read is one data chunk.
   */
  preadStructured(
    count: number,
    offset: number | bigint,
    opts?: CmdOptions & { df?: boolean },
  ): Promise<{ data: Buffer; chunks: ReadChunk[] }> {
    return this.#command('preadStructured', () => {
      const op = 'preadStructured'
      const c = checkCount(op, count)
      const o = checkOffset(op, offset)
      const { flags, signal } = checkOptions(op, opts)
      return run(signal, (cancel) => this.#calls.pread(c, o, flags, cancel, true) as Promise<{ data: Buffer; chunks: ReadChunk[] }>)
    })
  }

  /**
   * Reads `buf.length` bytes at `offset` into `buf` (`nbd_pread`). Do not touch `buf` until
   * the promise settles. On a plain connection the data goes from the socket straight into
   * `buf` as it arrives; over TLS it is copied into `buf` as the promise resolves. If the
   * call is aborted or the handle closed first, the promise rejects and `buf` is not written
   * after that moment. With `preadInitialize` (the default) `buf` is zeroed when the call
   * starts, before any check, so a failed read leaves zeros (as libnbd).
   *
   * `buf` may be any Uint8Array, also a view into a SharedArrayBuffer or a slice at any byte
   * offset. A buffer whose ArrayBuffer is detached (transferred) is refused with `EINVAL`;
   * one detached or resized while the read is in flight is never written again, and the
   * call rejects with `EFAULT` (the connection stays usable).
   */
  preadInto(buf: Uint8Array, offset: number | bigint, opts?: CmdOptions): Promise<void> {
    try {
      const b = checkBuffer('preadInto', buf)
      const o = checkOffset('preadInto', offset)
      if (opts === undefined) return this.#calls.preadInto(b, o, 0, null) as Promise<void>
      const { flags, signal } = checkOptions('preadInto', opts)
      return run(signal, (cancel) => this.#calls.preadInto(b, o, flags, cancel) as Promise<void>)
    } catch (e) {
      return Promise.reject(toNbdError(e, 'preadInto'))
    }
  }

  /**
   * Writes `buf` at `offset` (`nbd_pwrite`). Writes up to 16 KiB are copied when the call
   * starts; larger ones are sent from `buf` itself on a plain connection (copied at the call
   * over TLS), so do not change `buf` until the promise settles. A buffer detached or
   * resized before any of it was sent fails the write with `EFAULT`; one detached while it
   * is half sent also ends the connection (the server is owed bytes that no longer exist).
   * `buf` may be any Uint8Array, also a view into a SharedArrayBuffer; a detached one is
   * refused with `EINVAL`.
   */
  pwrite(buf: Uint8Array, offset: number | bigint, opts?: CmdOptions & { fua?: boolean }): Promise<void> {
    try {
      const b = checkBuffer('pwrite', buf)
      const o = checkOffset('pwrite', offset)
      if (opts === undefined) return this.#calls.pwrite(b, o, 0, null)
      const { flags, signal } = checkOptions('pwrite', opts)
      return run(signal, (cancel) => this.#calls.pwrite(b, o, flags, cancel))
    } catch (e) {
      return Promise.reject(toNbdError(e, 'pwrite'))
    }
  }

  /** Asks the server to commit all completed writes to stable storage (`nbd_flush`). */
  flush(opts?: CmdOptions): Promise<void> {
    return this.#command('flush', () => {
      const { flags, signal } = checkOptions('flush', opts)
      return run(signal, (cancel) => this.#native.command('flush', 0, 0, flags, cancel))
    })
  }

  /** Tells the server `count` bytes at `offset` are no longer needed (`nbd_trim`). */
  trim(count: number, offset: number | bigint, opts?: CmdOptions & { fua?: boolean }): Promise<void> {
    return this.#command('trim', () => {
      const op = 'trim'
      const c = checkCount(op, count)
      const o = checkOffset(op, offset)
      const { flags, signal } = checkOptions(op, opts)
      return run(signal, (cancel) => this.#native.command(op, c, o, flags, cancel))
    })
  }

  /** Asks the server to prefetch `count` bytes at `offset` (`nbd_cache`). */
  cache(count: number, offset: number | bigint, opts?: CmdOptions): Promise<void> {
    return this.#command('cache', () => {
      const op = 'cache'
      const c = checkCount(op, count)
      const o = checkOffset(op, offset)
      const { flags, signal } = checkOptions(op, opts)
      return run(signal, (cancel) => this.#native.command(op, c, o, flags, cancel))
    })
  }

  /**
   * Writes `count` zero bytes at `offset` (`nbd_zero`). `noHole` asks for allocated
   * zeroes; `fastZero` asks the server to fail rather than zero slowly.
   */
  zero(
    count: number,
    offset: number | bigint,
    opts?: CmdOptions & { fua?: boolean; noHole?: boolean; fastZero?: boolean },
  ): Promise<void> {
    return this.#command('zero', () => {
      const op = 'zero'
      const c = checkCount(op, count)
      const o = checkOffset(op, offset)
      const { flags, signal } = checkOptions(op, opts)
      return run(signal, (cancel) => this.#native.command(op, c, o, flags, cancel))
    })
  }

  /**
   * Asks for the status of `count` bytes at `offset` in each negotiated meta context
   * (`nbd_block_status_64`), or only in `contexts` (`nbd_block_status_filter`, which needs
   * {@link Handle.canBlockStatusPayload}; every name must have been negotiated, but an empty
   * list or a name given twice is sent as is, for the server to judge, as libnbd does).
   * Without a negotiated context it rejects with `ENOTSUP`, unless {@link STRICT_COMMANDS}
   * is cleared (then the server answers). Resolves to the extents per context name, with
   * absolute offsets (numbers, or bigints past 2^53 − 1, so they are always exact). The server may describe less than `count` bytes, and its final extent
   * may run past the request; with `reqOne` it describes one extent per context.
   */
  blockStatus(
    count: number,
    offset: number | bigint,
    opts?: CmdOptions & { reqOne?: boolean; contexts?: string[] },
  ): Promise<Record<string, Extent[]>> {
    return this.#command('blockStatus', () => {
      const op = 'blockStatus'
      const c = checkCount(op, count)
      const o = checkOffset(op, offset)
      const { flags, signal } = checkOptions(op, opts)
      let contexts: string[] | undefined
      if (opts !== undefined) {
        const x = opts as Record<string, unknown>
        if (x.contexts !== undefined) contexts = checkStringList(op, 'contexts', x.contexts)
      }
      return run(signal, (cancel) => this.#native.blockStatus(c, o, flags, contexts, cancel) as Promise<Record<string, Extent[]>>)
    })
  }

  // ---- option negotiation (option mode: state 'negotiating') ----

  /**
   * Ends option negotiation and enters transmission with the export set by
   * {@link Handle.setExportName} (`nbd_opt_go`); meta contexts are set first when
   * {@link Handle.setRequestMetaContext} is on. If the server refuses but stays connected,
   * the handle stays `negotiating` so another export can be tried.
   */
  async optGo(): Promise<void> {
    return this.#async('optGo', () => this.#native.optGo())
  }

  /**
   * Ends the connection politely with NBD_OPT_ABORT (`nbd_opt_abort`); the handle is then
   * `closed`. The server's answer is waited for 2 seconds at most.
   */
  async optAbort(): Promise<void> {
    return this.#async('optAbort', () => this.#native.optAbort())
  }

  /**
   * Asks about the export set by {@link Handle.setExportName} without entering
   * transmission (`nbd_opt_info`); the getters (`getSize`, `can*`, …) then describe it.
   */
  async optInfo(): Promise<void> {
    return this.#async('optInfo', () => this.#native.optInfo())
  }

  /** The exports the server lists (`nbd_opt_list`). */
  async optList(): Promise<ExportListing[]> {
    return this.#async('optList', () => this.#native.optList())
  }

  /**
   * The meta contexts the server offers for the export (`nbd_opt_list_meta_context`),
   * matching `queries`, or the contexts added with {@link Handle.addMetaContext} (all of
   * them when none were added).
   */
  async optListMetaContext(queries?: string[]): Promise<string[]> {
    const op = 'optListMetaContext'
    return this.#async(op, async () => {
      const q = queries === undefined ? undefined : checkStringList(op, 'queries', queries)
      return this.#native.optListMetaContext(q)
    })
  }

  /**
   * Negotiates meta contexts for the export (`nbd_opt_set_meta_context`): `queries`, or
   * the contexts added with {@link Handle.addMetaContext}. Resolves to the contexts the
   * server agreed to; {@link Handle.canMetaContext} then tells them.
   */
  async optSetMetaContext(queries?: string[]): Promise<string[]> {
    const op = 'optSetMetaContext'
    return this.#async(op, async () => {
      const q = queries === undefined ? undefined : checkStringList(op, 'queries', queries)
      return this.#native.optSetMetaContext(q)
    })
  }

  /** Asks for structured replies (`nbd_opt_structured_reply`); whether the server agreed. */
  async optStructuredReply(): Promise<boolean> {
    return this.#async('optStructuredReply', () => this.#native.optStructuredReply())
  }

  /**
   * Starts TLS (`nbd_opt_starttls`) with the handle's TLS settings; whether the server
   * agreed. A failed TLS handshake leaves the handle `dead`.
   */
  async optStarttls(): Promise<boolean> {
    return this.#async('optStarttls', () => this.#native.optStarttls())
  }

  /** Asks for extended headers (`nbd_opt_extended_headers`); whether the server agreed. */
  async optExtendedHeaders(): Promise<boolean> {
    return this.#async('optExtendedHeaders', () => this.#native.optExtendedHeaders())
  }

  // ---- ending ----

  /**
   * Disconnects cleanly (`nbd_shutdown`): waits for the commands in flight, sends
   * NBD_CMD_DISC and closes the write side. With `abandonPending` the disconnect is sent
   * at once: commands not yet sent are never sent and reject with `ENOTCONN`; those on the
   * wire that the server does not answer first reject with `ESHUTDOWN`.
   * The handle then is `closed`; getters keep working.
   */
  async shutdown(opts?: { abandonPending?: boolean }): Promise<void> {
    const op = 'shutdown'
    try {
      let abandon = false
      if (opts !== undefined) {
        const o = checkObject(op, opts)
        if (o.abandonPending !== undefined) abandon = checkBoolean(op, 'abandonPending', o.abandonPending)
      }
      return await this.#native.shutdown(abandon)
    } catch (e) {
      throw toNbdError(e, op)
    }
  }

  /**
   * Closes the handle: every pending command rejects, the socket is closed (and the fd
   * passed to {@link Handle.connectSocket} with it). Idempotent. After it, commands reject
   * with `EINVAL`.
   */
  async close(): Promise<void> {
    return this.#native.close()
  }

  /** Same as {@link Handle.close}, for `await using`. */
  async [asyncDispose](): Promise<void> {
    return this.close()
  }

  // ---- streams (streams.ts) ----

  /**
   * A `stream.Readable` of the export's bytes from `start` to `end` inclusive, with
   * fs.createReadStream's conventions (`bytesRead`; destroyed on error or abort; bigint
   * positions). Several reads are kept in flight, each within the server's limits.
   *
   * @example
   * ```ts
   * await pipeline(h.createReadStream(), zlib.createGzip(), fs.createWriteStream('disk.gz'))
   * ```
   */
  createReadStream(options?: ReadStreamOptions): NbdReadStream {
    return new NbdReadStream(this, options)
  }

  /**
   * A `stream.Writable` that writes the export from `start` on, with fs.createWriteStream's
   * conventions (`bytesWritten`; destroyed on error or abort). Small writes are gathered
   * and large ones split into requests within the server's limits, kept in flight up to the
   * stream's `highWaterMark`; the export is flushed before 'finish' unless `flush: false`.
   * A write past the end of the export fails the stream with pwrite's error (`ENOSPC`). There
   * is no read-modify-write: on a server with a minimum block size, `start` and the total
   * length must be multiples of it.
   *
   * @example
   * ```ts
   * await pipeline(fs.createReadStream('disk.img'), h.createWriteStream())
   * ```
   */
  createWriteStream(options?: WriteStreamOptions): NbdWriteStream {
    return new NbdWriteStream(this, options)
  }

  // ---- information ----

  // The getters below answer while negotiating (after optInfo), connected, or closed after
  // shutdown; on a `dead` handle they throw `EINVAL`, as libnbd's.

  /**
   * The export size in bytes (`nbd_get_size`). As a number it throws `ERANGE` past
   * `Number.MAX_SAFE_INTEGER`; pass `{ bigint: true }` for a bigint.
   */
  getSize(opts?: { bigint?: false }): number
  getSize(opts: { bigint: true }): bigint
  getSize(opts?: { bigint?: boolean }): number | bigint
  getSize(opts?: { bigint?: boolean }): number | bigint {
    const op = 'getSize'
    let bigint = false
    if (opts !== undefined) {
      const o = checkObject(op, opts)
      if (o.bigint !== undefined) bigint = checkBoolean(op, 'bigint', o.bigint)
    }
    const size = this.#native.getSize()
    if (bigint) return size
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw invalid(op, `size ${size} is beyond Number.MAX_SAFE_INTEGER; use getSize({ bigint: true })`, 'ERANGE')
    }
    return Number(size)
  }

  /**
   * A block size constraint (`nbd_get_block_size`): `minimum`, `preferred` and `maximum`
   * as the server advertised them (0 when it did not), or `payload`, the largest read or
   * write this client sends in one command.
   */
  getBlockSize(kind: BlockSizeKind): number {
    return this.#native.getBlockSize(checkString('getBlockSize', 'kind', kind))
  }

  /** Whether the export is read-only (`nbd_is_read_only`). */
  isReadOnly(): boolean {
    return this.#native.isReadOnly()
  }

  /** Whether the server says the export is on rotational media (`nbd_is_rotational`). */
  isRotational(): boolean {
    return this.#native.isRotational()
  }

  /** Whether the server supports {@link Handle.flush} (`nbd_can_flush`). */
  canFlush(): boolean {
    return this.#native.canFlush()
  }

  /** Whether the server supports the FUA flag (`nbd_can_fua`). */
  canFua(): boolean {
    return this.#native.canFua()
  }

  /** Whether the server supports {@link Handle.trim} (`nbd_can_trim`). */
  canTrim(): boolean {
    return this.#native.canTrim()
  }

  /** Whether the server supports {@link Handle.zero} (`nbd_can_zero`). */
  canZero(): boolean {
    return this.#native.canZero()
  }

  /** Whether the server supports the fast-zero flag (`nbd_can_fast_zero`). */
  canFastZero(): boolean {
    return this.#native.canFastZero()
  }

  /** Whether the server supports the DF flag on structured reads (`nbd_can_df`). */
  canDf(): boolean {
    return this.#native.canDf()
  }

  /** Whether several connections to this export see each other's writes (`nbd_can_multi_conn`). */
  canMultiConn(): boolean {
    return this.#native.canMultiConn()
  }

  /** Whether the server supports {@link Handle.cache} (`nbd_can_cache`). */
  canCache(): boolean {
    return this.#native.canCache()
  }

  /** The handshake the server spoke: `oldstyle`, `newstyle` or `newstyle-fixed` (`nbd_get_protocol`). */
  getProtocol(): 'oldstyle' | 'newstyle' | 'newstyle-fixed' {
    return this.#native.getProtocol() as 'oldstyle' | 'newstyle' | 'newstyle-fixed'
  }

  /** Whether structured replies were negotiated (`nbd_get_structured_replies_negotiated`). */
  getStructuredRepliesNegotiated(): boolean {
    return this.#native.getStructuredRepliesNegotiated()
  }

  /** Whether extended headers were negotiated (`nbd_get_extended_headers_negotiated`). */
  getExtendedHeadersNegotiated(): boolean {
    return this.#native.getExtendedHeadersNegotiated()
  }

  /** Whether TLS is running on the connection (`nbd_get_tls_negotiated`). */
  getTlsNegotiated(): boolean {
    return this.#native.getTlsNegotiated()
  }

  /**
   * Whether meta context `name` was negotiated (`nbd_can_meta_context`). Throws `EINVAL`
   * when contexts were asked for ({@link Handle.addMetaContext}) but the server has not
   * answered for this export yet (option mode before optInfo/optGo/optSetMetaContext,
   * `requestMetaContext: false`, after a refused optGo or after optStarttls).
   */
  canMetaContext(name: string): boolean {
    return this.#native.canMetaContext(checkString('canMetaContext', 'name', name))
  }

  /**
   * A URI for the current connection (`nbd_get_uri`), e.g. `nbd+unix:///disk?socket=/run/s`,
   * with the TLS user (`user@`) and TLS parameters whenever they are set. `EINVAL` when the
   * handle was connected in a way a URI cannot describe (connectSocket, connectCommand,
   * socket activation), as libnbd for the first two.
   */
  getUri(): string {
    return this.#native.getUri()
  }

  /** Whether {@link Handle.blockStatus} may filter by context (`nbd_can_block_status_payload`). */
  canBlockStatusPayload(): boolean {
    return this.#native.canBlockStatusPayload()
  }

  /**
   * The export's canonical name as the server reported it (`nbd_get_canonical_export_name`);
   * `ENOTSUP` when it did not ({@link Handle.setFullInfo} asks for it).
   */
  getCanonicalExportName(): string {
    return this.#native.getCanonicalExportName()
  }

  /**
   * The export's description as the server reported it (`nbd_get_export_description`);
   * `ENOTSUP` when it did not ({@link Handle.setFullInfo} asks for it).
   */
  getExportDescription(): string {
    return this.#native.getExportDescription()
  }

  // ---- settings ----

  /**
   * Sets the export to attach to (`nbd_set_export_name`): before connecting, or while
   * negotiating (for the next {@link Handle.optInfo} or {@link Handle.optGo}). At most
   * 4096 bytes.
   */
  setExportName(name: string): void {
    this.#native.setExportName(checkString('setExportName', 'name', name))
  }

  /** The export name that was set (`nbd_get_export_name`). */
  getExportName(): string {
    return this.#native.getExportName()
  }

  /** Names the handle in messages (`nbd_set_handle_name`). */
  setHandleName(name: string): void {
    this.#native.setHandleName(checkString('setHandleName', 'name', name))
  }

  /** The handle's name (`nbd_get_handle_name`): `nbd1`, `nbd2`, … unless set. */
  getHandleName(): string {
    return this.#native.getHandleName()
  }

  /** Sets which client-side checks run (`nbd_set_strict_mode`, `STRICT_*` bits); any time. */
  setStrictMode(flags: number): void {
    this.#native.setStrictMode(checkUint32('setStrictMode', 'flags', flags))
  }

  /** The strict-mode bits (`nbd_get_strict_mode`). */
  getStrictMode(): number {
    return this.#native.getStrictMode()
  }

  /** Whether read buffers are zeroed before reading (`nbd_set_pread_initialize`); any time. */
  setPreadInitialize(v: boolean): void {
    this.#native.setPreadInitialize(checkBoolean('setPreadInitialize', 'value', v))
  }

  /** `nbd_get_pread_initialize`. */
  getPreadInitialize(): boolean {
    return this.#native.getPreadInitialize()
  }

  /** Whether to ask for structured replies (`nbd_set_request_structured_replies`): before connecting. */
  setRequestStructuredReplies(v: boolean): void {
    this.#native.setRequestStructuredReplies(checkBoolean('setRequestStructuredReplies', 'value', v))
  }

  /** `nbd_get_request_structured_replies`. */
  getRequestStructuredReplies(): boolean {
    return this.#native.getRequestStructuredReplies()
  }

  /** Whether to ask for block size constraints (`nbd_set_request_block_size`): before connecting. */
  setRequestBlockSize(v: boolean): void {
    this.#native.setRequestBlockSize(checkBoolean('setRequestBlockSize', 'value', v))
  }

  /** `nbd_get_request_block_size`. */
  getRequestBlockSize(): boolean {
    return this.#native.getRequestBlockSize()
  }

  /** Whether to ask for the canonical name and description (`nbd_set_full_info`): before connecting. */
  setFullInfo(v: boolean): void {
    this.#native.setFullInfo(checkBoolean('setFullInfo', 'value', v))
  }

  /** `nbd_get_full_info`. */
  getFullInfo(): boolean {
    return this.#native.getFullInfo()
  }

  /** Which handshake flags the client may use (`nbd_set_handshake_flags`, `HANDSHAKE_FLAG_*`): before connecting. */
  setHandshakeFlags(flags: number): void {
    this.#native.setHandshakeFlags(checkUint32('setHandshakeFlags', 'flags', flags))
  }

  /** `nbd_get_handshake_flags`. */
  getHandshakeFlags(): number {
    return this.#native.getHandshakeFlags()
  }

  /**
   * Whether to ask for extended headers (`nbd_set_request_extended_headers`): 64-bit
   * lengths for zero, trim, cache and block status. Before connecting; default true.
   */
  setRequestExtendedHeaders(v: boolean): void {
    this.#native.setRequestExtendedHeaders(checkBoolean('setRequestExtendedHeaders', 'value', v))
  }

  /** `nbd_get_request_extended_headers`. */
  getRequestExtendedHeaders(): boolean {
    return this.#native.getRequestExtendedHeaders()
  }

  /**
   * Whether connecting (or {@link Handle.optGo}/{@link Handle.optInfo}) sets the meta
   * contexts added with {@link Handle.addMetaContext} (`nbd_set_request_meta_context`).
   * Before connecting or while negotiating; default true.
   */
  setRequestMetaContext(v: boolean): void {
    this.#native.setRequestMetaContext(checkBoolean('setRequestMetaContext', 'value', v))
  }

  /** `nbd_get_request_meta_context`. */
  getRequestMetaContext(): boolean {
    return this.#native.getRequestMetaContext()
  }

  /**
   * Adds a meta context to negotiate (`nbd_add_meta_context`), e.g.
   * {@link CONTEXT_BASE_ALLOCATION}, `'qemu:dirty-bitmap:NAME'`, `'qemu:allocation-depth'`.
   * Before connecting or while negotiating. At most 4096 bytes.
   */
  addMetaContext(name: string): void {
    this.#native.addMetaContext(checkString('addMetaContext', 'name', name))
  }

  /** Empties the list of meta contexts to negotiate (`nbd_clear_meta_contexts`). */
  clearMetaContexts(): void {
    this.#native.clearMetaContexts()
  }

  /** The meta contexts to negotiate (`nbd_get_meta_context` for each). */
  getMetaContexts(): string[] {
    return this.#native.getMetaContexts()
  }

  /**
   * Option mode (`nbd_set_opt_mode`): connecting stops in state `negotiating`, where the
   * `opt*` calls talk to the server, until {@link Handle.optGo} or {@link Handle.optAbort}.
   * Before connecting.
   */
  setOptMode(v: boolean): void {
    this.#native.setOptMode(checkBoolean('setOptMode', 'value', v))
  }

  /** `nbd_get_opt_mode`. */
  getOptMode(): boolean {
    return this.#native.getOptMode()
  }

  /**
   * Debug messages (`nbd_set_debug`): options sent and replies received during the
   * handshake, each command with its cookie, each reply. A callback receives
   * `(context, message)` from now on; `true` turns them on (to the callback given earlier,
   * or else to stderr as `nbd-client: debug: NAME: CONTEXT: MESSAGE`); `false` stops them.
   * Any time, also while connected.
   */
  setDebug(v: boolean | DebugCallback): void {
    if (typeof v === 'function') this.#native.setDebug(true, v)
    else this.#native.setDebug(checkBoolean('setDebug', 'value', v), null)
  }

  /**
   * Forgets the debug callback (`nbd_clear_debug_callback`): while debugging is on,
   * messages go to stderr again.
   */
  clearDebugCallback(): void {
    this.#native.clearDebugCallback()
  }

  /** `nbd_get_debug`; `LIBNBD_DEBUG=1` in the environment turns debugging on for new handles. */
  getDebug(): boolean {
    return this.#native.getDebug()
  }

  /**
   * Whether to use TLS (`nbd_set_tls`): `'disable'` (default), `'allow'` (TLS when the
   * server agrees, plaintext when it refuses) or `'require'` (fail without TLS; nothing but
   * STARTTLS is sent in plaintext). Before connecting.
   *
   * Where the CPU runs AES in hardware, TLS 1.3 lists the AES-GCM cipher suites before
   * ChaCha20-Poly1305, so that nbdkit and qemu-nbd choose AES-128-GCM for PSK sessions
   * rather than ChaCha20, which runs at a fraction of the speed;
   * `NBD_CLIENT_TLS_CIPHERSUITES` in the environment replaces the list (OpenSSL's names,
   * colon-separated). See docs/tls.md.
   */
  setTls(mode: TlsMode): void {
    this.#native.setTls(checkString('setTls', 'mode', mode))
  }

  /** `nbd_get_tls`. */
  getTls(): TlsMode {
    return this.#native.getTls() as TlsMode
  }

  /**
   * Directory of X.509 files (`nbd_set_tls_certificates`): `ca-cert.pem`, and for client
   * authentication `client-cert.pem` and `client-key.pem`. Before connecting.
   */
  setTlsCertificates(dir: string): void {
    this.#native.setTlsCertificates(checkString('setTlsCertificates', 'dir', dir))
  }

  /** Whether to verify the server's certificate and name (`nbd_set_tls_verify_peer`); default true. */
  setTlsVerifyPeer(v: boolean): void {
    this.#native.setTlsVerifyPeer(checkBoolean('setTlsVerifyPeer', 'value', v))
  }

  /** `nbd_get_tls_verify_peer`. */
  getTlsVerifyPeer(): boolean {
    return this.#native.getTlsVerifyPeer()
  }

  /** The PSK user name (`nbd_set_tls_username`); default the login name. */
  setTlsUsername(name: string): void {
    this.#native.setTlsUsername(checkString('setTlsUsername', 'name', name))
  }

  /**
   * The PSK user name (`nbd_get_tls_username`): the one set, else the login name
   * (`$LOGNAME`, else `getlogin`), as libnbd; throws `EINVAL` when there is no login name.
   */
  getTlsUsername(): string {
    return this.#native.getTlsUsername()
  }

  /** A psktool key file, lines `username:hexkey` (`nbd_set_tls_psk_file`): PSK instead of X.509. */
  setTlsPskFile(path: string): void {
    this.#native.setTlsPskFile(checkString('setTlsPskFile', 'path', path))
  }

  /** The name the server's certificate must carry (`nbd_set_tls_hostname`); default the host connected to. */
  setTlsHostname(host: string): void {
    this.#native.setTlsHostname(checkString('setTlsHostname', 'host', host))
  }

  /**
   * The name the server's certificate is checked against (`nbd_get_tls_hostname`): the one
   * set, else the host given to {@link Handle.connectTcp} or in an `nbd://` URI; `null`
   * when there is neither (before connecting, or over a Unix socket).
   */
  getTlsHostname(): string | null {
    return this.#native.getTlsHostname()
  }

  /**
   * Which transports {@link Handle.connectUri} may use (`nbd_set_uri_allow_transports`):
   * `ALLOW_TRANSPORT_*` bits; default all.
   */
  setUriAllowTransports(mask: number): void {
    this.#native.setUriAllowTransports(checkUint32('setUriAllowTransports', 'mask', mask))
  }

  /** `nbd_get_uri_allow_transports`. */
  getUriAllowTransports(): number {
    return this.#native.getUriAllowTransports()
  }

  /**
   * TLS in URIs (`nbd_set_uri_allow_tls`): `'disable'` refuses `nbds` URIs, `'require'`
   * refuses plain ones; default `'allow'`.
   */
  setUriAllowTls(mode: TlsMode): void {
    this.#native.setUriAllowTls(checkString('setUriAllowTls', 'mode', mode))
  }

  /** `nbd_get_uri_allow_tls`. */
  getUriAllowTls(): TlsMode {
    return this.#native.getUriAllowTls() as TlsMode
  }

  /**
   * Whether URIs may make the handle read local files, i.e. the `tls-certificates` and
   * `tls-psk-file` parameters (`nbd_set_uri_allow_local_file`); default false.
   */
  setUriAllowLocalFile(v: boolean): void {
    this.#native.setUriAllowLocalFile(checkBoolean('setUriAllowLocalFile', 'value', v))
  }

  /** `nbd_get_uri_allow_local_file`. */
  getUriAllowLocalFile(): boolean {
    return this.#native.getUriAllowLocalFile()
  }

  // ---- whole-export work (map.ts) ----

  /**
   * The extents of one meta context over a whole range, as `nbdinfo --map` lists them:
   * consecutive extents with equal flags merged, each with nbdinfo's description (`data`,
   * `hole,zero`, `dirty`, …). It asks again wherever the server described less than asked for
   * (some answer one extent at a time) and clips a final extent that runs past the range.
   * The handle must have negotiated `context` (default `'base:allocation'`).
   *
   * @example
   * ```ts
   * for await (const e of h.map()) console.log(e.offset, e.length, e.flags, e.description)
   * ```
   */
  map(options?: MapOptions): AsyncGenerator<MapExtent, void, undefined> {
    return mapExtents(this, options)
  }
}

// ---- methods called without their handle ----

/**
 * Methods that return a promise, apart from the three per-command ones below, which
 * already turn every failure, an unbound call included, into a rejection.
 */
const PROMISE_METHODS = new Set([
  'connectSocket', 'connectUnix', 'connectTcp', 'connectUri', 'connectCommand',
  'connectSystemdSocketActivation', 'connectVsock',
  'optGo', 'optAbort', 'optInfo', 'optList', 'optListMetaContext', 'optSetMetaContext',
  'optStructuredReply', 'optExtendedHeaders', 'optStarttls',
  'preadStructured', 'flush', 'trim', 'cache', 'zero', 'blockStatus', 'shutdown', 'close',
])
/** Called once per command: they check `this` themselves, at no extra call. */
const SELF_CHECKING = new Set(['pread', 'preadInto', 'pwrite'])

// A method taken off its handle (`commands.map(h.flush)`, `promise.then(h.close)`) would
// otherwise fail on its first use of `this` with a TypeError, thrown synchronously by the
// methods that are not `async`. Each is wrapped once here so that such a call fails as the
// API promises: an `NbdError` (`EINVAL`) that says what happened, as a rejection from the
// methods that return a promise and thrown from the others.
for (const key of [...Object.getOwnPropertyNames(Handle.prototype), asyncDispose]) {
  const d = Object.getOwnPropertyDescriptor(Handle.prototype, key)
  if (key === 'constructor' || SELF_CHECKING.has(key as string) || d === undefined || typeof d.value !== 'function') continue
  const method = d.value as (this: unknown, ...args: unknown[]) => unknown
  // `[Symbol.asyncDispose]` is close() under another name.
  const name = typeof key === 'string' ? key : 'close'
  const returnsPromise = PROMISE_METHODS.has(name)
  const named: Record<string | symbol, (this: unknown, ...args: unknown[]) => unknown> = {
    [key](this: unknown, ...args: unknown[]): unknown {
      if (this instanceof Handle) return method.apply(this, args)
      const e = invalid(name, `called without its Handle: call it as handle.${name}(…), or bind it first`)
      if (returnsPromise) return Promise.reject(e)
      throw e
    },
  }
  Object.defineProperty(Handle.prototype, key, { ...d, value: named[key] })
}
