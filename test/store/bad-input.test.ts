/**
 * Bad input: unknown job or checkpoint (NOT_FOUND naming it), a page index
 * outside its region, a hash that does not match its bytes, a parent that
 * does not exist, an oversized message, a stream cut mid-way, and 1,000
 * malformed requests from a fuzzer. Each gets a clear status and the server
 * keeps serving (and keeps every committed checkpoint intact).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { StoreClient } from '../../src/store/client.js';
import { storeProto } from '../../src/store/proto.js';
import type { StoreClient as GenStoreClient } from '../../src/gen/exa/v1/Store.js';
import type { PutRequest } from '../../src/gen/exa/v1/PutRequest.js';
import { Image, PAGE, cleanupDirs, diffImage, killAll, randomPage, regionsOf, rng, startStore, tempDir, type StoreProc } from './helpers.js';

let server: StoreProc;
let c: StoreClient;
const base = new Image(regionsOf([['grid', 64], ['halo', 8]]), (r, i) => randomPage(`bad/${r}/${i}`));

beforeAll(async () => {
  server = await startStore(tempDir());
  c = await StoreClient.connect(server.address);
  await c.putCheckpoint({ job: 'known', parent: 0, regions: base.regions }, base.batches(base.allPages()));
});
afterAll(async () => { c?.close(); await killAll(); cleanupDirs(); });

type Failure = { code: string; message: string };
async function failure(p: Promise<unknown>): Promise<Failure> {
  try {
    await p;
  } catch (e) {
    return { code: (e as { code: string }).code, message: (e as Error).message };
  }
  throw new Error('expected a failure, got success');
}

/** The store still answers and still holds checkpoint 1 of "known" bit-exact. */
async function stillServing(): Promise<void> {
  expect(server.proc.exitCode).toBeNull();
  expect(diffImage(base, (await c.fetchImage({ job: 'known', checkpoint: 1 })).regions)).toBeNull();
}

function rawClient(opts: grpc.ClientOptions = {}): GenStoreClient {
  const Ctor = storeProto().exa.v1.Store;
  return new Ctor(server.address, grpc.credentials.createInsecure(), opts);
}

/** Run a raw PutCheckpoint with the given messages; resolves with the final status. */
function rawPut(client: GenStoreClient, msgs: PutRequest[], opts: { cancelAfterFirstReply?: boolean } = {}): Promise<grpc.StatusObject> {
  return new Promise((resolve) => {
    const call = client.PutCheckpoint();
    call.on('data', () => { if (opts.cancelAfterFirstReply) call.cancel(); });
    call.on('error', () => undefined);
    call.on('status', (s) => resolve(s));
    for (const m of msgs) call.write(m);
    if (!opts.cancelAfterFirstReply) call.end();
  });
}

const sha = (b: Buffer): Buffer => createHash('sha256').update(b).digest();

describe('store bad input', () => {
  it('answers NOT_FOUND naming an unknown job, checkpoint, region or parent', async () => {
    let f = await failure(c.fetchImage({ job: 'nosuch' }));
    expect(f.code).toBe('NOT_FOUND');
    expect(f.message).toContain('job nosuch has no checkpoints');
    f = await failure(c.fetchImage({ job: 'known', checkpoint: 99 }));
    expect(f.code).toBe('NOT_FOUND');
    expect(f.message).toContain('checkpoint 99 of job known does not exist');
    f = await failure(c.fetchImage({ job: 'known', checkpoint: 1, region: 'nope' }));
    expect(f.code).toBe('NOT_FOUND');
    expect(f.message).toContain('region "nope" is not in checkpoint 1 of job known (regions: grid, halo)');
    f = await failure(c.listCheckpoints('nosuch'));
    expect([f.code, f.message.includes('job nosuch')]).toEqual(['NOT_FOUND', true]);
    f = await failure(c.deleteCheckpoints('known', { checkpoints: [7] }));
    expect([f.code, f.message.includes('checkpoint 7 of job known does not exist')]).toEqual(['NOT_FOUND', true]);
    f = await failure(c.verify({ job: 'nosuch' }));
    expect(f.code).toBe('NOT_FOUND');
    f = await failure(c.putCheckpoint({ job: 'known', parent: 5, regions: base.regions }, base.batches([[0, 0]])));
    expect(f.code).toBe('NOT_FOUND');
    expect(f.message).toContain('parent checkpoint 5 of job known does not exist');
    f = await failure(c.putCheckpoint({ job: 'fresh', parent: 1, regions: base.regions }, []));
    expect(f.message).toContain('parent checkpoint 1 of job fresh does not exist (job fresh has no checkpoints)');
    await stillServing();
  });

  it('rejects a page outside its region, a hash that does not match, and bad region tables, naming the culprit', async () => {
    let f = await failure(c.putCheckpoint({ job: 'known', parent: 1, regions: base.regions },
      [{ region: [1], index: [8], data: randomPage('x') }]));
    expect(f.code).toBe('INVALID_ARGUMENT');
    expect(f.message).toContain('page 8 is outside region "halo" (8 pages)');
    f = await failure(c.putCheckpoint({ job: 'known', parent: 1, regions: base.regions },
      [{ region: [2], index: [0], data: randomPage('x') }]));
    expect(f.message).toContain('region 2 does not exist (the checkpoint has 2 regions)');
    // Bytes that do not match the hash the writer claims.
    const page = randomPage('claimed');
    const hashes = Buffer.concat([sha(randomPage('other')), sha(page)]);
    f = await failure(c.putCheckpoint({ job: 'known', parent: 1, regions: base.regions },
      [{ region: [0, 0], index: [3, 4], data: Buffer.concat([page, page]), hashes }]));
    expect(f.code).toBe('INVALID_ARGUMENT');
    expect(f.message).toMatch(/page 3 of region "grid": bytes do not match hash/);
    for (const [regions, what] of [
      [[], 'at least one region'],
      [regionsOf([['a', 1], ['a', 2]]), 'region name "a" appears twice'],
      [[{ name: 'a', pageCount: 1, address: 'not-an-address', flags: 0 }], 'invalid address'],
      [regionsOf([['huge', 1 << 30]]), 'exceeds the store\'s limit'],
    ] as const) {
      f = await failure(c.putCheckpoint({ job: 'shape', parent: 0, regions: regions as never }, []));
      expect(f.message).toContain(what);
    }
    f = await failure(c.putCheckpoint({ job: 'bad job/../x', parent: 0, regions: base.regions }, []));
    expect(f.code).toBe('INVALID_ARGUMENT');
    expect(f.message).toContain('invalid job id "bad job/../x"');
    // Nothing of these attempts is visible.
    expect((await c.listCheckpoints('known')).map((x) => x.checkpoint)).toEqual([1]);
    expect((await c.listJobs()).map((j) => j.job)).toEqual(['known']);
    await stillServing();
  });

  it('rejects an oversized message with RESOURCE_EXHAUSTED and keeps serving', async () => {
    const raw = rawClient({ 'grpc.max_send_message_length': -1 });
    const n = 16384; // 64 MiB of data, over the 48 MiB limit
    const st = await rawPut(raw, [
      { begin: { job: 'big', parent: 0, regions: [{ name: 'm', page_count: n, address: '', flags: 0 }] } },
      { hashes: { batch: 0, region: [0], index: [0], hashes: sha(randomPage('p')), zero: Buffer.alloc(0) } },
      { data: { batch: 0, data: Buffer.alloc(n * PAGE, 1) } },
    ]);
    expect(st.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(st.details).toMatch(/larger than max/i);
    raw.close();
    await expect(c.listCheckpoints('big')).rejects.toThrow(/job big has no checkpoints/);
    await stillServing();
  });

  it('leaves nothing visible when a stream is cut mid-way or ends without commit', async () => {
    const raw = rawClient();
    const begin: PutRequest = { begin: { job: 'known', parent: 1, regions: base.regions.map((r) => ({ name: r.name, page_count: r.pageCount, address: '', flags: 0 })) } };
    const p = randomPage('cut');
    const hashes: PutRequest = { hashes: { batch: 0, region: [0], index: [0], hashes: sha(p), zero: Buffer.alloc(0) } };
    const cut = await rawPut(raw, [begin, hashes], { cancelAfterFirstReply: true });
    expect(cut.code).toBe(grpc.status.CANCELLED);
    const ended = await rawPut(raw, [begin, hashes, { data: { batch: 0, data: p } }]);
    expect(ended.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(ended.details).toContain('ended before commit; nothing was recorded');
    // A page the store has never seen (the one above was stored before the stream ended: garbage now).
    const unseen: PutRequest = { hashes: { batch: 0, region: [0], index: [0], hashes: sha(randomPage('never-sent')), zero: Buffer.alloc(0) } };
    const early = await rawPut(raw, [begin, unseen, { commit: {} }]);
    expect(early.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(early.details).toContain('still await their page data');
    const wrongSize = await rawPut(raw, [begin, unseen, { data: { batch: 0, data: p.subarray(0, 100) } }]);
    expect(wrongSize.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(wrongSize.details).toContain('100 bytes of data, expected 4096');
    raw.close();
    expect((await c.listCheckpoints('known')).map((x) => x.checkpoint)).toEqual([1]);
    await stillServing();
  });

  it('answers 1,000 malformed requests from a fuzzer with clear statuses and keeps serving', async () => {
    const rand = rng(31337);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
    const rbytes = (n: number): Buffer => { const b = Buffer.alloc(n); for (let i = 0; i < n; i++) b[i] = Math.floor(rand() * 256); return b; };
    const rstr = (): string => pick(['', 'known', 'x'.repeat(300), 'a b', '../etc', '\u0000', 'ok-job', rbytes(6).toString('latin1')]);
    const raw = rawClient();
    // A generic client that sends arbitrary bytes as a request.
    const generic = new grpc.Client(server.address, grpc.credentials.createInsecure());
    const pass = (b: Buffer): Buffer => b;
    const okRegions = [{ name: 'm', page_count: 16, address: '', flags: 0 }];
    const violations: (() => PutRequest[])[] = [
      () => [{ hashes: { batch: 0, region: [0], index: [0], hashes: rbytes(32), zero: Buffer.alloc(0) } }],                  // hashes before begin
      () => [{ data: { batch: 1, data: rbytes(PAGE) } }],                                                                 // data before begin
      () => [{ commit: {} }],                                                                                              // commit before begin
      () => [{}],                                                                                                          // empty request
      () => [{ begin: { job: rstr() || ' ', parent: Math.floor(rand() * 5), regions: [] } }],                              // no regions
      () => [{ begin: { job: 'fz', parent: 0, regions: okRegions } }, { begin: { job: 'fz', parent: 0, regions: okRegions } }], // begin twice
      () => [{ begin: { job: 'fz', parent: 0, regions: okRegions } }, { hashes: { batch: 0, region: [0, 0], index: [1], hashes: rbytes(64), zero: Buffer.alloc(0) } }], // length mismatch
      () => [{ begin: { job: 'fz', parent: 0, regions: okRegions } }, { hashes: { batch: 0, region: [0], index: [Math.floor(rand() * 1e9) + 16], hashes: rbytes(32), zero: Buffer.alloc(0) } }], // index out of range
      () => [{ begin: { job: 'fz', parent: 0, regions: okRegions } }, { hashes: { batch: 0, region: [0], index: [0], hashes: rbytes(31), zero: Buffer.alloc(0) } }], // short hash
      () => [{ begin: { job: 'fz', parent: 0, regions: okRegions } }, { hashes: { batch: 0, region: [0], index: [0], hashes: rbytes(32), zero: Buffer.alloc(0) } }, { data: { batch: 0, data: rbytes(PAGE) } }], // wrong bytes
      () => [{ begin: { job: 'fz', parent: 0, regions: okRegions } }, { data: { batch: 9, data: rbytes(Math.floor(rand() * 100)) } }], // data for no batch
      () => [{ begin: { job: 'fz', parent: 0, regions: [{ name: '', page_count: 1, address: '', flags: 0 }] } }],        // empty region name
      () => [{ begin: { job: 'known', parent: 1000 + Math.floor(rand() * 1000), regions: okRegions } }],                  // missing parent
      () => [{ begin: { job: 'fz', parent: 0, regions: [{ name: 'm', page_count: 4, address: rstr() + 'zz', flags: 0 }] } }], // bad address
    ];
    const codes = new Map<string, number>();
    const note = (code: number, details: string, what: string): void => {
      // A clear status: an error code, never OK or UNKNOWN, with a message.
      expect(code, what).not.toBe(grpc.status.OK);
      expect(code, what).not.toBe(grpc.status.UNKNOWN);
      expect(details.length, what).toBeGreaterThan(0);
      codes.set(grpc.status[code]!, (codes.get(grpc.status[code]!) ?? 0) + 1);
    };
    const one = async (k: number): Promise<void> => {
      const kind = k % 4;
      if (kind === 0 || kind === 1) {
        const v = pick(violations);
        const st = await rawPut(raw, v());
        note(st.code, st.details, `put #${k}`);
      } else if (kind === 2) {
        // Random bytes as a GetImage / ListCheckpoints request: they decode to nonsense or fail to decode.
        const method = pick(['/exa.v1.Store/GetImage', '/exa.v1.Store/ListCheckpoints', '/exa.v1.Store/Verify']);
        const body = rbytes(1 + Math.floor(rand() * 64));
        const st = await new Promise<grpc.StatusObject>((resolve) => {
          if (method === '/exa.v1.Store/ListCheckpoints') {
            generic.makeUnaryRequest(method, pass, pass, body, (err) => resolve(err ? { code: err.code, details: err.details, metadata: err.metadata } : { code: 0, details: '', metadata: new grpc.Metadata() }));
          } else {
            const s = generic.makeServerStreamRequest(method, pass, pass, body);
            s.on('data', () => undefined);
            s.on('error', () => undefined);
            s.on('status', resolve);
          }
        });
        // A Verify of random bytes may decode to "verify everything", which is fine: then it must succeed.
        if (method === '/exa.v1.Store/Verify' && st.code === grpc.status.OK) { codes.set('OK(verify)', (codes.get('OK(verify)') ?? 0) + 1); return; }
        note(st.code, st.details, `${method} #${k}`);
      } else {
        // Random structured GetImage requests that cannot be satisfied.
        const req = pick([
          { job: pick(['', 'x'.repeat(300), 'a b', `nosuch-${k}`]), checkpoint: Math.floor(rand() * 10), region: '', first_page: 0, page_count: 0 },
          { job: 'known', checkpoint: 2 + Math.floor(rand() * 100), region: '', first_page: 0, page_count: 0 },
          { job: 'known', checkpoint: 1, region: 'grid', first_page: 64 + Math.floor(rand() * 1000), page_count: 1 },
          { job: 'known', checkpoint: 1, region: 'grid', first_page: Math.floor(rand() * 64), page_count: 65 },
          { job: 'known', checkpoint: 1, region: '', first_page: 1 + Math.floor(rand() * 10), page_count: 0 },
          { job: 'known', checkpoint: 1, region: rstr() + '?', first_page: 0, page_count: 0 },
        ]);
        const st = await new Promise<grpc.StatusObject>((resolve) => {
          const s = raw.GetImage(req);
          s.on('data', () => undefined);
          s.on('error', () => undefined);
          s.on('status', resolve);
        });
        note(st.code, st.details, `GetImage ${JSON.stringify(req).slice(0, 80)}`);
      }
    };
    let next = 0;
    await Promise.all(Array.from({ length: 16 }, async () => {
      while (next < 1000) await one(next++);
    }));
    raw.close();
    generic.close();
    const total = [...codes.values()].reduce((a, b) => a + b, 0);
    expect(total).toBe(1000);
    expect(codes.get('INVALID_ARGUMENT') ?? 0).toBeGreaterThan(100);
    expect(codes.get('NOT_FOUND') ?? 0).toBeGreaterThan(50);
    // Nothing the fuzzer sent became a checkpoint, and the server still works normally.
    expect((await c.listJobs()).map((j) => j.job)).toEqual(['known']);
    await stillServing();
    const img = new Image(regionsOf([['m', 32]]), (_r, i) => randomPage(`after/${i}`));
    await c.putCheckpoint({ job: 'after-fuzz', parent: 0, regions: img.regions }, img.batches(img.allPages()));
    expect(diffImage(img, (await c.fetchImage({ job: 'after-fuzz' })).regions)).toBeNull();
    expect((await c.verify()).ok).toBe(true);
  });
});
