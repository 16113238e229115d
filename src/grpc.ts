/**
 * Shared gRPC plumbing for every exa.v1 service (Store now; Agent and
 * Coordinator reuse it): loading the protos with proto-loader, creating
 * servers and clients with the project's message limits, bearer-token
 * checks, and mapping errors through src/errors.ts (status code plus the
 * `exa-code` metadata, so CORRUPT and CONFLICT survive the round trip).
 *
 * Handlers are written as async functions that throw ExaError; the wrappers
 * here turn a throw into the right status and never let one escape into
 * grpc-js (which would crash the process).
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { EXA_CODE_METADATA_KEY, ExaError, fromGrpcError, toGrpcStatus } from './errors.js';

/** The proto/ folder (this file runs from src/ under vitest or from dist/src/). */
export const PROTO_DIR: string = (() => {
  let d = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    if (existsSync(join(d, 'proto', 'exa_common.proto'))) return join(d, 'proto');
    d = dirname(d);
  }
  throw new Error('cannot find the proto/ directory');
})();

/** Largest gRPC message either side accepts (a 8192-page data batch is 32 MiB). */
export const MAX_MESSAGE_BYTES = 48 * 1024 * 1024;

/** proto-loader options; they match the flags scripts/gen-proto.mjs gives the type generator. */
export const PROTO_LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTO_DIR],
};

const loaded = new Map<string, unknown>();

/**
 * Load one proto file of exa.v1 and return the grpc package object, typed by
 * the generated ProtoGrpcType of that file, e.g.
 * `loadProto<StoreProto>('exa_store.proto').exa.v1.Store`.
 */
export function loadProto<T>(file: string): T {
  let pkg = loaded.get(file);
  if (!pkg) {
    const def = protoLoader.loadSync(join(PROTO_DIR, file), PROTO_LOADER_OPTIONS);
    pkg = grpc.loadPackageDefinition(def);
    loaded.set(file, pkg);
  }
  return pkg as T;
}

const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  // Large windows keep a single stream near loopback speed.
  'grpc-node.max_session_memory': 256,
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 20_000,
  'grpc.keepalive_permit_without_calls': 1,
};

export interface ServerAuth {
  /** When set, every call must carry `authorization: Bearer <token>`. */
  token?: string | undefined;
}

export function createServer(): grpc.Server {
  return new grpc.Server({ ...CHANNEL_OPTIONS, 'grpc.max_concurrent_streams': 256 });
}

/** Bind (insecure loopback/cluster transport) and resolve with the bound port (port 0 = ephemeral). */
export function bindServer(server: grpc.Server, host: string, port: number, creds = grpc.ServerCredentials.createInsecure()): Promise<number> {
  const addr = host.includes(':') && !host.startsWith('[') ? `[${host}]:${port}` : `${host}:${port}`;
  return new Promise((resolve, reject) => {
    server.bindAsync(addr, creds, (err, bound) => {
      if (err) reject(new ExaError('UNAVAILABLE', `cannot listen on ${addr}: ${err.message}`, {}, { cause: err }));
      else resolve(bound);
    });
  });
}

/** A grpc-js status object for an error: code, details and the exa-code metadata. */
export function grpcStatusFor(e: unknown): Partial<grpc.StatusObject> & { code: grpc.status; details: string } {
  const s = toGrpcStatus(e);
  const metadata = new grpc.Metadata();
  metadata.set(EXA_CODE_METADATA_KEY, s.exaCode);
  // Status details travel in an HTTP/2 header: keep them short and single-line.
  const details = s.details.replace(/[\r\n]+/g, ' ').slice(0, 2000);
  return { code: s.code as grpc.status, details, metadata };
}

function checkAuth(md: grpc.Metadata, auth: ServerAuth): void {
  if (!auth.token) return;
  const got = md.get('authorization')[0];
  if (got !== `Bearer ${auth.token}`) throw new ExaError('PERMISSION_DENIED', 'missing or wrong bearer token');
}

/** Wrap an async unary handler. */
export function unary<Req, Res>(auth: ServerAuth, fn: (req: Req, call: grpc.ServerUnaryCall<Req, Res>) => Promise<Res>): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    (async () => {
      checkAuth(call.metadata, auth);
      return fn(call.request, call);
    })().then((res) => callback(null, res), (e: unknown) => callback(grpcStatusFor(e) as grpc.ServiceError));
  };
}

/** Await the transport taking a message (write callback) and honour 'drain'. */
export function writeMessage<T>(stream: { write(msg: T, cb: (err?: Error | null) => void): boolean }, msg: T): Promise<void> {
  return new Promise((resolve, reject) => {
    stream.write(msg, (err) => (err ? reject(err) : resolve()));
  });
}

/**
 * Wrap an async server-streaming handler: `emit` awaits the transport
 * (backpressure); a throw ends the call with the mapped status.
 */
export function serverStream<Req, Res>(
  auth: ServerAuth,
  fn: (req: Req, emit: (msg: Res) => Promise<void>, call: grpc.ServerWritableStream<Req, Res>) => Promise<void>,
): grpc.handleServerStreamingCall<Req, Res> {
  return (call) => {
    let cancelled = false;
    call.on('cancelled', () => { cancelled = true; });
    const emit = async (msg: Res): Promise<void> => {
      if (cancelled) throw new ExaError('CANCELLED', 'the client cancelled the call');
      await writeMessage(call, msg);
    };
    (async () => {
      checkAuth(call.metadata, auth);
      await fn(call.request, emit, call);
    })().then(() => { if (!cancelled) call.end(); }, (e: unknown) => {
      if (!cancelled) call.emit('error', grpcStatusFor(e));
    });
  };
}

/**
 * Wrap an async bidirectional handler. `fn` consumes `call` (an async
 * iterable of requests: one is pulled at a time, so a slow handler slows the
 * sender through HTTP/2 flow control) and writes responses with `emit`.
 * `onEnd` runs once whatever happens (cleanup of half-done work).
 */
export function bidiStream<Req, Res>(
  auth: ServerAuth,
  fn: (call: grpc.ServerDuplexStream<Req, Res>, emit: (msg: Res) => Promise<void>, isCancelled: () => boolean) => Promise<void>,
  onEnd?: (call: grpc.ServerDuplexStream<Req, Res>, error: unknown) => void,
): grpc.handleBidiStreamingCall<Req, Res> {
  return (call) => {
    let cancelled = false;
    let ended = false;
    const finish = (err: unknown): void => {
      if (ended) return;
      ended = true;
      onEnd?.(call, err);
    };
    call.on('cancelled', () => { cancelled = true; finish(new ExaError('CANCELLED', 'the client cancelled the call')); });
    // A stream error from the transport (e.g. an oversized message) must not become an unhandled 'error'.
    call.on('error', () => undefined);
    const emit = async (msg: Res): Promise<void> => {
      if (cancelled) throw new ExaError('CANCELLED', 'the client cancelled the call');
      await writeMessage(call, msg);
    };
    (async () => {
      checkAuth(call.metadata, auth);
      await fn(call, emit, () => cancelled);
    })().then(() => { finish(null); if (!cancelled) call.end(); }, (e: unknown) => {
      finish(e);
      if (!cancelled) call.emit('error', grpcStatusFor(e));
    });
  };
}

export interface ClientOptions {
  /** Bearer token sent with every call. */
  token?: string | undefined;
}

/** Create a client of a generated service constructor with the project's channel options. */
export function createClient<C extends grpc.Client>(Ctor: new (address: string, creds: grpc.ChannelCredentials, options?: grpc.ClientOptions) => C, address: string): C {
  return new Ctor(address, grpc.credentials.createInsecure(), { ...CHANNEL_OPTIONS });
}

/** Metadata carrying the bearer token, if any. */
export function callMetadata(opts: ClientOptions): grpc.Metadata {
  const md = new grpc.Metadata();
  if (opts.token) md.set('authorization', `Bearer ${opts.token}`);
  return md;
}

/** Resolve once the channel is connected; UNAVAILABLE naming the address after timeoutMs. */
export function waitForReady(client: grpc.Client, address: string, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    client.waitForReady(Date.now() + timeoutMs, (err) => {
      if (err) reject(new ExaError('UNAVAILABLE', `cannot reach ${address} within ${timeoutMs} ms: ${err.message}`, { address }, { cause: err }));
      else resolve();
    });
  });
}

/** Promisify a unary call; failures become ExaError (fromGrpcError) with `what` as context. */
export function callUnary<Res>(what: string, start: (cb: (err: grpc.ServiceError | null, res?: Res) => void) => unknown): Promise<Res> {
  const stack = new Error().stack;
  return new Promise((resolve, reject) => {
    start((err, res) => {
      if (err) {
        const e = fromGrpcError(err, what);
        // Keep the caller's stack (grpc-js errors carry the transport's).
        if (stack) e.stack = `${e.name}: ${e.message}\n${stack.split('\n').slice(2).join('\n')}`;
        reject(e);
      } else resolve(res as Res);
    });
  });
}

export { grpc };
