/**
 * `npm start`: the embedded demo. An exastore (LevelDB in a temporary
 * directory) with its coordinator, two agents (host-a, host-b), and the C
 * heat-diffusion job: three live checkpoints on host-a, a live migration to
 * host-b, the job finishes there, and its checksum is compared with an
 * uninterrupted run. Everything it starts is stopped on exit, even on Ctrl-C.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from './native.js';
import { CoordinatorClient } from './coordinator/client.js';
import { AgentClient } from './hostagent/client.js';
import { migrate, agentFor } from './ops/migrate.js';
import { StoreClient } from './store/client.js';
import { fmtBytes } from './cli/common.js';

const HEAT = join(repoRoot, 'build', 'Release', 'exa_heat');
const CLI = (n: string): string => join(repoRoot, 'dist', 'src', 'cli', `${n}.js`);
const ARGS = ['--n', '512', '--steps', '600', '--step-delay-us', '5000'];

const children: ChildProcess[] = [];
const dirs: string[] = [];
const t0 = Date.now();

function say(line: string): void {
  process.stdout.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${line}\n`);
}

function spawnReady(name: string, args: string[], ready: RegExp): Promise<{ proc: ChildProcess; match: RegExpExecArray }> {
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(proc);
  let out = '';
  return new Promise((resolve, reject) => {
    const on = (d: Buffer): void => {
      out += d.toString();
      const m = ready.exec(out);
      if (m) { proc.stdout!.off('data', on); resolve({ proc, match: m }); }
    };
    proc.stdout!.on('data', on);
    proc.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
    proc.once('exit', (code) => reject(new Error(`${name} exited (${code}) before it was ready:\n${out}`)));
  });
}

function cleanup(): void {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  // Jobs outlive agents by design; the demo's jobs are found by their agent socket.
  for (const d of dirs) {
    const marker = `EXA_AGENT_SOCKET=${join(d, 'agent.sock')}`;
    for (const pid of readdirSync('/proc').filter((x) => /^\d+$/.test(x))) {
      try { if (readFileSync(`/proc/${pid}/environ`, 'latin1').split('\0').includes(marker)) process.kill(Number(pid), 'SIGKILL'); } catch { /* gone */ }
    }
    rmSync(d, { recursive: true, force: true });
  }
}

async function main(): Promise<number> {
  say(`uninterrupted reference run: ${HEAT} ${ARGS.join(' ')} --no-agent`);
  const reference = /checksum=([0-9a-f]{16})/.exec(execFileSync(HEAT, [...ARGS, '--no-agent'], { encoding: 'utf8' }))![1]!;
  say(`reference checksum ${reference}`);

  const data = mkdtempSync(join(tmpdir(), 'exa-demo-store-'));
  dirs.push(data);
  const store = await spawnReady('exastore', [CLI('exastore'), 'serve', '--data', data, '--port', '0'], /listening on (\S+)/);
  const storeAddr = store.match[1]!;
  say(`store + coordinator serving on ${storeAddr} (LevelDB in ${data})`);
  for (const host of ['host-a', 'host-b']) {
    const dir = mkdtempSync(join(tmpdir(), `exa-demo-${host}-`));
    dirs.push(dir);
    const a = await spawnReady(`exaagent ${host}`, [CLI('exaagent'), '--host', host, '--store', storeAddr, '--state-dir', dir, '--heartbeat-ms', '250'], /ready agent=(\S+)/);
    say(`agent ${host} ready on ${a.match[1]}`);
  }

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
  coord.close();
  say(`store: ${stat.jobs.reduce((a, j) => a + j.checkpoints, 0)} checkpoints, ${fmtBytes(stat.logicalBytes)} logical, ${fmtBytes(stat.storedBytes)} stored, dedup ${stat.dedupRatio.toFixed(2)}x`);
  const ok = checksum === reference;
  say(ok
    ? `VERDICT: PASS: the migrated run's checksum ${checksum} equals the uninterrupted run's`
    : `VERDICT: FAIL: migrated checksum ${checksum || '(none)'} != uninterrupted ${reference}`);
  return ok ? 0 : 1;
}

process.once('SIGINT', () => { cleanup(); process.exit(130); });
main().then((code) => { cleanup(); process.exit(code); }, (e: unknown) => {
  say(`VERDICT: FAIL: ${e instanceof Error ? e.message : String(e)}`);
  cleanup();
  process.exit(1);
});
