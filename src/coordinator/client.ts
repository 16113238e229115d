/**
 * Client of the Coordinator service (agents, exackpt, exarestore). Every
 * failure is an ExaError naming the call.
 */
import { callMetadata, callUnary, createClient, waitForReady, type ClientOptions } from '../grpc.js';
import { loadProto } from '../grpc.js';
import type { ProtoGrpcType } from '../gen/exa_coordinator.js';
import type { CoordinatorClient as GenClient } from '../gen/exa/v1/Coordinator.js';
import type { JobPlacement__Output } from '../gen/exa/v1/JobPlacement.js';
import type { HostInfo__Output } from '../gen/exa/v1/HostInfo.js';
import type { RunningJob } from '../gen/exa/v1/RunningJob.js';
import { specFromMsg, specToMsg, type JobSpecRecord } from './service.js';

export type Placement = JobPlacement__Output;
export type HostRecord = HostInfo__Output;

export class CoordinatorClient {
  private constructor(private readonly c: GenClient, readonly address: string, private readonly opts: ClientOptions) {}

  /** Connect, waiting up to timeoutMs for the channel (UNAVAILABLE naming the address otherwise). */
  static async connect(address: string, opts: ClientOptions & { timeoutMs?: number } = {}): Promise<CoordinatorClient> {
    const proto = loadProto<ProtoGrpcType>('exa_coordinator.proto');
    const c = createClient(proto.exa.v1.Coordinator, address);
    if (opts.timeoutMs !== 0) {
      try {
        await waitForReady(c, address, opts.timeoutMs ?? 5000);
      } catch (e) {
        c.close();
        throw e;
      }
    }
    return new CoordinatorClient(c, address, opts);
  }

  /** A client that connects lazily (agents keep running while the coordinator is down). */
  static lazy(address: string, opts: ClientOptions = {}): CoordinatorClient {
    const proto = loadProto<ProtoGrpcType>('exa_coordinator.proto');
    return new CoordinatorClient(createClient(proto.exa.v1.Coordinator, address), address, opts);
  }

  close(): void { this.c.close(); }

  private md() { return callMetadata(this.opts); }
  private deadline(ms = 10_000) { return { deadline: Date.now() + ms }; }

  register(hostId: string, agentAddress: string, jobs: RunningJob[], dmaAddress = ''): Promise<{ heartbeat_ms: number }> {
    return callUnary(`register host ${hostId} at ${this.address}`, (cb) => this.c.RegisterHost({ host_id: hostId, agent_address: agentAddress, jobs, dma_address: dmaAddress }, this.md(), this.deadline(), cb));
  }

  async heartbeat(hostId: string, jobs: RunningJob[]): Promise<boolean> {
    const r = await callUnary<{ known: boolean }>(`heartbeat of host ${hostId}`, (cb) => this.c.Heartbeat({ host_id: hostId, jobs }, this.md(), this.deadline(5000), cb));
    return r.known;
  }

  async listHosts(): Promise<HostRecord[]> {
    const r = await callUnary<{ hosts: HostRecord[] }>('list hosts', (cb) => this.c.ListHosts({}, this.md(), this.deadline(), cb));
    return r.hosts;
  }

  getPlacement(job: string): Promise<Placement> {
    return callUnary(`find job ${job}`, (cb) => this.c.GetPlacement({ job }, this.md(), this.deadline(), cb));
  }

  async listPlacements(): Promise<Placement[]> {
    const r = await callUnary<{ jobs: Placement[] }>('list jobs', (cb) => this.c.ListPlacements({}, this.md(), this.deadline(), cb));
    return r.jobs;
  }

  claim(job: string, hostId: string, pid = 0): Promise<Placement> {
    return callUnary(`place job ${job} on ${hostId}`, (cb) => this.c.ClaimJob({ job, host_id: hostId, pid }, this.md(), this.deadline(), cb));
  }

  async release(job: string, hostId: string, state: 'STOPPED' | 'FINISHED' | 'FAILED'): Promise<boolean> {
    const r = await callUnary<{ released: boolean }>(`release job ${job}`, (cb) => this.c.ReleaseJob({ job, host_id: hostId, state }, this.md(), this.deadline(), cb));
    return r.released;
  }

  beginMove(job: string, epoch: string): Promise<Placement> {
    return callUnary(`begin moving job ${job}`, (cb) => this.c.BeginMove({ job, epoch }, this.md(), this.deadline(), cb));
  }

  finishMove(job: string, epoch: string, toHost: string, pid: number): Promise<Placement> {
    return callUnary(`finish moving job ${job} to ${toHost}`, (cb) => this.c.FinishMove({ job, epoch, to_host: toHost, pid }, this.md(), this.deadline(), cb));
  }

  abortMove(job: string, epoch: string): Promise<Placement> {
    return callUnary(`abort moving job ${job}`, (cb) => this.c.AbortMove({ job, epoch }, this.md(), this.deadline(), cb));
  }

  async putSpec(spec: JobSpecRecord): Promise<void> {
    await callUnary(`record launch spec of job ${spec.job}`, (cb) => this.c.PutJobSpec(specToMsg(spec), this.md(), this.deadline(), cb));
  }

  async getSpec(job: string): Promise<JobSpecRecord> {
    const m = await callUnary<Parameters<typeof specFromMsg>[0]>(`get launch spec of job ${job}`, (cb) => this.c.GetJobSpec({ job }, this.md(), this.deadline(), cb));
    return specFromMsg(m);
  }
}
