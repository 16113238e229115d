/*
 * ckpt.cc: the live incremental checkpointer, agent side. See ckpt.h for the
 * threads and who owns what, DESIGN.md §3 for the algorithm.
 *
 * Tracking scheme (measured on Linux 6.18, see BENCHMARKS.md "ckpt"):
 *  - Between checkpoints a region is registered on the workload's WP_ASYNC
 *    uffd: the kernel resolves write faults itself (~1 us) and clears the
 *    page's uffd-wp bit; PAGEMAP_SCAN (PM_SCAN_WP_MATCHING) reads and
 *    re-protects the written set during the pause. No write is ever lost:
 *    a page is either write-protected or already in the next dirty set.
 *  - At the pause, per region: if its dirty set fits the shadow budget, the
 *    dirty pages are copied to shadow memory during the pause and streamed from
 *    there ("copy" path, the region stays on async tracking, no sync faults).
 *    Otherwise (always for a chain's first checkpoint of a big region) the
 *    region moves to the synchronous uffd, everything is write-protected and
 *    the seed's four fault cases run while the saver streams ("sync" path).
 *    When that save ends, a short second stop moves the region back to async
 *    tracking; pages written meanwhile stay in the next dirty set (WRITTEN).
 *  - Without WP_ASYNC/PAGEMAP_SCAN the sync path is used for everything
 *    (the pure seed scheme).
 */
#include "ckpt.h"
#include "guardian.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <stdexcept>

#include "exa.h"
#include "exa_linux_compat.h"
#include "exa_sha256.h"
#include "exa_wire.h"

namespace exa {

std::string errstr(int e) { return strerror(e < 0 ? -e : e); }

bool valid_name(const char *s, size_t cap) {
  size_t n = strnlen(s, cap);
  if (n == 0 || n >= cap || n > EXA_NAME_MAX) return false;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
      return false;
  }
  return true;
}

namespace {

uint64_t now_us() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

int send_reply(int fd, uint32_t seq, int status, const std::string &text, int pass_fd = -1, uint32_t flags = 0) {
  char buf[sizeof(exa_msg_hdr) + sizeof(exa_msg_reply)];
  exa_msg_hdr hdr{EXA_WIRE_MAGIC, EXA_WIRE_VERSION, EXA_MSG_REPLY, seq, (uint32_t)sizeof(exa_msg_reply)};
  exa_msg_reply rep{};
  rep.status = status;
  rep.flags = flags;
  snprintf(rep.text, sizeof rep.text, "%s", text.c_str());
  memcpy(buf, &hdr, sizeof hdr);
  memcpy(buf + sizeof hdr, &rep, sizeof rep);
  struct iovec iov = {buf, sizeof buf};
  union {
    char b[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } cm;
  struct msghdr mh {};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  if (pass_fd >= 0) {
    memset(&cm, 0, sizeof cm);
    mh.msg_control = cm.b;
    mh.msg_controllen = sizeof cm.b;
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  for (;;) {
    ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return 0;
    if (errno == EINTR) continue;
    return -errno;
  }
}

std::string fd_link(int fd) {
  char p[64], out[256];
  snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(p, out, sizeof out - 1);
  if (n < 0) return "";
  out[n] = 0;
  return out;
}

bool kernel_at_least(int maj, int min, std::string *rel) {
  struct utsname u;
  int a = 0, b = 0;
  if (uname(&u) != 0 || sscanf(u.release, "%d.%d", &a, &b) != 2) return false;
  if (rel) *rel = u.release;
  return a > maj || (a == maj && b >= min);
}

int uffd_register(int uffd, uint64_t start, uint64_t len) {
  struct uffdio_register r {};
  r.range.start = start;
  r.range.len = len;
  r.mode = UFFDIO_REGISTER_MODE_WP;
  if (ioctl(uffd, UFFDIO_REGISTER, &r) != 0) return -errno;
  if (!(r.ioctls & (1ull << _UFFDIO_WRITEPROTECT))) return -EOPNOTSUPP;
  return 0;
}

int uffd_unregister(int uffd, uint64_t start, uint64_t len) {
  struct uffdio_range r {start, len};
  return ioctl(uffd, UFFDIO_UNREGISTER, &r) == 0 ? 0 : -errno;
}

int uffd_wp(int uffd, uint64_t start, uint64_t len, bool protect) {
  struct uffdio_writeprotect w {};
  w.range.start = start;
  w.range.len = len;
  w.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
  for (;;) {
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) == 0) return 0;
    if (errno == EAGAIN) continue; /* the mm was busy changing: retry */
    return -errno;
  }
}

bool page_is_zero(const uint8_t *p) {
  const uint64_t *w = (const uint64_t *)p;
  /* one cache line at a time: a non-zero page almost always fails in the first */
  for (size_t i = 0; i < kPage / 8; i += 8)
    if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) return false;
  return true;
}

}  // namespace

/*
 * Page state during and between checkpoints. Exactly one function below
 * performs each transition; the fault handler's four cases are one switch.
 *
 *   CLEAN    not in the running checkpoint's set; protected (sync) or tracked by the kernel (async)
 *   PENDING  in the set, not saved yet, write-protected
 *   SAVING   the saver is copying it right now, write-protected
 *   SAVED    saved, still write-protected
 *   SHADOWED in the set; its pause-time bytes are in a shadow slot; unprotected
 *   WRITTEN  written since the pause (or carried over): in the next checkpoint's set
 */
/* Size of one step when switching a region back to async tracking (one short stop per step). */
constexpr uint64_t kResyncChunk = 64ull << 20;

enum PageState : uint8_t { PAGE_CLEAN, PAGE_PENDING, PAGE_SAVING, PAGE_SAVED, PAGE_SHADOWED, PAGE_WRITTEN };

struct Region {
  std::string name;
  uint64_t addr = 0, size = 0, npages = 0;
  int memfd = -1;
  const uint8_t *view = nullptr; /* agent's read-only MAP_SHARED mapping of the memfd */
  enum Reg { REG_SYNC, REG_ASYNC } reg = REG_SYNC;
  bool base_done = false; /* a completed checkpoint holds every page of it */
  bool prewp = false;     /* write-protected ahead of the stop: faults are recorded in Job::rewp */
  bool sync_save = false; /* the running checkpoint saves it on the live sync path */
  bool in_session = false;
  std::vector<uint8_t> state;
  std::vector<uint32_t> slot; /* shadow slot of a SHADOWED page */
  std::vector<uint8_t> remote_dirty; /* written through remote_write() since the last pause */
  uint64_t remote_dirty_count = 0;
  uint8_t *wview = nullptr; /* writable mapping for remote_write(), made on first use */
  ~Region() {
    if (wview) munmap(wview, size);
    if (view) munmap((void *)view, size);
    if (memfd >= 0) close(memfd);
  }
};

/* Bounded shadow memory: slots of one page, reserved lazily (MAP_NORESERVE). */
struct Shadow {
  uint8_t *mem = nullptr;
  size_t nslots = 0, used = 0, peak = 0;
  std::vector<uint32_t> free_slots;
  void init(size_t bytes) {
    nslots = bytes / kPage;
    if (nslots == 0) return;
    void *m = mmap(nullptr, nslots * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      nslots = 0;
      return;
    }
    mem = (uint8_t *)m;
    free_slots.reserve(nslots);
    for (size_t i = nslots; i > 0; i--) free_slots.push_back((uint32_t)(i - 1));
  }
  void fini() {
    if (mem) munmap(mem, nslots * kPage);
    mem = nullptr;
    nslots = used = peak = 0;
    free_slots.clear();
  }
  /* Between checkpoints: keep the mapping (a fresh one costs a page fault per slot in the next
   * pause) but let the kernel take the memory back under pressure (MADV_FREE). */
  void reset(size_t bytes) {
    if (mem && nslots == bytes / kPage) {
      if (peak) madvise(mem, peak * kPage, MADV_FREE);
      free_slots.clear();
      for (size_t i = nslots; i > 0; i--) free_slots.push_back((uint32_t)(i - 1));
      used = peak = 0;
      return;
    }
    fini();
    init(bytes);
  }
  long take() {
    if (free_slots.empty()) return -1;
    uint32_t s = free_slots.back();
    free_slots.pop_back();
    used++;
    peak = std::max(peak, used);
    return s;
  }
  void give(uint32_t s) {
    free_slots.push_back(s);
    used--;
  }
  uint8_t *at(uint32_t s) { return mem + (size_t)s * kPage; }
  size_t free_count() const { return free_slots.size(); }
};

class Job {
 public:
  std::string id;
  int pid = 0, uid = 0;
  int pidfd = -1;
  /* SIGSTOPped by this agent and not resumed yet (the guardian knows too). */
  std::atomic<bool> stopped_by_agent{false};
  int reply_fd = -1; /* our dup of the connection, for replies sent from saver threads */
  int uffd_sync = -1, uffd_async = -1, pagemap = -1;
  bool has_async = false, user_only = false;
  std::atomic<bool> gone{false}; /* the workload's connection closed */

  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::shared_ptr<Region>> regions;
  Session *active = nullptr; /* running checkpoint (saving phase), for fault accounting */
  bool busy = false;         /* a session exists and has not finished */
  uint64_t checkpoints = 0;
  std::vector<uint32_t> pending_requests; /* seq of exa_checkpoint() calls waiting for a pause */
  std::vector<std::pair<Region *, uint64_t>> urgent;   /* case-3 pages that found the shadow full */
  std::vector<std::pair<Region *, uint64_t>> deferred; /* faults (case 4, full-shadow case 3) resolved once saved */
  std::vector<std::pair<Region *, uint64_t>> rewp;     /* pages unprotected between pre-protect and stop */
  Shadow shadow;
  uint64_t faults_outside = 0; /* sync faults between checkpoints (pure sync mode) */

  std::thread fault_thread;
  int stop_efd = -1;

  ~Job() {
    shutdown();
    regions.clear();
    shadow.fini();
  }

  /* Stop the fault thread and close every fd the workload passed: closing the
   * last uffd reference makes the kernel drop the registrations and wake any
   * thread still blocked on a fault. Idempotent; not from the fault thread. */
  void shutdown() {
    if (stop_efd >= 0) {
      uint64_t one = 1;
      (void)!write(stop_efd, &one, sizeof one);
    }
    if (fault_thread.joinable()) fault_thread.join();
    std::lock_guard<std::mutex> g(mu);
    /* An agent that lets go of a job never leaves it stopped (e.g. closed while it was held). */
    if (pidfd >= 0 && stopped_by_agent) syscall(SYS_pidfd_send_signal, pidfd, SIGCONT, nullptr, 0);
    stopped_by_agent = false;
    if (pidfd >= 0) guardian::resumed(pid);
    for (int *fd : {&stop_efd, &uffd_sync, &uffd_async, &pagemap, &pidfd, &reply_fd}) {
      if (*fd >= 0) close(*fd);
      *fd = -1;
    }
  }

  void start_fault_thread() {
    stop_efd = eventfd(0, EFD_CLOEXEC);
    fault_thread = std::thread([this] { fault_loop(); });
  }

  Region *find_region_locked(uint64_t addr) {
    for (auto &r : regions)
      if (addr >= r->addr && addr < r->addr + r->size) return r.get();
    return nullptr;
  }

  void reply(uint32_t seq, int status, const std::string &text) {
    if (reply_fd >= 0) send_reply(reply_fd, seq, status, text);
  }

  /* SIGSTOP the workload and wait until every thread is stopped. */
  int stop(std::string *err) {
    if (pidfd < 0) {
      *err = "job " + id + ": detached";
      return -ESRCH;
    }
    /* first the guardian, so an agent dying right after the SIGSTOP still gets the job resumed */
    guardian::stopping(pid, pidfd);
    stopped_by_agent = true;
    if (syscall(SYS_pidfd_send_signal, pidfd, SIGSTOP, nullptr, 0) != 0) {
      int e = errno;
      stopped_by_agent = false;
      guardian::resumed(pid);
      *err = "job " + id + ": cannot stop pid " + std::to_string(pid) + ": " + errstr(e);
      return -e;
    }
    uint64_t deadline = now_us() + 10u * 1000000u;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    for (;;) {
      DIR *d = opendir(path);
      if (!d) {
        *err = "job " + id + ": pid " + std::to_string(pid) + " is gone";
        return -ESRCH;
      }
      bool all = true;
      while (struct dirent *e = readdir(d)) {
        if (e->d_name[0] == '.') continue;
        char sp[384], buf[512];
        snprintf(sp, sizeof sp, "%s/%s/stat", path, e->d_name);
        int fd = open(sp, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue; /* thread exited */
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        buf[n] = 0;
        char *rp = strrchr(buf, ')');
        char st = rp && rp[1] ? rp[2] : '?';
        if (st != 'T' && st != 't' && st != 'Z' && st != 'X') {
          all = false;
          break;
        }
      }
      closedir(d);
      if (all) return 0;
      if (now_us() > deadline) {
        resume();
        *err = "job " + id + ": threads of pid " + std::to_string(pid) + " did not stop within 10 s";
        return -ETIMEDOUT;
      }
      usleep(20);
    }
  }

  void resume() {
    syscall(SYS_pidfd_send_signal, pidfd, SIGCONT, nullptr, 0);
    stopped_by_agent = false;
    guardian::resumed(pid);
  }

  /* ---- page-state transitions (job mutex held) ---- */

  /* pause: page enters the checkpoint's set on the live sync path */
  static void to_pending(Region &r, uint64_t p) { r.state[p] = PAGE_PENDING; }
  /* pause: page leaves any set (it will be tracked again from now) */
  static void to_clean(Region &r, uint64_t p) { r.state[p] = PAGE_CLEAN; }
  /* pause (copy path) or fault case 3: copy the pause-time bytes to shadow */
  bool to_shadowed(Region &r, uint64_t p, CkptStats *st) {
    long s = shadow.take();
    if (s < 0) return false;
    memcpy(shadow.at((uint32_t)s), r.view + p * kPage, kPage);
    r.slot[p] = (uint32_t)s;
    r.state[p] = PAGE_SHADOWED;
    if (st) {
      st->shadow_copies++;
      st->shadow_peak_bytes = std::max<uint64_t>(st->shadow_peak_bytes, shadow.peak * kPage);
    }
    return true;
  }
  /* pause, copy path: the page's pause-time bytes go to shadow (the caller copies them while the job is stopped) */
  uint8_t *take_shadow_slot(Region &r, uint64_t p, CkptStats *st) {
    long s = shadow.take(); /* the caller checked the dirty set fits */
    r.slot[p] = (uint32_t)s;
    r.state[p] = PAGE_SHADOWED;
    st->shadow_copies++;
    st->shadow_peak_bytes = std::max<uint64_t>(st->shadow_peak_bytes, shadow.peak * kPage);
    return shadow.at((uint32_t)s);
  }
  /* saver: starts copying a pending page */
  static void to_saving(Region &r, uint64_t p) { r.state[p] = PAGE_SAVING; }
  /* saver: done copying */
  void to_saved(Region &r, uint64_t p) {
    r.state[p] = PAGE_SAVED;
    cv.notify_all();
  }
  /* saver: a shadowed page was saved from its slot */
  void shadow_saved(Region &r, uint64_t p) {
    shadow.give(r.slot[p]);
    /* on the sync path the page was unprotected by its fault: it is written; on the copy path the kernel tracks it */
    r.state[p] = r.sync_save ? PAGE_WRITTEN : PAGE_CLEAN;
    cv.notify_all();
  }
  /* fault cases 1, 2 and the end of 4: the page joins the next checkpoint's set */
  static void to_written(Region &r, uint64_t p) { r.state[p] = PAGE_WRITTEN; }

  /* end of cases 3 (shadow full) and 4: pages now saved join the next set and their writers go on */
  void resolve_deferred_locked() {
    size_t k = 0;
    for (auto &d : deferred) {
      uint8_t s = d.first->state[d.second];
      if (s == PAGE_SAVED || s == PAGE_WRITTEN) {
        to_written(*d.first, d.second);
        uint64_t a = d.first->addr + d.second * kPage;
        if (uffd_wp(uffd_sync, a, kPage, false) != 0) {
          /* the range is gone (region freed meanwhile): still wake the writer */
          struct uffdio_range wr {a, kPage};
          ioctl(uffd_sync, UFFDIO_WAKE, &wr);
        }
      } else {
        deferred[k++] = d;
      }
    }
    deferred.resize(k);
  }

  /* remote_write(): can page p be overwritten from the agent's side as it is? */
  static bool remote_writable(uint8_t s) { return s != PAGE_PENDING && s != PAGE_SAVING; }

  /* remote_write(): make page p safe to overwrite from the agent's side (mu held via lk) */
  void before_remote_write_locked(std::unique_lock<std::mutex> &lk, Region &r, uint64_t p) {
    for (;;) {
      uint8_t s = r.state[p];
      if (s == PAGE_PENDING) {
        if (to_shadowed(r, p, active ? &active->stats_ : nullptr)) return; /* like case 3 */
        urgent.emplace_back(&r, p); /* shadow full: the saver takes it next */
        cv.notify_all();
        cv.wait(lk, [&] { return r.state[p] != PAGE_PENDING && r.state[p] != PAGE_SAVING; });
        continue;
      }
      if (s == PAGE_SAVING) { /* like case 4 */
        cv.wait(lk, [&] { return r.state[p] != PAGE_SAVING; });
        continue;
      }
      return; /* CLEAN, SAVED, SHADOWED, WRITTEN: the running checkpoint does not need these bytes */
    }
  }

  /* pause: pages written through remote_write() join the set like pages the job wrote */
  static void fold_remote_dirty(Region &r) {
    if (!r.remote_dirty_count) return;
    for (uint64_t p = 0; p < r.npages; p++)
      if (r.remote_dirty[p]) {
        r.state[p] = PAGE_WRITTEN;
        r.remote_dirty[p] = 0;
      }
    r.remote_dirty_count = 0;
  }

  /* cancel/failure: whatever was in the set goes to the next checkpoint's set */
  void abandon_locked(const std::vector<std::shared_ptr<Region>> &regs) {
    for (auto &r : regs) {
      for (uint64_t p = 0; p < r->npages; p++) {
        uint8_t s = r->state[p];
        if (s == PAGE_SHADOWED) shadow.give(r->slot[p]);
        if (s == PAGE_PENDING || s == PAGE_SAVING || s == PAGE_SAVED || s == PAGE_SHADOWED) to_written(*r, p);
      }
      r->in_session = false;
      r->sync_save = false;
    }
    urgent.clear();
    resolve_deferred_locked();
    cv.notify_all();
  }

  /* The fault handler: the seed's four cases. Fault thread, mu held. Never blocks: a fault that must wait (case 4, or case 3 with the shadow full) is left unresolved in `deferred` and the saver resolves it. */
  void on_write_fault(uint64_t addr) {
    Region *r = find_region_locked(addr);
    if (!r || r->reg != Region::REG_SYNC) {
      /* stale message from before a mode switch, or a range no longer ours: just make sure nobody stays blocked */
      uffd_wp(uffd_sync, addr, kPage, false);
      return;
    }
    uint64_t p = (addr - r->addr) / kPage;
    CkptStats *st = active ? &active->stats_ : nullptr;
    switch ((PageState)r->state[p]) {
      case PAGE_CLEAN: /* case 1: not in this checkpoint's set */
        if (st) st->faults[0]++;
        else faults_outside++;
        to_written(*r, p);
        break;
      case PAGE_SAVED: /* case 2: already saved */
        if (st) st->faults[1]++;
        else faults_outside++;
        to_written(*r, p);
        break;
      case PAGE_PENDING: /* case 3: save the pause-time bytes to shadow first */
        if (st) st->faults[2]++;
        if (!to_shadowed(*r, p, st)) {
          /* shadow full: the saver takes this page next; the writer stays blocked until it is
           * saved (resolve_deferred_locked) rather than the shadow growing */
          if (st) st->shadow_waits++;
          urgent.emplace_back(r, p);
          deferred.emplace_back(r, p);
          cv.notify_all();
          return;
        }
        break;
      case PAGE_SAVING: /* case 4: being saved right now: the writer waits until it is saved */
        if (st) st->faults[3]++;
        /* the fault stays unresolved (the writer blocked) and this thread goes on serving other
         * faults; the saver resolves it when the page reaches SAVED */
        deferred.emplace_back(r, p);
        return;
      case PAGE_SHADOWED: /* a second message for a page already handled */
      case PAGE_WRITTEN:
        break;
    }
    if (r->prewp) rewp.emplace_back(r, p); /* written before the stop: must be protected again in the pause */
    uffd_wp(uffd_sync, addr, kPage, false); /* unprotect and wake the writer */
  }

  void fault_loop() {
    struct uffd_msg msgs[32];
    for (;;) {
      struct pollfd pf[2] = {{uffd_sync, POLLIN, 0}, {stop_efd, POLLIN, 0}};
      int n = poll(pf, 2, -1);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 || (pf[1].revents & POLLIN)) return;
      if (pf[0].revents & (POLLERR | POLLNVAL)) return;
      if (!(pf[0].revents & POLLIN)) {
        if (pf[0].revents & POLLHUP) usleep(1000);
        continue;
      }
      ssize_t got = read(uffd_sync, msgs, sizeof msgs);
      if (got < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        return;
      }
      size_t cnt = (size_t)got / sizeof(struct uffd_msg);
      std::unique_lock<std::mutex> lk(mu);
      for (size_t i = 0; i < cnt; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t addr = msgs[i].arg.pagefault.address & ~(uint64_t)(kPage - 1);
        on_write_fault(addr);
      }
    }
  }

  /* Move a region to async tracking: protect everything on the async uffd (workload stopped). */
  int to_async_locked(Region &r, std::string *err) {
    if (r.reg == Region::REG_ASYNC) return 0;
    int e = uffd_unregister(uffd_sync, r.addr, r.size);
    if (e == 0) e = uffd_register(uffd_async, r.addr, r.size);
    if (e == 0) e = uffd_wp(uffd_async, r.addr, r.size, true);
    if (e != 0) {
      *err = "job " + id + ": region \"" + r.name + "\": cannot switch to async tracking: " + errstr(e);
      /* leave it on the sync uffd, unprotected: the next checkpoint saves it whole */
      uffd_register(uffd_sync, r.addr, r.size);
      r.reg = Region::REG_SYNC;
      r.base_done = false;
      return e;
    }
    r.reg = Region::REG_ASYNC;
    return 0;
  }

  /* Move a region to the sync uffd and write-protect it whole (workload stopped). */
  int to_sync_locked(Region &r, std::string *err) {
    int e = 0;
    if (r.reg == Region::REG_ASYNC) {
      e = uffd_unregister(uffd_async, r.addr, r.size);
      if (e == 0) e = uffd_register(uffd_sync, r.addr, r.size);
      if (e != 0) {
        *err = "job " + id + ": region \"" + r.name + "\": cannot switch to sync write-protect: " + errstr(e);
        return e;
      }
      r.reg = Region::REG_SYNC;
    }
    e = uffd_wp(uffd_sync, r.addr, r.size, true);
    if (e != 0) *err = "job " + id + ": region \"" + r.name + "\": write-protect failed: " + errstr(e);
    return e;
  }

  /* PAGEMAP_SCAN: pages written since the last scan, re-protected atomically. */
  int scan_written_locked(Region &r, std::vector<uint64_t> &out, std::string *err) {
    std::vector<page_region> vec(1024);
    uint64_t cur = r.addr, end = r.addr + r.size;
    while (cur < end) {
      pm_scan_arg a{};
      a.size = sizeof a;
      a.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
      a.start = cur;
      a.end = end;
      a.vec = (uint64_t)(uintptr_t)vec.data();
      a.vec_len = vec.size();
      a.category_mask = PAGE_IS_WRITTEN;
      a.return_mask = PAGE_IS_WRITTEN;
      long n = ioctl(pagemap, PAGEMAP_SCAN, &a);
      if (n < 0) {
        int e = errno;
        *err = "job " + id + ": region \"" + r.name + "\": PAGEMAP_SCAN failed: " + errstr(e);
        return -e;
      }
      for (long i = 0; i < n; i++)
        for (uint64_t x = vec[i].start; x < vec[i].end; x += kPage) out.push_back((x - r.addr) / kPage);
      if (a.walk_end <= cur) break;
      cur = a.walk_end;
    }
    return 0;
  }
};

/* A second hashing thread for the saver (SHA-256 is ~1.8 GB/s per core here): run() executes
 * one half on the caller and the other here, and returns when both are done. */
class HashHelper {
 public:
  HashHelper() : t_([this] { loop(); }) {}
  ~HashHelper() {
    {
      std::lock_guard<std::mutex> g(m_);
      quit_ = true;
    }
    cv_.notify_all();
    t_.join();
  }
  void run(const std::function<void()> &mine, const std::function<void()> &theirs) {
    {
      std::lock_guard<std::mutex> g(m_);
      job_ = &theirs;
      done_ = false;
    }
    cv_.notify_all();
    mine();
    std::unique_lock<std::mutex> lk(m_);
    cv_.wait(lk, [&] { return done_; });
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return quit_ || job_ != nullptr; });
      if (quit_) return;
      const std::function<void()> *j = job_;
      lk.unlock();
      (*j)();
      lk.lock();
      job_ = nullptr;
      done_ = true;
      cv_.notify_all();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  const std::function<void()> *job_ = nullptr;
  bool done_ = true, quit_ = false;
  std::thread t_;
};

/* ------------------------------------------------------------------ Session */

Session::Session(std::shared_ptr<Job> job, CkptOptions opts) : job_(std::move(job)), opts_(std::move(opts)) {
  job_id_ = job_->id;
  if (opts_.batch_bytes < kPage) opts_.batch_bytes = kPage;
  if (opts_.queue_depth < 1) opts_.queue_depth = 1;
}

Session::~Session() {
  cancel();
  join();
}

void Session::join() {
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

Session::State Session::state() {
  std::lock_guard<std::mutex> g(job_->mu);
  return state_;
}
std::string Session::error() {
  std::lock_guard<std::mutex> g(job_->mu);
  return error_;
}
CkptStats Session::stats() {
  std::lock_guard<std::mutex> g(job_->mu);
  CkptStats s = stats_;
  return s;
}
std::vector<RegionInfo> Session::regions() {
  std::lock_guard<std::mutex> g(job_->mu);
  return table_;
}
std::vector<std::vector<uint8_t>> Session::take_reference() {
  std::lock_guard<std::mutex> g(job_->mu);
  return std::move(reference_);
}

bool Session::held() {
  std::lock_guard<std::mutex> g(job_->mu);
  return held_;
}

std::unique_ptr<Batch> Session::pop() {
  std::lock_guard<std::mutex> g(job_->mu);
  if (ready_.empty()) return nullptr;
  auto b = std::move(ready_.front());
  ready_.pop_front();
  job_->cv.notify_all();
  return b;
}

void Session::cancel() {
  std::lock_guard<std::mutex> g(job_->mu);
  cancel_ = true;
  job_->cv.notify_all();
}

void Session::release_hold() {
  std::lock_guard<std::mutex> g(job_->mu);
  hold_released_ = true;
  job_->cv.notify_all();
}

void Session::poke() {
  if (notify) notify();
}

/* Steps 1-4 of the seed: stop the job, collect each region's set (scan), write-protect or copy
 * to shadow, resume. Fills regs (the region table of this checkpoint). False: the checkpoint
 * failed (state FAILED, waiting exa_checkpoint() calls answered). */
bool Session::pause_phase(std::vector<std::shared_ptr<Region>> &regs, bool &any_sync) {
  Job &j = *job_;
  std::string err;
  bool ok = true;
  /* Regions that will be saved on the live sync path and are already on the sync uffd are
   * write-protected before the stop, while the job runs (15 ms/GiB that need not be pause):
   * the fault thread keeps serving, records every page written in that window, and the pause
   * protects just those again. The snapshot instant is still the stop. */
  std::vector<std::shared_ptr<Region>> prewp;
  {
    std::lock_guard<std::mutex> g(j.mu);
    size_t budget_pages = shadow_budget_ / kPage;
    for (auto &r : j.regions) {
      bool first = !r->base_done || opts_.full;
      if (opts_.preprotect && r->reg == Region::REG_SYNC &&
          (!j.has_async || opts_.mode == CkptMode::SYNC || (first && r->npages > budget_pages))) {
        r->prewp = true;
        prewp.push_back(r);
      }
    }
    j.rewp.clear();
  }
  uint64_t tp = now_us();
  for (auto &r : prewp) uffd_wp(j.uffd_sync, r->addr, r->size, true);
  stats_.preprotect_us = prewp.empty() ? 0 : now_us() - tp;

  /* ---- the pause: steps 1-4 of the seed ---- */
  uint64_t t0 = now_us();
  int e = j.stop(&err);
  stats_.pause_stop_us = now_us() - t0;
  if (e != 0) {
    std::unique_lock<std::mutex> lk(j.mu);
    for (auto &r : prewp) r->prewp = false; /* stays protected: faults resolve as case 1 */
    error_ = err;
    state_ = FAILED;
    for (uint32_t seq : j.pending_requests) j.reply(seq, e, err);
    j.pending_requests.clear();
    j.busy = false;
    lk.unlock();
    poke();
    return false;
  }
  {
    std::unique_lock<std::mutex> lk(j.mu);
    regs = j.regions;
    j.shadow.reset(shadow_budget_);
    table_.clear();
    for (auto &r : regs) table_.push_back({r->name, r->size, r->addr});
    if (opts_.test_reference)
      for (auto &r : regs) reference_.emplace_back(r->view, r->view + r->size);
    for (auto &rp : regs) {
      Region &r = *rp;
      bool first = !r.base_done || opts_.full;
      bool can_copy = j.has_async && opts_.mode != CkptMode::SYNC;
      std::vector<uint64_t> dirty;
      /* the scan also re-protects what it reports; a first checkpoint on the sync path re-protects everything anyway */
      if (r.reg == Region::REG_ASYNC && !(first && !(can_copy && r.npages <= j.shadow.free_count()))) {
        uint64_t ts = now_us();
        e = j.scan_written_locked(r, dirty, &err);
        stats_.pause_scan_us += now_us() - ts;
        if (e != 0) break;
      }
      Job::fold_remote_dirty(r);
      uint64_t nd = 0;
      if (first) {
        nd = r.npages;
      } else {
        for (uint64_t p : dirty) {
          if (r.state[p] != PAGE_WRITTEN) r.state[p] = PAGE_WRITTEN;
        }
        for (uint64_t p = 0; p < r.npages; p++) nd += r.state[p] == PAGE_WRITTEN;
      }
      bool copy = can_copy && nd <= j.shadow.free_count();
      r.in_session = true;
      r.sync_save = !copy;
      stats_.dirty_pages += nd;
      if (copy) {
        stats_.copy_regions++;
        if (r.reg == Region::REG_SYNC) {
          uint64_t tw = now_us();
          e = j.to_async_locked(r, &err);
          stats_.pause_protect_us += now_us() - tw;
          if (e != 0) break;
        }
        uint64_t tc = now_us();
        std::vector<std::pair<const uint8_t *, uint8_t *>> copies;
        copies.reserve(nd);
        for (uint64_t p = 0; p < r.npages; p++) {
          if (first || r.state[p] == PAGE_WRITTEN) copies.emplace_back(r.view + p * kPage, j.take_shadow_slot(r, p, &stats_));
          else Job::to_clean(r, p);
        }
        /* the job is stopped: both cores are ours for the copy */
        auto cp = [&copies](size_t a, size_t b) {
          for (size_t i = a; i < b; i++) memcpy(copies[i].second, copies[i].first, kPage);
        };
        if (copies.size() >= 1024) {
          std::thread other(cp, copies.size() / 2, copies.size());
          cp(0, copies.size() / 2);
          other.join();
        } else {
          cp(0, copies.size());
        }
        stats_.pause_copy_us += now_us() - tc;
      } else {
        stats_.sync_regions++;
        any_sync = true;
        uint64_t tw = now_us();
        if (r.prewp && r.reg == Region::REG_SYNC) {
          /* protected before the stop: only the pages written since need it again */
          for (auto &x : j.rewp)
            if (x.first == &r && (e = uffd_wp(j.uffd_sync, r.addr + x.second * kPage, kPage, true)) != 0) {
              err = "job " + j.id + ": region \"" + r.name + "\": write-protect failed: " + errstr(e);
              break;
            }
        } else {
          e = j.to_sync_locked(r, &err);
        }
        stats_.pause_protect_us += now_us() - tw;
        if (e != 0) break;
        for (uint64_t p = 0; p < r.npages; p++) {
          if (first || r.state[p] == PAGE_WRITTEN) Job::to_pending(r, p);
          else Job::to_clean(r, p);
        }
      }
    }
    for (auto &r : prewp) r->prewp = false;
    j.rewp.clear();
    if (e != 0) {
      j.abandon_locked(regs);
      for (auto &r : regs) r->base_done = false;
      ok = false;
    } else {
      j.active = this;
      state_ = SAVING;
    }
  }
  if (!opts_.leave_stopped) j.resume();
  uint64_t t1 = now_us();
  resumed_us_ = t1;
  {
    std::unique_lock<std::mutex> lk(j.mu);
    stats_.pause_us = t1 - t0;
    for (uint32_t seq : j.pending_requests) j.reply(seq, ok ? 0 : e, ok ? "" : err);
    j.pending_requests.clear();
    if (!ok) {
      error_ = err;
      state_ = FAILED;
      j.busy = false;
    }
  }
  poke();
  return ok;
}

/* The save: pages in order (case-3 pages waiting for shadow first), copied, zero-flagged and
 * hashed into batches handed over through the bounded queue. False: cancelled or failed. */
bool Session::save_phase(const std::vector<std::shared_ptr<Region>> &regs) {
  Job &j = *job_;
  /* ---- the save: sequential, hashing, zero pages flagged, bounded queue ---- */
  struct Item {
    uint32_t ri;
    Region *r;
    uint64_t p;
    long slot; /* -1: read from the region (page is SAVING) */
  };
  const size_t per_batch = std::max<size_t>(1, opts_.batch_bytes / kPage);
  std::vector<Item> items;
  std::vector<uint8_t> zflags;
  HashHelper hasher;
  auto cur = std::make_unique<Batch>();
  bool hold_done = opts_.hold_when == HoldWhen::NONE;
  bool cancelled = false;

  auto flush = [&](bool last) -> bool {
    if (cur->count() == 0 && !last) return true;
    std::unique_lock<std::mutex> lk(j.mu);
    j.cv.wait(lk, [&] { return cancel_ || ready_.size() < opts_.queue_depth; });
    if (cancel_) return false;
    if (cur->count() > 0) {
      stats_.batches++;
      ready_.push_back(std::move(cur));
      cur = std::make_unique<Batch>();
    }
    lk.unlock();
    poke();
    return true;
  };

  for (uint32_t ri = 0; ri < regs.size() && !cancelled; ri++) {
    Region &r = *regs[ri];
    uint64_t p = 0;
    while (!cancelled) {
      items.clear();
      {
        std::unique_lock<std::mutex> lk(j.mu);
        if (cancel_) {
          cancelled = true;
          break;
        }
        /* case-3 faults waiting for a full shadow go first */
        for (auto &u : j.urgent) {
          if (u.first->state[u.second] == PAGE_PENDING && items.size() < per_batch) {
            Job::to_saving(*u.first, u.second);
            uint32_t uri = 0;
            while (uri < regs.size() && regs[uri].get() != u.first) uri++;
            items.push_back({uri, u.first, u.second, -1});
          }
        }
        j.urgent.clear();
        const size_t room = per_batch - std::min(per_batch - 1, cur->data.size() / kPage);
        while (p < r.npages && items.size() < room) {
          if (!hold_done && r.name == opts_.hold_region && p == opts_.hold_page) {
            if (!items.empty()) break; /* save what precedes the held page first */
            hold_done = true;
            bool during = opts_.hold_when == HoldWhen::DURING && r.state[p] == PAGE_PENDING;
            if (during) Job::to_saving(r, p);
            held_ = true;
            lk.unlock();
            poke();
            lk.lock();
            j.cv.wait(lk, [&] { return hold_released_ || cancel_; });
            held_ = false;
            if (cancel_) {
              cancelled = true;
              break;
            }
            if (during) {
              items.push_back({ri, &r, p, -1});
              p++;
              break;
            }
            continue; /* re-read the page's state: a fault may have shadowed it */
          }
          uint8_t s = r.state[p];
          if (s == PAGE_PENDING) {
            Job::to_saving(r, p);
            items.push_back({ri, &r, p, -1});
          } else if (s == PAGE_SHADOWED) {
            items.push_back({ri, &r, p, (long)r.slot[p]});
          }
          p++;
        }
        if (cancelled) break;
      }
      if (items.empty()) {
        if (p >= r.npages) break;
        continue;
      }
      /* copy straight into the batch, outside the lock: SAVING pages cannot change (their writers
       * wait, case 4) and shadow slots are ours until shadow_saved() */
      const size_t n = items.size();
      const size_t base = cur->data.size();
      /* collection stops at `room`, so a batch never holds more than per_batch pages of bytes */
      if (cur->data.capacity() < base + n * kPage) cur->data.reserve(std::max(base + n * kPage, per_batch * kPage));
      cur->data.resize(base + n * kPage);
      for (size_t i = 0; i < n; i++) {
        const uint8_t *src = items[i].slot < 0 ? items[i].r->view + items[i].p * kPage : j.shadow.at((uint32_t)items[i].slot);
        memcpy(cur->data.data() + base + i * kPage, src, kPage);
      }
      {
        std::lock_guard<std::mutex> g(j.mu);
        for (auto &it : items) {
          if (it.slot < 0) j.to_saved(*it.r, it.p);
          else j.shadow_saved(*it.r, it.p);
        }
        if (!j.deferred.empty()) j.resolve_deferred_locked();
      }
      /* flag zero pages and hash the others outside the lock, on two threads when there is enough */
      const size_t h0 = cur->hash.size();
      cur->hash.resize(h0 + 32 * n);
      zflags.assign(n, 0);
      uint8_t *dbase = cur->data.data() + base;
      uint8_t *hbase = cur->hash.data() + h0;
      auto work = [&, dbase, hbase](size_t from, size_t to) {
        // Zero pages flagged; the others hashed together (several at a time, exa_sha256.h).
        std::vector<const uint8_t *> msgs(to - from);
        for (size_t i = from; i < to; i++) {
          const uint8_t *pg = dbase + i * kPage;
          const bool zero = page_is_zero(pg);
          zflags[i] = zero;
          msgs[i - from] = zero ? nullptr : pg;
        }
        exa::sha256_each(msgs.data(), msgs.size(), kPage, hbase + 32 * from);
      };
      if (n >= 16) hasher.run([&] { work(0, n / 2); }, [&] { work(n / 2, n); });
      else work(0, n);
      /* zero pages carry no bytes: close the gaps */
      uint64_t zero = 0, saved = 0;
      size_t wpos = base;
      for (size_t i = 0; i < n; i++) {
        cur->region.push_back(items[i].ri);
        cur->page.push_back((uint32_t)items[i].p);
        cur->zero.push_back(zflags[i]);
        if (zflags[i]) {
          zero++;
          continue;
        }
        if (wpos != base + i * kPage) memmove(cur->data.data() + wpos, cur->data.data() + base + i * kPage, kPage);
        wpos += kPage;
        saved++;
      }
      cur->data.resize(wpos);
      {
        std::lock_guard<std::mutex> g(j.mu);
        stats_.zero_pages += zero;
        stats_.pages_saved += saved;
        stats_.bytes_saved += saved * kPage;
      }
      if (cur->data.size() >= per_batch * kPage || cur->count() >= per_batch * 4) {
        if (!flush(false)) cancelled = true;
      }
    }
  }
  /* Safety net: the cursor visited every page and pages only become PENDING at the pause, so
   * nothing can be left; if a logic error ever left one, fail the checkpoint rather than
   * hand over an image that lacks it. */
  if (!cancelled) {
    std::lock_guard<std::mutex> g(j.mu);
    for (auto &rp : regs)
      for (uint64_t p = 0; p < rp->npages && !cancelled; p++)
        if (rp->state[p] == PAGE_PENDING || rp->state[p] == PAGE_SHADOWED) {
          error_ = "internal error: page " + std::to_string(p) + " of region \"" + rp->name + "\" was left unsaved";
          cancelled = true;
        }
  }
  if (!cancelled && !flush(true)) cancelled = true;
  if (!cancelled) {
    /* wait until JavaScript took every batch: the checkpoint is then complete */
    std::unique_lock<std::mutex> lk(j.mu);
    j.cv.wait(lk, [&] { return cancel_ || ready_.empty(); });
    if (cancel_) cancelled = true;
  }

  return !cancelled;
}

void Session::back_to_async(const std::vector<std::shared_ptr<Region>> &regs, std::string &resync_error) {
  Job &j = *job_;
  /* Back to cheap async tracking for regions saved on the live sync path. Each switch needs the
   * job stopped (a write between unregistering the sync uffd and write-protecting on the async
   * one would be missed), so it goes in chunks of kResyncChunk, one short stop each, instead of
   * one long stop for the whole region. Pages written meanwhile (WRITTEN) stay in the next set. */
  if (j.has_async && !j.gone) {
    for (auto &rp : regs) {
      Region &r = *rp;
      {
        std::lock_guard<std::mutex> g(j.mu);
        bool still = std::find(j.regions.begin(), j.regions.end(), rp) != j.regions.end();
        if (!r.sync_save || r.reg != Region::REG_SYNC || !still) continue;
      }
      bool failed = false;
      uint64_t chunk = kResyncChunk;
      if (const char *ev = getenv("EXA_CKPT_RESYNC_CHUNK")) /* tests: many steps on a small region */
        chunk = std::max<uint64_t>(kPage, strtoull(ev, nullptr, 0) / kPage * kPage);
      for (uint64_t off = 0; off < r.size && !failed; off += chunk) {
        uint64_t len = std::min<uint64_t>(chunk, r.size - off);
        uint64_t s0 = now_us();
        std::string e2;
        if (j.stop(&e2) != 0) {
          failed = true; /* the job is gone: nothing to track any more */
          break;
        }
        {
          std::lock_guard<std::mutex> g(j.mu);
          for (uint64_t p = off / kPage; p < (off + len) / kPage; p++)
            if (r.state[p] != PAGE_WRITTEN) Job::to_clean(r, p);
          int e = uffd_unregister(j.uffd_sync, r.addr + off, len);
          if (e == 0) e = uffd_register(j.uffd_async, r.addr + off, len);
          if (e == 0) e = uffd_wp(j.uffd_async, r.addr + off, len, true);
          if (e != 0) {
            /* put the whole region back on the sync uffd, unprotected; its next checkpoint saves it whole */
            uffd_unregister(j.uffd_async, r.addr, off + len);
            uffd_unregister(j.uffd_sync, r.addr, r.size);
            uffd_register(j.uffd_sync, r.addr, r.size);
            r.base_done = false;
            failed = true;
            resync_error = "job " + j.id + ": region \"" + r.name + "\": cannot switch back to async tracking: " + errstr(e);
          }
        }
        if (!opts_.leave_stopped) j.resume();
        uint64_t d = now_us() - s0;
        std::lock_guard<std::mutex> g(j.mu);
        stats_.resync_pause_us = std::max(stats_.resync_pause_us, d);
        stats_.resync_total_us += d;
        stats_.resync_stops++;
      }
      std::lock_guard<std::mutex> g(j.mu);
      if (!failed) r.reg = Region::REG_ASYNC;
    }
  }
}

/* Saver thread body: pause, save, then (after a live-sync save) back to async tracking. */
void Session::run() {
  Job &j = *job_;
  std::vector<std::shared_ptr<Region>> regs;
  bool any_sync = false;
  std::string resync_error; /* reported through error() of a DONE session: the image is complete anyway */
  if (!pause_phase(regs, any_sync)) {
    if (on_exit) on_exit();
    return;
  }
  bool cancelled = !save_phase(regs);
  if (cancelled) {
    std::unique_lock<std::mutex> lk(j.mu);
    j.abandon_locked(regs);
    j.active = nullptr;
    ready_.clear();
    j.shadow.reset(shadow_budget_);
    if (error_.empty()) {
      state_ = CANCELLED;
      error_ = "checkpoint of job " + j.id + " was cancelled";
    } else {
      state_ = FAILED;
    }
    j.busy = false;
    lk.unlock();
    poke();
    if (on_exit) on_exit();
    return;
  }

  {
    std::unique_lock<std::mutex> lk(j.mu);
    stats_.save_us = now_us() - resumed_us_;
    j.active = nullptr;
    for (auto &r : regs) {
      r->base_done = true;
      r->in_session = false;
    }
    j.shadow.reset(shadow_budget_);
    j.checkpoints++;
  }
  if (any_sync) back_to_async(regs, resync_error);
  {
    std::lock_guard<std::mutex> g(j.mu);
    for (auto &r : regs) r->sync_save = false;
    if (!resync_error.empty()) error_ = resync_error; /* informational: state is DONE */
    state_ = DONE;
    j.busy = false;
  }
  poke();
  if (on_exit) on_exit();
}

/* ------------------------------------------------------------------ Agent */

struct Agent::Conn {
  int fd = -1;
  int pid = 0, uid = 0;
  bool denied = false;
  const TenantUids *tenant = nullptr; /* the tenant this peer's uid acts for (opts_.tenants), if any */
  enum Phase { HELLO, UFFDS, READY } phase = HELLO;
  std::shared_ptr<Job> job; /* set at HELLO; published in jobs_ at UFFDS */
  ~Conn() {
    if (fd >= 0) ::close(fd);
  }
};

Agent::Agent(const AgentOptions &opts, EventSink sink) : opts_(opts), sink_(std::move(sink)) {
  struct sockaddr_un sa {};
  sa.sun_family = AF_UNIX;
  if (opts_.socket_path.empty() || opts_.socket_path.size() >= sizeof sa.sun_path)
    throw Error(-EINVAL, "agent socket path is empty or longer than " + std::to_string(sizeof sa.sun_path - 1) + " bytes");
  strcpy(sa.sun_path, opts_.socket_path.c_str());
  listen_fd_ = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) throw Error(-errno, "agent socket: " + errstr(errno));
  /* a stale socket file from a dead agent is replaced; a live one is not */
  struct stat st;
  if (lstat(sa.sun_path, &st) == 0 && S_ISSOCK(st.st_mode)) {
    int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    bool live = probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof sa) == 0;
    if (probe >= 0) ::close(probe);
    if (live) {
      ::close(listen_fd_);
      throw Error(-EADDRINUSE, "an agent already listens on " + opts_.socket_path);
    }
    unlink(sa.sun_path);
  }
  if (bind(listen_fd_, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(listen_fd_, 64) != 0) {
    int e = errno;
    ::close(listen_fd_);
    throw Error(-e, "agent: cannot listen on " + opts_.socket_path + ": " + errstr(e));
  }
  chmod(sa.sun_path, opts_.socket_mode);
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  /* Before the IO thread exists, so the guardian is forked from as few threads as possible. */
  if (int e = guardian::start()) log("no guardian process (" + errstr(-e) + "): a job stopped for a checkpoint stays stopped if this agent dies during the pause");
  io_ = std::thread([this] { io_loop(); });
}

Agent::~Agent() { close(); }

void Agent::log(const std::string &text) {
  if (sink_) sink_(AgentEvent{AgentEvent::LOG, "", 0, 0, text});
}

void Agent::close() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (closed_) return;
    closed_ = true;
  }
  uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof one);
  if (io_.joinable()) io_.join();
  std::vector<std::shared_ptr<Session>> live;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto &w : sessions_)
      if (auto s = w.lock()) live.push_back(s);
    sessions_.clear();
  }
  for (auto &s : live) s->cancel();
  for (auto &s : live) s->join();
  std::vector<std::shared_ptr<Job>> all;
  {
    std::lock_guard<std::mutex> g(mu_);
    all = jobs_;
    jobs_.clear();
  }
  for (auto &s : live) all.push_back(s->job_);
  for (auto &j : all) j->shutdown();
  conns_.clear();
  ::close(listen_fd_);
  ::close(wake_fd_);
  unlink(opts_.socket_path.c_str());
}

std::shared_ptr<Job> Agent::find(const std::string &job) {
  std::lock_guard<std::mutex> g(mu_);
  for (auto &j : jobs_)
    if (j->id == job) return j;
  return nullptr;
}

std::vector<JobInfo> Agent::jobs() {
  std::vector<std::shared_ptr<Job>> js;
  {
    std::lock_guard<std::mutex> g(mu_);
    js = jobs_;
  }
  std::vector<JobInfo> out;
  for (auto &j : js) {
    std::lock_guard<std::mutex> g(j->mu);
    JobInfo ji;
    ji.id = j->id;
    ji.pid = j->pid;
    ji.uid = j->uid;
    ji.async_tracking = j->has_async;
    ji.user_mode_only = j->user_only;
    ji.busy = j->busy;
    ji.checkpoints = j->checkpoints;
    for (auto &r : j->regions) ji.regions.push_back({r->name, r->size, r->addr});
    out.push_back(std::move(ji));
  }
  return out;
}

std::shared_ptr<Session> Agent::checkpoint(const std::string &job, const CkptOptions &opts, std::function<void()> notify,
                                           std::function<void()> on_exit) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (closed_) throw Error(-ESHUTDOWN, "the agent is closed");
  }
  auto j = find(job);
  if (!j) throw Error(-ENOENT, "no job \"" + job + "\" is attached to this agent");
  std::shared_ptr<Session> s(new Session(j, opts));
  s->shadow_budget_ = opts_.shadow_budget;
  s->notify = std::move(notify);
  s->on_exit = std::move(on_exit);
  {
    std::lock_guard<std::mutex> g(j->mu);
    if (j->busy) throw Error(-EBUSY, "job \"" + job + "\" already has a checkpoint in progress");
    j->busy = true;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    sessions_.erase(std::remove_if(sessions_.begin(), sessions_.end(), [](auto &w) { return w.expired(); }), sessions_.end());
    sessions_.push_back(s);
  }
  Session *raw = s.get();
  s->thread_ = std::thread([raw] { raw->run(); });
  return s;
}

bool TenantUids::owns(const std::string &job) const {
  for (auto &j : jobs)
    if (j == job) return true;
  for (auto &p : prefixes)
    if (job.compare(0, p.size(), p) == 0) return true;
  return false;
}

const TenantUids *Agent::tenant_of(uid_t uid) const {
  for (auto &t : opts_.tenants)
    if (std::find(t.uids.begin(), t.uids.end(), uid) != t.uids.end()) return &t;
  return nullptr;
}

void Agent::decline_requests(const std::string &job, int status, const std::string &text) {
  auto j = find(job);
  if (!j) return;
  std::lock_guard<std::mutex> g(j->mu);
  for (uint32_t seq : j->pending_requests) j->reply(seq, status, text);
  j->pending_requests.clear();
}

size_t Agent::remote_fill(const std::string &job, const std::string &region, uint64_t offset, size_t len,
                          const std::function<size_t(uint8_t *, size_t)> &fill) {
  auto j = find(job);
  if (!j) throw Error(-ENOENT, "no job \"" + job + "\" is attached to this agent");
  std::unique_lock<std::mutex> lk(j->mu);
  std::shared_ptr<Region> r;
  for (auto &x : j->regions)
    if (x->name == region) r = x;
  if (!r) throw Error(-ENOENT, "job " + job + ": no region \"" + region + "\"");
  if (offset > r->size || len > r->size - offset)
    throw Error(-EINVAL, "job " + job + ": write of " + std::to_string(len) + " bytes at offset " + std::to_string(offset) +
                             " is outside region \"" + region + "\" (" + std::to_string(r->size) + " bytes)");
  if (!r->wview) {
    void *m = mmap(nullptr, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, r->memfd, 0);
    if (m == MAP_FAILED) throw Error(-errno, "job " + job + ": region \"" + region + "\": cannot map it writable: " + errstr(errno));
    r->wview = (uint8_t *)m;
  }
  /* Runs of pages the running checkpoint (if any) does not need are filled with one call each;
   * a page it still needs is made safe first (shadowed, or waited for), which may drop the lock,
   * so the run is looked at again after it. Under the lock throughout a run: no pause can slip
   * between the state check and the write. */
  size_t done = 0;
  while (done < len) {
    uint64_t a = offset + done;
    uint64_t p = a / kPage;
    j->before_remote_write_locked(lk, *r, p);
    uint64_t last = (offset + len - 1) / kPage, q = p + 1;
    while (q <= last && j->remote_writable(r->state[q])) q++;
    size_t want = std::min<uint64_t>(len - done, q * kPage - a);
    size_t n = fill(r->wview + a, want);
    if (n > want) n = want; /* defensive: a fill reports at most what it was given */
    if (!n) break;
    for (uint64_t k = p, e = (a + n - 1) / kPage; k <= e; k++)
      if (!r->remote_dirty[k]) {
        r->remote_dirty[k] = 1;
        r->remote_dirty_count++;
      }
    done += n;
    if (n < want) break; /* the source has no more for now */
  }
  return done;
}

void Agent::remote_write(const std::string &job, const std::string &region, uint64_t offset, const uint8_t *data, size_t len) {
  remote_fill(job, region, offset, len, [&data](uint8_t *dst, size_t n) {
    memcpy(dst, data, n);
    data += n;
    return n;
  });
}

uint64_t Agent::stop_and_copy(const std::string &job, uint64_t *bytes) {
  auto j = find(job);
  if (!j) throw Error(-ENOENT, "no job \"" + job + "\" is attached to this agent");
  std::string err;
  std::vector<uint8_t> buf(1u << 20);
  std::vector<uint8_t> md(32 * (buf.size() / kPage));
  uint64_t t0 = now_us(), n = 0;
  if (int e = j->stop(&err)) throw Error(e, err);
  {
    std::lock_guard<std::mutex> g(j->mu);
    for (auto &r : j->regions) {
      for (uint64_t off = 0; off < r->size; off += buf.size()) {
        size_t len = std::min<uint64_t>(buf.size(), r->size - off);
        memcpy(buf.data(), r->view + off, len);
        exa::sha256_pages(buf.data(), len / kPage, kPage, md.data());
        n += len;
      }
    }
  }
  j->resume();
  if (bytes) *bytes = n;
  return now_us() - t0;
}

void Agent::drop_conn(size_t idx) {
  auto &c = conns_[idx];
  if (c->job && c->phase == Conn::READY) {
    c->job->gone = true;
    {
      std::lock_guard<std::mutex> g(mu_);
      jobs_.erase(std::remove(jobs_.begin(), jobs_.end(), c->job), jobs_.end());
    }
    {
      std::lock_guard<std::mutex> g(c->job->mu);
      c->job->pending_requests.clear();
    }
    if (sink_) sink_(AgentEvent{AgentEvent::DETACHED, c->job->id, c->pid, c->uid, ""});
  }
  conns_.erase(conns_.begin() + (long)idx);
}

void Agent::io_loop() {
  std::vector<struct pollfd> pfs;
  for (;;) {
    pfs.clear();
    pfs.push_back({wake_fd_, POLLIN, 0});
    pfs.push_back({listen_fd_, POLLIN, 0});
    for (auto &c : conns_) pfs.push_back({c->fd, POLLIN, 0});
    int n = poll(pfs.data(), pfs.size(), -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (pfs[0].revents & POLLIN)) return;
    if (pfs[1].revents & POLLIN) {
      for (;;) {
        int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) break;
        auto c = std::make_unique<Conn>();
        c->fd = fd;
        struct ucred cr {};
        socklen_t cl = sizeof cr;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) != 0) continue; /* c closes fd */
        c->pid = cr.pid;
        c->uid = (int)cr.uid;
        uid_t me = geteuid();
        c->tenant = tenant_of(cr.uid);
        bool ok = cr.uid == me || cr.uid == 0 || c->tenant ||
                  std::find(opts_.allow_uids.begin(), opts_.allow_uids.end(), cr.uid) != opts_.allow_uids.end();
        if (!ok) {
          c->denied = true;
          log("agent: refusing pid " + std::to_string(cr.pid) + " uid " + std::to_string(cr.uid) +
              ": only uid " + std::to_string(me) + " and root may attach");
        }
        conns_.push_back(std::move(c));
      }
    }
    /* walk backwards: handlers may drop connections */
    for (size_t k = pfs.size(); k-- > 2;) {
      size_t idx = k - 2;
      if (idx >= conns_.size() || !pfs[k].revents) continue;
      Conn &c = *conns_[idx];
      if (!(pfs[k].revents & POLLIN)) {
        drop_conn(idx);
        continue;
      }
      uint8_t buf[1024];
      union {
        char b[CMSG_SPACE(sizeof(int) * 8)];
        struct cmsghdr align;
      } cm;
      struct iovec iov = {buf, sizeof buf};
      struct msghdr mh {};
      mh.msg_iov = &iov;
      mh.msg_iovlen = 1;
      mh.msg_control = cm.b;
      mh.msg_controllen = sizeof cm.b;
      ssize_t got = recvmsg(c.fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
      if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      int fds[8];
      int nfds = 0;
      for (struct cmsghdr *ch = CMSG_FIRSTHDR(&mh); ch; ch = CMSG_NXTHDR(&mh, ch)) {
        if (ch->cmsg_level == SOL_SOCKET && ch->cmsg_type == SCM_RIGHTS) {
          int cnt = (int)((ch->cmsg_len - CMSG_LEN(0)) / sizeof(int));
          for (int i = 0; i < cnt; i++) {
            int f;
            memcpy(&f, CMSG_DATA(ch) + i * sizeof(int), sizeof f);
            if (nfds < 8) fds[nfds++] = f;
            else ::close(f);
          }
        }
      }
      if (got <= 0) {
        for (int i = 0; i < nfds; i++) ::close(fds[i]);
        drop_conn(idx);
        continue;
      }
      bool truncated = (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
      if (truncated) {
        for (int i = 0; i < nfds; i++) ::close(fds[i]);
        log("agent: pid " + std::to_string(c.pid) + ": oversized message or too many fds; closing");
        send_reply(c.fd, 0, -EPROTO, "protocol error: oversized message");
        drop_conn(idx);
        continue;
      }
      /* handle_message takes ownership of the fds; it may mark the connection for closing by fd = -1 */
      handle_message(c, buf, (size_t)got, fds, nfds);
      if (c.fd < 0) drop_conn(idx);
    }
  }
}

/* Validate and execute one message. Protocol violations answer -EPROTO and close the connection (c.fd = -1). */
void Agent::handle_message(Conn &c, const uint8_t *buf, size_t n, int *fds, int nfds) {
  auto close_fds = [&] {
    for (int i = 0; i < nfds; i++)
      if (fds[i] >= 0) ::close(fds[i]);
    nfds = 0;
  };
  auto who = [&] {
    return "pid " + std::to_string(c.pid) + " uid " + std::to_string(c.uid) + (c.job ? " (job " + c.job->id + ")" : "");
  };
  auto protocol_error = [&](uint32_t seq, const std::string &what) {
    close_fds();
    log("agent: " + who() + ": protocol error: " + what + "; connection closed");
    send_reply(c.fd, seq, -EPROTO, "protocol error: " + what);
    ::close(c.fd);
    c.fd = -1;
  };
  exa_msg_hdr hdr;
  if (n < sizeof hdr) return protocol_error(0, "message of " + std::to_string(n) + " bytes is shorter than a header");
  memcpy(&hdr, buf, sizeof hdr);
  if (hdr.magic != EXA_WIRE_MAGIC) return protocol_error(0, "bad magic (not an exackpt workload?)");
  if (hdr.version != EXA_WIRE_VERSION)
    return protocol_error(hdr.seq, "wire version " + std::to_string(hdr.version) + " (agent speaks " +
                                       std::to_string(EXA_WIRE_VERSION) + ")");
  if (hdr.len != n - sizeof hdr)
    return protocol_error(hdr.seq, "header says " + std::to_string(hdr.len) + " payload bytes, got " + std::to_string(n - sizeof hdr));
  const uint8_t *pl = buf + sizeof hdr;
  auto expect = [&](size_t len, int want_fds) -> bool {
    if (hdr.len != len) {
      protocol_error(hdr.seq, "message type " + std::to_string(hdr.type) + " needs " + std::to_string(len) + " payload bytes, got " +
                                  std::to_string(hdr.len));
      return false;
    }
    if (nfds != want_fds) {
      protocol_error(hdr.seq, "message type " + std::to_string(hdr.type) + " carries " + std::to_string(nfds) + " fds, expected " +
                                  std::to_string(want_fds));
      return false;
    }
    return true;
  };
  if (c.denied) {
    close_fds();
    send_reply(c.fd, hdr.seq, -EACCES,
               "permission denied: uid " + std::to_string(c.uid) + " may not attach to this agent (SO_PEERCRED)");
    ::close(c.fd);
    c.fd = -1;
    return;
  }
  switch (hdr.type) {
    case EXA_MSG_HELLO: {
      if (c.phase != Conn::HELLO) return protocol_error(hdr.seq, "HELLO sent twice");
      if (!expect(sizeof(exa_msg_hello), 0)) return;
      exa_msg_hello h;
      memcpy(&h, pl, sizeof h);
      if (!valid_name(h.job, sizeof h.job)) return protocol_error(hdr.seq, "job id is not 1..63 characters of [A-Za-z0-9._-]");
      if (c.tenant && !c.tenant->owns(h.job)) {
        log("agent: refusing pid " + std::to_string(c.pid) + " uid " + std::to_string(c.uid) + " as job " + h.job +
            ": not a job of tenant " + c.tenant->tenant);
        send_reply(c.fd, hdr.seq, -EACCES, "permission denied: uid " + std::to_string(c.uid) + " acts for tenant " + c.tenant->tenant +
                                               ", which does not own job \"" + h.job + "\"");
        return;
      }
      std::string rel;
      if (!kernel_at_least(5, 19, &rel)) {
        send_reply(c.fd, hdr.seq, -ENOTSUP, "this host runs Linux " + rel + "; exackpt needs >= 5.19 (shmem write-protect)");
        return;
      }
      bool dup = find(h.job) != nullptr;
      for (auto &o : conns_)
        if (o.get() != &c && o->job && o->job->id == h.job) dup = true;
      if (dup) {
        send_reply(c.fd, hdr.seq, -EEXIST, std::string("job \"") + h.job + "\" is already attached to this agent");
        return;
      }
      auto j = std::make_shared<Job>();
      j->id = h.job;
      j->pid = c.pid;
      j->uid = c.uid;
      j->pidfd = (int)syscall(SYS_pidfd_open, c.pid, 0);
      j->reply_fd = fcntl(c.fd, F_DUPFD_CLOEXEC, 0);
      if (j->pidfd < 0) {
        send_reply(c.fd, hdr.seq, -errno, "cannot open a pidfd for pid " + std::to_string(c.pid) + ": " + errstr(errno));
        return;
      }
      c.job = j;
      c.phase = Conn::UFFDS;
      /* EXA_AGENT_NO_DEVUFFD: behave like an agent that cannot open /dev/userfaultfd (tests the fallback) */
      int dev = getenv("EXA_AGENT_NO_DEVUFFD") ? (errno = EACCES, -1) : open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
      if (dev < 0) {
        log("agent: cannot open /dev/userfaultfd (" + errstr(errno) + "); job " + j->id +
            " falls back to a user-mode-only userfaultfd");
        send_reply(c.fd, hdr.seq, 0, "", -1, EXA_REPLY_FLAG_NO_DEVUFFD);
      } else {
        send_reply(c.fd, hdr.seq, 0, "", dev);
        ::close(dev);
      }
      return;
    }
    case EXA_MSG_UFFDS: {
      if (c.phase != Conn::UFFDS) return protocol_error(hdr.seq, "UFFDS out of order");
      if (hdr.len != sizeof(exa_msg_uffds)) return protocol_error(hdr.seq, "UFFDS payload size");
      exa_msg_uffds u;
      memcpy(&u, pl, sizeof u);
      bool has_async = (u.flags & EXA_UFFDS_HAS_ASYNC) != 0;
      if ((u.nfds != 1 && u.nfds != 3) || (int)u.nfds != nfds || has_async != (u.nfds == 3) ||
          (u.flags & ~(EXA_UFFDS_HAS_ASYNC | EXA_UFFDS_USER_ONLY)))
        return protocol_error(hdr.seq, "UFFDS: inconsistent fd count/flags");
      for (int i = 0; i < nfds; i++) {
        std::string l = fd_link(fds[i]);
        bool good = (i < 2) ? l == "anon_inode:[userfaultfd]" : l == "/proc/" + std::to_string(c.pid) + "/pagemap";
        if (!good) return protocol_error(hdr.seq, "UFFDS: fd " + std::to_string(i) + " is " + (l.empty() ? "?" : l));
      }
      Job &j = *c.job;
      j.uffd_sync = fds[0];
      if (has_async) {
        j.uffd_async = fds[1];
        j.pagemap = fds[2];
      }
      nfds = 0;
      j.has_async = has_async;
      j.user_only = (u.flags & EXA_UFFDS_USER_ONLY) != 0;
      if (getenv("EXA_CKPT_NO_ASYNC") && j.has_async) j.has_async = false; /* measure the pure seed scheme */
      j.start_fault_thread();
      {
        std::lock_guard<std::mutex> g(mu_);
        jobs_.push_back(c.job);
      }
      c.phase = Conn::READY;
      send_reply(c.fd, hdr.seq, 0, "");
      if (sink_) sink_(AgentEvent{AgentEvent::ATTACHED, j.id, c.pid, c.uid, j.user_only ? "user-mode-only uffd" : ""});
      return;
    }
    default:
      break;
  }
  if (c.phase != Conn::READY) return protocol_error(hdr.seq, "message type " + std::to_string(hdr.type) + " before attach completed");
  Job &j = *c.job;
  switch (hdr.type) {
    case EXA_MSG_REGION_ADD: {
      if (!expect(sizeof(exa_msg_region_add), 1)) return;
      exa_msg_region_add m;
      memcpy(&m, pl, sizeof m);
      int mfd = fds[0];
      nfds = 0;
      auto refuse = [&](int e, const std::string &t) {
        ::close(mfd);
        send_reply(c.fd, hdr.seq, e, "job " + j.id + ": " + t);
      };
      if (!valid_name(m.name, sizeof m.name)) return refuse(-EINVAL, "region name is not 1..63 characters of [A-Za-z0-9._-]");
      std::string name(m.name);
      struct sysinfo si {};
      sysinfo(&si);
      uint64_t ram = (uint64_t)si.totalram * si.mem_unit;
      if (m.size == 0 || m.size % kPage) return refuse(-EINVAL, "region \"" + name + "\": size " + std::to_string(m.size) + " is not a positive multiple of 4096");
      if (m.size > EXA_REGION_MAX_BYTES || m.size > ram)
        return refuse(-EINVAL, "region \"" + name + "\": size " + std::to_string(m.size) + " exceeds this host's memory (" +
                                   std::to_string(ram) + " bytes)");
      if (m.addr == 0 || m.addr % kPage) return refuse(-EINVAL, "region \"" + name + "\": address is not page-aligned");
      struct stat st;
      /* shmem is what write-protection needs: a memfd (made by libexa, or staged by the agent for EXA_RESTORE). */
      struct statfs sfs;
      if (fstat(mfd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < m.size || fstatfs(mfd, &sfs) != 0 ||
          sfs.f_type != TMPFS_MAGIC)
        return refuse(-EINVAL, "region \"" + name + "\": the passed fd is not a memfd or tmpfs file of at least its size");
      {
        /* The agent maps this memfd: were it shrunk under that mapping, the agent's next access would
         * raise SIGBUS and take every job on this host down with it. So it must be sealed. */
        int seals = fcntl(mfd, F_GET_SEALS);
        if (seals < 0 || !(seals & F_SEAL_SHRINK))
          return refuse(-EPERM, "region \"" + name + "\": its memfd is not sealed against shrinking (F_SEAL_SHRINK); libexa seals every region it makes");
      }
      {
        /* the workload must really map this memfd there: else we would track one range and save another */
        char mp[64];
        snprintf(mp, sizeof mp, "/proc/%d/maps", j.pid);
        FILE *f = fopen(mp, "re");
        bool match = false;
        if (f) {
          char line[512];
          while (fgets(line, sizeof line, f)) {
            unsigned long long s = 0, e = 0, off = 0, ino = 0;
            char perms[8], dev[16];
            if (sscanf(line, "%llx-%llx %7s %llx %15s %llu", &s, &e, perms, &off, dev, &ino) == 6 && s == m.addr) {
              match = e == m.addr + m.size && ino == (unsigned long long)st.st_ino && perms[3] == 's' && off == 0;
              break;
            }
          }
          fclose(f);
        }
        if (!match) return refuse(-EINVAL, "region \"" + name + "\": no shared mapping of that memfd at the given address");
      }
      std::lock_guard<std::mutex> g(j.mu);
      for (auto &r : j.regions) {
        if (r->name == name) return refuse(-EEXIST, "region \"" + name + "\" already exists");
        if (m.addr < r->addr + r->size && r->addr < m.addr + m.size) return refuse(-EINVAL, "region \"" + name + "\" overlaps \"" + r->name + "\"");
      }
      auto r = std::make_shared<Region>();
      r->name = name;
      r->addr = m.addr;
      r->size = m.size;
      r->npages = m.size / kPage;
      r->memfd = mfd;
      void *v = mmap(nullptr, m.size, PROT_READ, MAP_SHARED, mfd, 0);
      if (v == MAP_FAILED) {
        int e = errno;
        send_reply(c.fd, hdr.seq, -e, "job " + j.id + ": region \"" + name + "\": agent cannot map it: " + errstr(e));
        return; /* r closes mfd */
      }
      r->view = (const uint8_t *)v;
      r->state.assign(r->npages, PAGE_CLEAN);
      r->slot.assign(r->npages, 0);
      r->remote_dirty.assign(r->npages, 0);
      if (int e = uffd_register(j.uffd_sync, m.addr, m.size)) {
        send_reply(c.fd, hdr.seq, e, "job " + j.id + ": region \"" + name + "\": userfaultfd write-protect registration failed: " + errstr(e));
        return;
      }
      r->reg = Region::REG_SYNC;
      j.regions.push_back(r);
      send_reply(c.fd, hdr.seq, 0, "");
      return;
    }
    case EXA_MSG_REGION_FREE: {
      if (!expect(sizeof(exa_msg_region_free), 0)) return;
      exa_msg_region_free m;
      memcpy(&m, pl, sizeof m);
      if (!valid_name(m.name, sizeof m.name)) return protocol_error(hdr.seq, "REGION_FREE: bad name");
      std::lock_guard<std::mutex> g(j.mu);
      auto it = std::find_if(j.regions.begin(), j.regions.end(), [&](auto &r) { return r->name == m.name; });
      if (it == j.regions.end()) {
        send_reply(c.fd, hdr.seq, -ENOENT, "job " + j.id + ": no region \"" + m.name + "\"");
        return;
      }
      Region &r = **it;
      /* During a save the running session keeps the region (its own mapping and memfd) and finishes
       * it with the pause-time content; unregistering now would wake writers blocked on pages being
       * saved, so the workload's munmap drops the registration instead. */
      if (!j.busy) uffd_unregister(r.reg == Region::REG_SYNC ? j.uffd_sync : j.uffd_async, r.addr, r.size);
      j.regions.erase(it);
      send_reply(c.fd, hdr.seq, 0, "");
      return;
    }
    case EXA_MSG_CKPT_REQ: {
      if (!expect(0, 0)) return;
      {
        std::lock_guard<std::mutex> g(j.mu);
        j.pending_requests.push_back(hdr.seq);
      }
      if (sink_) sink_(AgentEvent{AgentEvent::CHECKPOINT_REQUEST, j.id, c.pid, c.uid, ""});
      return;
    }
    case EXA_MSG_DETACH: {
      if (!expect(0, 0)) return;
      send_reply(c.fd, hdr.seq, 0, "");
      ::close(c.fd);
      c.fd = -1;
      return;
    }
    default:
      return protocol_error(hdr.seq, "unknown message type " + std::to_string(hdr.type));
  }
}

}  // namespace exa
