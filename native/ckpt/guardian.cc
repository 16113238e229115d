/* guardian.cc: see guardian.h. */
#include "guardian.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <mutex>

#define EXA_GUARDIAN_MAX 4096

namespace exa {
namespace guardian {
namespace {

struct Msg {
  int32_t op; /* 'S' stopping (carries a pidfd), 'C' resumed */
  int32_t pid;
};

std::mutex mu;
int sock = -1;
pid_t gpid = -1;

/* The guardian's body: only async-signal-safe calls from here on. */
[[noreturn]] void serve(int fd) {
  static int pids[EXA_GUARDIAN_MAX], fds[EXA_GUARDIAN_MAX];
  int n = 0;
  for (;;) {
    Msg m;
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {&m, sizeof m};
    struct msghdr h;
    memset(&h, 0, sizeof h);
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    h.msg_control = cbuf;
    h.msg_controllen = sizeof cbuf;
    ssize_t r = recvmsg(fd, &h, MSG_CMSG_CLOEXEC);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break; /* EOF: the agent process is gone */
    int got = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&h); c; c = CMSG_NXTHDR(&h, c))
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(&got, CMSG_DATA(c), sizeof got);
    if (r != (ssize_t)sizeof m) {
      if (got >= 0) close(got);
      continue;
    }
    /* one entry per pid: a newer stop replaces an older one */
    for (int i = 0; i < n; i++)
      if (pids[i] == m.pid) {
        close(fds[i]);
        pids[i] = pids[n - 1];
        fds[i] = fds[n - 1];
        n--;
        break;
      }
    if (m.op == 'S' && got >= 0) {
      if (n < EXA_GUARDIAN_MAX) {
        pids[n] = m.pid;
        fds[n] = got;
        n++;
      } else {
        close(got);
      }
    } else if (got >= 0) {
      close(got);
    }
  }
  for (int i = 0; i < n; i++) syscall(SYS_pidfd_send_signal, fds[i], SIGCONT, nullptr, 0);
  _exit(0);
}

void send_msg(int op, pid_t pid, int pidfd) {
  Msg m{op, (int32_t)pid};
  char cbuf[CMSG_SPACE(sizeof(int))];
  memset(cbuf, 0, sizeof cbuf);
  struct iovec iov = {&m, sizeof m};
  struct msghdr h;
  memset(&h, 0, sizeof h);
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  if (pidfd >= 0) {
    h.msg_control = cbuf;
    h.msg_controllen = sizeof cbuf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&h);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &pidfd, sizeof pidfd);
  }
  std::lock_guard<std::mutex> g(mu);
  if (sock < 0) return;
  while (sendmsg(sock, &h, MSG_NOSIGNAL) < 0 && errno == EINTR) {
  }
}

}  // namespace

int start() {
  std::lock_guard<std::mutex> g(mu);
  if (sock >= 0) return 0;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return -errno;
  /* Learn the grandchild's pid through a pipe (it is not our child). */
  int pp[2];
  if (pipe2(pp, O_CLOEXEC) != 0) {
    int e = errno;
    close(sv[0]);
    close(sv[1]);
    return -e;
  }
  pid_t child = fork();
  if (child < 0) {
    int e = errno;
    close(sv[0]);
    close(sv[1]);
    close(pp[0]);
    close(pp[1]);
    return -e;
  }
  if (child == 0) {
    /* intermediate child: fork the guardian and exit, so init adopts it */
    pid_t gc = fork();
    if (gc != 0) _exit(gc < 0 ? 1 : 0);
    pid_t self = getpid();
    (void)!write(pp[1], &self, sizeof self);
    /* keep only the guardian's end of the socketpair, as fd 3 */
    if (dup2(sv[1], 3) < 0) _exit(1);
    syscall(SYS_close_range, 4u, ~0u, 0u);
    for (int fd = 0; fd < 3; fd++) {
      int nul = open("/dev/null", O_RDWR);
      if (nul >= 0 && nul != fd) {
        dup2(nul, fd);
        close(nul);
      }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    for (int s : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGUSR1, SIGUSR2}) sigaction(s, &sa, nullptr);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    prctl(PR_SET_NAME, "exa-guardian", 0, 0, 0);
    serve(3);
  }
  close(sv[1]);
  close(pp[1]);
  int st = 0;
  while (waitpid(child, &st, 0) < 0 && errno == EINTR) {
  }
  pid_t gc = -1;
  ssize_t r;
  while ((r = read(pp[0], &gc, sizeof gc)) < 0 && errno == EINTR) {
  }
  close(pp[0]);
  if (r != (ssize_t)sizeof gc || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    close(sv[0]);
    return -ECHILD;
  }
  sock = sv[0];
  gpid = gc;
  return 0;
}

void stopping(pid_t pid, int pidfd) { send_msg('S', pid, pidfd); }

void resumed(pid_t pid) { send_msg('C', pid, -1); }

pid_t pid() {
  std::lock_guard<std::mutex> g(mu);
  return gpid;
}

}  // namespace guardian
}  // namespace exa
