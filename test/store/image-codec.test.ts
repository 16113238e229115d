/**
 * The hand-written ImageChunk codec (src/store/codec-image.ts) against
 * protobufjs, the codec it replaces: the same wire format both ways on
 * random messages (dense, with zero pages, sparse), the zero-copy path, and
 * malformed bytes rejected with a message that says what is wrong. Then
 * end to end: a client with grpc-js's stock protobufjs codec restores
 * bit-exact from the server, and several restores at once (recycled piece
 * buffers, pre-framed messages) stay bit-exact.
 */
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { afterEach, describe, expect, it } from 'vitest';
import { PROTO_DIR, PROTO_LOADER_OPTIONS } from '../../src/grpc.js';
import {
  HEADROOM, ImageChunkFormatError, deserializeImagePages, headroomFor, installServerFramePatch, serializeImagePages, type ImagePagesIn,
} from '../../src/store/codec-image.js';
import { StoreClient } from '../../src/store/client.js';
import { Image, PAGE, cleanupDirs, diffImage, killAll, randomPage, regionsOf, rng, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

/** The stock (protobufjs) codec of GetImage, from a fresh load of the proto. */
function stockGetImage(): { serialize: (v: unknown) => Buffer; deserialize: (b: Buffer) => Record<string, unknown> } {
  const def = protoLoader.loadSync(join(PROTO_DIR, 'exa_store.proto'), PROTO_LOADER_OPTIONS);
  const m = (def['exa.v1.Store'] as unknown as Record<string, { responseSerialize: (v: unknown) => Buffer; responseDeserialize: (b: Buffer) => Record<string, unknown> }>).GetImage!;
  return { serialize: m.responseSerialize, deserialize: m.responseDeserialize };
}

function randomPages(rand: () => number, i: number): ImagePagesIn {
  const n = 1 + Math.floor(rand() * 40);
  const sparse = rand() < 0.3;
  const zero = rand() < 0.4 ? Buffer.from(Array.from({ length: n }, () => (rand() < 0.3 ? 1 : 0))) : Buffer.alloc(0);
  const nonZero = zero.length ? zero.filter((z) => z === 0).length : n;
  const pages = sparse ? Array.from({ length: n }, (_, k) => k * 3 + Math.floor(rand() * 3) + (rand() < 0.1 ? 2 ** 31 : 0)).sort((a, b) => a - b) : [];
  const names = ['', 'heap', 'grid', 'région-ü', 'x'.repeat(300)];
  return {
    region: names[i % names.length]!,
    first_page: sparse ? pages[0]! : Math.floor(rand() * 2 ** 32),
    page_count: sparse ? 0 : n,
    zero,
    data: Buffer.concat(Array.from({ length: nonZero }, (_, k) => randomPage(`codec/${i}/${k}`))),
    pages,
  };
}

function norm(p: Record<string, unknown>): Record<string, unknown> {
  return { ...p, zero: Buffer.from(p.zero as Buffer).toString('hex'), data: Buffer.from(p.data as Buffer).toString('hex') };
}

describe('ImageChunk codec', () => {
  it('encodes what protobufjs decodes and decodes what protobufjs encodes, on random pieces with zero pages and sparse page lists', () => {
    const stock = stockGetImage();
    const rand = rng(7);
    for (let i = 0; i < 200; i++) {
      const p = randomPages(rand, i);
      const ours = serializeImagePages(p);
      const theirs = stock.serialize({ pages: p });
      const decodedByStock = stock.deserialize(ours);
      expect(decodedByStock.msg).toBe('pages');
      expect(norm(decodedByStock.pages as Record<string, unknown>)).toEqual(norm({ region: p.region, first_page: p.first_page, page_count: p.page_count, zero: p.zero, data: p.data, pages: p.pages }));
      const decodedByUs = deserializeImagePages(theirs);
      expect(decodedByUs).not.toBeNull();
      expect(norm(decodedByUs as unknown as Record<string, unknown>)).toEqual(norm(decodedByStock.pages as Record<string, unknown>));
      // (Not byte for byte: protobufjs also writes fields set to their default, and data
      // goes last here, after the page list, so that the header can go in front of it.)
    }
  });

  it('writes the header into the headroom in front of the data instead of copying the pages', () => {
    const pages = 64;
    const room = headroomFor(pages);
    const backing = Buffer.alloc(room + pages * PAGE);
    const data = backing.subarray(room);
    for (let k = 0; k < pages; k++) randomPage(`room/${k}`).copy(data, k * PAGE);
    const out = serializeImagePages({ region: 'heap', first_page: 5, page_count: pages, data, [HEADROOM]: room });
    expect(out.buffer).toBe(backing.buffer);
    expect(out.byteOffset + out.length).toBe(backing.byteOffset + backing.length);
    const back = deserializeImagePages(Buffer.from(out))!;
    expect(back.region).toBe('heap');
    expect(back.first_page).toBe(5);
    expect(back.page_count).toBe(pages);
    expect(back.data.equals(data)).toBe(true);
    // Too little room: a copy, same bytes.
    const copied = serializeImagePages({ region: 'heap', first_page: 5, page_count: pages, data, [HEADROOM]: 3 });
    expect(copied.buffer).not.toBe(backing.buffer);
    expect(copied.equals(out)).toBe(true);
  });

  it('leaves info messages to protobufjs', () => {
    const stock = stockGetImage();
    const b = stock.serialize({ info: { job: 'j', checkpoint: 3 } });
    expect(deserializeImagePages(b)).toBeNull();
  });

  it('rejects malformed messages with a message naming what is wrong', () => {
    const good = serializeImagePages({ region: 'heap', first_page: 1, page_count: 2, data: Buffer.alloc(2 * PAGE, 7) });
    const cases: [Buffer, RegExp][] = [
      [good.subarray(0, good.length - 10), /ImageChunk\.pages: length \d+ runs past the end/],
      [Buffer.from([0x12, 0x05, 0x2a, 0x80, 0x80, 0x80, 0x80]), /ImagePages\.data length: truncated varint/],
      [Buffer.from([0x12, 0x03, 0x2a, 0x7f, 0x00]), /ImagePages\.data: length 127 runs past the end/],
      [Buffer.from([0x12, 0x02, 0x0d, 0x00]), /ImagePages\.region has wire type 5, expected 2/],
      [Buffer.from([0x12, 0x02, 0x17, 0x00]), /field 2 has wire type 7|ImagePages\.first_page has wire type 7, expected 0/],
      [Buffer.from([0x13, 0x00]), /ImageChunk\.pages has wire type 3, expected 2/],
      [Buffer.from([0x12, 0x0b, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), /varint longer than 10 bytes/],
      [Buffer.from([0x02, 0x00]), /field number 0/],
    ];
    for (const [bytes, re] of cases) {
      let err: unknown = null;
      try { deserializeImagePages(bytes); } catch (e) { err = e; }
      expect(err, bytes.toString('hex')).toBeInstanceOf(ImageChunkFormatError);
      expect((err as Error).message).toMatch(/^malformed ImageChunk: /);
      expect((err as Error).message, bytes.toString('hex')).toMatch(re);
    }
    // Random corruption of a valid message: decoded or refused with ImageChunkFormatError, nothing else.
    const rand = rng(3);
    for (let i = 0; i < 2000; i++) {
      const b = Buffer.from(good.subarray(0, 40 + Math.floor(rand() * 20)));
      for (let k = 0; k < 3; k++) b[Math.floor(rand() * b.length)] = Math.floor(rand() * 256);
      try { deserializeImagePages(b); } catch (e) { expect(e).toBeInstanceOf(ImageChunkFormatError); }
    }
    expect(() => serializeImagePages({ region: 'x', first_page: -1, data: Buffer.alloc(0) })).toThrow(/first_page must be a uint32/);
  });

  it('a client with the stock protobufjs codec restores bit-exact, zero pages included', async () => {
    expect(installServerFramePatch()).toBe(true);
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const rand = rng(11);
    const img = new Image(regionsOf([['heap', 1500], ['grid', 300]]), (r, i) => (rand() < 0.2 ? null : randomPage(`stock/${r}/${i}`)));
    await c.putCheckpoint({ job: 'stock', parent: 0, regions: img.regions }, img.batches(img.allPages(), 512));
    c.close();
    const def = protoLoader.loadSync(join(PROTO_DIR, 'exa_store.proto'), PROTO_LOADER_OPTIONS);
    const Ctor = grpc.makeClientConstructor(def['exa.v1.Store'] as grpc.ServiceDefinition, 'Store');
    const stock = new Ctor(server.address, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': 64 << 20 });
    try {
      const got = new Map(img.regions.map((r) => [r.name, Buffer.alloc(r.pageCount * PAGE)]));
      const call = (stock as unknown as { GetImage(req: unknown): AsyncIterable<{ msg: string; pages?: { region: string; first_page: number; page_count: number; zero: Buffer; data: Buffer } }> }).GetImage({ job: 'stock', checkpoint: 1 });
      let pieces = 0;
      for await (const m of call) {
        if (m.msg !== 'pages') continue;
        pieces++;
        const p = m.pages!;
        const buf = got.get(p.region)!;
        let k = 0;
        for (let i = 0; i < p.page_count; i++) {
          if (p.zero.length && p.zero[i]) continue;
          p.data.copy(buf, (p.first_page + i) * PAGE, k * PAGE, (k + 1) * PAGE);
          k++;
        }
        expect(k * PAGE).toBe(p.data.length);
      }
      expect(pieces).toBeGreaterThanOrEqual(2);
      expect(diffImage(img, got)).toBeNull();
    } finally {
      stock.close();
    }
  });

  it('eight restores at once through recycled piece buffers are each bit-exact', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    const imgs: Image[] = [];
    for (let j = 0; j < 4; j++) {
      const img = new Image(regionsOf([['mem', 2500 + 700 * j]]), (_r, i) => (i % 17 === 5 ? null : randomPage(`many/${j}/${i}`)));
      await c.putCheckpoint({ job: `many-${j}`, parent: 0, regions: img.regions }, img.batches(img.allPages(), 1024));
      imgs.push(img);
    }
    const results = await Promise.all(Array.from({ length: 8 }, (_, k) => c.fetchImage({ job: `many-${k % 4}`, checkpoint: 1 })));
    results.forEach((r, k) => expect(diffImage(imgs[k % 4]!, r.regions), `restore ${k}`).toBeNull());
    c.close();
  });
});
