/*
 * internal.h: helpers shared by the libexa units (exa.c, dma.c); not part of
 * the public API (exa.h).
 */
#ifndef EXA_INTERNAL_H
#define EXA_INTERNAL_H

#include <stddef.h>

/* 1 when s is a job, region or buffer name: 1..EXA_NAME_MAX characters of [A-Za-z0-9._-]. */
int exa__valid_name(const char *s);

/*
 * Send one datagram of len bytes on a SOCK_SEQPACKET socket with up to 4 fds
 * (SCM_RIGHTS), retrying on EINTR, never raising SIGPIPE. 0 or -errno.
 */
int exa__send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/*
 * Test hook (native/test/exa_workload.c only): send one request of `type` on the context's agent
 * socket, as libexa does, bypassing libexa's own checks, so tests can play a hostile job. Returns
 * the agent's status (0 or -errno; exa_last_error() holds its text).
 */
struct exa_ctx;
int exa__test_request(struct exa_ctx *ctx, unsigned type, const void *payload, unsigned len, const int *fds, int nfds);

/*
 * Test hook (native/test/exa_workload.c only): register buffer `name` of `size` bytes with the DMA
 * backend passing `fd` as its memfd, bypassing libexa's own region handling (a hostile job).
 * Returns the backend's status (0 or -errno; exa_last_error() holds its text).
 */
struct exa_dma;
int exa__test_dma_buf_add(struct exa_dma *d, const char *name, unsigned long long size, int fd);

#endif
