/**
 * A real cluster on loopback for end-to-end tests: `exastore serve` (store +
 * coordinator) and N `exaagent` processes, each with its own host id, state
 * directory and port, optionally each in its own network namespace.
 * Readiness is probed (ready lines, then gRPC calls), never slept for.
 * Every process and directory is removed by stopAll(), which tests call in
 * afterEach, so a failing test leaves nothing running.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CoordinatorClient } from '../../src/coordinator/client.js';
import { AgentClient, type AgentJobInfo } from '../../src/hostagent/client.js';
import { killJobsOf } from '../../src/ops/local-cluster.js';

export { killJobsOf };

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = (name: string): string => join(ROOT, 'dist', 'src', 'cli', `${name}.js`);
export const HEAT = join(ROOT, 'build', 'Release', 'exa_heat');
export const LATTICE = join(ROOT, 'dist', 'src', 'demo', 'lattice-job.js');

export interface Proc {
  name: string;
  proc: ChildProcess;
  output(): string;
  exited: Promise<number>;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

const procs = new Set<Proc>();
const dirs: string[] = [];
const cleanups: Array<() => void> = [];

export function tempDir(prefix: string): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(d);
  return d;
}

/** Spawn a process whose output is collected; it is killed by stopAll(). */
export function start(name: string, cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; netns?: string } = {}): Proc {
  const [file, argv] = opts.netns ? ['ip', ['netns', 'exec', opts.netns, cmd, ...args]] as const : [cmd, args] as const;
  const proc = spawn(file, [...argv], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...opts.env } });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
  proc.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
  const exited = new Promise<number>((r) => proc.once('exit', (code, sig) => r(code ?? (sig ? 128 : 0))));
  const p: Proc = {
    name, proc, output: () => out, exited,
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      procs.delete(p);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await exited;
    },
  };
  procs.add(p);
  return p;
}

/** Wait until `pattern` appears in a process's output (fails early if it exits). */
export async function waitFor(p: Proc, pattern: RegExp, timeoutMs = 20_000): Promise<RegExpExecArray> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = pattern.exec(p.output());
    if (m) return m;
    if (p.proc.exitCode !== null || p.proc.signalCode !== null) throw new Error(`${p.name} exited before ${pattern}: ${p.output()}`);
    if (Date.now() > deadline) throw new Error(`${p.name}: no ${pattern} within ${timeoutMs} ms: ${p.output()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Poll `fn` until it returns a value (not undefined); rethrows its last error at the deadline. */
export async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown = null;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (e) {
      // A definite failure (e.g. the job FAILED) ends the wait at once.
      if ((e as { fatal?: boolean }).fatal) throw e;
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface StoreHandle { proc: Proc; address: string; dataDir: string; port: number }

export async function startStore(opts: { dataDir?: string; port?: number; host?: string; netns?: string; args?: string[] } = {}): Promise<StoreHandle> {
  const dataDir = opts.dataDir ?? tempDir('exa-cluster-store-');
  const p = start('exastore', process.execPath, [BIN('exastore'), 'serve', '--data', dataDir, '--port', String(opts.port ?? 0), '--host', opts.host ?? '127.0.0.1', ...(opts.args ?? [])], opts.netns ? { netns: opts.netns } : {});
  const m = await waitFor(p, /listening on (\S+)/);
  const address = m[1]!;
  return { proc: p, address, dataDir, port: Number(address.split(':').pop()) };
}

export interface AgentHandle { proc: Proc; host: string; address: string; stateDir: string }

export async function startAgent(host: string, store: string, opts: { listen?: string; netns?: string; heartbeatMs?: number; args?: string[] } = {}): Promise<AgentHandle> {
  const stateDir = tempDir(`exa-cluster-agent-${host}-`);
  const p = start(`exaagent ${host}`, process.execPath, [
    BIN('exaagent'), '--host', host, '--store', store, '--listen', opts.listen ?? '127.0.0.1:0', '--state-dir', stateDir,
    '--heartbeat-ms', String(opts.heartbeatMs ?? 200), ...(opts.args ?? []),
  ], opts.netns ? { netns: opts.netns } : {});
  // Jobs outlive a killed agent by design; stopAll() finds them by their socket path.
  onStop(() => killJobsOf(stateDir));
  const m = await waitFor(p, /ready agent=(\S+)/);
  return { proc: p, host, address: m[1]!, stateDir };
}

/** Run one of the CLIs to completion; returns exit code and output. */
export async function cli(name: string, args: string[], opts: { netns?: string } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  const [file, argv] = opts.netns ? ['ip', ['netns', 'exec', opts.netns, process.execPath, BIN(name), ...args]] as const : [process.execPath, [BIN(name), ...args]] as const;
  const proc = spawn(file, [...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (d: Buffer) => { stdout += d.toString(); });
  proc.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  // 'close' (all output read), not 'exit' (output may still be in the pipes)
  const code = await new Promise<number>((r) => proc.once('close', (c) => r(c ?? 1)));
  return { code, stdout, stderr };
}

/** The job's record on whichever agent runs (or ran) it last. */
export async function jobOn(agentAddress: string, job: string): Promise<AgentJobInfo | undefined> {
  const a = await AgentClient.connect(agentAddress, { timeoutMs: 3000 });
  try {
    return (await a.list()).find((j) => j.job === job);
  } finally { a.close(); }
}

/** Wait for a job to finish on an agent and return its checksum line. */
export async function finalChecksum(agentAddress: string, job: string, timeoutMs = 60_000): Promise<string> {
  return until(`job ${job} to finish on ${agentAddress}`, async () => {
    const j = await jobOn(agentAddress, job);
    if (!j || (j.state !== 'FINISHED' && j.state !== 'FAILED')) return undefined;
    const m = /checksum=([0-9a-f]{16})/.exec(j.output_tail);
    if (j.state === 'FAILED' || !m) throw Object.assign(new Error(`job ${job} ${j.state} (exit ${j.exit_code}): ${j.output_tail}`), { fatal: true });
    return m[1]!;
  }, timeoutMs);
}

/** Checksum of an uninterrupted run, without any agent. */
export function referenceChecksum(argv: string[]): string {
  const out = execFileSync(argv[0]!, [...argv.slice(1), '--no-agent'], { encoding: 'utf8' });
  const m = /checksum=([0-9a-f]{16})/.exec(out);
  if (!m) throw new Error(`no checksum in ${out}`);
  return m[1]!;
}

export async function coordinator(address: string): Promise<CoordinatorClient> {
  return CoordinatorClient.connect(address, { timeoutMs: 5000 });
}

/** Register a cleanup (e.g. a network namespace) run by stopAll(). */
export function onStop(fn: () => void): void {
  cleanups.push(fn);
}

/** Kill every process started here, remove temp directories and namespaces. */
export async function stopAll(): Promise<void> {
  await Promise.all([...procs].map((p) => p.kill('SIGKILL')));
  for (const c of cleanups.splice(0).reverse()) {
    try { c(); } catch { /* best effort */ }
  }
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}
