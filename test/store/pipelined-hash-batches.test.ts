/**
 * The server works on two hash batches of one upload at once (the next
 * batch's checks overlap the previous batch's index lookup, src/store/server.ts):
 * a page position sent again by a later batch in flight ends with the later
 * bytes, and a new page offered by batches in flight together is stored once.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient, pagesToBatch, type PageBatch } from '../../src/store/client.js';
import { PAGE, cleanupDirs, killAll, randomPage, regionsOf, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('pipelined hash batches', () => {
  it('keeps the later bytes of a position sent twice and stores a page offered twice once', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const N = 600;
    const regions = regionsOf([['mem', N]]);
    const first = (i: number): Buffer => randomPage(`pipe/a/${i}`);
    const later = (i: number): Buffer => randomPage(`pipe/b/${i}`);
    const shared = randomPage('pipe/shared');
    // Batch k covers pages 100k..100k+99; every batch also rewrites the first
    // 20 pages of the previous batch, and puts the shared page at its page 50.
    const batches: PageBatch[] = [];
    for (let k = 0; k < 6; k++) {
      const pages: { region: number; index: number; bytes: Buffer }[] = [];
      for (let i = 100 * k; i < 100 * k + 100; i++) pages.push({ region: 0, index: i, bytes: i % 100 === 50 ? shared : first(i) });
      if (k > 0) for (let i = 100 * (k - 1); i < 100 * (k - 1) + 20; i++) pages.push({ region: 0, index: i, bytes: later(i) });
      batches.push(pagesToBatch(pages));
    }
    const info = await c.putCheckpoint({ job: 'pipe', parent: 0, regions, window: 6 }, batches);
    // 600 first pages minus 5 repeats of the shared one, plus 100 rewrites;
    // minus those first versions whose position a later batch in flight took
    // over before their lookup came back (never wanted, never stored).
    expect(info.newPages).toBeGreaterThanOrEqual(600 - 5 + 100 - 100);
    expect(info.newPages).toBeLessThanOrEqual(600 - 5 + 100);
    const got = (await c.fetchImage({ job: 'pipe' })).regions.get('mem')!;
    for (let i = 0; i < N; i++) {
      const want = i % 100 === 50 ? shared : (i < 500 && i % 100 < 20 ? later(i) : first(i));
      expect(got.subarray(i * PAGE, (i + 1) * PAGE).equals(want), `page ${i}`).toBe(true);
    }
    expect((await c.verify({ allPages: true })).ok).toBe(true);
    c.close();
  });
});
