/**
 * exaagent: the per-host agent. It
 *  - listens on a Unix socket for workloads (the native checkpointer, behind CheckpointerPort),
 *  - serves the Agent gRPC service (run, checkpoint, list, stop, prestage, restore),
 *  - registers with the coordinator and heartbeats the jobs it runs,
 *  - streams every checkpoint to the store; a checkpoint is reported done only
 *    after the store committed it. When the store is unreachable the job keeps
 *    running: the agent records the gap and retries with exponential backoff,
 *    and the first checkpoint after a failed upload is a full one (the native
 *    dirty set of the failed one is gone; dedup makes the full one cheap).
 *  - routes DMA transfers (RDMA remoting) of its jobs to the hosts of their
 *    peers, from the coordinator's placements, and carries a job's DMA
 *    sessions through a migration (fence, grants, expect, moved: see
 *    DmaControlPort in port.ts).
 */
import { basename, join } from 'node:path';
import { mkdirSync } from 'node:fs';
import { ExaError, toExaError } from '../errors.js';
import { bindServer, createServer, grpc, loadProto, serverStream, unary, type ServerAuth } from '../grpc.js';
import { createLogger, type Logger } from '../log.js';
import { recordCheckpoint, registerAgent } from '../metrics.js';
import type { ProtoGrpcType } from '../gen/exa_agent.js';
import type { AgentHandlers } from '../gen/exa/v1/Agent.js';
import type { AgentJob } from '../gen/exa/v1/AgentJob.js';
import type { AgentProgress } from '../gen/exa/v1/AgentProgress.js';
import { StoreClient, type CheckpointSummary, type PageBatch, type RegionSpec } from '../store/client.js';
import { CoordinatorClient } from '../coordinator/client.js';
import { specFromMsg, type JobSpecRecord } from '../coordinator/service.js';
import { checkDmaGrant, checkId } from '../coordinator/registry.js';
import { checkCwd, checkSpec, launch, resolveCommand, tailLog, type RunningProcess } from './runner.js';
import { advanceImage, discardStaged, stageImage, type StagedImage } from './staging.js';
import type { CheckpointerPort, CheckpointRun, DmaGrant, NativeCkptStats } from './port.js';

export type JobState = 'STARTING' | 'RUNNING' | 'STOPPED' | 'FINISHED' | 'FAILED';

interface JobRec {
  spec: JobSpecRecord;
  proc: RunningProcess | null;
  state: JobState;
  exitCode: number;
  /** Head of the job's chain in the store (0 = none yet). */
  lastCommitted: number;
  checkpoints: number;
  /** The next checkpoint must save every page (fresh attach, failed upload, changed regions). */
  needFull: boolean;
  gap: string;
  gapSince: number;
  backoffMs: number;
  /** Serializes checkpoints of this job. */
  chain: Promise<unknown>;
  timer: NodeJS.Timeout | null;
  /** Set while a migration takes the job away: its exit is not a failure. */
  leaving: boolean;
  attached: boolean;
  attachWaiters: Array<() => void>;
}

export interface AgentOptions {
  hostId: string;
  storeAddress: string;
  /** host:port for the Agent gRPC service (port 0 = ephemeral). */
  listen: string;
  /** Address other parties use to reach this agent (default: the bound listen address). */
  advertise?: string;
  /** Address other agents use for this agent's DMA data path (default: the backend's bound address). */
  dmaAdvertise?: string;
  stateDir: string;
  stagingRoot: string;
  token?: string;
  heartbeatMs?: number;
  /** Where events go (default: a text logger on stderr, src/log.ts). */
  logger?: Logger;
}

export interface CheckpointResult {
  summary: CheckpointSummary;
  stats: NativeCkptStats;
  totalMs: number;
  /** Final checkpoint of a migration: the job's DMA grants at the fence. */
  dmaGrants?: DmaGrant[];
}

/** How long transfers aimed at a restored job wait for it to register its buffers. */
const DMA_EXPECT_MS = 60_000;

const MAX_BACKOFF_MS = 30_000;

export class HostAgent {
  private readonly jobs = new Map<string, JobRec>();
  private readonly staged = new Map<string, StagedImage>();
  private server: grpc.Server | null = null;
  private store: StoreClient | null = null;
  private coord: CoordinatorClient | null = null;
  private hbTimer: NodeJS.Timeout | null = null;
  private coordDownSince = 0;
  private closed = false;
  private unregisterMetrics: (() => void) | null = null;
  address = '';
  private readonly logger: Logger;

  constructor(private readonly opts: AgentOptions, private readonly ckpt: CheckpointerPort) {
    checkId('host', opts.hostId);
    this.logger = (opts.logger ?? createLogger('exaagent')).child({ host: opts.hostId });
    mkdirSync(opts.stateDir, { recursive: true });
    ckpt.on('attach', (job) => this.onAttach(job));
    ckpt.on('detach', (job) => this.onDetach(job));
    // App-initiated checkpoints (exa_checkpoint()) are taken by the checkpointer
    // at the job's safe point and uploaded here like any other.
    ckpt.serveAppCheckpoints(
      (job) => ({ full: this.jobs.get(job) ? this.needsFull(this.jobs.get(job)!) : true, leaveStopped: false }),
      async (job, run) => {
        const rec = this.jobs.get(job);
        if (!rec) {
          run.cancel();
          throw new ExaError('NOT_FOUND', `job ${job} was not launched by this agent`);
        }
        const p = rec.chain.then(() => this.upload(rec, run, performance.now(), {}));
        rec.chain = p.catch(() => undefined);
        await p;
      },
    );
    ckpt.dma?.onRouteMiss((job) => void this.resolveRoute(job));
  }

  /**
   * The DMA backend needs to know where a peer job's buffers are: the DMA
   * address of the host the coordinator places it on. Unknown job, host down
   * or coordinator unreachable: no route (the transfer fails with a reason).
   */
  private async resolveRoute(job: string): Promise<void> {
    const dma = this.ckpt.dma;
    if (!dma) return;
    try {
      const p = await this.coord!.getPlacement(job);
      const usable = p.dma_address && p.host_state === 'UP' && p.host_id !== this.opts.hostId
        && (p.state === 'RUNNING' || p.state === 'MIGRATING');
      dma.setRoute(job, usable ? p.dma_address : null);
    } catch (e) {
      const err = toExaError(e);
      if (err.code !== 'NOT_FOUND') this.logger.warn({ job }, `no DMA route for job ${job}: ${err.message}`);
      dma.setRoute(job, null);
    }
  }

  /** Bind the gRPC service, connect to store and coordinator (lazily: they may be down), start heartbeats. */
  async start(): Promise<void> {
    const auth: ServerAuth = { token: this.opts.token };
    this.coord = CoordinatorClient.lazy(this.opts.storeAddress, { token: this.opts.token });
    const server = createServer();
    const proto = loadProto<ProtoGrpcType>('exa_agent.proto');
    server.addService(proto.exa.v1.Agent.service, this.handlers(auth) as unknown as grpc.UntypedServiceImplementation);
    const [host, portText] = splitHostPort(this.opts.listen);
    const port = await bindServer(server, host, Number(portText));
    this.server = server;
    this.address = this.opts.advertise ?? `${host}:${port}`;
    this.unregisterMetrics = registerAgent({ jobStates: () => [...this.jobs.values()].map((j) => ({ state: j.state, gap: j.gap !== '' })) });
    await this.beat();
    this.hbTimer = setInterval(() => void this.beat(), this.opts.heartbeatMs ?? 1000);
    this.hbTimer.unref();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.unregisterMetrics?.();
    if (this.hbTimer) clearInterval(this.hbTimer);
    for (const j of this.jobs.values()) if (j.timer) clearTimeout(j.timer);
    await new Promise<void>((res) => (this.server ? this.server.tryShutdown(() => res()) : res()));
    this.server?.forceShutdown();
    for (const s of this.staged.values()) discardStaged(s);
    await this.ckpt.close();
    this.store?.close();
    this.coord?.close();
  }

  /**
   * The store client, connected on first use and kept: a grpc channel
   * reconnects by itself after a store restart. UNAVAILABLE (naming the
   * address) while the store cannot be reached.
   */
  private async storeClient(timeoutMs = 3000): Promise<StoreClient> {
    if (!this.store) this.store = await StoreClient.connect(this.opts.storeAddress, { token: this.opts.token, timeoutMs });
    return this.store;
  }

  // ---- coordinator ----

  /** The jobs this agent runs, with their DMA sessions (buffers, grants), as the coordinator records them. */
  private running() {
    const bufs = new Map<string, Array<{ name: string; size: string; grants: Array<{ peer: string; perms: number }> }>>();
    for (const b of this.ckpt.dma?.buffers() ?? []) {
      const l = bufs.get(b.job) ?? [];
      l.push({ name: b.name, size: String(b.size), grants: b.grants });
      bufs.set(b.job, l);
    }
    return [...this.jobs.values()]
      .filter((j) => j.state === 'RUNNING' || j.state === 'STARTING')
      .map((j) => ({ job: j.spec.job, pid: j.proc?.pid ?? 0, last_checkpoint: j.lastCommitted, dma_buffers: bufs.get(j.spec.job) ?? [] }));
  }

  private async beat(): Promise<void> {
    if (!this.coord) return;
    try {
      const known = await this.coord.heartbeat(this.opts.hostId, this.running());
      if (!known) await this.coord.register(this.opts.hostId, this.address, this.running(), this.dmaAddress());
      if (this.coordDownSince) this.logger.info({ coordinator: this.opts.storeAddress }, `coordinator at ${this.opts.storeAddress} reachable again`);
      this.coordDownSince = 0;
    } catch (e) {
      if (!this.coordDownSince) {
        this.coordDownSince = Date.now();
        this.logger.warn({ coordinator: this.opts.storeAddress }, `coordinator unreachable: ${toExaError(e).message}`);
      }
    }
  }

  /** The DMA data address peers are told: --dma-advertise, else the bound one (a wildcard bind takes the advertised host). */
  dmaAddress(): string {
    const bound = this.ckpt.dma?.address ?? '';
    if (!bound) return '';
    if (this.opts.dmaAdvertise) return this.opts.dmaAdvertise;
    const [host, port] = splitHostPort(bound);
    if ((host === '0.0.0.0' || host === '::') && this.opts.advertise) return `${splitHostPort(this.opts.advertise)[0]}:${port}`;
    return bound;
  }

  // ---- workload events ----

  private onAttach(job: string): void {
    const j = this.jobs.get(job);
    if (!j) return; // a workload the agent did not launch: checkpointable on request only
    j.attached = true;
    j.needFull = true; // native tracking starts from nothing on attach
    if (j.state === 'STARTING') j.state = 'RUNNING';
    for (const w of j.attachWaiters.splice(0)) w();
  }

  private onDetach(job: string): void {
    const j = this.jobs.get(job);
    if (j) j.attached = false;
  }

  // ---- jobs ----

  private rec(job: string): JobRec {
    checkId('job', job);
    const j = this.jobs.get(job);
    if (!j) throw new ExaError('NOT_FOUND', `job ${job} does not run on host ${this.opts.hostId}`);
    return j;
  }

  private newRec(spec: JobSpecRecord, lastCommitted: number): JobRec {
    return {
      spec, proc: null, state: 'STARTING', exitCode: 0, lastCommitted, checkpoints: 0, needFull: true,
      gap: '', gapSince: 0, backoffMs: 1000, chain: Promise.resolve(), timer: null, leaving: false, attached: false, attachWaiters: [],
    };
  }

  describe(j: JobRec): AgentJob {
    return {
      job: j.spec.job, host_id: this.opts.hostId, pid: j.proc?.pid ?? 0, state: j.state,
      last_checkpoint: j.lastCommitted, checkpoints: String(j.checkpoints), gap: j.gap, exit_code: j.exitCode,
      argv: j.spec.argv, log_path: j.proc?.logPath ?? '', output_tail: j.proc ? tailLog(j.proc.logPath, 2048) : '',
    };
  }

  /** Launch a job (new, or restored when `restore` is given). Nothing is left behind on failure. */
  async runJob(spec: JobSpecRecord, restore?: { staged: StagedImage; epoch?: string }): Promise<JobRec> {
    checkSpec({ ...spec });
    checkCwd(spec);
    resolveCommand(spec);
    const existing = this.jobs.get(spec.job);
    if (existing && (existing.state === 'RUNNING' || existing.state === 'STARTING')) {
      throw new ExaError('ALREADY_EXISTS', `job ${spec.job} is already running on host ${this.opts.hostId}`);
    }
    if (!restore) {
      await this.coord!.claim(spec.job, this.opts.hostId);
      await this.coord!.putSpec(spec);
    }
    const rec = this.newRec(spec, restore ? restore.staged.checkpoint : 0);
    this.jobs.set(spec.job, rec);
    try {
      rec.proc = await launch(spec, {
        agentSocket: this.socketPath(), logDir: join(this.opts.stateDir, 'logs'),
        ...(restore ? { restoreToken: restore.staged.dir } : {}),
      });
    } catch (e) {
      this.jobs.delete(spec.job);
      if (!restore) await this.coord!.release(spec.job, this.opts.hostId, 'FAILED').catch(() => undefined);
      throw e;
    }
    const proc = rec.proc;
    void proc.exited.then((code) => this.onExit(rec, proc, code));
    this.schedule(rec, spec.everyMs);
    return rec;
  }

  private onExit(rec: JobRec, proc: RunningProcess, code: number): void {
    if (rec.proc !== proc) return;
    if (rec.timer) clearTimeout(rec.timer);
    rec.timer = null;
    rec.exitCode = code;
    rec.attached = false;
    for (const w of rec.attachWaiters.splice(0)) w();
    if (rec.leaving) {
      rec.state = 'STOPPED';
      return;
    }
    rec.state = rec.state === 'STOPPED' ? 'STOPPED' : code === 0 ? 'FINISHED' : 'FAILED';
    this.logger.info({ job: rec.spec.job, state: rec.state, exitCode: code }, `job ${rec.spec.job} ended: ${rec.state} (exit ${code})`);
    this.coord?.release(rec.spec.job, this.opts.hostId, rec.state === 'STOPPED' ? 'STOPPED' : rec.state === 'FINISHED' ? 'FINISHED' : 'FAILED').catch(() => undefined);
  }

  private schedule(rec: JobRec, delayMs: number): void {
    if (rec.timer) clearTimeout(rec.timer);
    rec.timer = null;
    if (!delayMs || this.closed) return;
    rec.timer = setTimeout(() => {
      rec.timer = null;
      if (rec.state !== 'RUNNING' && rec.state !== 'STARTING') return;
      if (!rec.attached) { this.schedule(rec, rec.spec.everyMs); return; }
      this.checkpoint(rec.spec.job, {}).then(
        () => this.schedule(rec, rec.spec.everyMs),
        (e: unknown) => {
          const x = toExaError(e);
          if (x.code === 'UNAVAILABLE') {
            this.schedule(rec, Math.min(rec.backoffMs, rec.spec.everyMs || rec.backoffMs));
            rec.backoffMs = Math.min(rec.backoffMs * 2, MAX_BACKOFF_MS);
          } else {
            this.logger.warn({ job: rec.spec.job, code: x.code }, `periodic checkpoint of ${rec.spec.job} failed: ${x.message}`);
            this.schedule(rec, rec.spec.everyMs);
          }
        },
      );
    }, delayMs);
    rec.timer.unref();
  }

  private socketPath(): string {
    return join(this.opts.stateDir, 'agent.sock');
  }

  /** Wait until the job's workload is attached (or the job ended). */
  private waitAttached(rec: JobRec, timeoutMs: number): Promise<void> {
    if (rec.attached) return Promise.resolve();
    return new Promise((res, rej) => {
      const t = setTimeout(() => rej(new ExaError('DEADLINE_EXCEEDED', `job ${rec.spec.job} did not attach to the agent within ${timeoutMs} ms`)), timeoutMs);
      rec.attachWaiters.push(() => { clearTimeout(t); if (rec.attached) res(); else rej(new ExaError('FAILED_PRECONDITION', `job ${rec.spec.job} ended before it attached`)); });
    });
  }

  /**
   * Take a checkpoint and stream it to the store. Resolves only once the store
   * committed it. Checkpoints of one job run one at a time.
   */
  checkpoint(job: string, o: { leaveStopped?: boolean; full?: boolean; onProgress?: (done: number) => void }): Promise<CheckpointResult> {
    const rec = this.rec(job);
    const run = rec.chain.then(() => this.checkpointNow(rec, o));
    rec.chain = run.catch(() => undefined);
    return run;
  }

  private async checkpointNow(rec: JobRec, o: { leaveStopped?: boolean; full?: boolean; onProgress?: (done: number) => void }): Promise<CheckpointResult> {
    const job = rec.spec.job;
    if (!rec.attached) {
      if (rec.state === 'STARTING') await this.waitAttached(rec, 10_000);
      else throw new ExaError('FAILED_PRECONDITION', `job ${job} is ${rec.state.toLowerCase()} and not attached: nothing to checkpoint`);
    }
    const full = o.full === true || this.needsFull(rec);
    // Probe the store first, so an outage does not consume the job's dirty set.
    let store: StoreClient;
    try {
      store = await this.storeClient();
      await store.listCheckpoints(job).catch((e: unknown) => { if (toExaError(e).code !== 'NOT_FOUND') throw e; });
    } catch (e) {
      this.noteGap(rec, e);
      recordCheckpoint({ full, ok: false });
      throw toExaError(e, `checkpoint of job ${job}`);
    }
    const t0 = performance.now();
    const run = await this.ckpt.checkpoint(job, { full, leaveStopped: o.leaveStopped ?? false });
    return this.upload(rec, run, t0, o);
  }

  /** The next checkpoint must hold every page (nothing committed yet, or the last upload failed). */
  private needsFull(rec: JobRec): boolean {
    return rec.needFull || rec.lastCommitted === 0;
  }

  /** Stream a checkpoint run to the store; resolves once the store committed it. */
  private async upload(rec: JobRec, run: CheckpointRun, t0: number, o: { onProgress?: (done: number) => void }): Promise<CheckpointResult> {
    const job = rec.spec.job;
    const full = run.full;
    if (!full && this.needsFull(rec)) {
      // A failed upload since this run's dirty set was chosen: the set is incomplete for the chain.
      run.cancel();
      recordCheckpoint({ full, ok: false });
      throw new ExaError('FAILED_PRECONDITION', `checkpoint of job ${job}: the previous upload failed, so this incremental checkpoint cannot be committed; the next one will be full`);
    }
    let store: StoreClient;
    try {
      store = await this.storeClient();
    } catch (e) {
      run.cancel();
      this.noteGap(rec, e);
      recordCheckpoint({ full, ok: false });
      throw toExaError(e, `checkpoint of job ${job}`);
    }
    let pages = 0;
    const counted = countPages(run.batches, (n) => { pages += n; o.onProgress?.(pages); });
    let summary: CheckpointSummary;
    try {
      summary = await store.putCheckpoint({
        job, parent: full ? 0 : rec.lastCommitted, regions: run.regions,
        labels: { host: this.opts.hostId, spec: JSON.stringify(rec.spec) },
      }, counted);
    } catch (e) {
      run.cancel();
      await run.done.catch(() => undefined);
      rec.needFull = true;
      this.noteGap(rec, e);
      recordCheckpoint({ full, ok: false });
      throw toExaError(e, `checkpoint of job ${job}`);
    }
    const stats = await run.done;
    recordCheckpoint({ full, ok: true, pauseMs: stats.pauseMs, totalMs: performance.now() - t0, pagesSaved: stats.pagesSaved, zeroPages: stats.zeroPages });
    rec.lastCommitted = summary.checkpoint;
    rec.needFull = false;
    rec.checkpoints += 1;
    if (rec.gap) this.logger.info({ job, gapSeconds: Math.round((Date.now() - rec.gapSince) / 1000) }, `store reachable again; job ${job} checkpointed after a gap of ${Math.round((Date.now() - rec.gapSince) / 1000)} s`);
    rec.gap = '';
    rec.gapSince = 0;
    rec.backoffMs = 1000;
    if (rec.spec.keep > 0) {
      await store.deleteCheckpoints(job, { keepLast: rec.spec.keep }).catch((e: unknown) => this.logger.warn({ job }, `retention for ${job}: ${toExaError(e).message}`));
    }
    return { summary, stats, totalMs: performance.now() - t0 };
  }

  private noteGap(rec: JobRec, e: unknown): void {
    if (!rec.gapSince) rec.gapSince = Date.now();
    rec.gap = `no checkpoint committed since ${new Date(rec.gapSince).toISOString()}: ${toExaError(e).message}`;
  }

  /** Stop a job (optionally after a last checkpoint). */
  async stopJob(job: string, checkpointFirst: boolean): Promise<JobRec> {
    const rec = this.rec(job);
    if (rec.state !== 'RUNNING' && rec.state !== 'STARTING') return rec;
    if (checkpointFirst) await this.checkpoint(job, {});
    rec.state = 'STOPPED';
    await this.kill(rec);
    return rec;
  }

  /** End the job's process: SIGCONT (it may be stopped), SIGTERM, then SIGKILL after 3 s. */
  private async kill(rec: JobRec): Promise<void> {
    if (rec.timer) clearTimeout(rec.timer);
    rec.timer = null;
    const p = rec.proc;
    if (!p || p.child.exitCode !== null || p.child.signalCode !== null) return;
    const gone = p.exited.then(() => true);
    try { process.kill(p.pid, 'SIGKILL'); } catch { /* already gone */ }
    await Promise.race([gone, new Promise((r) => setTimeout(r, 3000))]);
  }

  /**
   * Migration source: final checkpoint with the job left stopped; the process
   * is ended after commit. DMA transfers aimed at the job are fenced first:
   * none is applied after the image instant (they are held, and complete on
   * the target once it runs the job); its grants travel with the result.
   */
  async finalCheckpoint(job: string, onProgress?: (done: number) => void, full = false): Promise<CheckpointResult> {
    const rec = this.rec(job);
    rec.leaving = true;
    const dma = this.ckpt.dma;
    let fenced = false;
    try {
      const dmaGrants = dma ? await dma.fence(job) : [];
      fenced = dma !== null;
      const r = await this.checkpoint(job, { leaveStopped: true, full, ...(onProgress ? { onProgress } : {}) });
      await this.kill(rec);
      rec.state = 'STOPPED';
      return { ...r, dmaGrants };
    } catch (e) {
      rec.leaving = false;
      if (fenced) dma!.unfence(job);
      // The job must not stay stopped when the final checkpoint failed.
      if (rec.proc) try { process.kill(rec.proc.pid, 'SIGCONT'); } catch { /* gone */ }
      throw e;
    }
  }

  /** Migration source, after the target runs the job: its DMA transfers go there. */
  jobMoved(job: string, toHost: string, dmaAddress: string): void {
    checkId('job', job);
    checkId('host', toHost);
    const rec = this.jobs.get(job);
    if (rec && (rec.state === 'RUNNING' || rec.state === 'STARTING')) {
      throw new ExaError('FAILED_PRECONDITION', `job ${job} still runs on host ${this.opts.hostId}; it cannot have moved to ${toHost}`);
    }
    if (this.ckpt.dma && dmaAddress) {
      splitHostPort(dmaAddress);
      this.ckpt.dma.moved(job, dmaAddress);
    }
    this.logger.info({ job, toHost }, `job ${job} moved to host ${toHost}`);
  }

  /**
   * Pre-stage checkpoint N (0 = latest) of a job into memfds ahead of a
   * restore. An image staged before is brought forward with a delta read
   * (only the pages that changed), which is what makes iterative pre-copy cheap.
   */
  async prestage(job: string, checkpoint: number, onProgress?: (d: number, t: number) => void): Promise<StagedImage> {
    checkId('job', job);
    const store = await this.storeClient();
    const opts = { root: this.opts.stagingRoot, ...(onProgress ? { onProgress } : {}) };
    const target = checkpoint || ((await store.listCheckpoints(job)).at(-1)?.checkpoint ?? 0);
    if (!target) throw new ExaError('NOT_FOUND', `job ${job} has no committed checkpoint in the store`);
    const old = this.staged.get(job);
    if (old && old.checkpoint === target) return old;
    if (old && old.checkpoint < target) {
      try {
        const advanced = await advanceImage(store, old, target, opts);
        this.staged.set(job, advanced);
        return advanced;
      } catch (e) {
        // The staged base may have been deleted by retention meanwhile: stage afresh.
        if (toExaError(e).code !== 'NOT_FOUND') throw e;
      }
    }
    const staged = await stageImage(store, job, target, opts);
    discardStaged(old);
    this.staged.set(job, staged);
    return staged;
  }

  /**
   * Restore a job from checkpoint N (0 = latest) and relaunch it here with
   * EXA_RESTORE. DMA transfers aimed at the job wait for it to register its
   * buffers here (instead of failing), and `dmaGrants` (from the source's
   * fence) are re-installed as it does.
   */
  async restore(job: string, checkpoint: number, spec: JobSpecRecord, onProgress?: (d: number, t: number) => void, dmaGrants: DmaGrant[] = []): Promise<JobRec> {
    checkId('job', job);
    const existing = this.jobs.get(job);
    if (existing && (existing.state === 'RUNNING' || existing.state === 'STARTING')) {
      throw new ExaError('ALREADY_EXISTS', `job ${job} is already running on host ${this.opts.hostId}`);
    }
    // Refuse before touching anything when the command cannot run here.
    checkSpec(spec);
    checkCwd(spec);
    resolveCommand(spec);
    let staged: StagedImage | undefined;
    try {
      // Brings a pre-staged image forward by the final increment, or stages it whole.
      staged = await this.prestage(job, checkpoint, onProgress);
      this.staged.delete(job);
      if (this.ckpt.dma) {
        this.ckpt.dma.expect(job, dmaGrants, DMA_EXPECT_MS);
        this.ckpt.dma.unfence(job); // a rolled-back migration restarts the job on its source
      }
      const rec = await this.runJob(spec, { staged });
      rec.lastCommitted = staged.checkpoint;
      // libexa takes (and unlinks) each staged file as the job allocates its
      // regions and removes the directory when done; whatever the job never
      // took is removed when it exits.
      const proc = rec.proc;
      void proc?.exited.then(() => discardStaged(staged));
      // The job runs again once it attached with its restored image.
      await this.waitAttached(rec, 30_000);
      return rec;
    } catch (e) {
      if (staged) { discardStaged(staged); this.staged.delete(job); }
      throw e;
    }
  }

  /** Resume a job left stopped by a failed migration. */
  resumeStopped(job: string): void {
    const rec = this.rec(job);
    rec.leaving = false;
    if (rec.proc) try { process.kill(rec.proc.pid, 'SIGCONT'); } catch { /* gone */ }
  }

  list(): AgentJob[] {
    return [...this.jobs.values()].map((j) => this.describe(j));
  }

  // ---- gRPC ----

  private handlers(auth: ServerAuth): AgentHandlers {
    return {
      RunJob: unary(auth, async (req) => {
        if (!req.spec) throw new ExaError('INVALID_ARGUMENT', 'RunJob needs a spec');
        const spec = req.spec;
        let job = spec.job;
        if (!job) job = await this.pickJobId(spec.argv[0] ?? 'job');
        const rec = await this.runJob(specFromMsg({ ...spec, job }));
        return this.describe(rec);
      }),
      Checkpoint: serverStream<Parameters<AgentHandlers['Checkpoint']>[0]['request'], AgentProgress>(auth, async (req, emit) => {
        let last = 0;
        const pending: Promise<void>[] = [];
        const progress = (d: number): void => {
          if (d - last < 4096) return;
          last = d;
          pending.push(emit({ progress: { phase: 'saving', done: String(d), total: '0', unit: 'pages' } }).catch(() => undefined));
        };
        const r = req.stop_after
          ? await this.finalCheckpoint(req.job, progress, req.full)
          : await this.checkpoint(req.job, { onProgress: progress, full: req.full });
        await Promise.all(pending);
        await emit({ checkpoint: statsMsg(r) });
      }),
      ListJobs: unary(auth, async () => ({ jobs: this.list() })),
      StopJob: unary(auth, async (req) => this.describe(await this.stopJob(req.job, req.checkpoint_first))),
      Prestage: serverStream(auth, async (req, emit) => {
        const staged = await this.prestage(req.job, req.checkpoint);
        await emit({ progress: { phase: 'staged', done: String(staged.checkpoint), total: String(staged.checkpoint), unit: 'checkpoint' } });
      }),
      Restore: serverStream(auth, async (req, emit) => {
        if (!req.spec) throw new ExaError('INVALID_ARGUMENT', 'Restore needs the job spec');
        const grants = req.dma_grants.map((g): DmaGrant => {
          checkDmaGrant(req.job, g.buffer, g.peer, g.perms);
          return { buffer: g.buffer, peer: g.peer, perms: g.perms };
        });
        const rec = await this.restore(req.job, req.checkpoint, specFromMsg({ ...req.spec, job: req.job }), undefined, grants);
        await emit({ job: this.describe(rec) });
      }),
      JobMoved: unary(auth, async (req) => {
        this.jobMoved(req.job, req.to_host, req.dma_address);
        return {};
      }),
    };
  }

  private async pickJobId(argv0: string): Promise<string> {
    const base = basename(argv0).replace(/[^A-Za-z0-9._-]/g, '').replace(/^[^A-Za-z0-9]+/, '').slice(0, 50) || 'job';
    const taken = new Set((await this.coord!.listPlacements()).map((p) => p.job));
    for (let n = 1; ; n++) if (!taken.has(`${base}-${n}`) && !this.jobs.has(`${base}-${n}`)) return `${base}-${n}`;
  }
}

function statsMsg(r: CheckpointResult) {
  return {
    checkpoint: r.summary.checkpoint, parent: r.summary.parent, pause_ms: r.stats.pauseMs,
    pages_saved: String(r.stats.pagesSaved), zero_pages: String(r.stats.zeroPages),
    bytes_sent: String(r.summary.newPages * 4096), total_ms: r.totalMs,
    shadow_copies: String(r.stats.shadowCopies), shadow_peak_bytes: String(r.stats.shadowPeakBytes),
    dma_grants: r.dmaGrants ?? [],
  };
}

async function* countPages(src: AsyncIterable<PageBatch>, add: (n: number) => void): AsyncGenerator<PageBatch> {
  for await (const b of src) {
    add(b.index.length);
    yield b;
  }
}

export function splitHostPort(addr: string): [string, string] {
  const m = /^\[?([^\]]*?)\]?:(\d+)$/.exec(addr);
  if (!m) throw new ExaError('INVALID_ARGUMENT', `address ${JSON.stringify(addr)} is not HOST:PORT`);
  return [m[1]!, m[2]!];
}

export type { RegionSpec };
