// Run by test-pack.sh inside an empty project where nbd-client was installed from packed
// tarballs: loads it as an application would, checks that the loader picked the addon of
// the expected platform package, then writes and reads back through nbdkit.
//
//   node pack-check.js EXPECTED_PLATFORM
'use strict'

const assert = require('node:assert')
const crypto = require('node:crypto')

async function main() {
  const expected = process.argv[2]
  const nbd = require('nbd-client')
  const addons = Object.keys(require.cache).filter((f) => f.endsWith('.node'))
  const want = `node_modules/nbd-client-${expected}/nbd-client.${expected}.node`
  assert.ok(addons.some((f) => f.endsWith(want)), `expected ${want}, loaded ${addons.join(', ') || 'no addon'}`)

  const h = new nbd.Handle()
  try {
    await h.connectCommand(['nbdkit', '-s', '--exit-with-parent', 'memory', '4M'])
    assert.strictEqual(h.getSize(), 4 * 1024 * 1024)
    const data = crypto.randomBytes(256 * 1024)
    await h.pwrite(data, 1024 * 1024)
    const back = await h.pread(data.length, 1024 * 1024)
    assert.ok(back.equals(data), 'the data read back differs from what was written')
    const zeroes = await h.pread(4096, 0)
    assert.ok(zeroes.equals(Buffer.alloc(4096)), 'an unwritten block is not zero')
  } finally {
    await h.close()
  }
  const rel = addons.find((f) => f.endsWith(want)).split('node_modules/')[1]
  console.log(
    `pack-check: ${expected}: ${process.version} ${process.arch}, nbd-client ${nbd.version} ` +
      `(addon ${rel}; vsock ${nbd.supportsVsock() ? 'supported' : 'not supported'}): wrote and read 256 KiB through nbdkit`,
  )
}

main().catch((e) => {
  console.error(`pack-check: ${process.argv[2]}: ${e.stack || e}`)
  process.exit(1)
})
