/**
 * TLS: `exastore serve --tls-cert/--tls-key` serves over TLS; a client that
 * trusts the CA (tlsCa / --tls-ca) works, a plaintext client cannot connect.
 * The certificate is made by the test with openssl (nothing checked in).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { EXASTORE, Image, cleanupDirs, diffImage, killAll, randomPage, regionsOf, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('store TLS', () => {
  it('serves TLS to clients that trust the CA and refuses plaintext clients', async () => {
    const dir = tempDir();
    const cert = join(dir, 'cert.pem'), key = join(dir, 'key.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1',
      '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'], { stdio: 'ignore' });
    const server = await startStore(join(dir, 'data'), ['--tls-cert', cert, '--tls-key', key], { tlsCa: cert });
    const c = await StoreClient.connect(server.address, { tlsCa: cert });
    const img = new Image(regionsOf([['m', 16]]), (_r, i) => randomPage(`tls/${i}`));
    await c.putCheckpoint({ job: 'tls-job', parent: 0, regions: img.regions }, img.batches(img.allPages()));
    expect(diffImage(img, (await c.fetchImage({ job: 'tls-job' })).regions)).toBeNull();
    c.close();
    await expect(StoreClient.connect(server.address, { timeoutMs: 1500 })).rejects.toMatchObject({ code: 'UNAVAILABLE' });
    const cli = spawnSync(process.execPath, [EXASTORE, 'ls', '--json', '--store', server.address, '--tls-ca', cert], { encoding: 'utf8' });
    expect(cli.status).toBe(0);
    expect(JSON.parse(cli.stdout).jobs[0].job).toBe('tls-job');
    expect(spawnSync(process.execPath, [EXASTORE, 'serve', '--data', join(dir, 'x'), '--port', '0', '--tls-cert', cert], { encoding: 'utf8' }).status).toBe(2);
  });
});
