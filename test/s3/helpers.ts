/**
 * Test helpers for the S3 suite: a real S3 server (s3rver) on loopback port
 * 0 with a temp directory, that can be stopped and restarted on the same
 * port; a deterministic page generator; temp directories cleaned up by the
 * caller's afterEach.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer as createHttpServer, request, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import S3rver from 's3rver';
import { expect } from 'vitest';
import { pagesToBatch, type StoreClient } from '../../src/store/client.js';
import { PAGE_SIZE } from '../../storage/pages.js';
import type { CheckpointStore } from '../../storage/engine.js';
import type { ManifestHeader, RegionSpec } from '../../storage/backend.js';
import { sha256 } from '../../storage/pages.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';

export const S3RVER_KEYS = { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' };

export interface TestS3 {
  endpoint: string;
  port: number;
  dir: string;
  bucket: string;
  /** Stop the server, dropping open connections. */
  stop(): Promise<void>;
  /** Start it again on the same port and directory. */
  start(): Promise<void>;
  running(): boolean;
}

export function tempDir(tag: string): string {
  return mkdtempSync(join(tmpdir(), `exa-s3test-${tag}-`));
}

export function removeDir(d: string | undefined): void {
  if (d) rmSync(d, { recursive: true, force: true });
}

/** afterEach of the S3 tests: run the closers (newest first), stop the S3 server, remove its and the tests' directories. */
export async function teardownS3(s3: TestS3 | null, dirs: string[], closers: (() => Promise<unknown>)[]): Promise<void> {
  for (const c of closers.splice(0).reverse()) await c().catch(() => undefined);
  await s3?.stop();
  removeDir(s3?.dir);
  for (const d of dirs.splice(0)) removeDir(d);
}

/** Start s3rver on 127.0.0.1 with `bucket` created. */
export async function startS3(bucket = 'exa-test'): Promise<TestS3> {
  const dir = tempDir('s3rver');
  let port = 0;
  let srv: S3rver | null = null;
  const start = async (): Promise<void> => {
    for (let attempt = 0; ; attempt++) {
      const s = new S3rver({ address: '127.0.0.1', port, silent: true, directory: dir, configureBuckets: [{ name: bucket }] });
      try {
        const addr = await s.run();
        port = addr.port;
        srv = s;
        return;
      } catch (e) {
        // The port may still be held briefly after a stop.
        if (attempt > 50) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  };
  await start();
  const t: TestS3 = {
    get endpoint() { return `http://127.0.0.1:${port}`; },
    get port() { return port; },
    dir, bucket,
    async stop() {
      const s = srv;
      srv = null;
      if (!s) return;
      const closing = s.close().catch(() => undefined);
      s.httpServer?.closeAllConnections();
      await closing;
    },
    start,
    running: () => srv !== null,
  };
  return t;
}

/** A TCP port nothing listens on (bound then released). */
export async function deadPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => (a && typeof a === 'object' ? resolve(a.port) : reject(new Error('no port'))));
    });
  });
}

/**
 * Deterministic page content: a xorshift stream seeded by (seed, region,
 * page, version). Version 0 of a page index divisible by 7 is a zero page.
 */
export function genPage(seed: number, region: number, page: number, version: number): Buffer | null {
  if (version === 0 && page % 7 === 3) return null;
  const b = Buffer.allocUnsafe(PAGE_SIZE);
  let x = (seed * 0x9e3779b1) ^ (region * 0x85ebca6b) ^ (page * 0xc2b2ae35) ^ (version * 0x27d4eb2f) ^ 0x1234567;
  x >>>= 0;
  if (x === 0) x = 1;
  for (let i = 0; i < PAGE_SIZE; i += 4) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  return b;
}

/**
 * A chain of images: checkpoint k (1-based) changes the pages whose
 * (page + k) % every == 0 to version k (generated from versionSeed, so two
 * chains with one seed share their first image and nothing after). Returns, per checkpoint, the
 * changed pages and the full expected image of each region.
 */
export function makeChain(seed: number, regions: { name: string; pages: number }[], checkpoints: number, every = 10, versionSeed = seed): {
  changes: { region: number; index: number; bytes: Buffer | null }[][];
  images: Map<string, Buffer>[];
} {
  const cur = regions.map((r, ri) => Array.from({ length: r.pages }, (_, i) => genPage(seed, ri, i, 0)));
  const changes: { region: number; index: number; bytes: Buffer | null }[][] = [];
  const images: Map<string, Buffer>[] = [];
  for (let k = 1; k <= checkpoints; k++) {
    const ch: { region: number; index: number; bytes: Buffer | null }[] = [];
    regions.forEach((r, ri) => {
      for (let i = 0; i < r.pages; i++) {
        if (k === 1) { ch.push({ region: ri, index: i, bytes: cur[ri]![i]! }); continue; }
        if ((i + k) % every === 0) {
          // Some pages go back to zero, some repeat another region's content (dedup).
          const v = (i + k) % (every * 5) === 0 ? null : genPage(versionSeed, ri, i, k);
          cur[ri]![i] = v;
          ch.push({ region: ri, index: i, bytes: v });
        }
      }
    });
    changes.push(ch);
    images.push(new Map(regions.map((r, ri) => {
      const img = Buffer.alloc(r.pages * PAGE_SIZE);
      cur[ri]!.forEach((p, i) => p?.copy(img, i * PAGE_SIZE));
      return [r.name, img];
    })));
  }
  return { changes, images };
}

export type PageChange = { region: number; index: number; bytes: Buffer | null };

/** Upload one checkpoint straight through an engine (no gRPC), in batches of 1024 pages. */
export async function putDirect(store: CheckpointStore, job: string, parent: number, regions: RegionSpec[], pages: readonly PageChange[]): Promise<ManifestHeader> {
  const s = await store.beginPut({ job, parent, regions });
  try {
    for (let off = 0, b = 0; off < pages.length; off += 1024, b++) {
      const part = pages.slice(off, off + 1024);
      const hashes = Buffer.alloc(part.length * 32);
      const zero = Buffer.alloc(part.length);
      part.forEach((p, i) => { if (!p.bytes) zero[i] = 1; else sha256(p.bytes).copy(hashes, i * 32); });
      const want = await s.offerHashes({ batch: b, region: part.map((p) => p.region), index: part.map((p) => p.index), hashes, zero });
      if (want.length > 0) await s.supplyData(b, Buffer.concat(want.map((i) => part[i]!.bytes!)));
    }
    return await s.commit();
  } catch (e) {
    s.abort();
    throw e;
  }
}

/** Read a whole checkpoint image through an engine, as Map region -> bytes. */
export async function readDirect(store: CheckpointStore, job: string, n: number): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  let header: ManifestHeader | null = null;
  for await (const item of store.readImage(job, n)) {
    if ('checkpoint' in item) {
      header = item;
      for (const r of item.regions) out.set(r.name, Buffer.alloc(r.pageCount * PAGE_SIZE));
      continue;
    }
    const img = out.get(item.region)!;
    let d = 0;
    for (let i = 0; i < item.pageCount; i++) {
      if (item.zero.length > 0 && item.zero[i]) continue;
      item.data.copy(img, (item.firstPage + i) * PAGE_SIZE, d * PAGE_SIZE, (d + 1) * PAGE_SIZE);
      d++;
    }
  }
  if (!header) throw new Error('no header');
  return out;
}

const EXASTORE = join(import.meta.dirname, '..', '..', 'dist', 'src', 'cli', 'exastore.js');

export interface ExastoreProcess {
  proc: ChildProcess;
  address: string;
  /** SIGTERM, then SIGKILL after 5 s; resolves when the process is gone. */
  stop(): Promise<void>;
  stderr(): string;
}

/** Run `exastore ARGS` (a real process from dist/) and wait for its ready line. */
export async function spawnExastore(args: string[], env: Record<string, string> = {}): Promise<ExastoreProcess> {
  const proc = spawn(process.execPath, [EXASTORE, ...args], { env: { ...process.env, NODE_NO_WARNINGS: '1', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const address = await new Promise<string>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`exastore ${args.join(' ')} not ready after 30 s: ${err}`)), 30_000);
    createInterface({ input: proc.stdout! }).on('line', (l) => {
      const m = /listening on (\S+)/.exec(l);
      if (m) { clearTimeout(t); resolve(m[1]!); }
    });
    proc.once('exit', (code) => { clearTimeout(t); reject(new Error(`exastore ${args.join(' ')} exited with ${code}: ${err}`)); });
  });
  return {
    proc, address, stderr: () => err,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

/** Run `exastore ARGS` to completion: exit code, stdout, stderr. */
export async function runExastore(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  const proc = spawn(process.execPath, [EXASTORE, ...args], { env: { ...process.env, NODE_NO_WARNINGS: '1', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '', stderr = '';
  proc.stdout!.on('data', (d: Buffer) => { stdout += d.toString(); });
  proc.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  // 'close' (all output read), not 'exit' (output may still be in the pipes)
  const code = await new Promise<number>((r) => proc.once('close', (c) => r(c ?? 1)));
  return { code, stdout, stderr };
}

/** An HTTP proxy on loopback in front of the S3 server on port `target`. */
export interface TestProxy {
  endpoint: string;
  close(): Promise<void>;
}

/**
 * Start a proxy to the S3 server on `target`: `intercept(req, res)` may answer
 * a request itself (and then returns true: a fault, or a refusal the S3 server
 * would not make); every other request is forwarded, and `forwarded(req,
 * status)` hears the S3 server's answer to it.
 */
export async function startS3Proxy(
  target: number,
  intercept: (req: IncomingMessage, res: ServerResponse) => boolean,
  forwarded: (req: IncomingMessage, status: number) => void = () => undefined,
): Promise<TestProxy> {
  const proxy = createHttpServer((req, res) => {
    if (intercept(req, res)) return;
    const up = request({ host: '127.0.0.1', port: target, method: req.method, path: req.url, headers: req.headers }, (r) => {
      forwarded(req, r.statusCode ?? 502);
      res.writeHead(r.statusCode ?? 502, r.headers);
      r.pipe(res);
    });
    up.on('error', () => { res.writeHead(502); res.end(); });
    req.pipe(up);
  });
  await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
  const a = proxy.address();
  return {
    endpoint: `http://127.0.0.1:${typeof a === 'object' && a ? a.port : 0}`,
    close: async () => {
      proxy.closeAllConnections();
      await new Promise((r) => proxy.close(r));
    },
  };
}

/** An S3 error answer, as the S3 server would write it. */
export function s3Error(res: ServerResponse, status: number, code: string, message: string): void {
  res.writeHead(status, { 'content-type': 'application/xml' });
  res.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>${message}</Message></Error>`);
}

/** The regions and chain length of the two-servers-one-bucket scenario (twoJobsWhileBothCollect). */
export const SHARED_BUCKET_REGIONS = [{ name: 'grid', pages: 240 }];
const SHARED_BUCKET_CKPTS = 10;

/**
 * Two store servers on one bucket (clients ca and cb): each checkpoints its
 * own job ('alpha' through ca, 'beta' through cb; checkpoint 1 is the same
 * image for both, so they dedup against each other's packs, later ones
 * diverge), pruning to the 3 newest and every 4th as it goes, while both run
 * GC in a loop. Past the writers, the collectors go on for one grace period,
 * then both collect, wait another grace period and collect again (so packs
 * condemned late are deleted too). Resolves with the chains and how many
 * times each collector ran.
 */
export async function twoJobsWhileBothCollect(ca: StoreClient, cb: StoreClient, graceMs: number): Promise<{ alpha: ReturnType<typeof makeChain>; beta: ReturnType<typeof makeChain>; gcRuns: number[] }> {
  const regions = SHARED_BUCKET_REGIONS.map((r) => ({ name: r.name, pageCount: r.pages, address: '', flags: 0 }));
  const alpha = makeChain(11, SHARED_BUCKET_REGIONS, SHARED_BUCKET_CKPTS, 3, 101);
  const beta = makeChain(11, SHARED_BUCKET_REGIONS, SHARED_BUCKET_CKPTS, 4, 202);
  let uploading = true;
  const writer = async (c: StoreClient, job: string, chain: ReturnType<typeof makeChain>): Promise<void> => {
    for (let k = 0; k < SHARED_BUCKET_CKPTS; k++) {
      await c.putCheckpoint({ job, parent: k, regions }, [pagesToBatch(chain.changes[k]!)]);
      if (k >= 3) await c.deleteCheckpoints(job, { keepLast: 3, keepEvery: 4 });
      await new Promise((r) => setTimeout(r, 150));
    }
  };
  const collector = async (c: StoreClient): Promise<number> => {
    let runs = 0;
    while (uploading) {
      // Engine grace 0: pages are dropped at once; the pack-level grace and the re-check protect the other server's uploads.
      await c.gc({ graceSeconds: 0 });
      runs++;
      await new Promise((r) => setTimeout(r, 100));
    }
    return runs;
  };
  const gcs = [collector(ca), collector(cb)];
  try {
    await Promise.all([writer(ca, 'alpha', alpha), writer(cb, 'beta', beta)]);
    await new Promise((r) => setTimeout(r, graceMs + 300));
  } finally {
    uploading = false;
  }
  const gcRuns = await Promise.all(gcs);
  for (let i = 0; i < 2; i++) {
    if (i > 0) await new Promise((r) => setTimeout(r, graceMs + 300));
    await ca.gc({ graceSeconds: 0 });
    await cb.gc({ graceSeconds: 0 });
  }
  return { alpha, beta, gcRuns };
}

/** After twoJobsWhileBothCollect: checkpoints 4, 8, 9 and 10 of both jobs remain, read bit-exact and verify through either server. */
export async function expectBothJobsKeptThroughEither(ca: StoreClient, cb: StoreClient, alpha: ReturnType<typeof makeChain>, beta: ReturnType<typeof makeChain>): Promise<void> {
  for (const [job, chain] of [['alpha', alpha], ['beta', beta]] as const) {
    for (const c of [ca, cb]) {
      const nums = (await c.listCheckpoints(job)).map((x) => x.checkpoint);
      expect(nums).toEqual([4, 8, 9, 10]);
      for (const k of nums) {
        const img = await c.fetchImage({ job, checkpoint: k });
        expect(img.regions.get('grid')!.equals(chain.images[k - 1]!.get('grid')!), `${job} #${k} through ${c === ca ? 'A' : 'B'}`).toBe(true);
      }
      expect((await c.verify({ job })).problems).toEqual([]);
    }
  }
}
