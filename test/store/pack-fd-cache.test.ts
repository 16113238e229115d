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
import { cleanupDirs, genBytes, PAGE, tempDir, engineImage, enginePut } from './helpers.js';

afterEach(() => { cleanupDirs(); });

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
    versions.set(await enginePut(store, 'f', 0, pages, img, [...Array(pages).keys()], 16), img);
    for (let k = 1; k <= 8; k++) {
      img = Buffer.from(img);
      const changed = [...Array(pages).keys()].filter((i) => (i * 7 + k * 13) % 5 === 0);
      for (const i of changed) genBytes(`fds/${k}/${i}`, PAGE).copy(img, i * PAGE);
      versions.set(await enginePut(store, 'f', k, pages, img, changed, 16), img);
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
        const got = await engineImage(store, 'f', n, 8 + (j % 3) * 24);
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
      for (const n of kept) expect((await engineImage(store, 'f', n, 64)).equals(versions.get(n)!)).toBe(true);
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
