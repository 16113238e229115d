#!/usr/bin/env -S node --initial-old-space-size=64
/**
 * exaagent: the per-host agent.
 *
 *   exaagent --store ADDR --host ID [--listen HOST:PORT] [--state-dir DIR] [--staging DIR]
 *            [--metrics-listen HOST:PORT] [--log-format text|json] [--log-level info]
 *
 * Prints "exaagent <host> ready agent=<addr> socket=<path>" on stdout once it
 * serves; stops cleanly on SIGINT/SIGTERM (jobs keep running untracked).
 */
import { Command } from 'commander';
import { chmodSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HostAgent, splitHostPort } from '../hostagent/daemon.js';
import { NativeCheckpointer } from '../hostagent/native-port.js';
import { createLogger, logRpcFailuresTo, type LogFormat } from '../log.js';
import { parseListen, startServiceMetrics } from '../metrics.js';
import { DEFAULT_STORE, intArg, runCli } from './common.js';
import { agentTenants, TenantTable } from '../tenants.js';

export function buildProgram(): Command {
  return new Command('exaagent')
    .exitOverride()
    .description('per-host agent: runs jobs under the live checkpointer, streams checkpoints to the store, restores jobs')
    .requiredOption('--host <id>', 'this host\'s id, as the coordinator shows it')
    .option('--store <addr>', 'store/coordinator address (host:port)', DEFAULT_STORE)
    .option('--listen <host:port>', 'address of the Agent gRPC service', '127.0.0.1:0')
    .option('--advertise <host:port>', 'address others use to reach this agent (default: the bound --listen address)')
    .option('--state-dir <dir>', 'socket, job logs (default: $TMPDIR/exa-agent-<host>)')
    .option('--staging <dir>', 'directory for restore tables (EXA_RESTORE; the images themselves are memfds held by the agent)', '/dev/shm')
    .option('--allow-uid <uid...>', 'uids allowed to attach besides this user and root', (v, prev: number[] = []) => [...prev, intArg('--allow-uid')(v)])
    .option('--tenants <file>', 'tenants file (YAML, see README "Tenants"): its tenants\' uids may attach, each only as its tenant\'s jobs')
    .option('--heartbeat-ms <ms>', 'heartbeat period', intArg('--heartbeat-ms', 100), 1000)
    .option('--token <token>', 'bearer token for the store and for callers (default $EXA_TOKEN)')
    .option('--dma-listen <host:port>', 'TCP address of the DMA data path between agents (RDMA remoting; default: the --listen host, any port)')
    .option('--dma-advertise <host:port>', 'DMA data address other agents use (default: the bound --dma-listen address; a 0.0.0.0 bind takes the --advertise host)')
    .option('--no-dma', 'run without a DMA backend (jobs cannot use exa_dma_*)')
    .option('--metrics-listen <host:port>', 'serve Prometheus metrics on http://HOST:PORT/metrics (port 0 = any; off by default)')
    .option('--log-format <format>', 'log lines on stderr as text or json', 'text')
    .option('--log-level <level>', 'trace, debug, info, warn, error, fatal or silent', 'info')
    .action(async (o: { host: string; store: string; listen: string; advertise?: string; stateDir?: string; staging: string; allowUid?: number[]; tenants?: string; heartbeatMs: number; token?: string; dmaListen?: string; dmaAdvertise?: string; dma: boolean; metricsListen?: string; logFormat: string; logLevel: string }) => {
      const logger = createLogger('exaagent', { format: o.logFormat as LogFormat, level: o.logLevel });
      const stateDir = o.stateDir ?? join(tmpdir(), `exa-agent-${o.host}`);
      const tenants = o.tenants ? agentTenants(TenantTable.load(o.tenants)) : [];
      // Other users' processes may attach (--allow-uid, --tenants): the socket must be reachable by them; the agent
      // then admits or refuses each peer by its SO_PEERCRED uid. Otherwise only this user can reach it.
      const shared = (o.allowUid?.length ?? 0) > 0 || tenants.length > 0;
      // The checkpointer binds its socket in stateDir at once: create it first.
      mkdirSync(stateDir, { recursive: true, mode: shared ? 0o711 : 0o700 });
      if (shared) chmodSync(stateDir, 0o711);
      const token = o.token ?? process.env.EXA_TOKEN;
      const dmaListen = o.dma ? o.dmaListen ?? `${splitHostPort(o.listen)[0]}:0` : false;
      if (typeof dmaListen === 'string') splitHostPort(dmaListen);
      if (o.dmaAdvertise) splitHostPort(o.dmaAdvertise);
      if (o.metricsListen) parseListen('--metrics-listen', o.metricsListen);
      const ckpt = new NativeCheckpointer({
        socketPath: join(stateDir, 'agent.sock'), ...(o.allowUid ? { allowUids: o.allowUid } : {}),
        ...(shared ? { socketMode: 0o666 } : {}), ...(tenants.length ? { tenants } : {}),
        dmaListen, ...(token ? { dmaToken: token } : {}),
        onLog: (line) => logger.warn({ host: o.host, component: 'checkpointer' }, line),
      });
      const agent = new HostAgent({
        hostId: o.host, storeAddress: o.store, listen: o.listen, stateDir, stagingRoot: o.staging,
        heartbeatMs: o.heartbeatMs, ...(o.advertise ? { advertise: o.advertise } : {}), ...(token ? { token } : {}),
        ...(o.dmaAdvertise ? { dmaAdvertise: o.dmaAdvertise } : {}), logger,
      }, ckpt);
      logRpcFailuresTo(logger.child({ host: o.host }));
      await agent.start();
      const metrics = await startServiceMetrics(o.metricsListen, () => agent.close());
      process.stdout.write(`exaagent ${o.host} ready agent=${agent.address} socket=${join(stateDir, 'agent.sock')}${ckpt.dma ? ` dma=${agent.dmaAddress()}` : ''}${metrics ? ` metrics=http://${metrics.address}/metrics` : ''}\n`);
      await new Promise<void>((resolve) => {
        const stop = (): void => { void Promise.all([agent.close(), metrics?.close()]).then(() => resolve(), () => resolve()); };
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
      });
    });
}

void runCli('exaagent', async () => { await buildProgram().parseAsync(process.argv); });
