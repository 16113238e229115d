/**
 * Helpers for the DMA (RDMA API remoting) tests: an agent with its DMA
 * backend on a fresh socket (in the test process), and DMA jobs as real
 * separate Node processes (fixtures/dma-peer.mjs) driven by JSON commands.
 * Every spawned process is killed in afterEach (killAll from the checkpointer helpers).
 */
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { LocalAgent, LocalAgentOptions } from '../../src/agent/local-agent.js';
import * as native from '../../src/native.js';
import { cleanup, startAgent, track } from '../checkpointer/helpers.js';

export { killAll, removeTempDirs, until, drain, cleanup, PAGE } from '../checkpointer/helpers.js';

/** afterEach of the tests whose peers must go before their agents: kill processes, close agents, remove directories. */
export const cleanupPeersFirst = (): Promise<void> => cleanup({ processesFirst: true });
export { startAgent };

const PEER = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'dma-peer.mjs');

export interface Reply { id: number; ok: boolean; code?: string; message?: string; [k: string]: unknown }

/** A DMA job in its own process. */
export class DmaPeer {
  private seq = 0;
  private readonly pending = new Map<number, (r: Reply) => void>();
  private readonly readyP: Promise<void>;
  stderr = '';
  pid = 0;

  private constructor(readonly job: string, readonly proc: ReturnType<typeof spawn>) {
    proc.stderr!.on('data', (d: Buffer) => { this.stderr += d.toString(); });
    let ready: () => void;
    this.readyP = new Promise((r) => { ready = r; });
    createInterface({ input: proc.stdout! }).on('line', (l) => {
      const m = JSON.parse(l) as Reply & { ready?: boolean; pid?: number };
      if (m.ready) { this.pid = m.pid ?? 0; ready(); return; }
      const w = this.pending.get(m.id);
      if (w) { this.pending.delete(m.id); w(m); }
    });
    proc.once('exit', (code, sig) => {
      for (const [id, w] of this.pending) w({ id, ok: false, code: 'EXITED', message: `peer ${job} exited (${code ?? sig}): ${this.stderr}` });
      this.pending.clear();
    });
  }

  /** Start a job process attached to the agent at socketPath, with a DMA session open. */
  static async start(socketPath: string, job: string): Promise<DmaPeer> {
    const p = new DmaPeer(job, track(spawn(process.execPath, [PEER, socketPath, job], { stdio: ['pipe', 'pipe', 'pipe'] })));
    await Promise.race([
      p.readyP,
      new Promise((_, rej) => p.proc.once('exit', () => rej(new Error(`peer ${job} exited at start: ${p.stderr}`)))),
    ]);
    return p;
  }

  /** Send a command; resolves with the reply (ok or not). */
  cmd(c: Record<string, unknown>): Promise<Reply> {
    const id = ++this.seq;
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return Promise.resolve({ id, ok: false, code: 'EXITED', message: 'peer exited' });
    return new Promise((resolve) => {
      this.pending.set(id, resolve);
      this.proc.stdin!.write(`${JSON.stringify({ id, ...c })}\n`);
    });
  }

  /** Like cmd() but throws unless ok. */
  async ok(c: Record<string, unknown>): Promise<Reply> {
    const r = await this.cmd(c);
    if (!r.ok) throw new Error(`${this.job}: ${JSON.stringify(c)} failed: ${r.code} ${r.message}`);
    return r;
  }
}

/** Two (or more) agents in this process, each with its DMA backend on its own socket and loopback TCP port. */
export function startAgents(n: number, opts: Partial<LocalAgentOptions> = {}): { agent: LocalAgent; socketPath: string; addr: string; be: native.DmaBackendHandle }[] {
  const out = [];
  for (let i = 0; i < n; i++) {
    const a = startAgent(opts);
    out.push({ ...a, addr: a.agent.dmaAddress!, be: a.agent.dmaBackend! });
  }
  return out;
}

/** Deterministic bytes, identical to fillBytes() in the fixture. */
export function fillBytes(u8: Uint8Array, off: number, len: number, seed: number): void {
  for (let i = 0; i < len; i++) u8[off + i] = (seed * 131 + ((off + i) >> 12) * 7 + (off + i)) & 255;
}
