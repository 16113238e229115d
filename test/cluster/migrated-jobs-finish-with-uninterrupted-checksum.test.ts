/**
 * Migrated runs of both demo jobs (C heat stencil, Node lattice) finish with
 * the same checksum as uninterrupted runs: migrated once, and three times
 * back and forth between two agents running as separate processes.
 */
import { afterEach, describe, expect, it } from 'vitest';
import {
  HEAT, LATTICE, cli, finalChecksum, jobOn, referenceChecksum, startAgent, startStore, stopAll, until,
} from './helpers.js';

afterEach(stopAll);

// Migrations take seconds on a loaded 2-core machine: longer runs, so the job is still running
// at the (last) migration (the checksums are compared with a run of the same length).
const heatLong = ['--n', '96', '--steps', '1000', '--step-delay-us', '8000'];
const latticeLong = ['--cells', '8192', '--steps', '800', '--step-delay-ms', '10'];

const demos = [
  { name: 'heat (C)', longArgv: [HEAT, ...heatLong], job: 'heat-m' },
  { name: 'lattice (Node)', longArgv: [process.execPath, LATTICE, ...latticeLong], job: 'lattice-m' },
];

async function cluster() {
  const store = await startStore();
  const a = await startAgent('host-a', store.address);
  const b = await startAgent('host-b', store.address);
  return { store, a, b };
}

/** Step count the job has reached, from its log on the agent. */
async function runningSince(agent: string, job: string): Promise<void> {
  await until(`${job} running on ${agent}`, async () => ((await jobOn(agent, job))?.state === 'RUNNING' ? true : undefined));
}

it('restores regions allocated with EXA_REGION_FIXED at their original addresses', async () => {
  const argv = [HEAT, ...heatLong, '--fixed'];
  const expected = referenceChecksum(argv);
  const { store, a, b } = await cluster();
  const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--job', 'heat-fixed', '--', ...argv]);
  expect(run.code, run.stderr).toBe(0);
  await runningSince(a.address, 'heat-fixed');
  const mig = await cli('exarestore', ['heat-fixed', '--to', 'host-b', '--store', store.address]);
  expect(mig.code, mig.stderr).toBe(0);
  expect(await finalChecksum(b.address, 'heat-fixed')).toBe(expected);
  const before = /heat: regions at (\S+ \S+)/.exec((await jobOn(a.address, 'heat-fixed'))!.output_tail)?.[1];
  const after = /heat: regions at (\S+ \S+)/.exec((await jobOn(b.address, 'heat-fixed'))!.output_tail)?.[1];
  expect(before).toMatch(/^0x[0-9a-f]+ 0x[0-9a-f]+$/);
  expect(after).toBe(before);
});

describe.each(demos)('$name', ({ longArgv, job }) => {
  it('finishes with the uninterrupted checksum after one live migration', async () => {
    const expected = referenceChecksum(longArgv);
    const { store, a, b } = await cluster();
    const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--job', job, '--every', '500ms', '--json', '--', ...longArgv]);
    expect(run.code, run.stderr).toBe(0);
    await runningSince(a.address, job);
    const ck = await cli('exackpt', ['checkpoint', job, '--store', store.address, '--json']);
    expect(ck.code, ck.stderr).toBe(0);
    const mig = await cli('exarestore', [job, '--to', 'host-b', '--store', store.address, '--json']);
    expect(mig.code, mig.stderr).toBe(0);
    const r = JSON.parse(mig.stdout.trim().split('\n').pop()!) as { live: boolean; to: string; checkpoint: number };
    expect(r.live).toBe(true);
    expect(r.to).toBe('host-b');
    expect(await finalChecksum(b.address, job)).toBe(expected);
    // Exactly one host ran it to the end: the source's process was ended at the final checkpoint.
    expect((await jobOn(a.address, job))?.state).toBe('STOPPED');
    expect((await jobOn(b.address, job))?.output_tail).toMatch(/restored at step \d+/);
  });

  it('finishes with the uninterrupted checksum after three migrations back and forth', async () => {
    const expected = referenceChecksum(longArgv);
    const { store, a, b } = await cluster();
    const run = await cli('exackpt', ['run', '--store', store.address, '--agent', 'host-a', '--job', job, '--every', '400ms', '--', ...longArgv]);
    expect(run.code, run.stderr).toBe(0);
    const hosts = [['host-b', b.address], ['host-a', a.address], ['host-b', b.address]] as const;
    let at = a.address;
    for (const [to, addr] of hosts) {
      await runningSince(at, job);
      const mig = await cli('exarestore', [job, '--to', to, '--store', store.address, '--json']);
      expect(mig.code, `${mig.stderr}${mig.stdout}`).toBe(0);
      at = addr;
    }
    expect(await finalChecksum(b.address, job)).toBe(expected);
  });
});
