/**
 * A store served with --token and --tenants: each tenant's token reaches only
 * that tenant's jobs (images, listings, deletes, uploads, coordinator
 * placements); whole-store work is the operator's (the cluster token); the
 * refusals name the tenant and the job and the server keeps serving. A bad
 * tenants file stops `exastore serve` with a message naming the file and the
 * entry.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { CoordinatorClient } from '../../src/coordinator/client.js';
import { TenantTable } from '../../src/tenants.js';
import { EXASTORE, Image, cleanupDirs, diffImage, killAll, randomPage, regionsOf, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

const OPERATOR = 'operator-token-0123456789';
const ALICE = 'alice-token-0123456789abcdef';
const BOB = 'bob-token-0123456789abcdef';

function tenantsFile(dir: string, text: string): string {
  const f = join(dir, 'tenants.yaml');
  writeFileSync(f, text);
  return f;
}

const GOOD = `tenants:
  - name: alice
    token: ${ALICE}
    jobs: [alice-*]
  - name: bob
    token_sha256: ${createHash('sha256').update(BOB).digest('hex')}
    jobs: [bob-1]
`;

describe('tenants', () => {
  it('a tenant reaches its own jobs and no other tenant\'s; whole-store work is the operator\'s', async () => {
    const dir = tempDir();
    const server = await startStore(join(dir, 'data'), ['--token', OPERATOR, '--tenants', tenantsFile(dir, GOOD)], { token: OPERATOR });
    const op = await StoreClient.connect(server.address, { token: OPERATOR });
    const alice = await StoreClient.connect(server.address, { token: ALICE });
    const bob = await StoreClient.connect(server.address, { token: BOB });
    const imgA = new Image(regionsOf([['m', 16]]), (_r, i) => randomPage(`alice/${i}`));
    const imgB = new Image(regionsOf([['m', 16]]), (_r, i) => randomPage(`bob/${i}`));
    await alice.putCheckpoint({ job: 'alice-a', parent: 0, regions: imgA.regions }, imgA.batches(imgA.allPages()));
    await bob.putCheckpoint({ job: 'bob-1', parent: 0, regions: imgB.regions }, imgB.batches(imgB.allPages()));
    expect(diffImage(imgA, (await alice.fetchImage({ job: 'alice-a' })).regions)).toBeNull();
    expect(diffImage(imgB, (await bob.fetchImage({ job: 'bob-1' })).regions)).toBeNull();

    const denied = { code: 'PERMISSION_DENIED', message: expect.stringContaining('tenant alice may not access job bob-1') };
    await expect(alice.fetchImage({ job: 'bob-1' })).rejects.toMatchObject(denied);
    await expect(alice.listCheckpoints('bob-1')).rejects.toMatchObject(denied);
    await expect(alice.deleteCheckpoints('bob-1', { keepLast: 0, checkpoints: [1] })).rejects.toMatchObject(denied);
    await expect(alice.compact('bob-1')).rejects.toMatchObject(denied);
    await expect(alice.verify({ job: 'bob-1' })).rejects.toMatchObject(denied);
    await expect(alice.stat('bob-1')).rejects.toMatchObject(denied);
    // An upload under another tenant's job (or a job nobody owns) is refused before anything is stored.
    await expect(bob.putCheckpoint({ job: 'bob-2', parent: 0, regions: imgB.regions }, imgB.batches(imgB.allPages())))
      .rejects.toMatchObject({ code: 'PERMISSION_DENIED', message: expect.stringContaining('tenant bob may not access job bob-2') });
    // Listings show only the caller's jobs; whole-store work is the operator's.
    expect((await alice.listJobs()).map((j) => j.job)).toEqual(['alice-a']);
    expect((await bob.listJobs()).map((j) => j.job)).toEqual(['bob-1']);
    await expect(alice.gc()).rejects.toMatchObject({ code: 'PERMISSION_DENIED', message: expect.stringContaining('for the operator') });
    await expect(alice.verify({})).rejects.toMatchObject({ code: 'PERMISSION_DENIED', message: expect.stringContaining('name one of your jobs') });
    await expect(alice.stat()).rejects.toMatchObject({ code: 'PERMISSION_DENIED' });
    expect((await alice.verify({ job: 'alice-a' })).ok).toBe(true);
    const st = await alice.stat('alice-a');
    expect(st.jobs.map((j) => j.job)).toEqual(['alice-a']);
    expect(st.storedBytes).toBe(0); // the whole store's figures are not a tenant's business
    expect((await op.stat('alice-a')).storedBytes).toBeGreaterThan(0);

    // The operator sees everything, and nothing of bob's was touched by alice's attempts.
    expect((await op.listJobs()).map((j) => j.job).sort()).toEqual(['alice-a', 'bob-1']);
    expect(diffImage(imgB, (await op.fetchImage({ job: 'bob-1' })).regions)).toBeNull();
    expect((await op.listCheckpoints('bob-1')).map((c) => c.checkpoint)).toEqual([1]);

    // The coordinator served beside the store: placements are scoped the same way; host and placement changes are the operator's.
    const cop = await CoordinatorClient.connect(server.address, { token: OPERATOR });
    const calice = await CoordinatorClient.connect(server.address, { token: ALICE });
    await cop.register('h1', '127.0.0.1:1', []);
    await cop.claim('alice-a', 'h1');
    await cop.claim('bob-1', 'h1');
    expect((await calice.listPlacements()).map((p) => p.job)).toEqual(['alice-a']);
    expect((await calice.getPlacement('alice-a')).job).toBe('alice-a');
    await expect(calice.getPlacement('bob-1')).rejects.toMatchObject(denied);
    await expect(calice.listHosts()).rejects.toMatchObject({ code: 'PERMISSION_DENIED', message: expect.stringContaining('ListHosts') });
    await expect(calice.claim('alice-b', 'h1')).rejects.toMatchObject({ code: 'PERMISSION_DENIED' });
    expect((await cop.listPlacements()).map((p) => p.job).sort()).toEqual(['alice-a', 'bob-1']);

    // Tokens outside the file are refused as before; the CLI with a tenant's token lists only its jobs.
    const stranger = await StoreClient.connect(server.address, { token: 'not-a-token-of-anybody' });
    await expect(stranger.listJobs()).rejects.toMatchObject({ code: 'PERMISSION_DENIED', message: expect.stringContaining('missing or wrong bearer token') });
    const ls = spawnSync(process.execPath, [EXASTORE, 'ls', '--json', '--store', server.address, '--token', BOB], { encoding: 'utf8' });
    expect(ls.status).toBe(0);
    expect(JSON.parse(ls.stdout).jobs.map((j: { job: string }) => j.job)).toEqual(['bob-1']);
    const cat = spawnSync(process.execPath, [EXASTORE, 'ls', 'alice-a', '--store', server.address, '--token', BOB], { encoding: 'utf8' });
    expect(cat.status).toBe(7);
    expect(cat.stderr).toContain('tenant bob may not access job alice-a');
    for (const c of [op, alice, bob, stranger, cop, calice]) c.close();
  });

  it('a bad tenants file, or --tenants without --token, stops serve with a message naming what is wrong', async () => {
    const dir = tempDir();
    const cases: [string, string, string[]][] = [
      ['tenants: [', 'not valid YAML', ['--token', OPERATOR]],
      ['tenants:\n  - name: alice\n    token: short\n    jobs: [a]\n', 'tenant alice: "token" must be a string of at least 16 characters', ['--token', OPERATOR]],
      ['tenants:\n  - name: alice\n    token: 0123456789abcdef0\n    jobs: ["*"]\n', 'job pattern "*" is not a job id or PREFIX*', ['--token', OPERATOR]],
      [`tenants:\n  - name: a\n    token: ${ALICE}\n    jobs: [x]\n  - name: b\n    token: ${ALICE}\n    jobs: [y]\n`, 'tenant b has the same token as tenant a', ['--token', OPERATOR]],
      ['tenants:\n  - name: a\n    token: 0123456789abcdef0\n    jobs: [x]\n    role: admin\n', 'tenant #1: unknown key "role"', ['--token', OPERATOR]],
      [GOOD, '--tenants needs --token', []],
      [GOOD.replace(ALICE, OPERATOR), 'tenant alice has the cluster token', ['--token', OPERATOR]],
    ];
    for (const [text, message, extra] of cases) {
      const f = tenantsFile(dir, text);
      const r = spawnSync(process.execPath, [EXASTORE, 'serve', '--data', join(dir, 'data'), '--port', '0', '--tenants', f, ...extra], { encoding: 'utf8', timeout: 20_000, env: { ...process.env, EXA_TOKEN: '' } });
      expect(r.status, `${message}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toContain(message);
    }
    const missing = spawnSync(process.execPath, [EXASTORE, 'serve', '--data', join(dir, 'data'), '--port', '0', '--token', OPERATOR, '--tenants', join(dir, 'nope.yaml')], { encoding: 'utf8', timeout: 20_000 });
    expect(missing.status).toBe(2);
    expect(missing.stderr).toContain(`tenants file ${join(dir, 'nope.yaml')}: cannot read it`);
    // Prefix patterns, uids.
    const t = TenantTable.parse('tenants:\n  - name: c\n    uids: [1001, 1002]\n    jobs: [sim-*, heat42]\n');
    expect(t.byUid(1002)?.name).toBe('c');
    expect(t.byUid(1003)).toBeNull();
  });
});
