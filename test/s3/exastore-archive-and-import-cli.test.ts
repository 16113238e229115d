/**
 * The operator's path, with real processes: a LevelDB `exastore serve`
 * takes a chain; `exastore archive JOB --to s3://... --store ADDR
 * --delete-local` moves it to S3 (the job is gone locally); a fresh
 * `exastore serve --s3` on that prefix serves every checkpoint bit-exact;
 * `exastore import JOB --from s3://... --data DIR` brings the chain into a
 * new LevelDB store, numbers kept, which serves it bit-exact too; `exastore
 * import JOB --from s3://... --store ADDR` brings it into a running store.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient, pagesToBatch } from '../../src/store/client.js';
import { S3RVER_KEYS, makeChain, removeDir, runExastore, spawnExastore, startS3, tempDir, type ExastoreProcess, type TestS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const procs: ExastoreProcess[] = [];
const clients: StoreClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const p of procs.splice(0)) await p.stop();
  await s3?.stop();
  removeDir(s3?.dir);
  s3 = null;
  for (const d of dirs.splice(0)) removeDir(d);
});

const REGIONS = [{ name: 'heap', pages: 200 }, { name: 'stack', pages: 16 }];
const regions = REGIONS.map((r) => ({ name: r.name, pageCount: r.pages, address: '', flags: 0 }));

async function connect(p: ExastoreProcess): Promise<StoreClient> {
  const c = await StoreClient.connect(p.address);
  clients.push(c);
  return c;
}

async function expectChain(c: StoreClient, job: string, chain: ReturnType<typeof makeChain>, nums: number[]): Promise<void> {
  expect((await c.listCheckpoints(job)).map((x) => x.checkpoint)).toEqual(nums);
  for (const k of nums) {
    const img = await c.fetchImage({ job, checkpoint: k });
    for (const r of REGIONS) expect(img.regions.get(r.name)!.equals(chain.images[k - 1]!.get(r.name)!), `#${k} ${r.name}`).toBe(true);
  }
}

describe('exastore archive / import', () => {
  it('archives a running store\'s job to S3, serves it from S3, imports it into a new LevelDB store', async () => {
    s3 = await startS3('cli-bucket');
    const url = `s3://${s3.bucket}/archive`;
    const keys = ['--s3-endpoint', s3.endpoint, '--s3-access-key', S3RVER_KEYS.accessKeyId, '--s3-secret-key', S3RVER_KEYS.secretAccessKey];
    const chain = makeChain(3, REGIONS, 6, 5);

    const dataA = tempDir('A');
    dirs.push(dataA);
    const local = await spawnExastore(['serve', '--data', dataA, '--port', '0']);
    procs.push(local);
    const c = await connect(local);
    for (let k = 0; k < 6; k++) await c.putCheckpoint({ job: 'lbm-3', parent: k, regions }, [pagesToBatch(chain.changes[k]!)]);
    // Checkpoint 2 deleted locally: the archive keeps the numbers as they are (1, 3, 4, 5, 6).
    await c.deleteCheckpoints('lbm-3', { checkpoints: [2] });

    const ar = await runExastore(['archive', 'lbm-3', '--to', url, '--store', local.address, '--delete-local', '--pack-mib', '0.25', '--json', ...keys]);
    expect(ar.code, ar.stderr).toBe(0);
    const res = JSON.parse(ar.stdout.trim().split('\n').pop()!) as { copied: number[]; verified: boolean; deletedLocal: number[] };
    expect(res.copied).toEqual([1, 3, 4, 5, 6]);
    expect(res.verified).toBe(true);
    expect(res.deletedLocal).toEqual([1, 3, 4, 5, 6]);
    await expect(c.listCheckpoints('lbm-3')).rejects.toMatchObject({ code: 'NOT_FOUND' });
    // Running it again is harmless: everything is already there.
    const again = await runExastore(['archive', 'lbm-3', '--to', url, '--store', local.address, '--json', ...keys]);
    expect(again.code).toBe(3); // the job is no longer in the local store
    expect(again.stderr).toMatch(/lbm-3/);

    const dataB = tempDir('B');
    dirs.push(dataB);
    const fromS3 = await spawnExastore(['serve', '--s3', url, ...keys, '--data', dataB, '--port', '0']);
    procs.push(fromS3);
    await expectChain(await connect(fromS3), 'lbm-3', chain, [1, 3, 4, 5, 6]);

    const dataC = tempDir('C');
    dirs.push(dataC);
    const im = await runExastore(['import', 'lbm-3', '--from', url, '--data', dataC, '--json', ...keys]);
    expect(im.code, im.stderr).toBe(0);
    const imported = await spawnExastore(['serve', '--data', dataC, '--port', '0']);
    procs.push(imported);
    await expectChain(await connect(imported), 'lbm-3', chain, [1, 3, 4, 5, 6]);

    // Into a running store that never saw the job (what exarestore --from s3:// does): the store numbers them.
    const dataD = tempDir('D');
    dirs.push(dataD);
    const running = await spawnExastore(['serve', '--data', dataD, '--port', '0']);
    procs.push(running);
    const im2 = await runExastore(['import', 'lbm-3', '--from', url, '--store', running.address, '--json', ...keys]);
    expect(im2.code, im2.stderr).toBe(0);
    const mapping = (JSON.parse(im2.stdout.trim().split('\n').pop()!) as { mapping: [number, number][] }).mapping;
    expect(mapping).toEqual([[1, 1], [3, 2], [4, 3], [5, 4], [6, 5]]);
    const cd = await connect(running);
    for (const [a, b] of mapping) {
      const img = await cd.fetchImage({ job: 'lbm-3', checkpoint: b });
      for (const r of REGIONS) expect(img.regions.get(r.name)!.equals(chain.images[a - 1]!.get(r.name)!), `archive #${a} as #${b}`).toBe(true);
    }
  });

  it('archive with wrong credentials fails with exit code 7 naming bucket and endpoint', async () => {
    s3 = await startS3('cli-bucket2');
    const data = tempDir('D');
    dirs.push(data);
    const r = await runExastore(['archive', 'any-job', '--to', `s3://${s3.bucket}/x`, '--data', data, '--s3-endpoint', s3.endpoint, '--s3-access-key', 'nope', '--s3-secret-key', 'nope']);
    expect(r.code).toBe(7);
    expect(r.stderr).toContain('cli-bucket2');
    expect(r.stderr).toContain(s3.endpoint);
  });
});
