/**
 * Benchmark runner: `npm run bench -- NAME [--json] [bench options]`.
 * Runs bench/NAME.ts (compiled to dist/bench/NAME.js). Each benchmark module
 * exports `run(args): Promise<Record<string, unknown>>`; the runner prints a
 * human summary, and with --json the last line of output is one JSON object.
 */
import { readdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { join } from 'node:path';

export interface BenchModule {
  /** Returns the figures; the runner adds name, date and host. */
  run(args: string[], log: (line: string) => void): Promise<Record<string, unknown>>;
}

async function main(): Promise<void> {
  const here = dirname(fileURLToPath(import.meta.url));
  const available = readdirSync(here)
    .filter((f) => f.endsWith('.js') && f !== 'run.js' && !f.startsWith('_'))
    .map((f) => f.slice(0, -3));
  const argv = process.argv.slice(2);
  const json = argv.includes('--json');
  const rest = argv.filter((a) => a !== '--json');
  const name = rest.shift();
  if (!name || name === '--help' || name === '-h') {
    console.log(`usage: npm run bench -- NAME [--json] [options]\nbenchmarks: ${available.join(', ') || '(none)'}`);
    process.exit(name ? 0 : 2);
  }
  if (!available.includes(name)) {
    console.error(`unknown benchmark "${name}"; available: ${available.join(', ') || '(none)'}`);
    process.exit(2);
  }
  const mod = (await import(pathToFileURL(join(here, `${name}.js`)).href)) as BenchModule;
  // With --json, progress goes to stderr so the last stdout line is the JSON object.
  const log = (line: string): void => { (json ? process.stderr : process.stdout).write(`${line}\n`); };
  const started = new Date();
  const figures = await mod.run(rest, log);
  const result = { bench: name, date: started.toISOString(), node: process.version, ...figures };
  if (json) {
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } else {
    for (const [k, v] of Object.entries(result)) log(`${k.padEnd(32)} ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.stack ?? e.message : String(e));
  process.exit(1);
});
