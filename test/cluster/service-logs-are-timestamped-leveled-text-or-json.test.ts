/**
 * `exaagent` and `exastore serve` log through pino: human lines with time,
 * level and component by default, one JSON object per line with
 * --log-format json, filtered by --log-level; a refused RPC is logged at
 * debug with its method, code and peer. Bad values of the flags are usage errors.
 */
import { afterEach, expect, it } from 'vitest';
import { BIN, cli, start, startStore, stopAll, tempDir, waitFor } from './helpers.js';

afterEach(stopAll);

function jsonLines(text: string): Record<string, unknown>[] {
  return text.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
}

it('an agent that cannot reach its coordinator says so in a timestamped WARN line, as text or as JSON', async () => {
  const text = start('exaagent text', process.execPath, [BIN('exaagent'), '--host', 'host-t', '--store', '127.0.0.1:1',
    '--state-dir', tempDir('exa-log-t-'), '--no-dma']);
  await waitFor(text, /ready agent=/);
  expect(text.output()).toMatch(/^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] WARN: \(exaagent\) coordinator unreachable: .*127\.0\.0\.1:1.* {"host":"host-t","coordinator":"127\.0\.0\.1:1"}$/m);

  const json = start('exaagent json', process.execPath, [BIN('exaagent'), '--host', 'host-j', '--store', '127.0.0.1:1',
    '--state-dir', tempDir('exa-log-j-'), '--no-dma', '--log-format', 'json']);
  await waitFor(json, /ready agent=/);
  const warn = jsonLines(json.output()).find((l) => /coordinator unreachable/.test(String(l.msg)));
  expect(warn).toMatchObject({ level: 40, component: 'exaagent', host: 'host-j', coordinator: '127.0.0.1:1' });
  expect(Date.parse(String(warn!.time))).toBeGreaterThan(Date.now() - 60_000);

  const quiet = start('exaagent quiet', process.execPath, [BIN('exaagent'), '--host', 'host-q', '--store', '127.0.0.1:1',
    '--state-dir', tempDir('exa-log-q-'), '--no-dma', '--log-level', 'error']);
  await waitFor(quiet, /ready agent=/);
  await new Promise((r) => setTimeout(r, 300));
  expect(quiet.output()).not.toMatch(/coordinator unreachable/);
});

it('a store at --log-level debug logs each refused call with its method, code and peer', async () => {
  const store = await startStore({ args: ['--log-format', 'json', '--log-level', 'debug'] });
  const r = await cli('exastore', ['ls', '--store', store.address, 'no-such-job']);
  expect(r.code).toBe(3);
  await waitFor(store.proc, /ListCheckpoints refused/);
  const line = jsonLines(store.proc.output()).find((l) => l.rpc === '/exa.v1.Store/ListCheckpoints');
  expect(line).toMatchObject({ level: 20, code: 5, component: 'exastore' });
  expect(String(line!.msg)).toMatch(/no-such-job/);
  expect(String(line!.peer)).toMatch(/127\.0\.0\.1:\d+/);
});

it('refuses an unknown --log-format or --log-level with the choices', async () => {
  const f = await cli('exaagent', ['--host', 'h', '--store', '127.0.0.1:1', '--state-dir', tempDir('exa-log-bad-'), '--log-format', 'xml']);
  expect(f.code).toBe(2);
  expect(f.stderr).toMatch(/--log-format must be one of text, json, got "xml"/);
  const l = await cli('exastore', ['serve', '--data', tempDir('exa-log-bad-store-'), '--port', '0', '--log-level', 'loud']);
  expect(l.code).toBe(2);
  expect(l.stderr).toMatch(/--log-level must be one of trace, debug, info, warn, error, fatal, silent, got "loud"/);
});
