/**
 * CheckpointerPort over the native LocalAgent (src/agent/local-agent.ts):
 * turns native checkpoints into the store client's batch format and native
 * events into the daemon's attach/detach/request events.
 */
import { LocalAgent, type Checkpoint, type PageBatch as NativeBatch } from '../agent/local-agent.js';
import type { PageBatch } from '../store/client.js';
import { PAGE_SIZE } from '../../storage/pages.js';
import * as native from '../native.js';
import type { NativeTenantUids } from '../native.js';
import type { AttachedJob, CheckpointerPort, CheckpointOptions, CheckpointRun, DmaControlPort, NativeCkptStats } from './port.js';

export interface NativePortOptions {
  socketPath: string;
  allowUids?: number[];
  /** Tenants' uids (src/tenants.ts agentTenants): they may attach only as their tenant's jobs. */
  tenants?: NativeTenantUids[];
  /** chmod of the socket file (default 0o600; 0o666 when other uids may attach: SO_PEERCRED decides). */
  socketMode?: number;
  shadowBudgetBytes?: number;
  /** The DMA backend's TCP data address (host:port, port 0 = ephemeral); false = no DMA backend. */
  dmaListen?: string | false;
  /** Shared secret agents present to each other on the DMA data path. */
  dmaToken?: string;
  /** Lines the native checkpointer and DMA backend report (refused peers, protocol errors); default: stderr. */
  onLog?: (line: string) => void;
}

export class NativeCheckpointer implements CheckpointerPort {
  private readonly agent: LocalAgent;
  private appOptions: ((job: string) => CheckpointOptions) | null = null;
  private appConsumer: ((job: string, run: CheckpointRun) => Promise<void>) | null = null;
  /** `full` as decided for each job's pending app-initiated checkpoint. */
  private readonly appFull = new Map<string, boolean>();
  private routeMiss: (job: string) => void = () => undefined;
  readonly dma: DmaControlPort | null;

  constructor(opts: NativePortOptions) {
    this.agent = LocalAgent.listen({
      ...(opts.dmaListen === false ? { dmaSocketPath: false as const } : {
        dma: {
          listen: opts.dmaListen ?? '127.0.0.1:0',
          ...(opts.dmaToken ? { token: opts.dmaToken } : {}),
          onRouteMiss: (job: string) => this.routeMiss(job),
        },
      }),
      socketPath: opts.socketPath,
      ...(opts.allowUids ? { allowUids: opts.allowUids } : {}),
      ...(opts.tenants ? { tenants: opts.tenants } : {}),
      ...(opts.socketMode !== undefined ? { socketMode: opts.socketMode } : {}),
      ...(opts.shadowBudgetBytes ? { shadowBudgetBytes: opts.shadowBudgetBytes } : {}),
      appCheckpointOptions: (job) => {
        const full = this.appOptions?.(job).full ?? true;
        this.appFull.set(job, full);
        return { full };
      },
      onAppCheckpoint: async (c) => {
        if (!this.appConsumer) {
          c.cancel();
          throw new Error('the agent is not ready for app-initiated checkpoints');
        }
        await this.appConsumer(c.job, this.toRun(c, this.addresses(c.job), this.appFull.get(c.job) ?? true));
      },
    });
    if (opts.onLog) this.agent.on('log', opts.onLog);
    this.dma = this.agent.dmaBackend ? this.dmaPort(this.agent.dmaBackend, this.agent.dmaAddress ?? '') : null;
  }

  private dmaPort(h: native.DmaBackendHandle, address: string): DmaControlPort {
    return {
      address,
      setRoute: (job, addr) => native.dmaSetRoute(h, job, addr),
      onRouteMiss: (fn) => { this.routeMiss = fn; },
      fence: async (job) => (await native.dmaFence(h, job)).grants,
      unfence: (job) => native.dmaUnfence(h, job),
      moved: (job, addr) => native.dmaMoved(h, job, addr),
      expect: (job, grants, timeoutMs) => native.dmaExpect(h, job, grants, timeoutMs),
      buffers: () => native.dmaBuffers(h),
    };
  }

  serveAppCheckpoints(options: (job: string) => CheckpointOptions, consume: (job: string, run: CheckpointRun) => Promise<void>): void {
    this.appOptions = options;
    this.appConsumer = consume;
  }

  private addresses(job: string): Map<string, string> {
    return new Map((this.agent.job(job)?.regions ?? []).map((r) => [r.name, r.address]));
  }

  attached(): AttachedJob[] {
    return this.agent.jobs().map((j) => ({
      job: j.id, pid: j.pid,
      regions: j.regions.map((r) => ({ name: r.name, pageCount: Math.ceil(r.size / PAGE_SIZE), address: r.address, flags: 0 })),
    }));
  }

  async checkpoint(job: string, opts: CheckpointOptions): Promise<CheckpointRun> {
    const addresses = this.addresses(job);
    const c = await this.agent.checkpoint(job, { full: opts.full, leaveStopped: opts.leaveStopped });
    return this.toRun(c, addresses, opts.full);
  }

  /** The port's view of a native checkpoint (batches in the store client's format). */
  private toRun(c: Checkpoint, addresses: Map<string, string>, full: boolean): CheckpointRun {
    const regions = c.regions.map((r) => ({ name: r.name, pageCount: Math.ceil(r.size / PAGE_SIZE), address: addresses.get(r.name) ?? '', flags: 0 }));
    async function* batches(): AsyncGenerator<PageBatch> {
      for await (const b of c) yield toStoreBatch(b);
    }
    const done: Promise<NativeCkptStats> = c.result.then((s) => ({
      pauseMs: s.pauseUs / 1000, pagesSaved: s.pagesSaved, zeroPages: s.zeroPages,
      shadowCopies: s.shadowCopies, shadowPeakBytes: s.shadowPeakBytes, faults: [...s.faults],
    }));
    done.catch(() => undefined);
    return { full, regions, batches: batches(), done, cancel: () => c.cancel() };
  }

  on(event: 'attach' | 'detach', fn: (job: string, pid: number) => void): void {
    if (event === 'attach') this.agent.on('attached', (j: { id: string; pid: number }) => fn(j.id, j.pid));
    else this.agent.on('detached', (id: string) => fn(id, 0));
  }

  close(): Promise<void> {
    return this.agent.close();
  }
}

/**
 * Native batches pack the bytes of non-zero pages only; the store client
 * expects page i at i*4096. Without zero pages the layouts are the same and
 * nothing is copied.
 */
export function toStoreBatch(b: NativeBatch): PageBatch {
  const n = b.count;
  const packed = Buffer.from(b.data.buffer, b.data.byteOffset, b.data.byteLength);
  let zeros = 0;
  for (let i = 0; i < n; i++) zeros += b.zero[i]!;
  let data = packed;
  if (zeros > 0) {
    data = Buffer.allocUnsafe(n * PAGE_SIZE);
    let k = 0;
    for (let i = 0; i < n; i++) {
      if (b.zero[i]) continue;
      packed.copy(data, i * PAGE_SIZE, k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
      k++;
    }
  }
  return {
    region: b.regions, index: b.pages, data,
    hashes: Buffer.from(b.hashes.buffer, b.hashes.byteOffset, b.hashes.byteLength),
    zero: b.zero,
  };
}
