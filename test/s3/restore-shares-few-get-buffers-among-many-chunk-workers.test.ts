/**
 * The parallel S3 restore gives its chunk workers GET buffers from a pool
 * of the backend's GETs in flight + 2: with one GET at a time and sixteen
 * workers, fourteen wait for a buffer at any moment, and the image still
 * comes back bit-exact with every page once; a restore that fails (a pack
 * gone) hands its buffers back and the next restore on the same backend
 * works.
 */
import { DeleteObjectCommand } from '@aws-sdk/client-s3';
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { bufferSink, restoreCheckpoint } from '../../storage/s3/restore.js';
import { S3RVER_KEYS, genPage, putDirect, startS3, teardownS3, tempDir, type TestS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

describe('restore GET buffers', () => {
  it('restores bit-exact with 16 workers sharing 3 buffers, and after a failed restore', async () => {
    s3 = await startS3('bufs-bucket');
    const opts = { url: `s3://${s3.bucket}/b`, endpoint: s3.endpoint, ...S3RVER_KEYS, packBytes: 2 ** 20 };
    const cache = tempDir('w');
    dirs.push(cache);
    const writer = new CheckpointStore(await S3Backend.open({ ...opts, cacheDir: cache }));
    closers.push(() => writer.close());
    const n = 1500;
    const pages = Array.from({ length: n }, (_, i) => ({ region: 0, index: i, bytes: genPage(3, 0, i, 1)! }));
    const region = [{ name: 'mem', pageCount: n, address: '', flags: 0 }];
    await putDirect(writer, 'a', 0, region, pages);
    const image = Buffer.concat(pages.map((p) => p.bytes));
    const other = Array.from({ length: 300 }, (_, i) => ({ region: 0, index: i, bytes: genPage(4, 0, i, 1)! }));
    await putDirect(writer, 'b', 0, [{ name: 'mem', pageCount: 300, address: '', flags: 0 }], other);

    const reader = await S3Backend.open({ ...opts, readConcurrency: 1 });
    closers.push(() => reader.close());
    expect(reader.readConcurrency).toBe(1);
    let sink: ReturnType<typeof bufferSink> | null = null;
    const res = await restoreCheckpoint(reader, 'a', 1, (h) => (sink = bufferSink(h)), { concurrency: 16, chunkPages: 64 });
    expect(res.pages).toBe(n);
    expect(sink!.regions.get('mem')!.equals(image)).toBe(true);

    // Job b's only pack gone: that restore fails naming a page; the backend restores job a again afterwards.
    const io = (writer.backend as S3Backend).io;
    const packsA = new Set((await io.list('packs/')).map((o) => o.key));
    const gone = await S3Backend.open({ ...opts, readConcurrency: 1 });
    closers.push(() => gone.close());
    const bKeys = (await io.list('packs/')).map((o) => o.key);
    expect(bKeys.length).toBeGreaterThan(1);
    // The last pack written holds job b's pages (packs are 1 MiB: job a filled the earlier ones).
    const maps = (await gone.getMaps('b', 1))!;
    const refId = maps[0]!.readUIntBE(32, 6);
    const victim = bKeys.find((k) => k.includes(`/${refId.toString(16).padStart(12, '0')}-`))!;
    expect(victim).toBeDefined();
    expect(packsA.has(victim)).toBe(true);
    await io.client.send(new DeleteObjectCommand({ Bucket: io.bucket, Key: io.key(victim) }));
    await expect(restoreCheckpoint(gone, 'b', 1, bufferSink, { concurrency: 16, chunkPages: 32 })).rejects.toMatchObject({ code: 'CORRUPT', detail: { job: 'b', checkpoint: 1, region: 'mem' } });
    sink = null;
    const again = await restoreCheckpoint(gone, 'a', 1, (h) => (sink = bufferSink(h)), { concurrency: 16, chunkPages: 64 });
    expect(again.pages).toBe(n);
    expect(sink!.regions.get('mem')!.equals(image)).toBe(true);
  });
});
