/**
 * The backend's control socket trusts nothing: a process that claims the job
 * id of another process (SO_PEERCRED pid check), a truncated message, a bad
 * magic, a request before HELLO, a HELLO without its doorbell fd, a malformed
 * job id: each gets a reply naming what was wrong and the connection is
 * closed, while the real jobs keep transferring. The probes come from a
 * separate process speaking the wire format directly (python3).
 * A job registering a DMA buffer with a memfd that could shrink under the
 * backend's mapping (which would crash the agent with SIGBUS) is refused.
 */
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { WorkloadProc } from '../checkpointer/helpers.js';
import { DmaPeer, PAGE, cleanupPeersFirst, startAgent } from './helpers.js';

afterEach(cleanupPeersFirst);

const RAW = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'raw-control.py');
const EACCES = -13;
const EPROTO = -71;

describe('the DMA control socket', () => {
  it('refuses impersonation and malformed messages with a reason, and keeps serving the real jobs', async () => {
    const a = startAgent();
    const [pa, pb] = await Promise.all([DmaPeer.start(a.socketPath, 'real-a'), DmaPeer.start(a.socketPath, 'real-b')]);
    await pa.ok({ cmd: 'alloc', name: 'src', size: 4 * PAGE, seed: 4 });
    await pb.ok({ cmd: 'alloc', name: 'dst', size: 4 * PAGE });
    await pb.ok({ cmd: 'grant', name: 'dst', peer: 'real-a', perm: 'write' });
    await pa.ok({ cmd: 'lookup', peer: 'real-b', name: 'dst' });
    const out = JSON.parse(execFileSync('python3', [RAW, `${a.socketPath}.dma`, 'real-b'], { encoding: 'utf8', timeout: 30_000 })) as Record<string, { status?: number; text?: string; closed: boolean }>;
    expect(out.impersonate!.status).toBe(EACCES);
    expect(out.impersonate!.text).toMatch(/^DMA backend: process \d+ is not the process attached as job real-b$/);
    expect(out.short).toMatchObject({ status: EPROTO, text: 'DMA backend: malformed message (size, magic or version)' });
    expect(out.bad_magic).toMatchObject({ status: EPROTO, text: 'DMA backend: malformed message (size, magic or version)' });
    expect(out.before_hello).toMatchObject({ status: EPROTO, text: 'DMA backend: the first message must be HELLO' });
    expect(out.hello_without_fd).toMatchObject({ status: EPROTO, text: 'DMA backend: bad HELLO' });
    expect(out.bad_job_name).toMatchObject({ status: EPROTO, text: 'DMA backend: bad HELLO' });
    for (const [k, v] of Object.entries(out)) expect(v.closed, `${k}: connection closed after the refusal`).toBe(true);
    // the real jobs are unaffected
    await pa.ok({ cmd: 'sync', op: 'write', local: 'src', peer: 'real-b', name: 'dst', len: 4 * PAGE });
    expect((await pb.ok({ cmd: 'hash', name: 'dst' })).sha).toBe((await pa.ok({ cmd: 'hash', name: 'src' })).sha);
  });

  it('refuses a DMA buffer whose memfd is not sealed against shrinking, and the job keeps working', async () => {
    const a = startAgent();
    const w = WorkloadProc.start(a.socketPath, 'hostile-dma');
    await w.ok('attach');
    await w.ok('alloc buf 4');
    expect(await w.cmd('dmaunsealed buf')).toMatch(/^err EPERM .*memfd of buffer "buf" is not sealed against shrinking/);
    await w.ok('fill buf 5');
    expect(a.agent.job('hostile-dma')!.regions.map((r) => r.name)).toEqual(['buf']);
  });
});
