/**
 * Incremental exactness: the first checkpoint of a chain holds every page
 * (zero pages flagged, no bytes); after writing K known pages, including pages
 * never touched before (they were unpopulated when protected:
 * UFFD_FEATURE_WP_UNPOPULATED), the next checkpoint holds exactly those K
 * pages with their new bytes, on both the copy-at-pause and the live sync path.
 * A region freed and allocated again under the same name is new memory: the
 * next increment holds all of its pages (zeros flagged), so a store that
 * inherits pages by region name never restores the old region's bytes.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { WorkloadProc, cleanup, drain, pattern, startAgent } from './helpers.js';

const PAGES = 256;
afterEach(cleanup);

describe.each(['auto', 'sync'] as const)('incremental checkpoints (%s mode)', (mode) => {
  it('holds exactly the K pages written since the previous checkpoint, never-touched pages included', async () => {
    const a = startAgent();
    const job = `inc-${mode}`;
    const w = WorkloadProc.start(a.socketPath, job);
    await w.ok('attach');
    await w.ok(`alloc r ${PAGES}`);
    // populate only the first half; the second half is never touched before checkpoint 1
    for (let p = 0; p < PAGES / 2; p++) await w.ok(`write r ${p} 1`);

    const c1 = await a.agent.checkpoint(job, { mode });
    const img1 = await drain(c1);
    const s1 = await c1.result;
    expect(img1.size).toBe(PAGES);
    expect(s1.pagesSaved).toBe(PAGES / 2);
    expect(s1.zeroPages).toBe(PAGES / 2);
    for (let p = 0; p < PAGES / 2; p++) expect(img1.get(`r:${p}`)!.bytes!.equals(pattern(1, p))).toBe(true);
    for (let p = PAGES / 2; p < PAGES; p++) expect(img1.get(`r:${p}`)!.zero).toBe(true);

    // K known pages: some populated before, some never touched, one rewritten twice, one zeroed
    const written = [0, 7, 100, 127, 128, 129, 200, 255];
    for (const p of written) await w.ok(`write r ${p} 2`);
    await w.ok('write r 7 3');
    await w.ok('zero r 100');

    for (let round = 0; round < 2; round++) {
      const c2 = await a.agent.checkpoint(job, { mode });
      const img2 = await drain(c2);
      const s2 = await c2.result;
      if (round === 0) {
        expect([...img2.keys()].sort()).toEqual(written.map((p) => `r:${p}`).sort());
        expect(s2.dirtyPages).toBe(written.length);
        for (const p of written) {
          const got = img2.get(`r:${p}`)!;
          if (p === 100) expect(got.zero).toBe(true);
          else expect(got.bytes!.equals(pattern(p === 7 ? 3 : 2, p))).toBe(true);
        }
      } else {
        // nothing written since: an empty increment
        expect(img2.size).toBe(0);
        expect(s2.dirtyPages).toBe(0);
      }
    }
    expect(a.agent.job(job)!.checkpoints).toBe(3);
  });
});

describe('async tracking edge', () => {
  it('a written page whose page-table entry is dropped (MADV_DONTNEED, as reclaim does) is still in the next checkpoint', async () => {
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'zap');
    await w.ok('attach');
    await w.ok('alloc r 16');
    await w.ok('fill r 1');
    await drain(await a.agent.checkpoint('zap'));
    expect(a.agent.job('zap')!.asyncTracking).toBe(true);
    await w.ok('write r 5 2');
    await w.ok('dontneed r 5');
    const img = await drain(await a.agent.checkpoint('zap'));
    expect([...img.keys()]).toEqual(['r:5']);
    expect(img.get('r:5')!.bytes!.equals(pattern(2, 5))).toBe(true);
    await w.ok('dontneed r 6'); // dropped without a write: the next write must still be seen
    await w.ok('write r 6 3');
    const img2 = await drain(await a.agent.checkpoint('zap'));
    expect([...img2.keys()]).toEqual(['r:6']);
    expect(img2.get('r:6')!.bytes!.equals(pattern(3, 6))).toBe(true);
  });
});

describe('a region freed and allocated again under the same name', () => {
  it('is saved whole by the next increment (unwritten pages as zero pages), not inherited from the old region', async () => {
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'realloc');
    await w.ok('attach');
    await w.ok('alloc r 8');
    await w.ok('fill r 1');
    const img1 = await drain(await a.agent.checkpoint('realloc'));
    expect(img1.size).toBe(8);
    await w.ok('free r');
    await w.ok('alloc r 8');
    await w.ok('write r 3 2');
    const img2 = await drain(await a.agent.checkpoint('realloc'));
    expect(img2.size).toBe(8);
    for (let p = 0; p < 8; p++) {
      if (p === 3) expect(img2.get('r:3')!.bytes!.equals(pattern(2, 3))).toBe(true);
      else expect(img2.get(`r:${p}`)!.zero).toBe(true);
    }
  });
});
