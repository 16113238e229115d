/* restore.c: adopting a staged checkpoint image as the job's regions (see restore.h). */
#define _GNU_SOURCE
#include "restore.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define RESTORE_MAX_REGIONS 4096
#define NAME_CAP 64

struct staged_region {
  char name[NAME_CAP];
  uint64_t size;
  uint64_t addr;
  int fd; /* the agent's fd number of the staged memfd */
  int taken;
};

struct exa_restore {
  char dir[4096];
  uint64_t checkpoint;
  long agent_pid; /* the process holding the staged memfds */
  size_t n;
  struct staged_region *regions;
};

static int name_ok(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n >= NAME_CAP || !strcmp(s, ".") || !strcmp(s, "..")) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')) return 0;
  }
  return 1;
}

int exa_restore_open(const char *dir, const char *job, struct exa_restore **out) {
  *out = NULL;
  if (strlen(dir) >= sizeof(((struct exa_restore *)0)->dir) - 80)
    return exa_fail(-ENAMETOOLONG, "EXA_RESTORE: directory path too long");
  char path[4200];
  snprintf(path, sizeof path, "%s/restore.tab", dir);
  FILE *f = fopen(path, "re");
  if (!f) return exa_fail(-errno, "EXA_RESTORE: cannot open %s: %s", path, strerror(errno));
  struct exa_restore *r = calloc(1, sizeof *r);
  if (!r) {
    fclose(f);
    return exa_fail(-ENOMEM, "EXA_RESTORE: out of memory");
  }
  snprintf(r->dir, sizeof r->dir, "%s", dir);
  char line[512];
  int lineno = 0, rc = 0, have_job = 0;
  while (fgets(line, sizeof line, f)) {
    lineno++;
    size_t len = strlen(line);
    if (len == 0 || line[len - 1] != '\n') { rc = exa_fail(-EINVAL, "EXA_RESTORE: %s line %d is too long or unterminated", path, lineno); break; }
    line[len - 1] = '\0';
    char a[NAME_CAP + 8], b[NAME_CAP + 8];
    unsigned long long size, addr, flags, fdn;
    long pid;
    if (lineno == 1) {
      if (strcmp(line, "exa-restore 2") != 0) { rc = exa_fail(-EINVAL, "EXA_RESTORE: %s is not an exa restore table (version 2)", path); break; }
    } else if (sscanf(line, "memfds %ld", &pid) == 1) {
      if (pid <= 0) { rc = exa_fail(-EINVAL, "EXA_RESTORE: %s line %d: bad agent pid", path, lineno); break; }
      r->agent_pid = pid;
    } else if (sscanf(line, "job %70s", a) == 1) {
      if (strcmp(a, job) != 0) { rc = exa_fail(-EINVAL, "EXA_RESTORE: the staged image is of job %s, not %s", a, job); break; }
      have_job = 1;
    } else if (sscanf(line, "checkpoint %llu", &size) == 1) {
      r->checkpoint = size;
    } else if (sscanf(line, "region %70s %llu %70s %llu %llu", a, &size, b, &flags, &fdn) == 5) {
      addr = strtoull(b, NULL, 0);
      if (!name_ok(a) || size == 0 || size % 4096 != 0 || fdn > 1u << 30) { rc = exa_fail(-EINVAL, "EXA_RESTORE: %s line %d: bad region entry", path, lineno); break; }
      if (r->n >= RESTORE_MAX_REGIONS) { rc = exa_fail(-E2BIG, "EXA_RESTORE: more than %d regions", RESTORE_MAX_REGIONS); break; }
      struct staged_region *nr = realloc(r->regions, (r->n + 1) * sizeof *nr);
      if (!nr) { rc = exa_fail(-ENOMEM, "EXA_RESTORE: out of memory"); break; }
      r->regions = nr;
      memset(&nr[r->n], 0, sizeof nr[r->n]);
      snprintf(nr[r->n].name, NAME_CAP, "%s", a);
      nr[r->n].size = size;
      nr[r->n].addr = addr;
      nr[r->n].fd = (int)fdn;
      r->n++;
    } else {
      rc = exa_fail(-EINVAL, "EXA_RESTORE: %s line %d is not understood: %.80s", path, lineno, line);
      break;
    }
  }
  fclose(f);
  if (rc == 0 && !have_job) rc = exa_fail(-EINVAL, "EXA_RESTORE: %s names no job", path);
  if (rc == 0 && r->n > 0 && !r->agent_pid) rc = exa_fail(-EINVAL, "EXA_RESTORE: %s names no agent process holding the regions", path);
  if (rc < 0) {
    free(r->regions);
    free(r);
    return rc;
  }
  /* Read once: from now on the directory only holds region files not yet taken. */
  unlink(path);
  *out = r;
  return 0;
}

int exa_restore_take(struct exa_restore *r, const char *name, size_t size, int *fd, uint64_t *addr) {
  for (size_t i = 0; i < r->n; i++) {
    struct staged_region *g = &r->regions[i];
    if (strcmp(g->name, name) != 0) continue;
    if (g->taken) return exa_fail(-EEXIST, "EXA_RESTORE: region \"%s\" was already restored", name);
    if (g->size != size)
      return exa_fail(-EINVAL, "EXA_RESTORE: region \"%s\" is %" PRIu64 " bytes in checkpoint %" PRIu64 ", the job asks for %zu",
                      name, g->size, r->checkpoint, size);
    /* The agent stages each region in a memfd sealed against shrinking and keeps it open until the
     * job took it; opening it through /proc gives this process the same memfd, seals included. */
    char path[128];
    snprintf(path, sizeof path, "/proc/%ld/fd/%d", r->agent_pid, g->fd);
    int f = open(path, O_RDWR | O_CLOEXEC);
    if (f < 0) {
      int e = errno;
      return exa_fail(e == ENOENT ? -EIO : -e, "EXA_RESTORE: region \"%s\" of checkpoint %" PRIu64 ": cannot open the agent's staged memfd %s: %s",
                      name, r->checkpoint, path, strerror(e));
    }
    struct stat st;
    int seals = fcntl(f, F_GET_SEALS);
    if (fstat(f, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != g->size || seals < 0 || !(seals & F_SEAL_SHRINK)) {
      close(f);
      return exa_fail(-EINVAL, "EXA_RESTORE: %s is not a sealed %" PRIu64 "-byte memfd", path, g->size);
    }
    g->taken = 1;
    *fd = f;
    *addr = g->addr;
    size_t left = 0;
    for (size_t k = 0; k < r->n; k++) left += !r->regions[k].taken;
    if (left == 0) rmdir(r->dir);
    return 0;
  }
  return 1;
}

uint64_t exa_restore_checkpoint(const struct exa_restore *r) { return r ? r->checkpoint : 0; }

void exa_restore_close(struct exa_restore *r) {
  if (!r) return;
  /* Regions nobody took stay with the agent, which closes its memfds when the job ends. */
  rmdir(r->dir);
  free(r->regions);
  free(r);
}
