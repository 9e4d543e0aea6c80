/**
 * The shapes a {@link Handle} takes and returns: its options, the options of its commands,
 * and its results (extents, read chunks, exports, statistics).
 *
 * @packageDocumentation
 */

import type { STATE_DIRTY, STATE_HOLE, STATE_ZERO } from './constants'
import type { Handle } from './handle'

/** TLS modes ({@link Handle.setTls}). */
export type TlsMode = 'disable' | 'allow' | 'require'

/** Options every command takes. */
export interface CmdOptions {
  /** Raw command flags (`CMD_FLAG_*`), OR-ed with the named ones; for libnbd parity. */
  flags?: number
  /** Aborts the call: it rejects with an `AbortError`, and a read's buffer is not written after that. */
  signal?: AbortSignal
}

/** Settings for a new {@link Handle}; each calls the setter of the same name. */
export interface HandleOptions {
  /** Export to attach to ({@link Handle.setExportName}); default `''`. */
  exportName?: string
  /** Name used in messages ({@link Handle.setHandleName}); default `nbd1`, `nbd2`, … in order of creation. */
  name?: string
  /** Strict-mode bits ({@link Handle.setStrictMode}); default all `STRICT_*`. */
  strict?: number
  /** Zero read buffers before reading ({@link Handle.setPreadInitialize}); default true. */
  preadInitialize?: boolean
  /** Ask for structured replies ({@link Handle.setRequestStructuredReplies}); default true. */
  requestStructuredReplies?: boolean
  /** Ask for block size constraints ({@link Handle.setRequestBlockSize}); default true. */
  requestBlockSize?: boolean
  /** Ask for the canonical name and description ({@link Handle.setFullInfo}); default false. */
  fullInfo?: boolean
  /** Handshake flags the client may use ({@link Handle.setHandshakeFlags}); default both. */
  handshakeFlags?: number
  /**
   * Milliseconds allowed for the whole connect and handshake; a server that stalls then
   * fails the connect with `ETIMEDOUT`. In option mode it also bounds each option request
   * (`optGo`, `optInfo`, `optList`, …): one the server does not answer in time fails with
   * `ETIMEDOUT` and the handle is `dead`. `0`, like leaving it out, means no limit beyond
   * the operating system's (a server that accepts and then says nothing is waited for
   * forever). The default.
   */
  connectTimeout?: number
  /** Requests on the wire at once; more are queued, never refused. Default 64. */
  maxInFlight?: number
  /** Ask for extended headers ({@link Handle.setRequestExtendedHeaders}); default true. */
  requestExtendedHeaders?: boolean
  /** Set meta contexts automatically before GO/INFO ({@link Handle.setRequestMetaContext}); default true. */
  requestMetaContext?: boolean
  /** Meta contexts to negotiate ({@link Handle.addMetaContext}), e.g. `['base:allocation']`. */
  metaContexts?: string[]
  /** Stop in option negotiation after connecting ({@link Handle.setOptMode}); default false. */
  optMode?: boolean
  /** Debug messages ({@link Handle.setDebug}): `true` for stderr, or a callback. */
  debug?: boolean | DebugCallback
  /** TLS mode ({@link Handle.setTls}); default `'disable'`. */
  tls?: TlsMode
  /** Directory of X.509 files ({@link Handle.setTlsCertificates}). */
  tlsCertificates?: string
  /** Verify the server's certificate ({@link Handle.setTlsVerifyPeer}); default true. */
  tlsVerifyPeer?: boolean
  /** PSK user name ({@link Handle.setTlsUsername}). */
  tlsUsername?: string
  /** psktool key file ({@link Handle.setTlsPskFile}). */
  tlsPskFile?: string
  /** Name the server's certificate must carry ({@link Handle.setTlsHostname}). */
  tlsHostname?: string
  /** Transports {@link Handle.connectUri} may use ({@link Handle.setUriAllowTransports}). */
  uriAllowTransports?: number
  /** TLS in URIs ({@link Handle.setUriAllowTls}); default `'allow'`. */
  uriAllowTls?: TlsMode
  /** Whether URIs may name local files ({@link Handle.setUriAllowLocalFile}); default false. */
  uriAllowLocalFile?: boolean
}

/** Receives debug messages: what the handle sends and receives, and why. */
export type DebugCallback = (context: string, message: string) => void

/** One extent of a block status reply: `length` bytes at `offset` with context-specific `flags`. */
export interface Extent {
  /** Absolute offset: a number, or a bigint past 2^53 − 1 (exact either way). */
  offset: number | bigint
  /** A number, or a bigint past 2^53 − 1. */
  length: number | bigint
  /** For `base:allocation`: {@link STATE_HOLE}, {@link STATE_ZERO}; for dirty bitmaps: {@link STATE_DIRTY}. */
  flags: number
}

/** One chunk of a structured read reply. */
export interface ReadChunk {
  /** Absolute offset: a number, or a bigint past 2^53 − 1 (exact either way). */
  offset: number | bigint
  length: number
  /** `data` (bytes sent), `hole` (zeroes), or `error` (the server failed at `offset`; length 0). */
  status: 'data' | 'hole' | 'error'
}

/** An export listed by {@link Handle.optList}. */
export interface ExportListing {
  name: string
  description: string
}

/** A handle's state, as libnbd names them. */
export type HandleState = 'created' | 'connecting' | 'negotiating' | 'ready' | 'processing' | 'dead' | 'closed'

/** Byte and chunk counters of a handle (libnbd's `nbd_stats_*`). */
export interface Stats {
  bytesSent: bigint
  chunksSent: bigint
  bytesReceived: bigint
  chunksReceived: bigint
}

/** Kinds of block size for {@link Handle.getBlockSize}. */
export type BlockSizeKind = 'minimum' | 'preferred' | 'maximum' | 'payload'
