/**
 * Retries with backoff: a proxy in front of s3rver answers some requests
 * with 503 SlowDown, 500 InternalError, or never answers (a timeout); the
 * backend retries each with backoff and the checkpoint commits and reads
 * back bit-exact. A 403 is not retried. When every attempt fails, the error
 * is UNAVAILABLE and says how many attempts were made.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../../storage/engine.js';
import { S3Backend } from '../../storage/s3/backend.js';
import { S3Io, isRetryable } from '../../storage/s3/io.js';
import { S3RVER_KEYS, genPage, putDirect, readDirect, removeDir, s3Error, startS3, startS3Proxy, type TestProxy, type TestS3 } from './helpers.js';

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

type Fault = 'slowdown' | 'internal' | 'hang' | null;

/** A proxy to s3rver; `plan(n)` says what to do with the n-th request (0-based). */
async function faultyProxy(target: number, plan: (n: number, method: string) => Fault): Promise<{ endpoint: string; faults: () => number }> {
  let n = 0, faults = 0;
  proxy = await startS3Proxy(target, (req, res) => {
    const f = plan(n++, req.method ?? '');
    if (!f) return false;
    faults++;
    req.resume();
    if (f === 'slowdown') s3Error(res, 503, 'SlowDown', 'injected');
    else if (f === 'internal') s3Error(res, 500, 'InternalError', 'injected');
    return true; // 'hang': never answered
  });
  return { endpoint: proxy.endpoint, faults: () => faults };
}

describe('retries', () => {
  it('503 SlowDown, 500 and a hung request are retried; the checkpoint commits and reads back', async () => {
    s3 = await startS3('retry-bucket');
    // Every 3rd request fails, cycling through the three faults.
    const kinds: Fault[] = ['slowdown', 'internal', 'hang'];
    const p = await faultyProxy(s3.port, (n) => (n % 3 === 2 ? kinds[Math.floor(n / 3) % 3]! : null));
    const store = new CheckpointStore(await S3Backend.open({
      url: `s3://${s3.bucket}/r`, endpoint: p.endpoint, ...S3RVER_KEYS, packBytes: 8 * 4096,
      maxAttempts: 6, retryBaseMs: 10, retryMaxMs: 50, requestTimeoutMs: 300,
    }));
    closers.push(() => store.close());
    const regions = [{ name: 'r', pageCount: 40, address: '', flags: 0 }];
    const pages = Array.from({ length: 40 }, (_, i) => ({ region: 0, index: i, bytes: genPage(8, 0, i, 1) }));
    await putDirect(store, 'flaky', 0, regions, pages);
    const img = await readDirect(store, 'flaky', 1);
    expect(img.get('r')!.equals(Buffer.concat(pages.map((x) => x.bytes!)))).toBe(true);
    const b = store.backend as S3Backend;
    expect(p.faults()).toBeGreaterThanOrEqual(3);
    expect(b.counters.retries).toBe(p.faults());
  });

  it('when every attempt fails: UNAVAILABLE with the attempt count; 403 is not retried', async () => {
    s3 = await startS3('retry2-bucket');
    const p = await faultyProxy(s3.port, (_n, m) => (m === 'PUT' ? 'slowdown' : null));
    const io = new S3Io({ url: `s3://${s3.bucket}/x`, endpoint: p.endpoint, ...S3RVER_KEYS, maxAttempts: 4, retryBaseMs: 5, retryMaxMs: 20 });
    closers.push(async () => io.close());
    await expect(io.putNew('obj', Buffer.from('x'))).rejects.toMatchObject({ code: 'UNAVAILABLE', message: expect.stringMatching(/PUT obj failed after 4 attempts/) });
    expect(io.counters.put).toBe(4);
    expect(isRetryable({ name: 'AccessDenied', $metadata: { httpStatusCode: 403 } })).toBe(false);
    expect(isRetryable({ name: 'NoSuchKey', $metadata: { httpStatusCode: 404 } })).toBe(false);
    expect(isRetryable({ name: 'PreconditionFailed', $metadata: { httpStatusCode: 412 } })).toBe(false);
    expect(isRetryable({ name: 'SlowDown', $metadata: { httpStatusCode: 503 } })).toBe(true);
    expect(isRetryable({ name: 'TimeoutError', message: 'Connection timed out after 300 ms' })).toBe(true);
    expect(isRetryable({ code: 'ECONNRESET', message: 'socket hang up' })).toBe(true);
    const bad = new S3Io({ url: `s3://${s3.bucket}/x`, endpoint: s3.endpoint, accessKeyId: 'bad', secretAccessKey: 'bad', maxAttempts: 5, retryBaseMs: 5 });
    closers.push(async () => bad.close());
    await expect(bad.putNew('obj', Buffer.from('x'))).rejects.toMatchObject({ code: 'PERMISSION_DENIED' });
    expect(bad.counters.put).toBe(1);
  });
});
