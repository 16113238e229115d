/**
 * Page maps as deltas (storage/mapdelta.ts, storage/leveldb.ts format 4): an
 * increment's map is stored as the entries that differ from its base's full
 * map while few differ, else whole. Every checkpoint still reads back
 * bit-exact; a deleted checkpoint's full map stays exactly as long as deltas
 * need it; compaction, GC and deletes racing uploads lose nothing; a format-3
 * directory (whole maps only) opens and takes deltas from then on; a damaged
 * delta, base record or base (or a missing base) is a named CORRUPT error,
 * not a silently wrong image, and such a checkpoint can still be deleted.
 */
import { Level } from 'level';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { DELTA_RECORD_BYTES, applyMapDelta, mapDelta } from '../../storage/mapdelta.js';
import { ENTRY_BYTES } from '../../storage/pages.js';
import { PAGE, cleanupDirs, engineImage, enginePut, genBytes, rng, tempDir } from './helpers.js';

afterEach(() => cleanupDirs());

const PAGES = 2000;

/** Rewrite `count` random pages of img (a copy); returns the copy and the sorted page numbers. */
function mutate(img: Buffer, tag: string, count: number, rand: () => number): { img: Buffer; dirty: number[] } {
  const next = Buffer.from(img);
  const dirty = new Set<number>();
  while (dirty.size < count) dirty.add(Math.floor(rand() * PAGES));
  for (const i of dirty) genBytes(`${tag}/${i}`, PAGE).copy(next, i * PAGE);
  return { img: next, dirty: [...dirty].sort((a, b) => a - b) };
}

const ALL = [...Array(PAGES).keys()];

/**
 * Checkpoint 1 of `job` (a whole generated image), then `increments` more,
 * increment k rewriting `dirty(k)` random pages: each checkpoint's image by number.
 */
async function putChain(store: CheckpointStore, job: string, increments: number, dirty: (k: number) => number, rand: () => number): Promise<Map<number, Buffer>> {
  const versions = new Map<number, Buffer>();
  let img = genBytes(`${job}/0`, PAGES * PAGE);
  versions.set(await enginePut(store, job, 0, PAGES, img, ALL), img);
  for (let k = 1; k <= increments; k++) {
    const m = mutate(img, `${job}/${k}`, dirty(k), rand);
    img = m.img;
    versions.set(await enginePut(store, job, k, PAGES, img, m.dirty), img);
  }
  return versions;
}

/** A per-checkpoint key of the LevelDB backend: prefix letter, job, 0x00, then u32 BE numbers. */
function key(prefix: string, job: string, ...ns: number[]): Buffer {
  return Buffer.concat([Buffer.from(prefix + job), Buffer.from([0]), ...ns.map((n) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; })]);
}

/** Every full map is a live checkpoint's or a delta's base, and every delta's base has one. */
async function expectLayoutTight(b: LevelBackend, job: string): Promise<void> {
  const live = new Set((await b.listHeaders(job)).map((h) => h.checkpoint));
  const { full, deltas } = await b.mapLayout(job);
  const bases = new Set(deltas.map((d) => d.base));
  for (const n of full) expect(live.has(n) || bases.has(n), `full map of ${n}: neither a checkpoint nor a base`).toBe(true);
  for (const d of deltas) {
    expect(full, `base ${d.base} of ${d.checkpoint}`).toContain(d.base);
    expect(live.has(d.checkpoint), `delta of deleted ${d.checkpoint}`).toBe(true);
  }
  for (const n of live) expect(full.includes(n) !== deltas.some((d) => d.checkpoint === n), `checkpoint ${n}: one form`).toBe(true);
}

describe('page map deltas', () => {
  it('encode only the entries that differ and decode byte for byte, aligned or not; too many differences give null; bad deltas are refused', () => {
    const rand = rng(3);
    const base = genBytes('map', 1000 * ENTRY_BYTES);
    const map = Buffer.from(base);
    const changed = new Set<number>();
    while (changed.size < 37) changed.add(Math.floor(rand() * 1000));
    for (const i of changed) map[i * ENTRY_BYTES + Math.floor(rand() * ENTRY_BYTES)]! ^= 1 + Math.floor(rand() * 255);
    const d = mapDelta(base, map, 100)!;
    expect(d.length).toBe(37 * DELTA_RECORD_BYTES);
    expect(applyMapDelta(base, d).equals(map)).toBe(true);
    // unaligned views take the byte path and agree
    const ub = Buffer.alloc(base.length + 1), um = Buffer.alloc(map.length + 3);
    base.copy(ub, 1);
    map.copy(um, 3);
    expect(mapDelta(ub.subarray(1), um.subarray(3), 100)!.equals(d)).toBe(true);
    expect(mapDelta(base, map, 36)).toBeNull();
    expect(mapDelta(base, base, 0)!.length).toBe(0);
    expect(() => applyMapDelta(base, d.subarray(1))).toThrow(/not whole 44-byte records/);
    const far = Buffer.from(d.subarray(0, DELTA_RECORD_BYTES));
    far.writeUInt32BE(1000, 0);
    expect(() => applyMapDelta(base, far)).toThrow(/names entry 1000 \(the map has 1000\)/);
    const twice = Buffer.concat([d.subarray(0, DELTA_RECORD_BYTES), d.subarray(0, DELTA_RECORD_BYTES)]);
    expect(() => applyMapDelta(base, twice)).toThrow(/after entry/);
  });

  it('store increments as deltas against a full map, start a new full map when too much differs, and read every checkpoint bit-exact', async () => {
    const dir = tempDir();
    const backend = await LevelBackend.open(dir);
    const store = new CheckpointStore(backend, { gcGraceMs: 0 });
    try {
      // 1% a checkpoint, and one big rewrite (30%) that must be stored whole
      const versions = await putChain(store, 'j', 39, (k) => (k === 20 ? 600 : 20), rng(11));
      const { full, deltas } = await backend.mapLayout('j');
      expect(full).toContain(1);
      expect(full).toContain(21); // the 30% rewrite
      expect(full.length).toBeGreaterThanOrEqual(3); // 1% increments drift past 1/8 of the entries within ~13
      expect(full.length).toBeLessThanOrEqual(6);
      expect(deltas.length).toBe(40 - full.length);
      for (const d of deltas) expect(d.base).toBeLessThan(d.checkpoint);
      // the maps cost a fraction of 40 whole ones
      const mapBytes = (await backend.manifestBytes());
      expect(mapBytes).toBeLessThan(0.35 * 40 * PAGES * ENTRY_BYTES);
      for (const [n, v] of versions) expect((await engineImage(store, 'j', n)).equals(v), `checkpoint ${n}`).toBe(true);
      await expectLayoutTight(backend, 'j');
    } finally {
      await store.close();
    }
    // and after a restart (nothing cached)
    const again = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    try {
      expect((await again.verify({ job: 'j', allPages: true })).problems).toEqual([]);
    } finally {
      await again.close();
    }
  });

  it('keep a deleted checkpoint\'s full map while deltas need it and drop it with the last of them; GC and compact lose nothing', async () => {
    const dir = tempDir();
    const backend = await LevelBackend.open(dir);
    const store = new CheckpointStore(backend, { gcGraceMs: 0 });
    try {
      const rand = rng(12);
      const versions = await putChain(store, 'k', 7, () => 10, rand);
      const img = versions.get(8)!;
      expect((await backend.mapLayout('k')).full).toEqual([1]);
      // Checkpoint 1 goes: its map stays as the base of 2..8.
      await store.deleteCheckpoints('k', { checkpoints: [1, 2, 3] });
      versions.delete(1); versions.delete(2); versions.delete(3);
      expect((await backend.mapLayout('k')).full).toEqual([1]);
      expect(await backend.getHeader('k', 1)).toBeNull();
      expect(await backend.getMaps('k', 1)).toBeNull();
      await expectLayoutTight(backend, 'k');
      await store.gc({ graceMs: 0 });
      await store.gc({ graceMs: 0 });
      for (const [n, v] of versions) expect((await engineImage(store, 'k', n)).equals(v), `checkpoint ${n} after delete + GC`).toBe(true);
      // An increment whose parent is a delta is stored against the same base.
      const m = mutate(img, 'k/8', 10, rand);
      const n9 = await enginePut(store, 'k', 8, PAGES, m.img, m.dirty);
      versions.set(n9, m.img);
      expect((await backend.mapLayout('k')).deltas.find((d) => d.checkpoint === n9)!.base).toBe(1);
      // Compaction rewrites the maps; the kept base has old refs, so its dependents become whole and it goes.
      await store.compact('k');
      await expectLayoutTight(backend, 'k');
      expect((await backend.mapLayout('k')).full).not.toContain(1);
      await store.gc({ graceMs: 0 });
      await store.gc({ graceMs: 0 });
      for (const [n, v] of versions) expect((await engineImage(store, 'k', n)).equals(v), `checkpoint ${n} after compact + GC`).toBe(true);
      expect((await store.verify({ allPages: true })).problems).toEqual([]);
      // The last delete frees every map.
      await store.deleteCheckpoints('k', { checkpoints: [...versions.keys()] });
      expect(await backend.mapLayout('k')).toEqual({ full: [], deltas: [] });
    } finally {
      await store.close();
    }
  });

  it('deletes racing uploads (keep-last-2 after every commit) leave every kept checkpoint bit-exact and no map unaccounted for', async () => {
    const backend = await LevelBackend.open(tempDir());
    const store = new CheckpointStore(backend, { gcGraceMs: 0 });
    try {
      const rand = rng(13);
      const versions = new Map<number, Buffer>();
      let img = genBytes('r/0', PAGES * PAGE);
      let parent = await enginePut(store, 'r', 0, PAGES, img, ALL);
      versions.set(parent, img);
      const deletes: Promise<unknown>[] = [];
      for (let k = 1; k < 30; k++) {
        const m = mutate(img, `r/${k}`, 15, rand);
        img = m.img;
        // the previous delete may still run while this upload commits against its parent
        parent = await enginePut(store, 'r', parent, PAGES, img, m.dirty);
        versions.set(parent, img);
        deletes.push(store.deleteCheckpoints('r', { keepLast: 2 }));
        if (k % 5 === 0) deletes.push(store.gc({ graceMs: 0 }));
      }
      await Promise.all(deletes);
      const kept = (await backend.listHeaders('r')).map((h) => h.checkpoint);
      expect(kept).toEqual([29, 30]);
      for (const n of kept) expect((await engineImage(store, 'r', n)).equals(versions.get(n)!), `checkpoint ${n}`).toBe(true);
      await expectLayoutTight(backend, 'r');
      expect((await backend.mapLayout('r')).full.length).toBeLessThanOrEqual(2);
    } finally {
      await store.close();
    }
  });

  it('opens a format-3 directory (whole maps only), marks it format 4 and stores the next increment as a delta', async () => {
    const dir = tempDir();
    let store = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    const img = genBytes('f/0', PAGES * PAGE);
    await enginePut(store, 'f', 0, PAGES, img, ALL);
    await store.close();
    const db = new Level<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await db.put(Buffer.from('V'), Buffer.from([0, 0, 0, 3]));
    await db.close();
    const backend = await LevelBackend.open(dir);
    store = new CheckpointStore(backend, { gcGraceMs: 0 });
    try {
      expect((await engineImage(store, 'f', 1)).equals(img)).toBe(true);
      const m = mutate(img, 'f/1', 10, rng(1));
      const n = await enginePut(store, 'f', 1, PAGES, m.img, m.dirty);
      expect((await backend.mapLayout('f')).deltas).toEqual([{ checkpoint: n, base: 1 }]);
      expect((await engineImage(store, 'f', n)).equals(m.img)).toBe(true);
    } finally {
      await store.close();
    }
    const db2 = new Level<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    expect((await db2.get(Buffer.from('V')))!.readUInt32BE(0)).toBe(4);
    await db2.close();
  });

  it('a damaged delta, base record or base is a CORRUPT error naming job and checkpoint (never a silently wrong map); such a checkpoint can still be deleted', async () => {
    const dir = tempDir();
    let backend = await LevelBackend.open(dir);
    let store = new CheckpointStore(backend, { gcGraceMs: 0 });
    const versions = await putChain(store, 'c', 4, () => 10, rng(2));
    await enginePut(store, 'other', 0, PAGES, versions.get(1)!, ALL);
    // the same length as job c's maps, another full map to point a base record at
    await enginePut(store, 'c2', 0, PAGES, genBytes('c2', PAGES * PAGE), ALL);
    expect((await backend.mapLayout('c')).deltas.map((d) => d.base)).toEqual([1, 1, 1, 1]);
    await store.close();

    const db = new Level<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    // #2: two records' entries swapped (indexes stay in range and ascending: only the checksum can tell)
    const d2 = Buffer.from((await db.get(key('Q', 'c', 1, 2)))!);
    const e0 = Buffer.from(d2.subarray(4, DELTA_RECORD_BYTES));
    d2.copy(d2, 4, DELTA_RECORD_BYTES + 4, 2 * DELTA_RECORD_BYTES);
    e0.copy(d2, DELTA_RECORD_BYTES + 4);
    await db.put(key('Q', 'c', 1, 2), d2);
    // #3: its base record names another full map of the same length (job c2's, copied in as "checkpoint 9"), its delta moved along
    const r3 = Buffer.from((await db.get(key('R', 'c', 3)))!);
    r3.writeUInt32BE(9, 0);
    await db.put(key('R', 'c', 3), r3);
    await db.put(key('P', 'c', 9), (await db.get(key('P', 'c2', 1)))!);
    await db.put(key('Q', 'c', 9, 3), (await db.get(key('Q', 'c', 1, 3)))!);
    await db.del(key('Q', 'c', 1, 3));
    // #4: a truncated base record
    await db.put(key('R', 'c', 4), Buffer.from([0, 0, 0, 1]));
    await db.close();

    backend = await LevelBackend.open(dir);
    store = new CheckpointStore(backend, { gcGraceMs: 0 });
    try {
      const errOf = (n: number): Promise<{ code: string; message: string } | null> => engineImage(store, 'c', n).then(() => null, (e: unknown) => e as { code: string; message: string });
      const e2 = await errOf(2);
      expect(e2?.code).toBe('CORRUPT');
      expect(e2?.message).toMatch(/checkpoint 2 of job c: page map unreadable: the map rebuilt from checkpoint 1's full map and its delta does not match its checksum/);
      const e3 = await errOf(3);
      expect(e3?.code).toBe('CORRUPT');
      expect(e3?.message).toMatch(/checkpoint 3 of job c: page map unreadable: the map rebuilt from checkpoint 9's full map and its delta does not match its checksum/);
      const e4 = await errOf(4);
      expect(e4?.code).toBe('CORRUPT');
      expect(e4?.message).toMatch(/checkpoint 4 of job c: page map unreadable: its base record is 4 bytes, expected 36/);
      expect((await engineImage(store, 'c', 5)).equals(versions.get(5)!)).toBe(true);
      expect((await engineImage(store, 'other', 1)).equals(versions.get(1)!)).toBe(true);
      // verify names them too, and the broken ones can be deleted (their keys go with them)
      const v = await store.verify({ job: 'c' });
      expect(v.problems.map((p) => p.checkpoint).sort()).toEqual([2, 3, 4]);
      await store.deleteCheckpoints('c', { checkpoints: [2, 3, 4] });
      expect(await backend.mapLayout('c')).toEqual({ full: [1], deltas: [{ checkpoint: 5, base: 1 }] });
      expect((await store.verify({ job: 'c' })).problems).toEqual([]);
      expect((await engineImage(store, 'c', 5)).equals(versions.get(5)!)).toBe(true);
    } finally {
      await store.close();
    }
  });

  it('a delta whose base map is missing is a CORRUPT error naming job, checkpoint and base; the other checkpoints still read', async () => {
    const dir = tempDir();
    let store = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    const img = (await putChain(store, 'c', 1, () => 10, rng(2))).get(1)!;
    await enginePut(store, 'other', 0, PAGES, img, ALL);
    await store.close();
    const db = new Level<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await db.del(key('P', 'c', 1));
    await db.close();
    store = new CheckpointStore(await LevelBackend.open(dir), { gcGraceMs: 0 });
    try {
      const err = await engineImage(store, 'c', 2).then(() => null, (e: unknown) => e as { code: string; message: string });
      expect(err?.code).toBe('CORRUPT');
      expect(err?.message).toMatch(/checkpoint 2 of job c: page map unreadable: it is a delta against checkpoint 1's full map, which is missing/);
      expect((await engineImage(store, 'other', 1)).equals(img)).toBe(true);
    } finally {
      await store.close();
    }
  });
});
