/**
 * Operational metrics in the Prometheus text format (prom-client), served
 * on `--metrics-listen HOST:PORT` by `exastore serve` and `exaagent`:
 *
 *  - every gRPC call a server of this process handles (grpc-js server
 *    interceptor, installed by src/grpc.ts createServer): the conventional
 *    go-grpc-prometheus names `grpc_server_started_total`,
 *    `grpc_server_handled_total{grpc_code}`, `grpc_server_handling_seconds`;
 *  - checkpoints an agent took and uploaded: count by kind and result, pause
 *    and end-to-end time, pages; jobs by state;
 *  - what a store holds: pages and page bytes;
 *  - what the coordinator sees: hosts up and down, jobs by state;
 *  - the Node process itself (prom-client's default metrics).
 *
 * One registry per process. Servers and agents register a source here while
 * they run (tests run several in one process); gauges sum over the sources.
 */
import { createServer as createHttpServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import client from 'prom-client';
import { ServerInterceptingCall, type Responder, type ServerInterceptor } from '@grpc/grpc-js';
import { ExaError } from './errors.js';

export const registry = new client.Registry();
client.collectDefaultMetrics({ register: registry });

// ---- gRPC server calls -------------------------------------------------------

const rpcLabels = ['grpc_service', 'grpc_method', 'grpc_type'] as const;
const rpcStarted = new client.Counter({
  name: 'grpc_server_started_total', help: 'RPCs started on the server.', labelNames: rpcLabels, registers: [registry],
});
const rpcHandled = new client.Counter({
  name: 'grpc_server_handled_total', help: 'RPCs completed on the server, by status code.',
  labelNames: [...rpcLabels, 'grpc_code'], registers: [registry],
});
const rpcSeconds = new client.Histogram({
  name: 'grpc_server_handling_seconds', help: 'Time from the start of an RPC to its status, in seconds.',
  labelNames: rpcLabels, registers: [registry],
  buckets: [0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10, 60, 300],
});

/** grpc-js status numbers to their names (the grpc_code label). */
const CODE_NAMES = ['OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', 'NOT_FOUND', 'ALREADY_EXISTS',
  'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION', 'ABORTED', 'OUT_OF_RANGE', 'UNIMPLEMENTED', 'INTERNAL',
  'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED'];

interface MethodInfo { path: string; requestStream: boolean; responseStream: boolean }

/** '/exa.v1.Store/PutCheckpoint' -> labels. */
function labelsOf(m: MethodInfo): Record<(typeof rpcLabels)[number], string> {
  const slash = m.path.lastIndexOf('/');
  const type = m.requestStream ? (m.responseStream ? 'bidi_stream' : 'client_stream') : (m.responseStream ? 'server_stream' : 'unary');
  return { grpc_service: m.path.slice(1, slash), grpc_method: m.path.slice(slash + 1), grpc_type: type };
}

/**
 * A grpc-js server interceptor counting and timing every call. It only sees
 * the call's start and its final status (messages pass straight through).
 */
export function rpcMetricsInterceptor(): ServerInterceptor {
  return (method, call) => {
    const labels = labelsOf(method as unknown as MethodInfo);
    rpcStarted.inc(labels);
    const stop = rpcSeconds.startTimer(labels);
    let done = false;
    return new ServerInterceptingCall(call, {
      sendStatus: ((status, next) => {
        if (!done) {
          done = true;
          stop();
          rpcHandled.inc({ ...labels, grpc_code: CODE_NAMES[status.code ?? 2] ?? String(status.code) });
        }
        next(status);
      }) satisfies Responder['sendStatus'],
    });
  };
}

// ---- agents: checkpoints and jobs --------------------------------------------

const ckptTotal = new client.Counter({
  name: 'exa_agent_checkpoints_total', help: 'Checkpoints this agent took, by kind (full, incremental) and result (committed, failed).',
  labelNames: ['kind', 'result'], registers: [registry],
});
const ckptPause = new client.Histogram({
  name: 'exa_agent_checkpoint_pause_seconds', help: 'Time a job was stopped for a committed checkpoint, in seconds.',
  registers: [registry], buckets: [0.0005, 0.001, 0.005, 0.02, 0.1, 0.5, 2, 10],
});
const ckptSeconds = new client.Histogram({
  name: 'exa_agent_checkpoint_seconds', help: 'Time from the start of a checkpoint to the store committing it, in seconds.',
  registers: [registry], buckets: [0.01, 0.05, 0.25, 1, 5, 30, 120, 600],
});
const ckptPages = new client.Counter({
  name: 'exa_agent_checkpoint_pages_total', help: 'Pages of committed checkpoints, by what happened to them (saved = sent to the store, zero = zero pages).',
  labelNames: ['what'], registers: [registry],
});

/** What an agent reports about one checkpoint (src/hostagent/daemon.ts). */
export interface CheckpointOutcome {
  full: boolean;
  ok: boolean;
  pauseMs?: number;
  totalMs?: number;
  pagesSaved?: number;
  zeroPages?: number;
}

export function recordCheckpoint(c: CheckpointOutcome): void {
  ckptTotal.inc({ kind: c.full ? 'full' : 'incremental', result: c.ok ? 'committed' : 'failed' });
  if (!c.ok) return;
  if (c.pauseMs !== undefined) ckptPause.observe(c.pauseMs / 1000);
  if (c.totalMs !== undefined) ckptSeconds.observe(c.totalMs / 1000);
  if (c.pagesSaved) ckptPages.inc({ what: 'saved' }, c.pagesSaved);
  if (c.zeroPages) ckptPages.inc({ what: 'zero' }, c.zeroPages);
}

/** A running agent: its jobs by state (RUNNING, STOPPED, EXITED, ...), and how many have no recent checkpoint. */
export interface AgentSource { jobStates(): { state: string; gap: boolean }[] }
const agents = new Set<AgentSource>();

new client.Gauge({
  name: 'exa_agent_jobs', help: 'Jobs known to the agents of this process, by state.', labelNames: ['state'], registers: [registry],
  collect() {
    this.reset();
    for (const a of agents) for (const j of a.jobStates()) this.inc({ state: j.state.toLowerCase() });
  },
});
new client.Gauge({
  name: 'exa_agent_jobs_without_recent_checkpoint', help: 'Jobs whose last checkpoint attempt failed (no checkpoint committed since).', registers: [registry],
  collect() {
    let n = 0;
    for (const a of agents) for (const j of a.jobStates()) if (j.gap) n++;
    this.set(n);
  },
});

// ---- stores --------------------------------------------------------------------

/** A running store: pages and page bytes held by its backend. */
export interface StoreSource { pageStats(): { pages: number; bytes: number } }
const stores = new Set<StoreSource>();

new client.Gauge({
  name: 'exa_store_pages', help: 'Distinct non-zero pages held by the stores of this process.', registers: [registry],
  collect() { let n = 0; for (const s of stores) n += s.pageStats().pages; this.set(n); },
});
new client.Gauge({
  name: 'exa_store_page_bytes', help: 'Bytes of page data held by the stores of this process.', registers: [registry],
  collect() { let n = 0; for (const s of stores) n += s.pageStats().bytes; this.set(n); },
});

// ---- the coordinator --------------------------------------------------------------

/** A running coordinator: the state of every host (UP, DOWN) and of every job placement (RUNNING, MIGRATING, ...). */
export interface CoordinatorSource { hostStates(): string[]; jobStates(): string[] }
const coordinators = new Set<CoordinatorSource>();

new client.Gauge({
  name: 'exa_coordinator_hosts', help: 'Hosts registered with the coordinator, by state (up, down).', labelNames: ['state'], registers: [registry],
  collect() {
    this.reset();
    for (const c of coordinators) for (const st of c.hostStates()) this.inc({ state: st.toLowerCase() });
  },
});
new client.Gauge({
  name: 'exa_coordinator_jobs', help: 'Jobs the coordinator places, by state.', labelNames: ['state'], registers: [registry],
  collect() {
    this.reset();
    for (const c of coordinators) for (const st of c.jobStates()) this.inc({ state: st.toLowerCase() });
  },
});

/** Count a source in the gauges while it runs; call the returned function when it stops. */
export function registerAgent(a: AgentSource): () => void { agents.add(a); return () => { agents.delete(a); }; }
export function registerStore(s: StoreSource): () => void { stores.add(s); return () => { stores.delete(s); }; }
export function registerCoordinator(c: CoordinatorSource): () => void { coordinators.add(c); return () => { coordinators.delete(c); }; }

// ---- the HTTP endpoint ---------------------------------------------------------

export interface MetricsServer {
  /** host:port it listens on. */
  address: string;
  close(): Promise<void>;
}

/** Parse `HOST:PORT` (IPv6 in brackets); INVALID_ARGUMENT naming the flag otherwise. */
export function parseListen(flag: string, v: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s[\]]+)):(\d{1,5})$/.exec(v);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new ExaError('INVALID_ARGUMENT', `${flag} must be HOST:PORT (port 0-65535, IPv6 in brackets), got ${JSON.stringify(v)}`);
  return { host: (m[1] ?? m[2])!, port };
}

/**
 * The metrics endpoint of a service that has just started: none when
 * `listen` is unset; when it cannot be served, the service is closed
 * (`closeService`) before the error is thrown, so nothing is left half up.
 */
export async function startServiceMetrics(listen: string | undefined, closeService: () => Promise<unknown>): Promise<MetricsServer | null> {
  if (!listen) return null;
  try {
    return await startMetricsServer(listen);
  } catch (e) {
    await closeService();
    throw e;
  }
}

/**
 * Serve GET /metrics (Prometheus text format) and GET /healthz on HOST:PORT.
 * Anything else is 404 (405 for other methods); a failing collector is a 500
 * with its message, and the process keeps serving.
 */
export async function startMetricsServer(listen: string): Promise<MetricsServer> {
  const { host, port } = parseListen('--metrics-listen', listen);
  const server: Server = createHttpServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end(`method ${req.method} not allowed; use GET\n`);
      return;
    }
    if (path === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
      return;
    }
    if (path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end(`no such path ${path}; metrics are at /metrics\n`);
      return;
    }
    registry.metrics().then(
      (text) => { res.writeHead(200, { 'content-type': registry.contentType }).end(text); },
      (e: unknown) => { res.writeHead(500, { 'content-type': 'text/plain' }).end(`collecting metrics failed: ${(e as Error).message}\n`); },
    );
  });
  server.keepAliveTimeout = 5000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new ExaError('UNAVAILABLE', `cannot serve metrics on ${listen}: ${e.message}`, {}, { cause: e })));
    server.listen(port, host, () => resolve());
  });
  const a = server.address() as AddressInfo;
  const address = a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
  return {
    address,
    close: () => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  };
}
