/**
 * The only module that loads the native addon (build/Release/exa_native.node).
 * It declares the whole native surface with opaque handle types and wraps each
 * call so that native failures arrive as ExaError (src/errors.ts):
 *
 *   errno from native     -> ExaCode
 *   ENOENT, ESRCH         -> NOT_FOUND        (unknown job/region, process gone)
 *   EEXIST, EADDRINUSE    -> ALREADY_EXISTS   (duplicate job/region, agent already listening)
 *   EINVAL, EPROTO        -> INVALID_ARGUMENT (bad size/name, malformed peer message)
 *   EACCES, EPERM         -> PERMISSION_DENIED (SO_PEERCRED refused)
 *   ECONNREFUSED, ESHUTDOWN, ECONNRESET -> UNAVAILABLE (no agent, agent closed)
 *   EBUSY                 -> CONFLICT         (a checkpoint of the job is running)
 *   ECANCELED             -> CANCELLED
 *   ENOTSUP               -> UNIMPLEMENTED    (kernel < 5.19)
 *   ENOMEM                -> RESOURCE_EXHAUSTED
 *   anything else         -> INTERNAL
 * `null` crosses the boundary, never `undefined`.
 *
 * Threading: every function here runs on the JS thread and returns quickly;
 * the pause, the saver and the fault handler run on native threads and
 * settle promises through thread-safe functions.
 */
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ExaError, toExaError, type ExaCode } from './errors.js';

/** Repository root (this file lives in src/ or dist/src/). */
export const repoRoot: string = (() => {
  const here = dirname(fileURLToPath(import.meta.url));
  return here.includes(`${join('dist', 'src')}`) ? join(here, '..', '..') : join(here, '..');
})();

/** Directory of the native build (the addon and the helper executables such as exa_workload). */
/** Where the addon and the native executables are: $EXA_NATIVE_DIR, else build/Release of this checkout. */
export const nativeBuildDir: string = process.env.EXA_NATIVE_DIR || join(repoRoot, 'build', 'Release');

// ---- opaque handles -------------------------------------------------------

/** An agent-side checkpointer listening on a Unix socket (owns its IO, saver and fault threads). */
export interface AgentHandle { readonly kind: 'agent' }
/** One running checkpoint of one job. */
export interface CheckpointSessionHandle { readonly kind: 'checkpoint-session' }
/** This process attached to an agent as a workload (libexa context). */
export interface WorkloadHandle { readonly kind: 'workload' }
/** The agent-side DMA backend (RDMA API remoting): listening socket, one thread per client application. */
export interface DmaBackendHandle { readonly kind: 'dma-backend' }
/** This workload's DMA session with its agent's backend (libexa exa_dma). */
export interface DmaSessionHandle { readonly kind: 'dma-session' }
/** One request/completion queue of a DMA session. */
export interface DmaQueueHandle { readonly kind: 'dma-queue' }
/** A page hash -> 8-byte value table (native/addon/pageindex.cc); memory freed by pageTableClose. */
export interface PageTableHandle { readonly kind: 'page-table' }

// ---- data crossing the boundary ------------------------------------------

export interface NativeAgentOptions {
  /** Unix socket path the agent listens on (SOCK_SEQPACKET). */
  socketPath: string;
  /** uids allowed to attach besides the agent's own and root (SO_PEERCRED). */
  allowUids?: number[];
  /** Shadow memory per checkpoint, bytes (default 256 MiB). */
  shadowBudgetBytes?: number;
  /** chmod of the socket file (default 0o600). */
  socketMode?: number;
  /** Tenants' uids: they may attach too, each only as its tenant's jobs (src/tenants.ts agentTenants). */
  tenants?: NativeTenantUids[];
}

export interface NativeTenantUids { tenant: string; uids: number[]; jobs: string[]; prefixes: string[] }

export interface NativeAgentEvent {
  kind: 'attached' | 'detached' | 'checkpoint-request' | 'log';
  job: string;
  pid: number;
  uid: number;
  text: string;
}

export interface NativeRegionInfo { name: string; size: number; address: string }

export interface NativeJobInfo {
  id: string;
  pid: number;
  uid: number;
  /** The workload passed a WP_ASYNC uffd and its pagemap: cheap tracking between checkpoints. */
  asyncTracking: boolean;
  /** Fallback uffd (UFFD_USER_MODE_ONLY): read() into a region fails during a checkpoint. */
  userModeOnly: boolean;
  busy: boolean;
  checkpoints: number;
  regions: NativeRegionInfo[];
}

export interface NativeCkptOptions {
  /**
   * auto (default): per region, copy the dirty pages to shadow during the pause when they fit the
   * shadow budget (then no write faults at all), else save live with synchronous write-protect faults.
   * sync: always the live fault-driven path (the seed's four cases). copy: prefer copy-at-pause.
   */
  mode?: 'auto' | 'sync' | 'copy';
  /** Save every page, not only those written since the previous checkpoint (a new chain). */
  full?: boolean;
  /** Final checkpoint of a migration: leave the job stopped after the pause (the caller ends it or sends SIGCONT). */
  leaveStopped?: boolean;
  /**
   * Default true: a region saved on the live sync path that is already on the sync uffd is
   * write-protected before the stop while the job runs; the pause re-protects only the pages
   * written in that window. false: write-protect everything inside the pause (the seed's order).
   */
  preprotect?: boolean;
  /** Page bytes per batch (default 1 MiB). */
  batchBytes?: number;
  /** Batches ready before the saver waits for JavaScript (default 2). */
  queueDepth?: number;
  /** Test hook: hold the saver before/while saving this page until checkpointReleaseHold(). */
  testHold?: { region: string; page: number; when?: 'before' | 'during' };
  /** Test hook: copy every region while the job is stopped; fetch with checkpointTestReference(). */
  testReference?: boolean;
}

/**
 * A batch of saved pages. Entry i: region index regions[i] (into the session's region table),
 * page index pages[i], zero[i] = 1 for an all-zero page (no bytes, hash all zero), hash =
 * hashes[32i..32i+32) (SHA-256 of the 4096 bytes). data holds the bytes of the non-zero pages in entry order.
 */
export interface PageBatch {
  count: number;
  regions: Uint32Array;
  pages: Uint32Array;
  zero: Uint8Array;
  hashes: Uint8Array;
  data: Uint8Array;
}

export interface CheckpointStats {
  /** Stop .. resume of the checkpoint's pause. */
  pauseUs: number;
  /** After a live-sync save, regions go back to async tracking in 64 MiB steps, one short stop each: the longest one. */
  resyncPauseUs: number;
  /** Sum and number of those stops. */
  resyncTotalUs: number;
  resyncStops: number;
  /** Resume .. last batch taken by JavaScript. */
  saveUs: number;
  /** Where the pause went: stopping every thread, PAGEMAP_SCAN, write-protect (incl. uffd switches), copy to shadow. */
  pauseStopUs: number;
  pauseScanUs: number;
  pauseProtectUs: number;
  pauseCopyUs: number;
  /** Write-protect done before the stop while the job ran (not pause). */
  preprotectUs: number;
  dirtyPages: number;
  pagesSaved: number;
  zeroPages: number;
  bytesSaved: number;
  shadowCopies: number;
  shadowPeakBytes: number;
  /** Write faults during the save by the seed's cases 1..4 (index 0..3). */
  faults: [number, number, number, number];
  /** Case-3 faults that found the shadow full and waited for the saver instead. */
  shadowWaits: number;
  batches: number;
  syncRegions: number;
  copyRegions: number;
}

/** A DMA completion as it crosses the boundary (status 0 or -errno; code = errno name or null). */
export interface NativeDmaCompletion {
  tag: number;
  len: number;
  status: number;
  op: 'write' | 'read' | 'unknown';
  code: string | null;
  reason: string;
}

export interface NativeDmaBackendStats {
  clients: number;
  /** Operations applied on this host (same-host engine). */
  ops: number;
  errors: number;
  bytes: number;
  /** Operations this backend sent to other agents and saw applied, and their bytes. */
  remoteOps: number;
  remoteBytes: number;
  /** Operations other agents sent here, applied. */
  servedOps: number;
  servedBytes: number;
  /** Operations held (fence, expect, HELD replies), each counted once; re-sends after HELD / MOVED. */
  heldOps: number;
  retries: number;
  /** Outgoing agent connections opened; incoming ones dropped (protocol violation, bad token) and the last reason. */
  links: number;
  droppedConnections: number;
  lastDropReason: string;
}

/** Options of the DMA backend's TCP data path between agents (RDMA API remoting across hosts). */
export interface NativeDmaBackendOptions {
  /** "ip:port" to listen on for other agents (default "127.0.0.1:0"; "" = no TCP). */
  listen?: string;
  /** Shared cluster token checked in the agent-to-agent handshake (a mismatch refuses the connection). */
  token?: string;
  /** An operation held (migration) longer than this fails (default 60000). */
  holdTimeoutMs?: number;
  /**
   * Called on the JS thread when an operation or lookup needs the host of a job the route table
   * lacks; answer with dmaSetRoute(h, job, addr) (or null: unknown, the waiters fail with ENOENT).
   * Waiters give up after 5 s.
   */
  onRouteMiss?: (job: string) => void;
}

/** A DMA buffer registered with a backend, with its grants. */
export interface NativeDmaBuffer { job: string; name: string; size: number; grants: { peer: string; perms: number }[] }

/** A grant of one of a job's DMA buffers (perms: 1 read, 2 write, 3 both). */
export interface NativeDmaGrant { buffer: string; peer: string; perms: number }

interface NativeAddon {
  version(): number;
  agentOpen(opts: NativeAgentOptions, onEvent: (ev: NativeAgentEvent) => void): AgentHandle;
  agentClose(h: AgentHandle): void;
  agentJobs(h: AgentHandle): NativeJobInfo[];
  checkpointBegin(h: AgentHandle, job: string, opts: NativeCkptOptions): { session: CheckpointSessionHandle; paused: Promise<void> };
  checkpointNext(s: CheckpointSessionHandle): Promise<PageBatch | null>;
  checkpointResult(s: CheckpointSessionHandle): Promise<CheckpointStats>;
  checkpointStats(s: CheckpointSessionHandle): CheckpointStats;
  checkpointRegions(s: CheckpointSessionHandle): { name: string; size: number }[];
  checkpointCancel(s: CheckpointSessionHandle): void;
  checkpointHeld(s: CheckpointSessionHandle): boolean;
  checkpointReleaseHold(s: CheckpointSessionHandle): void;
  checkpointTestReference(s: CheckpointSessionHandle): Buffer[];
  declineCheckpointRequests(h: AgentHandle, job: string, text: string): void;
  stopAndCopy(h: AgentHandle, job: string): { pauseUs: number; bytes: number };
  remoteWrite(h: AgentHandle, job: string, region: string, offset: number, bytes: Uint8Array): Promise<void>;
  /** A memfd of `bytes` sealed against shrinking (restore staging); the caller closes the fd. */
  memfdCreate(name: string, bytes: number): number;
  workloadAttach(socketPath: string | null, jobId: string | null): WorkloadHandle;
  workloadAlloc(h: WorkloadHandle, name: string, size: number): ArrayBuffer;
  workloadFree(h: WorkloadHandle, name: string): void;
  workloadList(h: WorkloadHandle): { name: string; size: number }[];
  workloadCheckpoint(h: WorkloadHandle): Promise<void>;
  workloadDetach(h: WorkloadHandle): void;
  // RDMA API remoting (native/addon/dma.cc)
  dmaBackendOpen(agent: AgentHandle, socketPath: string, socketMode?: number, opts?: NativeDmaBackendOptions): DmaBackendHandle;
  /** "ip:port" the backend listens on for other agents ("" when not listening). */
  dmaBackendAddress(h: DmaBackendHandle): string;
  // Migration primitives (the control plane: src/hostagent, src/ops/migrate.ts).
  /** Where `job`'s buffers live when not on this agent; null = unknown (waiting operations fail with ENOENT). */
  dmaSetRoute(h: DmaBackendHandle, job: string, addr: string | null): void;
  /**
   * On the agent where `job` runs, before its final checkpoint: from now on no operation is applied to
   * `job`'s buffers (local ones wait head of line, remote ones are answered HELD); resolves once the
   * operations already started have finished, with `job`'s grants. Idempotent.
   */
  dmaFence(h: DmaBackendHandle, job: string): Promise<{ grants: NativeDmaGrant[] }>;
  /** Rollback of a fence: held operations proceed. */
  dmaUnfence(h: DmaBackendHandle, job: string): void;
  /** The live DMA buffers registered with this backend and their grants (reported to the coordinator). */
  dmaBuffers(h: DmaBackendHandle): NativeDmaBuffer[];
  /** `job` now lives at `addr`: operations for it are answered MOVED(addr) / re-routed there. */
  dmaMoved(h: DmaBackendHandle, job: string, addr: string): void;
  /**
   * On the target agent before `job` is relaunched there: operations for its buffers not registered yet
   * are held (not refused) for up to timeoutMs; when the job registers a buffer named in `grants`, those
   * grants are installed at once.
   */
  dmaExpect(h: DmaBackendHandle, job: string, grants: NativeDmaGrant[], timeoutMs: number): void;
  /**
   * Benchmark baseline: raw loopback TCP with the agent data path's frames, send (writev) and receive loop,
   * from a spanBytes source to a spanBytes destination at sweeping offsets, at most `window` frames unanswered; ns.
   */
  dmaTcpBaseline(h: DmaBackendHandle, msgBytes: number, totalBytes: number, window: number, spanBytes: number): number;
  dmaBackendClose(h: DmaBackendHandle): void;
  dmaBackendStats(h: DmaBackendHandle): NativeDmaBackendStats;
  dmaEngineDirect(h: DmaBackendHandle, srcJob: string, srcBuf: string, dstJob: string, dstBuf: string, len: number, iters: number, span: number): number;
  dmaOpen(w: WorkloadHandle, socketPath: string | null): DmaSessionHandle;
  dmaClose(d: DmaSessionHandle): void;
  dmaAlloc(d: DmaSessionHandle, name: string, size: number): ArrayBuffer;
  dmaFree(d: DmaSessionHandle, name: string): void;
  dmaGrant(d: DmaSessionHandle, name: string, peerJob: string, perms: number): void;
  dmaLookup(d: DmaSessionHandle, peerJob: string, name: string): { handle: number; size: number; perms: number };
  dmaQueueCreate(d: DmaSessionHandle, onCompletion: ((c: NativeDmaCompletion) => void) | null): DmaQueueHandle;
  dmaQueueDestroy(q: DmaQueueHandle): void;
  dmaPost(q: DmaQueueHandle, op: 'write' | 'read', local: string, localOff: number, remote: number, remoteOff: number, len: number, tag: number): void;
  dmaPoll(q: DmaQueueHandle, max: number): NativeDmaCompletion[];
  dmaWait(q: DmaQueueHandle, max: number, timeoutMs: number): Promise<NativeDmaCompletion[]>;
  dmaSync(d: DmaSessionHandle, op: 'write' | 'read', local: string, localOff: number, remote: number, remoteOff: number, len: number): void;
  dmaTestPostRaw(q: DmaQueueHandle, entry: Uint8Array, advance: number): void;
  // Page hashing for the store (native/addon/hash.cc): SHA-256 on the libuv pool.
  sha256Pages(pages: Uint8Array | readonly (Uint8Array | null | undefined)[], pageSize?: number): Promise<Buffer>;
  /** First i whose page (data page index[i], or i) does not hash to want[32i..), or -1 (native/addon/hash.cc). */
  sha256VerifyPages(data: Uint8Array, want: Uint8Array, index?: Uint32Array | null, pageSize?: number): Promise<number>;
  /** Which SHA-256 implementation the two above use: "ipsec-mb VERSION ARCH" (multi-buffer) or "openssl". */
  sha256Engine(): string;
  // Batched pack-file reads for the LevelDB store (native/addon/packio.cc): pread on the libuv pool, optional SHA-256 check per page.
  packRead(ops: Float64Array, dst: Uint8Array, hashes?: Uint8Array | null): Promise<{ got: Int32Array; ok: Uint8Array | null }>;
  packWrite(fd: number, position: number, bufs: readonly Uint8Array[]): Promise<number>;
  packAdvise(ops: Float64Array): Promise<number>;
  /** A Buffer of `size` bytes starting on a 4096-byte boundary (native/addon/packio.cc). */
  alignedBuffer(size: number): Buffer;
  // Page hash -> 8-byte value tables for the store's upload path (native/addon/pageindex.cc), synchronous.
  pageTableNew(): PageTableHandle;
  pageTableGet(t: PageTableHandle, hashes: Uint8Array, values: Uint8Array | null, found: Uint8Array | null): number;
  pageTableSet(t: PageTableHandle, hashes: Uint8Array, values: Uint8Array | null): number;
  pageTableAdd(t: PageTableHandle, hashes: Uint8Array, values: Uint8Array | null, added?: Uint8Array | null): number;
  pageTableDelete(t: PageTableHandle, hashes: Uint8Array): number;
  pageTableSize(t: PageTableHandle): number;
  pageTableBytes(t: PageTableHandle): number;
  pageTableEntries(t: PageTableHandle): Buffer;
  pageTableClear(t: PageTableHandle): void;
  pageTableClose(t: PageTableHandle): void;
  /** glibc mallopt(M_MMAP_THRESHOLD, M_TRIM_THRESHOLD); false where unsupported. */
  mallocTune(mmapThreshold: number, trimThreshold: number): boolean;
}

const require = createRequire(import.meta.url);
export const addon: NativeAddon = require(join(nativeBuildDir, 'exa_native.node')) as NativeAddon;

const extraErrno: Record<string, ExaCode> = {
  EPROTO: 'INVALID_ARGUMENT',
  EADDRINUSE: 'ALREADY_EXISTS',
  ECANCELED: 'CANCELLED',
  ESHUTDOWN: 'UNAVAILABLE',
  ENOTSUP: 'UNIMPLEMENTED',
  EIO: 'INTERNAL',
  EAGAIN: 'RESOURCE_EXHAUSTED', // DMA queue full: reap completions first
  EBADF: 'INVALID_ARGUMENT',    // DMA request naming a buffer id or handle that does not exist
};

/** Fold a native failure onto an ExaError; the errno name is kept in detail.errno. */
export function nativeError(e: unknown, context?: string): ExaError {
  const code = (e as { code?: unknown })?.code;
  const msg = e instanceof Error ? e.message : String(e);
  const full = context ? `${context}: ${msg}` : msg;
  if (typeof code === 'string' && code in extraErrno) return new ExaError(extraErrno[code]!, full, { errno: code }, { cause: e });
  const x = toExaError(e, context);
  return typeof code === 'string' ? new ExaError(x.code, x.message, { errno: code }, { cause: e }) : x;
}

function wrap<A extends unknown[], R>(fn: (...a: A) => R): (...a: A) => R {
  return (...a: A): R => {
    try {
      const r = fn(...a);
      if (r instanceof Promise) return r.catch((e: unknown) => { throw nativeError(e); }) as R;
      return r;
    } catch (e) {
      throw nativeError(e);
    }
  };
}

export const version = wrap(addon.version);
export const agentOpen = wrap(addon.agentOpen);
export const agentClose = wrap(addon.agentClose);
export const agentJobs = wrap(addon.agentJobs);
export const checkpointBegin = wrap(addon.checkpointBegin);
export const checkpointNext = wrap(addon.checkpointNext);
export const checkpointResult = wrap(addon.checkpointResult);
export const checkpointStats = wrap(addon.checkpointStats);
export const checkpointRegions = wrap(addon.checkpointRegions);
export const checkpointCancel = wrap(addon.checkpointCancel);
export const checkpointHeld = wrap(addon.checkpointHeld);
export const checkpointReleaseHold = wrap(addon.checkpointReleaseHold);
export const checkpointTestReference = wrap(addon.checkpointTestReference);
export const declineCheckpointRequests = wrap(addon.declineCheckpointRequests);
export const stopAndCopy = wrap(addon.stopAndCopy);
export const remoteWrite = wrap(addon.remoteWrite);
export const memfdCreate = wrap(addon.memfdCreate);
export const workloadAttach = wrap(addon.workloadAttach);
export const workloadAlloc = wrap(addon.workloadAlloc);
export const workloadFree = wrap(addon.workloadFree);
export const workloadList = wrap(addon.workloadList);
export const workloadCheckpoint = wrap(addon.workloadCheckpoint);
export const workloadDetach = wrap(addon.workloadDetach);
export const dmaBackendOpen = wrap(addon.dmaBackendOpen);
export const dmaBackendClose = wrap(addon.dmaBackendClose);
export const dmaBackendStats = wrap(addon.dmaBackendStats);
export const dmaEngineDirect = wrap(addon.dmaEngineDirect);
export const dmaBackendAddress = wrap(addon.dmaBackendAddress);
export const dmaSetRoute = wrap(addon.dmaSetRoute);
export const dmaFence = wrap(addon.dmaFence);
export const dmaUnfence = wrap(addon.dmaUnfence);
export const dmaBuffers = wrap(addon.dmaBuffers);
export const dmaMoved = wrap(addon.dmaMoved);
export const dmaExpect = wrap(addon.dmaExpect);
export const dmaTcpBaseline = wrap(addon.dmaTcpBaseline);
export const dmaOpen = wrap(addon.dmaOpen);
export const dmaClose = wrap(addon.dmaClose);
export const dmaAlloc = wrap(addon.dmaAlloc);
export const dmaFree = wrap(addon.dmaFree);
export const dmaGrant = wrap(addon.dmaGrant);
export const dmaLookup = wrap(addon.dmaLookup);
export const dmaQueueCreate = wrap(addon.dmaQueueCreate);
export const dmaQueueDestroy = wrap(addon.dmaQueueDestroy);
export const dmaPost = wrap(addon.dmaPost);
export const dmaPoll = wrap(addon.dmaPoll);
export const dmaWait = wrap(addon.dmaWait);
export const dmaSync = wrap(addon.dmaSync);
export const dmaTestPostRaw = wrap(addon.dmaTestPostRaw);
export const sha256Pages = wrap(addon.sha256Pages);
export const sha256VerifyPages = wrap(addon.sha256VerifyPages);
export const sha256Engine = wrap(addon.sha256Engine);
export const packRead = wrap(addon.packRead);
export const packWrite = wrap(addon.packWrite);
export const packAdvise = wrap(addon.packAdvise);
export const alignedBuffer = wrap(addon.alignedBuffer);
export const pageTableNew = wrap(addon.pageTableNew);
export const pageTableGet = wrap(addon.pageTableGet);
export const pageTableSet = wrap(addon.pageTableSet);
export const pageTableAdd = wrap(addon.pageTableAdd);
export const pageTableDelete = wrap(addon.pageTableDelete);
export const pageTableSize = wrap(addon.pageTableSize);
export const pageTableBytes = wrap(addon.pageTableBytes);
export const pageTableEntries = wrap(addon.pageTableEntries);
export const pageTableClear = wrap(addon.pageTableClear);
export const pageTableClose = wrap(addon.pageTableClose);
export const mallocTune = wrap(addon.mallocTune);
