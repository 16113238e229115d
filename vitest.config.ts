import { defineConfig } from 'vitest/config';

// Tests start real processes (store servers, agents, workloads) on loopback;
// the machines have 2 cores, so files run in a small pool and timeouts are generous.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 60_000,
    pool: 'forks',
    maxWorkers: 2,
    reporters: ['default'],
  },
});
