#!/usr/bin/env node
/**
 * exarestore: restore a job on a host, migrating it live when it runs.
 *
 *   exarestore JOB --to HOST [--at N] [--json]
 */
import { Command } from 'commander';
import { CoordinatorClient } from '../coordinator/client.js';
import { checkId } from '../coordinator/registry.js';
import { migrate } from '../ops/migrate.js';
import { DEFAULT_STORE, intArg, out, progressBar, runCli, say } from './common.js';

export function buildProgram(): Command {
  return new Command('exarestore')
    .exitOverride()
    .description('restore JOB on HOST: a live migration when it runs elsewhere, else from its last committed checkpoint')
    .argument('<job>')
    .requiredOption('--to <host>', 'target host id')
    .option('--at <n>', 'restore checkpoint N instead of the newest', intArg('--at', 1))
    .option('--store <addr>', 'store/coordinator address (host:port)', DEFAULT_STORE)
    .option('--token <token>', 'bearer token (default $EXA_TOKEN)')
    .option('--json', 'print one JSON object')
    .action(async (job: string, o: { to: string; at?: number; store: string; token?: string; json?: boolean }) => {
      checkId('job', job);
      checkId('host', o.to);
      const token = o.token ?? process.env.EXA_TOKEN;
      const coord = await CoordinatorClient.connect(o.store, { ...(token ? { token } : {}), timeoutMs: 5000 });
      const bar = progressBar(o.json);
      try {
        const r = await migrate(coord, {
          job, to: o.to, ...(o.at ? { at: o.at } : {}), ...(token ? { token } : {}),
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
