import { createRequire } from 'node:module';

/**
 * Hand-written wire codec for exa.v1.ImageChunk (GetImage's response), the
 * one message that carries bulk page data. It writes and reads exactly the
 * protobuf wire format of proto/exa_store.proto, so any gRPC client or
 * server still interoperates; only the copies go:
 *
 *  - protobufjs's encoder copied every page into a fresh buffer (and grpc-js
 *    then copied that again into its framed message). serializeImageChunk
 *    writes the few header bytes into free room the engine leaves in front of
 *    the page data (ImagePiece.headroom, storage/engine.ts) and returns a view
 *    of header + data: no copy of the pages here, no allocation; grpc-js's
 *    framing copy is the only one left on the server (src/grpc.ts cannot
 *    avoid it). Without headroom it builds the message with one copy.
 *  - deserializeImageChunk returns `data` and `zero` as views of the
 *    received buffer (protobufjs did too) and skips protobufjs's per-field
 *    reflection; `info` messages (one a call) go through protobufjs.
 *
 * Wire layout written (fields in this order; a decoder accepts any order):
 *   ImageChunk.pages (2, LEN) {
 *     region (1, LEN) | first_page (2, varint) | page_count (3, varint)
 *     | zero (4, LEN) | pages (6, LEN, packed varints) | data (5, LEN)
 *   }
 * Fields equal to their default (0, "", empty) are omitted, as protobufjs does.
 *
 * installImageCodec() plugs both into the loaded Store service definition
 * (src/store/proto.ts) before the client constructor or any server uses it.
 */

/** Bytes the serializer may need in front of the data of a piece of `pages` pages (sparse included). */
export function headroomFor(pages: number, regionBytes = 1024): number {
  // gRPC frame header + tags and lengths (<= 7 x (1 + 5)) + region + zero flags + packed page indexes (<= 5 bytes each)
  return GRPC_FRAME_BYTES + 64 + regionBytes + pages + 5 * pages;
}

/** gRPC's message frame header: compressed flag, u32 BE length. */
const GRPC_FRAME_BYTES = 5;

/** Serialized messages whose 5 bytes in front (same ArrayBuffer) are free for the gRPC frame header. */
const FRAMABLE = new WeakSet<Buffer>();

let framePatch: boolean | null = null;

/**
 * grpc-js frames every server message by allocating a new buffer and copying
 * the serialized bytes into it (BaseServerInterceptingCall.serializeMessage):
 * for GetImage a fresh 4 MiB buffer a message, 1 GiB of page faults, copies
 * and garbage a GiB restored. This wraps that method so that a message the
 * serializer above marked FRAMABLE gets its frame header written into the 5
 * bytes in front of it and goes out as is; any other message is framed
 * exactly as grpc-js does. The buffer then belongs to the HTTP/2 stream until
 * the write's callback (the engine recycles it only after that: GetImage in
 * src/store/server.ts). Applied only when the method looks as expected
 * (grpc-js 1.10-1.14); otherwise nothing changes but the copy stays.
 * Returns whether the wrapper is in place.
 */
export function installServerFramePatch(): boolean {
  if (framePatch !== null) return framePatch;
  framePatch = false;
  try {
    const req = createRequire(import.meta.url);
    const mod = req('@grpc/grpc-js/build/src/server-interceptors.js') as { BaseServerInterceptingCall?: { prototype: Record<string, unknown> } };
    const proto = mod.BaseServerInterceptingCall?.prototype;
    const orig = proto?.serializeMessage;
    if (!proto || typeof orig !== 'function') return false;
    const src = String(orig);
    if (!src.includes('this.handler.serialize(') || !src.includes('allocUnsafe') || !src.includes('writeUInt32BE')) return false;
    proto.serializeMessage = function serializeMessage(this: { handler: { serialize(v: unknown): Buffer } }, value: unknown): Buffer {
      const msg = this.handler.serialize(value);
      const len = msg.byteLength;
      if (FRAMABLE.has(msg)) {
        FRAMABLE.delete(msg);
        const out = Buffer.from(msg.buffer, msg.byteOffset - GRPC_FRAME_BYTES, len + GRPC_FRAME_BYTES);
        out[0] = 0;
        out.writeUInt32BE(len, 1);
        return out;
      }
      const out = Buffer.allocUnsafe(len + GRPC_FRAME_BYTES);
      out[0] = 0;
      out.writeUInt32BE(len, 1);
      msg.copy(out, GRPC_FRAME_BYTES);
      return out;
    };
    framePatch = true;
  } catch {
    framePatch = false;
  }
  return framePatch;
}

/**
 * A pages message may carry this property (not a proto field: protobufjs
 * ignores it): the number of bytes in front of `data`, in the same
 * ArrayBuffer, that the serializer may overwrite.
 */
export const HEADROOM = Symbol('exa.imageChunk.headroom');

export interface ImagePagesIn {
  region?: string;
  first_page?: number;
  page_count?: number;
  zero?: Uint8Array;
  data?: Uint8Array;
  pages?: readonly number[];
  [HEADROOM]?: number;
}

export interface ImagePagesOut {
  region: string;
  first_page: number;
  page_count: number;
  zero: Buffer;
  data: Buffer;
  pages: number[];
}

function varintLen(v: number): number {
  let n = 1;
  while (v >= 0x80) { v = Math.floor(v / 128); n++; }
  return n;
}

function writeVarint(buf: Uint8Array, at: number, v: number): number {
  while (v >= 0x80) {
    buf[at++] = (v & 0x7f) | 0x80;
    v = Math.floor(v / 128);
  }
  buf[at++] = v;
  return at;
}

function checkUint32(name: string, v: unknown): number {
  const n = v === undefined ? 0 : v;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new Error(`ImagePages.${name} must be a uint32, got ${String(v)}`);
  return n;
}

/** Serialize ImageChunk{pages: p}; throws on a field that is not a uint32 where one is due. */
export function serializeImagePages(p: ImagePagesIn): Buffer {
  const region = Buffer.from(p.region ?? '', 'utf8');
  const first = checkUint32('first_page', p.first_page);
  const count = checkUint32('page_count', p.page_count);
  const zero = p.zero ?? EMPTY;
  const data = p.data ?? EMPTY;
  const pages = p.pages ?? [];
  let packed = 0;
  for (const x of pages) packed += varintLen(checkUint32('pages[]', x));
  // ImagePages body length, data excluded
  let head = 0;
  if (region.length) head += 1 + varintLen(region.length) + region.length;
  if (first) head += 1 + varintLen(first);
  if (count) head += 1 + varintLen(count);
  if (zero.length) head += 1 + varintLen(zero.length) + zero.length;
  if (packed) head += 1 + varintLen(packed) + packed;
  const dataField = data.length ? 1 + varintLen(data.length) : 0;
  const bodyLen = head + dataField + data.length;
  const total = 1 + varintLen(bodyLen) + head + dataField; // everything in front of the data bytes
  const room = p[HEADROOM] ?? 0;
  let out: Buffer;
  let at: number;
  if (data.length && room >= total + GRPC_FRAME_BYTES) {
    // Zero copy: the header goes into the free room in front of the data,
    // and the 5 bytes before it are left for grpc-js's frame header.
    out = Buffer.from(data.buffer, data.byteOffset - total, total + data.length);
    FRAMABLE.add(out);
    at = 0;
  } else {
    out = Buffer.allocUnsafe(total + data.length);
    at = 0;
    if (data.length) out.set(data, total);
  }
  out[at++] = 0x12; // ImageChunk.pages, LEN
  at = writeVarint(out, at, bodyLen);
  if (region.length) { out[at++] = 0x0a; at = writeVarint(out, at, region.length); region.copy(out, at); at += region.length; }
  if (first) { out[at++] = 0x10; at = writeVarint(out, at, first); }
  if (count) { out[at++] = 0x18; at = writeVarint(out, at, count); }
  if (zero.length) { out[at++] = 0x22; at = writeVarint(out, at, zero.length); out.set(zero, at); at += zero.length; }
  if (packed) { out[at++] = 0x32; at = writeVarint(out, at, packed); for (const x of pages) at = writeVarint(out, at, x); }
  if (data.length) { out[at++] = 0x2a; at = writeVarint(out, at, data.length); }
  if (at !== total) throw new Error(`ImageChunk serializer: wrote ${at} header bytes, expected ${total}`);
  return out;
}

const EMPTY = Buffer.alloc(0);

/** A malformed ImageChunk: the message says where and what. */
export class ImageChunkFormatError extends Error {
  constructor(msg: string) {
    super(`malformed ImageChunk: ${msg}`);
    this.name = 'ImageChunkFormatError';
  }
}

class Reader {
  at: number;
  constructor(readonly buf: Buffer, from: number, readonly end: number) { this.at = from; }
  varint(what: string): number {
    let v = 0, mul = 1;
    for (let i = 0; i < 10; i++) {
      if (this.at >= this.end) throw new ImageChunkFormatError(`${what}: truncated varint at byte ${this.at}`);
      const b = this.buf[this.at++]!;
      if (i < 8) v += (b & 0x7f) * mul; // beyond 2^53 the value is useless here anyway; checked by callers
      mul *= 128;
      if (b < 0x80) return v;
    }
    throw new ImageChunkFormatError(`${what}: varint longer than 10 bytes at byte ${this.at}`);
  }
  uint32(what: string): number {
    const v = this.varint(what);
    // proto3 uint32 decoders keep the low 32 bits of a longer varint; protobufjs does too.
    return v > 0xffffffff ? v % 0x100000000 : v;
  }
  bytes(what: string): Buffer {
    const n = this.varint(`${what} length`);
    if (n > this.end - this.at) throw new ImageChunkFormatError(`${what}: length ${n} runs past the end of the message (${this.end - this.at} bytes left)`);
    const b = this.buf.subarray(this.at, this.at + n);
    this.at += n;
    return b;
  }
  skip(wireType: number, field: number): void {
    switch (wireType) {
      case 0: this.varint(`field ${field}`); return;
      case 1: this.advance(8, field); return;
      case 2: this.bytes(`field ${field}`); return;
      case 5: this.advance(4, field); return;
      default: throw new ImageChunkFormatError(`field ${field}: unsupported wire type ${wireType} at byte ${this.at}`);
    }
  }
  private advance(n: number, field: number): void {
    if (n > this.end - this.at) throw new ImageChunkFormatError(`field ${field}: truncated at byte ${this.at}`);
    this.at += n;
  }
}

/**
 * Decode ImageChunk. Returns the pages message, or null when the chunk is
 * not a pages message (its first oneof member found is info, or it is
 * empty): the caller then decodes it with protobufjs. Throws
 * ImageChunkFormatError for bytes that are not a valid message.
 */
export function deserializeImagePages(buf: Buffer): ImagePagesOut | null {
  const r = new Reader(buf, 0, buf.length);
  let body: Buffer | null = null;
  while (r.at < r.end) {
    const key = r.varint('ImageChunk field key');
    const field = Math.floor(key / 8), wt = key & 7;
    if (field === 0) throw new ImageChunkFormatError(`field number 0 at byte ${r.at}`);
    if (field === 2) {
      if (wt !== 2) throw new ImageChunkFormatError(`ImageChunk.pages has wire type ${wt}, expected 2`);
      // Two occurrences of a message field merge (protobuf semantics): left to protobufjs, no server sends that.
      if (body) return null;
      body = r.bytes('ImageChunk.pages');
    } else if (field === 1) {
      return null; // info: protobufjs
    } else {
      r.skip(wt, field);
    }
  }
  if (!body) return null;
  const out: ImagePagesOut = { region: '', first_page: 0, page_count: 0, zero: EMPTY, data: EMPTY, pages: [] };
  const b = new Reader(buf, body.byteOffset - buf.byteOffset, body.byteOffset - buf.byteOffset + body.length);
  while (b.at < b.end) {
    const key = b.varint('ImagePages field key');
    const field = Math.floor(key / 8), wt = key & 7;
    if (field === 0) throw new ImageChunkFormatError(`ImagePages: field number 0 at byte ${b.at}`);
    const want = (w: number, name: string): void => {
      if (wt !== w) throw new ImageChunkFormatError(`ImagePages.${name} has wire type ${wt}, expected ${w}`);
    };
    switch (field) {
      case 1: {
        want(2, 'region');
        const s = b.bytes('ImagePages.region');
        out.region = s.toString('utf8');
        break;
      }
      case 2: want(0, 'first_page'); out.first_page = b.uint32('ImagePages.first_page'); break;
      case 3: want(0, 'page_count'); out.page_count = b.uint32('ImagePages.page_count'); break;
      case 4: want(2, 'zero'); out.zero = b.bytes('ImagePages.zero'); break;
      case 5: want(2, 'data'); out.data = b.bytes('ImagePages.data'); break;
      case 6: {
        if (wt === 0) { out.pages.push(b.uint32('ImagePages.pages')); break; }
        want(2, 'pages');
        const p = b.bytes('ImagePages.pages');
        const q = new Reader(buf, p.byteOffset - buf.byteOffset, p.byteOffset - buf.byteOffset + p.length);
        while (q.at < q.end) out.pages.push(q.uint32('ImagePages.pages'));
        break;
      }
      default: b.skip(wt, field);
    }
  }
  return out;
}

interface MethodDef {
  responseSerialize: (v: unknown) => Buffer;
  responseDeserialize: (b: Buffer) => unknown;
}

/**
 * Replace GetImage's response codec on a loaded Store service definition
 * (idempotent). Pages messages use the functions above; anything else (the
 * info message) goes to the protobufjs codec it replaces.
 */
export function installImageCodec(service: Record<string, unknown>): void {
  const m = service.GetImage as (MethodDef & { exaImageCodec?: boolean }) | undefined;
  if (!m || m.exaImageCodec) return;
  const pbSerialize = m.responseSerialize.bind(m);
  const pbDeserialize = m.responseDeserialize.bind(m);
  m.responseSerialize = (v: unknown): Buffer => {
    const pages = (v as { pages?: ImagePagesIn | null } | null)?.pages;
    const msg = (v as { msg?: string } | null)?.msg;
    if (pages && (msg === undefined || msg === 'pages') && !(v as { info?: unknown }).info) return serializeImagePages(pages);
    return pbSerialize(v);
  };
  m.responseDeserialize = (b: Buffer): unknown => {
    const pages = deserializeImagePages(b);
    return pages ? { pages, msg: 'pages' } : pbDeserialize(b);
  };
  m.exaImageCodec = true;
}
