/**
 * A page hash -> 8-byte value table in native memory (native/addon/pageindex.cc):
 * the store's upload path keeps its per-page state here instead of JS Maps
 * keyed by strings (a string, a Map entry and GC work per page cost ~1.2 CPU
 * s per GiB ingested). Every call takes a whole batch of hashes, runs on the
 * JS thread and returns when done (no work in flight, nothing to wait for at
 * close). Memory: 40 bytes a slot, at most 3/4 full (~45-54 bytes an entry),
 * freed by close() (or when the object is collected).
 *
 * Keys are SHA-256 page hashes (32 bytes); the all-zero hash is never a key
 * (setting it throws INVALID_ARGUMENT, looking it up finds nothing).
 */
import { mallocTune, pageTableAdd, pageTableBytes, pageTableClear, pageTableClose, pageTableDelete, pageTableEntries, pageTableGet, pageTableNew, pageTableSet, pageTableSize, type PageTableHandle } from '../src/native.js';
import { HASH_BYTES } from './pages.js';

export const VALUE_BYTES = 8;

export class PageTable {
  private readonly h: PageTableHandle = pageTableNew();

  /** Entries held. */
  get size(): number { return pageTableSize(this.h); }
  /** Bytes of native memory held. */
  get bytes(): number { return pageTableBytes(this.h); }

  /**
   * Look up n hashes (n x 32 bytes): values (n x 8) receive the value of each
   * one found, found[i] = 1 where present. Returns the number found.
   */
  get(hashes: Uint8Array, values: Uint8Array | null, found: Uint8Array | null): number {
    return pageTableGet(this.h, hashes, values, found);
  }

  /** Whether one hash (32 bytes) is present. */
  has(hash: Uint8Array): boolean {
    return pageTableGet(this.h, hash, null, null) === 1;
  }

  /** The value of one hash, or null. */
  value(hash: Uint8Array): Buffer | null {
    const v = Buffer.allocUnsafe(VALUE_BYTES);
    return pageTableGet(this.h, hash, v, null) === 1 ? v : null;
  }

  /** Insert or overwrite (values: n x 8 bytes, one 8-byte value for all, or null = zeros). Returns how many were new. */
  set(hashes: Uint8Array, values: Uint8Array | null): number {
    return pageTableSet(this.h, hashes, values);
  }

  /**
   * Insert where absent (present hashes keep their value). Returns how many
   * were added; added[i] (optional, n bytes) = 1 where hash i was new (for a
   * hash repeated within the call, its first occurrence).
   */
  add(hashes: Uint8Array, values: Uint8Array | null, added: Uint8Array | null = null): number {
    return pageTableAdd(this.h, hashes, values, added);
  }

  /** Remove; returns how many were present. */
  delete(hashes: Uint8Array): number {
    return pageTableDelete(this.h, hashes);
  }

  /** Every entry, size x 40 bytes (hash then value), in no particular order. */
  entries(): Buffer {
    return pageTableEntries(this.h);
  }

  clear(): void {
    pageTableClear(this.h);
  }

  /** Free the memory; later calls throw UNAVAILABLE. Idempotent. */
  close(): void {
    pageTableClose(this.h);
  }
}

/** n hashes given as separate 32-byte Buffers, side by side in one Buffer. */
export function joinHashes(hashes: readonly Uint8Array[]): Buffer {
  const out = Buffer.allocUnsafe(hashes.length * HASH_BYTES);
  for (let i = 0; i < hashes.length; i++) out.set(hashes[i]!.subarray(0, HASH_BYTES), i * HASH_BYTES);
  return out;
}

let tuned = false;

/**
 * Once per process (the store server, and every StoreClient's process): keep
 * multi-MiB buffers on the malloc heap and do not trim it eagerly (glibc
 * M_MMAP_THRESHOLD 32 MiB, the most it allows; M_TRIM_THRESHOLD 256 MiB).
 * Page data streams through fresh buffers (protobufjs encodes into new ones,
 * Node's HTTP/2 reads into 64 KiB ones); with glibc's defaults large ones
 * come from mmap and go back with munmap, and the heap top is trimmed and
 * grown again, each byte costing a page fault and a zeroed page in the
 * kernel. Measured (BENCHMARKS.md, store, 2026-11-25): ~10 % fewer server
 * page faults per GiB ingested; a restoring client went from ~75,000 page
 * faults per GiB to none. The cost: up to 256 MiB of freed heap stays
 * mapped. No-op off glibc.
 */
export function tuneMallocForStreaming(): void {
  if (tuned) return;
  tuned = true;
  try {
    mallocTune(32 * 1024 * 1024, 256 * 1024 * 1024);
  } catch {
    // An addon without mallocTune: defaults stay.
  }
}
