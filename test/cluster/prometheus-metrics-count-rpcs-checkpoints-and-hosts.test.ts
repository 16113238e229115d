/**
 * `exastore serve` and `exaagent` with --metrics-listen serve Prometheus
 * metrics that follow what really happened: gRPC calls by method and status
 * code, checkpoints committed with their pause, jobs and hosts by state,
 * pages held by the store. Bad flags and bad HTTP requests get clear errors.
 */
import { existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { AgentClient } from '../../src/hostagent/client.js';
import { BIN, HEAT, cli, start, startAgent, startStore, stopAll, tempDir, waitFor } from './helpers.js';

afterEach(stopAll);

/** The value of one sample (name and exact label set as printed), or undefined when absent. */
function sample(text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith(`${series} `)) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

async function scrape(url: string): Promise<string> {
  const r = await fetch(url);
  expect(r.status).toBe(200);
  expect(r.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  return r.text();
}

it('store and agent metrics count RPCs by code, committed checkpoints, jobs, hosts and stored pages', async () => {
  const store = await startStore({ args: ['--metrics-listen', '127.0.0.1:0'] });
  const storeMetrics = (await waitFor(store.proc, /metrics on (http:\/\/\S+)/))[1]!;
  const a = await startAgent('host-m', store.address, { args: ['--metrics-listen', '127.0.0.1:0'] });
  const agentMetrics = (await waitFor(a.proc, /metrics=(http:\/\/\S+)/))[1]!;

  const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-m', '--job', 'heat-m', '--',
    HEAT, '--n', '64', '--steps', '100000', '--step-delay-us', '2000']);
  expect(run.code, run.stderr).toBe(0);
  for (let i = 0; i < 2; i++) {
    const c = await cli('exackpt', ['checkpoint', '--store', store.address, 'heat-m']);
    expect(c.code, c.stderr).toBe(0);
  }
  const missing = await cli('exastore', ['ls', '--store', store.address, 'no-such-job']);
  expect(missing.code).not.toBe(0);

  const s = await scrape(storeMetrics);
  const put = 'grpc_server_handled_total{grpc_service="exa.v1.Store",grpc_method="PutCheckpoint",grpc_type="bidi_stream",grpc_code="OK"}';
  expect(sample(s, put)).toBe(2);
  expect(sample(s, 'grpc_server_handled_total{grpc_service="exa.v1.Store",grpc_method="ListCheckpoints",grpc_type="unary",grpc_code="NOT_FOUND"}')).toBeGreaterThanOrEqual(1);
  expect(sample(s, 'grpc_server_handling_seconds_count{grpc_service="exa.v1.Store",grpc_method="PutCheckpoint",grpc_type="bidi_stream"}')).toBe(2);
  expect(sample(s, 'exa_store_pages')).toBeGreaterThan(0);
  expect(sample(s, 'exa_store_page_bytes')).toBe(4096 * sample(s, 'exa_store_pages')!);
  expect(sample(s, 'exa_coordinator_hosts{state="up"}')).toBe(1);
  expect(sample(s, 'exa_coordinator_jobs{state="running"}')).toBe(1);
  expect(sample(s, 'process_cpu_seconds_total')).toBeGreaterThan(0);

  const m = await scrape(agentMetrics);
  expect(sample(m, 'exa_agent_checkpoints_total{kind="full",result="committed"}')).toBe(1);
  expect(sample(m, 'exa_agent_checkpoints_total{kind="incremental",result="committed"}')).toBe(1);
  expect(sample(m, 'exa_agent_checkpoint_pause_seconds_count')).toBe(2);
  expect(sample(m, 'exa_agent_checkpoint_pages_total{what="saved"}')).toBeGreaterThan(0);
  expect(sample(m, 'exa_agent_jobs{state="running"}')).toBe(1);
  expect(sample(m, 'exa_agent_jobs_without_recent_checkpoint')).toBe(0);
  expect(sample(m, 'grpc_server_handled_total{grpc_service="exa.v1.Agent",grpc_method="Checkpoint",grpc_type="server_stream",grpc_code="OK"}')).toBe(2);

  // The store going away shows up: a failed checkpoint, and a job without a recent one.
  await store.proc.kill('SIGKILL');
  const agent = await AgentClient.connect(a.address, { timeoutMs: 5000 });
  try {
    // the agent cannot reach the store: UNAVAILABLE (grpc-js words the cause differently from run to run)
    await expect(agent.checkpoint('heat-m', false)).rejects.toMatchObject({ code: 'UNAVAILABLE', message: expect.stringMatching(/checkpoint of job heat-m/) });
  } finally { agent.close(); }
  const t = await scrape(agentMetrics);
  expect(sample(t, 'exa_agent_checkpoints_total{kind="incremental",result="failed"}')).toBe(1);
  expect(sample(t, 'exa_agent_checkpoints_total{kind="full",result="committed"}')).toBe(1);
  expect(sample(t, 'exa_agent_jobs_without_recent_checkpoint')).toBe(1);
});

it('the metrics endpoint answers 404 for other paths, 405 for other methods, and /healthz', async () => {
  const store = await startStore({ args: ['--metrics-listen', '127.0.0.1:0'] });
  const url = (await waitFor(store.proc, /metrics on (http:\/\/\S+)\/metrics/))[1]!;
  const nf = await fetch(`${url}/nope`);
  expect(nf.status).toBe(404);
  expect(await nf.text()).toMatch(/no such path \/nope; metrics are at \/metrics/);
  const post = await fetch(`${url}/metrics`, { method: 'POST', body: 'x' });
  expect(post.status).toBe(405);
  expect((await fetch(`${url}/healthz`)).status).toBe(200);
  // still serving afterwards
  expect((await fetch(`${url}/metrics`)).status).toBe(200);
});

it('a malformed --metrics-listen or a port already in use is a clear error, before anything is served', async () => {
  const bad = await cli('exastore', ['serve', '--data', '/tmp/unused-exa-metrics', '--port', '0', '--metrics-listen', 'localhost']);
  expect(bad.code).toBe(2);
  expect(bad.stderr).toMatch(/--metrics-listen must be HOST:PORT.*"localhost"/);

  const busy = createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
  try {
    const port = (busy.address() as { port: number }).port;
    // No --state-dir: the agent creates its default one under $TMPDIR before binding its socket.
    const tmp = tempDir('exa-metrics-tmp-');
    const p = start('exaagent busy', process.execPath, [BIN('exaagent'), '--host', 'host-busy', '--store', '127.0.0.1:1',
      '--metrics-listen', `127.0.0.1:${port}`, '--no-dma'], { env: { TMPDIR: tmp } });
    const code = await p.exited;
    expect(code).not.toBe(0);
    expect(p.output()).toMatch(new RegExp(`cannot serve metrics on 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
    expect(existsSync(join(tmp, 'exa-agent-host-busy'))).toBe(true);
  } finally {
    busy.close();
  }
});
