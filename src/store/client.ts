/**
 * Client library of the Store service: what agents, CLIs, tests and
 * benchmarks use. Every failure is an ExaError (src/errors.ts) whose message
 * says which call failed.
 *
 *   const store = await StoreClient.connect('127.0.0.1:7700');
 *   const info = await store.putCheckpoint({ job, parent, regions }, batches);
 *   for await (const piece of store.getImage({ job, checkpoint })) ...
 *
 * Backpressure: putCheckpoint() pulls the next batch from its source only
 * when fewer than `window` batches are in flight (hashes sent, data not yet
 * stored), and awaits the gRPC write callback of every message, so memory in
 * flight is bounded by window x batch size.
 */
import { ExaError, fromGrpcError, toExaError } from '../errors.js';
import { callMetadata, callUnary, createClient, grpc, waitForReady, writeMessage, type ClientOptions } from '../grpc.js';
import type { StoreClient as GenStoreClient } from '../gen/exa/v1/Store.js';
import type { PutRequest } from '../gen/exa/v1/PutRequest.js';
import type { PutResponse__Output } from '../gen/exa/v1/PutResponse.js';
import type { ImageChunk__Output } from '../gen/exa/v1/ImageChunk.js';
import type { RegionSpec } from '../../storage/backend.js';
import { hashEach, hashPages } from '../../storage/hash.js';
import { tuneMallocForStreaming } from '../../storage/pagetable.js';
import { HASH_BYTES, PAGE_SIZE, isZeroPage } from '../../storage/pages.js';
import { infoFromProto, regionToProto, type CheckpointSummary } from './convert.js';
import { storeProto } from './proto.js';
import { releaseReceived } from '../grpc-recv-pool.js';

export type { CheckpointSummary, RegionSpec };

/**
 * A batch of pages, column by column (n pages). The checkpointer produces
 * exactly this; tests build it with pagesToBatch().
 */
export interface PageBatch {
  /** Region of each page: index into the region table given to putCheckpoint. */
  region: ArrayLike<number>;
  /** Page index of each page within its region. */
  index: ArrayLike<number>;
  /** n x 4096 bytes, page i at i*4096 (a zero page's bytes are not read when zero[i] is set). */
  data: Buffer;
  /** n x 32 bytes of SHA-256; computed here (with zero detection) when omitted. */
  hashes?: Buffer;
  /** n flags, 1 = zero page (never sent, never stored). */
  zero?: Uint8Array;
}

/** One page for pagesToBatch(). */
export interface PageIn {
  region: number;
  index: number;
  bytes: Buffer | null;   // null = zero page
  hash?: Buffer;
}

/** Build a PageBatch from page records. */
export function pagesToBatch(pages: readonly PageIn[]): PageBatch {
  const n = pages.length;
  const data = Buffer.alloc(n * PAGE_SIZE);
  const zero = new Uint8Array(n);
  let allHashed = true;
  const hashes = Buffer.alloc(n * HASH_BYTES);
  pages.forEach((p, i) => {
    if (!p.bytes) { zero[i] = 1; return; }
    if (p.bytes.length !== PAGE_SIZE) throw new ExaError('INVALID_ARGUMENT', `page ${p.index} of region ${p.region} is ${p.bytes.length} bytes, not 4096`);
    p.bytes.copy(data, i * PAGE_SIZE);
    if (p.hash) p.hash.copy(hashes, i * HASH_BYTES); else allHashed = false;
  });
  return { region: pages.map((p) => p.region), index: pages.map((p) => p.index), data, zero, ...(allHashed ? { hashes } : {}) };
}

export interface PutOptions {
  job: string;
  /** 0 = a full checkpoint (pages not sent are zero); else pages not sent are the parent's. */
  parent: number;
  regions: RegionSpec[];
  labels?: Record<string, string>;
  /** Batches in flight (default 4). */
  window?: number;
  /** Called after each batch is stored. */
  onProgress?: (p: { batches: number; pages: number; sentBytes: number; newPages: number }) => void;
}

export interface ImageRequest {
  job: string;
  /** 0 / undefined = latest. */
  checkpoint?: number;
  region?: string;
  firstPage?: number;
  pageCount?: number;
  /** Delta read: only pages that differ from this checkpoint of the job (sparse pieces). */
  since?: number;
}

/**
 * A run of pages of one region, zero pages expanded: data is pageCount x 4096
 * bytes. A delta read (since) gives sparse pieces: `pages` lists the page
 * indexes held, in data order.
 */
export interface ImagePiece {
  region: string;
  firstPage: number;
  pageCount: number;
  data: Buffer;
  pages?: number[];
  /**
   * Hand `data` back to the receive pool (src/grpc-recv-pool.ts) once it has
   * been consumed (copied or written out): later pieces then reuse its memory
   * instead of allocating. Optional to call; after it, `data` must not be used.
   */
  release(): void;
}

export interface JobSummary { job: string; checkpoints: number; latest: number; latestAt: string; logicalBytes: number }
export interface ProgressInfo { phase: string; done: number; total: number; unit: string }
export interface GcResult { livePages: number; markedPages: number; revivedPages: number; deletedPages: number; reclaimedBytes: number; pendingPages: number }
export interface Problem { job: string; checkpoint: number; region: string; page: number; kind: string; message: string }
export interface VerifyResult { checkpoints: number; pagesChecked: number; problems: Problem[]; ok: boolean }
export interface CompactResult { job: string; checkpoints: number; pagesMoved: number; refsUpdated: number }
export interface JobStat { job: string; checkpoints: number; logicalBytes: number; sentBytes: number; storedBytes: number; dedupRatio: number }
export interface StoreStat {
  jobs: JobStat[]; logicalBytes: number; storedBytes: number; storedPages: number; metadataBytes: number; dedupRatio: number; pendingGcPages: number;
}

/**
 * Compute hashes and zero flags of a batch that came without them: zero
 * pages found by memcmp, the others hashed in one batch off the JS thread
 * (storage/hash.ts).
 */
async function completeBatch(b: PageBatch): Promise<{ hashes: Buffer; zero: Uint8Array | null }> {
  const n = b.region.length;
  if (b.index.length !== n) throw new ExaError('INVALID_ARGUMENT', `batch has ${n} regions but ${b.index.length} indexes`);
  if (b.data.length < n * PAGE_SIZE && !(b.zero && b.hashes)) throw new ExaError('INVALID_ARGUMENT', `batch of ${n} pages has only ${b.data.length} bytes of data`);
  if (b.hashes) return { hashes: b.hashes, zero: b.zero ?? null };
  let zero: Uint8Array | null = b.zero ? Uint8Array.from(b.zero) : null;
  const pages: (Buffer | null)[] = new Array<Buffer | null>(n);
  for (let i = 0; i < n; i++) {
    const page = b.data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
    if ((zero && zero[i]) || isZeroPage(page)) { (zero ??= new Uint8Array(n))[i] = 1; pages[i] = null; } else pages[i] = page;
  }
  // A zero page's entry stays all-zero (null hashes to 32 zero bytes), as the store expects.
  const hashes = zero ? await hashEach(pages) : await hashPages(b.data.length === n * PAGE_SIZE ? b.data : b.data.subarray(0, n * PAGE_SIZE));
  return { hashes, zero };
}

export class StoreClient {
  private constructor(private readonly client: GenStoreClient, readonly address: string, private readonly opts: ClientOptions) {}

  /** Connect (waits until the channel is ready; UNAVAILABLE naming the address otherwise). */
  static async connect(address: string, opts: ClientOptions & { timeoutMs?: number } = {}): Promise<StoreClient> {
    // Uploads and restores stream multi-MiB messages through this process too (storage/pagetable.ts).
    tuneMallocForStreaming();
    const c = createClient(storeProto().exa.v1.Store, address, opts);
    try {
      await waitForReady(c, address, opts.timeoutMs ?? 10_000);
    } catch (e) {
      c.close();
      throw e;
    }
    return new StoreClient(c, address, opts);
  }

  close(): void {
    this.client.close();
  }

  private md(): grpc.Metadata {
    return callMetadata(this.opts);
  }

  /**
   * Upload one checkpoint from an (async) iterable of page batches. Resolves
   * with the committed checkpoint (its number assigned by the store) only
   * after the store recorded it durably; on any failure nothing is recorded.
   */
  async putCheckpoint(opts: PutOptions, batches: AsyncIterable<PageBatch> | Iterable<PageBatch>): Promise<CheckpointSummary> {
    const what = `put checkpoint of job ${opts.job} to ${this.address}`;
    const call = this.client.PutCheckpoint(this.md());
    const window = Math.max(1, opts.window ?? 4);
    let failure: ExaError | null = null;
    let wake: (() => void) | null = null;
    const notify = (): void => { const w = wake; wake = null; w?.(); };
    const waitEvent = (): Promise<void> => new Promise<void>((r) => { wake = r; });
    let ready = false;
    let committed: CheckpointSummary | null = null;
    const inflight = new Map<number, { batch: PageBatch }>();
    const stats = { batches: 0, pages: 0, sentBytes: 0, newPages: 0 };
    // One ordered writer: data goes out as soon as the store asks for it,
    // whatever the source is doing; each write waits for the transport.
    let chain: Promise<void> = Promise.resolve();
    // A write's callback may never come once the call has failed: stop waiting then.
    let closed!: () => void;
    const whenClosed = new Promise<void>((r) => { closed = r; });
    call.on('status', () => closed());
    const send = (m: PutRequest): Promise<void> => {
      const p = chain.then(() => (failure ? undefined : Promise.race([writeMessage(call, m), whenClosed]))).catch((e: unknown) => {
        failure ??= fromGrpcError(e, what);
        notify();
      });
      chain = p;
      return p;
    };

    call.on('data', (msg: PutResponse__Output) => {
      switch (msg.msg) {
        case 'ready': ready = true; break;
        case 'wanted': {
          const w = msg.wanted!;
          const entry = inflight.get(w.batch);
          if (!entry) { failure ??= new ExaError('INTERNAL', `${what}: store wants batch ${w.batch}, which was not sent`); break; }
          if (w.want.length === 0) { inflight.delete(w.batch); break; }
          const want = w.want;
          const src = entry.batch.data;
          let data: Buffer;
          if (want.length * PAGE_SIZE === src.length && want.every((p, i) => p === i)) data = src;
          else {
            data = Buffer.allocUnsafe(want.length * PAGE_SIZE);
            want.forEach((p, i) => src.copy(data, i * PAGE_SIZE, p * PAGE_SIZE, (p + 1) * PAGE_SIZE));
          }
          stats.sentBytes += data.length;
          void send({ data: { batch: w.batch, data } });
          break;
        }
        case 'stored':
          inflight.delete(msg.stored!.batch);
          stats.newPages += msg.stored!.pages;
          break;
        case 'committed': committed = infoFromProto(msg.committed!); break;
        default: break;
      }
      notify();
    });
    call.on('error', (e) => { failure ??= fromGrpcError(e, what); closed(); notify(); });
    call.on('end', () => { if (!committed) failure ??= new ExaError('UNAVAILABLE', `${what}: the store ended the stream without committing`); notify(); });
    const check = (): void => { if (failure) throw failure; };

    try {
      await send({ begin: { job: opts.job, parent: opts.parent, regions: opts.regions.map(regionToProto), labels: opts.labels ?? {} } });
      while (!ready) { check(); await waitEvent(); }
      let next = 0;
      for await (const batch of batches as AsyncIterable<PageBatch>) {
        check();
        const n = batch.region.length;
        if (n === 0) continue;
        const { hashes, zero } = await completeBatch(batch);
        // Backpressure: at most `window` batches between hashes and stored.
        while (inflight.size >= window) { check(); await waitEvent(); }
        check();
        const id = next++;
        inflight.set(id, { batch });
        await send({ hashes: { batch: id, region: Array.from(batch.region), index: Array.from(batch.index), hashes, zero: zero ? Buffer.from(zero.buffer, zero.byteOffset, zero.length) : Buffer.alloc(0) } });
        stats.batches++;
        stats.pages += n;
        opts.onProgress?.({ ...stats });
      }
      while (inflight.size > 0) { check(); await waitEvent(); }
      check();
      await send({ commit: {} });
      while (!committed) { check(); await waitEvent(); }
      call.end();
      opts.onProgress?.({ ...stats });
      return committed;
    } catch (e) {
      call.cancel();
      throw e instanceof ExaError ? e : toExaError(e, what);
    }
  }

  /**
   * The image of a checkpoint as an async iterator: first `{ info }`, then
   * pieces in region/page order (zero pages expanded). Breaking out of the
   * loop cancels the call.
   */
  async *getImage(req: ImageRequest): AsyncGenerator<{ info: CheckpointSummary } | ImagePiece> {
    const what = `image of checkpoint ${req.checkpoint || 'latest'} of job ${req.job} from ${this.address}`;
    const call = this.client.GetImage({
      job: req.job, checkpoint: req.checkpoint ?? 0, region: req.region ?? '', first_page: req.firstPage ?? 0, page_count: req.pageCount ?? 0,
      since: req.since ?? 0,
    }, this.md());
    let done = false;
    try {
      for await (const chunk of call as AsyncIterable<ImageChunk__Output>) {
        if (chunk.msg === 'info') { yield { info: infoFromProto(chunk.info!) }; continue; }
        const p = chunk.pages!;
        let data = p.data;
        if (p.zero.length > 0) {
          data = Buffer.alloc(p.page_count * PAGE_SIZE);
          let k = 0;
          for (let i = 0; i < p.page_count; i++) {
            if (p.zero[i]) continue;
            p.data.copy(data, i * PAGE_SIZE, k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
            k++;
          }
        }
        const received = p.data;
        yield {
          region: p.region, firstPage: p.first_page, pageCount: p.page_count, data, ...(p.pages.length ? { pages: p.pages } : {}),
          release: () => releaseReceived(received),
        };
      }
      done = true;
    } catch (e) {
      done = true;
      throw fromGrpcError(e, what);
    } finally {
      if (!done) call.cancel();
    }
  }

  /** Convenience: a whole image (or range) in memory, one buffer per region. */
  async fetchImage(req: ImageRequest): Promise<{ info: CheckpointSummary; regions: Map<string, Buffer> }> {
    let info: CheckpointSummary | null = null;
    const regions = new Map<string, Buffer>();
    let base = 0;
    for await (const item of this.getImage(req)) {
      if ('info' in item) {
        info = item.info;
        for (const r of info.regions) {
          if (req.region && r.name !== req.region) continue;
          const count = req.region ? (req.pageCount || r.pageCount - (req.firstPage ?? 0)) : r.pageCount;
          regions.set(r.name, Buffer.alloc(count * PAGE_SIZE));
        }
        base = req.firstPage ?? 0;
        continue;
      }
      const buf = regions.get(item.region)!;
      item.data.copy(buf, (item.firstPage - (req.region ? base : 0)) * PAGE_SIZE);
      item.release();
    }
    if (!info) throw new ExaError('INTERNAL', `image of job ${req.job}: the store sent no header`);
    return { info, regions };
  }

  listJobs(): Promise<JobSummary[]> {
    return callUnary<{ jobs: { job: string; checkpoints: number; latest: number; latest_at: string; logical_bytes: string }[] }>(
      `list jobs on ${this.address}`, (cb) => this.client.ListJobs({}, this.md(), cb as never),
    ).then((r) => r.jobs.map((j) => ({ job: j.job, checkpoints: j.checkpoints, latest: j.latest, latestAt: j.latest_at, logicalBytes: Number(j.logical_bytes) })));
  }

  listCheckpoints(job: string): Promise<CheckpointSummary[]> {
    return callUnary<{ checkpoints: Parameters<typeof infoFromProto>[0][] }>(
      `list checkpoints of job ${job} on ${this.address}`, (cb) => this.client.ListCheckpoints({ job }, this.md(), cb as never),
    ).then((r) => r.checkpoints.map(infoFromProto));
  }

  deleteCheckpoints(job: string, req: { checkpoints?: number[]; keepLast?: number; keepEvery?: number; dryRun?: boolean }): Promise<{ deleted: number[]; kept: number[] }> {
    return callUnary<{ deleted: number[]; kept: number[] }>(`delete checkpoints of job ${job} on ${this.address}`, (cb) => this.client.DeleteCheckpoints({
      job, checkpoints: req.checkpoints ?? [], keep_last: req.keepLast ?? 0, keep_every: req.keepEvery ?? 0, dry_run: req.dryRun ?? false,
    }, this.md(), cb as never)).then((r) => ({ deleted: r.deleted, kept: r.kept }));
  }

  async stat(job?: string): Promise<StoreStat> {
    const r = await callUnary<{
      jobs: { job: string; checkpoints: number; logical_bytes: string; sent_bytes: string; stored_bytes: string; dedup_ratio: number }[];
      logical_bytes: string; stored_bytes: string; stored_pages: string; metadata_bytes: string; dedup_ratio: number; pending_gc_pages: string;
    }>(`stat ${job ? `job ${job}` : 'store'} on ${this.address}`, (cb) => this.client.Stat({ job: job ?? '' }, this.md(), cb as never));
    return {
      jobs: r.jobs.map((j) => ({ job: j.job, checkpoints: j.checkpoints, logicalBytes: Number(j.logical_bytes), sentBytes: Number(j.sent_bytes), storedBytes: Number(j.stored_bytes), dedupRatio: j.dedup_ratio })),
      logicalBytes: Number(r.logical_bytes), storedBytes: Number(r.stored_bytes), storedPages: Number(r.stored_pages),
      metadataBytes: Number(r.metadata_bytes), dedupRatio: r.dedup_ratio, pendingGcPages: Number(r.pending_gc_pages),
    };
  }

  /** Consume a progress-then-result stream. */
  private async progressCall<R>(what: string, call: grpc.ClientReadableStream<{ msg?: string; progress?: ProgressInfo | null; result?: R | null }>, onProgress?: (p: ProgressInfo) => void): Promise<R> {
    let result: R | null = null;
    try {
      for await (const m of call) {
        if (m.msg === 'progress' && m.progress) onProgress?.({ ...m.progress, done: Number(m.progress.done), total: Number(m.progress.total) });
        else if (m.msg === 'result' && m.result) result = m.result;
      }
    } catch (e) {
      throw fromGrpcError(e, what);
    }
    if (result === null) throw new ExaError('INTERNAL', `${what}: no result from the store`);
    return result;
  }

  async gc(opts: { graceSeconds?: number; dryRun?: boolean } = {}, onProgress?: (p: ProgressInfo) => void): Promise<GcResult> {
    const r = await this.progressCall<Record<string, string>>(`gc on ${this.address}`,
      this.client.Gc({ grace_seconds: opts.graceSeconds ?? -1, dry_run: opts.dryRun ?? false }, this.md()) as never, onProgress);
    return {
      livePages: Number(r.live_pages), markedPages: Number(r.marked_pages), revivedPages: Number(r.revived_pages),
      deletedPages: Number(r.deleted_pages), reclaimedBytes: Number(r.reclaimed_bytes), pendingPages: Number(r.pending_pages),
    };
  }

  async verify(opts: { job?: string; checkpoint?: number; allPages?: boolean } = {}, onProgress?: (p: ProgressInfo) => void): Promise<VerifyResult> {
    const r = await this.progressCall<{ checkpoints: string; pages_checked: string; problems: Problem[]; ok: boolean }>(
      `verify ${opts.job ? `job ${opts.job}` : 'store'} on ${this.address}`,
      this.client.Verify({ job: opts.job ?? '', checkpoint: opts.checkpoint ?? 0, all_pages: opts.allPages ?? false }, this.md()) as never, onProgress);
    return { checkpoints: Number(r.checkpoints), pagesChecked: Number(r.pages_checked), problems: r.problems.map((p) => ({ ...p })), ok: r.ok };
  }

  async compact(job: string, onProgress?: (p: ProgressInfo) => void): Promise<CompactResult> {
    const r = await this.progressCall<{ job: string; checkpoints: number; pages_moved: string; refs_updated: string }>(
      `compact job ${job} on ${this.address}`, this.client.Compact({ job }, this.md()) as never, onProgress);
    return { job: r.job, checkpoints: r.checkpoints, pagesMoved: Number(r.pages_moved), refsUpdated: Number(r.refs_updated) };
  }
}
