/**
 * The S3 pack-file backend: implements storage/backend.ts over one bucket
 * prefix, so the chain logic of storage/engine.ts runs unchanged on S3.
 * Several store servers may share one bucket prefix with no lock server.
 *
 * Objects (names and formats in ./format.ts):
 *  - pages are appended to an in-memory open pack; a pack is sealed at
 *    `packBytes` (default 32 MiB) or at the next commit and uploaded in the
 *    background (multipart above `multipartBytes`); at most `maxPendingBytes`
 *    of sealed packs wait for upload before putPages() waits (backpressure);
 *  - an index object lists the packs uploaded since the previous one and the
 *    hash of every page in them; it is written at commit, after its packs;
 *  - a manifest (header + full page maps) is written last: the manifest PUT
 *    is the commit point, so no manifest ever names a pack that is not in the
 *    bucket. Manifests are create-only: a per-job number that exists or ever
 *    existed is CONFLICT, and the PUT carries If-None-Match: * (412 ->
 *    CONFLICT, never an overwrite) where the server enforces it.
 *
 * PageRef (8 bytes): 48-bit pack id (the random id in the pack's name) then
 * the 16-bit slot. Refs are meaningful to every server on the bucket, so a
 * fresh server restores with one range GET per run of pages and no index
 * lookups. Two packs whose 47-bit ids collide get a local alias id (top bit
 * set); a ref that then resolves to the wrong bytes is caught by the
 * engine's hash check and re-resolved through lookup().
 *
 * Local cache: a LevelDB directory holding copies of the index objects and
 * manifests already fetched, and this server's GC marks. It can be deleted at
 * any time: open() rebuilds the in-memory hash index (hash -> pack, slot)
 * from the index objects in the bucket. Pages written by other servers
 * become visible when index objects are re-listed: at most every
 * `refreshMs` on lookups, at once on a lookup miss (throttled to
 * `missRefreshMs`), and always before GC scans.
 *
 * GC across servers (the engine runs its two phases with a grace period; the
 * backend adds a second, pack-level two-phase step because S3 deletes whole
 * objects):
 *  1. deletePages() records slots as dead. When every slot of an uploaded
 *     pack is dead, the pack is condemned: a tombstone object
 *     tombs/<pack>@<writer>-<rand> is PUT. From then on no server answers
 *     lookup() with a page of that pack (each learns of the tombstone within
 *     refreshMs), so new uploads store such a page again in a new pack.
 *  2. A condemned pack is deleted only when its oldest tombstone is older
 *     than `packGraceMs` AND a re-check made at delete time (all manifests
 *     in the bucket, listed afresh) finds none of its pages referenced
 *     without another live copy; otherwise its tombstones are removed and it
 *     is live again (revived). Any server may do step 2.
 *  3. Repack (at the end of each GC run and on compact): packs at least
 *     half dead have their live pages written into new packs, then are
 *     condemned as in 1; reads through old refs follow the pages by hash.
 *  Safety condition: packGraceMs > refreshMs + the longest upload (an upload
 *  told "present" before a tombstone was visible must commit before the pack
 *  can go). Packs uploaded but never indexed (a writer crashed before
 *  commit) are deleted once older than packGraceMs.
 */
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir, hostname } from 'node:os';
import { join } from 'node:path';
import { Level } from 'level';
import { ExaError, toExaError } from '../../src/errors.js';
import type { Backend, ManifestHeader, NewPage, PageMaps, PageRef, StoredPage } from '../backend.js';
import { Mutex } from '../mutex.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, REF_BYTES, hashKey, isZeroHash, sha256 } from '../pages.js';
import {
  MAX_PACK_PAGES, WRITER_RE, decodeIndex, decodeManifest, deletedKey, encodeIndex, encodeManifest, encodePack,
  indexKey, manifestKey, newPackId, packBase, packKey, parseCkptKey, parsePackKey, parseTombKey, randomHex, tombKey,
  type IndexedPack,
} from './format.js';
import { S3Io, type GetHooks, type S3Config, type S3Counters } from './io.js';

export interface S3BackendOptions extends S3Config {
  /** Local cache directory (LevelDB); omitted = a temporary directory removed at close. */
  cacheDir?: string | undefined;
  /** Writer id used in object names; default host-pid-random. [A-Za-z0-9_.] only. */
  writerId?: string | undefined;
  /** Target pack size (bytes of pages, default 32 MiB; 16-64 MiB suits S3, tests use less). */
  packBytes?: number | undefined;
  /** Packs larger than this go up by multipart upload (default 64 MiB), in parts of partBytes (default 16 MiB). */
  multipartBytes?: number | undefined;
  partBytes?: number | undefined;
  /** Sealed packs waiting for upload before putPages() waits (default 4 x packBytes). */
  maxPendingBytes?: number | undefined;
  /** Parallel uploads (default 4) and range GETs (default 8). */
  uploadConcurrency?: number | undefined;
  readConcurrency?: number | undefined;
  /** Re-list index objects and tombstones at least this often when looking up (default 30 s). */
  refreshMs?: number | undefined;
  /** ... and at most this often on a lookup miss (default 1 s). */
  missRefreshMs?: number | undefined;
  /** Age of a pack's tombstone before the pack may be deleted (default 1 h). */
  packGraceMs?: number | undefined;
}

interface Pack {
  base: string;
  /** The 48-bit id used in refs (the name's id, or a local alias). */
  refId: number;
  hashes: Buffer;                 // n x 32
  n: number;
  state: 'open' | 'pending' | 'uploaded';
  pages: Buffer[] | null;         // open: the page bytes
  body: Buffer | null;            // pending: the encoded object
  upload: Promise<void> | null;
  uploadError: unknown;
  indexed: boolean;
  dead: Uint8Array | null;        // slots deleted by GC (this server's view)
  deadCount: number;
  tombAt: number | null;          // condemned since (oldest tombstone)
  tombKeys: string[];
  gone: boolean;                  // deleted from the bucket
}

interface Loc { p: Pack; s: number }

const ALIAS_BASE = 2 ** 47;

/** A counting semaphore for parallel S3 requests. */
class Limiter {
  private active = 0;
  private readonly queue: (() => void)[] = [];
  constructor(private readonly max: number) {}
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.max) await new Promise<void>((r) => this.queue.push(r));
    this.active++;
    try {
      return await fn();
    } finally {
      this.active--;
      this.queue.shift()?.();
    }
  }
}

function makeRef(refId: number, slot: number): PageRef {
  const r = Buffer.allocUnsafe(REF_BYTES);
  r.writeUIntBE(refId, 0, 6);
  r.writeUInt16BE(slot, 6);
  return r;
}

type Cache = Level<string, Buffer>;

export class S3Backend implements Backend {
  readonly kind = 's3';
  readonly io: S3Io;
  readonly writer: string;
  readonly url: string;
  private readonly packPages: number;
  private readonly multipartBytes: number;
  private readonly partBytes: number;
  private readonly maxPendingBytes: number;
  private readonly refreshMs: number;
  private readonly missRefreshMs: number;
  readonly packGraceMs: number;
  private readonly uploads: Limiter;
  private readonly reads: Limiter;
  /** Range GETs run at once (readConcurrency option, default 8). */
  readonly readConcurrency: number;

  private readonly packsByBase = new Map<string, Pack>();
  private readonly packsByRef = new Map<number, Pack>();
  private readonly hashIndex = new Map<string, Loc>();
  private readonly knownIndex = new Set<string>();
  private nextAlias = ALIAS_BASE;
  private open: Pack | null = null;
  private readonly putLock = new Mutex();
  private readonly flushLock = new Mutex();
  private readonly refreshLock = new Mutex();
  private lastRefresh = 0;
  private readonly headers = new Map<string, ManifestHeader>();
  private closed = false;
  private readonly cacheWrites = new Set<Promise<void>>();
  /** Pack-level GC counters of this process (tests, stat). */
  readonly gcCounters = { condemned: 0, deleted: 0, revived: 0, orphansDeleted: 0, repacked: 0 };

  private constructor(opts: S3BackendOptions, private readonly cache: Cache, private readonly tempCache: string | null) {
    this.io = new S3Io(opts);
    this.url = opts.url;
    const w = opts.writerId ?? `${hostname().replace(/[^A-Za-z0-9_.]/g, '_').slice(0, 32)}_${process.pid}_${randomHex(3)}`;
    if (!WRITER_RE.test(w)) throw new ExaError('INVALID_ARGUMENT', `invalid writer id ${JSON.stringify(w)}: 1-64 characters from A-Z a-z 0-9 _ .`);
    this.writer = w;
    const packBytes = opts.packBytes ?? 32 * 2 ** 20;
    this.packPages = Math.max(1, Math.min(MAX_PACK_PAGES, Math.floor(packBytes / PAGE_SIZE)));
    this.multipartBytes = opts.multipartBytes ?? 64 * 2 ** 20;
    this.partBytes = Math.max(5 * 2 ** 20, opts.partBytes ?? 16 * 2 ** 20);
    this.maxPendingBytes = opts.maxPendingBytes ?? 4 * this.packPages * PAGE_SIZE;
    this.refreshMs = opts.refreshMs ?? 30_000;
    this.missRefreshMs = opts.missRefreshMs ?? 1_000;
    this.packGraceMs = opts.packGraceMs ?? 60 * 60 * 1000;
    this.uploads = new Limiter(opts.uploadConcurrency ?? 4);
    this.readConcurrency = Math.max(1, opts.readConcurrency ?? 8);
    this.reads = new Limiter(this.readConcurrency);
  }

  /**
   * Connect to the bucket (NOT_FOUND / PERMISSION_DENIED / UNAVAILABLE name
   * the bucket and endpoint), open the local cache and load the index.
   */
  static async open(opts: S3BackendOptions): Promise<S3Backend> {
    let dir = opts.cacheDir;
    let temp: string | null = null;
    if (!dir) dir = temp = mkdtempSync(join(tmpdir(), 'exa-s3cache-'));
    try {
      mkdirSync(dir, { recursive: true });
    } catch (e) {
      throw toExaError(e, `cache directory ${dir}`);
    }
    const cache: Cache = new Level<string, Buffer>(dir, { keyEncoding: 'utf8', valueEncoding: 'buffer' });
    try {
      await cache.open();
    } catch (e) {
      if (temp) rmSync(temp, { recursive: true, force: true });
      throw toExaError((e as { cause?: unknown }).cause ?? e, `cannot open the S3 cache in ${dir}`);
    }
    let b: S3Backend;
    try {
      b = new S3Backend(opts, cache, temp);
    } catch (e) {
      await cache.close();
      if (temp) rmSync(temp, { recursive: true, force: true });
      throw e;
    }
    try {
      // A cache belongs to one bucket prefix: refuse to mix two.
      const id = `${opts.endpoint ?? 'aws'} ${b.io.bucket} ${b.io.prefix}`;
      const had = await cache.get('C');
      if (had && had.toString() !== id) {
        throw new ExaError('FAILED_PRECONDITION', `cache directory ${dir} belongs to ${had.toString()}, not ${id}: use another --data directory or delete it`);
      }
      if (!had) await cache.put('C', Buffer.from(id));
      await b.io.checkBucket();
      await b.refresh(true);
    } catch (e) {
      await b.close();
      throw e;
    }
    return b;
  }

  /** Request counters (benchmarks, tests). */
  get counters(): S3Counters {
    return this.io.counters;
  }

  // ---- index ----

  private registerPack(ip: IndexedPack, state: Pack['state']): Pack {
    const have = this.packsByBase.get(ip.base);
    if (have) return have;
    let refId = ip.id;
    if (this.packsByRef.has(refId)) refId = this.nextAlias++;
    const n = ip.hashes.length / HASH_BYTES;
    const p: Pack = {
      base: ip.base, refId, hashes: ip.hashes, n, state, pages: null, body: null, upload: null, uploadError: null,
      indexed: state === 'uploaded', dead: null, deadCount: 0, tombAt: null, tombKeys: [], gone: false,
    };
    this.packsByBase.set(p.base, p);
    this.packsByRef.set(refId, p);
    for (let s = 0; s < n; s++) {
      const k = hashKey(ip.hashes, s * HASH_BYTES);
      if (!this.hashIndex.has(k)) this.hashIndex.set(k, { p, s });
    }
    return p;
  }

  private unindexPack(p: Pack): void {
    for (let s = 0; s < p.n; s++) {
      const k = hashKey(p.hashes, s * HASH_BYTES);
      if (this.hashIndex.get(k)?.p === p) this.hashIndex.delete(k);
    }
  }

  private reindexPack(p: Pack): void {
    for (let s = 0; s < p.n; s++) {
      if (p.dead?.[s]) continue;
      const k = hashKey(p.hashes, s * HASH_BYTES);
      if (!this.hashIndex.has(k)) this.hashIndex.set(k, { p, s });
    }
  }

  /** Give every hash without an entry its copy in a live pack (after packs left the index). */
  private reindexAll(): void {
    for (const p of this.packsByBase.values()) if (p.tombAt === null && !p.gone) this.reindexPack(p);
  }

  /**
   * Re-list index objects and tombstones; fetch index objects not seen yet
   * (from the local cache, else the bucket). With force = false, skipped
   * when the last refresh is younger than missRefreshMs.
   */
  async refresh(force = false): Promise<void> {
    const asked = Date.now();
    await this.refreshLock.run(async () => {
      // A refresh that started after this call was made serves it too.
      if (this.lastRefresh >= asked) return;
      if (!force && Date.now() - this.lastRefresh < this.missRefreshMs) return;
      const started = Date.now();
      const [idx, tombs] = await Promise.all([this.io.list('index/'), this.io.list('tombs/')]);
      const fresh = idx.filter((o) => o.key.endsWith('.idx') && !this.knownIndex.has(o.key));
      const loaded = await Promise.all(fresh.map((o) => this.reads.run(async () => {
        let body: Buffer | undefined = await this.cache.get(`I${o.key}`);
        if (!body) {
          body = (await this.io.get(o.key)) ?? undefined;
          if (!body) return null;
          await this.cache.put(`I${o.key}`, body);
        }
        try {
          return { key: o.key, packs: decodeIndex(body, o.key) };
        } catch (e) {
          // A damaged index object hides its packs from dedup; verify reports pages that become unreadable.
          // Warned once per process: it is remembered as known (with no packs).
          process.emitWarning(`exa s3: ${(e as Error).message}; ignoring it`);
          await this.cache.del(`I${o.key}`);
          return { key: o.key, packs: [] };
        }
      })));
      for (const l of loaded) {
        if (!l) continue;
        for (const ip of l.packs) {
          const p = this.registerPack(ip, 'uploaded');
          p.indexed = true;
        }
        this.knownIndex.add(l.key);
      }
      // Tombstones: condemned packs leave the hash index; packs whose tombstones vanished come back.
      const byBase = new Map<string, { at: number; keys: string[] }>();
      for (const t of tombs) {
        const base = parseTombKey(t.key);
        if (!base) continue;
        const e = byBase.get(base) ?? { at: Infinity, keys: [] };
        e.at = Math.min(e.at, t.lastModified || Date.now());
        e.keys.push(t.key);
        byBase.set(base, e);
      }
      let left = false;
      for (const p of this.packsByBase.values()) {
        const t = byBase.get(p.base);
        if (t) {
          if (p.tombAt === null) { this.unindexPack(p); left = true; }
          p.tombAt = t.at;
          p.tombKeys = t.keys;
        } else if (p.tombAt !== null && !p.gone) {
          p.tombAt = null;
          p.tombKeys = [];
          this.reindexPack(p);
        }
      }
      // Pages of condemned packs may have copies elsewhere (a repack): point at those.
      if (left) this.reindexAll();
      this.lastRefresh = started;
    });
  }

  // ---- PageStore ----

  async lookup(hashes: readonly Buffer[]): Promise<(PageRef | null)[]> {
    this.checkOpen();
    if (hashes.length === 0) return [];
    if (Date.now() - this.lastRefresh > this.refreshMs) await this.refresh(true);
    const find = (): (PageRef | null)[] => hashes.map((h) => {
      const l = this.hashIndex.get(hashKey(h));
      return l ? makeRef(l.p.refId, l.s) : null;
    });
    let out = find();
    if (out.some((r) => r === null) && Date.now() - this.lastRefresh >= this.missRefreshMs) {
      await this.refresh();
      out = find();
    }
    return out;
  }

  async putPages(pages: readonly NewPage[]): Promise<{ refs: PageRef[]; written: number }> {
    this.checkOpen();
    const res = await this.putLock.run(async () => {
      const refs: PageRef[] = [];
      let written = 0;
      for (const pg of pages) {
        const k = hashKey(pg.hash);
        const have = this.hashIndex.get(k);
        if (have) { refs.push(makeRef(have.p.refId, have.s)); continue; }
        let p = this.open;
        if (!p) {
          let id = newPackId();
          while (this.packsByRef.has(id)) id = newPackId();
          p = this.registerPack({ base: packBase(id, this.writer), id, hashes: Buffer.alloc(0) }, 'open');
          p.pages = [];
          p.hashes = Buffer.allocUnsafe(this.packPages * HASH_BYTES);
          this.open = p;
        }
        const s = p.n++;
        // Copy: the caller's buffers belong to a gRPC message.
        p.pages!.push(Buffer.from(pg.data));
        pg.hash.copy(p.hashes, s * HASH_BYTES);
        this.hashIndex.set(k, { p, s });
        refs.push(makeRef(p.refId, s));
        written++;
        if (p.n >= this.packPages) this.seal();
      }
      return { refs, written };
    });
    // Backpressure: wait while too many sealed packs are still going up.
    await this.waitPending(this.maxPendingBytes);
    return res;
  }

  /** Seal the open pack and start its upload (under putLock). */
  private seal(): void {
    const p = this.open;
    if (!p) return;
    this.open = null;
    if (p.n === 0) return;
    p.hashes = Buffer.from(p.hashes.subarray(0, p.n * HASH_BYTES));
    p.body = encodePack(p.pages!, Array.from({ length: p.n }, (_, i) => p.hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES)));
    p.pages = null;
    p.state = 'pending';
    this.startUpload(p);
  }

  private startUpload(p: Pack): void {
    if (p.upload) return;
    p.uploadError = null;
    p.upload = this.uploads.run(async () => {
      const body = p.body!;
      const key = packKey(p.base);
      if (body.length > this.multipartBytes) await this.io.putMultipart(key, body, this.partBytes);
      else await this.io.putNew(key, body);
      p.state = 'uploaded';
      p.body = null;
    }).catch((e: unknown) => {
      // Kept pending: the next commit (or backpressure wait) uploads it again.
      p.uploadError = e;
    }).finally(() => {
      p.upload = null;
    });
  }

  private pendingPacks(): Pack[] {
    return [...this.packsByBase.values()].filter((p) => p.state === 'pending');
  }

  /** Wait until at most `limit` bytes of sealed packs are pending; re-upload failed ones. */
  private async waitPending(limit: number): Promise<void> {
    for (;;) {
      const pend = this.pendingPacks();
      const bytes = pend.reduce((a, p) => a + (p.body?.length ?? 0), 0);
      if (pend.length === 0 || bytes <= limit) return;
      const failed = pend.find((p) => !p.upload && p.uploadError);
      if (failed) {
        const err = failed.uploadError;
        // Try once more now; if that fails too, report it to the caller.
        this.startUpload(failed);
        await failed.upload;
        if (failed.state !== 'uploaded') throw toExaError(err);
        continue;
      }
      await Promise.race(pend.map((p) => p.upload ?? Promise.resolve()));
    }
  }

  /**
   * Make every page put so far durable and indexed: seal the open pack,
   * upload what is pending (retrying failed uploads), then PUT one index
   * object for the packs not yet indexed.
   */
  async flush(): Promise<void> {
    this.checkOpen();
    await this.flushLock.run(async () => {
      await this.putLock.run(async () => this.seal());
      const pend = this.pendingPacks();
      for (const p of pend) if (!p.upload) this.startUpload(p);
      await Promise.all(pend.map((p) => p.upload));
      const failed = pend.find((p) => p.state !== 'uploaded');
      if (failed) throw toExaError(failed.uploadError ?? new ExaError('UNAVAILABLE', `pack ${failed.base} was not uploaded`));
      const todo = [...this.packsByBase.values()].filter((p) => p.state === 'uploaded' && !p.indexed && !p.gone);
      if (todo.length === 0) return;
      const key = indexKey(this.writer);
      const body = encodeIndex(todo.map((p) => ({ base: p.base, id: parseInt(p.base.slice(0, 12), 16), hashes: p.hashes })));
      await this.io.putNew(key, body);
      for (const p of todo) p.indexed = true;
      this.knownIndex.add(key);
      await this.cache.put(`I${key}`, body);
    });
  }

  async readPages(refs: readonly PageRef[]): Promise<(Buffer | null)[]> {
    this.checkOpen();
    const out: (Buffer | null)[] = new Array(refs.length).fill(null);
    const byPack = new Map<number, { slot: number; i: number }[]>();
    let unknown = false;
    refs.forEach((r, i) => {
      if (r.length !== REF_BYTES) return;
      const id = r.readUIntBE(0, 6);
      if (!this.packsByRef.has(id)) unknown = true;
      const l = byPack.get(id) ?? [];
      l.push({ slot: r.readUInt16BE(6), i });
      byPack.set(id, l);
    });
    // A ref written by another server whose index we have not seen yet.
    if (unknown) await this.refresh();
    const jobs: Promise<void>[] = [];
    for (const [id, wants] of byPack) {
      const p = this.packsByRef.get(id);
      if (!p) continue;
      jobs.push(p.gone ? this.redirect(p, wants, out) : this.readFromPack(p, wants, out));
    }
    await Promise.all(jobs);
    return out;
  }

  /**
   * For restores that read runs of pages into memory they own
   * (./restore.ts): the slots first..last of the pack whose ref id is
   * `refId` (a ref is the 48-bit id then the 16-bit slot), by one range GET
   * straight into `into` (at least (last - first + 1) x 4096 bytes; `hooks`
   * see S3Io.getInto), under
   * the same limit of GETs in flight as readPages(). Resolves with the part
   * of `into` filled (short when the pack is), or null when the pages must
   * go through readPages() instead: the pack is unknown (after a refresh),
   * not uploaded yet, or gone (a 404 marks it gone, as readPages() does).
   * The bytes are not checked here: the caller checks every page's hash.
   */
  async readSlots(refId: number, first: number, last: number, into: Buffer, hooks?: GetHooks): Promise<Buffer | null> {
    this.checkOpen();
    if (!this.packsByRef.has(refId)) await this.refresh();
    const p = this.packsByRef.get(refId);
    if (!p || p.gone || p.state !== 'uploaded' || first > last || first < 0) return null;
    if (last >= p.n) last = p.n - 1;
    if (first > last) return null;
    const key = packKey(p.base);
    const got = await this.reads.run(() => this.io.getInto(key, { start: first * PAGE_SIZE, end: (last + 1) * PAGE_SIZE - 1 }, into, hooks));
    if (!got) {
      p.gone = true;
      this.unindexPack(p);
      return null;
    }
    return got;
  }

  /**
   * Refs into a pack that is gone (deleted after a repack or GC): the pack's
   * index entry still says which hash each slot held, so read that hash
   * where it lives now. This keeps old manifests' refs fast after a repack.
   */
  private async redirect(p: Pack, wants: { slot: number; i: number }[], out: (Buffer | null)[]): Promise<void> {
    const byPack = new Map<Pack, { slot: number; i: number }[]>();
    for (const w of wants) {
      if (w.slot >= p.n) continue;
      const loc = this.hashIndex.get(hashKey(p.hashes, w.slot * HASH_BYTES));
      if (!loc || loc.p === p || loc.p.gone) continue;
      const l = byPack.get(loc.p) ?? [];
      l.push({ slot: loc.s, i: w.i });
      byPack.set(loc.p, l);
    }
    await Promise.all([...byPack].map(([q, ws]) => this.readFromPack(q, ws, out, false)));
  }

  /** Read slots of one pack: from memory while it is not uploaded, else by coalesced range GETs in parallel. */
  private async readFromPack(p: Pack, wants: { slot: number; i: number }[], out: (Buffer | null)[], follow = true): Promise<void> {
    if (p.state === 'open' && p.pages) {
      for (const w of wants) if (w.slot < p.n) out[w.i] = p.pages[w.slot]!;
      return;
    }
    if (p.state === 'pending' && p.body) {
      for (const w of wants) if (w.slot < p.n) out[w.i] = p.body.subarray(w.slot * PAGE_SIZE, (w.slot + 1) * PAGE_SIZE);
      return;
    }
    const sorted = wants.filter((w) => w.slot < p.n).sort((a, b) => a.slot - b.slot);
    // Runs of neighbouring slots: gaps up to 16 pages are read through, runs up to 8 MiB.
    const runs: { first: number; last: number; items: { slot: number; i: number }[] }[] = [];
    for (const w of sorted) {
      const r = runs[runs.length - 1];
      if (r && w.slot - r.last <= 16 && w.slot - r.first < 2048) { r.last = w.slot; r.items.push(w); } else runs.push({ first: w.slot, last: w.slot, items: [w] });
    }
    const key = packKey(p.base);
    const missing: { slot: number; i: number }[] = [];
    await Promise.all(runs.map((r) => this.reads.run(async () => {
      // Straight into a buffer of the range's size: no per-body concatenation by the SDK.
      const buf = await this.io.getInto(key, { start: r.first * PAGE_SIZE, end: (r.last + 1) * PAGE_SIZE - 1 }, Buffer.allocUnsafeSlow((r.last - r.first + 1) * PAGE_SIZE));
      if (!buf) {
        // Deleted by a GC (here or on another server): follow its pages by hash.
        p.gone = true;
        this.unindexPack(p);
        missing.push(...r.items);
        return;
      }
      for (const it of r.items) {
        const off = (it.slot - r.first) * PAGE_SIZE;
        if (off + PAGE_SIZE <= buf.length) out[it.i] = buf.subarray(off, off + PAGE_SIZE);
      }
    })));
    if (missing.length > 0 && follow) await this.redirect(p, missing, out);
  }

  async deletePages(pages: readonly StoredPage[]): Promise<number> {
    this.checkOpen();
    let removed = 0;
    const full: Pack[] = [];
    for (const sp of pages) {
      if (sp.ref.length !== REF_BYTES) continue;
      const p = this.packsByRef.get(sp.ref.readUIntBE(0, 6));
      const s = sp.ref.readUInt16BE(6);
      if (!p || s >= p.n || p.gone) continue;
      if (!p.dead) p.dead = new Uint8Array(p.n);
      if (p.dead[s]) continue;
      p.dead[s] = 1;
      p.deadCount++;
      removed++;
      const k = hashKey(sp.hash);
      const l = this.hashIndex.get(k);
      if (l && l.p === p && l.s === s) this.hashIndex.delete(k);
      if (p.deadCount === p.n && p.state === 'uploaded' && p.indexed && p.tombAt === null) full.push(p);
    }
    // Condemn packs with no live page left (phase 1 of the pack-level step).
    for (const p of full) {
      const key = tombKey(p.base, this.writer);
      await this.io.putNew(key, Buffer.alloc(0));
      this.unindexPack(p);
      p.tombAt = Date.now();
      p.tombKeys.push(key);
      this.gcCounters.condemned++;
    }
    if (full.length > 0) this.reindexAll();
    return removed;
  }

  /**
   * Phase 2 of the pack-level step: delete condemned packs whose tombstone
   * is older than packGraceMs and that no manifest in the bucket needs
   * (re-checked now); revive the others. Also deletes packs that no index
   * object names and that are older than packGraceMs (a writer died before
   * its commit). Returns the number of packs deleted.
   */
  async sweep(): Promise<{ deleted: number; revived: number; orphanPages: number }> {
    const now = Date.now();
    const due = [...this.packsByBase.values()].filter((p) => p.tombAt !== null && !p.gone && now - p.tombAt >= this.packGraceMs);
    let deleted = 0, revived = 0, orphanPages = 0;
    if (due.length > 0) {
      // The re-check: every manifest in the bucket, listed now.
      const referenced = new Set<string>();
      for (const h of await this.listHeaders()) {
        const maps = await this.getMaps(h.job, h.checkpoint);
        for (const m of maps ?? []) for (let off = 0; off < m.length; off += ENTRY_BYTES) if (!isZeroHash(m, off)) referenced.add(hashKey(m, off));
      }
      for (const p of due) {
        let needed = false;
        for (let s = 0; s < p.n && !needed; s++) {
          const k = hashKey(p.hashes, s * HASH_BYTES);
          if (!referenced.has(k)) continue;
          const other = this.hashIndex.get(k);
          // Another copy counts only when it is in the bucket AND named by an index object:
          // a copy in a pack whose commit has not happened yet could vanish with its writer.
          if (!other || other.p === p || other.p.tombAt !== null || other.p.gone || other.p.state !== 'uploaded' || !other.p.indexed) needed = true;
        }
        if (needed) {
          for (const t of p.tombKeys) await this.io.del(t);
          p.tombKeys = [];
          p.tombAt = null;
          p.dead = null;
          p.deadCount = 0;
          this.reindexPack(p);
          revived++;
          this.gcCounters.revived++;
        } else {
          await this.io.del(packKey(p.base));
          p.gone = true;
          deleted++;
          this.gcCounters.deleted++;
        }
      }
    }
    // Orphans: packs in the bucket that no index names, old enough that their writer is gone.
    const listed = await this.io.list('packs/');
    for (const o of listed) {
      const pk = parsePackKey(o.key);
      if (!pk || this.packsByBase.has(pk.base)) continue;
      if (o.lastModified > 0 && now - o.lastModified >= this.packGraceMs) {
        await this.refresh(true);
        if (this.packsByBase.has(pk.base)) continue;
        await this.io.del(o.key);
        deleted++;
        orphanPages += Math.max(0, Math.floor((o.size - 12) / (PAGE_SIZE + HASH_BYTES)));
        this.gcCounters.orphansDeleted++;
      }
    }
    return { deleted, revived, orphanPages };
  }

  /**
   * Repack: the live pages of packs at least `minDead` dead (in this
   * server's view) are written again into new packs (with their index
   * object), then the old packs are condemned; the sweep of a later GC
   * deletes them after the grace period and the re-check. Old refs keep
   * working: reads of a gone pack follow its pages by hash (redirect()).
   * A pack whose live pages do not match their hashes is left alone for
   * verify to report.
   */
  async repack(minDead = 0.5): Promise<{ packs: number; pagesMoved: number }> {
    this.checkOpen();
    const cands = [...this.packsByBase.values()].filter((p) => p.state === 'uploaded' && p.indexed && p.tombAt === null && !p.gone
      && p.deadCount > 0 && p.deadCount < p.n && p.deadCount / p.n >= minDead);
    const done: Pack[] = [];
    let moved = 0;
    for (const p of cands) {
      const wants: { slot: number; i: number }[] = [];
      for (let slot = 0; slot < p.n; slot++) if (!p.dead?.[slot]) wants.push({ slot, i: wants.length });
      const got: (Buffer | null)[] = new Array(wants.length).fill(null);
      await this.readFromPack(p, wants, got, false);
      const pages: NewPage[] = [];
      let ok = true;
      wants.forEach((w, k) => {
        const h = p.hashes.subarray(w.slot * HASH_BYTES, (w.slot + 1) * HASH_BYTES);
        const d = got[k];
        if (!d || d.length !== PAGE_SIZE || !sha256(d).equals(h)) ok = false;
        else pages.push({ hash: Buffer.from(h), data: d });
      });
      if (!ok || p.gone) continue;
      // Pages with another live copy are not written again (putPages is idempotent per hash).
      this.unindexPack(p);
      const r = await this.putPages(pages);
      moved += r.written;
      done.push(p);
    }
    if (done.length === 0) return { packs: 0, pagesMoved: 0 };
    // New packs and their index first; only then may the old ones be condemned.
    await this.flush();
    for (const p of done) {
      const key = tombKey(p.base, this.writer);
      await this.io.putNew(key, Buffer.alloc(0));
      p.tombAt = Date.now();
      p.tombKeys.push(key);
      this.gcCounters.condemned++;
    }
    this.gcCounters.repacked += done.length;
    return { packs: done.length, pagesMoved: moved };
  }

  async *scanPages(batchSize: number): AsyncIterable<StoredPage[]> {
    this.checkOpen();
    await this.refresh(true);
    let batch: StoredPage[] = [];
    for (const p of [...this.packsByBase.values()]) {
      if (p.tombAt !== null || p.gone) continue;
      for (let s = 0; s < p.n; s++) {
        if (p.dead?.[s]) continue;
        batch.push({ hash: Buffer.from(p.hashes.subarray(s * HASH_BYTES, (s + 1) * HASH_BYTES)), ref: makeRef(p.refId, s) });
        if (batch.length >= batchSize) { yield batch; batch = []; }
      }
    }
    if (batch.length > 0) yield batch;
  }

  /**
   * Called by the engine at the end of each (not dry-run) GC, after its
   * page deletions: the pack-level step (sweep: delete condemned packs past
   * the grace period, revive needed ones, delete old unindexed packs) and a
   * repack. Returns the pages of unindexed packs deleted (the others were
   * counted when deletePages() took them).
   */
  async sweepOrphans(): Promise<number> {
    this.checkOpen();
    const r = await this.sweep();
    await this.repack();
    return r.orphanPages;
  }

  pageStats(): { pages: number; bytes: number } {
    let pages = 0;
    for (const p of this.packsByBase.values()) if (p.tombAt === null && !p.gone) pages += p.n - p.deadCount;
    return { pages, bytes: pages * PAGE_SIZE };
  }

  // ---- ManifestStore ----

  async putManifest(header: ManifestHeader, maps: PageMaps): Promise<void> {
    this.checkOpen();
    const { job, checkpoint } = header;
    if (maps.length !== header.regions.length) throw new ExaError('INTERNAL', `checkpoint ${checkpoint} of job ${job}: ${maps.length} page maps for ${header.regions.length} regions`);
    for (let r = 0; r < header.regions.length; r++) {
      if (maps[r]!.length !== header.regions[r]!.pageCount * ENTRY_BYTES) throw new ExaError('INTERNAL', `page map of region ${header.regions[r]!.name} has the wrong size`);
    }
    // Packs and their index first: no manifest may name a pack that is not in the bucket.
    await this.flush();
    const last = await this.lastNumber(job);
    if (checkpoint <= last) {
      throw new ExaError('CONFLICT', `checkpoint ${checkpoint} of job ${job} already exists or existed in ${this.io.where} (last is ${last})`, { job, checkpoint });
    }
    const key = manifestKey(job, checkpoint);
    const body = encodeManifest(header, maps);
    try {
      await this.io.putNew(key, body);
    } catch (e) {
      if ((e as ExaError).code === 'CONFLICT') {
        throw new ExaError('CONFLICT', `checkpoint ${checkpoint} of job ${job} was committed by another writer in ${this.io.where}`, { job, checkpoint }, { cause: e });
      }
      throw e;
    }
    this.headers.set(key, header);
    await this.cache.put(`M${key}`, body);
  }

  private async loadManifest(job: string, n: number): Promise<{ header: ManifestHeader; maps: PageMaps } | null> {
    const key = manifestKey(job, n);
    let body: Buffer | undefined = await this.cache.get(`M${key}`);
    if (!body) {
      body = (await this.io.get(key)) ?? undefined;
      if (!body) return null;
      const dec = decodeManifest(body, job, n);
      // Not waited for (a 5 MiB value takes LevelDB 15-40 ms here, on the way to every restore):
      // it is only a cache; deletes of manifests and close() wait for it.
      this.cacheLater(`M${key}`, body);
      this.headers.set(key, dec.header);
      return dec;
    }
    const dec = decodeManifest(body, job, n);
    this.headers.set(key, dec.header);
    return dec;
  }

  async getHeader(job: string, checkpoint: number): Promise<ManifestHeader | null> {
    this.checkOpen();
    const hit = this.headers.get(manifestKey(job, checkpoint));
    if (hit) return hit;
    return (await this.loadManifest(job, checkpoint))?.header ?? null;
  }

  async getMaps(job: string, checkpoint: number): Promise<PageMaps | null> {
    this.checkOpen();
    return (await this.loadManifest(job, checkpoint))?.maps ?? null;
  }

  /** Lists the bucket every time: manifests committed by other servers appear, deleted ones go. */
  async listHeaders(job?: string): Promise<ManifestHeader[]> {
    this.checkOpen();
    const objs = await this.io.list(job === undefined ? 'manifests/' : `manifests/${job}/`);
    const keys = new Set<string>();
    const out = await Promise.all(objs.map((o) => this.reads.run(async () => {
      const c = parseCkptKey(o.key);
      if (!c || c.kind !== 'manifest' || (job !== undefined && c.job !== job)) return null;
      keys.add(o.key);
      const hit = this.headers.get(o.key);
      if (hit) return hit;
      try {
        return (await this.loadManifest(c.job, c.checkpoint))?.header ?? null;
      } catch (e) {
        // One damaged manifest must not make every listing fail; getHeader/getMaps on it report CORRUPT.
        if ((e as ExaError).code !== 'CORRUPT') throw e;
        process.emitWarning(`exa s3: ${(e as Error).message}; leaving it out of the listing`);
        return null;
      }
    })));
    for (const k of [...this.headers.keys()]) {
      const c = parseCkptKey(k);
      if (c && (job === undefined || c.job === job) && !keys.has(k)) {
        this.headers.delete(k);
        await this.cacheSettled();
        await this.cache.del(`M${k}`);
      }
    }
    const hs = out.filter((h): h is ManifestHeader => h !== null);
    hs.sort((a, b) => (a.job < b.job ? -1 : a.job > b.job ? 1 : a.checkpoint - b.checkpoint));
    return hs;
  }

  async lastNumber(job: string): Promise<number> {
    this.checkOpen();
    const [m, d] = await Promise.all([this.io.list(`manifests/${job}/`), this.io.list(`deleted/${job}/`)]);
    let last = 0;
    for (const o of [...m, ...d]) {
      const c = parseCkptKey(o.key);
      if (c && c.job === job && c.checkpoint > last) last = c.checkpoint;
    }
    return last;
  }

  async deleteManifests(job: string, checkpoints: readonly number[]): Promise<void> {
    this.checkOpen();
    for (const n of checkpoints) {
      // The marker first: the number stays used even if the delete below fails.
      await this.io.putNew(deletedKey(job, n), Buffer.alloc(0)).catch((e: unknown) => {
        if ((e as ExaError).code !== 'CONFLICT') throw e;
      });
      const key = manifestKey(job, n);
      await this.io.del(key);
      this.headers.delete(key);
      await this.cacheSettled();
      await this.cache.del(`M${key}`);
    }
  }

  async manifestBytes(): Promise<number> {
    this.checkOpen();
    return (await this.io.list('manifests/')).reduce((a, o) => a + o.size, 0);
  }

  // ---- GC marks: this server's own, in the local cache ----

  async getMarks(hashes: readonly Buffer[]): Promise<(number | null)[]> {
    if (hashes.length === 0) return [];
    const vals = await this.cache.getMany(hashes.map((h) => `G${h.toString('hex')}`));
    return vals.map((v) => (v ? Number(v.readBigUInt64BE(0)) : null));
  }

  async putMarks(marks: readonly { hash: Buffer; at: number }[]): Promise<void> {
    if (marks.length === 0) return;
    await this.cache.batch(marks.map((m) => {
      const v = Buffer.allocUnsafe(8);
      v.writeBigUInt64BE(BigInt(m.at));
      return { type: 'put' as const, key: `G${m.hash.toString('hex')}`, value: v };
    }));
  }

  async deleteMarks(hashes: readonly Buffer[]): Promise<void> {
    if (hashes.length === 0) return;
    await this.cache.batch(hashes.map((h) => ({ type: 'del' as const, key: `G${h.toString('hex')}` })));
  }

  async countMarks(): Promise<number> {
    let n = 0;
    for await (const _k of this.cache.keys({ gte: 'G', lt: 'H' })) n++;
    return n;
  }

  /** Runs the pack-level sweep and a repack (see the top of this file and repack()). */
  async compactStorage(): Promise<void> {
    this.checkOpen();
    await this.sweep();
    await this.repack();
  }

  /** Uncommitted pages are dropped (nothing refers to them); in-flight uploads are awaited. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all([...this.packsByBase.values()].map((p) => p.upload));
    this.io.close();
    await this.cacheSettled();
    await this.cache.close().catch(() => undefined);
    if (this.tempCache) rmSync(this.tempCache, { recursive: true, force: true });
  }

  /** A local cache write nobody waits for (failure only costs a later re-fetch). */
  private cacheLater(key: string, value: Buffer): void {
    const p: Promise<void> = this.cache.put(key, value).catch(() => undefined).finally(() => { this.cacheWrites.delete(p); });
    this.cacheWrites.add(p);
  }

  /** Wait for cacheLater() writes issued so far (before a delete that must not be overtaken, and at close). */
  private async cacheSettled(): Promise<void> {
    while (this.cacheWrites.size > 0) await Promise.all([...this.cacheWrites]);
  }

  private checkOpen(): void {
    if (this.closed) throw new ExaError('UNAVAILABLE', `the S3 backend for ${this.io.where} is closed`);
  }
}
