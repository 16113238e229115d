/*
 * backend.cc: the DMA backend (see backend.h for threads, ownership and the
 * grant model; exa_dma_wire.h for the rings and doorbells).
 */
#include "backend.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>

#include "../ckpt/ckpt.h"
#include "exa.h"
#include "exa_dma_wire.h"

namespace exa {
namespace dma {

namespace {

constexpr uint64_t kSpinNs = 20000; /* spin on empty rings this long before sleeping */

uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

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

std::string errstr(int e) { return strerror(e < 0 ? -e : e); }

const char *op_name(uint16_t op) { return op == EXA_DMA_OP_WRITE ? "write" : op == EXA_DMA_OP_READ ? "read" : "?"; }

}  // namespace

Buffer::~Buffer() {
  if (map) munmap(map, size);
}

/* One client application: its connection, doorbells, queues, buffer tables and serving thread. */
class Client {
 public:
  Client(Backend *be, int sock, pid_t pid) : be_(be), sock_(sock), pid_(pid) {}
  ~Client() {
    if (th_.joinable()) th_.join();
    for (auto &kv : queues_) drop_queue(kv.second);
    if (sq_efd_ >= 0) ::close(sq_efd_);
    ::close(sock_);
  }
  void start() { th_ = std::thread([this] { run(); }); }
  std::atomic<bool> done{false};

 private:
  struct Queue {
    uint32_t id = 0;
    void *ring = nullptr;
    exa_dma_ring_hdr *hdr = nullptr;
    int cq_efd = -1;
    uint64_t sq_head = 0; /* ours; the shared copy is only published */
    uint64_t cq_tail = 0;
    bool broken = false;
  };

  void drop_queue(Queue &q) {
    if (q.ring) munmap(q.ring, EXA_DMA_RING_BYTES);
    if (q.cq_efd >= 0) ::close(q.cq_efd);
    q.ring = nullptr;
    q.cq_efd = -1;
  }

  bool stopping() {
    struct pollfd p = {be_->stop_fd_, POLLIN, 0};
    return poll(&p, 1, 0) > 0;
  }

  /* Push one completion; waits (bounded by stop / hang-up) while a misbehaving frontend left the
   * completion ring full. Returns false when the client must go away. */
  bool complete(Queue &q, uint64_t tag, uint16_t op, int32_t status, uint64_t len, const std::string &why) {
    if (status < 0) be_->n_errors_++;
    for (;;) {
      uint64_t head = __atomic_load_n(&q.hdr->cq_head, __ATOMIC_ACQUIRE);
      if (q.cq_tail - head < EXA_DMA_RING_DEPTH) break;
      struct pollfd p[2] = {{be_->stop_fd_, POLLIN, 0}, {sock_, 0, 0}};
      if (poll(p, 2, 1) != 0 && (p[0].revents || p[1].revents)) return false;
    }
    exa_dma_cqe *e = &exa_dma_cq(q.ring)[q.cq_tail % EXA_DMA_RING_DEPTH];
    e->tag = tag;
    e->len = status < 0 ? 0 : len;
    e->status = status;
    e->op = op;
    e->pad = 0;
    memset(e->reason, 0, sizeof e->reason);
    if (!why.empty()) snprintf(e->reason, sizeof e->reason, "%s", why.c_str());
    q.cq_tail++;
    __atomic_store_n(&q.hdr->cq_tail, q.cq_tail, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&q.hdr->fe_armed, __ATOMIC_SEQ_CST)) {
      uint64_t one = 1;
      if (write(q.cq_efd, &one, sizeof one) < 0) { /* overflow only: the frontend is awake */ }
    }
    return true;
  }

  /* Validate and execute one request (a private copy: the frontend may scribble on the ring). */
  bool exec(Queue &q, const exa_dma_req &r) {
    auto refuse = [&](int err, const std::string &why) { return complete(q, r.tag, r.op, -err, 0, why); };
    if (r.op != EXA_DMA_OP_WRITE && r.op != EXA_DMA_OP_READ)
      return refuse(EINVAL, "job " + job_ + ", queue " + std::to_string(q.id) + ": garbage request: unknown operation " +
                                std::to_string(r.op));
    if (r.flags || r.pad || r.reserved[0] || r.reserved[1])
      return refuse(EINVAL, "job " + job_ + ", queue " + std::to_string(q.id) + ": garbage request: reserved fields set");
    std::shared_ptr<Buffer> lb = r.local >= 1 && r.local <= local_.size() ? local_[r.local - 1] : nullptr;
    if (!lb) return refuse(EBADF, "job " + job_ + ": no local DMA buffer with id " + std::to_string(r.local));
    std::shared_ptr<Buffer> rb = r.remote >= 1 && r.remote <= remote_.size() ? remote_[r.remote - 1] : nullptr;
    if (!rb) return refuse(EBADF, "job " + job_ + ": no remote buffer handle " + std::to_string(r.remote) + " (look it up first)");
    unsigned need = r.op == EXA_DMA_OP_WRITE ? EXA_DMA_WRITE : EXA_DMA_READ;
    {
      std::lock_guard<std::mutex> g(lb->mu);
      if (!lb->gone.empty()) return refuse(ENOENT, "local buffer \"" + lb->name + "\" of job " + job_ + ": " + lb->gone);
    }
    {
      std::lock_guard<std::mutex> g(rb->mu);
      if (!rb->gone.empty()) {
        std::string why = "buffer \"" + rb->name + "\" of job " + rb->owner + ": " + rb->gone;
        return refuse(rb->gone.find("exited") != std::string::npos ? ECONNRESET : ENOENT, why);
      }
      unsigned have = rb->owner == job_ ? (EXA_DMA_READ | EXA_DMA_WRITE) : 0;
      auto it = rb->grants.find(job_);
      if (it != rb->grants.end()) have |= it->second;
      if (!(have & need))
        return refuse(EACCES, "job " + rb->owner + " has not granted " + (need == EXA_DMA_WRITE ? "write" : "read") +
                                  " access to buffer \"" + rb->name + "\" to job " + job_);
    }
    auto range = [](uint64_t off, uint64_t len, uint64_t size) { return off <= size && len <= size - off; };
    /* A job may address its own buffer through a lookup; memcpy must not see overlapping ranges. */
    bool overlap = lb == rb && r.local_off < r.remote_off + r.len && r.remote_off < r.local_off + r.len;
    if (r.len == 0) return refuse(EINVAL, "job " + job_ + ": " + op_name(r.op) + " of 0 bytes");
    if (!range(r.local_off, r.len, lb->size))
      return refuse(EINVAL, "job " + job_ + ": " + op_name(r.op) + " of " + std::to_string(r.len) + " bytes at offset " +
                                std::to_string(r.local_off) + " is outside local buffer \"" + lb->name + "\" (" +
                                std::to_string(lb->size) + " bytes)");
    if (!range(r.remote_off, r.len, rb->size))
      return refuse(EINVAL, "job " + job_ + ": " + op_name(r.op) + " of " + std::to_string(r.len) + " bytes at offset " +
                                std::to_string(r.remote_off) + " is outside buffer \"" + rb->name + "\" of job " + rb->owner +
                                " (" + std::to_string(rb->size) + " bytes)");
    if (overlap)
      return refuse(EINVAL, "job " + job_ + ": " + op_name(r.op) + " within buffer \"" + lb->name + "\" with overlapping ranges");
    try {
      /* Engine (same host). The destination is always written through the checkpointer. */
      if (r.op == EXA_DMA_OP_WRITE) be_->agent_->remote_write(rb->owner, rb->name, r.remote_off, lb->map + r.local_off, r.len);
      else be_->agent_->remote_write(job_, lb->name, r.local_off, rb->map + r.remote_off, r.len);
    } catch (const exa::Error &e) {
      return refuse(-e.err, std::string(op_name(r.op)) + " " + job_ + " -> " + rb->owner + ": " + e.what());
    } catch (const std::exception &e) {
      return refuse(EIO, std::string(op_name(r.op)) + ": " + e.what());
    }
    be_->n_ops_++;
    be_->n_bytes_ += r.len;
    return complete(q, r.tag, r.op, 0, r.len, "");
  }

  /* Drain up to a fair share of every queue. Returns -1 to end the client, else the work done. */
  int serve_rings() {
    int work = 0;
    for (auto &kv : queues_) {
      Queue &q = kv.second;
      if (q.broken || !q.ring) continue;
      uint64_t tail = __atomic_load_n(&q.hdr->sq_tail, __ATOMIC_ACQUIRE);
      if (tail - q.sq_head > EXA_DMA_RING_DEPTH) {
        q.broken = true;
        if (!complete(q, 0, 0, -EPROTO,
                      0, "job " + job_ + ", queue " + std::to_string(q.id) + ": garbage request ring (tail " + std::to_string(tail) +
                             " beyond head " + std::to_string(q.sq_head) + " + depth); queue no longer served"))
          return -1;
        continue;
      }
      for (int n = 0; q.sq_head != tail && n < 32; n++, work++) {
        exa_dma_req r;
        memcpy(&r, &exa_dma_sq(q.ring)[q.sq_head % EXA_DMA_RING_DEPTH], sizeof r);
        q.sq_head++;
        __atomic_store_n(&q.hdr->sq_head, q.sq_head, __ATOMIC_RELEASE);
        if (!exec(q, r)) return -1;
      }
    }
    return work;
  }

  void reply(const exa_dma_msg &req, int status, const std::string &text, uint32_t id = 0, uint64_t size = 0, unsigned perms = 0) {
    exa_dma_msg m;
    memset(&m, 0, sizeof m);
    m.magic = EXA_DMA_WIRE_MAGIC;
    m.version = EXA_DMA_WIRE_VERSION;
    m.type = EXA_DMA_MSG_REPLY;
    m.seq = req.seq;
    m.status = status;
    m.id = id;
    m.size = size;
    m.perms = perms;
    snprintf(m.text, sizeof m.text, "%s", text.c_str());
    ssize_t n;
    do n = send(sock_, &m, sizeof m, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
  }

  /* One control message. Returns false to end the connection. */
  bool control() {
    exa_dma_msg m;
    int fds[4];
    int nfds = 0;
    union {
      char b[CMSG_SPACE(sizeof(int) * 4)];
      struct cmsghdr align;
    } cm;
    struct iovec iov = {&m, sizeof m};
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cm.b;
    mh.msg_controllen = sizeof cm.b;
    ssize_t n;
    do n = recvmsg(sock_, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    if (n <= 0) return false;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k; i++) {
          int fd;
          memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          if (nfds < 4) fds[nfds++] = fd;
          else ::close(fd);
        }
      }
    }
    /* Every fd we keep is moved out of fds[] (set to -1); the rest are closed on return. */
    struct FdGuard {
      int *f;
      int &n;
      ~FdGuard() {
        for (int i = 0; i < n; i++)
          if (f[i] >= 0) ::close(f[i]);
      }
    } guard{fds, nfds};
    auto bad = [&](const std::string &why) {
      reply(m, -EPROTO, "DMA backend: " + why);
      return false;
    };
    if ((size_t)n != sizeof m || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || m.magic != EXA_DMA_WIRE_MAGIC ||
        m.version != EXA_DMA_WIRE_VERSION)
      return bad("malformed message (size, magic or version)");
    auto want_fds = [&](int k) { return nfds == k; };
    if (!hello_ && m.type != EXA_DMA_MSG_HELLO) return bad("the first message must be HELLO");
    switch (m.type) {
      case EXA_DMA_MSG_HELLO: {
        if (hello_ || !want_fds(1) || !valid_name(m.job, sizeof m.job)) return bad("bad HELLO");
        bool ok = false;
        for (auto &j : be_->agent_->jobs())
          if (j.id == m.job && j.pid == pid_) ok = true;
        if (!ok) {
          reply(m, -EACCES, "DMA backend: process " + std::to_string(pid_) + " is not the process attached as job " + m.job);
          return false;
        }
        job_ = m.job;
        sq_efd_ = fds[0];
        fds[0] = -1;
        hello_ = true;
        reply(m, 0, "");
        return true;
      }
      case EXA_DMA_MSG_QUEUE_ADD: {
        if (!want_fds(2)) return bad("QUEUE_ADD needs the ring memfd and the completion eventfd");
        if (queues_.size() >= EXA_DMA_MAX_QUEUES) {
          reply(m, -ENOMEM, "job " + job_ + ": at most " + std::to_string(EXA_DMA_MAX_QUEUES) + " DMA queues");
          return true;
        }
        struct stat st;
        if (fstat(fds[0], &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < EXA_DMA_RING_BYTES)
          return bad("the ring memfd is not a file of at least " + std::to_string(EXA_DMA_RING_BYTES) + " bytes");
        /* An unsealed ring could be shrunk under our mapping: our next access would SIGBUS the agent. */
        int seals = fcntl(fds[0], F_GET_SEALS);
        if (seals < 0 || !(seals & F_SEAL_SHRINK)) return bad("the ring memfd must be sealed against shrinking (F_SEAL_SHRINK)");
        void *ring = mmap(nullptr, EXA_DMA_RING_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
        if (ring == MAP_FAILED) return bad("cannot map the ring: " + errstr(errno));
        Queue q;
        q.id = next_queue_++;
        q.ring = ring;
        q.hdr = (exa_dma_ring_hdr *)ring;
        q.cq_efd = fds[1];
        fds[1] = -1;
        /* Start from where the frontend says it is (a fresh ring: 0), never trusted afterwards. */
        q.sq_head = __atomic_load_n(&q.hdr->sq_head, __ATOMIC_ACQUIRE);
        q.cq_tail = __atomic_load_n(&q.hdr->cq_tail, __ATOMIC_ACQUIRE);
        queues_[q.id] = q;
        reply(m, 0, "", q.id);
        return true;
      }
      case EXA_DMA_MSG_QUEUE_DEL: {
        auto it = queues_.find(m.id);
        if (it == queues_.end()) {
          reply(m, -ENOENT, "job " + job_ + ": no DMA queue " + std::to_string(m.id));
          return true;
        }
        drop_queue(it->second);
        queues_.erase(it);
        reply(m, 0, "");
        return true;
      }
      case EXA_DMA_MSG_BUF_ADD: {
        if (!want_fds(1) || !valid_name(m.name, sizeof m.name)) return bad("BUF_ADD needs a valid name and the region memfd");
        bool registered = false;
        for (auto &j : be_->agent_->jobs())
          if (j.id == job_)
            for (auto &r : j.regions)
              if (r.name == m.name && r.size == m.size) registered = true;
        if (!registered) {
          reply(m, -ENOENT, "job " + job_ + " has no checkpointable region \"" + m.name + "\" of " + std::to_string(m.size) +
                                " bytes registered with the agent");
          return true;
        }
        struct stat st;
        if (fstat(fds[0], &st) != 0 || (uint64_t)st.st_size < m.size) {
          reply(m, -EINVAL, "job " + job_ + ": the memfd of buffer \"" + m.name + "\" is smaller than " + std::to_string(m.size));
          return true;
        }
        void *map = mmap(nullptr, m.size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
        if (map == MAP_FAILED) {
          reply(m, -errno, "job " + job_ + ": cannot map buffer \"" + m.name + "\": " + errstr(errno));
          return true;
        }
        auto b = std::make_shared<Buffer>();
        b->owner = job_;
        b->name = m.name;
        b->size = m.size;
        b->map = (uint8_t *)map;
        {
          std::lock_guard<std::mutex> g(be_->mu_);
          auto key = job_ + "/" + m.name;
          if (be_->registry_.count(key)) {
            reply(m, -EEXIST, "job " + job_ + " already has a DMA buffer \"" + m.name + "\"");
            return true;
          }
          be_->registry_[key] = b;
        }
        local_.push_back(b);
        reply(m, 0, "", (uint32_t)local_.size(), m.size);
        return true;
      }
      case EXA_DMA_MSG_BUF_DEL: {
        auto b = m.id >= 1 && m.id <= local_.size() ? local_[m.id - 1] : nullptr;
        if (!b || !b->map) {
          reply(m, -ENOENT, "job " + job_ + ": no DMA buffer with id " + std::to_string(m.id));
          return true;
        }
        retire(b, "freed by its owner");
        /* A tombstone keeps the name for clear errors; the mapping goes with the last holder. */
        auto t = std::make_shared<Buffer>();
        t->owner = b->owner;
        t->name = b->name;
        t->gone = "freed by its owner";
        local_[m.id - 1] = t;
        reply(m, 0, "");
        return true;
      }
      case EXA_DMA_MSG_GRANT: {
        if (!valid_name(m.job, sizeof m.job) || (m.perms & ~(EXA_DMA_READ | EXA_DMA_WRITE))) return bad("bad GRANT");
        auto b = m.id >= 1 && m.id <= local_.size() ? local_[m.id - 1] : nullptr;
        if (!b || !b->map) {
          reply(m, -ENOENT, "job " + job_ + ": no DMA buffer with id " + std::to_string(m.id));
          return true;
        }
        std::lock_guard<std::mutex> g(b->mu);
        if (m.perms) b->grants[m.job] = m.perms;
        else b->grants.erase(m.job);
        reply(m, 0, "");
        return true;
      }
      case EXA_DMA_MSG_LOOKUP: {
        if (!valid_name(m.job, sizeof m.job) || !valid_name(m.name, sizeof m.name)) return bad("bad LOOKUP");
        auto b = be_->find(m.job, m.name);
        if (!b) {
          reply(m, -ENOENT, "job " + std::string(m.job) + " has no DMA buffer \"" + m.name + "\" on this host");
          return true;
        }
        unsigned perms = b->owner == job_ ? (EXA_DMA_READ | EXA_DMA_WRITE) : 0;
        {
          std::lock_guard<std::mutex> g(b->mu);
          auto it = b->grants.find(job_);
          if (it != b->grants.end()) perms |= it->second;
        }
        if (!perms) {
          reply(m, -EACCES, "job " + std::string(m.job) + " has not granted buffer \"" + m.name + "\" to job " + job_);
          return true;
        }
        if (remote_.size() >= EXA_DMA_MAX_BUFFERS) {
          reply(m, -ENOMEM, "job " + job_ + ": too many remote buffer handles");
          return true;
        }
        remote_.push_back(b);
        reply(m, 0, "", (uint32_t)remote_.size(), b->size, perms);
        return true;
      }
      default:
        return bad("unknown message type " + std::to_string(m.type));
    }
  }

  void retire(const std::shared_ptr<Buffer> &b, const std::string &why) {
    {
      std::lock_guard<std::mutex> g(b->mu);
      if (b->gone.empty()) b->gone = why;
    }
    std::lock_guard<std::mutex> g(be_->mu_);
    auto it = be_->registry_.find(b->owner + "/" + b->name);
    if (it != be_->registry_.end() && it->second == b) be_->registry_.erase(it);
  }

  void run() {
    uint64_t idle_since = now_ns();
    unsigned busy_rounds = 0, spins = 0;
    for (;;) {
      int w = hello_ ? serve_rings() : 0;
      if (w < 0) break;
      uint64_t t = now_ns();
      if (w > 0) {
        idle_since = t;
        /* keep control messages and stop from starving behind a busy ring */
        if (++busy_rounds % 64) continue;
        struct pollfd p[2] = {{sock_, POLLIN, 0}, {be_->stop_fd_, POLLIN, 0}};
        if (poll(p, 2, 0) > 0) {
          if (p[1].revents) break;
          if (p[0].revents && !control()) break;
        }
        continue;
      }
      if (hello_ && t - idle_since < kSpinNs) {
#if defined(__x86_64__) || defined(__i386__)
        for (int i = 0; i < 2; i++) __builtin_ia32_pause(); /* leave the core to a sibling doing real work */
#endif
        /* on an oversubscribed machine the client we wait for may need this very CPU */
        if ((++spins & 255) == 0) sched_yield();
        continue;
      }
      /* Arm (protocol in exa_dma_wire.h), re-check, sleep. */
      for (auto &kv : queues_)
        if (kv.second.ring) __atomic_store_n(&kv.second.hdr->be_sleeping, 1, __ATOMIC_SEQ_CST);
      __atomic_thread_fence(__ATOMIC_SEQ_CST);
      bool pending = false;
      for (auto &kv : queues_)
        if (kv.second.ring && !kv.second.broken && __atomic_load_n(&kv.second.hdr->sq_tail, __ATOMIC_ACQUIRE) != kv.second.sq_head)
          pending = true;
      int pr = 0;
      struct pollfd p[3] = {{sock_, POLLIN, 0}, {be_->stop_fd_, POLLIN, 0}, {sq_efd_, POLLIN, 0}};
      if (!pending) pr = poll(p, sq_efd_ >= 0 ? 3 : 2, -1);
      for (auto &kv : queues_)
        if (kv.second.ring) __atomic_store_n(&kv.second.hdr->be_sleeping, 0, __ATOMIC_SEQ_CST);
      if (pr < 0 && errno != EINTR) break;
      if (pr > 0) {
        if (p[1].revents) break;
        if (sq_efd_ >= 0 && p[2].revents) {
          uint64_t v;
          if (read(sq_efd_, &v, sizeof v) < 0) { /* already drained */ }
        }
        if (p[0].revents && !control()) break;
      }
      idle_since = now_ns();
    }
    /* The client is gone (exit, close, protocol error) or the backend stops: its buffers go. */
    std::string why = "its owner job exited or closed its DMA session";
    for (auto &b : local_)
      if (b && b->map) retire(b, why);
    local_.clear();
    remote_.clear();
    /* The peer sees EOF now; the fd itself is closed by ~Client when the accept loop reaps us. */
    shutdown(sock_, SHUT_RDWR);
    done = true;
  }

  Backend *be_;
  int sock_;
  pid_t pid_;
  int sq_efd_ = -1;
  bool hello_ = false;
  std::string job_;
  std::map<uint32_t, Queue> queues_;
  uint32_t next_queue_ = 1;
  std::vector<std::shared_ptr<Buffer>> local_;  /* id = index + 1 */
  std::vector<std::shared_ptr<Buffer>> remote_; /* handle = index + 1 */
  std::thread th_;
};

Backend::Backend(Agent *agent, const std::string &socket_path, unsigned socket_mode) : agent_(agent), path_(socket_path) {
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof sa.sun_path) throw Error(-ENAMETOOLONG, "DMA socket path too long: " + socket_path);
  strcpy(sa.sun_path, socket_path.c_str());
  listen_fd_ = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) throw Error(-errno, "DMA backend: socket: " + errstr(errno));
  unlink(socket_path.c_str()); /* a stale file from a dead agent; the agent socket itself guards against two live agents */
  if (bind(listen_fd_, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(listen_fd_, 64) != 0) {
    int e = errno;
    ::close(listen_fd_);
    throw Error(-e, "DMA backend: cannot listen on " + socket_path + ": " + errstr(e));
  }
  /* Same mode as the agent's socket; who may act as which job is decided by the SO_PEERCRED pid check. */
  chmod(socket_path.c_str(), socket_mode);
  stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) {
    int e = errno;
    ::close(listen_fd_);
    unlink(socket_path.c_str());
    throw Error(-e, "DMA backend: eventfd: " + errstr(e));
  }
  accept_ = std::thread([this] { accept_loop(); });
}

Backend::~Backend() { close(); }

void Backend::close() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (closed_) return;
    closed_ = true;
  }
  /* Never drained: every thread polling it sees it readable from now on. */
  uint64_t one = 1;
  if (write(stop_fd_, &one, sizeof one) < 0) { /* cannot overflow from 0 */ }
  if (accept_.joinable()) accept_.join();
  std::vector<std::unique_ptr<Client>> cs;
  {
    std::lock_guard<std::mutex> g(mu_);
    cs.swap(clients_);
  }
  cs.clear(); /* each ~Client joins its thread (after the operation in progress) and closes its fds */
  ::close(listen_fd_);
  ::close(stop_fd_);
  unlink(path_.c_str());
  std::lock_guard<std::mutex> g(mu_);
  registry_.clear();
}

void Backend::accept_loop() {
  for (;;) {
    struct pollfd p[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    int r = poll(p, 2, 1000);
    if (r < 0 && errno != EINTR) return;
    if (p[1].revents) return;
    /* reap clients whose connection ended (the 1 s timeout bounds how long they linger) */
    std::vector<std::unique_ptr<Client>> dead;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto &c : clients_)
        if (c->done) dead.push_back(std::move(c));
      clients_.erase(std::remove(clients_.begin(), clients_.end(), nullptr), clients_.end());
    }
    dead.clear();
    if (r <= 0 || !(p[0].revents & POLLIN)) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    struct ucred cr;
    socklen_t cl = sizeof cr;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) != 0) {
      ::close(fd);
      continue;
    }
    auto c = std::make_unique<Client>(this, fd, cr.pid);
    Client *raw = c.get();
    {
      std::lock_guard<std::mutex> g(mu_);
      if (closed_) return; /* c closes fd */
      clients_.push_back(std::move(c));
    }
    n_clients_++;
    raw->start();
  }
}

std::shared_ptr<Buffer> Backend::find(const std::string &owner, const std::string &name) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = registry_.find(owner + "/" + name);
  return it == registry_.end() ? nullptr : it->second;
}

BackendStats Backend::stats() {
  BackendStats s;
  s.clients = n_clients_;
  s.ops = n_ops_;
  s.errors = n_errors_;
  s.bytes = n_bytes_;
  return s;
}

uint64_t Backend::engine_direct(const std::string &src_job, const std::string &src_buf, const std::string &dst_job,
                                const std::string &dst_buf, uint64_t len, uint32_t iters, uint64_t span) {
  auto s = find(src_job, src_buf);
  auto d = find(dst_job, dst_buf);
  if (!s || !d) throw Error(-ENOENT, "engine_direct: no such DMA buffers");
  if (!len || span < len || span > s->size || span > d->size) throw Error(-EINVAL, "engine_direct: length/span beyond the buffers");
  uint64_t t0 = now_ns();
  for (uint32_t i = 0; i < iters; i++) {
    uint64_t off = ((uint64_t)i * len) % (span - span % len);
    agent_->remote_write(d->owner, d->name, off, s->map + off, len);
  }
  return now_ns() - t0;
}

}  // namespace dma
}  // namespace exa
