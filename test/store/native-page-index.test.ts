/**
 * The native page tables of the upload path (native/addon/pageindex.cc,
 * storage/pagetable.ts) and the LevelDB backend's in-memory page index built
 * on them (storage/leveldb.ts): the table behaves as a map from 32-byte
 * hashes to 8-byte values under any mix of calls (checked against a JS Map),
 * refuses bad arguments with clear errors, and fails cleanly once closed; the
 * backend's index answers exactly what LevelDB holds after uploads, GC
 * deletions, pack rewrites and a restart, and the store stays correct when the
 * index outgrows its bound and lookups fall back to LevelDB.
 */
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { ExaError } from '../../src/errors.js';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { sha256 } from '../../storage/pages.js';
import { PageTable } from '../../storage/pagetable.js';
import { cleanupDirs, genBytes, PAGE, rng, tempDir } from './helpers.js';

afterEach(() => { cleanupDirs(); });

function hashOf(n: number): Buffer {
  return createHash('sha256').update(`h${n}`).digest();
}
function valueOf(n: number, gen = 0): Buffer {
  const v = Buffer.alloc(8);
  v.writeUInt32BE(n >>> 0, 0);
  v.writeUInt32BE(gen, 4);
  return v;
}
function join(bufs: Buffer[]): Buffer {
  return Buffer.concat(bufs);
}
function code(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ExaError);
    return `${(e as ExaError).code}: ${(e as Error).message}`;
  }
  return 'no error';
}

describe('native page table', () => {
  it('behaves as a map of hashes to values through growth, overwrites, repeats and deletions (checked against a JS Map)', () => {
    const t = new PageTable();
    const model = new Map<number, Buffer>();
    const rand = rng(7);
    try {
      for (let round = 0; round < 40; round++) {
        // A batch of set / add / delete over a key space that makes all three hit and miss.
        const keys = Array.from({ length: 2000 }, () => Math.floor(rand() * 60_000));
        const op = round % 4;
        if (op === 0 || op === 1) {
          const vals = keys.map((k) => valueOf(k, round));
          const added = new Uint8Array(keys.length);
          const n = op === 0 ? t.set(join(keys.map(hashOf)), join(vals)) : t.add(join(keys.map(hashOf)), join(vals), added);
          let fresh = 0;
          const seen = new Set<number>();
          keys.forEach((k, i) => {
            const isNew = !model.has(k) && !seen.has(k);
            seen.add(k);
            if (isNew) fresh++;
            if (op === 1) expect(added[i]).toBe(isNew ? 1 : 0);
            if (op === 0 || isNew) model.set(k, vals[i]!);
          });
          expect(n).toBe(fresh);
        } else if (op === 2) {
          const uniq = [...new Set(keys)];
          const removed = t.delete(join(uniq.map(hashOf)));
          expect(removed).toBe(uniq.filter((k) => model.delete(k)).length);
        } else {
          const vals = Buffer.alloc(keys.length * 8);
          const found = new Uint8Array(keys.length);
          const hits = t.get(join(keys.map(hashOf)), vals, found);
          expect(hits).toBe(keys.filter((k) => model.has(k)).length);
          keys.forEach((k, i) => {
            expect(found[i]).toBe(model.has(k) ? 1 : 0);
            if (model.has(k)) expect(vals.subarray(i * 8, i * 8 + 8)).toEqual(model.get(k));
          });
        }
        expect(t.size).toBe(model.size);
      }
      // Every entry listed once, with its value.
      const all = t.entries();
      expect(all.length).toBe(model.size * 40);
      const listed = new Map<string, string>();
      for (let o = 0; o < all.length; o += 40) listed.set(all.toString('hex', o, o + 32), all.toString('hex', o + 32, o + 40));
      for (const [k, v] of model) expect(listed.get(hashOf(k).toString('hex'))).toBe(v.toString('hex'));
      t.clear();
      expect(t.size).toBe(0);
      expect(t.has(hashOf(1))).toBe(false);
    } finally {
      t.close();
    }
  });

  it('keeps each table separate while many async tasks interleave calls on them', async () => {
    const tables = [new PageTable(), new PageTable()];
    try {
      await Promise.all(Array.from({ length: 16 }, async (_, task) => {
        const t = tables[task % 2]!;
        for (let i = 0; i < 200; i++) {
          const k = task * 1000 + i;
          t.set(hashOf(k), valueOf(k));
          await new Promise<void>((r) => setImmediate(r));
          expect(t.value(hashOf(k))).toEqual(valueOf(k));
          if (i % 3 === 0) expect(t.delete(hashOf(k))).toBe(1);
        }
      }));
      const per = 200 - Math.ceil(200 / 3);
      expect(tables[0]!.size).toBe(8 * per);
      expect(tables[1]!.size).toBe(8 * per);
      // Keys of even tasks are only in table 0.
      expect(tables[1]!.has(hashOf(1))).toBe(false);
      expect(tables[0]!.has(hashOf(1))).toBe(true);
    } finally {
      for (const t of tables) t.close();
    }
  });

  it('refuses bad arguments with INVALID_ARGUMENT naming what was wrong, and a closed table with UNAVAILABLE', () => {
    const t = new PageTable();
    const h = hashOf(1);
    expect(code(() => t.get(Buffer.alloc(31), null, null))).toMatch(/^INVALID_ARGUMENT: .*hashes must be a Buffer of n x 32 bytes/);
    expect(code(() => t.set('abc' as unknown as Buffer, null))).toMatch(/^INVALID_ARGUMENT: .*hashes must be a Buffer/);
    expect(code(() => t.set(h, Buffer.alloc(7)))).toMatch(/^INVALID_ARGUMENT: .*values must be a Buffer of 8 bytes/);
    expect(code(() => t.set(join([h, hashOf(2)]), Buffer.alloc(24)))).toMatch(/^INVALID_ARGUMENT: .*values must be a Buffer of 16 bytes \(or 8\)/);
    expect(code(() => t.get(join([h, hashOf(2)]), Buffer.alloc(8), null))).toMatch(/^INVALID_ARGUMENT: .*values must be a Buffer of 16 bytes/);
    expect(code(() => t.get(h, null, new Uint8Array(2)))).toMatch(/^INVALID_ARGUMENT: .*found must be a Buffer of 1 bytes/);
    expect(code(() => t.set(join([h, Buffer.alloc(32)]), null))).toMatch(/^INVALID_ARGUMENT: .*hash 1 is all zero/);
    // A refused call changed nothing.
    expect(t.size).toBe(0);
    // The zero hash is never found.
    expect(t.get(Buffer.alloc(32), null, null)).toBe(0);
    t.set(h, valueOf(1));
    t.close();
    expect(code(() => t.get(h, null, null))).toMatch(/^UNAVAILABLE: .*the page table is closed/);
    expect(code(() => t.set(h, null))).toMatch(/^UNAVAILABLE: .*closed/);
    t.close(); // idempotent
  });
});

/** Every 'H' entry of the backend's LevelDB, hash hex -> ref hex. */
async function leveldbIndex(b: LevelBackend): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for await (const batch of b.scanPages(1000)) for (const p of batch) out.set(p.hash.toString('hex'), p.ref.toString('hex'));
  return out;
}

/** Lookups of the given hashes through the backend, as hex (or null). */
async function lookups(b: LevelBackend, hashes: Buffer[]): Promise<(string | null)[]> {
  return (await b.lookup(hashes)).map((r) => (r ? r.toString('hex') : null));
}

async function upload(store: CheckpointStore, job: string, img: Buffer, pages: number): Promise<number> {
  const s = await store.beginPut({ job, parent: 0, regions: [{ name: 'mem', pageCount: pages, address: '', flags: 0 }] });
  const which = [...Array(pages).keys()];
  const hashes = Buffer.concat(which.map((i) => sha256(img.subarray(i * PAGE, (i + 1) * PAGE))));
  const want = await s.offerHashes({ batch: 0, region: which.map(() => 0), index: which, hashes });
  if (want.length > 0) await s.supplyData(0, Buffer.concat(want.map((k) => img.subarray(k * PAGE, (k + 1) * PAGE))));
  return (await s.commit()).checkpoint;
}

describe('in-memory page index of the LevelDB backend', () => {
  it('answers exactly what LevelDB holds after uploads, GC deletions, pack rewrites and a restart', async () => {
    const dir = tempDir();
    const pages = 48;
    const imgs = [0, 1, 2].map((k) => genBytes(`idx/${k}`, pages * PAGE));
    const all = imgs.flatMap((img) => [...Array(pages).keys()].map((i) => sha256(img.subarray(i * PAGE, (i + 1) * PAGE))));
    let b = await LevelBackend.open(dir, { packBytes: 16 * PAGE });
    let store = new CheckpointStore(b, { gcGraceMs: 0 });
    try {
      expect(b.memoryIndex).toBe(true);
      for (let k = 0; k < 3; k++) await upload(store, `job${k}`, imgs[k]!, pages);
      // Job 1 goes away: GC deletes its pages and rewrites the packs they shared.
      await store.deleteCheckpoints('job1', { checkpoints: [1] });
      const gc = await store.gc({ graceMs: 0 });
      expect(gc.deletedPages).toBeGreaterThanOrEqual(pages);
      const durable = await leveldbIndex(b);
      expect(durable.size).toBe(2 * pages);
      const got = await lookups(b, all);
      all.forEach((h, i) => expect(got[i]).toBe(durable.get(h.toString('hex')) ?? null));
      // The refs the index gives read back the right bytes.
      const refs = await b.lookup(all.slice(0, pages));
      const data = await b.readPages(refs.map((r) => r!));
      data.forEach((d, i) => expect(d!.equals(imgs[0]!.subarray(i * PAGE, (i + 1) * PAGE))).toBe(true));
      await store.close();
      // Rebuilt from LevelDB at the next open: the same answers.
      b = await LevelBackend.open(dir, { packBytes: 16 * PAGE });
      store = new CheckpointStore(b, { gcGraceMs: 0 });
      expect(await lookups(b, all)).toEqual(got);
      // And with no in-memory index (LevelDB getMany) too.
      await store.close();
      b = await LevelBackend.open(dir, { packBytes: 16 * PAGE, memoryIndexMaxPages: 0 });
      store = new CheckpointStore(b, { gcGraceMs: 0 });
      expect(b.memoryIndex).toBe(false);
      expect(await lookups(b, all)).toEqual(got);
    } finally {
      await store.close();
    }
  });

  it('drops the index past memoryIndexMaxPages and keeps deduplicating and restoring through LevelDB', async () => {
    const dir = tempDir();
    const pages = 64;
    const img = genBytes('idx/bound', pages * PAGE);
    const b = await LevelBackend.open(dir, { memoryIndexMaxPages: 40 });
    const store = new CheckpointStore(b);
    try {
      expect(b.memoryIndex).toBe(true);
      await upload(store, 'a', img, pages);
      expect(b.memoryIndex).toBe(false);
      // The same pages under another job: all found (nothing new stored), restorable.
      await upload(store, 'b', img, pages);
      const [ha, hb] = [await store.resolve('a', 0), await store.resolve('b', 0)];
      expect(ha.newPages).toBe(pages);
      expect(hb.newPages).toBe(0);
      const parts: Buffer[] = [];
      for await (const item of store.readImage('b', 0)) if (!('checkpoint' in item)) parts.push(item.data);
      expect(Buffer.concat(parts).equals(img)).toBe(true);
    } finally {
      await store.close();
    }
    // Reopened over the bound: no index from the start, same answers.
    const b2 = await LevelBackend.open(dir, { memoryIndexMaxPages: 40 });
    try {
      expect(b2.memoryIndex).toBe(false);
      const hashes = [...Array(pages).keys()].map((i) => sha256(img.subarray(i * PAGE, (i + 1) * PAGE)));
      expect((await b2.lookup(hashes)).every((r) => r !== null)).toBe(true);
    } finally {
      await b2.close();
    }
  });

  it('fails uploads in flight cleanly when the store closes under them, and a finished upload refuses further calls', async () => {
    const dir = tempDir();
    const pages = 32;
    const img = genBytes('idx/close', pages * PAGE);
    const store = new CheckpointStore(await LevelBackend.open(dir));
    const which = [...Array(pages).keys()];
    const hashes = Buffer.concat(which.map((i) => sha256(img.subarray(i * PAGE, (i + 1) * PAGE))));
    const s = await store.beginPut({ job: 'c', parent: 0, regions: [{ name: 'mem', pageCount: pages, address: '', flags: 0 }] });
    const want = await s.offerHashes({ batch: 0, region: which.map(() => 0), index: which, hashes });
    expect(want.length).toBe(pages);
    // Close while the data is being checked and stored.
    const supply = s.supplyData(0, img);
    const closing = store.close();
    await expect(supply).rejects.toMatchObject({ code: expect.stringMatching(/FAILED_PRECONDITION|UNAVAILABLE/) });
    await closing;
    await expect(s.offerHashes({ batch: 1, region: [0], index: [0], hashes: hashes.subarray(0, 32) })).rejects.toMatchObject({ code: 'FAILED_PRECONDITION' });
    await expect(s.commit()).rejects.toMatchObject({ code: 'FAILED_PRECONDITION' });
    // Nothing of it is visible after a reopen, and the same upload then works.
    const store2 = new CheckpointStore(await LevelBackend.open(dir));
    try {
      await expect(store2.resolve('c', 0)).rejects.toMatchObject({ code: 'NOT_FOUND' });
      expect(await upload(store2, 'c', img, pages)).toBe(1);
    } finally {
      await store2.close();
    }
  });
});
