/*
 * memjob: a benchmark job with a large checkpointable region that it keeps
 * rewriting at a fixed rate (pages per second, chosen at random), as a
 * long-running HPC job's working set does. Used by `npm run bench -- migrate`.
 *
 * usage: memjob --mib M [--pages-per-sec R] [--seconds S]
 * On a fresh start every page is filled with pseudo-random bytes (so the
 * image neither compresses nor dedups); on restore it just keeps writing.
 * Prints "memjob: filled" / "memjob: restored" once its region is ready.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "exa.h"

static uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  uint64_t mib = 64, rate = 1000, seconds = 3600;
  for (int i = 1; i + 1 < argc; i += 2) {
    char *end = NULL;
    uint64_t v = strtoull(argv[i + 1], &end, 10);
    if (!end || *end) { fprintf(stderr, "memjob: %s expects an integer\n", argv[i]); return 2; }
    if (!strcmp(argv[i], "--mib")) mib = v;
    else if (!strcmp(argv[i], "--pages-per-sec")) rate = v;
    else if (!strcmp(argv[i], "--seconds")) seconds = v;
    else { fprintf(stderr, "memjob: unknown argument %s\n", argv[i]); return 2; }
  }
  if (mib == 0 || mib > (1u << 20)) { fprintf(stderr, "memjob: --mib must be in 1..1048576\n"); return 2; }
  exa_ctx *ctx;
  exa_region *r;
  if (exa_attach(NULL, NULL, &ctx) < 0) { fprintf(stderr, "memjob: attach: %s\n", exa_last_error()); return 1; }
  size_t bytes = (size_t)mib << 20, pages = bytes / 4096;
  if (exa_region_alloc(ctx, "mem", bytes, 0, &r) < 0) { fprintf(stderr, "memjob: alloc: %s\n", exa_last_error()); return 1; }
  uint64_t *mem = exa_region_addr(r);
  uint64_t seed = 0x9E3779B97F4A7C15ULL ^ (uint64_t)time(NULL);
  if (exa_restored(ctx)) {
    printf("memjob: restored\n");
  } else {
    for (size_t i = 0; i < bytes / 8; i++) mem[i] = xorshift(&seed);
    printf("memjob: filled\n");
  }
  fflush(stdout);
  double start = now_s(), next = start;
  uint64_t written = 0;
  while (now_s() - start < (double)seconds) {
    /* write in small bursts so the rate holds without a syscall per page */
    next += 0.001;
    uint64_t due = (uint64_t)((now_s() - start) * (double)rate);
    for (; written < due; written++) {
      size_t p = xorshift(&seed) % pages;
      uint64_t *pg = mem + p * 512;
      for (int k = 0; k < 512; k += 64) pg[k] = xorshift(&seed);
    }
    double d = next - now_s();
    if (d > 0) {
      struct timespec ts = { 0, (long)(d * 1e9) };
      nanosleep(&ts, NULL);
    }
  }
  printf("memjob: done %" PRIu64 " page writes\n", written);
  exa_detach(ctx);
  return 0;
}
