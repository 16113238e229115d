/**
 * Objects read from the bucket are untrusted input: index objects and
 * manifests are checked (magic, lengths, SHA-256 trailer) and a damaged one
 * is a CORRUPT error naming it, never a crash or silently wrong data. In a
 * live bucket, a damaged manifest is left out of listings (getHeader names
 * it) and a damaged index object is ignored with a warning.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { decodeIndex, decodeManifest, encodeIndex, encodeManifest, manifestKey, parseCkptKey, parsePackKey } from '../../storage/s3/format.js';
import type { ManifestHeader } from '../../storage/backend.js';
import { S3RVER_KEYS, genPage, putDirect, removeDir, startS3, type TestS3 } from './helpers.js';

let s3: TestS3 | null = null;
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c().catch(() => undefined);
  await s3?.stop();
  removeDir(s3?.dir);
  s3 = null;
});

const header: ManifestHeader = {
  job: 'j', checkpoint: 3, parent: 2, createdAt: 1, regions: [{ name: 'r', pageCount: 2, address: '', flags: 0 }],
  labels: {}, changedPages: 2, sentPages: 2, newPages: 2, zeroPages: 0,
};

describe('damaged S3 objects', () => {
  it('decoders reject truncation, bad magic, flipped bytes and mismatched names with CORRUPT', () => {
    const idx = encodeIndex([{ base: '00112233aabb-w1', id: 0x00112233aabb, hashes: Buffer.alloc(64, 7) }]);
    expect(decodeIndex(idx, 'index/x.idx')[0]!.base).toBe('00112233aabb-w1');
    for (const bad of [idx.subarray(0, 20), Buffer.concat([Buffer.from('XXXXXXXX'), idx.subarray(8)]), Buffer.from(idx).fill(1, 30, 31), Buffer.alloc(0)]) {
      expect(() => decodeIndex(bad, 'index/x.idx')).toThrow(expect.objectContaining({ code: 'CORRUPT', message: expect.stringContaining('index/x.idx') }));
    }
    const mf = encodeManifest(header, [Buffer.alloc(80, 9)]);
    expect(decodeManifest(mf, 'j', 3).header).toEqual(header);
    expect(() => decodeManifest(mf, 'j', 4)).toThrow(/checkpoint 4 of job j is damaged: header does not match its name/);
    const flipped = Buffer.from(mf);
    flipped[40]! ^= 1;
    expect(() => decodeManifest(flipped, 'j', 3)).toThrow(/checkpoint 3 of job j is damaged: checksum mismatch/);
    expect(() => decodeManifest(mf.subarray(0, 30), 'j', 3)).toThrow(expect.objectContaining({ code: 'CORRUPT' }));
    expect(parsePackKey('packs/00/00112233aabb-w1.pack')).toEqual({ base: '00112233aabb-w1', id: 0x00112233aabb });
    for (const k of ['packs/00/../etc.pack', 'packs/zz/00112233aabb-w1.pack', 'packs/00/00112233aabb-w 1.pack', 'packs/00/0011-w.pack']) expect(parsePackKey(k)).toBeNull();
    expect(parseCkptKey('manifests/j/0000000003.mf')).toEqual({ kind: 'manifest', job: 'j', checkpoint: 3 });
    expect(parseCkptKey('manifests/j/0000000003')).toBeNull();
    expect(parseCkptKey('deleted/j/0000000003.mf')).toBeNull();
  });

  it('a damaged manifest in the bucket is left out of listings and named; a damaged index object is ignored', async () => {
    s3 = await startS3('damage-bucket');
    const opts = { url: `s3://${s3.bucket}/d`, endpoint: s3.endpoint, ...S3RVER_KEYS };
    const store = new CheckpointStore(await S3Backend.open(opts));
    const regions = [{ name: 'r', pageCount: 8, address: '', flags: 0 }];
    const pages = Array.from({ length: 8 }, (_, i) => ({ region: 0, index: i, bytes: genPage(2, 0, i, 1) }));
    await putDirect(store, 'good', 0, regions, pages);
    await putDirect(store, 'bad', 0, regions, pages);
    const io = (store.backend as S3Backend).io;
    // Damage the manifest of job "bad" and write a garbage index object.
    const key = manifestKey('bad', 1);
    const body = (await io.get(key))!;
    body[20]! ^= 0xff;
    const { PutObjectCommand } = await import('@aws-sdk/client-s3');
    await io.client.send(new PutObjectCommand({ Bucket: io.bucket, Key: io.key(key), Body: body }));
    await io.client.send(new PutObjectCommand({ Bucket: io.bucket, Key: io.key('index/0000000000000-junk-000000.idx'), Body: Buffer.from('not an index') }));
    await store.close();

    const warnings: string[] = [];
    const onWarn = (w: Error): void => { warnings.push(w.message); };
    process.on('warning', onWarn);
    closers.push(async () => process.off('warning', onWarn));
    const fresh = new CheckpointStore(await S3Backend.open(opts));
    closers.push(() => fresh.close());
    const jobs = (await fresh.listJobs()).map((j) => j.job);
    expect(jobs).toEqual(['good']);
    await expect(fresh.backend.getHeader('bad', 1)).rejects.toMatchObject({ code: 'CORRUPT', message: expect.stringContaining('checkpoint 1 of job bad') });
    expect((await fresh.verify({ job: 'good' })).ok).toBe(true);
    await new Promise((r) => setImmediate(r));
    expect(warnings.some((w) => w.includes('index/0000000000000-junk-000000.idx'))).toBe(true);
  });
});
