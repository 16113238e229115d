/**
 * The S3 parts of the exastore CLI, kept here so src/cli/exastore.ts only
 * wires them in:
 *
 *   exastore serve --s3 s3://bucket/prefix [--s3-endpoint URL] [--s3-region R] [--s3-path-style] [--data DIR]
 *   exastore archive JOB --to s3://bucket/prefix (--data DIR | --store ADDR) [--delete-local]
 *   exastore import JOB --from s3://bucket/prefix (--data DIR | --store ADDR)
 *
 * Credentials: the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
 * AWS_PROFILE, SSO, instance roles), or --s3-access-key/--s3-secret-key.
 * Endpoint also from $EXA_S3_ENDPOINT or $AWS_ENDPOINT_URL_S3/$AWS_ENDPOINT_URL.
 */
import { join } from 'node:path';
import { InvalidArgumentError, type Command } from 'commander';
import { ExaError } from '../errors.js';
import { StoreClient } from '../store/client.js';
import type { ServerTls } from '../grpc.js';
import type { TenantTable } from '../tenants.js';
import type { Backend, ManifestHeader, PageMaps, PageRef } from '../../storage/backend.js';
import { LevelBackend } from '../../storage/leveldb.js';
import { ENTRY_BYTES, HASH_BYTES, PAGE_SIZE, REF_BYTES, isZeroPage, sha256 } from '../../storage/pages.js';
import { S3Backend, type S3BackendOptions } from '../../storage/s3/backend.js';
import { archiveJob, importJob } from '../../storage/s3/archive.js';
import { s3OptionsFrom } from '../../storage/s3/index.js';
import { startS3StoreServer, type RunningS3StoreServer } from './server.js';
import { importJobToStore, type ImportToStoreResult } from './import.js';
import { fmtBytes, out, progressBar } from '../cli/common.js';

export interface S3Flags {
  s3Endpoint?: string;
  s3Region?: string;
  s3PathStyle?: boolean;
  s3AccessKey?: string;
  s3SecretKey?: string;
  packMib?: number;
}

/** Add the --s3-* connection options to a command. */
export function withS3Options(cmd: Command): Command {
  return cmd
    .option('--s3-endpoint <url>', 'S3 endpoint for MinIO, Ceph RGW... (default $EXA_S3_ENDPOINT, $AWS_ENDPOINT_URL_S3, else AWS)')
    .option('--s3-region <region>', 'S3 region (default $AWS_REGION, else us-east-1)')
    .option('--s3-path-style', 'path-style URLs (http://host/bucket/key); default on when an endpoint is given')
    .option('--s3-access-key <id>', 'access key id (default: the AWS credential chain)')
    .option('--s3-secret-key <secret>', 'secret access key (default: the AWS credential chain)')
    .option('--pack-mib <n>', 'target pack size in MiB (16-64 suits S3)', (v) => {
      const n = Number(v);
      if (!Number.isFinite(n) || n <= 0 || n > 256) throw new InvalidArgumentError('--pack-mib must be a number in (0, 256]');
      return n;
    });
}

/** Backend options from an s3:// URL and the flags. */
export function s3Options(url: string, o: S3Flags, extra: Partial<S3BackendOptions> = {}): S3BackendOptions {
  const env = process.env;
  return {
    ...s3OptionsFrom(url, { endpoint: o.s3Endpoint, region: o.s3Region, pathStyle: o.s3PathStyle, accessKey: o.s3AccessKey, secretKey: o.s3SecretKey }),
    ...(o.packMib ? { packBytes: Math.round(o.packMib * 2 ** 20) } : {}),
    // Operator knobs for tests and tuning; see storage/s3/backend.ts for the GC safety condition.
    ...(env.EXA_S3_REFRESH_MS ? { refreshMs: Number(env.EXA_S3_REFRESH_MS), missRefreshMs: Math.min(1000, Number(env.EXA_S3_REFRESH_MS)) } : {}),
    ...extra,
  };
}

/** `exastore serve --s3`: the local data directory holds only the S3 cache (DIR/s3cache). */
export async function serveS3(o: S3Flags & { s3: string; data?: string; host: string; port: number; gcGraceMs: number; token?: string; tls?: ServerTls | undefined; tenants?: TenantTable | undefined }): Promise<RunningS3StoreServer> {
  return startS3StoreServer({
    s3: s3Options(o.s3, o, o.data ? { cacheDir: join(o.data, 's3cache') } : {}),
    host: o.host, port: o.port, gcGraceMs: o.gcGraceMs, ...(o.token ? { token: o.token } : {}), ...(o.tls ? { tls: o.tls } : {}), ...(o.tenants ? { tenants: o.tenants } : {}),
  });
}

/**
 * A copy source over a running store server: headers from ListCheckpoints,
 * each checkpoint's image from GetImage (hashed here), deletes through
 * DeleteCheckpoints. Holds one checkpoint image in memory at a time.
 */
class GrpcSource implements Pick<Backend, 'kind' | 'listHeaders' | 'getMaps' | 'readPages' | 'lookup' | 'deleteManifests'> {
  readonly kind = 'gRPC';
  private pages: Buffer[] = [];
  private readonly byHash = new Map<string, number>();
  constructor(private readonly c: StoreClient) {}

  async listHeaders(job?: string): Promise<ManifestHeader[]> {
    if (!job) throw new ExaError('INVALID_ARGUMENT', 'a job is required');
    const cps = await this.c.listCheckpoints(job).catch((e: unknown) => {
      if ((e as ExaError).code === 'NOT_FOUND') return [];
      throw e;
    });
    return cps.map((k) => ({
      job: k.job, checkpoint: k.checkpoint, parent: k.parent, createdAt: Date.parse(k.createdAt), regions: k.regions, labels: k.labels,
      changedPages: k.changedPages, sentPages: k.changedPages, newPages: k.newPages, zeroPages: k.zeroPages,
    }));
  }

  async getMaps(job: string, checkpoint: number): Promise<PageMaps | null> {
    const img = await this.c.fetchImage({ job, checkpoint });
    this.pages = [];
    this.byHash.clear();
    return img.info.regions.map((r) => {
      const bytes = img.regions.get(r.name)!;
      const map = Buffer.alloc(r.pageCount * ENTRY_BYTES);
      for (let i = 0; i < r.pageCount; i++) {
        const page = bytes.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
        if (isZeroPage(page)) continue;
        const h = sha256(page);
        h.copy(map, i * ENTRY_BYTES);
        const k = h.toString('latin1');
        let slot = this.byHash.get(k);
        if (slot === undefined) { slot = this.pages.length; this.pages.push(page); this.byHash.set(k, slot); }
        map.writeBigUInt64BE(BigInt(slot), i * ENTRY_BYTES + HASH_BYTES);
      }
      return map;
    });
  }

  async readPages(refs: readonly PageRef[]): Promise<(Buffer | null)[]> {
    return refs.map((r) => (r.length === REF_BYTES ? this.pages[Number(r.readBigUInt64BE(0))] ?? null : null));
  }

  async lookup(hashes: readonly Buffer[]): Promise<(PageRef | null)[]> {
    return hashes.map((h) => {
      const slot = this.byHash.get(h.toString('latin1'));
      if (slot === undefined) return null;
      const r = Buffer.alloc(REF_BYTES);
      r.writeBigUInt64BE(BigInt(slot));
      return r;
    });
  }

  async deleteManifests(job: string, checkpoints: readonly number[]): Promise<void> {
    await this.c.deleteCheckpoints(job, { checkpoints: [...checkpoints] });
  }
}

type ArchiveFlags = S3Flags & { to: string; data?: string; store?: string; deleteLocal?: boolean; token?: string; tlsCa?: string; json?: boolean };

/** `exastore archive` (returns the result for the caller to print). */
export async function archiveCommand(job: string, o: ArchiveFlags, progress?: (p: { phase: string; done: number; total: number; unit: string }) => void): Promise<Awaited<ReturnType<typeof archiveJob>>> {
  if ((o.data ? 1 : 0) + (o.store ? 1 : 0) !== 1) {
    throw new ExaError('INVALID_ARGUMENT', 'give exactly one source: --data DIR (a stopped LevelDB store) or --store ADDR (a running store server)');
  }
  const dest = await S3Backend.open(s3Options(o.to, o));
  try {
    if (o.data) {
      const source = await LevelBackend.open(o.data);
      try {
        return await archiveJob({ job, source, dest, deleteLocal: !!o.deleteLocal, ...(progress ? { progress } : {}) });
      } finally {
        await source.close();
      }
    }
    const c = await StoreClient.connect(o.store!, { token: o.token ?? process.env.EXA_TOKEN, tlsCa: o.tlsCa ?? (process.env.EXA_TLS_CA || undefined), timeoutMs: 5000 });
    try {
      return await archiveJob({ job, source: new GrpcSource(c) as unknown as Backend, dest, deleteLocal: !!o.deleteLocal, ...(progress ? { progress } : {}) });
    } finally {
      c.close();
    }
  } finally {
    await dest.close();
  }
}

type ImportFlags = S3Flags & { from: string; data?: string; store?: string; token?: string; tlsCa?: string };
export type ImportCommandResult = Awaited<ReturnType<typeof importJob>> | (ImportToStoreResult & { viaStore: true });

/**
 * `exastore import`: an S3 archive's chain into a stopped LevelDB store
 * directory (--data, numbers and headers kept exactly) or into a running
 * store server (--store, over PutCheckpoint; see src/s3/import.ts).
 */
export async function importCommand(job: string, o: ImportFlags, progress?: (p: { phase: string; done: number; total: number; unit: string }) => void): Promise<ImportCommandResult> {
  if ((o.data ? 1 : 0) + (o.store ? 1 : 0) !== 1) {
    throw new ExaError('INVALID_ARGUMENT', 'give exactly one destination: --data DIR (a stopped LevelDB store) or --store ADDR (a running store server)');
  }
  const source = await S3Backend.open(s3Options(o.from, o));
  try {
    if (o.store) {
      const c = await StoreClient.connect(o.store, { token: o.token ?? process.env.EXA_TOKEN, tlsCa: o.tlsCa ?? (process.env.EXA_TLS_CA || undefined), timeoutMs: 5000 });
      try {
        return { ...(await importJobToStore({ job, source, store: c, ...(progress ? { onProgress: progress } : {}) })), viaStore: true };
      } finally {
        c.close();
      }
    }
    const dest = await LevelBackend.open(o.data!);
    try {
      return await importJob({ job, source, dest, ...(progress ? { progress } : {}) });
    } finally {
      await dest.close();
    }
  } finally {
    await source.close();
  }
}

/**
 * Register `archive` and `import` on the exastore program. Exit codes and
 * error printing are the program's (src/errors.ts exitCodeFor).
 */
export function addS3Commands(program: Command): void {
  withS3Options(program.command('archive <job>')
    .description("move a job's chain to S3: copy pages and manifests (numbers kept), verify every page from the bucket, then optionally delete the job locally")
    .requiredOption('--to <url>', 'destination s3://bucket/prefix (a store prefix: `exastore serve --s3` on it serves the job)')
    .option('--data <dir>', 'source: the LevelDB data directory of a stopped store')
    .option('--store <addr>', 'source: a running store server (host:port)')
    .option('--token <token>', 'bearer token for --store (default $EXA_TOKEN)')
    .option('--tls-ca <pem>', 'connect to --store with TLS, trusting this CA (default $EXA_TLS_CA)')
    .option('--delete-local', 'after a verified copy, delete the archived checkpoints from the source (pages go at its next gc)')
    .option('--json', 'print one JSON object'))
    .action(async (job: string, o: ArchiveFlags) => {
      const pb = progressBar(o.json);
      const r = await archiveCommand(job, o, pb.onProgress).finally(pb.stop);
      out(o.json, r, () => `archived job ${r.job} to ${o.to}: ${r.copied.length} checkpoints copied, ${r.skipped.length} already there, ${r.pagesUploaded} pages (${fmtBytes(r.bytesUploaded)}) uploaded, verified${r.deletedLocal.length ? `; deleted ${r.deletedLocal.length} checkpoints locally` : ''}`);
    });

  withS3Options(program.command('import <job>')
    .description("copy a job's chain from an S3 archive into a store that has never seen the job")
    .requiredOption('--from <url>', 'source s3://bucket/prefix')
    .option('--data <dir>', 'destination: the LevelDB data directory of a stopped store (created if missing); numbers kept')
    .option('--store <addr>', 'destination: a running store server (host:port); it numbers the checkpoints (labels keep the archive numbers)')
    .option('--token <token>', 'bearer token for --store (default $EXA_TOKEN)')
    .option('--tls-ca <pem>', 'connect to --store with TLS, trusting this CA (default $EXA_TLS_CA)')
    .option('--json', 'print one JSON object'))
    .action(async (job: string, o: ImportFlags & { json?: boolean }) => {
      const pb = progressBar(o.json);
      const r = await importCommand(job, o, pb.onProgress).finally(pb.stop);
      out(o.json, r, () => ('viaStore' in r
        ? `imported job ${r.job} from ${o.from} into ${o.store}: checkpoints ${r.mapping.map(([a, b]) => (a === b ? `${a}` : `${a}->${b}`)).join(', ')}, ${r.pagesSent} pages sent`
        : `imported job ${r.job} from ${o.from}: ${r.copied.length} checkpoints copied, ${r.skipped.length} already there, ${r.pagesUploaded} pages written, verified`));
    });
}
