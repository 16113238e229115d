/**
 * The final checkpoint of a migration (leaveStopped) keeps every thread of the
 * job stopped after the pause, so the source never runs past the image
 * instant; the image is complete, and SIGCONT (a failed move) resumes the job
 * where it was.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { afterEach, expect, it } from 'vitest';
import { WorkloadProc, drain, killAll, removeTempDirs, startAgent, until } from './helpers.js';

afterEach(async () => { await killAll(); removeTempDirs(); });

function threadStates(pid: number): string[] {
  return readdirSync(`/proc/${pid}/task`).map((t) => {
    const stat = readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  });
}

it('leaves every thread stopped after the pause, and SIGCONT resumes the job', async () => {
  const { agent, socketPath } = startAgent();
  try {
    const w = WorkloadProc.start(socketPath, 'final-1');
    await w.ok('attach');
    await w.ok('alloc r 64');
    await w.ok('fill r 3');
    await w.ok('writers 2 r');
    const c = await agent.checkpoint('final-1', { leaveStopped: true });
    const pages = await drain(c);
    const stats = await c.result;
    expect(stats.pagesSaved + stats.zeroPages).toBe(64);
    expect(pages.size).toBe(64);
    const pid = w.proc.pid!;
    await until(() => threadStates(pid).every((s) => s === 'T' || s === 't'), 'all threads stopped');
    // Still stopped a while later: nothing resumed it behind the caller's back.
    await new Promise((r) => setTimeout(r, 300));
    expect(threadStates(pid).every((s) => s === 'T' || s === 't')).toBe(true);
    process.kill(pid, 'SIGCONT');
    await until(() => threadStates(pid).some((s) => s !== 'T' && s !== 't'), 'job running again');
    const total = Number((await w.ok('stopwriters')).split(' ')[1]);
    expect(total).toBeGreaterThan(0);
  } finally {
    await agent.close();
  }
});
