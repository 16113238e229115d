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
  /** Answer a job's pending exa_checkpoint() calls with an error. */
  decline(job: string, reason: string): void;
  /** Events: a workload attached / detached / asked for a checkpoint (exa_checkpoint). */
  on(event: 'attach' | 'detach' | 'request', fn: (job: string, pid: number) => void): void;
  close(): Promise<void>;
}
