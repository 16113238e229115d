#!/usr/bin/env -S node --initial-old-space-size=64
/**
 * exarestore: restore a job on a host, migrating it live when it runs.
 *
 *   exarestore JOB --to HOST [--at N] [--json]
 *   exarestore JOB --to HOST --resume-interrupted          (finish a migration whose exarestore died)
 *   exarestore JOB --from s3://bucket/prefix --to HOST [--at N]   (a job archived with exastore archive)
 */
import { Command } from 'commander';
import { CoordinatorClient } from '../coordinator/client.js';
import { checkId } from '../coordinator/registry.js';
import { migrate, restoreImported } from '../ops/migrate.js';
import { StoreClient } from '../store/client.js';
import { importCommand, withS3Options, type S3Flags } from '../s3/cli.js';
import { DEFAULT_STORE, intArg, out, progressBar, runCli, say } from './common.js';
import { ExaError } from '../errors.js';

export function buildProgram(): Command {
  return withS3Options(new Command('exarestore')
    .exitOverride()
    .description('restore JOB on HOST: a live migration when it runs elsewhere, else from its last committed checkpoint')
    .argument('<job>')
    .requiredOption('--to <host>', 'target host id')
    .option('--from <s3url>', 'restore a job archived to S3 (s3://bucket/prefix) on a cluster that has never seen it: its chain is imported into the store first'))
    .option('--at <n>', 'restore checkpoint N instead of the newest', intArg('--at', 1))
    .option('--store <addr>', 'store/coordinator address (host:port)', DEFAULT_STORE)
    .option('--token <token>', 'bearer token (default $EXA_TOKEN)')
    .option('--resume-interrupted', 'finish a migration whose exarestore died (the job shows MIGRATING); never next to a live exarestore of the job')
    .option('--json', 'print one JSON object')
    .action(async (job: string, o: S3Flags & { to: string; at?: number; from?: string; store: string; token?: string; json?: boolean; resumeInterrupted?: boolean }) => {
      checkId('job', job);
      checkId('host', o.to);
      const token = o.token ?? process.env.EXA_TOKEN;
      const coord = await CoordinatorClient.connect(o.store, { ...(token ? { token } : {}), timeoutMs: 5000 });
      const bar = progressBar(o.json);
      try {
        if (o.from) {
          say(o.json, `importing job ${job} from ${o.from} into the store at ${o.store}`);
          const imp = await importCommand(job, { ...o, from: o.from, store: o.store, ...(token ? { token } : {}) }, bar.onProgress);
          bar.stop();
          const mapping = 'mapping' in imp ? imp.mapping : [];
          // --at names the archive's numbering; the store numbered the imported chain anew.
          const at = o.at ? mapping.find(([a]) => a === o.at)?.[1] : undefined;
          if (o.at && at === undefined) throw new ExaError('NOT_FOUND', `checkpoint ${o.at} of job ${job} is not in the archive ${o.from}`);
          const store = await StoreClient.connect(o.store, { ...(token ? { token } : {}), timeoutMs: 5000 });
          try {
            const r = await restoreImported(coord, store, { job, to: o.to, ...(at ? { at } : {}), ...(token ? { token } : {}), onStep: (l) => say(o.json, l) });
            out(o.json, { ...r, imported: mapping.length }, () => `${job} restored on ${r.to} from ${o.from} (checkpoint ${r.checkpoint} after importing ${mapping.length})`);
          } finally { store.close(); }
          return;
        }
        const r = await migrate(coord, {
          job, to: o.to, ...(o.at ? { at: o.at } : {}), ...(token ? { token } : {}), ...(o.resumeInterrupted ? { resumeInterrupted: true } : {}),
          onStep: (l) => { bar.stop(); say(o.json, l); }, onProgress: bar.onProgress,
        });
        bar.stop();
        out(o.json, r, () => `${job} ${r.live ? 'migrated' : 'restored'} from ${r.from} to ${r.to} at checkpoint ${r.checkpoint}${r.live ? `, downtime ${r.downtimeMs.toFixed(0)} ms` : ''}`);
      } finally {
        bar.stop();
        coord.close();
      }
    });
}

void runCli('exarestore', async () => { await buildProgram().parseAsync(process.argv); });
