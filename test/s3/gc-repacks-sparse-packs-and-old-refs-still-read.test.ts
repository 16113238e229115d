/**
 * S3 deletes whole objects, so GC reclaims the space of partly dead packs by
 * repacking: live pages go to a new pack, the old pack is condemned and,
 * after the grace period and the delete-time re-check, deleted. Checkpoints
 * whose manifests still name the old packs read bit-exact (the reads follow
 * the pages by hash), through this store, a fresh one and the parallel restore.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { bufferSink, restoreCheckpoint } from '../../storage/s3/restore.js';
import { S3RVER_KEYS, genPage, putDirect, readDirect, startS3, tempDir, type TestS3, teardownS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

describe('repacking partly dead packs', () => {
  it('moves live pages, deletes the old packs after the grace period, and old refs still read', async () => {
    s3 = await startS3('repack-bucket');
    const cache = tempDir('cache');
    dirs.push(cache);
    const opts = { url: `s3://${s3.bucket}/r`, endpoint: s3.endpoint, ...S3RVER_KEYS, packBytes: 16 * 4096, packGraceMs: 400 };
    const store = new CheckpointStore(await S3Backend.open({ ...opts, cacheDir: cache }), { gcGraceMs: 0 });
    closers.push(() => store.close());
    const b = store.backend as S3Backend;
    const regions = [{ name: 'r', pageCount: 64, address: '', flags: 0 }];
    // Checkpoint 1: 64 pages in 4 packs. Checkpoint 2 rewrites 3 of every 4 pages; checkpoint 3 rewrites them again.
    await putDirect(store, 'j', 0, regions, Array.from({ length: 64 }, (_, i) => ({ region: 0, index: i, bytes: genPage(1, 0, i, 0) ?? genPage(1, 0, i, 99) })));
    await putDirect(store, 'j', 1, regions, Array.from({ length: 64 }, (_, i) => i).filter((i) => i % 4 !== 0).map((i) => ({ region: 0, index: i, bytes: genPage(1, 0, i, 2) })));
    const expected2 = await readDirect(store, 'j', 2);
    const packsBefore = (await b.io.list('packs/')).length;
    expect(packsBefore).toBe(4 + 3);

    // Checkpoint 1 goes: 48 of the 64 pages of the first 4 packs die; GC repacks the 16 live ones.
    await store.deleteCheckpoints('j', { checkpoints: [1] });
    await store.gc({ graceMs: 0 });
    expect(b.gcCounters.repacked).toBe(4);
    expect(b.gcCounters.deleted).toBe(0);
    // Past the pack grace period, the next GC deletes the old packs.
    await new Promise((r) => setTimeout(r, 500));
    await store.gc({ graceMs: 0 });
    expect(b.gcCounters.deleted).toBe(4);
    const packsAfter = (await b.io.list('packs/')).length;
    expect(packsAfter).toBe(3 + 1);

    // Checkpoint 2's manifest still names the deleted packs for 16 pages.
    expect((await readDirect(store, 'j', 2)).get('r')!.equals(expected2.get('r')!)).toBe(true);
    expect((await store.verify({ job: 'j' })).problems).toEqual([]);
    const fresh = new CheckpointStore(await S3Backend.open({ ...opts }));
    closers.push(() => fresh.close());
    expect((await readDirect(fresh, 'j', 2)).get('r')!.equals(expected2.get('r')!)).toBe(true);
    let sink: ReturnType<typeof bufferSink> | null = null;
    await restoreCheckpoint(fresh.backend, 'j', 2, (h) => (sink = bufferSink(h)));
    expect(sink!.regions.get('r')!.equals(expected2.get('r')!)).toBe(true);
  });
});
