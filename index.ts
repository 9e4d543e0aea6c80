/**
 * nbd-client: a Network Block Device client for Node.js and Electron.
 *
 * The protocol engine and the connection driver are Rust (crates/nbd-proto,
 * crates/nbd-client); this module is the public API. Its calls mirror libnbd's, in
 * camelCase and returning Promises: `nbd_connect_socket` → {@link Handle.connectSocket},
 * `nbd_pread` → {@link Handle.pread}, `nbd_can_flush` → {@link Handle.canFlush}. libnbd's
 * manual pages describe the behaviour of each call.
 *
 * This file only gathers the public API: the {@link Handle} (handle.ts) with the shapes it
 * takes and returns (types.ts), the constants (constants.ts), {@link NbdError} (errors.ts),
 * the calls that need no handle (support.ts), streams (streams.ts) and the whole-export
 * calls (map.ts, info.ts, copy.ts).
 *
 * @example
 * ```ts
 * import { Handle } from 'nbd-client'
 *
 * await using h = new Handle({ exportName: 'disk' })
 * await h.connectUnix('/run/nbd.sock')
 * const first = await h.pread(512, 0)
 * await h.pwrite(Buffer.alloc(4096, 0xff), 1 << 20, { fua: true })
 * ```
 *
 * @packageDocumentation
 */

export * from './constants'
export { version, supportsVsock, supportsTls, supportsUri, isUri } from './support'
export { NbdError } from './errors'
export { Handle } from './handle'
export type {
  TlsMode,
  CmdOptions,
  HandleOptions,
  DebugCallback,
  Extent,
  ReadChunk,
  ExportListing,
  HandleState,
  Stats,
  BlockSizeKind,
} from './types'
export type { NbdReadStream, NbdWriteStream, ReadStreamOptions, WriteStreamOptions } from './streams'
export { describeExtent, mapTotals, type MapExtent, type MapOptions } from './map'
export { info, humanSize, type ExportDetails, type ExportInfo, type InfoOptions } from './info'
export { copy, type CopyEndpoint, type CopyOptions, type CopyProgress, type CopyResult } from './copy'
