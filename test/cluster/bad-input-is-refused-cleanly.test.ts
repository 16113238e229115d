/**
 * Bad input to the cluster commands gets a clear error and leaves nothing
 * half-done: --to an unknown host (the error lists the known hosts), a job
 * already running on the target, a job id that does not exist, a command that
 * does not exist on the target, a second workload claiming a running job's id.
 * An agent reporting a bad DMA address or bad DMA sessions to the coordinator
 * is refused with the offending field named, and the coordinator keeps serving.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { HEAT, cli, coordinator, jobOn, startAgent, startStore, stopAll, until, type AgentHandle, type StoreHandle } from './helpers.js';

afterEach(stopAll);

describe('cluster commands refuse bad input', () => {
  let store: StoreHandle;
  let a: AgentHandle;
  let b: AgentHandle;
  const job = 'heat-bad';

  beforeEach(async () => {
    store = await startStore();
    a = await startAgent('host-a', store.address);
    b = await startAgent('host-b', store.address);
    const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--job', job, '--', HEAT, '--n', '64', '--steps', '100000', '--step-delay-us', '2000']);
    expect(run.code, run.stderr).toBe(0);
    await until('job running', async () => ((await jobOn(a.address, job))?.state === 'RUNNING' ? true : undefined));
  });

  it('names the known hosts when --to is unknown, and the job keeps running where it was', async () => {
    const r = await cli('exarestore', [job, '--to', 'host-zz', '--store', store.address]);
    expect(r.code).toBe(3);
    expect(r.stderr).toMatch(/host host-zz is not known.*known hosts: host-a \(up\), host-b \(up\)/);
    const c = await coordinator(store.address);
    try {
      const p = await c.getPlacement(job);
      expect(p.host_id).toBe('host-a');
      expect(p.state).toBe('RUNNING');
    } finally { c.close(); }
  });

  it('refuses to migrate a job onto the host it already runs on', async () => {
    const r = await cli('exarestore', [job, '--to', 'host-a', '--store', store.address]);
    expect(r.code).toBe(6);
    expect(r.stderr).toMatch(/job heat-bad is already running on host host-a/);
  });

  it('says a job id that does not exist does not exist', async () => {
    for (const args of [['exarestore', 'no-such-job', '--to', 'host-b'], ['exackpt', 'checkpoint', 'no-such-job'], ['exackpt', 'stop', 'no-such-job']]) {
      const r = await cli(args[0]!, [...args.slice(1), '--store', store.address]);
      expect(r.code, r.stderr).toBe(3);
      expect(r.stderr).toMatch(/job no-such-job does not exist/);
    }
  });

  it('refuses a command that does not exist on the target before anything starts', async () => {
    const r = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-b', '--job', 'ghost-1', '--', '/nonexistent/bin/ghost']);
    expect(r.code).toBe(3);
    expect(r.stderr).toMatch(/command "\/nonexistent\/bin\/ghost" does not exist on this host/);
    const c = await coordinator(store.address);
    try {
      await expect(c.getPlacement('ghost-1')).rejects.toThrow(/not known/);
    } finally { c.close(); }
  });

  it('refuses a second job with a running job\'s id, on either host', async () => {
    for (const host of ['host-a', 'host-b']) {
      const r = await cli('exackpt', ['run', '--store', store.address, '--agent', host, '--job', job, '--', HEAT, '--n', '16', '--steps', '1']);
      expect(r.code, r.stderr).toBe(6);
      expect(r.stderr).toMatch(/job heat-bad is already running on host host-a/);
    }
    expect((await jobOn(a.address, job))?.state).toBe('RUNNING');
    expect(await jobOn(b.address, job)).toBeUndefined();
  });

  it('rejects malformed ids and durations with a usage error', async () => {
    const bad = await cli('exarestore', ['../etc', '--to', 'host-b', '--store', store.address]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/job id "..\/etc" is not valid/);
    const dur = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--every', 'soon', '--', HEAT]);
    expect(dur.code).not.toBe(0);
    expect(dur.stderr).toMatch(/--every must be a duration/);
  });

  it('refuses an agent reporting a bad DMA address or bad DMA buffers, naming them, and keeps serving', async () => {
    const c = await coordinator(store.address);
    try {
      await expect(c.register('host-x', '127.0.0.1:1', [], 'not an address')).rejects.toThrow(/DMA address "not an address" of host host-x is not HOST:PORT/);
      await c.register('host-x', '127.0.0.1:1', [], '127.0.0.1:2');
      const bad = (dma_buffers: unknown) => c.heartbeat('host-x', [{ job: 'dma-x', pid: 1, last_checkpoint: 0, dma_buffers } as never]);
      await expect(bad([{ name: '../etc', size: '4096', grants: [] }])).rejects.toThrow(/job dma-x: DMA buffer name "..\/etc" is not valid/);
      await expect(bad([{ name: 'halo', size: '4096', grants: [{ peer: 'b', perms: 7 }] }])).rejects.toThrow(/grant of DMA buffer halo to b has perms 7, not 1..3/);
      await expect(bad([{ name: 'halo', size: '4096', grants: [{ peer: 'no/such', perms: 2 }] }])).rejects.toThrow(/job id "no\/such" is not valid/);
      await expect(bad([{ name: 'halo', size: '0', grants: [] }])).rejects.toThrow(/DMA buffer halo has size 0/);
      // still serving, and a good report is recorded
      await bad([{ name: 'halo', size: '4096', grants: [{ peer: 'dma-y', perms: 2 }] }]);
      const p = await c.getPlacement('dma-x');
      expect(p.dma_buffers).toEqual([{ name: 'halo', size: '4096', grants: [{ peer: 'dma-y', perms: 2 }] }]);
      expect(p.dma_address).toBe('127.0.0.1:2');
      expect((await c.listHosts()).map((h) => h.host_id)).toContain('host-a');
    } finally { c.close(); }
  });
});
