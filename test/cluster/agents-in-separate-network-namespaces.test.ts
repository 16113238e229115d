/**
 * Two agents, each in its own network namespace joined to the store's by a
 * veth pair, as on two hosts: a job migrates from one to the other and
 * finishes with the uninterrupted checksum. Needs root (ip netns); without it
 * the test says why it is skipped.
 */
import { execFileSync } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { HEAT, cli, finalChecksum, jobOn, onStop, referenceChecksum, startAgent, startStore, stopAll, until } from './helpers.js';

afterEach(stopAll);

function canUseNetns(): string | null {
  if (process.getuid?.() !== 0) return 'not running as root';
  try {
    execFileSync('ip', ['netns', 'list'], { stdio: 'ignore' });
    return null;
  } catch {
    return 'the ip command (iproute2) is not available';
  }
}

const why = canUseNetns();
if (why) console.warn(`agents-in-separate-network-namespaces: skipped: ${why}`);

/** A namespace with a veth to the root namespace: root side .1, namespace side .2 of 10.213.N.0/30. */
function makeHost(n: number): { ns: string; ip: string; gateway: string } {
  const ns = `exa-t${process.pid % 10000}-${n}`;
  const root = `exa${process.pid % 10000}r${n}`;
  const peer = `exa${process.pid % 10000}p${n}`;
  const sub = `10.213.${n + (process.pid % 50) * 4}`;
  const ip = (...a: string[]) => execFileSync('ip', a, { stdio: 'pipe' });
  ip('netns', 'add', ns);
  onStop(() => { try { ip('netns', 'del', ns); } catch { /* gone */ } });
  ip('link', 'add', root, 'type', 'veth', 'peer', 'name', peer);
  onStop(() => { try { ip('link', 'del', root); } catch { /* gone with the namespace */ } });
  ip('link', 'set', peer, 'netns', ns);
  ip('addr', 'add', `${sub}.1/30`, 'dev', root);
  ip('link', 'set', root, 'up');
  ip('-n', ns, 'addr', 'add', `${sub}.2/30`, 'dev', peer);
  ip('-n', ns, 'link', 'set', peer, 'up');
  ip('-n', ns, 'link', 'set', 'lo', 'up');
  return { ns, ip: `${sub}.2`, gateway: `${sub}.1` };
}

describe.skipIf(why !== null)('agents in separate network namespaces', () => {
  it('migrates a job between agents that reach each other only over veth links', async () => {
    const argv = [HEAT, '--n', '64', '--steps', '300', '--step-delay-us', '8000'];
    const expected = referenceChecksum(argv);
    const ha = makeHost(1);
    const hb = makeHost(2);
    // The store listens on every address of the root namespace; each agent dials it through its own veth.
    const store = await startStore({ host: '0.0.0.0' });
    const a = await startAgent('ns-a', `${ha.gateway}:${store.port}`, { netns: ha.ns, listen: `${ha.ip}:0` });
    const b = await startAgent('ns-b', `${hb.gateway}:${store.port}`, { netns: hb.ns, listen: `${hb.ip}:0` });
    expect(a.address.startsWith(ha.ip)).toBe(true);
    expect(b.address.startsWith(hb.ip)).toBe(true);
    const local = `127.0.0.1:${store.port}`;
    const run = await cli('exackpt', ['run', '--store', local, '--agent', 'ns-a', '--job', 'heat-ns', '--every', '500ms', '--', ...argv]);
    expect(run.code, run.stderr).toBe(0);
    await until('running in ns-a', async () => ((await jobOn(a.address, 'heat-ns'))?.state === 'RUNNING' ? true : undefined));
    const mig = await cli('exarestore', ['heat-ns', '--to', 'ns-b', '--store', local, '--json']);
    expect(mig.code, mig.stderr).toBe(0);
    expect(await finalChecksum(b.address, 'heat-ns')).toBe(expected);
  });
});
