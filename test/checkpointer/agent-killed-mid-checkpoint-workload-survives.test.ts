/**
 * If the agent dies (SIGKILL) in the middle of a live save, the workload must
 * keep running: its threads blocked on write faults wake up (the agent held
 * the only references to the uffds, so the kernel drops the registration),
 * and it finishes its work. Here one writer is blocked in case 4 (the page is
 * being saved, the saver is held) when the agent is killed.
 * A job the agent has SIGSTOPped (the pause, or a migration's final
 * checkpoint) must not stay stopped when the agent dies or lets go of it:
 * the agent's guardian process (native/ckpt/guardian.h) resumes it.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { WorkloadProc, drain, killAll, removeTempDirs, repoRoot, startAgent, tempDir, track, until } from './helpers.js';

/** The process state letter from /proc (T = stopped). */
function procState(pid: number): string {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
}

afterEach(async () => {
  await killAll();
  removeTempDirs();
});

describe('agent SIGKILLed mid-checkpoint', () => {
  it('the workload, including a thread blocked on a write fault, keeps running and finishes', async () => {
    const sock = join(tempDir(), 'agent.sock');
    const ap = track(spawn(process.execPath, [join(repoRoot, 'test', 'checkpointer', 'fixtures', 'agent-proc.mjs'), sock], { stdio: ['pipe', 'pipe', 'inherit'] }));
    const lines: string[] = [];
    createInterface({ input: ap.stdout! }).on('line', (l) => lines.push(l));
    await until(() => lines.includes('ready'), 'agent ready');

    const w = WorkloadProc.start(sock, 'victim');
    await w.ok('attach');
    await w.ok('alloc r 16');
    await w.ok('fill r 1');
    ap.stdin!.write('ckpt victim r 8 during\n');
    await until(() => lines.includes('held'), 'saver held on page 8');
    await w.ok('bgwrite r 8 2'); // case 4: blocks until page 8 is saved, which never happens
    await w.ok('write r 12 2'); // case 3 works meanwhile
    let stats: { faults: number[] } | null = null;
    await until(() => {
      ap.stdin!.write('stats\n');
      const s = lines.filter((l) => l.startsWith('stats ')).pop();
      stats = s ? JSON.parse(s.slice(6)) : null;
      return stats !== null && stats.faults[3] === 1;
    }, 'writer blocked in case 4');
    expect(w.hasEvent('bgdone 8')).toBe(false);

    ap.kill('SIGKILL');
    await new Promise((r) => ap.once('exit', r));
    // the blocked writer completes, and the job goes on writing every page and exits normally
    await w.event('bgdone 8');
    await w.ok('fill r 3');
    await w.ok('write r 8 4');
    await w.ok('exit');
    expect(await w.exited()).toBe(0);
  });
});

describe('a job the agent stopped', () => {
  it('is resumed by the guardian when the agent process is SIGKILLed while the job is stopped', async () => {
    const sock = join(tempDir(), 'agent.sock');
    const ap = track(spawn(process.execPath, [join(repoRoot, 'test', 'checkpointer', 'fixtures', 'agent-proc.mjs'), sock], { stdio: ['pipe', 'pipe', 'inherit'] }));
    const lines: string[] = [];
    createInterface({ input: ap.stdout! }).on('line', (l) => lines.push(l));
    await until(() => lines.includes('ready'), 'agent ready');
    const w = WorkloadProc.start(sock, 'paused');
    await w.ok('attach');
    await w.ok('alloc r 16');
    await w.ok('fill r 1');
    ap.stdin!.write('stop paused\n');
    await until(() => lines.includes('stopped'), 'checkpoint that leaves the job stopped');
    expect(procState(w.proc.pid!)).toBe('T');
    ap.kill('SIGKILL');
    await new Promise((r) => ap.once('exit', r));
    await until(() => procState(w.proc.pid!) !== 'T', 'the job resumed after its agent died');
    await w.ok('fill r 2');
    await w.ok('exit');
    expect(await w.exited()).toBe(0);
  });

  it('is resumed when the agent is closed while the job is stopped', async () => {
    const { agent, socketPath } = startAgent();
    const w = WorkloadProc.start(socketPath, 'held-at-close');
    await w.ok('attach');
    await w.ok('alloc r 8');
    await w.ok('fill r 1');
    await drain(await agent.checkpoint('held-at-close', { leaveStopped: true }));
    expect(procState(w.proc.pid!)).toBe('T');
    await agent.close();
    await until(() => procState(w.proc.pid!) !== 'T', 'the job resumed when its agent closed');
    await w.ok('fill r 2');
  });
});
