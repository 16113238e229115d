/**
 * Faults on the TCP data path between agents: the owning agent closed, or
 * the connection cut (by a relay the test controls) in the middle of a
 * pipelined burst: every operation completes (none hangs), the failed ones
 * with a reason naming the job, buffer and agent; an operation whose outcome
 * is unknown is reported failed, never re-sent (no duplicates); the next
 * operation opens a new connection. Garbage on an agent's TCP port drops
 * that connection with a logged reason while the backend keeps serving.
 * Closing the sending agent with remote operations in flight returns.
 */
import { connect, createServer, type Server, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../../src/native.js';
import { DmaPeer, PAGE, cleanup, startAgents, until } from './helpers.js';

const servers: Server[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) s.close();
  await cleanup();
});

const SIZE = 256 * PAGE;

interface Burst { n: number; ok: number; errors: { error: { code: string; message: string } }[] }

async function crossPair(route?: string) {
  const [A, B] = startAgents(2);
  native.dmaSetRoute(A!.be, 'jb', route ?? B!.addr);
  const [pa, pb] = await Promise.all([DmaPeer.start(A!.socketPath, 'ja'), DmaPeer.start(B!.socketPath, 'jb')]);
  await pa.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 1 });
  await pb.ok({ cmd: 'alloc', name: 'win', size: SIZE });
  await pb.ok({ cmd: 'grant', name: 'win', peer: 'ja', perm: 'rw' });
  await pa.ok({ cmd: 'lookup', peer: 'jb', name: 'win' });
  return { A: A!, B: B!, pa, pb };
}

/** A TCP relay to `target` whose connections the test can cut. */
async function relay(target: string): Promise<{ addr: string; cut: () => void }> {
  const socks = new Set<Socket>();
  const [host, port] = target.split(':');
  const srv = createServer((c) => {
    const up = connect(Number(port), host);
    socks.add(c).add(up);
    c.pipe(up).pipe(c);
    const end = () => { c.destroy(); up.destroy(); };
    c.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  servers.push(srv);
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return { addr: `127.0.0.1:${(srv.address() as { port: number }).port}`, cut: () => { for (const s of socks) s.destroy(); socks.clear(); } };
}

/** An exa_dma_net_hdr (exa_dma_net.h). */
function frame(type: number, f: { len?: number; size?: number; job?: string; name?: string; from?: string; text?: string; flags?: number } = {}): Buffer {
  const b = Buffer.alloc(512);
  b.writeUInt32LE(0x314e4d44, 0);
  b.writeUInt16LE(1, 4);
  b.writeUInt16LE(type, 6);
  b.writeUInt32LE(f.flags ?? 0, 8);
  b.writeBigUInt64LE(1n, 16);
  b.writeBigUInt64LE(BigInt(f.len ?? 0), 40);
  b.writeBigUInt64LE(BigInt(f.size ?? 0), 48);
  b.write(f.job ?? '', 64);
  b.write(f.name ?? '', 128);
  b.write(f.from ?? '', 192);
  b.write(f.text ?? '', 256);
  return b;
}

/** Send bytes to an agent's DMA port; resolves with what came back once the agent closed the connection. */
function sendRaw(addr: string, chunks: Buffer[]): Promise<Buffer> {
  const [host, port] = addr.split(':');
  return new Promise((resolve, reject) => {
    const got: Buffer[] = [];
    const s = connect(Number(port), host, () => { for (const c of chunks) s.write(c); });
    s.on('data', (d) => got.push(d));
    s.on('error', () => undefined);
    s.on('close', () => resolve(Buffer.concat(got)));
    setTimeout(() => { s.destroy(); reject(new Error('the agent did not drop the connection')); }, 5000);
  });
}

describe('faults on the agent-to-agent data path', () => {
  for (const mode of ['poll', 'callback'] as const) {
    it(`${mode} mode: the owning agent closed mid-burst: every operation completes, the failed ones naming the job, buffer and agent`, async () => {
      const { A, B, pa } = await crossPair();
      await pa.ok({ cmd: 'queue', q: 1, mode });
      const burst = pa.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'jb', name: 'win', n: 30000, len: 64 * 1024, span: SIZE });
      burst.catch(() => undefined);
      await until(() => native.dmaBackendStats(A.be).remoteOps > 300, 'transfers under way');
      await B.agent.close();
      const r = (await burst) as unknown as Burst;
      expect(r.n).toBe(30000);
      expect(r.ok).toBeGreaterThan(300);
      expect(r.ok).toBeLessThan(30000);
      for (const { error } of r.errors) {
        // UNAVAILABLE (connection lost / refused) or NOT_FOUND (the closing agent dropped the job first)
        expect(['UNAVAILABLE', 'NOT_FOUND']).toContain(error.code);
        // each names the job and buffer in its own words: "write to buffer "win" of job jb: ..." or,
        // from the closing owner, "job jb has no DMA buffer "win" on agent ..."
        expect(error.message).toMatch(/buffer "win" of job jb|job jb has no DMA buffer "win"/);
        expect(error.message).toContain(B.addr);
      }
      expect(native.dmaBackendStats(A.be).retries).toBe(0);
    });
  }

  it('the connection cut mid-burst: outcome-unknown operations fail (never re-sent), and the next operation reconnects', async () => {
    const [A0, B0] = startAgents(2);
    const rl = await relay(B0!.addr);
    native.dmaSetRoute(A0!.be, 'jb', rl.addr);
    const [pa, pb] = await Promise.all([DmaPeer.start(A0!.socketPath, 'ja'), DmaPeer.start(B0!.socketPath, 'jb')]);
    await pa.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 1 });
    await pb.ok({ cmd: 'alloc', name: 'win', size: SIZE });
    await pb.ok({ cmd: 'grant', name: 'win', peer: 'ja', perm: 'rw' });
    await pa.ok({ cmd: 'lookup', peer: 'jb', name: 'win' });
    await pa.ok({ cmd: 'queue', q: 1, mode: 'poll' });
    const N = 4000;
    const burst = pa.ok({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'jb', name: 'win', n: N, len: 64 * 1024, span: SIZE });
    burst.catch(() => undefined);
    await until(() => native.dmaBackendStats(A0!.be).remoteOps > 200, 'transfers under way');
    rl.cut();
    const r = (await burst) as unknown as Burst;
    // what the burst and both backends saw, for the message of any assertion below that fails
    const seen = (): string => JSON.stringify({ ok: r.ok, errors: r.errors, a: native.dmaBackendStats(A0!.be), b: native.dmaBackendStats(B0!.be) });
    expect(r.n).toBe(N); // none hung
    expect(r.ok, seen()).toBeLessThan(N);
    const lost = r.errors.filter((e) => /connection to agent .* lost/.test(e.error.message));
    expect(lost.length, seen()).toBeGreaterThan(0);
    for (const { error } of lost) {
      expect(error.code, seen()).toBe('UNAVAILABLE');
      expect(error.message, seen()).toMatch(/^write to buffer "win" of job jb: connection to agent 127\.0\.0\.1:\d+ lost \(outcome unknown/);
    }
    const sa = native.dmaBackendStats(A0!.be);
    expect(sa.retries, seen()).toBe(0); // nothing re-sent
    expect(native.dmaBackendStats(B0!.be).servedOps, seen()).toBeLessThanOrEqual(N); // so nothing applied twice
    expect(native.dmaBackendStats(B0!.be).servedOps, seen()).toBeGreaterThanOrEqual(r.ok);
    // the next operation gets a new connection
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'jb', name: 'win', len: SIZE });
    expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe((await pa.ok({ cmd: 'hash', name: 'src' })).sha);
    expect(native.dmaBackendStats(A0!.be).links, seen()).toBe(2);
  });

  it('garbage on the agent port (bad magic, unknown type, absurd length, bad names, no HELLO) drops that connection with a logged reason; the backend keeps serving', async () => {
    const { A, B, pa, pb } = await crossPair();
    const hello = frame(1);
    const cases: [Buffer[], RegExp][] = [
      [[Buffer.alloc(512, 0x41)], /bad magic, version or first frame/],
      [[frame(5, { len: 16, job: 'jb', name: 'win', from: 'ja' })], /expected HELLO/],
      [[hello, frame(99, { job: 'jb', name: 'win', from: 'ja' })], /unknown request type 99/],
      [[hello, frame(5, { len: 2 ** 40, job: 'jb', name: 'win', from: 'ja' })], /length beyond the limit/],
      [[hello, frame(5, { len: 16, job: '../etc', name: 'win', from: 'ja' })], /bad job, buffer or sender name/],
      [[hello, frame(6, { len: 16, size: 16, job: 'jb', name: 'win', from: 'ja' })], /lengths inconsistent/],
      [[hello, frame(5, { len: 16, job: 'jb', name: 'win', from: 'ja', flags: 0x80 })], /reserved fields set/],
    ];
    let dropped = 0;
    for (const [chunks, why] of cases) {
      const back = await sendRaw(B.addr, chunks);
      dropped++;
      await until(() => native.dmaBackendStats(B.be).droppedConnections === dropped, `drop #${dropped}`);
      expect(native.dmaBackendStats(B.be).lastDropReason).toMatch(why);
      if (chunks[0] === hello) expect(back.readUInt16LE(6)).toBe(2); // HELLO_OK came first
      // the real agent's traffic still flows
      await pa.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'jb', name: 'win', roff: dropped * PAGE, len: PAGE });
    }
    expect(native.dmaBackendStats(B.be).servedOps).toBe(cases.length);
    expect(native.dmaBackendStats(A.be).links).toBe(1);
    expect((await pb.ok({ cmd: 'hash', name: 'win', len: 16 })).ok).toBe(true);
  });

  it('a peer "agent" answering with garbage (bad magic, unknown request id, wrong payload length): the connection is dropped, the waiting call fails with the reason, the sender keeps working', async () => {
    const [A, B] = startAgents(2);
    const modes = ['magic', 'id', 'len'] as const;
    let mode: (typeof modes)[number] = 'magic';
    // a fake agent: completes the handshake, then answers every request in the current broken way
    const fake = createServer((c) => {
      let buf = Buffer.alloc(0);
      let hello = false;
      c.on('error', () => undefined);
      c.on('data', (d) => {
        buf = Buffer.concat([buf, d]);
        while (buf.length >= 512) {
          const req = buf.subarray(0, 512);
          buf = buf.subarray(512);
          if (!hello) { hello = true; c.write(frame(2)); continue; }
          const rep = frame(7);
          req.copy(rep, 16, 16, 24); // the request id
          if (mode === 'magic') rep.writeUInt32LE(0xdeadbeef, 0);
          if (mode === 'id') rep.writeBigUInt64LE(999n, 16);
          if (mode === 'len') rep.writeBigUInt64LE(5n, 40); // a LOOKUP reply with a payload
          c.write(rep);
        }
      });
    });
    servers.push(fake);
    await new Promise<void>((r) => fake.listen(0, '127.0.0.1', r));
    native.dmaSetRoute(A!.be, 'fake', `127.0.0.1:${(fake.address() as { port: number }).port}`);
    native.dmaSetRoute(A!.be, 'jb', B!.addr);
    const [pa, pb] = await Promise.all([DmaPeer.start(A!.socketPath, 'ja'), DmaPeer.start(B!.socketPath, 'jb')]);
    const why = { magic: /sent a malformed reply; connection dropped/, id: /replied to an unknown request 999; connection dropped/, len: /LOOKUP reply with a payload; connection dropped/ };
    for (const m of modes) {
      mode = m;
      const r = await pa.cmd({ cmd: 'lookup', peer: 'fake', name: 'win' });
      expect(r).toMatchObject({ ok: false, code: 'UNAVAILABLE' });
      expect(r.message).toMatch(why[m]);
    }
    expect(native.dmaBackendStats(A!.be).links).toBe(3); // a new connection each time
    // the sender still serves its job's real peers
    await pa.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 2 });
    await pb.ok({ cmd: 'alloc', name: 'win', size: SIZE });
    await pb.ok({ cmd: 'grant', name: 'win', peer: 'ja', perm: 'write' });
    await pa.ok({ cmd: 'lookup', peer: 'jb', name: 'win' });
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'jb', name: 'win', len: SIZE });
    expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe((await pa.ok({ cmd: 'hash', name: 'src' })).sha);
  });

  it('closing the sending agent with remote operations in flight returns promptly; its job sees the backend go away', async () => {
    const { A, B, pa, pb } = await crossPair();
    await pa.ok({ cmd: 'queue', q: 1, mode: 'poll' });
    const burst = pa.cmd({ cmd: 'burst', q: 1, op: 'write', local: 'src', peer: 'jb', name: 'win', n: 1000000, len: 64 * 1024, span: SIZE });
    await until(() => native.dmaBackendStats(A.be).remoteOps > 300, 'transfers under way');
    const t0 = Date.now();
    await A.agent.close();
    expect(Date.now() - t0).toBeLessThan(5000);
    const r = await burst;
    expect(r).toMatchObject({ ok: false, code: 'UNAVAILABLE' });
    expect(r.message).toMatch(/DMA backend \(agent\) went away/);
    // the owning agent noticed the connection end and serves on
    await until(() => native.dmaBackendStats(B.be).servedOps > 300, 'served');
    const pc = await DmaPeer.start(B.socketPath, 'jc');
    await pc.ok({ cmd: 'alloc', name: 'src', size: SIZE, seed: 3 });
    await pb.ok({ cmd: 'grant', name: 'win', peer: 'jc', perm: 'write' });
    await pc.ok({ cmd: 'lookup', peer: 'jb', name: 'win' });
    await pc.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'jb', name: 'win', len: SIZE });
    expect((await pb.ok({ cmd: 'hash', name: 'win' })).sha).toBe((await pc.ok({ cmd: 'hash', name: 'src' })).sha);
  });
});
