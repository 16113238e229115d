/**
 * Delta reads (GetImage with `since`), which migration uses to move only the
 * final increment: applying the pages of checkpoint N read `since` X onto the
 * image of X gives the image of N bit-exact, whatever lies between (pages
 * rewritten, zeroed, reverted, a region grown), and only pages whose content
 * differs are sent.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { StoreClient } from '../../src/store/client.js';
import { Image, PAGE, cleanupDirs, killAll, randomPage, regionsOf, rng, startStore, tempDir } from './helpers.js';

afterEach(async () => { await killAll(); cleanupDirs(); });

describe('delta reads', () => {
  it('pages read since X turn image X into image N, and only differing pages travel', async () => {
    const server = await startStore(tempDir());
    const c = await StoreClient.connect(server.address);
    try {
      const rand = rng(7);
      let img = new Image(regionsOf([['grid', 600], ['heap', 200]]), (r, i) => (rand() < 0.1 ? null : randomPage(`d/${r}/${i}`)));
      const images = [img.clone()];
      await c.putCheckpoint({ job: 'delta', parent: 0, regions: img.regions }, img.batches(img.allPages(), 128));
      for (let k = 2; k <= 5; k++) {
        const next = img.clone();
        if (k === 4) {
          next.regions[1]!.pageCount += 40;
          next.bufs[1] = Buffer.concat([next.bufs[1]!, Buffer.alloc(40 * PAGE)]);
        }
        const dirty: [number, number][] = [];
        for (const [r, i] of next.allPages()) {
          if (rand() > 0.03) continue;
          const roll = rand();
          next.setPage(r, i, roll < 0.2 ? null : roll < 0.35 && i < images[0]!.regions[r]!.pageCount ? images[0]!.page(r, i) : randomPage(`k${k}/${r}/${i}`));
          dirty.push([r, i]);
        }
        await c.putCheckpoint({ job: 'delta', parent: k - 1, regions: next.regions }, next.batches(dirty, 64));
        images.push(next.clone());
        img = next;
      }
      for (const [x, n] of [[1, 5], [2, 3], [3, 5], [4, 5]] as const) {
        const base = images[x - 1]!.clone();
        const want = images[n - 1]!;
        const got = base.bufs.map((b) => Buffer.from(b));
        want.regions.forEach((reg, r) => {
          if (!got[r] || got[r]!.length !== reg.pageCount * PAGE) got[r] = Buffer.concat([got[r] ?? Buffer.alloc(0), Buffer.alloc(reg.pageCount * PAGE - (got[r]?.length ?? 0))]);
        });
        let sent = 0;
        for await (const item of c.getImage({ job: 'delta', checkpoint: n, since: x })) {
          if ('info' in item) continue;
          const r = want.regions.findIndex((reg) => reg.name === item.region);
          expect(item.pages, 'delta pieces are sparse').toBeDefined();
          item.pages!.forEach((page, i) => item.data.copy(got[r]!, page * PAGE, i * PAGE, (i + 1) * PAGE));
          sent += item.pages!.length;
        }
        want.bufs.forEach((b, r) => expect(got[r]!.equals(b), `checkpoint ${n} since ${x}, region ${want.regions[r]!.name}`).toBe(true));
        // Exactly the pages whose bytes differ (pages of the grown tail count as new unless still zero in both).
        let differing = 0;
        want.regions.forEach((reg, r) => {
          for (let i = 0; i < reg.pageCount; i++) {
            const before = i * PAGE < base.bufs[r]!.length && reg.pageCount === base.regions[r]!.pageCount ? base.page(r, i) : null;
            if (!before || !before.equals(want.page(r, i))) differing++;
          }
        });
        expect(sent).toBe(differing);
      }
      await expect(async () => { for await (const _ of c.getImage({ job: 'delta', checkpoint: 5, since: 99 })) void _; }).rejects.toThrow(/checkpoint 99 of job delta does not exist|does not exist/);
    } finally { c.close(); }
  });
});
