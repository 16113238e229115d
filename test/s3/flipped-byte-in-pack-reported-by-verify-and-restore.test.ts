/**
 * One byte flipped inside a pack object in the bucket is reported, naming
 * job, checkpoint, region and page, by verify, by GetImage through a store
 * server on S3, and by the parallel restore; the pages around it still read.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient, pagesToBatch } from '../../src/store/client.js';
import { startS3StoreServer } from '../../src/s3/server.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { decodeIndex, packKey } from '../../storage/s3/format.js';
import { S3Io } from '../../storage/s3/io.js';
import { restoreCheckpoint, bufferSink } from '../../storage/s3/restore.js';
import { sha256 } from '../../storage/pages.js';
import { ExaError } from '../../src/errors.js';
import { S3RVER_KEYS, makeChain, startS3, tempDir, type TestS3, teardownS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

const REGIONS = [{ name: 'state', pages: 128 }, { name: 'matrix', pages: 256 }];

describe('corruption inside a pack', () => {
  it('verify, GetImage and the parallel restore name job, checkpoint, region and page', async () => {
    s3 = await startS3('flip-bucket');
    const url = `s3://${s3.bucket}/c`;
    const opts = { url, endpoint: s3.endpoint, ...S3RVER_KEYS, packBytes: 128 * 1024 };
    const cache1 = tempDir('c1');
    dirs.push(cache1);
    const srv = await startS3StoreServer({ s3: { ...opts, cacheDir: cache1 }, port: 0 });
    closers.push(() => srv.close());
    const client = await StoreClient.connect(srv.address);
    closers.push(async () => client.close());
    const chain = makeChain(99, REGIONS, 3, 4);
    const regions = REGIONS.map((r) => ({ name: r.name, pageCount: r.pages, address: '', flags: 0 }));
    for (let k = 0; k < 3; k++) await client.putCheckpoint({ job: 'sim-7', parent: k, regions }, [pagesToBatch(chain.changes[k]!)]);
    client.close();
    await srv.close();

    // Find a page of region "matrix" that checkpoint 3 uses, and the pack and slot that hold it.
    const img3 = chain.images[2]!.get('matrix')!;
    const page = 201;
    const hash = sha256(img3.subarray(page * 4096, (page + 1) * 4096));
    const io = new S3Io(opts);
    closers.push(async () => io.close());
    let where: { base: string; slot: number } | null = null;
    for (const o of await io.list('index/')) {
      for (const p of decodeIndex((await io.get(o.key))!, o.key)) {
        for (let s = 0; s < p.hashes.length / 32; s++) if (p.hashes.subarray(s * 32, s * 32 + 32).equals(hash)) where = { base: p.base, slot: s };
      }
    }
    expect(where).not.toBeNull();
    // Flip one byte in that page inside the pack object (s3rver lets us overwrite it).
    const key = packKey(where!.base);
    const body = (await io.get(key))!;
    body[where!.slot * 4096 + 1234]! ^= 0x40;
    await io.client.send(new (await import('@aws-sdk/client-s3')).PutObjectCommand({ Bucket: io.bucket, Key: io.key(key), Body: body }));

    // A fresh server (fresh cache) on the bucket.
    const cache2 = tempDir('c2');
    dirs.push(cache2);
    const srv2 = await startS3StoreServer({ s3: { ...opts, cacheDir: cache2 }, port: 0 });
    closers.push(() => srv2.close());
    const c2 = await StoreClient.connect(srv2.address);
    closers.push(async () => c2.close());

    const v = await c2.verify({ job: 'sim-7' });
    expect(v.ok).toBe(false);
    const p3 = v.problems.find((p) => p.checkpoint === 3);
    expect(p3).toMatchObject({ job: 'sim-7', checkpoint: 3, region: 'matrix', page, kind: 'corrupt' });
    expect(p3!.message).toContain('job sim-7');
    expect(p3!.message).toContain('page 201');

    let err: unknown = null;
    try { await c2.fetchImage({ job: 'sim-7', checkpoint: 3 }); } catch (e) { err = e; }
    expect(err).toBeInstanceOf(ExaError);
    expect((err as ExaError).code).toBe('CORRUPT');
    expect((err as ExaError).message).toMatch(/checkpoint 3 of job sim-7: page 201 of region "matrix" does not match its hash/);

    // Pages outside the damaged one still read through the range path.
    const ok = await c2.fetchImage({ job: 'sim-7', checkpoint: 3, region: 'matrix', firstPage: 0, pageCount: 200 });
    expect(ok.regions.get('matrix')!.equals(img3.subarray(0, 200 * 4096))).toBe(true);

    const direct = await S3Backend.open({ ...opts });
    closers.push(() => direct.close());
    await expect(restoreCheckpoint(direct, 'sim-7', 3, bufferSink)).rejects.toMatchObject({
      code: 'CORRUPT', detail: { job: 'sim-7', checkpoint: 3, region: 'matrix', page: 201 },
    });
  });
});
