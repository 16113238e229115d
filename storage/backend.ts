/**
 * The backend contract: the only thing a storage medium (LevelDB, S3 packs)
 * has to implement. The chain logic (storage/engine.ts) sits above it and
 * never touches a medium directly, so a new backend is one new class.
 *
 * Two stores and a small side table:
 *
 * 1. PageStore: content-addressed pages. A page is 4096 bytes named by its
 *    SHA-256 (storage/pages.ts). putPages() returns, for every page, an opaque
 *    8-byte PageRef (its location: pack id and slot of a local pack file for LevelDB; e.g. a local
 *    pack number and slot for S3 packs). Refs are recorded in manifests next
 *    to the hash so a restore reads pages without an index lookup; a ref is a
 *    hint, not a promise: the engine verifies every page it reads against the
 *    hash, and when a ref no longer resolves (or resolves to other bytes) it
 *    asks lookup() for the page's current ref. A backend may therefore move
 *    pages (repack) as long as lookup() finds them.
 *
 * 2. ManifestStore: immutable checkpoint manifests (a small header plus the
 *    full page map of every region). putManifest() is create-only and is the
 *    commit point: when it resolves, the manifest AND every page written
 *    before it by putPages() are durable; before it resolves, nothing of the
 *    checkpoint is visible to getHeader/listHeaders. A torn putManifest must
 *    leave no manifest (LevelDB: one synced write batch; S3: one PUT of one
 *    object, with If-None-Match: * where the server enforces it, and a name
 *    that two writers cannot both choose).
 *
 * 3. GC marks: hash -> time it was found unreferenced (phase 1 of GC). The
 *    engine decides; the backend only keeps them durable.
 *
 * Thread model: all methods are async and may be called concurrently from
 * the one engine that owns the backend; a backend serializes internally
 * where its medium needs it. A backend never interprets page maps.
 * Errors: throw ExaError (src/errors.ts); medium errors folded with toExaError.
 */
import type { ExaError } from '../src/errors.js';

/** 8-byte opaque page location chosen by the backend. */
export type PageRef = Buffer;

export interface NewPage {
  hash: Buffer;   // 32 bytes, already verified by the engine
  data: Buffer;   // 4096 bytes
  /**
   * Locality hint: this page is the image successor of the previous page of
   * the same putPages() call (same region, next index), so a restore will
   * read the two together. A backend may store such runs side by side
   * (LevelDB packs keep every batch in order anyway); ignoring it is correct.
   */
  follows?: boolean;
}

export interface StoredPage {
  hash: Buffer;
  ref: PageRef;
}

export interface PageStore {
  /** For each hash, its current ref, or null when the store lacks the page. */
  lookup(hashes: readonly Buffer[]): Promise<(PageRef | null)[]>;
  /**
   * Store pages the engine found missing. Idempotent per hash: a page already
   * present keeps its ref and is not written again. Returns one ref per input,
   * in order, and the number of pages actually written. Need not be durable
   * until the next putManifest() resolves. The page buffers are the
   * caller's again once the promise settles (the upload path recycles them):
   * a backend that needs the bytes later copies them.
   */
  putPages(pages: readonly NewPage[]): Promise<{ refs: PageRef[]; written: number }>;
  /**
   * Optional batch forms of lookup() and putPages() without a JS object per
   * page (the upload path uses them when a backend has them). lookupMany:
   * hashes n x 32 bytes; refs (n x 8) receives the ref of each page found,
   * found[i] = 1 where present; resolves with the number found. putPageRun:
   * n verified pages side by side in data (n x 4096), page i hashing to
   * hashes[32i..); resolves with their refs (n x 8 bytes) and the number
   * written, with putPages' semantics (data is the caller's again once it settles).
   */
  lookupMany?(hashes: Buffer, refs: Buffer, found: Uint8Array): Promise<number>;
  putPageRun?(hashes: Buffer, data: Buffer): Promise<{ refs: Buffer; written: number }>;
  /**
   * The bytes at each ref (null where nothing is stored there). Unverified:
   * the engine checks every page against its hash. Backends should coalesce
   * neighbouring refs into one read where their medium rewards it (S3 range GETs).
   */
  readPages(refs: readonly PageRef[]): Promise<(Buffer | null)[]>;
  /**
   * Optional fast path for restores: read page i of refs into dst at i x 4096
   * and check it against hashes[32i..32i+32) in the same pass; resolves with
   * one flag a page (1 = present and matching, 2 = present but not
   * matching, 0 = missing). The engine falls back to
   * readPages + hashing when a backend lacks it.
   */
  readPagesVerified?(refs: readonly PageRef[], hashes: Buffer, dst: Buffer): Promise<Uint8Array>;
  /**
   * Optional hint at the start of a restore: the refs (n x 8 bytes, in read
   * order) that will be read soon. A backend may start reading them into a
   * cache (LevelDB packs: posix_fadvise WILLNEED on dense runs). Never required.
   */
  prefetch?(refs: Buffer): Promise<void>;
  /** Delete pages (GC phase 2 only). A page whose ref moved is deleted where it is. */
  deletePages(pages: readonly StoredPage[]): Promise<number>;
  /** Every stored page, in batches, in any order. */
  scanPages(batchSize: number): AsyncIterable<StoredPage[]>;
  /** Pages and page bytes held now. */
  pageStats(): { pages: number; bytes: number };
}

/** The durable header of one checkpoint (maps are stored beside it). */
export interface ManifestHeader {
  job: string;
  checkpoint: number;
  parent: number;                 // 0 = none
  createdAt: number;              // ms since epoch, commit time
  regions: RegionSpec[];
  labels: Record<string, string>;
  changedPages: number;           // pages the writer sent (zero pages included)
  sentPages: number;              // of which non-zero
  newPages: number;               // pages first stored by this checkpoint
  zeroPages: number;              // zero pages in the full image
}

export interface RegionSpec {
  name: string;
  pageCount: number;
  address: string;
  flags: number;
}

/** Page maps: one buffer per region, pageCount entries of ENTRY_BYTES (hash then ref). */
export type PageMaps = Buffer[];

export interface ManifestStore {
  /** The commit point (see above). CONFLICT if (job, checkpoint) exists or ever existed. */
  putManifest(header: ManifestHeader, maps: PageMaps): Promise<void>;
  getHeader(job: string, checkpoint: number): Promise<ManifestHeader | null>;
  /** The page maps of a committed checkpoint, or null if it does not exist. */
  getMaps(job: string, checkpoint: number): Promise<PageMaps | null>;
  /** Headers of one job (or all jobs), ordered by job then checkpoint. */
  listHeaders(job?: string): Promise<ManifestHeader[]>;
  /** Highest checkpoint number ever committed for the job (deleted ones count), 0 if none. */
  lastNumber(job: string): Promise<number>;
  /** Remove manifests (never pages). Missing ones are ignored. */
  deleteManifests(job: string, checkpoints: readonly number[]): Promise<void>;
  /** Bytes used by manifests. */
  manifestBytes(): Promise<number>;
}

export interface GcMarkStore {
  /** Marked-at times (ms) for the given hashes; absent = not marked. */
  getMarks(hashes: readonly Buffer[]): Promise<(number | null)[]>;
  putMarks(marks: readonly { hash: Buffer; at: number }[]): Promise<void>;
  deleteMarks(hashes: readonly Buffer[]): Promise<void>;
  countMarks(): Promise<number>;
}

export interface Backend extends PageStore, ManifestStore, GcMarkStore {
  readonly kind: string;
  /**
   * Remove page bytes that a crash left without an index entry (a backend
   * whose page write is two steps). Called by GC phase 2; returns pages removed.
   */
  sweepOrphans?(): Promise<number>;
  /**
   * Optional, for `compact`: append copies of verified pages in the given
   * order and return their refs (named by nothing until commitRelocation;
   * a crash before it leaves orphans), then in one durable step repoint the
   * index entries of those hashes that still have one and store the given
   * maps of checkpoints that still exist.
   */
  relocatePages?(pages: readonly { hash: Buffer; data: Buffer }[]): Promise<PageRef[]>;
  commitRelocation?(moves: readonly StoredPage[], maps: readonly { job: string; checkpoint: number; maps: PageMaps }[]): Promise<void>;
  /** Physical housekeeping after GC (LevelDB compactRange); optional work. */
  compactStorage(): Promise<void>;
  close(): Promise<void>;
}

export type { ExaError };
