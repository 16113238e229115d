/**
 * The TCP data path between agents: two agents (each with its DMA backend on
 * its own socket and loopback port) and real job processes on each. A job
 * looks up a peer's buffer on the other agent through the route table, then
 * writes and reads it in every mode (sync, poll, callback, promises, 256
 * outstanding); the bytes land exactly, the owning agent applies them (its
 * servedOps, not the sender's engine), over one reused connection, and
 * remote writes go through the owner's checkpointer (the next increment
 * holds exactly the written page).
 */
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../../src/native.js';
import { apply } from '../checkpointer/helpers.js';
import { DmaPeer, PAGE, cleanup, drain, fillBytes, startAgents } from './helpers.js';

afterEach(cleanup);

const SIZE = 64 * PAGE;
const sha = (u8: Uint8Array): string => createHash('sha256').update(u8).digest('hex');
const filled = (size: number, seed: number): Uint8Array => {
  const u8 = new Uint8Array(size);
  fillBytes(u8, 0, size, seed);
  return u8;
};

async function crossPair() {
  const [A, B] = startAgents(2);
  native.dmaSetRoute(A!.be, 'jb', B!.addr);
  const [pa, pb] = await Promise.all([DmaPeer.start(A!.socketPath, 'ja'), DmaPeer.start(B!.socketPath, 'jb')]);
  await pa.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 1 });
  await pa.ok({ cmd: 'alloc', name: 'land', size: SIZE });
  await pb.ok({ cmd: 'alloc', name: 'win', size: SIZE, seed: 2 });
  await pb.ok({ cmd: 'grant', name: 'win', peer: 'ja', perm: 'rw' });
  expect(await pa.ok({ cmd: 'lookup', peer: 'jb', name: 'win' })).toMatchObject({ size: SIZE, canRead: true, canWrite: true });
  return { A: A!, B: B!, pa, pb };
}

describe('DMA between jobs on two agents', () => {
  it('the backend listens on a loopback TCP port by default and reports it', () => {
    const [A] = startAgents(1);
    expect(A!.addr).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(Number(A!.addr.split(':')[1])).toBeGreaterThan(0);
  });

  it('sync write and read move exactly the requested bytes, applied by the owning agent', async () => {
    const { A, B, pa, pb } = await crossPair();
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', loff: 100, peer: 'jb', name: 'win', roff: 7000, len: 5000 });
    const win = filled(SIZE, 2);
    win.set(filled(SIZE, 1).subarray(100, 5100), 7000);
    expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe(sha(win));
    await pa.ok({ cmd: 'sync', op: 'read', local: 'land', loff: PAGE, peer: 'jb', name: 'win', roff: 0, len: 3 * PAGE });
    expect((await pa.ok({ cmd: 'hash', name: 'land', off: PAGE, len: 3 * PAGE })).sha).toBe(sha(win.subarray(0, 3 * PAGE)));
    expect((await pa.ok({ cmd: 'hash', name: 'land', off: 0, len: PAGE })).sha).toBe(sha(new Uint8Array(PAGE)));
    const sa = native.dmaBackendStats(A.be);
    const sb = native.dmaBackendStats(B.be);
    expect(sa).toMatchObject({ remoteOps: 2, remoteBytes: 5000 + 3 * PAGE, ops: 0, links: 1 });
    expect(sb).toMatchObject({ servedOps: 2, servedBytes: 5000 + 3 * PAGE, ops: 0 });
  });

  for (const mode of ['poll', 'callback'] as const) {
    it(`${mode} mode: 3,000 writes then 3,000 reads with up to 256 outstanding complete once each, bytes exact, one connection`, async () => {
      const { A, pa, pb } = await crossPair();
      await pa.ok({ cmd: 'queue', q: 1, mode });
      const w = await pa.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'jb', name: 'win', n: 3000, len: 3 * 1024 + 17, span: SIZE - PAGE, depth: 256 });
      expect(w).toMatchObject({ n: 3000, ok: 3000, distinctTags: 3000 });
      const span = Math.floor((SIZE - PAGE) / (3 * 1024 + 17)) * (3 * 1024 + 17);
      expect((await pb.ok({ cmd: 'hash', name: 'win', len: span })).sha).toBe(sha(filled(SIZE, 1).subarray(0, span)));
      // the other way: read the peer's buffer (now src's bytes) into land
      await pb.ok({ cmd: 'fill', name: 'win', seed: 7 });
      const r = await pa.ok({ cmd: 'burst', q: 1, op: 'read', local: 'land', peer: 'jb', name: 'win', n: 3000, len: 8192, span: SIZE, depth: 256 });
      expect(r).toMatchObject({ n: 3000, ok: 3000, distinctTags: 3000 });
      expect((await pa.ok({ cmd: 'hash', name: 'land' })).sha).toBe(sha(filled(SIZE, 7)));
      expect(native.dmaBackendStats(A.be)).toMatchObject({ remoteOps: 6000, links: 1 }); // one connection, reused
    });
  }

  it('promise-style writes and reads (256 at a time) resolve once the owning agent applied them', async () => {
    const { pa, pb } = await crossPair();
    expect(await pa.ok({ cmd: 'pburst', op: 'write', local: 'src', peer: 'jb', name: 'win', n: 1024, len: PAGE, span: SIZE })).toMatchObject({ n: 1024, ok: 1024 });
    expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe(sha(filled(SIZE, 1)));
    await pb.ok({ cmd: 'fill', name: 'win', seed: 3 });
    expect(await pa.ok({ cmd: 'pburst', op: 'read', local: 'land', peer: 'jb', name: 'win', n: 512, len: 2 * PAGE, span: SIZE })).toMatchObject({ n: 512, ok: 512 });
    expect((await pa.ok({ cmd: 'hash', name: 'land' })).sha).toBe(sha(filled(SIZE, 3)));
  });

  it("remote writes from another agent join the owner's next checkpoint increment, and reads land in the reader's", async () => {
    const { A, B, pa, pb } = await crossPair();
    const sizes = { win: SIZE };
    const image = new Map<string, Buffer>();
    apply(image, await drain(await B.agent.checkpoint('jb', { full: true })), sizes);
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', loff: 0, peer: 'jb', name: 'win', roff: 5 * PAGE + 10, len: 100 });
    const inc = await drain(await B.agent.checkpoint('jb'));
    expect([...inc.keys()]).toEqual(['win:5']);
    apply(image, inc, sizes);
    expect(sha(image.get('win')!)).toBe((await pb.ok({ cmd: 'hash', name: 'win' })).sha);
    // a remote read writes into the reader's own buffer: through its agent's checkpointer too
    await drain(await A.agent.checkpoint('ja', { full: true }));
    await pa.ok({ cmd: 'sync', op: 'read', local: 'land', loff: 9 * PAGE, peer: 'jb', name: 'win', roff: 0, len: 2 * PAGE });
    expect([...(await drain(await A.agent.checkpoint('ja'))).keys()].sort()).toEqual(['land:10', 'land:9']);
  });

  it('several job pairs across the two agents share the one connection per direction', async () => {
    const [A, B] = startAgents(2);
    for (const j of ['b1', 'b2']) native.dmaSetRoute(A!.be, j, B!.addr);
    for (const j of ['a1', 'a2']) native.dmaSetRoute(B!.be, j, A!.addr);
    const ps = await Promise.all([
      DmaPeer.start(A!.socketPath, 'a1'), DmaPeer.start(A!.socketPath, 'a2'),
      DmaPeer.start(B!.socketPath, 'b1'), DmaPeer.start(B!.socketPath, 'b2'),
    ]);
    const pairs: [DmaPeer, DmaPeer][] = [[ps[0]!, ps[2]!], [ps[1]!, ps[3]!], [ps[2]!, ps[0]!], [ps[3]!, ps[1]!]];
    for (const p of ps) await p.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: p.job.charCodeAt(0) * 3 + p.job.charCodeAt(1) });
    for (const p of ps) await p.ok({ cmd: 'alloc', name: 'win', size: SIZE });
    for (const [from, to] of pairs) await to.ok({ cmd: 'grant', name: 'win', peer: from.job, perm: 'write' });
    for (const [from, to] of pairs) {
      await from.ok({ cmd: 'lookup', peer: to.job, name: 'win' });
      await from.ok({ cmd: 'queue', q: 1, mode: 'poll' });
    }
    const rs = await Promise.all(pairs.map(([from, to]) => from.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: to.job, name: 'win', n: 800, len: PAGE, span: SIZE })));
    for (const r of rs) expect(r).toMatchObject({ n: 800, ok: 800 });
    for (const [from, to] of pairs) expect((await to.ok({ cmd: 'hash', name: 'win' })).sha).toBe(sha(filled(SIZE, from.job.charCodeAt(0) * 3 + from.job.charCodeAt(1))));
    expect(native.dmaBackendStats(A!.be).links).toBe(1);
    expect(native.dmaBackendStats(B!.be).links).toBe(1);
  });
});
