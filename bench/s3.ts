/**
 * Benchmark `s3`: the S3 pack-file backend against a real S3 server (s3rver,
 * in a child process) on loopback, everything in one run so the ratios are
 * side by side.
 *
 *   npm run bench -- s3 [--json] [--mib 512] [--pack-mib 32] [--concurrency 8] [--rounds 7]
 *
 * Figures:
 *  - puts_per_gib: S3 write requests (PUT, multipart create/part/complete,
 *    every retry included) per GiB of unique page data ingested as one
 *    checkpoint (target <= 80);
 *  - restore_mbps: the parallel out-of-order restore (storage/s3/restore.ts)
 *    of that checkpoint by a fresh backend with an empty cache, every page
 *    hash-checked (MB = 10^6 bytes); at most `concurrency` range GETs in
 *    flight (the backend's readConcurrency), 2x that many chunks in progress;
 *  - raw_get_mbps: plain parallel range GETs of the same bytes (every pack's
 *    pages, in the restore's 8 MiB ranges, same parallelism) from the same
 *    server with the same client, HTTP agent and body path (S3Io.getInto
 *    into a buffer each worker reuses), no hashing, no bookkeeping; the two
 *    take turns at going first, round by round, and each starts after a full
 *    garbage collection of this process (since 2026-11-25, session 4; before,
 *    the raw GETs always ran right after the restore, on its garbage);
 *  - sdk_get_mbps (context): the same GETs with the SDK collecting each body
 *    into a new buffer (S3Io.get), the way the raw GETs were made before
 *    2026-11-25;
 *  - restore_vs_raw = restore_mbps / raw_get_mbps (target >= 0.8);
 *  - ingest_mbps, ordered_restore_mbps (the engine's in-order readImage,
 *    what GetImage streams) and page_hash_mbps_one_thread (SHA-256 of 4 KiB
 *    pages on one thread through node:crypto, one call per page) for
 *    context; sha256_engine: what the restore's native page checks run on
 *    ("ipsec-mb VERSION ARCH", multi-buffer, or "openssl") and
 *    page_check_native_mbps, the speed of those checks (1 MiB calls, one
 *    at a time, libuv pool);
 *  - *_cpu_s_per_gb: CPU seconds of the benchmark process (client) and of
 *    s3rver (server) per GB restored / fetched raw (medians over rounds):
 *    far steadier than MB/s on a shared machine.
 */
import { randomBytes } from 'node:crypto';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { CheckpointStore } from '../storage/engine.js';
import { HASH_BYTES, PAGE_SIZE, sha256 } from '../storage/pages.js';
import { S3Backend } from '../storage/s3/backend.js';
import { parsePackKey } from '../storage/s3/format.js';
import { restoreCheckpoint } from '../storage/s3/restore.js';
import { sha256Engine } from '../src/native.js';
import { hashPages, verifyPages } from '../storage/hash.js';

/**
 * s3rver in its own process, as an S3 server is in real life: in this
 * process it would share the event loop with the client being measured.
 */
async function startS3rverProcess(directory: string, bucket: string): Promise<{ child: ChildProcess; port: number }> {
  const script = `const S3rver = require('s3rver');
new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: ${JSON.stringify(directory)}, configureBuckets: [{ name: ${JSON.stringify(bucket)} }] })
  .run().then((a) => console.log('PORT ' + a.port), (e) => { console.error(e); process.exit(1); });`;
  const child = spawn(process.execPath, ['-e', script], { cwd: process.cwd(), stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve, reject) => {
    const rl = createInterface({ input: child.stdout! });
    rl.on('line', (l) => { const m = /^PORT (\d+)$/.exec(l); if (m) resolve(Number(m[1])); });
    child.once('exit', (code) => reject(new Error(`s3rver exited with code ${code}`)));
  });
  return { child, port };
}

function arg(args: string[], name: string, def: number): number {
  const i = args.indexOf(name);
  if (i < 0) return def;
  const v = Number(args[i + 1]);
  if (!Number.isFinite(v) || v <= 0) throw new Error(`${name} needs a positive number`);
  return v;
}

/** A full garbage collection of this process's heap, between timed phases (untimed). */
let gcFn: (() => void) | null = null;
function fullGc(): void {
  if (!gcFn) {
    setFlagsFromString('--expose-gc');
    gcFn = runInNewContext('gc') as () => void;
  }
  gcFn();
}

export async function run(args: string[], log: (line: string) => void): Promise<Record<string, unknown>> {
  const mib = arg(args, '--mib', 512);
  const packMiB = arg(args, '--pack-mib', 32);
  const concurrency = arg(args, '--concurrency', 8);
  const dir = mkdtempSync(join(tmpdir(), 'exa-bench-s3-'));
  const { child: server, port } = await startS3rverProcess(join(dir, 's3'), 'bench');
  const endpoint = `http://127.0.0.1:${port}`;
  const base = { url: 's3://bench/exa', endpoint, accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER', packBytes: packMiB * 2 ** 20, readConcurrency: concurrency };
  try {
    const pages = Math.floor((mib * 2 ** 20) / PAGE_SIZE);
    const regions = [{ name: 'mem', pageCount: pages, address: '', flags: 0 }];
    log(`s3 bench: ${mib} MiB of unique pages, ${packMiB} MiB packs, s3rver at ${endpoint}`);

    // Ingest one checkpoint of unique pages straight through the engine.
    const store = new CheckpointStore(await S3Backend.open({ ...base, cacheDir: join(dir, 'cache1') }));
    const w = store.backend as S3Backend;
    const putsBefore = w.counters.put;
    const t0 = performance.now();
    const s = await store.beginPut({ job: 'bench', parent: 0, regions });
    const batch = 1024;
    for (let first = 0, b = 0; first < pages; first += batch, b++) {
      const n = Math.min(batch, pages - first);
      const data = randomBytes(n * PAGE_SIZE);
      const hashes = Buffer.allocUnsafe(n * HASH_BYTES);
      for (let i = 0; i < n; i++) sha256(data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)).copy(hashes, i * HASH_BYTES);
      const want = await s.offerHashes({ batch: b, region: new Array(n).fill(0), index: Array.from({ length: n }, (_, i) => first + i), hashes });
      if (want.length !== n) throw new Error('unique pages were not all wanted');
      await s.supplyData(b, data);
    }
    await s.commit();
    const ingestS = (performance.now() - t0) / 1000;
    const puts = w.counters.put - putsBefore;
    const bytes = pages * PAGE_SIZE;
    await store.close();
    log(`ingest: ${puts} write requests, ${(bytes / 1e6 / ingestS).toFixed(0)} MB/s`);

    // Parallel restore by a fresh backend with an empty cache, and plain parallel GETs of
    // the same bytes (the page area of every pack, in the same 8 MiB ranges and with the
    // same parallelism; no hashing, no bookkeeping), interleaved over `rounds` rounds so
    // that neither side always runs first on this shared, noisy machine; medians reported.
    const rounds = arg(args, '--rounds', 7);
    const restoreRuns: number[] = [], rawRuns: number[] = [];
    // CPU seconds of this process and of s3rver per phase: on a shared 2-core machine the
    // throughput figures swing with other load, CPU per byte much less.
    const serverCpu = (): number => {
      try {
        const f = readFileSync(`/proc/${server.pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
        return (Number(f[11]) + Number(f[12])) / 100;
      } catch { return NaN; }
    };
    const cpu = (): { client: number; server: number } => { const u = process.cpuUsage(); return { client: (u.user + u.system) / 1e6, server: serverCpu() }; };
    const restoreCpu: { client: number; server: number }[] = [], rawCpu: { client: number; server: number }[] = [], sdkCpu: { client: number; server: number }[] = [];
    const sdkRuns: number[] = [];
    const since = (a: { client: number; server: number }): { client: number; server: number } => { const b = cpu(); return { client: b.client - a.client, server: b.server - a.server }; };
    for (let round = 0; round < rounds; round++) {
      const r = await S3Backend.open({ ...base, cacheDir: join(dir, `cache-r${round}`) });
      try {
        let check = 0;
        const restorePhase = async (): Promise<void> => {
          fullGc();
          const c1 = cpu();
          const t1 = performance.now();
          // The sink touches the first byte of every page, whether it comes alone or in a run.
          const sink = {
            write: (_r: number, _p: number, d: Buffer): void => { check ^= d[0]!; },
            writeRun: (_r: number, _p: number, count: number, d: Buffer): void => { for (let k = 0; k < count; k++) check ^= d[k * PAGE_SIZE]!; },
          };
          const res = await restoreCheckpoint(r, 'bench', 1, sink, { concurrency: 2 * concurrency, chunkPages: 2048 });
          const restoreS = (performance.now() - t1) / 1000;
          restoreCpu.push(since(c1));
          if (res.bytes !== bytes) throw new Error(`restored ${res.bytes} bytes, expected ${bytes}`);
          restoreRuns.push(bytes / 1e6 / restoreS);
        };
        const packs = (await r.io.list('packs/')).filter((o) => parsePackKey(o.key));
        const ranges: { key: string; start: number; end: number }[] = [];
        for (const o of packs) {
          const pageBytes = Math.floor(o.size / (PAGE_SIZE + HASH_BYTES)) * PAGE_SIZE;
          for (let off = 0; off < pageBytes; off += 2048 * PAGE_SIZE) ranges.push({ key: o.key, start: off, end: Math.min(pageBytes, off + 2048 * PAGE_SIZE) - 1 });
        }
        // Raw GETs: each of `concurrency` workers reads its ranges straight into one buffer it
        // reuses (S3Io.getInto, the body path the restore uses: the cheapest plain GET this
        // client has), then, for context, the same GETs collected the SDK's way (S3Io.get:
        // transformToByteArray, a new buffer per body), which the ratio does not use.
        const rawGets = async (into: boolean): Promise<{ s: number; got: number; cpu: { client: number; server: number } }> => {
          fullGc();
          let next = 0, got = 0;
          const c2 = cpu();
          const t2 = performance.now();
          await Promise.all(Array.from({ length: concurrency }, async () => {
            const mine = into ? Buffer.allocUnsafeSlow(2048 * PAGE_SIZE) : null;
            while (next < ranges.length) {
              const g = ranges[next++]!;
              const buf = mine ? await r.io.getInto(g.key, { start: g.start, end: g.end }, mine) : await r.io.get(g.key, { start: g.start, end: g.end });
              got += buf!.length;
            }
          }));
          const s = (performance.now() - t2) / 1000;
          const c = since(c2);
          if (got !== bytes) throw new Error(`raw GETs read ${got} bytes, expected ${bytes}`);
          return { s, got, cpu: c };
        };
        // The restore and the raw GETs take turns at going first (even rounds: the restore), so that
        // neither always inherits the other's garbage or s3rver's state; each phase starts after a
        // full collection of this process's heap (untimed), so none pays for another's garbage.
        const rawPhase = async (): Promise<void> => {
          const raw = await rawGets(true);
          rawCpu.push(raw.cpu);
          rawRuns.push(raw.got / 1e6 / raw.s);
        };
        if (round % 2 === 0) { await restorePhase(); await rawPhase(); } else { await rawPhase(); await restorePhase(); }
        const sdk = await rawGets(false);
        sdkCpu.push(sdk.cpu);
        sdkRuns.push(sdk.got / 1e6 / sdk.s);
        log(`round ${round + 1}: parallel restore ${restoreRuns[round]!.toFixed(0)} MB/s (check ${check}), raw GETs ${rawRuns[round]!.toFixed(0)} MB/s, SDK-collected GETs ${sdkRuns[round]!.toFixed(0)} MB/s (${ranges.length} ranges of ${packs.length} packs)`);
      } finally {
        await r.close();
      }
    }
    // For context: how fast this machine checks pages (SHA-256 of each 4 KiB page, one thread).
    // The restore must do this for every page; the raw GETs do not.
    const sample = randomBytes(64 * 2 ** 20);
    const th = performance.now();
    for (let off = 0; off < sample.length; off += PAGE_SIZE) sha256(sample.subarray(off, off + PAGE_SIZE));
    const hashMbps = sample.length / 1e6 / ((performance.now() - th) / 1000);
    // ... and how fast the restore's own checks run: native verify calls of 1 MiB, one at a time.
    const sampleHashes = await hashPages(sample);
    const tv = performance.now();
    for (let off = 0; off < sample.length; off += 2 ** 20) {
      const bad = await verifyPages(sample.subarray(off, off + 2 ** 20), sampleHashes.subarray((off / PAGE_SIZE) * HASH_BYTES, ((off + 2 ** 20) / PAGE_SIZE) * HASH_BYTES));
      if (bad.length > 0) throw new Error('page check failed on its own hashes');
    }
    const checkMbps = sample.length / 1e6 / ((performance.now() - tv) / 1000);
    const median = (xs: number[]): number => { const v = [...xs].sort((x, y) => x - y); return v[Math.floor(v.length / 2)]!; };

    // The ordered path GetImage uses (engine readImage), for context.
    const o = new CheckpointStore(await S3Backend.open({ ...base, cacheDir: join(dir, 'cache3') }));
    const t3 = performance.now();
    let ordered = 0;
    for await (const item of o.readImage('bench', 1)) if (!('checkpoint' in item)) ordered += item.data.length;
    const orderedS = (performance.now() - t3) / 1000;
    await o.close();
    if (ordered !== bytes) throw new Error(`ordered restore read ${ordered} bytes`);

    const restoreMbps = median(restoreRuns);
    const rawMbps = median(rawRuns);
    return {
      data_mib: mib, pack_mib: packMiB, concurrency,
      puts, puts_per_gib: Number((puts / (bytes / 2 ** 30)).toFixed(1)),
      ingest_mbps: Number((bytes / 1e6 / ingestS).toFixed(1)),
      restore_mbps: Number(restoreMbps.toFixed(1)),
      raw_get_mbps: Number(rawMbps.toFixed(1)),
      restore_vs_raw: Number((restoreMbps / rawMbps).toFixed(3)),
      restore_mbps_rounds: restoreRuns.map((x) => Math.round(x)), raw_get_mbps_rounds: rawRuns.map((x) => Math.round(x)),
      ordered_restore_mbps: Number((bytes / 1e6 / orderedS).toFixed(1)),
      page_hash_mbps_one_thread: Number(hashMbps.toFixed(0)),
      // The implementation the restore's native page checks use (native/addon/hash.cc).
      sha256_engine: sha256Engine(),
      page_check_native_mbps: Number(checkMbps.toFixed(0)),
      // CPU seconds per GB moved (median over rounds): this process, and s3rver.
      restore_client_cpu_s_per_gb: Number(median(restoreCpu.map((c) => c.client / (bytes / 1e9))).toFixed(2)),
      restore_server_cpu_s_per_gb: Number(median(restoreCpu.map((c) => c.server / (bytes / 1e9))).toFixed(2)),
      raw_client_cpu_s_per_gb: Number(median(rawCpu.map((c) => c.client / (bytes / 1e9))).toFixed(2)),
      raw_server_cpu_s_per_gb: Number(median(rawCpu.map((c) => c.server / (bytes / 1e9))).toFixed(2)),
      // Context only: the same GETs with the SDK collecting each body (a new buffer per GET).
      sdk_get_mbps: Number(median(sdkRuns).toFixed(1)),
      sdk_get_client_cpu_s_per_gb: Number(median(sdkCpu.map((c) => c.client / (bytes / 1e9))).toFixed(2)),
      load_average: Number(loadavg()[0]!.toFixed(2)),
    };
  } finally {
    server.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}
