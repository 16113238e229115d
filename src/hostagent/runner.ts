/**
 * Launching and supervising job processes on an agent's host.
 *
 * A job is a command the agent starts with EXA_AGENT_SOCKET and EXA_JOB_ID in
 * its environment (and EXA_RESTORE when it resumes from a checkpoint); its
 * stdout and stderr go to a log file in the agent's state directory. The
 * recorded JobSpec (argv, cwd, chosen environment) is what a restore on
 * another host relaunches.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, mkdirSync, openSync, closeSync, readFileSync, statSync } from 'node:fs';
import { delimiter, isAbsolute, join, resolve } from 'node:path';
import { ExaError } from '../errors.js';

export interface JobSpecLike {
  job: string;
  argv: string[];
  cwd: string;
  env: Record<string, string>;
}

export interface LaunchOptions {
  agentSocket: string;
  logDir: string;
  /** Set when the job resumes from a restored image. */
  restoreToken?: string;
}

export interface RunningProcess {
  child: ChildProcess;
  pid: number;
  logPath: string;
  /** Resolves with the exit code (or 128+signal) when the process ends. */
  exited: Promise<number>;
}

/** Environment variables a job spec may not set: the agent owns them. */
const RESERVED_ENV = new Set(['EXA_AGENT_SOCKET', 'EXA_JOB_ID', 'EXA_RESTORE']);

/** Validate a spec's shape; every problem names the field. */
export function checkSpec(spec: JobSpecLike): void {
  if (!Array.isArray(spec.argv) || spec.argv.length === 0 || typeof spec.argv[0] !== 'string' || spec.argv[0].length === 0) {
    throw new ExaError('INVALID_ARGUMENT', 'job command is empty: give the command after --');
  }
  if (spec.argv.some((a) => typeof a !== 'string' || a.includes('\0'))) {
    throw new ExaError('INVALID_ARGUMENT', 'job command arguments must be strings without NUL bytes');
  }
  if (typeof spec.cwd !== 'string' || !isAbsolute(spec.cwd)) {
    throw new ExaError('INVALID_ARGUMENT', `job working directory must be an absolute path, got ${JSON.stringify(spec.cwd)}`);
  }
  for (const [k, v] of Object.entries(spec.env ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k) || typeof v !== 'string' || v.includes('\0')) {
      throw new ExaError('INVALID_ARGUMENT', `job environment variable ${JSON.stringify(k)} is not valid`);
    }
    if (RESERVED_ENV.has(k)) throw new ExaError('INVALID_ARGUMENT', `job environment may not set ${k}: the agent sets it`);
  }
}

/**
 * Resolve the command like execvp would, against the spec's cwd and PATH, so a
 * command missing on this host is reported before anything is started or stopped.
 */
export function resolveCommand(spec: JobSpecLike): string {
  const cmd = spec.argv[0]!;
  const candidates = cmd.includes('/')
    ? [resolve(spec.cwd, cmd)]
    : (spec.env.PATH ?? process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(delimiter).filter(Boolean).map((d) => join(resolve(spec.cwd, d), cmd));
  for (const c of candidates) {
    try {
      if (statSync(c).isFile()) {
        accessSync(c, constants.X_OK);
        return c;
      }
    } catch {
      // not this one
    }
  }
  throw new ExaError('NOT_FOUND', `command ${JSON.stringify(cmd)} does not exist on this host (looked in ${cmd.includes('/') ? candidates[0] : 'PATH'})`);
}

export function checkCwd(spec: JobSpecLike): void {
  try {
    if (!statSync(spec.cwd).isDirectory()) throw new Error('not a directory');
  } catch {
    throw new ExaError('NOT_FOUND', `working directory ${spec.cwd} of job ${spec.job} does not exist on this host`);
  }
}

/** Start a job's process. Resolves once the process has been spawned (or rejects with a named error). */
export async function launch(spec: JobSpecLike, opts: LaunchOptions): Promise<RunningProcess> {
  checkSpec(spec);
  checkCwd(spec);
  const file = resolveCommand(spec);
  mkdirSync(opts.logDir, { recursive: true });
  const logPath = join(opts.logDir, `${spec.job}.log`);
  const fd = openSync(logPath, 'a');
  const env: Record<string, string> = {
    ...spec.env,
    EXA_AGENT_SOCKET: opts.agentSocket,
    EXA_JOB_ID: spec.job,
  };
  if (opts.restoreToken) env.EXA_RESTORE = opts.restoreToken;
  if (!env.PATH && process.env.PATH) env.PATH = process.env.PATH;
  let child: ChildProcess;
  try {
    child = spawn(file, spec.argv.slice(1), { cwd: spec.cwd, env, stdio: ['ignore', fd, fd], argv0: spec.argv[0] });
  } finally {
    closeSync(fd);
  }
  const exited = new Promise<number>((res) => {
    child.once('exit', (code, signal) => res(code ?? 128 + signalNumber(signal)));
  });
  await new Promise<void>((res, rej) => {
    child.once('spawn', () => res());
    child.once('error', (e) => rej(new ExaError('NOT_FOUND', `cannot start ${spec.argv[0]} for job ${spec.job}: ${e.message}`, {}, { cause: e })));
  });
  return { child, pid: child.pid!, logPath, exited };
}

function signalNumber(signal: NodeJS.Signals | null): number {
  const table: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGABRT: 6, SIGKILL: 9, SIGSEGV: 11, SIGPIPE: 13, SIGTERM: 15 };
  return signal ? table[signal] ?? 0 : 0;
}

/** The last lines of a job's log (for status output and tests). */
export function tailLog(logPath: string, maxBytes = 4096): string {
  try {
    const buf = readFileSync(logPath);
    return buf.subarray(Math.max(0, buf.length - maxBytes)).toString('utf8');
  } catch {
    return '';
  }
}
