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
import type { Backend, ManifestHeader, PageMaps, PageRef } from '../backend.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, isZeroHash, sha256 } from '../pages.js';
import { checkPages, verifyPages } from '../hash.js';
import type { GetHooks } from './io.js';

/** Pages one range GET may cover (8 MiB), and the longest gap of unwanted pages read through. */
const MAX_RUN_PAGES = 2048;
const MAX_GAP_PAGES = 16;
/** Pages of a GET body checked per native call while the rest of the body arrives (1 MiB). */
const CHECK_STEP_PAGES = 256;
/** Word loads of page maps byte-swap refs on little-endian hosts (all that node runs on here); others read bytes. */
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/**
 * Backends that read runs of slots of one pack straight into the caller's
 * memory (S3Backend.readSlots); a ref is then a 48-bit pack id and a
 * 16-bit slot (./backend.ts).
 */
interface SlotReader {
  readSlots(refId: number, first: number, last: number, into: Buffer, hooks?: GetHooks): Promise<Buffer | null>;
  /** Range GETs the backend runs at once (more wait in its queue). */
  readonly readConcurrency?: number;
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
  /**
   * Optional: `count` consecutive pages of one region, from page `first`,
   * side by side in `data` (count x 4096 bytes), all checked; lent like
   * write()'s. The S3 path hands over pages that arrived together this way
   * (one call and one view per run instead of per page); pages it cannot
   * group go to write().
   */
  writeRun?(region: number, first: number, count: number, data: Buffer): void | Promise<void>;
}

export interface RestoreOptions {
  /**
   * Chunks in progress at once (default 16): read, checked, written. The S3
   * backend caps its own GETs in flight (readConcurrency), so extra chunks
   * only keep a GET queued while others are being checked and written.
   */
  concurrency?: number;
  /**
   * Pages per chunk (default 2048 = 8 MiB). On S3 each chunk worker owns one
   * buffer of min(chunkPages, 2048) pages that it reuses for its GETs:
   * concurrency x 8 MiB at the defaults.
   */
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
  let maps: PageMaps | null = null;
  if (n !== 0) {
    // The maps first: on S3 that fetches and checks the manifest once, and the header then comes from memory.
    maps = await backend.getMaps(job, n);
    if (!maps) throw new ExaError('NOT_FOUND', `checkpoint ${n} of job ${job} does not exist in the ${backend.kind} store`, { job, checkpoint: n });
  }
  const header = await resolveCheckpoint(backend, job, n);
  const sink = typeof sinkOrFactory === 'function' ? await sinkOrFactory(header) : sinkOrFactory;
  n = header.checkpoint;
  maps ??= await backend.getMaps(job, n);
  if (!maps) throw new ExaError('NOT_FOUND', `checkpoint ${n} of job ${job} does not exist`, { job, checkpoint: n });
  // Every non-zero page as numbers only (region, page, ref halves): no
  // Buffer object per page, which would keep the major GC busy marking
  // hundreds of thousands of live typed arrays during the whole restore.
  let total = 0;
  for (const m of maps) total += m.length / ENTRY_BYTES;
  const regionOf = new Uint32Array(total), pageOf = new Uint32Array(total), hiOf = new Uint32Array(total), loOf = new Uint32Array(total);
  let count = 0, zeroPages = 0;
  maps.forEach((m, r) => {
    if (LITTLE_ENDIAN && m.byteOffset % 4 === 0) {
      // Word loads (a 40-byte entry is 10 words): the hash is zero when its 8 words are; the
      // ref's two big-endian halves are words 8 and 9 byte-swapped.
      const w = new Uint32Array(m.buffer, m.byteOffset, m.length >>> 2);
      for (let i = 0, o = 0; o < w.length; i++, o += ENTRY_BYTES / 4) {
        if ((w[o]! | w[o + 1]! | w[o + 2]! | w[o + 3]! | w[o + 4]! | w[o + 5]! | w[o + 6]! | w[o + 7]!) === 0) { zeroPages++; continue; }
        const a = w[o + 8]!, b = w[o + 9]!;
        regionOf[count] = r; pageOf[count] = i;
        hiOf[count] = ((a << 24) | ((a & 0xff00) << 8) | ((a >>> 8) & 0xff00) | (a >>> 24)) >>> 0;
        loOf[count] = ((b << 24) | ((b & 0xff00) << 8) | ((b >>> 8) & 0xff00) | (b >>> 24)) >>> 0;
        count++;
      }
      return;
    }
    for (let i = 0, off = 0; off < m.length; i++, off += ENTRY_BYTES) {
      if (isZeroHash(m, off)) { zeroPages++; continue; }
      regionOf[count] = r; pageOf[count] = i;
      hiOf[count] = m.readUInt32BE(off + HASH_BYTES); loOf[count] = m.readUInt32BE(off + HASH_BYTES + 4);
      count++;
    }
  });
  // By location (the ref as two 32-bit halves), so pages of one pack in slot order form chunks.
  const order = byLocation(hiOf, loOf, count);
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
  /** Write one page; a promise only when the sink returns one (no microtask per page otherwise). */
  const put = (e: number, page: Buffer): void | Promise<void> => sink.write(regionOf[e]!, pageOf[e]!, page);
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
      const w = put(e, good[k] ? pages[k]! : await recover(e, pages[k]));
      if (w) await w;
    }
  };

  // The S3 path (backends with readSlots): a chunk's pages, sorted by pack and
  // slot, become runs of neighbouring slots (gaps up to 16 pages read
  // through); each run is one range GET straight into a buffer this worker
  // owns and reuses; its pages are checked by native calls over that buffer
  // (no JS object per page), 1 MiB at a time while the body still arrives,
  // then written to the sink from it.
  const slots = slotReader(backend);
  // Word views of the page maps where they are 4-byte aligned (a 40-byte entry is 10 words, its hash the first 8).
  const maps32 = maps.map((m) => (m.byteOffset % 4 === 0 ? new Uint32Array(m.buffer, m.byteOffset, Math.floor(m.length / 4)) : null));
  const bufPages = Math.max(1, Math.min(chunkPages, MAX_RUN_PAGES));
  // GET buffers: a worker holds one only while its chunk is read, checked and written, and
  // there are at most the backend's GETs in flight + 2 (workers beyond that wait for one), so
  // no more memory is touched (page-faulted in, zeroed by the kernel) than those GETs fill.
  const workers = Math.min(opts.concurrency ?? 16, chunks.length);
  const maxBufs = Math.max(1, Math.min(workers, (slots?.readConcurrency ?? workers) + 2));
  const freeBufs: Buffer[] = [], bufWaiters: ((b: Buffer) => void)[] = [];
  let madeBufs = 0;
  const takeBuf = async (): Promise<Buffer> => {
    const b = freeBufs.pop();
    if (b) return b;
    if (madeBufs < maxBufs) { madeBufs++; return Buffer.allocUnsafeSlow(bufPages * PAGE_SIZE); }
    return new Promise<Buffer>((r) => bufWaiters.push(r));
  };
  const giveBuf = (b: Buffer): void => {
    const w = bufWaiters.shift();
    if (w) w(b); else freeBufs.push(b);
  };
  const worker = async (): Promise<void> => {
    let want: Buffer | null = null, want32: Uint32Array | null = null, index: Uint32Array | null = null, inBuf: Uint32Array | null = null;
    while (next < chunks.length) {
      const chunk = chunks[next++]!;
      if (!slots) {
        await readGeneral(chunk);
      } else {
        const buf = await takeBuf();
        try {
          if (!want) {
            want = Buffer.allocUnsafeSlow(chunkPages * HASH_BYTES);
            want32 = new Uint32Array(want.buffer, want.byteOffset, want.length / 4);
          }
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
            // Every page of the batch gets its place in the buffer and its expected hash first.
            let n = 0;
            const st = runs.map((r) => {
              const n0 = n;
              for (let q = r.start; q < r.end; q++) {
                const e = chunk[q]!;
                index![n] = r.at + (loOf[e]! & 0xffff) - r.first;
                inBuf![n] = e;
                // By hand (Buffer.copy per page costs a native call each): 8 words when the map is 4-byte aligned.
                const r32 = maps32[regionOf[e]!];
                if (r32) {
                  const from = pageOf[e]! * (ENTRY_BYTES / 4), to = n * (HASH_BYTES / 4);
                  for (let x = 0; x < HASH_BYTES / 4; x++) want32![to + x] = r32[from + x]!;
                } else {
                  const m = maps[regionOf[e]!]!, off = entryOff(e), to = n * HASH_BYTES;
                  for (let x = 0; x < HASH_BYTES; x++) want![to + x] = m[off + x]!;
                }
                n++;
              }
              return { n0, n1: n, arrived: n0, checked: n0, checks: [] as Promise<number[]>[] };
            });
            const b = buf, w = want, ix = index;
            // Pages are checked while the body still streams in, a step at a time: when the last
            // byte arrives only the last step is left to hash.
            const check = (s: typeof st[number], upTo: number): void => {
              const from = s.checked;
              const p = verifyPages(b, w.subarray(from * HASH_BYTES, upTo * HASH_BYTES), ix.subarray(from, upTo)).then((bad) => bad.map((x) => x + from));
              p.catch(() => undefined); // awaited below; not an unhandled rejection if the GET fails first
              s.checks.push(p);
              s.checked = upTo;
            };
            const arrive = (s: typeof st[number], r: typeof runs[number], bytes: number, last: boolean): void => {
              const pages = r.at + Math.floor(bytes / PAGE_SIZE);
              while (s.arrived < s.n1 && ix[s.arrived]! < pages) s.arrived++;
              if (s.arrived - s.checked >= (last ? 1 : CHECK_STEP_PAGES)) check(s, s.arrived);
            };
            const got = await Promise.all(runs.map((r, j) => {
              const s = st[j]!;
              return slots.readSlots(r.id, r.first, r.last, b.subarray(r.at * PAGE_SIZE, (r.at + r.last - r.first + 1) * PAGE_SIZE), {
                onData: (bytes) => arrive(s, r, bytes, false),
                // A retried GET writes its part of the buffer again: no check may be reading it then.
                beforeRetry: async () => {
                  await Promise.allSettled(s.checks);
                  s.checks = [];
                  s.arrived = s.checked = s.n0;
                },
              });
            }));
            // Pages that arrived are checked in place; the others take the general path.
            const others: number[] = [];
            const bad = new Set<number>();
            for (let j = 0; j < runs.length; j++) {
              const s = st[j]!, g = got[j];
              if (g) arrive(s, runs[j]!, g.length, true);
              else await Promise.allSettled(s.checks);
              for (const list of g ? await Promise.all(s.checks) : []) for (const x of list) bad.add(x);
              const upTo = g ? s.arrived : s.n0;
              for (let i = upTo; i < s.n1; i++) others.push(inBuf[i]!);
              for (let i = s.n0; i < upTo;) {
                const e = inBuf[i]!;
                const at = ix[i]! * PAGE_SIZE;
                if (bad.has(i)) {
                  const w = put(e, await recover(e, b.subarray(at, at + PAGE_SIZE)));
                  if (w) await w;
                  i++;
                  continue;
                }
                if (sink.writeRun) {
                  // Consecutive pages of one region lying side by side in the buffer, none bad.
                  const region = regionOf[e]!, page = pageOf[e]!, slot = ix[i]!;
                  let j = i + 1;
                  while (j < upTo && regionOf[inBuf[j]!] === region && pageOf[inBuf[j]!] === page + (j - i) && ix[j] === slot + (j - i) && (bad.size === 0 || !bad.has(j))) j++;
                  if (j - i > 1) {
                    const w = sink.writeRun(region, page, j - i, b.subarray(at, at + (j - i) * PAGE_SIZE));
                    if (w) await w;
                    i = j;
                    continue;
                  }
                }
                const w = put(e, b.subarray(at, at + PAGE_SIZE));
                if (w) await w;
                i++;
              }
            }
            await readGeneral(others);
          }
        } finally {
          giveBuf(buf);
        }
      }
      done += chunk.length;
      opts.onProgress?.({ pages: done, total: count });
    }
  };
  await Promise.all(Array.from({ length: workers }, worker));
  return { header, pages: count, zeroPages, bytes: count * PAGE_SIZE };
}

/**
 * The entries 0..count-1 ordered by (hi, lo). A checkpoint written in one go
 * lies in its packs in page order, so the entries form a few ascending runs
 * within one pack each (packs in random id order): those runs are put in
 * order by their first key, in O(count) plus a sort of the runs; when runs
 * overlap (pages of one pack out of order), a full sort.
 */
export function byLocation(hiOf: Uint32Array, loOf: Uint32Array, count: number): Uint32Array {
  const order = new Uint32Array(count);
  const before = (a: number, b: number): boolean => hiOf[a]! < hiOf[b]! || (hiOf[a] === hiOf[b] && loOf[a]! <= loOf[b]!);
  const starts: number[] = [];
  // A run is ascending and within one pack (the pack id is hi and the top half of lo), so runs
  // of different packs never overlap and need no merging.
  // (Plain loads and compares: this runs once per restore, mostly before the JIT has warmed up.)
  if (count > 0) starts.push(0);
  for (let k = 1, ph = hiOf[0]!, pl = loOf[0]!; k < count; k++) {
    const h = hiOf[k]!, l = loOf[k]!;
    if (h !== ph || l >>> 16 !== pl >>> 16 || l < pl) starts.push(k);
    ph = h; pl = l;
  }
  if (starts.length <= 1 || starts.length > 4096) {
    for (let k = 0; k < count; k++) order[k] = k;
    if (starts.length > 1) order.sort((a, b) => hiOf[a]! - hiOf[b]! || loOf[a]! - loOf[b]!);
    return order;
  }
  const runs = starts.map((start, i) => ({ start, end: starts[i + 1] ?? count }));
  runs.sort((x, y) => hiOf[x.start]! - hiOf[y.start]! || loOf[x.start]! - loOf[y.start]!);
  let o = 0;
  for (let r = 0; r < runs.length; r++) {
    const { start, end } = runs[r]!;
    // Runs that interleave (a pack's pages in two runs around another's) need the full sort.
    if (r > 0 && !before(runs[r - 1]!.end - 1, start)) {
      for (let k = 0; k < count; k++) order[k] = k;
      order.sort((a, b) => hiOf[a]! - hiOf[b]! || loOf[a]! - loOf[b]!);
      return order;
    }
    for (let k = start; k < end; k++) order[o++] = k;
  }
  return order;
}

/** A sink into one zeroed Buffer per region (fine for tests and modest images). */
export function bufferSink(header: ManifestHeader): PageSink & { regions: Map<string, Buffer> } {
  const bufs = header.regions.map((r) => Buffer.alloc(r.pageCount * PAGE_SIZE));
  return {
    regions: new Map(header.regions.map((r, i) => [r.name, bufs[i]!])),
    write(region, page, data) { data.copy(bufs[region]!, page * PAGE_SIZE); },
    writeRun(region, first, count, data) { data.copy(bufs[region]!, first * PAGE_SIZE, 0, count * PAGE_SIZE); },
  };
}
