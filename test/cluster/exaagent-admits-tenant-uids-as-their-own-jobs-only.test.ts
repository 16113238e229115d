/**
 * `exaagent --tenants FILE`: the agent's socket becomes reachable by other
 * users (directory 0711, socket 0666; SO_PEERCRED decides), a tenant's uid
 * attaches as its own jobs and is refused as anyone else's, and a bad file
 * stops the agent with a message naming it.
 */
import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { WorkloadProc, cleanup } from '../checkpointer/helpers.js';
import { cli, startAgent, startStore, stopAll, tempDir } from './helpers.js';

afterEach(async () => { await cleanup(); await stopAll(); });

describe('exaagent --tenants', () => {
  it('admits a tenant\'s uid as its own jobs only', async () => {
    const dir = tempDir('exa-tenants-');
    const file = join(dir, 'tenants.yaml');
    writeFileSync(file, 'tenants:\n  - name: alice\n    uids: [65534]\n    jobs: [alice-*]\n');
    const store = await startStore();
    const agent = await startAgent('h1', store.address, { args: ['--tenants', file] });
    const sock = join(agent.stateDir, 'agent.sock');
    expect(statSync(agent.stateDir).mode & 0o777).toBe(0o711);
    expect(statSync(sock).mode & 0o777).toBe(0o666);
    const own = WorkloadProc.start(sock, 'alice-run', { uid: 65534, gid: 65534 });
    await own.ok('attach');
    const other = WorkloadProc.start(sock, 'bob-run', { uid: 65534, gid: 65534 });
    expect(await other.cmd('attach')).toMatch(/^err EACCES .*uid 65534 acts for tenant alice, which does not own job "bob-run"/);
    await own.ok('alloc r 2');

    const bad = join(dir, 'bad.yaml');
    writeFileSync(bad, 'tenants:\n  - name: alice\n    uids: [0]\n    jobs: [a]\n');
    const r = await cli('exaagent', ['--host', 'h2', '--store', store.address, '--state-dir', join(dir, 'h2'), '--tenants', bad]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`${bad}: tenant alice: uid 0 is not a user id`);
  });
});
