/**
 * What the host agent needs from the local checkpointer (the native agent
 * side, wrapped in src/agent/). Kept narrow so the gRPC daemon does not
 * depend on native details, and so its logic reads as the product's rules.
 */
import type { PageBatch, RegionSpec } from '../store/client.js';

export interface NativeCkptStats {
  pauseMs: number;
  pagesSaved: number;
  zeroPages: number;
  shadowCopies: number;
  shadowPeakBytes: number;
  faults: number[];
}

/** One checkpoint in progress: its region table, its batches (pull = backpressure), its stats. */
export interface CheckpointRun {
  /** Holds every page (zero pages flagged), so it needs no parent. */
  full: boolean;
  regions: RegionSpec[];
  batches: AsyncIterable<PageBatch>;
  /** Settles after the last batch was taken (or the run failed / was cancelled). */
  done: Promise<NativeCkptStats>;
  /** Abandon the run: the saver stops, the job is never left stopped or blocked. */
  cancel(): void;
}

export interface CheckpointOptions {
  /** Save every page (the store then records no parent). */
  full: boolean;
  /** Final checkpoint of a migration: leave the job stopped after the pause. */
  leaveStopped: boolean;
}

export interface AttachedJob {
  job: string;
  pid: number;
  regions: RegionSpec[];
}

export interface CheckpointerPort {
  /** Jobs attached now. */
  attached(): AttachedJob[];
  /** Start a checkpoint; resolves once the pause is over (batches then stream). */
  checkpoint(job: string, opts: CheckpointOptions): Promise<CheckpointRun>;
  /** Events: a workload attached / detached. */
  on(event: 'attach' | 'detach', fn: (job: string, pid: number) => void): void;
  /**
   * Consumer of app-initiated checkpoints (exa_checkpoint() in the job): the
   * checkpointer takes them itself, with the options `options(job)` gives, and
   * hands each run here to be drained; a rejection fails the job's call.
   */
  serveAppCheckpoints(options: (job: string) => CheckpointOptions, consume: (job: string, run: CheckpointRun) => Promise<void>): void;
  /** The DMA backend's control side, or null when this agent has no DMA backend. */
  readonly dma: DmaControlPort | null;
  close(): Promise<void>;
}

/** A DMA grant of a job's buffer to a peer job (perms: 1 read, 2 write, 3 both). */
export interface DmaGrant {
  buffer: string;
  peer: string;
  perms: number;
}

/**
 * What the host agent needs from the local DMA backend (RDMA API remoting)
 * to keep DMA sessions working across hosts and migrations. The backend owns
 * the data path; the agent owns routing (from the coordinator) and the
 * migration steps:
 *   source: fence(job) before the final checkpoint (transfers to the job are
 *           held, none is applied after the image instant), moved(job, addr)
 *           once the target runs it (held transfers go there), unfence(job)
 *           when the migration is rolled back;
 *   target: expect(job, grants) before relaunching it (transfers wait for its
 *           buffers instead of failing; its grants are re-installed).
 */
export interface DmaControlPort {
  /** host:port of this agent's DMA data path. */
  readonly address: string;
  /** Where a job's buffers are reached when it is not local (null: unknown). */
  setRoute(job: string, address: string | null): void;
  /** The backend needs a route it lacks; answer with setRoute(). */
  onRouteMiss(fn: (job: string) => void): void;
  fence(job: string): Promise<DmaGrant[]>;
  unfence(job: string): void;
  moved(job: string, address: string): void;
  expect(job: string, grants: DmaGrant[], timeoutMs: number): void;
  /** The DMA buffers registered now, per job, with their grants (reported to the coordinator). */
  buffers(): Array<{ job: string; name: string; size: number; grants: Array<{ peer: string; perms: number }> }>;
}
