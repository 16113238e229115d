/**
 * Failures in the middle of transfers: a peer killed while operations aimed
 * at it are in flight makes them complete with an error naming the peer (no
 * operation hangs, in polling or callback mode, async or sync); an issuer
 * killed mid-burst leaves the backend serving everyone else; and closing the
 * agent's backend while clients are busy returns promptly, with the clients'
 * waits failing UNAVAILABLE instead of hanging.
 */
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../../src/native.js';
import { DmaPeer, PAGE, cleanupPeersFirst, startAgent, until } from './helpers.js';

afterEach(cleanupPeersFirst);

const SIZE = 256 * PAGE;

async function setup(socketPath: string, a: string, b: string): Promise<[DmaPeer, DmaPeer]> {
  const [pa, pb] = await Promise.all([DmaPeer.start(socketPath, a), DmaPeer.start(socketPath, b)]);
  await pa.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 1 });
  await pb.ok({ cmd: 'alloc', name: 'dst', size: SIZE });
  await pb.ok({ cmd: 'grant', name: 'dst', peer: a, perm: 'rw' });
  await pa.ok({ cmd: 'lookup', peer: b, name: 'dst' });
  return [pa, pb];
}

interface Burst { n: number; ok: number; errors: { error: { code: string; message: string } }[] }

describe('a peer or the backend going away mid-transfer', () => {
  for (const mode of ['poll', 'callback'] as const) {
    it(`${mode} mode: operations aimed at a killed peer complete with an error naming it`, async () => {
      const a = startAgent();
      const [pa, pb] = await setup(a.socketPath, 'issuer', 'victim');
      await pa.ok({ cmd: 'queue', q: 1, mode });
      const opsBefore = native.dmaBackendStats(a.agent.dmaBackend!).ops;
      const burst = pa.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'victim', name: 'dst', n: 60000, len: 64 * 1024, span: SIZE });
      burst.catch(() => undefined);
      await until(() => native.dmaBackendStats(a.agent.dmaBackend!).ops > opsBefore + 500, 'transfers under way');
      pb.proc.kill('SIGKILL');
      const r = (await burst) as unknown as Burst;
      expect(r.n).toBe(60000); // every operation completed, none hung
      expect(r.ok).toBeGreaterThan(500);
      expect(r.ok).toBeLessThan(60000);
      expect(r.errors.length).toBeGreaterThan(0);
      for (const { error } of r.errors) {
        expect(['UNAVAILABLE', 'NOT_FOUND']).toContain(error.code);
        expect(error.message).toMatch(/victim/);
      }
      // sync calls fail the same way, at once
      const s = await pa.cmd({ cmd: 'sync', op: 'write', local: 'src', peer: 'victim', name: 'dst', len: 16 });
      expect(s.ok).toBe(false);
      expect(s.message).toMatch(/buffer "dst" of job victim: its owner job exited/);
      // the issuer and the backend carry on with a new peer
      const pc = await DmaPeer.start(a.socketPath, 'other');
      await pc.ok({ cmd: 'alloc', name: 'dst', size: SIZE });
      await pc.ok({ cmd: 'grant', name: 'dst', peer: 'issuer', perm: 'write' });
      await pa.ok({ cmd: 'lookup', peer: 'other', name: 'dst' });
      await pa.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'other', name: 'dst', len: SIZE });
      expect((await pc.ok({ cmd: 'hash', name: 'dst' })).sha).toBe((await pa.ok({ cmd: 'hash', name: 'src' })).sha);
    });
  }

  it('an issuer killed mid-burst leaves the backend serving the other jobs', async () => {
    const a = startAgent();
    const [pa] = await setup(a.socketPath, 'doomed', 'target');
    const [px, py] = await setup(a.socketPath, 'x', 'y');
    await pa.ok({ cmd: 'queue', q: 1, mode: 'poll' });
    await px.ok({ cmd: 'queue', q: 1, mode: 'callback' });
    const doomed = pa.cmd({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'target', name: 'dst', n: 1000000, len: 16 * 1024, span: SIZE });
    const opsBefore = native.dmaBackendStats(a.agent.dmaBackend!).ops;
    await until(() => native.dmaBackendStats(a.agent.dmaBackend!).ops > opsBefore + 500, 'transfers under way');
    pa.proc.kill('SIGKILL');
    expect((await doomed).ok).toBe(false);
    const r = await px.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'y', name: 'dst', n: 5000, len: 4096, span: SIZE });
    expect(r).toMatchObject({ n: 5000, ok: 5000 });
    expect((await py.ok({ cmd: 'hash', name: 'dst' })).sha).toBe((await px.ok({ cmd: 'hash', name: 'src' })).sha);
  });

  it('closing the agent while a remote write waits for a held checkpoint saver returns; the write fails or lands, never hangs', async () => {
    const a = startAgent();
    const [pa] = await setup(a.socketPath, 'w8', 't8');
    // the target's page 8 is being saved (held): a remote write into it must wait (fault case 4)
    const c = await a.agent.checkpoint('t8', { full: true, mode: 'sync', testHold: { region: 'dst', page: 8, when: 'during' } });
    c.result.catch(() => undefined);
    const drained = (async () => { try { for await (const _ of c) { /* consume */ } } catch { /* cancelled by close */ } })();
    await until(() => c.testHeld(), 'saver held on page 8');
    await pa.ok({ cmd: 'queue', q: 1, mode: 'poll' });
    await pa.ok({ cmd: 'post', q: 1, op: 'write', local: 'src', peer: 't8', name: 'dst', roff: 8 * PAGE, len: PAGE, tag: 8 });
    const opsBefore = native.dmaBackendStats(a.agent.dmaBackend!).ops;
    expect((await pa.ok({ cmd: 'wait', q: 1, n: 1, timeoutMs: 300 })).completions).toEqual([]); // still waiting
    expect(native.dmaBackendStats(a.agent.dmaBackend!).ops).toBe(opsBefore);
    const t0 = Date.now();
    await a.agent.close();
    expect(Date.now() - t0).toBeLessThan(5000);
    await drained;
    const got = await pa.cmd({ cmd: 'wait', q: 1, n: 1, timeoutMs: 5000 });
    // either the write completed when the cancelled checkpoint let go of page 8, or the wait saw the backend leave
    if (got.ok) expect((got.completions as unknown[]).length).toBe(1);
    else expect(got.code).toBe('UNAVAILABLE');
  });

  for (const mode of ['poll', 'callback'] as const) {
    it(`closing the agent while a ${mode}-mode client is busy returns promptly; the client's operations fail, never hang`, async () => {
      const a = startAgent();
      const [pa, pb] = await setup(a.socketPath, 'busy', 'sink');
      await pa.ok({ cmd: 'queue', q: 1, mode });
      const burst = pa.cmd({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'sink', name: 'dst', n: 1000000, len: 16 * 1024, span: SIZE });
      const opsBefore = native.dmaBackendStats(a.agent.dmaBackend!).ops;
      await until(() => native.dmaBackendStats(a.agent.dmaBackend!).ops > opsBefore + 500, 'transfers under way');
      const t0 = Date.now();
      await a.agent.close();
      expect(Date.now() - t0).toBeLessThan(5000);
      // the wait (poll mode) or the next post after the callback thread saw the hang-up fails
      const r = await burst;
      expect(r).toMatchObject({ ok: false, code: 'UNAVAILABLE' });
      expect(r.message).toMatch(/DMA backend \(agent\) went away/);
      // both jobs are still alive and answer
      expect((await pa.ok({ cmd: 'hash', name: 'src', len: 16 })).ok).toBe(true);
      expect((await pb.ok({ cmd: 'hash', name: 'dst', len: 16 })).ok).toBe(true);
    });
  }
});
