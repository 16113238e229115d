/**
 * What `exarestore JOB --from s3://...` builds on: a chain archived to S3
 * (with a deleted checkpoint, so numbers have a gap) is imported over gRPC
 * into a running LevelDB store server that has never seen the job. Every
 * checkpoint reads back bit-exact under its new number, the mapping and the
 * labels say which archive checkpoint it was, only changed pages travel, and
 * a second import into the same store is refused (ALREADY_EXISTS).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { startStoreServer, type RunningStoreServer } from '../../src/store/server.js';
import { StoreClient } from '../../src/store/client.js';
import { importJobToStore } from '../../src/s3/import.js';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { archiveJob } from '../../storage/s3/archive.js';
import { S3RVER_KEYS, makeChain, putDirect, startS3, tempDir, type TestS3, teardownS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  await teardownS3(s3, dirs, closers);
  s3 = null;
});

const REGIONS = [{ name: 'u', pages: 150 }, { name: 'v', pages: 40 }];
const regions = REGIONS.map((r) => ({ name: r.name, pageCount: r.pages, address: '', flags: 0 }));

describe('import from an S3 archive into a running store', () => {
  it('keeps every image bit-exact, maps numbers, sends only changes, refuses a second import', async () => {
    s3 = await startS3('import-bucket');
    const chain = makeChain(21, REGIONS, 6, 4);
    // The job's chain in a local LevelDB store, checkpoint 2 deleted, archived to S3.
    const src = tempDir('src');
    dirs.push(src);
    const local = new CheckpointStore(await LevelBackend.open(src));
    for (let k = 0; k < 6; k++) await putDirect(local, 'wave', k, regions, chain.changes[k]!);
    await local.deleteCheckpoints('wave', { checkpoints: [2] });
    await local.close();
    const url = `s3://${s3.bucket}/a`;
    const source = await LevelBackend.open(src);
    const arch = await S3Backend.open({ url, endpoint: s3.endpoint, ...S3RVER_KEYS });
    closers.push(() => arch.close());
    await archiveJob({ job: 'wave', source, dest: arch });
    await source.close();

    // A store server that has never seen the job.
    const data = tempDir('dst');
    dirs.push(data);
    const srv: RunningStoreServer = await startStoreServer({ dataDir: data, port: 0 });
    closers.push(() => srv.close());
    const c = await StoreClient.connect(srv.address);
    closers.push(async () => c.close());
    const r = await importJobToStore({ job: 'wave', source: arch, store: c });
    expect(r.mapping).toEqual([[1, 1], [3, 2], [4, 3], [5, 4], [6, 5]]);
    // Checkpoint 1 is whole; later ones send only pages that differ (about a quarter each here).
    const total = REGIONS.reduce((a, x) => a + x.pages, 0);
    expect(r.pagesSent).toBeLessThan(total + 4 * total / 2);
    const cps = await c.listCheckpoints('wave');
    for (const [archN, storeN] of r.mapping) {
      const img = await c.fetchImage({ job: 'wave', checkpoint: storeN });
      for (const reg of REGIONS) expect(img.regions.get(reg.name)!.equals(chain.images[archN - 1]!.get(reg.name)!), `archive #${archN} = store #${storeN} ${reg.name}`).toBe(true);
      expect(cps.find((x) => x.checkpoint === storeN)!.labels['exa.archive.checkpoint']).toBe(String(archN));
    }
    await expect(importJobToStore({ job: 'wave', source: arch, store: c })).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
  });
});
