/*
 * restore.h: libexa's side of EXA_RESTORE (internal to libexa).
 *
 * An agent relaunching a job from a checkpoint stages the image as one memfd
 * per region, sealed against shrinking and held open by the agent, and sets
 * EXA_RESTORE to a directory whose restore.tab names the agent's pid and each
 * region's fd (layout in src/hostagent/staging.ts). exa_region_alloc() of a
 * name in the image opens that memfd through /proc/<pid>/fd/<n> and adopts it
 * as the region's backing instead of a fresh memfd: nothing is copied.
 */
#ifndef EXA_RESTORE_H
#define EXA_RESTORE_H

#include <stddef.h>
#include <stdint.h>

struct exa_restore;

/* Parse <dir>/restore.tab. -EINVAL (with exa_last_error set) for a table that is not for `job` or malformed. */
int exa_restore_open(const char *dir, const char *job, struct exa_restore **out);

/*
 * Take region `name` out of the image: 0 and an O_RDWR fd of its memfd (the
 * caller owns it) plus its recorded address; 1 when the image has no such
 * region (the caller makes a fresh one); -EINVAL when its size differs from
 * `size` or it is not a sealed memfd; another -errno when the staged memfd
 * cannot be had (never a fresh region in its place: that would resume the
 * job on zeros). A region can be taken once; the staging directory is
 * removed once every region was taken.
 */
int exa_restore_take(struct exa_restore *r, const char *name, size_t size, int *fd, uint64_t *addr);

/* Checkpoint number of the image. */
uint64_t exa_restore_checkpoint(const struct exa_restore *r);

/* Remove the staging directory, free (the agent closes memfds nobody took). */
void exa_restore_close(struct exa_restore *r);

/* Shared with exa.c: set exa_last_error() and return err. */
int exa_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
