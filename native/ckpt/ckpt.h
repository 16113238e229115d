/*
 * ckpt.h: the agent side of the live incremental checkpointer (C++17).
 *
 * Threads and ownership
 *  - Agent: owns the listening socket, one IO thread (accepts workloads,
 *    speaks exa_wire.h on every connection) and the map of attached jobs.
 *  - Job: owns what its workload passed (uffds, pagemap fd, memfds), a pidfd,
 *    its regions (each with a read-only MAP_SHARED mapping of the memfd and a
 *    page-state array) and one fault-handler thread reading the sync uffd.
 *    Jobs are shared_ptr: a checkpoint session keeps its job alive after the
 *    workload exits, so a save can finish from the agent's own mappings.
 *  - Session: one checkpoint. Its saver thread does the pause (stop, scan,
 *    write-protect, resume), then streams batches into a bounded queue, then
 *    (sync path) switches the job back to cheap async tracking.
 * Nothing here calls into JavaScript: the addon receives notifications through
 * std::function callbacks invoked on agent threads and must hop to the JS
 * thread itself (it uses thread-safe functions).
 */
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace exa {

/* "No such file or directory" for ENOENT or -ENOENT. */
std::string errstr(int e);
/* A job, region or buffer name in a wire field of `cap` bytes: NUL-terminated inside it,
 * 1..EXA_NAME_MAX characters of [A-Za-z0-9._-]. Shared by the checkpointer and the DMA backend. */
bool valid_name(const char *s, size_t cap);

constexpr size_t kPage = 4096;

/* An event for the JS side, produced on the IO thread. */
struct AgentEvent {
  enum Kind { ATTACHED, DETACHED, CHECKPOINT_REQUEST, LOG } kind;
  std::string job;
  int pid = 0;
  int uid = 0;
  std::string text;
};
using EventSink = std::function<void(const AgentEvent &)>;

/* A tenant's local users (src/tenants.ts): their processes may attach only as the tenant's jobs. */
struct TenantUids {
  std::string tenant;
  std::vector<uid_t> uids;
  std::vector<std::string> jobs;     /* exact job ids */
  std::vector<std::string> prefixes; /* job id prefixes */
  bool owns(const std::string &job) const;
};

struct AgentOptions {
  std::string socket_path;
  std::vector<uid_t> allow_uids;        /* besides the agent's euid and root */
  std::vector<TenantUids> tenants;      /* their uids may attach too, each only as its tenant's jobs */
  size_t shadow_budget = 256u << 20;    /* bytes of shadow memory per checkpoint */
  unsigned socket_mode = 0600;          /* chmod of the socket file */
};

struct RegionInfo {
  std::string name;
  uint64_t size = 0;
  uint64_t addr = 0;
};

struct JobInfo {
  std::string id;
  int pid = 0;
  int uid = 0;
  bool async_tracking = false; /* the workload passed a WP_ASYNC uffd + pagemap */
  bool user_mode_only = false;
  bool busy = false;           /* a checkpoint is running */
  uint64_t checkpoints = 0;    /* completed */
  std::vector<RegionInfo> regions;
};

enum class CkptMode { AUTO, SYNC, COPY };
enum class HoldWhen { NONE, BEFORE, DURING };

struct CkptOptions {
  CkptMode mode = CkptMode::AUTO; /* AUTO: per region, copy-at-pause when the dirty set fits the shadow budget, else live sync */
  bool full = false;              /* save every page (start a new chain) */
  bool leave_stopped = false;     /* final checkpoint of a migration: the job stays stopped after the pause; the agent ends it (or SIGCONTs it if the move fails) */
  bool preprotect = true;         /* write-protect sync-path regions before the stop (only re-protect pages written meanwhile in the pause) */
  size_t batch_bytes = 1u << 20;  /* page bytes per batch */
  unsigned queue_depth = 2;       /* ready batches before the saver waits */
  /* test hook: hold the saver before / while saving one page until releaseHold() */
  HoldWhen hold_when = HoldWhen::NONE;
  std::string hold_region;
  uint64_t hold_page = 0;
  /* test hook: copy every region while the workload is stopped (the pause-instant reference) */
  bool test_reference = false;
};

struct CkptStats {
  uint64_t pause_us = 0;        /* stop .. resume of the checkpoint pause */
  uint64_t resync_pause_us = 0; /* longest of the short stops that move a live-sync region back to async tracking */
  uint64_t resync_total_us = 0; /* all of them */
  uint64_t resync_stops = 0;
  uint64_t save_us = 0;         /* resume .. last batch handed over */
  /* where the pause went: stopping every thread, PAGEMAP_SCAN, write-protect (and uffd switches), copy-at-pause */
  uint64_t pause_stop_us = 0, pause_scan_us = 0, pause_protect_us = 0, pause_copy_us = 0;
  uint64_t preprotect_us = 0;   /* write-protect done before the stop (job running; faults in that window re-protected in the pause) */
  uint64_t dirty_pages = 0;     /* pages in this checkpoint's set */
  uint64_t pages_saved = 0;     /* non-zero pages handed over */
  uint64_t zero_pages = 0;      /* flagged, bytes not sent */
  uint64_t bytes_saved = 0;
  uint64_t shadow_copies = 0;   /* pages copied to shadow (case 3 and copy-at-pause) */
  uint64_t shadow_peak_bytes = 0;
  uint64_t faults[4] = {0, 0, 0, 0}; /* write faults by case 1..4 during the save */
  uint64_t shadow_waits = 0;    /* case-3 faults that found the shadow full and waited for the saver */
  uint64_t batches = 0;
  uint32_t sync_regions = 0;    /* regions saved live with synchronous write-protect faults */
  uint32_t copy_regions = 0;    /* regions whose dirty pages were copied to shadow during the pause */
};

/* One batch: entries (region index in the session's table, page index, flags, hash); bytes of
 * non-zero pages in order. Hash: SHA-256 of the 4096 bytes (OpenSSL, the copy inside Node's
 * binary), the same content address storage/pages.ts uses; computed on the saver thread and one
 * helper thread, never on the JS thread. Zero pages are flagged (zero = 1), carry no bytes and an
 * all-zero hash field. A batch holds at most batch_bytes of page bytes (1 MiB by default). */
struct Batch {
  std::vector<uint32_t> region;
  std::vector<uint32_t> page;
  std::vector<uint8_t> zero;    /* 1 = zero page: no bytes, hash is all zero */
  std::vector<uint8_t> hash;    /* 32 bytes per entry, SHA-256 of the page */
  std::vector<uint8_t> data;    /* kPage bytes per non-zero entry */
  size_t count() const { return page.size(); }
};

class Job;
class Agent;
struct Region;

class Session {
 public:
  enum State { PAUSING, SAVING, DONE, FAILED, CANCELLED };

  /* Non-blocking queries; any thread. */
  State state();
  std::string error();
  CkptStats stats();
  std::vector<RegionInfo> regions(); /* the table batch entries index into */
  bool held();
  std::string job_id() const { return job_id_; }
  /* test hook: the regions' bytes copied during the pause (empty unless test_reference) */
  std::vector<std::vector<uint8_t>> take_reference();

  /* Take the next ready batch (nullptr if none ready yet). Wakes the saver. */
  std::unique_ptr<Batch> pop();
  void cancel();
  void release_hold();
  void join(); /* waits for the saver thread; never call from it */

  /* Set by the owner before start; called on agent threads whenever state changes or a batch is ready. */
  std::function<void()> notify;
  /* Called once, last thing on the saver thread. */
  std::function<void()> on_exit;

  ~Session();

 private:
  friend class Job;
  friend class Agent;
  Session(std::shared_ptr<Job> job, CkptOptions opts);
  void run(); /* saver thread body */
  bool pause_phase(std::vector<std::shared_ptr<struct Region>> &regs, bool &any_sync);
  bool save_phase(const std::vector<std::shared_ptr<struct Region>> &regs);
  void back_to_async(const std::vector<std::shared_ptr<struct Region>> &regs, std::string &resync_error);
  void poke();

  std::shared_ptr<Job> job_;
  std::string job_id_;
  CkptOptions opts_;
  std::thread thread_;
  /* Everything below is guarded by the job's mutex. */
  State state_ = PAUSING;
  std::string error_;
  CkptStats stats_;
  std::deque<std::unique_ptr<Batch>> ready_;
  bool cancel_ = false;
  bool held_ = false;
  bool hold_released_ = false;
  std::vector<RegionInfo> table_;
  size_t shadow_budget_ = 0;
  uint64_t resumed_us_ = 0; /* end of the pause */
  std::vector<std::vector<uint8_t>> reference_;
};

class Agent {
 public:
  /* Creates the socket and starts the IO thread; throws std::runtime_error naming what failed. */
  Agent(const AgentOptions &opts, EventSink sink);
  ~Agent(); /* close() */
  /* Stops accepting, cancels running checkpoints, drops every job (closing their uffds wakes any blocked thread). */
  void close();

  std::vector<JobInfo> jobs();
  /* Starts a checkpoint: returns at once; the pause runs on the session's thread. Throws (errno-coded) for an unknown or busy job. */
  std::shared_ptr<Session> checkpoint(const std::string &job, const CkptOptions &opts,
                                      std::function<void()> notify, std::function<void()> on_exit);
  /* Answer pending exa_checkpoint() requests of a job with an error (the agent declined). */
  void decline_requests(const std::string &job, int status, const std::string &text);
  /*
   * Write bytes into a job's region through the checkpointer (for RDMA remoting: the agent's
   * own mapping is invisible to the job's write-protection). Pages touched join the next
   * checkpoint's set; during a save, a page not yet saved is copied to shadow first (waiting for
   * the saver when the shadow is full) and a page being saved is waited for, so the running
   * checkpoint keeps its pause-time image. May block: never call it on a thread the saver's
   * consumer needs (the addon runs it on a worker thread). Throws Error (ENOENT, EINVAL).
   */
  void remote_write(const std::string &job, const std::string &region, uint64_t offset, const uint8_t *data, size_t len);
  /*
   * remote_write() from a source that is read as the job's memory is written, such as a socket
   * (an RDMA payload received straight into the job's buffer, without a staging copy).
   * fill(dst, n) is called, with the job's lock held, for runs of pages the running checkpoint
   * no longer needs, in order: it puts at most n bytes at dst and returns how many. It must not
   * block (the job's fault handling waits for the lock): a short count says the source has no
   * more for now and ends the call. Returns the bytes written (pages touched join the next
   * checkpoint's set); the caller calls again for the rest once its source has more. Throws as
   * remote_write().
   */
  size_t remote_fill(const std::string &job, const std::string &region, uint64_t offset, size_t len,
                     const std::function<size_t(uint8_t *, size_t)> &fill);
  /* Baseline for benchmarks: stop the job, copy and hash every page, resume. Returns pause in us. */
  uint64_t stop_and_copy(const std::string &job, uint64_t *bytes);

  void log(const std::string &text);

 private:
  void io_loop();
  struct Conn;
  void handle_message(Conn &c, const uint8_t *buf, size_t n, int *fds, int nfds);
  void drop_conn(size_t idx);
  std::shared_ptr<Job> find(const std::string &job);
  const TenantUids *tenant_of(uid_t uid) const;

  AgentOptions opts_;
  EventSink sink_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  std::thread io_;
  std::mutex mu_; /* jobs_, sessions_, closed_ */
  std::vector<std::shared_ptr<Job>> jobs_;
  std::vector<std::weak_ptr<Session>> sessions_;
  std::vector<std::unique_ptr<Conn>> conns_; /* IO thread only */
  bool closed_ = false;
};

/* errno-carrying exception thrown by Agent methods. */
struct Error : std::runtime_error {
  int err;
  Error(int e, const std::string &m) : std::runtime_error(m), err(e) {}
};

}  // namespace exa
