/**
 * Restore and live migration (DESIGN.md §5), orchestrated from the caller
 * (exarestore, the demo, tests) through the coordinator and the agents.
 *
 * Live migration of a running job from A to B:
 *   1. BeginMove: the coordinator marks the job MIGRATING (CAS on its epoch).
 *   2. B pre-stages the latest committed checkpoint while the job runs on A.
 *   3. A takes a final checkpoint with the job left stopped and ends it
 *      (downtime starts at that pause).
 *   4. B advances its staged image by the final increment only, relaunches
 *      the job with EXA_RESTORE, and FinishMove records B.
 *   5. A is told the job moved: DMA transfers aimed at it go to B.
 * DMA sessions (RDMA remoting) follow the job: A fences transfers to the job
 * before the final checkpoint (none is applied after the image instant; peers
 * are held, not failed), the job's grants travel to B, which re-installs them
 * and holds transfers until the job registered its buffers; then the held
 * transfers complete on B, in order, each exactly once.
 * If anything fails before B runs the job, A resumes it (or it is restarted
 * from the final checkpoint on A) and AbortMove restores the placement: the
 * job is never running on two hosts, and never silently lost.
 * When A is down, B restores from the last committed checkpoint.
 */
import { ExaError, toExaError } from '../errors.js';
import { CoordinatorClient, type HostRecord, type Placement } from '../coordinator/client.js';
import { AgentClient, type AgentJobInfo } from '../hostagent/client.js';
import type { ProgressEvent } from '../cli/common.js';
import type { ClientOptions } from '../grpc.js';
import type { StoreClient } from '../store/client.js';
import type { JobSpecRecord } from '../coordinator/service.js';
import type { DmaGrant } from '../hostagent/port.js';

export interface MigrateOptions extends ClientOptions {
  job: string;
  to: string;
  /** Checkpoint to restore (0 = a final checkpoint now, or the latest when the source is down). */
  at?: number;
  /**
   * Baseline for benchmarks: no pre-staging, and the final checkpoint saves
   * every page, so the whole image crosses while the job is stopped.
   */
  stopAndCopy?: boolean;
  /**
   * The exarestore that was migrating this job died (the coordinator still shows it MIGRATING):
   * finish its work. If the job still runs on its source, the move is called off and done again;
   * if the source already ended it after the final checkpoint, or is down, the job is restored on
   * the target from its last committed checkpoint. Only for a migration whose caller is gone:
   * running it next to a live exarestore of the same job could start the job twice.
   */
  resumeInterrupted?: boolean;
  /** Pre-copy catch-up rounds before the job is stopped (default 4). */
  precopyRounds?: number;
  /** Stop iterating once a catch-up round moved at most this many pages (default 4096 = 16 MiB). */
  precopyTargetPages?: number;
  onStep?: (line: string) => void;
  onProgress?: (p: ProgressEvent) => void;
}

export interface MigrateResult {
  job: string;
  from: string;
  to: string;
  checkpoint: number;
  live: boolean;
  downtimeMs: number;
  totalMs: number;
  pid: number;
}

function hostList(hosts: HostRecord[]): string {
  return hosts.length ? hosts.map((h) => `${h.host_id} (${h.state.toLowerCase()})`).join(', ') : '(none)';
}

export async function migrate(coord: CoordinatorClient, o: MigrateOptions): Promise<MigrateResult> {
  const step = o.onStep ?? (() => undefined);
  const t0 = performance.now();
  const hosts = await coord.listHosts();
  const target = hosts.find((h) => h.host_id === o.to);
  if (!target) throw new ExaError('NOT_FOUND', `host ${o.to} is not known to the coordinator; known hosts: ${hostList(hosts)}`);
  if (target.state !== 'UP') throw new ExaError('UNAVAILABLE', `host ${o.to} is down; hosts: ${hostList(hosts)}`);
  let placement: Placement;
  try {
    placement = await coord.getPlacement(o.job);
  } catch (e) {
    if (toExaError(e).code === 'NOT_FOUND') throw new ExaError('NOT_FOUND', `job ${o.job} does not exist (not known to the coordinator)`);
    throw e;
  }
  const spec = await coord.getSpec(o.job);
  const runningOnSource = placement.state === 'RUNNING' && placement.host_state === 'UP';
  if (placement.host_id === o.to && runningOnSource) throw new ExaError('ALREADY_EXISTS', `job ${o.job} is already running on host ${o.to}`);
  if (placement.state === 'MIGRATING') {
    if (!o.resumeInterrupted) {
      throw new ExaError('CONFLICT', `job ${o.job} is being migrated already (from host ${placement.host_id}); if the exarestore doing it died, run exarestore ${o.job} --to HOST --resume-interrupted`);
    }
    return resumeInterrupted(coord, o, placement, hosts, spec, target, t0);
  }

  const targetAgent = await AgentClient.connect(target.agent_address, o);
  try {
    if (!runningOnSource) {
      // Source down (or job not running): restore from the last committed checkpoint.
      step(`host ${placement.host_id} is ${placement.host_state === 'UP' ? 'up but the job is ' + placement.state.toLowerCase() : 'down'}: restoring ${o.job} from checkpoint ${o.at || 'latest'}`);
      const moving = await coord.claim(o.job, o.to).catch((e: unknown) => { throw toExaError(e, `place job ${o.job} on ${o.to}`); });
      let job: AgentJobInfo;
      try {
        // The source cannot hand over the job's DMA grants: the coordinator's last record of them does.
        job = await targetAgent.restore(o.job, o.at ?? 0, spec, moving.epoch, o.onProgress, recordedGrants(placement));
      } catch (e) {
        await coord.release(o.job, o.to, 'FAILED').catch(() => undefined);
        throw e;
      }
      return { job: o.job, from: placement.host_id, to: o.to, checkpoint: job.last_checkpoint, live: false, downtimeMs: 0, totalMs: performance.now() - t0, pid: job.pid };
    }

    const source = hosts.find((h) => h.host_id === placement.host_id);
    if (!source) throw new ExaError('UNAVAILABLE', `source host ${placement.host_id} of job ${o.job} is not registered`);
    const sourceAgent = await AgentClient.connect(source.agent_address, o);
    try {
      const moving = await coord.beginMove(o.job, placement.epoch);
      let stopped = false;
      let finalCkpt = 0;
      let tStop = 0;
      let grants: DmaGrant[] = [];
      try {
        // Pre-copy: stage the newest committed image on the target while the job runs.
        if (!o.at && !o.stopAndCopy) await precopy(sourceAgent, targetAgent, o, placement.host_id, step);
        step(`final checkpoint of ${o.job} on ${placement.host_id} (job stopped)`);
        tStop = performance.now();
        const fin = await sourceAgent.checkpoint(o.job, true, o.onProgress, o.stopAndCopy ?? false);
        grants = fin.dma_grants.map((g) => ({ buffer: g.buffer, peer: g.peer, perms: g.perms }));
        stopped = true;
        finalCkpt = o.at || fin.checkpoint;
        step(`checkpoint ${fin.checkpoint} committed (${Number(fin.pages_saved)} pages, pause ${fin.pause_ms.toFixed(1)} ms); restoring on ${o.to}`);
        const job = await targetAgent.restore(o.job, finalCkpt, spec, moving.epoch, o.onProgress, grants);
        const downtimeMs = performance.now() - tStop;
        await coord.finishMove(o.job, moving.epoch, o.to, job.pid);
        await sourceAgent.jobMoved(o.job, o.to, target.dma_address).catch((e: unknown) => {
          // Peers still find the job through the coordinator's new placement.
          step(`could not tell ${placement.host_id} that ${o.job} moved: ${toExaError(e).message}`);
        });
        step(`${o.job} runs on ${o.to} (pid ${job.pid}); downtime ${downtimeMs.toFixed(0)} ms`);
        return { job: o.job, from: placement.host_id, to: o.to, checkpoint: finalCkpt, live: true, downtimeMs, totalMs: performance.now() - t0, pid: job.pid };
      } catch (e) {
        const err = toExaError(e);
        step(`migration failed: ${err.message}; keeping ${o.job} on ${placement.host_id}`);
        if (stopped) {
          // The source process is gone: bring the job back on the source from the final checkpoint.
          await sourceAgent.restore(o.job, finalCkpt, spec, moving.epoch, undefined, grants).catch((e2: unknown) => {
            step(`could not restart ${o.job} on ${placement.host_id}: ${toExaError(e2).message}`);
          });
        }
        await coord.abortMove(o.job, moving.epoch).catch(() => undefined);
        throw err;
      }
    } finally {
      sourceAgent.close();
    }
  } finally {
    targetAgent.close();
  }
}

/** A job's DMA grants as the coordinator last recorded them (when its source cannot hand them over). */
function recordedGrants(p: Placement): DmaGrant[] {
  return p.dma_buffers.flatMap((b) => b.grants.map((g) => ({ buffer: b.name, peer: g.peer, perms: g.perms })));
}

/** Finish a migration whose caller died (see MigrateOptions.resumeInterrupted). */
async function resumeInterrupted(
  coord: CoordinatorClient, o: MigrateOptions, placement: Placement, hosts: HostRecord[], spec: JobSpecRecord, target: HostRecord, t0: number,
): Promise<MigrateResult> {
  const step = o.onStep ?? (() => undefined);
  const source = hosts.find((h) => h.host_id === placement.host_id);
  const sourceAgent = source && source.state === 'UP' ? await AgentClient.connect(source.agent_address, o).catch(() => null) : null;
  try {
    const onSource = sourceAgent ? (await sourceAgent.list()).find((j) => j.job === o.job) : undefined;
    if (onSource && (onSource.state === 'RUNNING' || onSource.state === 'STARTING')) {
      // Interrupted before the final checkpoint: the job still runs there. Call the move off, then do it again.
      step(`${o.job} still runs on ${placement.host_id}: the interrupted migration is called off and started again`);
      await coord.abortMove(o.job, placement.epoch);
      return await migrate(coord, { ...o, resumeInterrupted: false });
    }
    // The source ended the job after its final checkpoint (or is down): restore the last committed one.
    step(`${o.job} no longer runs on ${placement.host_id}: restoring it on ${o.to} from its last committed checkpoint`);
    const targetAgent = await AgentClient.connect(target.agent_address, o);
    try {
      const job = await targetAgent.restore(o.job, o.at ?? 0, spec, placement.epoch, o.onProgress, recordedGrants(placement));
      await coord.finishMove(o.job, placement.epoch, o.to, job.pid);
      if (sourceAgent) await sourceAgent.jobMoved(o.job, o.to, target.dma_address).catch(() => undefined);
      step(`${o.job} runs on ${o.to} (pid ${job.pid}) from checkpoint ${job.last_checkpoint}`);
      return { job: o.job, from: placement.host_id, to: o.to, checkpoint: job.last_checkpoint, live: false, downtimeMs: 0, totalMs: performance.now() - t0, pid: job.pid };
    } finally {
      targetAgent.close();
    }
  } finally {
    sourceAgent?.close();
  }
}

/**
 * Iterative pre-copy: stage the store's newest checkpoint on the target while
 * the job runs, then catch up with live incremental checkpoints and delta
 * reads until a round moves few pages (the job keeps writing meanwhile, so
 * one big copy leaves a big final increment). Only then is the job stopped.
 */
async function precopy(source: AgentClient, target: AgentClient, o: MigrateOptions, from: string, step: (l: string) => void): Promise<void> {
  try {
    const staged = await target.prestage(o.job, 0, o.onProgress);
    step(`pre-staged checkpoint ${staged} of ${o.job} on ${o.to} while it runs on ${from}`);
  } catch (e) {
    if (toExaError(e).code !== 'NOT_FOUND') throw e;
    step(`${o.job} has no committed checkpoint yet: pre-copy starts from a first one`);
  }
  const rounds = o.precopyRounds ?? 4;
  const enough = o.precopyTargetPages ?? 4096;
  for (let r = 1; r <= rounds; r++) {
    const ck = await source.checkpoint(o.job, false);
    await target.prestage(o.job, ck.checkpoint);
    const moved = Number(ck.pages_saved) + Number(ck.zero_pages);
    step(`pre-copy round ${r}: checkpoint ${ck.checkpoint} (${moved} changed pages) staged on ${o.to}`);
    if (moved <= enough) break;
  }
}

/**
 * Restore a job the cluster has never seen from a chain already imported
 * into its store (exarestore --from s3://...): the launch spec comes from the
 * newest checkpoint's labels (the agent records it in every checkpoint), is
 * recorded with the coordinator, and the job is placed and restored on `to`.
 */
export async function restoreImported(coord: CoordinatorClient, store: StoreClient, o: { job: string; to: string; at?: number; onStep?: (l: string) => void } & ClientOptions): Promise<MigrateResult> {
  const t0 = performance.now();
  const cks = await store.listCheckpoints(o.job);
  const ck = o.at ? cks.find((c) => c.checkpoint === o.at) : cks.at(-1);
  if (!ck) throw new ExaError('NOT_FOUND', `checkpoint ${o.at ?? 'latest'} of job ${o.job} is not in the store`);
  let spec: JobSpecRecord;
  try {
    spec = JSON.parse(ck.labels.spec ?? '') as JobSpecRecord;
    if (!Array.isArray(spec.argv) || spec.argv.length === 0 || spec.job !== o.job) throw new Error('no command');
  } catch {
    throw new ExaError('FAILED_PRECONDITION', `checkpoint ${ck.checkpoint} of job ${o.job} carries no usable launch spec (label "spec"); it was not taken by an exa agent`);
  }
  const hosts = await coord.listHosts();
  const target = hosts.find((h) => h.host_id === o.to);
  if (!target) throw new ExaError('NOT_FOUND', `host ${o.to} is not known to the coordinator; known hosts: ${hostList(hosts)}`);
  await coord.putSpec(spec);
  const placed = await coord.claim(o.job, o.to);
  const agent = await AgentClient.connect(target.agent_address, o);
  try {
    o.onStep?.(`restoring ${o.job} on ${o.to} from checkpoint ${ck.checkpoint}`);
    const job = await agent.restore(o.job, ck.checkpoint, spec, placed.epoch);
    return { job: o.job, from: 'archive', to: o.to, checkpoint: ck.checkpoint, live: false, downtimeMs: 0, totalMs: performance.now() - t0, pid: job.pid };
  } catch (e) {
    await coord.release(o.job, o.to, 'FAILED').catch(() => undefined);
    throw e;
  } finally {
    agent.close();
  }
}

/** Find a host's agent through the coordinator (NOT_FOUND lists the known hosts). */
export async function agentFor(coord: CoordinatorClient, hostId: string, opts: ClientOptions = {}): Promise<AgentClient> {
  const hosts = await coord.listHosts();
  const h = hosts.find((x) => x.host_id === hostId);
  if (!h) throw new ExaError('NOT_FOUND', `host ${hostId} is not known to the coordinator; known hosts: ${hostList(hosts)}`);
  if (h.state !== 'UP') throw new ExaError('UNAVAILABLE', `host ${hostId} is down`);
  return AgentClient.connect(h.agent_address, opts);
}

/** The agent currently running a job. */
export async function agentOfJob(coord: CoordinatorClient, job: string, opts: ClientOptions = {}): Promise<{ agent: AgentClient; placement: Placement }> {
  let placement: Placement;
  try {
    placement = await coord.getPlacement(job);
  } catch (e) {
    if (toExaError(e).code === 'NOT_FOUND') throw new ExaError('NOT_FOUND', `job ${job} does not exist (not known to the coordinator)`);
    throw e;
  }
  if (placement.host_state !== 'UP') throw new ExaError('UNAVAILABLE', `job ${job} was on host ${placement.host_id}, which is down; restore it with exarestore ${job} --to HOST`);
  return { agent: await AgentClient.connect(placement.agent_address, opts), placement };
}
