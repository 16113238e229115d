/**
 * The order in which the parallel S3 restore reads pages (byLocation in
 * storage/s3/restore.ts): by pack, then slot, whatever order the page maps
 * list them in. Checked against a plain comparator sort for a checkpoint
 * written in one go (ascending runs, one per pack, packs in random id
 * order), runs that interleave, ties, one run, nothing, and more runs than
 * the run merge takes.
 */
import { describe, expect, it } from 'vitest';
import { byLocation } from '../../storage/s3/restore.js';
import { rng } from '../store/helpers.js';

function reference(hi: Uint32Array, lo: Uint32Array): number[] {
  return Array.from({ length: hi.length }, (_, k) => k).sort((a, b) => hi[a]! - hi[b]! || lo[a]! - lo[b]! || a - b);
}

/** Entries for (pack id, slot) pairs: hi = the pack id's top 32 bits, lo = its low 16 bits then the slot. */
function entries(pairs: [number, number][]): { hi: Uint32Array; lo: Uint32Array } {
  const hi = new Uint32Array(pairs.length), lo = new Uint32Array(pairs.length);
  pairs.forEach(([id, slot], k) => { hi[k] = Math.floor(id / 0x10000); lo[k] = ((id % 0x10000) * 0x10000 + slot) >>> 0; });
  return { hi, lo };
}

const keys = (hi: Uint32Array, lo: Uint32Array, order: ArrayLike<number>): string[] => Array.from(order, (k) => `${hi[k]}:${lo[k]}`);

describe('restore plan order', () => {
  it('puts the packs of a checkpoint written in one go in id order, slots ascending', () => {
    const r = rng(7);
    const ids = Array.from({ length: 16 }, () => Math.floor(r() * 2 ** 47));
    const pairs: [number, number][] = [];
    for (const id of ids) for (let s = 0; s < 500; s++) pairs.push([id, s]);
    const { hi, lo } = entries(pairs);
    const order = byLocation(hi, lo, pairs.length);
    expect(Array.from(order)).toEqual(reference(hi, lo));
    expect(new Set(order).size).toBe(pairs.length);
  });

  it('falls back to a full sort when runs interleave or there are too many of them', () => {
    const r = rng(11);
    // Two packs whose slots alternate between runs: the runs overlap.
    const pairs: [number, number][] = [];
    for (let s = 0; s < 300; s += 3) pairs.push([5, s], [9, s], [5, s + 1], [9, s + 2]);
    let { hi, lo } = entries(pairs);
    expect(keys(hi, lo, byLocation(hi, lo, pairs.length))).toEqual(keys(hi, lo, reference(hi, lo)));
    // Random refs: one run per entry or so (more than 4096 runs).
    const many: [number, number][] = Array.from({ length: 20_000 }, () => [Math.floor(r() * 50), Math.floor(r() * 65_536)]);
    ({ hi, lo } = entries(many));
    expect(keys(hi, lo, byLocation(hi, lo, many.length))).toEqual(keys(hi, lo, reference(hi, lo)));
  });

  it('handles one run, ties, a pack split in two non-overlapping runs, and nothing', () => {
    let { hi, lo } = entries([[3, 0], [3, 1], [3, 2]]);
    expect(Array.from(byLocation(hi, lo, 3))).toEqual([0, 1, 2]);
    ({ hi, lo } = entries([[3, 5], [3, 5], [2, 9], [2, 9]]));
    expect(keys(hi, lo, byLocation(hi, lo, 4))).toEqual(keys(hi, lo, reference(hi, lo)));
    // Pack 4's high slots first, then pack 1, then pack 4's low slots: three runs that do not overlap.
    ({ hi, lo } = entries([[4, 10], [4, 11], [1, 0], [1, 1], [4, 0], [4, 1]]));
    expect(Array.from(byLocation(hi, lo, 6))).toEqual([2, 3, 4, 5, 0, 1]);
    expect(byLocation(new Uint32Array(0), new Uint32Array(0), 0).length).toBe(0);
  });
});
