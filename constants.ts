/**
 * The constants of libnbd and the NBD protocol, with their values: command flags
 * (`CMD_FLAG_*`), strict-mode bits (`STRICT_*`), handshake flags, extent flags, meta
 * context names and URI transport bits.
 *
 * @packageDocumentation
 */

import type { Handle } from './handle'

/** Force unit access: the command completes only once the data is on stable storage. */
export const CMD_FLAG_FUA = 0x01
/** With {@link Handle.zero}: write real zeroes, do not punch a hole. */
export const CMD_FLAG_NO_HOLE = 0x02
/** With structured reads: do not fragment the reply. */
export const CMD_FLAG_DF = 0x04
/** With block status: one extent is enough. */
export const CMD_FLAG_REQ_ONE = 0x08
/** With {@link Handle.zero}: fail fast rather than zero slowly. */
export const CMD_FLAG_FAST_ZERO = 0x10
/**
 * The command carries an explicit payload length (extended headers). With
 * {@link STRICT_AUTO_FLAG} (the default) the client sets or clears it on writes to match the
 * connection, whatever you pass.
 */
export const CMD_FLAG_PAYLOAD_LEN = 0x20
/** Every `CMD_FLAG_*` bit this library knows (`LIBNBD_CMD_FLAG_MASK`). */
export const CMD_FLAG_MASK = 0x3f

/** Strict mode: refuse commands and flags the server did not advertise. */
export const STRICT_COMMANDS = 0x01
/** Strict mode: refuse flags unknown to or invalid for the command. */
export const STRICT_FLAGS = 0x02
/** Strict mode: refuse requests beyond the end of the export (`ENOSPC` for pwrite, trim, zero; else `EINVAL`). */
export const STRICT_BOUNDS = 0x04
/** Strict mode: refuse requests of length 0. */
export const STRICT_ZERO_SIZE = 0x08
/** Strict mode: refuse requests not aligned to the server's minimum block size. */
export const STRICT_ALIGN = 0x10
/** Strict mode: refuse writes larger than the payload maximum (reads stop at 64 MiB regardless). */
export const STRICT_PAYLOAD = 0x20
/** Strict mode: set or clear {@link CMD_FLAG_PAYLOAD_LEN} on writes to match the connection. */
export const STRICT_AUTO_FLAG = 0x40
/** Every `STRICT_*` bit (`LIBNBD_STRICT_MASK`), the default strict mode. */
export const STRICT_MASK = 0x7f

/** Handshake flag: use fixed newstyle when the server offers it. */
export const HANDSHAKE_FLAG_FIXED_NEWSTYLE = 0x01
/** Handshake flag: skip the 124 zero bytes when the server offers it. */
export const HANDSHAKE_FLAG_NO_ZEROES = 0x02
/** Every `HANDSHAKE_FLAG_*` bit (`LIBNBD_HANDSHAKE_FLAG_MASK`). */
export const HANDSHAKE_FLAG_MASK = 0x03

/** base:allocation extent flag: the extent is a hole. */
export const STATE_HOLE = 0x01
/** base:allocation extent flag: the extent reads as zeroes. */
export const STATE_ZERO = 0x02
/** qemu:dirty-bitmap extent flag: the extent is dirty. */
export const STATE_DIRTY = 0x01
/** The name of the block allocation meta context. */
export const CONTEXT_BASE_ALLOCATION = 'base:allocation'
/** The namespace of the contexts the NBD protocol defines (`LIBNBD_NAMESPACE_BASE`). */
export const NAMESPACE_BASE = 'base:'
/** The namespace of qemu's contexts (`LIBNBD_NAMESPACE_QEMU`). */
export const NAMESPACE_QEMU = 'qemu:'
/** The prefix of qemu's dirty bitmap contexts: append the bitmap's name (`LIBNBD_CONTEXT_QEMU_DIRTY_BITMAP`). */
export const CONTEXT_QEMU_DIRTY_BITMAP = 'qemu:dirty-bitmap:'
/** qemu's allocation depth context (`LIBNBD_CONTEXT_QEMU_ALLOCATION_DEPTH`). */
export const CONTEXT_QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth'

/** {@link Handle.setUriAllowTransports} bit: `nbd://`, `nbds://`. */
export const ALLOW_TRANSPORT_TCP = 0x1
/** {@link Handle.setUriAllowTransports} bit: `nbd+unix://`, `nbds+unix://`. */
export const ALLOW_TRANSPORT_UNIX = 0x2
/** {@link Handle.setUriAllowTransports} bit: `nbd+vsock://`, `nbds+vsock://`. */
export const ALLOW_TRANSPORT_VSOCK = 0x4
/** {@link Handle.setUriAllowTransports} bit: `nbd+ssh://`, `nbds+ssh://` (they run `ssh`). */
export const ALLOW_TRANSPORT_SSH = 0x8
/** Every `ALLOW_TRANSPORT_*` bit this library knows (libnbd's `0xF`). */
export const ALLOW_TRANSPORT_MASK = 0xf
