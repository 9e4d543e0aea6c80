/**
 * Running a native command that an `AbortSignal` may abort; not exported from the package.
 *
 * Each native command returns its own promise, made and settled by the binding: on the
 * event-loop driver right where the reply is read, on the JavaScript thread. Failures are
 * `NbdError`s made by the factory `makeError` (errors.ts), which the binding calls with the
 * errno name and number. Each signal gets one `NativeCancel`, shared by all the commands it
 * is passed to, and one 'abort' listener while any of them is pending.
 *
 * @packageDocumentation
 */

import type * as Binding from './binding'
import { AbortError } from './errors'
import { native } from './native'

/** What this module keeps per signal: see {@link watch}. */
interface SignalWatch {
  /** Cancels, natively, every command the signal was passed to. */
  cancel: Binding.NativeCancel
  /** Rejects each of those commands' promises that is still pending. */
  pending: Set<() => void>
  /** The signal's 'abort' listener, attached while `pending` is not empty. */
  onAbort: () => void
  attached: boolean
}

const watches = new WeakMap<AbortSignal, SignalWatch>()

/**
 * The one `NativeCancel` of `signal`, made on its first use and shared by every command it
 * is passed to, on every handle: aborting a signal aborts all of its commands, so one native
 * token serves them all, and a native object per command (which cost more than the rest of
 * a command with a signal) is not paid. The watch is a WeakMap value and keeps nothing alive.
 *
 * Its one 'abort' listener is attached while commands are pending and removed when the last
 * one settles: Node keeps a timeout signal (`AbortSignal.timeout`) with a listener alive until
 * its timer fires, which a signal per command would otherwise turn into a pile-up.
 */
function watch(signal: AbortSignal): SignalWatch {
  let w = watches.get(signal)
  if (w === undefined) {
    const entry: SignalWatch = {
      cancel: new native.NativeCancel(),
      pending: new Set(),
      onAbort: () => {
        entry.attached = false
        entry.cancel.cancel()
        for (const reject of entry.pending) reject()
        entry.pending.clear()
      },
      attached: false,
    }
    watches.set(signal, entry)
    w = entry
  }
  if (!w.attached) {
    signal.addEventListener('abort', w.onAbort, { once: true })
    w.attached = true
  }
  return w
}

/** Forgets a settled command; the listener goes with the last pending one. */
function settled(signal: AbortSignal, w: SignalWatch, reject: () => void): void {
  w.pending.delete(reject)
  if (w.pending.size === 0 && w.attached) {
    signal.removeEventListener('abort', w.onAbort)
    w.attached = false
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
  const w = watch(signal)
  const command = start(w.cancel)
  return new Promise<T>((resolve, reject) => {
    const rejectNow = (): void => reject(new AbortError(signal.reason))
    w.pending.add(rejectNow)
    command.then(
      (v) => {
        settled(signal, w, rejectNow)
        resolve(v)
      },
      (e: unknown) => {
        settled(signal, w, rejectNow)
        reject(e)
      },
    )
  })
}

/** Runs a native command with or without an abort signal. */
export function run<T>(signal: AbortSignal | undefined, start: (cancel: Binding.NativeCancel | null) => Promise<T>): Promise<T> {
  return signal === undefined ? start(null) : abortable(signal, start)
}
