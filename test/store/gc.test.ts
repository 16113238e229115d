/**
 * GC: collecting while uploads run loses nothing (uploads reuse exactly the
 * pages GC is deleting); an interrupted upload leaves nothing visible and
 * its pages are reclaimed; the grace period holds deletion back and a page
 * referenced again is revived.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { Image, PAGE, cleanupDirs, diffImage, killAll, randomPage, regionsOf, rng, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('store gc', () => {
  it('loses nothing when GC runs again and again during concurrent uploads that reuse garbage pages', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const N = 800;
    // Garbage to be: two checkpoints of job "old" whose pages only they reference.
    const pool = Array.from({ length: 2 * N }, (_, i) => randomPage(`pool/${i}`));
    const oldA = new Image(regionsOf([['m', N]]), (_r, i) => pool[i]!);
    const oldB = new Image(regionsOf([['m', N]]), (_r, i) => pool[N + i]!);
    await c.putCheckpoint({ job: 'old', parent: 0, regions: oldA.regions }, oldA.batches(oldA.allPages()));
    await c.putCheckpoint({ job: 'old', parent: 0, regions: oldB.regions }, oldB.batches(oldB.allPages()));
    const keep = new Image(regionsOf([['m', 50]]), (_r, i) => randomPage(`keep/${i}`));
    await c.putCheckpoint({ job: 'old', parent: 0, regions: keep.regions }, keep.batches(keep.allPages()));
    expect((await c.deleteCheckpoints('old', { keepLast: 1 })).deleted).toEqual([1, 2]);

    let uploading = true;
    let gcRuns = 0, gcDeleted = 0;
    const gcLoop = (async () => {
      while (uploading) {
        const r = await c.gc({ graceSeconds: 0 });
        gcRuns++;
        gcDeleted += r.deletedPages;
      }
    })();
    // Three writers, five checkpoints each, every page taken from the garbage pool or new.
    const committed: { job: string; n: number; img: Image }[] = [];
    const writer = async (w: number): Promise<void> => {
      const rand = rng(100 + w);
      let parent = 0;
      let img = new Image(regionsOf([['m', N]]), () => null);
      for (let k = 0; k < 5; k++) {
        const next = img.clone();
        const dirty: [number, number][] = [];
        for (let i = 0; i < N; i++) {
          if (parent !== 0 && rand() > 0.3) continue;
          const roll = rand();
          next.setPage(0, i, roll < 0.7 ? pool[Math.floor(rand() * pool.length)]! : roll < 0.9 ? randomPage(`w${w}/${k}/${i}`) : null);
          dirty.push([0, i]);
        }
        const info = await c.putCheckpoint({ job: `w${w}`, parent, regions: next.regions }, next.batches(dirty, 40));
        committed.push({ job: `w${w}`, n: info.checkpoint, img: next });
        parent = info.checkpoint;
        img = next;
      }
    };
    await Promise.all([writer(1), writer(2), writer(3)]);
    uploading = false;
    await gcLoop;
    expect(gcRuns).toBeGreaterThan(1);
    expect(gcDeleted).toBeGreaterThan(0);
    // One more GC after the writers: still nothing lost.
    await c.gc({ graceSeconds: 0 });
    for (const x of committed) {
      expect(diffImage(x.img, (await c.fetchImage({ job: x.job, checkpoint: x.n })).regions), `${x.job} #${x.n}`).toBeNull();
    }
    expect(diffImage(keep, (await c.fetchImage({ job: 'old', checkpoint: 3 })).regions)).toBeNull();
    const v = await c.verify({ allPages: true });
    expect(v.problems).toEqual([]);
    c.close();
  });

  it('hides an interrupted upload, reclaims its pages, and honours the grace period', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const base = new Image(regionsOf([['m', 200]]), (_r, i) => randomPage(`b/${i}`));
    await c.putCheckpoint({ job: 'j', parent: 0, regions: base.regions }, base.batches(base.allPages()));
    expect((await c.stat()).storedPages).toBe(200);

    // An upload whose source fails after some batches were stored.
    const junk = new Image(regionsOf([['m', 200]]), (_r, i) => randomPage(`junk/${i}`));
    async function* failing() {
      const bs = junk.batches(junk.allPages(), 50);
      yield bs[0]!;
      yield bs[1]!;
      await new Promise((r) => setTimeout(r, 100));
      throw new Error('source broke');
    }
    await expect(c.putCheckpoint({ job: 'j', parent: 1, regions: junk.regions }, failing())).rejects.toThrow(/source broke/);
    expect((await c.listCheckpoints('j')).map((x) => x.checkpoint)).toEqual([1]);
    const leaked = (await c.stat()).storedPages - 200;
    expect(leaked).toBeGreaterThan(0);

    // Phase 1 with a long grace: marked, not deleted.
    const g1 = await c.gc({ graceSeconds: 3600 });
    expect(g1.markedPages).toBe(leaked);
    expect(g1.deletedPages).toBe(0);
    expect((await c.stat()).pendingGcPages).toBe(leaked);
    // A checkpoint now references 10 of the marked pages: they are revived, not deleted.
    const reuse = base.clone();
    for (let i = 0; i < 10; i++) reuse.setPage(0, i, junk.page(0, i));
    await c.putCheckpoint({ job: 'j', parent: 1, regions: reuse.regions }, reuse.batches([...Array(10).keys()].map((i) => [0, i] as [number, number])));
    const g2 = await c.gc({ graceSeconds: 3600 });
    expect(g2.revivedPages).toBe(10);
    expect(g2.deletedPages).toBe(0);
    // Grace over (0): the rest goes.
    const g3 = await c.gc({ graceSeconds: 0 });
    expect(g3.deletedPages).toBe(leaked - 10);
    expect(g3.reclaimedBytes).toBe((leaked - 10) * PAGE);
    expect((await c.stat()).storedPages).toBe(210);
    expect((await c.stat()).pendingGcPages).toBe(0);
    expect(diffImage(reuse, (await c.fetchImage({ job: 'j', checkpoint: 2 })).regions)).toBeNull();
    expect(diffImage(base, (await c.fetchImage({ job: 'j', checkpoint: 1 })).regions)).toBeNull();
    c.close();
  });

  it('applies keep-last and keep-every retention and keeps the latest', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const img = new Image(regionsOf([['m', 4]]), (_r, i) => randomPage(`r/${i}`));
    let parent = 0;
    for (let k = 1; k <= 12; k++) {
      img.setPage(0, k % 4, randomPage(`r/${k}`));
      parent = (await c.putCheckpoint({ job: 'ret', parent, regions: img.regions }, img.batches([[0, k % 4]]))).checkpoint;
    }
    const dry = await c.deleteCheckpoints('ret', { keepLast: 2, keepEvery: 5, dryRun: true });
    expect(dry.kept).toEqual([5, 10, 11, 12]);
    expect((await c.listCheckpoints('ret')).length).toBe(12);
    const r = await c.deleteCheckpoints('ret', { keepLast: 2, keepEvery: 5 });
    expect(r.deleted).toEqual([1, 2, 3, 4, 6, 7, 8, 9]);
    expect((await c.deleteCheckpoints('ret', { checkpoints: [5] })).deleted).toEqual([5]);
    expect((await c.listCheckpoints('ret')).map((x) => x.checkpoint)).toEqual([10, 11, 12]);
    // Numbers are never reused after deletion.
    const next = await c.putCheckpoint({ job: 'ret', parent: 12, regions: img.regions }, []);
    expect(next.checkpoint).toBe(13);
    expect(diffImage(img, (await c.fetchImage({ job: 'ret', checkpoint: 13 })).regions)).toBeNull();
    c.close();
  });
});
