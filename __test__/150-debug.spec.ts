// Debug messages: options sent and replies received, commands with their cookies, replies.
import test from 'ava'
import { Handle } from 'nbd-client'
import { connectTo, seededBytes } from './helpers/nbd'
import { useNbdkit } from './helpers/servers'

test('setDebug(callback) reports the handshake, each command with its cookie, and each reply', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const log: [string, string][] = []
  const h = new Handle({ name: 'dbg', debug: (context, message) => log.push([context, message]), metaContexts: ['base:allocation'] })
  t.teardown(() => h.close())
  t.true(h.getDebug())
  await connectTo(h, server)
  await h.pwrite(seededBytes(4096, 1), 0)
  await h.pread(4096, 0)
  await h.shutdown()
  // Messages arrive through the event loop; give them a turn.
  await new Promise((resolve) => setImmediate(resolve))
  const text = log.map(([c, m]) => `${c}: ${m}`).join('\n')
  t.regex(text, /handshake: sending NBD_OPT_STRUCTURED_REPLY/)
  t.regex(text, /handshake: sending NBD_OPT_SET_META_CONTEXT/)
  t.regex(text, /handshake: received NBD_REP_META_CONTEXT to NBD_OPT_SET_META_CONTEXT/)
  t.regex(text, /handshake: handshake done: newstyle-fixed protocol, export size 1048576/)
  t.regex(text, /command: sending NBD_CMD_WRITE cookie 1 offset 0 count 4096/)
  t.regex(text, /command: sending NBD_CMD_READ cookie 2 offset 0 count 4096/)
  t.regex(text, /reply: cookie 2 done: success/)
  t.regex(text, /shutdown: sending NBD_CMD_DISC/)
})

test('setDebug(false) stops the messages; a failing command is reported with its errno', async (t) => {
  const server = await useNbdkit(t, ['--filter=error', 'memory', '1M', 'error-pread=EIO', 'error-pread-rate=1'])
  if (!server) return
  const log: string[] = []
  const h = new Handle({ debug: (_c, m) => log.push(m) })
  t.teardown(() => h.close())
  await connectTo(h, server)
  await t.throwsAsync(h.pread(512, 0))
  await new Promise((resolve) => setImmediate(resolve))
  t.true(log.some((m) => /cookie 1 done: EIO/.test(m)), log.join('\n'))
  h.setDebug(false)
  t.false(h.getDebug())
  const before = log.length
  await t.throwsAsync(h.pread(512, 0))
  await new Promise((resolve) => setImmediate(resolve))
  t.is(log.length, before, 'no messages once debug is off')
  h.setDebug(true)
  await t.throwsAsync(h.pread(512, 0))
  await new Promise((resolve) => setImmediate(resolve))
  t.true(log.length > before, 'and they come back when it is on again')
})
