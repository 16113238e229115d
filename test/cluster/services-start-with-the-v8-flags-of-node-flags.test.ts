/**
 * Every way an exa service or CLI is started gives node the flags of
 * src/node-flags.ts (the V8 heap setting that keeps gRPC traffic from
 * running a full mark-compact every few MiB): the CLIs' shebangs, which
 * cannot import the list, `npm start` and `npm run bench`, and the processes
 * the local cluster spawns. Each CLI starts through its own shebang line the
 * way the kernel runs it, and node sees the flags.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { repoRoot } from '../../src/native.js';
import { NODE_FLAGS } from '../../src/node-flags.js';
import { startLocalCluster, type LocalCluster } from '../../src/ops/local-cluster.js';

let cluster: LocalCluster | null = null;
afterEach(() => {
  cluster?.stop();
  cluster = null;
});

/** The argument vectors of the processes whose command line names `dir`. */
function argvsNaming(dir: string): string[][] {
  const out: string[][] = [];
  for (const pid of readdirSync('/proc').filter((x) => /^\d+$/.test(x))) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean);
      if (argv.includes(dir)) out.push(argv);
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

const CLIS = ['exastore', 'exaagent', 'exackpt', 'exarestore'];
const flags = NODE_FLAGS.join(' ');

describe('node flags of the services', () => {
  it.each(CLIS)('%s: the shebang of its source and of its build passes NODE_FLAGS, and starts the CLI', (name) => {
    for (const file of [join(repoRoot, 'src', 'cli', `${name}.ts`), join(repoRoot, 'dist', 'src', 'cli', `${name}.js`)])
      expect(readFileSync(file, 'utf8').split('\n')[0], file).toBe(`#!/usr/bin/env -S node ${flags}`);
    // as the kernel does for `#!/usr/bin/env -S node FLAGS`: env FLAGS-string script args
    const file = join(repoRoot, 'dist', 'src', 'cli', `${name}.js`);
    const r = spawnSync('/usr/bin/env', ['-S', `node ${flags}`, file, '--help'], { encoding: 'utf8', timeout: 20_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(new RegExp(name));
  });

  it('node started with the shebang line sees the flags', () => {
    const out = execFileSync('/usr/bin/env', ['-S', `node ${flags}`, '-p', 'JSON.stringify(process.execArgv)'], { encoding: 'utf8' });
    expect((JSON.parse(out) as string[]).slice(0, NODE_FLAGS.length)).toEqual([...NODE_FLAGS]);
  });

  it('npm start and npm run bench pass NODE_FLAGS', () => {
    const scripts = (JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
    expect(scripts.start).toBe(`node ${flags} dist/src/demo.js`);
    expect(scripts.bench).toBe(`node ${flags} dist/bench/run.js`);
  });

  it('the local cluster (demo, benchmarks) runs its store and agents with NODE_FLAGS', async () => {
    cluster = await startLocalCluster(['h1']);
    const store = argvsNaming(cluster.dataDir);
    const agent = argvsNaming(cluster.agents[0]!.stateDir);
    expect(store).toHaveLength(1);
    expect(agent.length).toBeGreaterThanOrEqual(1); // and its guardian, a fork of it (native/ckpt/guardian.h)
    for (const argv of [...store, ...agent]) expect(argv.slice(1, 1 + NODE_FLAGS.length)).toEqual([...NODE_FLAGS]);
  });
});
