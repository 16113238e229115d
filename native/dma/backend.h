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
 */
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace exa {

class Agent;

namespace dma {

struct Buffer {
  std::string owner;
  std::string name;
  uint64_t size = 0;
  uint8_t *map = nullptr;
  std::mutex mu;                            /* grants, gone */
  std::map<std::string, unsigned> grants;   /* peer job -> EXA_DMA_READ | EXA_DMA_WRITE */
  std::string gone;                         /* non-empty once freed / owner disconnected: the reason */
  ~Buffer();
};

struct BackendStats {
  uint64_t clients = 0;
  uint64_t ops = 0;
  uint64_t errors = 0;
  uint64_t bytes = 0;
};

class Client;

class Backend {
 public:
  /* Listens on socket_path (unlinking a stale file first, chmod socket_mode); throws exa::Error naming what failed. */
  Backend(Agent *agent, const std::string &socket_path, unsigned socket_mode = 0600);
  ~Backend(); /* close() */
  /* Stops accepting, wakes and joins every client thread (a client busy in an operation finishes
   * that operation first), closes every fd. Idempotent. */
  void close();
  BackendStats stats();
  /* Benchmark baseline: the same engine call the backend makes for a WRITE from (src job, buffer)
   * to (dst job, buffer), done `iters` times directly in this process, op i at offset
   * (i * len) % span of both buffers; returns total ns. */
  uint64_t engine_direct(const std::string &src_job, const std::string &src_buf, const std::string &dst_job,
                         const std::string &dst_buf, uint64_t len, uint32_t iters, uint64_t span);

 private:
  friend class Client;
  void accept_loop();
  std::shared_ptr<Buffer> find(const std::string &owner, const std::string &name);

  Agent *agent_;
  std::string path_;
  int listen_fd_ = -1;
  int stop_fd_ = -1;
  std::thread accept_;
  std::mutex mu_; /* registry_, clients_, closed_ */
  std::map<std::string, std::shared_ptr<Buffer>> registry_; /* "owner/name" */
  std::vector<std::unique_ptr<Client>> clients_;
  bool closed_ = false;
  std::atomic<uint64_t> n_clients_{0}, n_ops_{0}, n_errors_{0}, n_bytes_{0};
};

}  // namespace dma
}  // namespace exa
