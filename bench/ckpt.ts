/**
 * Benchmark `ckpt`: the live incremental checkpointer on a 1 GiB region of a
 * separate C workload process (native/test/exa_workload.c).
 *
 *   npm run bench -- ckpt [--json] [--gib N] [--seconds S] [--rounds R] [--no-sync-only]
 *
 * Figures (side by side in one run, as ratios where it matters):
 *  - pause_ms_per_gib: pause of a live checkpoint (first of a chain, every page
 *    written before), per GiB, with the default write-protect ahead of the stop;
 *    pause_wp_inside_pause_ms_per_gib: the same with every page write-protected
 *    inside the pause (the seed's order); stopcopy_pause_ms_per_gib: the blocking
 *    baseline (job stopped while every page is copied and SHA-256 hashed).
 *  - resync_longest_stop_ms / resync_total_ms_per_gib: after a live-sync save the
 *    region goes back to async tracking in 64 MiB steps, one short stop each
 *    (longest one, and their sum); full_resave_pause_ms_per_gib: a
 *    forced full checkpoint of a region already on async tracking.
 *  - save_gbps: rate at which that checkpoint's pages reach the JS consumer.
 *  - slowdown_pct: a workload writing random pages of the region at a fixed
 *    rate that dirties ~10% of its pages per second, with a checkpoint every
 *    second, against the same work without checkpoints (fixed amount of work,
 *    wall time compared; spin work is calibrated, not paced by the clock).
 *  - slowdown_pct_sync_only: the same with async tracking disabled (the pure
 *    seed scheme: every first write after a checkpoint is a ~60 us sync fault),
 *    shorter run: why the hybrid exists.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { LocalAgent, type Checkpoint, type CheckpointStats } from '../src/agent/local-agent.js';
import { nativeBuildDir } from '../src/native.js';

const PAGE = 4096;

class Driver {
  private waiters: ((l: string) => void)[] = [];
  constructor(readonly proc: ChildProcess) {
    createInterface({ input: proc.stdout! }).on('line', (l) => this.waiters.shift()?.(l));
  }
  async ok(line: string): Promise<string> {
    const a = await new Promise<string>((r) => { this.waiters.push(r); this.proc.stdin!.write(`${line}\n`); });
    if (!a.startsWith('ok')) throw new Error(`workload: "${line}" -> ${a}`);
    return a;
  }
}

function arg(args: string[], name: string, def: number): number {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] !== undefined ? Number(args[i + 1]) : def;
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const round = (x: number, d = 2): number => Math.round(x * 10 ** d) / 10 ** d;

async function consume(c: Checkpoint): Promise<{ bytes: number; stats: CheckpointStats }> {
  let bytes = 0;
  for await (const b of c) bytes += b.data.byteLength;
  return { bytes, stats: await c.result };
}

/** Writes needed per second so that ~10% of N pages are distinct: N * -ln(0.9). */
function writesPerSecond(pages: number): number {
  return Math.round(pages * -Math.log(0.9));
}

export async function run(args: string[], log: (line: string) => void): Promise<Record<string, unknown>> {
  const gib = arg(args, '--gib', 1);
  const seconds = arg(args, '--seconds', 5);
  const rounds = arg(args, '--rounds', 3);
  const syncOnly = !args.includes('--no-sync-only');
  const pages = Math.round((gib * 2 ** 30) / PAGE);
  const dir = mkdtempSync(join(tmpdir(), 'exa-bench-'));
  const agent = LocalAgent.listen({ socketPath: join(dir, 'agent.sock') });
  agent.on('log', (l: string) => log(l));
  const procs: ChildProcess[] = [];
  const start = async (job: string): Promise<Driver> => {
    const p = spawn(join(nativeBuildDir, 'exa_workload'), ['--socket', join(dir, 'agent.sock'), '--job', job], { stdio: ['pipe', 'pipe', 'inherit'] });
    procs.push(p);
    const d = new Driver(p);
    await d.ok('attach');
    await d.ok(`alloc r ${pages}`);
    return d;
  };
  try {
    // ---- pause: stop-and-copy baseline vs the first live checkpoint of a chain, 3 fresh jobs ----
    const stopcopy: number[] = [];
    const live: number[] = [];
    const resync: number[] = [];
    const resyncTotal: number[] = [];
    const save: number[] = [];
    const detail: Record<string, number>[] = [];
    let w: Driver | null = null;
    for (let i = 0; i < 3; i++) {
      if (w) w.proc.kill('SIGKILL');
      w = await start(`bench-${i}`);
      log(`job bench-${i}: filling ${gib} GiB ...`);
      await w.ok('fill r 1');
      stopcopy.push(agent.stopAndCopy(`bench-${i}`).pauseUs);
      const t0 = performance.now();
      const c = await agent.checkpoint(`bench-${i}`);
      const t1 = performance.now();
      const { bytes, stats } = await consume(c);
      const t2 = performance.now();
      live.push(stats.pauseUs);
      resync.push(stats.resyncPauseUs);
      resyncTotal.push(stats.resyncTotalUs);
      save.push(bytes / ((t2 - t1) / 1000) / 1e9);
      detail.push({ stop_us: stats.pauseStopUs, protect_us: stats.pauseProtectUs, preprotect_us: stats.preprotectUs });
      log(`round ${i}: stop-and-copy ${round(stopcopy[i]! / 1000)} ms, live pause ${round(stats.pauseUs / 1000)} ms ` +
        `(stop ${round(stats.pauseStopUs / 1000)}, protect ${round(stats.pauseProtectUs / 1000)}, write-protect ahead of the stop ${round(stats.preprotectUs / 1000)} ms; ` +
        `checkpoint() resolved after ${round(t1 - t0)} ms), back to async tracking in ${stats.resyncStops} stops (longest ${round(stats.resyncPauseUs / 1000)} ms, total ${round(stats.resyncTotalUs / 1000)} ms), ` +
        `saved ${round(bytes / 2 ** 30, 3)} GiB at ${round(save[i]!)} GB/s`);
    }
    // the seed's order for comparison: write-protect inside the pause (fresh job, first checkpoint)
    w!.proc.kill('SIGKILL');
    w = await start('bench-wp');
    await w.ok('fill r 1');
    const cw = await agent.checkpoint('bench-wp', { preprotect: false });
    const wpStats = (await consume(cw)).stats;
    log(`write-protect inside the pause: pause ${round(wpStats.pauseUs / 1000)} ms (protect ${round(wpStats.pauseProtectUs / 1000)} ms)`);
    w.proc.kill('SIGKILL');
    w = await start('bench-2');
    await w.ok('fill r 1');
    await consume(await agent.checkpoint('bench-2'));
    const job = `bench-2`;
    // a forced full re-save of a region already on async tracking pays the uffd switch inside the pause
    const cf = await agent.checkpoint(job, { full: true });
    const fullStats = (await consume(cf)).stats;
    log(`full re-save (async -> sync switch in the pause): pause ${round(fullStats.pauseUs / 1000)} ms (scan ${round(fullStats.pauseScanUs / 1000)}, protect ${round(fullStats.pauseProtectUs / 1000)})`);

    // ---- slowdown at ~10% dirty pages per second ----
    const wd = w!;
    const calib = Number((await wd.ok('calib')).split(' ')[1]); // ns per 1000 spins
    const wps = writesPerSecond(pages);
    const perWriteNs = 1e9 / wps;
    let spins = Math.max(0, Math.round(((perWriteNs - 1000) / calib) * 1000)); // ~1 us for the page write itself
    // calibrate on the real loop: one second of work should take one second
    for (let i = 0; i < 2; i++) {
      const us = Number((await wd.ok(`work r ${wps} ${spins}`)).split(' ')[1]);
      spins = Math.max(0, Math.round(spins * (1e6 / us)));
    }
    const writes = wps * seconds;
    log(`slowdown: ${wps} random page writes/s (~10% of ${pages} pages), ${spins} spins between writes, ${writes} writes`);

    const work = async (d: Driver, job: string, every: number | null): Promise<{ us: number; ckpts: CheckpointStats[] }> => {
      const ckpts: CheckpointStats[] = [];
      // start from a fresh increment so the first timed checkpoint holds ~1 s of writes
      if (every !== null) await consume(await agent.checkpoint(job));
      let done = false;
      const p = d.ok(`work r ${writes} ${spins}`).then((a) => { done = true; return Number(a.split(' ')[1]); });
      if (every !== null) {
        while (!done) {
          await Promise.race([p, new Promise((r) => setTimeout(r, every))]);
          if (done) break;
          const c = await agent.checkpoint(job);
          ckpts.push((await consume(c)).stats);
        }
      }
      return { us: await p, ckpts };
    };

    const base: number[] = [];
    const withCk: number[] = [];
    let ckStats: CheckpointStats[] = [];
    // the machine is shared: alternate without/with, several rounds, compare medians
    for (let i = 0; i < rounds; i++) {
      base.push((await work(wd, job, null)).us);
      const r = await work(wd, job, 1000);
      withCk.push(r.us);
      ckStats = ckStats.concat(r.ckpts);
      log(`slowdown round ${i}: without ${round(base[i]! / 1e6, 3)} s, with ${r.ckpts.length} checkpoints ${round(r.us / 1e6, 3)} s`);
    }
    const slowdown = (median(withCk) / median(base) - 1) * 100;
    const perRound = base.map((b, i) => round((withCk[i]! / b - 1) * 100));
    const incPause = ckStats.map((s) => s.pauseUs / 1000);
    const incResync = ckStats.map((s) => s.resyncPauseUs / 1000);
    const dirty = ckStats.map((s) => s.dirtyPages);
    const scanMs = median(ckStats.map((s) => s.pauseScanUs / 1000));
    const copyMs = median(ckStats.map((s) => s.pauseCopyUs / 1000));
    log(`incremental pause breakdown (median): scan ${round(scanMs)} ms, copy to shadow ${round(copyMs)} ms, stop ${round(median(ckStats.map((s) => s.pauseStopUs / 1000)))} ms`);
    log(`incremental checkpoints: pause median ${round(median(incPause))} ms (max ${round(Math.max(...incPause))}), ` +
      `dirty pages median ${median(dirty)} (${round((median(dirty) / pages) * 100, 1)}%), ` +
      `copy-path regions ${ckStats.filter((s) => s.copyRegions > 0).length}/${ckStats.length}`);

    // ---- the pure seed scheme (sync tracking only), shorter ----
    let slowdownSync: number | null = null;
    let syncDetail: Record<string, unknown> | null = null;
    if (syncOnly) {
      process.env.EXA_CKPT_NO_ASYNC = '1'; // read by the agent when the job attaches
      const ws = await start('bench-sync');
      delete process.env.EXA_CKPT_NO_ASYNC;
      await ws.ok('fill r 1');
      const wr = wps * Math.max(2, Math.round(seconds / 2));
      // baseline before the first checkpoint: nothing is write-protected yet
      const b0 = Number((await ws.ok(`work r ${wr} ${spins}`)).split(' ')[1]);
      await consume(await agent.checkpoint('bench-sync'));
      const ck: CheckpointStats[] = [];
      let done = false;
      const p = ws.ok(`work r ${wr} ${spins}`).then((a) => { done = true; return Number(a.split(' ')[1]); });
      while (!done) {
        await Promise.race([p, new Promise((r) => setTimeout(r, 1000))]);
        if (done) break;
        ck.push((await consume(await agent.checkpoint('bench-sync'))).stats);
      }
      const b1 = await p;
      slowdownSync = (b1 / b0 - 1) * 100;
      syncDetail = { without_s: round(b0 / 1e6, 3), with_s: round(b1 / 1e6, 3), checkpoints: ck.length, sync_pause_ms_median: ck.length ? round(median(ck.map((s) => s.pauseUs / 1000))) : null };
      log(`sync-only: without ${round(b0 / 1e6, 3)} s, with ${ck.length} checkpoints ${round(b1 / 1e6, 3)} s`);
    }

    const pauseMs = median(live) / 1000 / gib;
    const stopMs = median(stopcopy) / 1000 / gib;
    return {
      gib,
      pause_ms_per_gib: round(pauseMs),
      stopcopy_pause_ms_per_gib: round(stopMs),
      pause_vs_stopcopy_pct: round((pauseMs / stopMs) * 100),
      pause_breakdown_us: detail[1],
      pause_wp_inside_pause_ms_per_gib: round(wpStats.pauseUs / 1000 / gib),
      full_resave_pause_ms_per_gib: round(fullStats.pauseUs / 1000 / gib),
      resync_longest_stop_ms: round(median(resync) / 1000),
      resync_total_ms_per_gib: round(median(resyncTotal) / 1000 / gib),
      save_gbps: round(median(save)),
      slowdown_pct: round(slowdown),
      slowdown_pct_per_round: perRound,
      slowdown_base_s_median: round(median(base) / 1e6, 3),
      slowdown_writes_per_s: wps,
      incremental_pause_ms_median: round(median(incPause)),
      incremental_resync_ms_median: round(median(incResync)),
      incremental_dirty_pct_median: round((median(dirty) / pages) * 100, 1),
      incremental_scan_ms_median: round(scanMs),
      incremental_copy_ms_median: round(copyMs),
      slowdown_pct_sync_only: slowdownSync === null ? null : round(slowdownSync),
      sync_only: syncDetail,
    };
  } finally {
    for (const p of procs) p.kill('SIGKILL');
    await agent.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
