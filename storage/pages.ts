/**
 * Page, hash and reference conventions shared by the storage engine and its
 * backends.
 *
 * Hash: SHA-256 of the 4096 bytes of a page (node:crypto). Collision policy:
 * two pages with the same SHA-256 are treated as the same page. No collision
 * of SHA-256 is known and the chance of an accidental one among 2^40 pages is
 * about 2^-176, far below the rate of undetected hardware errors, so the store
 * does not compare bytes on a hash hit (as restic, kopia and git do). Every
 * read is still checked against the hash, so a damaged page is never returned.
 *
 * Zero pages are never hashed or stored: a page map marks them with the
 * all-zero 32-byte "hash" ZERO_HASH (which is not the SHA-256 of any known
 * input; finding a preimage is infeasible).
 */
import { hash as oneShotHash } from 'node:crypto';

export const PAGE_SIZE = 4096;
export const HASH_BYTES = 32;
/** A page reference is an opaque 8-byte location chosen by the backend. */
export const REF_BYTES = 8;
/** One page-map entry: hash (32) then ref (8). */
export const ENTRY_BYTES = HASH_BYTES + REF_BYTES;
export const ZERO_HASH: Buffer = Buffer.alloc(HASH_BYTES);
export const ZERO_PAGE: Buffer = Buffer.alloc(PAGE_SIZE);

/** SHA-256 of one page (or any buffer). */
export function sha256(data: Uint8Array): Buffer {
  return oneShotHash('sha256', data, 'buffer') as unknown as Buffer;
}

/** True when every byte of the page is zero. */
export function isZeroPage(page: Uint8Array): boolean {
  // One memcmp against a zero page (~15 GB/s here; a BigUint64Array walk with
  // BigInt compares measured ~1 GB/s).
  if (page.length === PAGE_SIZE) return ZERO_PAGE.equals(page);
  for (let off = 0; off < page.length; off += PAGE_SIZE) {
    const n = Math.min(PAGE_SIZE, page.length - off);
    if (ZERO_PAGE.compare(page, off, off + n, 0, n) !== 0) return false;
  }
  return true;
}

export function isZeroHash(h: Uint8Array, off = 0): boolean {
  for (let i = off; i < off + HASH_BYTES; i++) if (h[i] !== 0) return false;
  return true;
}

/*
 * Hashes, refs and page-map entries (32, 8 and 40 bytes) are compared and
 * copied once per page on the upload and restore paths. For so few bytes a
 * loop is ~5x faster than Buffer#compare / Buffer#copy, which validate their
 * arguments and call into C++ each time (measured: 262,144 pages, one compare
 * and one copy of 32 bytes each, then a compare: 0.18 s against 0.033 s).
 */

/** Whether a[ao, ao + n) equals b[bo, bo + n). */
export function bytesEqual(a: Uint8Array, ao: number, b: Uint8Array, bo: number, n: number): boolean {
  for (let k = 0; k < n; k++) if (a[ao + k] !== b[bo + k]) return false;
  return true;
}

/** dst[dOff, dOff + n) = src[so, so + n) (distinct buffers or ranges that do not overlap). */
export function copyBytes(src: Uint8Array, so: number, dst: Uint8Array, dOff: number, n: number): void {
  for (let k = 0; k < n; k++) dst[dOff + k] = src[so + k]!;
}

/** A compact Map/Set key for a 32-byte hash (latin1: one char a byte, no encoding cost). */
export function hashKey(h: Buffer, off = 0): string {
  return h.toString('latin1', off, off + HASH_BYTES);
}

export function keyToHash(k: string): Buffer {
  return Buffer.from(k, 'latin1');
}

export function hex(h: Buffer): string {
  return h.toString('hex');
}
