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

#ifdef __cplusplus
}
#endif
#endif /* EXA_H */
