/**
 * `npm start`: the embedded demo. An exastore (LevelDB in a temporary
 * directory) with its coordinator, two agents (host-a, host-b), and the C
 * heat-diffusion job: three live checkpoints on host-a, a live migration to
 * host-b, the job finishes there, and its checksum is compared with an
 * uninterrupted run. Then RDMA API remoting: the C halo-exchange demo as two
 * jobs on host-a and host-b writing into each other's DMA buffers every
 * iteration over the agents' TCP data path; one rank migrates to host-b
 * mid-run (transfers to it are held and complete on the new host) and both
 * ranks' checksums are compared with a single-process run. Everything it
 * starts is stopped on exit, even on Ctrl-C.
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { nativeBuildDir, repoRoot } from './native.js';
import { CoordinatorClient } from './coordinator/client.js';
import { AgentClient } from './hostagent/client.js';
import { migrate, agentFor } from './ops/migrate.js';
import { StoreClient } from './store/client.js';
import { fmtBytes } from './cli/common.js';
import { startLocalCluster, type LocalCluster } from './ops/local-cluster.js';

const HEAT = join(nativeBuildDir, 'exa_heat');
const ARGS = ['--n', '512', '--steps', '600', '--step-delay-us', '5000'];
const HALO = join(nativeBuildDir, 'exa_halo');
const HALO_ARGS = ['--n', '8192', '--iters', '1500', '--step-delay-us', '2000'];

let cluster: LocalCluster | null = null;
const t0 = Date.now();

function say(line: string): void {
  process.stdout.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${line}\n`);
}

function cleanup(): void {
  cluster?.stop();
}

async function main(): Promise<number> {
  say(`uninterrupted reference run: ${HEAT} ${ARGS.join(' ')} --no-agent`);
  const reference = /checksum=([0-9a-f]{16})/.exec(execFileSync(HEAT, [...ARGS, '--no-agent'], { encoding: 'utf8' }))![1]!;
  say(`reference checksum ${reference}`);

  cluster = await startLocalCluster(['host-a', 'host-b']);
  const storeAddr = cluster.storeAddress;
  say(`store + coordinator serving on ${storeAddr} (LevelDB in ${cluster.dataDir})`);
  for (const a of cluster.agents) say(`agent ${a.host} ready on ${a.address}`);

  const coord = await CoordinatorClient.connect(storeAddr);
  const job = 'heat-demo';
  const agentA = await agentFor(coord, 'host-a');
  const started = await agentA.run({ job, argv: [HEAT, ...ARGS], cwd: repoRoot, env: { PATH: process.env.PATH ?? '/usr/bin:/bin' }, everyMs: 0, keep: 0 });
  say(`job ${job} started on host-a (pid ${started.pid}): 2-D heat diffusion, 512x512 grid, 600 steps`);
  for (let k = 0; k < 50 && (await agentA.list()).find((j) => j.job === job)?.state !== 'RUNNING'; k++) await new Promise((r) => setTimeout(r, 100));

  for (let i = 1; i <= 3; i++) {
    await new Promise((r) => setTimeout(r, 400));
    const s = await agentA.checkpoint(job, false);
    say(`live checkpoint ${s.checkpoint}: pause ${s.pause_ms.toFixed(2)} ms, ${Number(s.pages_saved)} pages saved (${Number(s.zero_pages)} zero), ${fmtBytes(Number(s.bytes_sent))} new in the store, committed in ${s.total_ms.toFixed(0)} ms`);
  }
  agentA.close();

  say('migrating heat-demo to host-b (exarestore heat-demo --to host-b)');
  const r = await migrate(coord, { job, to: 'host-b', onStep: (l) => say(`  ${l}`) });
  say(`migrated at checkpoint ${r.checkpoint}: downtime ${r.downtimeMs.toFixed(0)} ms`);

  const agentB = await AgentClient.connect((await coord.listHosts()).find((h) => h.host_id === 'host-b')!.agent_address);
  let checksum = '';
  for (;;) {
    const j = (await agentB.list()).find((x) => x.job === job);
    if (j && (j.state === 'FINISHED' || j.state === 'FAILED')) {
      const restored = /restored at step (\d+)/.exec(j.output_tail);
      if (restored) say(`job resumed on host-b at step ${restored[1]}`);
      checksum = /checksum=([0-9a-f]{16})/.exec(j.output_tail)?.[1] ?? '';
      say(`job ${j.state.toLowerCase()} on host-b (exit ${j.exit_code})`);
      break;
    }
    await new Promise((res) => setTimeout(res, 200));
  }
  agentB.close();
  const st = await StoreClient.connect(storeAddr);
  const stat = await st.stat();
  st.close();
  say(`store: ${stat.jobs.reduce((a, j) => a + j.checkpoints, 0)} checkpoints, ${fmtBytes(stat.logicalBytes)} logical, ${fmtBytes(stat.storedBytes)} stored, dedup ${stat.dedupRatio.toFixed(2)}x`);
  const heatOk = checksum === reference;
  say(heatOk ? `heat: the migrated run's checksum ${checksum} equals the uninterrupted run's` : `heat: migrated checksum ${checksum || '(none)'} != uninterrupted ${reference}`);

  const haloOk = await haloDemo(coord);
  coord.close();
  const ok = heatOk && haloOk;
  say(ok
    ? 'VERDICT: PASS: migrated runs (heat, and the DMA halo exchange across two hosts) end with the uninterrupted runs\' checksums'
    : `VERDICT: FAIL:${heatOk ? '' : ' heat checksum differs;'}${haloOk ? '' : ' halo checksums differ'}`);
  return ok ? 0 : 1;
}

/** RDMA remoting across hosts and a migration: the halo exchange, rank 0 moved mid-run. */
async function haloDemo(coord: CoordinatorClient): Promise<boolean> {
  const want = execFileSync(HALO, ['--reference', ...HALO_ARGS], { encoding: 'utf8' }).trim().split('\n');
  say(`halo exchange: single-process reference ${want.join(', ')}`);
  const env = { PATH: process.env.PATH ?? '/usr/bin:/bin' };
  const agents = new Map<string, AgentClient>();
  for (const h of ['host-a', 'host-b']) agents.set(h, await agentFor(coord, h));
  for (const [rank, host] of [[0, 'host-a'], [1, 'host-b']] as const) {
    const j = await agents.get(host)!.run({ job: `halo${rank}`, argv: [HALO, '--rank', String(rank), '--peer', `halo${1 - rank}`, ...HALO_ARGS], cwd: repoRoot, env, everyMs: 0, keep: 0 });
    say(`job halo${rank} started on ${host} (pid ${j.pid}): half of a 1-D grid, edges written into the peer's DMA buffer every iteration`);
  }
  await new Promise((r) => setTimeout(r, 1000));
  say('migrating halo0 to host-b while both ranks exchange halos (its peer\'s transfers are held, then complete there)');
  const r = await migrate(coord, { job: 'halo0', to: 'host-b', onStep: (l) => say(`  ${l}`) });
  say(`halo0 migrated at checkpoint ${r.checkpoint}: downtime ${r.downtimeMs.toFixed(0)} ms`);
  const got: string[] = [];
  for (const job of ['halo0', 'halo1']) {
    for (;;) {
      const j = (await agents.get('host-b')!.list()).find((x) => x.job === job);
      if (j && (j.state === 'FINISHED' || j.state === 'FAILED')) {
        const resumed = /restored at iteration (\d+)/.exec(j.output_tail);
        if (resumed) say(`${job} resumed on host-b at iteration ${resumed[1]}`);
        got.push(/checksum \d [0-9a-f]{16}/.exec(j.output_tail)?.[0] ?? `${job} ${j.state.toLowerCase()}: ${j.output_tail.trim().split('\n').pop() ?? ''}`);
        break;
      }
      await new Promise((res) => setTimeout(res, 200));
    }
  }
  for (const a of agents.values()) a.close();
  const ok = got.join() === want.join();
  say(`halo exchange: ${got.join(', ')} ${ok ? '(equal to the reference)' : '(DIFFERENT from the reference)'}`);
  return ok;
}

process.once('SIGINT', () => { cleanup(); process.exit(130); });
main().then((code) => { cleanup(); process.exit(code); }, (e: unknown) => {
  say(`VERDICT: FAIL: ${e instanceof Error ? e.message : String(e)}`);
  cleanup();
  process.exit(1);
});
