/*
 * exa.h: the workload side of exackpt (libexa).
 *
 * A job keeps the state it wants checkpointed in named, page-aligned,
 * memfd-backed regions allocated here. The local agent (exaagent) takes
 * live, incremental checkpoints of those regions with userfaultfd
 * write-protection; the job only pauses while pages are write-protected.
 *
 * Threading: exa_attach/exa_detach/exa_region_* may be called from any
 * thread but are serialized by an internal lock. exa_checkpoint() blocks the
 * calling thread only; agent-initiated checkpoints stop the whole process.
 *
 * Pauses: a checkpoint stops the whole process (SIGSTOP to every thread,
 * SIGCONT after write-protecting, typically well under a millisecond to a few
 * ms); a parent waiting with WUNTRACED sees those stops. Regions are not
 * inherited by fork() (MADV_DONTFORK): a child's writes could not be tracked.
 * Between checkpoints the first write to each page costs ~1 us (async
 * write-protect fault); during a live save, writes to pages not yet saved
 * cost a synchronous fault (~50-70 us) handled by the agent.
 *
 * Errors: functions return 0 (or a non-negative count) on success and a
 * negative errno-style value on failure; exa_last_error() returns a message
 * that names what was wrong (thread-local, valid until the next call).
 *
 * Restore: when the process was launched by an agent with EXA_RESTORE set,
 * exa_region_alloc() of a name that exists in the restored image returns that
 * region with its restored contents (size must match); exa_restored() says so.
 * With EXA_REGION_FIXED the region is mapped at its original address.
 */
#ifndef EXA_H
#define EXA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EXA_API_VERSION 1
#define EXA_NAME_MAX 63            /* region and job names: [A-Za-z0-9._-], 1..63 chars */
#define EXA_REGION_MAX_BYTES (1ULL << 40)

typedef struct exa_ctx exa_ctx;        /* one attachment of this process to its agent */
typedef struct exa_region exa_region;  /* owned by the ctx; invalid after exa_region_free/exa_detach */

/* Flags for exa_region_alloc. */
#define EXA_REGION_FIXED 0x1u      /* on restore, map at the address recorded in the checkpoint */

/*
 * Attach to the local agent under a job id.
 * socket_path: NULL means $EXA_AGENT_SOCKET. job_id: NULL means $EXA_JOB_ID.
 * Fails with -ECONNREFUSED/-ENOENT when no agent listens, -EEXIST when the
 * job id is already attached, -EINVAL for a malformed job id, -EACCES when
 * the agent does not accept this uid, -ENOTSUP on Linux < 5.19.
 * The agent passes an open /dev/userfaultfd; the uffds made from it are handed
 * to the agent and closed here (protocol: exa_wire.h). If the agent cannot pass
 * it, a UFFD_USER_MODE_ONLY uffd is used with a warning on stderr: then a
 * read()/recv() by the kernel into a page not yet saved fails with EFAULT.
 */
int exa_attach(const char *socket_path, const char *job_id, exa_ctx **out);

/* Detach: regions stay mapped in this process but are no longer checkpointed. Frees ctx. */
int exa_detach(exa_ctx *ctx);

/* Allocate a checkpointable region (size rounded up to the page size, zero-filled).
 * -EINVAL for size 0, a size beyond EXA_REGION_MAX_BYTES or the host's memory, a bad name;
 * -EEXIST for a name already used by this job. */
int exa_region_alloc(exa_ctx *ctx, const char *name, size_t size, unsigned flags, exa_region **out);
/* Unmap a region and stop checkpointing it. If a checkpoint is being saved, it still
 * completes with the region's pause-time content (the agent keeps its own mapping). */
int exa_region_free(exa_ctx *ctx, exa_region *region);
exa_region *exa_region_find(exa_ctx *ctx, const char *name);
/* Fills up to max regions; returns the total number of regions (may exceed max). */
int exa_region_list(exa_ctx *ctx, exa_region **out, size_t max);

void *exa_region_addr(const exa_region *region);
size_t exa_region_size(const exa_region *region);
const char *exa_region_name(const exa_region *region);

/* App-initiated checkpoint at a safe point; returns when the pause is over (pages still stream
 * out). Other threads of the process are stopped for the pause too. Fails (e.g. -ECANCELED)
 * when the agent declines or the checkpoint fails; never blocks beyond the agent's answer. */
int exa_checkpoint(exa_ctx *ctx);

/* 1 if this process was restored from a checkpoint (EXA_RESTORE), else 0. */
int exa_restored(const exa_ctx *ctx);

const char *exa_job_id(const exa_ctx *ctx);
const char *exa_last_error(void);
const char *exa_strerror(int err);


/* ======================================================================== DMA (RDMA API remoting)
 *
 * One-sided remote-DMA between jobs, remoted to the local agent's backend.
 * Buffers are checkpointable regions (exa_region_alloc underneath), so they are
 * saved, restored and moved with the job. A job grants a buffer to a peer job
 * (read, write or both); the peer looks it up by (job, name) and writes into
 * or reads from it with exa_dma_write / exa_dma_read. Payload bytes are never
 * copied between the job and the backend: the backend maps the buffers' memfds
 * itself, and every write it makes into a job's buffer goes through the
 * agent's checkpointer (marked dirty; shadowed first during a save).
 *
 * Requests travel on a per-queue shared-memory ring pair (exa_dma_wire.h);
 * completions come back on the queue: polled (EXA_DMA_POLL: exa_dma_poll /
 * exa_dma_wait) or delivered to a callback on a libexa thread of that queue
 * (EXA_DMA_CALLBACK, interrupt mode). A queue holds at most
 * EXA_DMA_QUEUE_DEPTH outstanding operations: posting more fails with -EAGAIN.
 *
 * Across hosts: a peer job may run on another host. Its agent's backend is
 * reached over TCP (one connection per pair of agents, shared); a remote
 * handle names (peer job, buffer) and is resolved again at every operation,
 * so it keeps working when the peer migrates: operations aimed at a job
 * being migrated are held (the caller sees only a delay) and complete on
 * its new host, in posting order, each applied exactly once. An operation
 * whose outcome cannot be known (the connection to the other agent broke
 * while it was in flight) completes with an error, it is never re-sent;
 * one held longer than the agent's hold timeout (default 60 s) fails.
 *
 * Socket: $EXA_DMA_SOCKET, else the agent socket path + ".dma".
 * Threading: every call is thread-safe; a callback must not destroy its own queue.
 * Errors: as above (negative errno, exa_last_error()). A failed operation
 * completes with status < 0 and a reason naming the buffer, job and bounds.
 */
typedef struct exa_dma exa_dma;             /* this process's DMA session with its agent's backend */
typedef struct exa_dma_buf exa_dma_buf;     /* a local DMA buffer (owned by the exa_dma) */
typedef struct exa_dma_queue exa_dma_queue; /* a request/completion queue (owned by the exa_dma) */
typedef uint32_t exa_dma_remote;            /* a peer's buffer as looked up (0 is never valid) */

#define EXA_DMA_QUEUE_DEPTH 256
#define EXA_DMA_REASON 104

/* grant permissions */
#define EXA_DMA_READ 0x1u  /* the peer may read the buffer */
#define EXA_DMA_WRITE 0x2u /* the peer may write into the buffer */

enum exa_dma_mode { EXA_DMA_POLL = 0, EXA_DMA_CALLBACK = 1 };
enum exa_dma_op { EXA_DMA_OP_WRITE = 1, EXA_DMA_OP_READ = 2 };

struct exa_dma_completion {
  uint64_t tag;    /* the caller's tag of the operation */
  uint64_t len;    /* bytes transferred (0 on error) */
  int32_t status;  /* 0 or -errno */
  uint16_t op;     /* exa_dma_op, 0 for a request the backend could not read */
  char reason[EXA_DMA_REASON]; /* NUL-terminated; empty on success */
};

typedef void (*exa_dma_callback)(const struct exa_dma_completion *c, void *user);

/* Open this process's DMA session (socket_path NULL: see above). The backend checks that the
 * connecting process is the one attached as ctx's job. ctx must outlive the session. */
int exa_dma_open(exa_ctx *ctx, const char *socket_path, exa_dma **out);
/* Close: destroys the queues (joins callback threads), unmaps the rings, drops grants made by
 * this session; the buffers stay allocated as regions (free them first if unwanted). */
int exa_dma_close(exa_dma *d);

/* A DMA buffer: a checkpointable region of this name, registered with the backend. */
int exa_dma_alloc(exa_dma *d, const char *name, size_t size, exa_dma_buf **out);
/* Unregister (peers' later operations on it fail with a reason) and free the region (a checkpoint
 * being saved still gets its pause-time content). Should exa_region_free refuse, the buffer stays
 * unregistered but allocated and exa_dma_free may be called again. */
int exa_dma_free(exa_dma *d, exa_dma_buf *buf);
void *exa_dma_buf_addr(const exa_dma_buf *buf);
size_t exa_dma_buf_size(const exa_dma_buf *buf);

/* Grant (or with perms 0 revoke) access to buf for peer_job: EXA_DMA_READ | EXA_DMA_WRITE. */
int exa_dma_grant(exa_dma *d, exa_dma_buf *buf, const char *peer_job, unsigned perms);
/* Look up peer_job's buffer `name` granted to this job. -ENOENT when no such buffer,
 * -EACCES when not granted to us. *size_out and *perms_out may be NULL. */
int exa_dma_lookup(exa_dma *d, const char *peer_job, const char *name, exa_dma_remote *out, size_t *size_out,
                   unsigned *perms_out);

int exa_dma_queue_create(exa_dma *d, enum exa_dma_mode mode, exa_dma_callback cb, void *user, exa_dma_queue **out);
int exa_dma_queue_destroy(exa_dma_queue *q);

/* Asynchronous one-sided operations: post and return (-EAGAIN when the queue is full).
 * write: local[local_off..+len) -> remote[remote_off..+len); read: the other way. */
int exa_dma_write(exa_dma_queue *q, exa_dma_buf *local, uint64_t local_off, exa_dma_remote remote, uint64_t remote_off,
                  uint64_t len, uint64_t tag);
int exa_dma_read(exa_dma_queue *q, exa_dma_buf *local, uint64_t local_off, exa_dma_remote remote, uint64_t remote_off,
                 uint64_t len, uint64_t tag);
/* Polling mode: take up to max completions without blocking (returns the count). */
int exa_dma_poll(exa_dma_queue *q, struct exa_dma_completion *out, int max);
/* Polling mode: wait up to timeout_ms (-1 forever) for at least one completion. 0 on timeout. */
int exa_dma_wait(exa_dma_queue *q, struct exa_dma_completion *out, int max, int timeout_ms);

/* Synchronous forms: return when the operation completed; its status (0 or -errno, reason in
 * exa_last_error()). */
int exa_dma_write_sync(exa_dma *d, exa_dma_buf *local, uint64_t local_off, exa_dma_remote remote, uint64_t remote_off,
                       uint64_t len);
int exa_dma_read_sync(exa_dma *d, exa_dma_buf *local, uint64_t local_off, exa_dma_remote remote, uint64_t remote_off,
                      uint64_t len);

#ifdef __cplusplus
}
#endif
#endif /* EXA_H */
