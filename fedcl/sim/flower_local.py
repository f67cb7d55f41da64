"""Flower's managed local SuperLink: what `flwr run .` starts for a local simulation, and keeps.

Flower 1.41 starts ``flower-superlink --simulation`` (detached, with its ``flower-superexec``) the
first time a connection with the address ``":local:"`` is used, and reuses it for every later
``flwr run``; it has no command, option or environment variable that stops it or makes it exit
after the run. ``fedcl stop-local-superlink`` stops it, and only it: the process that listens on
Flower's local SuperLink port (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, 39091 by default) must be a
``flower-superlink --simulation`` on that port, owned by this user, and it must have no run that
is not finished (Flower's own ``flwr list``); otherwise nothing is stopped and one line says why.
Linux only (it reads /proc).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")


class LocalSuperLinkError(RuntimeError):
    """Nothing was stopped; the message says why."""


def local_superlink_port() -> int:
    """The port Flower's `flwr` uses for its managed local SuperLink (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT)."""
    from flwr.cli.constant import LOCAL_SUPERLINK_HTTP_API_PORT

    return int(LOCAL_SUPERLINK_HTTP_API_PORT)


def listening_pids(port: int) -> list[int]:
    """The processes of this user that hold a listening TCP socket on ``port`` (any address)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    pids = []
    for proc in PROC.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue  # gone, or another user's
    return sorted(pids)


def _cmdline(pid: int) -> list[str]:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running (a zombie, its exit not yet collected by its parent, counts as gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for proc in PROC.iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def is_managed_superlink(argv: list[str], port: int) -> bool:
    """The command line `flwr` starts its local SuperLink with: flower-superlink --simulation --port PORT."""
    names = [Path(a).name for a in argv[:2]]  # the script itself, or python running it
    return ("flower-superlink" in names and "--simulation" in argv and "--port" in argv
            and argv.index("--port") + 1 < len(argv) and argv[argv.index("--port") + 1] == str(port))


def unfinished_runs(port: int) -> list[tuple[str, str]]:
    """(run id, status) of every run of the SuperLink on 127.0.0.1:``port`` that is not finished, from
    `flwr list` on a connection of its own (the user's Flower config is neither read nor changed)."""
    flwr = Path(sys.executable).parent / "flwr"
    with tempfile.TemporaryDirectory() as home:
        Path(home, "config.toml").write_text(
            '[superlink]\ndefault = "managed"\n\n[superlink.managed]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        env = {**os.environ, "FLWR_HOME": home, "FLWR_TELEMETRY_ENABLED": "0",
               "FLWR_DISABLE_UPDATE_CHECK": "1"}
        done = subprocess.run([str(flwr if flwr.exists() else "flwr"), "list", "managed", "--format", "json"],
                              env=env, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(done.stdout[done.stdout.find("{"):])["runs"]
        return [
            (str(r["run-id"]), str(r["status"])) for r in runs if not str(r["status"]).startswith("finished")]
    except (ValueError, KeyError, TypeError):
        detail = (done.stdout.strip() or done.stderr.strip())[-300:]
        raise LocalSuperLinkError(
            f"could not list its runs with `flwr list` ({detail}): not stopped") from None


def stop_local_superlink(port: int, *, runs: Callable[[int], list[tuple[str, str]]] = unfinished_runs,
                         timeout: float = 60.0) -> str:
    """Stop Flower's managed local SuperLink on ``port`` when it has no unfinished run; what was done.
    Raises LocalSuperLinkError, having stopped nothing, when the process is not that or is busy."""
    pids = listening_pids(port)
    where = f"127.0.0.1:{port}"
    if not pids:
        return f"Flower's local SuperLink is not running (nothing of this user's listens on {where})"
    for pid in pids:
        if not is_managed_superlink(_cmdline(pid), port):
            raise LocalSuperLinkError(
                f"the process listening on {where} (pid {pid}: {' '.join(_cmdline(pid))}) is "
                "not the SuperLink `flwr run` manages: not stopped")
    if busy := runs(port):
        listed = ", ".join(f"{run_id} ({status})" for run_id, status in busy)
        raise LocalSuperLinkError(
            f"Flower's local SuperLink on {where} has runs that are not finished: {listed}; "
            "not stopped (wait for them, or `flwr stop RUN_ID`, then run this again)")
    family = pids + [child for pid in pids for child in _children(pid)]  # its flower-superexec
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # the SuperLink stops its SuperExec on the way out
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in family if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        raise LocalSuperLinkError(f"sent SIGTERM, but after {timeout:.0f} s these are still running: "
                                  + ", ".join(f"{pid} ({' '.join(_cmdline(pid))[:80]})" for pid in left))
    return (f"stopped Flower's local SuperLink on {where} (pid {', '.join(map(str, pids))}) and its "
            f"{len(family) - len(pids)} child process(es); the next `flwr run` starts a new one")


__all__ = ["LocalSuperLinkError", "is_managed_superlink", "listening_pids", "local_superlink_port",
           "stop_local_superlink", "unfinished_runs"]
