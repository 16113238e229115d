/**
 * The transport alone, for the `store` benchmark's baseline: a separate
 * process serving the Store service over the same gRPC stack as `exastore
 * serve` (src/grpc.ts server and channel settings, the receive pool, the
 * copy-free ImageChunk codec and frame patch of src/store/proto.ts), whose
 * handlers do no storage work at all:
 *
 *  - PutCheckpoint speaks the upload protocol (ready, wanted = every non-zero
 *    page, stored, committed) and drops the pages: no hash check, no pack
 *    write, no index;
 *  - GetImage streams IMAGE_PIECE_PAGES-page pieces of one in-memory buffer
 *    (recycled, with headroom, as the real server's pieces are): no pack read
 *    and no hash check.
 *
 * What the store does beyond this is what ingest_unique_vs_transport and
 * restore_vs_transport measure; what this does is the most any store on
 * this gRPC stack could reach on the machine. Not a store: for benchmarks only.
 *
 *   node dist/bench/transport-server.js   (prints "listening on HOST:PORT")
 */
import { randomFillSync } from 'node:crypto';
import type * as grpcTypes from '@grpc/grpc-js';
import { bidiStream, bindServer, createServer, MAX_MESSAGE_BYTES, messageReader, serverStream } from '../src/grpc.js';
import { releaseReceived } from '../src/grpc-recv-pool.js';
import { alignedBuffer } from '../src/native.js';
import { HEADROOM, headroomFor, type ImagePagesIn } from '../src/store/codec-image.js';
import { storeProto } from '../src/store/proto.js';
import { IMAGE_PIECE_PAGES } from '../src/store/server.js';
import type { ImageChunk } from '../src/gen/exa/v1/ImageChunk.js';
import type { PutRequest__Output } from '../src/gen/exa/v1/PutRequest.js';
import type { PutResponse } from '../src/gen/exa/v1/PutResponse.js';
import type { CheckpointInfo } from '../src/gen/exa/v1/CheckpointInfo.js';
import { PAGE_SIZE } from '../storage/pages.js';

const auth = {};
const headroom = headroomFor(IMAGE_PIECE_PAGES);
const pieceBytes = IMAGE_PIECE_PAGES * PAGE_SIZE;
/** Piece buffers: in flight at most a few (each waits for its write callback), recycled. */
const free: Buffer[] = [];
function takePiece(): Buffer {
  const b = free.pop();
  if (b) return b;
  const raw = alignedBuffer(headroom + pieceBytes + PAGE_SIZE);
  // The data starts page-aligned, as the engine's pieces do.
  const start = PAGE_SIZE - (headroom % PAGE_SIZE);
  const buf = raw.subarray(start, start + headroom + pieceBytes);
  randomFillSync(buf, headroom);
  return buf;
}

function info(job: string, checkpoint: number, pages: number): CheckpointInfo {
  return { job, checkpoint, parent: 0, created_at: new Date().toISOString(), regions: [{ name: 'mem', page_count: pages, address: '', flags: 0 }] } as CheckpointInfo;
}

const handlers = {
  PutCheckpoint: bidiStream<PutRequest__Output, PutResponse>(auth, async (call, emit) => {
    const next = messageReader<PutRequest__Output>(call);
    let job = '';
    let pages = 0;
    for (let req = await next(); req !== null; req = await next()) {
      switch (req.msg) {
        case 'begin':
          job = req.begin!.job;
          pages = req.begin!.regions.reduce((a, r) => a + Number(r.page_count), 0);
          await emit({ ready: { max_batch_pages: 4096, max_message_bytes: MAX_MESSAGE_BYTES } });
          break;
        case 'hashes': {
          const h = req.hashes!;
          const want: number[] = [];
          for (let i = 0; i < h.index.length; i++) if (!(h.zero.length > i && h.zero[i])) want.push(i);
          await emit({ wanted: { batch: h.batch, want } });
          break;
        }
        case 'data': {
          const d = req.data!;
          const n = d.data.length / PAGE_SIZE;
          releaseReceived(d.data);
          await emit({ stored: { batch: d.batch, pages: n } });
          break;
        }
        case 'commit':
          await emit({ committed: info(job, 1, pages) });
          return;
        default:
          break;
      }
    }
  }),

  GetImage: serverStream<{ job: string; page_count: number }, ImageChunk>(auth, async (req, emit) => {
    const pages = req.page_count;
    await emit({ info: info(req.job, 1, pages) } as ImageChunk);
    for (let first = 0; first < pages; first += IMAGE_PIECE_PAGES) {
      const n = Math.min(IMAGE_PIECE_PAGES, pages - first);
      const buf = takePiece();
      const data = buf.subarray(headroom, headroom + n * PAGE_SIZE);
      const p: ImagePagesIn = { region: 'mem', first_page: first, page_count: n, data, [HEADROOM]: headroom };
      await emit({ pages: p } as ImageChunk);
      free.push(buf);
    }
  }),
};

const server = createServer();
server.addService(storeProto().exa.v1.Store.service, handlers as unknown as grpcTypes.UntypedServiceImplementation);
const port = await bindServer(server, '127.0.0.1', 0);
console.log(`listening on 127.0.0.1:${port}`);
process.on('SIGTERM', () => { server.forceShutdown(); process.exit(0); });
