/**
 * The pooled gRPC receive decoder (src/grpc-recv-pool.ts): it must cut the
 * byte stream into exactly the framed messages grpc-js's own decoder would,
 * however the stream is split, keep grpc-js's size limit and error, and
 * recycle a large message's buffer only once it is handed back. The last
 * test runs a real store server on loopback and checks that uploads and
 * restores hand their buffers back (and stay bit-exact).
 */
import { createRequire } from 'node:module';
import { afterEach, describe, expect, it } from 'vitest';
import { installRecvPool, isLent, POOLED_MIN, recvPoolStats, releaseReceived } from '../../src/grpc-recv-pool.js';
import { StoreClient } from '../../src/store/client.js';
import { startStoreServer } from '../../src/store/server.js';
import { cleanupDirs, genBytes, PAGE, tempDir } from './helpers.js';

interface Decoder { write(data: Buffer): Buffer[] }
const req = createRequire(import.meta.url);
const { StreamDecoder } = req('@grpc/grpc-js/build/src/stream-decoder.js') as { StreamDecoder: new (max: number) => Decoder };

function frame(body: Buffer, compressed = 0): Buffer {
  const h = Buffer.alloc(5);
  h[0] = compressed;
  h.writeUInt32BE(body.length, 1);
  return Buffer.concat([h, body]);
}

/** Feed `stream` to a fresh decoder in pieces of the given sizes (cycled); collect the messages. */
function decode(stream: Buffer, sizes: number[], max = -1): Buffer[] {
  const d = new StreamDecoder(max);
  const out: Buffer[] = [];
  for (let at = 0, k = 0; at < stream.length; k++) {
    const n = Math.max(1, sizes[k % sizes.length]!);
    // Copy each piece into its own buffer, as the socket does: messages must not depend on it staying intact.
    const piece = Buffer.from(stream.subarray(at, at + n));
    out.push(...d.write(piece));
    piece.fill(0xee);
    at += n;
  }
  return out;
}

afterEach(cleanupDirs);

describe('pooled gRPC receive decoder', () => {
  it('is in place and cuts any split of the stream into the messages sent, byte for byte', () => {
    expect(installRecvPool()).toBe(true);
    const bodies = [0, 1, 5, 100, 16384, POOLED_MIN - 6, POOLED_MIN - 5, POOLED_MIN + 3, 3 * POOLED_MIN + 17, 0, 7]
      .map((n, i) => genBytes(`recv-pool/${i}`, n));
    const framed = bodies.map((b, i) => frame(b, i % 3 === 1 ? 1 : 0));
    const stream = Buffer.concat(framed);
    for (const sizes of [[stream.length], [1], [16384], [3, 7, 65536, 1, 2, 16384], [5], [4, 6], [1 << 20]]) {
      const got = decode(stream, sizes);
      expect(got.length).toBe(framed.length);
      got.forEach((m, i) => expect(m.equals(framed[i]!), `message ${i}, pieces ${sizes.join(',')}`).toBe(true));
      // Large ones are pooled (and can go back), small ones are not.
      got.forEach((m, i) => expect(isLent(m)).toBe(framed[i]!.length >= POOLED_MIN));
      got.forEach((m) => releaseReceived(m));
    }
  });

  it("refuses a message over the limit with grpc-js's error, before allocating for it", () => {
    const d = new StreamDecoder(1000);
    const before = recvPoolStats().taken;
    expect(() => d.write(frame(Buffer.alloc(1001)))).toThrow('Received message larger than max (1001 vs 1000)');
    expect(() => new StreamDecoder(10 << 20).write(Buffer.from([0, 0x7f, 0xff, 0xff, 0xff]))).toThrow(/Received message larger than max \(2147483647 vs 10485760\)/);
    expect(recvPoolStats().taken).toBe(before);
  });

  it('reuses a buffer only after it is handed back, and ignores a second hand-back or a foreign buffer', () => {
    const a = genBytes('recv-pool/a', 2 * POOLED_MIN);
    const b = genBytes('recv-pool/b', 2 * POOLED_MIN);
    const [m1] = decode(frame(a), [65536]);
    const [m2] = decode(frame(b), [65536]);
    // Both held: distinct memory, both intact.
    expect(m1!.buffer).not.toBe(m2!.buffer);
    expect(m1!.subarray(5).equals(a)).toBe(true);
    releaseReceived(m1!.subarray(5, 9)); // any view of the message hands it back
    expect(isLent(m1!)).toBe(false);
    releaseReceived(m1!); // twice: ignored
    releaseReceived(Buffer.alloc(16)); // not from the pool: ignored
    releaseReceived(null);
    const reused = recvPoolStats().reused;
    const [m3] = decode(frame(b), [65536]);
    expect(recvPoolStats().reused).toBe(reused + 1);
    expect(m3!.buffer).toBe(m1!.buffer); // the handed-back buffer, now holding the new message
    expect(m3!.subarray(5).equals(b)).toBe(true);
    expect(m2!.subarray(5).equals(b)).toBe(true); // the one still held was not touched
    // Large messages end on a page boundary of their buffer (page data starts on one).
    expect((m3!.byteOffset + m3!.length) % PAGE).toBe(0);
    releaseReceived(m2);
    releaseReceived(m3);
  });

  it('recycles the data messages of uploads and the pieces of restores against a real server, bit-exact', async () => {
    const srv = await startStoreServer({ dataDir: tempDir('exa-recvpool-'), port: 0 });
    const c = await StoreClient.connect(srv.address);
    try {
      const pages = 4096; // 16 MiB: 8 data messages of 512 pages
      const img = genBytes('recv-pool/img', pages * PAGE);
      const regions = [{ name: 'mem', pageCount: pages, address: '', flags: 0 }];
      const batches = Array.from({ length: pages / 512 }, (_, k) => ({
        region: new Array<number>(512).fill(0), index: Array.from({ length: 512 }, (_, i) => k * 512 + i), data: img.subarray(k * 512 * PAGE, (k + 1) * 512 * PAGE),
      }));
      const s0 = recvPoolStats();
      for (let round = 0; round < 3; round++) {
        // A fresh job each time: the same pages are offered and deduplicated after round 0, so only round 0 sends data.
        await c.putCheckpoint({ job: `j${round}`, parent: 0, regions }, batches);
      }
      const s1 = recvPoolStats();
      expect(s1.released - s0.released).toBe(8); // every data message went back once stored
      for (let round = 0; round < 3; round++) {
        const { regions: got } = await c.fetchImage({ job: 'j0' });
        expect(got.get('mem')!.equals(img)).toBe(true);
      }
      const s2 = recvPoolStats();
      expect(s2.released - s1.released).toBeGreaterThanOrEqual(3 * 4); // 4 MiB pieces, each handed back after its copy
      expect(s2.reused - s1.reused).toBeGreaterThan(0);
    } finally {
      c.close();
      await srv.close();
    }
  });
});
