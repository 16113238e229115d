/**
 * Two store servers share one bucket prefix with no lock server. Each takes
 * checkpoints of its own job (their first images share pages, so they dedup
 * against each other's packs through the bucket), prunes old checkpoints,
 * and both run GC again and again while the uploads go on. Afterwards GC has
 * really deleted packs, nothing committed and kept was lost, and every
 * remaining checkpoint of both jobs reads bit-exact through either server.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { startS3StoreServer, type RunningS3StoreServer } from '../../src/s3/server.js';
import { S3Io } from '../../storage/s3/io.js';
import { S3RVER_KEYS, expectBothJobsKeptThroughEither, startS3, tempDir, twoJobsWhileBothCollect, type TestS3, teardownS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

const GRACE_MS = 3000;

async function server(url: string, tag: string): Promise<RunningS3StoreServer> {
  const cacheDir = tempDir(tag);
  dirs.push(cacheDir);
  const s = await startS3StoreServer({
    s3: { url, endpoint: s3!.endpoint, ...S3RVER_KEYS, cacheDir, packBytes: 64 * 1024, refreshMs: 200, missRefreshMs: 100, writerId: tag },
    port: 0, gcGraceMs: GRACE_MS,
  });
  closers.push(() => s.close());
  return s;
}

describe('several store servers on one bucket', () => {
  it('each checkpoints its own job, both run GC concurrently: nothing lost, all readable through either', async () => {
    s3 = await startS3('shared-bucket');
    const url = `s3://${s3.bucket}/cluster`;
    const a = await server(url, 'storeA');
    const b = await server(url, 'storeB');
    const ca = await StoreClient.connect(a.address);
    const cb = await StoreClient.connect(b.address);
    closers.push(async () => { ca.close(); cb.close(); });
    const { alpha, beta, gcRuns } = await twoJobsWhileBothCollect(ca, cb, GRACE_MS);
    expect(Math.min(...gcRuns)).toBeGreaterThan(2);

    // GC really condemned and deleted packs (not a vacuous pass); the delete-time re-check revived
    // packs whose pages the other server's commits had come to need.
    expect(a.backend.gcCounters.condemned + b.backend.gcCounters.condemned).toBeGreaterThan(0);
    const deleted = a.backend.gcCounters.deleted + b.backend.gcCounters.deleted;
    expect(deleted).toBeGreaterThan(0);
    const io = new S3Io({ url, endpoint: s3.endpoint, ...S3RVER_KEYS });
    closers.push(async () => io.close());

    await expectBothJobsKeptThroughEither(ca, cb, alpha, beta);
    // The bucket holds fewer packs than were ever written.
    const packs = (await io.list('packs/')).length;
    const written = a.backend.counters.put + b.backend.counters.put;
    expect(packs).toBeLessThan(written);
  });
});
