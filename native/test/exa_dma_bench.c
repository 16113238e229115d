/*
 * exa_dma_bench: a C DMA job for bench/remoting.ts (no JavaScript on the data path).
 *
 *   exa_dma_bench --socket S --job J --target        alloc "dst" (64 MiB), grant rw to job "client", wait for EOF on stdin
 *   exa_dma_bench --socket S --job J --client PEER   alloc "src" (64 MiB), look up PEER's "dst", then answer commands:
 *     sync LEN ITERS SPAN [WARM_NS] -> "ok NS"  ITERS synchronous writes of LEN bytes, op i at offset (i*LEN) % SPAN
 *                               of both src and dst (SPAN = LEN: the same bytes every time, cache-hot), total ns;
 *                               untimed writes first, at op ITERS-1's offset, for WARM_NS (at least one: it wakes
 *                               the backend thread, which sleeps between runs; with SPAN = LEN they also warm the
 *                               bytes and the CPUs, as the direct baseline's untimed calls do; sweeping, those
 *                               bytes are long evicted when op ITERS-1 comes)
 *     async LEN ITERS D SPAN -> "ok NS"  the same with D operations outstanding on a polling queue
 *     rtt ITERS         -> "ok NS"  ITERS 64-byte writes, each posted and its completion polled (spin), total ns
 *     alloc ITERS       -> "ok NS_ALLOC NS_REGION"  ITERS exa_dma_alloc of 64 KiB (each freed untimed),
 *                                   and as many plain exa_region_alloc for comparison
 * Prints "ready" once set up. Errors: "err TEXT" and exit 1.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "exa.h"

#define BUF (64u << 20) /* transfers at offsets cycling through it: out of cache, like real DMA traffic */

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
  printf("err %s: %s\n", what, exa_last_error());
  fflush(stdout);
  exit(1);
}

int main(int argc, char **argv) {
  const char *sock = NULL, *job = NULL, *peer = NULL;
  int target = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--socket") && i + 1 < argc) sock = argv[++i];
    else if (!strcmp(argv[i], "--job") && i + 1 < argc) job = argv[++i];
    else if (!strcmp(argv[i], "--target")) target = 1;
    else if (!strcmp(argv[i], "--client") && i + 1 < argc) peer = argv[++i];
  }
  exa_ctx *ctx;
  exa_dma *d;
  if (exa_attach(sock, job, &ctx) < 0) die("attach");
  if (exa_dma_open(ctx, NULL, &d) < 0) die("dma_open");
  char line[256];
  if (target) {
    exa_dma_buf *dst;
    if (exa_dma_alloc(d, "dst", BUF, &dst) < 0) die("alloc");
    if (exa_dma_grant(d, dst, "client", EXA_DMA_READ | EXA_DMA_WRITE) < 0) die("grant");
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
  }
  exa_dma_buf *src;
  if (exa_dma_alloc(d, "src", BUF, &src) < 0) die("alloc");
  memset(exa_dma_buf_addr(src), 0x5a, BUF);
  exa_dma_remote dst;
  if (exa_dma_lookup(d, peer, "dst", &dst, NULL, NULL) < 0) die("lookup");
  exa_dma_queue *q;
  if (exa_dma_queue_create(d, EXA_DMA_POLL, NULL, NULL, &q) < 0) die("queue");
  printf("ready\n");
  fflush(stdout);
  struct exa_dma_completion c[64];
  while (fgets(line, sizeof line, stdin)) {
    unsigned long long len = 0, iters = 0, depth = 0, span = 0, warm = 0;
    if (sscanf(line, "sync %llu %llu %llu %llu", &len, &iters, &span, &warm) >= 3 && len && iters && span >= len && span <= BUF) {
      uint64_t last = ((iters - 1) * len) % (span - span % len);
      uint64_t w0 = now_ns();
      do
        if (exa_dma_write_sync(d, src, last, dst, last, len) < 0) die("write_sync");
      while (now_ns() - w0 < warm);
      uint64_t t0 = now_ns();
      for (unsigned long long i = 0; i < iters; i++) {
        uint64_t off = (i * len) % (span - span % len);
        if (exa_dma_write_sync(d, src, off, dst, off, len) < 0) die("write_sync");
      }
      printf("ok %llu\n", (unsigned long long)(now_ns() - t0));
    } else if (sscanf(line, "async %llu %llu %llu %llu", &len, &iters, &depth, &span) == 4 && len && iters && span >= len && span <= BUF) {
      uint64_t last = ((iters - 1) * len) % (span - span % len);
      if (exa_dma_write_sync(d, src, last, dst, last, len) < 0) die("write_sync"); /* untimed: wakes the backend */
      uint64_t t0 = now_ns(), posted = 0, done = 0;
      while (done < iters) {
        while (posted < iters && posted - done < depth) {
          uint64_t off = (posted * len) % (span - span % len);
          if (exa_dma_write(q, src, off, dst, off, len, posted) < 0) die("write");
          posted++;
        }
        int n = exa_dma_wait(q, c, 64, -1);
        if (n < 0) die("wait");
        for (int k = 0; k < n; k++)
          if (c[k].status < 0) {
            printf("err %s\n", c[k].reason);
            return 1;
          }
        done += (uint64_t)n;
      }
      printf("ok %llu\n", (unsigned long long)(now_ns() - t0));
    } else if (sscanf(line, "rtt %llu", &iters) == 1) {
      uint64_t t0 = now_ns();
      for (unsigned long long i = 0; i < iters; i++) {
        if (exa_dma_write(q, src, 0, dst, 0, 64, i) < 0) die("write");
        int n;
        while ((n = exa_dma_poll(q, c, 1)) == 0) __builtin_ia32_pause();
        if (n < 0 || c[0].status < 0) die("rtt completion");
      }
      printf("ok %llu\n", (unsigned long long)(now_ns() - t0));
    } else if (sscanf(line, "alloc %llu", &iters) == 1) {
      uint64_t ta = 0, tr = 0;
      char name[32];
      for (unsigned long long i = 0; i < iters; i++) {
        exa_dma_buf *b;
        snprintf(name, sizeof name, "b%llu", i);
        uint64_t t0 = now_ns();
        if (exa_dma_alloc(d, name, 64 * 1024, &b) < 0) die("alloc");
        ta += now_ns() - t0;
        if (exa_dma_free(d, b) < 0) die("free");
        exa_region *g;
        snprintf(name, sizeof name, "r%llu", i);
        t0 = now_ns();
        if (exa_region_alloc(ctx, name, 64 * 1024, 0, &g) < 0) die("region_alloc");
        tr += now_ns() - t0;
        if (exa_region_free(ctx, g) < 0) die("region_free");
      }
      printf("ok %llu %llu\n", (unsigned long long)ta, (unsigned long long)tr);
    } else {
      printf("err unknown command\n");
    }
    fflush(stdout);
  }
  exa_dma_close(d);
  exa_detach(ctx);
  return 0;
}
