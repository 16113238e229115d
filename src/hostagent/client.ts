/** Client of one agent's Agent service (exackpt, exarestore, tests). */
import { fromGrpcError } from '../errors.js';
import { callMetadata, callUnary, createClient, loadProto, waitForReady, type ClientOptions } from '../grpc.js';
import type { ProtoGrpcType } from '../gen/exa_agent.js';
import type { AgentClient as GenClient } from '../gen/exa/v1/Agent.js';
import type { AgentJob__Output } from '../gen/exa/v1/AgentJob.js';
import type { AgentProgress__Output } from '../gen/exa/v1/AgentProgress.js';
import type { CheckpointStats__Output } from '../gen/exa/v1/CheckpointStats.js';
import type { DmaGrant } from './port.js';
import { specToMsg, type JobSpecRecord } from '../coordinator/service.js';
import type { ProgressEvent } from '../cli/common.js';

export type AgentJobInfo = AgentJob__Output;
export type AgentCheckpointStats = CheckpointStats__Output;

export class AgentClient {
  private constructor(private readonly c: GenClient, readonly address: string, private readonly opts: ClientOptions) {}

  static async connect(address: string, opts: ClientOptions & { timeoutMs?: number } = {}): Promise<AgentClient> {
    const proto = loadProto<ProtoGrpcType>('exa_agent.proto');
    const c = createClient(proto.exa.v1.Agent, address);
    try {
      await waitForReady(c, address, opts.timeoutMs ?? 5000);
    } catch (e) {
      c.close();
      throw e;
    }
    return new AgentClient(c, address, opts);
  }

  close(): void { this.c.close(); }

  private md() { return callMetadata(this.opts); }

  run(spec: JobSpecRecord): Promise<AgentJobInfo> {
    return callUnary(`run job on agent ${this.address}`, (cb) => this.c.RunJob({ spec: specToMsg(spec) }, this.md(), cb));
  }

  async list(): Promise<AgentJobInfo[]> {
    const r = await callUnary<{ jobs: AgentJobInfo[] }>(`list jobs of agent ${this.address}`, (cb) => this.c.ListJobs({}, this.md(), cb));
    return r.jobs;
  }

  stop(job: string, checkpointFirst: boolean): Promise<AgentJobInfo> {
    return callUnary(`stop job ${job} on agent ${this.address}`, (cb) => this.c.StopJob({ job, checkpoint_first: checkpointFirst }, this.md(), cb));
  }

  async checkpoint(job: string, stopAfter: boolean, onProgress?: (p: ProgressEvent) => void, full = false): Promise<AgentCheckpointStats> {
    const r = await this.stream(`checkpoint job ${job} on agent ${this.address}`, this.c.Checkpoint({ job, stop_after: stopAfter, full }, this.md()), onProgress);
    if (!r.checkpoint) throw fromGrpcError({ code: 13, details: 'the agent ended the checkpoint call without a result' }, `checkpoint job ${job}`);
    return r.checkpoint;
  }

  async prestage(job: string, checkpoint: number, onProgress?: (p: ProgressEvent) => void): Promise<number> {
    const r = await this.stream(`pre-stage job ${job} on agent ${this.address}`, this.c.Prestage({ job, checkpoint }, this.md()), onProgress);
    return Number(r.progress?.done ?? 0);
  }

  /** `dmaGrants`: the job's DMA grants from the source's final checkpoint, re-installed here. */
  async restore(job: string, checkpoint: number, spec: JobSpecRecord, epoch: string, onProgress?: (p: ProgressEvent) => void, dmaGrants: DmaGrant[] = []): Promise<AgentJobInfo> {
    const r = await this.stream(`restore job ${job} on agent ${this.address}`, this.c.Restore({ job, checkpoint, spec: specToMsg(spec), epoch, dma_grants: dmaGrants }, this.md()), onProgress);
    if (!r.job) throw fromGrpcError({ code: 13, details: 'the agent ended the restore call without a result' }, `restore job ${job}`);
    return r.job;
  }

  /** Migration source: the job now runs on `toHost`; its DMA transfers go to `dmaAddress`. */
  async jobMoved(job: string, toHost: string, dmaAddress: string): Promise<void> {
    await callUnary(`tell agent ${this.address} that job ${job} moved to ${toHost}`, (cb) => this.c.JobMoved({ job, to_host: toHost, dma_address: dmaAddress }, this.md(), cb));
  }

  /** Drain a server stream of AgentProgress; returns the last message. */
  private async stream(what: string, call: AsyncIterable<AgentProgress__Output>, onProgress?: (p: ProgressEvent) => void): Promise<AgentProgress__Output> {
    let last: AgentProgress__Output | null = null;
    try {
      for await (const m of call) {
        if (m.progress && onProgress) onProgress({ phase: m.progress.phase, done: Number(m.progress.done), total: Number(m.progress.total), unit: m.progress.unit });
        last = m;
      }
    } catch (e) {
      throw fromGrpcError(e, what);
    }
    if (!last) throw fromGrpcError({ code: 13, details: 'empty reply' }, what);
    return last;
  }
}
