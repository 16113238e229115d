/**
 * The S3 server stops in the middle of an archive. Two outcomes, both
 * checked: with enough retry budget the archive rides out a short outage and
 * completes; with a small budget it fails clearly (UNAVAILABLE naming bucket
 * and endpoint) and a second run after the restart completes, skipping what
 * was already committed. In every state observed, every page ref of every
 * manifest in the bucket points at a pack that exists (the manifest PUT is
 * the commit point, after packs and index).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { S3Backend, type S3BackendOptions } from '../../storage/s3/backend.js';
import { archiveJob } from '../../storage/s3/archive.js';
import { decodeManifest, parseCkptKey, parsePackKey } from '../../storage/s3/format.js';
import { S3Io } from '../../storage/s3/io.js';
import { ENTRY_BYTES, HASH_BYTES, isZeroHash } from '../../storage/pages.js';
import { ExaError } from '../../src/errors.js';
import { S3RVER_KEYS, makeChain, putDirect, readDirect, startS3, tempDir, type TestS3, teardownS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

const REGIONS = [{ name: 'mem', pages: 400 }];
const regions = REGIONS.map((r) => ({ name: r.name, pageCount: r.pages, address: '', flags: 0 }));

/** A LevelDB store holding a 12-checkpoint chain of job `job`. */
async function localChain(job: string): Promise<{ dir: string; chain: ReturnType<typeof makeChain> }> {
  const dir = tempDir('src');
  dirs.push(dir);
  const chain = makeChain(7, REGIONS, 12, 3);
  const store = new CheckpointStore(await LevelBackend.open(dir));
  for (let k = 0; k < 12; k++) await putDirect(store, job, k, regions, chain.changes[k]!);
  await store.close();
  return { dir, chain };
}

/** Raw check with no backend code: every ref in every manifest names a pack object that exists. */
async function assertNoDanglingManifest(io: S3Io): Promise<number> {
  const packIds = new Set((await io.list('packs/')).map((o) => parsePackKey(o.key)?.id).filter((x) => x !== undefined));
  let manifests = 0;
  for (const o of await io.list('manifests/')) {
    const c = parseCkptKey(o.key)!;
    const { maps } = decodeManifest((await io.get(o.key))!, c.job, c.checkpoint);
    for (const m of maps) {
      for (let off = 0; off < m.length; off += ENTRY_BYTES) {
        if (isZeroHash(m, off)) continue;
        const id = m.readUIntBE(off + HASH_BYTES, 6);
        expect(packIds.has(id), `checkpoint ${c.checkpoint} of ${c.job} names pack ${id.toString(16)}, which is not in the bucket`).toBe(true);
      }
    }
    manifests++;
  }
  return manifests;
}

function s3opts(extra: Partial<S3BackendOptions>): S3BackendOptions {
  const cacheDir = tempDir('cache');
  dirs.push(cacheDir);
  return { url: `s3://${s3!.bucket}/a`, endpoint: s3!.endpoint, ...S3RVER_KEYS, cacheDir, packBytes: 64 * 1024, ...extra };
}

describe('S3 outage during an archive', () => {
  it('a short outage: retries with backoff ride it out and the archive completes', async () => {
    s3 = await startS3('outage-bucket');
    const { dir, chain } = await localChain('job-a');
    const source = await LevelBackend.open(dir);
    closers.push(() => source.close());
    const dest = await S3Backend.open(s3opts({ maxAttempts: 30, retryBaseMs: 50, retryMaxMs: 400 }));
    closers.push(() => dest.close());
    // Stop the server once a few packs are up, restart it 1.5 s later.
    let outage: Promise<void> | null = null;
    const timer = setInterval(() => {
      if (!outage && dest.counters.put >= 6) {
        outage = (async () => {
          await s3!.stop();
          await new Promise((r) => setTimeout(r, 1500));
          await s3!.start();
        })();
      }
    }, 5);
    try {
      const res = await archiveJob({ job: 'job-a', source, dest });
      expect(res.copied).toHaveLength(12);
      expect(res.verified).toBe(true);
    } finally {
      clearInterval(timer);
      await outage;
    }
    expect(outage).not.toBeNull();
    expect(dest.counters.retries).toBeGreaterThan(0);
    const io = new S3Io({ url: `s3://${s3.bucket}/a`, endpoint: s3.endpoint, ...S3RVER_KEYS });
    try {
      expect(await assertNoDanglingManifest(io)).toBe(12);
    } finally {
      io.close();
    }
    const check = new CheckpointStore(await S3Backend.open(s3opts({})));
    closers.push(() => check.close());
    for (const k of [1, 6, 12]) expect((await readDirect(check, 'job-a', k)).get('mem')!.equals(chain.images[k - 1]!.get('mem')!)).toBe(true);
  });

  it('a long outage: the archive fails clearly, nothing dangles, and a rerun after the restart completes', async () => {
    s3 = await startS3('outage2-bucket');
    const { dir, chain } = await localChain('job-b');
    const source = await LevelBackend.open(dir);
    closers.push(() => source.close());
    const dest = await S3Backend.open(s3opts({ maxAttempts: 3, retryBaseMs: 20, retryMaxMs: 50 }));
    closers.push(() => dest.close());
    let stopped = false;
    const timer = setInterval(() => {
      if (!stopped && dest.counters.put >= 10) { stopped = true; void s3!.stop(); }
    }, 2);
    let err: unknown = null;
    try {
      await archiveJob({ job: 'job-b', source, dest });
    } catch (e) {
      err = e;
    } finally {
      clearInterval(timer);
    }
    expect(stopped).toBe(true);
    expect(err).toBeInstanceOf(ExaError);
    expect((err as ExaError).code).toBe('UNAVAILABLE');
    expect((err as ExaError).message).toContain('outage2-bucket');
    expect((err as ExaError).message).toContain(s3.endpoint);
    await dest.close();

    await s3.start();
    const io = new S3Io({ url: `s3://${s3.bucket}/a`, endpoint: s3.endpoint, ...S3RVER_KEYS });
    closers.push(async () => io.close());
    const before = await assertNoDanglingManifest(io);
    expect(before).toBeLessThan(12);
    // The rerun (a new process would do the same: a fresh cache) skips what is there and completes.
    const dest2 = await S3Backend.open(s3opts({}));
    closers.push(() => dest2.close());
    const res = await archiveJob({ job: 'job-b', source, dest: dest2, deleteLocal: true });
    expect(res.skipped).toHaveLength(before);
    expect(res.copied).toHaveLength(12 - before);
    expect(await assertNoDanglingManifest(io)).toBe(12);
    const check = new CheckpointStore(await S3Backend.open(s3opts({})));
    closers.push(() => check.close());
    for (let k = 1; k <= 12; k++) expect((await readDirect(check, 'job-b', k)).get('mem')!.equals(chain.images[k - 1]!.get('mem')!)).toBe(true);
  });
});
