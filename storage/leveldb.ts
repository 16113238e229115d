/**
 * The embedded backend: two LevelDB databases (through `level`) under the
 * data directory: `pages/` holds only page bytes, `index/` holds the hash
 * index, manifests and GC marks.
 *
 * Key layout (keys and values are raw bytes):
 *   pages/  'D' gseq(u64 BE)      -> a page group (below)     the page log
 *   index/:
 *   'H' hash(32)                  -> seq(u64 BE)             hash index
 *   'M' job 0x00 ckpt(u32 BE)     -> header JSON             committed checkpoints
 *   'P' job 0x00 ckpt(u32 BE)     -> page maps (40 B/page)   their full page maps
 *   'J' job                       -> last number (u32 BE)    numbers are never reused
 *   'G' hash(32)                  -> marked-at ms (u64 BE)   GC phase-1 marks
 *   'V'                           -> format (u32 BE) = 2     page groups
 *
 * Why a page log keyed by sequence number rather than pages keyed by hash:
 * hashes are random, so hash-keyed 4 KiB values make LevelDB rewrite every
 * page at each level during compaction (write amplification of 10x and more).
 * New pages get increasing sequence numbers instead, in a database of their
 * own (one memtable shared with the random index keys would make every level-0
 * file span the whole key space and drag page bytes through every
 * compaction), so their SST files never overlap and LevelDB moves them down
 * without rewriting; only the small hash index (40 B a page) is random. The
 * ref of a page is its sequence number, so a restore reads pages by key
 * without an index lookup.
 *
 * Page groups (format 2): a run of up to 16 new pages that follow each other
 * in the image (NewPage.follows) is one LevelDB value. Sequence numbers are
 * handed out in aligned blocks of 16: the group of seq S is the value at key
 * gseq = S & ~15, slot S & 15. A group value is either its pages in slot
 * order (length k x 4096: slots 0..k-1 present), or, once GC removed some of
 * its pages, the remaining pages in slot order followed by a u16 LE mask of
 * the slots present (length k x 4096 + 2). An empty value is a commit marker.
 * Why: LevelDB's per-value costs (WAL record, memtable node, block, index
 * entry, a JS Buffer per get) dominated with one 4 KiB page a value; a
 * restore of a full image now reads 64 KiB values. Pages of an increment
 * scattered over the image stay one a value, so a restore of such pages
 * never reads bytes it does not need.
 *
 * Order of writes: page bytes first, then their index entries. A crash in
 * between leaves page bytes no index entry names; GC removes them
 * (sweepOrphans). Page writes are not synced one by one: before a manifest
 * is written (synced), the pages database gets a synced write, so every page
 * a manifest names is on disk first.
 *
 * Commit: 'M', 'P' and 'J' of a checkpoint go in one write batch of the
 * index database with sync: true; LevelDB applies a batch atomically.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Level } from 'level';
import { ExaError, toExaError } from '../src/errors.js';
import type { Backend, ManifestHeader, NewPage, PageMaps, PageRef, StoredPage } from './backend.js';
import { Mutex } from './mutex.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE } from './pages.js';

type DB = Level<Buffer, Buffer>;

const D = 0x44, H = 0x48, M = 0x4d, P = 0x50, J = 0x4a, G = 0x47, V = 0x56;
const FORMAT = 2;
/** Pages a group value holds at most (sequence numbers are handed out in blocks of this many). */
const GROUP = 16;
/** Group values per write batch (at most 1 MiB of pages each when full). */
const PUT_CHUNK_BYTES = 1 << 20;

/** The key of the group holding the page at ref. */
function groupKey(ref: PageRef): Buffer {
  const k = Buffer.allocUnsafe(9);
  k[0] = D;
  ref.copy(k, 1, 0, 8);
  k[8] = k[8]! & ~(GROUP - 1);
  return k;
}
function seqKey(seq: bigint): Buffer {
  const k = Buffer.allocUnsafe(9);
  k[0] = D;
  k.writeBigUInt64BE(seq, 1);
  return k;
}
function popcount16(x: number): number {
  x -= (x >> 1) & 0x5555;
  x = (x & 0x3333) + ((x >> 2) & 0x3333);
  x = (x + (x >> 4)) & 0x0f0f;
  return (x + (x >> 8)) & 0x1f;
}
/** The slots present in a group value (bit i = slot i), 0 for a marker or a value of no known shape. */
function groupMask(v: Buffer): number {
  const len = v.length;
  if (len === 0) return 0;
  if (len % PAGE_SIZE === 0) return len / PAGE_SIZE > GROUP ? 0 : (1 << (len / PAGE_SIZE)) - 1;
  if (len % PAGE_SIZE === 2) {
    const m = v.readUInt16LE(len - 2);
    return popcount16(m) === (len - 2) / PAGE_SIZE ? m : 0;
  }
  return 0;
}
/** The page in `slot` of a group value, or null when the slot is empty. */
function groupPage(v: Buffer, slot: number): Buffer | null {
  const len = v.length;
  if (len % PAGE_SIZE === 0) return (slot + 1) * PAGE_SIZE <= len ? v.subarray(slot * PAGE_SIZE, (slot + 1) * PAGE_SIZE) : null;
  const m = groupMask(v);
  if (!(m & (1 << slot))) return null;
  const off = popcount16(m & ((1 << slot) - 1)) * PAGE_SIZE;
  return v.subarray(off, off + PAGE_SIZE);
}
/** A group value holding the given slots of `v` only (null when none is left). */
function groupKeep(v: Buffer, keep: number): Buffer | null {
  const m = groupMask(v) & keep;
  if (m === 0) return null;
  const n = popcount16(m);
  const out = Buffer.allocUnsafe(n * PAGE_SIZE + 2);
  let k = 0;
  for (let slot = 0; slot < GROUP; slot++) if (m & (1 << slot)) groupPage(v, slot)!.copy(out, (k++) * PAGE_SIZE);
  out.writeUInt16LE(m, n * PAGE_SIZE);
  return out;
}
function hashKeyOf(prefix: number, hash: Buffer): Buffer {
  const k = Buffer.allocUnsafe(1 + HASH_BYTES);
  k[0] = prefix;
  hash.copy(k, 1, 0, HASH_BYTES);
  return k;
}
function ckptKey(prefix: number, job: string, n: number): Buffer {
  const j = Buffer.from(job, 'utf8');
  const k = Buffer.allocUnsafe(1 + j.length + 1 + 4);
  k[0] = prefix;
  j.copy(k, 1);
  k[1 + j.length] = 0;
  k.writeUInt32BE(n, 2 + j.length);
  return k;
}
function jobKey(job: string): Buffer {
  return Buffer.concat([Buffer.from([J]), Buffer.from(job, 'utf8')]);
}
function prefixRange(prefix: Buffer): { gte: Buffer; lt: Buffer } {
  const lt = Buffer.from(prefix);
  lt[lt.length - 1]! += 1;
  return { gte: prefix, lt };
}

export interface LevelBackendOptions {
  /** LevelDB block cache (bytes). */
  cacheSize?: number;
  /** Memtable size (bytes): larger = fewer, bigger level-0 files while ingesting. */
  writeBufferSize?: number;
}

export class LevelBackend implements Backend {
  readonly kind = 'leveldb';
  /** Next free block of GROUP sequence numbers (aligned; 0..15 are never used). */
  private nextSeq = BigInt(GROUP);
  private pages = 0;
  private readonly writeLock = new Mutex();
  private readonly manifestLock = new Mutex();

  private constructor(private readonly db: DB, private readonly pagesDb: DB, readonly dir: string) {}

  /** Open (creating the directory and database when missing). UNAVAILABLE when another process holds it. */
  static async open(dir: string, opts: LevelBackendOptions = {}): Promise<LevelBackend> {
    try {
      mkdirSync(dir, { recursive: true });
    } catch (e) {
      throw toExaError(e, `data directory ${dir}`);
    }
    const open = async (sub: string, o: Record<string, unknown>): Promise<DB> => {
      const db = new Level<Buffer, Buffer>(join(dir, sub), { keyEncoding: 'buffer', valueEncoding: 'buffer', ...o });
      try {
        await db.open();
      } catch (e) {
        const cause = (e as { cause?: unknown }).cause ?? e;
        throw toExaError(cause, `cannot open LevelDB in ${join(dir, sub)}`);
      }
      return db;
    };
    const index = await open('index', {
      cacheSize: opts.cacheSize ?? 64 * 1024 * 1024,
      writeBufferSize: 16 * 1024 * 1024,
      maxFileSize: 8 * 1024 * 1024,
      // Hashes, refs and page maps are random bytes: Snappy only spent CPU on them
      // (~1% of ingest CPU in a perf profile). LevelDB reads blocks written either way.
      compression: false,
    });
    let pages: DB;
    try {
      pages = await open('pages', {
        cacheSize: 8 * 1024 * 1024,
        writeBufferSize: opts.writeBufferSize ?? 64 * 1024 * 1024,
        maxFileSize: 64 * 1024 * 1024,
        // One page a block: a point read of a page scattered by increments reads
        // 4 KiB, not a 64 KiB block of unrelated pages (measured: the restore of
        // checkpoint 100 of a 1%-increment chain took 1.75x that of checkpoint 1
        // with 64 KiB blocks).
        blockSize: 4096,
        // Page bytes are mostly incompressible once zero pages are dropped;
        // Snappy's attempt on every block halved ingest throughput when measured.
        compression: false,
      });
    } catch (e) {
      await index.close();
      throw e;
    }
    const b = new LevelBackend(index, pages, dir);
    try {
      await b.init();
    } catch (e) {
      await b.close();
      throw e;
    }
    return b;
  }

  private async init(): Promise<void> {
    // The next block of sequence numbers follows the last group in the log.
    for await (const k of this.pagesDb.keys({ gte: Buffer.from([D]), lt: Buffer.from([D + 1]), reverse: true, limit: 1 })) {
      this.nextSeq = ((k.readBigUInt64BE(1) / BigInt(GROUP)) + 1n) * BigInt(GROUP);
    }
    let n = 0;
    const it = this.db.keys({ gte: Buffer.from([H]), lt: Buffer.from([H + 1]) });
    for (;;) {
      const ks = await it.nextv(10_000);
      if (ks.length === 0) break;
      n += ks.length;
    }
    await it.close();
    this.pages = n;
    const v = await this.db.get(Buffer.from([V]));
    const format = v && v.length === 4 ? v.readUInt32BE(0) : 0;
    if (format !== FORMAT) {
      if (format !== 0 || n > 0) {
        throw new ExaError('FAILED_PRECONDITION', `data directory ${this.dir} has store format ${format || 1}; this exastore reads format ${FORMAT} (page groups) only: archive the jobs with the older exastore and import them`);
      }
      const f = Buffer.allocUnsafe(4);
      f.writeUInt32BE(FORMAT);
      await this.db.put(Buffer.from([V]), f, { sync: true });
    }
  }

  // ---- PageStore ----

  async lookup(hashes: readonly Buffer[]): Promise<(PageRef | null)[]> {
    if (hashes.length === 0) return [];
    const keys = hashes.map((h) => hashKeyOf(H, h));
    // Large lookups in two halves, so two pool threads share them (an upload's
    // hash batch waits for its lookup before the next batch is looked at).
    if (keys.length < 256) return (await this.db.getMany(keys)).map((v) => v ?? null);
    const half = keys.length >> 1;
    const [a, b] = await Promise.all([this.db.getMany(keys.slice(0, half)), this.db.getMany(keys.slice(half))]);
    const out = new Array<PageRef | null>(keys.length);
    for (let i = 0; i < half; i++) out[i] = a[i] ?? null;
    for (let i = half; i < keys.length; i++) out[i] = b[i - half] ?? null;
    return out;
  }

  putPages(pages: readonly NewPage[]): Promise<{ refs: PageRef[]; written: number }> {
    // Serialized so that two sessions uploading the same page store it once
    // and sequence numbers stay dense and increasing.
    return this.writeLock.run(async () => {
      const existing = await this.lookup(pages.map((p) => p.hash));
      const refs: PageRef[] = [];
      const data: { type: 'put'; key: Buffer; value: Buffer }[] = [];
      const index: { type: 'put'; key: Buffer; value: Buffer }[] = [];
      const seen = new Map<string, PageRef>();
      // The group being filled: its first sequence number and pages.
      let gseq = 0n;
      let group: Buffer[] = [];
      let last = -2;       // index in `pages` of the last page put in `group`
      let written = 0;
      const close = (): void => {
        if (group.length === 0) return;
        const first = group[0]!;
        // Pages that already lie side by side (one message of the upload) go in without a copy.
        const adjacent = group.every((g, j) => g.buffer === first.buffer && g.byteOffset === first.byteOffset + j * PAGE_SIZE && g.length === PAGE_SIZE);
        const value = adjacent ? Buffer.from(first.buffer, first.byteOffset, group.length * PAGE_SIZE) : Buffer.concat(group);
        data.push({ type: 'put', key: seqKey(gseq), value });
        group = [];
      };
      for (let i = 0; i < pages.length; i++) {
        const p = pages[i]!;
        const hk = p.hash.toString('latin1');
        const have = existing[i] ?? seen.get(hk);
        if (have) { refs.push(have); continue; }
        if (!(p.follows && last === i - 1 && group.length > 0 && group.length < GROUP)) {
          close();
          gseq = this.nextSeq;
          this.nextSeq += BigInt(GROUP);
        }
        const ref = Buffer.allocUnsafe(8);
        ref.writeBigUInt64BE(gseq + BigInt(group.length));
        group.push(p.data);
        last = i;
        index.push({ type: 'put', key: hashKeyOf(H, p.hash), value: ref });
        seen.set(hk, ref);
        refs.push(ref);
        written++;
      }
      close();
      if (data.length > 0) {
        // ~1 MiB batches issued together: LevelDB groups them in its write queue
        // (one large batch measured no faster, sometimes slower).
        const parts: Promise<void>[] = [];
        let from = 0, bytes = 0;
        for (let j = 0; j < data.length; j++) {
          bytes += data[j]!.value.length;
          if (bytes >= PUT_CHUNK_BYTES || j === data.length - 1) {
            parts.push(this.pagesDb.batch(data.slice(from, j + 1)));
            from = j + 1;
            bytes = 0;
          }
        }
        await Promise.all(parts);
        await this.db.batch(index);
      }
      this.pages += written;
      return { refs, written };
    });
  }

  async readPages(refs: readonly PageRef[]): Promise<(Buffer | null)[]> {
    if (refs.length === 0) return [];
    // One get per group (pages of a group are usually asked for together),
    // in key order, split in two so two pool threads share the work.
    // (Measured here: getMany of 4 KiB values reads 600-1200 MiB/s, an
    // iterator over the same keys 150-370 MiB/s; 64 KiB values ~1700 MiB/s.)
    const keys: Buffer[] = [];
    const which = new Int32Array(refs.length);
    const seen = new Map<string, number>();
    let prev: Buffer | null = null;
    for (let i = 0; i < refs.length; i++) {
      const r = refs[i]!;
      // Consecutive refs of one group: no map lookup.
      if (prev && prev.compare(r, 0, 7, 0, 7) === 0 && ((prev[7]! ^ r[7]!) & ~(GROUP - 1)) === 0) { which[i] = which[i - 1]!; prev = r; continue; }
      const k = groupKey(r);
      const s = k.toString('latin1', 1);
      let g = seen.get(s);
      if (g === undefined) { g = keys.length; keys.push(k); seen.set(s, g); }
      which[i] = g;
      prev = r;
    }
    const half = keys.length >= 64 ? keys.length >> 1 : keys.length;
    const parts = await Promise.all([this.pagesDb.getMany(keys.slice(0, half)), half < keys.length ? this.pagesDb.getMany(keys.slice(half)) : Promise.resolve([])]);
    const vals = [...parts[0]!, ...parts[1]!];
    const out = new Array<Buffer | null>(refs.length);
    for (let i = 0; i < refs.length; i++) {
      const v = vals[which[i]!];
      out[i] = v ? groupPage(v, refs[i]![7]! & (GROUP - 1)) : null;
    }
    return out;
  }

  deletePages(pages: readonly StoredPage[]): Promise<number> {
    return this.writeLock.run(async () => {
      if (pages.length === 0) return 0;
      const current = await this.lookup(pages.map((p) => p.hash));
      const index: { type: 'del'; key: Buffer }[] = [];
      // Slots to clear, per group.
      const clear = new Map<string, { key: Buffer; slots: number }>();
      let removed = 0;
      for (let i = 0; i < pages.length; i++) {
        const p = pages[i]!;
        const key = groupKey(p.ref);
        const s = key.toString('latin1', 1);
        const e = clear.get(s) ?? { key, slots: 0 };
        e.slots |= 1 << (p.ref[7]! & (GROUP - 1));
        clear.set(s, e);
        const cur = current[i];
        if (cur && cur.equals(p.ref)) { index.push({ type: 'del', key: hashKeyOf(H, p.hash) }); removed++; }
      }
      // Index first: a crash in between leaves unindexed bytes, which sweepOrphans removes.
      await this.db.batch(index);
      // Groups lose the cleared slots (rewritten with the rest, or deleted when empty).
      // Only putPages and GC touch groups, both under this lock; putPages never
      // changes a group it did not create.
      const groups = [...clear.values()];
      const vals = await this.pagesDb.getMany(groups.map((g) => g.key));
      const ops: ({ type: 'del'; key: Buffer } | { type: 'put'; key: Buffer; value: Buffer })[] = [];
      groups.forEach((g, j) => {
        const v = vals[j];
        if (!v) return;
        const rest = groupKeep(v, ~g.slots & 0xffff);
        ops.push(rest ? { type: 'put', key: g.key, value: rest } : { type: 'del', key: g.key });
      });
      if (ops.length > 0) await this.pagesDb.batch(ops);
      this.pages -= removed;
      return removed;
    });
  }

  async *scanPages(batchSize: number): AsyncIterable<StoredPage[]> {
    const it = this.db.iterator({ gte: Buffer.from([H]), lt: Buffer.from([H + 1]) });
    try {
      for (;;) {
        const entries = await it.nextv(batchSize);
        if (entries.length === 0) break;
        yield entries.map(([k, v]) => ({ hash: k.subarray(1), ref: v }));
      }
    } finally {
      await it.close();
    }
  }

  pageStats(): { pages: number; bytes: number } {
    return { pages: this.pages, bytes: this.pages * PAGE_SIZE };
  }

  // ---- ManifestStore ----

  putManifest(header: ManifestHeader, maps: PageMaps): Promise<void> {
    return this.manifestLock.run(async () => {
      const last = await this.lastNumber(header.job);
      if (header.checkpoint <= last) {
        throw new ExaError('CONFLICT', `checkpoint ${header.checkpoint} of job ${header.job} already exists or existed (last is ${last})`,
          { job: header.job, checkpoint: header.checkpoint });
      }
      for (let r = 0; r < header.regions.length; r++) {
        if (maps[r]!.length !== header.regions[r]!.pageCount * ENTRY_BYTES) {
          throw new ExaError('INTERNAL', `page map of region ${header.regions[r]!.name} has the wrong size`);
        }
      }
      const num = Buffer.allocUnsafe(4);
      num.writeUInt32BE(header.checkpoint);
      // Every page this manifest names must be on disk before the manifest: a
      // synced write to the pages database flushes its log. The marker takes
      // the next sequence number (an empty value no index entry names, removed
      // by sweepOrphans): a fixed key outside the page range would make every
      // later level-0 file overlap the one holding it, and LevelDB would then
      // rewrite page bytes in compactions instead of moving files down.
      const marker = seqKey(this.nextSeq);
      this.nextSeq += BigInt(GROUP);
      await this.pagesDb.put(marker, Buffer.alloc(0), { sync: true });
      await this.db.batch([
        { type: 'put', key: ckptKey(P, header.job, header.checkpoint), value: Buffer.concat(maps) },
        { type: 'put', key: ckptKey(M, header.job, header.checkpoint), value: Buffer.from(JSON.stringify(header)) },
        { type: 'put', key: jobKey(header.job), value: num },
      ], { sync: true });
    });
  }

  async getHeader(job: string, checkpoint: number): Promise<ManifestHeader | null> {
    const v = await this.db.get(ckptKey(M, job, checkpoint));
    return v ? parseHeader(v, job, checkpoint) : null;
  }

  async getMaps(job: string, checkpoint: number): Promise<PageMaps | null> {
    const [h, v] = await this.db.getMany([ckptKey(M, job, checkpoint), ckptKey(P, job, checkpoint)]);
    if (!h) return null;
    const header = parseHeader(h, job, checkpoint);
    const total = header.regions.reduce((a, r) => a + r.pageCount, 0) * ENTRY_BYTES;
    if (!v || v.length !== total) {
      throw new ExaError('CORRUPT', `checkpoint ${checkpoint} of job ${job}: page map is ${v ? `${v.length} bytes, expected ${total}` : 'missing'}`,
        { job, checkpoint });
    }
    const maps: PageMaps = [];
    let off = 0;
    for (const r of header.regions) {
      maps.push(v.subarray(off, off + r.pageCount * ENTRY_BYTES));
      off += r.pageCount * ENTRY_BYTES;
    }
    return maps;
  }

  async listHeaders(job?: string): Promise<ManifestHeader[]> {
    const prefix = job === undefined ? Buffer.from([M]) : Buffer.concat([Buffer.from([M]), Buffer.from(job, 'utf8'), Buffer.from([0])]);
    const out: ManifestHeader[] = [];
    for await (const [k, v] of this.db.iterator(prefixRange(prefix))) {
      const z = k.indexOf(0, 1);
      out.push(parseHeader(v, k.toString('utf8', 1, z), k.readUInt32BE(z + 1)));
    }
    return out;
  }

  async lastNumber(job: string): Promise<number> {
    const v = await this.db.get(jobKey(job));
    return v ? v.readUInt32BE(0) : 0;
  }

  async deleteManifests(job: string, checkpoints: readonly number[]): Promise<void> {
    const ops: { type: 'del'; key: Buffer }[] = [];
    for (const n of checkpoints) {
      ops.push({ type: 'del', key: ckptKey(M, job, n) }, { type: 'del', key: ckptKey(P, job, n) });
    }
    if (ops.length > 0) await this.db.batch(ops, { sync: true });
  }

  async manifestBytes(): Promise<number> {
    let total = 0;
    for await (const v of this.db.values({ gte: Buffer.from([P]), lt: Buffer.from([P + 1]) })) total += v.length;
    return total;
  }

  // ---- GC marks ----

  async getMarks(hashes: readonly Buffer[]): Promise<(number | null)[]> {
    if (hashes.length === 0) return [];
    const vals = await this.db.getMany(hashes.map((h) => hashKeyOf(G, h)));
    return vals.map((v) => (v ? Number(v.readBigUInt64BE(0)) : null));
  }

  async putMarks(marks: readonly { hash: Buffer; at: number }[]): Promise<void> {
    if (marks.length === 0) return;
    await this.db.batch(marks.map((m) => {
      const v = Buffer.allocUnsafe(8);
      v.writeBigUInt64BE(BigInt(m.at));
      return { type: 'put' as const, key: hashKeyOf(G, m.hash), value: v };
    }));
  }

  async deleteMarks(hashes: readonly Buffer[]): Promise<void> {
    if (hashes.length === 0) return;
    await this.db.batch(hashes.map((h) => ({ type: 'del' as const, key: hashKeyOf(G, h) })));
  }

  async countMarks(): Promise<number> {
    let n = 0;
    for await (const _k of this.db.keys({ gte: Buffer.from([G]), lt: Buffer.from([G + 1]) })) n++;
    return n;
  }

  async compactStorage(): Promise<void> {
    for (const db of [this.db, this.pagesDb]) {
      await (db as unknown as { compactRange(a: Buffer, b: Buffer): Promise<void> }).compactRange(Buffer.from([0]), Buffer.from([0xff]));
    }
  }

  /**
   * Remove page bytes that no index entry names (left by a crash between the
   * two writes of putPages). Runs under the write lock, so no putPages is
   * between its two writes. Returns the number of pages removed.
   */
  sweepOrphans(): Promise<number> {
    return this.writeLock.run(async () => {
      const indexed = new Set<bigint>();
      for await (const v of this.db.values({ gte: Buffer.from([H]), lt: Buffer.from([H + 1]) })) indexed.add(v.readBigUInt64BE(0));
      let removed = 0;
      let keys: Buffer[] = [];
      const flush = async (): Promise<void> => {
        const vals = await this.pagesDb.getMany(keys);
        const ops: ({ type: 'del'; key: Buffer } | { type: 'put'; key: Buffer; value: Buffer })[] = [];
        keys.forEach((key, j) => {
          const v = vals[j];
          if (!v) return;
          // Commit markers are empty values: removed, but they were never pages.
          const have = groupMask(v);
          const g = key.readBigUInt64BE(1);
          let live = 0;
          for (let slot = 0; slot < GROUP; slot++) if ((have & (1 << slot)) && indexed.has(g + BigInt(slot))) live |= 1 << slot;
          if (live === have && v.length > 0) return;
          removed += popcount16(have & ~live);
          const rest = groupKeep(v, live);
          ops.push(rest ? { type: 'put', key, value: rest } : { type: 'del', key });
        });
        if (ops.length > 0) await this.pagesDb.batch(ops);
        keys = [];
      };
      for await (const k of this.pagesDb.keys({ gte: Buffer.from([D]), lt: Buffer.from([D + 1]) })) {
        keys.push(k);
        if (keys.length >= 1024) await flush();
      }
      if (keys.length > 0) await flush();
      return removed;
    });
  }

  async close(): Promise<void> {
    await this.db.close();
    await this.pagesDb.close();
  }
}

function parseHeader(v: Buffer, job: string, checkpoint: number): ManifestHeader {
  try {
    const h = JSON.parse(v.toString('utf8')) as ManifestHeader;
    if (h.job !== job || h.checkpoint !== checkpoint || !Array.isArray(h.regions)) throw new Error('header does not match its key');
    return h;
  } catch (e) {
    throw new ExaError('CORRUPT', `checkpoint ${checkpoint} of job ${job}: unreadable header (${(e as Error).message})`, { job, checkpoint });
  }
}
