/**
 * Remote writes (the entry point RDMA remoting will use): bytes written into a
 * job's region from the agent's side, where the job's write-protection cannot
 * see them, still join the next checkpoint; during a save, a page not yet
 * saved is copied to shadow before it is overwritten and a page being saved
 * is waited for, so the running checkpoint keeps its pause-time image.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isExaError } from '../../src/errors.js';
import { PAGE, WorkloadProc, cleanup, drain, pattern, startAgent, until } from './helpers.js';

afterEach(cleanup);

describe('remote writes through the checkpointer', () => {
  it('join the next checkpoint, and never change the image of the one being saved', async () => {
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'rdma');
    await w.ok('attach');
    await w.ok('alloc r 16');
    await w.ok('fill r 1');
    expect((await drain(await a.agent.checkpoint('rdma'))).size).toBe(16);

    // between checkpoints (async tracking): the kernel sees nothing, the checkpointer does
    await a.agent.remoteWrite('rdma', 'r', 3 * PAGE + 100, Buffer.alloc(200, 0xee));
    const dump = join(a.dir, 'r.bin');
    await w.ok(`dump r ${dump}`);
    const want3 = Buffer.from(pattern(1, 3));
    want3.fill(0xee, 100, 300);
    expect(readFileSync(dump).subarray(3 * PAGE, 4 * PAGE).equals(want3)).toBe(true);
    const c2 = await drain(await a.agent.checkpoint('rdma'));
    expect([...c2.keys()]).toEqual(['r:3']);
    expect(c2.get('r:3')!.bytes!.equals(want3)).toBe(true);

    // during a save: page 10 pending (copied to shadow first), page 2 saved, page 8 being saved (waits)
    const c = await a.agent.checkpoint('rdma', { full: true, mode: 'sync', testHold: { region: 'r', page: 8, when: 'during' } });
    await until(() => c.testHeld(), 'saver held while saving page 8');
    await a.agent.remoteWrite('rdma', 'r', 10 * PAGE, Buffer.alloc(PAGE, 0x10));
    await a.agent.remoteWrite('rdma', 'r', 2 * PAGE, Buffer.alloc(PAGE, 0x02));
    let wrote8 = false;
    const p8 = a.agent.remoteWrite('rdma', 'r', 8 * PAGE, Buffer.alloc(PAGE, 0x08)).then(() => { wrote8 = true; });
    await new Promise((r) => setTimeout(r, 50));
    expect(wrote8).toBe(false); // waits while page 8 is being saved
    c.testReleaseHold();
    await p8;
    const img = await drain(c);
    for (let p = 0; p < 16; p++) expect(img.get(`r:${p}`)!.bytes!.equals(p === 3 ? want3 : pattern(1, p)), `page ${p}`).toBe(true);
    const st = await c.result;
    expect(st.shadowCopies).toBe(1); // page 10
    const next = await drain(await a.agent.checkpoint('rdma'));
    expect([...next.keys()].sort()).toEqual(['r:10', 'r:2', 'r:8']);
    expect(next.get('r:10')!.bytes!.equals(Buffer.alloc(PAGE, 0x10))).toBe(true);
    expect(next.get('r:8')!.bytes!.equals(Buffer.alloc(PAGE, 0x08))).toBe(true);

    await expect(a.agent.remoteWrite('rdma', 'r', 16 * PAGE - 10, Buffer.alloc(20))).rejects.toSatisfy(
      (e: unknown) => isExaError(e, 'INVALID_ARGUMENT') && /outside region "r"/.test((e as Error).message),
    );
    await expect(a.agent.remoteWrite('rdma', 'nope', 0, Buffer.alloc(1))).rejects.toSatisfy((e: unknown) => isExaError(e, 'NOT_FOUND'));
  });
});
