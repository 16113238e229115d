/**
 * Corruption: a byte flipped in a stored page directly in its pack file (server
 * stopped) is reported by verify and by GetImage, naming job, checkpoint,
 * region and page; other checkpoints and ranges stay readable.
 */
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { EXASTORE, Image, PAGE, cleanupDirs, killAll, randomPage, regionsOf, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('store corruption', () => {
  it('reports a flipped byte in a stored page by verify and by GetImage, with job, checkpoint, region and page', async () => {
    const dir = tempDir();
    let server = await startStore(dir);
    let c = await StoreClient.connect(server.address);
    const img = new Image(regionsOf([['grid', 300], ['halo', 200]]), (r, i) => randomPage(`k/${r}/${i}`));
    await c.putCheckpoint({ job: 'heat-1', parent: 0, regions: img.regions }, img.batches(img.allPages()));
    // Checkpoint 2 changes other pages; halo page 123 is shared by both checkpoints.
    const next = img.clone();
    for (let i = 0; i < 10; i++) next.setPage(0, i, randomPage(`k2/${i}`));
    await c.putCheckpoint({ job: 'heat-1', parent: 1, regions: next.regions }, next.batches([...Array(10).keys()].map((i) => [0, i] as [number, number])));
    c.close();
    await server.kill('SIGTERM');

    // Flip one byte of the stored copy of halo page 123, straight in its pack
    // file (page bytes live in DATA/packs, 4096 bytes a slot, storage/leveldb.ts).
    const target = img.page(1, 123);
    let flipped = false;
    for (const name of readdirSync(join(dir, 'packs'))) {
      const file = join(dir, 'packs', name);
      const bytes = readFileSync(file);
      for (let off = 0; off + PAGE <= bytes.length; off += PAGE) {
        if (!bytes.subarray(off, off + PAGE).equals(target)) continue;
        bytes[off + 1000] = bytes[off + 1000]! ^ 0x01;
        writeFileSync(file, bytes);
        flipped = true;
        break;
      }
      if (flipped) break;
    }
    expect(flipped).toBe(true);

    server = await startStore(dir);
    c = await StoreClient.connect(server.address);
    const v = await c.verify();
    expect(v.ok).toBe(false);
    const found = v.problems.map((p) => `${p.job}/${p.checkpoint}/${p.region}/${p.page}/${p.kind}`).sort();
    expect(found).toEqual(['heat-1/1/halo/123/corrupt', 'heat-1/2/halo/123/corrupt']);
    // Every page of both checkpoints counted (checkpoint 2's unchanged pages take checkpoint 1's verdicts).
    expect(v.pagesChecked).toBe(2 * (300 + 200));
    expect(v.problems[0]!.message).toMatch(/checkpoint \d of job heat-1: page 123 of region "halo" does not match its hash/);

    for (const n of [1, 2]) {
      const err = await c.fetchImage({ job: 'heat-1', checkpoint: n }).then(() => null, (e: unknown) => e as { code: string; message: string });
      expect(err, `checkpoint ${n}`).not.toBeNull();
      expect(err!.code).toBe('CORRUPT');
      expect(err!.message).toContain(`checkpoint ${n} of job heat-1: page 123 of region "halo" does not match its hash`);
    }
    // A range that avoids the page still reads, bit-exact.
    const part = await c.fetchImage({ job: 'heat-1', checkpoint: 2, region: 'halo', firstPage: 0, pageCount: 123 });
    expect(part.regions.get('halo')!.equals(img.bufs[1]!.subarray(0, 123 * PAGE))).toBe(true);
    // The CLI says the same and exits with the CORRUPT code (5).
    const cli = spawnSync(process.execPath, [EXASTORE, 'verify', 'heat-1', '--store', server.address], { encoding: 'utf8' });
    expect(cli.status).toBe(5);
    expect(cli.stdout).toContain('page 123 of region "halo" does not match its hash');
    const cliJson = spawnSync(process.execPath, [EXASTORE, 'verify', '--json', '--store', server.address], { encoding: 'utf8' });
    expect(cliJson.status).toBe(5);
    expect(JSON.parse(cliJson.stdout.split('\n')[0]!).problems).toHaveLength(2);
    c.close();
  });
});
