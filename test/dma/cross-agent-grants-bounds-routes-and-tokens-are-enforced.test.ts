/**
 * Across agents the owning agent decides: a lookup or an operation from a job
 * on another agent is refused with a reason (naming the job, buffer and
 * agent) unless granted, inside the buffer, and the buffer exists. Routes:
 * a job the route table does not know is asked of the control plane
 * (onRouteMiss, answered by dmaSetRoute, or null = unknown); without any
 * route the lookup fails with NOT_FOUND. A cluster token mismatch refuses the
 * agent connection.
 */
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../../src/native.js';
import { DmaPeer, PAGE, cleanup, startAgents, until } from './helpers.js';

afterEach(cleanup);

const SIZE = 16 * PAGE;

describe('cross-agent DMA refuses what was not granted, and finds jobs through routes', () => {
  it('an ungranted lookup, a revoked grant, a read-only grant, bad offsets and lengths, a freed buffer: each refused with a reason', async () => {
    const [A, B] = startAgents(2);
    native.dmaSetRoute(A!.be, 'owner', B!.addr);
    const [pa, pb] = await Promise.all([DmaPeer.start(A!.socketPath, 'asker'), DmaPeer.start(B!.socketPath, 'owner')]);
    await pa.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 1 });
    await pb.ok({ cmd: 'alloc', name: 'win', size: SIZE });
    await pb.ok({ cmd: 'alloc', name: 'ro', size: SIZE });

    const ungranted = await pa.cmd({ cmd: 'lookup', peer: 'owner', name: 'win' });
    expect(ungranted).toMatchObject({ ok: false, code: 'PERMISSION_DENIED' });
    expect(ungranted.message).toMatch(new RegExp(`job owner has not granted buffer "win" to job asker \\(agent ${B!.addr}\\)`));
    const missing = await pa.cmd({ cmd: 'lookup', peer: 'owner', name: 'nope' });
    expect(missing).toMatchObject({ ok: false, code: 'NOT_FOUND' });
    expect(missing.message).toMatch(/job owner has no DMA buffer "nope" on agent/);

    await pb.ok({ cmd: 'grant', name: 'win', peer: 'asker', perm: 'rw' });
    await pb.ok({ cmd: 'grant', name: 'ro', peer: 'asker', perm: 'read' });
    await pa.ok({ cmd: 'lookup', peer: 'owner', name: 'win' });
    expect(await pa.ok({ cmd: 'lookup', peer: 'owner', name: 'ro' })).toMatchObject({ canRead: true, canWrite: false });

    const roWrite = await pa.cmd({ cmd: 'sync', op: 'write', local: 'src', peer: 'owner', name: 'ro', len: 16 });
    expect(roWrite).toMatchObject({ ok: false, code: 'PERMISSION_DENIED' });
    expect(roWrite.message).toMatch(/job owner has not granted write access to buffer "ro" to job asker/);
    const outside = await pa.cmd({ cmd: 'sync', op: 'write', local: 'src', peer: 'owner', name: 'win', roff: SIZE - 8, len: 16 });
    expect(outside).toMatchObject({ ok: false, code: 'INVALID_ARGUMENT' });
    expect(outside.message).toMatch(/is outside buffer "win" of job owner/);
    const zero = await pa.cmd({ cmd: 'sync', op: 'read', local: 'src', peer: 'owner', name: 'win', len: 0 });
    expect(zero).toMatchObject({ ok: false, code: 'INVALID_ARGUMENT' });

    // the owner revokes after the lookup: the owning agent refuses the next operation
    await pb.ok({ cmd: 'grant', name: 'win', peer: 'asker', perm: 'none' });
    const revoked = await pa.cmd({ cmd: 'sync', op: 'write', local: 'src', peer: 'owner', name: 'win', len: 16 });
    expect(revoked).toMatchObject({ ok: false, code: 'PERMISSION_DENIED' });
    expect(revoked.message).toMatch(new RegExp(`job owner has not granted write access to buffer "win" to job asker \\(agent ${B!.addr}\\)`));
    // freed: refused by the owner with the reason
    await pb.ok({ cmd: 'free', name: 'ro' });
    const freed = await pa.cmd({ cmd: 'sync', op: 'read', local: 'src', peer: 'owner', name: 'ro', len: 16 });
    expect(freed).toMatchObject({ ok: false, code: 'NOT_FOUND' });
    expect(freed.message).toMatch(/job owner has no DMA buffer "ro" on agent/);
    // the asker and both backends keep working
    await pb.ok({ cmd: 'grant', name: 'win', peer: 'asker', perm: 'write' });
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'owner', name: 'win', len: SIZE });
    expect(native.dmaBackendStats(B!.be).servedOps).toBe(1);
  });

  it('a job no route names: NOT_FOUND at once without a control plane; with one, onRouteMiss is asked and its answer used', async () => {
    const misses: string[] = [];
    const [B] = startAgents(1);
    const [A] = startAgents(1, { dma: { onRouteMiss: (job) => {
      misses.push(job);
      // answer later, as a control plane would
      setTimeout(() => native.dmaSetRoute(A!.be, job, job === 'owner' ? B!.addr : null), 50);
    } } });
    const [C] = startAgents(1);
    const [pa, pb, pc] = await Promise.all([DmaPeer.start(A!.socketPath, 'asker'), DmaPeer.start(B!.socketPath, 'owner'), DmaPeer.start(C!.socketPath, 'lonely')]);
    await pb.ok({ cmd: 'alloc', name: 'win', size: SIZE });
    await pb.ok({ cmd: 'grant', name: 'win', peer: 'asker', perm: 'rw' });
    await pb.ok({ cmd: 'grant', name: 'win', peer: 'lonely', perm: 'rw' });
    await pa.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 4 });

    const none = await pc.cmd({ cmd: 'lookup', peer: 'owner', name: 'win' });
    expect(none).toMatchObject({ ok: false, code: 'NOT_FOUND' });
    expect(none.message).toMatch(/job owner has no DMA buffer "win" on this host/);

    expect(await pa.ok({ cmd: 'lookup', peer: 'owner', name: 'win' })).toMatchObject({ size: SIZE });
    expect(misses).toEqual(['owner']);
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'owner', name: 'win', len: SIZE });
    expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe((await pa.ok({ cmd: 'hash', name: 'src' })).sha);

    const unknown = await pa.cmd({ cmd: 'lookup', peer: 'ghost', name: 'win' });
    expect(unknown).toMatchObject({ ok: false, code: 'NOT_FOUND' });
    expect(unknown.message).toMatch(/job ghost is not known on any host/);
    expect(misses).toEqual(['owner', 'ghost']);
  });

  it('an operation whose route was withdrawn waits for the control plane: its answer routes it, null fails it naming the job', async () => {
    let answer: string | null = null;
    const asked: string[] = [];
    const [B] = startAgents(1);
    const [A] = startAgents(1, { dma: { onRouteMiss: (job) => {
      asked.push(job);
      setTimeout(() => native.dmaSetRoute(A!.be, job, answer), 100);
    } } });
    native.dmaSetRoute(A!.be, 'owner', B!.addr);
    const [pa, pb] = await Promise.all([DmaPeer.start(A!.socketPath, 'asker'), DmaPeer.start(B!.socketPath, 'owner')]);
    await pa.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 6 });
    await pb.ok({ cmd: 'alloc', name: 'win', size: SIZE });
    await pb.ok({ cmd: 'grant', name: 'win', peer: 'asker', perm: 'rw' });
    await pa.ok({ cmd: 'lookup', peer: 'owner', name: 'win' });
    // withdrawn, and the control plane will say "unknown": the operation fails with NOT_FOUND
    native.dmaSetRoute(A!.be, 'owner', null);
    const failed = await pa.cmd({ cmd: 'sync', op: 'write', local: 'src', peer: 'owner', name: 'win', len: 64 });
    expect(failed).toMatchObject({ ok: false, code: 'NOT_FOUND' });
    expect(failed.message).toMatch(/job owner is not known on any host/);
    expect(asked).toEqual(['owner']);
    // withdrawn again; this time the answer names the agent: the operation proceeds there
    answer = B!.addr;
    await new Promise((r) => setTimeout(r, 1100)); // the backend asks again for a job at most once a second
    native.dmaSetRoute(A!.be, 'owner', null);
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'owner', name: 'win', len: SIZE });
    expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe((await pa.ok({ cmd: 'hash', name: 'src' })).sha);
    expect(asked).toEqual(['owner', 'owner']);
  });

  it('a route naming an agent that does not listen: the lookup fails UNAVAILABLE naming the address', async () => {
    const [A] = startAgents(1);
    native.dmaSetRoute(A!.be, 'far', '127.0.0.1:1');
    const pa = await DmaPeer.start(A!.socketPath, 'near');
    const r = await pa.cmd({ cmd: 'lookup', peer: 'far', name: 'win' });
    expect(r).toMatchObject({ ok: false, code: 'UNAVAILABLE' });
    expect(r.message).toMatch(/cannot connect to agent 127\.0\.0\.1:1/);
  });

  it('agents with different cluster tokens refuse each other; with the same token they connect', async () => {
    const [A] = startAgents(1, { dma: { token: 'alpha-secret' } });
    const [B] = startAgents(1, { dma: { token: 'beta-secret' } });
    const [C] = startAgents(1, { dma: { token: 'alpha-secret' } });
    native.dmaSetRoute(A!.be, 'ownerb', B!.addr);
    native.dmaSetRoute(A!.be, 'ownerc', C!.addr);
    const [pa, pb, pc] = await Promise.all([DmaPeer.start(A!.socketPath, 'asker'), DmaPeer.start(B!.socketPath, 'ownerb'), DmaPeer.start(C!.socketPath, 'ownerc')]);
    for (const p of [pb, pc]) {
      await p.ok({ cmd: 'alloc', name: 'win', size: SIZE });
      await p.ok({ cmd: 'grant', name: 'win', peer: 'asker', perm: 'rw' });
    }
    const refused = await pa.cmd({ cmd: 'lookup', peer: 'ownerb', name: 'win' });
    expect(refused).toMatchObject({ ok: false, code: 'UNAVAILABLE' });
    expect(refused.message).toMatch(/refused the connection: cluster token mismatch/);
    await until(() => native.dmaBackendStats(B!.be).droppedConnections === 1, 'B logged the refused connection');
    expect(native.dmaBackendStats(B!.be).lastDropReason).toMatch(/cluster token mismatch/);
    expect(await pa.ok({ cmd: 'lookup', peer: 'ownerc', name: 'win' })).toMatchObject({ size: SIZE });
  });

  it('bad input to the control-plane primitives is refused with a reason; the backend stays up', async () => {
    const [A] = startAgents(1);
    expect(() => native.dmaSetRoute(A!.be, '../x', '127.0.0.1:1')).toThrow(/"\.\.\/x" is not a valid job id/);
    expect(() => native.dmaSetRoute(A!.be, 'j', 'nowhere')).toThrow(/is not an ip:port address/);
    expect(() => native.dmaMoved(A!.be, 'j', '')).toThrow(/is not an ip:port address/);
    expect(() => native.dmaExpect(A!.be, 'j', [{ buffer: 'b', peer: 'p', perms: 8 }], 1000)).toThrow(/unknown permission bits 8/);
    expect(() => native.dmaExpect(A!.be, 'j', [{ buffer: 'b' } as never], 1000)).toThrow(/every grant must be/);
    await expect(native.dmaFence(A!.be, '')).rejects.toThrow(/is not a valid job id/);
    // a backend that cannot listen as asked says why and leaves the agent without DMA
    const [B] = startAgents(1, { dma: { listen: 'not-an-address' } });
    expect(B!.agent.dmaBackend).toBeNull();
    // the first backend still serves
    const p = await DmaPeer.start(A!.socketPath, 'still');
    await p.ok({ cmd: 'alloc', name: 'win', size: SIZE });
  });
});
