"""`fedcl stop-local-superlink` (fedcl.server.flower_local): it stops Flower's managed local SuperLink only
when that is what listens on the port and it has no unfinished run. A stand-in process plays the
SuperLink here (a script named flower-superlink with the command line `flwr` gives it, and a child like
its SuperExec); tests/e2e/test_flwr_run.py sees the real one stopped after a real `flwr run .`. The
reaper that `flwr run .`'s ServerApp starts stops it only once the run is over and its client gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from fedcl.cli import main
from fedcl.server.flower_local import (
    REAPER_LOG_NAME,
    LocalSuperLinkError,
    client_pids,
    is_managed_superlink,
    listening_pids,
    managed_superlink_above,
    parse_run_list,
    reap_after_run,
    start_superlink_reaper,
    stop_local_superlink,
)

FAKE = textwrap.dedent("""\
    import signal, socket, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    def stop(*_):
        child.terminate(); child.wait(); sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    port = int(sys.argv[sys.argv.index("--port") + 1]) if "--port" in sys.argv else 0
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
    print(s.getsockname()[1], child.pid, flush=True)
    signal.pause()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_superlink(tmp_path):
    """Start a stand-in with these flags; (process, the port it listens on, its child's pid)."""
    started = []

    def start(*flags: str, name: str = "flower-superlink"):
        script = tmp_path / name
        script.write_text(FAKE)
        proc = subprocess.Popen([sys.executable, str(script), *flags], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        port, child = (int(v) for v in proc.stdout.readline().split())  # it listens now
        return proc, port, child

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _managed(fake_superlink):
    """A stand-in with the command line `flwr` starts its local SuperLink with."""
    port = _free_port()
    return fake_superlink("--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
                          "--port", str(port))


def test_the_managed_superlinks_command_line_is_recognised():
    flwr_started = ["/venv/bin/python", "/venv/bin/flower-superlink", "--insecure", "--simulation",
                    "--isolation", "subprocess", "--host", "127.0.0.1", "--port", "39091", "--database",
                    "/h/.flwr/state.db"]
    assert is_managed_superlink(flwr_started, 39091)
    assert not is_managed_superlink(flwr_started, 39092)  # another port's
    deployment = [a for a in flwr_started if a != "--simulation"]  # e.g. fedcl-server superlink's
    assert not is_managed_superlink(deployment, 39091)


def test_an_idle_managed_superlink_is_stopped_with_its_child(fake_superlink):
    proc, port, child = _managed(fake_superlink)
    assert listening_pids(port) == [proc.pid]
    said = stop_local_superlink(port, runs=lambda p: [])
    assert proc.wait(timeout=30) == 0 and not _running(child)
    assert said.startswith(
        f"stopped Flower's local SuperLink on 127.0.0.1:{port} (pid {proc.pid}) and its 1 child")
    assert "not running" in stop_local_superlink(port, runs=lambda p: [])  # nothing listens now


def test_a_busy_managed_superlink_is_not_stopped(fake_superlink):
    proc, port, child = _managed(fake_superlink)
    with pytest.raises(LocalSuperLinkError, match=r"runs that are not finished: 7 \(running\); not stopped"):
        stop_local_superlink(port, runs=lambda p: [("7", "running")])
    assert proc.poll() is None and _running(child)


def test_another_process_on_the_port_is_not_stopped(fake_superlink, capsys):
    proc, port, child = fake_superlink("--insecure", "--simulation")  # no --port: not the one flwr starts
    with pytest.raises(LocalSuperLinkError,
                       match=rf"listening on 127\.0\.0\.1:{port} \(pid {proc.pid}: .*not the "):
        stop_local_superlink(port, runs=lambda p: [])
    other, other_port, _ = fake_superlink("--port", str(_free_port()), name="some-server")
    assert main(["stop-local-superlink", "--port", str(other_port)]) == 2
    assert "not the SuperLink `flwr run` manages: not stopped" in capsys.readouterr().err
    assert proc.poll() is None and other.poll() is None and _running(child)


def _reaping(proc, port, serverapp, runs, said):
    """reap_after_run in a thread; (thread, its result or error)."""
    out: dict = {}

    def reap():
        try:
            out["said"] = reap_after_run("7", serverapp.pid, (proc.pid, port), runs=runs, say=said.append,
                                         patience=120)
        except LocalSuperLinkError as exc:
            out["error"] = str(exc)

    thread = threading.Thread(target=reap, daemon=True)
    thread.start()
    return thread, out


def _until(what: str, done, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


def test_the_reaper_stops_the_superlink_only_after_the_run_and_its_client_are_done(fake_superlink):
    proc, port, child = _managed(fake_superlink)
    assert managed_superlink_above(child) == (proc.pid, port)  # the SuperLink a process runs under
    assert managed_superlink_above(os.getpid()) is None
    serverapp = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                 stdin=subprocess.PIPE)
    client = subprocess.Popen(  # a `flwr run --stream` still reading the run's logs
        [sys.executable, "-c", "import socket, sys; s = socket.create_connection(('127.0.0.1', "
         "int(sys.argv[1]))); print('connected', flush=True); sys.stdin.read()", str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "connected"
    assert client_pids(port) == [client.pid]
    busy, said = [("7", "running"), ("6", "finished:completed")], []
    thread, out = _reaping(proc, port, serverapp, lambda p: list(busy), said)
    try:
        serverapp.stdin.close()  # the ServerApp's process exits
        _until("the reaper to see the ServerApp exit", lambda: any("has exited" in s for s in said))
        assert proc.poll() is None  # run 7 is still listed as running
        busy[0] = ("7", "finished:completed")
        seen = "run 7 is finished:completed; Flower lists no run that is not finished"
        _until("the reaper to see no unfinished run", lambda: seen in said)
        assert proc.poll() is None and thread.is_alive()  # the client is still connected
        client.stdin.close()
        thread.join(timeout=120)
        assert not thread.is_alive() and out["said"].startswith("stopped Flower's local SuperLink"), out
        assert proc.wait(timeout=30) == 0 and not _running(child)
    finally:
        for p in (serverapp, client):
            p.kill()
            p.wait()


def test_the_reaper_stops_nothing_while_another_run_is_not_finished(fake_superlink):
    proc, port, child = _managed(fake_superlink)
    serverapp = subprocess.Popen([sys.executable, "-c", "pass"])
    serverapp.wait()
    said = []
    with pytest.raises(LocalSuperLinkError, match=r"still waiting for run 7 and every other run to finish"):
        reap_after_run("7", serverapp.pid, (proc.pid, port), runs=lambda p: [("8", "pending")],
                       say=said.append, patience=2)
    assert said == ["the ServerApp of run 7 has exited"]
    assert proc.poll() is None and _running(child)


def test_a_listed_run_carries_flowers_details_of_its_status():
    """What the reaper logs: why Flower failed a run (here its expired task heartbeat), not only that it
    did; a completed run has none (Flower: N/A). Flower's banner before the JSON is skipped."""
    listed = ('Loading project configuration...\n{"success": true, "runs": ['
              '{"run-id": "7", "status": "finished:failed",'
              ' "status-details": "No heartbeat received from the task"},'
              ' {"run-id": "8", "status": "finished:completed", "status-details": "N/A"},'
              ' {"run-id": "9", "status": "running", "status-details": ""},'
              ' {"run-id": "10", "status": "pending"}]}')
    assert parse_run_list(listed) == [("7", "finished:failed (No heartbeat received from the task)"),
                                      ("8", "finished:completed"), ("9", "running"), ("10", "pending")]


def test_a_serverapp_not_on_the_managed_superlink_starts_a_reaper_that_does_nothing(tmp_path):
    said = start_superlink_reaper(7, tmp_path)  # this test's process runs under no flower-superlink
    assert said == "this run is not on Flower's managed local SuperLink: nothing to stop"
    assert not (tmp_path / REAPER_LOG_NAME).exists()


@pytest.mark.parametrize("keep, started", [(True, False), ("true", False), (False, True)])
def test_run_config_keep_local_superlink_starts_no_reaper(monkeypatch, tmp_path, keep, started):
    from types import SimpleNamespace

    import fedcl.server.app as server_app
    import fedcl.server.flower_local as flower_local

    calls = []
    monkeypatch.setattr(flower_local, "start_superlink_reaper",
                        lambda run_id, out_dir: calls.append(run_id) or "ok")
    context = SimpleNamespace(run_id=7, run_config={"keep-local-superlink": keep})
    server_app._after_a_local_run(context, tmp_path)
    assert calls == ([7] if started else [])
