/*
 * exa_dma_selftest: the DMA API of exa.h used from C, as test/dma/c-api-*.test.ts runs it.
 *   exa_dma_selftest SOCKET
 * One process attached as two jobs ("ca" writes into "cb"'s granted buffer). Checks callback
 * mode (completions on libexa's thread), polling with exa_dma_wait, sync calls and their error
 * text, queue destroy, and exa_dma_close while operations are still outstanding (it must join
 * the callback thread and return), and a hand-made control connection offering an unsealed ring
 * (refused: the agent maps the ring and a shrink would fault it). Prints "ok" and exits 0, or
 * "FAIL ..." and exits 1.
 *   exa_dma_selftest SOCKET ring
 * The phase-stamped ring protocol (exa_dma_wire.h): many laps of both rings (past the 16-bit
 * wrap of the completion stamps) in polling and callback modes at varying depths, every
 * completion once and in order, the bytes right; a garbage body with a right stamp refused and the
 * queue still served; a slot with a wrong stamp (one behind: neither new nor the previous lap's)
 * refused with the reason and that queue no longer served; and operations posted while the backend
 * sleeps and completed while the frontend arms or sleeps, thousands of times at random timings:
 * none ever waits for a lost wake-up.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/eventfd.h>
#include <unistd.h>

static int eventfd_like(void) { return eventfd(0, EFD_CLOEXEC); }

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "exa.h"
#include "exa_dma_wire.h"

/* A second, hand-made control connection as job jb: an unsealed ring must be refused. */
static int raw_unsealed_ring(const char *agent_sock, const char *job, char *text, size_t tn) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s.dma", agent_sock);
  int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) return -1;
  int efd = eventfd_like();
  struct exa_dma_msg m, rep;
  int fds[2];
  for (int step = 0; step < 2; step++) {
    memset(&m, 0, sizeof m);
    m.magic = EXA_DMA_WIRE_MAGIC;
    m.version = EXA_DMA_WIRE_VERSION;
    m.seq = (uint32_t)step + 1;
    int nfds;
    if (step == 0) {
      m.type = EXA_DMA_MSG_HELLO;
      snprintf(m.job, sizeof m.job, "%s", job);
      fds[0] = efd;
      nfds = 1;
    } else {
      m.type = EXA_DMA_MSG_QUEUE_ADD;
      fds[0] = memfd_create("unsealed", MFD_CLOEXEC);
      if (fds[0] < 0 || ftruncate(fds[0], EXA_DMA_RING_BYTES) != 0) return -1;
      fds[1] = efd;
      nfds = 2;
    }
    struct iovec iov = {&m, sizeof m};
    union {
      char b[CMSG_SPACE(sizeof(int) * 2)];
      struct cmsghdr align;
    } cm;
    memset(&cm, 0, sizeof cm);
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cm.b;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    if (sendmsg(s, &mh, 0) < 0) return -1;
    if (recv(s, &rep, sizeof rep, 0) != (ssize_t)sizeof rep) return -1;
    if (step == 0 && rep.status != 0) return -2;
  }
  snprintf(text, tn, "%s", rep.text);
  close(s);
  return rep.status;
}

#define SZ (64 * 1024)

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      printf("FAIL line %d: ", __LINE__);                 \
      printf(__VA_ARGS__);                                \
      printf(" (last error: %s)\n", exa_last_error());   \
      exit(1);                                            \
    }                                                     \
  } while (0)

static atomic_int cb_ok, cb_err;
static atomic_ullong cb_tags;

static void on_completion(const struct exa_dma_completion *c, void *user) {
  (void)user;
  if (c->status == 0) atomic_fetch_add(&cb_ok, 1);
  else atomic_fetch_add(&cb_err, 1);
  atomic_fetch_add(&cb_tags, c->tag);
}

static void wait_count(int want, int secs) {
  time_t t0 = time(NULL);
  while (atomic_load(&cb_ok) + atomic_load(&cb_err) < want) {
    CHECK(time(NULL) - t0 < secs, "callbacks: %d of %d after %d s", atomic_load(&cb_ok) + atomic_load(&cb_err), want, secs);
    usleep(200);
  }
}

int exa__dma_test_post_raw(exa_dma_queue *q, const void *entry, uint64_t advance);

static uint64_t rnd_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
  rnd_state ^= rnd_state << 13;
  rnd_state ^= rnd_state >> 7;
  rnd_state ^= rnd_state << 17;
  return rnd_state;
}

#define RSZ (1u << 20)
#define LAPS 300 /* x 256 entries: 76800 > 65536, the completion stamps (16 bits) wrap */

static atomic_ullong cb_next;
static atomic_int cb_order_bad;
static void on_ordered(const struct exa_dma_completion *c, void *user) {
  (void)user;
  if (c->status != 0 || c->tag != atomic_load(&cb_next)) atomic_fetch_add(&cb_order_bad, 1);
  atomic_fetch_add(&cb_next, 1);
}

static int ring_tests(const char *sock) {
  exa_ctx *ca, *cb;
  exa_dma *da, *db;
  CHECK(exa_attach(sock, "ra", &ca) == 0, "attach ra");
  CHECK(exa_attach(sock, "rb", &cb) == 0, "attach rb");
  CHECK(exa_dma_open(ca, NULL, &da) == 0, "dma open ra");
  CHECK(exa_dma_open(cb, NULL, &db) == 0, "dma open rb");
  exa_dma_buf *src, *dst;
  CHECK(exa_dma_alloc(da, "src", RSZ, &src) == 0, "alloc src");
  CHECK(exa_dma_alloc(db, "dst", RSZ, &dst) == 0, "alloc dst");
  CHECK(exa_dma_grant(db, dst, "ra", EXA_DMA_WRITE | EXA_DMA_READ) == 0, "grant");
  exa_dma_remote r;
  CHECK(exa_dma_lookup(da, "rb", "dst", &r, NULL, NULL) == 0, "lookup");
  uint64_t *s64 = exa_dma_buf_addr(src), *d64 = exa_dma_buf_addr(dst);
  const uint64_t slots = RSZ / 8;

  /* 1. many laps, polling mode, depth varying between 1 and the whole ring: op k writes the 8 bytes
   * k into slot k % slots; completions come back once each, in order, with their tags */
  exa_dma_queue *qp;
  CHECK(exa_dma_queue_create(da, EXA_DMA_POLL, NULL, NULL, &qp) == 0, "poll queue");
  const uint64_t total = (uint64_t)LAPS * EXA_DMA_QUEUE_DEPTH;
  uint64_t posted = 0, done = 0;
  struct exa_dma_completion c[64];
  while (done < total) {
    uint64_t depth = 1 + rnd() % EXA_DMA_QUEUE_DEPTH;
    while (posted < total && posted - done < depth) {
      s64[posted % slots] = posted;
      CHECK(exa_dma_write(qp, src, (posted % slots) * 8, r, (posted % slots) * 8, 8, posted) == 0, "post %llu", (unsigned long long)posted);
      posted++;
    }
    if (posted - done == EXA_DMA_QUEUE_DEPTH) /* a full ring: one more is refused, nothing is overwritten */
      CHECK(exa_dma_write(qp, src, 0, r, 0, 8, ~0ull) == -EAGAIN, "post beyond the depth must fail with EAGAIN");
    int n = exa_dma_wait(qp, c, 1 + (int)(rnd() % 64), 5000);
    CHECK(n > 0, "completions after %llu of %llu", (unsigned long long)done, (unsigned long long)total);
    for (int i = 0; i < n; i++, done++)
      CHECK(c[i].status == 0 && c[i].tag == done && c[i].len == 8, "completion %llu: status %d tag %llu", (unsigned long long)done,
            c[i].status, (unsigned long long)c[i].tag);
  }
  CHECK(exa_dma_poll(qp, c, 64) == 0, "no completion beyond the operations posted");
  for (uint64_t k = total - slots > total ? 0 : total - slots; k < total; k++)
    CHECK(d64[k % slots] == k, "slot %llu holds %llu, not %llu", (unsigned long long)(k % slots), (unsigned long long)d64[k % slots], (unsigned long long)k);

  /* 2. many laps, callback mode (completions on libexa's thread), a burst whenever there is room */
  exa_dma_queue *qc;
  CHECK(exa_dma_queue_create(da, EXA_DMA_CALLBACK, on_ordered, NULL, &qc) == 0, "callback queue");
  for (uint64_t k = 0; k < total; k++) {
    int rc;
    while ((rc = exa_dma_write(qc, src, (k % slots) * 8, r, (k % slots) * 8, 8, k)) == -EAGAIN) __builtin_ia32_pause();
    CHECK(rc == 0, "callback post %llu", (unsigned long long)k);
  }
  time_t t0 = time(NULL);
  while (atomic_load(&cb_next) < total) {
    CHECK(time(NULL) - t0 < 20, "callbacks: %llu of %llu", (unsigned long long)atomic_load(&cb_next), (unsigned long long)total);
    usleep(200);
  }
  CHECK(atomic_load(&cb_order_bad) == 0, "%d callbacks failed or out of order", atomic_load(&cb_order_bad));
  CHECK(exa_dma_queue_destroy(qc) == 0, "destroy callback queue");

  /* 3. on the polling queue (lap > 1 now): a right stamp with a garbage body is refused, the queue
   * goes on; then a stamp one behind (a torn / replayed entry) is refused and the queue dropped */
  struct exa_dma_req e;
  memset(&e, 0, sizeof e);
  e.op = EXA_DMA_OP_WRITE;
  e.local = 1;
  e.remote = (uint32_t)r;
  e.len = 8;
  e.tag = 7001;
  e.reserved[1] = 0xbad;
  CHECK(exa__dma_test_post_raw(qp, &e, 1) == 0, "raw garbage body");
  CHECK(exa_dma_write(qp, src, 0, r, 0, 8, 7002) == 0, "post after the garbage body");
  for (int got = 0, n; got < 2; got += n) /* a wait returns as soon as one is there */
    CHECK((n = exa_dma_wait(qp, c + got, 2 - got, 5000)) > 0, "two completions (%d so far)", got);
  CHECK(c[0].tag == 7001 && c[0].status == -EINVAL && strstr(c[0].reason, "garbage request: reserved fields set"), "garbage body: %d %s",
        c[0].status, c[0].reason);
  CHECK(c[1].tag == 7002 && c[1].status == 0, "the queue still serves: %d %s", c[1].status, c[1].reason);
  uint64_t seq = total + 2; /* the next request sequence of qp */
  e.reserved[1] = 0;
  e.tag = 7003;
  CHECK(exa__dma_test_post_raw(qp, &e, 0) == 0, "raw entry stamped one behind");
  CHECK(exa_dma_wait(qp, c, 1, 5000) == 1, "the refusal");
  char want[160];
  snprintf(want, sizeof want, "garbage request ring (slot %llu: stamp %llu, expected %llu); queue no longer served",
           (unsigned long long)(seq % EXA_DMA_QUEUE_DEPTH), (unsigned long long)(uint32_t)seq, (unsigned long long)(uint32_t)(seq + 1));
  CHECK(c[0].status == -EPROTO && strstr(c[0].reason, want), "wrong stamp: %d \"%s\", want \"%s\"", c[0].status, c[0].reason, want);
  CHECK(exa_dma_write(qp, src, 0, r, 0, 8, 7004) == 0, "post on the dropped queue is accepted locally");
  CHECK(exa_dma_wait(qp, c, 1, 100) == 0, "but never served");

  /* 4. sleep/wake races: the backend asleep when an operation is posted (pauses past its 20 us
   * spin), completions landing while the frontend spins, arms or sleeps (sizes 8 B - 1 MiB, the
   * frontend's spin budget grows with the size): a lost wake-up would hang a wait for 2 s */
  exa_dma_queue *qs;
  CHECK(exa_dma_queue_create(da, EXA_DMA_POLL, NULL, NULL, &qs) == 0, "sleep/wake queue");
  for (int i = 0; i < 3000; i++) {
    uint64_t len = 8ull << (rnd() % 18); /* 8 B .. 1 MiB */
    int pause_us = (int)(rnd() % 60);
    if (pause_us > 5) usleep((useconds_t)pause_us);
    CHECK(exa_dma_write(qs, src, 0, r, 0, len, (uint64_t)i) == 0, "post %d", i);
    struct timespec a0, a1;
    clock_gettime(CLOCK_MONOTONIC, &a0);
    int n = exa_dma_wait(qs, c, 1, 2000);
    clock_gettime(CLOCK_MONOTONIC, &a1);
    CHECK(n == 1 && c[0].tag == (uint64_t)i && c[0].status == 0, "op %d (%llu bytes) not completed after %ld ms: lost wake-up?", i,
          (unsigned long long)len, (long)((a1.tv_sec - a0.tv_sec) * 1000 + (a1.tv_nsec - a0.tv_nsec) / 1000000));
    if (i % 500 == 0) CHECK(exa_dma_write_sync(da, src, 8, r, 8, 8) == 0, "a sync call in between");
  }
  CHECK(exa_dma_close(da) == 0, "close ra");
  CHECK(exa_dma_close(db) == 0, "close rb");
  exa_detach(ca);
  exa_detach(cb);
  printf("ok ring laps=%d\n", LAPS);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && !strcmp(argv[2], "ring")) return ring_tests(argv[1]);
  CHECK(argc == 2, "usage: exa_dma_selftest SOCKET [ring]");
  exa_ctx *ca, *cb;
  exa_dma *da, *db;
  CHECK(exa_attach(argv[1], "ca", &ca) == 0, "attach ca");
  CHECK(exa_attach(argv[1], "cb", &cb) == 0, "attach cb");
  CHECK(exa_dma_open(ca, NULL, &da) == 0, "dma open ca");
  CHECK(exa_dma_open(cb, NULL, &db) == 0, "dma open cb");
  exa_dma_buf *src, *win;
  CHECK(exa_dma_alloc(da, "src", SZ, &src) == 0, "alloc src");
  CHECK(exa_dma_alloc(db, "win", SZ, &win) == 0, "alloc win");
  unsigned char *s = exa_dma_buf_addr(src), *w = exa_dma_buf_addr(win);
  for (int i = 0; i < SZ; i++) s[i] = (unsigned char)(i * 7 + 3);
  exa_dma_remote r;
  CHECK(exa_dma_lookup(da, "cb", "win", &r, NULL, NULL) == -EACCES, "lookup before the grant must be refused");
  CHECK(strstr(exa_last_error(), "has not granted") != NULL, "reason: %s", exa_last_error());
  CHECK(exa_dma_grant(db, win, "ca", EXA_DMA_WRITE | EXA_DMA_READ) == 0, "grant");
  size_t size = 0;
  unsigned perms = 0;
  CHECK(exa_dma_lookup(da, "cb", "win", &r, &size, &perms) == 0 && size == SZ && perms == 3, "lookup");

  /* callback mode: 1000 writes of 64 bytes, each at its own offset */
  exa_dma_queue *qc;
  CHECK(exa_dma_queue_create(da, EXA_DMA_CALLBACK, on_completion, NULL, &qc) == 0, "callback queue");
  unsigned long long want_tags = 0;
  for (int i = 0; i < 1000; i++) {
    int rc;
    while ((rc = exa_dma_write(qc, src, (uint64_t)i * 64, r, (uint64_t)i * 64, 64, (uint64_t)i)) == -EAGAIN) usleep(50);
    CHECK(rc == 0, "post %d", i);
    want_tags += (unsigned long long)i;
  }
  wait_count(1000, 20);
  CHECK(atomic_load(&cb_ok) == 1000 && atomic_load(&cb_tags) == want_tags, "callbacks ok=%d tags=%llu", atomic_load(&cb_ok),
        (unsigned long long)atomic_load(&cb_tags));
  CHECK(memcmp(s, w, 1000 * 64) == 0, "window content after the callback-mode writes");
  struct exa_dma_completion c;
  CHECK(exa_dma_poll(qc, &c, 1) == -EINVAL, "polling a callback queue is refused");
  CHECK(exa_dma_queue_destroy(qc) == 0, "destroy callback queue");

  /* polling mode: read the window back into src's second half region, then wait */
  memset(w, 0xab, 4096);
  exa_dma_queue *qp;
  CHECK(exa_dma_queue_create(da, EXA_DMA_POLL, NULL, NULL, &qp) == 0, "poll queue");
  exa_dma_queue *bad;
  CHECK(exa_dma_queue_create(da, EXA_DMA_POLL, on_completion, NULL, &bad) == -EINVAL && !bad, "a callback in polling mode is refused");
  CHECK(exa_dma_read(qp, src, 0, r, 0, 4096, 42) == 0, "post read");
  CHECK(exa_dma_wait(qp, &c, 1, 10000) == 1 && c.status == 0 && c.tag == 42 && c.len == 4096 && c.op == EXA_DMA_OP_READ, "read completion");
  for (int i = 0; i < 4096; i++) CHECK(s[i] == 0xab, "read byte %d", i);
  CHECK(exa_dma_wait(qp, &c, 1, 20) == 0, "wait on an empty queue times out with 0");

  /* sync, and a sync error with its reason */
  CHECK(exa_dma_write_sync(da, src, 0, r, SZ - 8, 8) == 0, "sync write");
  CHECK(exa_dma_write_sync(da, src, 0, r, SZ - 8, 16) == -EINVAL, "out of bounds sync write");
  CHECK(strstr(exa_last_error(), "is outside buffer \"win\" of job cb") != NULL, "reason: %s", exa_last_error());

  /* close while busy: operations outstanding on a callback queue */
  atomic_store(&cb_ok, 0);
  atomic_store(&cb_err, 0);
  exa_dma_queue *qb;
  CHECK(exa_dma_queue_create(da, EXA_DMA_CALLBACK, on_completion, NULL, &qb) == 0, "second callback queue");
  for (int i = 0; i < 200; i++) CHECK(exa_dma_write(qb, src, 0, r, 0, SZ, (uint64_t)i) == 0, "post busy %d", i);
  CHECK(exa_dma_close(da) == 0, "close while busy");
  int delivered = atomic_load(&cb_ok) + atomic_load(&cb_err);
  CHECK(delivered <= 200, "at most one completion per operation (%d)", delivered);
  usleep(20000);
  CHECK(atomic_load(&cb_ok) + atomic_load(&cb_err) == delivered, "no callback after close");

  /* a hand-made client of job cb offering an unsealed ring is refused: a shrink could SIGBUS the agent */
  char text[256] = "";
  int rs = raw_unsealed_ring(argv[1], "cb", text, sizeof text);
  CHECK(rs == -EPROTO && strstr(text, "must be sealed against shrinking"), "unsealed ring: %d %s", rs, text);

  /* the peer's session is unaffected */
  exa_dma_remote self;
  CHECK(exa_dma_lookup(db, "cb", "win", &self, NULL, NULL) == 0, "the other session still works");
  CHECK(exa_dma_free(db, win) == 0, "free");
  CHECK(exa_dma_close(db) == 0, "close db");
  exa_detach(ca);
  exa_detach(cb);
  printf("ok delivered-before-close=%d\n", delivered);
  return 0;
}
