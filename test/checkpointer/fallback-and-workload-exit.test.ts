/**
 * Two degraded situations:
 *  - the agent cannot pass /dev/userfaultfd (e.g. it is not root): the workload
 *    falls back to a UFFD_USER_MODE_ONLY uffd with a printed warning;
 *    checkpoints stay exact, but a read() into a page not yet saved fails with
 *    EFAULT during the save (the documented cost of the fallback);
 *  - the workload exits in the middle of a save: the checkpoint still
 *    completes from the agent's own mapping of the memfds with the pause-time
 *    image, and the job is detached.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { WorkloadProc, cleanup, drain, pattern, startAgent, until } from './helpers.js';

afterEach(async () => {
  delete process.env.EXA_AGENT_NO_DEVUFFD;
  await cleanup();
});

describe('degraded situations', () => {
  it('without /dev/userfaultfd from the agent: user-mode-only fallback with a warning; images exact; read() into a pending page fails with EFAULT', async () => {
    const a = startAgent();
    process.env.EXA_AGENT_NO_DEVUFFD = '1'; // read by the agent (this process) at HELLO
    const w = WorkloadProc.start(a.socketPath, 'fallback');
    await w.ok('attach');
    delete process.env.EXA_AGENT_NO_DEVUFFD;
    await until(() => /warning: .*UFFD_USER_MODE_ONLY.*EFAULT/.test(w.stderr), 'the fallback warning on stderr');
    expect(a.agent.job('fallback')!.userModeOnly).toBe(true);
    await w.ok('alloc r 16');
    await w.ok('fill r 1');
    const c = await a.agent.checkpoint('fallback', { mode: 'sync', testHold: { region: 'r', page: 8, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    await w.ok('write r 10 2'); // user-mode writes are handled (case 3)
    expect(await w.cmd('pipe r 11 2')).toMatch(/^err EFAULT/);
    c.testReleaseHold();
    const img = await drain(c);
    for (let p = 0; p < 16; p++) expect(img.get(`r:${p}`)!.bytes!.equals(pattern(1, p))).toBe(true);
    await c.result;
    const next = await drain(await a.agent.checkpoint('fallback'));
    expect(next.get('r:10')!.bytes!.equals(pattern(2, 10))).toBe(true);
  });

  it('a workload that dies mid-save: the checkpoint completes with the pause-time image and the job is detached', async () => {
    const a = startAgent();
    const detached: string[] = [];
    a.agent.on('detached', (j: string) => detached.push(j));
    const w = WorkloadProc.start(a.socketPath, 'mortal');
    await w.ok('attach');
    await w.ok('alloc r 32');
    await w.ok('fill r 1');
    const c = await a.agent.checkpoint('mortal', { mode: 'sync', testHold: { region: 'r', page: 4, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    await w.ok('write r 20 2'); // shadowed first: the image keeps pattern 1
    w.proc.kill('SIGKILL');
    await w.exited();
    await until(() => detached.includes('mortal'), 'job detached');
    expect(a.agent.job('mortal')).toBeNull();
    c.testReleaseHold();
    const img = await drain(c);
    expect(img.size).toBe(32);
    for (let p = 0; p < 32; p++) expect(img.get(`r:${p}`)!.bytes!.equals(pattern(1, p))).toBe(true);
    const st = await c.result;
    expect(st.faults[2]).toBe(1);
  });
});
