/**
 * Benchmark `migrate`: downtime of `exarestore JOB --to HOST` for a job with
 * 1 GiB of regions of which ~1% were written since its last periodic
 * checkpoint, against a full stop-and-copy move of the same job in the same
 * run (no pre-staging, the final checkpoint saves and the target restores
 * every page while the job is stopped).
 *
 * Downtime = from the start of the final checkpoint (the job is stopped at
 * its pause) to the job attached again on the target with its restored
 * regions (the target agent's Restore call returns only then).
 *
 * Options: --mib N (default 1024), --dirty-pct P (default 1), --rounds R (default 2).
 */
import { join } from 'node:path';
import { nativeBuildDir, repoRoot } from '../src/native.js';
import { startLocalCluster } from '../src/ops/local-cluster.js';
import { CoordinatorClient } from '../src/coordinator/client.js';
import { AgentClient } from '../src/hostagent/client.js';
import { migrate } from '../src/ops/migrate.js';

function opt(args: string[], name: string, def: number): number {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : def;
}

async function waitState(agent: AgentClient, job: string, pattern: RegExp, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const j = (await agent.list()).find((x) => x.job === job);
    if (j && j.state === 'RUNNING' && pattern.test(j.output_tail)) return;
    if (j && (j.state === 'FAILED' || j.state === 'FINISHED')) throw new Error(`job ${job} ${j.state}: ${j.output_tail}`);
    if (Date.now() > deadline) throw new Error(`job ${job} not ready: ${j?.output_tail ?? 'unknown'}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function run(args: string[], log: (line: string) => void): Promise<Record<string, unknown>> {
  const mib = opt(args, '--mib', 1024);
  const dirtyPct = opt(args, '--dirty-pct', 1);
  const rounds = opt(args, '--rounds', 2);
  const pages = (mib * 1024 * 1024) / 4096;
  const rate = Math.round((pages * dirtyPct) / 100); // pages per second: ~dirtyPct % in the second before the move
  const cluster = await startLocalCluster(['host-a', 'host-b']);
  try {
    const coord = await CoordinatorClient.connect(cluster.storeAddress);
    const agents = new Map(cluster.agents.map((a) => [a.host, a.address]));
    const client = async (h: string) => AgentClient.connect(agents.get(h)!);
    const job = 'memjob-bench';
    const a = await client('host-a');
    await a.run({ job, argv: [join(nativeBuildDir, 'exa_memjob'), '--mib', String(mib), '--pages-per-sec', String(rate)], cwd: repoRoot, env: {}, everyMs: 0, keep: 0 });
    await waitState(a, job, /memjob: filled/);
    log(`memjob: ${mib} MiB region filled; rewriting ${rate} random pages/s (~${dirtyPct}% per second)`);
    a.close();
    const pre: number[] = [];
    const full: number[] = [];
    let host = 'host-a';
    for (let r = 0; r < rounds; r++) {
      for (const mode of ['precopy', 'stopcopy'] as const) {
        const src = await client(host);
        // The periodic checkpoint the move starts from, then ~1 s of writes (~dirtyPct % of pages).
        const base = await src.checkpoint(job, false);
        src.close();
        await new Promise((res) => setTimeout(res, 1000));
        const to = host === 'host-a' ? 'host-b' : 'host-a';
        const m = await migrate(coord, { job, to, stopAndCopy: mode === 'stopcopy' });
        (mode === 'precopy' ? pre : full).push(m.downtimeMs);
        log(`round ${r + 1} ${mode.padEnd(8)} ${host} -> ${to}: base checkpoint ${base.checkpoint} (${Number(base.pages_saved)} pages), downtime ${m.downtimeMs.toFixed(0)} ms`);
        host = to;
        const t = await client(host);
        await waitState(t, job, /memjob: restored/);
        t.close();
      }
    }
    coord.close();
    const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
    const downtime = median(pre);
    const stopcopy = median(full);
    return {
      mib, dirty_pct: dirtyPct, rounds,
      downtime_ms: Math.round(downtime), stopcopy_downtime_ms: Math.round(stopcopy),
      downtime_ratio: Number((downtime / stopcopy).toFixed(3)),
      downtime_ms_all: pre.map(Math.round), stopcopy_downtime_ms_all: full.map(Math.round),
    };
  } finally {
    cluster.stop();
  }
}
