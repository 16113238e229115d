/*
 * exa_halo: a two-job halo exchange over the DMA API (exa.h), on one agent or two, and across
 * live migrations of either job.
 *
 * A 1-D heat equation on N cells (fixed ends) is split between two jobs, rank 0 owning cells
 * [0, N/2) and rank 1 [N/2, N). Every iteration each rank writes its edge cell into the peer's
 * "halo" buffer with one-sided DMA writes (the value, then the iteration number: transfers of one
 * queue to one buffer are applied in order, so the number is seen after the value), then waits for
 * the peer's edge in its own "halo", and steps. Halo slots alternate by iteration parity so a rank
 * one iteration ahead never overwrites a value its peer still reads.
 *
 * Restartable (migration): the whole state lives in checkpointable regions and DMA buffers, and a
 * checkpoint may stop the job at any instruction. The grid is double-buffered: iteration `it`
 * reads grid[it % 2] and writes grid[(it + 1) % 2]; only then is state.it advanced with one
 * release store. A restored rank (EXA_RESTORE) resumes at state.it and redoes that iteration:
 * its halo write is idempotent (same value, same iteration number, and the peer cannot be more
 * than one iteration ahead), and a halo the peer wrote while this rank was moving was either in
 * the image or held by the agents and applied on the new host, exactly once. So the checksums
 * equal the uninterrupted run's.
 *
 *   exa_halo --rank R --peer JOB [--socket S] [--job J] [--n N] [--iters K] [--step-delay-us U]
 *   exa_halo --reference [--n N] [--iters K]     the same computation in one process, no DMA
 * Prints "checksum R HEX" per rank (FNV-1a over the bytes of the rank's cells): the two-job run
 * must print exactly the reference's lines; a restored rank first prints "restored at iteration K".
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

#define HALO_MAGIC 0x314f4c4148415845ull /* "EXAHALO1" */

struct halo_state {
  uint64_t magic;
  uint64_t n, iters, rank;
  uint64_t it; /* completed iterations; grid[it % 2] is current */
};

/* Retry a lookup while the peer is not there yet (starting, restarting, migrating): bounded. */
static int lookup_peer(exa_dma *d, const char *peer, exa_dma_remote *ph) {
  for (int tries = 0;; tries++) {
    int r = exa_dma_lookup(d, peer, "halo", ph, NULL, NULL);
    if (r == 0) return 0;
    int transient = r == -ENOENT || r == -EACCES || r == -EAGAIN || r == -EBUSY || r == -ECONNREFUSED ||
                    r == -EHOSTUNREACH || r == -ETIMEDOUT || r == -ECONNRESET;
    if (!transient || tries > 60000) return r;
    usleep(1000);
  }
}

int main(int argc, char **argv) {
  long n = 1 << 16, iters = 2000, delay_us = 0;
  int rank = -1, reference = 0;
  const char *peer = NULL, *sock = NULL, *job = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--rank") && i + 1 < argc) rank = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--peer") && i + 1 < argc) peer = argv[++i];
    else if (!strcmp(argv[i], "--socket") && i + 1 < argc) sock = argv[++i];
    else if (!strcmp(argv[i], "--job") && i + 1 < argc) job = argv[++i];
    else if (!strcmp(argv[i], "--n") && i + 1 < argc) n = atol(argv[++i]);
    else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atol(argv[++i]);
    else if (!strcmp(argv[i], "--step-delay-us") && i + 1 < argc) delay_us = atol(argv[++i]);
    else if (!strcmp(argv[i], "--reference")) reference = 1;
    else {
      fprintf(stderr, "exa_halo: unknown argument \"%s\"\n", argv[i]);
      return 2;
    }
  }
  if (n < 4 || n % 2 || iters < 1 || delay_us < 0 || delay_us > 10000000) {
    fprintf(stderr, "exa_halo: --n must be even and >= 4, --iters >= 1, --step-delay-us in [0, 10000000]\n");
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
    fprintf(stderr, "usage: exa_halo --rank 0|1 --peer JOB [--socket S] [--job J] [--n N] [--iters K] [--step-delay-us U] | --reference\n");
    return 2;
  }
  exa_ctx *ctx;
  exa_dma *d;
  exa_region *grid_r, *state_r;
  exa_dma_buf *halo, *out;
  if (exa_attach(sock, job, &ctx) < 0) return die("attach");
  if (exa_dma_open(ctx, NULL, &d) < 0) return die("dma open");
  if (exa_region_alloc(ctx, "hstate", sizeof(struct halo_state), 0, &state_r) < 0 ||
      exa_region_alloc(ctx, "grid", sizeof(double) * (size_t)half * 2, 0, &grid_r) < 0)
    return die("regions");
  if (exa_dma_alloc(d, "halo", 4096, &halo) < 0 || exa_dma_alloc(d, "out", 4096, &out) < 0) return die("halo buffers");
  if (exa_dma_grant(d, halo, peer, EXA_DMA_WRITE) < 0) return die("grant");
  struct halo_state *st = exa_region_addr(state_r);
  double *g[2] = { exa_region_addr(grid_r), (double *)exa_region_addr(grid_r) + half };
  long lo = rank == 0 ? 0 : half;
  /* A checkpoint taken before initialization finished holds no complete state: start fresh. */
  int restored = exa_restored(ctx) && __atomic_load_n(&st->magic, __ATOMIC_ACQUIRE) == HALO_MAGIC;
  if (restored) {
    if (st->n != (uint64_t)n || st->iters != (uint64_t)iters || st->rank != (uint64_t)rank) {
      fprintf(stderr, "exa_halo: restored state (n=%llu iters=%llu rank=%llu) does not match the arguments\n",
              (unsigned long long)st->n, (unsigned long long)st->iters, (unsigned long long)st->rank);
      return 1;
    }
    printf("restored at iteration %llu\n", (unsigned long long)__atomic_load_n(&st->it, __ATOMIC_ACQUIRE));
    fflush(stdout);
  } else {
    for (long i = 0; i < half; i++) g[0][i] = init_cell(lo + i, n);
    st->n = (uint64_t)n;
    st->iters = (uint64_t)iters;
    st->rank = (uint64_t)rank;
    __atomic_store_n(&st->it, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&st->magic, HALO_MAGIC, __ATOMIC_RELEASE); /* last: declares the state complete */
  }
  volatile struct slot *in = exa_dma_buf_addr(halo);
  struct slot *os = exa_dma_buf_addr(out);
  exa_dma_remote ph;
  /* the peer starts independently (or is being moved): wait, bounded, until it has granted us its halo */
  int r = lookup_peer(d, peer, &ph);
  if (r < 0) return die("lookup of the peer's halo");
  exa_dma_queue *q;
  if (exa_dma_queue_create(d, EXA_DMA_POLL, NULL, NULL, &q) < 0) return die("queue");
  for (long it = (long)__atomic_load_n(&st->it, __ATOMIC_ACQUIRE); it < iters; it++) {
    int p = (int)(it & 1);
    double *u = g[it & 1], *v = g[(it + 1) & 1];
    uint64_t off = (uint64_t)p * sizeof(struct slot);
    os[p].value = rank == 0 ? u[half - 1] : u[0];
    os[p].iter = (uint64_t)it + 1;
    if (exa_dma_write(q, out, off + 8, ph, off + 8, 8, 0) < 0 || exa_dma_write(q, out, off, ph, off, 8, 1) < 0)
      return die("post halo");
    struct exa_dma_completion c[2];
    for (int got = 0; got < 2;) {
      int k = exa_dma_wait(q, c + got, 2 - got, 120000);
      if (k <= 0) return die("halo completion");
      for (int j = got; j < got + k; j++)
        if (c[j].status < 0) {
          fprintf(stderr, "exa_halo: halo write of iteration %ld failed: %s\n", it, c[j].reason);
          return 1;
        }
      got += k;
    }
    time_t t0 = time(NULL);
    while (in[p].iter != (uint64_t)it + 1) {
      if (time(NULL) - t0 > 120) {
        fprintf(stderr, "exa_halo: no halo from %s for iteration %ld\n", peer, it);
        return 1;
      }
      __sync_synchronize();
    }
    __sync_synchronize(); /* the value was written before the iteration number */
    double ghost = in[p].value;
    step(u, v, lo, lo + half, n, rank == 0 ? 0.0 : ghost, rank == 0 ? ghost : 0.0);
    __atomic_store_n(&st->it, (uint64_t)it + 1, __ATOMIC_RELEASE);
    if (delay_us) usleep((useconds_t)delay_us);
  }
  printf("checksum %d %016llx\n", rank, (unsigned long long)fnv(g[iters & 1], sizeof(double) * (size_t)half));
  fflush(stdout);
  exa_dma_close(d);
  exa_detach(ctx);
  return 0;
}
