/**
 * Batched pack reads and appends (native/addon/packio.cc through
 * storage/leveldb.ts): many ranges a call read with pread on the libuv pool,
 * each 4096-byte page optionally checked against its SHA-256 in the same
 * pass; appends of many buffers through an aligned scratch buffer, also to a
 * descriptor opened with O_DIRECT; read-ahead hints for restores. Bad arguments are
 * refused with clear errors; a short file and a bad descriptor are reported
 * per range; many calls at once each get their own bytes; a backend closed
 * while restores are reading keeps its pack descriptors open until the reads
 * in flight are done.
 */
import { constants, openSync, closeSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { alignedBuffer, packAdvise, packRead, packWrite } from '../../src/native.js';
import { CheckpointStore } from '../../storage/engine.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { sha256 } from '../../storage/pages.js';
import { cleanupDirs, genBytes, PAGE, tempDir } from './helpers.js';

afterEach(() => cleanupDirs());

function fileOf(bytes: Buffer): { fd: number; close: () => void } {
  const path = join(tempDir('exa-packio-'), 'f.pack');
  writeFileSync(path, bytes);
  const fd = openSync(path, 'r');
  return { fd, close: () => closeSync(fd) };
}

describe('native pack reads', () => {
  it('reads ranges into their places and checks every page against its hash in the same pass', async () => {
    const bytes = genBytes('packio/a', 64 * PAGE);
    const f = fileOf(bytes);
    try {
      // Pages 10..13 to dst 0..3, page 40 to dst 4, page 2 to dst 5.
      const dst = Buffer.alloc(6 * PAGE);
      const ops = new Float64Array([f.fd, 10 * PAGE, 4 * PAGE, 0, f.fd, 40 * PAGE, PAGE, 4 * PAGE, f.fd, 2 * PAGE, PAGE, 5 * PAGE]);
      const want = [10, 11, 12, 13, 40, 2].map((i) => bytes.subarray(i * PAGE, (i + 1) * PAGE));
      const hashes = Buffer.concat(want.map((p) => sha256(p)));
      hashes[4 * 32] = hashes[4 * 32]! ^ 1; // page 4's expected hash is wrong
      const r = await packRead(ops, dst, hashes);
      expect(Array.from(r.got)).toEqual([4 * PAGE, PAGE, PAGE]);
      expect(dst.equals(Buffer.concat(want))).toBe(true);
      expect(Array.from(r.ok!)).toEqual([1, 1, 1, 1, 0, 1]);
      // Without hashes: bytes only.
      const r2 = await packRead(new Float64Array([f.fd, 0, 100, 7]), Buffer.alloc(200));
      expect(r2.ok).toBeNull();
      expect(Array.from(r2.got)).toEqual([100]);
    } finally {
      f.close();
    }
  });

  it('reads ranges of one file with small holes between them in one call, in any order, each into its place', async () => {
    const bytes = genBytes('packio/holes', 200 * PAGE);
    const f = fileOf(bytes);
    const g = fileOf(genBytes('packio/holes-2', 16 * PAGE));
    try {
      // Runs of 1-3 pages of f with holes of 1-8 pages (read together), one hole of 40 pages (not), a range of
      // another file in between, the same page twice, listed out of file order; the last range runs past the end.
      const want: [number, number, number][] = [[5, 1, 0], [0, 2, 1], [3, 1, 3], [14, 3, 4], [6, 1, 7], [22, 1, 8],
        [62, 2, 9], [64, 1, 11], [3, 1, 12], [100, 4, 13], [199, 2, 17]];
      const ops: number[] = [];
      for (const [page, n, at] of want) {
        ops.push(f.fd, page * PAGE, n * PAGE, at * PAGE);
        if (at === 4) ops.push(g.fd, 7 * PAGE, PAGE, 19 * PAGE);
      }
      const dst = Buffer.alloc(20 * PAGE, 0xee);
      const r = await packRead(new Float64Array(ops), dst);
      const got = Array.from(r.got);
      const expectGot = want.flatMap(([page, n, at]) => {
        const len = Math.min(n, 200 - page) * PAGE;
        return at === 4 ? [len, PAGE] : [len];
      });
      expect(got).toEqual(expectGot);
      for (const [page, n, at] of want) {
        const len = Math.min(n, 200 - page) * PAGE;
        expect(dst.subarray(at * PAGE, at * PAGE + len).equals(bytes.subarray(page * PAGE, page * PAGE + len)), `page ${page} at ${at}`).toBe(true);
      }
      expect(dst.subarray(19 * PAGE, 20 * PAGE).equals(genBytes('packio/holes-2', 16 * PAGE).subarray(7 * PAGE, 8 * PAGE))).toBe(true);
      expect(dst.subarray(18 * PAGE, 19 * PAGE).every((b) => b === 0xee)).toBe(true); // past the end of f: untouched
    } finally {
      f.close();
      g.close();
    }
  });

  it('reports a short file and a bad descriptor per range, and refuses bad arguments with clear errors', async () => {
    const f = fileOf(genBytes('packio/short', PAGE + 100));
    try {
      const dst = Buffer.alloc(3 * PAGE);
      const r = await packRead(new Float64Array([f.fd, 0, 2 * PAGE, 0, 999_999, 0, PAGE, 2 * PAGE]), dst);
      expect(r.got[0]).toBe(PAGE + 100);
      expect(r.got[1]).toBe(-9); // -EBADF
      const bad: [unknown[], RegExp][] = [
        [[[1, 2, 3, 4], dst], /ops must be a Float64Array/],
        [[new Float64Array([f.fd, 0, PAGE]), dst], /not a multiple of 4/],
        [[new Float64Array([f.fd, 0, PAGE, 2.5 * PAGE]), dst], /outside dst/],
        [[new Float64Array([-1, 0, PAGE, 0]), dst], /fd must be a non-negative integer/],
        [[new Float64Array([f.fd, -4096, PAGE, 0]), dst], /file offset must be a non-negative integer/],
        [[new Float64Array([f.fd, 0, 0, 0]), dst], /length must be an integer from 1/],
        [[new Float64Array([f.fd, 0, PAGE, 0]), 'nope'], /dst must be a Buffer/],
        [[new Float64Array([f.fd, 0, PAGE, 0]), dst, Buffer.alloc(31)], /hashes are 31 bytes, expected 96/],
        [[new Float64Array([f.fd, 0, 10, 0]), Buffer.alloc(10), Buffer.alloc(32)], /whole 4096-byte pages/],
        [[], /expected \(ops/],
      ];
      for (const [args, msg] of bad) {
        let err: { code?: string; message: string } | null = null;
        try { await (packRead as unknown as (...a: unknown[]) => Promise<unknown>)(...args); } catch (e) { err = e as { code?: string; message: string }; }
        expect(err, String(msg)).not.toBeNull();
        expect(err!.message).toMatch(msg);
        expect(err!.code).toBe('INVALID_ARGUMENT');
      }
    } finally {
      f.close();
    }
  });

  it('appends many buffers at a page-aligned position, also through O_DIRECT, and refuses unaligned writes', async () => {
    const path = join(tempDir('exa-packio-'), 'w.pack');
    writeFileSync(path, Buffer.alloc(0));
    const data = genBytes('packio/write', 2000 * PAGE); // more than one 4 MiB scratch buffer
    // Pieces of odd sizes whose total is whole pages.
    const pieces = [data.subarray(0, 100), data.subarray(100, 5 * PAGE + 7), data.subarray(5 * PAGE + 7, 2000 * PAGE)];
    let fd: number;
    try {
      fd = openSync(path, constants.O_WRONLY | constants.O_DIRECT);
    } catch {
      fd = openSync(path, 'r+'); // a file system without O_DIRECT (tmpfs): the same call, buffered
    }
    try {
      expect(await packWrite(fd, PAGE, pieces)).toBe(2000 * PAGE);
      expect(await packWrite(fd, 2001 * PAGE, [data.subarray(0, PAGE)])).toBe(PAGE);
      const all = await Promise.all(Array.from({ length: 50 }, (_, k) => packWrite(fd, (2002 + k) * PAGE, [data.subarray(k * PAGE, (k + 1) * PAGE)])));
      expect(all.every((n) => n === PAGE)).toBe(true);
      const bad: [unknown[], RegExp][] = [
        [[fd, 100, [data.subarray(0, PAGE)]], /position must be a non-negative multiple of 4096/],
        [[fd, 0, [data.subarray(0, 100)]], /100 bytes is not a positive multiple of 4096/],
        [[fd, 0, []], /0 bytes is not a positive multiple/],
        [[fd, 0, ['x']], /element 0 is not a Buffer/],
        [[-3, 0, [data.subarray(0, PAGE)]], /fd must be a non-negative integer/],
        [[fd, 0], /expected \(fd/],
      ];
      for (const [args, msg] of bad) {
        let err: { code?: string; message: string } | null = null;
        try { await (packWrite as unknown as (...a: unknown[]) => Promise<unknown>)(...args); } catch (e) { err = e as { code?: string; message: string }; }
        expect(err!.message).toMatch(msg);
        expect(err!.code).toBe('INVALID_ARGUMENT');
      }
      // A failed write names what failed: a read-only descriptor.
      const ro = openSync(path, 'r');
      await expect(packWrite(ro, 0, [data.subarray(0, PAGE)])).rejects.toThrow(/packWrite: write of 4096 bytes at 0 failed/);
      closeSync(ro);
    } finally {
      closeSync(fd);
    }
    const back = readFileSync(path);
    expect(back.length).toBe(2052 * PAGE);
    expect(back.subarray(PAGE, 2001 * PAGE).equals(data)).toBe(true);
    expect(back.subarray(2001 * PAGE, 2002 * PAGE).equals(data.subarray(0, PAGE))).toBe(true);
    expect(back.subarray(2002 * PAGE).equals(data.subarray(0, 50 * PAGE))).toBe(true);
  });

  it('writes page-aligned buffers from where they lie, mixed with unaligned ones, bit-exact through O_DIRECT', async () => {
    const path = join(tempDir('exa-packio-'), 'a.pack');
    writeFileSync(path, Buffer.alloc(0));
    const data = genBytes('packio/aligned', 1100 * PAGE);
    const a = alignedBuffer(1030 * PAGE); // more than one scratch buffer's worth, written without it
    data.copy(a, 0, 0, 1030 * PAGE);
    // aligned (direct) | unaligned pieces making a page | aligned but after a partial scratch fill | aligned, whole pages again
    const pieces = [a.subarray(0, 1024 * PAGE), data.subarray(1024 * PAGE, 1024 * PAGE + 100), data.subarray(1024 * PAGE + 100, 1025 * PAGE), a.subarray(1025 * PAGE, 1026 * PAGE)];
    const tail = [data.subarray(1026 * PAGE, 1026 * PAGE + 5), data.subarray(1026 * PAGE + 5, 1027 * PAGE), a.subarray(1027 * PAGE, 1030 * PAGE)];
    let fd: number;
    try {
      fd = openSync(path, constants.O_WRONLY | constants.O_DIRECT);
    } catch {
      fd = openSync(path, 'r+');
    }
    try {
      expect(await packWrite(fd, 0, pieces)).toBe(1026 * PAGE);
      expect(await packWrite(fd, 1026 * PAGE, tail)).toBe(4 * PAGE);
    } finally {
      closeSync(fd);
    }
    expect(readFileSync(path).equals(data.subarray(0, 1030 * PAGE))).toBe(true);
    for (const bad of [0, -1, 1.5, 'x', 2 ** 31]) {
      expect(() => (alignedBuffer as unknown as (x: unknown) => Buffer)(bad)).toThrow(/alignedBuffer: size must be a positive integer/);
    }
  });

  it('asks the kernel to read spans ahead and refuses malformed spans', async () => {
    const f = fileOf(genBytes('packio/advise', 64 * PAGE));
    try {
      expect(await packAdvise(new Float64Array([f.fd, 0, 16 * PAGE, f.fd, 32 * PAGE, 32 * PAGE]))).toBe(2);
      // A bad descriptor is not an error of the call: the span is just not read ahead.
      expect(await packAdvise(new Float64Array([999_999, 0, PAGE]))).toBe(0);
      for (const [ops, msg] of [[new Float64Array([f.fd, 0]), /not a multiple of 3/], [new Float64Array([f.fd, 0, 0]), /length > 0/], [[1, 2, 3], /must be a Float64Array/]] as const) {
        let err: { code?: string; message: string } | null = null;
        try { await (packAdvise as unknown as (o: unknown) => Promise<number>)(ops); } catch (e) { err = e as { code?: string; message: string }; }
        expect(err!.message).toMatch(msg);
        expect(err!.code).toBe('INVALID_ARGUMENT');
      }
    } finally {
      f.close();
    }
  });

  it('answers 1,000 concurrent calls each with its own bytes', async () => {
    const bytes = genBytes('packio/many', 256 * PAGE);
    const f = fileOf(bytes);
    try {
      const calls = Array.from({ length: 1000 }, async (_, k) => {
        const page = (k * 37) % 256;
        const dst = Buffer.alloc(PAGE);
        const r = await packRead(new Float64Array([f.fd, page * PAGE, PAGE, 0]), dst, sha256(bytes.subarray(page * PAGE, (page + 1) * PAGE)));
        return r.ok![0] === 1 && dst.equals(bytes.subarray(page * PAGE, (page + 1) * PAGE));
      });
      expect((await Promise.all(calls)).every(Boolean)).toBe(true);
    } finally {
      f.close();
    }
  });

  it('keeps pack descriptors open for reads in flight when the backend is closed meanwhile', async () => {
    const dir = tempDir();
    const backend = await LevelBackend.open(dir);
    const store = new CheckpointStore(backend, { gcGraceMs: 0 });
    const pages = 4096;
    const img = genBytes('packio/close', pages * PAGE);
    const s = await store.beginPut({ job: 'c', parent: 0, regions: [{ name: 'mem', pageCount: pages, address: '', flags: 0 }] });
    for (let b = 0; b < pages; b += 1024) {
      const idx = [...Array(1024).keys()].map((i) => b + i);
      const hashes = Buffer.concat(idx.map((i) => sha256(img.subarray(i * PAGE, (i + 1) * PAGE))));
      await s.offerHashes({ batch: b, region: idx.map(() => 0), index: idx, hashes });
      await s.supplyData(b, img.subarray(b * PAGE, (b + 1024) * PAGE));
    }
    await s.commit();
    const [map] = (await backend.getMaps('c', 1))!;
    const refs = Array.from({ length: pages }, (_, i) => map!.subarray(i * 40 + 32, i * 40 + 40));
    // Reads under way, then close: every read in flight completes with the right bytes.
    const reads = Array.from({ length: 8 }, () => backend.readPages(refs));
    const closing = store.close();
    const got = await Promise.all(reads);
    await closing;
    for (const r of got) expect(Buffer.concat(r.map((p) => p!)).equals(img)).toBe(true);
    // After the close, the backend refuses new work with a clear error instead of reading a stale fd.
    await expect(backend.putPages([{ hash: sha256(img.subarray(0, PAGE)), data: img.subarray(0, PAGE) }])).rejects.toThrow(/the store is closed/);
    expect(await backend.readPages(refs.slice(0, 4))).toEqual([null, null, null, null]);
  });
});
