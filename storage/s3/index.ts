/**
 * The S3 side of the store, for callers outside storage/ (CLI, servers,
 * agents, benchmarks):
 *
 *   const store = await openS3Store({ url: 's3://bucket/prefix', endpoint: 'http://minio:9000' });
 *   for await (const item of store.readImage(job, 0)) ...        // ordered, as GetImage streams it
 *   await restoreCheckpoint(store.backend, job, 0, sinkFactory);   // parallel packs, pages out of order
 *   await store.close();
 *
 * archiveJob() / importJob() move a chain between a LevelDB store and S3.
 */
import { CheckpointStore, type EngineOptions } from '../engine.js';
import { S3Backend, type S3BackendOptions } from './backend.js';

export { S3Backend, type S3BackendOptions } from './backend.js';
export { parseS3Url, type S3Config } from './io.js';
export { archiveJob, importJob, copyJob, type CopyOptions, type CopyResult, type ArchiveResult } from './archive.js';
export { restoreCheckpoint, resolveCheckpoint, bufferSink, type PageSink, type RestoreOptions, type RestoreResult } from './restore.js';

/** A checkpoint store engine over an S3 bucket prefix (the caller closes it). */
export async function openS3Store(opts: S3BackendOptions, engine: EngineOptions = {}): Promise<CheckpointStore> {
  const backend = await S3Backend.open({ packGraceMs: engine.gcGraceMs, ...opts });
  return new CheckpointStore(backend, engine);
}

/**
 * S3 options from the environment the way AWS tools read it, overridable by
 * flags: EXA_S3_ENDPOINT / AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION,
 * EXA_S3_PATH_STYLE=1. Credentials are left to the AWS chain unless given.
 */
export function s3OptionsFrom(url: string, flags: { endpoint?: string | undefined; region?: string | undefined; pathStyle?: boolean | undefined; accessKey?: string | undefined; secretKey?: string | undefined } = {}): S3BackendOptions {
  const env = process.env;
  const endpoint = flags.endpoint ?? env.EXA_S3_ENDPOINT ?? env.AWS_ENDPOINT_URL_S3 ?? env.AWS_ENDPOINT_URL;
  const pathStyle = flags.pathStyle ?? (env.EXA_S3_PATH_STYLE ? env.EXA_S3_PATH_STYLE === '1' || env.EXA_S3_PATH_STYLE === 'true' : undefined);
  return {
    url,
    ...(endpoint ? { endpoint } : {}),
    ...(flags.region ? { region: flags.region } : {}),
    ...(pathStyle !== undefined ? { forcePathStyle: pathStyle } : {}),
    ...(flags.accessKey !== undefined || flags.secretKey !== undefined ? { accessKeyId: flags.accessKey, secretAccessKey: flags.secretKey } : {}),
  };
}
