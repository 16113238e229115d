/**
 * The DMA API of exa.h from C (native/test/exa_dma_selftest.c, a separate
 * process attached as two jobs): callback mode delivers every completion once
 * on libexa's thread, polling mode with exa_dma_wait (and its timeout), sync
 * calls with their error text, mode misuse refused, and exa_dma_close with
 * operations still outstanding joins the callback thread and returns (no
 * callback afterwards), while the other session keeps working; a hand-made
 * client offering a ring memfd not sealed against shrinking is refused (the
 * agent maps the ring: a shrink would make it fault).
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { nativeBuildDir } from '../../src/native.js';
import { track } from '../checkpointer/helpers.js';
import { cleanupPeersFirst, startAgent } from './helpers.js';

afterEach(cleanupPeersFirst);

describe('the C DMA API', () => {
  it('callback, polling and sync modes work and close while busy returns', async () => {
    const a = startAgent();
    const p = track(spawn(join(nativeBuildDir, 'exa_dma_selftest'), [a.socketPath], { stdio: ['ignore', 'pipe', 'pipe'] }));
    let out = '';
    p.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
    p.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
    const code = await new Promise<number | null>((resolve, reject) => {
      p.once('close', (c) => resolve(c)); // 'close': all output read
      p.once('error', reject); // e.g. not built: fail at once, not at the test timeout
    });
    expect(out).toMatch(/^ok delivered-before-close=\d+/);
    expect(code).toBe(0);
  });
});
