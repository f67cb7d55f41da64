"""fedcl.bound_child: children that end with their parent, started without fork handlers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from fedcl import bound_child
from fedcl.bound_child import bound_argv, popen_bound

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie of an exited child counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_the_child_gets_sigterm_when_its_parent_is_killed(tmp_path):
    """A parent that starts `sleep` through popen_bound and is then killed (SIGKILL: no cleanup runs)
    leaves no `sleep` behind."""
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from fedcl.bound_child import popen_bound
            child = popen_bound(["sleep", "600"])
            print(child.pid, flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        parent.kill()
        parent.wait()
        deadline = time.time() + 60  # a backstop; the signal comes at once
        while not _gone(child_pid) and time.time() < deadline:
            time.sleep(0.05)
        assert _gone(child_pid), "the child outlived its killed parent"
    finally:
        parent.kill()


def test_the_child_is_the_command_itself_with_its_output_and_status():
    out = subprocess.run(bound_argv(["sh", "-c", "echo hello; exit 3"]), capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (3, "hello\n")
    proc = popen_bound(["sh", "-c", "echo $$"], stdout=subprocess.PIPE, text=True)
    assert int(proc.communicate()[0]) == proc.pid  # exec'd in place: signals to proc reach the command


def test_a_missing_command_is_one_line_and_status_127():
    out = subprocess.run(bound_argv(["fedcl-no-such-command-here"]), capture_output=True, text=True)
    assert out.returncode == 127
    assert out.stderr.strip().splitlines() == [
        "fedcl: cannot start 'fedcl-no-such-command-here': No such file or directory"]


def test_a_launcher_whose_parent_is_already_gone_does_not_start_the_command(tmp_path):
    marker = tmp_path / "ran"
    code = bound_child.main([str(os.getpid() + 10**7), "--", "touch", str(marker)])  # not our parent
    assert code == 1 and not marker.exists()


def test_preexec_fn_is_refused():
    with pytest.raises(TypeError, match="preexec_fn"):
        popen_bound(["true"], preexec_fn=lambda: None)


def test_starting_children_beside_busy_grpc_threads_runs_no_grpc_fork_handler():
    """The failure this module exists for: Popen(preexec_fn=...) forks with fork(), and gRPC's fork
    handlers ran (and at times blocked the parent for good) while gRPC threads were busy. popen_bound
    starts 200 children beside two threads making gRPC calls; gRPC logs the forks it sees."""
    script = textwrap.dedent("""
        import threading
        import grpc
        from fedcl.bound_child import popen_bound

        def busy():
            while True:
                with grpc.insecure_channel("127.0.0.1:9") as channel:
                    try:
                        grpc.channel_ready_future(channel).result(timeout=0.05)
                    except grpc.FutureTimeoutError:
                        pass

        for _ in range(2):
            threading.Thread(target=busy, daemon=True).start()
        for _ in range(200):
            assert popen_bound(["true"]).wait() == 0
        print("done", flush=True)
    """)
    env = {**os.environ, "GRPC_VERBOSITY": "INFO"}  # with preexec_fn: "skipping fork() handlers" lines
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.stdout == "done\n", out.stderr[-2000:]
    assert "fork" not in out.stderr, out.stderr[-2000:]
