/**
 * The LevelDB backend's pack files (storage/leveldb.ts, store format 3):
 * page bytes in append-only packs, LevelDB only as the index. An index entry
 * is never durable before its bytes; bytes that no index entry names (an
 * upload that never committed, a SIGKILL) are reclaimed by GC; GC rewrites
 * mostly-dead packs while restores that hold the old refs keep reading and
 * uploads reuse the pages it moves; a
 * format-2 data directory (page groups in a second LevelDB) is converted on
 * open, and an interrupted conversion starts over; an unknown older format is
 * refused with a clear error.
 */
import { existsSync, mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Level } from 'level';
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import type { ManifestHeader } from '../../storage/backend.js';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { sha256 } from '../../storage/pages.js';
import { Image, cleanupDirs, diffImage, genBytes, killAll, PAGE, randomPage, regionsOf, startStore, tempDir, engineImage, enginePut } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

type DB = Level<Buffer, Buffer>;

function packBytes(dir: string): number {
  return readdirSync(join(dir, 'packs')).reduce((a, n) => a + statSync(join(dir, 'packs', n)).size, 0);
}

describe('LevelDB pack files', () => {
  it('GC rewrites a mostly-dead pack, a restore holding its old refs keeps reading, and the space comes back', async () => {
    const dir = tempDir();
    // Small packs: each upload below fills one.
    const store = new CheckpointStore(await LevelBackend.open(dir, { packBytes: 16 * PAGE }), { gcGraceMs: 0 });
    try {
      const pages = 40;
      const img = genBytes('packs/base', pages * PAGE);
      expect(await enginePut(store, 'g', 0, pages, img, [...Array(pages).keys()])).toBe(1);
      const next = Buffer.from(img);
      const changed = [...Array(30).keys()].map((i) => i + 5);
      for (const i of changed) genBytes(`packs/new/${i}`, PAGE).copy(next, i * PAGE);
      expect(await enginePut(store, 'g', 1, pages, next, changed)).toBe(2);
      expect(store.backend.pageStats().pages).toBe(pages + changed.length);
      expect(packBytes(dir)).toBe((pages + changed.length) * PAGE);

      // A restore of checkpoint 2 has begun (header read, map held) when GC runs.
      const reader = store.readImage('g', 2, {}, 8);
      expect('checkpoint' in (await reader.next()).value!).toBe(true);
      await store.deleteCheckpoints('g', { checkpoints: [1] });
      const gc = await store.gc({ graceMs: 0 });
      expect(gc.deletedPages).toBe(changed.length);
      // The first pack (10 of 40 pages live) was rewritten: 40 pages of bytes are gone, 10 copied.
      expect(packBytes(dir)).toBe((changed.length + 10) * PAGE);
      expect(store.backend.pageStats().pages).toBe(pages);
      const parts: Buffer[] = [];
      for await (const item of reader) if (!('checkpoint' in item)) parts.push(item.data);
      expect(Buffer.concat(parts).equals(next)).toBe(true);
      expect((await engineImage(store, 'g', 2)).equals(next)).toBe(true);
      const v = await store.verify({ allPages: true });
      expect(v.problems).toEqual([]);
    } finally {
      await store.close();
    }
    // Reopened: the rewritten pages still read, and new pages go to a new pack.
    const again = new CheckpointStore(await LevelBackend.open(dir, { packBytes: 16 * PAGE }), { gcGraceMs: 0 });
    try {
      expect(again.backend.pageStats().pages).toBe(40);
      const more = genBytes('packs/more', 20 * PAGE);
      expect(await enginePut(again, 'h', 0, 20, more, [...Array(20).keys()])).toBe(1);
      expect((await engineImage(again, 'h', 1)).equals(more)).toBe(true);
      expect((await again.verify({ allPages: true })).ok).toBe(true);
    } finally {
      await again.close();
    }
  });

  it('loses nothing when GC rewrites packs again and again while uploads reuse old pages and restores read', async () => {
    const dir = tempDir();
    const store = new CheckpointStore(await LevelBackend.open(dir, { packBytes: 16 * PAGE }), { gcGraceMs: 0 });
    try {
      const pages = 64;
      const versions = new Map<number, Buffer>();
      let img = genBytes('repack/0', pages * PAGE);
      versions.set(await enginePut(store, 'r', 0, pages, img, [...Array(pages).keys()]), img);
      for (let k = 1; k <= 12; k++) {
        // Half the pages change: some to fresh bytes, some back to bytes of a deleted checkpoint (garbage GC may be moving).
        const next = Buffer.from(img);
        const changed: number[] = [];
        for (let i = k % 2; i < pages; i += 2) {
          changed.push(i);
          const src = k > 2 && i % 4 === 1 ? versions.get(1) ?? genBytes(`repack/${k}/${i}`, pages * PAGE) : genBytes(`repack/${k}/${i}`, pages * PAGE);
          src.copy(next, i * PAGE, i * PAGE, (i + 1) * PAGE);
        }
        const latest = Math.max(...versions.keys());
        const [n, , restored] = await Promise.all([
          enginePut(store, 'r', latest, pages, next, changed),
          store.gc({ graceMs: 0 }),
          engineImage(store, 'r', latest),
        ]);
        expect(restored.equals(versions.get(latest)!), `checkpoint ${latest} read during GC`).toBe(true);
        versions.set(n, next);
        img = next;
        const del = [...versions.keys()].filter((c) => c < n - 1 && c !== 1);
        if (del.length > 0) {
          await store.deleteCheckpoints('r', { checkpoints: del });
          for (const c of del) versions.delete(c);
        }
      }
      await store.gc({ graceMs: 0 });
      // Packs were rewritten or dropped along the way (ids are never reused: gaps show it).
      const ids = readdirSync(join(dir, 'packs')).map((n) => parseInt(n, 16)).sort((a, b) => a - b);
      expect(ids.length).toBeLessThan(ids[ids.length - 1]!);
      for (const [c, want] of versions) expect((await engineImage(store, 'r', c)).equals(want), `checkpoint ${c}`).toBe(true);
      const v = await store.verify({ allPages: true });
      expect(v.problems).toEqual([]);
    } finally {
      await store.close();
    }
    // And after a restart.
    const again = new CheckpointStore(await LevelBackend.open(dir, { packBytes: 16 * PAGE }), { gcGraceMs: 0 });
    try {
      expect((await again.verify({ allPages: true })).ok).toBe(true);
    } finally {
      await again.close();
    }
  });

  it('never reuses the id of a removed pack, so an old ref cannot name new bytes', async () => {
    const dir = tempDir();
    const open = async (): Promise<CheckpointStore> => new CheckpointStore(await LevelBackend.open(dir, { packBytes: 16 * PAGE }), { gcGraceMs: 0 });
    const a = genBytes('ids/a', 16 * PAGE), b = genBytes('ids/b', 16 * PAGE);
    let store = await open();
    await enginePut(store, 'i', 0, 16, a, [...Array(16).keys()]);
    await enginePut(store, 'i', 1, 16, b, [...Array(16).keys()]);
    await store.close();
    expect(readdirSync(join(dir, 'packs')).sort()).toEqual(['00000001.pack', '00000002.pack']);
    // Reopened, pack 2 is no longer being written: with checkpoint 2 gone, GC removes it.
    store = await open();
    await store.deleteCheckpoints('i', { checkpoints: [2] });
    await store.gc({ graceMs: 0 });
    await store.close();
    expect(readdirSync(join(dir, 'packs'))).toEqual(['00000001.pack']);
    store = await open();
    try {
      await enginePut(store, 'i', 1, 16, b, [...Array(16).keys()]);
      expect(readdirSync(join(dir, 'packs')).sort()).toEqual(['00000001.pack', '00000003.pack']);
      expect((await engineImage(store, 'i', 3)).equals(b)).toBe(true);
    } finally {
      await store.close();
    }
  });

  it('never makes an index entry durable before a commit synced its bytes, and GC reclaims bytes no entry names', async () => {
    const dir = tempDir();
    const b = await LevelBackend.open(dir, { packBytes: 16 * PAGE });
    const data = genBytes('packs/orphans', 24 * PAGE);
    const pages = [...Array(24).keys()].map((i) => ({ hash: sha256(data.subarray(i * PAGE, (i + 1) * PAGE)), data: data.subarray(i * PAGE, (i + 1) * PAGE) }));
    const { written } = await b.putPages(pages);
    expect(written).toBe(24);
    // Visible to lookup (dedup) at once...
    expect((await b.lookup([pages[0]!.hash])).every((r) => r !== null)).toBe(true);
    expect(packBytes(dir)).toBe(24 * PAGE);
    // ...but no commit came: closed as a crash would leave it.
    await b.close();
    const store = new CheckpointStore(await LevelBackend.open(dir, { packBytes: 16 * PAGE }), { gcGraceMs: 0 });
    try {
      expect(await store.backend.lookup([pages[0]!.hash])).toEqual([null]);
      expect(store.backend.pageStats().pages).toBe(0);
      const gc = await store.gc({ graceMs: 0 });
      expect(gc.deletedPages).toBe(24);
      expect(packBytes(dir)).toBe(0);
      // The same pages stored again are found and read back.
      const img = Buffer.from(data);
      expect(await enginePut(store, 'j', 0, 24, img, [...Array(24).keys()])).toBe(1);
      expect((await engineImage(store, 'j', 1)).equals(img)).toBe(true);
    } finally {
      await store.close();
    }
  });

  it('makes the index entries of a long upload durable after their bytes without waiting for its commit', async () => {
    const dir = tempDir();
    const b = await LevelBackend.open(dir, { pendingFlush: 16 });
    const data = genBytes('packs/long', 40 * PAGE);
    const pages = [...Array(40).keys()].map((i) => ({ hash: sha256(data.subarray(i * PAGE, (i + 1) * PAGE)), data: data.subarray(i * PAGE, (i + 1) * PAGE) }));
    // After the second call 20 entries are pending (>= 16): made durable; the third call's 10 stay pending.
    await b.putPages(pages.slice(0, 10));
    await b.putPages(pages.slice(10, 20));
    await b.putPages(pages.slice(20, 30));
    await b.close(); // no commit: as a crash would leave it
    const again = await LevelBackend.open(dir);
    try {
      const found = await again.lookup(pages.map((p) => p.hash));
      expect(found.slice(0, 20).every((r) => r !== null)).toBe(true);
      expect(found.slice(20).every((r) => r === null)).toBe(true);
      const read = await again.readPages(found.slice(0, 20) as Buffer[]);
      read.forEach((p, i) => expect(p!.equals(pages[i]!.data)).toBe(true));
    } finally {
      await again.close();
    }
  });

  it('starts making index entries durable in the background past backgroundFlush, and GC reclaims them when no commit follows', async () => {
    const dir = tempDir();
    const b = await LevelBackend.open(dir, { backgroundFlush: 8 });
    const data = genBytes('packs/bg', 24 * PAGE);
    const pages = [...Array(24).keys()].map((i) => ({ hash: sha256(data.subarray(i * PAGE, (i + 1) * PAGE)), data: data.subarray(i * PAGE, (i + 1) * PAGE) }));
    // 12 pending (>= 8): a background flush starts and the call returns without waiting for it.
    await b.putPages(pages.slice(0, 12));
    // Pages stored while it runs are found (pending or durable) and stored once.
    await b.putPages(pages.slice(0, 16));
    expect((await b.lookup(pages.slice(0, 16).map((p) => p.hash))).every((r) => r !== null)).toBe(true);
    await b.close(); // waits for the flush; no commit, as a crash right after it would leave it
    const again = await LevelBackend.open(dir);
    const store = new CheckpointStore(again, { gcGraceMs: 0 });
    try {
      const found = await again.lookup(pages.map((p) => p.hash));
      expect(found.slice(0, 12).every((r) => r !== null)).toBe(true);
      expect(found.slice(16).every((r) => r === null)).toBe(true);
      const read = await again.readPages(found.slice(0, 12) as Buffer[]);
      read.forEach((p, i) => expect(p!.equals(pages[i]!.data)).toBe(true));
      // No checkpoint names them: nothing is visible, and GC reclaims every byte.
      expect(await store.listJobs()).toEqual([]);
      await store.gc({ graceMs: 0 });
      expect((await again.lookup(pages.map((p) => p.hash))).every((r) => r === null)).toBe(true);
      expect(packBytes(dir)).toBe(0);
    } finally {
      await store.close();
    }
  });

  it('keeps committed checkpoints and reclaims the bytes of an upload cut by SIGKILL after a restart', async () => {
    const dir = tempDir();
    let server = await startStore(dir);
    let c = await StoreClient.connect(server.address);
    const base = new Image(regionsOf([['m', 40]]), (_r, i) => randomPage(`sk/base/${i}`));
    await c.putCheckpoint({ job: 'k', parent: 0, regions: base.regions }, base.batches(base.allPages()));
    const junk = new Image(regionsOf([['m', 400]]), (_r, i) => randomPage(`sk/junk/${i}`));
    let stored = 0;
    let killed: Promise<void> | null = null;
    async function* slow() {
      for (const b of junk.batches(junk.allPages(), 50)) {
        yield b;
        // Once 100 pages are stored the server dies mid-upload.
        if (stored >= 100 && !killed) killed = server.kill('SIGKILL');
        if (killed) await new Promise((r) => setTimeout(r, 50));
      }
      await new Promise((r) => setTimeout(r, 5000));
    }
    await expect(c.putCheckpoint({ job: 'k', parent: 1, regions: junk.regions, window: 2,
      onProgress: (p) => { stored = p.newPages; } }, slow())).rejects.toThrow();
    expect(killed).not.toBeNull();
    await killed;
    c.close();
    const onDisk = packBytes(dir) / PAGE;
    expect(onDisk).toBeGreaterThanOrEqual(140);

    server = await startStore(dir);
    c = await StoreClient.connect(server.address);
    expect((await c.listCheckpoints('k')).map((x) => x.checkpoint)).toEqual([1]);
    expect(diffImage(base, (await c.fetchImage({ job: 'k', checkpoint: 1 })).regions)).toBeNull();
    expect((await c.stat()).storedPages).toBe(40);
    const gc = await c.gc({ graceSeconds: 0 });
    // The orphans outnumber the live pages of their pack: it is rewritten.
    expect(gc.deletedPages).toBe(onDisk - 40);
    expect(packBytes(dir)).toBe(40 * PAGE);
    expect(diffImage(base, (await c.fetchImage({ job: 'k', checkpoint: 1 })).regions)).toBeNull();
    expect((await c.verify({ allPages: true })).ok).toBe(true);
    c.close();
  });

  it('converts a format-2 data directory on open, keeping every checkpoint, and starts over after an interrupted conversion', async () => {
    const dir = tempDir();
    const pages = 40;
    const img1 = genBytes('v2/one', pages * PAGE);
    const img2 = Buffer.from(img1);
    for (const i of [3, 17, 18, 39]) genBytes(`v2/two/${i}`, PAGE).copy(img2, i * PAGE);
    Buffer.alloc(PAGE).copy(img2, 20 * PAGE); // a zero page
    await writeFormat2(dir, 'old', [img1, img2], pages);
    // What an interrupted conversion leaves: a pack the index does not know.
    mkdirSync(join(dir, 'packs'), { recursive: true });
    writeFileSync(join(dir, 'packs', '00000001.pack'), genBytes('v2/junk', 3 * PAGE));

    const store = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    try {
      expect(existsSync(join(dir, 'pages'))).toBe(false);
      expect((await engineImage(store, 'old', 1)).equals(img1)).toBe(true);
      expect((await engineImage(store, 'old', 2)).equals(img2)).toBe(true);
      expect(store.backend.pageStats().pages).toBe(pages + 4);
      const v = await store.verify({ allPages: true });
      expect(v.problems).toEqual([]);
      // Refs in the converted maps name the packs: no page needs a lookup.
      expect(await (store.backend as LevelBackend).readPages([Buffer.alloc(8)])).toEqual([null]);
      const img3 = Buffer.from(img2);
      genBytes('v2/three', PAGE).copy(img3, 5 * PAGE);
      expect(await enginePut(store, 'old', 2, pages, img3, [5])).toBe(3);
      expect((await store.gc({ graceMs: 0 })).deletedPages).toBe(0);
    } finally {
      await store.close();
    }
    const again = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    try {
      expect((await engineImage(again, 'old', 3)).equals((() => { const b = Buffer.from(img2); genBytes('v2/three', PAGE).copy(b, 5 * PAGE); return b; })())).toBe(true);
      expect((await engineImage(again, 'old', 1)).equals(img1)).toBe(true);
    } finally {
      await again.close();
    }
  });

  it('refuses a data directory of the older one-page-a-value format, naming it', async () => {
    const dir = tempDir();
    mkdirSync(dir, { recursive: true });
    const index = new Level<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await index.open();
    // A hash index entry and no format key: what the oldest exastore left.
    await index.put(Buffer.concat([Buffer.from('H'), Buffer.alloc(32, 1)]), Buffer.from('0000000000000001', 'hex'));
    await index.close();
    const err = await LevelBackend.open(dir).then(() => null, (e: unknown) => e as { code: string; message: string });
    expect(err).not.toBeNull();
    expect(err!.code).toBe('FAILED_PRECONDITION');
    expect(err!.message).toContain(`data directory ${dir} has store format 1`);
    // It left the database closed: opening it again works.
    const reopen = new Level<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await reopen.open();
    await reopen.close();
  });
});

/**
 * A format-2 data directory as the format-2 exastore wrote it (fixture
 * writer): `pages/` holds page groups ('D' seq(u64 BE) -> up to 16 pages, or
 * the remaining pages then a u16 LE slot mask; an empty value is a commit
 * marker), `index/` holds 'H' hash -> seq, 'M'/'P'/'J' per checkpoint and
 * 'V' = 2. Checkpoint 1 stores every page of images[0] (groups of 16: the
 * last group is written with a mask, as GC leaves it); each next one stores
 * the pages that changed, one group each.
 */
async function writeFormat2(dir: string, job: string, images: Buffer[], pageCount: number): Promise<void> {
  const open = async (sub: string): Promise<DB> => {
    const db = new Level<Buffer, Buffer>(join(dir, sub), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await db.open();
    return db;
  };
  const index = await open('index'), pagesDb = await open('pages');
  const seqKey = (s: bigint): Buffer => { const k = Buffer.alloc(9); k[0] = 0x44; k.writeBigUInt64BE(s, 1); return k; };
  const u32 = (n: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
  const ckptKey = (p: string, n: number): Buffer => Buffer.concat([Buffer.from(p), Buffer.from(job), Buffer.from([0]), u32(n)]);
  const refs = new Map<string, bigint>();
  let next = 16n;
  let prev: Buffer | null = null;
  for (let c = 0; c < images.length; c++) {
    const img = images[c]!;
    const changed = [...Array(pageCount).keys()].filter((i) => !prev || !img.subarray(i * PAGE, (i + 1) * PAGE).equals(prev.subarray(i * PAGE, (i + 1) * PAGE)));
    const fresh = changed.filter((i) => !img.subarray(i * PAGE, (i + 1) * PAGE).equals(Buffer.alloc(PAGE)) && !refs.has(sha256(img.subarray(i * PAGE, (i + 1) * PAGE)).toString('hex')));
    const groups: number[][] = [];
    if (c === 0) for (let i = 0; i < fresh.length; i += 16) groups.push(fresh.slice(i, i + 16));
    else for (const i of fresh) groups.push([i]);
    for (const g of groups) {
      const masked = c === 0 && g.length < 16;
      const value = Buffer.concat([...g.map((i) => img.subarray(i * PAGE, (i + 1) * PAGE)), ...(masked ? [Buffer.from([(1 << g.length) - 1 & 0xff, ((1 << g.length) - 1) >> 8])] : [])]);
      await pagesDb.put(seqKey(next), value);
      for (let s = 0; s < g.length; s++) {
        const i = g[s]!;
        const h = sha256(img.subarray(i * PAGE, (i + 1) * PAGE));
        refs.set(h.toString('hex'), next + BigInt(s));
        const ref = Buffer.alloc(8);
        ref.writeBigUInt64BE(next + BigInt(s));
        await index.put(Buffer.concat([Buffer.from('H'), h]), ref);
      }
      next += 16n;
    }
    await pagesDb.put(seqKey(next), Buffer.alloc(0)); // commit marker
    next += 16n;
    const map = Buffer.alloc(pageCount * 40);
    for (let i = 0; i < pageCount; i++) {
      const p = img.subarray(i * PAGE, (i + 1) * PAGE);
      if (p.equals(Buffer.alloc(PAGE))) continue;
      const h = sha256(p);
      h.copy(map, i * 40);
      map.writeBigUInt64BE(refs.get(h.toString('hex'))!, i * 40 + 32);
    }
    const header: ManifestHeader = {
      job, checkpoint: c + 1, parent: c, createdAt: Date.now(), regions: [{ name: 'mem', pageCount, address: '', flags: 0 }], labels: {},
      changedPages: changed.length, sentPages: changed.length, newPages: fresh.length, zeroPages: 0,
    };
    await index.batch([
      { type: 'put', key: ckptKey('P', c + 1), value: map },
      { type: 'put', key: ckptKey('M', c + 1), value: Buffer.from(JSON.stringify(header)) },
      { type: 'put', key: Buffer.concat([Buffer.from('J'), Buffer.from(job)]), value: u32(c + 1) },
    ]);
    prev = img;
  }
  await index.put(Buffer.from('V'), u32(2));
  await index.close();
  await pagesDb.close();
}
