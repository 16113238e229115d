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
  close(): Promise<void>;
}
