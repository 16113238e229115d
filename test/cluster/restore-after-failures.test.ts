/**
 * Failures around a running job:
 *  - the source agent is SIGKILLed (host down): exarestore restores the job on
 *    another host from its last committed checkpoint, and it finishes with the
 *    uninterrupted checksum;
 *  - the store is restarted during a run: the job is not disturbed, the agent
 *    reports the gap, and checkpoints resume once the store is back;
 *  - the exarestore migrating a job dies (after the source's final checkpoint,
 *    or before it): the job shows MIGRATING, a plain exarestore refuses and
 *    says how to recover, and --resume-interrupted finishes the move; the job
 *    ends with the uninterrupted checksum.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { AgentClient } from '../../src/hostagent/client.js';
import { HEAT, cli, coordinator, finalChecksum, jobOn, killJobsOf, referenceChecksum, startAgent, startStore, stopAll, until } from './helpers.js';

afterEach(stopAll);

const argv = [HEAT, '--n', '96', '--steps', '500', '--step-delay-us', '8000'];

describe('restore after failures', () => {
  it('restores a job from its last committed checkpoint when its host died', async () => {
    const expected = referenceChecksum(argv);
    const store = await startStore();
    const a = await startAgent('host-a', store.address, { heartbeatMs: 200 });
    const b = await startAgent('host-b', store.address, { heartbeatMs: 200 });
    const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--job', 'heat-dead', '--', ...argv]);
    expect(run.code, run.stderr).toBe(0);
    await until('running', async () => ((await jobOn(a.address, 'heat-dead'))?.state === 'RUNNING' ? true : undefined));
    const ck = await cli('exackpt', ['checkpoint', 'heat-dead', '--store', store.address, '--json']);
    expect(ck.code, ck.stderr).toBe(0);
    const committed = (JSON.parse(ck.stdout) as { checkpoint: number }).checkpoint;
    // Host a dies: its agent and the job with it.
    await a.proc.kill('SIGKILL');
    killJobsOf(a.stateDir);
    const c = await coordinator(store.address);
    try {
      await until('host-a shown down', async () => ((await c.listHosts()).find((h) => h.host_id === 'host-a')?.state === 'DOWN' ? true : undefined));
    } finally { c.close(); }
    const r = await cli('exarestore', ['heat-dead', '--to', 'host-b', '--store', store.address, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const res = JSON.parse(r.stdout.trim().split('\n').pop()!) as { live: boolean; checkpoint: number };
    expect(res.live).toBe(false);
    expect(res.checkpoint).toBe(committed);
    expect(await finalChecksum(b.address, 'heat-dead')).toBe(expected);
  });

  it('keeps the job running through a store restart and resumes checkpoints', async () => {
    const expected = referenceChecksum(argv);
    const store = await startStore();
    const a = await startAgent('host-a', store.address);
    const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--job', 'heat-sr', '--every', '300ms', '--', ...argv]);
    expect(run.code, run.stderr).toBe(0);
    const first = await until('a periodic checkpoint', async () => {
      const j = await jobOn(a.address, 'heat-sr');
      return j && j.last_checkpoint > 0 ? j.last_checkpoint : undefined;
    });
    await store.proc.kill('SIGKILL');
    const gap = await until('the gap reported', async () => {
      const j = await jobOn(a.address, 'heat-sr');
      return j?.gap ? j : undefined;
    });
    expect(gap.state).toBe('RUNNING');
    expect(gap.gap).toMatch(/no checkpoint committed since/);
    // Same port and data: the agent's channel reconnects by itself.
    await startStore({ dataDir: store.dataDir, port: store.port });
    const resumed = await until('checkpoints resumed', async () => {
      const j = await jobOn(a.address, 'heat-sr');
      return j && j.last_checkpoint > first && !j.gap ? j.last_checkpoint : undefined;
    }, 30_000);
    expect(resumed).toBeGreaterThan(first);
    expect(await finalChecksum(a.address, 'heat-sr')).toBe(expected);
  });

  it.each([
    ['after the final checkpoint (the source ended the job)', true],
    ['before the final checkpoint (the job still runs on the source)', false],
  ])('finishes a migration whose exarestore died %s with --resume-interrupted', async (_what, finalTaken) => {
    const expected = referenceChecksum(argv);
    const store = await startStore();
    const a = await startAgent('host-a', store.address, { heartbeatMs: 200 });
    const b = await startAgent('host-b', store.address, { heartbeatMs: 200 });
    const job = 'heat-orphan';
    const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--job', job, '--', ...argv]);
    expect(run.code, run.stderr).toBe(0);
    await until('running', async () => ((await jobOn(a.address, job))?.state === 'RUNNING' ? true : undefined));
    // What a dying exarestore leaves behind: the move begun, and maybe the source's final checkpoint taken.
    const c = await coordinator(store.address);
    try {
      await c.beginMove(job, (await c.getPlacement(job)).epoch);
      if (finalTaken) {
        const src = await AgentClient.connect(a.address);
        try { await src.checkpoint(job, true); } finally { src.close(); }
        expect((await jobOn(a.address, job))?.state).toBe('STOPPED');
      }
    } finally { c.close(); }
    const refused = await cli('exarestore', [job, '--to', 'host-b', '--store', store.address]);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/being migrated already \(from host host-a\).*--resume-interrupted/);
    const r = await cli('exarestore', [job, '--to', 'host-b', '--store', store.address, '--resume-interrupted', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const res = JSON.parse(r.stdout.trim().split('\n').pop()!) as { to: string; live: boolean };
    expect(res).toMatchObject({ to: 'host-b', live: !finalTaken });
    expect(await finalChecksum(b.address, job)).toBe(expected);
    const c2 = await coordinator(store.address);
    try {
      const p = await c2.getPlacement(job);
      expect(p.host_id).toBe('host-b');
    } finally { c2.close(); }
  });
});
