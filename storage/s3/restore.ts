/**
 * Parallel, out-of-order restore of one checkpoint straight from a backend
 * (S3 packs or LevelDB), for a restore that writes into memory it owns
 * (memfds, files, buffers) rather than consuming an ordered stream.
 *
 * The page map is sorted by PageRef so that pages of one pack, in slot
 * order, form chunks; up to `concurrency` chunks are read at once (each
 * chunk becomes one or a few range GETs on S3) and every page is written to
 * the sink as soon as its chunk arrives, in whatever order chunks finish.
 * On S3 each range GET's body lands in a buffer the chunk's worker owns and
 * reuses, and all its pages are checked in one native call (no per-page
 * objects, no body concatenation); other backends go through readPages().
 * Every page is checked against its SHA-256 (on the libuv pool, see
 * ../hash.ts); a page whose ref no longer
 * resolves is looked up by hash; when no good copy exists the restore fails
 * with CORRUPT naming job, checkpoint, region and page. Zero pages are not
 * read or written: a sink starts zeroed.
 */
import { ExaError } from '../../src/errors.js';
import type { Backend, ManifestHeader, PageRef } from '../backend.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, isZeroHash, sha256 } from '../pages.js';
import { checkPages, verifyPages } from '../hash.js';

/** Pages one range GET may cover (8 MiB), and the longest gap of unwanted pages read through. */
const MAX_RUN_PAGES = 2048;
const MAX_GAP_PAGES = 16;

/**
 * Backends that read runs of slots of one pack straight into the caller's
 * memory (S3Backend.readSlots); a ref is then a 48-bit pack id and a
 * 16-bit slot (./backend.ts).
 */
interface SlotReader {
  readSlots(refId: number, first: number, last: number, into: Buffer): Promise<Buffer | null>;
}

function slotReader(b: Backend): SlotReader | null {
  const r = b as Partial<SlotReader>;
  return typeof r.readSlots === 'function' ? (b as unknown as SlotReader) : null;
}

/**
 * Where restored pages go. write() may be called in any order, concurrently
 * with reads. `data` is lent for the call only: it may be reused for other
 * pages once write() returns (or its promise settles), so a sink that keeps
 * the bytes copies them.
 */
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
  /** The expected hash of entry e (a view into its page map). */
  const hashOf = (e: number): Buffer => { const off = entryOff(e); return maps[regionOf[e]!]!.subarray(off, off + HASH_BYTES); };
  /** A page that failed its check (or could not be read where its ref says): find a good copy by hash, or fail. */
  const recover = async (e: number, bad: Buffer | null | undefined): Promise<Buffer> => {
    const hash = Buffer.from(hashOf(e));
    // The ref is a hint: the page may live elsewhere now.
    const [ref] = await backend.lookup([hash]);
    const [again] = ref ? await backend.readPages([ref]) : [null];
    if (!again || again.length !== PAGE_SIZE || !sha256(again).equals(hash)) throw fail(e, hash, bad ? 'does not match its hash' : 'is missing from the store');
    return again;
  };
  const put = async (e: number, page: Buffer): Promise<void> => {
    const w = sink.write(regionOf[e]!, pageOf[e]!, page);
    if (w) await w;
  };
  /** The general path: readPages() (one Buffer per page), hashes checked in batches. */
  const readGeneral = async (entries: ArrayLike<number>): Promise<void> => {
    const n = entries.length;
    if (n === 0) return;
    const refs: PageRef[] = new Array<PageRef>(n);
    const want = Buffer.allocUnsafe(n * HASH_BYTES);
    for (let k = 0; k < n; k++) {
      const e = entries[k]!;
      const m = maps[regionOf[e]!]!;
      const off = entryOff(e);
      refs[k] = m.subarray(off + HASH_BYTES, off + ENTRY_BYTES);
      m.copy(want, k * HASH_BYTES, off, off + HASH_BYTES);
    }
    const pages = await backend.readPages(refs);
    // Hash checks on pool threads, so reading goes on meanwhile.
    const good = await checkPages(pages, want);
    for (let k = 0; k < n; k++) {
      const e = entries[k]!;
      await put(e, good[k] ? pages[k]! : await recover(e, pages[k]));
    }
  };

  // The S3 path (backends with readSlots): a chunk's pages, sorted by pack and
  // slot, become runs of neighbouring slots (gaps up to 16 pages read
  // through); each run is one range GET straight into a buffer this worker
  // owns and reuses, all pages of the buffer are checked in one native call
  // (no JS object per page), then written to the sink from it.
  const slots = slotReader(backend);
  const bufPages = Math.max(1, Math.min(chunkPages, MAX_RUN_PAGES));
  const worker = async (): Promise<void> => {
    let buf: Buffer | null = null, want: Buffer | null = null, index: Uint32Array | null = null, inBuf: Uint32Array | null = null;
    while (next < chunks.length) {
      const chunk = chunks[next++]!;
      if (!slots) {
        await readGeneral(chunk);
      } else {
        buf ??= Buffer.allocUnsafeSlow(bufPages * PAGE_SIZE);
        want ??= Buffer.allocUnsafeSlow(chunkPages * HASH_BYTES);
        index ??= new Uint32Array(chunkPages);
        inBuf ??= new Uint32Array(chunkPages);
        let k = 0;
        while (k < chunk.length) {
          // Runs that fit the buffer together: [start, end) of chunk each, placed side by side.
          const runs: { start: number; end: number; id: number; first: number; last: number; at: number }[] = [];
          let used = 0;
          while (k < chunk.length) {
            const e = chunk[k]!;
            const id = hiOf[e]! * 0x10000 + (loOf[e]! >>> 16), slot = loOf[e]! & 0xffff;
            const r = runs[runs.length - 1];
            if (r && r.id === id && slot - r.last <= MAX_GAP_PAGES && slot - r.first < bufPages && r.at + slot - r.first < bufPages) {
              used += slot - r.last;
              r.last = slot; r.end = ++k;
              continue;
            }
            if (used + 1 > bufPages) break;
            runs.push({ start: k, end: k + 1, id, first: slot, last: slot, at: used });
            used += 1;
            k++;
          }
          const got = await Promise.all(runs.map((r) => slots.readSlots(r.id, r.first, r.last, buf!.subarray(r.at * PAGE_SIZE, (r.at + r.last - r.first + 1) * PAGE_SIZE))));
          // Pages that arrived are checked in place; the others take the general path.
          let n = 0;
          const others: number[] = [];
          runs.forEach((r, j) => {
            const have = got[j] ? Math.floor(got[j]!.length / PAGE_SIZE) : 0;
            for (let q = r.start; q < r.end; q++) {
              const e = chunk[q]!;
              const rel = (loOf[e]! & 0xffff) - r.first;
              if (rel >= have) { others.push(e); continue; }
              index![n] = r.at + rel;
              inBuf![n] = e;
              const off = entryOff(e);
              maps[regionOf[e]!]!.copy(want!, n * HASH_BYTES, off, off + HASH_BYTES);
              n++;
            }
          });
          const bad = n > 0 ? await verifyPages(buf, want.subarray(0, n * HASH_BYTES), index.subarray(0, n)) : [];
          for (let i = 0, b = 0; i < n; i++) {
            const e = inBuf[i]!;
            const at = index[i]! * PAGE_SIZE;
            if (b < bad.length && bad[b] === i) {
              b++;
              await put(e, await recover(e, buf.subarray(at, at + PAGE_SIZE)));
            } else {
              await put(e, buf.subarray(at, at + PAGE_SIZE));
            }
          }
          await readGeneral(others);
        }
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
