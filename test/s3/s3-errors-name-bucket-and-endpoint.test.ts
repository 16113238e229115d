/**
 * Wrong credentials, a missing bucket and an unreachable endpoint each give
 * a clear error with the right code that names the bucket and the endpoint;
 * a bad s3:// URL is INVALID_ARGUMENT. Against MinIO (EXA_TEST_S3_ENDPOINT),
 * conditional writes are enforced: a second create of the same object or
 * checkpoint is CONFLICT, never an overwrite.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { S3Backend } from '../../storage/s3/backend.js';
import { S3Io, parseS3Url } from '../../storage/s3/io.js';
import { CheckpointStore } from '../../storage/engine.js';
import { ExaError } from '../../src/errors.js';
import { S3RVER_KEYS, deadPort, putDirect, removeDir, startS3, tempDir, genPage, type TestS3 } from './helpers.js';

let s3: TestS3 | null = null;
const dirs: string[] = [];

afterEach(async () => {
  await s3?.stop();
  removeDir(s3?.dir);
  s3 = null;
  for (const d of dirs.splice(0)) removeDir(d);
});

async function openErr(opts: Parameters<typeof S3Backend.open>[0]): Promise<ExaError> {
  try {
    const b = await S3Backend.open(opts);
    await b.close();
  } catch (e) {
    expect(e).toBeInstanceOf(ExaError);
    return e as ExaError;
  }
  throw new Error('open succeeded');
}

describe('S3 configuration errors', () => {
  it('wrong credentials: PERMISSION_DENIED naming bucket and endpoint', async () => {
    s3 = await startS3('creds-bucket');
    const e = await openErr({ url: `s3://${s3.bucket}/p`, endpoint: s3.endpoint, accessKeyId: 'WRONG', secretAccessKey: 'WRONG', maxAttempts: 2, retryBaseMs: 10 });
    expect(e.code).toBe('PERMISSION_DENIED');
    expect(e.message).toContain('creds-bucket');
    expect(e.message).toContain(s3.endpoint);
  });

  it('missing bucket: NOT_FOUND naming bucket and endpoint', async () => {
    s3 = await startS3('some-bucket');
    const e = await openErr({ url: 's3://no-such-bucket/x', endpoint: s3.endpoint, ...S3RVER_KEYS, maxAttempts: 2, retryBaseMs: 10 });
    expect(e.code).toBe('NOT_FOUND');
    expect(e.message).toContain('no-such-bucket');
    expect(e.message).toContain(s3.endpoint);
  });

  it('unreachable endpoint: UNAVAILABLE after retries, naming bucket and endpoint', async () => {
    const port = await deadPort();
    const endpoint = `http://127.0.0.1:${port}`;
    const t0 = Date.now();
    const e = await openErr({ url: 's3://far-bucket/x', endpoint, ...S3RVER_KEYS, maxAttempts: 3, retryBaseMs: 20 });
    expect(e.code).toBe('UNAVAILABLE');
    expect(e.message).toContain('far-bucket');
    expect(e.message).toContain(endpoint);
    expect(e.message).toMatch(/3 attempts/);
    expect(Date.now() - t0).toBeLessThan(20_000);
  });

  it('bad URLs and endpoints: INVALID_ARGUMENT', () => {
    expect(() => parseS3Url('http://bucket/x')).toThrow(/expected s3:\/\/bucket\/prefix/);
    expect(() => parseS3Url('s3://B_ad/x')).toThrow(/invalid bucket name/);
    expect(parseS3Url('s3://good-bucket/a/b')).toEqual({ bucket: 'good-bucket', prefix: 'a/b/' });
    expect(parseS3Url('s3://good-bucket')).toEqual({ bucket: 'good-bucket', prefix: '' });
    expect(() => new S3Io({ url: 's3://good-bucket/x', endpoint: 'minio:9000' })).toThrow(/invalid S3 endpoint/);
  });
});

const minio = process.env.EXA_TEST_S3_ENDPOINT;
if (!minio) {
  console.log('conditional-write tests skipped: set EXA_TEST_S3_ENDPOINT (and EXA_TEST_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) to a MinIO or AWS endpoint; s3rver ignores If-None-Match');
}

describe.skipIf(!minio)('conditional writes on a server that enforces them (MinIO)', () => {
  it('a second create of the same object is CONFLICT and the first content stays', async () => {
    const bucket = process.env.EXA_TEST_S3_BUCKET ?? 'exa';
    const url = `s3://${bucket}/exa-test-${Date.now()}-${process.pid}`;
    const io = new S3Io({ url, endpoint: minio, forcePathStyle: true });
    try {
      await io.putNew('obj', Buffer.from('first'));
      await expect(io.putNew('obj', Buffer.from('second'))).rejects.toMatchObject({ code: 'CONFLICT' });
      expect((await io.get('obj'))!.toString()).toBe('first');
    } finally {
      io.close();
    }
  });

  it('two stores committing the same checkpoint number: one CONFLICT, no overwrite', async () => {
    const bucket = process.env.EXA_TEST_S3_BUCKET ?? 'exa';
    const url = `s3://${bucket}/exa-test-${Date.now()}-${process.pid}-m`;
    const a = new CheckpointStore(await S3Backend.open({ url, endpoint: minio, forcePathStyle: true, cacheDir: tempDir('ma') }));
    const b = new CheckpointStore(await S3Backend.open({ url, endpoint: minio, forcePathStyle: true, cacheDir: tempDir('mb') }));
    try {
      const regions = [{ name: 'r', pageCount: 4, address: '', flags: 0 }];
      const pages = (v: number) => [0, 1, 2, 3].map((i) => ({ region: 0, index: i, bytes: genPage(v, 0, i, 1) }));
      // Both commit checkpoint 1 of the same job at once: If-None-Match lets exactly one win.
      const r = await Promise.allSettled([putDirect(a, 'job-x', 0, regions, pages(1)), putDirect(b, 'job-x', 0, regions, pages(2))]);
      const ok = r.filter((x) => x.status === 'fulfilled');
      const bad = r.filter((x): x is PromiseRejectedResult => x.status === 'rejected');
      expect(ok).toHaveLength(1);
      expect(bad[0]!.reason).toMatchObject({ code: 'CONFLICT' });
      const winner = (ok[0] as PromiseFulfilledResult<{ createdAt: number }>).value;
      const fresh = await S3Backend.open({ url, endpoint: minio, forcePathStyle: true });
      try {
        expect((await fresh.getHeader('job-x', 1))!.createdAt).toBe(winner.createdAt);
      } finally {
        await fresh.close();
      }
    } finally {
      await a.close();
      await b.close();
    }
  });
});
