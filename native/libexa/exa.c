/*
 * libexa: the workload side of exackpt (see exa.h for the contract and
 * exa_wire.h for the protocol).
 *
 * Ownership: the ctx owns the agent socket and the list of regions; each
 * region owns its mapping (the memfd itself is handed to the agent and our
 * copy closed right after mmap). The uffds are created here, passed to the
 * agent and our copies closed before exa_attach() returns, so that when the
 * agent dies the kernel drops the last uffd reference and wakes any thread
 * blocked on a write-protect fault.
 */
#define _GNU_SOURCE
#include "exa.h"
#include "exa_linux_compat.h"
#include "exa_wire.h"
#include "internal.h"
#include "restore.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <unistd.h>

struct exa_region {
  struct exa_region *next;
  char name[EXA_WIRE_NAME];
  void *addr;
  size_t size;
};

struct exa_ctx {
  pthread_mutex_t lock; /* serializes requests on the socket and the region list */
  int sock;
  uint32_t seq;
  char job[EXA_WIRE_NAME];
  struct exa_region *regions;
  int nregions;
  struct exa_restore *restore; /* the staged image when launched with EXA_RESTORE, else NULL */
  char sock_path[108];          /* the agent socket: the DMA frontend derives its socket from it */
};

static __thread char g_err[512];

static int fail(int err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_err, sizeof g_err, fmt, ap);
  va_end(ap);
  return err;
}

/* For the other libexa units (restore.c). */
int exa_fail(int err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_err, sizeof g_err, fmt, ap);
  va_end(ap);
  return err;
}

const char *exa_last_error(void) { return g_err; }

const char *exa_strerror(int err) { return strerror(err < 0 ? -err : err); }

int exa__valid_name(const char *s) {
  size_t n = 0;
  if (!s) return 0;
  for (; s[n]; n++) {
    char c = s[n];
    if (n >= EXA_NAME_MAX) return 0;
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
      return 0;
  }
  return n > 0;
}

#define valid_name exa__valid_name

int exa__send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
  if (nfds < 0 || nfds > 4) return -EINVAL;
  struct iovec iov = {(void *)buf, len};
  union {
    char b[CMSG_SPACE(sizeof(int) * 4)];
    struct cmsghdr align;
  } cm;
  struct msghdr mh = {0};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  if (nfds > 0) {
    memset(&cm, 0, sizeof cm);
    mh.msg_control = cm.b;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  for (;;) {
    ssize_t n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    if (n >= 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

/* Send one message with optional fds. */
static int send_msg(int sock, uint16_t type, uint32_t seq, const void *payload, uint32_t len, const int *fds, int nfds) {
  struct exa_msg_hdr hdr = {EXA_WIRE_MAGIC, EXA_WIRE_VERSION, type, seq, len};
  char buf[sizeof hdr + 512];
  if (len > 512) return -EINVAL;
  memcpy(buf, &hdr, sizeof hdr);
  if (len) memcpy(buf + sizeof hdr, payload, len);
  return exa__send_with_fds(sock, buf, sizeof hdr + len, fds, nfds);
}

/* Wait for the REPLY to seq; *fd_out receives a passed fd (or -1). */
static int recv_reply(int sock, uint32_t seq, struct exa_msg_reply *rep, int *fd_out) {
  char buf[EXA_WIRE_MAX_MSG + 16];
  union {
    char b[CMSG_SPACE(sizeof(int) * 4)];
    struct cmsghdr align;
  } cm;
  if (fd_out) *fd_out = -1;
  for (;;) {
    struct iovec iov = {buf, sizeof buf};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cm.b;
    mh.msg_controllen = sizeof cm.b;
    ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(-errno, "exa: lost the agent: %s", strerror(errno));
    if (n == 0) return fail(-ECONNRESET, "exa: the agent closed the connection");
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        int nf = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int fds[4];
        memcpy(fds, CMSG_DATA(c), sizeof(int) * (nf > 4 ? 4 : nf));
        for (int i = 0; i < nf && i < 4; i++) {
          if (fd_out && *fd_out < 0) *fd_out = fds[i];
          else close(fds[i]);
        }
      }
    }
    struct exa_msg_hdr hdr;
    if ((size_t)n != sizeof hdr + sizeof *rep) goto bad;
    memcpy(&hdr, buf, sizeof hdr);
    if (hdr.magic != EXA_WIRE_MAGIC || hdr.version != EXA_WIRE_VERSION || hdr.type != EXA_MSG_REPLY || hdr.len != sizeof *rep)
      goto bad;
    memcpy(rep, buf + sizeof hdr, sizeof *rep);
    rep->text[EXA_WIRE_TEXT - 1] = 0;
    if (hdr.seq != seq) goto bad;
    if (rep->status > 0) goto bad;
    return 0;
  bad:
    if (fd_out && *fd_out >= 0) { close(*fd_out); *fd_out = -1; }
    return fail(-EPROTO, "exa: malformed reply from the agent");
  }
}

/* One request/response exchange; returns the agent's status (0 or -errno) and sets the error text. */
static int request(exa_ctx *ctx, uint16_t type, const void *payload, uint32_t len, const int *fds, int nfds,
                   int *fd_out, uint32_t *flags_out) {
  uint32_t seq = ++ctx->seq;
  int r = send_msg(ctx->sock, type, seq, payload, len, fds, nfds);
  if (r < 0) return fail(r, "exa: cannot send to the agent: %s", strerror(-r));
  struct exa_msg_reply rep;
  r = recv_reply(ctx->sock, seq, &rep, fd_out);
  if (r < 0) return r;
  if (flags_out) *flags_out = rep.flags;
  if (rep.status < 0) return fail(rep.status, "%s", rep.text[0] ? rep.text : strerror(-rep.status));
  return 0;
}

int exa__test_request(struct exa_ctx *ctx, unsigned type, const void *payload, unsigned len, const int *fds, int nfds) {
  pthread_mutex_lock(&ctx->lock);
  int r = request(ctx, (uint16_t)type, payload, len, fds, nfds, NULL, NULL);
  pthread_mutex_unlock(&ctx->lock);
  return r;
}

static int kernel_at_least(int maj, int min) {
  struct utsname u;
  int a = 0, b = 0;
  if (uname(&u) != 0 || sscanf(u.release, "%d.%d", &a, &b) != 2) return 0;
  return a > maj || (a == maj && b >= min);
}

/* Create a uffd from the passed /dev/userfaultfd (or the syscall as a fallback) and negotiate features. */
static int make_uffd(int devfd, uint64_t features, uint64_t *got) {
  int fd;
  if (devfd >= 0) fd = ioctl(devfd, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
  else fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
  if (fd < 0) return -errno;
  struct uffdio_api api = {.api = UFFD_API, .features = features};
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  if (got) *got = api.features;
  return fd;
}

int exa_attach(const char *socket_path, const char *job_id, exa_ctx **out) {
  if (!out) return fail(-EINVAL, "exa_attach: out is NULL");
  *out = NULL;
  if (!socket_path) socket_path = getenv("EXA_AGENT_SOCKET");
  if (!job_id) job_id = getenv("EXA_JOB_ID");
  if (!socket_path || !*socket_path) return fail(-EINVAL, "exa_attach: no agent socket (argument or EXA_AGENT_SOCKET)");
  if (!valid_name(job_id))
    return fail(-EINVAL, "exa_attach: job id \"%s\" is not 1..63 characters of [A-Za-z0-9._-]", job_id ? job_id : "(null)");
  if (!kernel_at_least(5, 19)) {
    struct utsname u;
    uname(&u);
    return fail(-ENOTSUP, "exa_attach: Linux %s is older than 5.19 (userfaultfd write-protect on shmem is required)", u.release);
  }
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(socket_path) >= sizeof sa.sun_path) return fail(-ENAMETOOLONG, "exa_attach: socket path too long: %s", socket_path);
  strcpy(sa.sun_path, socket_path);
  int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (sock < 0) return fail(-errno, "exa_attach: socket: %s", strerror(errno));
  if (connect(sock, (struct sockaddr *)&sa, sizeof sa) != 0) {
    int e = errno;
    close(sock);
    return fail(-e, "exa_attach: no agent listening on %s: %s", socket_path, strerror(e));
  }
  exa_ctx *ctx = calloc(1, sizeof *ctx);
  if (!ctx) {
    close(sock);
    return fail(-ENOMEM, "exa_attach: out of memory");
  }
  pthread_mutex_init(&ctx->lock, NULL);
  ctx->sock = sock;
  snprintf(ctx->job, sizeof ctx->job, "%s", job_id);
  snprintf(ctx->sock_path, sizeof ctx->sock_path, "%s", socket_path);

  struct exa_msg_hello hello = {0};
  snprintf(hello.job, sizeof hello.job, "%s", job_id);
  hello.api_version = EXA_API_VERSION;
  int devfd = -1;
  uint32_t rflags = 0;
  int r = request(ctx, EXA_MSG_HELLO, &hello, sizeof hello, NULL, 0, &devfd, &rflags);
  if (r < 0) goto out_err;

  const uint64_t need = UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED;
  uint64_t got = 0;
  uint32_t uflags = 0;
  if (devfd < 0) {
    fprintf(stderr,
            "exa: warning: the agent could not pass /dev/userfaultfd; falling back to a UFFD_USER_MODE_ONLY userfaultfd: "
            "a read()/recv() into a region during a checkpoint will fail with EFAULT\n");
    uflags |= EXA_UFFDS_USER_ONLY;
  }
  int sync_fd = make_uffd(devfd, need, &got);
  if (sync_fd < 0) {
    r = fail(sync_fd, "exa_attach: cannot create a write-protect userfaultfd with shmem and unpopulated support: %s",
             strerror(-sync_fd));
    if (devfd >= 0) close(devfd);
    goto out_err;
  }
  int fds[3] = {sync_fd, -1, -1};
  int nfds = 1;
  int async_fd = make_uffd(devfd, need | UFFD_FEATURE_WP_ASYNC, NULL);
  if (devfd >= 0) close(devfd);
  if (async_fd >= 0) {
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    struct pm_scan_arg probe = {.size = sizeof probe};
    /* A zero-length scan tells whether PAGEMAP_SCAN exists at all (ENOTTY before 6.7). */
    if (pm >= 0 && ioctl(pm, PAGEMAP_SCAN, &probe) >= 0) {
      fds[1] = async_fd;
      fds[2] = pm;
      nfds = 3;
      uflags |= EXA_UFFDS_HAS_ASYNC;
    } else {
      if (pm >= 0) close(pm);
      close(async_fd);
    }
  }
  struct exa_msg_uffds um = {.nfds = (uint32_t)nfds, .flags = uflags};
  r = request(ctx, EXA_MSG_UFFDS, &um, sizeof um, fds, nfds, NULL, NULL);
  /* Our copies go whatever the answer: the agent holds the only references from now on. */
  for (int i = 0; i < nfds; i++) close(fds[i]);
  if (r < 0) goto out_err;
  /* Relaunched from a checkpoint: regions of these names come back with their contents. */
  const char *restore_dir = getenv("EXA_RESTORE");
  if (restore_dir && *restore_dir) {
    r = exa_restore_open(restore_dir, ctx->job, &ctx->restore);
    if (r < 0) {
      request(ctx, EXA_MSG_DETACH, NULL, 0, NULL, 0, NULL, NULL);
      goto out_err;
    }
  }
  *out = ctx;
  return 0;
out_err:
  close(sock);
  pthread_mutex_destroy(&ctx->lock);
  free(ctx);
  return r;
}

int exa_detach(exa_ctx *ctx) {
  if (!ctx) return fail(-EINVAL, "exa_detach: ctx is NULL");
  pthread_mutex_lock(&ctx->lock);
  int r = request(ctx, EXA_MSG_DETACH, NULL, 0, NULL, 0, NULL, NULL);
  struct exa_region *g = ctx->regions;
  while (g) {
    struct exa_region *n = g->next;
    free(g); /* the mapping stays: the job may still use its memory */
    g = n;
  }
  close(ctx->sock);
  exa_restore_close(ctx->restore);
  pthread_mutex_unlock(&ctx->lock);
  pthread_mutex_destroy(&ctx->lock);
  free(ctx);
  return r == -ECONNRESET ? 0 : r;
}

/* For the DMA frontend (dma.c): the agent socket this ctx is attached to. */
const char *exa__socket_path(const exa_ctx *ctx) { return ctx->sock_path; }

static int region_alloc(exa_ctx *ctx, const char *name, size_t size, unsigned flags, exa_region **out, int *keep_fd);

int exa_region_alloc(exa_ctx *ctx, const char *name, size_t size, unsigned flags, exa_region **out) {
  return region_alloc(ctx, name, size, flags, out, NULL);
}

/* For the DMA frontend: allocate a region and also return a duplicate of its memfd (the caller
 * owns it), which the DMA backend maps to read the buffer without copying through the job. */
int exa__region_alloc_fd(exa_ctx *ctx, const char *name, size_t size, unsigned flags, exa_region **out, int *fd_out) {
  return region_alloc(ctx, name, size, flags, out, fd_out);
}

static int region_alloc(exa_ctx *ctx, const char *name, size_t size, unsigned flags, exa_region **out, int *keep_fd) {
  if (keep_fd) *keep_fd = -1;
  if (!ctx || !out) return fail(-EINVAL, "exa_region_alloc: ctx/out is NULL");
  *out = NULL;
  if (!valid_name(name))
    return fail(-EINVAL, "exa_region_alloc: region name \"%s\" is not 1..63 characters of [A-Za-z0-9._-]", name ? name : "(null)");
  if (flags & ~EXA_REGION_FIXED) return fail(-EINVAL, "exa_region_alloc: unknown flags 0x%x", flags);
  if (size == 0) return fail(-EINVAL, "exa_region_alloc: region \"%s\": size 0", name);
  if ((unsigned long long)size > EXA_REGION_MAX_BYTES)
    return fail(-EINVAL, "exa_region_alloc: region \"%s\": size %zu exceeds the limit of %llu bytes", name, size,
                (unsigned long long)EXA_REGION_MAX_BYTES);
  size_t pg = (size_t)sysconf(_SC_PAGESIZE);
  size = (size + pg - 1) & ~(pg - 1);
  pthread_mutex_lock(&ctx->lock);
  int r;
  for (struct exa_region *g = ctx->regions; g; g = g->next) {
    if (strcmp(g->name, name) == 0) {
      r = fail(-EEXIST, "exa_region_alloc: region \"%s\" already exists in job %s", name, ctx->job);
      goto out;
    }
  }
  int mfd = -1;
  uint64_t want_addr = 0;
  if (ctx->restore) {
    /* The staged region file becomes the backing: its contents are the checkpoint's. */
    r = exa_restore_take(ctx->restore, name, size, &mfd, &want_addr);
    if (r < 0) goto out;
  }
  if (mfd < 0) {
    want_addr = 0;
    mfd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0) {
      r = fail(-errno, "exa_region_alloc: memfd_create(%s): %s", name, strerror(errno));
      goto out;
    }
    if (ftruncate(mfd, (off_t)size) != 0) {
      r = fail(-errno, "exa_region_alloc: region \"%s\": cannot size to %zu bytes: %s", name, size, strerror(errno));
      close(mfd);
      goto out;
    }
    /* The agent maps the memfd too; a shrink under its mapping would crash it (SIGBUS). */
    if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
      r = fail(-errno, "exa_region_alloc: region \"%s\": cannot seal its memfd: %s", name, strerror(errno));
      close(mfd);
      goto out;
    }
  }
  void *addr;
  if ((flags & EXA_REGION_FIXED) && want_addr) {
    /* Back at the original address, or a clear error: never silently elsewhere. */
    addr = mmap((void *)(uintptr_t)want_addr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, mfd, 0);
    if (addr != MAP_FAILED && addr != (void *)(uintptr_t)want_addr) {
      munmap(addr, size);
      addr = MAP_FAILED;
      errno = EEXIST;
    }
    if (addr == MAP_FAILED) {
      r = fail(-errno, "exa_region_alloc: region \"%s\": cannot map at its original address 0x%llx: %s", name,
               (unsigned long long)want_addr, strerror(errno));
      close(mfd);
      goto out;
    }
  } else {
    addr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
  }
  if (addr == MAP_FAILED) {
    r = fail(-errno, "exa_region_alloc: region \"%s\": mmap of %zu bytes: %s", name, size, strerror(errno));
    close(mfd);
    goto out;
  }
  /* A forked child would inherit the shared mapping without the uffd registration (no
   * UFFD_FEATURE_EVENT_FORK): its writes would silently escape checkpoints. Not inheriting the
   * region at all turns that into a clean fault in the child. */
  madvise(addr, size, MADV_DONTFORK);
  struct exa_msg_region_add m = {0};
  snprintf(m.name, sizeof m.name, "%s", name);
  m.size = size;
  m.addr = (uint64_t)(uintptr_t)addr;
  r = request(ctx, EXA_MSG_REGION_ADD, &m, sizeof m, &mfd, 1, NULL, NULL);
  if (r == 0 && keep_fd) {
    *keep_fd = fcntl(mfd, F_DUPFD_CLOEXEC, 0);
    if (*keep_fd < 0) r = fail(-errno, "exa_region_alloc: region \"%s\": dup of its memfd: %s", name, strerror(errno));
  }
  close(mfd);
  if (r < 0) {
    munmap(addr, size);
    goto out;
  }
  struct exa_region *g = calloc(1, sizeof *g);
  if (!g) {
    /* The agent has it registered; it is dropped on detach. */
    r = fail(-ENOMEM, "exa_region_alloc: out of memory");
    goto out;
  }
  snprintf(g->name, sizeof g->name, "%s", name);
  g->addr = addr;
  g->size = size;
  g->next = ctx->regions;
  ctx->regions = g;
  ctx->nregions++;
  *out = g;
  r = 0;
out:
  pthread_mutex_unlock(&ctx->lock);
  return r;
}

int exa_region_free(exa_ctx *ctx, exa_region *region) {
  if (!ctx || !region) return fail(-EINVAL, "exa_region_free: ctx/region is NULL");
  pthread_mutex_lock(&ctx->lock);
  struct exa_region **pp = &ctx->regions;
  while (*pp && *pp != region) pp = &(*pp)->next;
  int r;
  if (!*pp) {
    r = fail(-ENOENT, "exa_region_free: not a region of job %s", ctx->job);
    goto out;
  }
  struct exa_msg_region_free m = {0};
  snprintf(m.name, sizeof m.name, "%s", region->name);
  r = request(ctx, EXA_MSG_REGION_FREE, &m, sizeof m, NULL, 0, NULL, NULL);
  if (r < 0) goto out;
  *pp = region->next;
  ctx->nregions--;
  munmap(region->addr, region->size);
  free(region);
out:
  pthread_mutex_unlock(&ctx->lock);
  return r;
}

exa_region *exa_region_find(exa_ctx *ctx, const char *name) {
  if (!ctx || !name) return NULL;
  pthread_mutex_lock(&ctx->lock);
  struct exa_region *g = ctx->regions;
  while (g && strcmp(g->name, name) != 0) g = g->next;
  pthread_mutex_unlock(&ctx->lock);
  return g;
}

int exa_region_list(exa_ctx *ctx, exa_region **out, size_t max) {
  if (!ctx) return fail(-EINVAL, "exa_region_list: ctx is NULL");
  pthread_mutex_lock(&ctx->lock);
  size_t i = 0;
  for (struct exa_region *g = ctx->regions; g; g = g->next, i++)
    if (out && i < max) out[i] = g;
  pthread_mutex_unlock(&ctx->lock);
  return (int)i;
}

void *exa_region_addr(const exa_region *region) { return region ? region->addr : NULL; }
size_t exa_region_size(const exa_region *region) { return region ? region->size : 0; }
const char *exa_region_name(const exa_region *region) { return region ? region->name : NULL; }

int exa_checkpoint(exa_ctx *ctx) {
  if (!ctx) return fail(-EINVAL, "exa_checkpoint: ctx is NULL");
  pthread_mutex_lock(&ctx->lock);
  int r = request(ctx, EXA_MSG_CKPT_REQ, NULL, 0, NULL, 0, NULL, NULL);
  pthread_mutex_unlock(&ctx->lock);
  return r;
}

int exa_restored(const exa_ctx *ctx) { return ctx && ctx->restore ? 1 : 0; }

const char *exa_job_id(const exa_ctx *ctx) { return ctx ? ctx->job : NULL; }
