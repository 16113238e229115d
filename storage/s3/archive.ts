/**
 * Moving a job's chain between backends, keeping checkpoint numbers,
 * headers and page maps exactly:
 *
 *  - archiveJob(): LevelDB store -> S3 (`exastore archive JOB --to s3://...`),
 *    optionally deleting the job's checkpoints locally once the copy is
 *    verified by reading every page back from the bucket;
 *  - importJob(): S3 -> a LevelDB store (`exastore import JOB --from s3://...`),
 *    for a store that has never seen the job.
 *
 * Both are copyJob() between two Backends. Pages are copied once per hash
 * (the destination is asked first: dedup works against what it already
 * holds), every page read is checked against its hash, and each checkpoint's
 * manifest is written only after its pages (the destination's commit point),
 * in ascending order. A copy that fails half way (S3 down, process killed)
 * is simply run again: checkpoints already in the destination with the same
 * content are skipped; one with the same number but other content is a
 * CONFLICT, never overwritten.
 */
import { ExaError } from '../../src/errors.js';
import type { Backend, ManifestHeader, PageMaps, PageRef } from '../backend.js';
import { CheckpointStore, checkJobName, type ProgressFn } from '../engine.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, hashKey, isZeroHash, sha256 } from '../pages.js';

export interface CopyOptions {
  job: string;
  source: Backend;
  dest: Backend;
  /** Only these checkpoints (default: all of the job's). */
  checkpoints?: number[];
  /** Read every copied checkpoint back from the destination and check each page (default true). */
  verify?: boolean;
  /** Pages per lookup/read/put round (default 1024). */
  batchPages?: number;
  progress?: ProgressFn;
}

export interface CopyResult {
  job: string;
  checkpoints: number[];   // all the copy covered
  copied: number[];        // newly written to the destination
  skipped: number[];       // already there, same content
  pagesUploaded: number;
  bytesUploaded: number;
  verified: boolean;
}

function sameCheckpoint(a: ManifestHeader, am: PageMaps, b: ManifestHeader, bm: PageMaps): boolean {
  if (a.parent !== b.parent || a.createdAt !== b.createdAt || a.regions.length !== b.regions.length) return false;
  for (let r = 0; r < a.regions.length; r++) {
    const x = a.regions[r]!, y = b.regions[r]!;
    if (x.name !== y.name || x.pageCount !== y.pageCount || x.address !== y.address || x.flags !== y.flags) return false;
    const mx = am[r]!, my = bm[r]!;
    if (mx.length !== my.length) return false;
    // Same hashes page by page; refs are per backend and may differ.
    for (let off = 0; off < mx.length; off += ENTRY_BYTES) if (mx.compare(my, off, off + HASH_BYTES, off, off + HASH_BYTES) !== 0) return false;
  }
  return true;
}

/** Copy a job's checkpoints from one backend to another (see the top of this file). */
export async function copyJob(opts: CopyOptions): Promise<CopyResult> {
  const { source, dest } = opts;
  const job = checkJobName(opts.job);
  let headers = await source.listHeaders(job);
  if (opts.checkpoints) {
    const want = new Set(opts.checkpoints);
    const have = new Set(headers.map((h) => h.checkpoint));
    for (const n of want) if (!have.has(n)) throw new ExaError('NOT_FOUND', `checkpoint ${n} of job ${job} does not exist in the ${source.kind} store`, { job, checkpoint: n });
    headers = headers.filter((h) => want.has(h.checkpoint));
  }
  if (headers.length === 0) throw new ExaError('NOT_FOUND', `job ${job} has no checkpoints in the ${source.kind} store`, { job });
  const batch = opts.batchPages ?? 1024;
  const existing = new Map((await dest.listHeaders(job)).map((h) => [h.checkpoint, h]));
  const res: CopyResult = { job, checkpoints: headers.map((h) => h.checkpoint), copied: [], skipped: [], pagesUploaded: 0, bytesUploaded: 0, verified: false };
  // hash -> ref in the destination, for every page this copy has ensured there.
  const destRefs = new Map<string, PageRef>();
  const totalPages = headers.reduce((a, h) => a + h.regions.reduce((b, r) => b + r.pageCount, 0), 0);
  let donePages = 0;
  for (const h of headers) {
    const n = h.checkpoint;
    const maps = await source.getMaps(job, n);
    if (!maps) throw new ExaError('NOT_FOUND', `checkpoint ${n} of job ${job} vanished from the ${source.kind} store during the copy`, { job, checkpoint: n });
    const there = existing.get(n);
    if (there) {
      const tm = await dest.getMaps(job, n);
      if (tm && sameCheckpoint(h, maps, there, tm)) { res.skipped.push(n); donePages += h.regions.reduce((b, r) => b + r.pageCount, 0); continue; }
      throw new ExaError('CONFLICT', `checkpoint ${n} of job ${job} already exists in the ${dest.kind} store with other content; not overwriting it`, { job, checkpoint: n });
    }
    // The pages of this checkpoint the destination may lack, once per hash.
    const todo: { r: number; i: number; off: number }[] = [];
    const queued = new Set<string>();
    maps.forEach((m, r) => {
      for (let off = 0, i = 0; off < m.length; off += ENTRY_BYTES, i++) {
        if (isZeroHash(m, off)) continue;
        const k = hashKey(m, off);
        if (destRefs.has(k) || queued.has(k)) continue;
        queued.add(k);
        todo.push({ r, i, off });
      }
    });
    for (let s = 0; s < todo.length; s += batch) {
      const part = todo.slice(s, s + batch);
      const hashes = part.map((t) => maps[t.r]!.subarray(t.off, t.off + HASH_BYTES));
      const present = await dest.lookup(hashes);
      const missing: number[] = [];
      present.forEach((ref, j) => { if (ref) destRefs.set(hashKey(hashes[j]!), ref); else missing.push(j); });
      if (missing.length === 0) continue;
      const got = await source.readPages(missing.map((j) => { const t = part[j]!; return maps[t.r]!.subarray(t.off + HASH_BYTES, t.off + ENTRY_BYTES); }));
      const pages = [];
      for (let q = 0; q < missing.length; q++) {
        const t = part[missing[q]!]!;
        const hash = hashes[missing[q]!]!;
        let page = got[q];
        if (!page || page.length !== PAGE_SIZE || !sha256(page).equals(hash)) {
          const [ref] = await source.lookup([hash]);
          const [again] = ref ? await source.readPages([ref]) : [null];
          if (!again || again.length !== PAGE_SIZE || !sha256(again).equals(hash)) {
            const region = h.regions[t.r]!.name;
            throw new ExaError('CORRUPT', `checkpoint ${n} of job ${job}: page ${t.i} of region ${JSON.stringify(region)} ${page ? 'does not match its hash' : 'is missing'} in the ${source.kind} store; nothing of this checkpoint was written to the ${dest.kind} store`,
              { job, checkpoint: n, region, page: t.i });
          }
          page = again;
        }
        pages.push({ hash, data: page });
      }
      const put = await dest.putPages(pages);
      pages.forEach((p, q) => destRefs.set(hashKey(p.hash), put.refs[q]!));
      res.pagesUploaded += put.written;
      res.bytesUploaded += put.written * PAGE_SIZE;
    }
    const out: PageMaps = maps.map((m) => {
      const c = Buffer.from(m);
      for (let off = 0; off < c.length; off += ENTRY_BYTES) {
        if (isZeroHash(c, off)) continue;
        destRefs.get(hashKey(c, off))!.copy(c, off + HASH_BYTES);
      }
      return c;
    });
    await dest.putManifest(h, out);
    res.copied.push(n);
    donePages += h.regions.reduce((b, r) => b + r.pageCount, 0);
    opts.progress?.({ phase: 'copy', done: donePages, total: totalPages, unit: 'pages' });
  }
  if (opts.verify ?? true) {
    // An engine over the destination only to reuse its verify; the backend stays open.
    const v = await new CheckpointStore(dest).verify({ job }, opts.progress);
    const mine = v.problems.filter((p) => res.checkpoints.includes(p.checkpoint));
    if (mine.length > 0) {
      throw new ExaError('CORRUPT', `copy of job ${job} to the ${dest.kind} store does not verify: ${mine[0]!.message}${mine.length > 1 ? ` (and ${mine.length - 1} more)` : ''}`, { job });
    }
    res.verified = true;
  }
  return res;
}

export interface ArchiveResult extends CopyResult { deletedLocal: number[] }

/**
 * Archive a job from a local store to S3: copy, verify from the bucket, then
 * (deleteLocal) delete the archived checkpoints from the source; their pages
 * go at the source's next GC.
 */
export async function archiveJob(opts: CopyOptions & { deleteLocal?: boolean }): Promise<ArchiveResult> {
  const deleteLocal = opts.deleteLocal ?? false;
  const r = await copyJob({ ...opts, verify: deleteLocal ? true : opts.verify ?? true });
  let deletedLocal: number[] = [];
  if (deleteLocal) {
    await opts.source.deleteManifests(r.job, r.checkpoints);
    deletedLocal = r.checkpoints;
  }
  return { ...r, deletedLocal };
}

/** Import a job's chain from an S3 archive into a local store that may never have seen it. */
export async function importJob(opts: CopyOptions): Promise<CopyResult> {
  return copyJob(opts);
}
