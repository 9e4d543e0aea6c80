/**
 * Small pieces shared by the whole-export modules (map.ts, info.ts, copy.ts); not exported
 * from the package.
 *
 * @packageDocumentation
 */

/** An `AbortError` of Node's usual shape (`name` 'AbortError', `code` 'ABORT_ERR'), as the commands reject with. */
export function abortError(signal?: AbortSignal): Error {
  const reason: unknown = signal?.reason
  const e = new Error('The operation was aborted', reason === undefined ? undefined : { cause: reason })
  e.name = 'AbortError'
  Object.defineProperty(e, 'code', { value: 'ABORT_ERR', enumerable: true })
  return e
}

/** Throws {@link abortError} when `signal` has fired. */
export function checkAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw abortError(signal)
}
