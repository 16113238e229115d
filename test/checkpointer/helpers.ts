/**
 * Helpers for the checkpointer tests: a driver for the C test workload
 * (native/test/exa_workload.c), the same deterministic page generator it
 * uses, agent start-up on a fresh socket, image reconstruction from batches,
 * and a registry that kills every spawned process after each test.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { LocalAgent, type Checkpoint, type LocalAgentOptions } from '../../src/agent/local-agent.js';
import { nativeBuildDir, repoRoot } from '../../src/native.js';

export const PAGE = 4096;
export const WORKLOAD_BIN = join(nativeBuildDir, 'exa_workload');
export { repoRoot };

/** Deterministic page content, identical to pattern() in exa_workload.c; never all-zero. */
export function pattern(seed: number, page: number): Buffer {
  const M = (1n << 64n) - 1n;
  const b = Buffer.alloc(PAGE);
  const base = (BigInt(seed) * 0x9e3779b97f4a7c15n + BigInt(page) * 0xbf58476d1ce4e5b9n + 1n) & M;
  for (let i = 0; i < PAGE / 8; i++) {
    let x = (base + BigInt(i) * 0x94d049bb133111ebn) & M;
    x ^= x >> 31n;
    b.writeBigUInt64LE(x | 1n, i * 8);
  }
  return b;
}

// ---- process registry: everything spawned is killed after each test ----

const live = new Set<ChildProcess>();
export function track(p: ChildProcess): ChildProcess {
  live.add(p);
  p.once('exit', () => live.delete(p));
  return p;
}
/** Call from afterEach. SIGCONT first: a test may have failed with a workload stopped. */
export async function killAll(): Promise<void> {
  const ps = [...live];
  for (const p of ps) {
    try { p.kill('SIGCONT'); p.kill('SIGKILL'); } catch { /* gone */ }
  }
  await Promise.all(ps.map((p) => (p.exitCode !== null || p.signalCode !== null ? null : new Promise((r) => p.once('exit', r)))));
}

const tmpDirs: string[] = [];
export function tempDir(prefix = 'exa-ckpt-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  tmpDirs.push(d);
  return d;
}
export function removeTempDirs(): void {
  for (const d of tmpDirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

const agents = new Set<LocalAgent>();

/** A LocalAgent on a fresh socket in a fresh directory; closed by cleanup(). */
export function startAgent(opts: Partial<LocalAgentOptions> = {}): { agent: LocalAgent; socketPath: string; dir: string } {
  const dir = tempDir();
  const socketPath = opts.socketPath ?? join(dir, 'agent.sock');
  const agent = LocalAgent.listen({ socketPath, ...opts });
  agent.on('log', () => undefined); // protocol complaints are expected in some tests
  agents.add(agent);
  return { agent, socketPath, dir };
}

/**
 * Call from afterEach: close every agent started here (close() is idempotent), kill processes,
 * remove directories. processesFirst: kill the processes before closing the agents (the DMA tests:
 * peers go first, so an agent never closes under live clients at teardown).
 */
export async function cleanup(opts: { processesFirst?: boolean } = {}): Promise<void> {
  const open = [...agents];
  agents.clear();
  if (opts.processesFirst) await killAll();
  await Promise.all(open.map((a) => a.close()));
  if (!opts.processesFirst) await killAll();
  removeTempDirs();
}

/** Line-oriented driver of exa_workload: cmd() sends one command and returns its one-line answer. */
export class WorkloadProc {
  readonly proc: ChildProcess;
  private readonly answers: string[] = [];
  private readonly events: string[] = [];
  private waiters: ((l: string) => void)[] = [];
  private eventWaiters: { prefix: string; resolve: (l: string) => void }[] = [];
  stderr = '';

  constructor(args: string[], opts: SpawnOptions = {}, bin = WORKLOAD_BIN) {
    this.proc = track(spawn(bin, args, { ...opts, stdio: ['pipe', 'pipe', 'pipe'] }));
    this.proc.stderr!.on('data', (d: Buffer) => { this.stderr += d.toString(); });
    createInterface({ input: this.proc.stdout! }).on('line', (l) => {
      if (l.startsWith('bgdone')) {
        const i = this.eventWaiters.findIndex((w) => l.startsWith(w.prefix));
        if (i >= 0) this.eventWaiters.splice(i, 1)[0]!.resolve(l);
        else this.events.push(l);
        return;
      }
      const w = this.waiters.shift();
      if (w) w(l);
      else this.answers.push(l);
    });
  }

  static start(socketPath: string, job: string, opts: SpawnOptions = {}): WorkloadProc {
    // another uid may not be able to reach the build tree (e.g. a clone under /root): run a copy
    const bin = opts.uid !== undefined && opts.uid !== process.getuid?.() ? workloadCopyForOtherUsers() : WORKLOAD_BIN;
    return new WorkloadProc(['--socket', socketPath, '--job', job], opts, bin);
  }

  /** Send a command; resolves with its answer line. */
  cmd(line: string): Promise<string> {
    return new Promise((resolve, reject) => {
      if (this.proc.exitCode !== null) return reject(new Error(`workload exited (${this.proc.exitCode}): ${this.stderr}`));
      const onExit = (): void => reject(new Error(`workload exited during "${line}": ${this.stderr}`));
      this.proc.once('exit', onExit);
      this.waiters.push((l) => { this.proc.off('exit', onExit); resolve(l); });
      this.proc.stdin!.write(`${line}\n`);
    });
  }

  /** Like cmd() but fails unless the answer starts with "ok". */
  async ok(line: string): Promise<string> {
    const a = await this.cmd(line);
    if (!a.startsWith('ok')) throw new Error(`workload: "${line}" answered "${a}"`);
    return a;
  }

  /** Resolves with the next event line starting with prefix (e.g. "bgdone 5"). */
  event(prefix: string): Promise<string> {
    const i = this.events.findIndex((l) => l.startsWith(prefix));
    if (i >= 0) return Promise.resolve(this.events.splice(i, 1)[0]!);
    return new Promise((resolve) => this.eventWaiters.push({ prefix, resolve }));
  }

  /** Number of arrived, unconsumed events with this prefix. */
  eventCount(prefix: string): number {
    return this.events.filter((l) => l.startsWith(prefix)).length;
  }

  /** True if an event with this prefix has arrived (without consuming it). */
  hasEvent(prefix: string): boolean {
    return this.events.some((l) => l.startsWith(prefix));
  }

  exited(): Promise<number | null> {
    if (this.proc.exitCode !== null) return Promise.resolve(this.proc.exitCode);
    return new Promise((r) => this.proc.once('exit', (c) => r(c)));
  }
}

/** Poll until cond() holds (readiness by probing, never a blind sleep). */
export async function until(cond: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

export interface ImagePage { zero: boolean; bytes: Buffer | null }
/** Drain a checkpoint: every page keyed "region:page"; hashes are verified against the bytes. */
export async function drain(c: Checkpoint, delayMsPerBatch = 0): Promise<Map<string, ImagePage>> {
  const out = new Map<string, ImagePage>();
  for await (const b of c) {
    if (delayMsPerBatch > 0) await new Promise((r) => setTimeout(r, delayMsPerBatch));
    for (const p of c.pagesOf(b)) {
      const key = `${p.region}:${p.page}`;
      if (out.has(key)) throw new Error(`page ${key} appears twice in one checkpoint`);
      if (p.bytes) {
        const h = createHash('sha256').update(p.bytes).digest();
        if (!h.equals(Buffer.from(p.hash))) throw new Error(`page ${key}: hash does not match its bytes`);
      }
      out.set(key, { zero: p.zero, bytes: p.bytes ? Buffer.from(p.bytes) : null });
    }
  }
  return out;
}

/** Apply a checkpoint's pages on top of an image (region name -> bytes). */
export function apply(image: Map<string, Buffer>, pages: Map<string, ImagePage>, sizes: Record<string, number>): void {
  for (const [name, size] of Object.entries(sizes)) if (!image.has(name)) image.set(name, Buffer.alloc(size));
  for (const [key, p] of pages) {
    const i = key.lastIndexOf(':');
    const buf = image.get(key.slice(0, i))!;
    const off = Number(key.slice(i + 1)) * PAGE;
    if (p.zero) buf.fill(0, off, off + PAGE);
    else p.bytes!.copy(buf, off);
  }
}

/** First page index where two images differ, or -1. */
export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return -2;
  for (let p = 0; p < a.length / PAGE; p++) {
    if (!a.subarray(p * PAGE, (p + 1) * PAGE).equals(b.subarray(p * PAGE, (p + 1) * PAGE))) return p;
  }
  return -1;
}

/** A directory every user can enter and write (for the unprivileged-workload tests). */
export function openDir(): string {
  const d = tempDir('exa-open-');
  chmodSync(d, 0o777);
  return d;
}

/** exa_workload copied into a fresh directory every user can reach (removed after the test). */
export function workloadCopyForOtherUsers(): string {
  const dir = tempDir('exa-bin-');
  chmodSync(dir, 0o755);
  const bin = join(dir, 'exa_workload');
  copyFileSync(WORKLOAD_BIN, bin);
  chmodSync(bin, 0o755);
  return bin;
}
