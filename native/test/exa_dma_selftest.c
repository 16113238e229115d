/*
 * exa_dma_selftest: the DMA API of exa.h used from C, as test/dma/c-api-*.test.ts runs it.
 *   exa_dma_selftest SOCKET
 * One process attached as two jobs ("ca" writes into "cb"'s granted buffer). Checks callback
 * mode (completions on libexa's thread), polling with exa_dma_wait, sync calls and their error
 * text, queue destroy, and exa_dma_close while operations are still outstanding (it must join
 * the callback thread and return), and a hand-made control connection offering an unsealed ring
 * (refused: the agent maps the ring and a shrink would fault it). Prints "ok" and exits 0, or
 * "FAIL ..." and exits 1.
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

int main(int argc, char **argv) {
  CHECK(argc == 2, "usage: exa_dma_selftest SOCKET");
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
