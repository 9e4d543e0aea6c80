// Shared checks for the hostile-server specs: how fast a promise settles, what it settled
// with, and that the process did not allocate what a server claimed.
import fs from 'node:fs'
import type { ExecutionContext } from 'ava'
import { Handle, NbdError } from 'nbd-client'
import type { FakeConnection, FakeServer, NbdRequest } from './fake-server'

type HandleOptions = ConstructorParameters<typeof Handle>[0]

/** A promise's outcome, never a rejection. */
export type Outcome = { ok: true; value: unknown } | { ok: false; error: unknown }

export function settle(p: Promise<unknown>): Promise<Outcome> {
  return p.then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  )
}

/** The code of an outcome: 'resolved', an NbdError code, or a description of anything else. */
export function codeOf(o: Outcome): string {
  if (o.ok) return 'resolved'
  return o.error instanceof NbdError ? o.error.code : `not an NbdError: ${String(o.error)}`
}

/** The message of a rejected outcome ('' otherwise). */
export function messageOf(o: Outcome): string {
  return !o.ok && o.error instanceof Error ? o.error.message : ''
}

/** How long a test waits for a settle before calling it a hang. */
export const HANG_MS = 5000
/** The longest a settle may take to count as prompt. */
export const PROMPT_MS = 2000

/**
 * Waits for every promise, but at most HANG_MS: a promise still pending by then is reported
 * as the outcome 'hung' instead of stalling the test until ava's own timeout.
 */
export async function settleAll(ps: Promise<unknown>[]): Promise<{ outcomes: (Outcome | 'hung')[]; ms: number }> {
  const started = Date.now()
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<'hung'>((resolve) => {
    timer = setTimeout(() => resolve('hung'), HANG_MS)
  })
  const outcomes = await Promise.all(ps.map((p) => Promise.race([settle(p), deadline])))
  clearTimeout(timer)
  return { outcomes, ms: Date.now() - started }
}

/** Codes of settleAll's outcomes. */
export function codesOf(outcomes: (Outcome | 'hung')[]): string[] {
  return outcomes.map((o) => (o === 'hung' ? 'hung' : codeOf(o)))
}

/** Virtual high-water mark and resident size of this process, in bytes. */
export interface Memory {
  peak: number
  rss: number
}

export function memory(): Memory {
  const status = fs.readFileSync('/proc/self/status', 'utf8')
  const field = (name: string) => Number(/^(\w+):\s+(\d+) kB/m.exec(status.split('\n').find((l) => l.startsWith(name + ':')) ?? '')?.[2] ?? 0) * 1024
  return { peak: field('VmPeak'), rss: field('VmRSS') }
}

/**
 * Asserts that neither the address space high-water mark nor the resident size jumped since
 * `before`: a server's claim of gigabytes must never turn into an allocation of that size
 * (a 4 GiB buffer shows in VmPeak even if it was freed at once, or never touched).
 */
export function assertNoBigAllocation(t: ExecutionContext, before: Memory): void {
  const after = memory()
  const peak = after.peak - before.peak
  const rss = after.rss - before.rss
  t.true(peak < 1536 * 1024 * 1024, `address space high-water mark grew by ${peak} bytes`)
  t.true(rss < 128 * 1024 * 1024, `resident size grew by ${rss} bytes`)
}

/** A handle connected to the fake server, closed in the test's teardown. */
export async function openFake(t: ExecutionContext, server: FakeServer, options: HandleOptions = {}): Promise<Handle> {
  const h = new Handle(options)
  t.teardown(() => h.close())
  await h.connectUnix(server.socket)
  return h
}

/**
 * An onCommand hook that holds the first `n` requests unanswered, then hands them to
 * `respond` (which answers them, or not, through the connection). Requests after those get
 * the default answer.
 */
export function holdThen(n: number, respond: (held: NbdRequest[], conn: FakeConnection) => void | Promise<void>) {
  const held: NbdRequest[] = []
  return async (req: NbdRequest, conn: FakeConnection): Promise<'default' | 'handled'> => {
    if (held.length >= n) return 'default'
    held.push(req)
    if (held.length === n) await respond(held, conn)
    return 'handled'
  }
}
