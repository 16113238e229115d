/**
 * The parallel S3 restore hands pages that arrived side by side to a sink's
 * optional writeRun() (one call per run of consecutive pages of one region)
 * and the rest to write(); a sink without writeRun() gets every page through
 * write(). Either way every non-zero page arrives exactly once and the image
 * is bit-exact, for a full checkpoint (long runs) and for an incremental one
 * whose pages lie in several packs (short runs, gaps, zero pages, pages
 * shared between regions).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { PAGE_SIZE } from '../../storage/pages.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { restoreCheckpoint, type PageSink } from '../../storage/s3/restore.js';
import type { ManifestHeader } from '../../storage/backend.js';
import { S3RVER_KEYS, makeChain, putDirect, startS3, teardownS3, tempDir, type TestS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

/** A sink that records how each page arrived; with runs = false it has no writeRun(). */
function recordingSink(header: ManifestHeader, runs: boolean): PageSink & { images: Buffer[]; seen: Uint8Array[]; runCalls: number[]; pageCalls: number; twice: number } {
  const images = header.regions.map((r) => Buffer.alloc(r.pageCount * PAGE_SIZE));
  const seen = header.regions.map((r) => new Uint8Array(r.pageCount));
  const sink = {
    images, seen, runCalls: [] as number[], pageCalls: 0, twice: 0,
    write(region: number, page: number, data: Buffer): void {
      expect(data.length).toBe(PAGE_SIZE);
      sink.pageCalls++;
      if (seen[region]![page]!++) sink.twice++;
      data.copy(images[region]!, page * PAGE_SIZE);
    },
    ...(runs ? {
      writeRun(region: number, first: number, count: number, data: Buffer): void {
        expect(count).toBeGreaterThan(1);
        expect(data.length).toBe(count * PAGE_SIZE);
        sink.runCalls.push(count);
        for (let p = first; p < first + count; p++) if (seen[region]![p]!++) sink.twice++;
        data.copy(images[region]!, first * PAGE_SIZE);
      },
    } : {}),
  };
  return sink;
}

describe('restore sinks that take runs of pages', () => {
  it('gets long runs for a full checkpoint and short ones for an incremental, bit-exact, each page once', async () => {
    s3 = await startS3('runs-bucket');
    const opts = { url: `s3://${s3.bucket}/runs`, endpoint: s3.endpoint, ...S3RVER_KEYS, packBytes: 2 ** 20 };
    const cache = tempDir('w');
    dirs.push(cache);
    const writer = new CheckpointStore(await S3Backend.open({ ...opts, cacheDir: cache }));
    closers.push(() => writer.close());
    const regions = [{ name: 'heap', pages: 900 }, { name: 'stack', pages: 300 }];
    const chain = makeChain(5, regions, 3, 4);
    const specs = regions.map((r) => ({ name: r.name, pageCount: r.pages, address: '', flags: 0 }));
    for (let k = 0; k < 3; k++) await putDirect(writer, 'runs', k, specs, chain.changes[k]!);

    const reader = await S3Backend.open({ ...opts });
    closers.push(() => reader.close());
    for (const n of [1, 3]) {
      const expected = chain.images[n - 1]!;
      const zeroPages = regions.map((r) => {
        const img = expected.get(r.name)!;
        let z = 0;
        for (let p = 0; p < r.pages; p++) if (img.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE).every((x) => x === 0)) z++;
        return z;
      });
      let longestNonZero = 0;
      for (const r of regions) {
        const img = expected.get(r.name)!;
        for (let p = 0, len = 0; p < r.pages; p++) {
          len = img.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE).every((x) => x === 0) ? 0 : len + 1;
          longestNonZero = Math.max(longestNonZero, len);
        }
      }
      for (const runs of [true, false]) {
        let sink: ReturnType<typeof recordingSink> | null = null;
        const res = await restoreCheckpoint(reader, 'runs', n, (h) => (sink = recordingSink(h, runs)), { chunkPages: 256 });
        const s = sink!;
        regions.forEach((r, i) => expect(s.images[i]!.equals(expected.get(r.name)!), `checkpoint ${n} ${r.name} runs=${runs}`).toBe(true));
        expect(s.twice).toBe(0);
        const delivered = s.seen.reduce((a, v) => a + v.reduce((x, y) => x + y, 0), 0);
        expect(delivered).toBe(res.pages);
        expect(res.pages).toBe(regions.reduce((a, r) => a + r.pages, 0) - zeroPages.reduce((a, z) => a + z, 0));
        if (!runs) {
          expect(s.runCalls.length).toBe(0);
          expect(s.pageCalls).toBe(res.pages);
        } else {
          expect(s.runCalls.length).toBeGreaterThan(0);
          // Fewer calls than pages: runs carried some (the full checkpoint: most) of them.
          expect(s.runCalls.length + s.pageCalls).toBeLessThan(n === 1 ? res.pages / 4 : res.pages);
          // The full checkpoint lies in its packs in page order: its longest run is the longest
          // stretch of non-zero pages (zero pages are not read, so they end runs).
          if (n === 1) expect(Math.max(...s.runCalls)).toBe(longestNonZero);
        }
      }
    }
  });
});
