/**
 * Test helpers for the store: a real `exastore serve` process on loopback
 * (port 0, readiness by reading its ready line and probing it with a
 * client), killed in afterEach; and a deterministic page generator (AES-CTR
 * keystream seeded by name), so no test data is checked in.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import { StoreClient, type PageBatch, type RegionSpec } from '../../src/store/client.js';
import type { CheckpointStore } from '../../storage/engine.js';
import { sha256 } from '../../storage/pages.js';

export const PAGE = 4096;
const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const EXASTORE = join(ROOT, 'dist', 'src', 'cli', 'exastore.js');
/** The built native addon, for child scripts that require it directly. */
export const ADDON = join(ROOT, 'build', 'Release', 'exa_native.node');

/**
 * Run `script` (node -e, CommonJS) that starts native work on the libuv pool
 * and exits at once: the process must end cleanly (printed 'exiting', status
 * 0, no signal, nothing on stderr) although the work is still running.
 */
export function expectCleanExitWhileBusy(script: string): void {
  const r = spawnSync(process.execPath, ['-e', `${script}\nsetImmediate(() => { console.log('exiting'); process.exit(0); });`], { encoding: 'utf8', timeout: 60_000 });
  expect(r.stderr).toBe('');
  expect(r.stdout.trim()).toBe('exiting');
  expect(r.status).toBe(0);
  expect(r.signal).toBeNull();
}

/** Deterministic pseudo-random bytes for a seed string. */
export function genBytes(seed: string, n: number): Buffer {
  const k = createHash('sha256').update(seed).digest();
  const c = createCipheriv('aes-128-ctr', k.subarray(0, 16), k.subarray(16, 32));
  return c.update(Buffer.alloc(n));
}

/** A small seeded PRNG (mulberry32) for choices in tests. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface StoreProc {
  proc: ChildProcess;
  address: string;
  dataDir: string;
  output: () => string;
  /** SIGKILL, resolve when the process is gone. */
  kill(signal?: NodeJS.Signals): Promise<void>;
}

const running = new Set<StoreProc>();
const tmpDirs: string[] = [];

export function tempDir(prefix = 'exastore-test-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  tmpDirs.push(d);
  return d;
}

/** Start `exastore serve` on 127.0.0.1:0 and wait until it is ready and answers. */
export async function startStore(dataDir: string, extra: string[] = [], probe: { token?: string; tlsCa?: string } = {}): Promise<StoreProc> {
  const proc = spawn(process.execPath, [EXASTORE, 'serve', '--data', dataDir, '--port', '0', '--host', '127.0.0.1', ...extra], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
  proc.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const sp: StoreProc = {
    proc, address: '', dataDir, output: () => out,
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      running.delete(sp);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await exited;
    },
  };
  running.add(sp);
  const deadline = Date.now() + 20_000;
  while (!/listening on (\S+)/.test(out)) {
    if (proc.exitCode !== null) throw new Error(`exastore exited early (${proc.exitCode}): ${out}`);
    if (Date.now() > deadline) { await sp.kill(); throw new Error(`exastore not ready in 20 s: ${out}`); }
    await new Promise((r) => setTimeout(r, 20));
  }
  sp.address = /listening on (\S+)/.exec(out)![1]!;
  // Probe: the port answers gRPC.
  const c = await StoreClient.connect(sp.address, { timeoutMs: 10_000, token: probe.token, tlsCa: probe.tlsCa });
  await c.listJobs();
  c.close();
  return sp;
}

/** For afterEach: kill every server still running (even when the test failed). */
export async function killAll(): Promise<void> {
  await Promise.all([...running].map((s) => s.kill('SIGKILL')));
}

export function cleanupDirs(): void {
  for (const d of tmpDirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

/** An image: named regions with their bytes. */
export class Image {
  readonly bufs: Buffer[];
  constructor(readonly regions: RegionSpec[], fill: (r: number, i: number) => Buffer | null) {
    this.bufs = regions.map((reg, r) => {
      const b = Buffer.alloc(reg.pageCount * PAGE);
      for (let i = 0; i < reg.pageCount; i++) {
        const p = fill(r, i);
        if (p) p.copy(b, i * PAGE);
      }
      return b;
    });
  }

  clone(): Image {
    const im = Object.create(Image.prototype) as Image;
    (im as { regions: RegionSpec[] }).regions = this.regions.map((r) => ({ ...r }));
    (im as { bufs: Buffer[] }).bufs = this.bufs.map((b) => Buffer.from(b));
    return im;
  }

  page(r: number, i: number): Buffer {
    return this.bufs[r]!.subarray(i * PAGE, (i + 1) * PAGE);
  }

  setPage(r: number, i: number, bytes: Buffer | null): void {
    if (bytes) bytes.copy(this.bufs[r]!, i * PAGE);
    else this.bufs[r]!.fill(0, i * PAGE, (i + 1) * PAGE);
  }

  allPages(): [number, number][] {
    const out: [number, number][] = [];
    this.regions.forEach((reg, r) => { for (let i = 0; i < reg.pageCount; i++) out.push([r, i]); });
    return out;
  }

  /** Batches (of at most `size` pages) carrying the given pages' current bytes. */
  batches(pages: [number, number][], size = 256): PageBatch[] {
    const out: PageBatch[] = [];
    for (let s = 0; s < pages.length; s += size) {
      const part = pages.slice(s, s + size);
      const data = Buffer.alloc(part.length * PAGE);
      part.forEach(([r, i], k) => this.page(r, i).copy(data, k * PAGE));
      out.push({ region: part.map((p) => p[0]), index: part.map((p) => p[1]), data });
    }
    return out;
  }
}

/** A page of seeded random bytes. */
export function randomPage(seed: string): Buffer {
  return genBytes(seed, PAGE);
}

export function regionsOf(spec: [string, number][]): RegionSpec[] {
  return spec.map(([name, pageCount]) => ({ name, pageCount, address: '', flags: 0 }));
}

/** Compare a fetched image with the expected one; returns the first difference or null. */
export function diffImage(expected: Image, got: Map<string, Buffer>): string | null {
  for (let r = 0; r < expected.regions.length; r++) {
    const name = expected.regions[r]!.name;
    const g = got.get(name);
    if (!g) return `region ${name} missing`;
    const e = expected.bufs[r]!;
    if (g.length !== e.length) return `region ${name}: ${g.length} bytes, expected ${e.length}`;
    if (!g.equals(e)) {
      for (let i = 0; i < e.length / PAGE; i++) {
        if (!g.subarray(i * PAGE, (i + 1) * PAGE).equals(e.subarray(i * PAGE, (i + 1) * PAGE))) return `region ${name}: page ${i} differs`;
      }
    }
  }
  return null;
}

/** Checkpoint n of a job read in-process through the engine (pieces of `chunkPages` when given), zero pages expanded. */
export async function engineImage(store: CheckpointStore, job: string, n: number, chunkPages?: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const item of chunkPages === undefined ? store.readImage(job, n) : store.readImage(job, n, {}, chunkPages)) {
    if ('checkpoint' in item) continue;
    // Zero pages are flagged, not sent: expand them.
    let k = 0;
    for (let i = 0; i < item.pageCount; i++) {
      if (item.zero.length > 0 && item.zero[i]) parts.push(Buffer.alloc(PAGE));
      else parts.push(item.data.subarray(k * PAGE, ++k * PAGE));
    }
  }
  return Buffer.concat(parts);
}

/**
 * Upload pages `which` of `img` (one region "mem" of `pages` pages) in-process through the engine as a
 * checkpoint of `job` on `parent`, in batches of `batchPages` (default: one batch); its number.
 */
export async function enginePut(store: CheckpointStore, job: string, parent: number, pages: number, img: Buffer, which: number[], batchPages = Math.max(1, which.length)): Promise<number> {
  const s = await store.beginPut({ job, parent, regions: [{ name: 'mem', pageCount: pages, address: '', flags: 0 }] });
  const data = Buffer.concat(which.map((i) => img.subarray(i * PAGE, (i + 1) * PAGE)));
  const hashes = Buffer.concat(which.map((i) => sha256(img.subarray(i * PAGE, (i + 1) * PAGE))));
  for (let b = 0; b * batchPages < which.length; b++) {
    const idx = which.slice(b * batchPages, (b + 1) * batchPages);
    const first = b * batchPages;
    const want = await s.offerHashes({ batch: b, region: idx.map(() => 0), index: idx, hashes: hashes.subarray(first * 32, (first + idx.length) * 32) });
    if (want.length > 0) await s.supplyData(b, Buffer.concat(want.map((k) => data.subarray((first + k) * PAGE, (first + k + 1) * PAGE))));
  }
  return (await s.commit()).checkpoint;
}
