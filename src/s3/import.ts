/**
 * Import a job's chain from an S3 archive into a RUNNING store server over
 * gRPC (PutCheckpoint), for a store that has never seen the job: this is
 * the piece `exarestore JOB --from s3://... --to HOST` needs, since the
 * target agent restores from its own store.
 *
 *   const s3 = await S3Backend.open(s3Options('s3://bucket/arch', flags));
 *   const r = await importJobToStore({ job, source: s3, store: await StoreClient.connect(addr) });
 *   // r.mapping: archive checkpoint number -> number in the store
 *
 * Each archived checkpoint is sent as an increment over the previous one
 * (only pages whose hash differs from what the store's copy of the parent
 * holds, zero pages as flags; the store dedups the rest), with its archive
 * number and time in labels exa.archive.checkpoint / exa.archive.created_at.
 * The store numbers checkpoints itself: an archive 1..N without gaps keeps
 * its numbers; after deleted checkpoints (1, 3, 4) the store's are 1, 2, 3,
 * which `mapping` reports. Page bytes are checked against their hashes as
 * they leave the archive (and again by the store).
 */
import { ExaError } from '../errors.js';
import type { PageBatch, StoreClient } from '../store/client.js';
import type { Backend, ManifestHeader, PageMaps } from '../../storage/backend.js';
import { checkJobName } from '../../storage/engine.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, isZeroHash, sha256 } from '../../storage/pages.js';

export interface ImportToStoreOptions {
  job: string;
  source: Backend;
  store: StoreClient;
  /** Pages per batch sent to the store (default 1024). */
  batchPages?: number;
  onProgress?: (p: { phase: string; done: number; total: number; unit: string }) => void;
}

export interface ImportToStoreResult {
  job: string;
  /** [archive number, store number] for each imported checkpoint, in order. */
  mapping: [number, number][];
  pagesSent: number;
}

/** The map a store builds for a child of `parent` before any page is sent (regions inherited by name). */
function inherited(parent: { header: ManifestHeader; maps: PageMaps } | null, regions: ManifestHeader['regions']): PageMaps {
  const maps = regions.map((r) => Buffer.alloc(r.pageCount * ENTRY_BYTES));
  if (!parent) return maps;
  parent.header.regions.forEach((pr, i) => {
    const r = regions.findIndex((x) => x.name === pr.name);
    if (r < 0) return;
    const n = Math.min(pr.pageCount, regions[r]!.pageCount);
    parent.maps[i]!.copy(maps[r]!, 0, 0, n * ENTRY_BYTES);
  });
  return maps;
}

export async function importJobToStore(opts: ImportToStoreOptions): Promise<ImportToStoreResult> {
  const job = checkJobName(opts.job);
  const { source, store } = opts;
  const batchPages = opts.batchPages ?? 1024;
  const headers = await source.listHeaders(job);
  if (headers.length === 0) throw new ExaError('NOT_FOUND', `job ${job} has no checkpoints in the ${source.kind} archive`, { job });
  const there = await store.listCheckpoints(job).catch((e: unknown) => {
    if ((e as ExaError).code === 'NOT_FOUND') return [];
    throw e;
  });
  if (there.length > 0) {
    throw new ExaError('ALREADY_EXISTS', `job ${job} already has ${there.length} checkpoints in the store; import only into a store that has never seen the job`, { job });
  }
  const res: ImportToStoreResult = { job, mapping: [], pagesSent: 0 };
  let prev: { header: ManifestHeader; maps: PageMaps; storeNumber: number } | null = null;
  let done = 0;
  for (const h of headers) {
    const maps = await source.getMaps(job, h.checkpoint);
    if (!maps) throw new ExaError('NOT_FOUND', `checkpoint ${h.checkpoint} of job ${job} vanished from the archive during the import`, { job, checkpoint: h.checkpoint });
    const base = inherited(prev, h.regions);
    // Positions whose hash differs from what the store will inherit.
    const todo: { r: number; i: number; off: number }[] = [];
    maps.forEach((m, r) => {
      const b = base[r]!;
      for (let off = 0, i = 0; off < m.length; off += ENTRY_BYTES, i++) {
        if (m.compare(b, off, off + HASH_BYTES, off, off + HASH_BYTES) !== 0) todo.push({ r, i, off });
      }
    });
    async function* batches(): AsyncGenerator<PageBatch> {
      for (let s = 0; s < todo.length; s += batchPages) {
        const part = todo.slice(s, s + batchPages);
        const n = part.length;
        const zero = new Uint8Array(n);
        const hashes = Buffer.alloc(n * HASH_BYTES);
        const data = Buffer.alloc(n * PAGE_SIZE);
        const reads: number[] = [];
        part.forEach((t, k) => {
          const m = maps![t.r]!;
          if (isZeroHash(m, t.off)) zero[k] = 1;
          else { m.copy(hashes, k * HASH_BYTES, t.off, t.off + HASH_BYTES); reads.push(k); }
        });
        const got = await source.readPages(reads.map((k) => { const t = part[k]!; return maps![t.r]!.subarray(t.off + HASH_BYTES, t.off + ENTRY_BYTES); }));
        for (let q = 0; q < reads.length; q++) {
          const k = reads[q]!;
          const want = hashes.subarray(k * HASH_BYTES, (k + 1) * HASH_BYTES);
          let page = got[q];
          if (!page || page.length !== PAGE_SIZE || !sha256(page).equals(want)) {
            const [ref] = await source.lookup([want]);
            const [again] = ref ? await source.readPages([ref]) : [null];
            if (!again || again.length !== PAGE_SIZE || !sha256(again).equals(want)) {
              const t = part[k]!;
              const region = h.regions[t.r]!.name;
              throw new ExaError('CORRUPT', `checkpoint ${h.checkpoint} of job ${job}: page ${t.i} of region ${JSON.stringify(region)} ${page ? 'does not match its hash' : 'is missing'} in the archive`, { job, checkpoint: h.checkpoint, region, page: t.i });
            }
            page = again;
          }
          page.copy(data, k * PAGE_SIZE);
        }
        res.pagesSent += reads.length;
        yield { region: part.map((t) => t.r), index: part.map((t) => t.i), data, hashes, zero };
      }
    }
    const info = await store.putCheckpoint({
      job, parent: prev?.storeNumber ?? 0, regions: h.regions,
      labels: { ...h.labels, 'exa.archive.checkpoint': String(h.checkpoint), 'exa.archive.created_at': new Date(h.createdAt).toISOString() },
    }, batches());
    res.mapping.push([h.checkpoint, info.checkpoint]);
    prev = { header: h, maps, storeNumber: info.checkpoint };
    opts.onProgress?.({ phase: 'import', done: ++done, total: headers.length, unit: 'checkpoints' });
  }
  return res;
}
