/**
 * Restore staging: a checkpoint's image laid out as one tmpfs file per region
 * plus a small table, in a directory handed to the relaunched job as
 * EXA_RESTORE. libexa adopts each file as the backing of the region of that
 * name (tmpfs is shmem, so userfaultfd write-protection works on it exactly
 * as on a memfd), unlinks it, and the image never gets copied again.
 *
 * Layout of EXA_RESTORE=<dir>:
 *   <dir>/restore.tab      "exa-restore 1\njob <job>\ncheckpoint <n>\n"
 *                          then one line per region: "region <name> <bytes> <address> <flags>\n"
 *   <dir>/<name>.region    the region's bytes (zero pages are holes)
 *
 * Pre-staging (pre-copy migration) writes checkpoint X while the job still
 * runs on its source; the final restore then writes only the pages that
 * differ between X and the final checkpoint.
 */
import { mkdtempSync, rmSync, writeFileSync, openSync, closeSync, ftruncateSync, writeSync, chownSync, existsSync, constants } from 'node:fs';
import { join } from 'node:path';
import { ExaError } from '../errors.js';
import type { StoreClient, CheckpointSummary } from '../store/client.js';
import { PAGE_SIZE } from '../../storage/pages.js';

export interface StagedImage {
  job: string;
  checkpoint: number;
  dir: string;
  info: CheckpointSummary;
}

export interface StageOptions {
  /** Parent directory of staging directories; must be tmpfs (default /dev/shm). */
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
  try {
    const info = await writeImage(store, { job, checkpoint }, dir, opts, true);
    return { job, checkpoint: info.checkpoint, dir, info };
  } catch (e) {
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
  const info = await writeImage(store, { job: staged.job, checkpoint: to, since: staged.checkpoint }, staged.dir, opts, false);
  return { ...staged, checkpoint: info.checkpoint, info };
}

async function writeImage(
  store: StoreClient,
  req: { job: string; checkpoint: number; since?: number },
  dir: string,
  opts: StageOptions,
  fresh: boolean,
): Promise<CheckpointSummary> {
  const fds = new Map<string, number>();
  let info: CheckpointSummary | null = null;
  let done = 0;
  try {
    for await (const item of store.getImage({ job: req.job, checkpoint: req.checkpoint, ...(req.since ? { since: req.since } : {}) })) {
      if ('info' in item) {
        info = item.info;
        for (const r of info.regions) {
          checkRegionName(r.name);
          const path = join(dir, `${r.name}.region`);
          // Advancing: a region the staged image lacked is created here.
          const fd = openSync(path, fresh ? 'w' : constants.O_RDWR | constants.O_CREAT, 0o600);
          // A region that grew or shrank between staged and final images gets its final size here.
          ftruncateSync(fd, r.pageCount * PAGE_SIZE);
          fds.set(r.name, fd);
          if (opts.uid !== undefined) chownSync(path, opts.uid, opts.gid ?? opts.uid);
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
      done += item.pageCount;
      opts.onProgress?.(done, info ? info.regions.reduce((a, r) => a + r.pageCount, 0) : 0);
    }
  } finally {
    for (const fd of fds.values()) closeSync(fd);
  }
  if (!info) throw new ExaError('INTERNAL', `image of job ${req.job}: the store sent no header`);
  const lines = ['exa-restore 1', `job ${req.job}`, `checkpoint ${info.checkpoint}`];
  for (const r of info.regions) lines.push(`region ${r.name} ${r.pageCount * PAGE_SIZE} ${r.address || '0'} ${r.flags}`);
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

export function discardStaged(staged: StagedImage | undefined): void {
  if (staged) rmSync(staged.dir, { recursive: true, force: true });
}
