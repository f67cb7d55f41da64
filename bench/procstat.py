"""What a process tree costs, read from Linux's /proc: RSS, CPU seconds, threads, open files.

``ProcessSampler`` polls a process and its descendants from outside (the server process, Ray's
workers, Ray's own services); ``ThreadCPU`` runs inside a process and splits its CPU seconds by
thread at chosen moments. No psutil: the repo's pinned dependencies do not include it, and Ray's
vendored copy is not ours to import.
"""

from __future__ import annotations

import os
import threading

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
RAY_SERVICES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # ray:: titles that are not workers


def proc_status(pid: int | str) -> dict[str, int]:
    """VmHWM (peak RSS as the kernel tracks it) and VmRSS of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024  # kB
    return out


def _process_tree(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds so far) of ``root`` and all its descendants (one /proc scan)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # after "(comm)": state, ppid, ...
        except OSError:
            continue  # gone since the listing
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
        tree.update(frontier)
    out = {}
    for pid in tree:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = (f.read().replace(b"\0", b" ").decode(errors="replace").strip(), cpu.get(pid, 0.0))
        except OSError:
            pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


class ProcessSampler:
    """Peak RSS sums and CPU seconds of the server process, Ray's workers and Ray's own services."""

    KINDS = ("server", "ray_workers", "ray_services")

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = dict.fromkeys(self.KINDS, 0)
        self.cpu_by_pid: dict[int, tuple[str, float]] = {}  # cumulative, kept after a process ends
        self.max_workers = 0
        self.server_max_fds = 0  # open file descriptors of the server process (ulimit -n bounds them)
        self.server_max_threads = 0
        self.samples = 0

    def _kind(self, pid: int, cmd: str) -> str:
        if pid == self.root:
            return "server"
        if cmd.startswith("ray::") and not cmd.startswith(RAY_SERVICES):
            return "ray_workers"
        return "ray_services"

    def sample(self) -> None:
        sums = dict.fromkeys(self.KINDS, 0)
        workers = 0
        for pid, (cmd, cpu) in _process_tree(self.root).items():
            kind = self._kind(pid, cmd)
            workers += kind == "ray_workers"
            sums[kind] += _rss(pid)
            self.cpu_by_pid[pid] = (kind, cpu)
        for k, v in sums.items():
            self.peak[k] = max(self.peak[k], v)
        self.max_workers = max(self.max_workers, workers)
        try:
            self.server_max_fds = max(self.server_max_fds, len(os.listdir(f"/proc/{self.root}/fd")))
            with open(f"/proc/{self.root}/status") as f:
                threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
            self.server_max_threads = max(self.server_max_threads, threads)
        except (OSError, StopIteration):
            pass  # the server ended between the scan and here
        self.samples += 1

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each kind of process."""
        out = dict.fromkeys(self.KINDS, 0.0)
        for kind, seconds in self.cpu_by_pid.values():
            out[kind] += seconds
        return out


class ThreadCPU:
    """CPU seconds of each thread of this process, marked at chosen moments (the end of each round).

    Python threads are named after their target ("Thread-3 (add_messages_to_queue)" counts as
    ``add_messages_to_queue``); native threads (gRPC, Ray's core worker) by their kernel name.
    """

    def __init__(self) -> None:
        self.marks: dict[int, dict[str, float]] = {}  # round -> {thread: CPU seconds}

    def mark(self, round_: int) -> None:
        self.marks[round_] = self.snapshot()

    @staticmethod
    def snapshot() -> dict[str, float]:
        names = {t.native_id: t.name for t in threading.enumerate()}
        out: dict[str, float] = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue  # the thread ended
            name = names.get(int(tid), f"native {comm}")
            if name.endswith(")") and " (" in name:
                name = name.rpartition(" (")[2][:-1]
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
        return out

    def per_steady_round(self) -> dict[str, float] | None:
        """CPU seconds per round by thread, from the end of round 1 to the end of the last round."""
        if len(self.marks) < 2 or 1 not in self.marks:
            return None
        last = max(self.marks)
        first, end = self.marks[1], self.marks[last]
        used = {k: (v - first.get(k, 0.0)) / (last - 1) for k, v in end.items()}
        return {k: v for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0}  # largest first
