/**
 * S3 access for the pack-file backend: configuration the way S3 users write
 * it (s3://bucket/prefix, endpoint, region, path-style, credentials from the
 * standard AWS chain or explicit keys), one S3Client, one retry loop with
 * backoff, request counters, and errors that name the bucket and endpoint.
 *
 * Retries: the SDK's own retry is turned off (maxAttempts 1) so that exactly
 * one loop, this one, decides: throttling (429, SlowDown), 5xx, timeouts and
 * connection errors are retried with exponential backoff and full jitter up
 * to `maxAttempts`; everything else (403, 404, 412, 400) fails at once.
 *
 * Checksums: requestChecksumCalculation / responseChecksumValidation are
 * "WHEN_REQUIRED". With the SDK default ("WHEN_SUPPORTED") PUT bodies are
 * sent with aws-chunked streaming-checksum framing, which some S3-compatible
 * servers (s3rver 3.7.1) store raw. Integrity does not depend on it: every
 * page is checked against its SHA-256 and every index object and manifest
 * carries its own SHA-256 trailer.
 */
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import {
  AbortMultipartUploadCommand, CompleteMultipartUploadCommand, CreateMultipartUploadCommand, DeleteObjectCommand,
  GetObjectCommand, HeadBucketCommand, ListObjectsV2Command, PutObjectCommand, S3Client, UploadPartCommand,
} from '@aws-sdk/client-s3';
import { ExaError, toExaError } from '../../src/errors.js';

/** Where and how to reach the bucket. */
export interface S3Config {
  /** s3://bucket[/prefix] */
  url: string;
  /** http(s)://host:port for MinIO, Ceph RGW, s3rver; omitted = AWS. */
  endpoint?: string | undefined;
  /** Default: $AWS_REGION, $AWS_DEFAULT_REGION, else us-east-1. */
  region?: string | undefined;
  /** Path-style URLs (http://host/bucket/key), needed by MinIO and s3rver. Default: true when an endpoint is given. */
  forcePathStyle?: boolean | undefined;
  /** Explicit keys; omitted = the standard AWS credential chain (env, profile, SSO, IMDS...). */
  accessKeyId?: string | undefined;
  secretAccessKey?: string | undefined;
  sessionToken?: string | undefined;
  /** Attempts per request for retryable failures (default 8). */
  maxAttempts?: number | undefined;
  /** First backoff (ms, default 200); doubles each attempt up to retryMaxMs (default 10 000). */
  retryBaseMs?: number | undefined;
  retryMaxMs?: number | undefined;
  /** Per-request socket timeout (ms, default 120 000) and connect timeout (default 5 000). */
  requestTimeoutMs?: number | undefined;
  connectTimeoutMs?: number | undefined;
  /** Send If-None-Match: * on object creation (default true; servers that do not enforce it ignore it). */
  conditionalWrites?: boolean | undefined;
}

export interface S3Location { bucket: string; prefix: string }

/** Progress of S3Io.getInto, for callers that work on a body while it arrives. */
export interface GetHooks {
  /** After each piece of the body is copied in: the bytes of the buffer filled so far (this attempt). */
  onData?(bytes: number): void;
  /** Before a retry writes the buffer again from its start; the retry waits for it. */
  beforeRetry?(): Promise<void>;
}

const BUCKET_RE = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

/** Parse s3://bucket/prefix. The prefix is '' or ends with '/'. INVALID_ARGUMENT names what is wrong. */
export function parseS3Url(url: string): S3Location {
  const m = /^s3:\/\/([^/]+)(?:\/(.*))?$/.exec(url ?? '');
  if (!m) throw new ExaError('INVALID_ARGUMENT', `invalid S3 URL ${JSON.stringify(url)}: expected s3://bucket/prefix`);
  const bucket = m[1]!;
  if (!BUCKET_RE.test(bucket) || bucket.includes('..')) {
    throw new ExaError('INVALID_ARGUMENT', `invalid bucket name ${JSON.stringify(bucket)} in ${url}: 3-63 characters from a-z 0-9 . -`);
  }
  let prefix = (m[2] ?? '').replace(/\/+/g, '/').replace(/^\//, '');
  if (prefix !== '' && !prefix.endsWith('/')) prefix += '/';
  if (prefix.length > 512 || /[\x00-\x1f\\]/.test(prefix)) throw new ExaError('INVALID_ARGUMENT', `invalid prefix in ${url}`);
  return { bucket, prefix };
}

export interface ObjectInfo { key: string; size: number; lastModified: number }

const RETRYABLE_NET = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ECONNABORTED', 'ENOTFOUND', 'UND_ERR_SOCKET']);
const RETRYABLE_NAMES = new Set(['SlowDown', 'Throttling', 'ThrottlingException', 'RequestTimeout', 'RequestTimeTooSkewed', 'TimeoutError', 'InternalError', 'ServiceUnavailable', 'RequestTimeoutException']);

/** True for failures worth another attempt: throttling, 5xx, timeouts, connection errors. */
export function isRetryable(e: unknown): boolean {
  const err = e as { name?: string; code?: string; $metadata?: { httpStatusCode?: number }; $retryable?: unknown; message?: string };
  const http = err?.$metadata?.httpStatusCode;
  if (http !== undefined && (http >= 500 || http === 429)) return true;
  if (err?.name && RETRYABLE_NAMES.has(err.name)) return true;
  if (err?.code && RETRYABLE_NET.has(err.code)) return true;
  if (err?.$retryable) return true;
  // Connection failures without an HTTP status (socket hang up, aborted body)
  if (http === undefined && typeof err?.message === 'string' && /socket hang up|ECONNRESET|ECONNREFUSED|EPIPE|timed? ?out|aborted|premature close/i.test(err.message)) return true;
  return false;
}

/**
 * A range that starts past the end of the object (416 InvalidRange): the
 * object is shorter than the caller expected. Ranged GETs answer it as an
 * empty body, so the pages it should have held are reported as missing
 * (by job, checkpoint, region and page) rather than as a bare S3 error.
 */
function pastEnd(e: unknown): boolean {
  const err = e as { name?: string; $metadata?: { httpStatusCode?: number } };
  return err?.name === 'InvalidRange' || err?.$metadata?.httpStatusCode === 416;
}

/** Counters of S3 requests (every attempt counts), for benchmarks and tests. */
export interface S3Counters {
  put: number;           // PutObject, CreateMultipartUpload, UploadPart, CompleteMultipartUpload
  get: number;           // GetObject (whole or range)
  list: number;
  del: number;
  head: number;
  retries: number;
  bytesUp: number;
  bytesDown: number;
}

/** One bucket/prefix: typed calls with retries and named errors. */
export class S3Io {
  readonly client: S3Client;
  readonly bucket: string;
  readonly prefix: string;
  readonly endpoint: string;
  readonly where: string;
  readonly counters: S3Counters = { put: 0, get: 0, list: 0, del: 0, head: 0, retries: 0, bytesUp: 0, bytesDown: 0 };
  private readonly maxAttempts: number;
  private readonly baseMs: number;
  private readonly maxMs: number;
  readonly conditional: boolean;
  private closed = false;

  constructor(readonly config: S3Config) {
    const loc = parseS3Url(config.url);
    this.bucket = loc.bucket;
    this.prefix = loc.prefix;
    this.endpoint = config.endpoint ?? 'AWS S3';
    if (config.endpoint !== undefined && !/^https?:\/\/[^\s/]+(\/.*)?$/.test(config.endpoint)) {
      throw new ExaError('INVALID_ARGUMENT', `invalid S3 endpoint ${JSON.stringify(config.endpoint)}: expected http(s)://host[:port]`);
    }
    if ((config.accessKeyId === undefined) !== (config.secretAccessKey === undefined)) {
      throw new ExaError('INVALID_ARGUMENT', 'S3 credentials need both an access key id and a secret access key');
    }
    this.where = `bucket ${this.bucket}${this.prefix ? ` (prefix ${this.prefix})` : ''} at ${this.endpoint}`;
    this.maxAttempts = Math.max(1, config.maxAttempts ?? 8);
    this.baseMs = config.retryBaseMs ?? 200;
    this.maxMs = config.retryMaxMs ?? 10_000;
    this.conditional = config.conditionalWrites ?? true;
    const agentOpts = { keepAlive: true, maxSockets: 64 };
    this.client = new S3Client({
      region: config.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1',
      ...(config.endpoint ? { endpoint: config.endpoint } : {}),
      forcePathStyle: config.forcePathStyle ?? config.endpoint !== undefined,
      ...(config.accessKeyId !== undefined
        ? { credentials: { accessKeyId: config.accessKeyId, secretAccessKey: config.secretAccessKey!, ...(config.sessionToken ? { sessionToken: config.sessionToken } : {}) } }
        : {}),
      maxAttempts: 1,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: {
        requestTimeout: config.requestTimeoutMs ?? 120_000,
        // Without this the SDK only logs a warning when a request stalls, and waits forever.
        throwOnRequestTimeout: true,
        connectionTimeout: config.connectTimeoutMs ?? 5_000,
        httpAgent: new HttpAgent(agentOpts),
        httpsAgent: new HttpsAgent(agentOpts),
      },
    });
  }

  /** The full key of a name under the prefix. */
  key(name: string): string {
    return this.prefix + name;
  }

  /**
   * Run one S3 call with retries. `what` names the operation and object for
   * error messages ("GET packs/ab/...").
   */
  async call<T>(what: string, fn: () => Promise<T>): Promise<T> {
    let attempt = 0;
    for (;;) {
      if (this.closed) throw new ExaError('UNAVAILABLE', `${this.where}: ${what}: the S3 backend is closed`);
      try {
        return await fn();
      } catch (e) {
        attempt++;
        if (!isRetryable(e) || attempt >= this.maxAttempts) throw this.named(e, what, attempt);
        this.counters.retries++;
        const cap = Math.min(this.maxMs, this.baseMs * 2 ** (attempt - 1));
        await new Promise((r) => setTimeout(r, cap / 2 + Math.random() * (cap / 2)));
      }
    }
  }

  /** Fold an S3 failure onto an ExaError whose message names bucket and endpoint and says what to check. */
  named(e: unknown, what: string, attempts = 1): ExaError {
    if (e instanceof ExaError) return e;
    const err = e as { name?: string; code?: string; message?: string; $metadata?: { httpStatusCode?: number } };
    const name = err?.name ?? '';
    const http = err?.$metadata?.httpStatusCode;
    const msg = err?.message && err.message !== 'UnknownError' ? err.message : `${name || 'error'}${http ? ` (HTTP ${http})` : ''}`;
    const base = toExaError(e);
    let text: string;
    if (name === 'NoSuchBucket' || (what.startsWith('HEAD bucket') && http === 404)) {
      return new ExaError('NOT_FOUND', `bucket ${this.bucket} does not exist at ${this.endpoint} (${what})`, { bucket: this.bucket, endpoint: this.endpoint }, { cause: e });
    } else if (name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch' || name === 'AccessDenied' || http === 403 || name === 'CredentialsProviderError') {
      text = `access to ${this.where} denied (${what}: ${msg}); check the access key, secret key and permissions`;
      return new ExaError('PERMISSION_DENIED', text, { bucket: this.bucket, endpoint: this.endpoint }, { cause: e });
    } else if (isRetryable(e)) {
      text = `cannot reach ${this.where}: ${what} failed after ${attempts} attempt${attempts === 1 ? '' : 's'}: ${msg || err?.code}`;
      return new ExaError('UNAVAILABLE', text, { bucket: this.bucket, endpoint: this.endpoint }, { cause: e });
    }
    text = `${this.where}: ${what}: ${msg}`;
    return new ExaError(base.code, text, { bucket: this.bucket, endpoint: this.endpoint }, { cause: e });
  }

  /** HEAD the bucket: NOT_FOUND / PERMISSION_DENIED / UNAVAILABLE with names. */
  async checkBucket(): Promise<void> {
    await this.call(`HEAD bucket ${this.bucket}`, async () => {
      this.counters.head++;
      await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
    });
  }

  /**
   * Create an object. With conditional writes, If-None-Match: * makes the
   * server refuse to overwrite (412 -> CONFLICT); names are chosen unique
   * anyway, so servers that ignore the header are safe too.
   */
  async putNew(name: string, body: Buffer): Promise<void> {
    const Key = this.key(name);
    await this.call(`PUT ${name}`, async () => {
      this.counters.put++;
      this.counters.bytesUp += body.length;
      await this.client.send(new PutObjectCommand({
        Bucket: this.bucket, Key, Body: body, ContentLength: body.length, ContentType: 'application/octet-stream',
        ...(this.conditional ? { IfNoneMatch: '*' } : {}),
      }));
    }).catch((e: unknown) => {
      const x = e as ExaError;
      if (x.code === 'CONFLICT') throw new ExaError('CONFLICT', `${this.where}: object ${name} already exists (the server refused to overwrite it)`, { key: name }, { cause: e });
      throw e;
    });
  }

  /**
   * Multipart upload for large objects (parts of partBytes). Parts go up in
   * parallel, each retried on its own. The completion is the create point;
   * on failure the upload is aborted (best effort: some servers refuse).
   */
  async putMultipart(name: string, body: Buffer, partBytes: number, parallel = 4): Promise<void> {
    const Key = this.key(name);
    const create = await this.call(`CREATE MULTIPART ${name}`, async () => {
      this.counters.put++;
      return this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key, ContentType: 'application/octet-stream' }));
    });
    const UploadId = create.UploadId;
    if (!UploadId) throw new ExaError('INTERNAL', `${this.where}: CREATE MULTIPART ${name}: no upload id in the answer`);
    try {
      const count = Math.ceil(body.length / partBytes);
      const etags: string[] = new Array(count);
      let next = 0;
      const worker = async (): Promise<void> => {
        while (next < count) {
          const i = next++;
          const part = body.subarray(i * partBytes, Math.min(body.length, (i + 1) * partBytes));
          const r = await this.call(`PUT ${name} part ${i + 1}/${count}`, async () => {
            this.counters.put++;
            this.counters.bytesUp += part.length;
            return this.client.send(new UploadPartCommand({ Bucket: this.bucket, Key, UploadId, PartNumber: i + 1, Body: part, ContentLength: part.length }));
          });
          etags[i] = r.ETag ?? '';
        }
      };
      await Promise.all(Array.from({ length: Math.min(parallel, count) }, worker));
      await this.call(`COMPLETE MULTIPART ${name}`, async () => {
        this.counters.put++;
        await this.client.send(new CompleteMultipartUploadCommand({
          Bucket: this.bucket, Key, UploadId,
          MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
          ...(this.conditional ? { IfNoneMatch: '*' } : {}),
        }));
      });
    } catch (e) {
      // Best effort: s3rver rejects aborts, and a lifecycle rule cleans up elsewhere.
      await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key, UploadId })).catch(() => undefined);
      throw e;
    }
  }

  /**
   * GET a whole object, or the bytes [start, end] (inclusive; never a suffix
   * range; short or empty when the object ends before end or start). null
   * when it does not exist.
   */
  async get(name: string, range?: { start: number; end: number }): Promise<Buffer | null> {
    const Key = this.key(name);
    const what = range ? `GET ${name} bytes ${range.start}-${range.end}` : `GET ${name}`;
    try {
      return await this.call(what, async () => {
        this.counters.get++;
        const r = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key, ...(range ? { Range: `bytes=${range.start}-${range.end}` } : {}) }))
          .catch((e: unknown) => { if (range && pastEnd(e)) return null; throw e; });
        if (!r?.Body) return Buffer.alloc(0);
        const bytes = await r.Body.transformToByteArray();
        this.counters.bytesDown += bytes.byteLength;
        return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      });
    } catch (e) {
      if ((e as ExaError).code === 'NOT_FOUND' && !/does not exist at/.test((e as Error).message)) return null;
      throw e;
    }
  }

  /**
   * GET the bytes [start, end] (inclusive) of an object straight into
   * `into` (at least end - start + 1 bytes), chunk by chunk as they come off
   * the socket: no per-body concatenation, no new buffer per GET, so a
   * caller that reuses its buffers leaves the GC nothing to collect. Resolves
   * with the view of `into` that was filled (shorter when the object ends
   * before `end`, empty when it ends before `start`), or null when the
   * object does not exist. A body cut short
   * or longer than announced is retried like a broken connection.
   */
  async getInto(name: string, range: { start: number; end: number }, into: Buffer, hooks: GetHooks = {}): Promise<Buffer | null> {
    const Key = this.key(name);
    const want = range.end - range.start + 1;
    if (!(want > 0) || into.length < want) throw new ExaError('INVALID_ARGUMENT', `GET ${name}: a buffer of ${into.length} bytes cannot hold bytes ${range.start}-${range.end}`);
    const what = `GET ${name} bytes ${range.start}-${range.end}`;
    let attempts = 0;
    try {
      return await this.call(what, async () => {
        if (attempts++ > 0) await hooks.beforeRetry?.();
        this.counters.get++;
        const r = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key, Range: `bytes=${range.start}-${range.end}` }))
          .catch((e: unknown) => { if (pastEnd(e)) return null; throw e; });
        if (!r) return into.subarray(0, 0);
        const body = r.Body as (NodeJS.ReadableStream & { destroy?(): void; transformToByteArray?(): Promise<Uint8Array> }) | undefined;
        if (!body) return into.subarray(0, 0);
        const len = r.ContentLength ?? want;
        if (len > want) {
          body.destroy?.();
          throw new ExaError('INTERNAL', `${this.where}: ${what}: the server sent ${len} bytes for a range of ${want}`);
        }
        let got = 0;
        if (typeof body.on !== 'function') {
          // Not a Node stream (another request handler): collect it the SDK's way.
          const bytes = await body.transformToByteArray!();
          if (bytes.byteLength > want) throw new ExaError('INTERNAL', `${this.where}: ${what}: the server sent ${bytes.byteLength} bytes for a range of ${want}`);
          into.set(bytes, 0);
          got = bytes.byteLength;
        } else {
          await new Promise<void>((resolve, reject) => {
            let failed = false;
            const fail = (e: unknown): void => { if (!failed) { failed = true; reject(e); } };
            body.on('data', (c: Buffer) => {
              if (failed) return;
              if (got + c.length > len) {
                body.destroy?.();
                // Retried: a confused connection, not a property of the object.
                fail(Object.assign(new Error(`${what}: body longer than its ${len}-byte Content-Length`), { code: 'ECONNRESET' }));
                return;
              }
              c.copy(into, got);
              got += c.length;
              hooks.onData?.(got);
            });
            body.once('end', () => resolve());
            body.once('error', fail);
            body.once('close', () => { if (got < len) fail(Object.assign(new Error(`${what}: premature close after ${got} of ${len} bytes`), { code: 'ECONNRESET' })); else resolve(); });
          });
          if (got < len) throw Object.assign(new Error(`${what}: premature close after ${got} of ${len} bytes`), { code: 'ECONNRESET' });
        }
        this.counters.bytesDown += got;
        return into.subarray(0, got);
      });
    } catch (e) {
      if ((e as ExaError).code === 'NOT_FOUND' && !/does not exist at/.test((e as Error).message)) return null;
      throw e;
    }
  }

  /** Every object under prefix+sub, in key order. */
  async list(sub: string): Promise<ObjectInfo[]> {
    const out: ObjectInfo[] = [];
    let token: string | undefined;
    do {
      const r = await this.call(`LIST ${sub}`, async () => {
        this.counters.list++;
        return this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.key(sub), ...(token ? { ContinuationToken: token } : {}) }));
      });
      for (const o of r.Contents ?? []) {
        if (!o.Key) continue;
        out.push({ key: o.Key.slice(this.prefix.length), size: o.Size ?? 0, lastModified: o.LastModified ? o.LastModified.getTime() : 0 });
      }
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
    return out;
  }

  /** Delete an object (missing is fine). */
  async del(name: string): Promise<void> {
    await this.call(`DELETE ${name}`, async () => {
      this.counters.del++;
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: this.key(name) }));
    });
  }

  close(): void {
    this.closed = true;
    this.client.destroy();
  }
}
