/**
 * Object names and binary formats of the S3 pack-file backend. Everything
 * read from the bucket is untrusted input (DESIGN §7): each decoder checks
 * magic, lengths and a SHA-256 trailer and throws CORRUPT naming the object.
 *
 * Layout under s3://bucket/prefix/:
 *
 *   packs/<id[0:2]>/<id>-<writer>.pack      pages, then their hashes (see encodePack)
 *   index/<ms>-<writer>-<rand>.idx          which pages each pack holds (encodeIndex)
 *   manifests/<job>/<NNNNNNNNNN>.mf         one committed checkpoint: header + full page maps
 *   deleted/<job>/<NNNNNNNNNN>              a deleted checkpoint (its number is never reused)
 *   tombs/<id>-<writer>@<by>-<rand>         a pack condemned by GC (time = the object's LastModified)
 *
 * <id> is 12 hex digits (47 random bits) that also form the pack part of
 * every PageRef; <writer> is the writer id of the server that made the pack,
 * so two writers never choose the same name even when their ids collide.
 */
import { randomBytes } from 'node:crypto';
import { ExaError } from '../../src/errors.js';
import type { ManifestHeader, PageMaps } from '../backend.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, sha256 } from '../pages.js';

const PACK_MAGIC = Buffer.from('EXAPACK1');
const INDEX_MAGIC = Buffer.from('EXAIDX01');
const MANIFEST_MAGIC = Buffer.from('EXAMF001');
/** Pages per pack at most: the slot is 16 bits of the PageRef. */
export const MAX_PACK_PAGES = 65_536;

export const WRITER_RE = /^[A-Za-z0-9_.]{1,64}$/;

export function randomHex(bytes: number): string {
  return randomBytes(bytes).toString('hex');
}

/** A fresh pack id: 47 random bits (the top bit of the 48-bit field is reserved for local aliases). */
export function newPackId(): number {
  const b = randomBytes(6);
  b[0]! &= 0x7f;
  return b.readUIntBE(0, 6);
}

export function packIdHex(id: number): string {
  return id.toString(16).padStart(12, '0');
}

export function packBase(id: number, writer: string): string {
  return `${packIdHex(id)}-${writer}`;
}

export function packKey(base: string): string {
  return `packs/${base.slice(0, 2)}/${base}.pack`;
}

/** Parse "packs/ab/abcdef012345-writer.pack" -> base, id. null when the name is not a pack's. */
export function parsePackKey(key: string): { base: string; id: number } | null {
  const m = /^packs\/[0-9a-f]{2}\/(([0-9a-f]{12})-[A-Za-z0-9_.]{1,64})\.pack$/.exec(key);
  return m ? { base: m[1]!, id: parseInt(m[2]!, 16) } : null;
}

export function tombKey(base: string, writer: string): string {
  return `tombs/${base}@${writer}-${randomHex(4)}`;
}

export function parseTombKey(key: string): string | null {
  const m = /^tombs\/([0-9a-f]{12}-[A-Za-z0-9_.]{1,64})@/.exec(key);
  return m ? m[1]! : null;
}

export function indexKey(writer: string): string {
  return `index/${String(Date.now()).padStart(13, '0')}-${writer}-${randomHex(6)}.idx`;
}

export function manifestKey(job: string, n: number): string {
  return `manifests/${job}/${String(n).padStart(10, '0')}.mf`;
}

export function deletedKey(job: string, n: number): string {
  return `deleted/${job}/${String(n).padStart(10, '0')}`;
}

/** Parse manifests/<job>/<N>.mf or deleted/<job>/<N>. */
export function parseCkptKey(key: string): { kind: 'manifest' | 'deleted'; job: string; checkpoint: number } | null {
  const m = /^(manifests|deleted)\/(.+)\/(\d{10})(\.mf)?$/.exec(key);
  if (!m) return null;
  if ((m[1] === 'manifests') !== (m[4] === '.mf')) return null;
  return { kind: m[1] === 'manifests' ? 'manifest' : 'deleted', job: m[2]!, checkpoint: Number(m[3]) };
}

/**
 * Pack object: n pages of 4096 bytes at offset slot*4096, then the n page
 * hashes (32 bytes each), u32 n, and the magic "EXAPACK1". Pages are read
 * with range GETs; the trailer makes a pack self-describing (an index can be
 * rebuilt from the packs alone).
 */
export function encodePack(pages: readonly Buffer[], hashes: readonly Buffer[]): Buffer {
  const n = pages.length;
  const out = Buffer.allocUnsafe(n * PAGE_SIZE + n * HASH_BYTES + 4 + PACK_MAGIC.length);
  for (let i = 0; i < n; i++) pages[i]!.copy(out, i * PAGE_SIZE);
  const h0 = n * PAGE_SIZE;
  for (let i = 0; i < n; i++) hashes[i]!.copy(out, h0 + i * HASH_BYTES);
  out.writeUInt32BE(n, h0 + n * HASH_BYTES);
  PACK_MAGIC.copy(out, h0 + n * HASH_BYTES + 4);
  return out;
}

export function packObjectBytes(pages: number): number {
  return pages * (PAGE_SIZE + HASH_BYTES) + 4 + PACK_MAGIC.length;
}

/** One pack as an index object lists it. */
export interface IndexedPack { base: string; id: number; hashes: Buffer /* n x 32 */ }

/**
 * Index object: magic "EXAIDX01", u32 pack count, then per pack u16 base
 * length, the base name (utf8), u32 n, n hashes; then SHA-256 of all that.
 */
export function encodeIndex(packs: readonly IndexedPack[]): Buffer {
  const parts: Buffer[] = [INDEX_MAGIC];
  const cnt = Buffer.allocUnsafe(4);
  cnt.writeUInt32BE(packs.length);
  parts.push(cnt);
  for (const p of packs) {
    const name = Buffer.from(p.base, 'utf8');
    const h = Buffer.allocUnsafe(2 + name.length + 4);
    h.writeUInt16BE(name.length, 0);
    name.copy(h, 2);
    h.writeUInt32BE(p.hashes.length / HASH_BYTES, 2 + name.length);
    parts.push(h, p.hashes);
  }
  const body = Buffer.concat(parts);
  return Buffer.concat([body, sha256(body)]);
}

export function decodeIndex(buf: Buffer, name: string): IndexedPack[] {
  const bad = (why: string): ExaError => new ExaError('CORRUPT', `index object ${name} is damaged: ${why}`, { object: name });
  if (buf.length < INDEX_MAGIC.length + 4 + HASH_BYTES || !buf.subarray(0, 8).equals(INDEX_MAGIC)) throw bad('bad magic or too short');
  const body = buf.subarray(0, buf.length - HASH_BYTES);
  if (!sha256(body).equals(buf.subarray(buf.length - HASH_BYTES))) throw bad('checksum mismatch');
  const count = body.readUInt32BE(8);
  const out: IndexedPack[] = [];
  let off = 12;
  for (let i = 0; i < count; i++) {
    if (off + 2 > body.length) throw bad('truncated');
    const nl = body.readUInt16BE(off);
    if (off + 2 + nl + 4 > body.length) throw bad('truncated');
    const base = body.toString('utf8', off + 2, off + 2 + nl);
    const n = body.readUInt32BE(off + 2 + nl);
    off += 2 + nl + 4;
    const parsed = parsePackKey(packKey(base));
    if (!parsed) throw bad(`invalid pack name ${JSON.stringify(base)}`);
    if (n > MAX_PACK_PAGES || off + n * HASH_BYTES > body.length) throw bad(`pack ${base}: invalid page count ${n}`);
    out.push({ base, id: parsed.id, hashes: Buffer.from(body.subarray(off, off + n * HASH_BYTES)) });
    off += n * HASH_BYTES;
  }
  if (off !== body.length) throw bad('trailing bytes');
  return out;
}

/**
 * Manifest object: magic "EXAMF001", u32 header length, header JSON, the
 * page maps of all regions concatenated (40 bytes a page), SHA-256 of all that.
 */
export function encodeManifest(header: ManifestHeader, maps: PageMaps): Buffer {
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const len = Buffer.allocUnsafe(4);
  len.writeUInt32BE(json.length);
  const body = Buffer.concat([MANIFEST_MAGIC, len, json, ...maps]);
  return Buffer.concat([body, sha256(body)]);
}

export function decodeManifest(buf: Buffer, job: string, checkpoint: number): { header: ManifestHeader; maps: PageMaps } {
  const bad = (why: string): ExaError => new ExaError('CORRUPT', `manifest of checkpoint ${checkpoint} of job ${job} is damaged: ${why}`, { job, checkpoint });
  if (buf.length < 12 + HASH_BYTES || !buf.subarray(0, 8).equals(MANIFEST_MAGIC)) throw bad('bad magic or too short');
  const body = buf.subarray(0, buf.length - HASH_BYTES);
  if (!sha256(body).equals(buf.subarray(buf.length - HASH_BYTES))) throw bad('checksum mismatch');
  const hl = body.readUInt32BE(8);
  if (12 + hl > body.length) throw bad('header length out of range');
  let header: ManifestHeader;
  try {
    header = JSON.parse(body.toString('utf8', 12, 12 + hl)) as ManifestHeader;
  } catch (e) {
    throw bad(`unreadable header (${(e as Error).message})`);
  }
  if (header.job !== job || header.checkpoint !== checkpoint || !Array.isArray(header.regions)) throw bad('header does not match its name');
  const total = header.regions.reduce((a, r) => a + (Number.isInteger(r.pageCount) && r.pageCount >= 0 ? r.pageCount : NaN), 0) * ENTRY_BYTES;
  if (body.length - 12 - hl !== total) throw bad(`page maps are ${body.length - 12 - hl} bytes, expected ${total}`);
  const maps: PageMaps = [];
  let off = 12 + hl;
  for (const r of header.regions) {
    maps.push(Buffer.from(body.subarray(off, off + r.pageCount * ENTRY_BYTES)));
    off += r.pageCount * ENTRY_BYTES;
  }
  return { header, maps };
}
