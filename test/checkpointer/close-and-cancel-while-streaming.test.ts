/**
 * Backpressure and teardown while a checkpoint streams:
 *  - a consumer that stops reading stops the saver (ready batches stay at the
 *    queue depth), not memory growth;
 *  - closing the agent mid-stream rejects the pending reads with CANCELLED and
 *    the workload keeps running (its writes to protected pages go through);
 *  - cancelling a checkpoint carries its unsaved set over: the next checkpoint
 *    holds those pages plus the ones written since.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { isExaError } from '../../src/errors.js';
import { PAGE, WorkloadProc, cleanup, drain, pattern, startAgent, until } from './helpers.js';

afterEach(cleanup);

describe('a checkpoint that is streaming', () => {
  it('stops the saver when the consumer stops reading, and close() cancels it while the job keeps running', async () => {
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'closing');
    await w.ok('attach');
    await w.ok('alloc r 256');
    await w.ok('fill r 1');
    const c = await a.agent.checkpoint('closing', { mode: 'sync', batchBytes: 4 * PAGE, queueDepth: 2 });
    expect((await c.next())!.count).toBe(4);
    // the saver fills the queue (2 batches) and then waits for us
    await until(() => c.stats().batches === 3, 'queue full');
    await new Promise((r) => setTimeout(r, 100));
    expect(c.stats().batches).toBe(3);
    expect(c.stats().pagesSaved).toBeLessThanOrEqual(4 * 4);

    const pending = c.next(); // resolves from the queue
    expect((await pending)!.count).toBe(4);
    await a.agent.close();
    // whatever is still queued or coming ends in CANCELLED
    let err: unknown = null;
    try { for (;;) { if ((await c.next()) === null) break; } } catch (e) { err = e; }
    expect(isExaError(err, 'CANCELLED')).toBe(true);
    await expect(c.result).rejects.toSatisfy((e: unknown) => isExaError(e, 'CANCELLED'));
    // every page was write-protected and unsaved; the job still writes them all and exits cleanly
    await w.ok('fill r 2');
    await w.ok('exit');
    expect(await w.exited()).toBe(0);
  });

  it('cancel() carries the unsaved set over to the next checkpoint', async () => {
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'cancel');
    await w.ok('attach');
    await w.ok('alloc r 32');
    await w.ok('fill r 1');
    expect((await drain(await a.agent.checkpoint('cancel'))).size).toBe(32);
    for (const p of [1, 2, 3]) await w.ok(`write r ${p} 2`);
    const c = await a.agent.checkpoint('cancel', { mode: 'sync', testHold: { region: 'r', page: 2, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    c.cancel();
    await expect(c.result).rejects.toSatisfy((e: unknown) => isExaError(e, 'CANCELLED'));
    await w.ok('write r 4 3');
    await w.ok('write r 2 3');
    const next = await drain(await a.agent.checkpoint('cancel'));
    expect([...next.keys()].sort()).toEqual(['r:1', 'r:2', 'r:3', 'r:4']);
    expect(next.get('r:1')!.bytes!.equals(pattern(2, 1))).toBe(true);
    expect(next.get('r:2')!.bytes!.equals(pattern(3, 2))).toBe(true);
  });

  it('bounds shadow memory: case-3 writers wait for the saver instead of growing the shadow', async () => {
    const a = startAgent({ shadowBudgetBytes: 4 * PAGE });
    const w = WorkloadProc.start(a.socketPath, 'shadow');
    await w.ok('attach');
    await w.ok('alloc r 64');
    await w.ok('fill r 1');
    const c = await a.agent.checkpoint('shadow', { mode: 'sync', testHold: { region: 'r', page: 0, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    for (let p = 10; p < 20; p++) await w.ok(`bgwrite r ${p} 2`);
    await until(() => c.stats().faults[2] === 10, '10 case-3 faults');
    // whichever 4 writers came first got the shadow slots and finished; the other 6 wait
    await until(() => w.eventCount('bgdone') === 4, '4 writers done');
    const mid = c.stats();
    expect(mid.shadowWaits).toBe(6);
    expect(mid.shadowPeakBytes).toBe(4 * PAGE);
    await new Promise((r) => setTimeout(r, 50));
    expect(w.eventCount('bgdone')).toBe(4);
    c.testReleaseHold();
    await until(() => w.eventCount('bgdone') === 10, 'all 10 writers done');
    const img = await drain(c);
    for (let p = 0; p < 64; p++) expect(img.get(`r:${p}`)!.bytes!.equals(pattern(1, p))).toBe(true);
    expect((await c.result).shadowPeakBytes).toBe(4 * PAGE);
    const next = await drain(await a.agent.checkpoint('shadow', { mode: 'sync' }));
    expect(next.size).toBe(10);
    for (let p = 10; p < 20; p++) expect(next.get(`r:${p}`)!.bytes!.equals(pattern(2, p))).toBe(true);
  });
});
