/**
 * The errors of this library: {@link NbdError} for every failure, `AbortError` for an aborted
 * call, and the factory the native binding makes its `NbdError`s with.
 *
 * @packageDocumentation
 */

import { constants } from 'node:os'

/** This platform's errno numbers, as Node knows them. */
const OS_ERRNO = constants.errno as Record<string, number | undefined>

/** Linux's numbers, for a name Node does not list on this platform. */
const LINUX_ERRNO: Record<string, number> = {
  EPERM: 1, ENOENT: 2, ESRCH: 3, EINTR: 4, EIO: 5, ENOEXEC: 8, EBADF: 9, ENODEV: 19, EAGAIN: 11, ENOMEM: 12, EACCES: 13,
  EFAULT: 14, EBUSY: 16, EEXIST: 17, ENOTDIR: 20, EINVAL: 22, EMFILE: 24, ENOSPC: 28,
  EPIPE: 32, ERANGE: 34, ENAMETOOLONG: 36, ENOSYS: 38, EPROTO: 71, EOVERFLOW: 75,
  ENOTSOCK: 88, EPROTONOSUPPORT: 93, ENOTSUP: 95, EAFNOSUPPORT: 97, EADDRINUSE: 98, EADDRNOTAVAIL: 99,
  ENETUNREACH: 101, ECONNABORTED: 103, ECONNRESET: 104, EISCONN: 106, ENOTCONN: 107,
  ESHUTDOWN: 108, ETIMEDOUT: 110, ECONNREFUSED: 111, EHOSTUNREACH: 113, ECANCELED: 125,
}

/** Every failure of this library (but an aborted call, which is an `AbortError`). */
export class NbdError extends Error {
  /** The errno name, e.g. `'EINVAL'`, `'EIO'`, `'ENOTCONN'`. */
  readonly code: string
  /** The positive POSIX number of {@link NbdError.code} (as libnbd's `nbd_get_errno`). */
  readonly errno: number
  /** The call that failed, e.g. `'pread'`. */
  readonly operation: string

  constructor(code: string, message: string, operation: string, errno?: number) {
    super(`${operation}: ${message}`)
    this.name = 'NbdError'
    this.code = code
    this.errno = errno ?? OS_ERRNO[code] ?? LINUX_ERRNO[code] ?? 0
    this.operation = operation
  }
}

/** The error an aborted call rejects with (Node's usual shape: `code` 'ABORT_ERR'). */
export class AbortError extends Error {
  readonly code = 'ABORT_ERR'
  constructor(reason?: unknown) {
    super('The operation was aborted', reason === undefined ? undefined : { cause: reason })
    this.name = 'AbortError'
  }
}

/** The `AbortError` for `signal`, its reason as the cause. */
export function abortError(signal?: AbortSignal): AbortError {
  return new AbortError(signal?.reason)
}

/** Throws {@link abortError} when `signal` has fired. */
export function checkAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw abortError(signal)
}

/**
 * The factory every native object is created with: the binding calls it with the errno
 * name and number, the operation and the message of each failure (a command's rejection, a
 * synchronous call's throw, a call run on tokio), so its errors cross as `NbdError`s.
 */
export function makeError(code: string, errno: number, operation: string, message: string): NbdError {
  return new NbdError(code, message, operation, errno)
}

/**
 * Anything thrown under a call of `operation` as an `NbdError`: the binding's and the
 * argument checks' errors already are one (or an `AbortError`); anything else is a value
 * napi-rs itself refused to convert, an argument of the wrong kind.
 */
export function toNbdError(e: unknown, operation: string): Error {
  if (e instanceof NbdError || e instanceof AbortError) return e
  return new NbdError('EINVAL', e instanceof Error ? e.message : String(e), operation)
}

/** An `NbdError` for a bad argument (`EINVAL` unless `code` says otherwise). */
export function invalid(operation: string, message: string, code = 'EINVAL'): NbdError {
  return new NbdError(code, message, operation)
}
