#!/usr/bin/env -S node --initial-old-space-size=64
/**
 * exackpt: run jobs under an agent and manage their checkpoints.
 *
 *   exackpt run --agent HOST [--every 10s] [--keep N] [--job ID] [--env K=V ...] -- CMD ARGS
 *   exackpt checkpoint JOB
 *   exackpt ls [JOB]
 *   exackpt stop JOB [--checkpoint]
 *   exackpt hosts
 */
import { Command } from 'commander';
import { ExaError, toExaError } from '../errors.js';
import { CoordinatorClient } from '../coordinator/client.js';
import { StoreClient } from '../store/client.js';
import { agentFor, agentOfJob } from '../ops/migrate.js';
import { checkId } from '../coordinator/registry.js';
import { DEFAULT_STORE, durationArg, fmtBytes, intArg, out, progressBar, runCli } from './common.js';

interface Common { store: string; json?: boolean; token?: string }

/** Environment variables passed to a job unless --no-default-env. */
const DEFAULT_ENV = ['PATH', 'HOME', 'LANG', 'LC_ALL', 'TZ', 'USER'];

async function withCoord<T>(o: Common, fn: (c: CoordinatorClient) => Promise<T>): Promise<T> {
  const c = await CoordinatorClient.connect(o.store, { token: o.token ?? process.env.EXA_TOKEN, timeoutMs: 5000 });
  try { return await fn(c); } finally { c.close(); }
}

function common(cmd: Command): Command {
  return cmd
    .option('--store <addr>', 'store/coordinator address (host:port)', DEFAULT_STORE)
    .option('--token <token>', 'bearer token (default $EXA_TOKEN)')
    .option('--json', 'print one JSON object');
}

export function buildProgram(): Command {
  // exitOverride before the subcommands are added, so they inherit it (usage errors exit 2).
  const program = new Command('exackpt').exitOverride().description('run jobs under exa agents and manage their live checkpoints');

  common(program.command('run'))
    .description('launch CMD ARGS as a job on a host\'s agent, with live checkpoints')
    .requiredOption('--agent <host>', 'host id of the agent that runs the job')
    .option('--every <duration>', 'periodic checkpoint interval (e.g. 10s); none by default', durationArg('--every'))
    .option('--keep <n>', 'keep only the last N checkpoints', intArg('--keep', 1))
    .option('--job <id>', 'job id (default: <command>-<n>)')
    .option('--cwd <dir>', 'working directory on the agent\'s host', process.cwd())
    .option('--env <K=V>', 'environment variable for the job (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--no-default-env', `do not pass ${DEFAULT_ENV.join(', ')} from this shell`)
    .argument('<cmd...>', 'the command (after --)')
    .action(async (cmd: string[], o: Common & { agent: string; every?: number; keep?: number; job?: string; cwd: string; env?: string[]; defaultEnv: boolean }) => {
      if (o.job) checkId('job', o.job);
      const env: Record<string, string> = {};
      if (o.defaultEnv) for (const k of DEFAULT_ENV) if (process.env[k] !== undefined) env[k] = process.env[k]!;
      for (const kv of o.env ?? []) {
        const i = kv.indexOf('=');
        if (i <= 0) throw new ExaError('INVALID_ARGUMENT', `--env ${JSON.stringify(kv)} is not K=V`);
        env[kv.slice(0, i)] = kv.slice(i + 1);
      }
      await withCoord(o, async (coord) => {
        const agent = await agentFor(coord, o.agent, o);
        try {
          const j = await agent.run({ job: o.job ?? '', argv: cmd, cwd: o.cwd, env, everyMs: o.every ?? 0, keep: o.keep ?? 0 });
          out(o.json, j, () => `job ${j.job} running on ${j.host_id} (pid ${j.pid})${o.every ? `, checkpoint every ${o.every / 1000} s` : ''}`);
        } finally { agent.close(); }
      });
    });

  common(program.command('checkpoint'))
    .description('take a live checkpoint of a job now; returns once the store committed it')
    .argument('<job>')
    .action(async (job: string, o: Common) => {
      checkId('job', job);
      await withCoord(o, async (coord) => {
        const { agent, placement } = await agentOfJob(coord, job, o);
        const bar = progressBar(o.json);
        try {
          const s = await agent.checkpoint(job, false, bar.onProgress);
          bar.stop();
          out(o.json, { job, host: placement.host_id, ...s }, () =>
            `checkpoint ${s.checkpoint} of ${job} committed: ${Number(s.pages_saved)} pages saved, ${fmtBytes(Number(s.bytes_sent))} new in the store, pause ${s.pause_ms.toFixed(2)} ms, total ${s.total_ms.toFixed(0)} ms`);
        } finally { bar.stop(); agent.close(); }
      });
    });

  common(program.command('ls'))
    .description('jobs, where they run, their chains, sizes and dedup ratio')
    .argument('[job]')
    .action(async (job: string | undefined, o: Common) => {
      if (job) checkId('job', job);
      await withCoord(o, async (coord) => {
        const placements = (await coord.listPlacements()).filter((p) => !job || p.job === job);
        const store = await StoreClient.connect(o.store, { token: o.token ?? process.env.EXA_TOKEN, timeoutMs: 5000 });
        try {
          // A job that runs but has no checkpoint yet is listed too (the store does not know it).
          const stat = await store.stat(job).catch((e: unknown) => {
            if (job && toExaError(e).code === 'NOT_FOUND' && placements.length > 0) return { jobs: [] };
            throw e;
          });
          const jobs = new Map(stat.jobs.map((s) => [s.job, s]));
          const names = [...new Set([...placements.map((p) => p.job), ...jobs.keys()])].filter((n) => !job || n === job).sort();
          if (job && names.length === 0) throw new ExaError('NOT_FOUND', `job ${job} does not exist`);
          const rows = names.map((n) => {
            const p = placements.find((x) => x.job === n);
            const s = jobs.get(n);
            return {
              job: n, host: p?.host_id ?? '', state: p ? p.state : 'ARCHIVED', hostState: p?.host_state ?? '',
              lastCheckpoint: p?.last_checkpoint ?? 0, checkpoints: s?.checkpoints ?? 0,
              logicalBytes: s?.logicalBytes ?? 0, storedBytes: s?.storedBytes ?? 0, dedupRatio: s?.dedupRatio ?? 0,
              dmaBuffers: (p?.dma_buffers ?? []).map((b) => ({ name: b.name, size: Number(b.size), grants: b.grants.map((g) => ({ peer: g.peer, perms: g.perms })) })),
            };
          });
          out(o.json, { jobs: rows }, () => rows.length === 0 ? 'no jobs' : [
            'JOB                  HOST        STATE      CKPTS  IMAGE       STORED      DEDUP',
            ...rows.flatMap((r) => [
              `${r.job.padEnd(20)} ${(r.host + (r.hostState === 'DOWN' ? '!' : '')).padEnd(11)} ${r.state.padEnd(10)} ${String(r.checkpoints).padStart(5)}  ${fmtBytes(r.logicalBytes).padEnd(11)} ${fmtBytes(r.storedBytes).padEnd(11)} ${r.dedupRatio.toFixed(2)}x`,
              // its DMA session: buffers on that host and who may write (w) / read (r) them
              ...r.dmaBuffers.map((b) => `  dma ${b.name} (${fmtBytes(b.size)})${b.grants.length ? ': ' + b.grants.map((g) => `${g.peer}:${g.perms & 1 ? 'r' : ''}${g.perms & 2 ? 'w' : ''}`).join(' ') : ''}`),
            ]),
          ].join('\n'));
        } finally { store.close(); }
      });
    });

  common(program.command('stop'))
    .description('stop a job (optionally after a last checkpoint)')
    .argument('<job>')
    .option('--checkpoint', 'take a checkpoint first')
    .action(async (job: string, o: Common & { checkpoint?: boolean }) => {
      checkId('job', job);
      await withCoord(o, async (coord) => {
        const { agent } = await agentOfJob(coord, job, o);
        try {
          const j = await agent.stop(job, o.checkpoint ?? false);
          out(o.json, j, () => `job ${job} stopped on ${j.host_id}${j.last_checkpoint ? ` (last checkpoint ${j.last_checkpoint})` : ''}`);
        } finally { agent.close(); }
      });
    });

  common(program.command('hosts'))
    .description('registered hosts and their state')
    .action(async (o: Common) => {
      await withCoord(o, async (coord) => {
        const hosts = await coord.listHosts();
        out(o.json, { hosts }, () => hosts.length === 0 ? 'no hosts registered' : ['HOST             STATE AGENT                  DMA                    JOBS', ...hosts.map((h) => `${h.host_id.padEnd(16)} ${h.state.padEnd(5)} ${h.agent_address.padEnd(22)} ${(h.dma_address || '-').padEnd(22)} ${h.jobs.join(',')}`)].join('\n'));
      });
    });

  return program;
}

void runCli('exackpt', async () => { await buildProgram().parseAsync(process.argv); });
