/**
 * LocalAgent: the workload-facing half of the per-host agent, without gRPC.
 *
 * It listens on a Unix socket for workloads (libexa or the Node binding),
 * keeps track of attached jobs, and takes live incremental checkpoints of
 * them. A checkpoint streams batches of (region, page, SHA-256, bytes) through
 * an async iterator with real backpressure: the native saver waits while the
 * consumer has not taken the previous batch, so native memory in flight is
 * bounded by (queueDepth + 1) x batchBytes (3 MiB with the defaults) plus the
 * shadow budget (256 MiB by default, reserved lazily), whatever the consumer
 * does. Batches already handed to JavaScript are the consumer's.
 *
 * The gRPC agent service (a later issue) wraps this class: it calls
 * checkpoint(job), forwards every batch to the store (awaiting the store's
 * acknowledgement before pulling the next) and commits when `result` resolves.
 *
 * Events: 'attached' (JobInfo), 'detached' (job id), 'log' (line),
 * 'checkpoint-request' (job id, informational). App-initiated checkpoints
 * (exa_checkpoint() in the workload) are taken by the agent itself and handed
 * to options.onAppCheckpoint; without that option, or if the checkpoint
 * fails, the workload's call fails with the reason: it never hangs.
 */
import { EventEmitter } from 'node:events';
import { ExaError } from '../errors.js';
import * as native from '../native.js';
import type { NativeTenantUids } from '../native.js';
import type {
  AgentHandle, CheckpointSessionHandle, CheckpointStats, NativeCkptOptions, NativeJobInfo, PageBatch,
} from '../native.js';

export type { CheckpointStats, PageBatch, NativeCkptOptions as CheckpointOptions, NativeJobInfo as JobInfo } from '../native.js';

export interface LocalAgentOptions {
  socketPath: string;
  /** uids allowed to attach besides this process's euid and root. */
  allowUids?: number[];
  /** Tenants' uids: allowed to attach too, each only as its tenant's jobs (src/tenants.ts agentTenants). */
  tenants?: NativeTenantUids[];
  /** Shadow memory per checkpoint in bytes (default 256 MiB). */
  shadowBudgetBytes?: number;
  /** chmod of the socket file (default 0o600). */
  socketMode?: number;
  /**
   * Consumer of app-initiated checkpoints (a workload called exa_checkpoint()).
   * The agent waits until no checkpoint of that job runs, takes one (the
   * workload's call returns at the end of its pause) and hands it here; the
   * consumer must drain it. Without it such requests are declined at once.
   */
  onAppCheckpoint?: (ckpt: Checkpoint) => Promise<void> | void;
  /**
   * RDMA API remoting: the DMA backend's socket (default socketPath + ".dma"), or false for none.
   * The backend serves every attached job's DMA session (src/dma, exa.h) on its own threads.
   */
  dmaSocketPath?: string | false;
  /**
   * The DMA backend's TCP data path to other agents: listen address (default "127.0.0.1:0"),
   * cluster token, hold timeout, and the route-miss callback (see NativeDmaBackendOptions).
   */
  dma?: native.NativeDmaBackendOptions;
  /** Options for app-initiated checkpoints, fixed or chosen per job at each request. */
  appCheckpointOptions?: NativeCkptOptions | ((job: string) => NativeCkptOptions);
}

/** One page of a batch, decoded (see PageBatch for the packed form). */
export interface SavedPage {
  region: string;
  page: number;
  zero: boolean;
  hash: Uint8Array;
  /** 4096 bytes, or null for a zero page. */
  bytes: Uint8Array | null;
}

/**
 * One running checkpoint. Consume it with `for await (const b of ckpt)` (or
 * next()); `result` resolves with the stats once every batch was taken, and
 * rejects if the checkpoint was cancelled or failed. Use one consumer only.
 */
export class Checkpoint implements AsyncIterable<PageBatch> {
  /** Region table at the pause; PageBatch.regions index into it. */
  readonly regions: readonly { name: string; size: number }[];
  readonly result: Promise<CheckpointStats>;

  constructor(readonly job: string, private readonly session: CheckpointSessionHandle) {
    this.regions = native.checkpointRegions(session);
    this.result = native.checkpointResult(session);
    // a consumer that only iterates must not see an unhandled rejection here
    this.result.catch(() => undefined);
  }

  /** The next batch, or null when the checkpoint is complete. */
  next(): Promise<PageBatch | null> {
    return native.checkpointNext(this.session);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<PageBatch> {
    for (;;) {
      const b = await this.next();
      if (b === null) return;
      yield b;
    }
  }

  /** Stats so far (final once `result` resolved). */
  stats(): CheckpointStats {
    return native.checkpointStats(this.session);
  }

  /** Abandon the checkpoint: pages not saved go to the next checkpoint's set; pending next() rejects with CANCELLED. */
  cancel(): void {
    native.checkpointCancel(this.session);
  }

  /** Decode a batch into pages (copies nothing but the subarray views). */
  pagesOf(b: PageBatch): SavedPage[] {
    const out: SavedPage[] = [];
    let off = 0;
    for (let i = 0; i < b.count; i++) {
      const zero = b.zero[i] === 1;
      const name = this.regions[b.regions[i]!]?.name ?? `#${b.regions[i]}`;
      out.push({
        region: name, page: b.pages[i]!, zero, hash: b.hashes.subarray(32 * i, 32 * i + 32),
        bytes: zero ? null : b.data.subarray(off, off + 4096),
      });
      if (!zero) off += 4096;
    }
    return out;
  }

  /** Test hook: true while the saver is held (NativeCkptOptions.testHold). */
  testHeld(): boolean {
    return native.checkpointHeld(this.session);
  }

  /** Test hook (testReference option): the regions' bytes read while the job was stopped, in table order. */
  testReference(): Buffer[] {
    return native.checkpointTestReference(this.session);
  }

  /** Test hook: let a held saver go on. */
  testReleaseHold(): void {
    native.checkpointReleaseHold(this.session);
  }
}

export class LocalAgent extends EventEmitter {
  private handle: AgentHandle | null;
  private readonly running = new Set<Checkpoint>();
  /** Per job: settles when its running checkpoint (if any) has finished. */
  private readonly idle = new Map<string, Promise<unknown>>();
  /** Per job: app-initiated requests are served one after the other. */
  private readonly appChain = new Map<string, Promise<void>>();

  private constructor(readonly socketPath: string, private readonly opts: LocalAgentOptions) {
    super();
    this.handle = native.agentOpen(
      { socketPath: opts.socketPath, allowUids: opts.allowUids ?? [], shadowBudgetBytes: opts.shadowBudgetBytes ?? 256 * 2 ** 20, socketMode: opts.socketMode ?? 0o600, tenants: opts.tenants ?? [] },
      (ev) => this.onEvent(ev),
    );
    if (opts.dmaSocketPath !== false) {
      const dmaPath = opts.dmaSocketPath ?? `${opts.socketPath}.dma`;
      try {
        this.dma = native.dmaBackendOpen(this.handle, dmaPath, opts.socketMode ?? 0o600, { listen: '127.0.0.1:0', ...opts.dma });
      } catch (e) {
        // the checkpointer works without remoting; say once why jobs cannot open DMA sessions
        process.stderr.write(`exaagent: no DMA backend on ${dmaPath}: ${(e as Error).message}\n`);
      }
    }
  }

  /** The DMA backend (RDMA API remoting), or null when not started. */
  private dma: native.DmaBackendHandle | null = null;

  /** "ip:port" the DMA backend listens on for other agents, or null (no backend / no TCP). */
  get dmaAddress(): string | null {
    return this.dma ? native.dmaBackendAddress(this.dma) || null : null;
  }

  /** @internal The DMA backend's handle (benchmarks: dmaEngineDirect; the control plane's migration primitives), or null. */
  get dmaBackend(): native.DmaBackendHandle | null {
    return this.dma;
  }

  /** Start listening. Fails with ALREADY_EXISTS if a live agent owns the socket. */
  static listen(opts: LocalAgentOptions): LocalAgent {
    return new LocalAgent(opts.socketPath, opts);
  }

  private onEvent(ev: native.NativeAgentEvent): void {
    switch (ev.kind) {
      case 'attached':
        // An event queued before close() may arrive after it: job() would throw inside the N-API callback.
        this.emit('attached', (this.handle ? this.job(ev.job) : null) ?? { id: ev.job, pid: ev.pid, uid: ev.uid });
        break;
      case 'detached':
        this.emit('detached', ev.job);
        break;
      case 'checkpoint-request':
        this.emit('checkpoint-request', ev.job);
        this.serveAppRequest(ev.job);
        break;
      case 'log':
        if (this.listenerCount('log') > 0) this.emit('log', ev.text);
        else process.stderr.write(`${ev.text}\n`);
        break;
    }
  }

  private get h(): AgentHandle {
    if (!this.handle) throw new ExaError('UNAVAILABLE', `agent on ${this.socketPath} is closed`);
    return this.handle;
  }

  get closed(): boolean {
    return this.handle === null;
  }

  /** Attached jobs. */
  jobs(): NativeJobInfo[] {
    return native.agentJobs(this.h);
  }

  job(id: string): NativeJobInfo | null {
    return this.jobs().find((j) => j.id === id) ?? null;
  }

  /** Resolves when job `id` is attached (probing, for callers that started the workload themselves). */
  waitForJob(id: string, timeoutMs = 10_000): Promise<NativeJobInfo> {
    const found = this.job(id);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.off('attached', on);
        reject(new ExaError('DEADLINE_EXCEEDED', `job "${id}" did not attach to ${this.socketPath} within ${timeoutMs} ms`));
      }, timeoutMs);
      const on = (j: { id: string }): void => {
        if (j.id !== id) return;
        clearTimeout(timer);
        this.off('attached', on);
        resolve(this.job(id) ?? (j as NativeJobInfo));
      };
      this.on('attached', on);
    });
  }

  /**
   * Checkpoint a job: resolves when the pause is over (the job runs again) with
   * the Checkpoint to consume. NOT_FOUND for an unknown job, CONFLICT when one
   * is already running for it. The first checkpoint of a job (or with full:
   * true) holds every page; later ones the pages written since the previous
   * completed one.
   */
  async checkpoint(job: string, opts: NativeCkptOptions = {}): Promise<Checkpoint> {
    const { session, paused } = native.checkpointBegin(this.h, job, opts);
    try {
      await paused;
    } catch (e) {
      throw native.nativeError(e, `checkpoint of job ${job}`);
    }
    const c = new Checkpoint(job, session);
    this.running.add(c);
    this.idle.set(job, c.result);
    c.result.finally(() => {
      this.running.delete(c);
      if (this.idle.get(job) === c.result) this.idle.delete(job);
    }).catch(() => undefined);
    return c;
  }

  /** Settles when no checkpoint of `job` is running (never rejects). */
  whenIdle(job: string): Promise<void> {
    return (this.idle.get(job) ?? Promise.resolve()).then(() => undefined, () => undefined);
  }

  private serveAppRequest(job: string): void {
    const consume = this.opts.onAppCheckpoint;
    if (!consume) {
      this.declineCheckpointRequest(job, 'this agent takes no app-initiated checkpoints (no consumer)');
      return;
    }
    const prev = this.appChain.get(job) ?? Promise.resolve();
    const next = prev.then(async () => {
      try {
        await this.whenIdle(job);
        const o = this.opts.appCheckpointOptions;
        const c = await this.checkpoint(job, typeof o === 'function' ? o(job) : o ?? {});
        await consume(c);
      } catch (e) {
        // the workload must never stay blocked in exa_checkpoint(): answer with the reason
        this.declineCheckpointRequest(job, `checkpoint of job ${job} failed: ${(e as Error).message}`);
        if (this.listenerCount('log') > 0) this.emit('log', `agent: app-initiated checkpoint of job ${job} failed: ${(e as Error).message}`);
      }
    });
    this.appChain.set(job, next);
    void next.finally(() => { if (this.appChain.get(job) === next) this.appChain.delete(job); });
  }

  /** Answer a job's pending exa_checkpoint() calls with an error. */
  declineCheckpointRequest(job: string, reason: string): void {
    if (this.handle) native.declineCheckpointRequests(this.handle, job, reason);
  }

  /**
   * Write bytes into a job's region through the checkpointer (the entry point RDMA remoting
   * uses for remote writes): the pages join the next checkpoint; a checkpoint being saved keeps
   * its pause-time image (pages not yet saved are copied to shadow first). Resolves once written;
   * it may wait for the saver, which may wait for this checkpoint's consumer.
   */
  remoteWrite(job: string, region: string, offset: number, bytes: Uint8Array): Promise<void> {
    return native.remoteWrite(this.h, job, region, offset, bytes);
  }

  /** Benchmark baseline: stop the job, copy and hash every page, resume. */
  stopAndCopy(job: string): { pauseUs: number; bytes: number } {
    return native.stopAndCopy(this.h, job);
  }

  /**
   * Stop listening, cancel running checkpoints (their iterators reject with
   * CANCELLED) and drop every job: closing the passed uffds wakes any workload
   * thread blocked on a write fault, so jobs keep running untracked.
   */
  async close(): Promise<void> {
    if (!this.handle) return;
    const h = this.handle;
    this.handle = null;
    native.agentClose(h);
    // Then the DMA backend (joining its client threads). Not before: a client thread may be inside a
    // remote write waiting for a checkpoint's saver, which only the agent's close cancels (and which
    // waits for this thread to take batches). Until joined, its writes into dropped jobs fail cleanly.
    if (this.dma) native.dmaBackendClose(this.dma);
    this.dma = null;
    await Promise.allSettled([...this.running].map((c) => c.result));
  }
}
