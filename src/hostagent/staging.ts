/**
 * Restore staging: a checkpoint's image laid out as one memfd per region,
 * held open by this agent process, plus a small table in a directory handed
 * to the relaunched job as EXA_RESTORE. libexa opens each memfd through
 * /proc/<agent pid>/fd/<n> and adopts it as the backing of the region of
 * that name (a memfd is shmem, so userfaultfd write-protection works on it),
 * so the image never gets copied again. Every staged memfd is sealed against
 * shrinking (F_SEAL_SHRINK) before the job sees it: the agent maps the job's
 * regions, and a region shrunk under that mapping would crash the agent
 * (SIGBUS), so the agent refuses unsealed region memfds.
 *
 * Layout of EXA_RESTORE=<dir>:
 *   <dir>/restore.tab      "exa-restore 2\njob <job>\ncheckpoint <n>\nmemfds <agent pid>\n"
 *                          then one line per region: "region <name> <bytes> <address> <flags> <fd>\n"
 * The region's bytes are in the agent's fd <fd> (zero pages are holes).
 *
 * Pre-staging (pre-copy migration) writes checkpoint X while the job still
 * runs on its source; the final restore then writes only the pages that
 * differ between X and the final checkpoint. The agent closes the memfds
 * when the job has ended (the job's own mappings keep the pages meanwhile)
 * or when the staged image is discarded.
 */
import { mkdtempSync, rmSync, writeFileSync, closeSync, ftruncateSync, fstatSync, readSync, writeSync, chownSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { ExaError } from '../errors.js';
import * as native from '../native.js';
import type { StoreClient, CheckpointSummary } from '../store/client.js';
import { PAGE_SIZE } from '../../storage/pages.js';

export interface StagedImage {
  job: string;
  checkpoint: number;
  dir: string;
  info: CheckpointSummary;
  /** Region name -> this process's fd of its sealed memfd. */
  fds: Map<string, number>;
}

export interface StageOptions {
  /** Parent directory of staging directories (restore tables; default /dev/shm). */
  root: string;
  /** Hand the directory to the job's user (the agent may run as root). */
  uid?: number;
  gid?: number;
  onProgress?: (done: number, total: number) => void;
}

/** Write the image of (job, checkpoint) into a fresh staging directory. */
export async function stageImage(store: StoreClient, job: string, checkpoint: number, opts: StageOptions): Promise<StagedImage> {
  if (!existsSync(opts.root)) throw new ExaError('FAILED_PRECONDITION', `restore staging directory ${opts.root} does not exist`);
  const dir = mkdtempSync(join(opts.root, `exa-restore-${job}-`));
  const fds = new Map<string, number>();
  try {
    const info = await writeImage(store, { job, checkpoint }, dir, fds, opts);
    return { job, checkpoint: info.checkpoint, dir, info, fds };
  } catch (e) {
    closeAll(fds);
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

/**
 * Bring a staged image up to checkpoint `to` by writing only the pages that
 * differ between the staged checkpoint and `to` (a delta read from the store).
 */
export async function advanceImage(store: StoreClient, staged: StagedImage, to: number, opts: StageOptions): Promise<StagedImage> {
  if (to === staged.checkpoint) return staged;
  const info = await writeImage(store, { job: staged.job, checkpoint: to, since: staged.checkpoint }, staged.dir, staged.fds, opts);
  return { ...staged, checkpoint: info.checkpoint, info };
}

async function writeImage(
  store: StoreClient,
  req: { job: string; checkpoint: number; since?: number },
  dir: string,
  fds: Map<string, number>,
  opts: StageOptions,
): Promise<CheckpointSummary> {
  let info: CheckpointSummary | null = null;
  let done = 0;
  {
    for await (const item of store.getImage({ job: req.job, checkpoint: req.checkpoint, ...(req.since ? { since: req.since } : {}) })) {
      if ('info' in item) {
        info = item.info;
        for (const r of info.regions) {
          checkRegionName(r.name);
          // Advancing: a region the staged image lacked is created here, one that
          // grew or shrank between staged and final images gets its final size.
          fds.set(r.name, sized(r.name, fds.get(r.name), r.pageCount * PAGE_SIZE));
        }
        continue;
      }
      const fd = fds.get(item.region);
      if (fd === undefined) throw new ExaError('CORRUPT', `image of job ${req.job}: the store sent pages of region "${item.region}" that is not in its table`);
      if (item.pages) {
        // A delta: scattered pages, each written where it belongs.
        item.pages.forEach((page, i) => { writeSync(fd, item.data, i * PAGE_SIZE, PAGE_SIZE, page * PAGE_SIZE); });
      } else {
        writeSync(fd, item.data, 0, item.data.length, item.firstPage * PAGE_SIZE);
      }
      item.release();
      done += item.pageCount;
      opts.onProgress?.(done, info ? info.regions.reduce((a, r) => a + r.pageCount, 0) : 0);
    }
  }
  if (!info) throw new ExaError('INTERNAL', `image of job ${req.job}: the store sent no header`);
  const lines = ['exa-restore 2', `job ${req.job}`, `checkpoint ${info.checkpoint}`, `memfds ${process.pid}`];
  for (const r of info.regions) lines.push(`region ${r.name} ${r.pageCount * PAGE_SIZE} ${r.address || '0'} ${r.flags} ${fds.get(r.name)!}`);
  writeFileSync(join(dir, 'restore.tab'), `${lines.join('\n')}\n`, { mode: 0o600 });
  if (opts.uid !== undefined) {
    chownSync(join(dir, 'restore.tab'), opts.uid, opts.gid ?? opts.uid);
    chownSync(dir, opts.uid, opts.gid ?? opts.uid);
  }
  return info;
}

function checkRegionName(name: string): void {
  if (!/^[A-Za-z0-9._-]{1,63}$/.test(name) || name === '.' || name === '..') {
    throw new ExaError('CORRUPT', `region name ${JSON.stringify(name)} in a stored checkpoint is not a valid region name`);
  }
}

/**
 * A sealed memfd of `bytes` for a region: `fd` itself when it has that size
 * or can grow to it; a new one holding its first `bytes` when the region
 * shrank (a sealed memfd cannot shrink).
 */
function sized(name: string, fd: number | undefined, bytes: number): number {
  if (fd === undefined) return native.memfdCreate(name, bytes);
  const have = fstatSync(fd).size;
  if (have === bytes) return fd;
  if (have < bytes) {
    ftruncateSync(fd, bytes);
    return fd;
  }
  const out = native.memfdCreate(name, bytes);
  try {
    const buf = Buffer.allocUnsafe(1 << 20);
    for (let off = 0; off < bytes;) {
      const n = readSync(fd, buf, 0, Math.min(buf.length, bytes - off), off);
      if (n <= 0) break;
      writeSync(out, buf, 0, n, off);
      off += n;
    }
  } catch (e) {
    closeSync(out);
    throw e;
  }
  closeSync(fd);
  return out;
}

function closeAll(fds: Map<string, number>): void {
  for (const fd of fds.values()) {
    try { closeSync(fd); } catch { /* already closed */ }
  }
  fds.clear();
}

export function discardStaged(staged: StagedImage | undefined): void {
  if (!staged) return;
  closeAll(staged.fds);
  rmSync(staged.dir, { recursive: true, force: true });
}
