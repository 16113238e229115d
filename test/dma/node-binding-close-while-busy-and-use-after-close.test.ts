/**
 * The Node DMA binding's state machine: closing a queue or a session while a
 * wait() runs on a pool thread is refused (CONFLICT) instead of freeing memory
 * that thread uses; once the wait is over, close works; every call after
 * close fails FAILED_PRECONDITION; freeing a buffer detaches its ArrayBuffer;
 * a callback queue refuses poll(); a full queue says RESOURCE_EXHAUSTED; the
 * promise form (dma.write/read) resolves on completion and rejects with the
 * error completion's reason.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { DmaSession } from '../../src/dma/index.js';
import { isExaError } from '../../src/errors.js';
import { Workload } from '../../src/workload/index.js';
import { cleanupPeersFirst, startAgent } from './helpers.js';

let work: Workload | null = null;
afterEach(async () => {
  work?.detach();
  work = null;
  await cleanupPeersFirst();
});

const code = (c: string) => (e: unknown): boolean => isExaError(e) && e.code === c;

describe('the Node DMA binding', () => {
  it('refuses to close under a running wait, then closes; use after close is a clear error', async () => {
    const a = startAgent();
    const attached = new Promise((r) => a.agent.once('attached', r));
    work = Workload.attach({ socketPath: a.socketPath, jobId: 'nodejob' });
    await attached;
    const dma = DmaSession.open(work);
    const ab = dma.alloc('buf', 8192);
    expect(ab.byteLength).toBe(8192);
    new Uint8Array(ab).fill(7);
    const self = dma.lookup('nodejob', 'buf');
    const q = dma.createQueue();
    const waiting = q.wait(1, 400); // nothing posted: resolves [] after 400 ms
    expect(() => q.destroy()).toThrow(expect.objectContaining({ code: 'CONFLICT' }));
    expect(() => dma.close()).toThrow(expect.objectContaining({ code: 'CONFLICT' }));
    expect(await waiting).toEqual([]);
    // the queue still works after the refused closes
    q.write('buf', 0, self, 4096, 100, 5);
    const [c] = await q.wait(1, 5000);
    expect(c).toMatchObject({ tag: 5, op: 'write', len: 100, error: null });
    expect(new Uint8Array(ab)[4096 + 99]).toBe(7);
    const cbq = dma.createQueue({ onCompletion: () => undefined });
    expect(() => cbq.poll()).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }));
    for (let i = 0; i < 256; i++) q.write('buf', 0, self, 4096, 8, i);
    let full: unknown = null;
    try { q.write('buf', 0, self, 4096, 8, 999); } catch (e) { full = e; }
    expect(code('RESOURCE_EXHAUSTED')(full)).toBe(true);
    let got = 0;
    while (got < 256) got += (await q.wait(256, 5000)).length;
    // the promise form: resolves on completion, rejects with the reason
    await dma.write('buf', 0, self, 6000, 50);
    await expect(dma.read('buf', 0, self, 8000, 500)).rejects.toSatisfy(
      (e: unknown) => code('INVALID_ARGUMENT')(e) && /read of 500 bytes at offset 8000 is outside buffer "buf" of job nodejob/.test((e as Error).message),
    );
    await Promise.all([...Array(300).keys()].map(async (i) => {
      try { await dma.write('buf', 0, self, 4096, 8); } catch (e) { if (!code('RESOURCE_EXHAUSTED')(e)) throw new Error(`write ${i}: ${String(e)}`); }
    }));
    const outstanding = dma.write('buf', 0, self, 4096, 4096 - 16);
    dma.free('buf');
    expect(ab.byteLength).toBe(0); // detached: stale views cannot touch freed memory
    await outstanding.catch(() => undefined); // completed before the free, or refused as freed
    dma.close();
    expect(() => q.poll()).toThrow(expect.objectContaining({ code: 'FAILED_PRECONDITION' }));
    expect(() => dma.alloc('x', 4096)).toThrow(expect.objectContaining({ code: 'FAILED_PRECONDITION' }));
    dma.close(); // idempotent
  });
});
