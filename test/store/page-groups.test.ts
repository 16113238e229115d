/**
 * The LevelDB page log stores runs of up to 16 image-adjacent pages as one
 * value (storage/leveldb.ts, format 2). GC that removes some pages of a group
 * keeps its other pages readable and reclaims the removed ones; a data
 * directory of the older one-page-a-value format is refused with a clear error.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Level } from 'level';
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { sha256 } from '../../storage/pages.js';
import { cleanupDirs, genBytes, PAGE, tempDir } from './helpers.js';

afterEach(() => cleanupDirs());

async function image(store: CheckpointStore, job: string, n: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const item of store.readImage(job, n)) if (!('checkpoint' in item)) parts.push(item.data);
  return Buffer.concat(parts);
}

async function put(store: CheckpointStore, job: string, parent: number, pages: number, img: Buffer, which: number[]): Promise<number> {
  const s = await store.beginPut({ job, parent, regions: [{ name: 'mem', pageCount: pages, address: '', flags: 0 }] });
  const data = Buffer.concat(which.map((i) => img.subarray(i * PAGE, (i + 1) * PAGE)));
  const hashes = Buffer.concat(which.map((i) => sha256(img.subarray(i * PAGE, (i + 1) * PAGE))));
  const want = await s.offerHashes({ batch: 0, region: which.map(() => 0), index: which, hashes });
  if (want.length > 0) await s.supplyData(0, Buffer.concat(want.map((k) => data.subarray(k * PAGE, (k + 1) * PAGE))));
  return (await s.commit()).checkpoint;
}

describe('LevelDB page groups', () => {
  it('GC that removes some pages of a group keeps the others readable and reclaims the removed ones', async () => {
    const dir = tempDir();
    const store = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    try {
      const pages = 40; // groups of 16, 16 and 8 pages
      const img = genBytes('groups/base', pages * PAGE);
      expect(await put(store, 'g', 0, pages, img, [...Array(pages).keys()])).toBe(1);
      const next = Buffer.from(img);
      const changed = [3, 17, 18, 39];
      for (const i of changed) genBytes(`groups/new/${i}`, PAGE).copy(next, i * PAGE);
      expect(await put(store, 'g', 1, pages, next, changed)).toBe(2);
      expect(store.backend.pageStats().pages).toBe(pages + changed.length);

      await store.deleteCheckpoints('g', { checkpoints: [1] });
      const gc = await store.gc({ graceMs: 0 });
      expect(gc.deletedPages).toBe(changed.length);
      expect(store.backend.pageStats().pages).toBe(pages);
      expect((await image(store, 'g', 2)).equals(next)).toBe(true);
      const v = await store.verify({ allPages: true });
      expect(v.problems).toEqual([]);
      expect(v.ok).toBe(true);

      // A second round removes whole groups: nothing of checkpoint 2 is lost.
      const third = Buffer.from(next);
      const all = [...Array(pages).keys()];
      for (const i of all) genBytes(`groups/third/${i}`, PAGE).copy(third, i * PAGE);
      expect(await put(store, 'g', 2, pages, third, all)).toBe(3);
      await store.deleteCheckpoints('g', { checkpoints: [2] });
      expect((await store.gc({ graceMs: 0 })).deletedPages).toBe(pages);
      expect((await image(store, 'g', 3)).equals(third)).toBe(true);
      expect((await store.verify({ allPages: true })).ok).toBe(true);
    } finally {
      await store.close();
    }
    // Reopened: the rewritten groups still read, and new pages go after them.
    const again = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    try {
      expect(again.backend.pageStats().pages).toBe(40);
      const more = genBytes('groups/more', 20 * PAGE);
      expect(await put(again, 'h', 0, 20, more, [...Array(20).keys()])).toBe(1);
      expect((await image(again, 'h', 1)).equals(more)).toBe(true);
      expect((await again.verify({ allPages: true })).ok).toBe(true);
    } finally {
      await again.close();
    }
  });

  it('refuses a data directory of the older one-page-a-value format, naming it', async () => {
    const dir = tempDir();
    mkdirSync(dir, { recursive: true });
    const index = new Level<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await index.open();
    // A hash index entry and no format key: what the older exastore left.
    await index.put(Buffer.concat([Buffer.from('H'), Buffer.alloc(32, 1)]), Buffer.from('0000000000000001', 'hex'));
    await index.close();
    const err = await LevelBackend.open(dir).then(() => null, (e: unknown) => e as { code: string; message: string });
    expect(err).not.toBeNull();
    expect(err!.code).toBe('FAILED_PRECONDITION');
    expect(err!.message).toContain(`data directory ${dir} has store format 1`);
    // It left the databases closed: opening them again works.
    const reopen = new Level<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await reopen.open();
    await reopen.close();
  });
});
