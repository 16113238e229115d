/**
 * A store started with --token refuses calls without that bearer token
 * (PERMISSION_DENIED, CLI exit 7) and serves calls that carry it.
 */
import { spawnSync } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { EXASTORE, Image, cleanupDirs, diffImage, killAll, randomPage, regionsOf, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('store bearer token', () => {
  it('denies calls without the token and serves calls with it', async () => {
    const server = await startStore(tempDir(), ['--token', 's3cret'], { token: 's3cret' });
    const anon = await StoreClient.connect(server.address);
    await expect(anon.listJobs()).rejects.toMatchObject({ code: 'PERMISSION_DENIED' });
    const img = new Image(regionsOf([['m', 8]]), (_r, i) => randomPage(`tok/${i}`));
    await expect(anon.putCheckpoint({ job: 'j', parent: 0, regions: img.regions }, img.batches(img.allPages()))).rejects.toMatchObject({ code: 'PERMISSION_DENIED' });
    const wrong = await StoreClient.connect(server.address, { token: 'guess' });
    await expect(wrong.stat()).rejects.toMatchObject({ code: 'PERMISSION_DENIED' });
    const ok = await StoreClient.connect(server.address, { token: 's3cret' });
    await ok.putCheckpoint({ job: 'j', parent: 0, regions: img.regions }, img.batches(img.allPages()));
    expect(diffImage(img, (await ok.fetchImage({ job: 'j' })).regions)).toBeNull();
    const cliDenied = spawnSync(process.execPath, [EXASTORE, 'ls', '--store', server.address], { encoding: 'utf8', env: { ...process.env, EXA_TOKEN: '' } });
    expect(cliDenied.status).toBe(7);
    expect(cliDenied.stderr).toContain('missing or wrong bearer token');
    const cliOk = spawnSync(process.execPath, [EXASTORE, 'ls', '--json', '--store', server.address, '--token', 's3cret'], { encoding: 'utf8' });
    expect(cliOk.status).toBe(0);
    expect(JSON.parse(cliOk.stdout).jobs).toHaveLength(1);
    for (const c of [anon, wrong, ok]) c.close();
  });
});
