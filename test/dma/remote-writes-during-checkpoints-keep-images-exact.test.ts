/**
 * Remote writes and checkpoints: the backend writes into a job's buffer
 * through its own mapping, which the job's write-protection cannot see; every
 * such write goes through the checkpointer. Proven here with a real writer job
 * streaming DMA writes into a target job while the agent checkpoints the
 * target: each image equals the target's buffer at the pause instant (copied
 * by the agent while the job was stopped, a test hook), and the following
 * increments hold the written pages (the chain ends equal to the buffer).
 * The bytes reach the target by every path that writes into a job: a peer's
 * writes and the target's own reads, on the same agent (memcpy between the
 * jobs' buffers) and from another agent (received from TCP straight into the
 * target's buffer, the socket read under the checkpointer's lock).
 */
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import type { CheckpointOptions } from '../../src/agent/local-agent.js';
import { apply, firstDiff } from '../checkpointer/helpers.js';
import * as native from '../../src/native.js';
import { DmaPeer, PAGE, cleanupPeersFirst, drain, startAgent, startAgents } from './helpers.js';

afterEach(cleanupPeersFirst);

const PAGES = 256;
const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

/** The stream's writes: single pages, and writes spanning several pages at offsets that are not page
 * aligned (the checkpointer copies runs of pages the running checkpoint does not need at once, and
 * must stop a run at every page it still needs). */
const shapes = [
  { shape: '4 KiB writes at page offsets', len: PAGE, n: 400000 },
  { shape: 'writes of 5 pages + 123 bytes at unaligned offsets', len: 5 * PAGE + 123, n: 100000 },
];
/** Who moves the bytes into the target's buffer, and from where. */
const paths = [
  { path: "a peer's writes, same agent", op: 'write', across: false },
  { path: "the target's reads, same agent", op: 'read', across: false },
  { path: "a peer's writes from another agent (TCP)", op: 'write', across: true },
  { path: "the target's reads from another agent (TCP)", op: 'read', across: true },
] as const;
// across agents every operation is a TCP round trip: a quarter of the operations still outlasts the checkpoints
const cases = paths.flatMap((p) => shapes.map((s) => ({ ...p, ...s, n: p.across ? s.n / 4 : s.n })));

/** The writer job (its 'src' buffer) and the target job (its 'win' buffer, checkpointed by `agent`), on one agent or two. */
async function pair(across: boolean) {
  if (!across) {
    const a = startAgent();
    const [w, t] = await Promise.all([DmaPeer.start(a.socketPath, 'writer'), DmaPeer.start(a.socketPath, 'target')]);
    return { agent: a.agent, w, t };
  }
  const [A, B] = startAgents(2);
  native.dmaSetRoute(A!.be, 'target', B!.addr);
  native.dmaSetRoute(B!.be, 'writer', A!.addr);
  const [w, t] = await Promise.all([DmaPeer.start(A!.socketPath, 'writer'), DmaPeer.start(B!.socketPath, 'target')]);
  return { agent: B!.agent, w, t };
}

describe('remote DMA writes while the target is checkpointed', () => {
  it.each(cases)('every image equals the buffer at the pause instant; the next increment holds the written pages ($path; $shape)', async ({ op, across, len, n }) => {
    const { agent, w, t } = await pair(across);
    await w.ok({ cmd: 'alloc', name: 'src', size: 2 * PAGES * PAGE, seed: 5 });
    await t.ok({ cmd: 'alloc', name: 'win', size: PAGES * PAGE, seed: 9 });
    // the job that moves the bytes, and its view of the other's buffer
    const mover = op === 'write' ? w : t;
    if (op === 'write') {
      await t.ok({ cmd: 'grant', name: 'win', peer: 'writer', perm: 'write' });
      await w.ok({ cmd: 'lookup', peer: 'target', name: 'win' });
    } else {
      await w.ok({ cmd: 'grant', name: 'src', peer: 'target', perm: 'read' });
      await t.ok({ cmd: 'lookup', peer: 'writer', name: 'src' });
    }
    await mover.ok({ cmd: 'queue', q: 1, mode: 'poll' });
    const image = new Map<string, Buffer>();
    const sizes = { win: PAGES * PAGE };
    apply(image, await drain(await agent.checkpoint('target', { full: true })), sizes);
    expect(sha(image.get('win')!)).toBe((await t.ok({ cmd: 'hash', name: 'win' })).sha);

    // one remote write between checkpoints: the next increment is exactly that page
    if (op === 'write') await w.ok({ cmd: 'sync', op, local: 'src', loff: 0, peer: 'target', name: 'win', roff: 5 * PAGE + 10, len: 100 });
    else await t.ok({ cmd: 'sync', op, local: 'win', loff: 5 * PAGE + 10, peer: 'writer', name: 'src', roff: 0, len: 100 });
    const inc = await drain(await agent.checkpoint('target'));
    expect([...inc.keys()]).toEqual(['win:5']);
    apply(image, inc, sizes);

    // a stream of writes sweeping the buffer with changing contents (source twice the size; write i at
    // (i * len) % span, so span + len stays within the buffers)
    const span = PAGES * PAGE - (len === PAGE ? 0 : len);
    const lspan = 2 * PAGES * PAGE - (len === PAGE ? 0 : len);
    const stream =
      op === 'write'
        ? w.ok({ cmd: 'burst', q: 1, op, local: 'src', peer: 'target', name: 'win', n, len, span, lspan, depth: 64 })
        : t.ok({ cmd: 'burst', q: 1, op, local: 'win', peer: 'writer', name: 'src', n, len, span: lspan, lspan: span, depth: 64 });
    stream.catch(() => undefined); // awaited below; a failure earlier in the test must not surface as unhandled
    let streaming = true;
    stream.finally(() => { streaming = false; }).catch(() => undefined);
    // Checkpoints in every mode, one after another until the stream ends (at least one round of the modes,
    // at most 60): the stream's speed, and so how many checkpoints it overlaps, depends on the machine.
    const modes: CheckpointOptions['mode'][] = ['sync', 'auto', 'sync', 'copy', 'sync'];
    let shadowed = 0;
    let raced = 0;
    for (let k = 0; k < modes.length || (streaming && k < 60); k++) {
      const mode = modes[k % modes.length]!;
      const c = await agent.checkpoint('target', { mode, batchBytes: 16 * PAGE, queueDepth: 1, testReference: true });
      const ref = c.testReference()[0]!;
      const pages = await drain(c, 2); // a slow consumer: the writes race the saver
      const st = await c.result;
      shadowed += st.shadowCopies;
      if (pages.size > 0 && streaming) raced++;
      apply(image, pages, sizes);
      expect(firstDiff(image.get('win')!, ref), `checkpoint ${k} (${mode}): first page differing from the pause instant`).toBe(-1);
    }
    const done = await stream;
    expect(done).toMatchObject({ n, ok: n });
    expect(raced).toBeGreaterThanOrEqual(1);
    expect(shadowed).toBeGreaterThan(0); // some writes hit pages not yet saved: shadowed first
    // after the stream: the last increment brings the chain to the buffer's exact content
    apply(image, await drain(await agent.checkpoint('target')), sizes);
    expect(sha(image.get('win')!)).toBe((await t.ok({ cmd: 'hash', name: 'win' })).sha);
  });
});
