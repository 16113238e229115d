/**
 * Crash safety: the server is SIGKILLed at 20 random points during uploads
 * (between batches, in the middle of data, around the commit) and restarted
 * on the same data directory. Every acknowledged checkpoint still restores
 * bit-exact; no checkpoint whose commit was never sent is visible; a commit
 * in doubt (sent, unacknowledged) is either absent or complete. After all
 * that, GC leaves no page that no checkpoint references.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { Image, cleanupDirs, diffImage, killAll, randomPage, regionsOf, rng, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('store crash safety', () => {
  it('keeps every acknowledged checkpoint bit-exact and shows no uncommitted one across 20 SIGKILLs', async () => {
    const dir = tempDir();
    const rand = rng(2024);
    const N = 1500;
    let img = new Image(regionsOf([['state', N]]), (_r, i) => (i % 10 === 0 ? null : randomPage(`c0/${i}`)));
    const acked = new Map<number, Image>();         // checkpoint -> expected image
    const inDoubt: Image[] = [];                    // images whose commit was sent but not acknowledged
    const listNums = async (c: StoreClient): Promise<number[]> => {
      try { return (await c.listCheckpoints('crashy')).map((x) => x.checkpoint); } catch (e) {
        if ((e as { code?: string }).code === 'NOT_FOUND') return [];
        throw e;
      }
    };
    let kills = 0;
    let uploads = 0;
    for (let life = 0; kills < 20; life++) {
      const server = await startStore(dir);
      const c = await StoreClient.connect(server.address);
      // Everything acknowledged so far survived the previous kill, bit-exact.
      const listed = await listNums(c);
      for (const n of acked.keys()) expect(listed, `life ${life}: acknowledged checkpoint ${n} lost`).toContain(n);
      for (const n of listed) {
        if (acked.has(n)) continue;
        // Not acknowledged: only a commit in doubt may show up, and then complete.
        const got = await c.fetchImage({ job: 'crashy', checkpoint: n });
        const match = inDoubt.find((im) => diffImage(im, got.regions) === null);
        expect(match, `life ${life}: checkpoint ${n} is visible but was never committed`).toBeDefined();
        acked.set(n, match!);
      }
      inDoubt.length = 0;
      // Uploads on this server life until one is killed (60% of uploads are).
      for (;;) {
        const parent = Math.max(0, ...acked.keys());
        if (parent > 0) {
          img = acked.get(parent)!;
          expect(diffImage(img, (await c.fetchImage({ job: 'crashy', checkpoint: parent })).regions), `life ${life}`).toBeNull();
        }
        // The next checkpoint: 20% of the pages change (all pages when there is no parent).
        const next = img.clone();
        const dirty: [number, number][] = [];
        uploads++;
        for (let i = 0; i < N; i++) {
          if (parent === 0 || rand() < 0.2) {
            if (parent !== 0) next.setPage(0, i, randomPage(`u${uploads}/${i}`));
            dirty.push([0, i]);
          }
        }
        const batches = next.batches(dirty, 32);
        const killThis = rand() < 0.6;
        // Kill point: after k stored batches (k = all: right as the commit goes out).
        const killAfter = Math.floor(rand() * (batches.length + 1));
        let killed: Promise<void> | null = null;
        let commitSent = false;
        const doKill = (): void => { if (!killed) { killed = server.kill('SIGKILL'); kills++; } };
        try {
          const info = await c.putCheckpoint({
            job: 'crashy', parent, regions: next.regions, window: 2,
            onProgress: (p) => {
              if (p.batches === batches.length) commitSent = true;
              if (killThis && p.batches >= killAfter) {
                // Sometimes at once, sometimes a moment later (mid-message, mid-commit).
                if (rand() < 0.5) doKill(); else setTimeout(doKill, Math.floor(rand() * 5));
              }
            },
          }, batches);
          acked.set(info.checkpoint, next);
        } catch (e) {
          expect((e as { code?: string }).code, String(e)).toMatch(/UNAVAILABLE|CANCELLED|INTERNAL/);
          if (commitSent) inDoubt.push(next);
        }
        if (killThis) {
          // A kill scheduled after the upload finished still kills this life.
          if (!killed) doKill();
          await killed;
          break;
        }
      }
      c.close();
    }

    // Final restart: every acknowledged checkpoint is there and bit-exact; GC reclaims all debris.
    const server = await startStore(dir);
    const c = await StoreClient.connect(server.address);
    const listed = await listNums(c);
    for (const [n, im] of acked) {
      expect(listed).toContain(n);
      expect(diffImage(im, (await c.fetchImage({ job: 'crashy', checkpoint: n })).regions), `checkpoint ${n}`).toBeNull();
    }
    for (const n of listed) {
      if (!acked.has(n)) {
        const got = await c.fetchImage({ job: 'crashy', checkpoint: n });
        expect(inDoubt.some((im) => diffImage(im, got.regions) === null), `checkpoint ${n} was never committed`).toBe(true);
      }
    }
    expect(acked.size).toBeGreaterThan(2);
    const gc = await c.gc({ graceSeconds: 0 });
    const v = await c.verify({ allPages: true });
    expect(v.ok).toBe(true);
    // After GC the store holds exactly the distinct non-zero pages the checkpoints reference.
    const referenced = new Set<string>();
    for (const n of listed) {
      const got = await c.fetchImage({ job: 'crashy', checkpoint: n });
      const buf = got.regions.get('state')!;
      for (let i = 0; i < N; i++) {
        const p = buf.subarray(i * 4096, (i + 1) * 4096);
        if (p.some((b) => b !== 0)) referenced.add(p.toString('base64'));
      }
    }
    expect((await c.stat()).storedPages).toBe(referenced.size);
    expect(gc.deletedPages).toBeGreaterThanOrEqual(0);
    c.close();
  });
});
