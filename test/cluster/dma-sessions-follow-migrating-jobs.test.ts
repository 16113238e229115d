/**
 * RDMA API remoting across hosts and migrations, end to end with real
 * processes: `exastore serve` (store + coordinator), several `exaagent`s on
 * loopback, and the C halo-exchange demo (native/demo/halo.c) as two jobs
 * placed on different agents. Each rank writes its edge cell into the
 * other's "halo" DMA buffer every iteration, so a transfer lost, applied
 * twice or applied after the image instant of a migrating rank changes the
 * bits (or hangs the peer, which the demo reports): the printed checksums
 * must equal the single-process reference, with the ranks on two agents,
 * after one rank migrates mid-run, and after both do (one after the other,
 * and at the same time).
 */
import { execFileSync } from 'node:child_process';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { ROOT, cli, jobOn, startAgent, startStore, stopAll, until, type AgentHandle } from './helpers.js';

afterEach(stopAll);

const HALO = join(ROOT, 'build', 'Release', 'exa_halo');
// Long enough (8 s and more) that both ranks still run at the second migration on a loaded machine.
const ARGS = ['--n', '4096', '--iters', '2500', '--step-delay-us', '3000'];

function reference(): string[] {
  return execFileSync(HALO, ['--reference', ...ARGS], { encoding: 'utf8' }).trim().split('\n');
}

async function cluster(hosts: string[]): Promise<{ store: string; agents: Map<string, AgentHandle> }> {
  const store = await startStore();
  const agents = new Map<string, AgentHandle>();
  for (const h of hosts) agents.set(h, await startAgent(h, store.address));
  return { store: store.address, agents };
}

async function runRank(store: string, host: string, rank: 0 | 1): Promise<void> {
  const r = await cli('exackpt', ['run', '--store', store, '--agent', host, '--job', `halo${rank}`, '--', HALO, '--rank', String(rank), '--peer', `halo${1 - rank}`, ...ARGS]);
  expect(r.code, r.stderr).toBe(0);
}

/** Wait until the rank runs on `agent` and has been running a while (mid-run, not at its start). */
async function running(agent: AgentHandle, job: string): Promise<void> {
  await until(`${job} running on ${agent.host}`, async () => ((await jobOn(agent.address, job))?.state === 'RUNNING' ? true : undefined));
  await new Promise((r) => setTimeout(r, 700));
}

async function migrate(store: string, job: string, to: string): Promise<void> {
  const r = await cli('exarestore', [job, '--to', to, '--store', store, '--json']);
  expect(r.code, `${r.stderr}${r.stdout}`).toBe(0);
  const res = JSON.parse(r.stdout.trim().split('\n').pop()!) as { live: boolean; to: string };
  expect(res).toMatchObject({ live: true, to });
}

/** Wait until the coordinator shows the job on `host` with its "halo" DMA buffer granted to its peer for writing. */
async function sessionOn(store: string, job: string, peer: string, host: string): Promise<void> {
  await until(`${job}'s DMA session on ${host} in exackpt ls`, async () => {
    const r = await cli('exackpt', ['ls', job, '--store', store, '--json']);
    if (r.code !== 0) throw new Error(r.stderr);
    const row = (JSON.parse(r.stdout) as { jobs: Array<{ host: string; dmaBuffers: Array<{ name: string; size: number; grants: Array<{ peer: string; perms: number }> }> }> }).jobs[0];
    const halo = row?.dmaBuffers.find((b) => b.name === 'halo');
    return row?.host === host && halo?.size === 4096 && halo.grants.some((g) => g.peer === peer && g.perms === 2) ? true : undefined;
  }, 20_000);
}

/** The rank's "checksum R HEX" line once it finished on `agent` (fails at once if it failed). */
async function checksum(agent: AgentHandle, job: string): Promise<string> {
  return until(`${job} to finish on ${agent.host}`, async () => {
    const j = await jobOn(agent.address, job);
    if (!j || (j.state !== 'FINISHED' && j.state !== 'FAILED')) return undefined;
    const m = /checksum \d [0-9a-f]{16}/.exec(j.output_tail);
    if (j.state === 'FAILED' || !m) throw Object.assign(new Error(`${job} ${j.state} on ${agent.host} (exit ${j.exit_code}): ${j.output_tail}`), { fatal: true });
    return m[0];
  }, 120_000);
}

it('two ranks on two agents exchange halos over the DMA data path and print the reference checksums', async () => {
  const want = reference();
  const { store, agents } = await cluster(['host-a', 'host-b']);
  // every agent registered its DMA data address with the coordinator
  const hosts = await cli('exackpt', ['hosts', '--store', store, '--json']);
  expect(hosts.code, hosts.stderr).toBe(0);
  const listed = (JSON.parse(hosts.stdout) as { hosts: Array<{ host_id: string; dma_address: string }> }).hosts;
  expect(listed.map((h) => h.host_id).sort()).toEqual(['host-a', 'host-b']);
  for (const h of listed) expect(h.dma_address).toMatch(/^127\.0\.0\.1:\d+$/);
  await runRank(store, 'host-a', 0);
  await runRank(store, 'host-b', 1);
  // the coordinator knows each rank's DMA session: its buffer, its grant, its host
  await sessionOn(store, 'halo0', 'halo1', 'host-a');
  await sessionOn(store, 'halo1', 'halo0', 'host-b');
  expect([await checksum(agents.get('host-a')!, 'halo0'), await checksum(agents.get('host-b')!, 'halo1')]).toEqual(want);
});

it('the reference checksums survive migrating one rank mid-run, then the other', async () => {
  const want = reference();
  const { store, agents } = await cluster(['host-a', 'host-b', 'host-c']);
  await runRank(store, 'host-a', 0);
  await runRank(store, 'host-b', 1);
  await running(agents.get('host-a')!, 'halo0');
  await migrate(store, 'halo0', 'host-c'); // still across hosts, the peer's route changes
  await sessionOn(store, 'halo0', 'halo1', 'host-c'); // its buffer and grant moved with it
  await running(agents.get('host-c')!, 'halo0');
  await migrate(store, 'halo1', 'host-c'); // now both on one agent: the local engine
  const a = await checksum(agents.get('host-c')!, 'halo0');
  const b = await checksum(agents.get('host-c')!, 'halo1');
  expect([a, b]).toEqual(want);
  expect((await jobOn(agents.get('host-c')!.address, 'halo0'))?.output_tail).toMatch(/restored at iteration \d+/);
  expect((await jobOn(agents.get('host-a')!.address, 'halo0'))?.state).toBe('STOPPED');
});

it('the reference checksums survive migrating both ranks at the same time (they swap hosts)', async () => {
  const want = reference();
  const { store, agents } = await cluster(['host-a', 'host-b']);
  await runRank(store, 'host-a', 0);
  await runRank(store, 'host-b', 1);
  await running(agents.get('host-a')!, 'halo0');
  await Promise.all([migrate(store, 'halo0', 'host-b'), migrate(store, 'halo1', 'host-a')]);
  expect([await checksum(agents.get('host-b')!, 'halo0'), await checksum(agents.get('host-a')!, 'halo1')]).toEqual(want);
});

it('an agent whose DMA data path listens on all interfaces advertises a reachable address', async () => {
  const store = await startStore();
  const free = await new Promise<number>((res) => { const srv = createServer().listen(0, '127.0.0.1', () => { const p = (srv.address() as AddressInfo).port; srv.close(() => res(p)); }); });
  await startAgent('host-w', store.address, { listen: `0.0.0.0:${free}`, args: ['--advertise', `127.0.0.1:${free}`, '--dma-listen', '0.0.0.0:0'] });
  await startAgent('host-x', store.address, { args: ['--dma-advertise', '127.0.0.1:40999'] });
  const hosts = await cli('exackpt', ['hosts', '--store', store.address, '--json']);
  expect(hosts.code, hosts.stderr).toBe(0);
  const byHost = new Map((JSON.parse(hosts.stdout) as { hosts: Array<{ host_id: string; dma_address: string }> }).hosts.map((h) => [h.host_id, h.dma_address]));
  expect(byHost.get('host-w')).toMatch(/^127\.0\.0\.1:\d+$/);
  expect(byHost.get('host-x')).toBe('127.0.0.1:40999');
  const bad = await cli('exaagent', ['--host', 'host-y', '--store', store.address, '--dma-advertise', 'nowhere']);
  expect(bad.code).not.toBe(0);
  expect(bad.stderr).toMatch(/address "nowhere" is not HOST:PORT/);
});
