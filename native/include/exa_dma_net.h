/*
 * exa_dma_net.h: the agent <-> agent protocol of RDMA API remoting (the TCP
 * data path between hosts). Agent-internal: jobs never speak it.
 *
 * One TCP connection per (sending agent, receiving agent address), opened by
 * the sender on first use, kept and shared by every client application of the
 * sending backend. Every frame is one struct exa_dma_net_hdr (exactly
 * EXA_DMA_NET_HDR bytes, little-endian as the hosts) followed by `len` payload
 * bytes. The receiver distrusts every field: a bad magic, version, type,
 * reserved field, string or length drops the connection (logged with the
 * reason); the backend keeps serving everyone else.
 *
 *   sender -> receiver
 *     HELLO   text = cluster token ("" when none)      -> HELLO_OK or HELLO_NO (then closed)
 *     LOOKUP  job/name = the buffer, from = asking job -> REPLY status, size, perms
 *     WRITE   job/name, offset, from, stream, len bytes of payload follow
 *                                                     -> REPLY status (0 = applied)
 *     READ    job/name, offset, size = bytes wanted, from, stream
 *                                                     -> REPLY status, then len = size payload bytes when 0
 *   Requests carry an id; each gets exactly one REPLY with that id, in the order
 *   the requests were received (one serving thread per connection), so many
 *   requests may be in flight on one connection.
 *
 * Reply status: 0 = applied; EXA_DMA_NET_HELD = not applied, retry later (the
 * job is fenced for migration or expected but not registered yet);
 * EXA_DMA_NET_MOVED = not applied, the job now lives at `text` (ip:port);
 * otherwise -errno with a reason in `text`. Only 0 means the operation took
 * effect; HELD and MOVED mean it did not, so a retry cannot apply it twice.
 *
 * Ordering across holds: `stream` names the sending queue. Once the receiver
 * answers HELD for (stream, job), it answers HELD for every later request of
 * that stream to that job until a request with EXA_DMA_NET_RETRY arrives
 * (the sender re-sends its held requests one at a time, oldest first, each
 * with RETRY), so a later operation never overtakes a held earlier one.
 */
#ifndef EXA_DMA_NET_H
#define EXA_DMA_NET_H

#include <stdint.h>

#define EXA_DMA_NET_MAGIC 0x314e4d44u /* "DMN1" */
#define EXA_DMA_NET_VERSION 1
#define EXA_DMA_NET_HDR 512
#define EXA_DMA_NET_TEXT 256
#define EXA_DMA_NET_MAX_PAYLOAD (1ull << 30) /* per frame */

enum exa_dma_net_type {
  EXA_DMA_NET_HELLO = 1,
  EXA_DMA_NET_HELLO_OK = 2,
  EXA_DMA_NET_HELLO_NO = 3,
  EXA_DMA_NET_LOOKUP = 4,
  EXA_DMA_NET_WRITE = 5,
  EXA_DMA_NET_READ = 6,
  EXA_DMA_NET_REPLY = 7,
};

#define EXA_DMA_NET_RETRY 0x1u /* flags: a re-send of a held request */

#define EXA_DMA_NET_HELD 1
#define EXA_DMA_NET_MOVED 2

struct exa_dma_net_hdr {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t flags;
  int32_t status; /* replies */
  uint64_t id;
  uint64_t stream;
  uint64_t offset;
  uint64_t len;  /* payload bytes following this header */
  uint64_t size; /* READ: bytes wanted; LOOKUP reply: the buffer's size */
  uint32_t perms;
  uint32_t pad;
  char job[64];  /* the buffer's owner */
  char name[64]; /* the buffer */
  char from[64]; /* the asking job */
  char text[EXA_DMA_NET_TEXT];
};

#ifdef __cplusplus
static_assert(sizeof(struct exa_dma_net_hdr) == EXA_DMA_NET_HDR, "exa_dma_net_hdr size");
#endif

#endif /* EXA_DMA_NET_H */
