/**
 * Freeing a DMA buffer while a checkpoint of its job is saving: the buffer is
 * unregistered first, so peers' later operations on it fail with "freed by
 * its owner"; the region goes too, yet the running checkpoint still saves its
 * pause-time content (the agent keeps its own mapping); freeing twice is
 * NOT_FOUND, never a double free.
 */
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { DmaPeer, PAGE, cleanupPeersFirst, drain, startAgent, until } from './helpers.js';

afterEach(cleanupPeersFirst);

describe('freeing a DMA buffer during a checkpoint', () => {
  it('unregisters the buffer for peers at once while the checkpoint keeps its image', async () => {
    const a = startAgent();
    const [w, t] = await Promise.all([DmaPeer.start(a.socketPath, 'fw'), DmaPeer.start(a.socketPath, 'ft')]);
    await w.ok({ cmd: 'alloc', name: 'src', size: 8 * PAGE, seed: 1 });
    await t.ok({ cmd: 'alloc', name: 'dst', size: 8 * PAGE, seed: 2 });
    await t.ok({ cmd: 'grant', name: 'dst', peer: 'fw', perm: 'write' });
    await w.ok({ cmd: 'lookup', peer: 'ft', name: 'dst' });
    const want = (await t.ok({ cmd: 'hash', name: 'dst' })).sha;
    const c = await a.agent.checkpoint('ft', { full: true, mode: 'sync', testHold: { region: 'dst', page: 0, when: 'before' } });
    await until(() => c.testHeld(), 'saver held');
    await t.ok({ cmd: 'free', name: 'dst' });
    const after = await w.cmd({ cmd: 'sync', op: 'write', local: 'src', peer: 'ft', name: 'dst', len: 16 });
    expect(after).toMatchObject({ ok: false, code: 'NOT_FOUND', message: 'buffer "dst" of job ft: freed by its owner' });
    c.testReleaseHold();
    const img = await drain(c);
    const bytes = Buffer.concat([...Array(8).keys()].map((p) => img.get(`dst:${p}`)!.bytes!));
    expect(createHash('sha256').update(bytes).digest('hex')).toBe(want); // the pause-time content
    expect(a.agent.jobs().find((j) => j.id === 'ft')!.regions.map((r) => r.name)).toEqual([]);
    expect(await t.cmd({ cmd: 'free', name: 'dst' })).toMatchObject({ ok: false, code: 'NOT_FOUND' });
  });
});
