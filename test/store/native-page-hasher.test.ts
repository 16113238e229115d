/**
 * The native page hasher (native/addon/hash.cc through storage/hash.ts):
 * SHA-256 of page batches on the libuv pool. Known vectors, agreement with
 * node:crypto on real pages, bad arguments refused with clear errors, many
 * calls at once, a caller that reuses its array at once, and a process that
 * exits while hashes are still being computed.
 */
import { hash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { sha256Pages } from '../../src/native.js';
import { checkPages, hashEach, hashPages } from '../../storage/hash.js';
import { ADDON, expectCleanExitWhileBusy, genBytes, PAGE } from './helpers.js';

const sha = (b: Uint8Array): Buffer => hash('sha256', b, 'buffer') as unknown as Buffer;

describe('native page hasher', () => {
  it('matches the FIPS 180-2 vectors and node:crypto on 4 KiB pages', async () => {
    const abc = await sha256Pages(Buffer.from('abc'), 3);
    expect(abc.toString('hex')).toBe('ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad');
    const two = await sha256Pages(Buffer.from('abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq'), 56);
    expect(two.toString('hex')).toBe('248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1');
    expect((await sha256Pages([Buffer.alloc(0)])).toString('hex')).toBe('e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
    const data = genBytes('hasher/pages', 1000 * PAGE);
    const want = Buffer.concat(Array.from({ length: 1000 }, (_, i) => sha(data.subarray(i * PAGE, (i + 1) * PAGE))));
    expect((await hashPages(data)).equals(want)).toBe(true);
    // Chunked across pool threads, in input order; an array of separate pages gives the same.
    const pages = Array.from({ length: 1000 }, (_, i) => data.subarray(i * PAGE, (i + 1) * PAGE));
    expect((await hashEach(pages)).equals(want)).toBe(true);
    expect((await hashPages(Buffer.alloc(0))).length).toBe(0);
  });

  it('gives 32 zero bytes for a missing page and checkPages flags missing, short and damaged pages', async () => {
    const a = genBytes('hasher/a', PAGE), b = genBytes('hasher/b', PAGE);
    const h = await sha256Pages([a, null, b, undefined]);
    expect(h.subarray(0, 32).equals(sha(a))).toBe(true);
    expect(h.subarray(32, 64).equals(Buffer.alloc(32))).toBe(true);
    expect(h.subarray(64, 96).equals(sha(b))).toBe(true);
    expect(h.subarray(96).equals(Buffer.alloc(32))).toBe(true);
    const bad = Buffer.from(b);
    bad[17] = bad[17]! ^ 1;
    const ok = await checkPages([a, null, bad, b.subarray(0, 100), b], [sha(a), sha(a), sha(b), sha(b), sha(b)]);
    expect(ok).toEqual([true, false, false, false, true]);
    // Expected hashes as one buffer work the same.
    expect(await checkPages([a, b], Buffer.concat([sha(a), sha(a)]))).toEqual([true, false]);
  });

  it('refuses bad arguments at the call with INVALID_ARGUMENT and a message saying what is wrong', async () => {
    const cases: [() => unknown, RegExp][] = [
      [() => sha256Pages('pages' as never), /pages must be a Buffer or an array of Buffers/],
      [() => (sha256Pages as unknown as () => unknown)(), /pages must be a Buffer or an array of Buffers/],
      [() => sha256Pages(Buffer.alloc(5000)), /a buffer of 5000 bytes is not a whole number of 4096-byte pages/],
      [() => sha256Pages(Buffer.alloc(8), 0), /pageSize must be an integer from 1 to 2\^30, got 0/],
      [() => sha256Pages(Buffer.alloc(8), 2.5), /pageSize must be an integer/],
      [() => sha256Pages(Buffer.alloc(8), '8' as never), /pageSize must be a number/],
      [() => sha256Pages([Buffer.alloc(8), 'x' as never]), /element 1 is neither a Buffer nor null/],
      [() => sha256Pages([new Uint16Array(4) as never]), /element 0 is neither a Buffer nor null/],
    ];
    for (const [call, msg] of cases) {
      let err: { code?: string; message?: string } | null = null;
      try { call(); } catch (e) { err = e as { code: string; message: string }; }
      expect(err, String(msg)).not.toBeNull();
      expect(err!.code).toBe('INVALID_ARGUMENT');
      expect(err!.message).toMatch(msg);
    }
    // Still working afterwards.
    expect((await sha256Pages(Buffer.from('abc'), 3)).length).toBe(32);
  });

  it('answers 1,000 concurrent calls each with its own digests, whatever the caller does with its array meanwhile', async () => {
    const data = genBytes('hasher/many', 64 * PAGE);
    const calls = Array.from({ length: 1000 }, (_, i) => {
      const n = 1 + (i % 64);
      const arr: (Buffer | null)[] = Array.from({ length: n }, (_, j) => data.subarray(((i + j) % 64) * PAGE, (((i + j) % 64) + 1) * PAGE));
      const p = sha256Pages(arr);
      // The caller reuses its array at once: the native side kept its own copy.
      arr.fill(null);
      arr.length = 0;
      return p.then((h) => ({ i, n, h }));
    });
    for (const { i, n, h } of await Promise.all(calls)) {
      expect(h.length).toBe(n * 32);
      for (let j = 0; j < n; j++) {
        const k = (i + j) % 64;
        expect(h.subarray(j * 32, (j + 1) * 32).equals(sha(data.subarray(k * PAGE, (k + 1) * PAGE))), `call ${i} page ${j}`).toBe(true);
      }
    }
  });

  it('lets a process exit cleanly while hashes are still being computed', () => {
    expectCleanExitWhileBusy(`
      const { sha256Pages } = require(${JSON.stringify(ADDON)});
      const big = Buffer.alloc(64 << 20, 7);
      for (let i = 0; i < 16; i++) sha256Pages(big).then(() => {});`);
  });
});
