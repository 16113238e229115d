/**
 * `compact` rewrites the pages of a job's latest checkpoint in image order
 * (storage/engine.ts compact, LevelBackend relocatePages/commitRelocation):
 * afterwards that checkpoint's refs are consecutive slots, every checkpoint
 * of the job still restores bit-exact (also after GC reclaims the old
 * copies), and a server SIGKILLed in the middle of a compaction restarts with
 * every checkpoint bit-exact and verify clean.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { ENTRY_BYTES, HASH_BYTES } from '../../storage/pages.js';
import { Image, PAGE, cleanupDirs, diffImage, genBytes, killAll, randomPage, regionsOf, rng, startStore, tempDir, engineImage, enginePut } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('compact in image order', () => {
  it('lays the latest checkpoint out in image order and keeps every checkpoint bit-exact, also after GC', async () => {
    const dir = tempDir();
    const store = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    try {
      const pages = 600;
      const rand = rng(5);
      const versions = new Map<number, Buffer>();
      let img = genBytes('compact/0', pages * PAGE);
      versions.set(await enginePut(store, 'c', 0, pages, img, [...Array(pages).keys()]), img);
      for (let k = 1; k < 25; k++) {
        img = Buffer.from(img);
        const dirty = [...new Set(Array.from({ length: 12 }, () => Math.floor(rand() * pages)))].sort((a, b) => a - b);
        for (const i of dirty) genBytes(`compact/${k}/${i}`, PAGE).copy(img, i * PAGE);
        versions.set(await enginePut(store, 'c', k, pages, img, dirty), img);
      }
      const latest = Math.max(...versions.keys());
      const r = await store.compact('c');
      expect(r.pagesMoved).toBe(pages);
      expect(r.refsUpdated).toBeGreaterThanOrEqual(pages);
      // The latest map now names consecutive slots of one pack, in image order.
      const [map] = (await store.backend.getMaps('c', latest))!;
      for (let i = 1; i < pages; i++) {
        expect(map!.readUInt32BE(i * ENTRY_BYTES + HASH_BYTES)).toBe(map!.readUInt32BE(HASH_BYTES));
        expect(map!.readUInt32BE(i * ENTRY_BYTES + HASH_BYTES + 4)).toBe(map!.readUInt32BE(HASH_BYTES + 4) + i);
      }
      for (const [n, v] of versions) expect((await engineImage(store, 'c', n)).equals(v), `checkpoint ${n}`).toBe(true);
      // GC reclaims the old copies (their packs are now mostly dead) and nothing is lost.
      await store.deleteCheckpoints('c', { checkpoints: [...versions.keys()].filter((n) => n > 1 && n < latest) });
      await store.gc({ graceMs: 0 });
      for (const n of [1, latest]) expect((await engineImage(store, 'c', n)).equals(versions.get(n)!), `checkpoint ${n} after GC`).toBe(true);
      expect((await store.verify({ allPages: true })).problems).toEqual([]);
    } finally {
      await store.close();
    }
  });

  it('survives SIGKILL in the middle of a compaction: every checkpoint bit-exact after the restart, verify clean', async () => {
    const dir = tempDir();
    const rand = rng(9);
    let server = await startStore(dir);
    let c = await StoreClient.connect(server.address);
    const history: Image[] = [];
    let img = new Image(regionsOf([['heap', 3000], ['grid', 500]]), (_r, i) => (i % 23 === 0 ? null : randomPage(`ck/${_r}/${i}`)));
    let parent = (await c.putCheckpoint({ job: 'k', parent: 0, regions: img.regions }, img.batches(img.allPages(), 512))).checkpoint;
    history.push(img.clone());
    for (let k = 1; k < 12; k++) {
      const next = img.clone();
      const dirty: [number, number][] = [];
      for (const [r, i] of next.allPages()) if (rand() < 0.03) { next.setPage(r, i, rand() < 0.1 ? null : randomPage(`ck/${k}/${r}/${i}`)); dirty.push([r, i]); }
      parent = (await c.putCheckpoint({ job: 'k', parent, regions: next.regions }, next.batches(dirty, 512))).checkpoint;
      history.push(next.clone());
      img = next;
    }
    let killedDuring = 0;
    for (let life = 0; life < 6; life++) {
      const compaction = c.compact('k').then(() => 'done', () => 'failed');
      await new Promise((r) => setTimeout(r, 20 + Math.floor(rand() * 250)));
      await server.kill('SIGKILL');
      if ((await compaction) === 'failed') killedDuring++;
      c.close();
      server = await startStore(dir);
      c = await StoreClient.connect(server.address);
      for (let n = 1; n <= history.length; n++) {
        expect(diffImage(history[n - 1]!, (await c.fetchImage({ job: 'k', checkpoint: n })).regions), `life ${life}, checkpoint ${n}`).toBeNull();
      }
      expect((await c.verify({ allPages: true })).problems).toEqual([]);
    }
    expect(killedDuring).toBeGreaterThan(0);
    const done = await c.compact('k');
    expect(done.pagesMoved).toBeGreaterThan(0);
    await c.gc({ graceSeconds: 0 });
    for (let n = 1; n <= history.length; n++) {
      expect(diffImage(history[n - 1]!, (await c.fetchImage({ job: 'k', checkpoint: n })).regions), `checkpoint ${n} at the end`).toBeNull();
    }
    expect((await c.verify({ allPages: true })).problems).toEqual([]);
    c.close();
  });
});
