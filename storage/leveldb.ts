/**
 * The embedded backend: one LevelDB database (through `level`) holding pages,
 * manifests and GC marks.
 *
 * Key layout (keys and values are raw bytes):
 *   'D' seq(u64 BE)               -> page bytes (4096)       the page log
 *   'H' hash(32)                  -> seq(u64 BE)             hash index
 *   'M' job 0x00 ckpt(u32 BE)     -> header JSON             committed checkpoints
 *   'P' job 0x00 ckpt(u32 BE)     -> page maps (40 B/page)   their full page maps
 *   'J' job                       -> last number (u32 BE)    numbers are never reused
 *   'G' hash(32)                  -> marked-at ms (u64 BE)   GC phase-1 marks
 *
 * Why a page log keyed by sequence number rather than pages keyed by hash:
 * hashes are random, so hash-keyed 4 KiB values make LevelDB rewrite every
 * page at each level during compaction (write amplification of 10x and more).
 * New pages get increasing sequence numbers instead, so their SST files never
 * overlap and LevelDB moves them down without rewriting; only the small hash
 * index (40 B a page) is random. The ref of a page is its sequence number, so
 * a restore reads runs of neighbouring pages with one iterator.
 *
 * Commit: 'M', 'P' and 'J' of a checkpoint go in one write batch with
 * sync: true. LevelDB applies a batch atomically and the synced log write
 * also makes every earlier (unsynced) page write durable, as the backend
 * contract requires.
 */
import { mkdirSync } from 'node:fs';
import { Level } from 'level';
import { ExaError, toExaError } from '../src/errors.js';
import type { Backend, ManifestHeader, NewPage, PageMaps, PageRef, StoredPage } from './backend.js';
import { Mutex } from './mutex.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE } from './pages.js';

type DB = Level<Buffer, Buffer>;

const D = 0x44, H = 0x48, M = 0x4d, P = 0x50, J = 0x4a, G = 0x47;

function seqKey(seq: bigint): Buffer {
  const k = Buffer.allocUnsafe(9);
  k[0] = D;
  k.writeBigUInt64BE(seq, 1);
  return k;
}
function refKey(ref: PageRef): Buffer {
  const k = Buffer.allocUnsafe(9);
  k[0] = D;
  ref.copy(k, 1, 0, 8);
  return k;
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
  private nextSeq = 1n;
  private pages = 0;
  private readonly writeLock = new Mutex();
  private readonly manifestLock = new Mutex();

  private constructor(private readonly db: DB, readonly dir: string) {}

  /** Open (creating the directory and database when missing). UNAVAILABLE when another process holds it. */
  static async open(dir: string, opts: LevelBackendOptions = {}): Promise<LevelBackend> {
    try {
      mkdirSync(dir, { recursive: true });
    } catch (e) {
      throw toExaError(e, `data directory ${dir}`);
    }
    const db = new Level<Buffer, Buffer>(dir, {
      keyEncoding: 'buffer',
      valueEncoding: 'buffer',
      cacheSize: opts.cacheSize ?? 64 * 1024 * 1024,
      writeBufferSize: opts.writeBufferSize ?? 64 * 1024 * 1024,
      maxFileSize: 32 * 1024 * 1024,
      blockSize: 16 * 1024,
    });
    try {
      await db.open();
    } catch (e) {
      const cause = (e as { cause?: unknown }).cause ?? e;
      throw toExaError(cause, `cannot open LevelDB in ${dir}`);
    }
    const b = new LevelBackend(db, dir);
    await b.init();
    return b;
  }

  private async init(): Promise<void> {
    // The next sequence number follows the last page in the log.
    for await (const k of this.db.keys({ gte: Buffer.from([D]), lt: Buffer.from([D + 1]), reverse: true, limit: 1 })) {
      this.nextSeq = k.readBigUInt64BE(1) + 1n;
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
  }

  // ---- PageStore ----

  async lookup(hashes: readonly Buffer[]): Promise<(PageRef | null)[]> {
    if (hashes.length === 0) return [];
    const vals = await this.db.getMany(hashes.map((h) => hashKeyOf(H, h)));
    return vals.map((v) => (v ? v : null));
  }

  putPages(pages: readonly NewPage[]): Promise<{ refs: PageRef[]; written: number }> {
    // Serialized so that two sessions uploading the same page store it once
    // and sequence numbers stay dense and increasing.
    return this.writeLock.run(async () => {
      const existing = await this.lookup(pages.map((p) => p.hash));
      const refs: PageRef[] = [];
      const ops: { type: 'put'; key: Buffer; value: Buffer }[] = [];
      const seen = new Map<string, PageRef>();
      for (let i = 0; i < pages.length; i++) {
        const p = pages[i]!;
        const have = existing[i] ?? seen.get(p.hash.toString('latin1'));
        if (have) { refs.push(have); continue; }
        const ref = Buffer.allocUnsafe(8);
        ref.writeBigUInt64BE(this.nextSeq++);
        ops.push({ type: 'put', key: refKey(ref), value: p.data });
        ops.push({ type: 'put', key: hashKeyOf(H, p.hash), value: ref });
        seen.set(p.hash.toString('latin1'), ref);
        refs.push(ref);
      }
      if (ops.length > 0) await this.db.batch(ops);
      this.pages += ops.length / 2;
      return { refs, written: ops.length / 2 };
    });
  }

  async readPages(refs: readonly PageRef[]): Promise<(Buffer | null)[]> {
    const out: (Buffer | null)[] = new Array(refs.length).fill(null);
    if (refs.length === 0) return out;
    // Sort by location; read dense runs with one iterator, the rest with getMany.
    const order = refs.map((r, i) => ({ s: r.readBigUInt64BE(0), i }));
    order.sort((a, b) => (a.s < b.s ? -1 : a.s > b.s ? 1 : 0));
    const singles: { s: bigint; i: number }[] = [];
    const runs: Promise<void>[] = [];
    let start = 0;
    while (start < order.length) {
      let end = start + 1;
      // A run tolerates small gaps (pages of other checkpoints in between).
      while (end < order.length && order[end]!.s - order[end - 1]!.s <= 4n) end++;
      if (end - start >= 16) {
        const slice = order.slice(start, end);
        runs.push(this.readRun(slice, out));
      } else {
        for (let k = start; k < end; k++) singles.push(order[k]!);
      }
      start = end;
    }
    if (singles.length > 0) {
      runs.push(this.db.getMany(singles.map((x) => seqKey(x.s))).then((vals) => {
        for (let k = 0; k < singles.length; k++) out[singles[k]!.i] = vals[k] ?? null;
      }));
    }
    await Promise.all(runs);
    return out;
  }

  private async readRun(slice: { s: bigint; i: number }[], out: (Buffer | null)[]): Promise<void> {
    const first = slice[0]!.s, last = slice[slice.length - 1]!.s;
    const it = this.db.iterator({ gte: seqKey(first), lte: seqKey(last) });
    try {
      let k = 0;
      for (;;) {
        const entries = await it.nextv(1024);
        if (entries.length === 0) break;
        for (const [key, value] of entries) {
          const s = key.readBigUInt64BE(1);
          while (k < slice.length && slice[k]!.s < s) k++;
          // The same ref may be requested several times (a page repeated in an image).
          while (k < slice.length && slice[k]!.s === s) { out[slice[k]!.i] = value; k++; }
        }
      }
    } finally {
      await it.close();
    }
  }

  deletePages(pages: readonly StoredPage[]): Promise<number> {
    return this.writeLock.run(async () => {
      if (pages.length === 0) return 0;
      const current = await this.lookup(pages.map((p) => p.hash));
      const ops: { type: 'del'; key: Buffer }[] = [];
      let removed = 0;
      for (let i = 0; i < pages.length; i++) {
        const p = pages[i]!;
        ops.push({ type: 'del', key: refKey(p.ref) });
        const cur = current[i];
        if (cur && cur.equals(p.ref)) { ops.push({ type: 'del', key: hashKeyOf(H, p.hash) }); removed++; }
      }
      await this.db.batch(ops);
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
    await (this.db as unknown as { compactRange(a: Buffer, b: Buffer): Promise<void> }).compactRange(Buffer.from([0]), Buffer.from([0xff]));
  }

  async close(): Promise<void> {
    await this.db.close();
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
