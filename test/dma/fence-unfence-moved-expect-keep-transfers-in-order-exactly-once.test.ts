/**
 * The migration primitives the control plane drives (dmaFence, dmaUnfence,
 * dmaMoved, dmaExpect). The writer sends a sequence of 4-byte writes of
 * increasing values (op i writes the value i) to ONE location of the peer's
 * buffer: if an operation were lost, applied twice late (stale replay) or
 * overtaken by a later one, the location would not end with the last value,
 * or the owners' applied-operation counts would not add up to the number
 * posted. Held operations complete after unfence (same host and across
 * hosts), land on the new host after a move, and fail with a reason after
 * the hold timeout; a fence resolves only once the operations already
 * started have finished, and hands back the job's grants.
 */
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../../src/native.js';
import { DmaPeer, PAGE, cleanup, drain, startAgents, until } from './helpers.js';

afterEach(cleanup);

const SIZE = 16 * PAGE;
const N = 3000; // < SIZE / 4 values in src

/** Post the sequence: op i writes src[4i..4i+4) (= i) to win[0..4). */
function sequence(writer: DmaPeer, peer: string, depth = 32) {
  return writer.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer, name: 'win', n: N, len: 4, span: 4, lspan: 4 * N, depth });
}

async function writerAndTarget(wSock: string, tSock: string, target = 'jb') {
  const [w, t] = await Promise.all([DmaPeer.start(wSock, 'ja'), DmaPeer.start(tSock, target)]);
  await w.ok({ cmd: 'alloc', name: 'src', size: SIZE });
  await w.ok({ cmd: 'seqfill', name: 'src' });
  await w.ok({ cmd: 'queue', q: 1, mode: 'poll' });
  await t.ok({ cmd: 'alloc', name: 'win', size: SIZE });
  await t.ok({ cmd: 'grant', name: 'win', peer: 'ja', perm: 'rw' });
  await w.ok({ cmd: 'lookup', peer: target, name: 'win' });
  return [w, t] as const;
}

const value = async (p: DmaPeer): Promise<number> => (await p.ok({ cmd: 'u32', name: 'win', off: 0 })).value as number;

describe('fence, unfence, moved and expect', () => {
  for (const where of ['same agent', 'two agents'] as const) {
    it(`${where}: operations held by a fence are applied after unfence, in posting order, exactly once`, async () => {
      const [A, B] = startAgents(2);
      const owner = where === 'same agent' ? A! : B!;
      native.dmaSetRoute(A!.be, 'jb', B!.addr);
      const [w, t] = await writerAndTarget(A!.socketPath, owner.socketPath);
      const fenced = await native.dmaFence(owner.be, 'jb');
      expect(fenced.grants).toEqual([{ buffer: 'win', peer: 'ja', perms: 3 }]);
      expect(await native.dmaFence(owner.be, 'jb')).toEqual(fenced); // idempotent
      const run = sequence(w, 'jb');
      run.catch(() => undefined);
      await until(() => native.dmaBackendStats(A!.be).heldOps + native.dmaBackendStats(owner.be).heldOps > 0, 'an operation held');
      await new Promise((r) => setTimeout(r, 300));
      expect(await value(t)).toBe(0); // nothing applied while fenced
      const applied = (s: native.NativeDmaBackendStats) => (where === 'same agent' ? s.ops : s.servedOps);
      expect(applied(native.dmaBackendStats(owner.be))).toBe(0);
      native.dmaUnfence(owner.be, 'jb');
      expect(await run).toMatchObject({ n: N, ok: N, distinctTags: N });
      expect(await value(t)).toBe(N - 1);
      expect(applied(native.dmaBackendStats(owner.be))).toBe(N);
    });
  }

  it('a fence resolves only once the operation already started on the job has finished', async () => {
    const [A] = startAgents(1);
    const [w] = await writerAndTarget(A!.socketPath, A!.socketPath);
    // the target's page 3 is being saved (held): a write into it is started and must wait for the saver
    const c = await A!.agent.checkpoint('jb', { full: true, mode: 'sync', testHold: { region: 'win', page: 3, when: 'during' } });
    const drained = drain(c);
    await until(() => c.testHeld(), 'saver held on page 3');
    await w.ok({ cmd: 'post', q: 1, op: 'write', local: 'src', loff: 40, peer: 'jb', name: 'win', roff: 3 * PAGE, len: 4, tag: 9 });
    await new Promise((r) => setTimeout(r, 200)); // the backend thread picks the write up and blocks in it
    let resolved = false;
    const f = native.dmaFence(A!.be, 'jb').then((x) => { resolved = true; return x; });
    await new Promise((r) => setTimeout(r, 300));
    expect(resolved).toBe(false); // the started write still runs
    c.testReleaseHold();
    await drained;
    expect((await f).grants).toEqual([{ buffer: 'win', peer: 'ja', perms: 3 }]);
    expect((await w.ok({ cmd: 'wait', q: 1, n: 1 })).completions).toMatchObject([{ tag: 9, error: null }]);
    native.dmaUnfence(A!.be, 'jb');
  });

  for (const where of ['another agent', 'the old host'] as const) {
    it(`a writer on ${where}: a sequence running through fence, expect, re-registration and move ends on the new host with the last value, each write applied once`, async () => {
      const [A, B, C] = startAgents(3);
      const wAgent = where === 'another agent' ? A! : B!;
      native.dmaSetRoute(A!.be, 'jb', B!.addr);
      const [w, oldT] = await writerAndTarget(wAgent.socketPath, B!.socketPath);
      const run = sequence(w, 'jb', 16);
      run.catch(() => undefined);
      const applied = () => {
        const b = native.dmaBackendStats(B!.be);
        return (where === 'the old host' ? b.ops : b.servedOps) + native.dmaBackendStats(C!.be).servedOps;
      };
      await until(() => applied() > 200, 'writes under way on the old host');
      // the control plane migrates jb from B to C
      const { grants } = await native.dmaFence(B!.be, 'jb');
      const atFence = applied();
      expect(grants).toEqual([{ buffer: 'win', peer: 'ja', perms: 3 }]);
      native.dmaExpect(C!.be, 'jb', grants, 30000);
      await new Promise((r) => setTimeout(r, 100));
      expect(applied()).toBe(atFence); // held everywhere meanwhile
      const newT = await DmaPeer.start(C!.socketPath, 'jb');
      await newT.ok({ cmd: 'alloc', name: 'win', size: SIZE }); // re-registers; the grants come with the move, not from the job
      native.dmaMoved(B!.be, 'jb', C!.addr);
      oldT.proc.kill('SIGKILL');
      expect(await run).toMatchObject({ n: N, ok: N, distinctTags: N });
      expect(await value(newT)).toBe(N - 1);
      expect(applied()).toBe(N); // none lost, none applied twice
      expect(native.dmaBackendStats(C!.be).servedOps).toBeGreaterThan(0);
      expect(native.dmaBackendStats(wAgent.be).heldOps).toBeGreaterThan(0);
      // a later GRANT by the job is idempotent, and new operations go straight to the new host
      await newT.ok({ cmd: 'grant', name: 'win', peer: 'ja', perm: 'rw' });
      await w.ok({ cmd: 'sync', op: 'write', local: 'src', loff: 4 * 7, peer: 'jb', name: 'win', len: 4 });
      expect(await value(newT)).toBe(7);
    });
  }

  it('a job that moves twice (B -> C -> D): a writer left behind on B follows it to D; the last value wins, each write applied once', async () => {
    const [B, C, D] = startAgents(3);
    const [w, t1] = await writerAndTarget(B!.socketPath, B!.socketPath);
    const run = sequence(w, 'jb', 16);
    run.catch(() => undefined);
    const applied = () => native.dmaBackendStats(B!.be).ops + native.dmaBackendStats(C!.be).servedOps + native.dmaBackendStats(D!.be).servedOps;
    const move = async (from: typeof B, to: typeof B, old: DmaPeer): Promise<DmaPeer> => {
      const { grants } = await native.dmaFence(from!.be, 'jb');
      native.dmaExpect(to!.be, 'jb', grants, 30000);
      const t = await DmaPeer.start(to!.socketPath, 'jb');
      await t.ok({ cmd: 'alloc', name: 'win', size: SIZE });
      native.dmaMoved(from!.be, 'jb', to!.addr);
      old.proc.kill('SIGKILL');
      return t;
    };
    await until(() => applied() > 200, 'writes under way on B');
    const t2 = await move(B, C, t1);
    await until(() => native.dmaBackendStats(C!.be).servedOps > 200, 'writes under way on C');
    const t3 = await move(C, D, t2);
    expect(await run).toMatchObject({ n: N, ok: N, distinctTags: N });
    expect(await value(t3)).toBe(N - 1);
    expect(applied()).toBe(N);
    expect(native.dmaBackendStats(D!.be).servedOps).toBeGreaterThan(0);
  });

  it('closing either agent while operations are held returns promptly; nothing hangs', async () => {
    const [A, B] = startAgents(2);
    native.dmaSetRoute(A!.be, 'jb', B!.addr);
    const [w] = await writerAndTarget(A!.socketPath, B!.socketPath);
    const pl = await DmaPeer.start(A!.socketPath, 'jl');
    await pl.ok({ cmd: 'alloc', name: 'win', size: SIZE });
    await pl.ok({ cmd: 'grant', name: 'win', peer: 'ja', perm: 'rw' });
    await w.ok({ cmd: 'lookup', peer: 'jl', name: 'win' });
    await w.ok({ cmd: 'queue', q: 2, mode: 'callback' });
    await native.dmaFence(B!.be, 'jb');
    await native.dmaFence(A!.be, 'jl');
    // (the fixture runs one command at a time: the remote burst first, then the local one)
    const remote = w.cmd({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'jb', name: 'win', n: N, len: 4, span: 4, lspan: 4 * N, depth: 32 });
    const local = w.cmd({ cmd: 'burst', q: 2, op: 'write', local: 'src', peer: 'jl', name: 'win', n: 100, len: 4, span: 4, lspan: 400 });
    await until(() => native.dmaBackendStats(A!.be).heldOps > 0, 'remote operations held');
    // the owner's agent goes away: the held remote operations fail (they cannot be re-sent anywhere)
    let t0 = Date.now();
    await B!.agent.close();
    expect(Date.now() - t0).toBeLessThan(5000);
    const r = (await remote) as unknown as { n: number; ok: number; errors: { error: { code: string; message: string } }[] };
    expect(r).toMatchObject({ n: N, ok: 0 }); // every one completed, as a failure
    expect(r.errors.length).toBeGreaterThan(0);
    for (const { error } of r.errors) expect(error.message).toMatch(/job jb/);
    await new Promise((r) => setTimeout(r, 300)); // the local burst is posted now, and held
    expect(await value(pl)).toBe(0);
    expect(native.dmaBackendStats(A!.be).ops).toBe(0);
    // the sender's agent goes away with local operations held: the job sees its backend leave
    t0 = Date.now();
    await A!.agent.close();
    expect(Date.now() - t0).toBeLessThan(5000);
    // (callback mode: libexa completes every operation left with the reason)
    const l = (await local) as unknown as { n: number; ok: number; errors: { error: { code: string; message: string } }[] };
    expect(l).toMatchObject({ n: 100, ok: 0 });
    for (const { error } of l.errors) expect(error).toMatchObject({ code: 'UNAVAILABLE', message: expect.stringMatching(/DMA backend \(agent\) went away/) });
  });

  it('an operation held longer than the hold timeout fails with a reason naming the job; after unfence the next one passes', async () => {
    const [B] = startAgents(1);
    const [A] = startAgents(1, { dma: { holdTimeoutMs: 300 } });
    native.dmaSetRoute(A!.be, 'jb', B!.addr);
    const [w, t] = await writerAndTarget(A!.socketPath, B!.socketPath);
    const lt = await DmaPeer.start(A!.socketPath, 'jl');
    await lt.ok({ cmd: 'alloc', name: 'win', size: SIZE });
    await lt.ok({ cmd: 'grant', name: 'win', peer: 'ja', perm: 'rw' });
    await w.ok({ cmd: 'lookup', peer: 'jl', name: 'win' });
    await native.dmaFence(B!.be, 'jb');
    await native.dmaFence(A!.be, 'jl');
    for (const peer of ['jb', 'jl']) {
      const t0 = Date.now();
      const r = await w.cmd({ cmd: 'sync', op: 'write', local: 'src', peer, name: 'win', len: 4 });
      expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
      expect(r).toMatchObject({ ok: false, code: 'UNAVAILABLE' });
      expect(r.message).toMatch(new RegExp(`held for more than 300 ms \\(hold timeout\\).*job ${peer}`));
    }
    native.dmaUnfence(B!.be, 'jb');
    native.dmaUnfence(A!.be, 'jl');
    await w.ok({ cmd: 'sync', op: 'write', local: 'src', loff: 8, peer: 'jb', name: 'win', len: 4 });
    await w.ok({ cmd: 'sync', op: 'write', local: 'src', loff: 12, peer: 'jl', name: 'win', len: 4 });
    expect(await value(t)).toBe(2);
    expect(await value(lt)).toBe(3);
  });
});
