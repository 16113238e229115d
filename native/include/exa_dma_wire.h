/*
 * exa_dma_wire.h: the job (libexa frontend) <-> agent (DMA backend) protocol
 * of RDMA API remoting. Two channels:
 *
 * 1. Control: AF_UNIX SOCK_SEQPACKET at $EXA_DMA_SOCKET or <agent socket>.dma.
 *    Every message is one struct exa_dma_msg (exact size, magic, version
 *    checked); each request gets one reply with the same seq. Types:
 *      HELLO(job) + fd[eventfd: request doorbell]     -> reply 0; the backend checks SO_PEERCRED:
 *                                                        the pid must be the process attached as job
 *      QUEUE_ADD + fds[ring memfd, completion eventfd] -> reply id = queue id; the ring memfd must be
 *                                                        sealed (F_SEAL_SHRINK): the agent maps it
 *      QUEUE_DEL(id)                                    -> reply
 *      BUF_ADD(name, size) + fd[the region's memfd]     -> reply id = local buffer id; the region must
 *                                                        be registered with the agent under that name/size
 *      BUF_DEL(id)                                      -> reply
 *      GRANT(id, peer, perms)                           -> reply
 *      LOOKUP(peer, name)                               -> reply id = remote handle, size, perms
 *    A connection is one client application; the backend serves it on one
 *    thread, which also drains its rings, so control and data never race.
 *    Closing the socket (process exit) drops its queues, buffers and grants.
 *
 * 2. Data: per queue, a memfd made by the frontend: struct exa_dma_ring_hdr,
 *    then EXA_DMA_RING_DEPTH request entries (64 bytes, one cache line each),
 *    then as many completion entries (128 bytes, two lines; a success writes
 *    and reads only the first). Both rings are single-producer/single-consumer
 *    over free-running 64-bit sequence numbers s (slot = s % depth), and
 *    NVMe-style: every entry carries a phase stamp, the producer's sequence
 *    number + 1 (truncated to the field), stored last with release order; the
 *    consumer polls the entry it expects next and takes it when the stamp
 *    equals s + 1 (acquire). There are no shared head/tail indices on the fast
 *    path: an operation crosses between the two cores as one cache line each
 *    way (the request entry, the completion's first line).
 *      request ring:    frontend produces, backend consumes; stamp `seq` (32 bits)
 *      completion ring: backend produces, frontend consumes; stamp `phase` (16 bits)
 *    The frontend never has more than depth operations outstanding (posted and
 *    not reaped), so a request slot is free again once its completion was
 *    reaped, and it publishes cq_head (its completion consumer index) for the
 *    backend, which reads it only when its own view says the completion ring
 *    is full (once a lap at most). The backend distrusts every field: a
 *    request slot whose stamp is neither s + 1 (new) nor the stamp it carried
 *    a lap earlier (s + 1 - depth, or 0 on the first lap: nothing new) is a
 *    garbage ring: an error completion with the reason, and that queue is no
 *    longer served; an unknown op, a bad id, offset or length yields an error
 *    completion with a reason.
 *
 *    Doorbells without lost wake-ups (both directions are the same Dekker
 *    pattern; all flag accesses are sequentially consistent). The eventfds are
 *    written only when the consumer has said it sleeps: while both sides spin
 *    no system call is made.
 *      backend going to sleep:  be_sleeping = 1; fence; re-check every queue's
 *                               next request slot; if nothing new, poll(request
 *                               eventfd, socket); be_sleeping = 0.
 *      frontend posting:        store the entry's stamp; fence; if be_sleeping: write(request eventfd).
 *      frontend waiting:        fe_armed = 1; fence; re-check the next completion
 *                               slot; if nothing, poll(completion eventfd, socket); drain; fe_armed = 0.
 *      backend completing:      store the entry's stamp; fence; if fe_armed: write(completion eventfd).
 *    Either the sleeper's re-check sees the new stamp, or the producer's load
 *    sees the flag and rings: no wake-up is lost. Both sides spin briefly
 *    before arming, which is what keeps small round trips well under a
 *    microsecond; the frontend spins longer while a long operation is
 *    outstanding, unless the backend set `away` (operations crossing to
 *    another host take far longer than a wake-up, and the spinning would
 *    steal their CPU). One waiter per queue at a time (the frontend
 *    serializes waiters).
 *
 *    Cache lines: the header puts what each side writes on lines of its own
 *    (read-mostly identity; backend flags; frontend flag; frontend cq_head),
 *    so neither side's polling reads a line the other writes per operation.
 */
#ifndef EXA_DMA_WIRE_H
#define EXA_DMA_WIRE_H

#include <stdint.h>

#define EXA_DMA_WIRE_MAGIC 0x31414d44u /* "DMA1" */
#define EXA_DMA_WIRE_VERSION 2 /* 2: phase-stamped ring entries */
#define EXA_DMA_WIRE_NAME 64
#define EXA_DMA_WIRE_TEXT 240
#define EXA_DMA_RING_DEPTH 256 /* = EXA_DMA_QUEUE_DEPTH, a power of two */
#define EXA_DMA_MAX_QUEUES 64  /* per client application */
#define EXA_DMA_MAX_BUFFERS 4096

enum exa_dma_msg_type {
  EXA_DMA_MSG_HELLO = 1,
  EXA_DMA_MSG_QUEUE_ADD = 2,
  EXA_DMA_MSG_QUEUE_DEL = 3,
  EXA_DMA_MSG_BUF_ADD = 4,
  EXA_DMA_MSG_BUF_DEL = 5,
  EXA_DMA_MSG_GRANT = 6,
  EXA_DMA_MSG_LOOKUP = 7,
  EXA_DMA_MSG_REPLY = 100,
};

struct exa_dma_msg {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t seq;
  int32_t status; /* replies: 0 or -errno */
  uint32_t id;
  uint32_t perms;
  uint64_t size;
  char job[EXA_DMA_WIRE_NAME];  /* HELLO: own job; GRANT/LOOKUP: the peer */
  char name[EXA_DMA_WIRE_NAME]; /* buffer name */
  char text[EXA_DMA_WIRE_TEXT]; /* replies: NUL-terminated reason */
};

/* A request entry: 64 bytes, one cache line. */
struct exa_dma_req {
  uint16_t op;     /* exa_dma_op */
  uint16_t flags;  /* 0 */
  uint32_t local;  /* local buffer id (BUF_ADD reply) */
  uint32_t remote; /* remote handle (LOOKUP reply) */
  uint32_t seq;    /* phase stamp: (uint32_t)(sequence + 1), stored last (release) */
  uint64_t local_off;
  uint64_t remote_off;
  uint64_t len;
  uint64_t tag;
  uint64_t reserved[2];
} __attribute__((aligned(64)));

/* A completion entry: 128 bytes; everything a success carries is in the first line. */
struct exa_dma_cqe {
  uint64_t tag;
  uint64_t len;
  int32_t status;
  uint16_t op;
  uint16_t phase; /* phase stamp: (uint16_t)(sequence + 1), stored last (release) */
  char reason[104]; /* failures only */
} __attribute__((aligned(64)));

struct exa_dma_ring_hdr {
  uint32_t magic;
  uint32_t version;
  uint32_t depth;
  uint32_t pad0;
  /* backend-written, rarely (going to sleep / waking; the hint changing); read by the frontend */
  uint32_t be_sleeping __attribute__((aligned(64)));
  uint32_t away; /* some operations of this queue are on the network or held (a hint: the frontend
                    then does not spin long for them, it sleeps on its doorbell) */
  uint32_t be_cpu; /* 1 + the CPU the backend thread last ran on, 0 unknown (a hint: a frontend spinning
                      on that very CPU keeps the backend from running, and yields it) */
  /* frontend-written, rarely (going to sleep; changing CPU); read by the backend at every completion */
  uint32_t fe_armed __attribute__((aligned(64)));
  uint32_t fe_cpu; /* 1 + the CPU the frontend's waiter last spun on, 0 unknown (a hint: a backend idling
                      on that very CPU keeps the waiter from running, and yields it) */
  /* frontend-written at every reap; read by the backend once a lap at most */
  uint64_t cq_head __attribute__((aligned(64)));
} __attribute__((aligned(64)));

#ifdef __cplusplus
#define EXA_DMA_STATIC_ASSERT static_assert
#else
#define EXA_DMA_STATIC_ASSERT _Static_assert
#endif
EXA_DMA_STATIC_ASSERT(sizeof(struct exa_dma_req) == 64, "request entry: one cache line");
EXA_DMA_STATIC_ASSERT(sizeof(struct exa_dma_cqe) == 128, "completion entry: two cache lines");
EXA_DMA_STATIC_ASSERT(sizeof(struct exa_dma_ring_hdr) == 256, "ring header: four cache lines");

/* The stamp a request slot carries before sequence s is posted into it: the previous lap's, or 0. */
static inline uint32_t exa_dma_sq_stale(uint64_t s) {
  return s >= EXA_DMA_RING_DEPTH ? (uint32_t)(s + 1 - EXA_DMA_RING_DEPTH) : 0;
}

#define EXA_DMA_RING_BYTES \
  (sizeof(struct exa_dma_ring_hdr) + EXA_DMA_RING_DEPTH * sizeof(struct exa_dma_req) + EXA_DMA_RING_DEPTH * sizeof(struct exa_dma_cqe))

static inline struct exa_dma_req *exa_dma_sq(void *ring) {
  return (struct exa_dma_req *)((char *)ring + sizeof(struct exa_dma_ring_hdr));
}
static inline struct exa_dma_cqe *exa_dma_cq(void *ring) {
  return (struct exa_dma_cqe *)((char *)ring + sizeof(struct exa_dma_ring_hdr) + EXA_DMA_RING_DEPTH * sizeof(struct exa_dma_req));
}

#endif /* EXA_DMA_WIRE_H */
