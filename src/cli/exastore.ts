#!/usr/bin/env -S node --initial-old-space-size=64
/**
 * exastore: the store server and its maintenance commands.
 *
 *   exastore serve --data DIR [--port 7700] [--host 127.0.0.1]
 *   exastore serve --s3 s3://bucket/prefix [--s3-endpoint URL] [--data CACHE_DIR]   (src/s3/cli.ts)
 *   exastore archive JOB --to s3://... | import JOB --from s3://...                   (src/s3/cli.ts)
 *   exastore ls [JOB] | verify [JOB] | gc | compact JOB | stat [JOB] | delete JOB ...
 *
 * Client commands reach the server given by --store (default $EXA_STORE or
 * 127.0.0.1:7700). Every command has --help and --json; long work shows a
 * progress bar on a TTY. Exit codes come from src/errors.ts exitCodeFor().
 */
import { Command, InvalidArgumentError } from 'commander';
import { ExaError, exitCodeFor, toExaError } from '../errors.js';
import { StoreClient } from '../store/client.js';
import { DEFAULT_STORE, fmtBytes, intArg, out, progressBar } from './common.js';
import { startStoreServer } from '../store/server.js';
import { Coordinator } from '../coordinator/service.js';
import { createLogger, logRpcFailuresTo, type LogFormat } from '../log.js';
import { parseListen, registerCoordinator, registerStore, startServiceMetrics } from '../metrics.js';
import { TenantTable } from '../tenants.js';
import { addS3Commands, serveS3, withS3Options, type S3Flags } from '../s3/cli.js';

interface ClientFlags { store: string; json?: boolean; token?: string; tlsCa?: string }

async function withClient<T>(flags: ClientFlags, fn: (c: StoreClient) => Promise<T>): Promise<T> {
  const c = await StoreClient.connect(flags.store, {
    token: flags.token ?? process.env.EXA_TOKEN, tlsCa: flags.tlsCa ?? (process.env.EXA_TLS_CA || undefined), timeoutMs: 5000,
  });
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}

function clientCommand(program: Command, name: string, description: string): Command {
  return program.command(name).description(description)
    .option('--store <addr>', 'store server address (host:port)', DEFAULT_STORE)
    .option('--token <token>', 'bearer token (default $EXA_TOKEN)')
    .option('--tls-ca <pem>', 'connect with TLS, trusting this CA (default $EXA_TLS_CA)')
    .option('--json', 'print one JSON object');
}

export function buildProgram(): Command {
  const program = new Command('exastore')
    .description('exackpt deduplicating checkpoint store: server and maintenance')
    .showHelpAfterError()
    // Before the subcommands are added, so they inherit it: usage errors then
    // reach main() and exit 2, as exitCodeFor() maps INVALID_ARGUMENT.
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });

  withS3Options(program.command('serve'))
    .description('serve the Store gRPC service from a LevelDB data directory (created if missing), or with --s3 from an S3 bucket prefix')
    .option('--data <dir>', 'data directory (with --s3: only the local cache and the coordinator state)')
    .option('--s3 <url>', 'keep pages and manifests in S3 at s3://bucket/prefix (several servers may share one prefix)')
    .option('--port <n>', 'TCP port (0 = ephemeral)', intArg('--port'), 7700)
    .option('--host <addr>', 'address to listen on', '127.0.0.1')
    .option('--gc-grace <seconds>', 'GC grace period: a page found unreferenced is deleted only after this long', intArg('--gc-grace'), 3600)
    .option('--token <token>', 'require this bearer token from clients (default $EXA_TOKEN)')
    .option('--tenants <file>', 'also accept the tenants\' tokens of this YAML file, each reaching only its own jobs (needs --token; see README "Tenants")')
    .option('--tls-cert <pem>', 'serve TLS with this certificate chain (with --tls-key)')
    .option('--tls-key <pem>', 'private key of --tls-cert')
    .option('--down-after <ms>', 'coordinator: a host is shown down after this long without a heartbeat', intArg('--down-after', 100), 3000)
    .option('--metrics-listen <host:port>', 'serve Prometheus metrics on http://HOST:PORT/metrics (port 0 = any; off by default)')
    .option('--log-format <format>', 'log lines on stderr as text or json', 'text')
    .option('--log-level <level>', 'trace, debug, info, warn, error, fatal or silent', 'info')
    .option('--json', 'print the ready line as JSON')
    .action(async (o: S3Flags & { data?: string; s3?: string; port: number; host: string; gcGrace: number; downAfter: number; token?: string; tenants?: string; tlsCert?: string; tlsKey?: string; metricsListen?: string; logFormat: string; logLevel: string; json?: boolean }) => {
      const logger = createLogger('exastore', { format: o.logFormat as LogFormat, level: o.logLevel });
      const token = o.token ?? process.env.EXA_TOKEN;
      if (!o.tlsCert !== !o.tlsKey) throw new ExaError('INVALID_ARGUMENT', '--tls-cert and --tls-key go together');
      const tls = o.tlsCert && o.tlsKey ? { cert: o.tlsCert, key: o.tlsKey } : undefined;
      if (!o.data && !o.s3) throw new ExaError('INVALID_ARGUMENT', 'serve needs --data DIR (LevelDB) or --s3 s3://bucket/prefix');
      if (o.metricsListen) parseListen('--metrics-listen', o.metricsListen);
      const tenants = o.tenants ? TenantTable.load(o.tenants) : undefined;
      tenants?.checkClusterToken(token);
      // With --s3, pages and manifests live in the bucket; --data holds only the local cache (src/s3/cli.ts).
      const s = o.s3
        ? await serveS3({ ...o, s3: o.s3, gcGraceMs: o.gcGrace * 1000, ...(token ? { token } : {}), tls, tenants })
        : await startStoreServer({ dataDir: o.data!, host: o.host, port: o.port, gcGraceMs: o.gcGrace * 1000, token, tls, tenants });
      // The coordinator (host registry, placement, job specs) is served next to the store.
      const coordinator = new Coordinator({ dataDir: o.data ?? null, heartbeatMs: Math.max(50, Math.round(o.downAfter / 3)), missedBeats: 3 });
      coordinator.addTo(s.server, { token, tenants });
      // What /metrics shows besides the gRPC calls (src/metrics.ts).
      registerStore(s.store.backend);
      registerCoordinator({
        hostStates: () => coordinator.registry.listHosts().map((h) => h.state),
        jobStates: () => coordinator.registry.listJobs().map((j) => j.state),
      });
      const metrics = await startServiceMetrics(o.metricsListen, () => s.close());
      const metricsUrl = metrics ? `http://${metrics.address}/metrics` : null;
      logRpcFailuresTo(logger);
      // The ready line: tests and scripts wait for it (and probe the port).
      const where = o.s3 ? `s3 ${o.s3}${o.data ? `, cache ${o.data}` : ''}` : `data ${o.data}`;
      out(o.json, { listening: s.address, data: o.data ?? null, s3: o.s3 ?? null, pid: process.pid, metrics: metricsUrl },
        () => `exastore listening on ${s.address} (${where}, pid ${process.pid})${metricsUrl ? `, metrics on ${metricsUrl}` : ''}`);
      let stopping = false;
      const stop = (sig: string): void => {
        if (stopping) return;
        stopping = true;
        logger.info({ signal: sig }, `${sig}, shutting down`);
        Promise.all([s.close(), metrics?.close()]).then(() => process.exit(0), () => process.exit(1));
      };
      process.on('SIGTERM', () => stop('SIGTERM'));
      process.on('SIGINT', () => stop('SIGINT'));
    });

  clientCommand(program, 'ls [job]', 'list jobs, or the checkpoints of one job')
    .action(async (job: string | undefined, o: ClientFlags) => withClient(o, async (c) => {
      if (job) {
        const cps = await c.listCheckpoints(job);
        out(o.json, { job, checkpoints: cps }, () => [
          `job ${job}: ${cps.length} checkpoints`,
          ...cps.map((k) => `  #${String(k.checkpoint).padEnd(5)} parent ${String(k.parent || '-').padEnd(5)} ${k.createdAt}  image ${fmtBytes(k.logicalBytes).padStart(10)}  changed ${k.changedPages} pages, new ${k.newPages}`),
        ].join('\n'));
      } else {
        const jobs = await c.listJobs();
        out(o.json, { jobs }, () => (jobs.length === 0 ? 'no jobs' : jobs.map((j) => `${j.job.padEnd(24)} ${String(j.checkpoints).padStart(5)} checkpoints  latest #${j.latest} at ${j.latestAt}  image ${fmtBytes(j.logicalBytes)}`).join('\n')));
      }
    }));

  clientCommand(program, 'verify [job]', 'read back every page of every checkpoint (or of one job) and check it against its hash')
    .option('--checkpoint <n>', 'only this checkpoint', intArg('--checkpoint', 1))
    .option('--all-pages', 'also check stored pages that no checkpoint references')
    .action(async (job: string | undefined, o: ClientFlags & { checkpoint?: number; allPages?: boolean }) => withClient(o, async (c) => {
      const pb = progressBar(o.json);
      const r = await c.verify({ ...(job ? { job } : {}), ...(o.checkpoint ? { checkpoint: o.checkpoint } : {}), allPages: !!o.allPages }, pb.onProgress).finally(pb.stop);
      out(o.json, r, () => [
        `${r.ok ? 'OK' : 'PROBLEMS'}: ${r.checkpoints} checkpoints, ${r.pagesChecked} pages checked, ${r.problems.length} problems`,
        ...r.problems.map((p) => `  ${p.kind}: ${p.message}`),
      ].join('\n'));
      if (!r.ok) throw new ExaError('CORRUPT', `verify found ${r.problems.length} problems${r.problems[0] ? `; first: ${r.problems[0].message}` : ''}`);
    }));

  clientCommand(program, 'gc', 'collect pages no checkpoint references (two phases with a grace period; safe while uploads run)')
    .option('--grace <seconds>', "grace period for this run (default: the server's)", intArg('--grace'))
    .option('--dry-run', 'report only')
    .action(async (o: ClientFlags & { grace?: number; dryRun?: boolean }) => withClient(o, async (c) => {
      const pb = progressBar(o.json);
      const r = await c.gc({ ...(o.grace !== undefined ? { graceSeconds: o.grace } : {}), dryRun: !!o.dryRun }, pb.onProgress).finally(pb.stop);
      out(o.json, r, () => `gc${o.dryRun ? ' (dry run)' : ''}: ${r.livePages} live pages, ${r.markedPages} newly marked, ${r.revivedPages} revived, ${r.deletedPages} deleted (${fmtBytes(r.reclaimedBytes)}), ${r.pendingPages} waiting for the grace period`);
    }));

  clientCommand(program, 'compact <job>', "check every page of a job's checkpoints, rewrite the latest checkpoint's pages in image order (its restores then read long runs) and reclaim space")
    .action(async (job: string, o: ClientFlags) => withClient(o, async (c) => {
      const pb = progressBar(o.json);
      const r = await c.compact(job, pb.onProgress).finally(pb.stop);
      out(o.json, r, () => `compacted job ${r.job}: ${r.checkpoints} checkpoints checked, ${r.pagesMoved} pages rewritten in image order, ${r.refsUpdated} page refs updated`);
    }));

  clientCommand(program, 'stat [job]', 'logical bytes, stored bytes and dedup ratio, per job and overall')
    .action(async (job: string | undefined, o: ClientFlags) => withClient(o, async (c) => {
      const s = await c.stat(job);
      out(o.json, s, () => [
        `store: ${fmtBytes(s.logicalBytes)} logical, ${fmtBytes(s.storedBytes)} stored in ${s.storedPages} pages (+${fmtBytes(s.metadataBytes)} manifests), dedup ratio ${s.dedupRatio.toFixed(2)}, ${s.pendingGcPages} pages marked for GC`,
        ...s.jobs.map((j) => `  ${j.job.padEnd(24)} ${String(j.checkpoints).padStart(5)} checkpoints  logical ${fmtBytes(j.logicalBytes).padStart(10)}  sent ${fmtBytes(j.sentBytes).padStart(10)}  stored ${fmtBytes(j.storedBytes).padStart(10)}  dedup ${j.dedupRatio.toFixed(2)}`),
      ].join('\n'));
    }));

  clientCommand(program, 'delete <job> [checkpoints...]', 'delete checkpoints of a job, explicitly or by retention policy (pages go at the next gc)')
    .option('--keep-last <k>', 'keep the K newest', intArg('--keep-last', 1))
    .option('--keep-every <n>', 'also keep every checkpoint whose number is a multiple of N', intArg('--keep-every', 1))
    .option('--dry-run', 'report only')
    .action(async (job: string, nums: string[], o: ClientFlags & { keepLast?: number; keepEvery?: number; dryRun?: boolean }) => withClient(o, async (c) => {
      const checkpoints = nums.map((n) => intArg('checkpoint', 1)(n));
      const r = await c.deleteCheckpoints(job, { checkpoints, keepLast: o.keepLast ?? 0, keepEvery: o.keepEvery ?? 0, dryRun: !!o.dryRun });
      out(o.json, r, () => `job ${job}: ${o.dryRun ? 'would delete' : 'deleted'} ${r.deleted.join(', ') || 'nothing'}; kept ${r.kept.join(', ') || 'nothing'}`);
    }));

  // archive / import: S3 archival of job state (src/s3/cli.ts).
  addS3Commands(program);

  return program;
}

async function main(): Promise<void> {
  const program = buildProgram();
  try {
    await program.parseAsync(process.argv);
  } catch (e) {
    const ce = e as { code?: string; exitCode?: number };
    if (typeof ce.code === 'string' && ce.code.startsWith('commander.')) {
      // --help / --version exit 0; usage errors were already printed by commander.
      process.exit(ce.exitCode === 0 ? 0 : 2);
    }
    const x = toExaError(e);
    const json = process.argv.includes('--json');
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: x.code, message: x.message } })}\n`);
    process.stderr.write(`exastore: ${x.message}\n`);
    process.exit(exitCodeFor(x));
  }
}

void main();
