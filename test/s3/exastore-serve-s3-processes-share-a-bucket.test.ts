/**
 * Real `exastore serve --s3` processes: two of them on one bucket prefix,
 * each taking checkpoints of its own job while both run GC; afterwards GC
 * has condemned and deleted packs in the bucket, and every kept checkpoint
 * of both jobs reads bit-exact and verifies through either server; verify
 * --all-pages, compact and stat work against them. A server
 * pointed at a missing bucket exits with NOT_FOUND's exit code and names
 * the bucket and endpoint.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { S3Io } from '../../storage/s3/io.js';
import { parsePackKey, parseTombKey } from '../../storage/s3/format.js';
import { S3RVER_KEYS, expectBothJobsKeptThroughEither, removeDir, runExastore, spawnExastore, startS3, tempDir, twoJobsWhileBothCollect, type ExastoreProcess, type TestS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const procs: ExastoreProcess[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c().catch(() => undefined);
  for (const p of procs.splice(0)) await p.stop();
  await s3?.stop();
  removeDir(s3?.dir);
  s3 = null;
  for (const d of dirs.splice(0)) removeDir(d);
});

const GRACE_S = 3;

function s3Args(url: string): string[] {
  return ['--s3', url, '--s3-endpoint', s3!.endpoint, '--s3-access-key', S3RVER_KEYS.accessKeyId, '--s3-secret-key', S3RVER_KEYS.secretAccessKey];
}

async function serveS3(url: string, tag: string): Promise<ExastoreProcess> {
  const data = tempDir(tag);
  dirs.push(data);
  const p = await spawnExastore(['serve', ...s3Args(url), '--data', data, '--port', '0', '--gc-grace', String(GRACE_S), '--pack-mib', '0.0625'],
    { EXA_S3_REFRESH_MS: '200' });
  procs.push(p);
  return p;
}

describe('exastore serve --s3 (real processes)', () => {
  it('two servers on one bucket, both collecting garbage: nothing lost, everything readable through either', async () => {
    s3 = await startS3('procs-bucket');
    const url = `s3://${s3.bucket}/cluster`;
    const [a, b] = await Promise.all([serveS3(url, 'A'), serveS3(url, 'B')]);
    const ca = await StoreClient.connect(a.address);
    const cb = await StoreClient.connect(b.address);
    closers.push(async () => { ca.close(); cb.close(); });
    const { alpha, beta } = await twoJobsWhileBothCollect(ca, cb, GRACE_S * 1000);
    // Packs were condemned and some of them are gone from the bucket.
    const io = new S3Io({ url, endpoint: s3.endpoint, ...S3RVER_KEYS });
    closers.push(async () => io.close());
    const condemned = new Set((await io.list('tombs/')).map((o) => parseTombKey(o.key)));
    const present = new Set((await io.list('packs/')).map((o) => parsePackKey(o.key)?.base));
    expect(condemned.size).toBeGreaterThan(0);
    expect([...condemned].filter((c) => !present.has(c!)).length).toBeGreaterThan(0);

    await expectBothJobsKeptThroughEither(ca, cb, alpha, beta);
    // The maintenance commands work against an S3 store too.
    const v = await runExastore(['verify', '--all-pages', '--store', a.address, '--json']);
    expect(v.code, v.stderr).toBe(0);
    expect(JSON.parse(v.stdout.trim().split('\n').pop()!)).toMatchObject({ ok: true, checkpoints: 8 });
    const cp = await runExastore(['compact', 'alpha', '--store', b.address, '--json']);
    expect(cp.code, cp.stderr).toBe(0);
    const st = await runExastore(['stat', '--store', b.address, '--json']);
    expect(st.code, st.stderr).toBe(0);
    expect(JSON.parse(st.stdout.trim().split('\n').pop()!).jobs.map((j: { job: string }) => j.job).sort()).toEqual(['alpha', 'beta']);
  });

  it('a missing bucket: exit code 3, the message names bucket and endpoint', async () => {
    s3 = await startS3('present-bucket');
    const data = tempDir('nb');
    dirs.push(data);
    const r = await runExastore(['serve', ...s3Args('s3://absent-bucket/x'), '--data', data, '--port', '0']);
    expect(r.code).toBe(3);
    expect(r.stderr).toContain('absent-bucket');
    expect(r.stderr).toContain(s3.endpoint);
  });
});
