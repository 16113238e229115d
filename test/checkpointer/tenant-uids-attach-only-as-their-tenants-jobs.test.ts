/**
 * An agent given tenants (exaagent --tenants): a process of a tenant's uid may
 * attach only as one of that tenant's jobs (exact ids and PREFIX*), is refused
 * with EACCES naming the uid, the tenant and the job otherwise, and the agent
 * keeps serving; uids of no tenant stay refused; the agent's own user is not
 * restricted.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { agentTenants, TenantTable } from '../../src/tenants.js';
import { WorkloadProc, cleanup, drain, openDir, startAgent } from './helpers.js';

afterEach(cleanup);

describe('tenant uids on the agent socket', () => {
  it('attach only as their tenant\'s jobs', async () => {
    const table = TenantTable.parse('tenants:\n  - name: alice\n    uids: [65534]\n    jobs: [alice-1, sim-*]\n');
    const dir = openDir();
    const a = startAgent({ socketPath: join(dir, 'agent.sock'), socketMode: 0o666, tenants: agentTenants(table) });
    const own = WorkloadProc.start(a.socketPath, 'alice-1', { uid: 65534, gid: 65534 });
    await own.ok('attach');
    const byPrefix = WorkloadProc.start(a.socketPath, 'sim-42', { uid: 65534, gid: 65534 });
    await byPrefix.ok('attach');
    const other = WorkloadProc.start(a.socketPath, 'bob-1', { uid: 65534, gid: 65534 });
    expect(await other.cmd('attach')).toMatch(/^err EACCES .*uid 65534 acts for tenant alice, which does not own job "bob-1"/);
    const nearMiss = WorkloadProc.start(a.socketPath, 'alice-10', { uid: 65534, gid: 65534 });
    expect(await nearMiss.cmd('attach')).toMatch(/^err EACCES .*does not own job "alice-10"/);
    const stranger = WorkloadProc.start(a.socketPath, 'alice-1x', { uid: 65533, gid: 65533 });
    expect(await stranger.cmd('attach')).toMatch(/^err EACCES .*uid 65533 may not attach/);
    // The agent's own user acts for nobody in particular; the tenant's jobs still work.
    const mine = WorkloadProc.start(a.socketPath, 'bob-1');
    await mine.ok('attach');
    await own.ok('alloc r 4');
    await own.ok('fill r 3');
    const img = await drain(await a.agent.checkpoint('alice-1', { mode: 'sync' }));
    expect(img.size).toBe(4);
    expect(a.agent.jobs().map((j) => j.id).sort()).toEqual(['alice-1', 'bob-1', 'sim-42']);
  });
});
