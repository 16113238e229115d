/**
 * The phase-stamped DMA rings (native/include/exa_dma_wire.h), driven from C
 * (native/test/exa_dma_selftest.c, mode "ring", a separate process attached as
 * two jobs to a real agent): 300 laps of both rings (past the 16-bit wrap of
 * the completion stamps) in polling mode at random depths up to the full ring
 * and in callback mode, every completion once, in order, with the bytes right;
 * a right stamp over a garbage body is refused with the reason and the queue
 * keeps serving; a slot stamped one behind (a torn or replayed entry: neither
 * new nor the previous lap's) is refused with the reason and that queue is no
 * longer served; and 3000 operations posted while the backend sleeps and
 * completed while the frontend spins, arms or sleeps, at random sizes and
 * pauses, each complete (a lost wake-up would leave a wait hanging for 2 s).
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { nativeBuildDir } from '../../src/native.js';
import { track } from '../checkpointer/helpers.js';
import { cleanupPeersFirst, startAgent } from './helpers.js';

afterEach(cleanupPeersFirst);

describe('the phase-stamped DMA rings', () => {
  it('wrap over many laps, refuse garbage stamps and bodies with reasons, and lose no wake-up between polling and sleeping', async () => {
    const a = startAgent();
    const p = track(spawn(join(nativeBuildDir, 'exa_dma_selftest'), [a.socketPath, 'ring'], { stdio: ['ignore', 'pipe', 'pipe'] }));
    let out = '';
    p.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
    p.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
    const code = await new Promise<number | null>((resolve, reject) => {
      p.once('close', (c) => resolve(c));
      p.once('error', reject);
    });
    expect(out).toBe('ok ring laps=300\n');
    expect(code).toBe(0);
  }, 60_000);
});
