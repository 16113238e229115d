/**
 * The Store gRPC service over the storage engine: each RPC validates what
 * arrives, calls storage/engine.ts, and maps failures through src/errors.ts.
 * A bad request ends that call with a clear status; the server keeps serving.
 */
import type * as grpcTypes from '@grpc/grpc-js';
import { ExaError } from '../errors.js';
import { tenantScopeInterceptor, type TenantTable } from '../tenants.js';
import { bidiStream, bindServer, createServer, MAX_MESSAGE_BYTES, messageReader, serverCredentials, serverStream, unary, type ServerAuth, type ServerTls } from '../grpc.js';
import { grpc } from '../grpc.js';
import { storeProto } from './proto.js';
import { releaseReceived } from '../grpc-recv-pool.js';
import type { StoreHandlers } from '../gen/exa/v1/Store.js';
import type { PutRequest__Output } from '../gen/exa/v1/PutRequest.js';
import type { PutResponse } from '../gen/exa/v1/PutResponse.js';
import type { Progress } from '../gen/exa/v1/Progress.js';
import type { Backend } from '../../storage/backend.js';
import { CheckpointStore, type ProgressEvent, type PutSession } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { PAGE_SIZE } from '../../storage/pages.js';
import { headerToInfo, regionFromProto } from './convert.js';
import { tuneMallocForStreaming } from '../../storage/pagetable.js';
import { HEADROOM, headroomFor, type ImagePagesIn } from './codec-image.js';
import type { ImageChunk } from '../gen/exa/v1/ImageChunk.js';

/** Pages per GetImage message: 4 MiB (grpc-js streams 4 MiB messages faster than 1-2 MiB ones; MAX_MESSAGE_BYTES is 48 MiB). */
export const IMAGE_PIECE_PAGES = 1024;

export { storeProto };

/** Progress callback that forwards at most every 200 ms (and always the last step). */
function throttled(send: (p: Progress) => void): (p: ProgressEvent) => void {
  let last = 0;
  return (p) => {
    const now = Date.now();
    if (now - last < 200 && p.done !== p.total) return;
    last = now;
    send({ phase: p.phase, done: p.done, total: p.total, unit: p.unit });
  };
}

/** The Store service implementation for one engine. */
export function storeHandlers(store: CheckpointStore, auth: ServerAuth): StoreHandlers {
  return {
    PutCheckpoint: bidiStream<PutRequest__Output, PutResponse>(auth, async (call, emit, fail) => {
      let session: PutSession | null = null;
      let committed = false;
      // Page writes run beside the request loop (at most 2), so LevelDB writes
      // batch i while this thread checks the hashes of batch i+1.
      const writes: Promise<void>[] = [];
      const offers: { batch: number; p: Promise<void> }[] = [];
      let writeError: unknown = null;
      // A cancelled call never finishes its iteration: abort the upload from the event.
      call.on('cancelled', () => session?.abort());
      const next = messageReader<PutRequest__Output>(call);
      try {
        for (let req = await next(); req !== null; req = await next()) {
          switch (req.msg) {
            case 'begin': {
              if (session) throw new ExaError('INVALID_ARGUMENT', 'begin sent twice on one stream');
              const b = req.begin!;
              session = await store.beginPut({ job: b.job, parent: b.parent, regions: b.regions.map(regionFromProto), labels: b.labels });
              await emit({ ready: { max_batch_pages: store.maxBatchPages, max_message_bytes: MAX_MESSAGE_BYTES } });
              break;
            }
            case 'hashes': {
              if (!session) throw new ExaError('INVALID_ARGUMENT', 'hashes before begin');
              const h = req.hashes!;
              if (writeError) throw writeError;
              // Up to 2 hash batches at once: the next batch's checks run on
              // this thread while the previous one's index lookup runs on the
              // pool (the engine applies each batch's lookup in order).
              if (offers.some((x) => x.batch === h.batch)) throw new ExaError('INVALID_ARGUMENT', `batch ${h.batch} is already awaiting its data`);
              const s = session;
              const o = s.offerHashes({ batch: h.batch, region: h.region, index: h.index, hashes: h.hashes, zero: h.zero })
                .then((want) => emit({ wanted: { batch: h.batch, want } }));
              o.catch((e: unknown) => { writeError ??= e; s.abort(); fail(e); });
              const entry = { batch: h.batch, p: o };
              offers.push(entry);
              void o.finally(() => { const k = offers.indexOf(entry); if (k >= 0) offers.splice(k, 1); }).catch(() => undefined);
              while (offers.length >= 2) await offers[0]!.p;
              break;
            }
            case 'data': {
              if (!session) throw new ExaError('INVALID_ARGUMENT', 'data before begin');
              const d = req.data!;
              if (writeError) throw writeError;
              // Data only ever answers a batch whose "wanted" was sent, but a
              // client may send it early: its offer must have been applied.
              await offers.find((x) => x.batch === d.batch)?.p;
              // At most 2 batches' pages being stored; the wait is here, before
              // the next write, not after this one: the loop goes on reading,
              // so a hash batch queued behind this message is answered at once
              // and the client's next data is on its way meanwhile.
              while (writes.length >= 2) await writes.shift();
              const s = session;
              // Once supplyData has settled nobody holds the pages: the message's buffer goes back to the receive pool.
              const w = s.supplyData(d.batch, d.data).finally(() => releaseReceived(d.data)).then((n) => emit({ stored: { batch: d.batch, pages: n } }));
              w.catch((e: unknown) => { writeError ??= e; s.abort(); fail(e); });
              writes.push(w);
              break;
            }
            case 'commit': {
              if (!session) throw new ExaError('INVALID_ARGUMENT', 'commit before begin');
              await Promise.all(offers.map((x) => x.p));
              await Promise.all(writes);
              const header = await session.commit();
              committed = true;
              await emit({ committed: headerToInfo(header) });
              return;
            }
            default:
              throw new ExaError('INVALID_ARGUMENT', 'empty PutRequest (none of begin, hashes, data, commit is set)');
          }
        }
        // A batch still being checked or stored when the stream ended may have
        // failed: that failure, not the missing commit, is what to report.
        await Promise.allSettled([...offers.map((x) => x.p), ...writes]);
        if (writeError) throw writeError;
        throw new ExaError('FAILED_PRECONDITION', session
          ? `the upload stream for job ${session.job} ended before commit; nothing was recorded`
          : 'the upload stream ended before begin');
      } finally {
        if (!committed) session?.abort();
      }
    }),

    GetImage: serverStream(auth, async (req, emit) => {
      const range = { region: req.region, firstPage: req.first_page, pageCount: req.page_count, since: req.since };
      // 4 MiB pieces in recycled buffers with room for the message header in
      // front: src/store/codec-image.ts serializes them without copying the pages.
      const opts = { chunkPages: IMAGE_PIECE_PAGES, reuse: true, headroom: headroomFor(IMAGE_PIECE_PAGES) };
      for await (const item of store.readImage(req.job, req.checkpoint, range, opts)) {
        if ('checkpoint' in item) { await emit({ info: headerToInfo(item) }); continue; }
        const pages: ImagePagesIn = { region: item.region, first_page: item.firstPage, page_count: item.pageCount, zero: item.zero, data: item.data, pages: item.pages ?? [], [HEADROOM]: item.headroom ?? 0 };
        // emit resolves after grpc-js has framed (copied) the message: the buffer is free again.
        await emit({ pages } as ImageChunk);
        item.release?.();
      }
    }),

    ListJobs: unary(auth, async () => ({
      jobs: (await store.listJobs()).map((j) => ({
        job: j.job, checkpoints: j.checkpoints, latest: j.latest, latest_at: new Date(j.latestAt).toISOString(), logical_bytes: j.logicalBytes,
      })),
    })),

    ListCheckpoints: unary(auth, async (req) => ({ checkpoints: (await store.listCheckpoints(req.job)).map(headerToInfo) })),

    DeleteCheckpoints: unary(auth, async (req) => store.deleteCheckpoints(req.job, {
      checkpoints: req.checkpoints, keepLast: req.keep_last, keepEvery: req.keep_every, dryRun: req.dry_run,
    })),

    Compact: serverStream(auth, async (req, emit) => {
      const pending: Promise<void>[] = [];
      const r = await store.compact(req.job, throttled((p) => { pending.push(emit({ progress: p }).catch(() => undefined)); }));
      await Promise.all(pending);
      await emit({ result: { job: r.job, checkpoints: r.checkpoints, pages_moved: r.pagesMoved, refs_updated: r.refsUpdated } });
    }),

    Gc: serverStream(auth, async (req, emit) => {
      const pending: Promise<void>[] = [];
      const r = await store.gc({ graceMs: req.grace_seconds >= 0 ? req.grace_seconds * 1000 : -1, dryRun: req.dry_run },
        throttled((p) => { pending.push(emit({ progress: p }).catch(() => undefined)); }));
      await Promise.all(pending);
      await emit({ result: {
        live_pages: r.livePages, marked_pages: r.markedPages, revived_pages: r.revivedPages, deleted_pages: r.deletedPages,
        reclaimed_bytes: r.reclaimedBytes, pending_pages: r.pendingPages,
      } });
    }),

    Verify: serverStream(auth, async (req, emit) => {
      const pending: Promise<void>[] = [];
      const r = await store.verify({ job: req.job || undefined, checkpoint: req.checkpoint, allPages: req.all_pages },
        throttled((p) => { pending.push(emit({ progress: p }).catch(() => undefined)); }));
      await Promise.all(pending);
      await emit({ result: { checkpoints: r.checkpoints, pages_checked: r.pagesChecked, problems: r.problems, ok: r.ok } });
    }),

    Stat: unary(auth, async (req) => {
      const s = await store.stat(req.job || undefined);
      return {
        jobs: s.jobs.map((j) => ({ job: j.job, checkpoints: j.checkpoints, logical_bytes: j.logicalBytes, sent_bytes: j.sentBytes, stored_bytes: j.storedBytes, dedup_ratio: j.dedupRatio })),
        logical_bytes: s.logicalBytes, stored_bytes: s.storedBytes, stored_pages: s.storedPages, metadata_bytes: s.metadataBytes,
        dedup_ratio: s.dedupRatio, pending_gc_pages: s.pendingGcPages,
      };
    }),
  };
}

export interface StoreServerOptions {
  dataDir: string;
  host?: string;
  port?: number;
  token?: string | undefined;
  /** Serve TLS with these PEM files (plaintext when absent). */
  tls?: ServerTls | undefined;
  gcGraceMs?: number;
  /** Tenants' tokens accepted besides `token`, each scoped to its jobs (src/tenants.ts). */
  tenants?: TenantTable | undefined;
}

export interface RunningStoreServer {
  server: grpcTypes.Server;
  store: CheckpointStore;
  host: string;
  port: number;
  /** host:port as clients should dial it. */
  address: string;
  close(): Promise<void>;
}

/** Where and how to serve, whatever the backend. */
export type ServeOptions = Omit<StoreServerOptions, 'dataDir'>;

/**
 * Serve the Store service over an opened backend (LevelDB here, S3 in
 * src/s3/server.ts). Other services (the coordinator) can be added to
 * `server` by the caller. The backend is closed with the server, or at once
 * when the address cannot be bound.
 */
export async function serveStore(backend: Backend, opts: ServeOptions): Promise<RunningStoreServer> {
  tuneMallocForStreaming();
  const store = new CheckpointStore(backend, opts.gcGraceMs !== undefined ? { gcGraceMs: opts.gcGraceMs } : {});
  const server = createServer(opts.tenants ? [tenantScopeInterceptor(opts.tenants)] : []);
  server.addService(storeProto().exa.v1.Store.service, storeHandlers(store, { token: opts.token, tenants: opts.tenants }) as unknown as grpcTypes.UntypedServiceImplementation);
  const host = opts.host ?? '127.0.0.1';
  let port: number;
  try {
    port = await bindServer(server, host, opts.port ?? 7700, serverCredentials(opts.tls));
  } catch (e) {
    await store.close();
    throw e;
  }
  const address = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  return {
    server, store, host, port, address,
    async close() {
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => { server.forceShutdown(); resolve(); }, 2000);
        server.tryShutdown(() => { clearTimeout(t); resolve(); });
      });
      await store.close();
    },
  };
}

/** Open the LevelDB data directory and serve the Store service. */
export async function startStoreServer(opts: StoreServerOptions): Promise<RunningStoreServer> {
  return serveStore(await LevelBackend.open(opts.dataDir), opts);
}

export { PAGE_SIZE, grpc };
