/**
 * The Coordinator gRPC service (proto/exa_coordinator.proto), served by
 * `exastore serve` next to the Store: host registry with heartbeats, job
 * placement with epochs, and the durable record of every job's launch spec.
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync, openSync, fsyncSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { ExaError } from '../errors.js';
import { grpc, loadProto, unary, type ServerAuth } from '../grpc.js';
import type { ProtoGrpcType } from '../gen/exa_coordinator.js';
import type { CoordinatorHandlers } from '../gen/exa/v1/Coordinator.js';
import type { JobPlacement as JobPlacementMsg } from '../gen/exa/v1/JobPlacement.js';
import type { JobSpec, JobSpec__Output } from '../gen/exa/v1/JobSpec.js';
import type { RunningJob__Output } from '../gen/exa/v1/RunningJob.js';
import { checkId, Registry, type JobPlacement, type JobState, type RunningReport } from './registry.js';

export interface JobSpecRecord {
  job: string;
  argv: string[];
  cwd: string;
  env: Record<string, string>;
  everyMs: number;
  keep: number;
}

/**
 * Durable job specs: one JSON file in the store's data directory, replaced
 * atomically (write, fsync, rename). Small (a few KiB per job) and written
 * only when a job is launched, so a file beats a database here.
 */
export class SpecStore {
  private readonly specs = new Map<string, JobSpecRecord>();
  private readonly file: string | null;

  constructor(dir: string | null) {
    this.file = dir ? join(dir, 'coordinator-specs.json') : null;
    if (dir) mkdirSync(dir, { recursive: true });
    if (this.file) {
      let text: string | null = null;
      try {
        text = readFileSync(this.file, 'utf8');
      } catch {
        text = null; // first start
      }
      if (text !== null) {
        let parsed: unknown;
        try {
          parsed = JSON.parse(text);
        } catch (e) {
          throw new ExaError('CORRUPT', `${this.file} is not valid JSON: ${(e as Error).message}`);
        }
        if (!Array.isArray(parsed)) throw new ExaError('CORRUPT', `${this.file} does not hold a list of job specs`);
        for (const s of parsed as JobSpecRecord[]) this.specs.set(s.job, s);
      }
    }
  }

  get(job: string): JobSpecRecord | undefined {
    return this.specs.get(job);
  }

  put(spec: JobSpecRecord): void {
    this.specs.set(spec.job, spec);
    if (!this.file) return;
    const tmp = `${this.file}.tmp`;
    writeFileSync(tmp, JSON.stringify([...this.specs.values()], null, 1));
    const fd = openSync(tmp, 'r');
    try { fsyncSync(fd); } finally { closeSync(fd); }
    renameSync(tmp, this.file);
  }
}

/** An agent's report of a running job, from the wire (sizes arrive as strings). */
function runningReport(j: RunningJob__Output): RunningReport {
  return {
    job: j.job, pid: j.pid, lastCheckpoint: j.last_checkpoint,
    dmaBuffers: j.dma_buffers.map((b) => ({ name: b.name, size: Number(b.size), grants: b.grants.map((g) => ({ peer: g.peer, perms: g.perms })) })),
  };
}

export function specFromMsg(m: JobSpec__Output): JobSpecRecord {
  checkId('job', m.job);
  if (!Array.isArray(m.argv) || m.argv.length === 0) throw new ExaError('INVALID_ARGUMENT', `job ${m.job}: the spec has no command`);
  return { job: m.job, argv: [...m.argv], cwd: m.cwd, env: { ...m.env }, everyMs: m.every_ms, keep: m.keep };
}

export function specToMsg(s: JobSpecRecord): JobSpec {
  return { job: s.job, argv: s.argv, cwd: s.cwd, env: s.env, every_ms: s.everyMs, keep: s.keep };
}

const RELEASE_STATES = new Set<JobState>(['STOPPED', 'FINISHED', 'FAILED']);

export interface CoordinatorOptions {
  dataDir: string | null;
  heartbeatMs?: number;
  missedBeats?: number;
}

/** Owns the registry and spec store and produces the gRPC handlers. */
export class Coordinator {
  readonly registry: Registry;
  readonly specs: SpecStore;

  constructor(opts: CoordinatorOptions) {
    this.registry = new Registry({ heartbeatMs: opts.heartbeatMs ?? 1000, missedBeats: opts.missedBeats ?? 3 });
    this.specs = new SpecStore(opts.dataDir);
  }

  private placementMsg(p: JobPlacement): JobPlacementMsg {
    let hostState = 'DOWN';
    let address = '';
    let dmaAddress = '';
    try {
      const h = this.registry.describeHost(p.host);
      hostState = h.state;
      address = h.address;
      dmaAddress = h.dmaAddress;
    } catch {
      // host unknown since a coordinator restart: reported as DOWN
    }
    return {
      job: p.job, host_id: p.host, state: p.state, epoch: String(p.epoch), pid: p.pid,
      last_checkpoint: p.lastCheckpoint, host_state: hostState, agent_address: address, dma_address: dmaAddress,
      dma_buffers: p.dmaBuffers.map((b) => ({ name: b.name, size: String(b.size), grants: b.grants })),
    };
  }

  handlers(auth: ServerAuth): CoordinatorHandlers {
    const r = this.registry;
    const epochOf = (v: string | number): number => {
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < 0) throw new ExaError('INVALID_ARGUMENT', `epoch ${String(v)} is not a valid number`);
      return n;
    };
    return {
      RegisterHost: unary(auth, async (req) => {
        r.register(req.host_id, req.agent_address, req.jobs.map(runningReport), req.dma_address);
        return { heartbeat_ms: r.heartbeatMs };
      }),
      Heartbeat: unary(auth, async (req) => ({
        known: r.heartbeat(checkId('host', req.host_id), req.jobs.map(runningReport)),
      })),
      ListHosts: unary(auth, async () => ({
        hosts: r.listHosts().map((h) => ({
          host_id: h.hostId, agent_address: h.address, dma_address: h.dmaAddress, state: h.state,
          last_seen_ms_ago: String(Math.max(0, Date.now() - h.lastSeenMs)), jobs: h.jobs,
        })),
      })),
      GetPlacement: unary(auth, async (req) => this.placementMsg(r.getJob(req.job))),
      ListPlacements: unary(auth, async () => ({ jobs: r.listJobs().map((p) => this.placementMsg(p)) })),
      ClaimJob: unary(auth, async (req) => this.placementMsg(r.claim(req.job, req.host_id, req.pid))),
      ReleaseJob: unary(auth, async (req) => {
        const state = req.state as JobState;
        if (!RELEASE_STATES.has(state)) throw new ExaError('INVALID_ARGUMENT', `release state must be STOPPED, FINISHED or FAILED, got ${JSON.stringify(req.state)}`);
        return { released: r.release(checkId('job', req.job), checkId('host', req.host_id), state as 'STOPPED' | 'FINISHED' | 'FAILED') };
      }),
      BeginMove: unary(auth, async (req) => this.placementMsg(r.beginMove(checkId('job', req.job), epochOf(req.epoch)))),
      FinishMove: unary(auth, async (req) => this.placementMsg(r.finishMove(checkId('job', req.job), epochOf(req.epoch), req.to_host, req.pid))),
      AbortMove: unary(auth, async (req) => this.placementMsg(r.abortMove(checkId('job', req.job), epochOf(req.epoch)))),
      PutJobSpec: unary(auth, async (req) => {
        this.specs.put(specFromMsg(req));
        return {};
      }),
      GetJobSpec: unary(auth, async (req) => {
        const s = this.specs.get(checkId('job', req.job));
        if (!s) throw new ExaError('NOT_FOUND', `no launch spec is recorded for job ${req.job}`);
        return specToMsg(s);
      }),
    };
  }

  /** Add the Coordinator service to a server. */
  addTo(server: grpc.Server, auth: ServerAuth): void {
    const proto = loadProto<ProtoGrpcType>('exa_coordinator.proto');
    server.addService(proto.exa.v1.Coordinator.service, this.handlers(auth) as unknown as grpc.UntypedServiceImplementation);
  }
}
