/**
 * Dedup: the same pages under two jobs are stored once; an increment that
 * changes 1% of the pages stores (and sends) about 1% of the bytes; zero
 * pages cost nothing.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { Image, PAGE, cleanupDirs, diffImage, killAll, randomPage, regionsOf, rng, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('store dedup', () => {
  it('stores the same pages under two jobs once, and a 1% increment stores about 1% of the bytes', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const N = 4000;
    const img = new Image(regionsOf([['mem', N]]), (_r, i) => randomPage(`d/${i}`));
    let sentA = 0;
    const a = await c.putCheckpoint({ job: 'job-a', parent: 0, regions: img.regions, onProgress: (p) => { sentA = p.sentBytes; } }, img.batches(img.allPages(), 512));
    expect(a.newPages).toBe(N);
    expect(sentA).toBe(N * PAGE);
    const s1 = await c.stat();
    expect(s1.storedPages).toBe(N);
    expect(s1.storedBytes).toBe(N * PAGE);

    // Job B: the same image. Hashes travel, no page bytes do, nothing new is stored.
    let sentB = -1;
    const b = await c.putCheckpoint({ job: 'job-b', parent: 0, regions: img.regions, onProgress: (p) => { sentB = p.sentBytes; } }, img.batches(img.allPages(), 512));
    expect(b.newPages).toBe(0);
    expect(sentB).toBe(0);
    const s2 = await c.stat();
    expect(s2.storedPages).toBe(N);
    expect(s2.logicalBytes).toBe(2 * N * PAGE);
    expect(s2.dedupRatio).toBeCloseTo(2, 5);
    expect(diffImage(img, (await c.fetchImage({ job: 'job-b' })).regions)).toBeNull();

    // 1% of the pages change.
    const rand = rng(7);
    const next = img.clone();
    const dirty = new Set<number>();
    while (dirty.size < N / 100) dirty.add(Math.floor(rand() * N));
    for (const i of dirty) next.setPage(0, i, randomPage(`d2/${i}`));
    let sentInc = -1;
    const inc = await c.putCheckpoint({ job: 'job-a', parent: a.checkpoint, regions: next.regions, onProgress: (p) => { sentInc = p.sentBytes; } },
      next.batches([...dirty].map((i) => [0, i] as [number, number])));
    const s3 = await c.stat();
    const grown = s3.storedBytes - s2.storedBytes;
    expect(inc.newPages).toBe(N / 100);
    expect(grown).toBe((N / 100) * PAGE);
    expect(grown / (N * PAGE)).toBeCloseTo(0.01, 3);
    expect(sentInc).toBe((N / 100) * PAGE);
    // Manifests are the only other cost. A first checkpoint's page map is whole, 40 bytes a page (1% of a page); an
    // increment's holds only the entries that changed, 44 bytes each (storage/mapdelta.ts); each has a header of JSON.
    expect(s2.metadataBytes).toBeGreaterThan(2 * N * 40);
    expect(s2.metadataBytes).toBeLessThan(2 * N * 40 + 2048);
    const incMeta = s3.metadataBytes - s2.metadataBytes;
    expect(incMeta).toBeGreaterThan((N / 100) * 44);
    expect(incMeta).toBeLessThan((N / 100) * 44 + 1024);
    expect(diffImage(next, (await c.fetchImage({ job: 'job-a' })).regions)).toBeNull();
    expect(diffImage(img, (await c.fetchImage({ job: 'job-a', checkpoint: 1 })).regions)).toBeNull();
    const perJob = new Map(s3.jobs.map((j) => [j.job, j]));
    expect(perJob.get('job-a')!.storedBytes).toBe((N + N / 100) * PAGE);
    expect(perJob.get('job-b')!.storedBytes).toBe(0);
    c.close();
  });

  it('never stores zero pages, and a page repeated within one checkpoint is stored once', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const same = randomPage('same');
    const img = new Image(regionsOf([['a', 1000], ['b', 1000]]), (r, i) => (i % 2 === 0 ? null : r === 1 ? same : randomPage(`z/${i}`)));
    const info = await c.putCheckpoint({ job: 'zeros', parent: 0, regions: img.regions }, img.batches(img.allPages(), 300));
    expect(info.zeroPages).toBe(1000);
    expect(info.newPages).toBe(500 + 1);
    expect((await c.stat()).storedPages).toBe(501);
    expect(diffImage(img, (await c.fetchImage({ job: 'zeros' })).regions)).toBeNull();
    c.close();
  });
});
