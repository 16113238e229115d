/*
 * backend.cc: the DMA backend (see backend.h for threads, ownership and the
 * grant model; exa_dma_wire.h for the rings and doorbells; exa_dma_net.h for
 * the agent-to-agent TCP data path).
 */
#include "backend.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>

#include "../ckpt/ckpt.h"
#include "exa.h"
#include "exa_dma_net.h"
#include "exa_dma_wire.h"

namespace exa {
namespace dma {

namespace {

constexpr uint64_t kSpinNs = 20000;        /* spin on empty rings this long before sleeping */
constexpr uint64_t kYieldAfterNs = 5000;   /* and after this long of it, yield the CPU now and then */
constexpr uint64_t kControlCheckNs = 200000; /* a busy client thread looks at its control socket this often */
constexpr uint64_t kMs = 1000000ull;
constexpr uint64_t kRouteWaitNs = 5000 * kMs; /* a missing route is awaited this long */
constexpr uint64_t kRecheckNs = 20 * kMs;  /* held local operations are re-examined at least this often */
constexpr size_t kMaxPeers = 256;          /* accepted agent connections at once */
constexpr size_t kChunk = 1u << 17;        /* incoming payloads are received and written in chunks */

uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

const char *op_name(uint16_t op) { return op == EXA_DMA_OP_WRITE ? "write" : op == EXA_DMA_OP_READ ? "read" : "?"; }

bool range_ok(uint64_t off, uint64_t len, uint64_t size) { return off <= size && len <= size - off; }

/* ---- TCP helpers ---- */

bool recv_all(int fd, void *p, size_t n) {
  char *c = (char *)p;
  while (n) {
    ssize_t k = recv(fd, c, n, MSG_WAITALL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    c += k;
    n -= (size_t)k;
  }
  return true;
}

bool send_iov(int fd, struct iovec *iov, int n) {
  while (n > 0) {
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)n;
    ssize_t k = sendmsg(fd, &mh, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) return false;
    size_t left = (size_t)k;
    while (n > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (char *)iov->iov_base + left;
      iov->iov_len -= left;
    }
  }
  return true;
}

bool send_frame(int fd, const exa_dma_net_hdr &h, const void *payload, uint64_t len) {
  struct iovec iov[2] = {{(void *)&h, sizeof h}, {(void *)payload, (size_t)len}};
  return send_iov(fd, iov, len ? 2 : 1);
}

void hdr_init(exa_dma_net_hdr &h, uint16_t type) {
  memset(&h, 0, sizeof h);
  h.magic = EXA_DMA_NET_MAGIC;
  h.version = EXA_DMA_NET_VERSION;
  h.type = type;
}

void put(char *dst, size_t cap, const std::string &s) { snprintf(dst, cap, "%s", s.c_str()); }

std::string field(const char *s, size_t cap) { return std::string(s, strnlen(s, cap)); }

bool parse_addr(const std::string &a, struct sockaddr_in *sa) {
  auto c = a.rfind(':');
  if (c == std::string::npos || c == 0 || c + 1 >= a.size()) return false;
  std::string host = a.substr(0, c), port = a.substr(c + 1);
  if (host == "localhost") host = "127.0.0.1";
  for (char ch : port)
    if (ch < '0' || ch > '9') return false;
  long p = strtol(port.c_str(), nullptr, 10);
  if (port.size() > 5 || p < 0 || p > 65535) return false;
  memset(sa, 0, sizeof *sa);
  sa->sin_family = AF_INET;
  sa->sin_port = htons((uint16_t)p);
  return inet_pton(AF_INET, host.c_str(), &sa->sin_addr) == 1;
}

void tune(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int connect_to(const std::string &addr, std::string *err) {
  struct sockaddr_in sa;
  if (!parse_addr(addr, &sa)) {
    *err = "\"" + addr + "\" is not an ip:port address";
    return -EINVAL;
  }
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    *err = "socket: " + errstr(errno);
    return -errno;
  }
  int r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  if (r < 0 && errno == EINPROGRESS) {
    struct pollfd p = {fd, POLLOUT, 0};
    r = poll(&p, 1, 3000);
    if (r == 0) {
      ::close(fd);
      *err = "cannot connect to agent " + addr + ": timed out";
      return -ETIMEDOUT;
    }
    int e = 0;
    socklen_t el = sizeof e;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el);
    if (e) {
      errno = e;
      r = -1;
    } else r = 0;
  }
  if (r < 0) {
    int e = errno;
    ::close(fd);
    *err = "cannot connect to agent " + addr + ": " + errstr(e);
    return -e;
  }
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  tune(fd);
  return fd;
}

std::string sock_peer(int fd) {
  struct sockaddr_in sa;
  socklen_t l = sizeof sa;
  char ip[64] = "?";
  if (getpeername(fd, (struct sockaddr *)&sa, &l) == 0 && sa.sin_family == AF_INET) {
    inet_ntop(AF_INET, &sa.sin_addr, ip, sizeof ip);
    return std::string(ip) + ":" + std::to_string(ntohs(sa.sin_port));
  }
  return ip;
}

/* Constant-time comparison of two tokens. */
bool same_token(const std::string &a, const std::string &b) {
  unsigned char d = a.size() != b.size();
  size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; i++) d |= (unsigned char)((i < a.size() ? a[i] : 0) ^ (i < b.size() ? b[i] : 0));
  return d == 0;
}

/*
 * The bytes of a received WRITE payload (or READ reply) go straight from the socket into a job's
 * buffer, through its checkpointer (Agent::remote_fill), with no staging copy: the socket is
 * read without blocking while the job's lock is held, at most kChunk bytes at a time, and the
 * thread waits for more bytes outside the lock. The first failure to write is kept (a negative
 * errno and its text) and the rest of the payload is drained into `scratch` (kChunk bytes), so
 * the stream stays in step; so is a payload that is not to be applied. recv() returns false when
 * the connection failed mid-payload.
 */
struct PayloadRecv {
  int status = 0;
  std::string error;
  bool recv(int fd, Agent *agent, const std::string &job, const std::string &buffer, uint64_t off, uint64_t len,
            std::vector<uint8_t> &scratch, bool apply = true) {
    uint64_t done = 0;
    while (done < len) {
      size_t want = (size_t)std::min<uint64_t>(kChunk, len - done);
      if (!apply || status) {
        if (!recv_all(fd, scratch.data(), want)) return false;
        done += want;
        continue;
      }
      int rerr = 0;
      bool eof = false;
      size_t n = 0; /* bytes taken from the socket: counted here, so a throw after some were taken keeps the stream in step */
      try {
        agent->remote_fill(job, buffer, off + done, want, [&](uint8_t *dst, size_t m) -> size_t {
          ssize_t k;
          do k = ::recv(fd, dst, m, MSG_DONTWAIT);
          while (k < 0 && errno == EINTR);
          if (k < 0) rerr = errno;
          if (k == 0) eof = true;
          if (k > 0) n += (size_t)k;
          return k > 0 ? (size_t)k : 0;
        });
      } catch (const Error &x) {
        status = x.err < 0 ? x.err : -EIO;
        error = x.what();
      } catch (const std::exception &x) {
        status = -EIO;
        error = x.what();
      }
      done += n;
      if (status) continue; /* the rest is drained */
      if (eof || (rerr && rerr != EAGAIN && rerr != EWOULDBLOCK)) return false;
      if (done < len && n < want) {
        struct pollfd pf = {fd, POLLIN, 0};
        int pr;
        do pr = poll(&pf, 1, -1);
        while (pr < 0 && errno == EINTR);
        if (pr < 0) return false;
      }
    }
    return true;
  }
};

}  // namespace

Buffer::~Buffer() {
  if (map) munmap(map, size);
}

/* One operation as the backend tracks it once consumed from a request ring. */
struct Op {
  exa_dma_req r;
  uint64_t seq = 0;        /* posting order within its queue */
  uint64_t first_held = 0; /* ns; 0 = never held */
  uint64_t not_before = 0; /* ns: do not re-examine before */
  uint64_t route_wait = 0; /* ns when it started waiting for a route */
  uint64_t route_seq = 0;
  unsigned backoff_ms = 0;
  bool retry = false;       /* a re-send of a HELD / MOVED operation */
  bool wait_flight = false; /* waiting for replies of earlier operations */
};

/* Hand-over from link reader threads (and the backend) to one client thread. */
struct Inbox {
  enum Kind { APPLIED, FAILED, HELD, MOVED };
  struct Event {
    uint32_t queue;
    Op op;
    Kind kind;
    int32_t status;
    std::string why, job, addr;
  };
  std::mutex mu;
  std::deque<Event> ev;
  int efd = -1;
  bool alive = true;
  std::atomic<bool> has{false};
  std::atomic<bool> sleeping{false}; /* the client thread is about to sleep / sleeps (Dekker with push) */
  void ring() {
    uint64_t one = 1;
    if (write(efd, &one, sizeof one) < 0) { /* overflow only: already readable */ }
  }
  void push(Event &&e) {
    std::lock_guard<std::mutex> g(mu);
    if (!alive) return;
    ev.push_back(std::move(e));
    has.store(true);
    if (sleeping.load()) ring(); /* a spinning client sees `has` by itself */
  }
  void wake() {
    std::lock_guard<std::mutex> g(mu);
    if (alive) ring();
  }
};

struct SyncWait {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  exa_dma_net_hdr rep;
  std::string err;
};

/* A request in flight on a link. Its destructor ends the issuer's "operation started". */
struct Pending {
  std::shared_ptr<Inbox> inbox;
  uint32_t queue = 0;
  Op op;
  std::string job, name, addr;
  std::shared_ptr<Buffer> local;        /* READ: where the bytes land */
  std::shared_ptr<JobState> issuer_js;  /* active count taken by the sender */
  std::shared_ptr<SyncWait> sync;       /* LOOKUP */
  Pending() = default;
  Pending(const Pending &) = delete;
  ~Pending() {
    if (issuer_js) issuer_js->active.fetch_sub(1);
  }
  std::string what() const {
    return std::string(op_name(op.r.op)) + (op.r.op == EXA_DMA_OP_READ ? " of" : " to") + " buffer \"" + name + "\" of job " + job;
  }
};

/* One outgoing connection to a peer agent, shared by every client of this backend. */
class Link {
 public:
  Link(Backend *be, const std::string &addr, int fd) : be_(be), addr_(addr), fd_(fd) {}
  ~Link() {
    kill();
    if (th_.joinable()) th_.join();
    ::close(fd_);
  }
  void start() { th_ = std::thread([this] { read_loop(); }); }
  bool dead() {
    std::lock_guard<std::mutex> g(mu_);
    return dead_;
  }
  void kill() { shutdown(fd_, SHUT_RDWR); }
  void join() {
    if (th_.joinable()) th_.join();
  }

  /* Register p under a fresh id, then send. false (p dropped) only when the link was already dead;
   * once registered, the outcome always arrives through p (a failure of the connection included). */
  bool send(exa_dma_net_hdr &h, const void *payload, uint64_t len, std::unique_ptr<Pending> p, std::string *err) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (dead_) {
        *err = why_;
        return false;
      }
      h.id = next_id_++;
      pending_[h.id] = std::move(p);
    }
    std::lock_guard<std::mutex> g(send_mu_);
    if (!send_frame(fd_, h, payload, len)) kill(); /* the reader fails every pending request */
    return true;
  }

 private:
  void fail_all(const std::string &why) {
    std::map<uint64_t, std::unique_ptr<Pending>> all;
    {
      std::lock_guard<std::mutex> g(mu_);
      dead_ = true;
      why_ = why;
      all.swap(pending_);
    }
    for (auto &kv : all) {
      Pending &p = *kv.second;
      if (p.sync) {
        std::lock_guard<std::mutex> g(p.sync->mu);
        p.sync->done = true;
        p.sync->err = why;
        p.sync->cv.notify_all();
        continue;
      }
      be_->n_errors_++;
      p.inbox->push({p.queue, p.op, Inbox::FAILED, -ECONNRESET,
                     p.what() + ": " + why + " (outcome unknown, not retried)", p.job, ""});
    }
  }

  void read_loop() {
    std::vector<uint8_t> buf(kChunk);
    std::string why;
    for (;;) {
      exa_dma_net_hdr h;
      if (!recv_all(fd_, &h, sizeof h)) {
        why = "connection to agent " + addr_ + " lost";
        break;
      }
      if (h.magic != EXA_DMA_NET_MAGIC || h.version != EXA_DMA_NET_VERSION || h.type != EXA_DMA_NET_REPLY ||
          h.len > EXA_DMA_NET_MAX_PAYLOAD) {
        why = "agent " + addr_ + " sent a malformed reply; connection dropped";
        break;
      }
      h.text[EXA_DMA_NET_TEXT - 1] = 0;
      std::unique_ptr<Pending> p;
      {
        std::lock_guard<std::mutex> g(mu_);
        auto it = pending_.find(h.id);
        if (it != pending_.end()) {
          p = std::move(it->second);
          pending_.erase(it);
        }
      }
      if (!p) {
        why = "agent " + addr_ + " replied to an unknown request " + std::to_string(h.id) + "; connection dropped";
        break;
      }
      if (p->sync) {
        if (h.len) {
          why = "agent " + addr_ + " sent a LOOKUP reply with a payload; connection dropped";
          std::lock_guard<std::mutex> g(p->sync->mu);
          p->sync->done = true;
          p->sync->err = why;
          p->sync->cv.notify_all();
          break;
        }
        std::lock_guard<std::mutex> g(p->sync->mu);
        p->sync->rep = h;
        p->sync->done = true;
        p->sync->cv.notify_all();
        continue;
      }
      const exa_dma_req &r = p->op.r;
      Inbox::Event e{p->queue, p->op, Inbox::APPLIED, 0, "", p->job, ""};
      if (h.status == 0) {
        uint64_t want = r.op == EXA_DMA_OP_READ ? r.len : 0;
        if (h.len != want) {
          why = "agent " + addr_ + " answered a " + op_name(r.op) + " of " + std::to_string(r.len) + " bytes with " +
                std::to_string(h.len) + " payload bytes; connection dropped";
          e.kind = Inbox::FAILED;
          e.status = -EPROTO;
          e.why = p->what() + ": " + why;
          be_->n_errors_++;
          p->inbox->push(std::move(e));
          break;
        }
        PayloadRecv w;
        if (want) {
          /* The bytes land in the issuer's buffer through the checkpointer, like every write. */
          if (!w.recv(fd_, be_->agent_, p->local->owner, p->local->name, r.local_off, want, buf)) {
            e.kind = Inbox::FAILED;
            e.status = -ECONNRESET;
            why = "connection to agent " + addr_ + " lost";
            e.why = p->what() + ": " + why + " in the middle of the reply";
            be_->n_errors_++;
            p->inbox->push(std::move(e));
            break;
          }
        }
        if (w.status) {
          e.kind = Inbox::FAILED;
          e.status = w.status;
          e.why = std::string(op_name(r.op)) + " from buffer \"" + p->name + "\" of job " + p->job + " at agent " + addr_ +
                  " into local buffer \"" + p->local->name + "\": " + w.error;
          be_->n_errors_++;
        } else {
          be_->n_remote_ops_++;
          be_->n_remote_bytes_ += r.len;
        }
      } else if (h.status == EXA_DMA_NET_HELD) {
        if (h.len) {
          why = "agent " + addr_ + " sent a HELD reply with a payload; connection dropped";
          break;
        }
        e.kind = Inbox::HELD;
        e.why = h.text;
      } else if (h.status == EXA_DMA_NET_MOVED) {
        struct sockaddr_in sa;
        if (h.len || !parse_addr(h.text, &sa)) {
          why = "agent " + addr_ + " sent a malformed MOVED reply; connection dropped";
          break;
        }
        e.kind = Inbox::MOVED;
        e.addr = h.text;
      } else if (h.status < 0 && h.len == 0) {
        e.kind = Inbox::FAILED;
        e.status = h.status;
        e.why = h.text[0] ? std::string(h.text) : p->what() + ": " + errstr(h.status);
        be_->n_errors_++;
      } else {
        why = "agent " + addr_ + " sent a reply with status " + std::to_string(h.status) + "; connection dropped";
        break;
      }
      p->inbox->push(std::move(e));
    }
    if (why.find("dropped") != std::string::npos) fprintf(stderr, "exaagent: DMA: %s\n", why.c_str());
    shutdown(fd_, SHUT_RDWR);
    fail_all(why);
  }

  friend class Backend;
  Backend *be_;
  std::string addr_;
  int fd_;
  std::thread th_;
  std::mutex send_mu_; /* one frame at a time */
  std::mutex mu_;      /* pending_, dead_, why_, next_id_ */
  std::map<uint64_t, std::unique_ptr<Pending>> pending_;
  uint64_t next_id_ = 1;
  bool dead_ = false;
  std::string why_;
};

/* One accepted agent-to-agent connection and its serving thread. */
struct PeerConn {
  int fd = -1;
  std::string who;
  std::thread th;
  std::atomic<bool> done{false};
  ~PeerConn() {
    if (th.joinable()) th.join();
    if (fd >= 0) ::close(fd);
  }
};

/* One client application: its connection, doorbells, queues, buffer tables and serving thread. */
class Client {
 public:
  Client(Backend *be, int sock, pid_t pid) : be_(be), sock_(sock), pid_(pid) {
    inbox_ = std::make_shared<Inbox>();
    inbox_->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    stream_base_ = be->next_stream_++ << 20;
  }
  ~Client() {
    if (th_.joinable()) th_.join();
    for (auto &kv : queues_) drop_queue(kv.second);
    if (sq_efd_ >= 0) ::close(sq_efd_);
    {
      std::lock_guard<std::mutex> g(inbox_->mu);
      inbox_->alive = false;
      inbox_->ev.clear();
      if (inbox_->efd >= 0) ::close(inbox_->efd);
      inbox_->efd = -1;
    }
    ::close(sock_);
  }
  void start() { th_ = std::thread([this] { run(); }); }
  void wake() { inbox_->wake(); }
  std::atomic<bool> done{false};

 private:
  enum Act { DONE, WAIT, END };

  struct Flight {
    std::string addr;
    int n = 0;
  };
  struct Queue {
    uint32_t id = 0;
    void *ring = nullptr;
    exa_dma_ring_hdr *hdr = nullptr;
    int cq_efd = -1;
    uint64_t sq_head = 0;      /* the next request sequence expected */
    uint64_t cq_tail = 0;      /* the next completion sequence */
    uint64_t cq_head_seen = 0; /* the frontend's cq_head as last read */
    bool broken = false;
    uint64_t next_seq = 0;
    std::deque<Op> backlog;               /* consumed, not executed yet (held, waiting for a route or replies) */
    std::map<std::string, Flight> flight; /* remote operations in flight, per peer job */
    bool away = false;                    /* published in the ring header */
  };

  static void publish_away(Queue &q) {
    bool away = !q.flight.empty() || !q.backlog.empty();
    if (away != q.away) {
      q.away = away;
      __atomic_store_n(&q.hdr->away, away ? 1u : 0u, __ATOMIC_RELAXED);
    }
  }

  /* A peer's buffer as looked up: resolved again at every operation. */
  struct Handle {
    std::string job, name;
    uint64_t size = 0;
    unsigned perms = 0;
    std::shared_ptr<Buffer> local; /* when last seen on this host */
    std::shared_ptr<JobState> js;
    /* the last grant check of `local` (exec_local): valid while local->gen is still checked_gen */
    uint64_t checked_gen = ~0ull;
    unsigned checked_have = 0;
  };

  void drop_queue(Queue &q) {
    if (q.ring) munmap(q.ring, EXA_DMA_RING_BYTES);
    if (q.cq_efd >= 0) ::close(q.cq_efd);
    q.ring = nullptr;
    q.cq_efd = -1;
  }

  /* Push one completion; waits (bounded by stop / hang-up) while a misbehaving frontend left the
   * completion ring full. Returns false when the client must go away. Client thread only. */
  bool complete(Queue &q, uint64_t tag, uint16_t op, int32_t status, uint64_t len, const std::string &why) {
    if (status < 0) be_->n_errors_++;
    /* The frontend's cq_head is read only when our last view of it says the ring is full: one
     * cache line less crossing cores per operation. */
    while (q.cq_tail - q.cq_head_seen >= EXA_DMA_RING_DEPTH) {
      q.cq_head_seen = __atomic_load_n(&q.hdr->cq_head, __ATOMIC_ACQUIRE);
      if (q.cq_tail - q.cq_head_seen < EXA_DMA_RING_DEPTH) break;
      struct pollfd p[2] = {{be_->stop_fd_, POLLIN, 0}, {sock_, 0, 0}};
      if (poll(p, 2, 1) != 0 && (p[0].revents || p[1].revents)) return false;
    }
    exa_dma_cqe *e = &exa_dma_cq(q.ring)[q.cq_tail % EXA_DMA_RING_DEPTH];
    e->tag = tag;
    e->len = status < 0 ? 0 : len;
    e->status = status;
    e->op = op;
    /* A success touches only the entry's first cache line (the frontend reads the reason of
     * failures only). */
    if (!why.empty()) snprintf(e->reason, sizeof e->reason, "%s", why.c_str());
    /* The stamp last: the frontend polls it (protocol in exa_dma_wire.h). */
    q.cq_tail++;
    __atomic_store_n(&e->phase, (uint16_t)q.cq_tail, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&q.hdr->fe_armed, __ATOMIC_SEQ_CST)) {
      uint64_t one = 1;
      if (write(q.cq_efd, &one, sizeof one) < 0) { /* overflow only: the frontend is awake */ }
    }
    return true;
  }

  Act refuse(Queue &q, const Op &op, int err, const std::string &why) {
    return complete(q, op.r.tag, op.r.op, -err, 0, why) ? DONE : END;
  }

  /* A refusal, its reason built out of line: the hot path's code stays compact (it shares the L2
   * cache with the payload being copied). */
  template <class F>
  __attribute__((noinline, cold)) Act refuse_cold(Queue &q, const Op &op, int err, F &why) {
    return refuse(q, op, err, why());
  }

  /* Keep op for later (fence, expect); past the hold timeout it fails. */
  Act hold(Queue &q, Op &op, const std::string &why, uint64_t now) {
    if (!op.first_held) {
      op.first_held = now;
      be_->n_held_++;
    }
    if (now - op.first_held > be_->opts_.hold_timeout_ms * kMs)
      return refuse(q, op, ETIMEDOUT,
                    std::string(op_name(op.r.op)) + " held for more than " + std::to_string(be_->opts_.hold_timeout_ms) +
                        " ms (hold timeout): " + why);
    op.not_before = now + kRecheckNs;
    return WAIT;
  }

  static bool gone(const std::shared_ptr<Buffer> &b, std::string *why = nullptr) {
    if (!b->dead.load(std::memory_order_acquire)) return false;
    std::lock_guard<std::mutex> g(b->mu);
    if (why) *why = b->gone;
    return !b->gone.empty();
  }

  /* Same host: validate against the peer's buffer and copy through the checkpointer. */
  Act exec_local(Queue &q, const Op &op, const std::shared_ptr<Buffer> &lb, const std::shared_ptr<Buffer> &rb, Handle &h) {
    const exa_dma_req &r = op.r;
    auto no_ = [&](int err, auto &&why) { return refuse_cold(q, op, err, why); };
    unsigned need = r.op == EXA_DMA_OP_WRITE ? EXA_DMA_WRITE : EXA_DMA_READ;
    /* Grants and gone change rarely: the last check holds while the buffer's gen is unchanged (a
     * revocation racing with this operation is ordered after it, as it would be after the lock). */
    uint64_t gen = rb->gen.load(std::memory_order_acquire);
    if (h.local != rb || gen != h.checked_gen || !(h.checked_have & need)) {
      std::lock_guard<std::mutex> g(rb->mu);
      if (!rb->gone.empty()) {
        std::string why = "buffer \"" + rb->name + "\" of job " + rb->owner + ": " + rb->gone;
        return no_(rb->gone.find("exited") != std::string::npos ? ECONNRESET : ENOENT, [&] { return std::string(why); });
      }
      unsigned have = rb->owner == job_ ? (EXA_DMA_READ | EXA_DMA_WRITE) : 0;
      auto it = rb->grants.find(job_);
      if (it != rb->grants.end()) have |= it->second;
      if (!(have & need))
        return no_(EACCES, [&] { return std::string("job " + rb->owner + " has not granted " + (need == EXA_DMA_WRITE ? "write" : "read") +
                              " access to buffer \"" + rb->name + "\" to job " + job_); });
      if (h.local == rb) {
        h.checked_gen = rb->gen.load(std::memory_order_relaxed); /* under mu: as of this check */
        h.checked_have = have;
      }
    }
    /* A job may address its own buffer through a lookup; memcpy must not see overlapping ranges. */
    bool overlap = lb == rb && r.local_off < r.remote_off + r.len && r.remote_off < r.local_off + r.len;
    if (!range_ok(r.remote_off, r.len, rb->size))
      return no_(EINVAL, [&] { return std::string("job " + job_ + ": " + op_name(r.op) + " of " + std::to_string(r.len) + " bytes at offset " +
                            std::to_string(r.remote_off) + " is outside buffer \"" + rb->name + "\" of job " + rb->owner + " (" +
                            std::to_string(rb->size) + " bytes)"); });
    if (overlap) return no_(EINVAL, [&] { return std::string("job " + job_ + ": " + op_name(r.op) + " within buffer \"" + lb->name + "\" with overlapping ranges"); });
    try {
      /* Engine (same host). The destination is always written through the checkpointer. */
      if (r.op == EXA_DMA_OP_WRITE) be_->agent_->remote_write(rb->owner, rb->name, r.remote_off, lb->map + r.local_off, r.len);
      else be_->agent_->remote_write(job_, lb->name, r.local_off, rb->map + r.remote_off, r.len);
    } catch (const exa::Error &e) {
      return no_(-e.err, [&] { return std::string(std::string(op_name(r.op)) + " " + job_ + " -> " + rb->owner + ": " + e.what()); });
    } catch (const std::exception &e) {
      return no_(EIO, [&] { return std::string(std::string(op_name(r.op)) + ": " + e.what()); });
    }
    be_->n_ops_++;
    be_->n_bytes_ += r.len;
    n_local_ops_++;
    return complete(q, r.tag, r.op, 0, r.len, "") ? DONE : END;
  }

  /* Validate op, resolve its peer buffer (moved -> local -> expected -> route) and execute it
   * (local), send it (remote) or keep it (WAIT: it stays at the head of the queue's backlog). */
  Act dispatch(Queue &q, Op &op, uint64_t now_hint) {
    /* the clock is read only on the slow paths (holds, route waits) */
    auto now = [&]() { return now_hint ? now_hint : (now_hint = now_ns()); };
    const exa_dma_req &r = op.r;
    auto no_ = [&](int err, auto &&why) { return refuse_cold(q, op, err, why); };
    op.wait_flight = false;
    if (r.op != EXA_DMA_OP_WRITE && r.op != EXA_DMA_OP_READ)
      return no_(EINVAL, [&] { return std::string("job " + job_ + ", queue " + std::to_string(q.id) + ": garbage request: unknown operation " + std::to_string(r.op)); });
    if ((r.flags || r.reserved[0] || r.reserved[1]))
      return no_(EINVAL, [&] { return std::string("job " + job_ + ", queue " + std::to_string(q.id) + ": garbage request: reserved fields set"); });
    /* references, not copies: no reference-count traffic per operation (local_ and remote_ change
     * only on this thread, between operations) */
    static const std::shared_ptr<Buffer> kNone;
    const std::shared_ptr<Buffer> &lb = r.local >= 1 && r.local <= local_.size() ? local_[r.local - 1] : kNone;
    if (!lb) return no_(EBADF, [&] { return std::string("job " + job_ + ": no local DMA buffer with id " + std::to_string(r.local)); });
    if (!(r.remote >= 1 && r.remote <= remote_.size()))
      return no_(EBADF, [&] { return std::string("job " + job_ + ": no remote buffer handle " + std::to_string(r.remote) + " (look it up first)"); });
    Handle &h = remote_[r.remote - 1];
    std::string lgone;
    if (gone(lb, &lgone)) return no_(ENOENT, [&] { return std::string("local buffer \"" + lb->name + "\" of job " + job_ + ": " + lgone); });
    if (r.len == 0) return no_(EINVAL, [&] { return std::string("job " + job_ + ": " + op_name(r.op) + " of 0 bytes"); });
    if (!range_ok(r.local_off, r.len, lb->size))
      return no_(EINVAL, [&] { return std::string("job " + job_ + ": " + op_name(r.op) + " of " + std::to_string(r.len) + " bytes at offset " +
                            std::to_string(r.local_off) + " is outside local buffer \"" + lb->name + "\" (" +
                            std::to_string(lb->size) + " bytes)"); });
    if (js_->state.load() & JobState::FENCED) return hold(q, op, "job " + job_ + " (the issuer) is fenced for migration", now());

    unsigned st = h.js->state.load();
    std::string addr;
    const Buffer *rb = nullptr; /* = h.local.get() when the peer's buffer is on this host */
    if (st & JobState::MOVED) addr = be_->moved_to(h.job);
    if (addr.empty()) {
      if (st & JobState::FENCED) return hold(q, op, "job " + h.job + " is fenced for migration", now());
      if (!h.local || gone(h.local)) {
        auto b = be_->find(h.job, h.name);
        if (b) {
          h.local = std::move(b);
          h.checked_gen = ~0ull;
        }
      }
      rb = h.local.get();
      std::string why;
      if (rb && gone(h.local, &why)) {
        if ((st & JobState::EXPECT) && be_->expecting(h.job))
          return hold(q, op, "job " + h.job + " is expected on this host and has not registered buffer \"" + h.name + "\" yet", now());
        addr = be_->route(h.job);
        if (addr.empty()) /* the owner freed it or went away, and lives nowhere else: as before */
          return no_(why.find("exited") != std::string::npos ? ECONNRESET : ENOENT, [&] { return std::string("buffer \"" + rb->name + "\" of job " + rb->owner + ": " + why); });
        rb = nullptr;
      } else if (!rb) {
        if ((st & JobState::EXPECT) && be_->expecting(h.job))
          return hold(q, op, "job " + h.job + " is expected on this host and has not registered buffer \"" + h.name + "\" yet", now());
        addr = be_->route(h.job);
        if (addr.empty()) {
          if (!be_->opts_.on_route_miss) return no_(ENOENT, [&] { return std::string("job " + h.job + " is not known on any host (no route)"); });
          if (!op.route_wait) {
            op.route_wait = now();
            op.route_seq = be_->route_refused_seq("");
            be_->ask_route(h.job);
          }
          if (be_->route_refused_seq(h.job) > op.route_seq || now() - op.route_wait > kRouteWaitNs)
            return no_(ENOENT, [&] { return std::string("job " + h.job + " is not known on any host"); });
          op.not_before = now() + kRecheckNs;
          return WAIT;
        }
      }
    }

    if (rb) {
      auto f = q.flight.find(h.job);
      if (f != q.flight.end()) { /* earlier operations to this job are still on their way elsewhere */
        op.wait_flight = true;
        op.not_before = now() + kRecheckNs;
        return WAIT;
      }
      /* Dekker with fence(): count the operation as started, then re-check the states. */
      js_->active.fetch_add(1);
      rb->js->active.fetch_add(1);
      Act a;
      if ((js_->state.load() | rb->js->state.load()) & (JobState::FENCED | JobState::MOVED)) {
        op.not_before = 0;
        a = WAIT;
      } else a = exec_local(q, op, lb, h.local, h);
      rb->js->active.fetch_sub(1);
      js_->active.fetch_sub(1);
      return a;
    }

    /* Remote. */
    unsigned need = r.op == EXA_DMA_OP_WRITE ? EXA_DMA_WRITE : EXA_DMA_READ;
    if (!(h.perms & need))
      return no_(EACCES, [&] { return std::string("job " + h.job + " has not granted " + (need == EXA_DMA_WRITE ? "write" : "read") + " access to buffer \"" +
                            h.name + "\" to job " + job_); });
    if (!range_ok(r.remote_off, r.len, h.size))
      return no_(EINVAL, [&] { return std::string("job " + job_ + ": " + op_name(r.op) + " of " + std::to_string(r.len) + " bytes at offset " +
                            std::to_string(r.remote_off) + " is outside buffer \"" + h.name + "\" of job " + h.job + " (" +
                            std::to_string(h.size) + " bytes)"); });
    auto f = q.flight.find(h.job);
    if (f != q.flight.end() && f->second.n > 0 && (f->second.addr != addr || op.retry)) {
      op.wait_flight = true;
      op.not_before = now() + kRecheckNs;
      return WAIT;
    }
    std::string err;
    auto L = be_->link(addr, &err);
    if (!L) return no_(ECONNREFUSED, [&] { return std::string(std::string(op_name(r.op)) + " to buffer \"" + h.name + "\" of job " + h.job + ": " + err); });
    js_->active.fetch_add(1);
    if (js_->state.load() & JobState::FENCED) {
      js_->active.fetch_sub(1);
      return hold(q, op, "job " + job_ + " (the issuer) is fenced for migration", now());
    }
    auto p = std::make_unique<Pending>();
    p->inbox = inbox_;
    p->queue = q.id;
    p->op = op;
    p->job = h.job;
    p->name = h.name;
    p->addr = addr;
    p->local = lb;
    p->issuer_js = js_; /* released when p goes */
    exa_dma_net_hdr nh;
    hdr_init(nh, r.op == EXA_DMA_OP_WRITE ? EXA_DMA_NET_WRITE : EXA_DMA_NET_READ);
    nh.flags = op.retry ? EXA_DMA_NET_RETRY : 0;
    nh.stream = stream_base_ | q.id;
    nh.offset = r.remote_off;
    nh.len = r.op == EXA_DMA_OP_WRITE ? r.len : 0;
    nh.size = r.op == EXA_DMA_OP_READ ? r.len : 0;
    put(nh.job, sizeof nh.job, h.job);
    put(nh.name, sizeof nh.name, h.name);
    put(nh.from, sizeof nh.from, job_);
    if (op.retry) be_->n_retries_++;
    if (!L->send(nh, r.op == EXA_DMA_OP_WRITE ? lb->map + r.local_off : nullptr, nh.len, std::move(p), &err))
      return no_(ECONNRESET, [&] { return std::string(std::string(op_name(r.op)) + " to buffer \"" + h.name + "\" of job " + h.job + " at agent " + addr + ": " + err); });
    Flight &fl = q.flight[h.job];
    fl.addr = addr;
    fl.n++;
    return DONE;
  }

  static void insert_sorted(std::deque<Op> &d, Op &&op) {
    auto it = std::find_if(d.begin(), d.end(), [&](const Op &x) { return x.seq > op.seq; });
    d.insert(it, std::move(op));
  }

  /* Replies from the links and wake-ups from the control plane. Returns false to end the client. */
  bool drain_inbox() {
    uint64_t g = be_->gen_.load();
    bool woke = g != seen_gen_;
    seen_gen_ = g;
    if (!inbox_->has.load() && !woke) return true;
    std::deque<Inbox::Event> evs;
    {
      std::lock_guard<std::mutex> lk(inbox_->mu);
      evs.swap(inbox_->ev);
      inbox_->has.store(false);
    }
    uint64_t now = now_ns();
    for (auto &e : evs) {
      auto it = queues_.find(e.queue);
      if (it == queues_.end() || !it->second.ring) continue;
      Queue &q = it->second;
      auto f = q.flight.find(e.job);
      if (f != q.flight.end() && --f->second.n <= 0) q.flight.erase(f);
      Op op = e.op;
      switch (e.kind) {
        case Inbox::APPLIED:
          if (!complete(q, op.r.tag, op.r.op, 0, op.r.len, "")) return false;
          break;
        case Inbox::FAILED:
          be_->n_errors_--; /* counted by complete() */
          if (!complete(q, op.r.tag, op.r.op, e.status, 0, e.why)) return false;
          break;
        case Inbox::HELD:
          if (!op.first_held) {
            op.first_held = now;
            be_->n_held_++;
          }
          if (now - op.first_held > be_->opts_.hold_timeout_ms * kMs) {
            if (!complete(q, op.r.tag, op.r.op, -ETIMEDOUT, 0,
                          std::string(op_name(op.r.op)) + " to job " + e.job + " held for more than " +
                              std::to_string(be_->opts_.hold_timeout_ms) + " ms (hold timeout): " + e.why))
              return false;
            break;
          }
          op.retry = true;
          op.backoff_ms = op.backoff_ms ? std::min(op.backoff_ms * 2, 50u) : 1;
          op.not_before = now + op.backoff_ms * kMs;
          insert_sorted(q.backlog, std::move(op));
          break;
        case Inbox::MOVED:
          be_->set_route_quiet(e.job, e.addr);
          op.retry = true;
          op.not_before = 0;
          insert_sorted(q.backlog, std::move(op));
          break;
      }
      if (!q.backlog.empty() && q.backlog.front().wait_flight) q.backlog.front().not_before = 0;
      publish_away(q);
    }
    if (woke)
      for (auto &kv : queues_)
        if (!kv.second.backlog.empty()) kv.second.backlog.front().not_before = 0;
    return true;
  }

  int serve_queue(Queue &q) {
    int work = 0;
    uint64_t now = q.backlog.empty() ? 0 : now_ns(); /* 0: dispatch reads the clock only if it must */
    while (!q.backlog.empty()) {
      Op &op = q.backlog.front();
      if (op.not_before > now) return work;
      Act a = dispatch(q, op, now);
      if (a == END) return -1;
      if (a == WAIT) return work;
      q.backlog.pop_front();
      work++;
    }
    for (int n = 0; n < 32; n++, work++) {
      /* The entry says whether it is new (its stamp); there is no shared tail to read first. */
      exa_dma_req *e = &exa_dma_sq(q.ring)[q.sq_head % EXA_DMA_RING_DEPTH];
      uint32_t stamp = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
      if (stamp != (uint32_t)(q.sq_head + 1)) {
        if (stamp == exa_dma_sq_stale(q.sq_head)) break; /* nothing new */
        q.broken = true;
        if (!complete(q, 0, 0, -EPROTO, 0,
                      "job " + job_ + ", queue " + std::to_string(q.id) + ": garbage request ring (slot " +
                          std::to_string(q.sq_head % EXA_DMA_RING_DEPTH) + ": stamp " + std::to_string(stamp) + ", expected " +
                          std::to_string((uint32_t)(q.sq_head + 1)) + "); queue no longer served"))
          return -1;
        return work;
      }
      Op op;
      memcpy(&op.r, e, sizeof op.r); /* validated from this copy: the frontend may scribble on the slot */
      op.seq = q.next_seq++;
      q.sq_head++;
      Act a = dispatch(q, op, now);
      if (a == END) return -1;
      if (a == WAIT) {
        q.backlog.push_back(op); /* head of line: the ring waits behind it */
        break;
      }
    }
    return work;
  }

  /* Serve every queue once. Returns -1 to end the client, else the work done. */
  int serve_rings() {
    if (!drain_inbox()) return -1;
    int work = 0;
    for (auto &kv : queues_) {
      Queue &q = kv.second;
      if (q.broken || !q.ring) continue;
      int w = serve_queue(q);
      if (w < 0) return -1;
      publish_away(q);
      work += w;
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

  bool attached_here(const std::string &job) {
    for (auto &j : be_->agent_->jobs())
      if (j.id == job) return true;
    return false;
  }

  /* LOOKUP of a buffer not on this host: ask the agent the route names. 0 or -errno with *why. */
  int remote_lookup(const std::string &peer, const std::string &name, uint64_t *size, unsigned *perms, std::string *why) {
    uint64_t t0 = now_ns();
    uint64_t seq0 = be_->route_refused_seq("");
    unsigned backoff = 1;
    bool asked = false;
    for (;;) {
      if (be_->stopping_) {
        *why = "the DMA backend is closing";
        return -ESHUTDOWN;
      }
      std::string addr = be_->moved_to(peer);
      if (addr.empty()) addr = be_->route(peer);
      if (addr.empty()) {
        if (!be_->opts_.on_route_miss || be_->route_refused_seq(peer) > seq0 || now_ns() - t0 > kRouteWaitNs) {
          *why = be_->opts_.on_route_miss ? "job " + peer + " is not known on any host"
                                          : "job " + peer + " has no DMA buffer \"" + name + "\" on this host";
          return -ENOENT;
        }
        if (!asked) be_->ask_route(peer);
        asked = true;
        std::unique_lock<std::mutex> lk(be_->fence_mu_);
        be_->route_cv_.wait_for(lk, std::chrono::milliseconds(20));
        continue;
      }
      std::string err;
      auto L = be_->link(addr, &err);
      if (!L) {
        *why = "lookup of buffer \"" + name + "\" of job " + peer + ": " + err;
        return -ECONNREFUSED;
      }
      auto p = std::make_unique<Pending>();
      auto sw = std::make_shared<SyncWait>();
      p->sync = sw;
      exa_dma_net_hdr h;
      hdr_init(h, EXA_DMA_NET_LOOKUP);
      put(h.job, sizeof h.job, peer);
      put(h.name, sizeof h.name, name);
      put(h.from, sizeof h.from, job_);
      if (!L->send(h, nullptr, 0, std::move(p), &err)) {
        *why = "lookup of buffer \"" + name + "\" of job " + peer + " at agent " + addr + ": " + err;
        return -ECONNRESET;
      }
      std::unique_lock<std::mutex> lk(sw->mu);
      if (!sw->cv.wait_for(lk, std::chrono::seconds(10), [&] { return sw->done; })) {
        *why = "lookup of buffer \"" + name + "\" of job " + peer + ": agent " + addr + " did not answer within 10 s";
        return -ETIMEDOUT;
      }
      if (!sw->err.empty()) {
        *why = "lookup of buffer \"" + name + "\" of job " + peer + ": " + sw->err;
        return -ECONNRESET;
      }
      exa_dma_net_hdr &rep = sw->rep;
      if (rep.status == 0) {
        *size = rep.size;
        *perms = rep.perms & (EXA_DMA_READ | EXA_DMA_WRITE);
        return 0;
      }
      if (rep.status == EXA_DMA_NET_MOVED) {
        be_->set_route_quiet(peer, rep.text);
        continue;
      }
      if (rep.status == EXA_DMA_NET_HELD && now_ns() - t0 < kRouteWaitNs) {
        lk.unlock();
        usleep(backoff * 1000);
        backoff = std::min(backoff * 2, 50u);
        continue;
      }
      *why = rep.status == EXA_DMA_NET_HELD ? "lookup of buffer \"" + name + "\" of job " + peer + ": still held by agent " + addr + ": " + rep.text
                                            : std::string(rep.text);
      return rep.status < 0 ? rep.status : -EAGAIN;
    }
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
        js_ = be_->job_state(job_);
        js_->state.fetch_and(~JobState::MOVED); /* the job lives here (again) */
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
        /* A fresh ring: every sequence starts at 0, every stamp is 0. */
        q.sq_head = q.cq_tail = q.cq_head_seen = 0;
        __atomic_store_n(&q.hdr->be_cpu, cpu_, __ATOMIC_RELAXED);
        queues_[q.id] = std::move(q);
        reply(m, 0, "", next_queue_ - 1);
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
        /* This process maps it: a memfd that could shrink under that mapping would let the job crash the
         * agent (SIGBUS). libexa seals every region memfd; the checkpointer refuses unsealed ones too. */
        int seals = fcntl(fds[0], F_GET_SEALS);
        if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
          reply(m, -EPERM, "job " + job_ + ": the memfd of buffer \"" + m.name + "\" is not sealed against shrinking (F_SEAL_SHRINK)");
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
        b->js = js_;
        {
          std::lock_guard<std::mutex> g(be_->mu_);
          auto key = job_ + "/" + m.name;
          if (be_->registry_.count(key)) {
            reply(m, -EEXIST, "job " + job_ + " already has a DMA buffer \"" + m.name + "\"");
            return true;
          }
          be_->registry_[key] = b;
        }
        be_->installed_buffer(b);
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
        t->js = b->js;
        t->gone = "freed by its owner";
        t->dead = true;
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
        b->gen.fetch_add(1, std::memory_order_release);
        reply(m, 0, "");
        return true;
      }
      case EXA_DMA_MSG_LOOKUP: {
        if (!valid_name(m.job, sizeof m.job) || !valid_name(m.name, sizeof m.name)) return bad("bad LOOKUP");
        if (remote_.size() >= EXA_DMA_MAX_BUFFERS) {
          reply(m, -ENOMEM, "job " + job_ + ": too many remote buffer handles");
          return true;
        }
        Handle h;
        h.job = m.job;
        h.name = m.name;
        h.js = be_->job_state(h.job);
        unsigned st = h.js->state.load();
        std::shared_ptr<Buffer> b = (st & JobState::MOVED) ? nullptr : be_->find(m.job, m.name);
        /* A job expected here that has not registered the buffer yet: wait for it (bounded). */
        for (uint64_t t0 = now_ns(); !b && !(st & JobState::MOVED) && (st & JobState::EXPECT) && be_->expecting(h.job) &&
                                     now_ns() - t0 < kRouteWaitNs && !be_->stopping_;
             st = h.js->state.load()) {
          usleep(2000);
          b = be_->find(m.job, m.name);
        }
        if (b) {
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
          h.size = b->size;
          h.perms = perms;
          h.local = b;
        } else {
          if (!(st & JobState::MOVED) && attached_here(h.job)) {
            reply(m, -ENOENT, "job " + std::string(m.job) + " has no DMA buffer \"" + m.name + "\" on this host");
            return true;
          }
          std::string why;
          int r = remote_lookup(h.job, h.name, &h.size, &h.perms, &why);
          if (r < 0) {
            reply(m, r, why);
            return true;
          }
        }
        remote_.push_back(h);
        reply(m, 0, "", (uint32_t)remote_.size(), h.size, h.perms);
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
      b->dead.store(true, std::memory_order_release);
      b->gen.fetch_add(1, std::memory_order_release);
    }
    std::lock_guard<std::mutex> g(be_->mu_);
    auto it = be_->registry_.find(b->owner + "/" + b->name);
    if (it != be_->registry_.end() && it->second == b) be_->registry_.erase(it);
  }

  /* Work that can proceed now, and the ms until the earliest held operation is due (-1: none). */
  bool pending_work(int *timeout_ms) {
    uint64_t now = now_ns(), next = UINT64_MAX;
    bool pending = false;
    for (auto &kv : queues_) {
      Queue &q = kv.second;
      if (!q.ring || q.broken) continue;
      if (!q.backlog.empty()) {
        uint64_t nb = q.backlog.front().not_before;
        if (nb <= now) pending = true;
        else next = std::min(next, nb);
      } else if (__atomic_load_n(&exa_dma_sq(q.ring)[q.sq_head % EXA_DMA_RING_DEPTH].seq, __ATOMIC_ACQUIRE) !=
                 exa_dma_sq_stale(q.sq_head))
        pending = true; /* new, or garbage to refuse */
    }
    if (hello_ && (inbox_->has.load() || be_->gen_.load() != seen_gen_)) pending = true;
    *timeout_ms = next == UINT64_MAX ? -1 : (int)std::min<uint64_t>((next - now + kMs - 1) / kMs, 1000);
    return pending;
  }

  /* The be_cpu hint (exa_dma_wire.h): written only when the CPU changed (getcpu is a vDSO call). */
  void publish_cpu() {
    unsigned cpu = (unsigned)sched_getcpu() + 1;
    if (cpu == cpu_) return;
    cpu_ = cpu;
    n_migrations_++;
    for (auto &kv : queues_)
      if (kv.second.ring) __atomic_store_n(&kv.second.hdr->be_cpu, cpu, __ATOMIC_RELAXED);
  }

  bool shares_cpu_with_a_waiter() {
    for (auto &kv : queues_)
      if (kv.second.ring && __atomic_load_n(&kv.second.hdr->fe_cpu, __ATOMIC_RELAXED) == cpu_) return true;
    return false;
  }

  void run() {
    uint64_t idle_since = now_ns(), last_check = idle_since;
    unsigned busy_rounds = 0, spins = 0;
    bool busy = false;
    for (;;) {
      int w = hello_ ? serve_rings() : 0;
      if (w < 0) break;
      if (w > 0) {
        /* Between operations nothing but the rings is touched (no clock, no getcpu: the hot loop
         * shares the L2 with the payload); control messages and stop are looked at every 64 busy
         * rounds once 200 us have passed, so they do not starve behind a busy ring. */
        busy = true;
        if (++busy_rounds % 64) continue;
        uint64_t t = now_ns();
        if (t - last_check < kControlCheckNs) continue;
        last_check = t;
        publish_cpu(); /* the be_cpu hint stays fresh while busy too */
        struct pollfd p[2] = {{sock_, POLLIN, 0}, {be_->stop_fd_, POLLIN, 0}};
        if (poll(p, 2, 0) > 0) {
          if (p[1].revents) break;
          if (p[0].revents && !control()) break;
        }
        continue;
      }
      uint64_t t = now_ns();
      if (busy) {
        busy = false;
        idle_since = t;
        publish_cpu();
      }
      if (hello_ && t - idle_since < kSpinNs) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause(); /* leave the core to a sibling doing real work (one: it delays seeing a request) */
#endif
        /* On an oversubscribed machine the client we wait for may need this very CPU: yield at
         * once when a waiter of ours last spun on it (fe_cpu), else only after a quiet while: no
         * system call while a client that posts back to back may be spinning on its completion
         * (its next request comes within a microsecond). */
        if ((++spins & 15) == 0) publish_cpu();
        if ((spins & 15) == 0 && shares_cpu_with_a_waiter()) sched_yield();
        else if ((spins & 255) == 0 && t - idle_since > kYieldAfterNs) sched_yield();
        continue;
      }
      /* Arm (protocol in exa_dma_wire.h), re-check, sleep. */
      for (auto &kv : queues_)
        if (kv.second.ring) __atomic_store_n(&kv.second.hdr->be_sleeping, 1, __ATOMIC_SEQ_CST);
      inbox_->sleeping.store(true);
      __atomic_thread_fence(__ATOMIC_SEQ_CST);
      int timeout = -1;
      bool pending = pending_work(&timeout);
      int pr = 0;
      struct pollfd p[4] = {{sock_, POLLIN, 0}, {be_->stop_fd_, POLLIN, 0}, {inbox_->efd, POLLIN, 0}, {sq_efd_, POLLIN, 0}};
      pr = poll(p, sq_efd_ >= 0 ? 4 : 3, pending ? 0 : timeout); /* pending: still serve control and stop */
      for (auto &kv : queues_)
        if (kv.second.ring) __atomic_store_n(&kv.second.hdr->be_sleeping, 0, __ATOMIC_SEQ_CST);
      inbox_->sleeping.store(false);
      if (pr < 0 && errno != EINTR) break;
      if (pr > 0) {
        if (p[1].revents) break;
        uint64_t v;
        if (p[2].revents && read(inbox_->efd, &v, sizeof v) < 0) { /* already drained */ }
        if (sq_efd_ >= 0 && p[3].revents && read(sq_efd_, &v, sizeof v) < 0) { /* already drained */ }
        if (p[0].revents && !control()) break;
      }
      idle_since = now_ns();
    }
    /* Diagnostics for the remoting benchmark: did this thread move between CPUs while serving? */
    if (getenv("EXA_DMA_DEBUG_CPU"))
      fprintf(stderr, "exa dma backend: job %s: %llu same-host operations, CPU changed %llu times (last CPU %u)\n", job_.c_str(),
              (unsigned long long)n_local_ops_, (unsigned long long)n_migrations_, cpu_ - 1);
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
  std::shared_ptr<JobState> js_;
  std::shared_ptr<Inbox> inbox_;
  uint64_t stream_base_ = 0;
  uint64_t seen_gen_ = 0;
  std::map<uint32_t, Queue> queues_;
  uint32_t next_queue_ = 1;
  unsigned cpu_ = 0;             /* 1 + the CPU this thread last ran on (as published) */
  uint64_t n_migrations_ = 0;   /* times it changed (diagnostics: EXA_DMA_DEBUG_CPU) */
  uint64_t n_local_ops_ = 0;
  std::vector<std::shared_ptr<Buffer>> local_; /* id = index + 1 */
  std::vector<Handle> remote_;                 /* handle = index + 1 */
  std::thread th_;
};

/* ======================================================================== Backend */

Backend::Backend(Agent *agent, const std::string &socket_path, unsigned socket_mode, BackendOptions opts)
    : agent_(agent), path_(socket_path), opts_(std::move(opts)) {
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof sa.sun_path) throw Error(-ENAMETOOLONG, "DMA socket path too long: " + socket_path);
  if (!opts_.hold_timeout_ms) opts_.hold_timeout_ms = 60000;
  strcpy(sa.sun_path, socket_path.c_str());
  if (!opts_.listen.empty()) {
    struct sockaddr_in in;
    if (!parse_addr(opts_.listen, &in)) throw Error(-EINVAL, "DMA backend: listen address \"" + opts_.listen + "\" is not ip:port");
    tcp_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (tcp_fd_ < 0) throw Error(-errno, "DMA backend: socket: " + errstr(errno));
    int one = 1;
    setsockopt(tcp_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    socklen_t l = sizeof in;
    if (bind(tcp_fd_, (struct sockaddr *)&in, sizeof in) != 0 || listen(tcp_fd_, 64) != 0 ||
        getsockname(tcp_fd_, (struct sockaddr *)&in, &l) != 0) {
      int e = errno;
      ::close(tcp_fd_);
      throw Error(-e, "DMA backend: cannot listen on " + opts_.listen + ": " + errstr(e));
    }
    char ip[64];
    inet_ntop(AF_INET, &in.sin_addr, ip, sizeof ip);
    address_ = std::string(ip) + ":" + std::to_string(ntohs(in.sin_port));
  }
  listen_fd_ = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) {
    int e = errno;
    if (tcp_fd_ >= 0) ::close(tcp_fd_);
    throw Error(-e, "DMA backend: socket: " + errstr(e));
  }
  unlink(socket_path.c_str()); /* a stale file from a dead agent; the agent socket itself guards against two live agents */
  if (bind(listen_fd_, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(listen_fd_, 64) != 0) {
    int e = errno;
    ::close(listen_fd_);
    if (tcp_fd_ >= 0) ::close(tcp_fd_);
    throw Error(-e, "DMA backend: cannot listen on " + socket_path + ": " + errstr(e));
  }
  /* Same mode as the agent's socket; who may act as which job is decided by the SO_PEERCRED pid check. */
  chmod(socket_path.c_str(), socket_mode);
  stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) {
    int e = errno;
    ::close(listen_fd_);
    if (tcp_fd_ >= 0) ::close(tcp_fd_);
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
  {
    /* Unblock every thread in a TCP send or receive; no new link after this. */
    std::lock_guard<std::mutex> g(links_mu_);
    stopping_ = true;
    for (auto &kv : links_) kv.second->kill();
    for (auto &l : dead_links_) l->kill();
    for (auto &p : peers_) shutdown(p->fd, SHUT_RDWR);
  }
  route_cv_.notify_all();
  if (accept_.joinable()) accept_.join();
  std::vector<std::unique_ptr<Client>> cs;
  {
    std::lock_guard<std::mutex> g(mu_);
    cs.swap(clients_);
  }
  cs.clear(); /* each ~Client joins its thread (after the operation in progress) and closes its fds */
  std::map<std::string, std::shared_ptr<Link>> ls;
  std::vector<std::shared_ptr<Link>> dls;
  std::vector<std::unique_ptr<PeerConn>> ps;
  {
    std::lock_guard<std::mutex> g(links_mu_);
    ls.swap(links_);
    dls.swap(dead_links_);
    ps.swap(peers_);
  }
  for (auto &p : ps) shutdown(p->fd, SHUT_RDWR);
  ps.clear(); /* joins the serving threads */
  for (auto &kv : ls) kv.second->join();
  for (auto &l : dls) l->join();
  ls.clear();
  dls.clear();
  ::close(listen_fd_);
  if (tcp_fd_ >= 0) ::close(tcp_fd_);
  ::close(stop_fd_);
  unlink(path_.c_str());
  std::lock_guard<std::mutex> g(mu_);
  registry_.clear();
}

void Backend::accept_loop() {
  for (;;) {
    struct pollfd p[3] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}, {tcp_fd_, POLLIN, 0}};
    int r = poll(p, tcp_fd_ >= 0 ? 3 : 2, 1000);
    if (r < 0 && errno != EINTR) return;
    if (p[1].revents) return;
    /* reap clients and peer connections whose connection ended (the 1 s timeout bounds how long they linger) */
    std::vector<std::unique_ptr<Client>> dead;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto &c : clients_)
        if (c->done) dead.push_back(std::move(c));
      clients_.erase(std::remove(clients_.begin(), clients_.end(), nullptr), clients_.end());
    }
    dead.clear();
    std::vector<std::unique_ptr<PeerConn>> deadp;
    std::vector<std::shared_ptr<Link>> deadl;
    {
      std::lock_guard<std::mutex> g(links_mu_);
      for (auto &pc : peers_)
        if (pc->done) deadp.push_back(std::move(pc));
      peers_.erase(std::remove(peers_.begin(), peers_.end(), nullptr), peers_.end());
      for (auto it = links_.begin(); it != links_.end();) {
        if (it->second->dead()) {
          dead_links_.push_back(it->second);
          it = links_.erase(it);
        } else ++it;
      }
      deadl.swap(dead_links_);
    }
    deadp.clear();
    deadl.clear(); /* joins their reader threads (finished: dead) once the last sender lets go */
    if (r <= 0) continue;
    if (tcp_fd_ >= 0 && (p[2].revents & POLLIN)) {
      int fd = accept4(tcp_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        tune(fd);
        auto pc = std::make_unique<PeerConn>();
        pc->fd = fd;
        pc->who = sock_peer(fd);
        PeerConn *raw = pc.get();
        std::lock_guard<std::mutex> g(links_mu_);
        if (stopping_) return; /* pc closes fd */
        if (peers_.size() >= kMaxPeers) {
          /* a thread each: bounded (a real cluster has one connection per other agent) */
          n_dropped_++;
          last_drop_ = "refused a connection from " + pc->who + ": already " + std::to_string(kMaxPeers) + " agent connections";
          fprintf(stderr, "exaagent: DMA: %s\n", last_drop_.c_str());
          continue; /* pc closes fd */
        }
        peers_.push_back(std::move(pc));
        raw->th = std::thread([this, raw] {
          serve_peer(raw);
          raw->done = true;
        });
      }
    }
    if (!(p[0].revents & POLLIN)) continue;
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

void Backend::log_drop(const std::string &why) {
  n_dropped_++;
  {
    std::lock_guard<std::mutex> g(links_mu_);
    last_drop_ = why;
  }
  fprintf(stderr, "exaagent: DMA: %s\n", why.c_str());
}

/* Serve one incoming agent-to-agent connection (exa_dma_net.h) until it ends or misbehaves. */
void Backend::serve_peer(PeerConn *pc) {
  int fd = pc->fd;
  const std::string from_host = "agent at " + pc->who;
  auto drop = [&](const std::string &why) {
    log_drop("dropped the connection from " + from_host + ": " + why);
    shutdown(fd, SHUT_RDWR);
  };
  exa_dma_net_hdr h;
  struct timeval tv = {10, 0}; /* a connection that never says HELLO does not keep a thread */
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  errno = 0;
  if (!recv_all(fd, &h, sizeof h)) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) drop("no HELLO within 10 s");
    return; /* closed before saying anything: not worth a log line */
  }
  tv = {0, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (h.magic != EXA_DMA_NET_MAGIC || h.version != EXA_DMA_NET_VERSION || h.type != EXA_DMA_NET_HELLO || h.len)
    return drop("bad magic, version or first frame (expected HELLO)");
  h.text[EXA_DMA_NET_TEXT - 1] = 0;
  {
    exa_dma_net_hdr rep;
    bool ok = same_token(field(h.text, sizeof h.text), opts_.token);
    hdr_init(rep, ok ? EXA_DMA_NET_HELLO_OK : EXA_DMA_NET_HELLO_NO);
    if (!ok) put(rep.text, sizeof rep.text, "agent " + address_ + " refused the connection: cluster token mismatch");
    if (!send_frame(fd, rep, nullptr, 0)) return;
    if (!ok) return drop("cluster token mismatch");
  }
  std::vector<uint8_t> buf(kChunk);
  std::map<std::pair<uint64_t, std::string>, bool> marks; /* (stream, job) answered HELD */
  const std::string here = "agent " + address_;
  for (;;) {
    if (!recv_all(fd, &h, sizeof h)) return;
    if (h.magic != EXA_DMA_NET_MAGIC || h.version != EXA_DMA_NET_VERSION) return drop("bad magic or version");
    if (h.type != EXA_DMA_NET_LOOKUP && h.type != EXA_DMA_NET_WRITE && h.type != EXA_DMA_NET_READ)
      return drop("unknown request type " + std::to_string(h.type));
    if (h.status || h.pad || h.perms || (h.flags & ~EXA_DMA_NET_RETRY)) return drop("reserved fields set");
    if (!valid_name(h.job, sizeof h.job) || !valid_name(h.name, sizeof h.name) || !valid_name(h.from, sizeof h.from))
      return drop("bad job, buffer or sender name");
    if (h.len > EXA_DMA_NET_MAX_PAYLOAD || h.size > EXA_DMA_NET_MAX_PAYLOAD) return drop("length beyond the limit");
    if ((h.type == EXA_DMA_NET_WRITE && h.size) || (h.type != EXA_DMA_NET_WRITE && h.len) ||
        (h.type == EXA_DMA_NET_LOOKUP && (h.size || h.offset)))
      return drop("lengths inconsistent with the request type");
    const std::string job = h.job, name = h.name, from = h.from;
    exa_dma_net_hdr rep;
    hdr_init(rep, EXA_DMA_NET_REPLY);
    rep.id = h.id;
    auto answer = [&](int st, const std::string &text) {
      rep.status = st;
      put(rep.text, sizeof rep.text, text);
    };
    auto js = job_state(job);
    unsigned st = js->state.load();
    std::shared_ptr<Buffer> b;
    bool apply = false;
    unsigned need = h.type == EXA_DMA_NET_WRITE ? EXA_DMA_WRITE : h.type == EXA_DMA_NET_READ ? EXA_DMA_READ : 0;
    const char *what = h.type == EXA_DMA_NET_WRITE ? "write" : h.type == EXA_DMA_NET_READ ? "read" : "lookup";
    auto key = std::make_pair(h.stream, job);
    if (h.flags & EXA_DMA_NET_RETRY) marks.erase(key);
    if (need && marks.count(key)) answer(EXA_DMA_NET_HELD, "held behind an earlier held operation of the same queue");
    else if (st & JobState::MOVED) {
      std::string to = moved_to(job);
      if (!to.empty()) answer(EXA_DMA_NET_MOVED, to);
      else answer(-ENOENT, "job " + job + " moved away from " + here);
    } else if (need && (st & JobState::FENCED)) {
      answer(EXA_DMA_NET_HELD, "job " + job + " is fenced for migration on " + here);
      marks[key] = true;
    } else if (!(b = find(job, name))) {
      if ((st & JobState::EXPECT) && expecting(job)) {
        answer(EXA_DMA_NET_HELD, "job " + job + " is expected on " + here + " and has not registered buffer \"" + name + "\" yet");
        if (need) marks[key] = true;
      } else
        answer(-ENOENT, "job " + job + " has no DMA buffer \"" + name + "\" on " + here);
    } else {
      unsigned have = 0;
      std::string gone;
      {
        std::lock_guard<std::mutex> g(b->mu);
        gone = b->gone;
        auto it = b->grants.find(from);
        if (it != b->grants.end()) have = it->second;
      }
      if (!gone.empty()) answer(-ENOENT, "buffer \"" + name + "\" of job " + job + " on " + here + ": " + gone);
      else if (h.type == EXA_DMA_NET_LOOKUP) {
        if (!have) answer(-EACCES, "job " + job + " has not granted buffer \"" + name + "\" to job " + from + " (" + here + ")");
        else {
          rep.size = b->size;
          rep.perms = have;
        }
      } else if (!(have & need))
        answer(-EACCES, "job " + job + " has not granted " + what + " access to buffer \"" + name + "\" to job " + from + " (" + here + ")");
      else {
        uint64_t len = h.type == EXA_DMA_NET_WRITE ? h.len : h.size;
        if (len == 0 || !range_ok(h.offset, len, b->size))
          answer(-EINVAL, "job " + from + ": " + what + " of " + std::to_string(len) + " bytes at offset " + std::to_string(h.offset) +
                              " is outside buffer \"" + name + "\" of job " + job + " (" + std::to_string(b->size) + " bytes, " + here + ")");
        else {
          js->active.fetch_add(1);
          if (js->state.load() & (JobState::FENCED | JobState::MOVED)) {
            js->active.fetch_sub(1);
            answer(EXA_DMA_NET_HELD, "job " + job + " is fenced for migration on " + here);
            marks[key] = true;
          } else apply = true;
        }
      }
    }
    if (!apply && rep.status == EXA_DMA_NET_HELD) n_held_++;
    if (h.type == EXA_DMA_NET_WRITE) {
      PayloadRecv w; /* refused (!apply): the payload is drained, not applied */
      bool ok = w.recv(fd, agent_, job, name, h.offset, h.len, buf, apply);
      if (apply) js->active.fetch_sub(1);
      if (!ok) return; /* the sender went away mid-frame: its outcome is unknown to it anyway */
      if (apply && w.status) answer(w.status, "write into buffer \"" + name + "\" of job " + job + " on " + here + ": " + w.error);
      else if (apply) {
        n_served_ops_++;
        n_served_bytes_ += h.len;
      }
      if (!send_frame(fd, rep, nullptr, 0)) return;
    } else if (h.type == EXA_DMA_NET_READ) {
      bool ok;
      if (apply) {
        rep.len = h.size;
        ok = send_frame(fd, rep, b->map + h.offset, h.size);
        js->active.fetch_sub(1);
        n_served_ops_++;
        n_served_bytes_ += h.size;
      } else ok = send_frame(fd, rep, nullptr, 0);
      if (!ok) return;
    } else if (!send_frame(fd, rep, nullptr, 0))
      return;
  }
}

std::shared_ptr<Link> Backend::link(const std::string &addr, std::string *err) {
  {
    std::lock_guard<std::mutex> g(links_mu_);
    if (stopping_) {
      *err = "the DMA backend is closing";
      return nullptr;
    }
    auto it = links_.find(addr);
    if (it != links_.end()) {
      if (!it->second->dead()) return it->second;
      dead_links_.push_back(it->second);
      links_.erase(it);
    }
  }
  /* Connect and shake hands without the lock (up to a few seconds for an unreachable agent). */
  int fd = connect_to(addr, err);
  if (fd < 0) return nullptr;
  exa_dma_net_hdr h;
  hdr_init(h, EXA_DMA_NET_HELLO);
  put(h.text, sizeof h.text, opts_.token);
  struct timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (!send_frame(fd, h, nullptr, 0) || !recv_all(fd, &h, sizeof h)) {
    ::close(fd);
    *err = "agent " + addr + " did not complete the handshake";
    return nullptr;
  }
  h.text[EXA_DMA_NET_TEXT - 1] = 0;
  if (h.magic != EXA_DMA_NET_MAGIC || h.version != EXA_DMA_NET_VERSION || h.type != EXA_DMA_NET_HELLO_OK) {
    ::close(fd);
    *err = h.magic == EXA_DMA_NET_MAGIC && h.type == EXA_DMA_NET_HELLO_NO ? std::string(h.text)
                                                                          : "agent " + addr + " answered the handshake with garbage";
    return nullptr;
  }
  tv = {0, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::lock_guard<std::mutex> g(links_mu_);
  if (stopping_) {
    ::close(fd);
    *err = "the DMA backend is closing";
    return nullptr;
  }
  auto it = links_.find(addr);
  if (it != links_.end() && !it->second->dead()) { /* another client connected meanwhile: one link per peer */
    ::close(fd);
    return it->second;
  }
  if (it != links_.end()) {
    dead_links_.push_back(it->second);
    links_.erase(it);
  }
  auto l = std::make_shared<Link>(this, addr, fd);
  l->start();
  links_[addr] = l;
  n_links_++;
  return l;
}

std::shared_ptr<Buffer> Backend::find(const std::string &owner, const std::string &name) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = registry_.find(owner + "/" + name);
  return it == registry_.end() ? nullptr : it->second;
}

std::shared_ptr<JobState> Backend::job_state(const std::string &job) {
  std::lock_guard<std::mutex> g(fence_mu_);
  auto &js = jobs_[job];
  if (!js) js = std::make_shared<JobState>();
  return js;
}

std::string Backend::route(const std::string &job) {
  std::lock_guard<std::mutex> g(fence_mu_);
  auto it = routes_.find(job);
  return it == routes_.end() ? "" : it->second;
}

void Backend::set_route_quiet(const std::string &job, const std::string &addr) {
  std::lock_guard<std::mutex> g(fence_mu_);
  routes_[job] = addr;
  /* A job that moved on again from where we sent it: follow it (else we would bounce forever). */
  auto it = jobs_.find(job);
  if (it != jobs_.end() && (it->second->state.load() & JobState::MOVED)) it->second->moved_to = addr;
}

std::string Backend::moved_to(const std::string &job) {
  std::lock_guard<std::mutex> g(fence_mu_);
  auto it = jobs_.find(job);
  if (it == jobs_.end() || !(it->second->state.load() & JobState::MOVED)) return "";
  return it->second->moved_to;
}

bool Backend::expecting(const std::string &job) {
  std::lock_guard<std::mutex> g(fence_mu_);
  auto it = jobs_.find(job);
  if (it == jobs_.end() || !(it->second->state.load() & JobState::EXPECT)) return false;
  if (now_ns() < it->second->expect_deadline) return true;
  it->second->state.fetch_and(~JobState::EXPECT);
  it->second->expect_grants.clear();
  return false;
}

void Backend::ask_route(const std::string &job) {
  {
    std::lock_guard<std::mutex> g(fence_mu_);
    uint64_t now = now_ns(), &last = route_asked_[job];
    if (last && now - last < 1000 * kMs) return;
    last = now;
  }
  if (opts_.on_route_miss) opts_.on_route_miss(job);
}

uint64_t Backend::route_refused_seq(const std::string &job) {
  std::lock_guard<std::mutex> g(fence_mu_);
  if (job.empty()) return route_seq_;
  auto it = route_neg_.find(job);
  return it == route_neg_.end() ? 0 : it->second;
}

void Backend::wake_clients() {
  gen_++;
  std::lock_guard<std::mutex> g(mu_);
  for (auto &c : clients_) c->wake();
}

void Backend::set_route(const std::string &job, const std::string *addr) {
  {
    std::lock_guard<std::mutex> g(fence_mu_);
    if (addr) {
      routes_[job] = *addr;
      route_neg_.erase(job);
    } else {
      routes_.erase(job);
      route_neg_[job] = ++route_seq_;
    }
    route_asked_.erase(job);
  }
  route_cv_.notify_all();
  wake_clients();
}

std::vector<Grant> Backend::fence(const std::string &job) {
  auto js = job_state(job);
  js->state.fetch_or(JobState::FENCED);
  wake_clients();
  /* Dekker with the operation paths: every operation counts itself, then re-checks the state. */
  while (js->active.load() > 0 && !stopping_) usleep(200);
  std::vector<Grant> out;
  std::lock_guard<std::mutex> g(mu_);
  for (auto &kv : registry_) {
    auto &b = kv.second;
    if (b->owner != job) continue;
    std::lock_guard<std::mutex> bg(b->mu);
    for (auto &gr : b->grants) out.push_back({b->name, gr.first, gr.second});
  }
  return out;
}

std::vector<Backend::BufferInfo> Backend::buffers() {
  std::vector<BufferInfo> out;
  std::lock_guard<std::mutex> g(mu_);
  for (auto &kv : registry_) {
    auto &b = kv.second;
    if (b->dead.load()) continue;
    BufferInfo bi{b->owner, b->name, b->size, {}};
    std::lock_guard<std::mutex> bg(b->mu);
    for (auto &gr : b->grants) bi.grants.emplace_back(gr.first, gr.second);
    out.push_back(std::move(bi));
  }
  return out;
}

void Backend::unfence(const std::string &job) {
  job_state(job)->state.fetch_and(~JobState::FENCED);
  wake_clients();
}

void Backend::moved(const std::string &job, const std::string &addr) {
  auto js = job_state(job);
  {
    std::lock_guard<std::mutex> g(fence_mu_);
    js->moved_to = addr;
    routes_[job] = addr;
    route_neg_.erase(job);
    js->state.fetch_or(JobState::MOVED);
  }
  route_cv_.notify_all();
  wake_clients();
}

void Backend::expect(const std::string &job, const std::vector<Grant> &grants, uint64_t timeout_ms) {
  auto js = job_state(job);
  {
    std::lock_guard<std::mutex> g(fence_mu_);
    js->expect_grants.clear();
    for (auto &gr : grants)
      if (gr.perms) js->expect_grants[gr.buffer][gr.peer] |= gr.perms & (EXA_DMA_READ | EXA_DMA_WRITE);
    js->expect_deadline = now_ns() + timeout_ms * kMs;
    js->state.fetch_and(~(JobState::MOVED | JobState::FENCED));
    js->state.fetch_or(JobState::EXPECT);
  }
  /* Buffers the job registered already (it raced ahead of us) get their grants now. */
  std::vector<std::shared_ptr<Buffer>> mine;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto &kv : registry_)
      if (kv.second->owner == job) mine.push_back(kv.second);
  }
  for (auto &b : mine) installed_buffer(b);
  wake_clients();
}

void Backend::installed_buffer(const std::shared_ptr<Buffer> &b) {
  std::lock_guard<std::mutex> g(fence_mu_);
  auto &js = b->js;
  if (!js || !(js->state.load() & JobState::EXPECT)) return;
  auto it = js->expect_grants.find(b->name);
  if (it == js->expect_grants.end()) return;
  {
    std::lock_guard<std::mutex> bg(b->mu);
    for (auto &gr : it->second) b->grants[gr.first] |= gr.second;
    b->gen.fetch_add(1, std::memory_order_release);
  }
  js->expect_grants.erase(it);
  if (js->expect_grants.empty()) js->state.fetch_and(~JobState::EXPECT);
}

BackendStats Backend::stats() {
  BackendStats s;
  s.clients = n_clients_;
  s.ops = n_ops_;
  s.errors = n_errors_;
  s.bytes = n_bytes_;
  s.remote_ops = n_remote_ops_;
  s.remote_bytes = n_remote_bytes_;
  s.served_ops = n_served_ops_;
  s.served_bytes = n_served_bytes_;
  s.held = n_held_;
  s.retries = n_retries_;
  s.links = n_links_;
  s.dropped = n_dropped_;
  std::lock_guard<std::mutex> g(links_mu_);
  s.last_drop = last_drop_;
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

uint64_t Backend::tcp_baseline(uint64_t msg, uint64_t total, uint32_t window, uint64_t span) {
  if (!msg || msg > EXA_DMA_NET_MAX_PAYLOAD || total < msg || !window || span < msg || span > (4ull << 30))
    throw Error(-EINVAL, "tcp_baseline: bad sizes");
  span -= span % msg;
  int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in in;
  parse_addr("127.0.0.1:0", &in);
  socklen_t l = sizeof in;
  if (ls < 0 || bind(ls, (struct sockaddr *)&in, sizeof in) != 0 || listen(ls, 1) != 0 || getsockname(ls, (struct sockaddr *)&in, &l) != 0) {
    int e = errno;
    if (ls >= 0) ::close(ls);
    throw Error(-e, "tcp_baseline: listen: " + errstr(e));
  }
  uint64_t frames = total / msg;
  void *src = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void *dst = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (src == MAP_FAILED || dst == MAP_FAILED) {
    if (src != MAP_FAILED) munmap(src, span);
    if (dst != MAP_FAILED) munmap(dst, span);
    ::close(ls);
    throw Error(-ENOMEM, "tcp_baseline: cannot map the buffers");
  }
  memset(src, 7, span);
  memset(dst, 0, span);
  /* The sink: the receive loop of serve_peer (header, then the payload in kChunk receives), one
   * reply per frame; a plain TCP receiver puts the bytes straight into the destination buffer. */
  std::thread sink([ls, frames, dst, span, msg] {
    int fd = accept4(ls, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    tune(fd);
    exa_dma_net_hdr h, rep;
    for (uint64_t i = 0; i < frames; i++) {
      if (!recv_all(fd, &h, sizeof h) || h.len != msg) break;
      uint8_t *d = (uint8_t *)dst + (i * msg) % span;
      bool ok = true;
      for (uint64_t done = 0; ok && done < h.len; done += kChunk) ok = recv_all(fd, d + done, (size_t)std::min<uint64_t>(kChunk, h.len - done));
      if (!ok) break;
      hdr_init(rep, EXA_DMA_NET_REPLY);
      rep.id = h.id;
      if (!send_frame(fd, rep, nullptr, 0)) break;
    }
    ::close(fd);
  });
  std::string err;
  char port[16];
  snprintf(port, sizeof port, "%u", ntohs(in.sin_port));
  int fd = connect_to(std::string("127.0.0.1:") + port, &err);
  if (fd < 0) {
    shutdown(ls, SHUT_RDWR);
    ::close(ls);
    sink.join();
    munmap(src, span);
    munmap(dst, span);
    throw Error(fd, "tcp_baseline: " + err);
  }
  std::atomic<uint64_t> acked{0};
  /* Replies are read on their own thread, as a link's reader does. */
  std::thread reader([&] {
    exa_dma_net_hdr rep;
    for (uint64_t i = 0; i < frames; i++) {
      if (!recv_all(fd, &rep, sizeof rep)) break;
      acked++;
    }
  });
  uint64_t t0 = now_ns();
  exa_dma_net_hdr h;
  hdr_init(h, EXA_DMA_NET_WRITE);
  h.len = msg;
  for (uint64_t i = 0; i < frames; i++) {
    while (i - acked.load() >= window) sched_yield();
    h.id = i + 1;
    if (!send_frame(fd, h, (uint8_t *)src + (i * msg) % span, msg)) break;
  }
  reader.join();
  uint64_t ns = now_ns() - t0;
  ::close(fd);
  sink.join();
  ::close(ls);
  munmap(src, span);
  munmap(dst, span);
  if (acked.load() != frames) throw Error(-EIO, "tcp_baseline: the transfer broke off");
  return ns;
}

}  // namespace dma
}  // namespace exa
