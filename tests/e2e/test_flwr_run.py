"""Flower's own `flwr run` on a copy of the project (issue 22, item 1).

`flwr run .`: Flower 1.41 runs it on its managed local SuperLink (a local simulation). The ServerApp
finds no queue service in the run's config and serves one on loopback for the run; the sites find their
tokens where it left them. Afterwards the copy's tracked files are unchanged (Flower had nothing to
migrate in pyproject.toml) and nothing the command started is left: Flower keeps its managed local
SuperLink for the next `flwr run` by design, and the reaper the ServerApp started at the end of the
run stops it once the run is over and `flwr run` has disconnected (the test kills nothing unless an
assertion failed). The test starts that SuperLink just before `flwr run`, as `flwr run` itself
would, only waiting longer.

`flwr run . fedcl`: a deployment's SuperLink (`fedcl-server superlink`) and queue service (`fedcl-server
queue`), two fedcl-client sites, and the connection and `flwr run` line the SuperLink printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
import warnings
from pathlib import Path

from fedcl.server.flower_local import REAPER_LOG_NAME
from fedcl.server.loopback import SITE_TOKEN_DIR_NAME
from tests.server.test_loopback import TINY_TOML  # the same tiny 2-round federation, run in-process there

from .helpers import (
    BIN,
    PATIENCE,
    REPO,
    free_port,
    process_env,
    read_history,
    server_argv,
    site_tokens,
    start_sites,
    tiny_config_text,
    write_site_data,
)

MARK = "E2E_FLWR_RUN_MARK"  # not FEDCL_: fedcl refuses FEDCL_ variables that are no setting



def _copy_tracked_files(dst: Path) -> None:
    """The project's tracked files as they are in this checkout, committed in a fresh repository."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dst, check=True)


def _started_by(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries the marker (a process
    started by the command, however detached, inherits it)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{MARK}={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue  # gone, or not ours to read
    return found


def _stop_and_wait(marker: str, timeout: float) -> dict[int, str]:
    """SIGTERM every marked process, wait until they are gone (SIGKILL at the end); what was left."""
    for pid in _started_by(marker):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while (left := _started_by(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _start_flowers_local_superlink(app: Path, env: dict[str, str]) -> None:
    """What `flwr run` does first when its local SuperLink is down (Flower's own code, the same command),
    with a longer wait: Flower gives it 15 s, which a loaded machine misses ("Failed to start local
    SuperLink within 15s"); `flwr run` then finds it up and uses it."""
    code = ("import sys; import flwr.cli.local_superlink as m; "
            "m.LOCAL_SUPERLINK_STARTUP_TIMEOUT = float(sys.argv[1]); m._start_local_superlink()")
    started = subprocess.run([str(BIN / "python"), "-c", code, str(120 * PATIENCE)], cwd=app, env=env,
                             capture_output=True, text=True, timeout=300 * PATIENCE)
    assert started.returncode == 0, (
        f"Flower's local SuperLink did not start: {started.stdout}{started.stderr}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# How Flower details a run it failed because the simulation's task heartbeat (sent every 17.5 to 22.5 s)
# went unacknowledged for 60 s (both Flower constants); the simulation then stops itself
# (`flwr run --stream` still exits 0). Reproduced here by stopping the simulation's process for 80 s.
HEARTBEAT_EXPIRED = "finished:failed (No heartbeat received from the task)"


def _flwr_run_dot(root: Path) -> dict:
    """`flwr run . --stream` in a fresh copy under ``root``, as a user runs it, and what was left once every
    process it started is gone (or after 300 s): the run's log, the reaper's log, a description of both."""
    app, home, out = root / "app", root / "home", root / "out"
    for d in (app, home):
        d.mkdir(parents=True)
    _copy_tracked_files(app)
    config = root / "tiny.toml"
    config.write_text(TINY_TOML)
    marker = uuid.uuid4().hex
    env = process_env(
        home, PYTHONPATH=str(app), **{MARK: marker},
        # Flower's own switch: run on the installed packages, not a per-run environment built by `uv sync`
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        # Flower's managed local SuperLink on ports of this test's own (another one may be up on the defaults)
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    flwr = [str(BIN / "flwr")]
    try:
        _start_flowers_local_superlink(app, env)
        done = subprocess.run(
            [*flwr, "run", ".", "--stream", "--run-config", f"config-path='{config}' out-dir='{out}'"],
            cwd=app, env=env, capture_output=True, text=True, timeout=900 * PATIENCE)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-4000:]
        run_id = re.search(r"started run (\d+)", log)
        assert run_id, f"`flwr run` started no run:\n{log[-4000:]}"

        # Flower's status of the run, as `flwr list` gave it to the reaper the ServerApp left: it stops
        # Flower's managed local SuperLink once the run is over and `flwr run` has disconnected, so nothing
        # the command started is left, without `stop-local-superlink`. Waiting for that (an event: the
        # processes are gone) before reading the outputs also waits out a run that `flwr run --stream`
        # stopped following early.
        deadline = time.monotonic() + 300 * PATIENCE
        while _started_by(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        reaper_log = out / REAPER_LOG_NAME
        said = reaper_log.read_text() if reaper_log.exists() else "(no reaper log)"
        superlink_log = home / ".flwr" / "local-superlink" / "superlink.log"
        superlink_said = superlink_log.read_text()[-6000:] if superlink_log.exists() else "(none)"
        what_happened = (f"`flwr run` said:\n{log[-6000:]}\nthe reaper said:\n{said}\n"
                         f"the local SuperLink's log ends:\n{superlink_said}")
        assert _started_by(marker) == {}, (
            f"left running {300 * PATIENCE} s after `flwr run .` exited: {_started_by(marker)}\n"
            f"{what_happened}")
        # (a `flwr list` here would start a new local SuperLink once that one is stopped)
        return {"app": app, "out": out, "log": log, "run_id": run_id.group(1), "said": said,
                "what_happened": what_happened}
    finally:
        left = _stop_and_wait(marker, timeout=60 * PATIENCE)  # only what a failed assertion above left
        assert left == {}, f"still running after SIGTERM: {left}"


def test_flwr_run_dot_runs_the_simulation_with_its_own_queue_and_leaves_nothing_behind(tmp_path):
    """Flower failing the run for its expired task heartbeat (Flower's 60 s, on a machine too loaded to
    answer within it) is Flower's condition, not fedcl's: the reaper's log names it, the test warns and
    runs once more in a fresh copy. Any other failed run fails the test."""
    run = _flwr_run_dot(tmp_path / "first")
    if f"run {run['run_id']} is {HEARTBEAT_EXPIRED};" in run["said"]:
        warnings.warn(f"Flower failed the first `flwr run .` for its task heartbeat; running it again.\n"
                      f"{run['what_happened'][-3000:]}", stacklevel=1)
        run = _flwr_run_dot(tmp_path / "again")
    app, out, log, said, what_happened = run["app"], run["out"], run["log"], run["said"], run["what_happened"]
    assert f"run {run['run_id']} is finished:completed;" in said, what_happened
    assert "stopped Flower's local SuperLink" in said, what_happened

    assert (out / "summary.json").exists(), f"the run wrote no summary.json\n{what_happened}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites_ok"] for r in history] == [2, 2], history
    # both sites pushed to the run's queue with the tokens it gave
    assert history[1]["queue_size"] == 2 * 20
    assert not (out / SITE_TOKEN_DIR_NAME).exists()  # the tokens went with the run
    queue_port = re.search(r"serving one on 127\.0\.0\.1:(\d+) for this run only", log)
    assert queue_port, log[-4000:]
    assert not _listening(int(queue_port.group(1))), "the run's queue service still listens"
    audit = [json.loads(line) for line in (out / "queue-audit.jsonl").read_text().splitlines()]
    assert audit[-1]["event"] == "stop", audit[-3:]  # stopped with the run, not with its process

    status = subprocess.run(["git", "status", "--porcelain"], cwd=app, capture_output=True, text=True,
                            check=True)
    assert status.stdout == "", f"`flwr run .` changed the project:\n{status.stdout}"
    assert "will be stopped once run" in log, log[-4000:]  # the ServerApp said so in the run's log


def _superlink_instructions(log: str) -> tuple[str, str, str]:
    """(Flower connection block, queue command, `flwr run` line) as `fedcl-server superlink` printed them."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("[superlink."))
    block = "\n".join(lines[start:lines.index("", start)]) + "\n"
    queue = next(line for line in lines if line.startswith("fedcl-server queue "))
    return block, queue, next(line for line in lines if line.startswith("flwr run "))


def test_flwr_run_with_a_connection_to_fedcl_servers_superlink_uses_the_queue_service(tmp_path, processes):
    """A deployment, as a Flower user drives it: `fedcl-server superlink` prints the connection and the
    `flwr run` line; the queue service (`fedcl-server queue`) and two fedcl-client sites are up; the
    user pastes the connection into their Flower config and runs the printed line, in a fresh copy."""
    app, user_home = tmp_path / "app", tmp_path / "user-home"
    app.mkdir()
    user_home.mkdir()
    _copy_tracked_files(app)
    port, queue_port, out_dir = free_port(), free_port(), tmp_path / "run"
    tokens = site_tokens(2)
    cfg = tmp_path / "fedcl.toml"
    cfg.write_text(tiny_config_text(out_dir=out_dir, superlink_port=port, queue_port=queue_port, num_rounds=2,
                                    tokens=tokens, coordinator_token="test-coordinator-token-of-flwr-run"))
    data = write_site_data(cfg, tmp_path)
    env = process_env(tmp_path / "home", PYTHONPATH=str(app))
    processes.start("superlink", server_argv("superlink", "--config", str(cfg)), env=env)
    processes.wait_for(
        "the SuperLink's `flwr run` line", lambda: "\nflwr run " in processes.log("superlink", 100_000),
        timeout=120, alive=["superlink"])
    block, queue_line, run_line = _superlink_instructions(processes.log("superlink", 100_000))
    assert queue_line == f"fedcl-server queue --config {cfg}"
    processes.start("queue", server_argv(*shlex.split(queue_line)[1:]), env=env)
    start_sites(tmp_path, processes, port=port, tokens=tokens, data=data, env=env)
    processes.wait_for("both sites to connect", lambda: len(re.findall(
        r"Activated node_id", processes.log("superlink", 1_000_000))) >= 2,
                       timeout=180, alive=["superlink", "queue", "site-0", "site-1"])

    user = process_env(user_home, PYTHONPATH=str(app))
    flwr = [str(BIN / "flwr")]
    subprocess.run([*flwr, "config", "list"], cwd=app, env=user, capture_output=True, check=True, timeout=120)
    flower_config = user_home / ".flwr" / "config.toml"  # written by flwr on first use, with its `local`
    flower_config.write_text(flower_config.read_text() + "\n" + block)
    argv = shlex.split(run_line)
    assert argv[:4] == ["flwr", "run", ".", "fedcl"], run_line
    done = subprocess.run([*flwr, *argv[1:]], cwd=app, env=user, capture_output=True, text=True,
                          timeout=900 * PATIENCE)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:] + processes.logs()
    run_id = re.search(r"started run (\d+)", log)
    assert run_id, f"`flwr run` started no run:\n{log[-4000:]}"
    listed = subprocess.run([*flwr, "list", "fedcl", "--run-id", run_id.group(1), "--format", "json"],
                            cwd=app, env=user, capture_output=True, text=True, timeout=120)
    assert json.loads(listed.stdout)["runs"][0]["status"] == "finished:completed", listed.stdout + log[-4000:]

    assert json.loads((out_dir / "summary.json").read_text())["rounds"] == 2
    history = read_history(out_dir)
    assert [r["sites_ok"] for r in history] == [2, 2], history
    assert history[1]["queue_size"] == 128  # round 2 sampled what both sites pushed (64 each)
    assert "for this run only" not in log  # no queue of the run's own: the configured one
    audit = [json.loads(line) for line in (out_dir / "queue-audit.jsonl").read_text().splitlines()]
    assert {e["site"] for e in audit if e["event"] == "push"} >= {"site-0", "site-1"}, audit[-5:]
    assert [e["round"] for e in audit if e["event"] == "advance"][-1] == 3, audit[
        -5:]  # the ServerApp drove it
    assert processes.procs["queue"].poll() is None  # the deployment's queue outlives the run
    status = subprocess.run(["git", "status", "--porcelain"], cwd=app, capture_output=True, text=True,
                            check=True)
    assert status.stdout == "", f"`flwr run . fedcl` changed the project:\n{status.stdout}"
