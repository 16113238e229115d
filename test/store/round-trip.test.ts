/**
 * Round trip: a random image and 20 increments (changed, zeroed, reverted
 * and grown pages) are uploaded; every checkpoint of the chain is then read
 * back bit-exact, whole and by random region/page ranges.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { Image, PAGE, cleanupDirs, diffImage, killAll, randomPage, regionsOf, rng, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('store round trip', () => {
  it('every checkpoint of a 20-increment chain restores bit-exact, whole and by range', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const rand = rng(42);
    let img = new Image(regionsOf([['grid', 700], ['heap', 300], ['empty', 16]]), (r, i) => (r === 2 || rand() < 0.2 ? null : randomPage(`base/${r}/${i}`)));
    const history: Image[] = [];
    const first = await c.putCheckpoint({ job: 'heat-1', parent: 0, regions: img.regions }, img.batches(img.allPages(), 128));
    expect(first.checkpoint).toBe(1);
    expect(first.zeroPages).toBe(img.allPages().filter(([r, i]) => img.page(r, i).every((b) => b === 0)).length);
    history.push(img.clone());
    let parent = 1;
    for (let k = 1; k <= 20; k++) {
      const next = img.clone();
      if (k === 10) {
        // The heap grows by 50 pages: the new region table is sent, old pages are inherited.
        next.regions[1]!.pageCount += 50;
        next.bufs[1] = Buffer.concat([next.bufs[1]!, Buffer.alloc(50 * PAGE)]);
      }
      const dirty: [number, number][] = [];
      for (const [r, i] of next.allPages()) {
        if (r === 2 || rand() > 0.05) continue;
        const roll = rand();
        if (roll < 0.15) next.setPage(r, i, null);                                         // zeroed
        else if (roll < 0.3 && i < history[0]!.regions[r]!.pageCount) next.setPage(r, i, history[0]!.page(r, i)); // back to its first content
        else next.setPage(r, i, randomPage(`inc/${k}/${r}/${i}`));
        dirty.push([r, i]);
      }
      if (k === 10) for (let i = 300; i < 350; i += 3) { next.setPage(1, i, randomPage(`grow/${i}`)); dirty.push([1, i]); }
      const info = await c.putCheckpoint({ job: 'heat-1', parent, regions: next.regions }, next.batches(dirty, 64));
      expect(info.checkpoint).toBe(k + 1);
      expect(info.parent).toBe(parent);
      expect(info.changedPages).toBe(dirty.length);
      parent = info.checkpoint;
      img = next;
      history.push(img.clone());
    }
    const list = await c.listCheckpoints('heat-1');
    expect(list.map((x) => x.checkpoint)).toEqual(history.map((_, i) => i + 1));
    for (let n = 1; n <= history.length; n++) {
      const expected = history[n - 1]!;
      const got = await c.fetchImage({ job: 'heat-1', checkpoint: n });
      expect(got.info.checkpoint).toBe(n);
      expect(diffImage(expected, got.regions), `checkpoint ${n}`).toBeNull();
      // Three random ranges per checkpoint.
      for (let t = 0; t < 3; t++) {
        const r = Math.floor(rand() * 2);
        const size = expected.regions[r]!.pageCount;
        const firstPage = Math.floor(rand() * size);
        const pageCount = 1 + Math.floor(rand() * (size - firstPage));
        const part = await c.fetchImage({ job: 'heat-1', checkpoint: n, region: expected.regions[r]!.name, firstPage, pageCount });
        const buf = part.regions.get(expected.regions[r]!.name)!;
        expect(buf.equals(expected.bufs[r]!.subarray(firstPage * PAGE, (firstPage + pageCount) * PAGE)), `checkpoint ${n} ${expected.regions[r]!.name} ${firstPage}+${pageCount}`).toBe(true);
      }
    }
    // Latest (checkpoint 0) is the last one.
    const latest = await c.fetchImage({ job: 'heat-1' });
    expect(latest.info.checkpoint).toBe(21);
    const v = await c.verify();
    expect(v.ok).toBe(true);
    expect(v.checkpoints).toBe(21);
    c.close();
  });
});
