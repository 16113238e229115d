/**
 * Bad input to the cluster commands gets a clear error and leaves nothing
 * half-done: --to an unknown host (the error lists the known hosts), a job
 * already running on the target, a job id that does not exist, a command that
 * does not exist on the target, a second workload claiming a running job's id.
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
});
