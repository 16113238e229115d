/**
 * The Store gRPC service over an S3 bucket prefix (`exastore serve --s3`):
 * the same handlers as the LevelDB server (src/store/server.ts), with the
 * engine over storage/s3. The data directory, when given, holds only the
 * local cache (index, manifests, this server's GC marks) and can be deleted.
 */
import type { ServerTls } from '../grpc.js';
import type { TenantTable } from '../tenants.js';
import { serveStore, type RunningStoreServer } from '../store/server.js';
import { S3Backend, type S3BackendOptions } from '../../storage/s3/backend.js';

export interface S3StoreServerOptions {
  s3: S3BackendOptions;
  host?: string;
  port?: number;
  token?: string | undefined;
  /** Serve TLS with these PEM files (plaintext when absent). */
  tls?: ServerTls | undefined;
  gcGraceMs?: number;
  /** Tenants' tokens accepted besides `token`, each scoped to its jobs (src/tenants.ts). */
  tenants?: TenantTable | undefined;
}

export interface RunningS3StoreServer extends RunningStoreServer {
  backend: S3Backend;
}

/** Open the bucket (clear errors naming bucket and endpoint) and serve the Store service. */
export async function startS3StoreServer(opts: S3StoreServerOptions): Promise<RunningS3StoreServer> {
  const backend = await S3Backend.open({ ...(opts.gcGraceMs !== undefined ? { packGraceMs: opts.gcGraceMs } : {}), ...opts.s3 });
  return { ...(await serveStore(backend, opts)), backend };
}
