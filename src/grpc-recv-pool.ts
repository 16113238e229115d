import { createRequire } from 'node:module';
import { alignedBuffer } from './native.js';

/**
 * Recycled receive buffers for large gRPC messages.
 *
 * grpc-js reassembles every received message with Buffer.concat, so each
 * 8 MiB PutCheckpoint data message is a fresh 8 MiB allocation (page faults,
 * and external memory that drives V8 into a full mark-compact every few
 * dozen MiB: ~40 a GiB ingested). installRecvPool() replaces
 * StreamDecoder.prototype.write (grpc-js 1.10-1.14, client and server) with
 * the same state machine, except that every message is copied, chunk by
 * chunk as it arrives, into its own buffer (the same one copy that
 * Buffer.concat made), and one of at least POOLED_MIN bytes into a buffer
 * taken from a free list. Whoever is done with such a message hands it back with
 * releaseReceived(); a message never handed back is simply garbage, as with
 * the stock decoder. Wire behaviour and errors are unchanged.
 *
 * The contract for callers of releaseReceived(view): nothing may read or
 * keep any view of that message afterwards (the bytes will be overwritten by
 * a later message). src/store/server.ts releases a data message once the
 * engine's supplyData() has settled: the engine and backends never keep page
 * buffers past their promise (storage/backend.ts).
 */

/** Messages (with their 5-byte frame header) at least this large are assembled in recycled buffers. */
export const POOLED_MIN = 1024 * 1024;
/** Buffer capacities are rounded up to this, so messages of nearly equal size share buffers. */
const CAPACITY_STEP = 1024 * 1024;
/** Page size: where page data should start. */
const PAGE = 4096;
/** Free buffers kept, in bytes, at most. */
const FREE_MAX_BYTES = 96 * 1024 * 1024;

const free = new Map<number, Buffer[]>();
let freeBytes = 0;
/** The buffers handed out and not yet released, by their ArrayBuffer. */
const lent = new WeakMap<ArrayBufferLike, Buffer>();
const counts = { taken: 0, reused: 0, released: 0 };

/**
 * A buffer for a message of `bytes` bytes (frame header included), placed so
 * that the message ends on a 4096-byte boundary: page data, which is whole
 * pages at the end of the message (PutCheckpoint data, GetImage pieces),
 * then starts on one, and storage/leveldb.ts writes it to its O_DIRECT pack
 * files from where it lies, without a copy (native/addon/packio.cc).
 */
function take(bytes: number): Buffer {
  const cap = Math.ceil((bytes + PAGE - 1) / CAPACITY_STEP) * CAPACITY_STEP;
  const list = free.get(cap);
  let buf = list?.pop();
  counts.taken++;
  if (buf) {
    freeBytes -= cap;
    counts.reused++;
  } else {
    buf = alignedBuffer(cap);
  }
  lent.set(buf.buffer, buf);
  const start = (PAGE - (bytes % PAGE)) % PAGE;
  return buf.subarray(start, start + bytes);
}

/**
 * Hand back the buffer behind `view` (any view of a received message).
 * A view of anything else, or of a message already handed back, is ignored.
 */
export function releaseReceived(view: Uint8Array | null | undefined): void {
  if (!view) return;
  const buf = lent.get(view.buffer);
  if (!buf) return;
  lent.delete(view.buffer);
  counts.released++;
  if (freeBytes + buf.length > FREE_MAX_BYTES) return;
  let list = free.get(buf.length);
  if (!list) free.set(buf.length, (list = []));
  list.push(buf);
  freeBytes += buf.length;
}

/** Whether `view` lies in a pooled message not yet handed back (for tests and assertions). */
export function isLent(view: Uint8Array): boolean {
  return lent.has(view.buffer);
}

/** Counters since start: buffers taken, how many of those were reused, how many came back. */
export function recvPoolStats(): { taken: number; reused: number; released: number; freeBytes: number } {
  return { ...counts, freeBytes };
}

const NO_DATA = 0;
const READING_SIZE = 1;
const READING_MESSAGE = 2;

/** The fields of grpc-js's StreamDecoder that the state machine uses (same names, same meaning). */
interface DecoderState {
  maxReadMessageLength: number;
  readState: number;
  readCompressFlag: Buffer;
  readPartialSize: Buffer;
  readSizeRemaining: number;
  readMessageSize: number;
  readMessageRemaining: number;
  /** Ours: the pooled buffer the current large message is copied into, and how far. */
  exaDst?: Buffer | null;
  exaPos?: number;
}

/**
 * StreamDecoder.write: the same states and fields as grpc-js's, except that a
 * message is copied into its own buffer as its bytes arrive (a pooled one
 * when large) instead of keeping views of the socket's chunks and joining
 * them at the end. No view of `data` outlives the call.
 */
function write(this: DecoderState, data: Buffer): Buffer[] {
  let readHead = 0;
  let toRead: number;
  const result: Buffer[] = [];
  while (readHead < data.length) {
    switch (this.readState) {
      case NO_DATA:
        this.readCompressFlag[0] = data[readHead]!;
        readHead += 1;
        this.readState = READING_SIZE;
        this.readPartialSize.fill(0);
        this.readSizeRemaining = 4;
        this.readMessageSize = 0;
        this.readMessageRemaining = 0;
        this.exaDst = null;
        break;
      case READING_SIZE:
        toRead = Math.min(data.length - readHead, this.readSizeRemaining);
        data.copy(this.readPartialSize, 4 - this.readSizeRemaining, readHead, readHead + toRead);
        this.readSizeRemaining -= toRead;
        readHead += toRead;
        if (this.readSizeRemaining === 0) {
          this.readMessageSize = this.readPartialSize.readUInt32BE(0);
          if (this.maxReadMessageLength !== -1 && this.readMessageSize > this.maxReadMessageLength) {
            throw new Error(`Received message larger than max (${this.readMessageSize} vs ${this.maxReadMessageLength})`);
          }
          const framed = this.readMessageSize + 5;
          const dst = framed >= POOLED_MIN ? take(framed) : Buffer.allocUnsafe(framed);
          dst[0] = this.readCompressFlag[0]!;
          this.readPartialSize.copy(dst, 1, 0, 4);
          this.readMessageRemaining = this.readMessageSize;
          if (this.readMessageRemaining > 0) {
            this.readState = READING_MESSAGE;
            this.exaDst = dst;
            this.exaPos = 5;
          } else {
            this.readState = NO_DATA;
            result.push(dst);
          }
        }
        break;
      case READING_MESSAGE: {
        toRead = Math.min(data.length - readHead, this.readMessageRemaining);
        const dst = this.exaDst!;
        data.copy(dst, this.exaPos!, readHead, readHead + toRead);
        this.exaPos! += toRead;
        this.readMessageRemaining -= toRead;
        readHead += toRead;
        if (this.readMessageRemaining === 0) {
          this.readState = NO_DATA;
          this.exaDst = null;
          result.push(dst);
        }
        break;
      }
      default:
        throw new Error('Unexpected read state');
    }
  }
  return result;
}

let installed: boolean | null = null;

/**
 * Put the pooled write() in place of grpc-js's, once, if grpc-js's decoder
 * still looks as this one expects (its fields and its error); otherwise
 * leave grpc-js alone and return false (everything works, without reuse).
 */
export function installRecvPool(): boolean {
  if (installed !== null) return installed;
  installed = false;
  if (process.env.EXA_GRPC_NO_TUNING) return false;
  try {
    const req = createRequire(import.meta.url);
    const mod = req('@grpc/grpc-js/build/src/stream-decoder.js') as { StreamDecoder?: new (max: number) => DecoderState & { write(d: Buffer): Buffer[] } };
    const D = mod.StreamDecoder;
    if (!D) return false;
    const src = String(D.prototype.write);
    const probe = new D(16) as unknown as Record<string, unknown>;
    const fields = ['maxReadMessageLength', 'readState', 'readCompressFlag', 'readPartialSize', 'readSizeRemaining', 'readMessageSize', 'readPartialMessage', 'readMessageRemaining'];
    if (!fields.every((f) => f in probe) || probe.readState !== NO_DATA || !src.includes('Received message larger than max') || !src.includes('readPartialMessage')) return false;
    D.prototype.write = write as unknown as (d: Buffer) => Buffer[];
    installed = true;
  } catch {
    installed = false;
  }
  return installed;
}
