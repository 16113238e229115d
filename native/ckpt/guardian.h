/*
 * guardian.h: never leave a job stopped because its agent died.
 *
 * The checkpointer pauses a job with SIGSTOP. If the agent process dies while
 * a job is stopped (SIGKILL, a crash, the OOM killer), nothing would ever send
 * the SIGCONT, and the job would hang forever. The guardian is a small process
 * forked (twice, so init adopts it) when the first agent of this process is
 * created. It holds one end of a socketpair; the agent tells it about every
 * stop (with a pidfd, so a recycled pid is never signalled) and every resume.
 * When the agent process dies, the kernel closes its end: the guardian reads
 * EOF, sends SIGCONT to every job still marked stopped, and exits. A normal
 * process exit does the same, which is also right: a job is never left stopped
 * by an agent that is gone.
 *
 * The guardian runs only async-signal-safe system calls (it is forked from a
 * multi-threaded process), keeps no other file descriptor of the agent (so
 * sockets the jobs talk to still close when the agent dies), ignores the
 * terminal's signals, and tracks at most EXA_GUARDIAN_MAX stopped jobs at once.
 */
#pragma once

#include <sys/types.h>

namespace exa {
namespace guardian {

/* Start the guardian if it is not running yet (idempotent, thread-safe). Returns 0 or -errno. */
int start();
/* Before SIGSTOP: the job with this pidfd (the guardian gets its own copy) is being stopped. */
void stopping(pid_t pid, int pidfd);
/* After SIGCONT, or when the job is gone: forget it. */
void resumed(pid_t pid);
/* The guardian's pid (tests), or -1. */
pid_t pid();

}  // namespace guardian
}  // namespace exa
