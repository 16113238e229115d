/**
 * The seed's four write-fault cases, each forced deterministically with the
 * saver hold hook, in a separate workload process; each must leave the image
 * equal to the pause-time content and put the new bytes in the next checkpoint.
 */
import { afterEach, describe, expect, it } from 'vitest';
import type { LocalAgent } from '../../src/agent/local-agent.js';
import { PAGE, WorkloadProc, drain, killAll, pattern, removeTempDirs, startAgent, until } from './helpers.js';

const PAGES = 16;
let agent: LocalAgent | null = null;

afterEach(async () => {
  await agent?.close();
  agent = null;
  await killAll();
  removeTempDirs();
});

async function setup(job: string): Promise<WorkloadProc> {
  const a = startAgent();
  agent = a.agent;
  const w = WorkloadProc.start(a.socketPath, job);
  await w.ok('attach');
  await w.ok(`alloc r ${PAGES}`);
  await w.ok('fill r 1');
  return w;
}

function page(img: Map<string, { bytes: Buffer | null }>, p: number): Buffer | null {
  return img.get(`r:${p}`)?.bytes ?? null;
}

describe('write faults during a live save (sync path)', () => {
  it('case 1: a page outside the checkpoint set is queued for the next one and unprotected, image unaffected', async () => {
    const w = await setup('case1');
    const first = await agent!.checkpoint('case1');
    expect((await drain(first)).size).toBe(PAGES);
    await w.ok('write r 2 2'); // the only page of the next set
    const c = await agent!.checkpoint('case1', { mode: 'sync', testHold: { region: 'r', page: 2, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    await w.ok('write r 5 3'); // page 5 is not in this checkpoint's set
    expect(c.stats().faults[0]).toBe(1);
    c.testReleaseHold();
    const img = await drain(c);
    expect([...img.keys()]).toEqual(['r:2']);
    expect(page(img, 2)!.equals(pattern(2, 2))).toBe(true);
    const st = await c.result;
    expect(st.faults).toEqual([1, 0, 0, 0]);
    expect(st.syncRegions).toBe(1);
    const next = await drain(await agent!.checkpoint('case1'));
    expect([...next.keys()]).toEqual(['r:5']);
    expect(page(next, 5)!.equals(pattern(3, 5))).toBe(true);
  });

  it('case 2: a page already saved is queued for the next checkpoint, the image keeps what was saved', async () => {
    const w = await setup('case2');
    const c = await agent!.checkpoint('case2', { mode: 'sync', testHold: { region: 'r', page: 8, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    await w.ok('write r 3 2'); // page 3 was saved before the hold
    expect(c.stats().faults[1]).toBe(1);
    c.testReleaseHold();
    const img = await drain(c);
    expect(img.size).toBe(PAGES);
    for (let p = 0; p < PAGES; p++) expect(page(img, p)!.equals(pattern(1, p))).toBe(true);
    expect((await c.result).faults).toEqual([0, 1, 0, 0]);
    const next = await drain(await agent!.checkpoint('case2'));
    expect([...next.keys()]).toEqual(['r:3']);
    expect(page(next, 3)!.equals(pattern(2, 3))).toBe(true);
  });

  it('case 3: a page not yet saved is copied to shadow before the write proceeds', async () => {
    const w = await setup('case3');
    const c = await agent!.checkpoint('case3', { mode: 'sync', testHold: { region: 'r', page: 8, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    await w.ok('write r 10 2'); // page 10 is pending: its pause-time bytes must go to shadow first
    await w.ok('write r 8 2'); // the held page itself is still pending too
    const mid = c.stats();
    expect(mid.faults[2]).toBe(2);
    expect(mid.shadowCopies).toBe(2);
    c.testReleaseHold();
    const img = await drain(c);
    for (let p = 0; p < PAGES; p++) expect(page(img, p)!.equals(pattern(1, p))).toBe(true);
    const st = await c.result;
    expect(st.faults).toEqual([0, 0, 2, 0]);
    expect(st.shadowPeakBytes).toBe(2 * PAGE);
    const next = await drain(await agent!.checkpoint('case3'));
    expect([...next.keys()].sort()).toEqual(['r:10', 'r:8']);
    expect(page(next, 10)!.equals(pattern(2, 10))).toBe(true);
  });

  it('case 4: a write to the page being saved waits until it is saved', async () => {
    const w = await setup('case4');
    const c = await agent!.checkpoint('case4', { mode: 'sync', testHold: { region: 'r', page: 8, when: 'during' } });
    await until(() => c.testHeld(), 'saver held while saving page 8');
    await w.ok('bgwrite r 8 2');
    await until(() => c.stats().faults[3] === 1, 'case-4 fault');
    // the writer is blocked while the page is being saved: prove it is still waiting
    await w.ok('write r 0 5'); // the process itself runs (case 2 on another thread)
    expect(w.hasEvent('bgdone 8')).toBe(false);
    c.testReleaseHold();
    await w.event('bgdone 8');
    const img = await drain(c);
    expect(page(img, 8)!.equals(pattern(1, 8))).toBe(true);
    expect(page(img, 0)!.equals(pattern(1, 0))).toBe(true);
    const st = await c.result;
    expect(st.faults[3]).toBe(1);
    const next = await drain(await agent!.checkpoint('case4'));
    expect(page(next, 8)!.equals(pattern(2, 8))).toBe(true);
    expect(page(next, 0)!.equals(pattern(5, 0))).toBe(true);
  });
});
