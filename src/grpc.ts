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
import { existsSync, readFileSync } from 'node:fs';
import type { Http2Session } from 'node:http2';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { EXA_CODE_METADATA_KEY, ExaError, fromGrpcError, toGrpcStatus } from './errors.js';
import type { TenantTable } from './tenants.js';
import { rpcLogInterceptor } from './log.js';
import { rpcMetricsInterceptor } from './metrics.js';

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
  // The client's receive window (restores stream multi-MiB messages).
  'grpc-node.flow_control_window': 32 * 1024 * 1024,
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 20_000,
  'grpc.keepalive_permit_without_calls': 1,
};

/** Metadata of calls that src/tenants.ts tenantScopeInterceptor has scoped to a tenant's jobs. */
export const TENANT_SCOPED = new WeakSet<grpc.Metadata>();

export interface ServerAuth {
  /** When set, every call must carry `authorization: Bearer <token>`. */
  token?: string | undefined;
  /** Tenants whose tokens are accepted too, each scoped to its jobs by tenantScopeInterceptor (src/tenants.ts). */
  tenants?: TenantTable | undefined;
}

/** HTTP/2 flow-control window (per stream and per connection) for large page messages. */
export const FLOW_CONTROL_WINDOW = 32 * 1024 * 1024;

/**
 * grpc-js's server exposes no flow-control window option and leaves Node's
 * default of 64 KiB, which caps a stream of multi-MiB messages far below
 * loopback speed (a window update per 64 KiB). The per-stream window goes
 * in through the server's HTTP/2 settings; the connection window is raised
 * on each new session. Both through grpc-js internals that have been stable
 * across 1.x; if they move, the server still works, only slower.
 */
function raiseServerWindows(server: grpc.Server): void {
  const s = server as unknown as { commonServerOptions?: { settings?: Record<string, unknown> } };
  if (s.commonServerOptions) {
    s.commonServerOptions.settings = { ...(s.commonServerOptions.settings ?? {}), initialWindowSize: FLOW_CONTROL_WINDOW };
  }
}

/** Called for every HTTP/2 session a server accepts (see installSessionHook). */
function onServerSession(session: Http2Session): void {
  try {
    session.setLocalWindowSize(FLOW_CONTROL_WINDOW);
  } catch {
    // An old Node without setLocalWindowSize: keep the default window.
  }
}

/** Largest HTTP/2 DATA frame we accept: 1 MiB rather than 16 KiB cuts per-frame work 64-fold for page data. */
export const MAX_FRAME_BYTES = 1024 * 1024;

let hooked = false;
/**
 * Raise the connection window of every HTTP/2 server session created in this
 * process, and the frame size both ends accept (grpc-js has no option for
 * either; it creates its sessions through http2.createServer/http2.connect,
 * whose options are extended here).
 */
function installSessionHook(): void {
  if (hooked || process.env.EXA_GRPC_NO_TUNING) return;
  hooked = true;
  const req = createRequire(import.meta.url);
  const http2 = req('node:http2') as {
    createServer: (...a: unknown[]) => { on(ev: string, fn: (s: Http2Session) => void): unknown };
    connect: (authority: unknown, options?: { settings?: Record<string, unknown> }, ...rest: unknown[]) => unknown;
  };
  const origServer = http2.createServer;
  http2.createServer = (...a: unknown[]) => {
    const o = a[0] as { settings?: Record<string, unknown> } | undefined;
    if (o && typeof o === 'object') o.settings = { ...(o.settings ?? {}), maxFrameSize: MAX_FRAME_BYTES };
    const srv = origServer(...a);
    srv.on('session', onServerSession);
    return srv;
  };
  const origConnect = http2.connect;
  http2.connect = (authority, options, ...rest) => {
    const o = options && typeof options === 'object' ? { ...options, settings: { ...(options.settings ?? {}), maxFrameSize: MAX_FRAME_BYTES } } : options;
    return origConnect(authority, o, ...rest);
  };
}

/** A gRPC server; `interceptors` run after the metrics and logging ones (e.g. src/tenants.ts tenantScopeInterceptor). */
export function createServer(interceptors: grpc.ServerInterceptor[] = []): grpc.Server {
  installSessionHook();
  // Every call is counted and timed for /metrics (src/metrics.ts); failures are logged (src/log.ts).
  const server = new grpc.Server({ ...CHANNEL_OPTIONS, 'grpc.max_concurrent_streams': 256, interceptors: [rpcMetricsInterceptor(), rpcLogInterceptor(), ...interceptors] });
  raiseServerWindows(server);
  return server;
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
  if (got === `Bearer ${auth.token}`) return;
  // A tenant's token, on a call the server's tenantScopeInterceptor has scoped to the tenant's jobs (a server
  // without the interceptor refuses tenants' tokens rather than letting them reach every job).
  if (auth.tenants && TENANT_SCOPED.has(md) && typeof got === 'string' && got.startsWith('Bearer ') && auth.tenants.byToken(got.slice(7))) return;
  throw new ExaError('PERMISSION_DENIED', 'missing or wrong bearer token');
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
 * sender through HTTP/2 flow control) and writes responses with `emit`;
 * `fail` ends the call with an error at once (for work running beside the
 * request loop, which may be waiting for a message that will never come).
 */
export function bidiStream<Req, Res>(
  auth: ServerAuth,
  fn: (call: grpc.ServerDuplexStream<Req, Res>, emit: (msg: Res) => Promise<void>, fail: (e: unknown) => void) => Promise<void>,
): grpc.handleBidiStreamingCall<Req, Res> {
  return (call) => {
    let cancelled = false;
    let statusSent = false;
    call.on('cancelled', () => { cancelled = true; });
    // A stream error from the transport (e.g. an oversized message) must not become an unhandled 'error'.
    call.on('error', () => undefined);
    const emit = async (msg: Res): Promise<void> => {
      if (cancelled || statusSent) throw new ExaError('CANCELLED', 'the call is over');
      await writeMessage(call, msg);
    };
    // End the call with an error now (from work running beside the request loop).
    const fail = (e: unknown): void => {
      if (statusSent || cancelled) return;
      statusSent = true;
      call.emit('error', grpcStatusFor(e));
    };
    (async () => {
      checkAuth(call.metadata, auth);
      await fn(call, emit, fail);
    })().then(() => {
      if (!cancelled && !statusSent) { statusSent = true; call.end(); }
    }, (e: unknown) => fail(e));
  };
}

/**
 * Pull messages from a server call's request stream one at a time (null at
 * its end, or when the client cancels). Unlike `for await`, leaving early
 * does not destroy the stream, so the handler can still send its status;
 * not reading leaves messages unread, which slows the sender through HTTP/2
 * flow control.
 */
export function messageReader<T>(call: NodeJS.ReadableStream & { on(ev: 'cancelled', fn: () => void): unknown }): () => Promise<T | null> {
  let ended = false;
  let wake: (() => void) | null = null;
  const poke = (): void => { const w = wake; wake = null; w?.(); };
  call.on('readable', poke);
  call.on('end', () => { ended = true; poke(); });
  call.on('close', () => { ended = true; poke(); });
  call.on('cancelled', () => { ended = true; poke(); });
  return async () => {
    for (;;) {
      const v = call.read() as T | null;
      if (v !== null) return v;
      if (ended) return null;
      await new Promise<void>((r) => { wake = r; });
    }
  };
}

export interface ClientOptions {
  /** Bearer token sent with every call. */
  token?: string | undefined;
  /** TLS: connect with TLS, trusting this CA bundle (PEM file path); undefined = plaintext. */
  tlsCa?: string | undefined;
}

/** Server-side TLS: PEM files of the certificate chain and its key (and a client CA to require client certificates). */
export interface ServerTls {
  cert: string;
  key: string;
  clientCa?: string | undefined;
}

/** Credentials for bindServer(): TLS from PEM files, or plaintext. INVALID_ARGUMENT naming an unreadable file. */
export function serverCredentials(tls?: ServerTls): grpc.ServerCredentials {
  if (!tls) return grpc.ServerCredentials.createInsecure();
  const read = (what: string, f: string): Buffer => {
    try {
      return readFileSync(f);
    } catch (e) {
      throw new ExaError('INVALID_ARGUMENT', `cannot read TLS ${what} ${f}: ${(e as Error).message}`, {}, { cause: e });
    }
  };
  return grpc.ServerCredentials.createSsl(tls.clientCa ? read('client CA', tls.clientCa) : null,
    [{ cert_chain: read('certificate', tls.cert), private_key: read('key', tls.key) }], !!tls.clientCa);
}

function channelCredentials(opts: ClientOptions): grpc.ChannelCredentials {
  if (!opts.tlsCa) return grpc.credentials.createInsecure();
  let ca: Buffer;
  try {
    ca = readFileSync(opts.tlsCa);
  } catch (e) {
    throw new ExaError('INVALID_ARGUMENT', `cannot read TLS CA ${opts.tlsCa}: ${(e as Error).message}`, {}, { cause: e });
  }
  return grpc.credentials.createSsl(ca);
}

/** Create a client of a generated service constructor with the project's channel options (TLS when opts.tlsCa is set). */
export function createClient<C extends grpc.Client>(Ctor: new (address: string, creds: grpc.ChannelCredentials, options?: grpc.ClientOptions) => C, address: string, opts: ClientOptions = {}): C {
  installSessionHook();
  return new Ctor(address, channelCredentials(opts), { ...CHANNEL_OPTIONS });
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
