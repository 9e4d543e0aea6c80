/**
 * Running a native command that an `AbortSignal` may abort; not exported from the package.
 *
 * Each native command returns its own promise, made and settled by the binding: on the
 * event-loop driver right where the reply is read, on the JavaScript thread. Failures are
 * `NbdError`s made by the factory `makeError` (errors.ts), which the binding calls with the
 * errno name and number. A signal adds a `NativeCancel` and one shared 'abort' listener.
 *
 * @packageDocumentation
 */

import type * as Binding from './binding'
import { AbortError } from './errors'
import { native } from './native'

/** The commands waiting on each signal, and the one 'abort' listener they share. */
const abortWatchers = new WeakMap<AbortSignal, { watchers: Set<() => void>; listener: () => void }>()

/**
 * Calls `onAbort` when `signal` aborts, until the returned function is called. All the
 * commands sharing a signal share one listener on it, so a signal passed to many commands
 * at once does not trip Node's MaxListenersExceededWarning; the listener goes with the last
 * of them, so a long-lived signal keeps nothing of ours once its commands are done.
 */
function watchAbort(signal: AbortSignal, onAbort: () => void): () => void {
  let entry = abortWatchers.get(signal)
  if (entry === undefined) {
    const watchers = new Set<() => void>()
    const listener = (): void => {
      abortWatchers.delete(signal)
      for (const f of watchers) f()
      watchers.clear()
    }
    signal.addEventListener('abort', listener, { once: true })
    entry = { watchers, listener }
    abortWatchers.set(signal, entry)
  }
  const { watchers, listener } = entry
  watchers.add(onAbort)
  return () => {
    if (!watchers.delete(onAbort) || watchers.size > 0) return
    abortWatchers.delete(signal)
    signal.removeEventListener('abort', listener)
  }
}

/**
 * Runs a native command that `signal` may abort: the returned promise rejects with an
 * `AbortError` at once when it aborts (the native side no longer sends the command if it is
 * still queued, and never writes into a read's buffer after that moment); otherwise it
 * settles as the command does.
 */
function abortable<T>(signal: AbortSignal, start: (cancel: Binding.NativeCancel) => Promise<T>): Promise<T> {
  if (signal.aborted) return Promise.reject(new AbortError(signal.reason))
  const cancel = new native.NativeCancel()
  const command = start(cancel)
  return new Promise<T>((resolve, reject) => {
    const unwatch = watchAbort(signal, () => {
      cancel.cancel()
      reject(new AbortError(signal.reason))
    })
    command.then(
      (v) => {
        unwatch()
        resolve(v)
      },
      (e: unknown) => {
        unwatch()
        reject(e)
      },
    )
  })
}

/** Runs a native command with or without an abort signal. */
export function run<T>(signal: AbortSignal | undefined, start: (cancel: Binding.NativeCancel | null) => Promise<T>): Promise<T> {
  return signal === undefined ? start(null) : abortable(signal, start)
}
