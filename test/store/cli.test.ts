/**
 * The exastore CLI: every command has --help, prints one JSON object with
 * --json, and exits with the code src/errors.ts maps the failure to
 * (2 usage, 3 not found, 4 unavailable, 5 corrupt).
 */
import { spawnSync } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { EXASTORE, Image, cleanupDirs, killAll, randomPage, regionsOf, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

function cli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [EXASTORE, ...args], { encoding: 'utf8', timeout: 30_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('exastore CLI', () => {
  it('has --help on every command, prints JSON, and maps failures to exit codes', async () => {
    const top = cli('--help');
    expect(top.status).toBe(0);
    for (const cmd of ['serve', 'ls', 'verify', 'gc', 'compact', 'stat', 'delete']) {
      expect(top.stdout).toContain(cmd);
      const h = cli(cmd, '--help');
      expect(h.status, cmd).toBe(0);
      expect(h.stdout, cmd).toContain(`Usage: exastore ${cmd}`);
      expect(h.stdout, cmd).toContain('--json');
    }
    expect(cli('serve', '--data', tempDir(), '--port', 'abc').status).toBe(2);
    expect(cli('frobnicate').status).toBe(2);

    const server = await startStore(tempDir());
    const s = ['--store', server.address, '--json'];
    expect(JSON.parse(cli('ls', ...s).stdout)).toEqual({ jobs: [] });
    const c = await StoreClient.connect(server.address);
    const img = new Image(regionsOf([['m', 40]]), (_r, i) => (i % 4 === 0 ? null : randomPage(`cli/${i}`)));
    await c.putCheckpoint({ job: 'cli-job', parent: 0, regions: img.regions }, img.batches(img.allPages()));
    await c.putCheckpoint({ job: 'cli-job', parent: 1, regions: img.regions }, img.batches([[0, 1]]));
    c.close();

    const ls = JSON.parse(cli('ls', ...s).stdout) as { jobs: { job: string; checkpoints: number }[] };
    expect(ls.jobs).toEqual([expect.objectContaining({ job: 'cli-job', checkpoints: 2, latest: 2 })]);
    const lsJob = JSON.parse(cli('ls', 'cli-job', ...s).stdout) as { checkpoints: { checkpoint: number; zeroPages: number }[] };
    expect(lsJob.checkpoints.map((x) => x.checkpoint)).toEqual([1, 2]);
    expect(lsJob.checkpoints[0]!.zeroPages).toBe(10);
    const stat = JSON.parse(cli('stat', ...s).stdout) as { storedPages: number; jobs: unknown[] };
    expect(stat.storedPages).toBe(30);
    const verify = cli('verify', ...s);
    expect(verify.status).toBe(0);
    expect(JSON.parse(verify.stdout)).toMatchObject({ ok: true, checkpoints: 2, problems: [] });
    expect(JSON.parse(cli('compact', 'cli-job', ...s).stdout)).toMatchObject({ job: 'cli-job', checkpoints: 2 });
    expect(JSON.parse(cli('delete', 'cli-job', '1', ...s).stdout)).toEqual({ deleted: [1], kept: [2] });
    const gc = JSON.parse(cli('gc', '--grace', '0', ...s).stdout) as { deletedPages: number };
    expect(gc.deletedPages).toBe(0); // checkpoint 2 still references every page of 1
    // Human output without --json.
    expect(cli('stat', '--store', server.address).stdout).toMatch(/dedup ratio/);

    const missing = cli('ls', 'nosuch', ...s);
    expect(missing.status).toBe(3);
    expect(missing.stderr).toContain('job nosuch has no checkpoints');
    expect(JSON.parse(missing.stdout)).toMatchObject({ error: { code: 'NOT_FOUND' } });
    expect(cli('compact', 'nosuch', ...s).status).toBe(3);
    await server.kill();
    const down = cli('stat', '--store', server.address);
    expect(down.status).toBe(4);
    expect(down.stderr).toContain(`cannot reach ${server.address}`);
  });
});
