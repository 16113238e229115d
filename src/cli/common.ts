/**
 * What every exa command line shares: argument parsers, --json / human
 * output, a progress bar on a TTY, and the exit path (message + exit code
 * from src/errors.ts).
 */
import { InvalidArgumentError } from 'commander';
import cliProgress from 'cli-progress';
import { exitCodeFor, toExaError } from '../errors.js';

export interface ProgressEvent { phase: string; done: number; total: number; unit: string }

export const DEFAULT_STORE = process.env.EXA_STORE || '127.0.0.1:7700';

export function intArg(name: string, min = 0): (v: string) => number {
  return (v) => {
    if (!/^-?\d+$/.test(v) || Number(v) < min || !Number.isSafeInteger(Number(v))) throw new InvalidArgumentError(`${name} must be an integer >= ${min}`);
    return Number(v);
  };
}

/** "10s", "500ms", "2m", "1h" or plain milliseconds → ms. */
export function durationArg(name: string): (v: string) => number {
  return (v) => {
    const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(v.trim());
    if (!m) throw new InvalidArgumentError(`${name} must be a duration like 500ms, 10s, 2m or 1h`);
    const n = Number(m[1]) * ({ ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] ?? 'ms'] ?? 1);
    if (n < 100 || n > 7 * 86_400_000) throw new InvalidArgumentError(`${name} must be between 100ms and 7 days`);
    return Math.round(n);
  };
}

export function fmtBytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${u[i]}`;
}

/** A progress bar on a TTY (never with --json). */
export function progressBar(json: boolean | undefined): { onProgress: (p: ProgressEvent) => void; stop: () => void } {
  if (json || !process.stderr.isTTY) return { onProgress: () => undefined, stop: () => undefined };
  const bar = new cliProgress.SingleBar({
    stream: process.stderr, format: '{phase} [{bar}] {percentage}% {value}/{total} {unit}', hideCursor: true,
  }, cliProgress.Presets.shades_classic);
  let started = false;
  let phase = '';
  return {
    onProgress: (p) => {
      if (!started || p.phase !== phase) {
        if (started) bar.stop();
        bar.start(p.total || Math.max(1, p.done), p.done, { phase: p.phase, unit: p.unit });
        started = true;
        phase = p.phase;
      } else {
        bar.setTotal(p.total || Math.max(1, p.done));
        bar.update(p.done, { phase: p.phase, unit: p.unit });
      }
    },
    stop: () => { if (started) bar.stop(); },
  };
}

/** Print one JSON object (--json) or the human text. */
export function out(json: boolean | undefined, value: unknown, human: () => string): void {
  process.stdout.write(json ? `${JSON.stringify(value)}\n` : `${human()}\n`);
}

/** Status lines for humans go to stderr, so stdout stays the result. */
export function say(json: boolean | undefined, line: string): void {
  if (!json) process.stderr.write(`${line}\n`);
}

/** Run a program's parseAsync; failures print the named error and exit with the mapped code. */
export async function runCli(name: string, main: () => Promise<void>): Promise<void> {
  try {
    await main();
  } catch (e) {
    // commander (with exitOverride) already printed usage problems and help.
    const ce = e as { code?: unknown; exitCode?: number };
    if (typeof ce.code === 'string' && ce.code.startsWith('commander.')) {
      process.exitCode = ce.exitCode === 0 ? 0 : 2;
      return;
    }
    const x = toExaError(e);
    const json = process.argv.includes('--json');
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: x.code, message: x.message } })}\n`);
    process.stderr.write(`${name}: ${x.message}\n`);
    process.exitCode = exitCodeFor(x);
  }
}
