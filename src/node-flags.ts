/**
 * The V8 flags every exa service and CLI runs with: the CLIs' shebangs
 * (`#!/usr/bin/env -S node FLAGS`, the same list; a test keeps them equal),
 * `npm start`, `npm run bench`, and the processes the local cluster and the
 * benchmarks spawn.
 *
 * --initial-old-space-size=64: V8 counts the memory of every new ArrayBuffer
 * toward the limit that starts a full mark-compact, and Node's HTTP/2 reads
 * each socket read into a fresh one: every byte of gRPC traffic received is
 * such an allocation. These processes keep a small JS heap (page data lives
 * in native memory), so the limit V8 derives from it is small, and receiving
 * 1 GiB ran 23-28 full mark-compacts in a restoring client (one per 35-45
 * MiB) and 20-30 in a store server taking a 1 GiB upload. With an initial
 * old space of 64 MiB the client ran 0-1 in 4 GiB and the server 7-9 per
 * GiB: the client's CPU per GiB
 * restored fell from 1.5-1.9 s to 0.7-1.0 s, the server's per GiB uploaded
 * from 5.2-5.6 s to 4.4-4.8 s (BENCHMARKS.md, store, 2026-12-07). It cannot
 * be set from NODE_OPTIONS or at run time (v8.setFlagsFromString comes after
 * the heap is configured), hence the command line. The cost is up to 64 MiB
 * of garbage held before the first full collection.
 */
export const NODE_FLAGS: readonly string[] = ['--initial-old-space-size=64'];
