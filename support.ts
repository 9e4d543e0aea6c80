/**
 * The calls that need no handle: the package's version and what this build supports
 * (libnbd's `nbd_supports_*`, `nbd_is_uri`).
 *
 * @packageDocumentation
 */

import type { Handle } from './handle'
import { native } from './native'

// eslint-disable-next-line @typescript-eslint/no-require-imports
const pkg: { version: string } = require('../package.json')

/** The version of this package. */
export const version: string = pkg.version

/** Whether this build can connect over AF_VSOCK (`nbd_supports_vsock`): true on Linux. */
export function supportsVsock(): boolean {
  return native.supportsVsock()
}

/** Whether this build speaks TLS (`nbd_supports_tls`). */
export function supportsTls(): boolean {
  return native.supportsTls()
}

/** Whether this build understands NBD URIs (`nbd_supports_uri`): always true. */
export function supportsUri(): boolean {
  return native.supportsUri()
}

/**
 * Whether `s` looks like an NBD URI (`nbd_is_uri`): a cheap check of the scheme followed by
 * `://` (`nbd://`, `nbds://`, `nbd+unix://`, `nbd+vsock://`, `nbd+ssh://` and their `nbds`
 * forms; `nbd:foo` is not one), not a full parse; {@link Handle.connectUri} validates.
 */
export function isUri(s: string): boolean {
  return typeof s === 'string' && native.isUri(s)
}
