/**
 * The 412 path, always run: s3rver ignores If-None-Match, so the test puts a
 * small HTTP proxy in front of it that enforces create-only PUTs the way AWS
 * S3 and MinIO do (412 PreconditionFailed when the key exists). Through it, a
 * second create of an object is CONFLICT and the first content stays; a
 * manifest whose number another writer took in between is CONFLICT naming
 * job and checkpoint, never an overwrite. (Against a real MinIO, see
 * s3-errors-name-bucket-and-endpoint.test.ts with EXA_TEST_S3_ENDPOINT.)
 */
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { S3Io } from '../../storage/s3/io.js';
import { sha256 } from '../../storage/pages.js';
import { S3RVER_KEYS, genPage, putDirect, removeDir, s3Error, startS3, startS3Proxy, type TestProxy, type TestS3 } from './helpers.js';

let s3: TestS3 | null = null;
let proxy: TestProxy | null = null;
const closers: (() => Promise<unknown>)[] = [];

afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c().catch(() => undefined);
  await proxy?.close();
  proxy = null;
  await s3?.stop();
  removeDir(s3?.dir);
  s3 = null;
});

/** A proxy to s3rver that answers 412 to a PUT with If-None-Match: * on a key it already stored. */
async function enforcingProxy(target: number): Promise<{ endpoint: string; refused: () => number }> {
  const seen = new Set<string>();
  let refused = 0;
  const create = (url = ''): string | null => {
    const [path, query = ''] = url.split('?');
    return query.includes('partNumber') ? null : path!;
  };
  proxy = await startS3Proxy(
    target,
    (req, res) => {
      const path = req.method === 'PUT' && req.headers['if-none-match'] === '*' ? create(req.url) : null;
      if (path === null || !seen.has(path)) return false;
      refused++;
      req.resume();
      s3Error(res, 412, 'PreconditionFailed', 'At least one of the pre-conditions you specified did not hold');
      return true;
    },
    (req, status) => {
      const path = req.method === 'PUT' && req.headers['if-none-match'] === '*' ? create(req.url) : null;
      if (path !== null && status === 200) seen.add(path);
    },
  );
  return { endpoint: proxy.endpoint, refused: () => refused };
}

describe('conditional writes where the server enforces them', () => {
  it('a second create is CONFLICT and the first content stays', async () => {
    s3 = await startS3('cond-bucket');
    const p = await enforcingProxy(s3.port);
    const io = new S3Io({ url: `s3://${s3.bucket}/c`, endpoint: p.endpoint, ...S3RVER_KEYS });
    closers.push(async () => io.close());
    await io.putNew('thing', Buffer.from('first'));
    await expect(io.putNew('thing', Buffer.from('second'))).rejects.toMatchObject({ code: 'CONFLICT', message: expect.stringContaining('thing already exists') });
    expect(p.refused()).toBe(1);
    expect((await io.get('thing'))!.toString()).toBe('first');
  });

  it('a manifest number taken by another writer in between: CONFLICT naming job and checkpoint, no overwrite', async () => {
    s3 = await startS3('cond2-bucket');
    const p = await enforcingProxy(s3.port);
    const opts = { url: `s3://${s3.bucket}/m`, endpoint: p.endpoint, ...S3RVER_KEYS };
    const a = new CheckpointStore(await S3Backend.open(opts));
    const b = new CheckpointStore(await S3Backend.open(opts));
    closers.push(() => a.close(), () => b.close());
    const regions = [{ name: 'r', pageCount: 4, address: '', flags: 0 }];
    const pages = (v: number) => [0, 1, 2, 3].map((i) => ({ region: 0, index: i, bytes: genPage(v, 0, i, 1) }));
    // B starts its upload of the job's first checkpoint, A commits #1 meanwhile,
    // and B's view of the job's numbers is stale (as in a race between the listing and the PUT).
    const sb = await b.beginPut({ job: 'race', parent: 0, regions });
    const h = await putDirect(a, 'race', 0, regions, pages(1));
    const bb = b.backend as S3Backend;
    bb.lastNumber = async () => 0;
    const hashes = Buffer.concat(pages(2).map((x) => sha256(x.bytes!)));
    const want = await sb.offerHashes({ batch: 0, region: [0, 0, 0, 0], index: [0, 1, 2, 3], hashes });
    await sb.supplyData(0, Buffer.concat(want.map((i) => pages(2)[i]!.bytes!)));
    await expect(sb.commit()).rejects.toMatchObject({ code: 'CONFLICT', message: expect.stringMatching(/checkpoint 1 of job race was committed by another writer/) });
    expect(p.refused()).toBeGreaterThan(0);
    // A's checkpoint is intact.
    const got = await a.backend.getHeader('race', 1);
    expect(got!.createdAt).toBe(h.createdAt);
    expect((await a.verify({ job: 'race' })).ok).toBe(true);
  });
});
