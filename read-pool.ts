/**
 * Small read buffers; not exported from the package.
 *
 * `pread` results of up to 16 KiB are slices of 256 KiB slabs, handed out in turn, as Node's
 * own pool hands out small Buffers: one backing store (and one garbage-collection record)
 * per slab instead of per read. A slab is zeroed when made and marked untransferable (as
 * Node's pool), so no slice's ArrayBuffer can be detached under a read in flight; like any
 * pooled Buffer, a slice's `.buffer` also holds its neighbours' bytes.
 *
 * @packageDocumentation
 */

import { markAsUntransferable } from 'node:worker_threads'

const SLAB_SIZE = 256 * 1024
let slab: ArrayBuffer | undefined
let slabUsed = 0

/** A Buffer of `count` bytes (small: at most a few per cent of a slab) in the current slab. */
export function pooledBuffer(count: number): Buffer {
  if (slab === undefined || slabUsed + count > SLAB_SIZE) {
    slab = new ArrayBuffer(SLAB_SIZE)
    markAsUntransferable(slab)
    slabUsed = 0
  }
  const b = Buffer.from(slab, slabUsed, count)
  slabUsed += (count + 7) & ~7
  return b
}
