/**
 * The parallel restore's S3 path (range GET bodies read into reused
 * buffers, pages checked while the body arrives): a body cut off half-way
 * with a damaged byte in the part that arrived is retried, the checks made
 * on the first attempt's bytes are thrown away (no recovery GET), and the
 * image is bit-exact; a pack shorter than its index says (the range GET
 * answers short, or 416 when it starts past the end) fails the restore with
 * CORRUPT naming job, checkpoint, region and the first missing page.
 */
import { createServer, request, type Server } from 'node:http';
import { PutObjectCommand } from '@aws-sdk/client-s3';
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { PAGE_SIZE } from '../../storage/pages.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { bufferSink, restoreCheckpoint } from '../../storage/s3/restore.js';
import { S3RVER_KEYS, genPage, putDirect, startS3, teardownS3, tempDir, type TestS3 } from './helpers.js';

let s3: TestS3 | null = null;
let proxy: Server | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  if (proxy) { proxy.closeAllConnections(); await new Promise((r) => proxy!.close(r)); }
  proxy = null;
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

const MiB = 2 ** 20;

/**
 * A proxy to s3rver that cuts the first ranged GET of more than 1 MiB after
 * `cutAt` bytes of body, flipping the byte at `flipAt` on the way.
 */
async function cuttingProxy(target: number, cutAt: number, flipAt: number): Promise<{ endpoint: string; cuts: () => number }> {
  let cuts = 0;
  proxy = createServer((req, res) => {
    const range = /^bytes=(\d+)-(\d+)$/.exec(String(req.headers.range ?? ''));
    const cut = req.method === 'GET' && range !== null && Number(range[2]) - Number(range[1]) + 1 > MiB && cuts === 0;
    if (cut) cuts++;
    const up = request({ host: '127.0.0.1', port: target, method: req.method, path: req.url, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode ?? 502, r.headers);
      if (!cut) { r.pipe(res); return; }
      let sent = 0;
      r.on('data', (c: Buffer) => {
        if (sent >= cutAt) return;
        const part = Buffer.from(c.subarray(0, Math.min(c.length, cutAt - sent)));
        if (flipAt >= sent && flipAt < sent + part.length) part[flipAt - sent] = part[flipAt - sent]! ^ 0x55;
        sent += part.length;
        res.write(part);
        if (sent >= cutAt) { r.destroy(); res.socket?.destroy(); }
      });
    });
    up.on('error', () => { if (!res.headersSent) res.writeHead(502); res.end(); });
    req.pipe(up);
  });
  await new Promise<void>((r) => proxy!.listen(0, '127.0.0.1', r));
  const a = proxy.address();
  return { endpoint: `http://127.0.0.1:${typeof a === 'object' && a ? a.port : 0}`, cuts: () => cuts };
}

const pagesOf = (seed: number, n: number): { region: number; index: number; bytes: Buffer }[] =>
  Array.from({ length: n }, (_, i) => ({ region: 0, index: i, bytes: genPage(seed, 0, i, 1)! }));
const imageOf = (pages: { bytes: Buffer }[]): Buffer => Buffer.concat(pages.map((p) => p.bytes));

describe('parallel restore from S3 range GETs', () => {
  it('retries a body cut off half-way, discards the checks of its damaged bytes, and restores bit-exact', async () => {
    s3 = await startS3('cut-bucket');
    const opts = { url: `s3://${s3.bucket}/r`, endpoint: s3.endpoint, ...S3RVER_KEYS, packBytes: 16 * MiB };
    const cache = tempDir('w');
    dirs.push(cache);
    const writer = new CheckpointStore(await S3Backend.open({ ...opts, cacheDir: cache }));
    closers.push(() => writer.close());
    const pages = pagesOf(11, 3000);
    await putDirect(writer, 'big', 0, [{ name: 'mem', pageCount: pages.length, address: '', flags: 0 }], pages);
    const image = imageOf(pages);

    // Without faults: how many GETs the restore makes (manifest + one per range).
    const plain = await S3Backend.open({ ...opts });
    closers.push(() => plain.close());
    let sink: ReturnType<typeof bufferSink> | null = null;
    let before = plain.counters.get;
    await restoreCheckpoint(plain, 'big', 1, (h) => (sink = bufferSink(h)));
    const gets = plain.counters.get - before;
    expect(sink!.regions.get('mem')!.equals(image)).toBe(true);

    // The first 8 MiB range is cut after 3 MiB, with byte 17 of page 256 damaged:
    // pages 0-511 were checked (and page 256 failed) before the cut.
    const p = await cuttingProxy(s3.port, 3 * MiB, MiB + 17);
    const cutOpen = await S3Backend.open({ ...opts, endpoint: p.endpoint, retryBaseMs: 10 });
    closers.push(() => cutOpen.close());
    sink = null;
    before = cutOpen.counters.get;
    await restoreCheckpoint(cutOpen, 'big', 1, (h) => (sink = bufferSink(h)));
    expect(p.cuts()).toBe(1);
    expect(cutOpen.counters.retries).toBeGreaterThanOrEqual(1);
    expect(sink!.regions.get('mem')!.equals(image)).toBe(true);
    // One GET more (the retry), none to recover page 256: its failed check was discarded.
    expect(cutOpen.counters.get - before).toBe(gets + 1);
  });

  it('names the first missing page when a pack is shorter than its index says', async () => {
    s3 = await startS3('short-bucket');
    const opts = { url: `s3://${s3.bucket}/s`, endpoint: s3.endpoint, ...S3RVER_KEYS, packBytes: MiB };
    const cache = tempDir('w');
    dirs.push(cache);
    const writer = new CheckpointStore(await S3Backend.open({ ...opts, cacheDir: cache }));
    closers.push(() => writer.close());
    const io = (writer.backend as S3Backend).io;
    const packs = async (): Promise<string[]> => (await io.list('packs/')).map((o) => o.key);
    // Two jobs of 256 pages, one 1 MiB pack each.
    const region = [{ name: 'heap', pageCount: 256, address: '', flags: 0 }];
    await putDirect(writer, 'short', 0, region, pagesOf(21, 256));
    const [packShort] = await packs();
    await putDirect(writer, 'past', 0, region, pagesOf(22, 256));
    const packPast = (await packs()).find((k) => k !== packShort)!;
    expect(packShort).toBeDefined();
    expect(packPast).toBeDefined();
    // Truncate: 'short' keeps 200 pages (a range GET from 192 answers 8 pages), 'past'
    // keeps 192 (the range GET from 192 starts at the end: 416).
    for (const [key, keep] of [[packShort!, 200], [packPast, 192]] as const) {
      const body = (await io.get(key))!;
      await io.client.send(new PutObjectCommand({ Bucket: io.bucket, Key: io.key(key), Body: body.subarray(0, keep * PAGE_SIZE) }));
    }
    const fresh = await S3Backend.open({ ...opts });
    closers.push(() => fresh.close());
    for (const [job, page] of [['short', 200], ['past', 192]] as const) {
      let err: unknown = null;
      try { await restoreCheckpoint(fresh, job, 1, bufferSink, { chunkPages: 64 }); } catch (e) { err = e; }
      expect(err, job).toMatchObject({ code: 'CORRUPT', detail: { job, checkpoint: 1, region: 'heap', page } });
      expect((err as Error).message).toMatch(new RegExp(`checkpoint 1 of job ${job}: page ${page} of region "heap" is missing from the store`));
    }
  });
});
