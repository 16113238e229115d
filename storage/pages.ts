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
