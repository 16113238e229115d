/**
 * One-sided writes and reads between jobs on one agent, through the whole
 * remoting path (frontend rings -> backend thread -> engine -> completion
 * ring): the bytes land exactly where asked, in polling and callback
 * (interrupt) mode, with synchronous and asynchronous calls, with hundreds of
 * operations outstanding, and for several job pairs served at once.
 */
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../../src/native.js';
import { DmaPeer, PAGE, cleanupPeersFirst, fillBytes, startAgent } from './helpers.js';

afterEach(cleanupPeersFirst);

const sha = (u8: Uint8Array): string => createHash('sha256').update(u8).digest('hex');
function expected(size: number, seed: number, off = 0, len = size): string {
  const u8 = new Uint8Array(size);
  fillBytes(u8, 0, size, seed);
  return sha(u8.subarray(off, off + len));
}

async function pair(socketPath: string, a: string, b: string, size: number): Promise<[DmaPeer, DmaPeer]> {
  const [pa, pb] = await Promise.all([DmaPeer.start(socketPath, a), DmaPeer.start(socketPath, b)]);
  await pa.ok({ cmd: 'alloc', name: 'src', size, seed: 1 });
  await pa.ok({ cmd: 'alloc', name: 'land', size });
  await pb.ok({ cmd: 'alloc', name: 'win', size, seed: 2 });
  await pb.ok({ cmd: 'grant', name: 'win', peer: a, perm: 'rw' });
  const lk = await pa.ok({ cmd: 'lookup', peer: b, name: 'win' });
  expect(lk).toMatchObject({ size, canRead: true, canWrite: true });
  return [pa, pb];
}

describe('DMA writes and reads', () => {
  it('sync write and read move exactly the requested bytes', async () => {
    const a = startAgent();
    const [pa, pb] = await pair(a.socketPath, 'ja', 'jb', 16 * PAGE);
    // write src[100..100+5000) -> win[7000..12000)
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', loff: 100, peer: 'jb', name: 'win', roff: 7000, len: 5000 });
    const win = new Uint8Array(16 * PAGE);
    fillBytes(win, 0, win.length, 2);
    const src = new Uint8Array(16 * PAGE);
    fillBytes(src, 0, src.length, 1);
    win.set(src.subarray(100, 5100), 7000);
    expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe(sha(win));
    // read win[0..3 pages) -> land[PAGE..)
    await pa.ok({ cmd: 'sync', op: 'read', local: 'land', loff: PAGE, peer: 'jb', name: 'win', roff: 0, len: 3 * PAGE });
    expect((await pa.ok({ cmd: 'hash', name: 'land', off: PAGE, len: 3 * PAGE })).sha).toBe(sha(win.subarray(0, 3 * PAGE)));
    expect((await pa.ok({ cmd: 'hash', name: 'land', off: 0, len: PAGE })).sha).toBe(sha(new Uint8Array(PAGE)));
  });

  for (const mode of ['poll', 'callback'] as const) {
    it(`async ${mode} mode: 2,000 operations with up to 256 outstanding all complete once, correctly`, async () => {
      const a = startAgent();
      const [pa, pb] = await pair(a.socketPath, 'ma', 'mb', 64 * PAGE);
      await pa.ok({ cmd: 'queue', q: 1, mode });
      const w = await pa.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'mb', name: 'win', n: 2000, len: 1024, span: 64 * PAGE });
      expect(w).toMatchObject({ n: 2000, ok: 2000, distinctTags: 2000 });
      expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe(expected(64 * PAGE, 1));
      const r = await pa.ok({ cmd: 'burst', q: 1, op: 'read', local: 'land', peer: 'mb', name: 'win', n: 500, len: 8192, span: 64 * PAGE });
      expect(r).toMatchObject({ n: 500, ok: 500 });
      expect((await pa.ok({ cmd: 'hash', name: 'land' })).sha).toBe(expected(64 * PAGE, 1));
    });
  }

  it('a queue refuses a 257th outstanding operation (RESOURCE_EXHAUSTED) until completions are reaped', async () => {
    const a = startAgent();
    const [pa] = await pair(a.socketPath, 'fa', 'fb', 4 * PAGE);
    await pa.ok({ cmd: 'queue', q: 1, mode: 'poll' });
    for (let i = 0; i < 256; i++) await pa.ok({ cmd: 'post', q: 1, op: 'write', local: 'src', peer: 'fb', name: 'win', len: 64, tag: i });
    const over = await pa.cmd({ cmd: 'post', q: 1, op: 'write', local: 'src', peer: 'fb', name: 'win', len: 64, tag: 999 });
    expect(over).toMatchObject({ ok: false, code: 'RESOURCE_EXHAUSTED' });
    const got = await pa.ok({ cmd: 'wait', q: 1, n: 256 });
    expect((got.completions as unknown[]).length).toBe(256);
    await pa.ok({ cmd: 'post', q: 1, op: 'write', local: 'src', peer: 'fb', name: 'win', len: 64, tag: 1000 });
  });

  it('several job pairs on one agent transfer at the same time, each into its own peer', async () => {
    const a = startAgent();
    const pairs = await Promise.all([0, 1, 2].map((i) => pair(a.socketPath, `sa${i}`, `sb${i}`, 32 * PAGE)));
    await Promise.all(pairs.map(([pa], i) => pa.ok({ cmd: 'queue', q: 1, mode: i % 2 ? 'callback' : 'poll' })));
    const res = await Promise.all(pairs.map(([pa], i) => pa.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: `sb${i}`, name: 'win', n: 1500, len: 2048, span: 32 * PAGE })));
    for (const r of res) expect(r).toMatchObject({ n: 1500, ok: 1500 });
    for (const [, pb] of pairs) expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe(expected(32 * PAGE, 1));
    expect(native.dmaBackendStats(a.agent.dmaBackend!).clients).toBe(6);
  });
});
