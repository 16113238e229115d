/**
 * The coordinator's state: which hosts (agents) exist and are alive, and
 * where every job runs. Pure logic, no transport: src/coordinator/service.ts
 * serves it over gRPC from `exastore serve`.
 *
 * Invariant: a job runs on at most one host. Placement changes only through
 * claim() (a new job, or a restore onto a host), move() (compare-and-swap on
 * the job's epoch, used by migration) and release(). Every change bumps the
 * job's epoch, so an agent holding a stale epoch is fenced off.
 *
 * The registry is rebuilt from agents: after a coordinator restart, agents
 * re-register with the jobs they run, so nothing here needs to be durable
 * except job specs (kept by the caller, see JobSpec persistence in service.ts).
 */
import { ExaError } from '../errors.js';

export type HostState = 'UP' | 'DOWN';

export interface HostInfo {
  hostId: string;
  address: string;
  /** The agent's DMA data address (RDMA remoting), '' when it has none. */
  dmaAddress: string;
  state: HostState;
  lastSeenMs: number;
  registeredAtMs: number;
  jobs: string[];
}

export type JobState = 'RUNNING' | 'STOPPED' | 'FINISHED' | 'FAILED' | 'MIGRATING' | 'LOST';

/** A job's DMA buffer and the peers it is granted to (perms: 1 read, 2 write, 3 both). */
export interface DmaBufferRec {
  name: string;
  size: number;
  grants: Array<{ peer: string; perms: number }>;
}

/** What an agent reports of a job it runs. */
export interface RunningReport {
  job: string;
  pid: number;
  lastCheckpoint: number;
  dmaBuffers?: DmaBufferRec[];
}

const MAX_DMA_BUFFERS = 4096;
const MAX_DMA_GRANTS = 1024;

/** A DMA buffer name (a region name: 1..63 of [A-Za-z0-9._-]) of `job`. */
export function checkDmaBufferName(job: string, name: unknown): string {
  if (typeof name !== 'string' || !/^[A-Za-z0-9._-]{1,63}$/.test(name)) throw new ExaError('INVALID_ARGUMENT', `job ${job}: DMA buffer name ${JSON.stringify(name)} is not valid`);
  return name;
}

/** A grant of `job`'s buffer to a peer job: the buffer name, the peer's id, perms 1 (read), 2 (write) or 3 (both). */
export function checkDmaGrant(job: string, buffer: string, peer: string, perms: number): void {
  checkDmaBufferName(job, buffer);
  checkId('job', peer);
  if (!Number.isInteger(perms) || perms < 1 || perms > 3) throw new ExaError('INVALID_ARGUMENT', `job ${job}: grant of DMA buffer ${buffer} to ${peer} has perms ${perms}, not 1..3`);
}

/** Validate what an agent reports of a job's DMA buffers (names as region names, perms 1..3, bounded counts). */
export function checkDmaBuffers(job: string, bufs: DmaBufferRec[]): DmaBufferRec[] {
  if (bufs.length > MAX_DMA_BUFFERS) throw new ExaError('INVALID_ARGUMENT', `job ${job} reports ${bufs.length} DMA buffers, more than ${MAX_DMA_BUFFERS}`);
  for (const b of bufs) {
    checkDmaBufferName(job, b.name);
    if (!Number.isSafeInteger(b.size) || b.size <= 0) throw new ExaError('INVALID_ARGUMENT', `job ${job}: DMA buffer ${b.name} has size ${String(b.size)}`);
    if (b.grants.length > MAX_DMA_GRANTS) throw new ExaError('INVALID_ARGUMENT', `job ${job}: DMA buffer ${b.name} has more than ${MAX_DMA_GRANTS} grants`);
    for (const g of b.grants) checkDmaGrant(job, b.name, g.peer, g.perms);
  }
  return bufs;
}

export interface JobPlacement {
  job: string;
  host: string;
  state: JobState;
  epoch: number;
  updatedAtMs: number;
  pid: number;
  lastCheckpoint: number;
  /** The job's DMA buffers and grants, as its host last reported them. */
  dmaBuffers: DmaBufferRec[];
}

export interface RegistryOptions {
  /** Heartbeat period agents are told to use. */
  heartbeatMs: number;
  /** A host is DOWN after this many missed heartbeats. */
  missedBeats: number;
  now?: () => number;
}

const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/** Validate a host or job id: 1-63 characters of [A-Za-z0-9._-], starting alphanumeric. */
export function checkId(kind: 'host' | 'job', id: unknown): string {
  if (typeof id !== 'string' || !ID_RE.test(id)) {
    throw new ExaError('INVALID_ARGUMENT', `${kind} id ${JSON.stringify(id)} is not valid: use 1-63 characters of A-Z a-z 0-9 . _ - starting with a letter or digit`);
  }
  return id;
}

export class Registry {
  private readonly hosts = new Map<string, HostInfo>();
  private readonly jobs = new Map<string, JobPlacement>();
  private readonly now: () => number;

  constructor(private readonly opts: RegistryOptions) {
    this.now = opts.now ?? Date.now;
  }

  get heartbeatMs(): number { return this.opts.heartbeatMs; }

  /** Register (or re-register) an agent with the jobs it currently runs. */
  register(hostId: string, address: string, running: RunningReport[], dmaAddress = ''): HostInfo {
    checkId('host', hostId);
    if (typeof address !== 'string' || address.length === 0 || address.length > 255) {
      throw new ExaError('INVALID_ARGUMENT', `agent address for host ${hostId} is missing or too long`);
    }
    if (typeof dmaAddress !== 'string' || dmaAddress.length > 255 || (dmaAddress !== '' && !/^\[?[^\s\]]+\]?:\d{1,5}$/.test(dmaAddress))) {
      throw new ExaError('INVALID_ARGUMENT', `DMA address ${JSON.stringify(dmaAddress)} of host ${hostId} is not HOST:PORT`);
    }
    const t = this.now();
    const prev = this.hosts.get(hostId);
    const info: HostInfo = { hostId, address, dmaAddress, state: 'UP', lastSeenMs: t, registeredAtMs: prev?.registeredAtMs ?? t, jobs: [] };
    this.hosts.set(hostId, info);
    this.syncJobs(hostId, running);
    return this.describeHost(hostId);
  }

  /** Record a heartbeat; false when the host is unknown (the agent must re-register). */
  heartbeat(hostId: string, running: RunningReport[]): boolean {
    const h = this.hosts.get(hostId);
    if (!h) return false;
    h.lastSeenMs = this.now();
    h.state = 'UP';
    this.syncJobs(hostId, running);
    return true;
  }

  private syncJobs(hostId: string, running: RunningReport[]): void {
    const t = this.now();
    for (const r of running) {
      checkId('job', r.job);
      const dmaBuffers = checkDmaBuffers(r.job, r.dmaBuffers ?? []);
      const j = this.jobs.get(r.job);
      if (!j) {
        this.jobs.set(r.job, { job: r.job, host: hostId, state: 'RUNNING', epoch: 1, updatedAtMs: t, pid: r.pid, lastCheckpoint: r.lastCheckpoint, dmaBuffers });
      } else if (j.host === hostId) {
        j.pid = r.pid;
        j.lastCheckpoint = Math.max(j.lastCheckpoint, r.lastCheckpoint);
        j.dmaBuffers = dmaBuffers;
        if (j.state !== 'MIGRATING') j.state = 'RUNNING';
      }
      // A job reported by a host that is not its placement is a stale copy; the
      // agent learns so from claim()/fence checks, the registry does not move it.
    }
  }

  /** Hosts with their state computed from the last heartbeat. */
  listHosts(): HostInfo[] {
    return [...this.hosts.keys()].sort().map((h) => this.describeHost(h));
  }

  describeHost(hostId: string): HostInfo {
    const h = this.hosts.get(hostId);
    if (!h) throw new ExaError('NOT_FOUND', `host ${hostId} is not registered; known hosts: ${this.knownHosts()}`);
    const down = this.now() - h.lastSeenMs > this.opts.heartbeatMs * this.opts.missedBeats;
    return {
      ...h,
      state: down ? 'DOWN' : 'UP',
      jobs: [...this.jobs.values()].filter((j) => j.host === h.hostId && (j.state === 'RUNNING' || j.state === 'MIGRATING')).map((j) => j.job).sort(),
    };
  }

  knownHosts(): string {
    const names = [...this.hosts.keys()].sort();
    return names.length ? names.join(', ') : '(none)';
  }

  /** The host an operation targets; NOT_FOUND lists the known hosts. */
  requireHost(hostId: string, mustBeUp = false): HostInfo {
    checkId('host', hostId);
    const h = this.describeHost(hostId);
    if (mustBeUp && h.state !== 'UP') throw new ExaError('UNAVAILABLE', `host ${hostId} is down (last heartbeat ${Math.round((this.now() - h.lastSeenMs) / 1000)} s ago)`);
    return h;
  }

  getJob(job: string): JobPlacement {
    checkId('job', job);
    const j = this.jobs.get(job);
    if (!j) throw new ExaError('NOT_FOUND', `job ${job} is not known to the coordinator`);
    return { ...j };
  }

  findJob(job: string): JobPlacement | undefined {
    const j = this.jobs.get(job);
    return j ? { ...j } : undefined;
  }

  listJobs(): JobPlacement[] {
    return [...this.jobs.values()].sort((a, b) => a.job.localeCompare(b.job)).map((j) => ({ ...j }));
  }

  /**
   * Place a job on a host. Refused when the job runs (or is migrating) on a
   * live host; a job whose host is DOWN may be claimed (restore after failure).
   */
  claim(job: string, hostId: string, pid = 0): JobPlacement {
    checkId('job', job);
    this.requireHost(hostId);
    const j = this.jobs.get(job);
    const t = this.now();
    if (j && (j.state === 'RUNNING' || j.state === 'MIGRATING')) {
      const owner = this.describeHost(j.host);
      if (owner.state === 'UP') {
        throw new ExaError('ALREADY_EXISTS', `job ${job} is already ${j.state === 'RUNNING' ? 'running' : 'migrating'} on host ${j.host}`);
      }
    }
    // A job placed on a new host has no DMA buffers there until that host reports them.
    const placed: JobPlacement = { job, host: hostId, state: 'RUNNING', epoch: (j?.epoch ?? 0) + 1, updatedAtMs: t, pid, lastCheckpoint: j?.lastCheckpoint ?? 0, dmaBuffers: [] };
    this.jobs.set(job, placed);
    return { ...placed };
  }

  /** Mark a job as migrating (transfers to it are held); CAS on the epoch. */
  beginMove(job: string, epoch: number): JobPlacement {
    const j = this.fenced(job, epoch);
    j.state = 'MIGRATING';
    j.epoch += 1;
    j.updatedAtMs = this.now();
    return { ...j };
  }

  /** Complete a move to a new host; CAS on the epoch returned by beginMove(). */
  finishMove(job: string, epoch: number, toHost: string, pid: number): JobPlacement {
    this.requireHost(toHost);
    const j = this.fenced(job, epoch);
    j.host = toHost;
    j.state = 'RUNNING';
    j.pid = pid;
    j.dmaBuffers = []; // until the new host reports the job's buffers (re-registered with their grants)
    j.epoch += 1;
    j.updatedAtMs = this.now();
    return { ...j };
  }

  /** Abort a move: the job stays (or is back) on its source host. */
  abortMove(job: string, epoch: number): JobPlacement {
    const j = this.fenced(job, epoch);
    j.state = 'RUNNING';
    j.epoch += 1;
    j.updatedAtMs = this.now();
    return { ...j };
  }

  /** A job ended on its host (finished, stopped or failed). Ignored from a host that is not the placement. */
  release(job: string, hostId: string, state: Exclude<JobState, 'RUNNING' | 'MIGRATING'>): boolean {
    const j = this.jobs.get(job);
    if (!j || j.host !== hostId || j.state === 'MIGRATING') return false;
    j.state = state;
    j.epoch += 1;
    j.updatedAtMs = this.now();
    return true;
  }

  noteCheckpoint(job: string, hostId: string, checkpoint: number): void {
    const j = this.jobs.get(job);
    if (j && j.host === hostId) j.lastCheckpoint = Math.max(j.lastCheckpoint, checkpoint);
  }

  private fenced(job: string, epoch: number): JobPlacement {
    const j = this.jobs.get(job);
    if (!j) throw new ExaError('NOT_FOUND', `job ${job} is not known to the coordinator`);
    if (j.epoch !== epoch) throw new ExaError('CONFLICT', `job ${job} changed placement meanwhile (epoch ${j.epoch}, expected ${epoch}); retry`);
    return j;
  }
}
