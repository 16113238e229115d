/**
 * A 20-checkpoint chain taken through a LevelDB store server is archived to
 * S3 (with --delete-local semantics), the local data directory and every S3
 * cache are deleted, and every checkpoint is restored bit-exact from the
 * bucket alone: through a fresh store server serving GetImage from S3, and
 * through the parallel out-of-order restore the agent uses.
 */
import { rmSync, existsSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { startStoreServer, type RunningStoreServer } from '../../src/store/server.js';
import { StoreClient, pagesToBatch } from '../../src/store/client.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { archiveJob } from '../../storage/s3/archive.js';
import { bufferSink, restoreCheckpoint } from '../../storage/s3/restore.js';
import { startS3StoreServer } from '../../src/s3/server.js';
import { S3RVER_KEYS, makeChain, startS3, tempDir, type TestS3, teardownS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

const REGIONS = [{ name: 'grid', pages: 300 }, { name: 'halo', pages: 60 }];

describe('archive to S3 and restore on a store that never saw the job', () => {
  it('archives 20 checkpoints, deletes local data, restores every checkpoint bit-exact from S3', async () => {
    s3 = await startS3('archive-bucket');
    const data = tempDir('leveldb');
    dirs.push(data);
    const chain = makeChain(42, REGIONS, 20, 8);
    const regions = REGIONS.map((r) => ({ name: r.name, pageCount: r.pages, address: '', flags: 0 }));

    // 1. The job's chain, through a real LevelDB store server over gRPC.
    const local: RunningStoreServer = await startStoreServer({ dataDir: data, port: 0 });
    closers.push(() => local.close());
    const client = await StoreClient.connect(local.address);
    closers.push(async () => client.close());
    for (let k = 0; k < 20; k++) {
      const info = await client.putCheckpoint({ job: 'heat-1', parent: k, regions }, [pagesToBatch(chain.changes[k]!)]);
      expect(info.checkpoint).toBe(k + 1);
    }
    client.close();
    await local.close();

    // 2. Archive: copy pages + manifests, verify from the bucket, delete locally.
    const url = `s3://${s3.bucket}/arch`;
    const source = await LevelBackend.open(data);
    const cacheA = tempDir('cacheA');
    dirs.push(cacheA);
    const dest = await S3Backend.open({ url, endpoint: s3.endpoint, ...S3RVER_KEYS, cacheDir: cacheA, packBytes: 256 * 1024 });
    const res = await archiveJob({ job: 'heat-1', source, dest, deleteLocal: true });
    expect(res.copied).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(res.verified).toBe(true);
    expect(res.deletedLocal).toHaveLength(20);
    expect(await source.listHeaders('heat-1')).toEqual([]);
    // Packs are grouped: far fewer PUTs than pages.
    expect(dest.counters.put).toBeLessThan(res.pagesUploaded / 10);
    await dest.close();
    await source.close();

    // 3. Nothing local survives.
    rmSync(data, { recursive: true, force: true });
    rmSync(cacheA, { recursive: true, force: true });
    expect(existsSync(data)).toBe(false);

    // 4. A fresh store server on the bucket, with an empty cache, serves every checkpoint.
    const cacheB = tempDir('cacheB');
    dirs.push(cacheB);
    const fresh = await startS3StoreServer({ s3: { url, endpoint: s3.endpoint, ...S3RVER_KEYS, cacheDir: cacheB }, port: 0 });
    closers.push(() => fresh.close());
    const c2 = await StoreClient.connect(fresh.address);
    closers.push(async () => c2.close());
    const cps = await c2.listCheckpoints('heat-1');
    expect(cps.map((c) => c.checkpoint)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    for (let k = 1; k <= 20; k++) {
      const img = await c2.fetchImage({ job: 'heat-1', checkpoint: k });
      for (const r of REGIONS) expect(img.regions.get(r.name)!.equals(chain.images[k - 1]!.get(r.name)!), `checkpoint ${k} region ${r.name}`).toBe(true);
    }
    // By range too.
    const part = await c2.fetchImage({ job: 'heat-1', checkpoint: 13, region: 'grid', firstPage: 100, pageCount: 50 });
    expect(part.regions.get('grid')!.equals(chain.images[12]!.get('grid')!.subarray(100 * 4096, 150 * 4096))).toBe(true);

    // 5. The parallel, out-of-order restore (what exarestore --from s3:// uses), from another fresh backend.
    const direct = await S3Backend.open({ url, endpoint: s3.endpoint, ...S3RVER_KEYS, readConcurrency: 4 });
    closers.push(() => direct.close());
    for (let k = 1; k <= 20; k++) {
      let sink: ReturnType<typeof bufferSink> | null = null;
      const r = await restoreCheckpoint(direct, 'heat-1', k, (h) => (sink = bufferSink(h)), { chunkPages: 64, concurrency: 4 });
      expect(r.header.checkpoint).toBe(k);
      for (const reg of REGIONS) expect(sink!.regions.get(reg.name)!.equals(chain.images[k - 1]!.get(reg.name)!), `parallel restore ${k} ${reg.name}`).toBe(true);
    }
  });
});
