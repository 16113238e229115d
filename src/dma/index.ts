/**
 * RDMA API remoting for Node workloads: the same API as exa.h's DMA section.
 *
 *   const w = Workload.attach({ socketPath, jobId: 'a' });
 *   const dma = DmaSession.open(w);
 *   const buf = new Uint8Array(dma.alloc('halo', 1 << 20));  // a checkpointable region
 *   dma.grant('halo', 'b', 'rw');                             // job b may read and write it
 *   const peer = dma.lookup('b', 'halo');                     // b's buffer, granted to us
 *   dma.writeSync('halo', 0, peer, 0, 4096);                  // one-sided write, returns when done
 *   const q = dma.createQueue();                              // polling mode
 *   q.write('halo', 0, peer, 0, 4096, 1); const [c] = await q.wait();
 *   const cbq = dma.createQueue({ onCompletion: (c) => ... }); // callback (interrupt) mode
 *   await dma.write('halo', 0, peer, 0, 4096);                // async, as a promise
 *
 * Requests travel through shared-memory rings to the agent's DMA backend,
 * which copies between the jobs' buffers through its own mappings (the bytes
 * never pass through this process's JavaScript) and writes every destination
 * through the checkpointer. A queue holds at most 256 outstanding operations:
 * posting more throws RESOURCE_EXHAUSTED. A failed operation completes with
 * `error` set (an ExaError naming the buffer, job and bounds), never silently.
 *
 * Across hosts: a peer job on another host is reached through its agent
 * (the agents' TCP data path); a RemoteBuffer names (job, buffer) and is
 * resolved at every operation, so it keeps working while the peer migrates
 * (held operations complete on the new host, in order, exactly once). An
 * operation whose outcome is unknown (connection lost) fails UNAVAILABLE and
 * is never re-sent.
 *
 * Ownership: the session borrows the Workload's libexa context and is closed
 * automatically before the workload detaches. A callback-mode queue (and the
 * one behind write()/read()) keeps the event loop alive until close(), like a socket. close() destroys the queues;
 * buffers stay allocated as regions (the ArrayBuffers are detached).
 */
import { ExaError } from '../errors.js';
import * as native from '../native.js';
import type { DmaQueueHandle, DmaSessionHandle, NativeDmaCompletion } from '../native.js';
import type { Workload } from '../workload/index.js';

export const DMA_QUEUE_DEPTH = 256;

export type DmaPerm = 'read' | 'write' | 'rw' | 'none';

const PERM_BITS: Record<DmaPerm, number> = { none: 0, read: 1, write: 2, rw: 3 };

/** A peer's buffer, as looked up: valid for operations while the grant lasts. */
export interface RemoteBuffer {
  readonly job: string;
  readonly name: string;
  readonly size: number;
  readonly canRead: boolean;
  readonly canWrite: boolean;
  /** @internal the backend's handle */
  readonly handle: number;
}

export interface DmaCompletion {
  tag: number;
  op: 'write' | 'read' | 'unknown';
  /** Bytes transferred (0 on error). */
  len: number;
  /** null on success; otherwise the reason as an ExaError (detail.errno = errno name). */
  error: ExaError | null;
}

function toCompletion(c: NativeDmaCompletion): DmaCompletion {
  let error: ExaError | null = null;
  if (c.status < 0) error = native.nativeError(Object.assign(new Error(c.reason || `DMA ${c.op} failed`), { code: c.code ?? 'EIO' }));
  return { tag: c.tag, op: c.op, len: c.len, error };
}

export interface QueueOptions {
  /** Callback (interrupt) mode: every completion is delivered here, on the JS thread. Without it: polling mode. */
  onCompletion?: (c: DmaCompletion) => void;
}

export class DmaQueue {
  private handle: DmaQueueHandle | null;
  readonly mode: 'poll' | 'callback';

  /** @internal */
  constructor(handle: DmaQueueHandle, mode: 'poll' | 'callback', private readonly onGone: (q: DmaQueue) => void) {
    this.handle = handle;
    this.mode = mode;
  }

  private get h(): DmaQueueHandle {
    if (!this.handle) throw new ExaError('FAILED_PRECONDITION', 'the DMA queue is destroyed');
    return this.handle;
  }

  /** Post a one-sided write local[localOff..+len) -> remote[remoteOff..+len). */
  write(local: string, localOff: number, remote: RemoteBuffer, remoteOff: number, len: number, tag = 0): void {
    native.dmaPost(this.h, 'write', local, localOff, remote.handle, remoteOff, len, tag);
  }

  /** Post a one-sided read remote[remoteOff..+len) -> local[localOff..+len). */
  read(local: string, localOff: number, remote: RemoteBuffer, remoteOff: number, len: number, tag = 0): void {
    native.dmaPost(this.h, 'read', local, localOff, remote.handle, remoteOff, len, tag);
  }

  /** Polling mode: the completions ready now (never blocks). */
  poll(max = 64): DmaCompletion[] {
    return native.dmaPoll(this.h, max).map(toCompletion);
  }

  /** Polling mode: wait (off the JS thread) for at least one completion; [] after timeoutMs (-1 = forever). */
  async wait(max = 64, timeoutMs = -1): Promise<DmaCompletion[]> {
    return (await native.dmaWait(this.h, max, timeoutMs)).map(toCompletion);
  }

  /** @internal the test hook for garbage ring entries: the 64-byte entry goes into the next request slot
   * stamped as sequence (next + advance - 1): advance 1 is the right stamp, other values forge a garbage one. */
  testPostRaw(entry: Uint8Array, advance = 1): void {
    native.dmaTestPostRaw(this.h, entry, advance);
  }

  /** Destroy the queue. CONFLICT while a wait() is in progress. */
  destroy(): void {
    if (!this.handle) return;
    native.dmaQueueDestroy(this.handle);
    this.handle = null;
    this.onGone(this);
  }

  /** @internal the session closed it */
  invalidate(): void {
    this.handle = null;
  }
}

export interface DmaOpenOptions {
  /** Backend socket; default $EXA_DMA_SOCKET, else the agent socket + ".dma". */
  socketPath?: string;
}

export class DmaSession {
  private handle: DmaSessionHandle | null;
  private readonly buffers = new Map<string, ArrayBuffer>();
  private readonly queues = new Set<DmaQueue>();
  private release: () => void = () => undefined;
  /** write()/read() promises: a private callback queue, tags 1.. (0 is never posted). */
  private promiseQueue: DmaQueue | null = null;
  private readonly pending = new Map<number, { resolve: () => void; reject: (e: ExaError) => void }>();
  private nextTag = 1;

  private constructor(handle: DmaSessionHandle, readonly jobId: string) {
    this.handle = handle;
  }

  /** Open the workload's DMA session. UNAVAILABLE when its agent runs no DMA backend; PERMISSION_DENIED if the backend does not recognise this process as the job. */
  static open(workload: Workload, opts: DmaOpenOptions = {}): DmaSession {
    let s: DmaSession | null = null;
    const { handle, release } = workload.nativeHandleFor(() => s?.close());
    let h: DmaSessionHandle;
    try {
      h = native.dmaOpen(handle, opts.socketPath ?? null);
    } catch (e) {
      release();
      const errno = e instanceof ExaError ? e.detail.errno : undefined;
      if (errno === 'ENOENT' || errno === 'ECONNREFUSED') throw new ExaError('UNAVAILABLE', (e as Error).message, { errno }, { cause: e });
      throw e;
    }
    s = new DmaSession(h, workload.jobId);
    s.release = release;
    return s;
  }

  private get h(): DmaSessionHandle {
    if (!this.handle) throw new ExaError('FAILED_PRECONDITION', `the DMA session of job ${this.jobId} is closed`);
    return this.handle;
  }

  /** Allocate a DMA buffer: a checkpointable region of this name (size rounded up to 4096, zero-filled). */
  alloc(name: string, size: number): ArrayBuffer {
    const ab = native.dmaAlloc(this.h, name, size);
    this.buffers.set(name, ab);
    return ab;
  }

  /** The ArrayBuffer of a local DMA buffer, or null. */
  buffer(name: string): ArrayBuffer | null {
    return this.buffers.get(name) ?? null;
  }

  /** Free a buffer: peers' later operations on it fail; its ArrayBuffer is detached. */
  free(name: string): void {
    native.dmaFree(this.h, name);
    this.buffers.delete(name);
  }

  /** Grant (or with 'none' revoke) a peer job access to a local buffer. */
  grant(name: string, peerJob: string, perm: DmaPerm): void {
    if (!(perm in PERM_BITS)) throw new ExaError('INVALID_ARGUMENT', `grant of "${name}" to ${peerJob}: permission must be read, write, rw or none`);
    native.dmaGrant(this.h, name, peerJob, PERM_BITS[perm]);
  }

  /** A peer's buffer granted to this job. NOT_FOUND: no such buffer; PERMISSION_DENIED: not granted. */
  lookup(peerJob: string, name: string): RemoteBuffer {
    const r = native.dmaLookup(this.h, peerJob, name);
    return { job: peerJob, name, size: r.size, canRead: (r.perms & 1) !== 0, canWrite: (r.perms & 2) !== 0, handle: r.handle };
  }

  /** A queue in polling mode, or callback mode with opts.onCompletion. */
  createQueue(opts: QueueOptions = {}): DmaQueue {
    const cb = opts.onCompletion;
    const h = native.dmaQueueCreate(this.h, cb ? (c: NativeDmaCompletion) => cb(toCompletion(c)) : null);
    const q = new DmaQueue(h, cb ? 'callback' : 'poll', (x) => this.queues.delete(x));
    this.queues.add(q);
    return q;
  }

  /**
   * Asynchronous write as a promise: resolves when the backend completed it, rejects with the
   * error completion (an ExaError naming the buffer, job and bounds). At most 256 outstanding
   * (RESOURCE_EXHAUSTED beyond). Uses a private callback-mode queue.
   */
  write(local: string, localOff: number, remote: RemoteBuffer, remoteOff: number, len: number): Promise<void> {
    return this.submit('write', local, localOff, remote, remoteOff, len);
  }

  /** Asynchronous read as a promise (see write). */
  read(local: string, localOff: number, remote: RemoteBuffer, remoteOff: number, len: number): Promise<void> {
    return this.submit('read', local, localOff, remote, remoteOff, len);
  }

  private submit(op: 'write' | 'read', local: string, localOff: number, remote: RemoteBuffer, remoteOff: number, len: number): Promise<void> {
    if (!this.promiseQueue) this.promiseQueue = this.createQueue({ onCompletion: (c) => this.settle(c) });
    const q = this.promiseQueue;
    const tag = this.nextTag++;
    return new Promise<void>((resolve, reject) => {
      this.pending.set(tag, { resolve, reject });
      try {
        if (op === 'write') q.write(local, localOff, remote, remoteOff, len, tag);
        else q.read(local, localOff, remote, remoteOff, len, tag);
      } catch (e) {
        this.pending.delete(tag);
        reject(e);
      }
    });
  }

  private settle(c: DmaCompletion): void {
    const p = this.pending.get(c.tag);
    if (p) {
      this.pending.delete(c.tag);
      if (c.error) p.reject(c.error);
      else p.resolve();
      return;
    }
    // no such tag: libexa reports the backend's disappearance with tag 0, once per operation left
    if (c.error) this.rejectAll(c.error);
  }

  private rejectAll(e: ExaError): void {
    const all = [...this.pending.values()];
    this.pending.clear();
    for (const p of all) p.reject(e);
  }

  /** Synchronous write: blocks this thread until done; throws the error completion as an ExaError. */
  writeSync(local: string, localOff: number, remote: RemoteBuffer, remoteOff: number, len: number): void {
    native.dmaSync(this.h, 'write', local, localOff, remote.handle, remoteOff, len);
  }

  /** Synchronous read (see writeSync). */
  readSync(local: string, localOff: number, remote: RemoteBuffer, remoteOff: number, len: number): void {
    native.dmaSync(this.h, 'read', local, localOff, remote.handle, remoteOff, len);
  }

  /** Close: destroys the queues; buffers stay allocated as regions but their ArrayBuffers are detached. */
  close(): void {
    if (!this.handle) return;
    native.dmaClose(this.handle);
    this.handle = null;
    for (const q of this.queues) q.invalidate();
    this.queues.clear();
    this.promiseQueue = null;
    this.rejectAll(new ExaError('CANCELLED', `the DMA session of job ${this.jobId} was closed with the operation outstanding`));
    this.buffers.clear();
    this.release();
  }
}
