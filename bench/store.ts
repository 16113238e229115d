/**
 * Benchmark `store`: the checkpoint store over loopback gRPC into LevelDB
 * (server = a separate `exastore serve` process), side by side with restic
 * on the same data.
 *
 *   npm run bench -- store [--json] [--mib 1024] [--chain-mib 256] [--chain-rounds 7] [--no-restic] [--profile DIR]
 *                          [--batch-pages 2048] [--ingest-only]
 *
 * --profile DIR: the store servers run with --cpu-prof into DIR (profile the
 * client with `node --cpu-prof dist/bench/run.js store ...`).
 *
 * Figures:
 *  - ingest_unique_mbps: a full checkpoint of never-seen pages. The producer
 *    hands batches with their SHA-256 already computed, as the checkpointer
 *    does (it hashes off the JS thread); the store still re-hashes every page
 *    it receives. ingest_unique_client_hash_mbps: the same with the client
 *    library hashing.
 *  - ingest_dedup_mbps: the same image again under another job (every page
 *    already present: only hashes travel).
 *  - restore_mbps: GetImage of the full image, consumed by the client.
 *  - *_server_cpu_s_per_gib, *_client_cpu_s_per_gib: CPU seconds the store
 *    server process and this process spent per GiB in that phase (steadier
 *    than MiB/s on a shared machine); load_average_start/_end for context.
 *  - restore_chain100_vs_chain1: restore time of checkpoint 100 of a chain of
 *    1% increments over restore time of checkpoint 1 (a CHAIN-MIB image;
 *    after one untimed restore of each, medians of CHAIN-ROUNDS restores each,
 *    interleaved); restore_chain100_vs_chain1_cpu: the same ratio of the CPU
 *    seconds (client + server) the restores cost.
 *    restore_chain100_compacted_vs_chain1(_cpu): the same after `compact` of the
 *    chain's job (checkpoint 100's pages rewritten in image order).
 *    chain_verify_s, chain_compact_s: the operator commands on that job of 101
 *    checkpoints (`exastore verify JOB`, then `exastore compact JOB`, which
 *    verifies again first), seconds. chain_increment_s: median time of one
 *    1% increment's upload and commit; chain_metadata_bytes_per_checkpoint:
 *    the manifests (headers and page maps, stored whole or as deltas) the
 *    chain's 100 checkpoints added, per checkpoint, beside
 *    chain_full_map_bytes, one whole map of the chain's image.
 *  - transport_ingest_mbps, transport_restore_mbps: the same uploads and
 *    restores against bench/transport-server.ts, a separate process with the
 *    same gRPC stack and no storage work (pages dropped on upload, served
 *    from memory on restore): the most a store on this stack can reach here.
 *    ingest_unique_vs_transport and restore_vs_transport: the store's figure
 *    over the transport's, measured in the same run (upload: the transport
 *    before and after the store's ingests, mean; restore: alternating, medians).
 *  - disk_write_mbps: 512 MiB appended with O_DIRECT in 8 MiB writes then
 *    fdatasync, in the data directory's file system, before and after the
 *    ingests (mean): no unique-page ingest commits faster, since its pages
 *    are durable before its commit is. ingest_unique_vs_disk: the ratio.
 *  - restic: a MIB image, then 10 increments each rewriting 1% of the pages
 *    at random; exastore gets the dirty pages (what the checkpointer sends),
 *    restic backs up the file. Ratios are exastore / restic. Both restores
 *    (latest image to a file) start from a cold page cache (sync, then
 *    drop_caches as root).
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createCipheriv, createHash, hash as oneShotHash } from 'node:crypto';
import { constants as fsConstants, mkdtempSync, openSync, closeSync, writeSync, fdatasyncSync, rmSync, readdirSync, readFileSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { alignedBuffer } from '../src/native.js';
import { NODE_FLAGS } from '../src/node-flags.js';
import { StoreClient, type PageBatch } from '../src/store/client.js';
import { ENTRY_BYTES } from '../storage/pages.js';

const PAGE = 4096;
const HERE = dirname(fileURLToPath(import.meta.url));
const EXASTORE = join(HERE, '..', 'src', 'cli', 'exastore.js');
const TRANSPORT_SERVER = join(HERE, 'transport-server.js');

function arg(args: string[], name: string, def: number): number {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] ? Number(args[i + 1]) : def;
}

/** Deterministic pseudo-random bytes (AES-CTR keystream of a seed). */
function genBytes(seed: string, n: number): Buffer {
  const k = createHash('sha256').update(seed).digest();
  return createCipheriv('aes-128-ctr', k.subarray(0, 16), k.subarray(16, 32)).update(Buffer.alloc(n));
}

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Batches over the given page indexes of one region, hashes precomputed (as the checkpointer delivers them). */
function makeBatches(img: Buffer, pages: number[], batchPages: number, withHashes: boolean): PageBatch[] {
  const out: PageBatch[] = [];
  for (let s = 0; s < pages.length; s += batchPages) {
    const part = pages.slice(s, s + batchPages);
    const contiguous = part.every((p, i) => p === part[0]! + i);
    const data = contiguous ? img.subarray(part[0]! * PAGE, (part[part.length - 1]! + 1) * PAGE) : Buffer.concat(part.map((p) => img.subarray(p * PAGE, (p + 1) * PAGE)));
    const b: PageBatch = { region: new Array<number>(part.length).fill(0), index: part, data };
    if (withHashes) {
      const hashes = Buffer.allocUnsafe(part.length * 32);
      for (let i = 0; i < part.length; i++) (oneShotHash('sha256', data.subarray(i * PAGE, (i + 1) * PAGE), 'buffer') as unknown as Buffer).copy(hashes, i * 32);
      b.hashes = hashes;
    }
    out.push(b);
  }
  return out;
}

/** Every server this run started, killed at the end whatever happens. */
const started = new Set<ChildProcess>();

async function stopServer(proc: ChildProcess): Promise<void> {
  started.delete(proc);
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const gone = new Promise((r) => proc.once('exit', r));
  proc.kill('SIGTERM');
  const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(t);
}

/** Node options for the servers: the services' own (src/node-flags.ts), and --cpu-prof with --profile. */
let serverNodeArgs: string[] = [...NODE_FLAGS];

/**
 * Start `exastore serve` on DIR, or with dir null the transport-only server
 * (bench/transport-server.ts: the same gRPC stack, no storage work).
 */
async function startServer(dir: string | null, log: (l: string) => void): Promise<{ proc: ChildProcess; address: string }> {
  const cmd = dir === null ? [TRANSPORT_SERVER] : [EXASTORE, 'serve', '--data', dir, '--port', '0'];
  const proc = spawn(process.execPath, [...serverNodeArgs, ...cmd], { stdio: ['ignore', 'pipe', 'inherit'] });
  started.add(proc);
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
  const t0 = Date.now();
  while (!/listening on (\S+)/.test(out)) {
    if (proc.exitCode !== null || Date.now() - t0 > 20_000) throw new Error(`exastore did not start: ${out}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const address = /listening on (\S+)/.exec(out)![1]!;
  log(dir === null ? `transport-only server on ${address}` : `exastore serving ${dir} on ${address}`);
  return { proc, address };
}

/** Restore a checkpoint (to FILE, or consumed in memory); pageCount asks for that many pages (the transport-only server needs it). */
async function restoreTo(c: StoreClient, job: string, checkpoint: number, file: string | null, pageCount = 0): Promise<number> {
  const fh = file ? await open(file, 'w') : null;
  let bytes = 0;
  // File writes overlap the stream (at most 4 pieces, 16 MiB, waiting for the disk).
  const writes: Promise<unknown>[] = [];
  try {
    for await (const item of c.getImage({ job, checkpoint, pageCount })) {
      if ('info' in item) continue;
      bytes += item.data.length;
      if (fh) {
        // The piece's buffer goes back to the receive pool once written.
        writes.push(fh.write(item.data, 0, item.data.length, item.firstPage * PAGE).finally(() => item.release()));
        if (writes.length >= 4) await writes.shift();
      } else item.release();
    }
    await Promise.all(writes);
  } finally {
    await fh?.close();
  }
  return bytes;
}

/**
 * The disk under the data directory: MIB of `src` written sequentially in
 * 8 MiB appends with O_DIRECT from an aligned buffer (as the store writes its
 * packs), then fdatasync; MiB/s. A unique-page ingest cannot commit faster:
 * its pages are durable before its commit is.
 */
function diskWriteMbps(dir: string, src: Buffer, mib: number): number {
  const chunk = 8 * 1024 * 1024;
  const buf = alignedBuffer(chunk);
  const file = join(dir, 'disk-probe');
  const fd = openSync(file, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_TRUNC | fsConstants.O_DIRECT);
  try {
    const t0 = process.hrtime.bigint();
    for (let off = 0; off < mib * 1024 * 1024; off += chunk) {
      src.copy(buf, 0, off % src.length, (off % src.length) + chunk);
      writeSync(fd, buf, 0, chunk, off);
    }
    fdatasyncSync(fd);
    return mib / (Number(process.hrtime.bigint() - t0) / 1e9);
  } finally {
    closeSync(fd);
    rmSync(file, { force: true });
  }
}

/** CPU seconds used so far by a process (utime + stime from /proc), NaN when unreadable. */
function procCpu(pid: number | undefined): number {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch { return NaN; }
}

/** Minor page faults of a process so far (fresh memory touched: a large part of the ingest CPU here), NaN when unreadable. */
function procMinflt(pid: number | undefined): number {
  try {
    return Number(readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[7]);
  } catch { return NaN; }
}

/**
 * Time a phase and the CPU seconds it cost: this process (the client) and the
 * store server. On a shared 2-core machine MiB/s swings with other people's
 * load; CPU seconds per GiB much less.
 */
async function measured<T>(server: ChildProcess, fn: () => Promise<T>): Promise<{ s: number; v: T; clientCpu: number; serverCpu: number; clientFaults: number; serverFaults: number }> {
  const c0 = process.cpuUsage(), s0 = procCpu(server.pid);
  const cf0 = process.resourceUsage().minorPageFault, sf0 = procMinflt(server.pid);
  const r = await timeIt(fn);
  const c = process.cpuUsage(c0);
  return {
    ...r, clientCpu: (c.user + c.system) / 1e6, serverCpu: procCpu(server.pid) - s0,
    clientFaults: process.resourceUsage().minorPageFault - cf0, serverFaults: procMinflt(server.pid) - sf0,
  };
}

function timeIt<T>(fn: () => Promise<T>): Promise<{ s: number; v: T }> {
  const t0 = process.hrtime.bigint();
  return fn().then((v) => ({ s: Number(process.hrtime.bigint() - t0) / 1e9, v }));
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function duBytes(dir: string): number {
  let total = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    total += e.isDirectory() ? duBytes(p) : statSync(p).size;
  }
  return total;
}

function ensureRestic(log: (l: string) => void): string {
  const which = spawnSync('sh', ['-c', 'command -v restic'], { encoding: 'utf8' });
  if (which.status === 0) return which.stdout.trim();
  log('restic missing: apt-get install -y restic');
  let r = spawnSync('apt-get', ['install', '-y', 'restic'], { stdio: 'ignore' });
  if (r.status !== 0) {
    spawnSync('apt-get', ['update'], { stdio: 'ignore' });
    r = spawnSync('apt-get', ['install', '-y', 'restic'], { stdio: 'ignore' });
  }
  const again = spawnSync('sh', ['-c', 'command -v restic'], { encoding: 'utf8' });
  if (again.status !== 0) throw new Error('cannot install restic (apt-get install -y restic failed)');
  return again.stdout.trim();
}

export async function run(args: string[], log: (line: string) => void): Promise<Record<string, unknown>> {
  const mib = arg(args, '--mib', 1024);
  const chainMib = arg(args, '--chain-mib', 256);
  const chainRounds = Math.max(1, arg(args, '--chain-rounds', 7));
  const noRestic = args.includes('--no-restic');
  const batchPages = arg(args, '--batch-pages', 2048);
  // --ingest-only: the two ingest phases and nothing else (for profiling them).
  const ingestOnly = args.includes('--ingest-only');
  const pi = args.indexOf('--profile');
  serverNodeArgs = [...NODE_FLAGS, ...(pi >= 0 && args[pi + 1] ? ['--cpu-prof', '--cpu-prof-dir', args[pi + 1]!] : [])];
  const pages = (mib * 1024 * 1024) / PAGE;
  const work = mkdtempSync(join(tmpdir(), 'exa-bench-store-'));
  const figures: Record<string, unknown> = { load_average_start: +loadavg()[0]!.toFixed(2), image_mib: mib, chain_image_mib: chainMib, batch_pages: batchPages, cpus: (await import('node:os')).cpus().length };
  try {
    const server = await startServer(join(work, 'data'), log);
    const c = await StoreClient.connect(server.address);
    const regions = [{ name: 'mem', pageCount: pages, address: '', flags: 0 }];
    log(`generating a ${mib} MiB image`);
    const img = genBytes('bench/store/base', pages * PAGE);
    const all = [...Array(pages).keys()];

    // ---- ingest, unique pages ----
    let batches = makeBatches(img, all, batchPages, true);
    const gib = mib / 1024;
    const cpuFigures = (name: string, m: { clientCpu: number; serverCpu: number; clientFaults?: number; serverFaults?: number }): void => {
      figures[`${name}_server_cpu_s_per_gib`] = +(m.serverCpu / gib).toFixed(2);
      figures[`${name}_client_cpu_s_per_gib`] = +(m.clientCpu / gib).toFixed(2);
      // Minor page faults per GiB (fresh memory: each costs a zeroed 4 KiB page in the kernel).
      if (m.serverFaults !== undefined) figures[`${name}_server_faults_per_gib`] = Math.round(m.serverFaults / gib);
      if (m.clientFaults !== undefined) figures[`${name}_client_faults_per_gib`] = Math.round(m.clientFaults / gib);
    };
    // The transport alone (bench/transport-server.ts) carries the same batches
    // before the store's ingest and again after it; the ratios below are
    // against the mean of the two.
    const transport = await startServer(null, log);
    const tc = await StoreClient.connect(transport.address);
    const transportIngest = async (): Promise<number> => {
      const m = await measured(transport.proc, () => tc.putCheckpoint({ job: 'transport', parent: 0, regions }, batches));
      cpuFigures('transport_ingest', m);
      return m.s;
    };
    const disk = [diskWriteMbps(work, img, 512)];
    const ti: number[] = [await transportIngest()];
    const u = await measured(server.proc, () => c.putCheckpoint({ job: 'bench-unique', parent: 0, regions }, batches));
    figures.ingest_unique_mbps = +(mib / u.s).toFixed(1);
    cpuFigures('ingest_unique', u);
    log(`ingest unique: ${mib} MiB in ${u.s.toFixed(2)} s = ${(mib / u.s).toFixed(0)} MiB/s`);

    // ---- ingest, everything already stored ----
    const d = await measured(server.proc, () => c.putCheckpoint({ job: 'bench-dedup', parent: 0, regions }, batches));
    figures.ingest_dedup_mbps = +(mib / d.s).toFixed(1);
    cpuFigures('ingest_dedup', d);
    if (d.v.newPages !== 0) throw new Error(`dedup ingest stored ${d.v.newPages} pages`);
    log(`ingest dedup: ${mib} MiB in ${d.s.toFixed(2)} s = ${(mib / d.s).toFixed(0)} MiB/s`);
    ti.push(await transportIngest());
    const tiMean = (ti[0]! + ti[1]!) / 2;
    figures.transport_ingest_mbps = +(mib / tiMean).toFixed(1);
    figures.transport_ingest_runs_mbps = ti.map((t) => +(mib / t).toFixed(1));
    figures.ingest_unique_vs_transport = +(tiMean / u.s).toFixed(3);
    log(`transport alone, upload: ${(mib / tiMean).toFixed(0)} MiB/s; the store's unique ingest reaches ${(tiMean / u.s).toFixed(2)} of it`);
    disk.push(diskWriteMbps(work, img, 512));
    const diskMean = (disk[0]! + disk[1]!) / 2;
    figures.disk_write_mbps = +diskMean.toFixed(1);
    figures.disk_write_runs_mbps = disk.map((x) => +x.toFixed(1));
    figures.ingest_unique_vs_disk = +((mib / u.s) / diskMean).toFixed(3);
    log(`disk (O_DIRECT appends + fdatasync): ${diskMean.toFixed(0)} MiB/s; the store's unique ingest reaches ${((mib / u.s) / diskMean).toFixed(2)} of it`);
    batches = [];
    if (ingestOnly) {
      c.close();
      tc.close();
      figures.load_average_end = +loadavg()[0]!.toFixed(2);
      return figures;
    }

    // ---- ingest with the client library hashing ----
    const img2 = genBytes('bench/store/base2', pages * PAGE);
    const h = await timeIt(() => c.putCheckpoint({ job: 'bench-unique-2', parent: 0, regions }, makeBatches(img2, all, batchPages, false)));
    figures.ingest_unique_client_hash_mbps = +(mib / h.s).toFixed(1);
    log(`ingest unique, client hashing: ${(mib / h.s).toFixed(0)} MiB/s`);

    // ---- restore ----
    // Alternating with the transport alone streaming the same number of pages from memory.
    const rs: number[] = [], trs: number[] = [];
    const rcpu: { clientCpu: number; serverCpu: number; s: number }[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await measured(server.proc, () => restoreTo(c, 'bench-unique', 1, null));
      if (r.v !== pages * PAGE) throw new Error(`restore returned ${r.v} bytes`);
      rs.push(r.s);
      rcpu.push(r);
      const t = await timeIt(() => restoreTo(tc, 'transport', 0, null, pages));
      if (t.v !== pages * PAGE) throw new Error(`transport restore returned ${t.v} bytes`);
      trs.push(t.s);
    }
    tc.close();
    figures.transport_restore_mbps = +(mib / median(trs)).toFixed(1);
    figures.restore_vs_transport = +(median(trs) / median(rs)).toFixed(3);
    figures.restore_mbps = +(mib / median(rs)).toFixed(1);
    cpuFigures('restore', rcpu.find((r) => r.s === median(rs))!);
    log(`restore: ${mib} MiB in ${median(rs).toFixed(2)} s (median of 3) = ${(mib / median(rs)).toFixed(0)} MiB/s; transport alone ${(mib / median(trs)).toFixed(0)} MiB/s`);
    await stopServer(transport.proc);

    // ---- chain of 100 ----
    const cpages = (chainMib * 1024 * 1024) / PAGE;
    const cregions = [{ name: 'mem', pageCount: cpages, address: '', flags: 0 }];
    const cimg = genBytes('bench/store/chain', cpages * PAGE);
    const rand = rng(1);
    const metaBefore = (await c.stat()).metadataBytes;
    let parent = (await c.putCheckpoint({ job: 'bench-chain', parent: 0, regions: cregions }, makeBatches(cimg, [...Array(cpages).keys()], batchPages, true))).checkpoint;
    log(`chain: 99 increments of 1% over ${chainMib} MiB`);
    const incS: number[] = [];
    for (let k = 2; k <= 100; k++) {
      const dirty = new Set<number>();
      while (dirty.size < cpages / 100) dirty.add(Math.floor(rand() * cpages));
      const list = [...dirty].sort((a, b) => a - b);
      for (const p of list) genBytes(`chain/${k}/${p}`, PAGE).copy(cimg, p * PAGE);
      const inc = await timeIt(() => c.putCheckpoint({ job: 'bench-chain', parent, regions: cregions }, makeBatches(cimg, list, batchPages, true)));
      parent = inc.v.checkpoint;
      incS.push(inc.s);
    }
    figures.chain_increment_s = +median(incS).toFixed(4);
    figures.chain_metadata_bytes_per_checkpoint = Math.round(((await c.stat()).metadataBytes - metaBefore) / 100);
    figures.chain_full_map_bytes = cpages * ENTRY_BYTES;
    log(`chain: an increment took ${median(incS).toFixed(3)} s (median); manifests ${figures.chain_metadata_bytes_per_checkpoint} bytes a checkpoint (a full map: ${cpages * ENTRY_BYTES})`);
    // One untimed restore of each first (the packs were written with O_DIRECT:
    // whichever restore came first paid for reading them from disk), then
    // chainRounds rounds, the order alternating within a round so that neither
    // side always follows the other; medians. CPU seconds (client + server)
    // per restore are reported beside the times: on a shared machine they
    // move much less than wall time.
    await restoreTo(c, 'bench-chain', 1, null);
    await restoreTo(c, 'bench-chain', parent, null);
    const t1: number[] = [], t100: number[] = [], cpu1: number[] = [], cpu100: number[] = [];
    for (let i = 0; i < chainRounds; i++) {
      for (const which of i % 2 === 0 ? [1, parent] : [parent, 1]) {
        const m = await measured(server.proc, () => restoreTo(c, 'bench-chain', which, null));
        (which === 1 ? t1 : t100).push(m.s);
        (which === 1 ? cpu1 : cpu100).push(m.clientCpu + m.serverCpu);
      }
    }
    figures.restore_chain_rounds = chainRounds;
    figures.restore_chain1_s = +median(t1).toFixed(3);
    figures.restore_chain100_s = +median(t100).toFixed(3);
    figures.restore_chain100_vs_chain1 = +(median(t100) / median(t1)).toFixed(3);
    figures.restore_chain100_vs_chain1_cpu = +(median(cpu100) / median(cpu1)).toFixed(3);
    log(`chain restore: #1 ${median(t1).toFixed(3)} s, #100 ${median(t100).toFixed(3)} s (medians of ${chainRounds}); CPU ${median(cpu1).toFixed(2)} / ${median(cpu100).toFixed(2)} s`);
    // The same after `exastore compact` (the latest checkpoint's pages rewritten in image order).
    // Operator commands on the 101-checkpoint job: verify (every page of every checkpoint) and compact.
    const ver = await timeIt(() => c.verify({ job: 'bench-chain' }));
    if (!ver.v.ok) throw new Error(`verify of bench-chain found problems: ${ver.v.problems[0]?.message}`);
    figures.chain_verify_s = +ver.s.toFixed(2);
    const ct = await timeIt(() => c.compact('bench-chain'));
    figures.chain_compact_s = +ct.s.toFixed(2);
    figures.chain_compact_pages_moved = ct.v.pagesMoved;
    await restoreTo(c, 'bench-chain', parent, null);
    const c1: number[] = [], c100: number[] = [], ccpu1: number[] = [], ccpu100: number[] = [];
    for (let i = 0; i < chainRounds; i++) {
      for (const which of i % 2 === 0 ? [1, parent] : [parent, 1]) {
        const m = await measured(server.proc, () => restoreTo(c, 'bench-chain', which, null));
        (which === 1 ? c1 : c100).push(m.s);
        (which === 1 ? ccpu1 : ccpu100).push(m.clientCpu + m.serverCpu);
      }
    }
    figures.restore_chain100_compacted_s = +median(c100).toFixed(3);
    figures.restore_chain100_compacted_vs_chain1 = +(median(c100) / median(c1)).toFixed(3);
    figures.restore_chain100_compacted_vs_chain1_cpu = +(median(ccpu100) / median(ccpu1)).toFixed(3);
    log(`after compact: #1 ${median(c1).toFixed(3)} s, #100 ${median(c100).toFixed(3)} s; CPU ${median(ccpu1).toFixed(2)} / ${median(ccpu100).toFixed(2)} s`);
    c.close();

    // ---- side by side with restic ----
    if (!noRestic) {
      const restic = ensureRestic(log);
      figures.restic_version = execFileSync(restic, ['version'], { encoding: 'utf8' }).trim();
      const file = join(work, 'image.bin');
      const repo = join(work, 'restic-repo');
      const env = { ...process.env, RESTIC_PASSWORD: 'bench', RESTIC_REPOSITORY: repo, RESTIC_CACHE_DIR: join(work, 'restic-cache') };
      execFileSync(restic, ['init', '--quiet'], { env });
      // A fresh store for exastore's side, so stored bytes count only this data.
      const s2 = await startServer(join(work, 'data-vs-restic'), log);
      const c2 = await StoreClient.connect(s2.address);
      const rimg = genBytes('bench/store/restic', pages * PAGE);
      writeFileSync(file, rimg);
      let exaIngest = 0, resticIngest = 0;
      const rr = rng(99);
      let p2 = 0;
      for (let k = 0; k <= 10; k++) {
        let list: number[];
        if (k === 0) list = all;
        else {
          const dirty = new Set<number>();
          while (dirty.size < pages / 100) dirty.add(Math.floor(rr() * pages));
          list = [...dirty].sort((a, b) => a - b);
          const fd = openSync(file, 'r+');
          for (const p of list) {
            const page = genBytes(`restic/${k}/${p}`, PAGE);
            page.copy(rimg, p * PAGE);
            writeSync(fd, page, 0, PAGE, p * PAGE);
          }
          closeSync(fd);
        }
        // exastore: the dirty pages, hashed by the producer (the checkpointer) as in ingest_unique.
        const b = makeBatches(rimg, list, batchPages, true);
        const e = await timeIt(() => c2.putCheckpoint({ job: 'vs-restic', parent: p2, regions }, b));
        p2 = e.v.checkpoint;
        exaIngest += e.s;
        const r = await timeIt(async () => { execFileSync(restic, ['backup', '--quiet', file], { env, cwd: work }); });
        resticIngest += r.s;
        log(`increment ${k}: exastore ${e.s.toFixed(2)} s, restic ${r.s.toFixed(2)} s`);
      }
      const exaStored = (await c2.stat()).storedBytes + (await c2.stat()).metadataBytes;
      c2.close();
      await stopServer(s2.proc);
      const exaDisk = duBytes(join(work, 'data-vs-restic'));
      const resticStored = duBytes(repo);
      // Restore the latest checkpoint / snapshot to a file, each from a cold page cache
      // with no writeback in flight (restic's repository is ~10 GiB of fresh dirty pages
      // by now, which would otherwise be flushed during whichever restore runs first).
      const coldCache = (): void => {
        spawnSync('sync');
        try { writeFileSync('/proc/sys/vm/drop_caches', '3\n'); } catch { log('cannot drop the page cache (not root?): restores run warm'); }
      };
      coldCache();
      const s3 = await startServer(join(work, 'data-vs-restic'), log);
      const c3 = await StoreClient.connect(s3.address);
      const out1 = join(work, 'restore-exa.bin');
      const er = await timeIt(() => restoreTo(c3, 'vs-restic', p2, out1));
      c3.close();
      await stopServer(s3.proc);
      const target = join(work, 'restore-restic');
      coldCache();
      const rres = await timeIt(async () => { execFileSync(restic, ['restore', 'latest', '--quiet', '--target', target], { env }); });
      const restoredFile = join(target, file);
      if (!existsSync(restoredFile)) throw new Error(`restic restore produced no ${restoredFile}`);
      // Both restored images must equal the current file.
      const check = (f: string): boolean => createHash('sha256').update(spawnSync('cat', [f], { maxBuffer: 2 * pages * PAGE }).stdout).digest().equals(createHash('sha256').update(rimg).digest());
      if (!check(out1)) throw new Error('exastore restore differs from the image');
      if (!check(restoredFile)) throw new Error('restic restore differs from the image');
      figures.exastore_stored_bytes = exaStored;
      figures.exastore_disk_bytes = exaDisk;
      figures.restic_stored_bytes = resticStored;
      figures.exastore_ingest_s = +exaIngest.toFixed(2);
      figures.restic_ingest_s = +resticIngest.toFixed(2);
      figures.exastore_restore_s = +er.s.toFixed(2);
      figures.restic_restore_s = +rres.s.toFixed(2);
      figures.stored_bytes_ratio_vs_restic = +(exaDisk / resticStored).toFixed(3);
      figures.ingest_time_ratio_vs_restic = +(exaIngest / resticIngest).toFixed(3);
      figures.restore_time_ratio_vs_restic = +(er.s / rres.s).toFixed(3);
    }
    figures.load_average_end = +loadavg()[0]!.toFixed(2);
    return figures;
  } finally {
    for (const p of [...started]) await stopServer(p);
    rmSync(work, { recursive: true, force: true });
  }
}
