/**
 * The checkpoint store engine: chains, dedup, atomic commit, reconstruction,
 * retention, GC and verification, over any Backend (storage/backend.ts).
 * No gRPC here: src/store/server.ts adapts it to the wire.
 *
 * Reconstruction strategy: materialized page maps. Every committed
 * checkpoint stores the FULL map of its image (region, page) -> (hash, ref),
 * built at commit from the parent's map plus the pages the writer sent. A
 * restore of checkpoint 100 reads one map and the pages it names, exactly as
 * a restore of checkpoint 1 does: time is independent of chain length, and
 * deleting any checkpoint never breaks another. A full map is 40 bytes a
 * page (10 MiB per GiB of image), as much as a 1% increment's new pages, so
 * a backend may store it more compactly as long as getMaps returns it whole:
 * the LevelDB backend stores most maps as the entries that differ from an
 * earlier full map (storage/mapdelta.ts; still two reads however long the
 * chain).
 *
 * GC protocol (two phases with a grace period, as kopia and rustic):
 *  - live set = every hash in every committed manifest, in every in-flight
 *    upload's page map and in every running restore's map, plus every hash an
 *    in-flight upload was told the store has or has uploaded (its pins), plus
 *    every hash committed while the GC runs (gcRecent);
 *  - phase 1 marks each stored page that is not live with the current time;
 *    a marked page found live again is unmarked (revived);
 *  - phase 2 deletes a marked page only when its mark is older than the grace
 *    period and, re-checked under the lock that answers uploads' hash
 *    queries, it is still not live. An upload that is told "present" pins the
 *    page under that same lock, so GC never deletes a page an in-flight upload
 *    was told the store already has. The grace period covers writers this
 *    process cannot see (several servers sharing an S3 bucket).
 */
import { ExaError } from '../src/errors.js';
import type { Backend, ManifestHeader, PageMaps, PageRef, RegionSpec, StoredPage } from './backend.js';
import { Mutex } from './mutex.js';
import { checkPages, hashPages, verifyPages } from './hash.js';
import { PageTable } from './pagetable.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, REF_BYTES, bytesEqual, copyBytes, hashKey, isZeroHash, sha256 } from './pages.js';

export interface EngineOptions {
  /** Default GC grace period (ms). */
  gcGraceMs?: number;
  /** Largest hash batch accepted from a writer. */
  maxBatchPages?: number;
  /** Largest image (pages, all regions) of one checkpoint. */
  maxImagePages?: number;
}

export interface ProgressEvent { phase: string; done: number; total: number; unit: string }
export type ProgressFn = (p: ProgressEvent) => void;

export interface PutBeginSpec {
  job: string;
  parent: number;
  regions: RegionSpec[];
  labels?: Record<string, string>;
}

export interface HashBatch {
  batch: number;
  region: readonly number[];
  index: readonly number[];
  hashes: Buffer;
  zero?: Buffer | undefined;
}

export interface ImageRange {
  region?: string;        // undefined or '' = all regions
  firstPage?: number;
  pageCount?: number;     // 0/undefined = to the end of the region
  /** Delta read: only pages whose hash differs from this checkpoint's (0/undefined = all). */
  since?: number;
}

export interface ImagePiece {
  region: string;
  firstPage: number;
  pageCount: number;
  /** One byte per page (1 = zero page, not in data), or empty when no page is zero. */
  zero: Buffer;
  /** The non-zero pages, 4096 bytes each, in order. */
  data: Buffer;
  /** Sparse piece (delta reads): the page indexes held, ascending; zero/data follow this list. */
  pages?: number[];
  /**
   * With ReadImageOptions.reuse: bytes in front of `data` (same ArrayBuffer)
   * that the consumer may overwrite (a wire header, src/store/codec-image.ts).
   */
  headroom?: number;
  /**
   * With ReadImageOptions.reuse: hand the piece's buffer back for a later
   * piece of the same read. After calling it the consumer must not touch
   * `data` any more. Not calling it is correct (the buffer is then garbage).
   */
  release?: () => void;
}

export interface ReadImageOptions {
  /** Pages per piece (default 512). */
  chunkPages?: number;
  /**
   * Piece buffers are recycled through ImagePiece.release() (a 1 GiB restore
   * then allocates a handful of buffers instead of 1 GiB of fresh memory,
   * which cost page faults and garbage collections) and leave `headroom`
   * bytes free in front of the data.
   */
  reuse?: boolean;
  headroom?: number;
}

export interface JobSummaryInfo { job: string; checkpoints: number; latest: number; latestAt: number; logicalBytes: number }
export interface JobStatInfo { job: string; checkpoints: number; logicalBytes: number; sentBytes: number; storedBytes: number; dedupRatio: number }
export interface StatInfo {
  jobs: JobStatInfo[]; logicalBytes: number; storedBytes: number; storedPages: number;
  metadataBytes: number; dedupRatio: number; pendingGcPages: number;
}
export interface GcResultInfo { livePages: number; markedPages: number; revivedPages: number; deletedPages: number; reclaimedBytes: number; pendingPages: number }
export interface ProblemInfo { job: string; checkpoint: number; region: string; page: number; kind: string; message: string }
export interface VerifyResultInfo { checkpoints: number; pagesChecked: number; problems: ProblemInfo[]; ok: boolean }
export interface CompactResultInfo { job: string; checkpoints: number; pagesMoved: number; refsUpdated: number }

const PENDING_REF = Buffer.alloc(REF_BYTES, 0xff);
const JOB_RE = /^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$/;
const MAX_PROBLEMS = 1000;

/** Throws INVALID_ARGUMENT unless `job` is a valid job id. */
export function checkJobName(job: unknown): string {
  if (typeof job !== 'string' || !JOB_RE.test(job)) {
    throw new ExaError('INVALID_ARGUMENT', `invalid job id ${JSON.stringify(job)}: 1-128 characters from A-Z a-z 0-9 . _ : @ + -, starting with a letter or digit`);
  }
  return job;
}

function imageBytes(regions: readonly RegionSpec[]): number {
  return regions.reduce((a, r) => a + r.pageCount, 0) * PAGE_SIZE;
}

function ckptName(job: string, n: number): string {
  return `checkpoint ${n} of job ${job}`;
}

/** The recycled piece buffers of one readImage (ReadImageOptions.reuse): headroom + piece bytes each. */
class PieceBuffers {
  private readonly free: Buffer[] = [];
  constructor(readonly headroom: number, private readonly pieceBytes: number) {}
  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.headroom + this.pieceBytes);
  }
  give(b: Buffer): void {
    // More than the read keeps in flight never come back at once; the cap is a guard.
    if (this.free.length < 8) this.free.push(b);
  }
}

export class CheckpointStore {
  readonly gcGraceMs: number;
  readonly maxBatchPages: number;
  readonly maxImagePages: number;
  /** Uploads in flight (their maps and pins are live for GC). */
  readonly sessions = new Set<PutSession>();
  /** Maps of restores in flight (live for GC). */
  private readonly readers = new Set<PageMaps>();
  /** Serializes "is this page present? then pin it" (uploads) against GC deletions. */
  readonly gcLock = new Mutex();
  private readonly commitLock = new Mutex();
  /** Hashes committed while a GC runs (null when none runs). */
  gcRecent: Set<string> | null = null;
  private gcRunning = false;
  private readonly mapCache = new Map<string, PageMaps>();
  private closed = false;

  constructor(readonly backend: Backend, opts: EngineOptions = {}) {
    this.gcGraceMs = opts.gcGraceMs ?? 60 * 60 * 1000;
    this.maxBatchPages = opts.maxBatchPages ?? 8192;
    this.maxImagePages = opts.maxImagePages ?? 1 << 22;
  }

  // ---- checkpoints ----

  /** Start an upload. NOT_FOUND when the parent does not exist; INVALID_ARGUMENT for a bad region table. */
  async beginPut(spec: PutBeginSpec): Promise<PutSession> {
    this.checkOpen();
    const job = checkJobName(spec.job);
    const regions = checkRegions(spec.regions, this.maxImagePages);
    const labels: Record<string, string> = {};
    for (const [k, v] of Object.entries(spec.labels ?? {})) {
      if (typeof v !== 'string' || k.length > 128 || v.length > 4096) throw new ExaError('INVALID_ARGUMENT', `label ${JSON.stringify(k)} is too long or not a string`);
      labels[k] = v;
    }
    if (Object.keys(labels).length > 64) throw new ExaError('INVALID_ARGUMENT', 'at most 64 labels');
    const parent = spec.parent ?? 0;
    if (!Number.isInteger(parent) || parent < 0) throw new ExaError('INVALID_ARGUMENT', `invalid parent checkpoint ${String(parent)}`);
    const maps: PageMaps = regions.map((r) => Buffer.alloc(r.pageCount * ENTRY_BYTES));
    if (parent > 0) {
      const ph = await this.backend.getHeader(job, parent);
      if (!ph) {
        const any = (await this.backend.listHeaders(job)).length > 0;
        throw new ExaError('NOT_FOUND', `parent ${ckptName(job, parent)} does not exist${any ? '' : ` (job ${job} has no checkpoints)`}`, { job, checkpoint: parent });
      }
      const pm = await this.getMaps(job, parent);
      // A region inherits the parent's pages by name, up to the shorter length.
      ph.regions.forEach((pr, i) => {
        const r = regions.findIndex((x) => x.name === pr.name);
        if (r < 0) return;
        const n = Math.min(pr.pageCount, regions[r]!.pageCount);
        pm[i]!.copy(maps[r]!, 0, 0, n * ENTRY_BYTES);
      });
    }
    const s = new PutSession(this, job, parent, regions, labels, maps);
    this.sessions.add(s);
    return s;
  }

  /** The header of a checkpoint; n = 0 means the latest. NOT_FOUND names what is missing. */
  async resolve(job: string, n: number): Promise<ManifestHeader> {
    this.checkOpen();
    checkJobName(job);
    if (!Number.isInteger(n) || n < 0) throw new ExaError('INVALID_ARGUMENT', `invalid checkpoint number ${String(n)}`);
    if (n === 0) {
      const all = await this.backend.listHeaders(job);
      const last = all[all.length - 1];
      if (!last) throw new ExaError('NOT_FOUND', `job ${job} has no checkpoints`, { job });
      return last;
    }
    const h = await this.backend.getHeader(job, n);
    if (!h) {
      const any = (await this.backend.listHeaders(job)).length > 0;
      throw new ExaError('NOT_FOUND', `${ckptName(job, n)} does not exist${any ? '' : ` (job ${job} has no checkpoints)`}`, { job, checkpoint: n });
    }
    return h;
  }

  private async getMaps(job: string, n: number): Promise<PageMaps> {
    const key = `${job}\0${n}`;
    const hit = this.mapCache.get(key);
    if (hit) return hit;
    const maps = await this.backend.getMaps(job, n);
    if (!maps) throw new ExaError('NOT_FOUND', `${ckptName(job, n)} does not exist`, { job, checkpoint: n });
    this.mapCache.set(key, maps);
    // Maps are immutable; keep a few (restores by range re-read the same one).
    while (this.mapCache.size > 8) this.mapCache.delete(this.mapCache.keys().next().value!);
    return maps;
  }

  /**
   * The image of a checkpoint (n = 0: latest), region by region in table
   * order, in pieces of at most chunkPages pages. The first value is the
   * header. Every page is checked against its hash: CORRUPT names job,
   * checkpoint, region and page.
   */
  async *readImage(job: string, n: number, range: ImageRange = {}, chunkOrOpts: number | ReadImageOptions = 512): AsyncGenerator<ManifestHeader | ImagePiece> {
    const opts: ReadImageOptions = typeof chunkOrOpts === 'number' ? { chunkPages: chunkOrOpts } : chunkOrOpts;
    const chunkPages = opts.chunkPages ?? 512;
    if (!Number.isInteger(chunkPages) || chunkPages < 1) throw new ExaError('INVALID_ARGUMENT', `chunkPages ${chunkPages} is not a positive integer`);
    const header = await this.resolve(job, n);
    n = header.checkpoint;
    const maps = await this.getMaps(job, n);
    const plan: { r: number; first: number; count: number }[] = [];
    if (range.region) {
      const r = header.regions.findIndex((x) => x.name === range.region);
      if (r < 0) throw new ExaError('NOT_FOUND', `region ${JSON.stringify(range.region)} is not in ${ckptName(job, n)} (regions: ${header.regions.map((x) => x.name).join(', ') || 'none'})`, { job, checkpoint: n });
      const size = header.regions[r]!.pageCount;
      const first = range.firstPage ?? 0;
      const count = range.pageCount ? range.pageCount : size - first;
      if (!Number.isInteger(first) || first < 0 || first > size || !Number.isInteger(count) || count < 0 || first + count > size) {
        throw new ExaError('INVALID_ARGUMENT', `pages ${first}..${first + count - 1} are outside region ${JSON.stringify(range.region)} of ${ckptName(job, n)} (${size} pages)`, { job, checkpoint: n });
      }
      plan.push({ r, first, count });
    } else {
      if (range.firstPage || range.pageCount) throw new ExaError('INVALID_ARGUMENT', 'a page range needs a region');
      header.regions.forEach((x, r) => plan.push({ r, first: 0, count: x.pageCount }));
    }
    // A delta against checkpoint `since`: compare the materialized maps hash by hash.
    let base: { header: ManifestHeader; maps: PageMaps } | null = null;
    if (range.since) {
      if (!Number.isInteger(range.since) || range.since < 0) throw new ExaError('INVALID_ARGUMENT', `since ${range.since} is not a checkpoint number`);
      const bh = await this.resolve(job, range.since);
      base = { header: bh, maps: await this.getMaps(job, bh.checkpoint) };
    }
    yield header;
    this.readers.add(maps);
    if (base) this.readers.add(base.maps);
    try {
      const pieces: { r: number; first: number; count: number; pages?: number[] }[] = [];
      for (const p of plan) {
        if (!base) {
          for (let f = p.first; f < p.first + p.count; f += chunkPages) pieces.push({ r: p.r, first: f, count: Math.min(chunkPages, p.first + p.count - f) });
          continue;
        }
        const spec = header.regions[p.r]!;
        const br = base.header.regions.findIndex((x) => x.name === spec.name && x.pageCount === spec.pageCount);
        const cur = maps[p.r]!;
        const old = br >= 0 ? base.maps[br]! : null;
        let sparse: number[] = [];
        for (let i = p.first; i < p.first + p.count; i++) {
          const off = i * ENTRY_BYTES;
          if (old && bytesEqual(cur, off, old, off, HASH_BYTES)) continue;
          sparse.push(i);
          if (sparse.length === chunkPages) { pieces.push({ r: p.r, first: sparse[0]!, count: 0, pages: sparse }); sparse = []; }
        }
        if (sparse.length) pieces.push({ r: p.r, first: sparse[0]!, count: 0, pages: sparse });
      }
      // Tell the backend every page this read will need (it may read ahead).
      if (this.backend.prefetch) {
        let count = 0;
        for (const p of pieces) count += p.pages ? p.pages.length : p.count;
        if (count >= 64) {
          const refs = Buffer.allocUnsafe(count * REF_BYTES);
          let k = 0;
          for (const p of pieces) {
            const map = maps[p.r]!;
            const n = p.pages ? p.pages.length : p.count;
            for (let i = 0; i < n; i++) {
              const off = (p.pages ? p.pages[i]! : p.first + i) * ENTRY_BYTES;
              if (!isZeroHash(map, off)) copyBytes(map, off + HASH_BYTES, refs, (k++) * REF_BYTES, REF_BYTES);
            }
          }
          this.backend.prefetch(refs.subarray(0, k * REF_BYTES)).catch(() => undefined);
        }
      }
      // Read two pieces ahead so the backend works while the consumer sends
      // (memory: three pieces, 6 MiB at the default size, plus what the consumer holds).
      const ahead: Promise<ImagePiece>[] = [];
      let k = 0;
      let buffers: PieceBuffers | null = null;
      if (opts.reuse) buffers = new PieceBuffers(Math.max(0, opts.headroom ?? 0), chunkPages * PAGE_SIZE);
      const fill = (): void => {
        while (ahead.length < 3 && k < pieces.length) {
          const p = this.readPiece(header, maps, pieces[k++]!, buffers);
          // No unhandled rejection if the consumer stops early.
          p.catch(() => undefined);
          ahead.push(p);
        }
      };
      fill();
      while (ahead.length > 0) {
        const cur = await ahead.shift()!;
        fill();
        yield cur;
      }
    } finally {
      this.readers.delete(maps);
      if (base) this.readers.delete(base.maps);
    }
  }

  private async readPiece(header: ManifestHeader, maps: PageMaps, p: { r: number; first: number; count: number; pages?: number[] }, buffers: PieceBuffers | null = null): Promise<ImagePiece> {
    const map = maps[p.r]!;
    const region = header.regions[p.r]!.name;
    const n = p.pages ? p.pages.length : p.count;
    let zero: Buffer | null = null;
    const refs: PageRef[] = [];
    const pos: number[] = [];
    for (let i = 0; i < n; i++) {
      const page = p.pages ? p.pages[i]! : p.first + i;
      const off = page * ENTRY_BYTES;
      if (isZeroHash(map, off)) {
        if (!zero) zero = Buffer.alloc(n);
        zero[i] = 1;
      } else {
        refs.push(map.subarray(off + HASH_BYTES, off + ENTRY_BYTES));
        pos.push(page);
      }
    }
    // The piece's bytes, every page checked against its hash off the JS thread
    // (backend.readPagesVerified: read and hashed in one native pass; else
    // readPages then storage/hash.ts); pages that fail are looked up again by
    // hash (refetch: the page may have moved) or named in a CORRUPT error.
    const held = buffers ? buffers.take() : null;
    const data = held ? held.subarray(buffers!.headroom, buffers!.headroom + refs.length * PAGE_SIZE) : Buffer.allocUnsafe(refs.length * PAGE_SIZE);
    // (After a failure the buffer is not recycled: a read of the other half may still be writing into it.)
    await this.fillPiece(header, map, region, refs, pos, data);
    const piece: ImagePiece = { region, firstPage: p.first, pageCount: n, zero: zero ?? Buffer.alloc(0), data, ...(p.pages ? { pages: p.pages } : {}) };
    if (held) {
      let given = false;
      piece.headroom = buffers!.headroom;
      piece.release = () => { if (!given) { given = true; buffers!.give(held); } };
    }
    return piece;
  }

  /** Read the pages at refs into data (page k at k x 4096), each checked against the hash in map at pos[k]. */
  private async fillPiece(header: ManifestHeader, map: Buffer, region: string, refs: PageRef[], pos: number[], data: Buffer): Promise<void> {
    const bad: number[] = [];
    let present: (k: number) => boolean;
    if (this.backend.readPagesVerified) {
      const want = Buffer.allocUnsafe(refs.length * HASH_BYTES);
      for (let k = 0; k < refs.length; k++) copyBytes(map, pos[k]! * ENTRY_BYTES, want, k * HASH_BYTES, HASH_BYTES);
      const ok = await this.backend.readPagesVerified(refs, want, data);
      for (let k = 0; k < refs.length; k++) if (ok[k] !== 1) bad.push(k);
      present = (k) => ok[k] === 2;
    } else {
      const pages = await this.backend.readPages(refs);
      for (let k = 0; k < refs.length; k++) {
        const page = pages[k];
        if (page && page.length === PAGE_SIZE) page.copy(data, k * PAGE_SIZE);
        else bad.push(k);
      }
      const got = await hashPages(data);
      for (let k = 0; k < refs.length; k++) {
        const off = pos[k]! * ENTRY_BYTES;
        if (got.compare(map, off, off + HASH_BYTES, k * HASH_BYTES, (k + 1) * HASH_BYTES) !== 0 && (bad.length === 0 || !bad.includes(k))) bad.push(k);
      }
      present = (k) => !!pages[k];
    }
    if (bad.length > 0) {
      // One lookup and one read for all of them (after a repack, many refs of a piece moved).
      const hashes = bad.map((k) => map.subarray(pos[k]! * ENTRY_BYTES, pos[k]! * ENTRY_BYTES + HASH_BYTES));
      const now = await this.backend.lookup(hashes);
      const found = now.flatMap((r, j) => (r ? [j] : []));
      const read = await this.backend.readPages(found.map((j) => now[j]!));
      const again = new Array<Buffer | null>(bad.length).fill(null);
      found.forEach((j, i) => { again[j] = read[i] ?? null; });
      const good = await checkPages(again, hashes);
      for (let j = 0; j < bad.length; j++) {
        const k = bad[j]!;
        if (good[j]) { again[j]!.copy(data, k * PAGE_SIZE); continue; }
        const off = pos[k]! * ENTRY_BYTES;
        throw this.corrupt(map.subarray(off, off + HASH_BYTES), present(k), header, region, pos[k]!);
      }
    }
  }

  /** A page whose ref failed: ask the backend where the hash lives now; CORRUPT when nowhere good. */
  private async refetch(hash: Buffer, got: Buffer | null, h: ManifestHeader, region: string, page: number): Promise<Buffer> {
    const [ref] = await this.backend.lookup([hash]);
    if (ref) {
      const [again] = await this.backend.readPages([ref]);
      if (again && again.length === PAGE_SIZE && sha256(again).equals(hash)) return again;
    }
    throw this.corrupt(hash, !!got, h, region, page);
  }

  private corrupt(hash: Buffer, present: boolean, h: ManifestHeader, region: string, page: number): ExaError {
    const what = present ? 'does not match its hash' : 'is missing from the store';
    return new ExaError('CORRUPT', `${ckptName(h.job, h.checkpoint)}: page ${page} of region ${JSON.stringify(region)} ${what} (sha256 ${hash.toString('hex')})`,
      { job: h.job, checkpoint: h.checkpoint, region, page, hash: hash.toString('hex') });
  }

  // ---- listing and retention ----

  async listJobs(): Promise<JobSummaryInfo[]> {
    this.checkOpen();
    const out = new Map<string, JobSummaryInfo>();
    for (const h of await this.backend.listHeaders()) {
      const s = out.get(h.job) ?? { job: h.job, checkpoints: 0, latest: 0, latestAt: 0, logicalBytes: 0 };
      s.checkpoints++;
      if (h.checkpoint > s.latest) { s.latest = h.checkpoint; s.latestAt = h.createdAt; s.logicalBytes = imageBytes(h.regions); }
      out.set(h.job, s);
    }
    return [...out.values()];
  }

  async listCheckpoints(job: string): Promise<ManifestHeader[]> {
    this.checkOpen();
    checkJobName(job);
    const hs = await this.backend.listHeaders(job);
    if (hs.length === 0) throw new ExaError('NOT_FOUND', `job ${job} has no checkpoints`, { job });
    return hs;
  }

  /**
   * Delete explicit checkpoints and/or apply keep-last-K / keep-every-Nth.
   * Under a policy the latest checkpoint always survives. Pages go at the next GC.
   */
  async deleteCheckpoints(job: string, req: { checkpoints?: number[]; keepLast?: number; keepEvery?: number; dryRun?: boolean }): Promise<{ deleted: number[]; kept: number[] }> {
    const hs = await this.listCheckpoints(job);
    const have = new Set(hs.map((h) => h.checkpoint));
    const explicit = req.checkpoints ?? [];
    const keepLast = req.keepLast ?? 0, keepEvery = req.keepEvery ?? 0;
    if (explicit.length === 0 && keepLast === 0 && keepEvery === 0) {
      throw new ExaError('INVALID_ARGUMENT', 'nothing to delete: give checkpoint numbers, keep_last or keep_every');
    }
    for (const n of explicit) {
      if (!have.has(n)) throw new ExaError('NOT_FOUND', `${ckptName(job, n)} does not exist`, { job, checkpoint: n });
    }
    const del = new Set(explicit);
    if (keepLast > 0 || keepEvery > 0) {
      const nums = hs.map((h) => h.checkpoint).sort((a, b) => a - b);
      const latest = nums[nums.length - 1]!;
      const newest = new Set(keepLast > 0 ? nums.slice(-keepLast) : []);
      for (const n of nums) {
        const keep = n === latest || newest.has(n) || (keepEvery > 0 && n % keepEvery === 0);
        if (!keep) del.add(n);
      }
    }
    const deleted = [...del].sort((a, b) => a - b);
    if (!req.dryRun) {
      await this.backend.deleteManifests(job, deleted);
      for (const n of deleted) this.mapCache.delete(`${job}\0${n}`);
    }
    return { deleted, kept: hs.map((h) => h.checkpoint).filter((n) => !del.has(n)) };
  }

  async stat(job?: string): Promise<StatInfo> {
    this.checkOpen();
    if (job !== undefined && job !== '') checkJobName(job);
    const all = await this.backend.listHeaders(job || undefined);
    if (job && all.length === 0) throw new ExaError('NOT_FOUND', `job ${job} has no checkpoints`, { job });
    const jobs = new Map<string, JobStatInfo>();
    let logical = 0;
    for (const h of all) {
      const s = jobs.get(h.job) ?? { job: h.job, checkpoints: 0, logicalBytes: 0, sentBytes: 0, storedBytes: 0, dedupRatio: 0 };
      s.checkpoints++;
      s.logicalBytes += imageBytes(h.regions);
      s.sentBytes += h.sentPages * PAGE_SIZE;
      s.storedBytes += h.newPages * PAGE_SIZE;
      s.dedupRatio = s.storedBytes > 0 ? s.logicalBytes / s.storedBytes : 0;
      logical += imageBytes(h.regions);
      jobs.set(h.job, s);
    }
    const ps = this.backend.pageStats();
    return {
      jobs: [...jobs.values()], logicalBytes: logical, storedBytes: ps.bytes, storedPages: ps.pages,
      metadataBytes: await this.backend.manifestBytes(), dedupRatio: ps.bytes > 0 ? logical / ps.bytes : 0,
      pendingGcPages: await this.backend.countMarks(),
    };
  }

  // ---- GC ----

  /** Two-phase GC (see the top of this file). graceMs < 0 = the default. */
  async gc(opts: { graceMs?: number; dryRun?: boolean } = {}, progress?: ProgressFn): Promise<GcResultInfo> {
    this.checkOpen();
    if (this.gcRunning) throw new ExaError('CONFLICT', 'a GC is already running on this store');
    this.gcRunning = true;
    const grace = opts.graceMs !== undefined && opts.graceMs >= 0 ? opts.graceMs : this.gcGraceMs;
    const res: GcResultInfo = { livePages: 0, markedPages: 0, revivedPages: 0, deletedPages: 0, reclaimedBytes: 0, pendingPages: 0 };
    this.gcRecent = new Set();
    try {
      const live = new Set<string>();
      const addMaps = (maps: PageMaps): void => {
        for (const m of maps) {
          for (let off = 0; off < m.length; off += ENTRY_BYTES) if (!isZeroHash(m, off)) live.add(hashKey(m, off));
        }
      };
      // Manifests first, then in-flight uploads and restores (see the GC protocol above).
      const headers = await this.backend.listHeaders();
      let done = 0;
      for (const h of headers) {
        const maps = await this.backend.getMaps(h.job, h.checkpoint).catch(() => null);
        if (maps) addMaps(maps);
        progress?.({ phase: 'mark', done: ++done, total: headers.length, unit: 'checkpoints' });
      }
      for (const s of this.sessions) addMaps(s.maps);
      for (const m of this.readers) addMaps(m);
      const total = this.backend.pageStats().pages;
      let scanned = 0;
      const isLive = (k: string, hash: Buffer): boolean => {
        if (live.has(k) || this.gcRecent!.has(k)) return true;
        for (const s of this.sessions) if (s.pinned(hash)) return true;
        return false;
      };
      for await (const batch of this.backend.scanPages(4096)) {
        const marks = await this.backend.getMarks(batch.map((p) => p.hash));
        const now = Date.now();
        const revive: Buffer[] = [], mark: { hash: Buffer; at: number }[] = [], doomed: StoredPage[] = [];
        batch.forEach((p, i) => {
          const k = hashKey(p.hash);
          const m = marks[i];
          if (isLive(k, p.hash)) {
            res.livePages++;
            if (m != null) revive.push(p.hash);
          } else if (m == null) {
            mark.push({ hash: p.hash, at: now });
            if (grace === 0) doomed.push(p); else res.pendingPages++;
          } else if (now - m >= grace) {
            doomed.push(p);
          } else {
            res.pendingPages++;
          }
        });
        res.revivedPages += revive.length;
        res.markedPages += mark.length;
        if (!opts.dryRun) {
          await this.backend.deleteMarks(revive);
          await this.backend.putMarks(mark);
          if (doomed.length > 0) {
            await this.gcLock.run(async () => {
              // Re-check under the lock that uploads take to pin what they were told exists.
              const still = doomed.filter((p) => !isLive(hashKey(p.hash), p.hash));
              const n = await this.backend.deletePages(still);
              await this.backend.deleteMarks(still.map((p) => p.hash));
              res.deletedPages += n;
              res.livePages += doomed.length - still.length;
            });
          }
        } else {
          res.deletedPages += doomed.length;
        }
        scanned += batch.length;
        progress?.({ phase: 'sweep', done: scanned, total, unit: 'pages' });
      }
      if (!opts.dryRun && this.backend.sweepOrphans) res.deletedPages += await this.backend.sweepOrphans();
      res.reclaimedBytes = res.deletedPages * PAGE_SIZE;
      return res;
    } finally {
      this.gcRecent = null;
      this.gcRunning = false;
    }
  }

  // ---- verify and compact ----

  /** Read and check every page of the selected checkpoints (and, with allPages, every stored page). */
  async verify(opts: { job?: string; checkpoint?: number; allPages?: boolean } = {}, progress?: ProgressFn): Promise<VerifyResultInfo> {
    this.checkOpen();
    let headers: ManifestHeader[];
    if (opts.job) {
      headers = opts.checkpoint ? [await this.resolve(opts.job, opts.checkpoint)] : await this.listCheckpoints(opts.job);
    } else {
      if (opts.checkpoint) throw new ExaError('INVALID_ARGUMENT', 'a checkpoint number needs a job');
      headers = await this.backend.listHeaders();
    }
    const problems: ProblemInfo[] = [];
    const report = (p: ProblemInfo): void => { if (problems.length < MAX_PROBLEMS) problems.push(p); };
    // Each distinct ref is read once; its verdict serves every checkpoint that uses it.
    const verdict = new Map<string, 'ok' | 'corrupt' | 'missing'>();
    const totalPages = headers.reduce((a, h) => a + h.regions.reduce((b, r) => b + r.pageCount, 0), 0);
    let checked = 0, done = 0;
    // The previous checkpoint's maps and per-page verdicts (0 ok, 1 corrupt, 2 missing, 3 zero): consecutive
    // checkpoints of a job share most entries, and an entry equal to the previous checkpoint's at the same
    // place (same hash and ref) has its verdict, without a string key and a Map lookup per page (~0.5 us:
    // seconds for a job with 100 checkpoints of 64k pages).
    const VERDICT = { ok: 0, corrupt: 1, missing: 2, zero: 3 } as const;
    let prev: { header: ManifestHeader; maps: PageMaps; verdicts: Uint8Array[] } | null = null;
    for (const h of headers) {
      let maps: PageMaps;
      try {
        maps = await this.backend.getMaps(h.job, h.checkpoint) ?? [];
      } catch (e) {
        report({ job: h.job, checkpoint: h.checkpoint, region: '', page: 0, kind: 'manifest', message: (e as Error).message });
        continue;
      }
      const verdicts = h.regions.map((x) => new Uint8Array(x.pageCount));
      for (let r = 0; r < h.regions.length; r++) {
        const map = maps[r]!;
        const region = h.regions[r]!.name;
        const count = h.regions[r]!.pageCount;
        const pr = prev && prev.header.job === h.job ? prev.header.regions.findIndex((x) => x.name === region && x.pageCount === count) : -1;
        const prevMap = pr >= 0 && prev!.maps[pr]?.length === map.length ? prev!.maps[pr]! : null;
        const prevVerdicts = prevMap ? prev!.verdicts[pr]! : null;
        const mine = verdicts[r]!;
        for (let first = 0; first < count; first += 2048) {
          const n = Math.min(2048, count - first);
          const todo: { page: number; off: number; rk: string }[] = [];
          const fresh: { page: number; off: number; rk: string }[] = [];
          const bad: { page: number; kind: 'corrupt' | 'missing' }[] = []; // reported in page order, after the reads
          for (let i = first; i < first + n; i++) {
            const off = i * ENTRY_BYTES;
            if (prevMap && bytesEqual(map, off, prevMap, off, ENTRY_BYTES)) {
              const v = prevVerdicts![i]!;
              mine[i] = v;
              if (v === VERDICT.zero) continue;
              checked++;
              if (v !== VERDICT.ok) bad.push({ page: i, kind: v === VERDICT.corrupt ? 'corrupt' : 'missing' });
              continue;
            }
            if (isZeroHash(map, off)) { mine[i] = VERDICT.zero; continue; }
            const rk = map.toString('latin1', off, off + ENTRY_BYTES);
            todo.push({ page: i, off, rk });
            if (!verdict.has(rk)) { verdict.set(rk, 'ok'); fresh.push({ page: i, off, rk }); }
          }
          const pages = fresh.length ? await this.backend.readPages(fresh.map((t) => map.subarray(t.off + HASH_BYTES, t.off + ENTRY_BYTES))) : [];
          const good = fresh.length ? await checkPages(pages, fresh.map((t) => map.subarray(t.off, t.off + HASH_BYTES))) : [];
          for (let k = 0; k < fresh.length; k++) {
            const t = fresh[k]!;
            const want = map.subarray(t.off, t.off + HASH_BYTES);
            const page = pages[k];
            if (good[k]) continue;
            // The ref may be stale while the page lives elsewhere: the engine's read path would find it.
            try {
              await this.refetch(want, page ?? null, h, region, t.page);
            } catch {
              verdict.set(t.rk, page ? 'corrupt' : 'missing');
            }
          }
          for (const t of todo) {
            const v = verdict.get(t.rk)!;
            mine[t.page] = VERDICT[v];
            if (v !== 'ok') bad.push({ page: t.page, kind: v });
          }
          if (bad.length > 1) bad.sort((x, y) => x.page - y.page);
          for (const b of bad) {
            const what = b.kind === 'corrupt' ? 'does not match its hash' : 'is missing from the store';
            report({ job: h.job, checkpoint: h.checkpoint, region, page: b.page, kind: b.kind,
              message: `${ckptName(h.job, h.checkpoint)}: page ${b.page} of region ${JSON.stringify(region)} ${what}` });
          }
          checked += todo.length;
          done += n;
          progress?.({ phase: 'verify', done, total: totalPages, unit: 'pages' });
        }
      }
      prev = { header: h, maps, verdicts };
    }
    if (opts.allPages) {
      for await (const batch of this.backend.scanPages(2048)) {
        const pages = await this.backend.readPages(batch.map((p) => p.ref));
        const good = await checkPages(pages, batch.map((p) => p.hash));
        batch.forEach((p, i) => {
          const page = pages[i];
          if (!good[i]) {
            report({ job: '', checkpoint: 0, region: '', page: 0, kind: 'stored-corrupt',
              message: `stored page sha256 ${p.hash.toString('hex')} ${page ? 'does not match its hash' : 'has no data'}` });
          }
        });
        checked += batch.length;
      }
    }
    return { checkpoints: headers.length, pagesChecked: checked, problems, ok: problems.length === 0 };
  }

  /**
   * Compact a job. Reconstruction never walks a chain (maps are materialized),
   * so there is no chain to squash. Compaction checks that every page of the
   * job's checkpoints still resolves, then (backends with relocatePages)
   * rewrites the pages of the job's latest checkpoint in image order into new
   * packs, so that restoring it reads long runs however many increments made
   * it, and repoints the index and the job's maps at the copies in one
   * durable step (a crash before it changes nothing visible; the old copies
   * become garbage that GC reclaims). Last, the backend's own housekeeping.
   */
  async compact(job: string, progress?: ProgressFn): Promise<CompactResultInfo> {
    const hs = await this.listCheckpoints(job);
    const res = await this.verify({ job }, progress);
    if (!res.ok) {
      const p = res.problems[0]!;
      throw new ExaError('CORRUPT', `cannot compact job ${job}: ${p.message}${res.problems.length > 1 ? ` (and ${res.problems.length - 1} more problems)` : ''}`, { job });
    }
    let pagesMoved = 0, refsUpdated = 0;
    const b = this.backend;
    if (b.relocatePages && b.commitRelocation) {
      const latest = hs[hs.length - 1]!;
      const maps = await this.getMaps(job, latest.checkpoint);
      this.readers.add(maps);
      try {
        const total = maps.reduce((a, m) => a + m.length / ENTRY_BYTES, 0);
        // hash -> its new ref (native: a string key and a Map lookup per page of every checkpoint of the
        // job cost seconds for 100 checkpoints of 64k pages).
        const moved = new PageTable();
        try {
          const moves: StoredPage[] = [];
          let done = 0;
          // The image in order, every page verified by readImage; each distinct page copied once.
          for await (const item of this.readImage(job, latest.checkpoint, {}, { chunkPages: 1024 })) {
            if ('checkpoint' in item) continue;
            const r = latest.regions.findIndex((x) => x.name === item.region);
            const map = maps[r]!;
            const pos: number[] = []; // pages of the piece with bytes (zero pages have none)
            for (let i = 0; i < item.pageCount; i++) if (!(item.zero.length > 0 && item.zero[i])) pos.push(i);
            const hs = Buffer.allocUnsafe(pos.length * HASH_BYTES);
            pos.forEach((i, k) => copyBytes(map, (item.firstPage + i) * ENTRY_BYTES, hs, k * HASH_BYTES, HASH_BYTES));
            const added = new Uint8Array(pos.length);
            moved.add(hs, PENDING_REF, added); // first occurrences only: each distinct page is copied once
            const fresh: { hash: Buffer; data: Buffer }[] = [];
            for (let k = 0; k < pos.length; k++) {
              if (!added[k]) continue;
              // (pieces are not recycled here: the data stays valid)
              fresh.push({ hash: Buffer.from(hs.subarray(k * HASH_BYTES, (k + 1) * HASH_BYTES)), data: item.data.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE) });
            }
            const refs = await b.relocatePages(fresh);
            fresh.forEach((p, j) => { moved.set(p.hash, refs[j]!); moves.push({ hash: p.hash, ref: refs[j]! }); });
            done += item.pageCount;
            progress?.({ phase: 'compact-rewrite', done, total, unit: 'pages' });
          }
          pagesMoved = moves.length;
          // Every checkpoint of the job gets the new refs of the pages it shares with the latest one.
          const updated: { job: string; checkpoint: number; maps: PageMaps }[] = [];
          for (const h of hs) {
            const old = h.checkpoint === latest.checkpoint ? maps : await this.getMaps(job, h.checkpoint);
            const copy = old.map((m) => Buffer.from(m));
            let changed = 0;
            for (const m of copy) {
              const n = m.length / ENTRY_BYTES;
              const keys = Buffer.allocUnsafe(n * HASH_BYTES);
              for (let i = 0; i < n; i++) copyBytes(m, i * ENTRY_BYTES, keys, i * HASH_BYTES, HASH_BYTES);
              const vals = Buffer.allocUnsafe(n * REF_BYTES);
              const found = new Uint8Array(n);
              if (moved.get(keys, vals, found) === 0) continue; // (the all-zero hash of a zero page is never found)
              for (let i = 0; i < n; i++) {
                if (!found[i] || bytesEqual(vals, i * REF_BYTES, PENDING_REF, 0, REF_BYTES)) continue;
                copyBytes(vals, i * REF_BYTES, m, i * ENTRY_BYTES + HASH_BYTES, REF_BYTES);
                changed++;
              }
            }
            if (changed > 0) { updated.push({ job, checkpoint: h.checkpoint, maps: copy }); refsUpdated += changed; }
          }
          await b.commitRelocation(moves, updated);
          for (const u of updated) this.mapCache.delete(`${job}\0${u.checkpoint}`);
        } finally {
          moved.close();
        }
      } finally {
        this.readers.delete(maps);
      }
    }
    progress?.({ phase: 'compact-storage', done: 0, total: 1, unit: 'steps' });
    await this.backend.compactStorage();
    progress?.({ phase: 'compact-storage', done: 1, total: 1, unit: 'steps' });
    return { job, checkpoints: hs.length, pagesMoved, refsUpdated };
  }

  /** Commit a finished upload (called by PutSession). */
  async commitSession(s: PutSession, header: Omit<ManifestHeader, 'checkpoint' | 'createdAt'>): Promise<ManifestHeader> {
    return this.commitLock.run(async () => {
      this.checkOpen();
      const n = (await this.backend.lastNumber(s.job)) + 1;
      const full: ManifestHeader = { ...header, checkpoint: n, createdAt: Date.now() };
      // A GC that lists manifests before this one lands, and looks at the
      // sessions after this one has left, must still see these pages: record
      // them in gcRecent before the write (GC already running) and after it
      // (GC started while the write was in flight).
      const recordRecent = (): void => {
        const recent = this.gcRecent;
        if (!recent) return;
        for (const m of s.maps) for (let off = 0; off < m.length; off += ENTRY_BYTES) if (!isZeroHash(m, off)) recent.add(hashKey(m, off));
      };
      recordRecent();
      await this.backend.putManifest(full, s.maps);
      recordRecent();
      return full;
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.sessions) s.abort();
    await this.backend.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new ExaError('UNAVAILABLE', 'the store is closed');
  }
}

function checkRegions(regions: RegionSpec[], maxImagePages: number): RegionSpec[] {
  if (!Array.isArray(regions) || regions.length === 0) throw new ExaError('INVALID_ARGUMENT', 'a checkpoint needs at least one region');
  if (regions.length > 4096) throw new ExaError('INVALID_ARGUMENT', `${regions.length} regions: at most 4096`);
  const names = new Set<string>();
  let total = 0;
  const out = regions.map((r, i) => {
    const name = r?.name;
    if (typeof name !== 'string' || name.length === 0 || name.length > 256) throw new ExaError('INVALID_ARGUMENT', `region ${i}: name must be 1-256 characters`);
    if (names.has(name)) throw new ExaError('INVALID_ARGUMENT', `region name ${JSON.stringify(name)} appears twice`);
    names.add(name);
    if (!Number.isInteger(r.pageCount) || r.pageCount < 0) throw new ExaError('INVALID_ARGUMENT', `region ${JSON.stringify(name)}: invalid page count ${String(r.pageCount)}`);
    total += r.pageCount;
    const address = r.address ?? '';
    if (typeof address !== 'string' || (address !== '' && !/^(0x[0-9a-fA-F]{1,16}|[0-9]{1,20})$/.test(address))) {
      throw new ExaError('INVALID_ARGUMENT', `region ${JSON.stringify(name)}: invalid address ${JSON.stringify(address)}`);
    }
    return { name, pageCount: r.pageCount, address, flags: r.flags >>> 0 };
  });
  if (total > maxImagePages) {
    throw new ExaError('RESOURCE_EXHAUSTED', `image of ${total} pages exceeds the store's limit of ${maxImagePages} pages (${(maxImagePages * PAGE_SIZE) / 2 ** 30} GiB)`);
  }
  return out;
}

/**
 * One upload in flight. The writer offers hash batches, supplies the bytes
 * of the pages the store wanted, then commits. Nothing is visible before
 * commit() resolves; an abandoned session leaves only unreferenced pages,
 * which GC reclaims.
 */
export class PutSession {
  /**
   * Hashes this upload was told the store has, or uploaded itself (live for
   * GC). Native tables (storage/pagetable.ts), not JS Maps: no string, Map
   * entry or GC work per page on the upload path.
   */
  readonly pins = new PageTable();
  /** Batches whose data is awaited: the wanted entries' hashes (n x 32) and positions. */
  private readonly pending = new Map<number, { hashes: Buffer; region: Uint32Array; index: Uint32Array }>();
  /** Batches whose data is being checked and stored now. */
  private readonly supplying = new Set<number>();
  /** Map positions (region, page pairs) whose page bytes come with a later batch's data. */
  private unresolved = new Uint32Array(4096);
  private unresolvedCount = 0;
  /** Hashes wanted in this session: PENDING_REF until their data arrives, then their ref. */
  private readonly sessionRefs = new PageTable();
  private changed = 0;
  private sent = 0;
  private newPages = 0;
  private done = false;

  constructor(
    private readonly store: CheckpointStore,
    readonly job: string,
    readonly parent: number,
    readonly regions: RegionSpec[],
    readonly labels: Record<string, string>,
    readonly maps: PageMaps,
  ) {}

  /** Whether GC must keep this page for this upload. */
  pinned(hash: Buffer): boolean {
    return !this.done && this.pins.has(hash);
  }

  private addUnresolved(r: number, i: number): void {
    if (this.unresolvedCount * 2 + 2 > this.unresolved.length) {
      const bigger = new Uint32Array(this.unresolved.length * 2);
      bigger.set(this.unresolved);
      this.unresolved = bigger;
    }
    this.unresolved[this.unresolvedCount * 2] = r;
    this.unresolved[this.unresolvedCount * 2 + 1] = i;
    this.unresolvedCount++;
  }

  /**
   * Describe a batch of pages by hash; returns the positions (into the
   * batch's arrays) whose bytes the store lacks and must receive with
   * supplyData(batch). Validates the whole batch before applying any of it.
   */
  async offerHashes(b: HashBatch): Promise<number[]> {
    this.checkLive();
    const n = b.region.length;
    if (n === 0) throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch} is empty`);
    if (n > this.store.maxBatchPages) throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch} has ${n} pages: at most ${this.store.maxBatchPages}`);
    if (b.index.length !== n) throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch}: ${n} regions but ${b.index.length} page indexes`);
    if (b.hashes.length !== n * HASH_BYTES) throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch}: hashes are ${b.hashes.length} bytes, expected ${n * HASH_BYTES} (32 per page)`);
    const zero = b.zero && b.zero.length > 0 ? b.zero : null;
    if (zero && zero.length !== n) throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch}: zero flags are ${zero.length} bytes, expected ${n}`);
    if (this.pending.has(b.batch)) throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch} is already awaiting its data`);
    for (let i = 0; i < n; i++) {
      const r = b.region[i]!, idx = b.index[i]!;
      const reg = this.regions[r];
      if (!reg) throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch}, entry ${i}: region ${r} does not exist (the checkpoint has ${this.regions.length} regions)`);
      if (idx >= reg.pageCount) {
        throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch}, entry ${i}: page ${idx} is outside region ${JSON.stringify(reg.name)} (${reg.pageCount} pages)`,
          { region: reg.name, page: idx });
      }
      if (!(zero && zero[i]) && isZeroHash(b.hashes, i * HASH_BYTES)) {
        throw new ExaError('INVALID_ARGUMENT', `batch ${b.batch}, entry ${i}: page ${idx} of region ${JSON.stringify(reg.name)} has an all-zero hash but no zero flag`);
      }
    }
    this.changed += n;
    // The pages that changed against what the map holds (the parent's page, or this session's earlier entry).
    const cand: number[] = [];
    for (let i = 0; i < n; i++) {
      const map = this.maps[b.region[i]!]!;
      const off = b.index[i]! * ENTRY_BYTES;
      if (zero && zero[i]) { map.fill(0, off, off + ENTRY_BYTES); continue; }
      this.sent++;
      const ho = i * HASH_BYTES;
      if (bytesEqual(b.hashes, ho, map, off, HASH_BYTES)) continue;
      copyBytes(b.hashes, ho, map, off, HASH_BYTES);
      cand.push(i);
    }
    const want: number[] = [];
    if (cand.length === 0) return want;
    // Pages this session already wanted (one native call for the batch).
    let ch = b.hashes;
    if (cand.length < n) {
      ch = Buffer.allocUnsafe(cand.length * HASH_BYTES);
      cand.forEach((i, j) => copyBytes(b.hashes, i * HASH_BYTES, ch, j * HASH_BYTES, HASH_BYTES));
    }
    const sref = Buffer.allocUnsafe(cand.length * REF_BYTES);
    const mine = new Uint8Array(cand.length);
    const lookupPos: number[] = [];
    if (this.sessionRefs.get(ch, sref, mine) === 0) for (const i of cand) lookupPos.push(i);
    else {
      cand.forEach((i, j) => {
        if (!mine[j]) { lookupPos.push(i); return; }
        const map = this.maps[b.region[i]!]!;
        const off = b.index[i]! * ENTRY_BYTES;
        if (bytesEqual(sref, j * REF_BYTES, PENDING_REF, 0, REF_BYTES)) {
          copyBytes(PENDING_REF, 0, map, off + HASH_BYTES, REF_BYTES);
          this.addUnresolved(b.region[i]!, b.index[i]!);
        } else copyBytes(sref, j * REF_BYTES, map, off + HASH_BYTES, REF_BYTES);
      });
    }
    if (lookupPos.length === 0) return want;
    const m = lookupPos.length;
    const hashes = m === cand.length ? ch : Buffer.allocUnsafe(m * HASH_BYTES);
    if (hashes !== ch) lookupPos.forEach((i, j) => copyBytes(b.hashes, i * HASH_BYTES, hashes, j * HASH_BYTES, HASH_BYTES));
    const refs = Buffer.allocUnsafe(m * REF_BYTES);
    const found = new Uint8Array(m);
    const wantRegion: number[] = [], wantIndex: number[] = [];
    let wantAll = null as Buffer | null; // set inside the lock callback
    const backend = this.store.backend;
    // Look up and pin under the GC lock: GC cannot delete a page between "present" and the pin.
    await this.store.gcLock.run(async () => {
      if (backend.lookupMany) await backend.lookupMany(hashes, refs, found);
      else {
        const got = await backend.lookup(Array.from({ length: m }, (_, j) => hashes.subarray(j * HASH_BYTES, (j + 1) * HASH_BYTES)));
        got.forEach((r, j) => { if (r) { r.copy(refs, j * REF_BYTES); found[j] = 1; } });
      }
      this.checkLive();
      // Split into pages present (pinned) and pages missing, both in batch order
      // (when every page is missing, missHashes is `hashes` itself, no copies).
      const allMissing = !found.includes(1);
      const pinHashes = allMissing ? hashes : Buffer.allocUnsafe(m * HASH_BYTES);
      let missHashes = allMissing ? hashes : Buffer.allocUnsafe(m * HASH_BYTES);
      let aliased = allMissing; // missHashes is `hashes`: entry k of it is missPos[k] while no position was skipped
      const missPos: number[] = [];
      let pinned = 0;
      for (let j = 0; j < m; j++) {
        const i = lookupPos[j]!;
        const map = this.maps[b.region[i]!]!;
        const off = b.index[i]! * ENTRY_BYTES;
        const ho = j * HASH_BYTES;
        // A later batch (offered while this lookup ran) put another page at this position: that batch owns it now.
        if (!bytesEqual(hashes, ho, map, off, HASH_BYTES)) {
          if (aliased) {
            missHashes = Buffer.concat([hashes.subarray(0, missPos.length * HASH_BYTES)], m * HASH_BYTES);
            aliased = false;
          }
          continue;
        }
        if (found[j]) {
          copyBytes(hashes, ho, pinHashes, (pinned++) * HASH_BYTES, HASH_BYTES);
          copyBytes(refs, j * REF_BYTES, map, off + HASH_BYTES, REF_BYTES);
          continue;
        }
        copyBytes(PENDING_REF, 0, map, off + HASH_BYTES, REF_BYTES);
        this.addUnresolved(b.region[i]!, b.index[i]!);
        if (!aliased) copyBytes(hashes, ho, missHashes, missPos.length * HASH_BYTES, HASH_BYTES);
        missPos.push(i);
      }
      if (pinned > 0) this.pins.add(pinHashes.subarray(0, pinned * HASH_BYTES), null);
      if (missPos.length > 0) {
        // Wanted once per session: a repeat (within this batch or from a batch offered meanwhile) waits for those bytes.
        const added = new Uint8Array(missPos.length);
        this.sessionRefs.add(missHashes.subarray(0, missPos.length * HASH_BYTES), PENDING_REF, added);
        // Every missing page is wanted (the usual case): their hashes in want order are missHashes.
        if (!added.includes(0)) wantAll = missHashes.subarray(0, missPos.length * HASH_BYTES);
        for (let k = 0; k < missPos.length; k++) {
          if (!added[k]) continue;
          const i = missPos[k]!;
          want.push(i);
          wantRegion.push(b.region[i]!);
          wantIndex.push(b.index[i]!);
        }
      }
    });
    if (want.length > 0) {
      let wh = wantAll;
      if (!wh || wh.length !== want.length * HASH_BYTES) {
        wh = Buffer.allocUnsafe(want.length * HASH_BYTES);
        for (let k = 0; k < want.length; k++) copyBytes(b.hashes, want[k]! * HASH_BYTES, wh, k * HASH_BYTES, HASH_BYTES);
      }
      this.pending.set(b.batch, { hashes: wh, region: Uint32Array.from(wantRegion), index: Uint32Array.from(wantIndex) });
    }
    return want;
  }

  /** The bytes of the pages batch `batch` wanted, concatenated. Each is checked against its hash. */
  async supplyData(batch: number, data: Buffer): Promise<number> {
    this.checkLive();
    const w = this.pending.get(batch);
    if (!w) throw new ExaError('INVALID_ARGUMENT', `data for batch ${batch}, which awaits no data`);
    if (this.supplying.has(batch)) throw new ExaError('INVALID_ARGUMENT', `data for batch ${batch} sent twice`);
    const n = w.region.length;
    if (data.length !== n * PAGE_SIZE) {
      throw new ExaError('INVALID_ARGUMENT', `batch ${batch}: ${data.length} bytes of data, expected ${n * PAGE_SIZE} (${n} pages of 4096)`);
    }
    // The batch stays pending (commit refuses) until its pages are stored.
    this.supplying.add(batch);
    try {
      // Every page checked against its hash: hashed and compared off the JS thread in one native pass (storage/hash.ts).
      const bad = await verifyPages(data, w.hashes);
      this.checkLive();
      if (bad.length > 0) {
        const i = bad[0]!;
        const reg = this.regions[w.region[i]!]!;
        throw new ExaError('INVALID_ARGUMENT', `batch ${batch}: page ${w.index[i]} of region ${JSON.stringify(reg.name)}: bytes do not match hash ${w.hashes.toString('hex', i * HASH_BYTES, (i + 1) * HASH_BYTES)}`,
          { region: reg.name, page: w.index[i] });
      }
      // Pin first: putPages may answer with a copy another upload stored, which GC must not take meanwhile.
      this.pins.add(w.hashes, null);
      const backend = this.store.backend;
      let refs: Buffer, written: number;
      if (backend.putPageRun) ({ refs, written } = await backend.putPageRun(w.hashes, data));
      else {
        const pages = Array.from({ length: n }, (_, i) => ({
          hash: w.hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES),
          data: data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE),
          // Locality hint for the backend: the image successor of the previous page.
          follows: i > 0 && w.region[i] === w.region[i - 1] && w.index[i] === w.index[i - 1]! + 1,
        }));
        const r = await backend.putPages(pages);
        refs = Buffer.concat(r.refs, n * REF_BYTES);
        written = r.written;
      }
      this.checkLive();
      this.sessionRefs.set(w.hashes, refs);
      this.newPages += written;
      this.pending.delete(batch);
      return written;
    } finally {
      this.supplying.delete(batch);
    }
  }

  /** Record the checkpoint. Resolves with its header once it is durable. */
  async commit(): Promise<ManifestHeader> {
    this.checkLive();
    if (this.pending.size > 0) {
      throw new ExaError('FAILED_PRECONDITION', `commit while batches ${[...this.pending.keys()].slice(0, 10).join(', ')} still await their page data`);
    }
    // The entries still marked pending get the refs their pages were stored at (one native lookup).
    const todo: number[] = [];
    for (let k = 0; k < this.unresolvedCount; k++) {
      const map = this.maps[this.unresolved[2 * k]!]!;
      const off = this.unresolved[2 * k + 1]! * ENTRY_BYTES;
      if (bytesEqual(map, off + HASH_BYTES, PENDING_REF, 0, REF_BYTES)) todo.push(k);
    }
    if (todo.length > 0) {
      const hs = Buffer.allocUnsafe(todo.length * HASH_BYTES), refs = Buffer.allocUnsafe(todo.length * REF_BYTES);
      todo.forEach((k, j) => {
        const off = this.unresolved[2 * k + 1]! * ENTRY_BYTES;
        copyBytes(this.maps[this.unresolved[2 * k]!]!, off, hs, j * HASH_BYTES, HASH_BYTES);
      });
      const found = new Uint8Array(todo.length);
      this.sessionRefs.get(hs, refs, found);
      todo.forEach((k, j) => {
        const r = this.unresolved[2 * k]!, i = this.unresolved[2 * k + 1]!;
        if (!found[j] || bytesEqual(refs, j * REF_BYTES, PENDING_REF, 0, REF_BYTES)) {
          throw new ExaError('INTERNAL', `page ${i} of region ${this.regions[r]!.name} has no stored bytes`);
        }
        copyBytes(refs, j * REF_BYTES, this.maps[r]!, i * ENTRY_BYTES + HASH_BYTES, REF_BYTES);
      });
    }
    let zeroPages = 0;
    for (const m of this.maps) for (let off = 0; off < m.length; off += ENTRY_BYTES) if (isZeroHash(m, off)) zeroPages++;
    try {
      const h = await this.store.commitSession(this, {
        job: this.job, parent: this.parent, regions: this.regions, labels: this.labels,
        changedPages: this.changed, sentPages: this.sent, newPages: this.newPages, zeroPages,
      });
      return h;
    } finally {
      this.finish();
    }
  }

  /** Drop the upload: nothing becomes visible; its pages become garbage for GC. */
  abort(): void {
    this.finish();
  }

  private finish(): void {
    if (this.done) return;
    this.done = true;
    this.store.sessions.delete(this);
    // The session's tables are native memory: freed now (a late call finds the session finished first).
    this.pins.close();
    this.sessionRefs.close();
  }

  private checkLive(): void {
    if (this.done) throw new ExaError('FAILED_PRECONDITION', `the upload for job ${this.job} is already finished`);
  }
}
