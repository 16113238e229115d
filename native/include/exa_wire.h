/*
 * exa_wire.h: the workload <-> agent protocol on the agent's Unix socket.
 *
 * Transport: AF_UNIX SOCK_SEQPACKET, so every message is one datagram-like
 * record and file descriptors (SCM_RIGHTS) travel with exactly the message
 * they belong to. Every message is a fixed header followed by a fixed-size
 * payload for its type; the receiver checks magic, version, type, exact
 * length, the number of fds, and that names are NUL-terminated and made of
 * [A-Za-z0-9._-]. Anything else is answered with EXA_MSG_REPLY(-EPROTO, text)
 * and the connection is closed; the agent keeps serving everyone else.
 *
 * Conversation (workload = W, agent = A), each request answered by one REPLY
 * with the same seq:
 *   W: HELLO(job)                 A: REPLY(0) + fd of /dev/userfaultfd (or no fd: fallback)
 *   W: UFFDS + fds [sync uffd, async uffd?, /proc/self/pagemap]   A: REPLY
 *      (W then closes its own copies of the uffds)
 *   W: REGION_ADD(name,size,addr) + memfd                         A: REPLY
 *   W: REGION_FREE(name)          A: REPLY (-EBUSY while a checkpoint of the job is saving)
 *   W: CKPT_REQ                   A: REPLY when the checkpoint's pause is over
 *   W: DETACH                     A: REPLY; or W just closes the socket (exit).
 * The agent never sends anything unsolicited.
 */
#ifndef EXA_WIRE_H
#define EXA_WIRE_H

#include <stdint.h>

#define EXA_WIRE_MAGIC 0x31415845u /* "EXA1" little-endian */
#define EXA_WIRE_VERSION 1
#define EXA_WIRE_NAME 64 /* EXA_NAME_MAX + NUL */
#define EXA_WIRE_TEXT 240

enum exa_msg_type {
  EXA_MSG_HELLO = 1,
  EXA_MSG_UFFDS = 2,
  EXA_MSG_REGION_ADD = 3,
  EXA_MSG_REGION_FREE = 4,
  EXA_MSG_CKPT_REQ = 5,
  EXA_MSG_DETACH = 6,
  EXA_MSG_REPLY = 100,
};

struct exa_msg_hdr {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t seq;
  uint32_t len; /* payload bytes after this header */
};

struct exa_msg_hello {
  char job[EXA_WIRE_NAME];
  uint32_t api_version;
  uint32_t flags;
};

#define EXA_UFFDS_HAS_ASYNC 0x1u   /* fds[1] is a WP_ASYNC uffd, fds[2] is /proc/self/pagemap */
#define EXA_UFFDS_USER_ONLY 0x2u   /* fallback: uffd made with UFFD_USER_MODE_ONLY */
struct exa_msg_uffds {
  uint32_t nfds; /* 1 (sync only) or 3 (sync, async, pagemap) */
  uint32_t flags;
};

struct exa_msg_region_add {
  char name[EXA_WIRE_NAME];
  uint64_t size; /* bytes, multiple of the page size */
  uint64_t addr; /* address of the MAP_SHARED mapping in the workload */
};

struct exa_msg_region_free {
  char name[EXA_WIRE_NAME];
};

#define EXA_REPLY_FLAG_NO_DEVUFFD 0x1u /* HELLO reply: the agent could not pass /dev/userfaultfd */
struct exa_msg_reply {
  int32_t status; /* 0 or -errno */
  uint32_t flags;
  char text[EXA_WIRE_TEXT]; /* NUL-terminated message naming what was wrong */
};

#define EXA_WIRE_MAX_MSG (sizeof(struct exa_msg_hdr) + sizeof(struct exa_msg_reply))

#endif /* EXA_WIRE_H */
