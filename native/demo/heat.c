/*
 * heat: deterministic 2-D heat diffusion whose whole state lives in exa
 * regions, so it can be checkpointed live, restored and migrated.
 *
 * Crash consistency: a checkpoint may stop the job at any instruction, and a
 * restored job restarts from the regions alone (no registers, no stack). So
 * the state is double-buffered: step s reads grid[s % 2] and writes
 * grid[(s + 1) % 2]; only when the new grid is complete is the step counter
 * advanced with one aligned 64-bit release store. Whatever instant a
 * checkpoint captures, state.step names a complete grid, and the half-written
 * other buffer is recomputed after restore. The final checksum is therefore
 * identical for uninterrupted, checkpointed and migrated runs.
 *
 * usage: heat [--n N] [--steps S] [--step-delay-us U] [--ckpt-every K] [--fixed] [--no-agent]
 * --fixed: regions are restored at their original addresses (EXA_REGION_FIXED);
 *          prints "heat: regions at <state> <grid>".
 * prints: "heat: restored at step S" when resumed, and at the end
 *         "checksum=<16 hex> steps=<S> n=<N>"
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "exa.h"

#define STATE_MAGIC 0x4558414845415431ULL /* "EXAHEAT1" */

struct heat_state {
  uint64_t magic;
  uint64_t n;
  uint64_t steps_total;
  uint64_t step; /* completed steps; grid[step % 2] is current */
};

static void usage(void) {
  fprintf(stderr, "usage: heat [--n N] [--steps S] [--step-delay-us U] [--ckpt-every K] [--fixed] [--no-agent]\n");
}

static int parse_u64(const char *flag, const char *s, uint64_t min, uint64_t max, uint64_t *out) {
  char *end = NULL;
  errno = 0;
  unsigned long long v = strtoull(s ? s : "", &end, 10);
  if (!s || errno || *end || v < min || v > max) {
    fprintf(stderr, "heat: %s expects an integer in [%" PRIu64 ", %" PRIu64 "], got \"%s\"\n", flag, min, max, s ? s : "");
    return -1;
  }
  *out = v;
  return 0;
}

static uint64_t fnv1a(const void *p, size_t len) {
  const unsigned char *b = p;
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < len; i++) {
    h ^= b[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

static void init_grid(double *g, uint64_t n) {
  /* A hot square and a warm ring, deterministic in n. */
  for (uint64_t y = 0; y < n; y++)
    for (uint64_t x = 0; x < n; x++) {
      double v = 0.0;
      if (x > n / 4 && x < n / 2 && y > n / 4 && y < n / 2) v = 100.0;
      uint64_t dx = x > n * 3 / 4 ? x - n * 3 / 4 : n * 3 / 4 - x;
      uint64_t dy = y > n * 3 / 4 ? y - n * 3 / 4 : n * 3 / 4 - y;
      if (dx * dx + dy * dy < (n / 8) * (n / 8) && dx * dx + dy * dy > (n / 16) * (n / 16)) v = 50.0;
      g[y * n + x] = v;
    }
}

static void step_grid(const double *src, double *dst, uint64_t n) {
  const double k = 0.2;
  for (uint64_t y = 0; y < n; y++)
    for (uint64_t x = 0; x < n; x++) {
      double c = src[y * n + x];
      double up = y > 0 ? src[(y - 1) * n + x] : 0.0;
      double dn = y + 1 < n ? src[(y + 1) * n + x] : 0.0;
      double lf = x > 0 ? src[y * n + x - 1] : 0.0;
      double rt = x + 1 < n ? src[y * n + x + 1] : 0.0;
      dst[y * n + x] = c + k * (up + dn + lf + rt - 4.0 * c);
    }
}

int main(int argc, char **argv) {
  uint64_t n = 256, steps = 200, delay_us = 0, ckpt_every = 0;
  int use_agent = 1;
  unsigned rflags = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--n")) { if (parse_u64(a, v, 8, 16384, &n)) return 2; i++; }
    else if (!strcmp(a, "--steps")) { if (parse_u64(a, v, 1, UINT32_MAX, &steps)) return 2; i++; }
    else if (!strcmp(a, "--step-delay-us")) { if (parse_u64(a, v, 0, 10000000, &delay_us)) return 2; i++; }
    else if (!strcmp(a, "--ckpt-every")) { if (parse_u64(a, v, 0, UINT32_MAX, &ckpt_every)) return 2; i++; }
    else if (!strcmp(a, "--no-agent")) use_agent = 0;
    else if (!strcmp(a, "--fixed")) rflags |= EXA_REGION_FIXED;
    else if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(); return 0; }
    else { fprintf(stderr, "heat: unknown argument \"%s\"\n", a); usage(); return 2; }
  }

  exa_ctx *ctx = NULL;
  struct heat_state *st;
  double *grid[2];
  size_t grid_bytes = (size_t)(n * n * sizeof(double));
  int restored = 0;
  if (use_agent) {
    int rc = exa_attach(NULL, NULL, &ctx);
    if (rc < 0) { fprintf(stderr, "heat: attach failed: %s\n", exa_last_error()); return 1; }
    exa_region *rs, *rg;
    if ((rc = exa_region_alloc(ctx, "state", sizeof(struct heat_state), rflags, &rs)) < 0 ||
        (rc = exa_region_alloc(ctx, "grid", 2 * grid_bytes, rflags, &rg)) < 0) {
      fprintf(stderr, "heat: region allocation failed: %s\n", exa_last_error());
      exa_detach(ctx);
      return 1;
    }
    st = exa_region_addr(rs);
    grid[0] = exa_region_addr(rg);
    grid[1] = (double *)((char *)grid[0] + grid_bytes);
    restored = exa_restored(ctx);
    if (rflags & EXA_REGION_FIXED) {
      printf("heat: regions at %p %p\n", (void *)st, (void *)grid[0]);
      fflush(stdout);
    }
  } else {
    st = calloc(1, sizeof *st);
    grid[0] = calloc(2, grid_bytes);
    if (!st || !grid[0]) { fprintf(stderr, "heat: out of memory\n"); return 1; }
    grid[1] = (double *)((char *)grid[0] + grid_bytes);
  }

  /* A checkpoint taken before initialization finished holds no complete state: start fresh. */
  if (restored && __atomic_load_n(&st->magic, __ATOMIC_ACQUIRE) != STATE_MAGIC) restored = 0;
  if (restored) {
    if (st->n != n || st->n != n || st->steps_total != steps) {
      fprintf(stderr, "heat: restored state does not match arguments (n=%" PRIu64 " steps=%" PRIu64 ")\n", st->n, st->steps_total);
      return 1;
    }
    printf("heat: restored at step %" PRIu64 "\n", __atomic_load_n(&st->step, __ATOMIC_ACQUIRE));
    fflush(stdout);
  } else {
    init_grid(grid[0], n);
    st->n = n;
    st->steps_total = steps;
    __atomic_store_n(&st->step, 0, __ATOMIC_RELEASE);
    /* magic last: it is what declares the state complete */
    __atomic_store_n(&st->magic, STATE_MAGIC, __ATOMIC_RELEASE);
  }

  for (uint64_t s = __atomic_load_n(&st->step, __ATOMIC_ACQUIRE); s < steps; s++) {
    step_grid(grid[s % 2], grid[(s + 1) % 2], n);
    __atomic_store_n(&st->step, s + 1, __ATOMIC_RELEASE);
    if (ckpt_every && ctx && (s + 1) % ckpt_every == 0 && exa_checkpoint(ctx) < 0)
      fprintf(stderr, "heat: checkpoint at step %" PRIu64 " failed: %s\n", s + 1, exa_last_error());
    if (delay_us) {
      struct timespec ts = { (time_t)(delay_us / 1000000), (long)(delay_us % 1000000) * 1000 };
      nanosleep(&ts, NULL);
    }
  }
  printf("checksum=%016" PRIx64 " steps=%" PRIu64 " n=%" PRIu64 "\n", fnv1a(grid[steps % 2], grid_bytes), steps, n);
  fflush(stdout);
  if (ctx) exa_detach(ctx);
  return 0;
}
