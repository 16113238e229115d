/**
 * The embedded backend (store format 4): page bytes in append-only pack
 * files, LevelDB (through `level`) only as the index, manifests and GC marks.
 *
 * Layout of the data directory:
 *   packs/XXXXXXXX.pack          page bytes, 4096 each, back to back; the
 *                                name is the pack id in hex (ids never reused)
 *   index/  (LevelDB; keys and values are raw bytes):
 *   'H' hash(32)                  -> ref: pack id (u32 BE), slot (u32 BE)   hash index
 *   'M' job 0x00 ckpt(u32 BE)     -> header JSON             committed checkpoints
 *   'P' job 0x00 ckpt(u32 BE)     -> page maps (40 B/page)   full page maps (of a checkpoint, or kept
 *                                                            as the base of later checkpoints' deltas)
 *   'R' job 0x00 ckpt(u32 BE)     -> base ckpt (u32 BE),     this checkpoint's map is a delta against base's;
 *                                    SHA-256 of its map      the rebuilt map is checked against the hash
 *   'Q' job 0x00 base ckpt        -> delta (storage/mapdelta.ts): the entries that differ from base's map
 *   'J' job                       -> last number (u32 BE)    numbers are never reused
 *   'G' hash(32)                  -> marked-at ms (u64 BE)   GC phase-1 marks
 *   'V'                           -> format (u32 BE) = 4
 *   'K'                           -> highest pack id ever created (u32 BE)
 *
 * Why packs: with page bytes in LevelDB every byte went through its WAL, a
 * memtable and table files (CRC32C, copies, compaction): 11-14 CPU s per GiB
 * ingested. A pack is written once, one append per batch of pages (with
 * O_DIRECT from an aligned buffer where the file system allows it: fresh
 * page-cache pages cost more CPU than the copy, native/addon/packio.cc says
 * why), and read back with pread at slot x 4096 (packio.cc: many
 * ranges a call on the libuv pool, each page checked against its SHA-256 in
 * the same pass). The ref of a page is its location, so a restore reads
 * pages without an index lookup.
 *
 * Durability and the crash hazard. An index entry must never outlive its
 * bytes: dedup would skip a page the store no longer has and later
 * checkpoints would silently lose it. So the index entries of new pages are
 * kept in memory (`pending`, visible to lookup) and written only after their
 * packs were fdatasync'ed: putManifest() syncs every pack written since the
 * last sync (and the packs directory when a pack was created), then writes
 * the pending entries and the manifest in ONE synced LevelDB batch (the
 * commit point). scanPages() (GC) first makes the pending entries durable
 * the same way, so GC sees every stored page. putPages() starts the same
 * flush in the background once 2^15 entries are pending (a large upload's
 * commit then has only the last of them to sync and write, instead of
 * stalling ~1.5 s a GiB), and waits for it once 2^18 are pending (memory
 * stays bounded in long uploads). Entries written early are harmless: each
 * names bytes already synced, and GC keeps an unreferenced page for its
 * grace period like any other. A crash
 * loses only pending entries: their bytes are orphans in packs, reclaimed by
 * sweepOrphans.
 * A new pack is started at every open (a crash may leave a torn tail in the
 * pack that was being written; nothing durable names those bytes).
 *
 * The page index in memory: at open every 'H' entry is loaded into a native
 * hash table (storage/pagetable.ts, native/addon/pageindex.cc), kept in step
 * with every change of the 'H' entries (new pages, GC deletions, repacks) and
 * holding the pending entries too; lookups of an upload's hashes are answered
 * from it in one native call per batch, without LevelDB (getMany of 2048 keys
 * cost ~0.5 CPU s per GiB of deduplicated ingest, the JS Maps of the pending
 * entries ~1 s per GiB of new pages). It is a cache of the durable index, never
 * the truth: a crash loses it and the next open rebuilds it. Memory: ~45-54
 * bytes per stored page (40-byte slots at most 3/4 full), i.e. 11-14 GiB per
 * TiB of unique pages (2^28 pages). Bound: `memoryIndexMaxPages` (default:
 * what fits in 1/8 of the machine's RAM); past it the table is dropped and
 * lookups go to LevelDB again (getMany), correct but slower. The pending
 * entries live in a second, small native table (at most pendingFlush entries).
 *
 * GC: deletePages() removes index entries; sweepOrphans() (end of GC phase 2)
 * reclaims space by rewriting packs whose live fraction is below one half
 * (live pages appended to the current pack, synced, then one synced batch
 * points their index entries at the new place, then the old pack is
 * unlinked; a pack with nothing live is just unlinked). Refs in manifests
 * that name a rewritten pack no longer resolve: the engine looks the hash up
 * again (refs are hints, storage/backend.ts). Pack ids are never reused
 * ('K' keeps the highest one, durable before any pack with it can be
 * removed), so a stale ref does not name other bytes (and were it to, the
 * engine's hash check would catch it). A pack's file descriptor is closed
 * only when no read is in flight on it.
 *
 * Descriptors: packs are opened on their first read, not at open (a 1 TiB
 * store has ~16k packs); at most maxOpenPacks stay open, the least recently
 * used idle ones closed first (acquire/release). A pack being read or synced,
 * the current pack and packs with unsynced appends are never closed.
 *
 * Page maps. A map is 40 bytes a page (10 MiB per GiB of image) however few
 * pages an increment changed, so a checkpoint whose map differs from its
 * parent's base map in at most 1/DELTA_DIVISOR of the entries stores only
 * those entries ('R', 'Q'); others store the whole map ('P') and become the
 * base of the next ones. Reading a map is still two reads, however long the
 * chain (a delta is always against a full map, never against another
 * delta). A delta's index entries and base number are not covered by the
 * page checks (a misplaced entry names a real page that hashes right), so
 * the base record holds the SHA-256 of the map it rebuilds and every read
 * checks it: a damaged delta, base record or base is CORRUPT, never a
 * silently wrong image. Deleting a checkpoint keeps its full map while
 * deltas need it; the last delete that frees it removes it (in the same
 * batch). Format 3 (whole maps only) is read as it is and marked 4 on open.
 *
 * Upgrade from format 2 (page groups in a second LevelDB, `pages/`): on open,
 * every page is copied into packs (any packs of an interrupted conversion are
 * removed first), the packs are synced, then one synced batch of the index
 * database points every 'H' entry and every page-map ref at the packs and
 * sets the format to 3; only then is `pages/` removed (again at the next open
 * if a crash came first).
 */
import { constants as fsc, mkdirSync, readdirSync, rmSync, statSync } from 'node:fs';
import { open as openFile, type FileHandle } from 'node:fs/promises';
import { totalmem } from 'node:os';
import { join } from 'node:path';
import { Level } from 'level';
import { ExaError, toExaError } from '../src/errors.js';
import { packAdvise, packRead, packWrite } from '../src/native.js';
import type { Backend, ManifestHeader, NewPage, PageMaps, PageRef, StoredPage } from './backend.js';
import { Mutex } from './mutex.js';
import { applyMapDelta, mapDelta } from './mapdelta.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, REF_BYTES, isZeroHash, sha256 } from './pages.js';
import { PageTable, joinHashes } from './pagetable.js';

type DB = Level<Buffer, Buffer>;
type Op = { type: 'put'; key: Buffer; value: Buffer } | { type: 'del'; key: Buffer };

const D = 0x44, H = 0x48, M = 0x4d, P = 0x50, Q = 0x51, R = 0x52, J = 0x4a, G = 0x47, V = 0x56, K = 0x4b;
const FORMAT = 4;
/**
 * A checkpoint's page map is stored as a delta against its base's full map
 * while at most 1/DELTA_DIVISOR of its entries differ from it; past that it
 * is stored whole and becomes the base of the checkpoints after it. With
 * random 1 % increments a full map comes every ~13 checkpoints: ~1/7 of the
 * bytes of a full map each.
 */
const DELTA_DIVISOR = 8;
/** A pack is closed for appends once it reaches this size (a batch may overshoot it). */
const PACK_BYTES = 64 * 1024 * 1024;
/** Packs whose live fraction is below this are rewritten by sweepOrphans. */
const REPACK_LIVE_FRACTION = 0.5;
/** Pages per native read call; larger reads are split so two pool threads share them. */
const READ_SPLIT_PAGES = 128;
const PACK_RE = /^([0-9a-f]{8})\.pack$/;
/** Pending (not yet durable) index entries at which putPages makes them durable without waiting for a commit. */
const PENDING_FLUSH = 1 << 18;
/**
 * Pending entries at which putPages starts making them durable in the
 * background (128 MiB of pages), so that a large upload's commit finds only
 * the last few of them (1 GiB at once: ~1.5 s of pack syncs and index
 * writes at the commit, with the upload stalled).
 */
const BACKGROUND_FLUSH = 1 << 15;
/** Pages between two needed slots of a pack below which prefetch reads the gap too (256 KiB). */
const PREFETCH_GAP = 64;

function packName(id: number): string {
  return `${id.toString(16).padStart(8, '0')}.pack`;
}
function makeRef(pack: number, slot: number): PageRef {
  const r = Buffer.allocUnsafe(8);
  r.writeUInt32BE(pack, 0);
  r.writeUInt32BE(slot, 4);
  return r;
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
/** prefix, job, 0x00: the start of every per-checkpoint key of the job. */
function jobPrefix(prefix: number, job: string): Buffer {
  return Buffer.concat([Buffer.from([prefix]), Buffer.from(job, 'utf8'), Buffer.from([0])]);
}
/** 'Q' job 0x00 base(u32 BE) ckpt(u32 BE): the base first, so a key-only scan tells which bases are in use. */
function deltaKey(job: string, base: number, n: number): Buffer {
  const k = ckptKey(Q, job, base);
  const b = Buffer.allocUnsafe(k.length + 4);
  k.copy(b);
  b.writeUInt32BE(n, k.length);
  return b;
}
/** 'R' value: the base's number (u32 BE), then the SHA-256 of the whole map the delta rebuilds (checked on every read). */
const BASE_REF_BYTES = 4 + HASH_BYTES;
function baseRef(base: number, flat: Buffer): Buffer {
  const b = Buffer.allocUnsafe(BASE_REF_BYTES);
  b.writeUInt32BE(base);
  sha256(flat).copy(b, 4);
  return b;
}
/** The base a well-formed 'R' value names, else null. */
function baseOf(r: Buffer | undefined): number | null {
  return r && r.length === BASE_REF_BYTES ? r.readUInt32BE(0) : null;
}
function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n);
  return b;
}
function jobKey(job: string): Buffer {
  return Buffer.concat([Buffer.from([J]), Buffer.from(job, 'utf8')]);
}
function prefixRange(prefix: Buffer): { gte: Buffer; lt: Buffer } {
  const lt = Buffer.from(prefix);
  lt[lt.length - 1]! += 1;
  return { gte: prefix, lt };
}

/**
 * One pack file: appended to while it is the current pack, read at any time.
 * Its descriptor is opened on demand and may be closed again by the backend's
 * bounded cache of open packs (LevelBackend.acquire/release): never while a
 * read or sync holds it (reads > 0), while it is the current pack, or while
 * it has unsynced writes.
 */
class Pack {
  /** Reads (and syncs) in flight: the fd stays open until they are done. */
  reads = 0;
  /** Unlinked: close the fd when the last read is done. */
  retired = false;
  /** Written since the last fdatasync. */
  dirty = false;
  /** While this is the current pack: a second descriptor opened with O_DIRECT for appends (null: buffered appends through fh). */
  direct: FileHandle | null = null;
  /** The open descriptor (null while closed; the next read opens it again). */
  fh: FileHandle | null;
  /** An open of fh in flight (concurrent readers share it). */
  opening: Promise<FileHandle> | null = null;
  constructor(readonly id: number, fh: FileHandle | null, public size: number) { this.fh = fh; }
  get slots(): number { return Math.floor(this.size / PAGE_SIZE); }
}

export interface LevelBackendOptions {
  /** LevelDB block cache of the index (bytes). */
  cacheSize?: number;
  /** Pack size (bytes) at which a new pack is started (tests use small packs). */
  packBytes?: number;
  /** Append with O_DIRECT where the file system allows it (default true). */
  directIo?: boolean;
  /** Pending index entries at which putPages makes them durable itself (default 2^18; tests use few). */
  pendingFlush?: number;
  /** Pending index entries at which putPages starts making them durable in the background (default 2^15; 0 = never). */
  backgroundFlush?: number;
  /**
   * Most pages the in-memory page index may hold (default: 1/8 of the RAM at
   * 54 bytes a page); with more, lookups go to LevelDB. 0 = no in-memory index.
   */
  memoryIndexMaxPages?: number;
  /**
   * Pack files kept open for reads (default 512, i.e. 32 GiB of 64 MiB packs;
   * a 1 TiB store has ~16k packs, more than a process may open). Beyond it the
   * least recently used idle descriptors are closed; a read reopens them.
   * Packs being read, synced or written stay open whatever the count.
   */
  maxOpenPacks?: number;
}

/** Bytes of the in-memory index per page, upper bound (40-byte slots, at least 3/4 full after growth). */
export const MEMORY_INDEX_BYTES_PER_PAGE = 54;

export class LevelBackend implements Backend {
  readonly kind = 'leveldb';
  private readonly packs = new Map<number, Pack>();
  private current: Pack | null = null;
  private nextPackId = 1;
  /** A pack file was created since the packs directory was last synced. */
  private dirDirty = false;
  /** Index entries of pages written but not yet durable (hash -> ref). */
  private readonly pending = new PageTable();
  /** Every index entry, durable and pending (hash -> ref); null when the store outgrew memoryIndexMaxPages. */
  private index: PageTable | null = null;
  private readonly memoryIndexMaxPages: number;
  /** Scratch table for duplicate hashes within one putPages call. */
  private readonly seen = new PageTable();
  /** Pages removed by deletePages per pack since open (to tell orphans from GC'd pages in sweepOrphans). */
  private readonly deletedIn = new Map<number, number>();
  private pages = 0;
  private readonly packBytes: number;
  private readonly pendingFlush: number;
  private readonly backgroundFlush: number;
  /** The background flush under way (at most one; a failed one is retried, and reported, by the next flush). */
  private bgFlush: Promise<void> | null = null;
  /** Appends use O_DIRECT (turned off when the file system refuses it). */
  private directIo: boolean;
  private readonly writeLock = new Mutex();
  private readonly manifestLock = new Mutex();
  private readonly syncLock = new Mutex();
  private closed = false;
  /** Packs holding copies written by relocatePages whose commitRelocation has not run: never swept. */
  private readonly relocating = new Set<number>();
  /** Packs whose fh is open, least recently used first (the descriptor cache). */
  private readonly openFds = new Map<number, Pack>();
  private readonly maxOpenPacks: number;

  private constructor(private readonly db: DB, readonly dir: string, opts: LevelBackendOptions) {
    this.packBytes = opts.packBytes ?? PACK_BYTES;
    this.directIo = opts.directIo ?? true;
    this.pendingFlush = opts.pendingFlush ?? PENDING_FLUSH;
    this.backgroundFlush = opts.backgroundFlush ?? BACKGROUND_FLUSH;
    this.memoryIndexMaxPages = opts.memoryIndexMaxPages ?? Math.floor(totalmem() / 8 / MEMORY_INDEX_BYTES_PER_PAGE);
    this.maxOpenPacks = Math.max(1, opts.maxOpenPacks ?? 512);
  }

  /** Whether lookups are answered from the in-memory page index (else from LevelDB). */
  get memoryIndex(): boolean { return this.index !== null; }

  private get packDir(): string { return join(this.dir, 'packs'); }

  /** Open (creating the directory and database when missing). UNAVAILABLE when another process holds it. */
  static async open(dir: string, opts: LevelBackendOptions = {}): Promise<LevelBackend> {
    try {
      mkdirSync(join(dir, 'packs'), { recursive: true });
    } catch (e) {
      throw toExaError(e, `data directory ${dir}`);
    }
    const index = await openDb(join(dir, 'index'), {
      cacheSize: opts.cacheSize ?? 64 * 1024 * 1024,
      writeBufferSize: 16 * 1024 * 1024,
      maxFileSize: 8 * 1024 * 1024,
      // Hashes, refs and page maps are random bytes: Snappy only spent CPU on them.
      compression: false,
    });
    const b = new LevelBackend(index, dir, opts);
    try {
      await b.init();
    } catch (e) {
      await b.close();
      throw e;
    }
    return b;
  }

  private async init(): Promise<void> {
    const v = await this.db.get(Buffer.from([V]));
    let format = v && v.length === 4 ? v.readUInt32BE(0) : 0;
    if (format === 2) {
      await this.convertFromFormat2();
      format = FORMAT;
    }
    if (format === 3) {
      // Format 3 stored every map whole, which format 4 reads as it is; from now on deltas may be written.
      await this.db.put(Buffer.from([V]), u32(FORMAT), { sync: true });
      format = FORMAT;
    }
    if (format !== FORMAT) {
      let any = false;
      for await (const _k of this.db.keys({ limit: 1 })) any = true;
      if (format !== 0 || any) {
        throw new ExaError('FAILED_PRECONDITION', `data directory ${this.dir} has store format ${format || 1}; this exastore reads formats 2 (converted on open), 3 (upgraded on open) and ${FORMAT}: archive the jobs with the older exastore and import them`);
      }
      await this.db.put(Buffer.from([V]), u32(FORMAT), { sync: true });
    }
    // A conversion that crashed after its commit leaves the old page database behind.
    rmSync(join(this.dir, 'pages'), { recursive: true, force: true });
    await this.openPacks();
    // Count the index entries and load them into the in-memory index (while they fit).
    let n = 0;
    let index: PageTable | null = this.memoryIndexMaxPages > 0 ? new PageTable() : null;
    const it = this.db.iterator({ gte: Buffer.from([H]), lt: Buffer.from([H + 1]) });
    try {
      for (;;) {
        const es = await it.nextv(10_000);
        if (es.length === 0) break;
        n += es.length;
        if (index && n > this.memoryIndexMaxPages) { index.close(); index = null; }
        if (!index) continue;
        const hashes = Buffer.allocUnsafe(es.length * HASH_BYTES), refs = Buffer.allocUnsafe(es.length * REF_BYTES);
        let k = 0;
        for (const [key, v] of es) {
          if (key.length !== 1 + HASH_BYTES || v.length !== REF_BYTES) continue; // not an entry this format writes: lookups miss it
          key.copy(hashes, k * HASH_BYTES, 1);
          v.copy(refs, k * REF_BYTES);
          k++;
        }
        index.set(hashes.subarray(0, k * HASH_BYTES), refs.subarray(0, k * REF_BYTES));
      }
    } catch (e) {
      index?.close();
      throw e;
    } finally {
      await it.close();
    }
    this.index = index;
    this.pages = n;
  }

  /** Drop the in-memory index once the store holds more pages than it may (lookups then go to LevelDB). */
  private checkIndexBound(): void {
    if (this.index && this.index.size > this.memoryIndexMaxPages) {
      this.index.close();
      this.index = null;
    }
  }

  private async openPacks(): Promise<void> {
    const hw = await this.db.get(Buffer.from([K]));
    if (hw && hw.length === 4) this.nextPackId = Math.max(this.nextPackId, hw.readUInt32BE(0) + 1);
    for (const name of readdirSync(this.packDir)) {
      const m = PACK_RE.exec(name);
      if (!m) continue;
      const id = parseInt(m[1]!, 16);
      if (this.packs.has(id)) continue; // written by the conversion, already open
      // Only its size now: the descriptor is opened by the first read (bounded cache).
      let size: number;
      try {
        size = statSync(join(this.packDir, name)).size;
      } catch (e) {
        throw toExaError(e, `cannot open pack ${name} in ${this.packDir}`);
      }
      this.packs.set(id, new Pack(id, null, size));
      if (id >= this.nextPackId) this.nextPackId = id + 1;
    }
  }

  /** The pack to append `bytes` to (a new one when the current one is full or none is open). */
  private async packFor(bytes: number): Promise<Pack> {
    const cur = this.current;
    if (cur && (cur.size === 0 || cur.size + bytes <= this.packBytes)) return cur;
    const id = this.nextPackId++;
    // The high-water mark goes to the index log (made durable by the next synced
    // batch, which comes before any sweep can remove this pack).
    await this.db.put(Buffer.from([K]), u32(id));
    let fh: FileHandle;
    try {
      fh = await openFile(join(this.packDir, packName(id)), 'wx+');
    } catch (e) {
      throw toExaError(e, `cannot create pack ${packName(id)} in ${this.packDir}`);
    }
    const p = new Pack(id, fh, 0);
    this.openFds.set(id, p);
    if (this.directIo) {
      // Appends bypass the page cache (native/addon/packio.cc says why); reads stay buffered.
      try {
        p.direct = await openFile(join(this.packDir, packName(id)), fsc.O_WRONLY | fsc.O_DIRECT);
      } catch {
        this.directIo = false; // e.g. tmpfs: EINVAL
      }
    }
    if (cur?.direct) { await cur.direct.close().catch(() => undefined); cur.direct = null; }
    this.packs.set(id, p);
    this.current = p;
    this.dirDirty = true;
    this.trimFds();
    return p;
  }

  /** Append whole pages to the current pack; the slot of the first one. */
  private async append(bufs: Buffer[], bytes: number): Promise<{ pack: Pack; slot: number }> {
    const pack = await this.packFor(bytes);
    const at = pack.size;
    // Reserve the range before the write so a concurrent append (repack) never overlaps it.
    pack.size += bytes;
    try {
      if (pack.direct) {
        await packWrite(pack.direct.fd, at, bufs);
        pack.dirty = true;
        return { pack, slot: at / PAGE_SIZE };
      }
      let pos = at;
      for (let i = 0; i < bufs.length; i += 512) {
        const chunk = bufs.slice(i, i + 512);
        const want = chunk.reduce((a, b) => a + b.length, 0);
        // (The current pack is never closed by the descriptor cache.)
        let done = (await pack.fh!.writev(chunk, pos)).bytesWritten;
        if (done < want) {
          // A short write: the rest from one copy.
          const all = Buffer.concat(chunk, want);
          while (done < want) {
            const n = (await pack.fh!.write(all, done, want - done, pos + done)).bytesWritten;
            if (n <= 0) throw new Error('the write made no progress');
            done += n;
          }
        }
        pos += want;
      }
    } catch (e) {
      throw toExaError(e, `cannot write pack ${packName(pack.id)} in ${this.packDir}`);
    }
    pack.dirty = true;
    return { pack, slot: at / PAGE_SIZE };
  }

  /**
   * Make every pending index entry durable: fdatasync the packs written since
   * the last sync (and the directory when packs were created), then one synced
   * batch with the entries and `extra` (a manifest). Entries added while the
   * sync runs wait for the next call.
   */
  private flushPending(extra: Op[] = []): Promise<void> {
    return this.syncLock.run(async () => {
      // Snapshot: n x 40 bytes (hash, ref); entries added while the sync runs wait for the next call.
      const entries = this.pending.size > 0 ? this.pending.entries() : Buffer.alloc(0);
      const n = entries.length / ENTRY_BYTES;
      const dirty = [...this.packs.values()].filter((p) => p.dirty);
      for (const p of dirty) p.dirty = false;
      const dirDirty = this.dirDirty;
      this.dirDirty = false;
      try {
        await Promise.all(dirty.map((p) => this.syncPack(p)));
        if (dirDirty) {
          const d = await openFile(this.packDir, 'r');
          try { await d.sync(); } finally { await d.close(); }
        }
      } catch (e) {
        for (const p of dirty) p.dirty = true;
        this.dirDirty ||= dirDirty;
        throw toExaError(e, `cannot sync packs in ${this.packDir}`);
      }
      if (n + extra.length > 0) {
        // A chained batch: abstract-level's array form spent ~10 us of JS per
        // operation (0.72 CPU s for 65,536 index entries, chained: 0.095 s).
        // Keys are views of one buffer, values views of the snapshot.
        const b = this.db.batch();
        const keys = Buffer.allocUnsafe(n * (1 + HASH_BYTES));
        for (let i = 0; i < n; i++) {
          const ko = i * (1 + HASH_BYTES), eo = i * ENTRY_BYTES;
          keys[ko] = H;
          entries.copy(keys, ko + 1, eo, eo + HASH_BYTES);
          b.put(keys.subarray(ko, ko + 1 + HASH_BYTES), entries.subarray(eo + HASH_BYTES, eo + ENTRY_BYTES));
        }
        for (const op of extra) { if (op.type === 'put') b.put(op.key, op.value); else b.del(op.key); }
        await b.write({ sync: true });
      }
      // A pending hash never gets another ref (putPages adds only absent hashes; deletePages skips pending ones).
      if (n > 0 && this.pending.size === n) this.pending.clear(); // nothing was added meanwhile (the usual case)
      else if (n > 0) {
        const hashes = Buffer.allocUnsafe(n * HASH_BYTES);
        for (let i = 0; i < n; i++) entries.copy(hashes, i * HASH_BYTES, i * ENTRY_BYTES, i * ENTRY_BYTES + HASH_BYTES);
        this.pending.delete(hashes);
      }
    });
  }

  /**
   * flushPending() without waiting for it: the packs written so far are
   * synced and their entries written while the upload goes on. A failure
   * loses nothing: the entries stay pending and the packs dirty, and the
   * next flush (at the latest the commit's) tries again and reports it.
   */
  private startBackgroundFlush(): void {
    const p = this.flushPending().catch(() => undefined).finally(() => { if (this.bgFlush === p) this.bgFlush = null; });
    this.bgFlush = p;
  }

  // ---- PageStore ----

  async lookup(hashes: readonly Buffer[]): Promise<(PageRef | null)[]> {
    if (hashes.length === 0) return [];
    const n = hashes.length;
    const refs = Buffer.allocUnsafe(n * REF_BYTES), found = new Uint8Array(n);
    await this.lookupMany(joinHashes(hashes), refs, found);
    const out = new Array<PageRef | null>(n);
    for (let i = 0; i < n; i++) out[i] = found[i] ? refs.subarray(i * REF_BYTES, (i + 1) * REF_BYTES) : null;
    return out;
  }

  /**
   * lookup() without a JS object per page: hashes n x 32 bytes; refs (n x 8)
   * receives the ref of each page found, found[i] = 1 where present. Returns
   * the number found. From the in-memory index in one native call; without
   * it, the pending entries then LevelDB getMany.
   */
  async lookupMany(hashes: Buffer, refs: Buffer, found: Uint8Array): Promise<number> {
    const n = hashes.length / HASH_BYTES;
    if (n === 0) return 0;
    if (this.index) return this.index.get(hashes, refs, found);
    let hits = this.pending.size > 0 ? this.pending.get(hashes, refs, found) : (found.fill(0), 0);
    const ask: number[] = [];
    for (let i = 0; i < n; i++) if (!found[i]) ask.push(i);
    if (ask.length === 0) return hits;
    const keys = ask.map((i) => hashKeyOf(H, hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES)));
    // Large lookups in two halves, so two pool threads share them.
    let vals: (Buffer | undefined)[];
    if (keys.length < 256) vals = await this.db.getMany(keys);
    else {
      const half = keys.length >> 1;
      const [a, b] = await Promise.all([this.db.getMany(keys.slice(0, half)), this.db.getMany(keys.slice(half))]);
      vals = a.concat(b);
    }
    ask.forEach((i, j) => {
      const v = vals[j];
      if (!v || v.length !== REF_BYTES) return;
      v.copy(refs, i * REF_BYTES);
      found[i] = 1;
      hits++;
    });
    return hits;
  }

  async putPages(pages: readonly NewPage[]): Promise<{ refs: PageRef[]; written: number }> {
    const n = pages.length;
    if (n === 0) return { refs: [], written: 0 };
    for (const p of pages) if (p.data.length !== PAGE_SIZE) throw new ExaError('INTERNAL', `a page of ${p.data.length} bytes`);
    const r = await this.storePages(joinHashes(pages.map((p) => p.hash)), (i) => pages[i]!.data);
    const refs = new Array<PageRef>(n);
    for (let i = 0; i < n; i++) refs[i] = r.refs.subarray(i * REF_BYTES, (i + 1) * REF_BYTES);
    return { refs, written: r.written };
  }

  /**
   * putPages() of n pages lying side by side in `data` (n x 4096 bytes, page i
   * hashing to hashes[32i..32i+32), already verified), without a JS object per
   * page: resolves with their refs (n x 8 bytes) and the number written.
   */
  putPageRun(hashes: Buffer, data: Buffer): Promise<{ refs: Buffer; written: number }> {
    const n = hashes.length / HASH_BYTES;
    if (!Number.isInteger(n) || data.length !== n * PAGE_SIZE) {
      return Promise.reject(new ExaError('INTERNAL', `putPageRun: ${hashes.length} bytes of hashes for ${data.length} bytes of pages`));
    }
    return this.storePages(hashes, data);
  }

  /** pages: side by side in one buffer (runs of new pages are cut from it by index), or page i of the call as page(i). */
  private storePages(hashes: Buffer, pages: Buffer | ((i: number) => Buffer)): Promise<{ refs: Buffer; written: number }> {
    // Serialized so that two sessions uploading the same page store it once.
    return this.writeLock.run(async () => {
      this.checkOpen();
      const n = hashes.length / HASH_BYTES;
      const refs = Buffer.allocUnsafe(n * REF_BYTES);
      const have = new Uint8Array(n);
      const hits = await this.lookupMany(hashes, refs, have);
      if (hits === n) return { refs, written: 0 };
      // The pages to write, in order; a hash repeated within the call is written once.
      const fresh: number[] = [];
      const dup: [number, number][] = [];
      const m = n - hits;
      let missing = hashes;
      if (hits > 0) {
        missing = Buffer.allocUnsafe(m * HASH_BYTES);
        let k = 0;
        for (let i = 0; i < n; i++) if (!have[i]) hashes.copy(missing, (k++) * HASH_BYTES, i * HASH_BYTES, (i + 1) * HASH_BYTES);
      }
      let firstOf: Map<string, number> | null = null;
      if (this.seen.add(missing, null) !== m) {
        // Rare: repeats within the call (the engine sends each hash once).
        firstOf = new Map();
      }
      this.seen.clear();
      for (let i = 0; i < n; i++) {
        if (have[i]) continue;
        if (firstOf) {
          const k = hashes.toString('latin1', i * HASH_BYTES, (i + 1) * HASH_BYTES);
          const first = firstOf.get(k);
          if (first !== undefined) { dup.push([i, first]); continue; }
          firstOf.set(k, i);
        }
        fresh.push(i);
      }
      // Pages that lie side by side in one message go in as one buffer, without a copy.
      const bufs: Buffer[] = [];
      if (Buffer.isBuffer(pages)) {
        // By index: no view per page (two typed arrays a page: 0.085-0.09 CPU s per GiB of new pages, timed alone).
        for (let k = 0; k < fresh.length;) {
          let e = k + 1;
          while (e < fresh.length && fresh[e] === fresh[e - 1]! + 1) e++;
          bufs.push(pages.subarray(fresh[k]! * PAGE_SIZE, (fresh[e - 1]! + 1) * PAGE_SIZE));
          k = e;
        }
      } else {
        let cur: Buffer | null = null;
        for (const i of fresh) {
          const d = pages(i);
          if (cur && cur.buffer === d.buffer && cur.byteOffset + cur.length === d.byteOffset) {
            cur = Buffer.from(cur.buffer, cur.byteOffset, cur.length + PAGE_SIZE);
          } else {
            if (cur) bufs.push(cur);
            cur = d;
          }
        }
        bufs.push(cur!);
      }
      const { pack, slot } = await this.append(bufs, fresh.length * PAGE_SIZE);
      let newHashes: Buffer, newRefs: Buffer;
      if (fresh.length === n) {
        // Every page is new (the usual case of new data): no gathering.
        for (let i = 0; i < n; i++) {
          refs.writeUInt32BE(pack.id, i * REF_BYTES);
          refs.writeUInt32BE(slot + i, i * REF_BYTES + 4);
        }
        newHashes = hashes;
        newRefs = refs;
      } else {
        newHashes = Buffer.allocUnsafe(fresh.length * HASH_BYTES);
        newRefs = Buffer.allocUnsafe(fresh.length * REF_BYTES);
        fresh.forEach((i, j) => {
          newRefs.writeUInt32BE(pack.id, j * REF_BYTES);
          newRefs.writeUInt32BE(slot + j, j * REF_BYTES + 4);
          newRefs.copy(refs, i * REF_BYTES, j * REF_BYTES, (j + 1) * REF_BYTES);
          hashes.copy(newHashes, j * HASH_BYTES, i * HASH_BYTES, (i + 1) * HASH_BYTES);
        });
      }
      this.pending.set(newHashes, newRefs);
      this.index?.set(newHashes, newRefs);
      for (const [i, first] of dup) refs.copy(refs, i * REF_BYTES, first * REF_BYTES, (first + 1) * REF_BYTES);
      this.pages += fresh.length;
      this.checkIndexBound();
      // Bounded memory for long uploads: past PENDING_FLUSH entries (1 GiB of pages,
      // ~12 MB of native table), sync the packs and make the entries durable now.
      if (this.pending.size >= this.pendingFlush) await this.flushPending();
      else if (this.backgroundFlush > 0 && this.pending.size >= this.backgroundFlush && !this.bgFlush) this.startBackgroundFlush();
      return { refs, written: fresh.length };
    });
  }

  async readPages(refs: readonly PageRef[]): Promise<(Buffer | null)[]> {
    if (refs.length === 0) return [];
    const dst = Buffer.allocUnsafe(refs.length * PAGE_SIZE);
    const { present } = await this.readInto(refs, dst, null);
    const out = new Array<Buffer | null>(refs.length);
    for (let i = 0; i < refs.length; i++) out[i] = present[i] ? dst.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE) : null;
    return out;
  }

  /**
   * Read page i of refs into dst at i x 4096 and check it against hashes[32i..]:
   * 1 when the page is there and matches, 2 when it is there but does not, 0 when missing. Coalesces consecutive slots of
   * a pack into one pread; the work runs on two pool threads (native/addon/packio.cc).
   */
  async readPagesVerified(refs: readonly PageRef[], hashes: Buffer, dst: Buffer): Promise<Uint8Array> {
    if (refs.length === 0) return new Uint8Array(0);
    const { present, ok } = await this.readInto(refs, dst, hashes);
    // 1 = present and matching, 2 = present but not matching, 0 = missing.
    for (let i = 0; i < refs.length; i++) ok![i] = present[i] ? (ok![i] ? 1 : 2) : 0;
    return ok!;
  }

  private async readInto(refs: readonly PageRef[], dst: Buffer, hashes: Buffer | null): Promise<{ present: Uint8Array; ok: Uint8Array | null }> {
    const n = refs.length;
    const present = new Uint8Array(n);
    const ok = hashes ? new Uint8Array(n) : null;
    const parts = n >= 2 * READ_SPLIT_PAGES ? 2 : 1;
    const per = Math.ceil(n / parts);
    await Promise.all(Array.from({ length: parts }, (_, k) => this.readPart(refs, k * per, Math.min(n, (k + 1) * per), dst, hashes, present, ok)));
    return { present, ok };
  }

  private async readPart(refs: readonly PageRef[], from: number, to: number, dst: Buffer, hashes: Buffer | null, present: Uint8Array, ok: Uint8Array | null): Promise<void> {
    if (from >= to) return;
    // Ranges: fd, file offset, length, dst offset (relative to this part's view of dst).
    const ops: number[] = [];
    const first: number[] = [];       // first page index of each range
    // The packs this part reads, held (open, not closed by the descriptor cache) until the read is done.
    const held = new Map<number, number>(); // pack id -> fd (-1: cannot be opened)
    const holding: Pack[] = [];
    const opens: Promise<void>[] = [];
    for (let i = from; i < to; i++) {
      const r = refs[i]!;
      if (r.length !== 8) continue;
      const id = r.readUInt32BE(0);
      if (held.has(id)) continue;
      const pack = this.packs.get(id);
      if (!pack || pack.retired) continue;
      held.set(id, -1);
      holding.push(pack);
      opens.push(this.acquire(pack).then((fd) => { held.set(id, fd); }));
    }
    try {
      await Promise.all(opens);
      let prevPack = -1, prevSlot = -1;
      for (let i = from; i < to; i++) {
        const r = refs[i]!;
        if (r.length !== 8) { prevPack = -1; continue; }
        const id = r.readUInt32BE(0), slot = r.readUInt32BE(4);
        const pack = this.packs.get(id);
        const fd = held.get(id) ?? -1;
        // A pack that is gone (repacked) or cannot be opened: its pages are missing here (the engine looks them up again).
        if (!pack || fd < 0 || (slot + 1) * PAGE_SIZE > pack.size) { prevPack = -1; continue; }
        if (id === prevPack && slot === prevSlot + 1 && first.length > 0 && ops[ops.length - 1]! + ops[ops.length - 2]! === (i - from) * PAGE_SIZE) {
          ops[ops.length - 2]! += PAGE_SIZE;
        } else {
          ops.push(fd, slot * PAGE_SIZE, PAGE_SIZE, (i - from) * PAGE_SIZE);
          first.push(i);
        }
        prevPack = id;
        prevSlot = slot;
      }
      if (ops.length === 0) return;
      const view = dst.subarray(from * PAGE_SIZE, to * PAGE_SIZE);
      const res = await packRead(new Float64Array(ops), view, hashes ? hashes.subarray(from * HASH_BYTES, to * HASH_BYTES) : null);
      for (let k = 0; k < first.length; k++) {
        const got = res.got[k]!;
        const len = ops[4 * k + 2]!;
        const whole = got < 0 ? 0 : Math.floor(got / PAGE_SIZE);
        for (let j = 0; j < len / PAGE_SIZE; j++) if (j < whole) present[first[k]! + j] = 1;
      }
      if (ok && res.ok) for (let i = from; i < to; i++) ok[i] = res.ok[i - from]!;
    } finally {
      for (const p of holding) this.release(p);
    }
  }

  /**
   * Hold a pack for a read (or sync): its descriptor is opened if the cache
   * closed it, and stays open until release(). Resolves with the fd, or -1
   * (still held: release it) when the file cannot be opened (a repack
   * unlinked it meanwhile).
   */
  private async acquire(pack: Pack): Promise<number> {
    pack.reads++;
    if (!pack.fh) {
      pack.opening ??= openFile(join(this.packDir, packName(pack.id)), 'r').then(
        (fh) => { pack.opening = null; pack.fh = fh; this.openFds.set(pack.id, pack); return fh; },
        (e: unknown) => { pack.opening = null; throw e; });
      try {
        await pack.opening;
      } catch {
        return -1;
      }
    }
    // Most recently used last.
    this.openFds.delete(pack.id);
    this.openFds.set(pack.id, pack);
    return pack.fh ? pack.fh.fd : -1;
  }

  private release(pack: Pack): void {
    if (--pack.reads > 0) return;
    if (pack.retired) void this.closeFd(pack);
    else this.trimFds();
  }

  /** fdatasync a pack, held meanwhile so that the descriptor cache leaves its fd alone. */
  private async syncPack(pack: Pack): Promise<void> {
    const fd = await this.acquire(pack);
    try {
      if (fd < 0) throw new ExaError('INTERNAL', `pack ${packName(pack.id)} cannot be opened to sync it`);
      await pack.fh!.datasync();
    } finally {
      this.release(pack);
    }
  }

  private closeFd(pack: Pack): Promise<void> {
    this.openFds.delete(pack.id);
    const fh = pack.fh;
    pack.fh = null;
    return fh ? fh.close().catch(() => undefined) : Promise.resolve();
  }

  /** Close the least recently used idle descriptors beyond maxOpenPacks. */
  private trimFds(): void {
    if (this.openFds.size <= this.maxOpenPacks) return;
    for (const p of this.openFds.values()) {
      if (this.openFds.size <= this.maxOpenPacks) break;
      if (p.reads > 0 || p.dirty || p === this.current || p.opening) continue;
      void this.closeFd(p);
    }
  }

  /**
   * Compaction, step 1: append copies of pages (already verified by the
   * engine) to packs, in the order given, and return their refs. Nothing
   * names them until commitRelocation; GC leaves those packs alone meanwhile.
   * A crash before the commit leaves orphan bytes for sweepOrphans.
   */
  relocatePages(pages: readonly { hash: Buffer; data: Buffer }[]): Promise<PageRef[]> {
    return this.writeLock.run(async () => {
      this.checkOpen();
      if (pages.length === 0) return [];
      const { pack, slot } = await this.append(pages.map((p) => p.data), pages.length * PAGE_SIZE);
      this.relocating.add(pack.id);
      return pages.map((_p, j) => makeRef(pack.id, slot + j));
    });
  }

  /**
   * Compaction, step 2: make the copies durable (packs synced), then in one
   * synced batch point the index entry of every moved hash that still has
   * one at its copy, and store the given page maps of checkpoints that still
   * exist. Old copies become orphans (sweepOrphans reclaims them); maps not
   * rewritten keep old refs, which the engine resolves by lookup (refs are hints).
   */
  commitRelocation(moves: readonly StoredPage[], maps: readonly { job: string; checkpoint: number; maps: PageMaps }[]): Promise<void> {
    return this.writeLock.run(async () => {
      this.checkOpen();
      const ops: Op[] = [];
      const current = await this.lookup(moves.map((m) => m.hash));
      moves.forEach((m, i) => { if (current[i]) ops.push({ type: 'put', key: hashKeyOf(H, m.hash), value: m.ref }); });
      // Under the manifest lock until written: a delete in between could drop a base these maps are stored against.
      await this.manifestLock.run(async () => {
        ops.push(...(await this.relocatedMapOps(maps)));
        await this.flushPending(ops);
      });
      // The in-memory index answers lookups: it must name the copies too (the old ones become orphans).
      if (this.index) for (const op of ops) if (op.type === 'put' && op.key[0] === H) this.index.set(op.key.subarray(1), op.value);
      for (const m of moves) this.relocating.delete(m.ref.readUInt32BE(0));
    });
  }

  /**
   * The operations storing the rewritten maps of compaction (checkpoints
   * deleted meanwhile skipped). A map stored against a base is stored again
   * against that base's new map when the base is rewritten too (else its
   * stored one); if it now differs in too many entries (a base kept only for
   * deltas keeps its old refs), it is stored whole, and bases nobody needs
   * any more go.
   */
  private async relocatedMapOps(maps: readonly { job: string; checkpoint: number; maps: PageMaps }[]): Promise<Op[]> {
    const ops: Op[] = [];
    const byJob = new Map<string, Map<number, Buffer>>();
    for (const m of maps) {
      if (!(await this.getHeader(m.job, m.checkpoint))) continue; // deleted meanwhile
      let j = byJob.get(m.job);
      if (!j) byJob.set(m.job, (j = new Map()));
      j.set(m.checkpoint, Buffer.concat(m.maps));
    }
    for (const [job, j] of byJob) {
      const dropped = new Set<number>();
      for (const [n, flat] of j) {
        const r = await this.db.get(ckptKey(R, job, n));
        const b = baseOf(r);
        let base: { n: number; map: Buffer } | null = null;
        if (b !== null) {
          const map = j.get(b) ?? (await this.db.get(ckptKey(P, job, b)));
          if (map && map.length === flat.length) base = { n: b, map };
        }
        const stored = this.mapOps(job, n, flat, base);
        ops.push(...stored.ops);
        if (r && !stored.delta) dropped.add(n);
      }
      if (dropped.size > 0) ops.push(...(await this.mapCleanup(job, new Set(), dropped)));
    }
    return ops;
  }

  /**
   * How the job's page maps are stored (tests, diagnostics): checkpoints
   * whose full map is kept (deleted ones included while deltas need them),
   * and the checkpoints stored as deltas with their bases.
   */
  async mapLayout(job: string): Promise<{ full: number[]; deltas: { checkpoint: number; base: number }[] }> {
    const pre = (p: number): Buffer => jobPrefix(p, job);
    const full: number[] = [];
    for await (const k of this.db.keys(prefixRange(pre(P)))) full.push(k.readUInt32BE(k.length - 4));
    const deltas: { checkpoint: number; base: number }[] = [];
    for await (const k of this.db.keys(prefixRange(pre(Q)))) deltas.push({ checkpoint: k.readUInt32BE(k.length - 4), base: k.readUInt32BE(k.length - 8) });
    deltas.sort((a, b) => a.checkpoint - b.checkpoint);
    return { full, deltas };
  }

  /** Open pack descriptors now (tests: the cache stays within maxOpenPacks plus packs in use). */
  openPackCount(): number {
    return this.openFds.size;
  }

  /**
   * Read ahead the pack runs a restore will need (refs in read order): per
   * pack, slots closer than PREFETCH_GAP merge into one span; spans go to the
   * kernel (posix_fadvise WILLNEED, native/addon/packio.cc) in the order the
   * restore first needs each pack. From a cold cache the scattered pages of
   * increments otherwise cost one 4 KiB random read each.
   */
  async prefetch(refs: Buffer): Promise<void> {
    const n = Math.floor(refs.length / 8);
    const slots = new Map<number, number[]>(); // pack id -> slots, packs in first-use order
    for (let i = 0; i < n; i++) {
      const id = refs.readUInt32BE(i * 8);
      let l = slots.get(id);
      if (!l) { l = []; slots.set(id, l); }
      l.push(refs.readUInt32BE(i * 8 + 4));
    }
    const ops: number[] = [];
    const held: Pack[] = [];
    const fds = new Map<number, number>();
    try {
    for (const [id] of slots) {
      const pack = this.packs.get(id);
      if (!pack || pack.retired) continue;
      held.push(pack);
      fds.set(id, await this.acquire(pack));
    }
    for (const [id, l] of slots) {
      const pack = this.packs.get(id);
      const fd = fds.get(id) ?? -1;
      if (!pack || fd < 0) continue;
      l.sort((a, b) => a - b);
      let start = l[0]!, end = l[0]!;
      const emit = (): void => {
        const last = Math.min(end + 1, pack.slots);
        if (last > start) ops.push(fd, start * PAGE_SIZE, (last - start) * PAGE_SIZE);
      };
      for (const slot of l) {
        if (slot - end > PREFETCH_GAP) { emit(); start = slot; }
        end = slot;
      }
      emit();
    }
      if (ops.length > 0) await packAdvise(new Float64Array(ops));
    } finally {
      for (const p of held) this.release(p);
    }
  }

  deletePages(pages: readonly StoredPage[]): Promise<number> {
    return this.writeLock.run(async () => {
      if (pages.length === 0) return 0;
      const current = await this.lookup(pages.map((p) => p.hash));
      const ops: Op[] = [];
      const gone: Buffer[] = [];
      let removed = 0;
      for (let i = 0; i < pages.length; i++) {
        const p = pages[i]!;
        const cur = current[i];
        if (!cur || !cur.equals(p.ref) || this.pending.has(p.hash)) continue;
        ops.push({ type: 'del', key: hashKeyOf(H, p.hash) });
        gone.push(p.hash);
        const id = p.ref.readUInt32BE(0);
        this.deletedIn.set(id, (this.deletedIn.get(id) ?? 0) + 1);
        removed++;
      }
      // The bytes stay in their pack until sweepOrphans rewrites or drops it.
      // Out of the in-memory index first: were the write to fail, the index would only
      // miss pages LevelDB still has (an upload stores such a page again), never the reverse.
      if (gone.length > 0) this.index?.delete(joinHashes(gone));
      if (ops.length > 0) await this.write(ops);
      this.pages -= removed;
      return removed;
    });
  }

  async *scanPages(batchSize: number): AsyncIterable<StoredPage[]> {
    // Pages written by uploads in flight are listed too: make their entries durable first.
    await this.flushPending();
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

  /** Pack files and their bytes on disk (for tests and stat output). */
  packStats(): { packs: number; bytes: number } {
    let bytes = 0;
    for (const p of this.packs.values()) if (!p.retired) bytes += p.size;
    return { packs: [...this.packs.values()].filter((p) => !p.retired).length, bytes };
  }

  // ---- ManifestStore ----

  putManifest(header: ManifestHeader, maps: PageMaps): Promise<void> {
    return this.manifestLock.run(async () => {
      this.checkOpen();
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
      const flat = Buffer.concat(maps);
      const base = await this.deltaBase(header.job, header.parent, flat.length);
      // Packs synced first, then index entries and manifest in one synced batch.
      await this.flushPending([
        ...this.mapOps(header.job, header.checkpoint, flat, base).ops,
        { type: 'put', key: ckptKey(M, header.job, header.checkpoint), value: Buffer.from(JSON.stringify(header)) },
        { type: 'put', key: jobKey(header.job), value: u32(header.checkpoint) },
      ]);
    });
  }

  /**
   * The full map a new checkpoint of `job` whose parent is `parent` may be
   * stored against: the parent's own map when it is stored whole, else the
   * parent's base. Null when there is none (no parent, deleted meanwhile,
   * another size).
   */
  private async deltaBase(job: string, parent: number, bytes: number): Promise<{ n: number; map: Buffer } | null> {
    if (parent === 0 || bytes === 0) return null;
    const [r, p] = await this.db.getMany([ckptKey(R, job, parent), ckptKey(P, job, parent)]);
    if (r && baseOf(r) === null) return null; // a damaged parent: this map goes whole
    const n = baseOf(r) ?? parent;
    const map = r ? await this.db.get(ckptKey(P, job, n)) : p;
    return map && map.length === bytes ? { n, map } : null;
  }

  /**
   * The operations storing checkpoint n's map `flat`: a delta against `base`
   * while few entries differ ('R' n -> base, 'Q' base n -> delta), else the
   * whole map ('P' n). Either way the other form's keys are deleted.
   */
  private mapOps(job: string, n: number, flat: Buffer, base: { n: number; map: Buffer } | null): { ops: Op[]; delta: boolean } {
    const delta = base ? mapDelta(base.map, flat, Math.floor(flat.length / ENTRY_BYTES / DELTA_DIVISOR)) : null;
    if (base && delta) {
      return {
        delta: true,
        ops: [
          { type: 'put', key: ckptKey(R, job, n), value: baseRef(base.n, flat) },
          { type: 'put', key: deltaKey(job, base.n, n), value: delta },
          { type: 'del', key: ckptKey(P, job, n) },
        ],
      };
    }
    return { delta: false, ops: [{ type: 'put', key: ckptKey(P, job, n), value: flat }, { type: 'del', key: ckptKey(R, job, n) }] };
  }

  async getHeader(job: string, checkpoint: number): Promise<ManifestHeader | null> {
    const v = await this.db.get(ckptKey(M, job, checkpoint));
    return v ? parseHeader(v, job, checkpoint) : null;
  }

  async getMaps(job: string, checkpoint: number): Promise<PageMaps | null> {
    // One snapshot for the two reads: a delete or a compaction between them cannot take the base away.
    const snapshot = this.db.snapshot();
    let h: Buffer | undefined, v: Buffer | undefined;
    try {
      let r: Buffer | undefined;
      [h, v, r] = await this.db.getMany([ckptKey(M, job, checkpoint), ckptKey(P, job, checkpoint), ckptKey(R, job, checkpoint)], { snapshot });
      if (h && !v && r) {
        const bad = (why: string): ExaError => new ExaError('CORRUPT', `checkpoint ${checkpoint} of job ${job}: page map unreadable: ${why}`, { job, checkpoint });
        const base = baseOf(r);
        if (base === null) throw bad(`its base record is ${r.length} bytes, expected ${BASE_REF_BYTES}`);
        const [b, d] = await this.db.getMany([ckptKey(P, job, base), deltaKey(job, base, checkpoint)], { snapshot });
        if (!b || !d) throw bad(b ? `its delta against checkpoint ${base}'s full map is missing` : `it is a delta against checkpoint ${base}'s full map, which is missing`);
        try {
          v = applyMapDelta(b, d);
        } catch (e) {
          throw bad(`its delta against checkpoint ${base}'s full map is damaged: ${(e as Error).message}`);
        }
        // A damaged index or base would place entries silently wrong: the rebuilt map must be the one committed.
        if (!sha256(v).equals(r.subarray(4))) throw bad(`the map rebuilt from checkpoint ${base}'s full map and its delta does not match its checksum`);
      }
    } finally {
      await snapshot.close();
    }
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
    const prefix = job === undefined ? Buffer.from([M]) : jobPrefix(M, job);
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

  deleteManifests(job: string, checkpoints: readonly number[]): Promise<void> {
    return this.manifestLock.run(async () => {
      if (checkpoints.length === 0) return;
      const ops: Op[] = [];
      for (const n of checkpoints) ops.push({ type: 'del', key: ckptKey(M, job, n) }, { type: 'del', key: ckptKey(R, job, n) });
      // Their deltas go; a deleted checkpoint's full map stays while later checkpoints are stored against it.
      const gone = new Set(checkpoints);
      ops.push(...(await this.mapCleanup(job, gone, gone)));
      await this.write(ops, true);
    });
  }

  /**
   * Deletes of the deltas of the checkpoints `goneDeltas`, and of the job's
   * full maps that neither a committed checkpoint nor a remaining delta
   * needs once the checkpoints `goneCkpts` are gone too (key-only scans of
   * the job's keys).
   */
  private async mapCleanup(job: string, goneCkpts: ReadonlySet<number>, goneDeltas: ReadonlySet<number>): Promise<Op[]> {
    const pre = (p: number): Buffer => jobPrefix(p, job);
    const ops: Op[] = [];
    const needed = new Set<number>();
    for await (const k of this.db.keys(prefixRange(pre(M)))) {
      const n = k.readUInt32BE(k.length - 4);
      if (!goneCkpts.has(n)) needed.add(n);
    }
    for await (const k of this.db.keys(prefixRange(pre(Q)))) {
      if (goneDeltas.has(k.readUInt32BE(k.length - 4))) ops.push({ type: 'del', key: k });
      else needed.add(k.readUInt32BE(k.length - 8));
    }
    for await (const k of this.db.keys(prefixRange(pre(P)))) if (!needed.has(k.readUInt32BE(k.length - 4))) ops.push({ type: 'del', key: k });
    return ops;
  }

  async manifestBytes(): Promise<number> {
    let total = 0;
    for (const p of [M, P, Q, R]) for await (const v of this.db.values({ gte: Buffer.from([p]), lt: Buffer.from([p + 1]) })) total += v.length;
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
    await this.write(marks.map((m) => {
      const v = Buffer.allocUnsafe(8);
      v.writeBigUInt64BE(BigInt(m.at));
      return { type: 'put' as const, key: hashKeyOf(G, m.hash), value: v };
    }));
  }

  async deleteMarks(hashes: readonly Buffer[]): Promise<void> {
    if (hashes.length === 0) return;
    await this.write(hashes.map((h) => ({ type: 'del' as const, key: hashKeyOf(G, h) })));
  }

  async countMarks(): Promise<number> {
    let n = 0;
    for await (const _k of this.db.keys({ gte: Buffer.from([G]), lt: Buffer.from([G + 1]) })) n++;
    return n;
  }

  async compactStorage(): Promise<void> {
    await (this.db as unknown as { compactRange(a: Buffer, b: Buffer): Promise<void> }).compactRange(Buffer.from([0]), Buffer.from([0xff]));
  }

  /**
   * Reclaim pack space: packs whose live fraction (slots an index entry names)
   * is below one half are rewritten, packs with nothing live are removed. The
   * current pack and packs holding not-yet-durable pages are left alone. Runs
   * under the write lock (no putPages or deletePages meanwhile). Returns the
   * number of orphan pages removed (bytes no index entry ever named, left by a
   * crash or an upload that never committed; pages removed by deletePages
   * were already counted by GC).
   */
  sweepOrphans(): Promise<number> {
    return this.writeLock.run(async () => {
      this.checkOpen();
      await this.flushPending();
      const live = new Map<number, { hash: Buffer; slot: number }[]>();
      for await (const [k, v] of this.db.iterator({ gte: Buffer.from([H]), lt: Buffer.from([H + 1]) })) {
        if (v.length !== 8) continue;
        const id = v.readUInt32BE(0);
        let l = live.get(id);
        if (!l) { l = []; live.set(id, l); }
        l.push({ hash: k.subarray(1), slot: v.readUInt32BE(4) });
      }
      const busy = new Set<number>(this.relocating);
      const pend = this.pending.entries();
      for (let off = HASH_BYTES; off < pend.length; off += ENTRY_BYTES) busy.add(pend.readUInt32BE(off));
      const victims = [...this.packs.values()].filter((p) => !p.retired && p !== this.current && !p.dirty && !busy.has(p.id)
        && (live.get(p.id)?.length ?? 0) < REPACK_LIVE_FRACTION * Math.max(1, p.slots));
      if (victims.length === 0) return 0;
      // Live pages of the victims, in their pack order, appended to the current pack.
      const moves: { hash: Buffer; ref: PageRef }[] = [];
      for (const p of victims) for (const e of (live.get(p.id) ?? []).sort((a, b) => a.slot - b.slot)) moves.push({ hash: e.hash, ref: makeRef(p.id, e.slot) });
      const CHUNK = 2048;
      const updates: Op[] = [];
      for (let i = 0; i < moves.length; i += CHUNK) {
        const part = moves.slice(i, i + CHUNK);
        const data = Buffer.allocUnsafe(part.length * PAGE_SIZE);
        const { present } = await this.readInto(part.map((m) => m.ref), data, null);
        // A page the pack cannot give any more keeps its (dead) index entry: verify reports it.
        const keep: number[] = [];
        part.forEach((_m, j) => { if (present[j]) keep.push(j); });
        if (keep.length === 0) continue;
        const bufs = keep.map((j) => data.subarray(j * PAGE_SIZE, (j + 1) * PAGE_SIZE));
        const { pack, slot } = await this.append(bufs, keep.length * PAGE_SIZE);
        keep.forEach((j, k) => updates.push({ type: 'put', key: hashKeyOf(H, part[j]!.hash), value: makeRef(pack.id, slot + k) }));
      }
      // The copies are durable before any index entry names them (flushPending syncs the packs).
      await this.flushPending(updates);
      if (this.index) {
        for (const u of updates) if (u.type === 'put') this.index.set(u.key.subarray(1), u.value);
      }
      let orphans = 0;
      for (const p of victims) {
        const dead = p.slots - (live.get(p.id)?.length ?? 0);
        orphans += Math.max(0, dead - (this.deletedIn.get(p.id) ?? 0));
        this.deletedIn.delete(p.id);
        p.retired = true;
        this.packs.delete(p.id);
        rmSync(join(this.packDir, packName(p.id)), { force: true });
        if (p.reads === 0) await this.closeFd(p);
      }
      return orphans;
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Wait for writes and commits under way, then close the index and every pack not being read.
    await this.writeLock.run(async () => undefined);
    await this.syncLock.run(async () => undefined);
    await this.db.close();
    for (const p of this.packs.values()) {
      p.retired = true;
      if (p.direct) await p.direct.close().catch(() => undefined);
      if (p.reads === 0) await this.closeFd(p);
    }
    this.packs.clear();
    this.current = null;
    this.index?.close();
    this.index = null;
    this.pending.close();
    this.seen.close();
  }

  /** One atomic batch of the index (chained: far cheaper per operation than the array form). */
  private async write(ops: readonly Op[], sync = false): Promise<void> {
    const b = this.db.batch();
    for (const op of ops) { if (op.type === 'put') b.put(op.key, op.value); else b.del(op.key); }
    await b.write({ sync });
  }

  private checkOpen(): void {
    if (this.closed) throw new ExaError('UNAVAILABLE', 'the store is closed');
  }

  // ---- upgrade from format 2 ----

  private async convertFromFormat2(): Promise<void> {
    const pagesDir = join(this.dir, 'pages');
    // Packs of an interrupted conversion (format 2 never has any): start over.
    for (const name of readdirSync(this.packDir)) if (PACK_RE.test(name)) rmSync(join(this.packDir, name), { force: true });
    const old = await openDb(pagesDir, { compression: false });
    const moved = new Map<bigint, PageRef>();
    try {
      let batch: Buffer[] = [], seqs: bigint[] = [];
      const flush = async (): Promise<void> => {
        if (batch.length === 0) return;
        const { pack, slot } = await this.append(batch, batch.length * PAGE_SIZE);
        seqs.forEach((s, j) => moved.set(s, makeRef(pack.id, slot + j)));
        batch = [];
        seqs = [];
      };
      for await (const [k, v] of old.iterator({ gte: Buffer.from([D]), lt: Buffer.from([D + 1]) })) {
        const g = k.readBigUInt64BE(1);
        const mask = groupMask(v);
        for (let slot = 0; slot < 16; slot++) {
          if (!(mask & (1 << slot))) continue;
          batch.push(groupPage(v, slot)!);
          seqs.push(g + BigInt(slot));
        }
        if (batch.length >= 2048) await flush();
      }
      await flush();
    } finally {
      await old.close();
    }
    const ops: Op[] = [];
    for await (const [k, v] of this.db.iterator({ gte: Buffer.from([H]), lt: Buffer.from([H + 1]) })) {
      const ref = v.length === 8 ? moved.get(v.readBigUInt64BE(0)) : undefined;
      // An index entry whose page was not in the log names nothing: dropped (verify reports the checkpoints that need it).
      ops.push(ref ? { type: 'put', key: k, value: ref } : { type: 'del', key: k });
    }
    for await (const [k, v] of this.db.iterator({ gte: Buffer.from([P]), lt: Buffer.from([P + 1]) })) {
      const map = Buffer.from(v);
      for (let off = 0; off + ENTRY_BYTES <= map.length; off += ENTRY_BYTES) {
        if (isZeroHash(map, off)) continue;
        const ref = moved.get(map.readBigUInt64BE(off + HASH_BYTES));
        if (ref) ref.copy(map, off + HASH_BYTES);
      }
      ops.push({ type: 'put', key: k, value: map });
    }
    ops.push({ type: 'put', key: Buffer.from([V]), value: u32(FORMAT) });
    // Packs durable first; then the flip, in one synced batch.
    await this.flushPending(ops);
    // Later appends go to a new pack (the conversion's last one is complete).
    if (this.current?.direct) { await this.current.direct.close(); this.current.direct = null; }
    this.current = null;
  }
}

async function openDb(path: string, o: Record<string, unknown>): Promise<DB> {
  const db = new Level<Buffer, Buffer>(path, { keyEncoding: 'buffer', valueEncoding: 'buffer', ...o });
  try {
    await db.open();
  } catch (e) {
    const cause = (e as { cause?: unknown }).cause ?? e;
    throw toExaError(cause, `cannot open LevelDB in ${path}`);
  }
  return db;
}

// Format 2 page groups (read by the conversion only): a value holds up to 16
// pages in slot order (length k x 4096: slots 0..k-1), or the remaining pages
// followed by a u16 LE mask of the slots present (length k x 4096 + 2).
function popcount16(x: number): number {
  x -= (x >> 1) & 0x5555;
  x = (x & 0x3333) + ((x >> 2) & 0x3333);
  x = (x + (x >> 4)) & 0x0f0f;
  return (x + (x >> 8)) & 0x1f;
}
function groupMask(v: Buffer): number {
  const len = v.length;
  if (len === 0) return 0;
  if (len % PAGE_SIZE === 0) return len / PAGE_SIZE > 16 ? 0 : (1 << (len / PAGE_SIZE)) - 1;
  if (len % PAGE_SIZE === 2) {
    const m = v.readUInt16LE(len - 2);
    return popcount16(m) === (len - 2) / PAGE_SIZE ? m : 0;
  }
  return 0;
}
function groupPage(v: Buffer, slot: number): Buffer | null {
  const len = v.length;
  if (len % PAGE_SIZE === 0) return (slot + 1) * PAGE_SIZE <= len ? v.subarray(slot * PAGE_SIZE, (slot + 1) * PAGE_SIZE) : null;
  const m = groupMask(v);
  if (!(m & (1 << slot))) return null;
  const off = popcount16(m & ((1 << slot) - 1)) * PAGE_SIZE;
  return v.subarray(off, off + PAGE_SIZE);
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
