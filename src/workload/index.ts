/**
 * The Node workload API: a Node process keeps checkpointable state in named
 * regions (memfd-backed, page-aligned) exposed as ArrayBuffers, attached to
 * the local agent through libexa. The agent checkpoints them live; the process
 * only pauses while the regions are write-protected.
 *
 *   const w = Workload.attach({ socketPath, jobId });
 *   const grid = new Float64Array(w.allocRegion('grid', 64 << 20));
 *   ... compute ...
 *   await w.checkpoint();   // app-initiated, at a safe point
 *
 * Ownership: the regions' memory belongs to libexa; freeRegion() detaches the
 * ArrayBuffer (its length becomes 0) before unmapping, so stale views cannot
 * touch freed memory. detach() stops checkpointing but leaves the memory mapped.
 */
import { ExaError } from '../errors.js';
import * as native from '../native.js';
import type { WorkloadHandle } from '../native.js';

export interface AttachOptions {
  /** Agent socket; default $EXA_AGENT_SOCKET. */
  socketPath?: string;
  /** Job id, 1..63 characters of [A-Za-z0-9._-]; default $EXA_JOB_ID. */
  jobId?: string;
}

export interface RegionListing { name: string; size: number }

export class Workload {
  private handle: WorkloadHandle | null;
  private readonly buffers = new Map<string, ArrayBuffer>();

  private constructor(handle: WorkloadHandle, readonly jobId: string) {
    this.handle = handle;
  }

  /** Attach this process to the local agent. UNAVAILABLE when no agent listens, ALREADY_EXISTS for a job id in use. */
  static attach(opts: AttachOptions = {}): Workload {
    let h: WorkloadHandle;
    try {
      h = native.workloadAttach(opts.socketPath ?? null, opts.jobId ?? null);
    } catch (e) {
      // no socket file or nobody listening: the agent is unavailable, not a missing resource
      const errno = e instanceof ExaError ? e.detail.errno : undefined;
      if (errno === 'ENOENT' || errno === 'ECONNREFUSED') throw new ExaError('UNAVAILABLE', (e as Error).message, { errno }, { cause: e });
      throw e;
    }
    return new Workload(h, opts.jobId ?? process.env.EXA_JOB_ID ?? '');
  }

  /** Run before this workload detaches (a DMA session closes itself here: it borrows the libexa context). */
  private readonly beforeDetach = new Set<() => void>();

  /** @internal For src/dma: the native handle, and a hook run before detach. */
  nativeHandleFor(onDetach: () => void): { handle: WorkloadHandle; release: () => void } {
    const handle = this.h;
    this.beforeDetach.add(onDetach);
    return { handle, release: () => { this.beforeDetach.delete(onDetach); } };
  }

  private get h(): WorkloadHandle {
    if (!this.handle) throw new ExaError('FAILED_PRECONDITION', `workload ${this.jobId} is detached`);
    return this.handle;
  }

  /** Allocate a region of `size` bytes (rounded up to 4096), zero-filled. */
  allocRegion(name: string, size: number): ArrayBuffer {
    const ab = native.workloadAlloc(this.h, name, size);
    this.buffers.set(name, ab);
    return ab;
  }

  /** The ArrayBuffer of a region, or null. */
  region(name: string): ArrayBuffer | null {
    return this.buffers.get(name) ?? null;
  }

  listRegions(): RegionListing[] {
    return native.workloadList(this.h);
  }

  /** Free a region: CONFLICT while a checkpoint of this job is running. */
  freeRegion(name: string): void {
    native.workloadFree(this.h, name);
    this.buffers.delete(name);
  }

  /** App-initiated checkpoint: resolves when the pause is over (pages keep streaming out). */
  checkpoint(): Promise<void> {
    return native.workloadCheckpoint(this.h);
  }

  detach(): void {
    if (!this.handle) return;
    for (const fn of [...this.beforeDetach]) fn();
    this.beforeDetach.clear();
    const h = this.handle;
    this.handle = null;
    native.workloadDetach(h);
  }
}

export function attach(opts: AttachOptions = {}): Workload {
  return Workload.attach(opts);
}
