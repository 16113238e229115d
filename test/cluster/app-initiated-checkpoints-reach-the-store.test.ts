/**
 * A job that calls exa_checkpoint() at its own safe points (heat --ckpt-every)
 * gets each call answered after the pause, and every one of those checkpoints
 * is committed to the store by the agent; the job's result is unchanged.
 */
import { afterEach, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { HEAT, cli, finalChecksum, referenceChecksum, startAgent, startStore, stopAll, until } from './helpers.js';

afterEach(stopAll);

it('commits every app-initiated checkpoint and the job finishes unchanged', async () => {
  const argv = [HEAT, '--n', '64', '--steps', '120', '--ckpt-every', '20', '--step-delay-us', '2000'];
  const expected = referenceChecksum(argv);
  const store = await startStore();
  const a = await startAgent('host-a', store.address);
  const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--job', 'heat-app', '--', ...argv]);
  expect(run.code, run.stderr).toBe(0);
  expect(await finalChecksum(a.address, 'heat-app')).toBe(expected);
  const s = await StoreClient.connect(store.address);
  try {
    // steps 20, 40, ..., 120: six calls, each one committed. exa_checkpoint() returns after the
    // pause, so the job can finish while the agent still uploads its last checkpoint: wait for it.
    const cks = await until('six committed checkpoints of heat-app', async () => {
      const l = await s.listCheckpoints('heat-app');
      return l.length >= 6 ? l : undefined;
    }, 30_000);
    expect(cks.length).toBe(6);
    expect(cks[0]!.parent).toBe(0);
    for (let i = 1; i < cks.length; i++) expect(cks[i]!.parent).toBe(cks[i - 1]!.checkpoint);
  } finally { s.close(); }
});
