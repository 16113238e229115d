/**
 * Archival and restore on a fresh cluster: a job checkpointed on one cluster
 * is archived to S3 (a real s3rver on loopback) with `exastore archive`; a
 * second cluster whose store has never seen the job restores it with
 * `exarestore JOB --from s3://... --to HOST`, and it finishes with the same
 * checksum as an uninterrupted run.
 */
import { afterEach, expect, it } from 'vitest';
import { startS3, type TestS3 } from '../s3/helpers.js';
import { HEAT, cli, finalChecksum, jobOn, killJobsOf, referenceChecksum, startAgent, startStore, stopAll, until } from './helpers.js';

let s3: TestS3 | null = null;
afterEach(async () => {
  await stopAll();
  await s3?.stop();
  s3 = null;
});

it('restores a job archived to S3 on a cluster that never saw it', async () => {
  const argv = [HEAT, '--n', '96', '--steps', '400', '--step-delay-us', '8000'];
  const expected = referenceChecksum(argv);
  s3 = await startS3('exa-archive');
  const s3flags = ['--s3-endpoint', s3.endpoint, '--s3-access-key', 'S3RVER', '--s3-secret-key', 'S3RVER', '--s3-path-style'];
  const url = `s3://${s3.bucket}/jobs`;

  // Cluster 1: run, checkpoint, archive, then the whole cluster goes away.
  const store1 = await startStore();
  const a = await startAgent('old-a', store1.address);
  const run = await cli('exackpt', ['run', '--store', store1.address, '--agent', 'old-a', '--job', 'heat-arch', '--', ...argv]);
  expect(run.code, run.stderr).toBe(0);
  await until('running', async () => ((await jobOn(a.address, 'heat-arch'))?.state === 'RUNNING' ? true : undefined));
  for (let i = 0; i < 2; i++) {
    const ck = await cli('exackpt', ['checkpoint', 'heat-arch', '--store', store1.address]);
    expect(ck.code, ck.stderr).toBe(0);
  }
  const ar = await cli('exastore', ['archive', 'heat-arch', '--to', url, '--store', store1.address, '--json', ...s3flags]);
  expect(ar.code, ar.stderr).toBe(0);
  await a.proc.kill('SIGKILL');
  killJobsOf(a.stateDir);
  await store1.proc.kill('SIGKILL');

  // Cluster 2: a fresh store and agent.
  const store2 = await startStore();
  const b = await startAgent('new-b', store2.address);
  const unknown = await cli('exarestore', ['heat-arch', '--to', 'new-b', '--store', store2.address]);
  expect(unknown.code).toBe(3);
  const r = await cli('exarestore', ['heat-arch', '--from', url, '--to', 'new-b', '--store', store2.address, '--json', ...s3flags]);
  expect(r.code, r.stderr).toBe(0);
  const res = JSON.parse(r.stdout.trim().split('\n').pop()!) as { imported: number; to: string };
  expect(res.imported).toBe(2);
  expect(await finalChecksum(b.address, 'heat-arch')).toBe(expected);
  expect((await jobOn(b.address, 'heat-arch'))!.output_tail).toMatch(/restored at step \d+/);
});
