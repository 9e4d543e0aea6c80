/**
 * The native addon (crates/nbd-napi), loaded once for every module of the package; not
 * exported from it.
 *
 * @packageDocumentation
 */

import type * as Binding from './binding'

// The addon's loader sits at the package root, next to dist/ from which this file runs.
// eslint-disable-next-line @typescript-eslint/no-require-imports
export const native: typeof Binding = require('../binding.js')
