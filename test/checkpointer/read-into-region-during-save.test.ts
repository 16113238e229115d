/**
 * A read() from a pipe into a region page that is still waiting to be saved
 * (the kernel takes the write fault inside copy_to_user) succeeds during a
 * live save; the image keeps the old bytes and the next checkpoint has the new
 * ones. This only works because the workload's uffd was made from the
 * /dev/userfaultfd descriptor the agent passed (a UFFD_USER_MODE_ONLY uffd
 * fails it with EFAULT). Run as root and as the unprivileged user `nobody`.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { WorkloadProc, cleanup, drain, openDir, pattern, startAgent, until } from './helpers.js';

const NOBODY = 65534;
afterEach(cleanup);

describe.each([
  ['root', null],
  ['nobody (unprivileged)', NOBODY],
] as const)('read() into a region during a checkpoint, workload as %s', (_who, uid) => {
  it('succeeds; the image keeps the old page and the next checkpoint has the read bytes', async () => {
    const dir = openDir();
    const a = startAgent({ socketPath: join(dir, 'agent.sock'), socketMode: 0o666, allowUids: uid === null ? [] : [uid] });
    const job = uid === null ? 'read-root' : 'read-nobody';
    const w = WorkloadProc.start(a.socketPath, job, uid === null ? {} : { uid, gid: NOBODY });
    expect(await w.cmd('attach')).toMatch(/^ok/);
    const info = await a.agent.waitForJob(job);
    expect(info.uid).toBe(uid ?? 0);
    expect(info.userModeOnly).toBe(false);
    await w.ok('alloc r 16');
    await w.ok('fill r 1');
    const c = await a.agent.checkpoint(job, { mode: 'sync', testHold: { region: 'r', page: 8, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    expect(await w.cmd('pipe r 10 2')).toBe('ok'); // page 10 not saved yet: case 3 inside read()
    expect(c.stats().faults[2]).toBe(1);
    c.testReleaseHold();
    const img = await drain(c);
    expect(img.get('r:10')!.bytes!.equals(pattern(1, 10))).toBe(true);
    await c.result;
    const next = await drain(await a.agent.checkpoint(job));
    expect([...next.keys()]).toEqual(['r:10']);
    expect(next.get('r:10')!.bytes!.equals(pattern(2, 10))).toBe(true);
  });
});
