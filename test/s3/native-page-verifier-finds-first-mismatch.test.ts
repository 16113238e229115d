/**
 * The native page verifier the S3 restore checks pages with
 * (sha256VerifyPages in native/addon/hash.cc, verifyPages in
 * storage/hash.ts): known vectors, the first mismatch found at the right
 * index (with and without an index of page numbers), every mismatch listed
 * by verifyPages, bad arguments refused at the call with a clear message,
 * many concurrent calls each answered with its own result, and a process
 * that exits while checks are still running.
 */
import { hash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { sha256VerifyPages } from '../../src/native.js';
import { verifyPages } from '../../storage/hash.js';
import { ADDON, expectCleanExitWhileBusy, genBytes, PAGE } from '../store/helpers.js';

const sha = (b: Uint8Array): Buffer => hash('sha256', b, 'buffer') as unknown as Buffer;
const digests = (data: Buffer, pages: readonly number[]): Buffer => Buffer.concat(pages.map((p) => sha(data.subarray(p * PAGE, (p + 1) * PAGE))));
const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

describe('native page verifier', () => {
  it('accepts the FIPS 180-2 vectors and rejects a wrong digest at index 0', async () => {
    const abc = Buffer.from('ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad', 'hex');
    expect(await sha256VerifyPages(Buffer.from('abc'), abc, undefined, 3)).toBe(-1);
    const two = Buffer.from('248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1', 'hex');
    expect(await sha256VerifyPages(Buffer.from('abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq'), two, null, 56)).toBe(-1);
    const wrong = Buffer.from(abc);
    wrong[31] = wrong[31]! ^ 0x80;
    expect(await sha256VerifyPages(Buffer.from('abc'), wrong, undefined, 3)).toBe(0);
    // No digests: nothing to check.
    expect(await sha256VerifyPages(Buffer.alloc(0), Buffer.alloc(0))).toBe(-1);
  });

  it('finds the first damaged 4 KiB page, and verifyPages lists every one', async () => {
    const data = genBytes('verifier/pages', 1000 * PAGE);
    const want = digests(data, range(1000));
    expect(await sha256VerifyPages(data, want)).toBe(-1);
    expect(await verifyPages(data, want)).toEqual([]);
    const bad = Buffer.from(data);
    for (const p of [3, 637, 999]) bad[p * PAGE + 4095] = bad[p * PAGE + 4095]! ^ 1;
    expect(await sha256VerifyPages(bad, want)).toBe(3);
    expect(await verifyPages(bad, want)).toEqual([3, 637, 999]);
    // A wrong expected digest is a mismatch just the same.
    const want2 = Buffer.from(want);
    want2[500 * 32] = want2[500 * 32]! ^ 1;
    expect(await verifyPages(data, want2)).toEqual([500]);
  });

  it('checks the pages an index names, in index order, repeats allowed', async () => {
    const data = genBytes('verifier/index', 64 * PAGE);
    const pages = [5, 3, 3, 63, 0, 17];
    const index = Uint32Array.from(pages);
    expect(await sha256VerifyPages(data, digests(data, pages), index)).toBe(-1);
    // Digests in the wrong order: the first entry whose page differs is reported.
    expect(await sha256VerifyPages(data, digests(data, [5, 3, 3, 0, 63, 17]), index)).toBe(3);
    const bad = Buffer.from(data);
    bad[17 * PAGE] = bad[17 * PAGE]! ^ 0xff;
    bad[3 * PAGE + 100] = bad[3 * PAGE + 100]! ^ 0xff;
    expect(await sha256VerifyPages(bad, digests(data, pages), index)).toBe(1);
    expect(await verifyPages(bad, digests(data, pages), index)).toEqual([1, 2, 5]);
    // The data may hold more pages than the index names (the gaps of a range GET).
    expect(await verifyPages(bad, digests(data, [0, 63]), Uint32Array.from([0, 63]))).toEqual([]);
  });

  it('refuses bad arguments at the call with INVALID_ARGUMENT and a message saying what is wrong', async () => {
    const d = Buffer.alloc(2 * PAGE);
    const w = Buffer.alloc(64);
    const cases: [() => unknown, RegExp][] = [
      [() => sha256VerifyPages('data' as never, w), /data must be a Buffer/],
      [() => (sha256VerifyPages as unknown as () => unknown)(), /data must be a Buffer/],
      [() => sha256VerifyPages(d, 'want' as never), /want must be a Buffer of 32-byte digests/],
      [() => sha256VerifyPages(d, Buffer.alloc(40)), /want holds 40 bytes, not a whole number of 32-byte digests/],
      [() => sha256VerifyPages(d, Buffer.alloc(96)), /data holds 8192 bytes, not the 3 pages of 4096 bytes that want has digests for/],
      [() => sha256VerifyPages(d, w, [0, 1] as never), /index must be a Uint32Array of page numbers/],
      [() => sha256VerifyPages(d, w, new Int32Array(2) as never), /index must be a Uint32Array of page numbers/],
      [() => sha256VerifyPages(d, w, new Uint32Array(3)), /index has 3 page numbers for 2 digests/],
      [() => sha256VerifyPages(d, w, Uint32Array.from([0, 2])), /index\[1\] = 2 is past the 2 whole pages of data \(8192 bytes\)/],
      [() => sha256VerifyPages(Buffer.alloc(PAGE + 10), Buffer.alloc(64), Uint32Array.from([0, 1])), /index\[1\] = 1 is past the 1 whole pages of data/],
      [() => sha256VerifyPages(d, w, undefined, 0), /pageSize must be an integer from 1 to 2\^30, got 0/],
      [() => sha256VerifyPages(d, w, undefined, '4096' as never), /pageSize must be a number/],
    ];
    for (const [call, msg] of cases) {
      let err: { code?: string; message?: string } | null = null;
      try { await call(); } catch (e) { err = e as { code: string; message: string }; }
      expect(err, String(msg)).not.toBeNull();
      expect(err!.code).toBe('INVALID_ARGUMENT');
      expect(err!.message).toMatch(msg);
    }
    // Through storage/hash.ts the same refusal arrives as a rejected promise.
    await expect(verifyPages(d, Buffer.alloc(40))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    // Still working afterwards.
    expect(await sha256VerifyPages(Buffer.from('abc'), Buffer.alloc(32), undefined, 3)).toBe(0);
  });

  it('answers 500 concurrent calls each with its own first mismatch', async () => {
    const data = genBytes('verifier/many', 64 * PAGE);
    const want = digests(data, range(64));
    const calls = Array.from({ length: 500 }, (_, i) => {
      // Call i expects a wrong digest at page i % 65 (64 = none wrong).
      const w = Buffer.from(want);
      const at = i % 65;
      if (at < 64) w[at * 32 + (i % 32)] = w[at * 32 + (i % 32)]! ^ 0x10;
      const p = sha256VerifyPages(data, w);
      // The caller's own buffer may be dropped at once: the native side holds it.
      return p.then((first) => ({ first, expected: at < 64 ? at : -1 }));
    });
    for (const { first, expected } of await Promise.all(calls)) expect(first).toBe(expected);
  });

  it('lets a process exit cleanly while checks are still running', () => {
    expectCleanExitWhileBusy(`
      const { sha256VerifyPages } = require(${JSON.stringify(ADDON)});
      const big = Buffer.alloc(64 << 20, 7);
      // Every page matches, so each call hashes all 64 MiB.
      const one = require('node:crypto').createHash('sha256').update(big.subarray(0, 4096)).digest();
      const want = Buffer.concat(Array(big.length / 4096).fill(one));
      for (let i = 0; i < 16; i++) sha256VerifyPages(big, want).then(() => {});`);
  });
});
