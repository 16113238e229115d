/**
 * Parallel, out-of-order restore of one checkpoint straight from a backend
 * (S3 packs or LevelDB), for a restore that writes into memory it owns
 * (memfds, files, buffers) rather than consuming an ordered stream.
 *
 * The page map is sorted by PageRef so that pages of one pack, in slot
 * order, form chunks; up to `concurrency` chunks are read at once (each
 * chunk becomes one or a few range GETs on S3) and every page is written to
 * the sink as soon as its chunk arrives, in whatever order chunks finish.
 * Every page is checked against its SHA-256 (in batches on the libuv pool,
 * see ../hash.ts); a page whose ref no longer
 * resolves is looked up by hash; when no good copy exists the restore fails
 * with CORRUPT naming job, checkpoint, region and page. Zero pages are not
 * read or written: a sink starts zeroed.
 */
import { ExaError } from '../../src/errors.js';
import type { Backend, ManifestHeader, PageRef } from '../backend.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, isZeroHash, sha256 } from '../pages.js';
import { checkPages } from '../hash.js';

/** Where restored pages go. write() may be called in any order, concurrently with reads. */
export interface PageSink {
  write(region: number, page: number, data: Buffer): void | Promise<void>;
}

export interface RestoreOptions {
  /**
   * Chunks in progress at once (default 16): read, checked, written. The S3
   * backend caps its own GETs in flight (readConcurrency), so extra chunks
   * only keep a GET queued while others are being checked and written.
   */
  concurrency?: number;
  /** Pages per chunk (default 2048 = 8 MiB). */
  chunkPages?: number;
  onProgress?: (p: { pages: number; total: number }) => void;
}

export interface RestoreResult { header: ManifestHeader; pages: number; zeroPages: number; bytes: number }

/** The header of checkpoint n (0 = the latest) of a job; NOT_FOUND names what is missing. */
export async function resolveCheckpoint(backend: Backend, job: string, n: number): Promise<ManifestHeader> {
  if (n === 0) {
    const hs = await backend.listHeaders(job);
    const last = hs[hs.length - 1];
    if (!last) throw new ExaError('NOT_FOUND', `job ${job} has no checkpoints in the ${backend.kind} store`, { job });
    return last;
  }
  const h = await backend.getHeader(job, n);
  if (!h) throw new ExaError('NOT_FOUND', `checkpoint ${n} of job ${job} does not exist in the ${backend.kind} store`, { job, checkpoint: n });
  return h;
}

/**
 * Restore checkpoint n (0 = latest) of `job` into a sink, given directly or
 * made from the header (so it can size its regions first).
 */
export async function restoreCheckpoint(backend: Backend, job: string, n: number,
  sinkOrFactory: PageSink | ((header: ManifestHeader) => PageSink | Promise<PageSink>), opts: RestoreOptions = {}): Promise<RestoreResult> {
  const header = await resolveCheckpoint(backend, job, n);
  const sink = typeof sinkOrFactory === 'function' ? await sinkOrFactory(header) : sinkOrFactory;
  n = header.checkpoint;
  const maps = await backend.getMaps(job, n);
  if (!maps) throw new ExaError('NOT_FOUND', `checkpoint ${n} of job ${job} does not exist`, { job, checkpoint: n });
  // Every non-zero page as numbers only (region, page, ref halves): no
  // Buffer object per page, which would keep the major GC busy marking
  // hundreds of thousands of live typed arrays during the whole restore.
  let total = 0;
  for (const m of maps) total += m.length / ENTRY_BYTES;
  const regionOf = new Uint32Array(total), pageOf = new Uint32Array(total), hiOf = new Uint32Array(total), loOf = new Uint32Array(total);
  let count = 0, zeroPages = 0;
  maps.forEach((m, r) => {
    for (let i = 0, off = 0; off < m.length; i++, off += ENTRY_BYTES) {
      if (isZeroHash(m, off)) { zeroPages++; continue; }
      regionOf[count] = r; pageOf[count] = i;
      hiOf[count] = m.readUInt32BE(off + HASH_BYTES); loOf[count] = m.readUInt32BE(off + HASH_BYTES + 4);
      count++;
    }
  });
  // By location (the ref as two 32-bit halves), so pages of one pack in slot order form chunks.
  const order = new Uint32Array(count);
  for (let k = 0; k < count; k++) order[k] = k;
  order.sort((a, b) => hiOf[a]! - hiOf[b]! || loOf[a]! - loOf[b]!);
  const chunkPages = opts.chunkPages ?? 2048;
  const chunks: Uint32Array[] = [];
  for (let k = 0; k < count; k += chunkPages) chunks.push(order.subarray(k, k + chunkPages));
  const entryOff = (e: number): number => pageOf[e]! * ENTRY_BYTES;
  let next = 0, done = 0;
  const fail = (e: number, hash: Buffer, what: string): ExaError => {
    const region = header.regions[regionOf[e]!]!.name;
    return new ExaError('CORRUPT', `checkpoint ${n} of job ${job}: page ${pageOf[e]} of region ${JSON.stringify(region)} ${what} (sha256 ${hash.toString('hex')})`,
      { job, checkpoint: n, region, page: pageOf[e], hash: hash.toString('hex') });
  };
  const worker = async (): Promise<void> => {
    while (next < chunks.length) {
      const chunk = chunks[next++]!;
      const refs: PageRef[] = new Array<PageRef>(chunk.length);
      const want = Buffer.allocUnsafe(chunk.length * HASH_BYTES);
      for (let k = 0; k < chunk.length; k++) {
        const e = chunk[k]!;
        const m = maps[regionOf[e]!]!;
        const off = entryOff(e);
        refs[k] = m.subarray(off + HASH_BYTES, off + ENTRY_BYTES);
        m.copy(want, k * HASH_BYTES, off, off + HASH_BYTES);
      }
      const pages = await backend.readPages(refs);
      // Hash checks on pool threads, so reading goes on meanwhile.
      const good = await checkPages(pages, want);
      for (let k = 0; k < chunk.length; k++) {
        const e = chunk[k]!;
        let page = pages[k];
        if (!good[k]) {
          const bad = page;
          const hash = Buffer.from(want.subarray(k * HASH_BYTES, (k + 1) * HASH_BYTES));
          // The ref is a hint: the page may live elsewhere now.
          const [ref] = await backend.lookup([hash]);
          const [again] = ref ? await backend.readPages([ref]) : [null];
          if (!again || again.length !== PAGE_SIZE || !sha256(again).equals(hash)) throw fail(e, hash, bad ? 'does not match its hash' : 'is missing from the store');
          page = again;
        }
        const w = sink.write(regionOf[e]!, pageOf[e]!, page!);
        if (w) await w;
      }
      done += chunk.length;
      opts.onProgress?.({ pages: done, total: count });
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.concurrency ?? 16, chunks.length) }, worker));
  return { header, pages: count, zeroPages, bytes: count * PAGE_SIZE };
}

/** A sink into one zeroed Buffer per region (fine for tests and modest images). */
export function bufferSink(header: ManifestHeader): PageSink & { regions: Map<string, Buffer> } {
  const bufs = header.regions.map((r) => Buffer.alloc(r.pageCount * PAGE_SIZE));
  return {
    regions: new Map(header.regions.map((r, i) => [r.name, bufs[i]!])),
    write(region, page, data) { data.copy(bufs[region]!, page * PAGE_SIZE); },
  };
}
