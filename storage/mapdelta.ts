/**
 * Page maps stored as deltas (storage/leveldb.ts): a checkpoint's map is
 * 40 bytes a page (storage/pages.ts ENTRY_BYTES), 10 MiB per GiB of image,
 * whatever the increment; an increment rewriting 1 % of the pages differs
 * from its parent's map in ~1 % of the entries. A delta keeps only the
 * entries that differ from a base map of the same length, each as the
 * entry's index (u32 big-endian) followed by the 40-byte entry:
 *
 *   delta = n x (index u32 BE, entry[40]), indexes ascending
 *
 * Entries are compared as bytes (hash and ref): the map rebuilt from the
 * base and the delta is byte for byte the map that was encoded.
 */
import { ENTRY_BYTES } from './pages.js';

/** Bytes of one delta record. */
export const DELTA_RECORD_BYTES = 4 + ENTRY_BYTES;

/**
 * The entries of `map` that differ from `base` (same length, whole entries),
 * as a delta; null when more than `maxEntries` differ (the caller stores the
 * whole map then).
 */
export function mapDelta(base: Uint8Array, map: Uint8Array, maxEntries: number): Buffer | null {
  if (base.length !== map.length || map.length % ENTRY_BYTES !== 0) throw new RangeError(`mapDelta: maps of ${base.length} and ${map.length} bytes`);
  const n = map.length / ENTRY_BYTES;
  const changed: number[] = [];
  // 4-byte words where both buffers allow it (10 compares an entry instead of 40: ~20 ms per GiB of image).
  if (base.byteOffset % 4 === 0 && map.byteOffset % 4 === 0) {
    const w = ENTRY_BYTES / 4;
    const a = new Int32Array(base.buffer, base.byteOffset, n * w);
    const b = new Int32Array(map.buffer, map.byteOffset, n * w);
    for (let i = 0, o = 0; i < n; i++, o += w) {
      for (let k = 0; k < w; k++) {
        if (a[o + k] !== b[o + k]) {
          if (changed.length === maxEntries) return null;
          changed.push(i);
          break;
        }
      }
    }
  } else {
    for (let i = 0, o = 0; i < n; i++, o += ENTRY_BYTES) {
      for (let k = 0; k < ENTRY_BYTES; k++) {
        if (base[o + k] !== map[o + k]) {
          if (changed.length === maxEntries) return null;
          changed.push(i);
          break;
        }
      }
    }
  }
  const out = Buffer.allocUnsafe(changed.length * DELTA_RECORD_BYTES);
  for (let k = 0; k < changed.length; k++) {
    const i = changed[k]!;
    const o = k * DELTA_RECORD_BYTES;
    out.writeUInt32BE(i, o);
    out.set(map.subarray(i * ENTRY_BYTES, (i + 1) * ENTRY_BYTES), o + 4);
  }
  return out;
}

/**
 * The map of `base` with the delta's entries put in: a new buffer (base is
 * not modified). Throws a RangeError saying what is wrong when the delta is
 * not whole records, or names an entry outside the map or out of order.
 */
export function applyMapDelta(base: Uint8Array, delta: Uint8Array): Buffer {
  if (delta.length % DELTA_RECORD_BYTES !== 0) throw new RangeError(`delta of ${delta.length} bytes is not whole ${DELTA_RECORD_BYTES}-byte records`);
  const n = base.length / ENTRY_BYTES;
  const map = Buffer.allocUnsafe(base.length);
  map.set(base);
  const d = Buffer.from(delta.buffer, delta.byteOffset, delta.length);
  let last = -1;
  for (let o = 0; o < d.length; o += DELTA_RECORD_BYTES) {
    const i = d.readUInt32BE(o);
    if (i >= n || i <= last) throw new RangeError(`delta record ${o / DELTA_RECORD_BYTES} names entry ${i} (${i >= n ? `the map has ${n}` : `after entry ${last}`})`);
    last = i;
    d.copy(map, i * ENTRY_BYTES, o + 4, o + DELTA_RECORD_BYTES);
  }
  return map;
}
