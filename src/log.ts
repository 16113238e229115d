/**
 * Logging for the long-running services (`exastore serve`, `exaagent`):
 * pino, to stderr, synchronously (a line is written before the process can
 * die on the next statement).
 *
 *  - `--log-format text` (the default): one human line per event,
 *    `[time] LEVEL: (component) message {fields}`, via pino-pretty;
 *  - `--log-format json`: one JSON object per line (time, level, component,
 *    msg and the event's fields), for journald/Loki/Elastic pipelines;
 *  - `--log-level`: trace, debug, info (default), warn, error, fatal, silent.
 *
 * Failed gRPC calls of every server in the process are logged once a
 * service called logRpcFailuresTo(): server faults (INTERNAL, UNKNOWN,
 * DATA_LOSS) at error, the caller's mistakes (NOT_FOUND, INVALID_ARGUMENT,
 * ...) at debug.
 *
 * The command-line tools do not log: they print results on stdout and errors
 * on stderr (src/cli/common.ts).
 */
import { ServerInterceptingCall, type Responder, type ServerInterceptor } from '@grpc/grpc-js';
import { destination, pino, stdTimeFunctions, type Logger, type LevelWithSilent } from 'pino';
import pretty from 'pino-pretty';
import { ExaError } from './errors.js';

export type { Logger };
export type LogFormat = 'text' | 'json';
export const LOG_FORMATS: readonly LogFormat[] = ['text', 'json'];
export const LOG_LEVELS: readonly LevelWithSilent[] = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

export interface LogOptions {
  format?: LogFormat;
  level?: string;
}

/** Check --log-format / --log-level values; INVALID_ARGUMENT naming the flag and the choices. */
export function checkLogOptions(o: LogOptions): { format: LogFormat; level: LevelWithSilent } {
  const format = (o.format ?? 'text') as LogFormat;
  const level = (o.level ?? 'info') as LevelWithSilent;
  if (!LOG_FORMATS.includes(format)) throw new ExaError('INVALID_ARGUMENT', `--log-format must be one of ${LOG_FORMATS.join(', ')}, got ${JSON.stringify(o.format)}`);
  if (!LOG_LEVELS.includes(level)) throw new ExaError('INVALID_ARGUMENT', `--log-level must be one of ${LOG_LEVELS.join(', ')}, got ${JSON.stringify(o.level)}`);
  return { format, level };
}

/** The root logger of a service; children add their component (`log.child({ component: 'dma' })`). */
export function createLogger(component: string, o: LogOptions = {}): Logger {
  const { format, level } = checkLogOptions(o);
  const base = { component };
  if (format === 'json') return pino({ level, base, timestamp: stdTimeFunctions.isoTime }, destination({ fd: 2, sync: true }));
  const stream = pretty({
    destination: 2, sync: true, colorize: process.stderr.isTTY === true, singleLine: true,
    translateTime: 'SYS:yyyy-mm-dd HH:MM:ss.l', ignore: 'pid,hostname,component', messageFormat: '({component}) {msg}',
  });
  return pino({ level, base }, stream);
}

let rpcLogger: Logger | null = null;

/** Log the failed calls of this process's gRPC servers to `l` (null: stop). */
export function logRpcFailuresTo(l: Logger | null): void {
  rpcLogger = l;
}

/** grpc-js status numbers that mean the server, not the caller, is at fault. */
const SERVER_FAULTS = new Set([2 /* UNKNOWN */, 13 /* INTERNAL */, 15 /* DATA_LOSS */]);

/** A grpc-js server interceptor (installed by src/grpc.ts createServer) reporting failed calls. */
export function rpcLogInterceptor(): ServerInterceptor {
  return (method, call) => new ServerInterceptingCall(call, {
    sendStatus: ((status, next) => {
      const l = rpcLogger;
      if (l && status.code !== 0) {
        const fields = { rpc: method.path, code: status.code, peer: call.getPeer() };
        if (SERVER_FAULTS.has(status.code)) l.error(fields, `${method.path} failed: ${status.details}`);
        else l.debug(fields, `${method.path} refused: ${status.details}`);
      }
      next(status);
    }) satisfies Responder['sendStatus'],
  });
}
