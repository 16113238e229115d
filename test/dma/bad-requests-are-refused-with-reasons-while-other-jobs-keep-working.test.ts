/**
 * The backend validates every request against the grants and the buffers'
 * bounds, and distrusts the shared ring: an ungranted buffer, a missing one, a
 * write through a read-only grant, a bad offset or length, a freed buffer, a
 * garbage ring entry and a ring slot with a garbage phase stamp are each refused with an error
 * completion (or error) that names what was wrong. Meanwhile another job pair
 * keeps transferring, and the misbehaving job's other queues keep working.
 */
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import type { LocalAgent } from '../../src/agent/local-agent.js';
import { DmaPeer, PAGE, cleanupPeersFirst, fillBytes, startAgent } from './helpers.js';

afterEach(cleanupPeersFirst);

/** A raw 64-byte request entry (struct exa_dma_req, little-endian). */
function entry(f: { op: number; flags?: number; local: number; remote: number; loff?: number; roff?: number; len: number; tag: number; reserved?: number }): string {
  const b = Buffer.alloc(64);
  b.writeUInt16LE(f.op, 0);
  b.writeUInt16LE(f.flags ?? 0, 2);
  b.writeUInt32LE(f.local, 4);
  b.writeUInt32LE(f.remote, 8);
  b.writeBigUInt64LE(BigInt(f.loff ?? 0), 16);
  b.writeBigUInt64LE(BigInt(f.roff ?? 0), 24);
  b.writeBigUInt64LE(BigInt(f.len), 32);
  b.writeBigUInt64LE(BigInt(f.tag), 40);
  b.writeBigUInt64LE(BigInt(f.reserved ?? 0), 48);
  return b.toString('hex');
}

interface C { tag: number; op: string; len: number; error: { code: string; message: string } | null }

describe('bad DMA requests', () => {
  it('are refused with a clear reason; the backend keeps serving everyone else', async () => {
    const a = startAgent();
    const [good1, good2, m, v] = await Promise.all([
      DmaPeer.start(a.socketPath, 'g1'), DmaPeer.start(a.socketPath, 'g2'), DmaPeer.start(a.socketPath, 'mal'), DmaPeer.start(a.socketPath, 'vic'),
    ]);
    // a well-behaved pair streams in the background for the whole test
    await good1.ok({ cmd: 'alloc', name: 'src', size: 32 * PAGE, seed: 3 });
    await good2.ok({ cmd: 'alloc', name: 'dst', size: 32 * PAGE });
    await good2.ok({ cmd: 'grant', name: 'dst', peer: 'g1', perm: 'write' });
    await good1.ok({ cmd: 'lookup', peer: 'g2', name: 'dst' });
    await good1.ok({ cmd: 'queue', q: 1, mode: 'callback' });
    const stream = good1.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'g2', name: 'dst', n: 40000, len: 4096, span: 32 * PAGE });
    stream.catch(() => undefined); // awaited below; a failure earlier in the test must not surface as unhandled

    await m.ok({ cmd: 'alloc', name: 'mine', size: 4 * PAGE }); // local id 1
    await m.ok({ cmd: 'alloc', name: 'scratch', size: 4 * PAGE }); // local id 2
    await v.ok({ cmd: 'alloc', name: 'secret', size: 4 * PAGE, seed: 1 });
    await v.ok({ cmd: 'alloc', name: 'ro', size: 4 * PAGE, seed: 2 });
    await v.ok({ cmd: 'alloc', name: 'tmp', size: 4 * PAGE });
    await v.ok({ cmd: 'grant', name: 'ro', peer: 'mal', perm: 'read' });
    await v.ok({ cmd: 'grant', name: 'tmp', peer: 'mal', perm: 'rw' });

    // lookups
    expect(await m.cmd({ cmd: 'lookup', peer: 'vic', name: 'secret' })).toMatchObject({ ok: false, code: 'PERMISSION_DENIED', message: 'job vic has not granted buffer "secret" to job mal' });
    expect(await m.cmd({ cmd: 'lookup', peer: 'vic', name: 'nope' })).toMatchObject({ ok: false, code: 'NOT_FOUND', message: 'job vic has no DMA buffer "nope" on this host' });
    const ro = await m.ok({ cmd: 'lookup', peer: 'vic', name: 'ro' });
    expect(ro).toMatchObject({ canRead: true, canWrite: false });
    const tmp = await m.ok({ cmd: 'lookup', peer: 'vic', name: 'tmp' });
    await m.ok({ cmd: 'queue', q: 1, mode: 'poll' });
    const post = (c: Record<string, unknown>): Promise<unknown> => m.ok({ cmd: 'post', q: 1, local: 'mine', ...c });
    await post({ op: 'write', peer: 'vic', name: 'ro', len: 16, tag: 1 }); // read-only grant
    await post({ op: 'read', peer: 'vic', name: 'ro', roff: 4 * PAGE - 10, len: 20, tag: 2 }); // beyond the peer's buffer
    await post({ op: 'read', peer: 'vic', name: 'ro', loff: 4 * PAGE, len: 1, tag: 3 }); // beyond the local buffer
    await post({ op: 'read', peer: 'vic', name: 'ro', len: 0, tag: 4 });
    await v.ok({ cmd: 'free', name: 'tmp' });
    await post({ op: 'write', peer: 'vic', name: 'tmp', len: 16, tag: 5 }); // freed by its owner
    await post({ op: 'read', peer: 'vic', name: 'ro', len: 16, tag: 6 }); // a good one in between
    const h = tmp.handle as number;
    await m.ok({ cmd: 'raw', q: 1, hex: entry({ op: 77, local: 1, remote: h, len: 8, tag: 7 }) });
    await m.ok({ cmd: 'raw', q: 1, hex: entry({ op: 1, local: 999, remote: h, len: 8, tag: 8 }) });
    await m.ok({ cmd: 'raw', q: 1, hex: entry({ op: 2, local: 1, remote: 4242, len: 8, tag: 9 }) });
    await m.ok({ cmd: 'raw', q: 1, hex: entry({ op: 2, local: 1, remote: ro.handle as number, len: 8, tag: 10, reserved: 0xdead }) });
    await m.ok({ cmd: 'raw', q: 1, hex: entry({ op: 2, local: 1, remote: ro.handle as number, roff: 2 ** 53 - 1, len: 2 ** 53 - 1, tag: 11 }) });
    await m.ok({ cmd: 'free', name: 'scratch' });
    await m.ok({ cmd: 'raw', q: 1, hex: entry({ op: 2, local: 2, remote: ro.handle as number, len: 8, tag: 12 }) }); // our own freed buffer
    const got = (await m.ok({ cmd: 'wait', q: 1, n: 12 })).completions as C[];
    const by = new Map(got.map((c) => [c.tag, c]));
    expect(got.length).toBe(12);
    const err = (tag: number): { code: string; message: string } => by.get(tag)!.error!;
    expect(err(1)).toMatchObject({ code: 'PERMISSION_DENIED', message: 'job vic has not granted write access to buffer "ro" to job mal' });
    expect(err(2).code).toBe('INVALID_ARGUMENT');
    expect(err(2).message).toBe('job mal: read of 20 bytes at offset 16374 is outside buffer "ro" of job vic (16384 bytes)');
    expect(err(3).message).toMatch(/read of 1 bytes at offset 16384 is outside local buffer "mine"/);
    expect(err(4)).toMatchObject({ code: 'INVALID_ARGUMENT', message: 'job mal: read of 0 bytes' });
    expect(err(5)).toMatchObject({ code: 'NOT_FOUND', message: 'buffer "tmp" of job vic: freed by its owner' });
    expect(by.get(6)).toMatchObject({ error: null, len: 16 });
    expect(err(7)).toMatchObject({ code: 'INVALID_ARGUMENT', message: 'job mal, queue 1: garbage request: unknown operation 77' });
    expect(err(8)).toMatchObject({ code: 'INVALID_ARGUMENT', message: 'job mal: no local DMA buffer with id 999' });
    expect(err(9).message).toBe('job mal: no remote buffer handle 4242 (look it up first)');
    expect(err(10).message).toMatch(/garbage request: reserved fields set/);
    expect(err(11).message).toBe(`job mal: read of ${2 ** 53 - 1} bytes at offset 0 is outside local buffer "mine" (16384 bytes)`);
    expect(err(12)).toMatchObject({ code: 'NOT_FOUND', message: 'local buffer "scratch" of job mal: freed by its owner' });
    // the good read really read
    const want = new Uint8Array(4 * PAGE);
    fillBytes(want, 0, want.length, 2);
    expect((await m.ok({ cmd: 'bytes', name: 'mine', off: 0, len: 16 })).hex).toBe(Buffer.from(want.subarray(0, 16)).toString('hex'));

    // a job may address its own buffer, but not with overlapping ranges
    await m.ok({ cmd: 'lookup', peer: 'mal', name: 'mine' });
    await post({ op: 'write', peer: 'mal', name: 'mine', loff: 0, roff: 100, len: 200, tag: 20 });
    await post({ op: 'write', peer: 'mal', name: 'mine', loff: 0, roff: 2 * PAGE, len: 200, tag: 21 });
    const self = (await m.ok({ cmd: 'wait', q: 1, n: 2 })).completions as C[];
    expect(self.find((c) => c.tag === 20)!.error).toMatchObject({ code: 'INVALID_ARGUMENT', message: 'job mal: write within buffer "mine" with overlapping ranges' });
    expect(self.find((c) => c.tag === 21)!.error).toBeNull();

    // a garbage phase stamp (a torn or corrupted ring): that queue is dropped with a reason; the
    // job's other queues still work. 14 entries went through queue 1 so far: slot 14 expects stamp 15.
    await m.ok({ cmd: 'raw', q: 1, hex: entry({ op: 2, local: 1, remote: ro.handle as number, len: 8, tag: 13 }), advance: 100000 });
    const broken = (await m.ok({ cmd: 'wait', q: 1, n: 1 })).completions as C[];
    expect(broken[0]!.error!.code).toBe('INVALID_ARGUMENT'); // EPROTO
    expect(broken[0]!.error!.message).toBe('job mal, queue 1: garbage request ring (slot 14: stamp 100014, expected 15); queue no longer served');
    await m.ok({ cmd: 'queue', q: 2, mode: 'poll' });
    await m.ok({ cmd: 'sync', op: 'read', local: 'mine', peer: 'vic', name: 'ro', roff: PAGE, loff: PAGE, len: PAGE });
    expect((await m.ok({ cmd: 'hash', name: 'mine', off: PAGE, len: PAGE })).sha).toBe(createHash('sha256').update(want.subarray(PAGE, 2 * PAGE)).digest('hex'));
    // and the victim's secret never changed, the other pair finished every transfer correctly
    const secret = new Uint8Array(4 * PAGE);
    fillBytes(secret, 0, secret.length, 1);
    expect((await v.ok({ cmd: 'hash', name: 'secret' })).sha).toBe(createHash('sha256').update(secret).digest('hex'));
    expect(await stream).toMatchObject({ n: 40000, ok: 40000 });
    const src = new Uint8Array(32 * PAGE);
    fillBytes(src, 0, src.length, 3);
    expect((await good2.ok({ cmd: 'hash', name: 'dst' })).sha).toBe(createHash('sha256').update(src).digest('hex'));
  });

  it('a closed session refuses calls; the workload closes its DMA session before it detaches', async () => {
    const a = startAgent();
    const { Workload } = await import('../../src/workload/index.js');
    const { DmaSession } = await import('../../src/dma/index.js');
    const attached = new Promise((r) => a.agent.once('attached', r));
    const w = Workload.attach({ socketPath: a.socketPath, jobId: 'me' });
    await attached; // LocalAgent must not get this event after it closed (it would throw UNAVAILABLE)
    const d = DmaSession.open(w);
    expect(() => d.lookup('ghost', 'x')).toThrow(/job ghost has no DMA buffer "x"/);
    w.detach(); // closes the DMA session first
    expect(() => d.lookup('ghost', 'x')).toThrow(/closed/);
  });
});
