/**
 * The Node workload API: a separate Node process allocates regions as
 * ArrayBuffers, writes through typed arrays, takes app-initiated checkpoints
 * (Workload.checkpoint() resolves when the pause is over) and frees a region
 * (its ArrayBuffer is detached). The agent's images hold exactly its bytes.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import { PAGE, cleanup, drain, repoRoot, startAgent, track, until, type ImagePage } from './helpers.js';

afterEach(cleanup);

describe('Node workload API', () => {
  it('regions are ArrayBuffers; app-initiated checkpoints capture exactly their bytes', async () => {
    const images: Promise<Map<string, ImagePage>>[] = [];
    // the second request arrives while the first checkpoint still streams: the agent serializes them
    const a = startAgent({ onAppCheckpoint: (c) => { const p = drain(c, 20); images.push(p); return p.then(() => undefined); } });
    const p = track(spawn(process.execPath, [join(repoRoot, 'test', 'checkpointer', 'fixtures', 'node-workload.mjs'), a.socketPath, 'nodejob'], { stdio: ['ignore', 'pipe', 'pipe'] }));
    let stderr = '';
    p.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    const steps: Record<string, unknown>[] = [];
    createInterface({ input: p.stdout! }).on('line', (l) => steps.push(JSON.parse(l) as Record<string, unknown>));
    const code = await new Promise((r) => p.once('close', r)); // 'close': every output line read
    expect(code, stderr).toBe(0);
    await until(() => images.length === 2, 'two checkpoints');
    const [img1, img2] = await Promise.all(images);

    expect(steps[0]).toMatchObject({ step: 'allocated', size: 16 * PAGE, regions: [{ name: 'empty', size: PAGE }, { name: 'grid', size: 16 * PAGE }] });
    expect(img1!.size).toBe(17);
    for (let pg = 0; pg < 16; pg++) {
      const want = Buffer.alloc(PAGE);
      for (let i = 0; i < PAGE; i++) want[i] = (pg * 31 + pg * PAGE + i) & 255;
      const got = img1!.get(`grid:${pg}`)!;
      expect(got.bytes!.equals(want), `grid page ${pg}`).toBe(true);
    }
    expect(img1!.get('empty:0')!.zero).toBe(true);
    expect([...img2!.keys()]).toEqual(['grid:3']);
    expect(img2!.get('grid:3')!.bytes!.equals(Buffer.alloc(PAGE, 0xab))).toBe(true);
    const freed = steps.find((s) => s.step === 'freed')!;
    expect(freed.byteLengthAfterFree).toBe(0);
    expect(freed.regions).toEqual([{ name: 'empty', size: PAGE }]);
    expect(freed.dup).toMatchObject({ code: 'ALREADY_EXISTS' });
    expect((freed.dup as { message: string }).message).toMatch(/"grid" already exists/);
  });
});
