/**
 * The multi-buffer SHA-256 path of native/addon/hash.cc (Intel's libipsec-mb,
 * compiled in when libipsec-mb-dev is installed; OpenSSL otherwise): every
 * message length a lane can see gives node:crypto's digest, lanes of
 * different lengths and missing pages mixed in one call stay in input
 * order, the first mismatch of a verify is found across the 256-page blocks
 * it hashes at once, concurrent calls on all pool threads (one manager per
 * thread) each get their own answer, and the engine in use is named.
 */
import { hash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { sha256Engine, sha256Pages, sha256VerifyPages } from '../../src/native.js';
import { verifyPages } from '../../storage/hash.js';
import { genBytes, PAGE } from '../store/helpers.js';

const sha = (b: Uint8Array): Buffer => hash('sha256', b, 'buffer') as unknown as Buffer;

describe('multi-buffer SHA-256', () => {
  it('names the engine: ipsec-mb where its header is installed, else openssl', () => {
    const engine = sha256Engine();
    if (existsSync('/usr/include/intel-ipsec-mb.h')) expect(engine).toMatch(/^ipsec-mb \d+\.\d+\.\d+ (sse|avx|avx2|avx512|noaesni)( sha-ni)?$/);
    else expect(engine).toBe('openssl');
  });

  it.skipIf(!existsSync('/usr/include/intel-ipsec-mb.h'))('hashes with the SHA extensions wherever the CPU has them (not with SIMD lanes beside them)', () => {
    const shaNi = /^flags\s*:.*\bsha_ni\b/m.test(readFileSync('/proc/cpuinfo', 'utf8'));
    if (shaNi) expect(sha256Engine()).toMatch(/ sha-ni$/);
    else expect(sha256Engine()).not.toMatch(/ sha-ni$/);
  });

  it('gives node:crypto\'s digest for every length 0-300, around block edges and past the lane limit', async () => {
    const src = genBytes('mb/lengths', (1 << 20) + 4097);
    const lengths = [...Array.from({ length: 301 }, (_, i) => i), 447, 448, 511, 512, 513, 4095, 4096, 4097, 65_536, 1 << 20, (1 << 20) + 1, (1 << 20) + 4097];
    // Each message starts at a different offset, so lanes also see unaligned data.
    const msgs = lengths.map((n, i) => src.subarray(i % 61, (i % 61) + Math.min(n, src.length - (i % 61))));
    const got = await sha256Pages(msgs);
    const want = Buffer.concat(msgs.map(sha));
    for (let i = 0; i < msgs.length; i++) {
      expect(got.subarray(i * 32, (i + 1) * 32).toString('hex'), `length ${msgs[i]!.length}`).toBe(want.subarray(i * 32, (i + 1) * 32).toString('hex'));
    }
  });

  it('keeps input order when pages, short messages and missing pages are mixed in one call', async () => {
    const pages = Array.from({ length: 700 }, (_, i) => (i % 7 === 3 ? null : genBytes(`mb/mixed/${i}`, i % 5 === 0 ? 1 + (i % 97) : PAGE)));
    const got = await sha256Pages(pages);
    for (let i = 0; i < pages.length; i++) {
      const p = pages[i];
      expect(got.subarray(i * 32, (i + 1) * 32).equals(p ? sha(p) : Buffer.alloc(32)), `message ${i}`).toBe(true);
    }
  });

  it('finds the first mismatch at block edges (0, 255, 256, 511, 512, last) with and without an index', async () => {
    const n = 1300;
    const data = genBytes('mb/verify', n * PAGE);
    const want = Buffer.concat(Array.from({ length: n }, (_, i) => sha(data.subarray(i * PAGE, (i + 1) * PAGE))));
    expect(await sha256VerifyPages(data, want)).toBe(-1);
    for (const at of [0, 255, 256, 511, 512, 1023, n - 1]) {
      const bad = Buffer.from(data);
      bad[at * PAGE + 2048] = bad[at * PAGE + 2048]! ^ 0x40;
      expect(await sha256VerifyPages(bad, want), `page ${at}`).toBe(at);
    }
    const bad = Buffer.from(data);
    for (const at of [255, 256, 900]) bad[at * PAGE] = bad[at * PAGE]! ^ 1;
    expect(await verifyPages(bad, want)).toEqual([255, 256, 900]);
    // Through an index (reversed order): entry i checks page n-1-i.
    const index = Uint32Array.from({ length: n }, (_, i) => n - 1 - i);
    const wantRev = Buffer.concat(Array.from({ length: n }, (_, i) => want.subarray((n - 1 - i) * 32, (n - i) * 32)));
    expect(await sha256VerifyPages(data, wantRev, index)).toBe(-1);
    expect(await verifyPages(bad, wantRev, index)).toEqual([n - 1 - 900, n - 1 - 256, n - 1 - 255]);
  });

  it('answers 200 concurrent verifies and hashes on all pool threads, each with its own result', async () => {
    const n = 600;
    const data = genBytes('mb/concurrent', n * PAGE);
    const want = Buffer.concat(Array.from({ length: n }, (_, i) => sha(data.subarray(i * PAGE, (i + 1) * PAGE))));
    const calls = Array.from({ length: 200 }, async (_, i) => {
      if (i % 2 === 0) {
        const w = Buffer.from(want);
        const at = (i * 37) % (n + 1);
        if (at < n) w[at * 32] = w[at * 32]! ^ 0x01;
        expect(await sha256VerifyPages(data, w), `call ${i}`).toBe(at < n ? at : -1);
      } else {
        const from = i % n, to = Math.min(n, from + 300);
        expect((await sha256Pages(data.subarray(from * PAGE, to * PAGE))).equals(want.subarray(from * 32, to * 32)), `call ${i}`).toBe(true);
      }
    });
    await Promise.all(calls);
  });
});
