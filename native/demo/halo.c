/*
 * exa_halo: a two-job halo exchange over the DMA API (exa.h), one host.
 *
 * A 1-D heat equation on N cells (fixed ends) is split between two jobs, rank 0 owning cells
 * [0, N/2) and rank 1 [N/2, N), each in a checkpointable region "grid". Every iteration each rank
 * writes its edge cell into the peer's "halo" buffer with one-sided DMA writes (the value, then
 * the iteration number: one queue executes in order, so the number is seen after the value), then
 * waits for the peer's edge in its own "halo", and steps. Halo slots alternate by iteration parity
 * so a rank one iteration ahead never overwrites a value its peer still reads.
 *
 *   exa_halo --rank R --peer JOB [--socket S] [--job J] [--n N] [--iters K]
 *   exa_halo --reference [--n N] [--iters K]     the same computation in one process, no DMA
 * Prints "checksum R HEX" per rank (FNV-1a over the bytes of the rank's cells): the two-job run
 * must print exactly the reference's lines. Deterministic: same inputs, same bits.
 *
 * Not covered yet: ranks on two agents (no TCP data path) and migration mid-run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "exa.h"

struct slot {
  uint64_t iter; /* iteration + 1 whose edge value is in `value` */
  double value;
  char pad[48]; /* one cache line per slot */
};

static double init_cell(long i, long n) { return (double)((i * 7919) % 1000) / 1000.0 + (i == 0 || i == n - 1 ? 1.0 : 0.0); }

static uint64_t fnv(const void *p, size_t n) {
  const unsigned char *b = p;
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

/* One step of cells [lo, hi) of u (global indexing), with left/right neighbours given. */
static void step(const double *u, double *v, long lo, long hi, long n, double left, double right) {
  for (long i = lo; i < hi; i++) {
    if (i == 0 || i == n - 1) {
      v[i - lo] = u[i - lo]; /* fixed ends */
      continue;
    }
    double l = i == lo ? left : u[i - lo - 1];
    double r = i == hi - 1 ? right : u[i - lo + 1];
    v[i - lo] = u[i - lo] + 0.25 * (l - 2.0 * u[i - lo] + r);
  }
}

static int die(const char *what) {
  fprintf(stderr, "exa_halo: %s: %s\n", what, exa_last_error());
  return 1;
}

int main(int argc, char **argv) {
  long n = 1 << 16, iters = 2000;
  int rank = -1, reference = 0;
  const char *peer = NULL, *sock = NULL, *job = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--rank") && i + 1 < argc) rank = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--peer") && i + 1 < argc) peer = argv[++i];
    else if (!strcmp(argv[i], "--socket") && i + 1 < argc) sock = argv[++i];
    else if (!strcmp(argv[i], "--job") && i + 1 < argc) job = argv[++i];
    else if (!strcmp(argv[i], "--n") && i + 1 < argc) n = atol(argv[++i]);
    else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atol(argv[++i]);
    else if (!strcmp(argv[i], "--reference")) reference = 1;
  }
  if (n < 4 || n % 2 || iters < 1) {
    fprintf(stderr, "exa_halo: --n must be even and >= 4, --iters >= 1\n");
    return 2;
  }
  long half = n / 2;
  if (reference) {
    double *u = malloc(sizeof(double) * (size_t)n), *v = malloc(sizeof(double) * (size_t)n);
    for (long i = 0; i < n; i++) u[i] = init_cell(i, n);
    for (long it = 0; it < iters; it++) {
      /* the same per-half computation the ranks do, so the bits match */
      step(u, v, 0, half, n, 0.0, u[half]);
      step(u + half, v + half, half, n, n, u[half - 1], 0.0);
      double *t = u;
      u = v;
      v = t;
    }
    printf("checksum 0 %016llx\n", (unsigned long long)fnv(u, sizeof(double) * (size_t)half));
    printf("checksum 1 %016llx\n", (unsigned long long)fnv(u + half, sizeof(double) * (size_t)half));
    return 0;
  }
  if ((rank != 0 && rank != 1) || !peer) {
    fprintf(stderr, "usage: exa_halo --rank 0|1 --peer JOB [--socket S] [--job J] [--n N] [--iters K] | --reference\n");
    return 2;
  }
  exa_ctx *ctx;
  exa_dma *d;
  exa_region *grid;
  exa_dma_buf *halo, *out;
  if (exa_attach(sock, job, &ctx) < 0) return die("attach");
  if (exa_dma_open(ctx, NULL, &d) < 0) return die("dma open");
  if (exa_region_alloc(ctx, "grid", sizeof(double) * (size_t)half * 2, 0, &grid) < 0) return die("grid");
  if (exa_dma_alloc(d, "halo", 4096, &halo) < 0 || exa_dma_alloc(d, "out", 4096, &out) < 0) return die("halo buffers");
  if (exa_dma_grant(d, halo, peer, EXA_DMA_WRITE) < 0) return die("grant");
  double *u = exa_region_addr(grid), *v = u + half;
  long lo = rank == 0 ? 0 : half;
  for (long i = 0; i < half; i++) u[i] = init_cell(lo + i, n);
  volatile struct slot *in = exa_dma_buf_addr(halo);
  struct slot *os = exa_dma_buf_addr(out);
  exa_dma_remote ph;
  /* the peer starts independently: wait (bounded) until it has granted us its halo */
  for (int tries = 0;; tries++) {
    int r = exa_dma_lookup(d, peer, "halo", &ph, NULL, NULL);
    if (r == 0) break;
    if ((r != -ENOENT && r != -EACCES) || tries > 20000) return die("lookup of the peer's halo");
    usleep(1000);
  }
  exa_dma_queue *q;
  if (exa_dma_queue_create(d, EXA_DMA_POLL, NULL, NULL, &q) < 0) return die("queue");
  for (long it = 0; it < iters; it++) {
    int p = (int)(it & 1);
    uint64_t off = (uint64_t)p * sizeof(struct slot);
    os[p].value = rank == 0 ? u[half - 1] : u[0];
    os[p].iter = (uint64_t)it + 1;
    if (exa_dma_write(q, out, off + 8, ph, off + 8, 8, 0) < 0 || exa_dma_write(q, out, off, ph, off, 8, 1) < 0)
      return die("post halo");
    struct exa_dma_completion c[2];
    for (int got = 0; got < 2;) {
      int k = exa_dma_wait(q, c + got, 2 - got, 30000);
      if (k <= 0) return die("halo completion");
      for (int j = got; j < got + k; j++)
        if (c[j].status < 0) {
          fprintf(stderr, "exa_halo: halo write failed: %s\n", c[j].reason);
          return 1;
        }
      got += k;
    }
    time_t t0 = time(NULL);
    while (in[p].iter != (uint64_t)it + 1) {
      if (time(NULL) - t0 > 30) {
        fprintf(stderr, "exa_halo: no halo from %s for iteration %ld\n", peer, it);
        return 1;
      }
      __sync_synchronize();
    }
    __sync_synchronize(); /* the value was written before the iteration number */
    double ghost = in[p].value;
    step(u, v, lo, lo + half, n, rank == 0 ? 0.0 : ghost, rank == 0 ? ghost : 0.0);
    memcpy(u, v, sizeof(double) * (size_t)half);
  }
  printf("checksum %d %016llx\n", rank, (unsigned long long)fnv(u, sizeof(double) * (size_t)half));
  fflush(stdout);
  exa_dma_close(d);
  exa_detach(ctx);
  return 0;
}
