/**
 * Two store servers share one bucket prefix with no lock server. Each takes
 * checkpoints of its own job (their first images share pages, so they dedup
 * against each other's packs through the bucket), prunes old checkpoints,
 * and both run GC again and again while the uploads go on. Afterwards GC has
 * really deleted packs, nothing committed and kept was lost, and every
 * remaining checkpoint of both jobs reads bit-exact through either server.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient, pagesToBatch } from '../../src/store/client.js';
import { startS3StoreServer, type RunningS3StoreServer } from '../../src/s3/server.js';
import { S3Io } from '../../storage/s3/io.js';
import { S3RVER_KEYS, makeChain, startS3, tempDir, type TestS3, teardownS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

const REGIONS = [{ name: 'grid', pages: 240 }];
const regions = REGIONS.map((r) => ({ name: r.name, pageCount: r.pages, address: '', flags: 0 }));
const CKPTS = 10;
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
    // Same seed: checkpoint 1 of both jobs is the same image (cross-server dedup), later ones diverge.
    const alpha = makeChain(11, REGIONS, CKPTS, 3, 101);
    const beta = makeChain(11, REGIONS, CKPTS, 4, 202);

    let uploading = true;
    const writer = async (c: StoreClient, job: string, chain: typeof alpha): Promise<void> => {
      for (let k = 0; k < CKPTS; k++) {
        await c.putCheckpoint({ job, parent: k, regions }, [pagesToBatch(chain.changes[k]!)]);
        // Prune as we go: keep the 3 newest and every 4th, so GC has real garbage.
        if (k >= 3) await c.deleteCheckpoints(job, { keepLast: 3, keepEvery: 4 });
        await new Promise((r) => setTimeout(r, 150));
      }
    };
    const collector = async (c: StoreClient): Promise<number> => {
      let runs = 0;
      while (uploading) {
        // Engine grace 0: pages are dropped at once; the pack-level grace (3 s) and the re-check protect other servers' uploads.
        await c.gc({ graceSeconds: 0 });
        runs++;
        await new Promise((r) => setTimeout(r, 100));
      }
      return runs;
    };
    const gcs = [collector(ca), collector(cb)];
    await Promise.all([writer(ca, 'alpha', alpha), writer(cb, 'beta', beta)]);
    // Let condemned packs pass the grace period, then collect again on both.
    await new Promise((r) => setTimeout(r, GRACE_MS + 300));
    uploading = false;
    expect(Math.min(...(await Promise.all(gcs)))).toBeGreaterThan(2);
    await ca.gc({ graceSeconds: 0 });
    await cb.gc({ graceSeconds: 0 });
    await new Promise((r) => setTimeout(r, GRACE_MS + 300));
    await ca.gc({ graceSeconds: 0 });
    await cb.gc({ graceSeconds: 0 });

    // GC really condemned and deleted packs (not a vacuous pass); the delete-time re-check revived
    // packs whose pages the other server's commits had come to need.
    expect(a.backend.gcCounters.condemned + b.backend.gcCounters.condemned).toBeGreaterThan(0);
    const deleted = a.backend.gcCounters.deleted + b.backend.gcCounters.deleted;
    expect(deleted).toBeGreaterThan(0);
    const io = new S3Io({ url, endpoint: s3.endpoint, ...S3RVER_KEYS });
    closers.push(async () => io.close());

    for (const [job, chain] of [['alpha', alpha], ['beta', beta]] as const) {
      for (const c of [ca, cb]) {
        const nums = (await c.listCheckpoints(job)).map((x) => x.checkpoint);
        expect(nums).toEqual([4, 8, 9, 10]);
        for (const k of nums) {
          const img = await c.fetchImage({ job, checkpoint: k });
          expect(img.regions.get('grid')!.equals(chain.images[k - 1]!.get('grid')!), `${job} #${k} through ${c === ca ? 'A' : 'B'}`).toBe(true);
        }
        const v = await c.verify({ job });
        expect(v.problems).toEqual([]);
      }
    }
    // The bucket holds fewer packs than were ever written.
    const packs = (await io.list('packs/')).length;
    const written = a.backend.counters.put + b.backend.counters.put;
    expect(packs).toBeLessThan(written);
  });
});
