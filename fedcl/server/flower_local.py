"""Flower's managed local SuperLink: what `flwr run .` starts for a local simulation, and keeps.

Flower 1.41 starts ``flower-superlink --simulation`` (detached, with its ``flower-superexec``) the
first time a connection with the address ``":local:"`` is used, and reuses it for every later
``flwr run``; it has no command, option or environment variable that stops it or makes it exit
after the run. ``fedcl stop-local-superlink`` stops it, and only it: the process that listens on
Flower's local SuperLink port (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, 39091 by default) must be a
``flower-superlink --simulation`` on that port, owned by this user, and it must have no run that
is not finished (Flower's own ``flwr list``); otherwise nothing is stopped and one line says why.
``python -m fedcl.server.flower_local reap``, which the ServerApp of ``flwr run .`` starts detached at the
end of its run, does the same once the run is over and ``flwr run`` has disconnected (``reap_after_run``).
Linux only (it reads /proc).
"""

from __future__ import annotations

import json
import os
import select
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


def _socket_inodes(port: int, *, listening: bool) -> set[str]:
    """Sockets listening on ``port`` (any address), or connected to it from this machine (the client side)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            end = fields[1] if listening else fields[2]  # local address, or the remote one
            if len(fields) > 9 and fields[3] == ("0A" if listening else "01") \
                    and int(end.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _holders(inodes: set[str]) -> list[int]:
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


def listening_pids(port: int) -> list[int]:
    """The processes of this user that hold a listening TCP socket on ``port`` (any address)."""
    return _holders(_socket_inodes(port, listening=True))


def client_pids(port: int) -> list[int]:
    """The processes of this user with a TCP connection open to ``port`` on this machine (its clients)."""
    return _holders(_socket_inodes(port, listening=False))


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


def _parent(pid: int) -> int:
    try:
        return int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit() and _parent(int(p.name)) == pid]


def is_managed_superlink(argv: list[str], port: int) -> bool:
    """The command line `flwr` starts its local SuperLink with: flower-superlink --simulation --port PORT."""
    names = [Path(a).name for a in argv[:2]]  # the script itself, or python running it
    return ("flower-superlink" in names and "--simulation" in argv and "--port" in argv
            and argv.index("--port") + 1 < len(argv) and argv[argv.index("--port") + 1] == str(port))


def list_runs(port: int) -> list[tuple[str, str]]:
    """(run id, status) of every run of the SuperLink on 127.0.0.1:``port``, from `flwr list` on a
    connection of its own (the user's Flower config is neither read nor changed). A status with details
    carries them: "finished:failed (No heartbeat received from the task)"."""
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
        return parse_run_list(done.stdout)
    except (ValueError, KeyError, TypeError):
        detail = (done.stdout.strip() or done.stderr.strip())[-300:]
        raise LocalSuperLinkError(
            f"could not list its runs with `flwr list` ({detail}): not stopped") from None


def parse_run_list(listed: str) -> list[tuple[str, str]]:
    """(run id, status and details) of each run in the output of `flwr list --format json`."""
    runs = json.loads(listed[listed.find("{"):])["runs"]
    def status(run: dict) -> str:  # Flower writes N/A where a run has no details
        details = str(run.get("status-details") or "")
        return str(run["status"]) + (f" ({details})" if details not in ("", "N/A") else "")
    return [(str(r["run-id"]), status(r)) for r in runs]


def unfinished_runs(port: int) -> list[tuple[str, str]]:
    """(run id, status) of every run of the SuperLink on 127.0.0.1:``port`` that is not finished."""
    return _unfinished(list_runs(port))


def _unfinished(runs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(run_id, status) for run_id, status in runs if not status.startswith("finished")]


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


def managed_superlink_above(pid: int) -> tuple[int, int] | None:
    """(pid, port) of the managed local SuperLink (flower-superlink --simulation --port PORT) that
    ``pid`` runs under, i.e. an ancestor of it; None when it runs under none."""
    while pid > 1:
        argv = _cmdline(pid)
        if "--port" in argv and argv[-1] != "--port" and argv[argv.index("--port") + 1].isdigit():
            port = int(argv[argv.index("--port") + 1])
            if is_managed_superlink(argv, port):
                return pid, port
        pid = _parent(pid)
    return None


def _descendants(pid: int) -> set[int]:
    parents = {int(p.name): _parent(int(p.name)) for p in PROC.iterdir() if p.name.isdigit()}
    found, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def _wait_for(what: str, done: Callable[[], bool], *, patience: float, poll: float, max_poll: float) -> None:
    """Poll ``done`` (every ``poll`` s, growing to ``max_poll``) until true; LocalSuperLinkError after
    ``patience`` s."""
    deadline = time.monotonic() + patience
    while not done():
        if time.monotonic() > deadline:
            raise LocalSuperLinkError(f"still waiting for {what} after {patience:.0f} s: not stopped")
        time.sleep(poll)
        poll = min(poll * 1.5, max_poll)


def reap_after_run(run_id: str, serverapp_pid: int, superlink: tuple[int, int], *,
                   runs: Callable[[int], list[tuple[str, str]]] = list_runs,
                   patience: float = 1800.0, say: Callable[[str], None] = print) -> str:
    """Stop the managed local SuperLink ``superlink`` (pid, port) once the run is over: the ServerApp's
    process ``serverapp_pid`` has exited, ``runs`` (all runs, with their status) lists no run that is not
    finished (this one included),
    and no process outside the SuperLink's own is connected to it (`flwr run --stream` reads the run's
    logs until the SuperLink ends the stream, which it does once the run is finished). Then
    ``stop_local_superlink``, which checks again. What was done; LocalSuperLinkError when nothing was."""
    pid, port = superlink
    _wait_for("the ServerApp's process to exit", lambda: not _alive(serverapp_pid), patience=patience,
              poll=0.2, max_poll=1.0)
    say(f"the ServerApp of run {run_id} has exited")
    listed: list[tuple[str, str]] = []

    def all_finished() -> bool:
        listed[:] = runs(port)
        return not _unfinished(listed)
    _wait_for(f"run {run_id} and every other run to finish", all_finished, patience=patience, poll=1.0,
              max_poll=10.0)
    say(f"run {run_id} is {dict(listed).get(run_id, 'not listed')}; Flower lists no run that is not finished")
    def outside_clients() -> set[int]:  # its SuperExec and the apps that it runs may talk to it too
        return set(client_pids(port)) - _descendants(pid) - {os.getpid()}
    _wait_for("`flwr run` to disconnect", lambda: not outside_clients(), patience=patience, poll=0.2,
              max_poll=1.0)
    say(f"no client is connected to 127.0.0.1:{port}")
    if listening_pids(port) != [pid]:
        raise LocalSuperLinkError(f"the SuperLink on 127.0.0.1:{port} is no longer pid {pid}: not stopped")
    return stop_local_superlink(port, runs=lambda p: _unfinished(runs(p)))


REAPER_LOG_NAME = "local-superlink-reaper.log"


def start_superlink_reaper(run_id: int, out_dir: Path, *, answer_within: float = 120.0) -> str:
    """Start, detached, the process that stops Flower's managed local SuperLink once this run is over
    and nothing else uses it (``reap_main`` below, in a process of its own; it finds that SuperLink among
    this process's ancestors, and does nothing on any other SuperLink). Its one line, to log."""
    import fedcl

    package_root = str(Path(fedcl.__file__).resolve().parents[1])  # the FAB's copy, when Flower runs one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                      os.environ.get("PYTHONPATH")]))}
    log_path = Path(out_dir).resolve() / REAPER_LOG_NAME
    reaper = subprocess.Popen(
        [sys.executable, "-m", "fedcl.server.flower_local", "reap", "--run-id", str(run_id),
         "--serverapp-pid", str(os.getpid()), "--log", str(log_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        start_new_session=True)
    with reaper.stdout:
        ready, _, _ = select.select([reaper.stdout], [], [], answer_within)
        line = reaper.stdout.readline().strip() if ready else ""
    return line or (f"the reaper of Flower's local SuperLink said nothing within {answer_within:.0f} s "
                    f"(see {log_path})")


def reap_main(argv: list[str] | None = None) -> int:
    """`python -m fedcl.server.flower_local reap --run-id ID --serverapp-pid PID --log FILE`: started by the
    ServerApp of `flwr run .` at the end of the run, detached. Its first line on stdout says what it
    will do; the rest goes to the log file."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedcl.server.flower_local")
    parser.add_argument("command", choices=["reap"])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--serverapp-pid", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    superlink = managed_superlink_above(args.serverapp_pid)
    if superlink is None:
        print("this run is not on Flower's managed local SuperLink: nothing to stop", flush=True)
        return 0
    print(f"Flower's local SuperLink on 127.0.0.1:{superlink[1]} (pid {superlink[0]}) will be stopped once "
          f"run {args.run_id} and every other run on it have finished and `flwr run` has disconnected "
          f"(log: {args.log}; run config keep-local-superlink=true keeps it)", flush=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    def say(line: str) -> None:
        print(time.strftime("%Y-%m-%d %H:%M:%S"), line, flush=True)
    try:
        say(reap_after_run(args.run_id, args.serverapp_pid, superlink, say=say))
    except LocalSuperLinkError as exc:
        say(str(exc))
    return 0


__all__ = ["REAPER_LOG_NAME", "LocalSuperLinkError", "client_pids", "is_managed_superlink", "list_runs",
           "listening_pids", "local_superlink_port", "managed_superlink_above", "parse_run_list",
           "reap_after_run", "reap_main", "start_superlink_reaper", "stop_local_superlink", "unfinished_runs"]


if __name__ == "__main__":
    sys.exit(reap_main())
