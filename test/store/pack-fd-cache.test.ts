/**
 * The LevelDB backend's bounded cache of open pack descriptors
 * (storage/leveldb.ts, maxOpenPacks): a store with many more packs than the
 * cap opens none at start, reads every checkpoint bit-exact while restores
 * run concurrently with GC rewriting packs, and ends with at most the cap
 * open.
 */
import { readdirSync, readlinkSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { sha256 } from '../../storage/pages.js';
import { cleanupDirs, genBytes, PAGE, tempDir } from './helpers.js';

afterEach(() => { cleanupDirs(); });

async function image(store: CheckpointStore, job: string, n: number, chunk: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const item of store.readImage(job, n, {}, chunk)) {
    if ('checkpoint' in item) continue;
    let k = 0;
    for (let i = 0; i < item.pageCount; i++) {
      if (item.zero.length > 0 && item.zero[i]) parts.push(Buffer.alloc(PAGE));
      else parts.push(item.data.subarray(k * PAGE, ++k * PAGE));
    }
  }
  return Buffer.concat(parts);
}

async function put(store: CheckpointStore, job: string, parent: number, pages: number, img: Buffer, which: number[]): Promise<number> {
  const s = await store.beginPut({ job, parent, regions: [{ name: 'mem', pageCount: pages, address: '', flags: 0 }] });
  const data = Buffer.concat(which.map((i) => img.subarray(i * PAGE, (i + 1) * PAGE)));
  const hashes = Buffer.concat(which.map((i) => sha256(img.subarray(i * PAGE, (i + 1) * PAGE))));
  // Batches of 16 pages: with 16-page packs every batch lands in a pack of its own.
  for (let b = 0; b * 16 < which.length; b++) {
    const idx = which.slice(b * 16, (b + 1) * 16);
    const want = await s.offerHashes({ batch: b, region: idx.map(() => 0), index: idx, hashes: hashes.subarray(b * 16 * 32, (b * 16 + idx.length) * 32) });
    if (want.length > 0) await s.supplyData(b, Buffer.concat(want.map((k) => data.subarray((b * 16 + k) * PAGE, (b * 16 + k + 1) * PAGE))));
  }
  return (await s.commit()).checkpoint;
}

/** Pack files this process has open now (from /proc/self/fd). */
function openPackFiles(dir: string): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try { if (readlinkSync(`/proc/self/fd/${fd}`).startsWith(`${dir}/packs/`)) n++; } catch { /* closed meanwhile */ }
  }
  return n;
}

describe('pack descriptor cache', () => {
  it('keeps at most maxOpenPacks pack files open while concurrent restores and GC repacks read 40+ packs bit-exact', async () => {
    const dir = tempDir();
    const pages = 320;
    const versions = new Map<number, Buffer>();
    const opts = { packBytes: 16 * PAGE, maxOpenPacks: 3 };
    let store = new CheckpointStore(await LevelBackend.open(dir, opts), { gcGraceMs: 0 });
    let img = genBytes('fds/0', pages * PAGE);
    versions.set(await put(store, 'f', 0, pages, img, [...Array(pages).keys()]), img);
    for (let k = 1; k <= 8; k++) {
      img = Buffer.from(img);
      const changed = [...Array(pages).keys()].filter((i) => (i * 7 + k * 13) % 5 === 0);
      for (const i of changed) genBytes(`fds/${k}/${i}`, PAGE).copy(img, i * PAGE);
      versions.set(await put(store, 'f', k, pages, img, changed), img);
    }
    await store.close();

    store = new CheckpointStore(await LevelBackend.open(dir, opts), { gcGraceMs: 0 });
    const backend = store.backend as LevelBackend;
    try {
      expect(backend.packStats().packs).toBeGreaterThan(40);
      // Nothing is opened at start.
      expect(backend.openPackCount()).toBe(0);
      expect(openPackFiles(dir)).toBe(0);
      // Restores of every checkpoint, twice, at once, while old checkpoints are deleted and GC rewrites mostly-dead packs.
      const kept = [...versions.keys()].filter((n) => n % 3 !== 1);
      const reads = [...kept, ...kept].map(async (n, j) => {
        const got = await image(store, 'f', n, 8 + (j % 3) * 24);
        expect(got.equals(versions.get(n)!), `checkpoint ${n}`).toBe(true);
      });
      const gc = (async () => {
        await store.deleteCheckpoints('f', { checkpoints: [...versions.keys()].filter((n) => n % 3 === 1) });
        for (let i = 0; i < 3; i++) await store.gc({ graceMs: 0 });
      })();
      let peak = 0;
      const watch = setInterval(() => { peak = Math.max(peak, openPackFiles(dir)); }, 2);
      try {
        await Promise.all([...reads, gc]);
      } finally {
        clearInterval(watch);
      }
      expect(peak).toBeGreaterThan(0);
      for (const n of kept) expect((await image(store, 'f', n, 64)).equals(versions.get(n)!)).toBe(true);
      expect((await store.verify({ allPages: true })).ok).toBe(true);
      // Idle again: within the cap (the current pack counts in it).
      expect(backend.openPackCount()).toBeLessThanOrEqual(3);
      await new Promise((r) => setTimeout(r, 50)); // closes are asynchronous
      expect(openPackFiles(dir)).toBeLessThanOrEqual(3 + 1); // + the O_DIRECT append descriptor of the current pack
    } finally {
      await store.close();
    }
    expect(openPackFiles(dir)).toBe(0);
  });
});
