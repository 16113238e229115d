/**
 * A pack larger than the multipart threshold goes up by multipart upload and
 * reads back by range; the local cache directory can be deleted: a store
 * reopened on the bucket rebuilds its index from the index objects, finds
 * every page (a re-upload of the same image stores nothing new and writes no
 * pack) and restores bit-exact.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { rmSync } from 'node:fs';
import { CheckpointStore } from '../../storage/engine.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { sha256 } from '../../storage/pages.js';
import { S3RVER_KEYS, genPage, putDirect, readDirect, startS3, tempDir, type TestS3, teardownS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

describe('multipart packs and a disposable cache', () => {
  it('uploads a 12 MiB pack in parts, then rebuilds the index from the bucket after the cache is deleted', async () => {
    s3 = await startS3('mp-bucket');
    const cache = tempDir('cache');
    dirs.push(cache);
    const opts = { url: `s3://${s3.bucket}/mp`, endpoint: s3.endpoint, ...S3RVER_KEYS, packBytes: 12 * 2 ** 20, multipartBytes: 8 * 2 ** 20, partBytes: 5 * 2 ** 20 };
    const pages = 3000;
    const regions = [{ name: 'big', pageCount: pages, address: '', flags: 0 }];
    const changes = Array.from({ length: pages }, (_, i) => ({ region: 0, index: i, bytes: genPage(5, 0, i, 1) }));
    const expected = Buffer.concat(changes.map((c) => c.bytes!));

    const store = new CheckpointStore(await S3Backend.open({ ...opts, cacheDir: cache }));
    const b = store.backend as S3Backend;
    const h = await putDirect(store, 'big-job', 0, regions, changes);
    expect(h.newPages).toBe(pages);
    // One pack of 3000 pages (~12 MiB incl. trailer): create + 3 parts + complete, then the index and the manifest.
    expect(b.counters.put).toBe(7);
    expect((await readDirect(store, 'big-job', 1)).get('big')!.equals(expected)).toBe(true);
    await store.close();

    rmSync(cache, { recursive: true, force: true });
    const again = new CheckpointStore(await S3Backend.open({ ...opts, cacheDir: cache }));
    closers.push(() => again.close());
    const b2 = again.backend as S3Backend;
    const refs = await b2.lookup(changes.map((c) => sha256(c.bytes!)));
    expect(refs.every((r) => r !== null)).toBe(true);
    const puts = b2.counters.put;
    const h2 = await putDirect(again, 'big-job', 1, regions, changes);
    expect(h2.checkpoint).toBe(2);
    expect(h2.newPages).toBe(0);
    // Only the manifest: no pack, no index object.
    expect(b2.counters.put - puts).toBe(1);
    for (const n of [1, 2]) expect((await readDirect(again, 'big-job', n)).get('big')!.equals(expected)).toBe(true);
    expect((await again.verify({ job: 'big-job' })).ok).toBe(true);
  });
});
