/**
 * The C halo-exchange demo (native/demo/halo.c): two jobs on one agent, each
 * owning half of a 1-D heat grid in a checkpointable region, exchange their
 * edge cells every iteration with one-sided DMA writes into each other's
 * granted "halo" buffer. Their checksums equal, bit for bit, the same
 * computation done in one process without DMA, also while the agent takes
 * live checkpoints of both jobs during the run (remote writes and
 * checkpoints together). Single host only: the two-agent run and the
 * migration of a rank mid-run need the TCP data path and migrating sessions,
 * which do not exist yet.
 */
import { execFileSync, spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { nativeBuildDir } from '../../src/native.js';
import { track } from '../checkpointer/helpers.js';
import { cleanupPeersFirst, drain, startAgent } from './helpers.js';

afterEach(cleanupPeersFirst);

const BIN = join(nativeBuildDir, 'exa_halo');
const ARGS = ['--n', '65536', '--iters', '3000'];

function rank(socketPath: string, r: number): { done: Promise<string> } {
  const p = track(spawn(BIN, ['--socket', socketPath, '--job', `halo${r}`, '--rank', String(r), '--peer', `halo${1 - r}`, ...ARGS], { stdio: ['ignore', 'pipe', 'pipe'] }));
  let out = '';
  let err = '';
  p.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
  p.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
  return {
    done: new Promise((resolve, reject) => {
      p.once('error', reject);
      // 'close', not 'exit': only then has all of its stdout been read (on a loaded machine 'exit' can come first)
      p.once('close', (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`rank ${r} exited ${code}: ${err}`))));
    }),
  };
}

describe('the halo-exchange demo', () => {
  it('two jobs exchanging halos by DMA print the single-process checksums, with live checkpoints during the run', async () => {
    const want = execFileSync(BIN, ['--reference', ...ARGS], { encoding: 'utf8' }).trim().split('\n');
    expect(want.length).toBe(2);
    const a = startAgent();
    const r0 = rank(a.socketPath, 0);
    const r1 = rank(a.socketPath, 1);
    let done = false;
    const both = Promise.all([r0.done, r1.done]).finally(() => { done = true; });
    both.catch(() => undefined);
    // checkpoint both ranks while they run (until they finish)
    let checkpoints = 0;
    while (!done) {
      for (const job of ['halo0', 'halo1']) {
        if (done || !a.agent.jobs().some((j) => j.id === job && j.regions.some((r) => r.name === 'halo'))) continue;
        try {
          await drain(await a.agent.checkpoint(job));
          checkpoints++;
        } catch { /* the job finished meanwhile */ }
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    const [c0, c1] = await both;
    expect([c0, c1]).toEqual(want);
    expect(checkpoints).toBeGreaterThan(0);
  });
});
