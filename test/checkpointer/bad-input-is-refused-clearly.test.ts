/**
 * Bad input across the process boundary gets a clear error naming what was
 * wrong, and nothing crashes: zero and absurd region sizes, a duplicate region
 * name, a duplicate job id, an unknown job, attach with no agent, a peer uid
 * the agent does not accept, a second checkpoint of a busy job, and a peer
 * sending garbage on the socket (the agent answers, closes that connection,
 * logs, and keeps serving everyone else).
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isExaError } from '../../src/errors.js';
import { Workload } from '../../src/workload/index.js';
import { WORKLOAD_BIN, WorkloadProc, cleanup, drain, openDir, pattern, startAgent, tempDir, until } from './helpers.js';

afterEach(cleanup);

describe('bad input', () => {
  it('region sizes: zero, beyond the limit, beyond host memory; duplicate names; then the job still works', async () => {
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'sizes');
    await w.ok('attach');
    expect(await w.cmd('allocbytes r 0')).toMatch(/^err EINVAL .*"r": size 0/);
    expect(await w.cmd('allocbytes r 4000000000000000')).toMatch(/^err EINVAL .*exceeds the limit/);
    expect(await w.cmd('allocbytes r 200000000000000')).toMatch(/^err EINVAL .*exceeds the limit/);
    expect(await w.cmd('allocbytes huge 900000000000')).toMatch(/^err EINVAL .*exceeds this host's memory/);
    expect(await w.cmd('alloc bad/name 1')).toMatch(/^err EINVAL .*region name/);
    await w.ok('alloc r 4');
    expect(await w.cmd('alloc r 4')).toMatch(/^err EEXIST .*"r" already exists/);
    expect(await w.ok('list')).toBe('ok r');
    await w.ok('fill r 1');
    const img = await drain(await a.agent.checkpoint('sizes'));
    expect(img.size).toBe(4);
  });

  it('unknown job, duplicate job id, attach with no agent, uid not allowed', async () => {
    const a = startAgent({ socketMode: 0o666 });
    await expect(a.agent.checkpoint('no-such-job')).rejects.toSatisfy(
      (e: unknown) => isExaError(e, 'NOT_FOUND') && /no job "no-such-job"/.test((e as Error).message),
    );
    const w1 = WorkloadProc.start(a.socketPath, 'twin');
    await w1.ok('attach');
    // this agent has no consumer for app-initiated checkpoints: the call fails, it does not hang
    expect(await w1.cmd('ckpt')).toMatch(/^err ECANCELED .*no app-initiated checkpoints/);
    const w2 = WorkloadProc.start(a.socketPath, 'twin');
    expect(await w2.cmd('attach')).toMatch(/^err EEXIST .*job "twin" is already attached/);

    // socket and job id from the environment (EXA_AGENT_SOCKET, EXA_JOB_ID) when no arguments are given
    const envJob = new WorkloadProc([], { env: { ...process.env, EXA_AGENT_SOCKET: a.socketPath, EXA_JOB_ID: 'from-env' } });
    await envJob.ok('attach');
    expect(a.agent.job('from-env')).not.toBeNull();
    const noEnv = new WorkloadProc([], { env: { PATH: process.env.PATH ?? '' } });
    expect(await noEnv.cmd('attach')).toMatch(/^err EINVAL .*no agent socket/);

    const none = join(tempDir(), 'nobody-listens.sock');
    const w3 = WorkloadProc.start(none, 'lonely');
    expect(await w3.cmd('attach')).toMatch(/^err ENOENT .*no agent listening on/);
    expect(() => Workload.attach({ socketPath: none, jobId: 'lonely' })).toThrow(/no agent listening/);
    try { Workload.attach({ socketPath: none, jobId: 'lonely' }); } catch (e) { expect(isExaError(e, 'UNAVAILABLE')).toBe(true); }
    expect(() => Workload.attach({ socketPath: a.socketPath, jobId: 'bad job' })).toThrow(/job id "bad job"/);

    // SO_PEERCRED: an unprivileged uid the agent was not told to accept is refused
    const dir = openDir();
    const b = startAgent({ socketPath: join(dir, 'b.sock'), socketMode: 0o666 });
    const w4 = WorkloadProc.start(b.socketPath, 'intruder', { uid: 65534, gid: 65534 });
    expect(await w4.cmd('attach')).toMatch(/^err EACCES .*uid 65534 may not attach/);
    expect(b.agent.jobs()).toEqual([]);
    await b.agent.close();
  });

  it('a second checkpoint of a busy job is refused (CONFLICT); freeing a region mid-save keeps its image whole', async () => {
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'busy');
    await w.ok('attach');
    await w.ok('alloc r 8');
    await w.ok('fill r 1');
    const c = await a.agent.checkpoint('busy', { mode: 'sync', testHold: { region: 'r', page: 4, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    await expect(a.agent.checkpoint('busy')).rejects.toSatisfy(
      (e: unknown) => isExaError(e, 'CONFLICT') && /already has a checkpoint in progress/.test((e as Error).message),
    );
    await w.ok('free r'); // the running save finishes from the agent's own mapping
    expect(await w.ok('list')).toBe('ok');
    c.testReleaseHold();
    const img = await drain(c);
    expect(img.size).toBe(8);
    for (let p = 0; p < 8; p++) expect(img.get(`r:${p}`)!.bytes!.equals(pattern(1, p))).toBe(true);
    await c.result;
    expect(a.agent.job('busy')!.regions).toEqual([]);
    expect((await drain(await a.agent.checkpoint('busy'))).size).toBe(0);
  });

  it('garbage on the socket: each peer gets a protocol error and is disconnected; the agent keeps serving', async () => {
    const a = startAgent();
    const logs: string[] = [];
    a.agent.on('log', (l: string) => logs.push(l));
    const r = spawnSync(WORKLOAD_BIN, ['--garbage', a.socketPath], { encoding: 'utf8', timeout: 20_000 });
    expect(r.status).toBe(0);
    const out = r.stdout.trim().split('\n');
    const cases = ['three-bytes', 'bad-magic', 'length-mismatch', 'region-before-hello', 'bad-job-name', 'unknown-type'];
    for (const c of cases) {
      expect(out).toContainEqual(expect.stringMatching(new RegExp(`^${c} status=-71 protocol error: .+`)));
      expect(out).toContain(`${c} then closed`);
    }
    await until(() => logs.length >= cases.length, 'one log line per bad peer');
    expect(logs.every((l) => /protocol error/.test(l))).toBe(true);
    // still serving
    const w = WorkloadProc.start(a.socketPath, 'after-garbage');
    await w.ok('attach');
    await w.ok('alloc r 2');
    await w.ok('fill r 9');
    expect((await drain(await a.agent.checkpoint('after-garbage'))).size).toBe(2);
  });

  it('a region memfd that could shrink under the agent is refused, and libexa regions cannot be shrunk', async () => {
    // The agent maps every region; a job shrinking one under that mapping would make the
    // agent's next access raise SIGBUS. So region memfds must be sealed (F_SEAL_SHRINK).
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'hostile');
    await w.ok('attach');
    await w.ok('alloc r 4');
    await w.ok('fill r 3');
    expect(await w.cmd('unsealed evil 4')).toMatch(/^err EPERM .*region "evil": its memfd is not sealed against shrinking/);
    expect(await w.cmd('shrink r')).toMatch(/^err EPERM ftruncate/);
    const img = await drain(await a.agent.checkpoint('hostile'));
    expect(img.size).toBe(4);
    for (let p = 0; p < 4; p++) expect(img.get(`r:${p}`)!.bytes!.equals(pattern(3, p))).toBe(true);
    expect(a.agent.job('hostile')!.regions.map((r) => r.name)).toEqual(['r']);
  });
});
