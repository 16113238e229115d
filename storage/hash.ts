/**
 * Page hashing for the store, off the JS thread: SHA-256 of batches of pages
 * by the native addon on the libuv pool (native/addon/hash.cc), split in
 * chunks so that several pool threads hash one batch at once and the event
 * loop keeps reading sockets meanwhile. No page byte is copied.
 *
 * Measured here (2 cores, SHA-NI): node:crypto's one call per 4 KiB page
 * hashes ~0.6 GB/s on the JS thread; OpenSSL's SHA256 on a pool thread
 * ~1.8 GB/s per thread.
 *
 * The caller must not modify the page bytes while a call is pending.
 */
import { availableParallelism } from 'node:os';
import { sha256Pages as nativeSha256Pages, sha256VerifyPages as nativeVerifyPages } from '../src/native.js';
import { HASH_BYTES, PAGE_SIZE } from './pages.js';

/** Pages per native call: 1 MiB, ~0.5 ms of one pool thread. */
const CHUNK_PAGES = 256;

/**
 * Native calls hashing at once: one core is left to the event loop, which
 * reads the sockets the pages arrive on (measured here: with all four pool
 * threads hashing on two cores, the S3 restore's GET streams stalled).
 */
const MAX_RUNNING = Math.max(1, availableParallelism() - 1);
let running = 0;
const queue: (() => void)[] = [];

async function limited<T>(fn: () => Promise<T>): Promise<T> {
  if (running >= MAX_RUNNING) await new Promise<void>((r) => queue.push(r));
  running++;
  try {
    return await fn();
  } finally {
    running--;
    queue.shift()?.();
  }
}

function sha256Pages(pages: Uint8Array | readonly (Uint8Array | null | undefined)[]): Promise<Buffer> {
  return limited(() => nativeSha256Pages(pages));
}

/**
 * The pages of `data` that do not hash to their expected SHA-256: page i
 * checked is data page `index[i]` (or page i without an index), against
 * want[32i..32i+32). Returns the failing i in increasing order ([] when all
 * match). One native call over the whole buffer (native/addon/hash.cc
 * sha256VerifyPages), again from the page after each mismatch: no JS object
 * and no copy per page. Bad arguments throw INVALID_ARGUMENT.
 */
export async function verifyPages(data: Uint8Array, want: Uint8Array, index?: Uint32Array): Promise<number[]> {
  const bad: number[] = [];
  const n = want.length / HASH_BYTES;
  for (let from = 0; from < n;) {
    const w = from === 0 ? want : want.subarray(from * HASH_BYTES);
    const ix = index && from > 0 ? index.subarray(from) : index;
    const d = index || from === 0 ? data : data.subarray(from * PAGE_SIZE);
    const first = await limited(() => nativeVerifyPages(d, w, ix));
    if (first < 0) break;
    bad.push(from + first);
    from += first + 1;
  }
  return bad;
}

/** SHA-256 of each 4096-byte page of `data` (whose length is a multiple of 4096), concatenated. */
export async function hashPages(data: Buffer): Promise<Buffer> {
  const n = data.length / PAGE_SIZE;
  if (n <= CHUNK_PAGES) return sha256Pages(data);
  const parts: Promise<Buffer>[] = [];
  for (let i = 0; i < n; i += CHUNK_PAGES) parts.push(sha256Pages(data.subarray(i * PAGE_SIZE, Math.min(n, i + CHUNK_PAGES) * PAGE_SIZE)));
  return Buffer.concat(await Promise.all(parts), n * HASH_BYTES);
}

/** SHA-256 of each buffer (whole), 32 zero bytes for a missing one, concatenated. */
export async function hashEach(pages: readonly (Buffer | null | undefined)[]): Promise<Buffer> {
  const n = pages.length;
  if (n <= CHUNK_PAGES) return sha256Pages(pages);
  const parts: Promise<Buffer>[] = [];
  for (let i = 0; i < n; i += CHUNK_PAGES) parts.push(sha256Pages(pages.slice(i, i + CHUNK_PAGES)));
  return Buffer.concat(await Promise.all(parts), n * HASH_BYTES);
}

/**
 * For each page, whether it is present, exactly 4096 bytes and hashes to
 * the expected value (`want[i]` a 32-byte Buffer, or the i-th 32 bytes of
 * one Buffer). Pages that lie side by side in one buffer are hashed in
 * place; others are copied side by side first (a memcpy, ~10x cheaper than
 * the hash): one contiguous buffer crosses to native code far cheaper than
 * thousands of separate ones.
 */
export async function checkPages(pages: readonly (Buffer | null | undefined)[], want: readonly Buffer[] | Buffer): Promise<boolean[]> {
  const n = pages.length;
  const got = await hashPages(contiguous(pages) ?? gather(pages));
  const ok = new Array<boolean>(n);
  for (let i = 0; i < n; i++) {
    const p = pages[i];
    const o = i * HASH_BYTES;
    ok[i] = !!p && p.length === PAGE_SIZE && (Buffer.isBuffer(want)
      ? got.compare(want, o, o + HASH_BYTES, o, o + HASH_BYTES) === 0
      : got.compare(want[i]!, 0, HASH_BYTES, o, o + HASH_BYTES) === 0);
  }
  return ok;
}

/** The pages as one view when they already lie side by side in one buffer (one GET, one group), else null. */
function contiguous(pages: readonly (Buffer | null | undefined)[]): Buffer | null {
  const first = pages[0];
  if (!first) return null;
  for (let i = 0; i < pages.length; i++) {
    const p = pages[i];
    if (!p || p.length !== PAGE_SIZE || p.buffer !== first.buffer || p.byteOffset !== first.byteOffset + i * PAGE_SIZE) return null;
  }
  return Buffer.from(first.buffer, first.byteOffset, pages.length * PAGE_SIZE);
}

/** The pages copied side by side (a missing or short page leaves bytes that will not match). */
function gather(pages: readonly (Buffer | null | undefined)[]): Buffer {
  const all = Buffer.allocUnsafe(pages.length * PAGE_SIZE);
  for (let i = 0; i < pages.length; i++) {
    const p = pages[i];
    if (p && p.length === PAGE_SIZE) p.copy(all, i * PAGE_SIZE);
  }
  return all;
}
