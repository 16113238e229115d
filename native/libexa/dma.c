/*
 * dma.c: the DMA frontend of libexa (RDMA API remoting; contract in exa.h,
 * protocol in exa_dma_wire.h).
 *
 * Ownership: the exa_dma owns the control socket, the request-doorbell
 * eventfd, its buffers (each a region of the exa_ctx plus nothing else: the
 * memfd duplicate goes to the backend and ours is closed) and its queues.
 * A queue owns its ring mapping, the ring memfd is closed once passed, its
 * completion eventfd and, in callback mode, its completion thread plus a stop
 * eventfd that wakes that thread for destroy.
 */
#define _GNU_SOURCE
#include "exa.h"
#include "exa_dma_wire.h"
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

int exa_fail(int err, const char *fmt, ...);
const char *exa__socket_path(const exa_ctx *ctx);
int exa__region_alloc_fd(exa_ctx *ctx, const char *name, size_t size, unsigned flags, exa_region **out, int *fd_out);

#define fail exa_fail
#define SPIN_NS 30000 /* spin this long on an empty completion ring before sleeping */
#define YIELD_AFTER_NS 5000 /* and past the expected time of the work outstanding + this, yield now and then */

struct exa_dma_buf {
  struct exa_dma_buf *next;
  exa_region *region;
  uint32_t id;      /* the backend's id */
  int unregistered; /* BUF_DEL done, region free still to do (it failed, e.g. -EBUSY during a checkpoint) */
};

struct exa_dma_queue {
  struct exa_dma_queue *next;
  exa_dma *d;
  uint32_t id;
  enum exa_dma_mode mode;
  exa_dma_callback cb;
  void *user;
  void *ring; /* EXA_DMA_RING_BYTES, MAP_SHARED */
  struct exa_dma_ring_hdr *hdr;
  int cq_efd;
  int stop_efd; /* callback mode: wakes the completion thread for destroy */
  pthread_t thread;
  int has_thread;
  pthread_mutex_t sq_lock;   /* posters */
  pthread_mutex_t cq_lock;   /* reapers */
  pthread_mutex_t wait_lock; /* one sleeper at a time (see the doorbell protocol) */
  /* Producer and consumer state on lines of their own: a poster and a reaper on two threads
   * (callback mode) do not bounce each other's line at every operation. */
  uint64_t sq_tail __attribute__((aligned(64))); /* next request sequence (sq_lock) */
  uint64_t cq_head __attribute__((aligned(64))); /* next completion sequence (cq_lock) */
  uint64_t outstanding __attribute__((aligned(64))); /* posted - reaped; sq_lock for increments, atomics for decrements */
  uint64_t spin_extra_ns; /* largest length posted since the queue last drained, as ns at ~1 GB/s */
};

struct exa_dma {
  exa_ctx *ctx;
  pthread_mutex_t lock; /* control requests, buffer and queue lists */
  int sock;
  int sq_efd; /* request doorbell (shared by all queues of this client) */
  uint32_t seq;
  struct exa_dma_buf *bufs;
  struct exa_dma_queue *queues;
  int dead; /* set (atomically) once a waiter saw the backend hang up: posting then fails at once */
  pthread_mutex_t sync_lock; /* sync calls share one private polling queue */
  struct exa_dma_queue *syncq;
};

#define valid_name exa__valid_name

/* One control exchange (d->lock held). fds are passed with the request; reply copied to *rep. */
static int control(exa_dma *d, struct exa_dma_msg *m, const int *fds, int nfds, struct exa_dma_msg *rep) {
  m->magic = EXA_DMA_WIRE_MAGIC;
  m->version = EXA_DMA_WIRE_VERSION;
  m->seq = ++d->seq;
  int sr = exa__send_with_fds(d->sock, m, sizeof *m, fds, nfds);
  if (sr < 0) return fail(sr, "exa_dma: cannot send to the DMA backend: %s", strerror(-sr));
  ssize_t n;
  do n = recv(d->sock, rep, sizeof *rep, 0);
  while (n < 0 && errno == EINTR);
  if (n < 0) return fail(-errno, "exa_dma: lost the DMA backend: %s", strerror(errno));
  if (n == 0) return fail(-ECONNRESET, "exa_dma: the DMA backend closed the connection");
  if ((size_t)n != sizeof *rep || rep->magic != EXA_DMA_WIRE_MAGIC || rep->type != EXA_DMA_MSG_REPLY || rep->seq != m->seq ||
      rep->status > 0)
    return fail(-EPROTO, "exa_dma: malformed reply from the DMA backend");
  rep->text[EXA_DMA_WIRE_TEXT - 1] = 0;
  if (rep->status < 0) return fail(rep->status, "%s", rep->text[0] ? rep->text : strerror(-rep->status));
  return 0;
}

int exa__test_dma_buf_add(struct exa_dma *d, const char *name, unsigned long long size, int fd) {
  struct exa_dma_msg m = {0}, rep;
  m.type = EXA_DMA_MSG_BUF_ADD;
  snprintf(m.name, sizeof m.name, "%s", name);
  m.size = size;
  pthread_mutex_lock(&d->lock);
  int r = control(d, &m, &fd, 1, &rep);
  pthread_mutex_unlock(&d->lock);
  return r;
}

int exa_dma_open(exa_ctx *ctx, const char *socket_path, exa_dma **out) {
  if (!ctx || !out) return fail(-EINVAL, "exa_dma_open: ctx/out is NULL");
  *out = NULL;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  if (socket_path && *socket_path) snprintf(path, sizeof path, "%s", socket_path);
  else if (getenv("EXA_DMA_SOCKET") && *getenv("EXA_DMA_SOCKET")) snprintf(path, sizeof path, "%s", getenv("EXA_DMA_SOCKET"));
  else if (snprintf(path, sizeof path, "%s.dma", exa__socket_path(ctx)) >= (int)sizeof path)
    return fail(-ENAMETOOLONG, "exa_dma_open: DMA socket path too long");
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (sock < 0) return fail(-errno, "exa_dma_open: socket: %s", strerror(errno));
  if (connect(sock, (struct sockaddr *)&sa, sizeof sa) != 0) {
    int e = errno;
    close(sock);
    return fail(-e, "exa_dma_open: no DMA backend listening on %s: %s", path, strerror(e));
  }
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) {
    int e = errno;
    close(sock);
    return fail(-e, "exa_dma_open: eventfd: %s", strerror(e));
  }
  exa_dma *d = calloc(1, sizeof *d);
  if (!d) {
    close(sock);
    close(efd);
    return fail(-ENOMEM, "exa_dma_open: out of memory");
  }
  d->ctx = ctx;
  d->sock = sock;
  d->sq_efd = efd;
  pthread_mutex_init(&d->lock, NULL);
  pthread_mutex_init(&d->sync_lock, NULL);
  struct exa_dma_msg m = {0}, rep;
  m.type = EXA_DMA_MSG_HELLO;
  snprintf(m.job, sizeof m.job, "%s", exa_job_id(ctx));
  int r = control(d, &m, &efd, 1, &rep);
  if (r < 0) {
    close(sock);
    close(efd);
    pthread_mutex_destroy(&d->lock);
    pthread_mutex_destroy(&d->sync_lock);
    free(d);
    return r;
  }
  *out = d;
  return 0;
}

static void queue_release(struct exa_dma_queue *q) {
  if (q->has_thread) {
    uint64_t one = 1;
    if (write(q->stop_efd, &one, sizeof one) < 0) { /* an eventfd write only fails on overflow */ }
    pthread_join(q->thread, NULL);
  }
  if (q->stop_efd >= 0) close(q->stop_efd);
  if (q->cq_efd >= 0) close(q->cq_efd);
  if (q->ring) munmap(q->ring, EXA_DMA_RING_BYTES);
  pthread_mutex_destroy(&q->sq_lock);
  pthread_mutex_destroy(&q->cq_lock);
  pthread_mutex_destroy(&q->wait_lock);
  free(q);
}

int exa_dma_close(exa_dma *d) {
  if (!d) return fail(-EINVAL, "exa_dma_close: NULL");
  /* Queues first: their callback threads must not run once the session is gone. */
  struct exa_dma_queue *q = d->queues;
  while (q) {
    struct exa_dma_queue *n = q->next;
    queue_release(q);
    q = n;
  }
  if (d->syncq) queue_release(d->syncq);
  struct exa_dma_buf *b = d->bufs;
  while (b) {
    struct exa_dma_buf *n = b->next;
    free(b); /* the region stays: the job may still use it */
    b = n;
  }
  /* Closing the socket tells the backend to drop our queues, buffers and grants. */
  close(d->sock);
  close(d->sq_efd);
  pthread_mutex_destroy(&d->lock);
  pthread_mutex_destroy(&d->sync_lock);
  free(d);
  return 0;
}

int exa_dma_alloc(exa_dma *d, const char *name, size_t size, exa_dma_buf **out) {
  if (!d || !out) return fail(-EINVAL, "exa_dma_alloc: NULL argument");
  *out = NULL;
  exa_dma_buf *b = calloc(1, sizeof *b);
  if (!b) return fail(-ENOMEM, "exa_dma_alloc: out of memory");
  int fd = -1;
  int r = exa__region_alloc_fd(d->ctx, name, size, 0, &b->region, &fd);
  if (r < 0) {
    free(b);
    return r;
  }
  pthread_mutex_lock(&d->lock);
  struct exa_dma_msg m = {0}, rep;
  m.type = EXA_DMA_MSG_BUF_ADD;
  snprintf(m.name, sizeof m.name, "%s", name);
  m.size = exa_region_size(b->region);
  r = control(d, &m, &fd, 1, &rep);
  close(fd);
  if (r == 0) {
    b->id = rep.id;
    b->next = d->bufs;
    d->bufs = b;
  }
  pthread_mutex_unlock(&d->lock);
  if (r < 0) {
    char why[512];
    snprintf(why, sizeof why, "%s", exa_last_error());
    exa_region_free(d->ctx, b->region);
    free(b);
    return fail(r, "%s", why);
  }
  *out = b;
  return 0;
}

int exa_dma_free(exa_dma *d, exa_dma_buf *buf) {
  if (!d || !buf) return fail(-EINVAL, "exa_dma_free: NULL argument");
  pthread_mutex_lock(&d->lock);
  exa_dma_buf **pp = &d->bufs;
  while (*pp && *pp != buf) pp = &(*pp)->next;
  if (!*pp) {
    pthread_mutex_unlock(&d->lock);
    return fail(-ENOENT, "exa_dma_free: not a DMA buffer of job %s", exa_job_id(d->ctx));
  }
  /* Unregister first: from here on peers' operations on it fail with a reason, and the backend
   * finished any operation on it (it serves our control messages between operations). */
  int r = 0;
  if (!buf->unregistered) {
    struct exa_dma_msg m = {0}, rep;
    m.type = EXA_DMA_MSG_BUF_DEL;
    m.id = buf->id;
    r = control(d, &m, NULL, 0, &rep);
    if (r == 0) buf->unregistered = 1;
  }
  /* Should the region refuse (an agent answering -EBUSY, exa_wire.h), the buffer stays in our
   * list, unregistered, and a later exa_dma_free retries only the region. */
  if (r == 0) r = exa_region_free(d->ctx, buf->region);
  if (r == 0) {
    *pp = buf->next;
    free(buf);
  }
  pthread_mutex_unlock(&d->lock);
  return r;
}

void *exa_dma_buf_addr(const exa_dma_buf *buf) { return buf ? exa_region_addr(buf->region) : NULL; }
size_t exa_dma_buf_size(const exa_dma_buf *buf) { return buf ? exa_region_size(buf->region) : 0; }

int exa_dma_grant(exa_dma *d, exa_dma_buf *buf, const char *peer_job, unsigned perms) {
  if (!d || !buf) return fail(-EINVAL, "exa_dma_grant: NULL argument");
  if (!valid_name(peer_job)) return fail(-EINVAL, "exa_dma_grant: peer job \"%s\" is not a valid job id", peer_job ? peer_job : "(null)");
  if (perms & ~(EXA_DMA_READ | EXA_DMA_WRITE)) return fail(-EINVAL, "exa_dma_grant: unknown permission bits 0x%x", perms);
  pthread_mutex_lock(&d->lock);
  struct exa_dma_msg m = {0}, rep;
  m.type = EXA_DMA_MSG_GRANT;
  m.id = buf->id;
  m.perms = perms;
  snprintf(m.job, sizeof m.job, "%s", peer_job);
  int r = control(d, &m, NULL, 0, &rep);
  pthread_mutex_unlock(&d->lock);
  return r;
}

int exa_dma_lookup(exa_dma *d, const char *peer_job, const char *name, exa_dma_remote *out, size_t *size_out,
                   unsigned *perms_out) {
  if (!d || !out) return fail(-EINVAL, "exa_dma_lookup: NULL argument");
  *out = 0;
  if (!valid_name(peer_job)) return fail(-EINVAL, "exa_dma_lookup: peer job \"%s\" is not a valid job id", peer_job ? peer_job : "(null)");
  if (!valid_name(name)) return fail(-EINVAL, "exa_dma_lookup: buffer name \"%s\" is not valid", name ? name : "(null)");
  pthread_mutex_lock(&d->lock);
  struct exa_dma_msg m = {0}, rep;
  m.type = EXA_DMA_MSG_LOOKUP;
  snprintf(m.job, sizeof m.job, "%s", peer_job);
  snprintf(m.name, sizeof m.name, "%s", name);
  int r = control(d, &m, NULL, 0, &rep);
  pthread_mutex_unlock(&d->lock);
  if (r < 0) return r;
  *out = rep.id;
  if (size_out) *size_out = (size_t)rep.size;
  if (perms_out) *perms_out = rep.perms;
  return 0;
}

/* ---- completions ---- */

/* Take up to max completions (cq_lock held by the caller). */
static int reap_locked(struct exa_dma_queue *q, struct exa_dma_completion *out, int max) {
  uint64_t head = q->cq_head;
  int n = 0;
  struct exa_dma_cqe *cq = exa_dma_cq(q->ring);
  /* The entry itself says whether it is new: its phase stamp is head + 1 (no shared tail index). */
  while (n < max) {
    const struct exa_dma_cqe *e = &cq[head % EXA_DMA_RING_DEPTH];
    if (__atomic_load_n(&e->phase, __ATOMIC_ACQUIRE) != (uint16_t)(head + 1)) break;
    out[n].tag = e->tag;
    out[n].len = e->len;
    out[n].status = e->status > 0 ? -EPROTO : e->status;
    out[n].op = e->op;
    /* The reason (the entry's second cache line) is read for failures only. */
    if (out[n].status < 0) {
      memcpy(out[n].reason, e->reason, EXA_DMA_REASON);
      out[n].reason[EXA_DMA_REASON - 1] = 0;
    } else
      out[n].reason[0] = 0;
    head++;
    n++;
  }
  if (!n) return 0;
  __atomic_store_n(&q->cq_head, head, __ATOMIC_RELAXED);
  /* For the backend, which reads it only when its view says the completion ring is full. */
  __atomic_store_n(&q->hdr->cq_head, head, __ATOMIC_RELEASE);
  if (__atomic_sub_fetch(&q->outstanding, (uint64_t)n, __ATOMIC_RELEASE) == 0)
    __atomic_store_n(&q->spin_extra_ns, 0, __ATOMIC_RELAXED);
  return n;
}

/* Is a completion there (without taking it)? */
static inline int cq_ready(struct exa_dma_queue *q) {
  uint64_t head = __atomic_load_n(&q->cq_head, __ATOMIC_RELAXED);
  return __atomic_load_n(&exa_dma_cq(q->ring)[head % EXA_DMA_RING_DEPTH].phase, __ATOMIC_ACQUIRE) == (uint16_t)(head + 1);
}

static int poll_any(struct exa_dma_queue *q, struct exa_dma_completion *out, int max) {
  pthread_mutex_lock(&q->cq_lock);
  int n = reap_locked(q, out, max);
  pthread_mutex_unlock(&q->cq_lock);
  return n;
}

/* Spin politely: a busy-polling thread must not starve the backend thread copying our data,
 * which may share a physical core with it (SMT siblings, vCPUs). */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause(); /* one: each extra pause delays seeing the completion by up to its latency */
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Where this queue's waiter spins (the fe_cpu hint, exa_dma_wire.h): a stale value would make the
 * backend yield its CPU for nothing, so it is refreshed at every wait (getcpu is a vDSO call) and
 * written, to a line the backend reads, only when it changed. Returns 1 + the CPU. */
static unsigned publish_cpu(struct exa_dma_queue *q) {
  unsigned me = (unsigned)sched_getcpu() + 1;
  if (me != __atomic_load_n(&q->hdr->fe_cpu, __ATOMIC_RELAXED)) __atomic_store_n(&q->hdr->fe_cpu, me, __ATOMIC_RELAXED);
  return me;
}

/* The backend is gone: no operation can complete any more. */
static void mark_dead(exa_dma *d) { __atomic_store_n(&d->dead, 1, __ATOMIC_SEQ_CST); }

/* Wait for completions: spin, then arm and sleep on the doorbell (protocol in exa_dma_wire.h).
 * Also wakes on stop_efd (destroy) and on a hang-up of the control socket (the agent died):
 * a waiter never outlives its backend. Returns count, 0 on timeout or stop, <0 on error.
 *
 * The spin polls the next completion entry's stamp (one cache line, pulled over once the backend
 * wrote it) and reads the clock every 16 rounds; it makes no system call while the operation may
 * still be running on the backend's CPU (a sched_yield costs more than a small round trip). Only
 * past the time the outstanding work should have taken (expected_ns) does it yield now and then:
 * on an oversubscribed machine the backend thread may be waiting for this very CPU. */
static int wait_common(struct exa_dma_queue *q, struct exa_dma_completion *out, int max, int timeout_ms, int exclusive);
static int wait_any(struct exa_dma_queue *q, struct exa_dma_completion *out, int max, int timeout_ms) {
  return wait_common(q, out, max, timeout_ms, 0);
}

/* exclusive: the caller alone uses q (the private queue of sync calls, under sync_lock): no locks. */
static int wait_common(struct exa_dma_queue *q, struct exa_dma_completion *out, int max, int timeout_ms, int exclusive) {
#define POLL_ANY() (exclusive ? reap_locked(q, out, max) : poll_any(q, out, max))
  if (!exclusive) pthread_mutex_lock(&q->wait_lock);
  publish_cpu(q); /* while the backend works on what was just posted */
  uint64_t t0 = now_ns();
  uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : t0 + (uint64_t)timeout_ms * 1000000ull;
  int n = 0;
  unsigned spins = 0;
  for (;;) {
    if (cq_ready(q) || !(++spins & 15)) {
      n = POLL_ANY();
      if (n) break;
    } else {
      cpu_relax();
      continue;
    }
    uint64_t t = now_ns();
    if (t >= deadline) break;
    /* Spin longer while a long operation is outstanding: waking a sleeping thread costs tens of
     * microseconds on virtual machines (an idle vCPU is halted), more than the copy of a few
     * hundred KiB; a waiter of a sync call burns no CPU the caller was not already waiting with. */
    uint64_t extra = __atomic_load_n(&q->hdr->away, __ATOMIC_RELAXED) ? 0 : __atomic_load_n(&q->spin_extra_ns, __ATOMIC_RELAXED);
    if (t - t0 < SPIN_NS + extra) {
      /* Spinning on the CPU the backend thread last ran on: it is waiting for this very CPU. */
      unsigned me = publish_cpu(q);
      if (me == __atomic_load_n(&q->hdr->be_cpu, __ATOMIC_RELAXED)) sched_yield();
      /* extra is ~1 ns a byte (~1 GB/s); a same-host copy runs at 5-50 GB/s: past a quarter of it
       * plus a few microseconds, the backend is late, likely for want of a CPU (the hint above
       * misses a backend preempted on the other CPU) */
      else if (t - t0 > YIELD_AFTER_NS + extra / 4 && (spins & 255) == 0) sched_yield();
      cpu_relax();
      continue;
    }
    __atomic_store_n(&q->hdr->fe_armed, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    n = POLL_ANY();
    if (n) {
      __atomic_store_n(&q->hdr->fe_armed, 0, __ATOMIC_SEQ_CST);
      break;
    }
    struct pollfd pf[3] = {{q->cq_efd, POLLIN, 0}, {q->d->sock, 0, 0} /* hang-up only */, {q->stop_efd, POLLIN, 0}};
    int nf = q->stop_efd >= 0 ? 3 : 2;
    int ms = deadline == UINT64_MAX ? -1 : (int)((deadline - t + 999999) / 1000000);
    int pr = poll(pf, (nfds_t)nf, ms);
    __atomic_store_n(&q->hdr->fe_armed, 0, __ATOMIC_SEQ_CST);
    if (pr < 0 && errno != EINTR) {
      n = fail(-errno, "exa_dma_wait: poll: %s", strerror(errno));
      break;
    }
    if (pf[0].revents & POLLIN) {
      uint64_t v;
      if (read(q->cq_efd, &v, sizeof v) < 0) { /* EAGAIN: drained already */ }
    }
    if (nf == 3 && (pf[2].revents & POLLIN)) break;
    /* The control socket only carries replies to our own requests, which are consumed under
     * d->lock; readable here without a pending request means EOF: the backend is gone. */
    if (pf[1].revents & (POLLHUP | POLLERR)) {
      mark_dead(q->d);
      n = POLL_ANY();
      if (!n) n = fail(-ECONNRESET, "exa_dma: the DMA backend (agent) went away");
      break;
    }
    t0 = now_ns(); /* spin again briefly after a wake-up */
    spins = 0;
  }
  if (!exclusive) pthread_mutex_unlock(&q->wait_lock);
  return n;
#undef POLL_ANY
}

int exa_dma_poll(exa_dma_queue *q, struct exa_dma_completion *out, int max) {
  if (!q || !out || max <= 0) return fail(-EINVAL, "exa_dma_poll: bad arguments");
  if (q->mode != EXA_DMA_POLL) return fail(-EINVAL, "exa_dma_poll: queue %u is in callback mode", q->id);
  return poll_any(q, out, max);
}

int exa_dma_wait(exa_dma_queue *q, struct exa_dma_completion *out, int max, int timeout_ms) {
  if (!q || !out || max <= 0) return fail(-EINVAL, "exa_dma_wait: bad arguments");
  if (q->mode != EXA_DMA_POLL) return fail(-EINVAL, "exa_dma_wait: queue %u is in callback mode", q->id);
  return wait_any(q, out, max, timeout_ms);
}

/* Callback mode: the queue's own thread delivers completions (interrupt mode). */
static void *callback_thread(void *arg) {
  struct exa_dma_queue *q = arg;
  struct exa_dma_completion c[32];
  for (;;) {
    int n = wait_any(q, c, 32, -1);
    if (n < 0) {
      /* The backend is gone: outstanding operations can no longer complete; say so once each.
       * Under sq_lock, after dead is set: no post can slip in between (post checks dead under it). */
      pthread_mutex_lock(&q->sq_lock);
      uint64_t left = __atomic_load_n(&q->outstanding, __ATOMIC_ACQUIRE);
      pthread_mutex_unlock(&q->sq_lock);
      struct exa_dma_completion e = {0};
      e.status = -ECONNRESET;
      snprintf(e.reason, sizeof e.reason, "the DMA backend (agent) went away before the operation completed");
      for (uint64_t i = 0; i < left; i++) q->cb(&e, q->user);
      __atomic_store_n(&q->outstanding, 0, __ATOMIC_RELEASE);
      return NULL;
    }
    if (n == 0) {
      uint64_t v;
      if (read(q->stop_efd, &v, sizeof v) == sizeof v) return NULL; /* destroy */
      continue;
    }
    for (int i = 0; i < n; i++) q->cb(&c[i], q->user);
  }
}

static int queue_new(exa_dma *d, enum exa_dma_mode mode, exa_dma_callback cb, void *user, struct exa_dma_queue **out) {
  struct exa_dma_queue *q = NULL;
  if (posix_memalign((void **)&q, 64, sizeof *q) != 0) return fail(-ENOMEM, "exa_dma_queue_create: out of memory");
  memset(q, 0, sizeof *q);
  q->d = d;
  q->mode = mode;
  q->cb = cb;
  q->user = user;
  q->cq_efd = q->stop_efd = -1;
  pthread_mutex_init(&q->sq_lock, NULL);
  pthread_mutex_init(&q->cq_lock, NULL);
  pthread_mutex_init(&q->wait_lock, NULL);
  int r;
  int mfd = memfd_create("exa-dma-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (mfd < 0) {
    r = fail(-errno, "exa_dma_queue_create: memfd_create: %s", strerror(errno));
    goto err;
  }
  if (ftruncate(mfd, (off_t)EXA_DMA_RING_BYTES) != 0) {
    r = fail(-errno, "exa_dma_queue_create: ftruncate: %s", strerror(errno));
    close(mfd);
    goto err;
  }
  /* The backend (in the agent) maps the ring too: a shrink would make its accesses fault (SIGBUS),
   * so it only accepts a ring whose size is sealed. */
  if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    r = fail(-errno, "exa_dma_queue_create: sealing the ring: %s", strerror(errno));
    close(mfd);
    goto err;
  }
  q->ring = mmap(NULL, EXA_DMA_RING_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
  if (q->ring == MAP_FAILED) {
    q->ring = NULL;
    r = fail(-errno, "exa_dma_queue_create: mmap: %s", strerror(errno));
    close(mfd);
    goto err;
  }
  q->hdr = q->ring;
  q->hdr->magic = EXA_DMA_WIRE_MAGIC;
  q->hdr->version = EXA_DMA_WIRE_VERSION;
  q->hdr->depth = EXA_DMA_RING_DEPTH;
  q->cq_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (mode == EXA_DMA_CALLBACK) q->stop_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (q->cq_efd < 0 || (mode == EXA_DMA_CALLBACK && q->stop_efd < 0)) {
    r = fail(-errno, "exa_dma_queue_create: eventfd: %s", strerror(errno));
    close(mfd);
    goto err;
  }
  struct exa_dma_msg m = {0}, rep;
  m.type = EXA_DMA_MSG_QUEUE_ADD;
  int fds[2] = {mfd, q->cq_efd};
  pthread_mutex_lock(&d->lock);
  r = control(d, &m, fds, 2, &rep);
  pthread_mutex_unlock(&d->lock);
  close(mfd); /* the backend maps it; our mapping keeps the ring alive on this side */
  if (r < 0) goto err;
  q->id = rep.id;
  if (mode == EXA_DMA_CALLBACK) {
    if ((r = pthread_create(&q->thread, NULL, callback_thread, q)) != 0) {
      r = fail(-r, "exa_dma_queue_create: cannot start the completion thread");
      goto err;
    }
    q->has_thread = 1;
  }
  *out = q;
  return 0;
err:
  queue_release(q);
  return r;
}

int exa_dma_queue_create(exa_dma *d, enum exa_dma_mode mode, exa_dma_callback cb, void *user, exa_dma_queue **out) {
  if (!d || !out) return fail(-EINVAL, "exa_dma_queue_create: NULL argument");
  *out = NULL;
  if (mode != EXA_DMA_POLL && mode != EXA_DMA_CALLBACK) return fail(-EINVAL, "exa_dma_queue_create: unknown mode %d", (int)mode);
  if ((mode == EXA_DMA_CALLBACK) != (cb != NULL))
    return fail(-EINVAL, "exa_dma_queue_create: a callback is required in callback mode and refused in polling mode");
  struct exa_dma_queue *q;
  int r = queue_new(d, mode, cb, user, &q);
  if (r < 0) return r;
  pthread_mutex_lock(&d->lock);
  q->next = d->queues;
  d->queues = q;
  pthread_mutex_unlock(&d->lock);
  *out = q;
  return 0;
}

int exa_dma_queue_destroy(exa_dma_queue *q) {
  if (!q) return fail(-EINVAL, "exa_dma_queue_destroy: NULL");
  exa_dma *d = q->d;
  pthread_mutex_lock(&d->lock);
  struct exa_dma_queue **pp = &d->queues;
  while (*pp && *pp != q) pp = &(*pp)->next;
  if (!*pp) {
    pthread_mutex_unlock(&d->lock);
    return fail(-ENOENT, "exa_dma_queue_destroy: not a queue of this session");
  }
  *pp = q->next;
  /* The backend serves control messages between operations: after this reply it no longer
   * touches the ring, so unmapping it is safe. */
  struct exa_dma_msg m = {0}, rep;
  m.type = EXA_DMA_MSG_QUEUE_DEL;
  m.id = q->id;
  int r = control(d, &m, NULL, 0, &rep);
  pthread_mutex_unlock(&d->lock);
  queue_release(q);
  return r == -ECONNRESET ? 0 : r;
}

/* ---- posting ---- */

/* Post one request; the caller holds sq_lock (or alone uses q: the sync queue under sync_lock). */
static int post_locked(exa_dma_queue *q, uint16_t op, exa_dma_buf *local, uint64_t loff, exa_dma_remote remote, uint64_t roff,
                       uint64_t len, uint64_t tag) {
  if (__atomic_load_n(&q->d->dead, __ATOMIC_SEQ_CST)) return fail(-ECONNRESET, "exa_dma: the DMA backend (agent) went away");
  if (__atomic_load_n(&q->outstanding, __ATOMIC_ACQUIRE) >= EXA_DMA_RING_DEPTH)
    return fail(-EAGAIN, "exa_dma: queue %u has %d operations outstanding; reap completions first", q->id, EXA_DMA_RING_DEPTH);
  struct exa_dma_ring_hdr *h = q->hdr;
  uint64_t tail = q->sq_tail;
  struct exa_dma_req *e = &exa_dma_sq(q->ring)[tail % EXA_DMA_RING_DEPTH];
  /* Fill the entry (its one cache line; the stamp last): fewer outstanding than the depth means
   * this slot's previous operation was completed, so the backend is done reading it. */
  e->op = op;
  e->flags = 0;
  e->local = local->id;
  e->remote = remote;
  e->local_off = loff;
  e->remote_off = roff;
  e->len = len;
  e->tag = tag;
  e->reserved[0] = e->reserved[1] = 0;
  __atomic_add_fetch(&q->outstanding, 1, __ATOMIC_ACQ_REL);
  uint64_t extra = len > (10u << 20) ? (10u << 20) : len; /* ~1 ns a byte, at most ~10 ms */
  if (extra > __atomic_load_n(&q->spin_extra_ns, __ATOMIC_RELAXED)) __atomic_store_n(&q->spin_extra_ns, extra, __ATOMIC_RELAXED);
  q->sq_tail = tail + 1;
  __atomic_store_n(&e->seq, (uint32_t)(tail + 1), __ATOMIC_RELEASE);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (__atomic_load_n(&h->be_sleeping, __ATOMIC_SEQ_CST)) {
    uint64_t one = 1;
    if (write(q->d->sq_efd, &one, sizeof one) < 0) { /* counter overflow only: the backend is awake anyway */ }
  }
  return 0;
}

static int post(exa_dma_queue *q, uint16_t op, exa_dma_buf *local, uint64_t loff, exa_dma_remote remote, uint64_t roff,
                uint64_t len, uint64_t tag) {
  if (!q || !local) return fail(-EINVAL, "exa_dma: NULL queue or buffer");
  pthread_mutex_lock(&q->sq_lock);
  int r = post_locked(q, op, local, loff, remote, roff, len, tag);
  pthread_mutex_unlock(&q->sq_lock);
  return r;
}

int exa_dma_write(exa_dma_queue *q, exa_dma_buf *local, uint64_t local_off, exa_dma_remote remote, uint64_t remote_off,
                  uint64_t len, uint64_t tag) {
  return post(q, EXA_DMA_OP_WRITE, local, local_off, remote, remote_off, len, tag);
}

int exa_dma_read(exa_dma_queue *q, exa_dma_buf *local, uint64_t local_off, exa_dma_remote remote, uint64_t remote_off,
                 uint64_t len, uint64_t tag) {
  return post(q, EXA_DMA_OP_READ, local, local_off, remote, remote_off, len, tag);
}

static int sync_op(exa_dma *d, uint16_t op, exa_dma_buf *local, uint64_t loff, exa_dma_remote remote, uint64_t roff,
                   uint64_t len) {
  if (!d) return fail(-EINVAL, "exa_dma: NULL session");
  pthread_mutex_lock(&d->sync_lock);
  int r = 0;
  if (!d->syncq) r = queue_new(d, EXA_DMA_POLL, NULL, NULL, &d->syncq);
  /* Only this call uses the sync queue (sync_lock): no queue locks on its hot path, and the next
   * completion is ours. */
  if (r == 0 && !local) r = fail(-EINVAL, "exa_dma: NULL buffer");
  if (r == 0) r = post_locked(d->syncq, op, local, loff, remote, roff, len, 0);
  if (r == 0) {
    struct exa_dma_completion c;
    int n = wait_common(d->syncq, &c, 1, -1, 1);
    if (n < 0) r = n;
    else if (c.status < 0) r = fail(c.status, "%s", c.reason);
  }
  pthread_mutex_unlock(&d->sync_lock);
  return r;
}

int exa_dma_write_sync(exa_dma *d, exa_dma_buf *local, uint64_t local_off, exa_dma_remote remote, uint64_t remote_off,
                       uint64_t len) {
  return sync_op(d, EXA_DMA_OP_WRITE, local, local_off, remote, remote_off, len);
}

int exa_dma_read_sync(exa_dma *d, exa_dma_buf *local, uint64_t local_off, exa_dma_remote remote, uint64_t remote_off,
                      uint64_t len) {
  return sync_op(d, EXA_DMA_OP_READ, local, local_off, remote, remote_off, len);
}

/* Test hook (not in exa.h): put a raw 64-byte request entry in the next request slot, stamped as
 * sequence tail + advance - 1 (1 = the right stamp; other values forge a garbage stamp: a torn or
 * corrupted ring). Proves the backend distrusts the ring. */
int exa__dma_test_post_raw(exa_dma_queue *q, const void *entry, uint64_t advance) {
  if (!q || !entry) return fail(-EINVAL, "exa__dma_test_post_raw: NULL");
  pthread_mutex_lock(&q->sq_lock);
  uint64_t tail = q->sq_tail;
  struct exa_dma_req *e = &exa_dma_sq(q->ring)[tail % EXA_DMA_RING_DEPTH];
  struct exa_dma_req r;
  memcpy(&r, entry, sizeof r);
  r.seq = 0;
  memcpy(e, &r, sizeof r);
  __atomic_add_fetch(&q->outstanding, 1, __ATOMIC_ACQ_REL);
  q->sq_tail = tail + 1;
  __atomic_store_n(&e->seq, (uint32_t)(tail + advance), __ATOMIC_RELEASE);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (__atomic_load_n(&q->hdr->be_sleeping, __ATOMIC_SEQ_CST)) {
    uint64_t one = 1;
    if (write(q->d->sq_efd, &one, sizeof one) < 0) { /* awake anyway */ }
  }
  pthread_mutex_unlock(&q->sq_lock);
  return 0;
}
