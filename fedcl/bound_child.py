"""Start a child process that gets SIGTERM when the process that started it dies (Linux), without
running Python code between fork and exec.

``subprocess.Popen(preexec_fn=...)`` forks with fork(), which runs the fork handlers of every
library loaded: gRPC's handlers can block the parent for good when gRPC threads are alive (a
pre-flight check or the queue service made some). Here the parent starts ``python -m
fedcl.bound_child PID -- COMMAND...`` without a preexec_fn (so CPython uses vfork and no fork
handler runs); that fresh, single-threaded process sets its parent-death signal and execs COMMAND,
which keeps the signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
CANNOT_START = 127  # the launcher's status when COMMAND cannot be executed (as a shell's)


def bound_argv(argv: list[str]) -> list[str]:
    """``argv`` run through this launcher, bound to the calling process (as is, off Linux)."""
    if sys.platform != "linux":
        return list(argv)
    return [sys.executable, "-m", "fedcl.bound_child", str(os.getpid()), "--", *argv]


def popen_bound(argv: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(argv, **kwargs)``, the child ending with this process (SIGTERM)."""
    if "preexec_fn" in kwargs:
        raise TypeError("popen_bound starts children without a preexec_fn")
    return subprocess.Popen(bound_argv(argv), **kwargs)


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m fedcl.bound_child PARENT_PID -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    parent, command = int(args[0]), args[2:]
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    if os.getppid() != parent:  # the parent died before the signal was set: nobody is left to serve
        return 1
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"fedcl: cannot start {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return CANNOT_START


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
