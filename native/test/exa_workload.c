/*
 * exa_workload: a test and benchmark workload driven line by line on stdin.
 * Every command answers exactly one line on stdout: "ok [values]" or
 * "err <errno-name> <message>". Background events print their own lines
 * ("bgdone <page> <result>").
 *
 *   exa_workload [--socket PATH] [--job ID]      (else EXA_AGENT_SOCKET / EXA_JOB_ID)
 *   exa_workload --garbage SOCKET                (send malformed messages, print each reply)
 *
 * Commands:
 *   attach                        exa_attach
 *   alloc NAME PAGES              exa_region_alloc (PAGES may be 0 or huge: bad-input tests)
 *   free NAME | list | detach | exit
 *   fill NAME SEED                every page p := pattern(SEED, p)
 *   write NAME PAGE SEED          page := pattern(SEED, PAGE)
 *   zero NAME PAGE                page := zeros
 *   dontneed NAME PAGE            madvise(MADV_DONTNEED) the page (drops the PTE, like reclaim)
 *   bgwrite NAME PAGE SEED        write from a new thread; "bgdone PAGE ok" when it returned
 *   pipe NAME PAGE SEED           read() 4096 bytes of pattern(SEED, PAGE) from a pipe into the page
 *   dump NAME PATH                region bytes -> file
 *   ckpt                          exa_checkpoint (app-initiated)
 *   writers N NAME                N threads write random pages continuously
 *   snap NAME PATH                writers reach a safe point; dump reference to PATH; exa_checkpoint; writers resume
 *   stopwriters                   "ok TOTAL_WRITES"
 *   calib                         "ok NS_PER_1000_SPINS"
 *   work NAME WRITES SPIN         WRITES x (write a random page, SPIN spins): "ok ELAPSED_US"
 *   unsealed NAME PAGES           play a hostile job: register a region whose memfd is NOT sealed
 *                                 against shrinking (bypassing libexa); prints the agent's answer
 *   shrink NAME                   try to shrink the region's memfd (through /proc/self/map_files)
 *   dmaunsealed NAME              register region NAME as a DMA buffer passing an unsealed memfd of
 *                                 its size instead of the region's own (a hostile job); prints the answer
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "exa.h"
#include "exa_wire.h"
#include "../libexa/internal.h"
#include <fcntl.h>

#define PG 4096

static exa_ctx *ctx;
static const char *sock_path, *job_id;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void say(const char *fmt, ...) {
  va_list ap;
  pthread_mutex_lock(&out_lock);
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
  pthread_mutex_unlock(&out_lock);
}

static const char *ename(int e) {
  switch (e < 0 ? -e : e) {
    case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case EACCES: return "EACCES";
    case ENOMEM: return "ENOMEM";
    case EBUSY: return "EBUSY";
    case ECONNREFUSED: return "ECONNREFUSED";
    case EPROTO: return "EPROTO";
    case EFAULT: return "EFAULT";
    case ECANCELED: return "ECANCELED";
    case EPERM: return "EPERM";
    default: return "EIO";
  }
}

static void fail(int r) { say("err %s %s", ename(r), exa_last_error()); }

static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Deterministic page content; never all-zero. Mirrored in test/checkpointer/helpers.ts. */
static void pattern(uint8_t *dst, uint64_t seed, uint64_t page) {
  uint64_t *w = (uint64_t *)dst;
  for (uint64_t i = 0; i < PG / 8; i++) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + page * 0xBF58476D1CE4E5B9ull + i * 0x94D049BB133111EBull + 1;
    x ^= x >> 31;
    w[i] = x | 1;
  }
}

static exa_region *region_or_fail(const char *name) {
  exa_region *g = ctx ? exa_region_find(ctx, name) : NULL;
  if (!g) say("err ENOENT no region %s", name);
  return g;
}

/* ---- writers for the consistency test ---- */
#define MAXW 16
static pthread_t wthreads[MAXW];
static int nwriters;
static atomic_int quiesce, parked, stop_writers;
static atomic_ulong total_writes;
static uint8_t *w_base;
static size_t w_pages;

static void *writer(void *arg) {
  uint64_t id = (uint64_t)(uintptr_t)arg;
  uint64_t rng = id * 7919 + 17, n = 0;
  while (!atomic_load(&stop_writers)) {
    if (atomic_load(&quiesce)) {
      atomic_fetch_add(&parked, 1);
      while (atomic_load(&quiesce) && !atomic_load(&stop_writers)) usleep(50);
      atomic_fetch_sub(&parked, 1);
      continue;
    }
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    size_t p = (size_t)((rng >> 33) % w_pages);
    uint64_t *w = (uint64_t *)(w_base + p * PG);
    /* a whole page of one value: a torn or half-old page in an image is visible */
    uint64_t v = (id << 48) | (++n);
    for (size_t i = 0; i < PG / 8; i++) w[i] = v;
    atomic_fetch_add(&total_writes, 1);
  }
  return NULL;
}

struct bgw {
  uint8_t *dst;
  uint64_t seed, page;
};
static void *bg_writer(void *arg) {
  struct bgw *b = arg;
  uint8_t buf[PG];
  pattern(buf, b->seed, b->page);
  memcpy(b->dst, buf, PG);
  say("bgdone %llu ok", (unsigned long long)b->page);
  free(b);
  return NULL;
}

static volatile uint64_t spin_sink;
static void spin(uint64_t n) {
  uint64_t x = spin_sink;
  for (uint64_t i = 0; i < n; i++) x = x * 2862933555777941757ull + 3037000493ull;
  spin_sink = x;
}

static int garbage(const char *path) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  struct exa_msg_hdr h = {EXA_WIRE_MAGIC, EXA_WIRE_VERSION, EXA_MSG_HELLO, 1, 0};
  struct {
    const char *what;
    uint8_t buf[128];
    size_t len;
  } cases[6];
  memset(cases, 0, sizeof cases);
  cases[0].what = "three-bytes";
  memcpy(cases[0].buf, "abc", 3);
  cases[0].len = 3;
  cases[1].what = "bad-magic";
  memset(cases[1].buf, 0x41, 40);
  cases[1].len = 40;
  cases[2].what = "length-mismatch";
  h.len = 500;
  memcpy(cases[2].buf, &h, sizeof h);
  cases[2].len = sizeof h + 8;
  cases[3].what = "region-before-hello";
  h.type = EXA_MSG_REGION_ADD;
  h.len = sizeof(struct exa_msg_region_add);
  memcpy(cases[3].buf, &h, sizeof h);
  cases[3].len = sizeof h + h.len;
  cases[4].what = "bad-job-name";
  h.type = EXA_MSG_HELLO;
  h.len = sizeof(struct exa_msg_hello);
  memcpy(cases[4].buf, &h, sizeof h);
  memset(cases[4].buf + sizeof h, '/', 10);
  cases[4].len = sizeof h + h.len;
  cases[5].what = "unknown-type";
  h.type = 77;
  h.len = 0;
  memcpy(cases[5].buf, &h, sizeof h);
  cases[5].len = sizeof h;
  for (int i = 0; i < 6; i++) {
    int s = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) {
      printf("%s connect-failed %s\n", cases[i].what, strerror(errno));
      return 1;
    }
    send(s, cases[i].buf, cases[i].len, MSG_NOSIGNAL);
    char rbuf[512];
    ssize_t n = recv(s, rbuf, sizeof rbuf, 0);
    if (n == (ssize_t)(sizeof(struct exa_msg_hdr) + sizeof(struct exa_msg_reply))) {
      struct exa_msg_reply rep;
      memcpy(&rep, rbuf + sizeof(struct exa_msg_hdr), sizeof rep);
      rep.text[EXA_WIRE_TEXT - 1] = 0;
      printf("%s status=%d %s\n", cases[i].what, rep.status, rep.text);
    } else {
      printf("%s no-reply n=%zd\n", cases[i].what, n);
    }
    /* the agent must have closed this connection */
    n = recv(s, rbuf, sizeof rbuf, 0);
    printf("%s then %s\n", cases[i].what, n == 0 ? "closed" : "open");
    close(s);
  }
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--socket") && i + 1 < argc) sock_path = argv[++i];
    else if (!strcmp(argv[i], "--job") && i + 1 < argc) job_id = argv[++i];
    else if (!strcmp(argv[i], "--garbage") && i + 1 < argc) return garbage(argv[++i]);
    else {
      fprintf(stderr, "usage: exa_workload [--socket PATH] [--job ID] | --garbage SOCKET\n");
      return 2;
    }
  }
  char line[1024];
  static uint8_t buf[PG];
  while (fgets(line, sizeof line, stdin)) {
    char cmd[32] = "", a[256] = "", b[256] = "", c[64] = "";
    int n = sscanf(line, "%31s %255s %255s %63s", cmd, a, b, c);
    if (n < 1) continue;
    if (!strcmp(cmd, "attach")) {
      int r = exa_attach(sock_path, job_id, &ctx);
      if (r < 0) fail(r);
      else say("ok %d", (int)getpid());
    } else if (!strcmp(cmd, "alloc")) {
      exa_region *g;
      int r = exa_region_alloc(ctx, a, (size_t)strtoull(b, NULL, 0) * PG, 0, &g);
      if (r < 0) fail(r);
      else say("ok %p", exa_region_addr(g));
    } else if (!strcmp(cmd, "unsealed")) {
      size_t bytes = (size_t)strtoull(b, NULL, 0) * PG;
      int mfd = memfd_create(a, MFD_CLOEXEC);
      void *addr = mfd < 0 || ftruncate(mfd, (off_t)bytes) != 0 ? MAP_FAILED : mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
      if (addr == MAP_FAILED) {
        fail(-errno);
        if (mfd >= 0) close(mfd);
        continue;
      }
      struct exa_msg_region_add m;
      memset(&m, 0, sizeof m);
      snprintf(m.name, sizeof m.name, "%s", a);
      m.size = bytes;
      m.addr = (uint64_t)(uintptr_t)addr;
      int r = exa__test_request((struct exa_ctx *)ctx, EXA_MSG_REGION_ADD, &m, sizeof m, &mfd, 1);
      close(mfd);
      if (r < 0) fail(r);
      else say("ok accepted");
    } else if (!strcmp(cmd, "shrink")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      char path[128];
      uintptr_t s0 = (uintptr_t)exa_region_addr(g);
      snprintf(path, sizeof path, "/proc/self/map_files/%lx-%lx", (unsigned long)s0, (unsigned long)(s0 + exa_region_size(g)));
      int fd = open(path, O_RDWR | O_CLOEXEC);
      if (fd < 0) {
        fail(-errno);
        continue;
      }
      int r = ftruncate(fd, 0) == 0 ? 0 : -errno;
      close(fd);
      if (r < 0) say("err %s ftruncate: %s", ename(r), strerror(-r));
      else say("ok shrunk");
    } else if (!strcmp(cmd, "dmaunsealed")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      exa_dma *d;
      int r = exa_dma_open(ctx, NULL, &d);
      if (r < 0) {
        fail(r);
        continue;
      }
      int mfd = memfd_create("unsealed", MFD_CLOEXEC);
      if (mfd < 0 || ftruncate(mfd, (off_t)exa_region_size(g)) != 0) {
        fail(-errno);
        if (mfd >= 0) close(mfd);
        exa_dma_close(d);
        continue;
      }
      r = exa__test_dma_buf_add((struct exa_dma *)d, a, exa_region_size(g), mfd);
      close(mfd);
      if (r < 0) fail(r);
      else say("ok accepted");
      exa_dma_close(d);
    } else if (!strcmp(cmd, "allocbytes")) {
      exa_region *g;
      int r = exa_region_alloc(ctx, a, (size_t)strtoull(b, NULL, 0), 0, &g);
      if (r < 0) fail(r);
      else say("ok %p", exa_region_addr(g));
    } else if (!strcmp(cmd, "free")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      int r = exa_region_free(ctx, g);
      if (r < 0) fail(r);
      else say("ok");
    } else if (!strcmp(cmd, "list")) {
      exa_region *v[64];
      int k = exa_region_list(ctx, v, 64);
      char out[4096] = "ok";
      for (int i = 0; i < k && i < 64; i++) {
        strcat(out, " ");
        strcat(out, exa_region_name(v[i]));
      }
      say("%s", out);
    } else if (!strcmp(cmd, "fill")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      uint8_t *base = exa_region_addr(g);
      size_t np = exa_region_size(g) / PG;
      uint64_t seed = strtoull(b, NULL, 0);
      for (size_t p = 0; p < np; p++) pattern(base + p * PG, seed, p);
      say("ok");
    } else if (!strcmp(cmd, "write") || !strcmp(cmd, "zero")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      uint64_t p = strtoull(b, NULL, 0);
      if (p >= exa_region_size(g) / PG) {
        say("err EINVAL page out of range");
        continue;
      }
      uint8_t *dst = (uint8_t *)exa_region_addr(g) + p * PG;
      if (cmd[0] == 'z') memset(dst, 0, PG);
      else {
        pattern(buf, strtoull(c, NULL, 0), p);
        memcpy(dst, buf, PG);
      }
      say("ok");
    } else if (!strcmp(cmd, "dontneed")) {
      /* drop this process's page-table entry for the page (contents stay in the memfd): like reclaim */
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      uint64_t p = strtoull(b, NULL, 0);
      if (madvise((uint8_t *)exa_region_addr(g) + p * PG, PG, MADV_DONTNEED) != 0) say("err EIO madvise: %s", strerror(errno));
      else say("ok");
    } else if (!strcmp(cmd, "bgwrite")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      struct bgw *w = malloc(sizeof *w);
      w->page = strtoull(b, NULL, 0);
      w->seed = strtoull(c, NULL, 0);
      w->dst = (uint8_t *)exa_region_addr(g) + w->page * PG;
      pthread_t t;
      pthread_create(&t, NULL, bg_writer, w);
      pthread_detach(t);
      say("ok started");
    } else if (!strcmp(cmd, "pipe")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      uint64_t p = strtoull(b, NULL, 0);
      int fds[2];
      if (pipe(fds) != 0) {
        say("err EIO pipe");
        continue;
      }
      pattern(buf, strtoull(c, NULL, 0), p);
      if (write(fds[1], buf, PG) != PG) {
        say("err EIO pipe write");
        continue;
      }
      /* the kernel copies into the write-protected page: a fault taken inside read() */
      ssize_t got = read(fds[0], (uint8_t *)exa_region_addr(g) + p * PG, PG);
      int e = errno;
      close(fds[0]);
      close(fds[1]);
      if (got == PG) say("ok");
      else say("err %s read returned %zd: %s", ename(e), got, strerror(e));
    } else if (!strcmp(cmd, "dump")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      FILE *f = fopen(b, "wb");
      if (!f || fwrite(exa_region_addr(g), 1, exa_region_size(g), f) != exa_region_size(g)) {
        say("err EIO cannot write %s", b);
        if (f) fclose(f);
        continue;
      }
      fclose(f);
      say("ok");
    } else if (!strcmp(cmd, "ckpt")) {
      uint64_t t0 = now_us();
      int r = exa_checkpoint(ctx);
      if (r < 0) fail(r);
      else say("ok %llu", (unsigned long long)(now_us() - t0));
    } else if (!strcmp(cmd, "writers")) {
      exa_region *g = region_or_fail(b);
      if (!g) continue;
      w_base = exa_region_addr(g);
      w_pages = exa_region_size(g) / PG;
      nwriters = atoi(a);
      if (nwriters < 1 || nwriters > MAXW) nwriters = 1;
      atomic_store(&stop_writers, 0);
      for (int i = 0; i < nwriters; i++) pthread_create(&wthreads[i], NULL, writer, (void *)(uintptr_t)(i + 1));
      say("ok");
    } else if (!strcmp(cmd, "snap")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      atomic_store(&quiesce, 1);
      while (atomic_load(&parked) < nwriters) usleep(20);
      FILE *f = fopen(b, "wb");
      if (f) {
        fwrite(exa_region_addr(g), 1, exa_region_size(g), f);
        fclose(f);
      }
      int r = exa_checkpoint(ctx);
      atomic_store(&quiesce, 0);
      if (r < 0) fail(r);
      else say("ok %lu", (unsigned long)atomic_load(&total_writes));
    } else if (!strcmp(cmd, "stopwriters")) {
      atomic_store(&stop_writers, 1);
      for (int i = 0; i < nwriters; i++) pthread_join(wthreads[i], NULL);
      nwriters = 0;
      say("ok %lu", (unsigned long)atomic_load(&total_writes));
    } else if (!strcmp(cmd, "calib")) {
      spin(1000000);
      uint64_t t0 = now_us();
      spin(20000000);
      say("ok %.3f", (double)(now_us() - t0) * 1000.0 / 20000.0);
    } else if (!strcmp(cmd, "work")) {
      exa_region *g = region_or_fail(a);
      if (!g) continue;
      uint8_t *base = exa_region_addr(g);
      uint64_t np = exa_region_size(g) / PG, writes = strtoull(b, NULL, 0), sp = strtoull(c, NULL, 0);
      uint64_t rng = 12345, t0 = now_us();
      for (uint64_t i = 0; i < writes; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t *w = (uint64_t *)(base + ((rng >> 33) % np) * PG);
        for (size_t k = 0; k < PG / 8; k += 8) w[k] = i; /* touches every cache line of the page */
        spin(sp);
      }
      say("ok %llu", (unsigned long long)(now_us() - t0));
    } else if (!strcmp(cmd, "detach")) {
      int r = exa_detach(ctx);
      ctx = NULL;
      if (r < 0) fail(r);
      else say("ok");
    } else if (!strcmp(cmd, "exit")) {
      say("ok");
      return 0;
    } else {
      say("err EINVAL unknown command %s", cmd);
    }
  }
  return 0;
}
