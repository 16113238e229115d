/**
 * A whole exa cluster on this machine, as child processes: one `exastore
 * serve` (store + coordinator, LevelDB in a temporary directory) and one
 * `exaagent` per host id. Used by the demo and the benchmarks; the tests have
 * their own fixture with per-test cleanup. stop() kills everything it
 * started, including jobs the agents launched (they outlive a dead agent by
 * design, so they are found by their agent socket), and removes the
 * temporary directories.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../native.js';
import { NODE_FLAGS } from '../node-flags.js';

export interface LocalCluster {
  storeAddress: string;
  dataDir: string;
  agents: { host: string; address: string; stateDir: string }[];
  stop(): void;
}

const cli = (n: string): string => join(repoRoot, 'dist', 'src', 'cli', `${n}.js`);

function spawnReady(children: ChildProcess[], name: string, args: string[], ready: RegExp): Promise<RegExpExecArray> {
  const proc = spawn(process.execPath, [...NODE_FLAGS, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(proc);
  let out = '';
  return new Promise((resolve, reject) => {
    const on = (d: Buffer): void => {
      out += d.toString();
      const m = ready.exec(out);
      if (m) { proc.stdout!.off('data', on); resolve(m); }
    };
    proc.stdout!.on('data', on);
    proc.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
    proc.once('exit', (code) => reject(new Error(`${name} exited (${code}) before it was ready:\n${out}`)));
  });
}

/** Kill every process whose EXA_AGENT_SOCKET is the agent socket in stateDir. */
export function killJobsOf(stateDir: string): void {
  const marker = `EXA_AGENT_SOCKET=${join(stateDir, 'agent.sock')}`;
  for (const pid of readdirSync('/proc').filter((x) => /^\d+$/.test(x))) {
    try {
      if (readFileSync(`/proc/${pid}/environ`, 'latin1').split('\0').includes(marker)) process.kill(Number(pid), 'SIGKILL');
    } catch { /* gone, or not ours */ }
  }
}

export async function startLocalCluster(hosts: string[], opts: { heartbeatMs?: number } = {}): Promise<LocalCluster> {
  const children: ChildProcess[] = [];
  const dirs: string[] = [];
  const agents: LocalCluster['agents'] = [];
  const stop = (): void => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    for (const a of agents) killJobsOf(a.stateDir);
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  };
  try {
    const dataDir = mkdtempSync(join(tmpdir(), 'exa-cluster-store-'));
    dirs.push(dataDir);
    const storeAddress = (await spawnReady(children, 'exastore', [cli('exastore'), 'serve', '--data', dataDir, '--port', '0'], /listening on (\S+)/))[1]!;
    for (const host of hosts) {
      const stateDir = mkdtempSync(join(tmpdir(), `exa-cluster-${host}-`));
      dirs.push(stateDir);
      agents.push({ host, address: '', stateDir });
      const m = await spawnReady(children, `exaagent ${host}`, [
        cli('exaagent'), '--host', host, '--store', storeAddress, '--state-dir', stateDir, '--heartbeat-ms', String(opts.heartbeatMs ?? 250),
      ], /ready agent=(\S+)/);
      agents[agents.length - 1]!.address = m[1]!;
    }
    return { storeAddress, dataDir, agents, stop };
  } catch (e) {
    stop();
    throw e;
  }
}
