/*
 * backend.h: the DMA backend of RDMA API remoting, in the agent (C++17).
 * Protocol: exa_dma_wire.h. Workload-side API: exa.h (DMA section).
 *
 * Threads and ownership
 *  - Backend: owns the listening socket (<agent socket>.dma), a stop eventfd,
 *    one accept thread and the client list. It borrows the exa::Agent, which
 *    must outlive it (the addon keeps the agent handle referenced).
 *  - Client (one client application = one connection): owns its socket, the
 *    request-doorbell eventfd, its queues (ring mapping + completion eventfd)
 *    and one thread that serves both its control messages and its rings, so
 *    control and data of one client never race. Many jobs per host = many
 *    clients, each with its thread.
 *  - Buffer: owned jointly (shared_ptr) by the registry, the owner's table and
 *    any peer's lookup handle; holds the backend's own read-write mapping of
 *    the region's memfd, unmapped when the last holder lets go, so an
 *    operation in flight never touches unmapped memory even if the owner
 *    frees the buffer or dies meanwhile.
 *
 * Grant model: a buffer is private to its owner job until the owner grants it
 * to a named peer job with READ and/or WRITE; a peer obtains a handle with
 * LOOKUP(owner job, name), which fails unless a grant exists. Every operation
 * re-checks, at execution time, that the buffer is still registered, its owner
 * still connected and the grant still present (revocation and free take effect
 * for every later operation), and that offset + length lie inside both
 * buffers. Identity: a client's job id is checked against SO_PEERCRED: the
 * connecting pid must be the process the agent has attached under that id.
 *
 * Engine (same host): every byte written into a job's buffer goes through
 * exa::Agent::remote_write (dirty for the next checkpoint, shadowed first
 * during a save); source bytes are read through the backend's own mapping.
 * Nothing here calls into JavaScript.
 *
 * Across hosts (exa_dma_net.h): the backend also listens on TCP. A remote
 * handle stands for (peer job, buffer name) and is resolved at execution
 * time: a job marked moved goes to its new address, a local registration
 * next, else the route table (set by the control plane; a miss asks it
 * through on_route_miss and waits up to 5 s). Outgoing operations travel on
 * one shared Link per peer address (a sender thread = the client thread, one
 * reader thread per link); replies come back to the issuing client thread
 * through its Inbox, so every completion ring keeps a single producer.
 * Incoming requests are served by one thread per accepted connection, which
 * writes through the checkpointer as the local path does: a payload goes
 * from the socket straight into the job's buffer (exa::Agent::remote_fill,
 * non-blocking receives under the job's lock), as does a READ's reply on the
 * issuing side.
 *
 * Migration primitives (per job, JobState): fence (no op is applied to the
 * job's buffers; local ops wait head of line, remote ones are answered HELD;
 * returns once the ops already started have finished, with the grants),
 * unfence, moved (answer MOVED(addr), re-route), expect (hold ops for
 * buffers not registered yet; install the grants when they are).
 *
 * Known limits: one serving thread per incoming connection applies requests
 * in order, so a write waiting for a checkpoint's saver delays the later
 * requests of every job behind it on that connection (the same wait a local
 * write has); a client thread sends on the shared link itself, so a peer that
 * stops reading stalls that client until the connection breaks or the backend
 * closes; a LOOKUP that needs a route blocks its client's thread (up to 5 s)
 * like any control request; IPv4 "ip:port" only; without a cluster token any
 * process that can reach the port may act as any job of the sending agent
 * (the default listen address is loopback).
 */
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace exa {

class Agent;

namespace dma {

/* Migration state of one job on this backend. state: FENCED | MOVED | EXPECT. */
struct JobState {
  static constexpr unsigned FENCED = 1, MOVED = 2, EXPECT = 4;
  std::atomic<unsigned> state{0};
  std::atomic<int> active{0}; /* operations on the job's buffers started and not finished */
  /* under Backend::fence_mu_ */
  std::string moved_to;
  uint64_t expect_deadline = 0;
  std::map<std::string, std::map<std::string, unsigned>> expect_grants; /* buffer -> peer -> perms */
};

struct Buffer {
  std::string owner;
  std::string name;
  uint64_t size = 0;
  uint8_t *map = nullptr;
  std::shared_ptr<JobState> js;             /* the owner's */
  std::mutex mu;                            /* grants, gone */
  std::map<std::string, unsigned> grants;   /* peer job -> EXA_DMA_READ | EXA_DMA_WRITE */
  std::string gone;                         /* non-empty once freed / owner disconnected: the reason */
  std::atomic<bool> dead{false};            /* gone is set (checked without the lock on the hot path) */
  std::atomic<uint64_t> gen{0};             /* bumped (under mu) whenever grants or gone change: a client
                                               may reuse its last grant check while it is unchanged */
  ~Buffer();
};

struct BackendStats {
  uint64_t clients = 0;
  uint64_t ops = 0;
  uint64_t errors = 0;
  uint64_t bytes = 0;
  uint64_t remote_ops = 0;   /* operations this backend sent to another agent and saw applied */
  uint64_t remote_bytes = 0;
  uint64_t served_ops = 0;   /* operations other agents sent here, applied */
  uint64_t served_bytes = 0;
  uint64_t held = 0;         /* operations held (fence, expect, HELD replies), counted once each */
  uint64_t retries = 0;      /* re-sends after HELD / MOVED */
  uint64_t links = 0;        /* outgoing connections opened */
  uint64_t dropped = 0;      /* incoming connections dropped for a protocol violation or a bad token */
  std::string last_drop;     /* the reason of the last one */
};

struct BackendOptions {
  std::string listen = "127.0.0.1:0"; /* "" = no TCP */
  std::string token;
  uint64_t hold_timeout_ms = 60000;
  std::function<void(const std::string &job)> on_route_miss; /* any thread; must not block */
};

struct Grant {
  std::string buffer, peer;
  unsigned perms;
};

class Client;
class Link;
struct Inbox;
struct PeerConn;

class Backend {
 public:
  /* Listens on socket_path (unlinking a stale file first, chmod socket_mode) and opts.listen; throws exa::Error naming what failed. */
  Backend(Agent *agent, const std::string &socket_path, unsigned socket_mode = 0600, BackendOptions opts = {});
  ~Backend(); /* close() */
  /* Stops accepting, wakes and joins every client thread (a client busy in an operation finishes
   * that operation first), drops every TCP connection (operations in flight on them complete with
   * an error), closes every fd. Idempotent. */
  void close();
  BackendStats stats();
  /* "ip:port" actually bound, "" when not listening. */
  std::string address() const { return address_; }
  /* Benchmark baseline: the same engine call the backend makes for a WRITE from (src job, buffer)
   * to (dst job, buffer), done `iters` times directly in this process, op i at offset
   * (i * len) % span of both buffers; returns total ns. */
  uint64_t engine_direct(const std::string &src_job, const std::string &src_buf, const std::string &dst_job,
                         const std::string &dst_buf, uint64_t len, uint32_t iters, uint64_t span);
  /* Benchmark baseline: `total` bytes in frames of msg bytes (an exa_dma_net_hdr then msg payload
   * bytes, writev) from a span-byte source at sweeping offsets, over a fresh loopback TCP
   * connection to a sink thread that receives them with the backend's receive loop (header, then
   * kChunk-sized receives) straight into a span-byte destination at the same offsets, and answers
   * each frame; at most `window` frames unanswered (as a queue's depth bounds the remoted path);
   * returns ns. */
  uint64_t tcp_baseline(uint64_t msg, uint64_t total, uint32_t window, uint64_t span);

  /* Migration primitives (see the top of this file). */
  void set_route(const std::string &job, const std::string *addr);
  std::vector<Grant> fence(const std::string &job); /* blocks until the started ops finished */
  void unfence(const std::string &job);
  void moved(const std::string &job, const std::string &addr);
  void expect(const std::string &job, const std::vector<Grant> &grants, uint64_t timeout_ms);

  /* The DMA buffers registered here (live ones), with their grants: what the agent reports to the
   * coordinator (sessions, grants and the host of every buffer). */
  struct BufferInfo {
    std::string owner, name;
    uint64_t size;
    std::vector<std::pair<std::string, unsigned>> grants; /* peer job, perms */
  };
  std::vector<BufferInfo> buffers();

 private:
  friend class Client;
  friend class Link;
  friend struct PeerConn;
  void accept_loop();
  std::shared_ptr<Buffer> find(const std::string &owner, const std::string &name);
  std::shared_ptr<JobState> job_state(const std::string &job);
  std::string route(const std::string &job); /* "" when unknown */
  void set_route_quiet(const std::string &job, const std::string &addr); /* a MOVED reply */
  std::string moved_to(const std::string &job);
  bool expecting(const std::string &job);
  void ask_route(const std::string &job);
  uint64_t route_refused_seq(const std::string &job);
  void wake_clients();
  std::shared_ptr<Link> link(const std::string &addr, std::string *err);
  void serve_peer(PeerConn *pc);
  void log_drop(const std::string &why);
  void installed_buffer(const std::shared_ptr<Buffer> &b); /* BUF_ADD: expected grants */

  Agent *agent_;
  std::string path_;
  BackendOptions opts_;
  std::string address_;
  int listen_fd_ = -1;
  int tcp_fd_ = -1;
  int stop_fd_ = -1;
  std::thread accept_;
  std::mutex mu_; /* registry_, clients_, closed_ */
  std::map<std::string, std::shared_ptr<Buffer>> registry_; /* "owner/name" */
  std::vector<std::unique_ptr<Client>> clients_;
  bool closed_ = false;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> gen_{0}; /* bumped at every fence/route change: clients re-examine held operations */

  std::mutex fence_mu_; /* jobs_, routes_, route_neg_, JobState's strings/maps */
  std::condition_variable route_cv_;
  std::map<std::string, std::shared_ptr<JobState>> jobs_;
  std::map<std::string, std::string> routes_;
  std::map<std::string, uint64_t> route_neg_; /* job -> route_seq_ when answered "unknown" */
  std::map<std::string, uint64_t> route_asked_; /* job -> ns of the last ask */
  uint64_t route_seq_ = 0;

  std::mutex links_mu_; /* links_, dead_links_, peers_ */
  std::map<std::string, std::shared_ptr<Link>> links_;
  std::vector<std::shared_ptr<Link>> dead_links_;
  std::vector<std::unique_ptr<PeerConn>> peers_;
  std::string last_drop_;

  std::atomic<uint64_t> n_clients_{0}, n_ops_{0}, n_errors_{0}, n_bytes_{0};
  std::atomic<uint64_t> n_remote_ops_{0}, n_remote_bytes_{0}, n_served_ops_{0}, n_served_bytes_{0}, n_held_{0},
      n_retries_{0}, n_links_{0}, n_dropped_{0};
  std::atomic<uint64_t> next_stream_{1};
};

}  // namespace dma
}  // namespace exa
